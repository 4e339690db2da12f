"""
Tests for L{tpproxy.config}: the server and client TOML configurations,
checked at load with messages naming the key at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.config import (
    ClientConfig,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    defaultClientConfigPath,
    loadClientConfig,
    loadServerConfig,
    parseServerConfig,
)
from tpproxy.pki import CertificateAuthority, identityOf
from tpproxy.testing import TestPKI
from tpproxy.verify import ClientCertChecker

VALID_TOML = """\
[server]
listen = ["tcp:8443", "tcp:9443:interface=127.0.0.1"]
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
handshake_timeout = 5
hello_timeout = 2.5
connect_timeout = 3600

[deny]
identities = ["mallory"]
serials = ["0A:1B:2c", "ff"]

[groups]
ops = ["alice", "bob"]

[[rules]]
identities = "group:ops"
hosts = ["*.example.org", "10.0.0.0/8"]
ports = [22, "8000-8080"]
comment = "ops reach everything"

[[rules]]
action = "deny"
identities = "*"
hosts = "*"
ports = "*"
transports = ["tcp", "udp"]
"""


def crlPEM(ca: CertificateAuthority, serials: list[int]) -> bytes:
    return ca.crl(serials).public_bytes(serialization.Encoding.PEM)


class ServerConfigMixin:
    """
    A throwaway PKI in a fresh directory, and helpers to parse
    configurations that use it.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())  # type: ignore[attr-defined]
        self.pki = TestPKI.create(self.directory)

    def table(self, **server: Any) -> dict[str, Any]:
        """
        A valid C{[server]} table, with C{server} applied; a value of
        L{None} removes the key.
        """
        table: dict[str, Any] = {"certificate": "server.pem", "key": "server.key", "client_ca": "ca.pem"}
        for k, v in server.items():
            if v is None:
                table.pop(k, None)
            else:
                table[k] = v
        return table

    def parse(self, data: dict[str, Any] | None = None, **server: Any) -> ServerConfig:
        if data is None:
            data = {"server": self.table(**server)}
        return parseServerConfig(data, self.directory, str(self.directory / "tp.toml"))

    def assertConfigError(self, message: str, f: Any, *args: Any, **kw: Any) -> str:
        """
        Assert that C{f(*args, **kw)} raises L{ConfigError} whose message
        starts with C{message}; return the message.
        """
        e = self.assertRaises(ConfigError, f, *args, **kw)  # type: ignore[attr-defined]
        self.assertTrue(  # type: ignore[attr-defined]
            str(e).startswith(message), f"{str(e)!r} does not start with {message!r}"
        )
        return str(e)

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, str):
            path.write_text(text)
        else:
            path.write_bytes(text)
        return path


class ValidServerConfigTests(ServerConfigMixin, SynchronousTestCase):
    def test_load(self) -> None:
        """
        A complete file loads into a L{ServerConfig} with absolute paths,
        float timeouts, normalized deny serials and a policy.
        """
        path = self.write("tp.toml", VALID_TOML)
        config = loadServerConfig(path)
        d = self.directory.resolve()
        self.assertEqual(config.path, str(d / "tp.toml"))
        self.assertEqual(config.listen, ("tcp:8443", "tcp:9443:interface=127.0.0.1"))
        self.assertEqual(config.certificate, str(d / "server.pem"))
        self.assertEqual(config.key, str(d / "server.key"))
        self.assertEqual(config.clientCAs, (str(d / "ca.pem"),))
        self.assertIsNone(config.crl)
        self.assertEqual((config.handshakeTimeout, config.helloTimeout, config.connectTimeout), (5.0, 2.5, 3600.0))
        self.assertIsInstance(config.handshakeTimeout, float)
        self.assertEqual(config.deniedIdentities, {"mallory"})
        self.assertEqual(config.deniedSerials, {"a1b2c", "ff"})  # normalized hex
        self.assertEqual(len(config.policy.rules), 2)
        self.assertEqual(config.policy.rules[0].identities, ("alice", "bob"))
        self.assertEqual(config.policy.rules[1].action, "deny")
        self.assertTrue(config.policy.precheck("alice", "www.example.org", 22, "tcp").allowed)
        self.assertFalse(config.policy.precheck("carol", "www.example.org", 22, "tcp").allowed)

    def test_defaults(self) -> None:
        """
        Optional keys take their defaults: listen on TCP 443, 10 s timeouts,
        no CRL, nothing denied, no rules.
        """
        config = self.parse()
        self.assertEqual(config.listen, ("tcp:443",))
        self.assertEqual((config.handshakeTimeout, config.helloTimeout, config.connectTimeout), (10.0, 10.0, 10.0))
        self.assertIsNone(config.crl)
        self.assertEqual(config.deniedIdentities, frozenset())
        self.assertEqual(config.deniedSerials, frozenset())
        self.assertEqual(config.policy.rules, ())

    def test_listenString(self) -> None:
        """
        C{listen} may be one endpoint description.
        """
        self.assertEqual(self.parse(listen="tcp:0:interface=127.0.0.1").listen, ("tcp:0:interface=127.0.0.1",))

    def test_testingHelper(self) -> None:
        """
        L{TestPKI.serverConfig} builds a valid configuration of the PKI.
        """
        config = self.pki.serverConfig(hello_timeout=1)
        self.assertEqual(config.helloTimeout, 1.0)
        self.assertEqual(config.clientCAs, (str((self.directory / "ca.pem").resolve()),))

    def test_severalCAs(self) -> None:
        """
        C{client_ca} may list several files.
        """
        other = CertificateAuthority.create("Other CA")
        self.write("other-ca.pem", other.certPEM)
        config = self.parse(client_ca=["ca.pem", "other-ca.pem"])
        self.assertEqual(len(config.clientCAs), 2)
        self.assertTrue(config.clientCAs[1].endswith("other-ca.pem"))

    def test_relativePaths(self) -> None:
        """
        Relative paths are resolved against the directory of the
        configuration file, not the working directory.
        """
        conf = self.directory / "etc" / "tp"
        conf.mkdir(parents=True)
        (conf / "certs").mkdir()
        os.rename(self.directory / "server.pem", conf / "certs" / "server.pem")
        self.write(
            "etc/tp/server.toml",
            '[server]\ncertificate = "certs/server.pem"\nkey = "../../server.key"\nclient_ca = ["./../../ca.pem"]\n',
        )
        self.assertNotEqual(Path.cwd().resolve(), conf.resolve())
        config = loadServerConfig(conf / "server.toml")
        self.assertEqual(config.certificate, str((conf / "certs" / "server.pem").resolve()))
        self.assertEqual(config.key, str((self.directory / "server.key").resolve()))
        self.assertEqual(config.clientCAs, (str((self.directory / "ca.pem").resolve()),))
        self.assertEqual(config.path, str((conf / "server.toml").resolve()))

    def test_absolutePaths(self) -> None:
        """
        Absolute paths are kept.
        """
        ca = str((self.directory / "ca.pem").resolve())
        self.assertEqual(self.parse(client_ca=ca).clientCAs, (ca,))

    def test_validCRL(self) -> None:
        """
        A CRL signed by a client CA is accepted.
        """
        self.write("ca.crl", crlPEM(self.pki.ca, [1234, 5678]))
        config = self.parse(crl="ca.crl")
        self.assertEqual(config.crl, str((self.directory / "ca.crl").resolve()))

    def test_CRLOfSecondCA(self) -> None:
        """
        A CRL signed by any one of several client CAs is accepted.
        """
        other = CertificateAuthority.create("Other CA")
        self.write("other-ca.pem", other.certPEM)
        self.write("other.crl", crlPEM(other, [1]))
        config = self.parse(client_ca=["ca.pem", "other-ca.pem"], crl="other.crl")
        self.assertIsNotNone(config.crl)


class ServerConfigErrorTests(ServerConfigMixin, SynchronousTestCase):
    def test_missingServer(self) -> None:
        """
        A configuration without a C{[server]} table is refused.
        """
        self.assertConfigError("server: missing [server] table", self.parse, {})
        self.assertConfigError("server: missing [server] table", self.parse, {"server": "tcp:443"})
        self.assertConfigError("server: missing [server] table", self.parse, {"rules": []})

    def test_missingRequired(self) -> None:
        """
        C{certificate}, C{key} and C{client_ca} are required.
        """
        for key in ("certificate", "key", "client_ca"):
            self.assertConfigError(f"server.{key}: missing", self.parse, **{key: None})

    def test_nonexistentFiles(self) -> None:
        """
        A file that does not exist, or a directory, is refused naming the
        key and the resolved path.
        """
        for key in ("certificate", "key", "client_ca", "crl"):
            message = self.assertConfigError(f"server.{key}: file ", self.parse, **{key: "nope.pem"})
            self.assertIn(str((self.directory / "nope.pem").resolve()), message)
            self.assertTrue(message.endswith("does not exist"), message)
        (self.directory / "sub").mkdir()
        self.assertConfigError("server.key: file ", self.parse, key="sub")
        self.assertConfigError("server.client_ca: file ", self.parse, client_ca=["ca.pem", "nope.pem"])

    def test_quicMaxDatagramSize(self) -> None:
        """
        C{server.quic_max_datagram_size}: 16384 by default, a whole number
        of bytes from 1200 (no path MTU search) to 65527; it reaches the
        QUIC listener.
        """
        self.assertEqual(self.parse().quicMaxDatagramSize, 16384)
        for value in (1200, 1472, 65527):
            self.assertEqual(self.parse(quic_max_datagram_size=value).quicMaxDatagramSize, value)
        for value in (1199, 65528, 0, -1, 1500.0, "1500", True):
            self.assertConfigError("server.quic_max_datagram_size: expected a whole number of bytes from 1200 to 65527", self.parse, quic_max_datagram_size=value)
        from twisted.internet.testing import MemoryReactorClock

        from tpproxy.service import makeQuicListener, makeServerFactory

        config = self.parse(quic_max_datagram_size=1472, state_dir=str(self.directory / "state"))
        reactor = MemoryReactorClock()
        factory = makeServerFactory(config, reactor)  # type: ignore[arg-type]
        self.assertEqual(makeQuicListener(config, reactor, factory.wrappedFactory).maxDatagramSize, 1472)  # type: ignore[arg-type]

    def test_badPathValues(self) -> None:
        """
        A path must be a non-empty string.
        """
        for key in ("certificate", "key", "crl"):
            for value in ("", 1, ["server.pem"], True):
                self.assertConfigError(f"server.{key}: expected a file path", self.parse, **{key: value})
        for value in ([], 1, {"a": "ca.pem"}):
            self.assertConfigError(
                "server.client_ca: expected a file path or a list of file paths", self.parse, client_ca=value
            )
        self.assertConfigError("server.client_ca: expected a file path", self.parse, client_ca=["ca.pem", ""])

    def test_notPEM(self) -> None:
        """
        A certificate, key, CA or CRL file that does not hold what it should
        is refused, naming the key and the file.
        """
        junk = self.write("junk.pem", b"this is not PEM\n")
        cases = [
            ("certificate", "server.certificate: {}: not a PEM certificate"),
            ("key", "server.key: {}: not an unencrypted PEM private key"),
            ("client_ca", "server.client_ca: {}: not a PEM certificate"),
            ("crl", "server.crl: {}: not a PEM CRL"),
        ]
        for key, message in cases:
            self.assertConfigError(message.format(junk.resolve()), self.parse, **{key: "junk.pem"})

    def test_wrongKindOfPEM(self) -> None:
        """
        A certificate where the key belongs, a key where a certificate
        belongs, or a certificate where the CRL belongs is refused.
        """
        d = self.directory.resolve()
        self.assertConfigError(f"server.key: {d / 'server.pem'}: not an unencrypted", self.parse, key="server.pem")
        self.assertConfigError(
            f"server.certificate: {d / 'server.key'}: not a PEM certificate", self.parse, certificate="server.key"
        )
        self.assertConfigError(f"server.client_ca: {d / 'server.key'}: ", self.parse, client_ca="server.key")
        self.assertConfigError(f"server.crl: {d / 'ca.pem'}: not a PEM CRL", self.parse, crl="ca.pem")

    def test_encryptedKey(self) -> None:
        """
        A key protected by a passphrase is refused: TP starts unattended.
        """
        key = serialization.load_pem_private_key((self.directory / "server.key").read_bytes(), None)
        self.write(
            "enc.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        self.assertConfigError("server.key: ", self.parse, key="enc.key")

    def test_unknownKeys(self) -> None:
        """
        Unknown keys are refused at the top level and in C{[server]} and
        C{[deny]}, all named.
        """
        data: dict[str, Any] = {"server": self.table(), "rule": [], "listen": "tcp:1"}
        self.assertConfigError("unknown key(s) listen, rule", self.parse, data)
        self.assertConfigError("server: unknown key(s) cert, timeout", self.parse, cert="x", timeout=1)
        data = {"server": self.table(), "deny": {"identities": [], "serial": ["ff"]}}
        self.assertConfigError("deny: unknown key(s) serial", self.parse, data)

    def test_badTimeouts(self) -> None:
        """
        Timeouts must be numbers of seconds in (0, 3600].
        """
        for name, attribute in (
            ("handshake_timeout", "handshakeTimeout"),
            ("hello_timeout", "helloTimeout"),
            ("connect_timeout", "connectTimeout"),
        ):
            for value in (0, 0.0, -1, -0.5, True, False, "10", "10s", 3600.5, 3601, float("nan"), float("inf"), [10]):
                message = self.assertConfigError(
                    f"server.{name}: expected a number of seconds between 0 and 3600, got ",
                    self.parse,
                    **{name: value},
                )
                self.assertTrue(message.endswith(repr(value)), message)
            self.assertEqual(getattr(self.parse(**{name: 0.001}), attribute), 0.001)
            self.assertEqual(getattr(self.parse(**{name: 3600}), attribute), 3600.0)

    def test_badListen(self) -> None:
        """
        C{listen} must be an endpoint description or a non-empty list of
        them.
        """
        for value in (443, [], [""], "", ["tcp:443", 443], {"tcp": 443}, True):
            self.assertConfigError("server.listen: expected an endpoint description", self.parse, listen=value)

    def test_listenParsedAtLoad(self) -> None:
        """
        Each C{listen} entry is parsed as Twisted will parse it, so a typo,
        an out-of-range port, an unknown endpoint type or C{ssl:} (TP does
        its own TLS) is a one-line error naming the key, not a traceback
        at start.
        """
        cases = {
            "tcp:184x5": "server.listen: 'tcp:184x5' is not a valid endpoint description",
            "tcp:99999": "server.listen: 'tcp:99999': port 99999 is out of range",
            "ssl:18445": "server.listen: 'ssl:18445': TP does its own TLS",
            "foo:1": "server.listen: 'foo:1': unknown endpoint type 'foo'",
        }
        for value, message in cases.items():
            error = self.assertConfigError(message, self.parse, listen=["tcp:8443", value])
            self.assertNotIn("\n", error)
        config = self.parse(listen=["tcp:8443:interface=127.0.0.1", "tcp6:8443:interface=\\:\\:1"])
        self.assertEqual(config.listen, ("tcp:8443:interface=127.0.0.1", "tcp6:8443:interface=\\:\\:1"))

    def test_admin(self) -> None:
        """
        C{[admin]} is off when absent; C{listen} is a checked endpoint;
        C{identities}, when given, is a non-empty list of names.
        """
        self.assertIsNone(self.parse().admin)
        data = {"server": self.table(), "admin": {"listen": "tcp:9090:interface=127.0.0.1"}}
        admin = self.parse(data).admin
        self.assertEqual((admin.listen, admin.identities), ("tcp:9090:interface=127.0.0.1", None))
        data["admin"]["identities"] = ["alice", "ops-robot"]
        self.assertEqual(self.parse(data).admin.identities, frozenset({"alice", "ops-robot"}))
        bad = [
            ({}, "admin.listen: missing"),
            ({"listen": "tcp:90x"}, "admin.listen: 'tcp:90x' is not a valid endpoint description"),
            ({"listen": "ssl:9090"}, "admin.listen: 'ssl:9090': TP does its own TLS"),
            ({"listen": "tcp:9090", "identities": []}, "admin.identities: expected a non-empty list"),
            ({"listen": "tcp:9090", "identities": "alice"}, "admin.identities: expected a non-empty list"),
            ({"listen": "tcp:9090", "port": 1}, "admin: unknown key(s) port"),
        ]
        for table, message in bad:
            self.assertConfigError(message, self.parse, {"server": self.table(), "admin": table})

    def test_cluster(self) -> None:
        """
        C{[cluster]} is the in-memory store (one instance) when absent; with
        C{etcd} it needs C{instance}, C{advertise} and C{peer_listen}; every
        key is checked, and a bad one names itself.
        """
        cluster = self.parse().cluster
        self.assertEqual((cluster.etcd, cluster.instance, cluster.leaseTTL, cluster.prefix, cluster.timeout, cluster.peerListen), ((), "local", 10, "/tp/", 5.0, None))
        self.assertFalse(cluster.shared)
        good = {
            "etcd": ["http://10.0.0.5:2379", "https://etcd.example:2379"], "instance": "tp-a.1_x", "advertise": "10.0.0.1:7443",
            "lease_ttl": 2, "prefix": "/svc/tp/", "timeout": 2.5, "peer_listen": "tcp:7443:interface=10.0.0.1",
        }
        cluster = self.parse({"server": self.table(), "cluster": good}).cluster
        self.assertEqual(
            (cluster.etcd, cluster.instance, cluster.advertise, cluster.leaseTTL, cluster.prefix, cluster.timeout, cluster.peerListen),
            (("http://10.0.0.5:2379", "https://etcd.example:2379"), "tp-a.1_x", "10.0.0.1:7443", 2, "/svc/tp/", 2.5, "tcp:7443:interface=10.0.0.1"),
        )
        self.assertTrue(cluster.shared)
        self.assertEqual(self.parse({"server": self.table(), "cluster": {**good, "advertise": "[::1]:7443"}}).cluster.advertise, "[::1]:7443")
        self.assertEqual(self.parse({"server": self.table(), "cluster": {**good, "etcd": "http://e:2379"}}).cluster.etcd, ("http://e:2379",))
        bad = [
            ({"etcd": []}, "cluster.etcd: expected a list of etcd client URLs"),
            ({"etcd": ["10.0.0.5:2379"]}, "cluster.etcd: expected a list of etcd client URLs"),
            ({"etcd": [1]}, "cluster.etcd: expected a list"),
            ({"instance": "tp/a"}, "cluster.instance: expected an id"),
            ({"instance": "-a"}, "cluster.instance: expected an id"),
            ({"instance": "a" * 64}, "cluster.instance: expected an id"),
            ({"instance": None}, "cluster.instance: missing"),
            ({"advertise": None}, "cluster.advertise: missing"),
            ({"advertise": "10.0.0.1"}, "cluster.advertise: expected HOST:PORT"),
            ({"advertise": "10.0.0.1:0"}, "cluster.advertise: expected HOST:PORT"),
            ({"advertise": "::1:7443"}, "cluster.advertise: expected HOST:PORT"),
            ({"advertise": 7443}, "cluster.advertise: expected HOST:PORT"),
            ({"lease_ttl": 1}, "cluster.lease_ttl: expected a whole number of seconds, at least 2"),
            ({"lease_ttl": 2.5}, "cluster.lease_ttl: expected a whole number"),
            ({"lease_ttl": True}, "cluster.lease_ttl: expected a whole number"),
            ({"prefix": "tp/"}, "cluster.prefix: expected a key prefix"),
            ({"prefix": "/tp"}, "cluster.prefix: expected a key prefix"),
            ({"prefix": "/a//b/"}, "cluster.prefix: expected a key prefix"),
            ({"timeout": 0}, "cluster.timeout: expected a number of seconds"),
            ({"peer_listen": None}, "cluster.peer_listen: missing"),
            ({"peer_listen": "ssl:7443"}, "cluster.peer_listen: 'ssl:7443': TP does its own TLS"),
            ({"peer_listen": "tcp:74x"}, "cluster.peer_listen: 'tcp:74x' is not a valid endpoint description"),
            ({"peers": 1}, "cluster: unknown key(s) peers"),
        ]
        for change, message in bad:
            table = {k: v for k, v in {**good, **change}.items() if v is not None}
            self.assertConfigError(message, self.parse, {"server": self.table(), "cluster": table})
        self.assertConfigError("cluster: expected a table", self.parse, {"server": self.table(), "cluster": "etcd"})
        # Without etcd, one instance: nothing is required.
        self.assertEqual(self.parse({"server": self.table(), "cluster": {"instance": "solo"}}).cluster.instance, "solo")

    def test_badDeny(self) -> None:
        """
        C{[deny]} must be a table of string lists, serials in hexadecimal.
        """
        base = self.table()
        self.assertConfigError("deny: expected a table", self.parse, {"server": base, "deny": ["ff"]})
        for name in ("identities", "serials"):
            for value in ("ff", [1], ["ff", None], {"a": "b"}):
                self.assertConfigError(
                    f"deny.{name}: expected a list of strings", self.parse, {"server": base, "deny": {name: value}}
                )
        for serial in ("xyz", "12g4", "", ":", "ff ff", "0A:1B:ZZ"):
            self.assertConfigError(
                f"deny.serials: {serial!r} is not a hexadecimal serial number",
                self.parse,
                {"server": base, "deny": {"serials": ["ff", serial]}},
            )

    def test_deniedSerialsTakeEffect(self) -> None:
        """
        Every serial that C{deny.serials} accepts denies the certificate it
        names, in any accepted spelling.

        Regression (was a bug in tpproxy/config.py, parseServerConfig): the check is
        C{int(serial.replace(":", ""), 16)}, and Python's C{int} also
        accepts a C{0x} prefix, underscores, surrounding blanks and a sign.
        So C{"0x" + serial}, C{" " + serial} or a serial with an underscore
        pass validation, are stored as written (lowercased), and never
        match the certificate's serial in L{ClientCertChecker.refusal}: the
        deny entry silently does nothing.  Either such spellings should be
        refused with C{deny.serials: ... is not a hexadecimal serial
        number}, or they should be normalized.
        """
        certPath, _ = self.pki.client("revoked-by-serial")
        cert = x509.load_pem_x509_certificate(Path(certPath).read_bytes())
        serial = identityOf(cert).serial
        for spelling in ("0x" + serial, "0X" + serial.upper(), " " + serial, serial[:2] + "_" + serial[2:]):
            try:
                config = self.parse({"server": self.table(), "deny": {"serials": [spelling]}})
            except ConfigError as e:
                self.assertIn("deny.serials", str(e))
                continue
            checker = ClientCertChecker(config.deniedIdentities, config.deniedSerials)
            self.assertIsNotNone(
                checker.refusal(cert), f"deny.serials = [{spelling!r}] was accepted but does not deny serial {serial}"
            )

    def test_deniedSerialsNormalized(self) -> None:
        """
        Colons are dropped and letters lowercased in denied serials, which
        then deny the certificate.
        """
        certPath, _ = self.pki.client("alice")
        cert = x509.load_pem_x509_certificate(Path(certPath).read_bytes())
        serial = identityOf(cert).serial
        colons = ":".join(serial.upper()[i : i + 2] for i in range(0, len(serial), 2))
        config = self.parse({"server": self.table(), "deny": {"serials": [colons]}})
        self.assertEqual(config.deniedSerials, {serial.replace(":", "")})
        checker = ClientCertChecker(config.deniedIdentities, config.deniedSerials)
        self.assertEqual(checker.refusal(cert), f"certificate serial {serial} is on the deny list")

    def test_e2eCertificateNames(self) -> None:
        """
        The keys of C{[e2e.certificates]} are E2E names
        (L{tpproxy.names.isCertificateName}), stored normalized; a key that
        no E2E name can be (C{_}, a wildcard, an address) is refused.  The
        server's own C{key} is left alone.
        """
        entry = {"certificate": "server.pem", "key": "server.key"}
        config = self.parse({"server": self.table(), "e2e": {"certificates": {"SSH.Example.org.": entry}}})
        self.assertEqual(list(config.e2eFiles), ["ssh.example.org"])
        # Regression: the loop over these names used to overwrite the
        # server's key path with "e2e.certificates.'NAME'".
        self.assertEqual(config.key, str((self.directory / "server.key").absolute()))
        for name in ("_ssh.example.org", "*.example.org", "10.0.0.1", "a b"):
            self.assertConfigError(
                f"e2e.certificates.{name!r}: not an E2E name",
                self.parse,
                {"server": self.table(), "e2e": {"certificates": {name: entry}}},
            )

    def test_acmeNames(self) -> None:
        """
        C{acme.names} are ACME names (L{tpproxy.names.isAcmeName}): two
        labels or more, no C{_}, no address; a wildcard is refused for the
        challenge it would need.
        """
        def acme(*names: str) -> dict[str, Any]:
            return {"server": self.table(), "acme": {"directory": "https://ca.example/dir", "names": list(names)}}

        self.assertEqual(self.parse(acme("TP.Example.org.", "tp.example.org")).acme.names, ("tp.example.org",))
        self.assertConfigError("acme.names: '*.example.org': wildcards need the dns-01", self.parse, acme("*.example.org"))
        for name in ("localhost", "_tp.example.org", "192.0.2.1", "example.123", "a" * 64 + ".example"):
            self.assertConfigError(f"acme.names: {name!r} is not a DNS name", self.parse, acme(name))

    def test_badRules(self) -> None:
        """
        Errors in C{[[rules]]} and C{[groups]} are reported with their key.
        """
        data = {"server": self.table(), "rules": [{"identities": "*", "hosts": "*", "ports": 0}]}
        self.assertConfigError("rules[1].ports: ", self.parse, data)
        data = {"server": self.table(), "groups": {"ops": 1}}
        self.assertConfigError("groups.ops: ", self.parse, data)

    def test_CRLFromOtherCA(self) -> None:
        """
        A CRL not signed by a client CA is refused, also when its issuer
        has the same name as the client CA.
        """
        for name in ("Some other CA", "TP test CA"):
            other = CertificateAuthority.create(name)
            self.write("other.crl", crlPEM(other, [1, 2]))
            self.assertConfigError(
                f"server.crl: {(self.directory / 'other.crl').resolve()}: not signed by any of the client CAs in server.client_ca",
                self.parse,
                crl="other.crl",
            )

    def test_invalidTOML(self) -> None:
        """
        A file that is not TOML is refused, naming the file.
        """
        path = self.write("bad.toml", "[server\ncertificate = \n")
        self.assertConfigError(f"{path.resolve()}: not valid TOML (", loadServerConfig, path)
        path = self.write("dup.toml", '[server]\nkey = "a"\nkey = "b"\n')
        self.assertConfigError(f"{path.resolve()}: not valid TOML (", loadServerConfig, path)

    def test_missingFile(self) -> None:
        """
        A configuration file that does not exist is refused, naming it.
        """
        path = self.directory / "absent.toml"
        self.assertConfigError(f"{path.resolve()}: no such file", loadServerConfig, path)

    def test_errorsFromFile(self) -> None:
        """
        Errors in a file are reported as for a parsed table.
        """
        path = self.write("tp.toml", VALID_TOML.replace("hello_timeout = 2.5", "hello_timeout = 0"))
        self.assertConfigError("server.hello_timeout: ", loadServerConfig, path)
        path = self.write("tp.toml", VALID_TOML.replace('ports = "*"', 'ports = "1-0"'))
        self.assertConfigError("rules[2].ports: ", loadServerConfig, path)


class ClientConfigTests(ServerConfigMixin, SynchronousTestCase):
    def test_full(self) -> None:
        """
        Every key is read; relative paths are resolved against the file's
        directory and need not exist yet.
        """
        path = self.write(
            "home/.config/tp/client.toml",
            'server = "tp.example.org:443"\ncert = "me.pem"\nkey = "keys/me.key"\nca = "/etc/tp/ca.pem"\nconnect_timeout = 5\n',
        )
        config = loadClientConfig(path)
        d = path.parent.resolve()
        self.assertEqual(
            config,
            ClientConfig(
                server="tp.example.org:443",
                cert=str(d / "me.pem"),
                key=str(d / "keys" / "me.key"),
                ca="/etc/tp/ca.pem",
                connectTimeout=5.0,
                servers=("tp.example.org:443",),
            ),
        )

    def test_empty(self) -> None:
        """
        An empty file gives the defaults.
        """
        config = loadClientConfig(self.write("client.toml", ""))
        self.assertEqual(config, ClientConfig())
        self.assertEqual(config.connectTimeout, 15.0)
        self.assertIsNone(config.server)

    def test_homeExpanded(self) -> None:
        """
        C{~} in a path is the user's home directory.
        """
        home = self.directory / "home"
        home.mkdir()
        self.patch(os, "environ", {**os.environ, "HOME": str(home.resolve())})
        config = loadClientConfig(self.write("client.toml", 'cert = "~/tp/me.pem"\n'))
        self.assertEqual(config.cert, str(home.resolve() / "tp" / "me.pem"))

    def test_serverList(self) -> None:
        """
        C{server} may be a list: C{tp expose} keeps a link to each, the
        other commands use the first.
        """
        config = loadClientConfig(self.write("client.toml", 'server = ["a.example:443", "b.example:8443"]\n'))
        self.assertEqual((config.server, config.servers), ("a.example:443", ("a.example:443", "b.example:8443")))
        config = loadClientConfig(self.write("client.toml", 'server = "a.example:443"\n'))
        self.assertEqual((config.server, config.servers), ("a.example:443", ("a.example:443",)))

    def test_unknownKey(self) -> None:
        """
        Unknown keys are refused, naming the file and the keys.
        """
        path = self.write("client.toml", 'server = "h:1"\ncertificate = "x"\ntimeout = 3\n')
        self.assertConfigError(f"{path.resolve()}: unknown key(s) certificate, timeout", loadClientConfig, path)

    def test_badValues(self) -> None:
        """
        Bad values are refused naming the file and the key.
        """
        cases = [
            ('server = ""', 'server: expected "HOST:PORT"'),
            ("server = 443", 'server: expected "HOST:PORT"'),
            ("server = []", 'server: expected "HOST:PORT", or a list of them'),
            ('server = ["a:1", ""]', 'server: expected "HOST:PORT", or a list of them'),
            ('server = ["a:1", 2]', 'server: expected "HOST:PORT", or a list of them'),
            ('cert = ""', "cert: expected a file path"),
            ("key = 1", "key: expected a file path"),
            ('ca = ["a"]', "ca: expected a file path"),
        ]
        for line, message in cases:
            path = self.write("client.toml", line + "\n")
            self.assertConfigError(f"{path.resolve()}: {message}", loadClientConfig, path)
        for value in ("0", "-1", "3601", "true", '"5"'):
            path = self.write("client.toml", f"connect_timeout = {value}\n")
            self.assertConfigError(
                f"{path.resolve()}.connect_timeout: expected a number of seconds", loadClientConfig, path
            )

    def test_invalidTOMLAndMissing(self) -> None:
        """
        A client file that is not TOML, or absent, is refused naming it.
        """
        path = self.write("client.toml", "server = \n")
        self.assertConfigError(f"{path.resolve()}: not valid TOML", loadClientConfig, path)
        path = self.directory / "absent.toml"
        self.assertConfigError(f"{path.resolve()}: no such file", loadClientConfig, path)

    def test_defaultPath(self) -> None:
        """
        The default client file is C{tp/client.toml} under
        C{$XDG_CONFIG_HOME}, else under C{~/.config}.
        """
        self.patch(os, "environ", {**os.environ, "XDG_CONFIG_HOME": "/xdg"})
        self.assertEqual(defaultClientConfigPath(), Path("/xdg/tp/client.toml"))
        env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
        env["HOME"] = "/home/someone"
        self.patch(os, "environ", env)
        self.assertEqual(defaultClientConfigPath(), Path("/home/someone/.config/tp/client.toml"))


class RouterConfigTests(SynchronousTestCase):
    """
    C{[router]}: sharing the port with a web site.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())

    def config(self, **router: Any) -> Any:
        return self.pki.serverConfig(quic=["127.0.0.1:4433"], router=router)

    def test_passthrough(self) -> None:
        config = self.config(backend="tcp:127.0.0.1:8443", proxy_protocol=True)
        self.assertEqual(config.router.backend, "tcp:127.0.0.1:8443")
        self.assertTrue(config.router.proxyProtocol)
        self.assertEqual(config.router.helloTimeout, 10)
        self.assertEqual(config.router.terminateNames, ())
        self.assertIsNone(config.router.h3)

    def test_terminateAndH3(self) -> None:
        config = self.config(
            terminate={"names": ["WWW.Example.org."], "certificate": "server.pem", "key": "server.key", "backend": "tcp:127.0.0.1:8080"},
            h3={"redirect": "https://www.example.org/", "headers": {"cache-control": "no-store"}},
        )
        self.assertEqual(config.router.terminateNames, ("www.example.org",))
        self.assertEqual(config.router.terminateCertificate, str(self.pki.directory / "server.pem"))
        self.assertEqual(config.router.h3.status, 308)
        self.assertIn(("location", "https://www.example.org/"), config.router.h3.headers)
        self.assertIn(("cache-control", "no-store"), config.router.h3.headers)

    def test_errorsNameTheirKey(self) -> None:
        for router, key in [
            ({}, "router: give a backend"),
            ({"backend": "nowhere"}, "router.backend"),
            ({"backend": "tcp:127.0.0.1:1", "proxy_protocol": "yes"}, "router.proxy_protocol"),
            ({"backend": "tcp:127.0.0.1:1", "hello_timeout": 0}, "router.hello_timeout"),
            ({"backend": "tcp:127.0.0.1:1", "colour": 1}, "router: unknown key(s) colour"),
            ({"terminate": {"names": ["www.example.org"], "certificate": "absent.pem", "key": "server.key", "backend": "tcp:h:1"}}, "router.terminate.certificate"),
            ({"terminate": {"names": ["bad name"]}}, "router.terminate.names"),
            ({"backend": "tcp:127.0.0.1:1", "h3": {}}, "router.h3: give exactly one"),
            ({"backend": "tcp:127.0.0.1:1", "h3": {"redirect": "https://x.example/", "status": 200}}, "router.h3"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.config(**router)
            self.assertIn(key, str(caught.exception))

    def test_terminateNames(self) -> None:
        """
        C{router.terminate.names} are certificate names
        (L{tpproxy.names.isCertificateName}), matched exactly against the
        SNI: a single label is one; a wildcard, which the router would never
        match, is refused saying so, and so are C{_}, addresses, empty
        labels and non-ASCII text that C{lower()} would make ASCII.
        """
        terminate = {"certificate": "server.pem", "key": "server.key", "backend": "tcp:127.0.0.1:8080"}
        self.assertEqual(self.config(terminate={"names": ["Intranet"], **terminate}).router.terminateNames, ("intranet",))
        for name, message in [
            ("*.example.org", "the router matches names exactly"),
            ("_x.example.org", "is not a DNS name"),
            ("192.0.2.1", "is not a DNS name"),
            ("www.example.org..", "is not a DNS name"),
            ("\u212a.example.org", "is not a DNS name"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                self.config(terminate={"names": [name], **terminate})
            self.assertIn(f"router.terminate.names: {name!r}", str(caught.exception))
            self.assertIn(message, str(caught.exception))

    def test_h3NeedsQuic(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.pki.serverConfig(quic=False, router={"backend": "tcp:127.0.0.1:1", "h3": {"redirect": "https://x.example/"}})
        self.assertIn("needs QUIC", str(caught.exception))


class LimitsConfigTests(ServerConfigMixin, SynchronousTestCase):
    """
    C{[limits]} and C{server.state_dir}.
    """

    def test_defaults(self) -> None:
        """
        Without C{[limits]} the documented defaults apply, and the state
        directory is C{state} beside the config file.
        """
        config = self.parse()
        self.assertEqual(config.limits, LimitsConfig())
        self.assertEqual(
            (config.limits.handshakes, config.limits.handshakesPerSource, config.limits.quicRetryAbove, config.limits.backlog),
            (2048, 256, 64, 4096),
        )
        self.assertEqual(config.stateDir, str((self.directory / "state").resolve()))

    def test_values(self) -> None:
        """
        Each key sets its field; C{quic_retry_above} may be 0 (always Retry).
        """
        data = {
            "server": self.table(state_dir="var/tp"),
            "limits": {
                "handshakes": 10,
                "handshakes_per_source": 2,
                "quic_handshakes": 11,
                "quic_handshakes_per_source": 3,
                "quic_retry_above": 0,
                "backlog": 4096,
            },
        }
        config = self.parse(data)
        self.assertEqual(config.limits, LimitsConfig(10, 2, 11, 3, 0, 4096))
        self.assertEqual(config.stateDir, str((self.directory / "var/tp").resolve()))

    def test_errors(self) -> None:
        """
        Unknown keys, non-integers, booleans and out-of-range numbers are
        refused, naming the key.
        """
        for table, message in (
            ({"handshake": 1}, "limits: unknown key(s) handshake"),
            ({"backlog": 0}, "limits.backlog: expected a whole number from 1 to 1000000, got 0"),
            ({"handshakes": True}, "limits.handshakes: expected a whole number from 1 to 1000000, got True"),
            ({"handshakes_per_source": 1.5}, "limits.handshakes_per_source: expected a whole number"),
            ({"quic_retry_above": -1}, "limits.quic_retry_above: expected a whole number from 0 to 1000000, got -1"),
            ({"quic_handshakes": 10**7}, "limits.quic_handshakes: expected a whole number from 1 to 1000000"),
        ):
            self.assertConfigError(message, self.parse, {"server": self.table(), "limits": table})
        self.assertConfigError("limits: expected a table", self.parse, {"server": self.table(), "limits": 3})
        self.assertConfigError("server.state_dir: expected a file path", self.parse, state_dir="")
