# -*- test-case-name: tpproxy.test.test_h3peers -*-
"""
Real HTTP/3 peers for tests: headless Chromium as the browser and
L{tpproxy.test.h3server} as the web site, each a child process.

Chromium trusts a test's CA through the NSS database of a throwaway
C{$HOME} (L{makeProfile}); L{fetchWithChromium} forces QUIC for one origin,
so a page it returns was fetched over HTTP/3 (there is no TCP fallback for
a forced origin).  Chromium touches loopback only: its host resolver maps
every name but C{localhost}, C{127.0.0.1} and the test's own to "not
found", so it makes no DNS query (it otherwise looks up accounts.google.com,
clients2.google.com and update.googleapis.com at start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tpproxy.test.support import cleanEnv, requireTool, run

#: Where Debian's C{chromium} package puts the browser itself; its
#: C{/usr/bin/chromium} is a shell wrapper that adds Debian's Google API
#: keys and extension flags from C{/etc/chromium.d}, which a test wants none of.
DEBIAN_CHROMIUM = "/usr/lib/chromium/chromium"

#: The flags of every fetch, beside C{--user-data-dir} and
#: C{--origin-to-force-quic-on}.  Measured with Chromium 156 as root:
#: C{--no-sandbox} is required as root (and in most containers);
#: C{--headless=new} with C{--dump-dom} prints the DOM after load;
#: C{--host-resolver-rules} keeps Chromium off DNS (and so off Google's
#: services); C{--no-proxy-server} because a proxy from the environment
#: would take QUIC away; C{--disable-dev-shm-usage} for containers with a
#: small C{/dev/shm}; the logging flags put the QUIC TLS handshake's error
#: (C{CERTIFICATE_VERIFY_FAILED}) on stderr.  The others only trim
#: start-up work.  C{--disable-gpu} is not needed (no difference measured).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--dump-dom",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--enable-logging=stderr",
    "--vmodule=tls_handshaker=1",
)

#: Chromium's stderr lines that say nothing about a fetch (there is no
#: D-Bus in a test's environment).
_NOISE = ("dbus", "D-Bus", "Desktop Identity Consistency", "InitializeSandbox", "drmGetDevices", "Continuing handshake")


class IProcessReactor(IReactorProcess, IReactorTime):
    """
    Child processes and timers: what the helpers here need.
    """


def _reactor(reactor: IProcessReactor | None) -> IProcessReactor:
    if reactor is None:
        from twisted.internet import reactor as installed

        return installed  # type: ignore[return-value]
    return reactor


def chromiumPath() -> str | None:
    """
    The Chromium browser binary, or C{None} if there is none.
    """
    if os.access(DEBIAN_CHROMIUM, os.X_OK):
        return DEBIAN_CHROMIUM
    return shutil.which("chromium")


def certutilPath() -> str | None:
    """
    NSS's C{certutil} (Debian package C{libnss3-tools}), or C{None}.
    """
    return shutil.which("certutil")


def requireChromium() -> tuple[str, str]:
    """
    (chromium, certutil): missing, the test is skipped, or fails under
    C{CI=true}.
    """
    return requireTool(chromiumPath() or "chromium"), requireTool("certutil")


class ChromiumError(Exception):
    """
    A fetch with Chromium failed.

    @ivar stderr: Chromium's stderr, less the lines that are noise.
    @ivar dom: what Chromium printed on stdout (empty when the load failed).
    """

    def __init__(self, message: str, stderr: str, dom: str = "") -> None:
        self.stderr = stderr
        self.dom = dom
        super().__init__(f"{message}; Chromium's stderr ends:\n{stderr[-3000:]}")


@defer.inlineCallbacks
def makeProfile(home: str | Path, caPEM: bytes | None, nickname: str = "tp-test-ca") -> Any:
    """
    Make C{home} a throwaway C{$HOME} for Chromium whose NSS database
    (C{home/.pki/nssdb}) trusts C{caPEM} to issue server certificates
    (C{certutil -t "C,,"}); with C{None}, an empty database.

    @return: a L{Deferred} that fires with C{home} as a string.
    """
    certutil = requireTool("certutil")
    home = Path(home).absolute()
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    steps = [[certutil, "-N", "-d", f"sql:{db}", "--empty-password"]]
    if caPEM is not None:
        (home / "ca.pem").write_bytes(caPEM)
        steps.append([certutil, "-A", "-d", f"sql:{db}", "-n", nickname, "-t", "C,,", "-i", str(home / "ca.pem")])
    for argv in steps:
        result = yield run(argv, env=cleanEnv(HOME=str(home)), timeout=30)
        if result.status != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result!r}")
    return str(home)


def _quiet(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not any(noise in line for noise in _NOISE))


def fetchWithChromium(
    url: str,
    forceQuicOrigin: str,
    profileHome: str,
    timeout: float = 30,
    resolve: Mapping[str, str] | None = None,
    reactor: IProcessReactor | None = None,
) -> defer.Deferred[str]:
    """
    Load C{url} in headless Chromium with QUIC forced for C{forceQuicOrigin}
    (C{HOST:PORT}) and return the DOM after load.

    Chromium resolves only C{localhost} (itself, to ::1 or 127.0.0.1) and the
    names in C{resolve} (name to IP address, e.g. C{{"www.example.test":
    "127.0.0.1"}}, for a page fetched by name, with SNI); any other name
    fails to resolve.  QUIC cannot be forced for an IPv6 literal (Chromium
    156 then uses TCP): for IPv6, fetch a name that C{resolve} maps to the
    address.

    Each fetch runs in a fresh user-data directory under C{profileHome} (so
    nothing is cached between fetches, and fetches may run at once) with
    C{HOME=profileHome}, whose NSS database decides which CAs are trusted
    (L{makeProfile}).

    @return: a L{Deferred} that fires with the DOM, or fails with
        L{ChromiumError} (the load failed, Chromium exited non-zero, or it
        ran longer than C{timeout} seconds, when it is killed).
    """
    reactor = _reactor(reactor)
    chromium = requireTool(chromiumPath() or "chromium")
    dataDir = tempfile.mkdtemp(prefix="chromium-", dir=profileHome)
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={dataDir}", f"--origin-to-force-quic-on={forceQuicOrigin}"]
    # A name's MAP comes before the catch-all; EXCLUDEs belong to the MAP
    # before them.  Without the catch-all Chromium looks up Google's names.
    mapped = [f"MAP {name} [{address}]" if ":" in address else f"MAP {name} {address}" for name, address in (resolve or {}).items()]
    allowed = {"localhost", "127.0.0.1", urlsplit(url).hostname or "localhost", forceQuicOrigin.rsplit(":", 1)[0].strip("[]")}
    rules = ", ".join([*mapped, "MAP * ~NOTFOUND", *(f"EXCLUDE {host}" for host in sorted(allowed - set(resolve or ())))])
    argv += [f"--host-resolver-rules={rules}", url]
    # Not TMPDIR=profileHome: Chromium's singleton socket goes there, and a
    # trial temp path is longer than a socket path may be.
    env = {"HOME": profileHome, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    proto = _Collect()
    transport = reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})
    proto.transport.closeStdin()  # type: ignore[union-attr]
    timedOut: list[bool] = []

    def kill() -> None:
        # Chromium's helper processes exit with the browser process.
        timedOut.append(True)
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    timer = reactor.callLater(timeout, kill)

    def ended(reason: ProcessTerminated | ProcessDone) -> str:
        if timer.active():
            timer.cancel()
        shutil.rmtree(dataDir, ignore_errors=True)
        stderr = _quiet(proto.err.decode(errors="replace"))
        dom = proto.out.decode(errors="replace")
        if timedOut:
            raise ChromiumError(f"Chromium did not finish loading {url} within {timeout:g} s", stderr, dom)
        if reason.exitCode != 0:
            how = f"signal {reason.signal}" if reason.signal is not None else f"status {reason.exitCode}"
            raise ChromiumError(f"Chromium ended with {how} loading {url}", stderr, dom)
        if "Page load failed" in stderr or not dom.strip():
            raise ChromiumError(f"Chromium failed to load {url}", stderr, dom)
        return dom

    return proto.done.addCallback(ended)


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.done: defer.Deferred[ProcessTerminated | ProcessDone] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(reason.value)


class H3ServerProcess(protocol.ProcessProtocol):
    """
    A running L{tpproxy.test.h3server}.

    @ivar port: its UDP port, once listening.
    @ivar requests: the requests it logged, in order, as dicts with
        C{method}, C{path}, C{authority}, C{alpn} and C{peer}.
    """

    def __init__(self, reactor: IProcessReactor) -> None:
        self.reactor = reactor
        self.port: int | None = None
        self.requests: list[dict[str, Any]] = []
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._buffer = b""
        self._err = b""
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], defer.Deferred[dict[str, Any]]]] = []

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            record = json.loads(line)
            if "listening" in record:
                self.port = int(record["listening"])
                self.listening.callback(self.port)
                continue
            self.requests.append(record)
            for entry in list(self._waiting):
                match, d = entry
                if match(record):
                    self._waiting.remove(entry)
                    d.callback(record)

    def errReceived(self, data: bytes) -> None:
        self._err += data

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def processEnded(self, reason: Failure) -> None:
        problem = AssertionError(f"h3server exited ({reason.value}); its stderr ends:\n{self.stderr[-3000:]}")
        if not self.listening.called:
            self.listening.errback(problem)
        for _, d in self._waiting:
            d.errback(problem)
        self._waiting.clear()
        self.ended.callback(None)

    def waitForRequest(self, path: str | None = None, timeout: float = 10) -> defer.Deferred[dict[str, Any]]:
        """
        The first logged request for C{path} (any path if C{None}), already
        logged or still to come.
        """

        def match(record: dict[str, Any]) -> bool:
            return path is None or record.get("path") == path

        for record in self.requests:
            if match(record):
                return defer.succeed(record)
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._waiting.append((match, d))
        return d.addTimeout(timeout, self.reactor)

    def stop(self) -> defer.Deferred[None]:
        """
        Stop the server (SIGTERM, then SIGKILL after 10 s).
        """
        if self.ended.called:
            return defer.succeed(None)
        self.transport.signalProcess("TERM")  # type: ignore[union-attr]
        killer = self.reactor.callLater(10, lambda: self.ended.called or self.transport.signalProcess("KILL"))  # type: ignore[union-attr]
        ended: defer.Deferred[None] = defer.Deferred()

        def done(result: None) -> None:
            if killer.active():
                killer.cancel()
            ended.callback(None)
            return result

        self.ended.addBoth(done)
        return ended


@defer.inlineCallbacks
def startH3Server(
    testCase: TestCase,
    cert: str,
    key: str,
    marker: str = "tp-h3-test-page",
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30,
    reactor: IProcessReactor | None = None,
) -> Any:
    """
    Start L{tpproxy.test.h3server} as a child process, stopped at
    C{testCase}'s cleanup, and wait until it listens (its first stdout line,
    an event, not a poll).

    @return: a L{Deferred} that fires with (port, L{H3ServerProcess}).
    """
    reactor = _reactor(reactor)
    portFile = Path(testCase.mktemp())
    portFile.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tpproxy.test.h3server", "--host", host, "--port", str(port), "--cert", cert, "--key", key, "--marker", marker, "--port-file", str(portFile)]
    process = H3ServerProcess(reactor)
    reactor.spawnProcess(process, argv[0], argv, env=cleanEnv(), childFDs={0: "w", 1: "r", 2: "r"})
    testCase.addCleanup(process.stop)
    listening = process.listening

    def late(f: Failure) -> Failure:
        f.trap(defer.TimeoutError)
        raise AssertionError(f"h3server did not listen within {timeout:g} s; its stderr ends:\n{process.stderr[-3000:]}")

    bound = yield listening.addTimeout(timeout, reactor).addErrback(late)
    if int(portFile.read_text()) != bound:
        raise AssertionError(f"h3server's port file says {portFile.read_text()!r}, its stdout {bound}")
    return bound, process
