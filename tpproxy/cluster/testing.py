"""
A real etcd for tests: one member on free loopback ports with a temporary
data directory, stopped (and its directory removed) at the test's cleanup.

It runs with a 10 ms heartbeat and a 100 ms election timeout, so that it
starts (elects itself) in about 0.1 s instead of about 1 s, and so that
its shortest lease TTL is 1 s (1.5 election timeouts, rounded up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import SkipTest, TestCase


def etcdBinary() -> str:
    """
    The etcd server program.  Missing, it skips the test, except under
    C{CI=true}, where a missing tool is an error.
    """
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if found:
        return found
    message = "etcd is not installed (bash .ci/run installs etcd-server)"
    if os.environ.get("CI") == "true":
        raise AssertionError(message + "; under CI=true a missing tool is an error")
    raise SkipTest(message)


def _freePorts(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def etcdAnswers(port: int) -> bool:
    """
    Does etcd on C{port} answer C{/health} with C{true}?  (Blocking, but
    on loopback with a short timeout.)
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return False
    return b'"health":"true"' in data


class EtcdServer:
    """
    A running etcd.

    @ivar url: its client URL, C{http://127.0.0.1:PORT}.
    @ivar dataDir: its data directory (kept across L{restart}).
    @ivar startSeconds: how long the last start took, until it answered.
    """

    def __init__(self, clock: IReactorTime, directory: str) -> None:
        self._clock = clock
        self.binary = etcdBinary()
        self.dataDir = os.path.join(directory, "data")
        self.logPath = os.path.join(directory, "etcd.log")
        self.clientPort, self.peerPort = _freePorts(2)
        self.url = f"http://127.0.0.1:{self.clientPort}"
        self.process: subprocess.Popen[bytes] | None = None
        self.startSeconds = 0.0

    @classmethod
    @defer.inlineCallbacks
    def start(cls, testCase: TestCase, clock: IReactorTime | None = None) -> Any:
        """
        Start an etcd for C{testCase}; stopped at its cleanup.
        """
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        directory = tempfile.mkdtemp(prefix="tp-etcd-")
        self = cls(clock, directory)
        testCase.addCleanup(shutil.rmtree, directory, True)
        testCase.addCleanup(self.stop)
        for attempt in range(3):
            try:
                yield self.run()
                return self
            except _PortTaken:
                self.clientPort, self.peerPort = _freePorts(2)
                self.url = f"http://127.0.0.1:{self.clientPort}"
        raise AssertionError("etcd found no free ports in 3 attempts")

    @defer.inlineCallbacks
    def run(self, timeout: float = 20) -> Any:
        """
        Start the process (on the same ports and data directory as before,
        if it ran already) and wait until it answers.
        """
        peer = f"http://127.0.0.1:{self.peerPort}"
        argv = [
            self.binary, "--name", "tp-test", "--data-dir", self.dataDir,
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"tp-test={peer}",
            "--heartbeat-interval", "10", "--election-timeout", "100",
            "--logger", "zap", "--log-level", "warn",
        ]
        began = self._clock.seconds()
        with open(self.logPath, "ab") as logFile:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logFile, stderr=logFile)
        while not etcdAnswers(self.clientPort):
            if self.process.poll() is not None:
                if b"address already in use" in self.log()[-4000:]:
                    raise _PortTaken()
                raise AssertionError(f"etcd exited with {self.process.returncode}:\n{self.log()[-3000:].decode('utf-8', 'replace')}")
            if self._clock.seconds() - began > timeout:
                raise AssertionError(f"etcd did not answer within {timeout} s:\n{self.log()[-3000:].decode('utf-8', 'replace')}")
            yield task.deferLater(self._clock, 0.02, lambda: None)
        self.startSeconds = self._clock.seconds() - began

    def log(self) -> bytes:
        with open(self.logPath, "rb") as f:
            return f.read()

    @defer.inlineCallbacks
    def stop(self, timeout: float = 10) -> Any:
        """
        Stop the process (SIGTERM, then SIGKILL after C{timeout}) and wait
        for its end.
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        began = self._clock.seconds()
        while process.poll() is None:
            if self._clock.seconds() - began > timeout:
                process.kill()
            yield task.deferLater(self._clock, 0.02, lambda: None)

    @defer.inlineCallbacks
    def restart(self) -> Any:
        yield self.stop()
        yield self.run()


class _PortTaken(Exception):
    pass
