# -*- test-case-name: tpproxy.test.test_cli -*-
"""
The C{tp} client command.

Exit status: 0 success; 1 TP could not be reached or the TLS connection
was refused; 2 bad usage or configuration; 3 TP refused the request (its
error code and message are printed on stderr).
"""

from __future__ import annotations

import argparse
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
from tpproxy.names import isCertificateName, isDestinationHost, normalize
from tpproxy.protocols.client import Refused, ServerAddress, TPClientProtocol, TunnelError
from tpproxy.protocols.relay import RelayEnd, noDelay, splice
from tpproxy.wire import VERSION, ClientHello

EXIT_OK, EXIT_TUNNEL, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3
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
        from tpproxy.pki import loadCertificates, loadKey

        def load(kind: str, path: str, loader: Any) -> Any:
            try:
                return loader(path)
            except FileNotFoundError:
                raise UsageError(f"{kind}: file {path} does not exist") from None
            except (ValueError, TypeError) as e:
                raise UsageError(f"{kind}: {path} is not usable ({e})") from None

        return load("--ca", self.ca, loadCertificates), load("--cert", self.cert, loadCertificates), load("--key", self.key, loadKey)

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
    group.add_argument("--server", metavar="HOST:PORT", default=default, help="the TP server (port defaults to 443)")
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
            "  tp init-dev ~/tp-dev && twist tp --config ~/tp-dev/server.toml\n\n"
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


def resolveSettings(args: argparse.Namespace) -> Settings:
    """
    Flags override the config file; the config file is --config, else
    $TP_CONFIG, else the per-user default path if it exists.
    """
    path = getattr(args, "config", None) or os.environ.get("TP_CONFIG")
    config = ClientConfig()
    try:
        if path:
            config = loadClientConfig(path)
        elif defaultClientConfigPath().exists():
            config = loadClientConfig(defaultClientConfigPath())
    except ConfigError as e:
        raise UsageError(f"config: {e}") from None
    overrides = {}
    for name in ("server", "cert", "key", "ca"):
        value = getattr(args, name, None)
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


@defer.inlineCallbacks
def runConnect(reactor: Any, settings: Settings, host: str, port: int, stderr: Any) -> Any:
    from tpproxy.connector import Connector

    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    connector = Connector(reactor, settings)
    transport = yield connector.choose()
    stderr.write(f"Connecting to {target} via {settings.server} (v{VERSION}, {transport})\n")
    stderr.flush()
    reactor.addSystemEventTrigger("before", "shutdown", connector.close)
    tunnel: TPClientProtocol = yield connector.open(ClientHello.connect(host, port))
    stdioDone: defer.Deferred[None] = defer.Deferred()
    tunnelDone: defer.Deferred[None] = defer.Deferred()
    tunnel.onClose = lambda end, reason: tunnelDone.called or tunnelDone.callback(None)
    local = StdioEnd(stdioDone)
    StandardIO(local, reactor=reactor)
    splice(tunnel, local, fromA=tunnel.rest)
    tunnel.transport.resumeProducing()  # type: ignore[union-attr]
    yield defer.DeferredList([stdioDone, tunnelDone])
    connector.close()
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
    def __init__(self, reactor: Any, settings: Settings, hello: ClientHello, stderr: Any) -> None:
        from tpproxy.connector import Connector

        self.reactor = reactor
        self.settings = settings
        self.connector = Connector(reactor, settings)
        self.hello = hello
        self.stderr = stderr

    def buildProtocol(self, addr: Any) -> LocalEnd:
        return LocalEnd(self)


@defer.inlineCallbacks
def runUp(reactor: Any, settings: Settings, host: str, port: int, localPort: int, bind: str, stderr: Any) -> Any:
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
    yield defer.Deferred()  # until the reactor stops


@defer.inlineCallbacks
def runUpUDP(reactor: Any, settings: Settings, host: str, port: int, localPort: int, bind: str, stderr: Any) -> Any:
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


def _run(reactor: Any, args: argparse.Namespace, stderr: Any) -> defer.Deferred[int]:
    settings = resolveSettings(args)
    if args.command == "expose":
        from tpproxy.reverse.expose import runExpose

        local = parseHostPort(args.local, "LOCALHOST:PORT")
        if args.e2e is not None:
            if not isCertificateName(args.e2e):
                raise UsageError(f"--e2e: {args.e2e!r} is not a DNS name of letters, digits and hyphens (no '_', not an address)")
            hello = ClientHello("listen", mode="e2e", name=normalize(args.e2e))
        else:
            hello = ClientHello("listen", mode="public", port=args.public)
        return runExpose(reactor, settings, local, hello, args.keepalive, stderr)
    host, port = parseHostPort(args.target, "HOST:PORT")
    if args.command == "connect":
        return runConnect(reactor, settings, host, port, stderr)
    if args.udp:
        return runUpUDP(reactor, settings, host, port, args.localport, args.bind, stderr)
    return runUp(reactor, settings, host, port, args.localport, args.bind, stderr)


def main(argv: Sequence[str] | None = None) -> None:
    from tpproxy import logbridge

    logbridge.install()  # aioquic's log lines must not reach stderr
    parser = buildParser()
    args = parser.parse_args(argv)
    stderr = sys.stderr
    try:
        if args.command == "init-dev":
            sys.exit(runInitDev(args, sys.stdout))
        if args.command == "issue":
            sys.exit(runIssue(args, sys.stdout))
        # Fail on bad settings before the reactor starts.
        resolveSettings(args).tlsOptions()
    except UsageError as e:
        parser.exit(EXIT_USAGE, f"tp: error: {e}\n")

    status = {"code": EXIT_OK}

    def start(reactor: Any) -> defer.Deferred[None]:
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
