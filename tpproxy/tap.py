# -*- test-case-name: tpproxy.test.test_tap -*-
"""
C{twist tp}: the server's command line.

Errors an operator can fix end start-up with one line on standard error
and a non-zero status, instead of twist's usage text or a traceback: a
bad configuration (L{Options.postOptions}) and an address TP cannot
listen on (L{ServerService}).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.python import usage

from tpproxy.config import ConfigError, ServerConfig, loadServerConfig
from tpproxy.heap import freezeStartup
from tpproxy.reactors import IServerReactor


def programName() -> str:
    """
    How the operator started TP, for the first words of an error line:
    C{twistd tp} under twistd (the plugin or C{tac/tp.tac}), else C{twist tp}.
    """
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("twist")
    name = path.parent.name if path.name == "__main__.py" else path.name
    return "twistd tp" if name.startswith("twistd") else "twist tp"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the TP server.  With --config (or TP_CONFIG), it reads that TOML file; "
        "with neither it runs on an embedded development default: a dev CA, server and "
        "client certificates and configs made on first run under $TP_HOME "
        "(default ~/.local/share/tp/dev), serving on 127.0.0.1 and ::1 port 8443."
    )
    optParameters = [
        ["config", "c", None, "Server configuration file (TOML). Default: $TP_CONFIG, else the dev default."],
        ["worker", None, None, "Run as worker I of server.workers (the pool starts its workers so; not for operators).", int],
    ]

    def postOptions(self) -> None:
        """
        Load the configuration.

        @raise SystemExit: with the one-line message, if the configuration
            is bad.  (A L{usage.UsageError} would make twist print its whole
            usage text after the message, which says nothing about the file.)
        """
        path = self["config"] or os.environ.get("TP_CONFIG")
        try:
            if path:
                self["serverConfig"] = loadServerConfig(path)
            else:
                from tpproxy.devenv import ensureDevEnvironment

                home = ensureDevEnvironment()
                self["serverConfig"] = loadServerConfig(home / "server.toml")
                self["devHome"] = home
            worker = self["worker"]
            if worker is not None:
                from tpproxy.workers import workerConfig

                config = self["serverConfig"]
                if not 0 <= worker < config.workers:
                    raise ConfigError(f"--worker {worker}: server.workers is {config.workers}, so workers are 0 to {config.workers - 1}")
                self["serverConfig"] = workerConfig(config, worker)
        except ConfigError as e:
            raise SystemExit(f"{programName()}: bad configuration: {e}") from None


def _keysFor(config: ServerConfig, port: int) -> list[str]:
    """
    The config keys that may name C{port}, for a message about it.
    """
    field = re.compile(rf"(^|:)(port=)?{port}(:|$)")
    keys = []
    if any(field.search(description) for description in config.listen):
        keys.append("server.listen")
    elif any(p == port for _, p in config.quic):
        keys.append("server.quic")
    if config.admin is not None and field.search(config.admin.listen):
        keys.append("admin.listen")
    if config.acme is not None and config.acme.http01Listen and field.search(config.acme.http01Listen):
        keys.append("acme.http01_listen")
    return keys or ["server.listen"]


def cannotListen(error: CannotListenError, config: ServerConfig) -> str:
    """
    One line for an address TP cannot listen on: which address, why, and
    what to change.
    """
    interface, port = error.interface, error.port
    address = f"[{interface}]:{port}" if ":" in (interface or "") else f"{interface}:{port}" if interface else f"port {port} (all addresses)"
    keys = " or ".join(_keysFor(config, port))
    code = getattr(error.socketError, "errno", None)
    if code == errno.EADDRINUSE:
        why = (
            f"it is in use (by another TP, or another program: ss -ltnup 'sport = :{port}' shows which); "
            f"stop that, or choose another port in {keys} of {config.path}"
        )
    elif code == errno.EACCES:
        why = (
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE); "
            f"grant that, or choose a port from 1024 in {keys} of {config.path}"
        )
    elif code == errno.EADDRNOTAVAIL:
        why = f"no interface of this machine has that address; fix the address in {keys} of {config.path}"
    else:
        reason = error.socketError.strerror if isinstance(error.socketError, OSError) and error.socketError.strerror else error.socketError
        why = f"{reason}; check {keys} of {config.path}"
    return f"{programName()}: cannot listen on {address}: {why}"


class ServerService(service.MultiService):
    """
    TP's services (L{tpproxy.service.makeService}, the child named C{tp}),
    started so that an address TP cannot listen on ends start-up with one
    line (L{cannotListen}) instead of a traceback.  (Its listeners raise
    at start: twist calls only C{startService}, twistd both.)

    @ivar tp: the composed services.
    """

    def __init__(self, tp: service.IService, config: ServerConfig) -> None:
        super().__init__()
        self.tp = tp
        self.config = config
        tp.setName("tp")
        tp.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(cannotListen(e, self.config)) from None

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            raise SystemExit(cannotListen(e, self.config)) from None
        # Start-up is over: what exists now lives as long as the process.
        freezeStartup()


def makeService(options: Options, reactor: IServerReactor | None = None) -> ServerService:
    from tpproxy import logbridge
    from tpproxy.service import makeService as _make

    logbridge.install()  # aioquic's log lines go to the log, not to [stderr#error]

    config: ServerConfig = options["serverConfig"]
    if config.workers > 1 and config.worker is None:
        # The pool: it runs no TP itself, but a worker process per core.
        from tpproxy.workers import makeWorkerPool

        return ServerService(makeWorkerPool(config, reactor), config)
    if config.worker is not None:
        from tpproxy.workers import ReusePortReactor, dieWithPool, exclusivePorts, holdHangups

        holdHangups()
        dieWithPool()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        reactor = ReusePortReactor(reactor, exclusivePorts(config))  # type: ignore[assignment]
    svc = ServerService(_make(config, reactor), config)
    home = options.get("devHome")
    if home is not None:
        from tpproxy.devenv import announce

        announce(home)
    return svc
