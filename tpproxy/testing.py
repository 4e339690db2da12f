"""
Helpers for tests of TP and of programs built on it: a throwaway PKI made at
test time, and server configurations that use it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpproxy.config import ServerConfig, parseServerConfig
from tpproxy.pki import CertificateAuthority, Issued, keyPEM, writePrivate


@dataclass
class TestPKI:
    """
    A CA, a server certificate for localhost/127.0.0.1/::1, and client
    certificates, all written under C{directory}.
    """

    directory: Path
    ca: CertificateAuthority

    @classmethod
    def create(cls, directory: str | Path) -> TestPKI:
        d = Path(directory).absolute()
        d.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("TP test CA")
        (d / "ca.pem").write_bytes(ca.certPEM)
        writePrivate(d / "ca.key", keyPEM(ca.key))
        pki = cls(d, ca)
        server = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True)
        server.write(d / "server.pem", d / "server.key")
        return pki

    def client(self, name: str, stem: str | None = None, **kw: Any) -> tuple[str, str]:
        """
        Issue a client certificate (CN C{name}) and return (cert, key)
        paths.  Keyword arguments go to L{CertificateAuthority.issue}.
        """
        kw.setdefault("client", True)
        issued: Issued = self.ca.issue(name, **kw)
        stem = stem or name
        issued.write(self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
        return str(self.directory / f"{stem}.pem"), str(self.directory / f"{stem}.key")

    def expiredClient(self, name: str) -> tuple[str, str]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return self.client(
            name,
            stem=f"{name}-expired",
            notBefore=now - datetime.timedelta(days=2),
            notAfter=now - datetime.timedelta(days=1),
        )

    @property
    def caPath(self) -> str:
        return str(self.directory / "ca.pem")

    def serverConfig(self, rules: list[dict[str, Any]] | None = None, **server: Any) -> ServerConfig:
        """
        A validated L{ServerConfig} using this PKI.  C{server} keys go into
        the C{[server]} table (C{None} drops a default), except C{deny},
        C{groups}, C{exposures}, C{reverse}, C{e2e}, C{acme}, C{router}, C{limits} and C{admin}, which are
        tables of their own.
        """
        extra = {name: server.pop(name) for name in ("deny", "groups", "exposures", "reverse", "e2e", "acme", "router", "limits", "admin", "webtransport") if name in server}
        table: dict[str, Any] = {
            "listen": "tcp:0:interface=127.0.0.1",
            "certificate": "server.pem",
            "key": "server.key",
            "client_ca": "ca.pem",
        }
        table.update(server)
        # None removes a default (e.g. certificate=None with [acme]).
        table = {k: v for k, v in table.items() if v is not None}
        data: dict[str, Any] = {"server": table, "rules": rules if rules is not None else LOOPBACK_RULES}
        data.update(extra)
        return parseServerConfig(data, self.directory, str(self.directory / "test.toml"))


LOOPBACK_RULES: list[dict[str, Any]] = [
    {"identities": "*", "hosts": ["127.0.0.0/8", "::1/128"], "ports": "*", "transports": ["tcp", "udp"]},
]


def reverseTables(
    pki: TestPKI, acceptTimeout: float = 10, keepalive: float = 15, exposers: tuple[str, ...] = ("alice",)
) -> dict[str, Any]:
    """
    Server config tables for reverse tunnels on loopback: C{exposers}
    (default C{alice}) may expose public ports and names under
    C{.localhost}; C{alice} and C{bob} may dial them.
    """
    return {
        "exposures": [
            {"identities": list(exposers), "public_ports": "1024-65535", "names": "*.localhost", "dialers": ["alice", "bob"]},
        ],
        "reverse": {"public_interface": "127.0.0.1", "accept_timeout": acceptTimeout, "keepalive": keepalive},
        "e2e": {"ca_certificate": "ca.pem", "ca_key": "ca.key"},
    }


REVERSE_RULES: list[dict[str, Any]] = LOOPBACK_RULES + [
    {"identities": "*", "hosts": "*.localhost", "ports": "*"},
]


def loopbackServerTOML(port: int, hosts: str = "127.0.0.0/8", extra: str = "") -> str:
    """
    A server config file for C{twist tp} on 127.0.0.1:C{port}, TLS and QUIC,
    with this PKI's files (beside it), letting anyone reach C{hosts}
    (C{", "}-separated patterns); C{extra} is TOML appended as is.
    """
    patterns = ", ".join(f'"{h.strip()}"' for h in hosts.split(","))
    return f"""
[server]
listen = "tcp:{port}:interface=127.0.0.1"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
quic = ["127.0.0.1:{port}"]

[[rules]]
identities = "*"
hosts = [{patterns}]
ports = "*"
{extra}"""


def handshakeInMemory(server: Any, client: Any, rounds: int = 20) -> list[Exception]:
    """
    Run a TLS handshake between two pyOpenSSL connections on memory BIOs
    (C{server} in accept state, C{client} in connect state), moving their
    bytes back and forth; the TLS errors either side raised.
    """
    from OpenSSL import SSL

    errors: list[Exception] = []
    for _ in range(rounds):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                errors.append(e)
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return errors

