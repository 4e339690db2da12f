"""
Support for TP's integration tests: real tools, real processes, loopback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from tpproxy.service import makeServerFactory


def closeAtEnd(case: Any, session: Any) -> None:
    """
    At the end of test C{case}, close a client QUIC C{session} (if it is
    still open), stop its socket and its timers.
    """

    def close() -> None:
        if not session.closed:
            session.close(0, "test done")
        session.socket.stop()
        session.abandon()

    case.addCleanup(close)


def requireTool(*candidates: str) -> str:
    """
    Find an external program.  Missing, it skips the test, except under
    C{CI=true}, where a missing tool is an error.
    """
    for name in candidates:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    message = f"{candidates[0]} is not installed (bash .ci/run installs it)"
    if os.environ.get("CI") == "true":
        raise AssertionError(message + "; under CI=true a missing tool is an error")
    raise SkipTest(message)


def tpCommand() -> list[str]:
    """
    The C{tp} client: the installed script beside this Python if there is
    one, else the module.
    """
    script = Path(sys.executable).with_name("tp")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tpproxy.cli"]


def twistCommand() -> list[str]:
    script = Path(sys.executable).with_name("twist")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "twisted.application.twist"]


def freePort(family: int = socket.AF_INET, host: str = "0.0.0.0") -> int:
    """
    A TCP port free now.  By default checked on every IPv4 address (a
    wildcard bind fails where any address holds the port): tests listen on
    127.0.0.1, .2 and .3, and tests running in parallel pick ports too.
    """
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def freePortRun(count: int, host: str = "0.0.0.0") -> int:
    """
    A port P such that P to P + count - 1 are all free on C{host} now (for
    workers, whose listeners take consecutive ports).
    """
    while True:
        base = freePort(host=host)
        if base + count > 65535:
            continue
        held = []
        try:
            for port in range(base + 1, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_CACHE = None


def cleanEnv(**extra: str) -> dict[str, str]:
    """
    The environment for a tp process: no TP_ variables from outside, and a
    cache directory of the test run's own (the transport memory of
    C{--transport auto}).
    """
    global _CACHE
    if _CACHE is None:
        import tempfile

        _CACHE = tempfile.mkdtemp(prefix="tp-test-cache-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    env["XDG_CACHE_HOME"] = _CACHE
    env.update(extra)
    return env


class ProcessResult:
    def __init__(self, out: bytes, err: bytes, status: int | None) -> None:
        self.out = out
        self.err = err
        self.status = status

    def __repr__(self) -> str:
        return f"<ProcessResult status={self.status} out={self.out[:200]!r} err={self.err[-2000:]!r}>"


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes | None, onStderr: Any = None) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.done: defer.Deferred[ProcessResult] = defer.Deferred()
        self.onStderr = onStderr

    def connectionMade(self) -> None:
        if self.stdin is not None:
            self.transport.write(self.stdin)  # type: ignore[union-attr]
            self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)
        if self.onStderr is not None:
            self.onStderr(b"".join(self.err))

    def processEnded(self, reason: Any) -> None:
        self.done.callback(ProcessResult(b"".join(self.out), b"".join(self.err), reason.value.exitCode))


def run(argv: list[str], stdin: bytes | None = b"", env: dict[str, str] | None = None, timeout: float = 120) -> defer.Deferred[ProcessResult]:
    """
    Run a process to its end, feeding C{stdin} (then EOF).
    """
    proto = _Collect(stdin)
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env if env is not None else cleanEnv())  # type: ignore[attr-defined]
    d = proto.done

    def kill() -> None:
        try:
            transport.signalProcess("KILL")
        except Exception:
            pass

    timer = reactor.callLater(timeout, kill)  # type: ignore[attr-defined]
    d.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
    return d


class Background:
    """
    A long-running process, killed at test cleanup.
    """

    def __init__(self, testCase: TestCase, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.stderrSeen: defer.Deferred[bytes] | None = None
        self._want: bytes | None = None
        self.proto = _Collect(None, self._onStderr)
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.proto, argv[0], argv, env=env if env is not None else cleanEnv(), childFDs={0: "w", 1: "r", 2: "r"}
        )
        testCase.addCleanup(self.stop)

    def _onStderr(self, err: bytes) -> None:
        if self._want is not None and self._want in err and self.stderrSeen and not self.stderrSeen.called:
            self.stderrSeen.callback(err)

    def waitForStderr(self, marker: bytes, timeout: float = 30) -> defer.Deferred[bytes]:
        self._want = marker
        self.stderrSeen = defer.Deferred()
        self._onStderr(b"".join(self.proto.err))
        self.stderrSeen.addTimeout(timeout, reactor)

        def timedOut(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            ended = "it exited" if self.proto.done.called else "it still runs"
            raise AssertionError(f"no {marker!r} on stderr within {timeout:g} s ({ended}); its stderr ends:\n{self.stderr[-3000:].decode(errors='replace')}")

        return self.stderrSeen.addErrback(timedOut)

    @property
    def stderr(self) -> bytes:
        return b"".join(self.proto.err)

    def stop(self) -> defer.Deferred[ProcessResult] | None:
        if self.proto.done.called:
            return None
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            return None
        def kill() -> None:
            if self.proto.done.called:
                return
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                # It exited, but a child of its own (an sshd session) holds
                # its pipes open: stop reading them.
                self.transport.loseConnection()

        killer = reactor.callLater(10, kill)  # type: ignore[attr-defined]
        d = self.proto.done
        d.addBoth(lambda r: (killer.active() and killer.cancel(), r)[1])
        return d


@defer.inlineCallbacks
def waitForPort(port: int, host: str = "127.0.0.1", timeout: float = 30) -> Any:
    """
    Wait until something accepts TCP connections on C{host:port}.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")
            yield deferLater(0.1)


@defer.inlineCallbacks
def waitUntilRefused(port: int, what: str, timeout: float = 5) -> Any:
    """
    Wait until 127.0.0.1:C{port} refuses connections (a listener that must
    close); fail with C{what} if it is still open after C{timeout}.
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while reactor.seconds() < deadline:  # type: ignore[attr-defined]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        yield deferLater(0.1)
    raise AssertionError(f"port {port} still open {timeout:g} s after {what}")


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def startServer(testCase: TestCase, config: Any, interface: str = "127.0.0.1") -> int:
    """
    Run a TP server in this process on a free loopback port.
    """
    factory = makeServerFactory(config, reactor)
    port = reactor.listenTCP(0, factory, interface=interface)  # type: ignore[attr-defined]

    def stop() -> Any:
        for proto in list(factory.protocols):
            proto.transport.abortConnection()
        return port.stopListening()

    testCase.addCleanup(stop)
    return port.getHost().port


def auditObserver(testCase: TestCase) -> EventLoggingObserver:
    """
    Collect the log events of the test; read the audit ones with L{audits}.
    """
    return EventLoggingObserver.createWithCleanup(testCase, globalLogPublisher)


def audits(observer: EventLoggingObserver) -> list[dict[str, Any]]:
    return [e for e in observer if e.get("log_namespace") == "tpproxy.audit"]


@implementer(IHalfCloseableProtocol)
class HashSink(protocol.Protocol):
    """
    Reads to EOF, then answers C{"<bytes> <sha256>\\n"} and closes: a test
    of half-close.
    """

    def connectionMade(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self.factory.accepted += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(f"{self.count} {self.hash.hexdigest()}\n".encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """
    Echoes, and passes EOF back as EOF.
    """

    def connectionMade(self) -> None:
        self.factory.accepted += 1  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


def listenLocal(testCase: TestCase, protocolClass: type[protocol.Protocol], interface: str = "127.0.0.1") -> tuple[int, Any]:
    factory = protocol.Factory.forProtocol(protocolClass)
    factory.accepted = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface=interface)  # type: ignore[attr-defined]
    testCase.addCleanup(port.stopListening)
    return port.getHost().port, factory


class SSHD:
    """
    A real OpenSSH server on a loopback port, with keys made for the test,
    and the ssh command line to reach it.
    """

    @classmethod
    @defer.inlineCallbacks
    def start(cls, testCase: TestCase, netns: Any = None, where: str = "", keyType: str = "ed25519") -> Any:
        """
        Start sshd on 127.0.0.1; with C{netns} (L{tpproxy.test.netns.
        Namespaces}), inside its namespace C{where}.  Its host key and the
        user's key are of C{keyType} (C{ssh-keygen -t}: the SSH demo's
        browser library has no Ed25519, so it needs C{ecdsa}).
        """
        import pwd

        self = cls()
        sshd = requireTool("/usr/sbin/sshd", "sshd")
        self.ssh = requireTool("ssh")
        keygen = requireTool("ssh-keygen")
        d = Path(testCase.mktemp()).absolute()
        d.mkdir()
        os.chmod(d, 0o700)
        self.dir = d
        for name in ("host", "user"):
            r = yield run([keygen, "-q", "-t", keyType, "-N", "", "-f", str(d / name)])
            testCase.assertEqual(r.status, 0, r)
        (d / "authorized_keys").write_bytes((d / "user.pub").read_bytes())
        os.chmod(d / "authorized_keys", 0o600)
        hostKey = (d / "host.pub").read_text().split()
        (d / "known_hosts").write_text(f"tp-test-sshd {hostKey[0]} {hostKey[1]}\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.port = freePort()
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"PermitRootLogin prohibit-password\nAllowUsers {self.user}\nLogLevel ERROR\n"
        )
        prefix = netns.exec(where) if netns is not None else []
        self.process = Background(testCase, prefix + [sshd, "-D", "-e", "-f", str(d / "sshd_config")])
        if netns is not None:
            yield netns.waitForTCP(where, "127.0.0.1", self.port)
        else:
            yield waitForPort(self.port)
        return self

    def args(self, host: str, port: int, *command: str, proxy: str | None = None) -> list[str]:
        """
        ssh to C{host}:C{port} (through C{proxy}, a ProxyCommand, if given),
        checking the host key against the one made for this sshd.
        """
        argv = [
            self.ssh, "-F", "/dev/null", "-i", str(self.dir / "user"), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=tp-test-sshd",
        ]
        if proxy:
            argv += ["-o", f"ProxyCommand={proxy}"]
        return argv + ["-p", str(port), "-l", self.user, host, *command]


@defer.inlineCallbacks
def waitForAudits(observer: EventLoggingObserver, count: int, timeout: float = 10) -> Any:
    """
    Wait until C{count} audit events were logged (a server logs a
    connection's event when it has seen the close, which may come after the
    client has its answer).
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while len(audits(observer)) < count:
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{len(audits(observer))} audit events after {timeout} s, expected {count}")
        yield deferLater(0.05)
    return audits(observer)


@defer.inlineCallbacks
def echoThrough(host: str, port: int, size: int = 256 * 1024, label: str = "") -> Any:
    """
    One TCP connection to C{host:port}: C{size} random bytes, a half-close,
    and exactly those bytes back before the close (an echo behind what is
    tested).
    """
    data = os.urandom(size)
    received: list[bytes] = []
    done: defer.Deferred[None] = defer.Deferred()

    class Client(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(data)  # type: ignore[union-attr]
            self.transport.loseWriteConnection()  # type: ignore[union-attr]

        def dataReceived(self, chunk: bytes) -> None:
            received.append(chunk)

        def connectionLost(self, reason: Any) -> None:
            done.callback(None)

    yield connectProtocol(TCP4ClientEndpoint(reactor, host, port), Client())
    yield done
    got = b"".join(received)
    if (len(got), sha256(got)) != (size, sha256(data)):
        raise AssertionError(f"{label or f'{host}:{port}'}: got {len(got)} bytes back, sent {size}")


def echoRoundTrips(port: int, count: int, size: int) -> Any:
    """
    C{count} concurrent L{echoThrough}s to C{port} on 127.0.0.1.
    """
    return defer.gatherResults(
        [echoThrough("127.0.0.1", port, size, f"tunnel {i}") for i in range(count)], consumeErrors=True
    )


@defer.inlineCallbacks
def scrapeMetrics(url: str) -> Any:
    """
    The metrics at C{url} (an admin listener's C{/metrics}), as
    C{{(name, ((label, value), ...)): value}}.
    """
    import treq
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.web.client import HTTPConnectionPool

    response = yield treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False))
    text = yield response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
