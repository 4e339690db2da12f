# -*- test-case-name: tpproxy.test.test_devenv -*-
"""
The development environment of C{tp init-dev} and of C{twist tp} without a
configuration: a dev CA, a server certificate for loopback, a client
certificate, and configs that work together on loopback.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from tpproxy.pki import CertificateAuthority, keyPEM, writePrivate

log = Logger()

DEV_PORT = 8443
DEV_IDENTITY = "dev"
#: Dev client certificates live a day; TP means client certificates to be
#: short-lived, and C{twist tp} renews an expiring dev one at start.
DEV_CLIENT_HOURS = 24


def defaultDevHome() -> Path:
    if os.environ.get("TP_HOME"):
        return Path(os.environ["TP_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "tp" / "dev"


def _ipv6LoopbackWorks() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


SERVER_TOML = """\
# TP development server, written by `tp init-dev`.  See docs/configuration.md.
[server]
listen = [{listen}]
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
handshake_timeout = 10
hello_timeout = 10
connect_timeout = 10

[deny]
identities = []
serials = []

[groups]
dev = ["{identity}"]

# Rules are read in order; the first that matches decides; no match = deny.
# Loopback addresses are reachable only through rules that name them by
# address, as these do.
[[rules]]
comment = "the dev client may reach any port on loopback"
identities = ["group:dev"]
hosts = ["127.0.0.0/8", "::1/128"]
ports = "*"
transports = ["tcp", "udp"]

[[rules]]
comment = "... and the E2E names the dev client exposes"
identities = ["group:dev"]
hosts = ["*.localhost"]
ports = "*"

# Reverse tunnels: public ports open on loopback only, for the dev setup.
[reverse]
public_interface = "127.0.0.1"
accept_timeout = 10
keepalive = 15

# Certificates for E2E names are issued on demand by the dev CA.
[e2e]
ca_certificate = "ca.pem"
ca_key = "ca.key"

[[exposures]]
comment = "the dev client may expose public ports and names under .localhost"
identities = ["group:dev"]
public_ports = "1024-65535"
names = ["*.localhost"]
dialers = ["group:dev"]

# Browsers as TP clients (docs/webtransport.md): with client.p12 imported,
# https://localhost:{port}/tp/ serves tp.js and the SSH demo.
[webtransport]
"""

CLIENT_TOML = """\
# TP development client, written by `tp init-dev`.  See docs/client.md.
server = "localhost:{port}"
cert = "client.pem"
key = "client.key"
ca = "ca.pem"
"""


def issueClient(home: Path, name: str, hours: float = DEV_CLIENT_HOURS, stem: str | None = None) -> Path:
    """
    Issue a client certificate for C{name} from the dev CA in C{home}.

    @return: the certificate path (the key is beside it, mode 0600).
    """
    ca = CertificateAuthority.load(home / "ca.pem", home / "ca.key")
    stem = stem or name
    issued = ca.issue(name, client=True, hours=hours)
    issued.write(home / f"{stem}.pem", home / f"{stem}.key")
    if stem == "client":
        writeBrowserBundle(home, issued, ca)
    return home / f"{stem}.pem"


#: The password of the dev client's PKCS#12 file (browsers refuse to
#: import one without).
P12_PASSWORD = "tp"


def writeBrowserBundle(home: Path, issued: Any, ca: CertificateAuthority) -> Path:
    """
    The dev client certificate and key as C{client.p12}, for a browser's
    certificate store (docs/webtransport.md).
    """
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

    data = pkcs12.serialize_key_and_certificates(b"TP dev client", issued.key, issued.cert, [ca.cert], BestAvailableEncryption(P12_PASSWORD.encode()))
    writePrivate(home / "client.p12", data)
    return home / "client.p12"


def initDev(home: Path, port: int = DEV_PORT) -> Path:
    """
    Write a complete dev environment to C{home}, replacing one that is there.
    """
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    ca = CertificateAuthority.create("TP dev CA")
    (home / "ca.pem").write_bytes(ca.certPEM)
    writePrivate(home / "ca.key", keyPEM(ca.key))
    server = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True, hours=24 * 365)
    server.write(home / "server.pem", home / "server.key")
    issueClient(home, DEV_IDENTITY, stem="client")
    listen = [f'"tcp:{port}:interface=127.0.0.1"']
    if _ipv6LoopbackWorks():
        listen.append(f"'tcp6:{port}:interface=\\:\\:1'")
    (home / "server.toml").write_text(SERVER_TOML.format(listen=", ".join(listen), identity=DEV_IDENTITY, port=port))
    (home / "client.toml").write_text(CLIENT_TOML.format(port=port))
    return home


def ensureDevEnvironment(home: Path | None = None) -> Path:
    """
    Make the dev environment if it is missing, and renew the dev client
    certificate if it expires within the hour.
    """
    home = home or defaultDevHome()
    if not (home / "server.toml").exists():
        initDev(home)
        log.info("Made a TP dev environment in {home}", home=str(home))
        return home
    cert = x509.load_pem_x509_certificate((home / "client.pem").read_bytes())
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left < datetime.timedelta(hours=1):
        issueClient(home, DEV_IDENTITY, stem="client")
        log.info("Renewed the dev client certificate in {home}", home=str(home))
    return home


def announce(home: Path) -> None:
    log.info(
        "TP is running on its dev default from {home}. Try:  "
        "tp --config {client} connect 127.0.0.1:22   (or ssh -o ProxyCommand=\"tp --config {client} connect %h:%p\" 127.0.0.1)",
        home=str(home),
        client=str(home / "client.toml"),
    )
    if "[webtransport]" in (home / "server.toml").read_text():
        log.info(
            "In a browser: trust {ca} for web sites, import {p12} (password \"{password}\"), then open "
            "https://localhost:{port}/tp/ssh.html (SSH in the browser; docs/webtransport.md)",
            ca=str(home / "ca.pem"), p12=str(home / "client.p12"), password=P12_PASSWORD, port=DEV_PORT,
        )
