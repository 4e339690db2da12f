# -*- test-case-name: tpproxy.test.test_cli -*-
"""
The C{tp} client command.

Exit status: 0 success; 1 TP could not be reached or the TLS connection
was refused; 2 bad usage or configuration; 3 TP refused the request (its
error code and message are printed on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.stdio import StandardIO
from twisted.python.failure import Failure

from tpproxy import __version__
from tpproxy.config import ClientConfig, ConfigError, defaultClientConfigPath, loadClientConfig
from tpproxy.heap import freezeStartup
from tpproxy.names import isCertificateName, isDestinationHost, normalize
from tpproxy.protocols.client import Refused, ServerAddress, TPClientProtocol, TunnelError
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.reactors import IClientReactor, IDialReactor
from tpproxy.wire import VERSION, ClientHello

EXIT_OK, EXIT_TUNNEL, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
#: Where C{tp status} looks for TP's admin listener by default.
DEFAULT_ADMIN = "http://127.0.0.1:9090"
#: The longest validity C{tp issue} gives a certificate (10 years).
MAX_HOURS = 24 * 365 * 10


class UsageError(Exception):
    pass


def parseHostPort(text: str, what: str, defaultPort: int | None = None) -> tuple[str, int]:
    """
    Parse C{HOST:PORT}, C{[V6]:PORT}, or (with C{defaultPort}) C{HOST}.
    """
    host, sep, port = text.rpartition(":")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise UsageError(f"{what}: unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UsageError(f"{what}: expected [ADDRESS]:PORT, got {text!r}")
        port = rest[1:]
    elif not sep or ":" in host:
        if defaultPort is None or ":" in host:
            raise UsageError(f"{what}: expected HOST:PORT (IPv6 as [ADDRESS]:PORT), got {text!r}")
        host, port = text, ""
    if not port:
        if defaultPort is None:
            raise UsageError(f"{what}: missing port in {text!r}")
        port = str(defaultPort)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{what}: port must be a number from 1 to 65535, got {port!r}")
    if not isDestinationHost(host):
        raise UsageError(f"{what}: {host!r} is not a host name or IP address")
    return host, int(port)


def loadMaterials(ca: str, cert: str, key: str) -> tuple[Any, Any, Any]:
    """
    Load the CA certificates, the client chain and its key.

    @raise UsageError: naming the option whose file is missing or bad.
    """
    from tpproxy.pki import loadCertificates, loadKey

    def load(kind: str, path: str, loader: Any) -> Any:
        try:
            return loader(path)
        except FileNotFoundError:
            raise UsageError(f"{kind}: file {path} does not exist") from None
        except (ValueError, TypeError) as e:
            raise UsageError(f"{kind}: {path} is not usable ({e})") from None

    return load("--ca", ca, loadCertificates), load("--cert", cert, loadCertificates), load("--key", key, loadKey)


@dataclass(frozen=True)
class Settings:
    server: ServerAddress
    cert: str
    key: str
    ca: str
    connectTimeout: float
    transport: str = "auto"

    def materials(self) -> tuple[Any, Any, Any]:
        """
        Load the CA certificates, the client chain and its key.

        @raise UsageError: naming the option whose file is missing or bad.
        """
        return loadMaterials(self.ca, self.cert, self.key)

    def tlsOptions(self, serverName: str | None = None) -> Any:
        """
        Client TLS options for TP (or, with C{serverName}, for the inner
        handshake with an E2E exposure of that name).
        """
        from tpproxy.transports.tls import clientTLS

        cas, chain, key = self.materials()
        try:
            return clientTLS(serverName or self.server.host, cas, chain, key)
        except Exception as e:
            raise UsageError(f"--cert/--key: cannot use this certificate and key ({e})") from None


def _number(kind: type, low: float, high: float, what: str, note: str = "") -> Any:
    """
    An argparse type: a number of C{kind} from C{low} to C{high}, else an
    error that says what is expected (C{what}, then the bounds, then
    C{note}).  A lower bound of 0 for a float means "more than 0".
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        strict = kind is float and low == 0
        if value is None or not math.isfinite(value) or value > high or value < low or (strict and value <= 0):
            bound = f"more than 0 and at most {high:g}" if strict else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"expected {what} {bound}{note}, got {text!r}")
        return value

    return parse


#: Seconds for --connect-timeout, as the config key connect_timeout allows.
seconds = _number(float, 0, 3600, "a number of seconds")


def _commonOptions(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection options (before or after the command)")
    group.add_argument("--config", metavar="FILE", default=default,
                       help="client config (TOML); default $TP_CONFIG, else ~/.config/tp/client.toml")
    # After the command, --server lands in its own list (argparse would
    # replace the one given before the command with it): _servers joins them.
    group.add_argument("--server", metavar="HOST:PORT", default=default, action="append", dest="serverAfter" if suppress else "server",
                       help="the TP server (port defaults to 443); tp expose takes several, keeping a link to each")
    group.add_argument("--cert", metavar="FILE", default=default, help="client certificate (PEM, may hold its chain)")
    group.add_argument("--key", metavar="FILE", default=default, help="private key of the client certificate (PEM)")
    group.add_argument("--ca", metavar="FILE", default=default, help="CA certificate(s) that sign the server certificate (PEM)")
    group.add_argument("--connect-timeout", metavar="SECONDS", type=seconds, default=default,
                       help="give up on TP after this long (default 15)")
    group.add_argument("--transport", choices=("auto", "quic", "tls"), default=default,
                       help="QUIC (UDP) or TLS (TCP) to TP; auto (default) tries QUIC first and falls back to TLS")


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp",
        description="TP client: reach TCP services through a TP server, authenticated by your client certificate.",
        epilog=(
            "examples:\n"
            "  ssh -o ProxyCommand=\"tp connect %h:%p\" host\n"
            "  tp up db.internal:5432 5432        # then connect to 127.0.0.1:5432\n"
            "  tp expose localhost:22 --e2e ssh.laptop.example.org\n"
            "  tp expose localhost:25565 --public 25565\n"
            "  tp init-dev ~/tp-dev && twist tp --config ~/tp-dev/server.toml\n"
            "  tp status --admin http://127.0.0.1:9090   # what a running TP holds\n\n"
            "exit status: 0 ok, 1 TP unreachable or TLS refused, 2 bad usage or config, 3 refused by TP"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tp {__version__} (protocol v{VERSION})")
    _commonOptions(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("connect", help="connect stdin/stdout to HOST:PORT through TP (for ssh ProxyCommand)",
                       description="Connect standard input and output to HOST:PORT through TP. "
                       "Prints one status line on stderr. Use as ssh -o ProxyCommand=\"tp connect %h:%p\".")
    p.add_argument("target", metavar="HOST:PORT")
    p.add_argument("--p2p", choices=("auto", "only", "off"), default="off",
                   help="for an E2E name whose exposure allows it: go direct to the exposer (ICE, then QUIC pinned to the "
                   "certificate TP vouched for; docs/p2p.md). auto: fall back to TP if no direct path within 5 s; "
                   "only: fail instead; off (default): always through TP")
    _commonOptions(p, suppress=True)

    p = sub.add_parser("up", help="forward 127.0.0.1:LOCALPORT to HOST:PORT through TP",
                       description="Listen on 127.0.0.1:LOCALPORT and forward each connection to HOST:PORT through TP.")
    p.add_argument("target", metavar="HOST:PORT")
    p.add_argument("localport", metavar="LOCALPORT", type=_number(int, 0, 65535, "a port number", " (0 picks a free port)"))
    p.add_argument("--bind", metavar="ADDRESS", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)")
    p.add_argument("-u", "--udp", action="store_true",
                   help="forward UDP instead of TCP: each local source address is a flow (QUIC datagrams, or framed on TLS)")
    _commonOptions(p, suppress=True)

    p = sub.add_parser("expose", help="expose a local port through TP (public port or E2E name)",
                       description="Keep a signalling connection to TP and expose LOCALHOST:PORT: --public opens a "
                       "port on TP for anyone (BINDPORT, or one TP picks); --e2e NAME serves NAME on TP, where dialers "
                       "need a client certificate allowed for NAME. Reconnects by itself if TP goes away.")
    p.add_argument("local", metavar="LOCALHOST:PORT")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--public", metavar="BINDPORT", nargs="?", const=0, type=_number(int, 0, 65535, "a port number", " (0 or none: TP picks one)"),
                      help="public mode: TP listens on BINDPORT (or a port it picks and reports)")
    mode.add_argument("--e2e", metavar="NAME", help="E2E mode: TP serves the name NAME")
    p.add_argument("--keepalive", metavar="SECONDS", type=_number(float, 0.5, 3600, "a number of seconds"), default=15.0,
                   help="ping TP this often; give up on it after 3 times as long (default 15)")
    p.add_argument("--p2p", action="store_true",
                   help="--e2e: offer TP to be introduced to dialers for a direct path, where the exposure rule allows it "
                   "(docs/p2p.md); dialers TP does not introduce still come through TP")
    p.add_argument("--links", metavar="N", type=_number(int, 1, 16, "a number of links"), default=2,
                   help="keep a signalling connection to up to N of the addresses a server name resolves to (several "
                   "addresses of one family: several TP instances), so the exposure survives losing one; "
                   "each --server given gets its own (default 2; 1: one connection per --server)")
    _commonOptions(p, suppress=True)

    p = sub.add_parser("status", help="show what a running TP holds (its admin listener's /status)",
                       description="Read GET /status from TP's admin listener and print its tunnels, exposures, waiting "
                       "dialers, certificates and configuration generation as tables. With an https:// URL it "
                       "presents the client certificate (--cert/--key) and checks TP's against --ca.")
    p.add_argument("--admin", metavar="URL",
                   help=f"the admin listener (default: the config key admin, else {DEFAULT_ADMIN})")
    p.add_argument("--json", action="store_true", help="print the JSON document as TP sent it")
    _commonOptions(p, suppress=True)

    p = sub.add_parser("init-dev", help="make a dev CA, certificates and configs in DIR",
                       description="Make a dev CA, a server certificate for localhost/127.0.0.1/::1, a client "
                       "certificate, and DIR/server.toml + DIR/client.toml that work together on loopback.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--port", type=_number(int, 1, 65535, "a port number"), default=8443, help="port for the dev server (default 8443)")
    p.add_argument("--force", action="store_true", help="replace an existing dev environment in DIR")

    p = sub.add_parser("issue", help="issue a client certificate from the dev CA in DIR",
                       description="Issue a client certificate for NAME from DIR/ca.pem and DIR/ca.key; writes DIR/NAME.pem and DIR/NAME.key.")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--hours", type=_number(float, 0, MAX_HOURS, "a number of hours"), default=12,
                   help=f"validity in hours, more than 0, at most {MAX_HOURS} (10 years; default 12)")
    return parser


def readClientConfig(args: argparse.Namespace) -> ClientConfig:
    """
    The client config file: --config, else $TP_CONFIG, else the per-user
    default path if it exists, else the defaults.
    """
    path = getattr(args, "config", None) or os.environ.get("TP_CONFIG")
    try:
        if path:
            return loadClientConfig(path)
        if defaultClientConfigPath().exists():
            return loadClientConfig(defaultClientConfigPath())
    except ConfigError as e:
        raise UsageError(f"config: {e}") from None
    return ClientConfig()


def _servers(args: argparse.Namespace) -> list[str]:
    """
    The --server values, those before the command then those after it.
    """
    found: list[str] = []
    for name in ("server", "serverAfter"):
        value = getattr(args, name, None) or []
        found += [value] if isinstance(value, str) else list(value)
    return found


def resolveSettings(args: argparse.Namespace) -> Settings:
    """
    Flags override the config file; the config file is --config, else
    $TP_CONFIG, else the per-user default path if it exists.
    """
    config = readClientConfig(args)
    overrides = {}
    servers = _servers(args)
    if len(servers) > 1 and getattr(args, "command", None) != "expose":
        raise UsageError("--server: only tp expose takes several (one signalling connection to each); give one")
    for name in ("server", "cert", "key", "ca"):
        value = (servers[0] if servers else None) if name == "server" else getattr(args, name, None)
        if value:
            overrides[name] = os.path.abspath(value) if name != "server" else value
    if getattr(args, "connect_timeout", None) is not None:
        overrides["connectTimeout"] = args.connect_timeout
    if getattr(args, "transport", None):
        overrides["transport"] = args.transport
    config = replace(config, **overrides)
    missing = [f"--{n}" for n in ("server", "cert", "key", "ca") if not getattr(config, n)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)} (give them as flags or in a config file: see tp --help)")
    assert config.server and config.cert and config.key and config.ca
    host, port = parseHostPort(config.server, "--server", defaultPort=443)
    return Settings(ServerAddress(host, port), config.cert, config.key, config.ca, config.connectTimeout, config.transport)


# --- commands ---------------------------------------------------------------


class StdioEnd(RelayEnd):
    """
    Standard input and output as one end of a splice.
    """

    def __init__(self, done: defer.Deferred[None]) -> None:
        self.done = done

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if not self.done.called:
            self.done.callback(None)


def _rebindOnSignal(reactor: IClientReactor, connector: Any, stderr: Any) -> None:
    """
    On SIGUSR1, move the QUIC connection to a new local UDP port, as a
    network change would (docs/client.md), and say so on stderr.
    """
    import signal

    def moved() -> None:
        stderr.write(f"tp: {connector.rebind()}\n")
        stderr.flush()

    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(moved))  # type: ignore[attr-defined]


@defer.inlineCallbacks
def runConnect(reactor: IClientReactor, settings: Settings, host: str, port: int, stderr: Any, p2p: str = "off") -> Any:
    from tpproxy.connector import Connector

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    connector = Connector(reactor, settings)
    transport = yield connector.choose()
    reactor.addSystemEventTrigger("before", "shutdown", connector.close)
    if p2p != "off":
        from tpproxy.p2p.client import dial

        def say(line: str) -> None:
            stderr.write(f"tp: {line}\n")
            stderr.flush()

        tunnel, how = yield dial(reactor, settings, connector, host, port, p2p, say)
        stderr.write(f"Connected to {target} {'directly' if how == 'p2p' else f'via {settings.server}'} (v{VERSION}, {'p2p' if how == 'p2p' else transport})\n")
        stderr.flush()
    else:
        stderr.write(f"Connecting to {target} via {settings.server} (v{VERSION}, {transport})\n")
        stderr.flush()
        tunnel = yield connector.open(ClientHello.connect(host, port))
    _rebindOnSignal(reactor, connector, stderr)
    stdioDone: defer.Deferred[None] = defer.Deferred()
    tunnelDone: defer.Deferred[None] = defer.Deferred()
    tunnel.onClose = lambda end, reason: tunnelDone.called or tunnelDone.callback(None)
    local = StdioEnd(stdioDone)
    StandardIO(local, reactor=reactor)
    splice(tunnel, local, fromA=tunnel.rest)
    tunnel.transport.resumeProducing()  # type: ignore[union-attr]
    yield defer.DeferredList([stdioDone, tunnelDone])
    # Over QUIC, the last bytes sent may not be acknowledged yet: close
    # once they are (bounded), not at once.
    yield connector.finish()
    return EXIT_OK


class LocalEnd(RelayEnd):
    """
    A local connection accepted by C{tp up}, forwarded through its own
    tunnel.
    """

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.pending = b""

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        d = self.forwarder.connector.open(self.forwarder.hello)
        d.addCallbacks(self._ready, self._failed)

    def preSpliceData(self, data: bytes) -> None:
        self.pending += data

    def _ready(self, tunnel: TPClientProtocol) -> None:
        if self.closed:
            tunnel.transport.loseConnection()  # type: ignore[union-attr]
            return
        pending, self.pending = self.pending, b""
        splice(self, tunnel, fromA=pending, fromB=tunnel.rest)
        self.transport.resumeProducing()  # type: ignore[union-attr]
        tunnel.transport.resumeProducing()  # type: ignore[union-attr]

    def _failed(self, failure: Failure) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.forwarder.stderr.write(f"tp up: connection from {peer.host}:{peer.port}: {failure.getErrorMessage()}\n")
        self.forwarder.stderr.flush()
        self.transport.loseConnection()  # type: ignore[union-attr]


class Forwarder(Factory):
    def __init__(self, reactor: IClientReactor, settings: Settings, hello: ClientHello, stderr: Any) -> None:
        from tpproxy.connector import Connector

        self.reactor = reactor
        self.settings = settings
        self.connector = Connector(reactor, settings)
        self.hello = hello
        self.stderr = stderr

    def buildProtocol(self, addr: Any) -> LocalEnd:
        return LocalEnd(self)


@defer.inlineCallbacks
def runUp(reactor: IClientReactor, settings: Settings, host: str, port: int, localPort: int, bind: str, stderr: Any) -> Any:
    forwarder = Forwarder(reactor, settings, ClientHello.connect(host, port), stderr)
    reactor.addSystemEventTrigger("before", "shutdown", forwarder.connector.close)
    try:
        listening = yield TCP4ServerEndpoint(reactor, localPort, interface=bind).listen(forwarder)
    except Exception as e:
        raise UsageError(f"cannot listen on {bind}:{localPort}: {e}") from None
    address = listening.getHost()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    transport = yield forwarder.connector.choose()
    stderr.write(
        f"Forwarding {address.host}:{address.port} to {target} via {settings.server} (v{VERSION}, {transport}); Ctrl-C stops\n"
    )
    stderr.flush()
    _followRenewals(reactor, settings, forwarder.connector, stderr)
    yield defer.Deferred()  # until the reactor stops


def _followRenewals(reactor: IClientReactor, settings: Settings, connector: Any, stderr: Any) -> None:
    """
    New tunnels of C{tp up} use the client certificate as renewed on disk
    (open ones are left alone): tpproxy.certwatch.
    """
    from tpproxy.certwatch import followRenewals

    def say(line: str) -> None:
        stderr.write(f"tp up: {line}\n")
        stderr.flush()

    watcher = followRenewals(reactor, settings, connector, say)
    reactor.addSystemEventTrigger("before", "shutdown", watcher.stop)


@defer.inlineCallbacks
def runUpUDP(reactor: IClientReactor, settings: Settings, host: str, port: int, localPort: int, bind: str, stderr: Any) -> Any:
    from tpproxy.connector import Connector
    from tpproxy.transports.udp import UDPForwarder

    connector = Connector(reactor, settings)
    reactor.addSystemEventTrigger("before", "shutdown", connector.close)

    def say(line: str) -> None:
        stderr.write(f"tp up: {line}\n")
        stderr.flush()

    forwarder = UDPForwarder(reactor, connector, ClientHello("udp", host=host, port=port, transport="udp"), say)
    try:
        listening = reactor.listenUDP(localPort, forwarder, interface=bind, maxPacketSize=65536)
    except Exception as e:
        raise UsageError(f"cannot listen on UDP {bind}:{localPort}: {e}") from None
    address = listening.getHost()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    transport = yield connector.choose()
    stderr.write(
        f"Forwarding UDP {address.host}:{address.port} to {target} via {settings.server} (v{VERSION}, {transport}); Ctrl-C stops\n"
    )
    stderr.flush()
    _followRenewals(reactor, settings, connector, stderr)
    yield defer.Deferred()


def scriptName(name: str) -> str:
    """
    How to run the script C{name} (C{tp}, C{twist}) installed beside this
    Python: its bare name if that is what the shell finds, else its path
    (a virtualenv that is not activated).
    """
    import shutil

    script = Path(sys.executable).with_name(name)
    if not script.exists():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).absolute() == script.absolute():
        return name
    return str(script)


def runInitDev(args: argparse.Namespace, stdout: Any) -> int:
    from tpproxy.devenv import initDev

    home = Path(args.directory).expanduser().resolve()
    if (home / "server.toml").exists() and not args.force:
        raise UsageError(f"{home} already holds a dev environment; use --force to replace it (and its CA)")
    initDev(home, args.port)
    stdout.write(
        f"Made a TP dev environment in {home}:\n"
        f"  ca.pem, ca.key (the dev CA; ca.key is mode 0600)\n"
        f"  server.pem/.key (localhost, 127.0.0.1, ::1), client.pem/.key (identity 'dev', 24 h)\n"
        f"  server.toml, client.toml\n"
        f"Run the server:   {scriptName('twist')} tp --config {home / 'server.toml'}\n"
        f"Use it:           {scriptName('tp')} --config {home / 'client.toml'} connect 127.0.0.1:22\n"
    )
    return EXIT_OK


def runIssue(args: argparse.Namespace, stdout: Any) -> int:
    from tpproxy.devenv import issueClient

    home = Path(args.directory).expanduser().resolve()
    if not (home / "ca.key").exists():
        raise UsageError(f"{home} has no ca.key; make one with tp init-dev {home}")
    if not args.name or "/" in args.name or args.name.startswith("."):
        raise UsageError("NAME must be a plain name (it also names the files)")
    path = issueClient(home, args.name, hours=args.hours)
    stdout.write(f"Issued {path} and {path.with_suffix('.key')} for identity {args.name!r}, valid {args.hours:g} h\n")
    return EXIT_OK


# --- tp status ---------------------------------------------------------------


@dataclass(frozen=True)
class StatusRequest:
    """
    Where C{tp status} reads TP's C{/status}, and how.

    @ivar tls: client TLS options for an C{https} URL (else L{None}).
    """

    url: str
    host: str
    port: int
    tls: Any
    timeout: float
    json: bool


def statusRequest(args: argparse.Namespace) -> StatusRequest:
    """
    Check C{tp status}'s options before the reactor starts: the URL, and
    for C{https} the certificate, key and CA (flags over the config file).

    @raise UsageError: naming the option.
    """
    from urllib.parse import urlsplit

    config = readClientConfig(args)
    base = args.admin or getattr(config, "admin", None) or DEFAULT_ADMIN
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--admin: expected http://HOST:PORT or https://HOST:PORT, got {base!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"--admin: bad port in {base!r}") from None
    path = parts.path.rstrip("/")
    if not path.endswith("/status"):
        path += "/status"
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    url = f"{parts.scheme}://{netloc}{path}"
    tls = None
    if parts.scheme == "https":
        files = {name: getattr(args, name, None) or getattr(config, name) for name in ("cert", "key", "ca")}
        missing = [f"--{name}" for name, value in files.items() if not value]
        if missing:
            raise UsageError(f"{', '.join(missing)}: needed for an https admin listener (give them as flags or in the client config)")
        cas, chain, key = loadMaterials(files["ca"], files["cert"], files["key"])
        tls = adminTLS(host, cas, chain, key)
    timeout = args.connect_timeout if getattr(args, "connect_timeout", None) is not None else config.connectTimeout
    return StatusRequest(url, host, port, tls, timeout, args.json)


def adminTLS(host: str, cas: list[Any], chain: list[Any], key: Any) -> Any:
    """
    Client TLS options for TP's admin listener at C{host}: its certificate
    checked against C{cas} and C{host}, ours presented, ALPN C{http/1.1}.
    """
    from tpproxy.transports.tls import clientTLS

    try:
        # TP's client creator, not Twisted's optionsForClientTLS: Twisted
        # 26.10 accepts a certificate whose DNS name is an IP address for
        # any host (service_identity's CertificateError is caught there).
        return clientTLS(host, cas, chain, key, alpn=b"http/1.1", tls13=False)
    except Exception as e:
        raise UsageError(f"--cert/--key: cannot use this certificate and key ({e})") from None


class AdminError(Exception):
    """
    TP's admin listener could not be read; the message is one line.

    @ivar status: the exit status (L{EXIT_TUNNEL} or L{EXIT_REFUSED}).
    """

    def __init__(self, message: str, status: int = EXIT_TUNNEL) -> None:
        super().__init__(message)
        self.status = status


def _sslText(e: Exception) -> str:
    """
    OpenSSL's reasons in C{e} (an C{SSL.Error}), without the tuples.
    """
    items = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [str(item[2]) for item in items if isinstance(item, tuple) and len(item) == 3 and item[2]]
    return "; ".join(reasons) or str(e)


def _describeFailure(request: StatusRequest, failure: Failure) -> str:
    """
    One line for why the admin listener at C{request.url} did not answer.
    """
    from OpenSSL import SSL
    from twisted.internet import error
    from twisted.web.client import ResponseFailed, ResponseNeverReceived

    where = f"TP's admin listener at {request.url}"
    reasons = [failure]
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = list(failure.value.reasons) or reasons  # type: ignore[union-attr]
    for reason in reasons:
        if reason.check(error.ConnectionRefusedError):
            return f"cannot reach {where}: connection refused (is [admin] listen set in the server config, on this address?)"
        if reason.check(error.DNSLookupError):
            return f"cannot reach {where}: {request.host} did not resolve"
        if reason.check(defer.TimeoutError, error.TimeoutError, defer.CancelledError):
            hint = " (if it does not speak TLS, use http://)" if request.tls is not None else ""
            return f"no answer from {where} within {request.timeout:g} s{hint}"
        if reason.check(SSL.Error):
            text = _sslText(reason.value)
            hint = ""
            if "wrong version number" in text or "packet length too long" in text:
                hint = " (it does not speak TLS: use http://)"
            elif "certificate verify failed" in text:
                hint = " (its certificate does not verify against --ca, or does not name the URL's host)"
            elif "alert" in text:
                hint = " (it refused this client certificate: see TP's log)"
            return f"TLS handshake with {where} failed: {text}{hint}"
        if reason.check(error.ConnectionLost, error.ConnectionDone):
            hint = " (if [admin] identities is set it speaks TLS: use https:// and a client certificate)" if request.tls is None else ""
            return f"{where} closed the connection without an answer{hint}"
    return f"cannot read {where}: {failure.getErrorMessage()}"


@defer.inlineCallbacks
def fetchStatus(reactor: IDialReactor, request: StatusRequest) -> Any:
    """
    GET the C{/status} document; fires with C{(raw bytes, parsed)}.

    @raise AdminError: one line for what went wrong.
    """
    from twisted.web.client import Agent, readBody
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import implementer

    @implementer(IPolicyForHTTPS)
    class Policy:
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return request.tls

    agent = Agent(reactor, contextFactory=Policy(), connectTimeout=request.timeout)
    try:
        d = agent.request(b"GET", request.url.encode("ascii"))
        d.addTimeout(request.timeout, reactor)
        response = yield d
        body = yield readBody(response).addTimeout(request.timeout, reactor)
    except Exception:
        raise AdminError(_describeFailure(request, Failure())) from None
    if response.code == 403:
        why = body.decode("utf-8", "replace").strip() or "forbidden"
        hint = (
            "use https:// with a client certificate of an identity in [admin] identities"
            if request.tls is None
            else "its [admin] identities do not include this certificate's identity"
        )
        raise AdminError(f"TP's admin listener at {request.url} refused: {why} ({hint})", EXIT_REFUSED)
    if response.code != 200:
        why = body.decode("utf-8", "replace").strip().splitlines()
        raise AdminError(f"TP's admin listener at {request.url} answered {response.code}: {why[0] if why else response.phrase.decode()}")
    try:
        document = json.loads(body)
    except ValueError:
        raise AdminError(f"TP's admin listener at {request.url} did not answer JSON") from None
    if not isinstance(document, dict) or document.get("version") != 1:
        version = document.get("version") if isinstance(document, dict) else None
        raise AdminError(f"TP's admin listener at {request.url} answered status version {version!r}; this tp reads version 1")
    return body, document


def formatDuration(seconds: Any) -> str:
    """
    C{3.2s}, C{1m40s}, C{19h26m}, C{3d4h}; C{-} for nothing.
    """
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600}h"


def formatBytes(count: Any) -> str:
    """
    C{100 B}, C{2.0 KiB}, C{1.5 MiB}, ...; C{-} for nothing.
    """
    if not isinstance(count, int) or isinstance(count, bool):
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def table(title: str, headers: list[str], rows: list[list[str]]) -> list[str]:
    """
    A titled table in columns, or the title and C{none}.
    """
    if not rows:
        return [f"{title}: none"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [f"{title} ({len(rows)})", line(headers), *(line(r) for r in rows)]


def _utc(timestamp: Any) -> str:
    import datetime

    if not isinstance(timestamp, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def formatStatus(document: dict[str, Any], url: str) -> str:
    """
    The C{/status} document (version 1) as text: a summary line, then
    tables of tunnels, exposures, waiting dialers and certificates.
    """
    server = document.get("server") or {}
    out = [
        f"TP at {url}: up {formatDuration(server.get('uptime'))} (since {_utc(server.get('started'))}), "
        f"config {_cell(server.get('config'))}, generation {_cell(server.get('generation'))} (loaded {_utc(server.get('loaded'))})",
        "",
    ]
    tunnels = document.get("tunnels") or []
    withState = any("state" in t for t in tunnels)
    headers = ["IDENTITY", "OP", "DESTINATION", "TRANSPORT", "VIA", "PEER", *(["STATE"] if withState else []), "UP", "DOWN", "AGE"]
    rows = [
        [
            _cell(t.get("identity")), _cell(t.get("op")), _cell(t.get("destination")), _cell(t.get("transport")),
            _cell(t.get("via")), _cell(t.get("peer")), *([_cell(t.get("state"))] if withState else []),
            formatBytes(t.get("bytes_up")), formatBytes(t.get("bytes_down")), formatDuration(t.get("age")),
        ]
        for t in tunnels
    ]
    out += table("Tunnels", headers, rows) + [""]
    rows = [
        [
            _cell(e.get("kind")),
            _cell(e.get("name") if e.get("name") is not None else e.get("port")),
            _cell(e.get("identity")), _cell(e.get("via")), formatDuration(e.get("age")),
        ]
        for e in document.get("exposures") or []
    ]
    out += table("Exposures", ["KIND", "PORT/NAME", "IDENTITY", "VIA", "AGE"], rows) + [""]
    rows = [
        [_cell(d.get("exposure")), _cell(d.get("identity")), formatDuration(d.get("age"))]
        for d in document.get("dialers_waiting") or []
    ]
    out += table("Dialers waiting", ["EXPOSURE", "IDENTITY", "WAITING"], rows) + [""]
    rows = []
    for c in document.get("certificates") or []:
        left = c.get("expires_in")
        when = f"EXPIRED {formatDuration(-left)} ago" if isinstance(left, (int, float)) and left <= 0 else formatDuration(left)
        rows.append([_cell(c.get("name")), _cell(c.get("not_after")), when])
    out += table("Certificates", ["NAME", "NOT AFTER", "EXPIRES IN"], rows)
    cluster = document.get("cluster")
    if isinstance(cluster, dict):
        live = ", ".join(_cell(i.get("id")) for i in cluster.get("instances") or [])
        out += [
            "",
            f"Cluster: instance {_cell(cluster.get('instance'))}, routing store {'up' if cluster.get('store_up') else 'UNAVAILABLE'}, live instances: {live or '-'}",
            "",
        ]
        rows = [
            [
                _cell(r.get("kind")),
                _cell(r.get("name") if r.get("name") is not None else r.get("port")),
                _cell(r.get("identity")), ", ".join(str(i) for i in r.get("instances") or []) or "-",
            ]
            for r in cluster.get("remote") or []
        ]
        out += table("Routed to other instances", ["KIND", "PORT/NAME", "IDENTITY", "HELD AT"], rows)
    return "\n".join(out) + "\n"


@defer.inlineCallbacks
def runStatus(reactor: IDialReactor, request: StatusRequest, stdout: Any, stderr: Any) -> Any:
    """
    C{tp status}: print TP's C{/status} as tables (or, with C{--json}, as
    TP sent it).
    """
    try:
        body, document = yield fetchStatus(reactor, request)
    except AdminError as e:
        stderr.write(f"tp status: {e}\n")
        stderr.flush()
        return e.status
    if request.json:
        stdout.write(body.decode("utf-8"))
        if not body.endswith(b"\n"):
            stdout.write("\n")
    else:
        stdout.write(formatStatus(document, request.url.rsplit("/status", 1)[0]))
    stdout.flush()
    return EXIT_OK



def _run(reactor: Any, args: argparse.Namespace, stderr: Any) -> defer.Deferred[int]:
    settings = resolveSettings(args)
    if args.command == "expose":
        from tpproxy.reverse.expose import runExpose

        local = parseHostPort(args.local, "LOCALHOST:PORT")
        if args.e2e is not None:
            if not isCertificateName(args.e2e):
                raise UsageError(f"--e2e: {args.e2e!r} is not a DNS name of letters, digits and hyphens (no '_', not an address)")
            hello = ClientHello("listen", mode="e2e", name=normalize(args.e2e), p2p=True if args.p2p else None)
        else:
            if args.p2p:
                raise UsageError("--p2p: only an --e2e exposure can be dialed directly")
            hello = ClientHello("listen", mode="public", port=args.public)
        # --server flags, else the config file's server (a list: a link each).
        if args.p2p:
            # Introductions come on a TLS signalling connection (over QUIC,
            # dialers arrive as streams TP opens, which carry none).
            import dataclasses

            settings = dataclasses.replace(settings, transport="tls")
        texts = _servers(args) or list(readClientConfig(args).servers)
        servers = [ServerAddress(*parseHostPort(text, "--server", defaultPort=443)) for text in texts]
        return runExpose(reactor, settings, local, hello, args.keepalive, stderr, servers=servers or None, links=args.links)
    host, port = parseHostPort(args.target, "HOST:PORT")
    if args.command == "connect":
        return runConnect(reactor, settings, host, port, stderr, p2p=args.p2p)
    if args.udp:
        return runUpUDP(reactor, settings, host, port, args.localport, args.bind, stderr)
    return runUp(reactor, settings, host, port, args.localport, args.bind, stderr)


def main(argv: Sequence[str] | None = None) -> None:
    from tpproxy import logbridge

    logbridge.install()  # aioquic's log lines must not reach stderr
    parser = buildParser()
    args = parser.parse_args(argv)
    stderr = sys.stderr
    request: StatusRequest | None = None
    try:
        if args.command == "init-dev":
            sys.exit(runInitDev(args, sys.stdout))
        if args.command == "issue":
            sys.exit(runIssue(args, sys.stdout))
        # Fail on bad settings before the reactor starts.
        if args.command == "status":
            request = statusRequest(args)
        else:
            resolveSettings(args).tlsOptions()
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"tp: error: {e}\n")
    if getattr(args, "p2p", "off") not in ("off", False):
        # ICE (aioice) is asyncio code: P2P runs on Twisted's asyncio
        # reactor, installed before anything imports the reactor.
        from twisted.internet import asyncioreactor

        asyncioreactor.install()

    status = {"code": EXIT_OK}

    def start(reactor: Any) -> defer.Deferred[None]:
        # Long-running commands (up, expose, connect) keep what start-up
        # made for good: out of the collector's way (tpproxy.heap), once
        # this turn has set the command up.
        reactor.callLater(0, freezeStartup)
        if args.command == "status":
            assert request is not None
            d = defer.maybeDeferred(runStatus, reactor, request, sys.stdout, stderr)
        else:
            d = defer.maybeDeferred(_run, reactor, args, stderr)

        def done(code: int) -> None:
            status["code"] = code

        def failed(f: Failure) -> None:
            if f.check(Refused):
                err: Refused = f.value  # type: ignore[assignment]
                stderr.write(f"tp: refused by TP: {err.code}: {err.message}\n")
                status["code"] = EXIT_REFUSED
            elif f.check(TunnelError):
                stderr.write(f"tp: {f.getErrorMessage()}\n")
                status["code"] = EXIT_TUNNEL
            elif f.check(UsageError):
                stderr.write(f"tp: error: {f.getErrorMessage()}\n")
                status["code"] = EXIT_USAGE
            else:
                stderr.write(f"tp: unexpected error: {f.getTraceback()}\n")
                status["code"] = EXIT_TUNNEL

        d.addCallbacks(done, failed)
        return d

    import signal

    def hangup(signum: int, frame: Any) -> None:
        # ssh ends its ProxyCommand with SIGHUP: stop cleanly, so that a QUIC
        # connection is closed (TP would otherwise wait for its idle timeout).
        from twisted.internet import reactor

        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    signal.signal(signal.SIGHUP, hangup)
    try:
        task.react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(status["code"])


if __name__ == "__main__":
    main()
