# -*- test-case-name: tpproxy.test.test_workers -*-
"""
Several worker processes on one machine (C{[server] workers = N}).

C{twist tp} with C{workers} above 1 runs no TP itself: it starts N
C{twist tp --worker I} processes (L{WorkerPool}), restarts one that dies,
forwards C{SIGHUP} (reload) to each, stops them on C{SIGTERM}, and writes
their log events to its own log, each tagged with its worker.  Each worker
is a full TP instance of the cluster (docs/cluster.md), with its own id,
peer listener and admin listener (L{workerConfig}), and it shares TP's TCP
and UDP ports with the other workers: every listener it opens sets
C{SO_REUSEPORT} (L{ReusePortReactor}), so the kernel spreads new
connections and UDP flows over the workers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from dataclasses import replace
from typing import Any

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from tpproxy.config import ConfigError, ServerConfig, hostPort

log = Logger(namespace="tpproxy.workers")

#: Seconds a worker must have run for its next death to restart it at
#: once; one that dies sooner is restarted after a delay that doubles up
#: to L{RESTART_MAX}.
RESTART_RESET = 60.0
RESTART_MAX = 30.0
#: Seconds the pool waits for its workers to stop beyond their own drain
#: timeout, before it kills them.
STOP_GRACE = 15.0


_earlyHangups: list[int] = []


def exclusivePorts(config: ServerConfig) -> frozenset[int]:
    """
    The ports worker C{config.worker} alone listens on: its peer listener
    and its admin listener.
    """
    ports = set()
    for description in (config.cluster.peerListen, config.admin.listen if config.admin is not None else None):
        match = _ENDPOINT_PORT.match(description or "")
        if match is not None:
            ports.add(int(match.group(2)))
    return frozenset(ports)


def dieWithPool() -> None:
    """
    A worker: receive SIGTERM when the pool that started it dies (Linux
    PR_SET_PDEATHSIG), so that a pool killed outright leaves no worker
    behind to hold its ports and its instance id.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.warn("This system cannot end a worker with its pool (no prctl)")
    pool = os.environ.get("TP_POOL_PID")
    if pool is not None and str(os.getppid()) != pool:
        # The pool died before the call: do not run orphaned.
        os.kill(os.getpid(), signal.SIGTERM)


def holdHangups() -> None:
    """
    A worker, from its start until its reload service runs: remember a
    C{SIGHUP} instead of dying of it (its default action).  The pool sends
    one to every worker on reload, and one may still be starting.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: _earlyHangups.append(signum))


def takeHeldHangup() -> bool:
    """
    Was a C{SIGHUP} held by L{holdHangups}?  (Then reload once started.)
    """
    held = bool(_earlyHangups)
    _earlyHangups.clear()
    return held


class ReusePortReactor:
    """
    A reactor whose TCP and UDP listeners set C{SO_REUSEPORT} before they
    bind, so that the workers of one TP share its ports (Linux lets only
    sockets of the same user join such a group).  Everything else is the
    wrapped reactor's, and it provides the same interfaces.
    """

    def __init__(self, reactor: Any, exclusive: frozenset[int] = frozenset()) -> None:
        self._reactor = reactor
        #: Ports this worker alone listens on (its peer and admin ports,
        #: and ports the kernel picks): bound without SO_REUSEPORT, so a
        #: second process on one of them fails as it should.
        self.exclusive = exclusive | {0}
        directlyProvides(self, *providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _socket(self, kind: int, port: int, interface: str) -> tuple[socket.socket, int]:
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise error.CannotListenError(interface, port, e) from None
        return sock, family

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.exclusive:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        sock, family = self._socket(socket.SOCK_STREAM, port, interface)
        try:
            sock.listen(backlog)
            return self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            raise error.CannotListenError(interface, port, e) from None
        finally:
            sock.close()  # the reactor holds its own duplicate

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        if port in self.exclusive:
            return self._reactor.listenUDP(port, protocol, interface, maxPacketSize)
        sock, family = self._socket(socket.SOCK_DGRAM, port, interface)
        try:
            return self._reactor.adoptDatagramPort(sock.fileno(), family, protocol, maxPacketSize)
        finally:
            sock.close()


_ENDPOINT_PORT = re.compile(r"^(tcp6?:)(\d+)(?=:|$)")


def shiftPort(description: str, by: int, key: str) -> str:
    """
    A C{tcp:PORT...} server endpoint description with its port moved up by
    C{by}.
    """
    match = _ENDPOINT_PORT.match(description)
    if match is None:
        raise ConfigError(f"{key}: with server.workers above 1 this must be a tcp: or tcp6: endpoint with its port, got {description!r}")
    port = int(match.group(2)) + by
    if port > 65535:
        raise ConfigError(f"{key}: worker {by} would listen on port {port}: lower the port or server.workers")
    return f"{match.group(1)}{port}{description[match.end():]}"


def workerConfig(config: ServerConfig, worker: int) -> ServerConfig:
    """
    The configuration worker C{worker} (from 0) runs: its own cluster
    instance id (C{INSTANCE-wI}), peer listener and advertised address
    (their ports plus C{worker}) and admin listener (its port plus
    C{worker}); everything else is the same as every worker's.
    """
    cluster = config.cluster
    assert cluster.peerListen is not None
    host, port = hostPort(cluster.advertise, "cluster.advertise")
    if port + worker > 65535:
        raise ConfigError(f"cluster.advertise: worker {worker} would be reached on port {port + worker}: lower the port or server.workers")
    advertise = f"[{host}]:{port + worker}" if ":" in host else f"{host}:{port + worker}"
    cluster = replace(
        cluster,
        instance=f"{cluster.instance}-w{worker}",
        advertise=advertise,
        peerListen=shiftPort(cluster.peerListen, worker, "cluster.peer_listen"),
    )
    admin = config.admin
    if admin is not None:
        admin = replace(admin, listen=shiftPort(admin.listen, worker, "admin.listen"))
    return replace(config, cluster=cluster, admin=admin, worker=worker)


def checkWorkers(config: ServerConfig) -> None:
    """
    What C{workers} above 1 needs, checked at load: a cluster (each worker
    is an instance of it), endpoints whose ports can be moved per worker,
    and no ACME (each worker would run its own orders).
    """
    if config.workers == 1:
        return
    if not config.cluster.shared:
        raise ConfigError(
            "server.workers: more than one worker needs [cluster] etcd: each worker is an instance of the cluster, "
            "and they share what they hold through it (docs/workers.md)"
        )
    if config.acme is not None:
        raise ConfigError("server.workers: more than one worker cannot run [acme] yet (each would order its own certificates); use 1")
    for i in range(config.workers):
        workerConfig(config, i)


class WorkerProtocol(ProcessProtocol):
    """
    One worker process: its JSON log events (standard output) go to this
    process's log tagged C{worker}, its standard error lines too (what it
    says before its log starts, such as a port it cannot listen on).
    """

    def __init__(self, pool: WorkerPool, worker: int) -> None:
        self.pool = pool
        self.worker = worker
        self.buffer = b""
        self.errors = b""
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None
        #: It has logged: it holds SIGHUP (L{holdHangups}, which runs
        #: before its log starts), so one no longer kills it.
        self.ready = False
        #: A reload was asked for before it was ready.
        self.reloadWhenReady = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        # Twisted's JSON log: each event is RS, one line of JSON, LF.
        self.buffer += data
        *records, self.buffer = self.buffer.split(b"\n")
        for record in records:
            try:
                self._event(record)
            except Exception:
                # Never let one event stop the pool reading this worker (it
                # would block on a full pipe).
                log.failure("Worker {worker}: a log event could not be written", worker=self.worker)

    def _event(self, record: bytes) -> None:
        text = record.strip(b"\x1e \r\t")
        if not text:
            return
        try:
            event = eventFromJSON(text.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warn("Worker {worker}: {line}", worker=self.worker, line=text.decode("utf-8", "replace"))
            return
        if not self.ready:
            self.ready = True
            if self.reloadWhenReady:
                _signal(self, "HUP")
        level = event.get("log_level")
        event["worker"] = self.worker
        event["log_system"] = f"{event.get('log_namespace', '-')}#{getattr(level, 'name', 'info')} w{self.worker}"
        globalLogPublisher(event)

    def errReceived(self, data: bytes) -> None:
        self.errors += data
        *lines, self.errors = self.errors.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("Worker {worker}: {line}", worker=self.worker, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        if self.buffer:
            self._event(self.buffer)
        if self.errors.strip():
            log.error("Worker {worker}: {line}", worker=self.worker, line=self.errors.decode("utf-8", "replace"))
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPool(service.Service):
    """
    Runs C{count} workers of the configuration at C{path}: starts them,
    restarts one that dies (at once if it had run for a minute, else after
    a delay that doubles up to 30 s), forwards C{SIGHUP} to each, and on
    stop sends each C{SIGTERM} and waits for them (their drain timeout plus
    L{STOP_GRACE}, then C{SIGKILL}).

    @param argv: the command that runs one worker, given its number
        (default: this Python running C{twist tp --worker I}).
    """

    def __init__(self, reactor: Any, config: ServerConfig, argv: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.count = config.workers
        self.argv = argv or self.twistArgv
        self.workers: dict[int, WorkerProtocol] = {}
        self.started: dict[int, float] = {}
        self.delays: dict[int, float] = {}
        self.restarts: dict[int, Any] = {}

    def twistArgv(self, worker: int) -> list[str]:
        return [
            sys.executable, "-m", "twisted", "--log-format=json", "--log-file=-",
            "tp", "--config", self.config.path, "--worker", str(worker),
        ]

    def startService(self) -> None:
        super().startService()
        log.info("Starting {count} workers of {config}", count=self.count, config=self.config.path)
        if self.config.stateDir is not None and self.config.quic:
            # Made once, here: workers that started at once would each
            # make their own, and a worker's stateless resets would not
            # match the tokens of another's connections.
            from tpproxy.transports.quic import loadResetSecret

            loadResetSecret(self.config.stateDir)
        for worker in range(self.count):
            self.spawn(worker)

    def spawn(self, worker: int) -> None:
        self.restarts.pop(worker, None)
        proto = WorkerProtocol(self, worker)
        argv = self.argv(worker)
        env = dict(os.environ, TP_POOL_PID=str(os.getpid()))
        try:
            self.reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            # Out of processes or memory, say: try again as after a death.
            log.error("Cannot start worker {worker}: {error}; trying again in {delay:g} s", worker=worker, error=str(e), delay=RESTART_MAX)
            self.restarts[worker] = self.reactor.callLater(RESTART_MAX, self.spawn, worker)
            return
        self.workers[worker] = proto
        self.started[worker] = self.reactor.seconds()
        log.info("Worker {worker} started (pid {pid})", worker=worker, pid=proto.pid)

    def ended(self, proto: WorkerProtocol, reason: Failure) -> None:
        worker = proto.worker
        if self.workers.get(worker) is not proto:
            return
        del self.workers[worker]
        if not self.running:
            log.info("Worker {worker} (pid {pid}) stopped: {how}", worker=worker, pid=proto.pid, how=_how(reason))
            return
        ran = self.reactor.seconds() - self.started.get(worker, 0.0)
        delay = 0.0 if ran >= RESTART_RESET else min(RESTART_MAX, max(1.0, 2 * self.delays.get(worker, 0.5)))
        self.delays[worker] = delay
        log.warn(
            "Worker {worker} (pid {pid}) ended after {ran:.1f} s: {how}; restarting it{when}",
            worker=worker, pid=proto.pid, ran=ran, how=_how(reason), when=f" in {delay:g} s" if delay else "",
        )
        self.restarts[worker] = self.reactor.callLater(delay, self.spawn, worker)

    def reload(self) -> None:
        """
        Tell every worker to reload its configuration (each checks and
        applies it as one TP does, docs/operations.md).
        """
        log.info("Reloading: SIGHUP to {count} workers", count=len(self.workers))
        for proto in self.workers.values():
            if proto.ready:
                _signal(proto, "HUP")
            else:
                log.info("Worker {worker} is starting: it reloads once it runs", worker=proto.worker)
                proto.reloadWhenReady = True

    def stopService(self) -> Any:
        super().stopService()
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        running = list(self.workers.values())
        for proto in running:
            _signal(proto, "TERM")
        waiting = defer.DeferredList([p.ended for p in running], consumeErrors=True)
        limit = self.config.drainTimeout + STOP_GRACE

        def kill() -> None:
            for proto in running:
                if not proto.ended.called:
                    log.warn("Worker {worker} (pid {pid}) did not stop within {limit:g} s; killing it", worker=proto.worker, pid=proto.pid, limit=limit)
                    _signal(proto, "KILL")

        timer = self.reactor.callLater(limit, kill)
        return waiting.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])


def _signal(proto: WorkerProtocol, name: str) -> None:
    try:
        proto.transport.signalProcess(name)  # type: ignore[union-attr]
    except error.ProcessExitedAlready:
        pass


def _how(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"killed by signal {value.signal}"
    code = getattr(value, "exitCode", None)
    return f"exit status {code}" if code is not None else reason.getErrorMessage()


def makeWorkerPool(config: ServerConfig, reactor: Any = None) -> service.MultiService:
    """
    The services of C{twist tp} with C{workers} above 1: the pool alone.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from tpproxy.service import ReloadService

    top = service.MultiService()
    pool = WorkerPool(reactor, config)
    pool.setName("workers")
    pool.setServiceParent(top)
    # SIGHUP reloads, as for one TP: here by telling every worker.
    ReloadService(pool, reactor).setServiceParent(top)
    return top
