"""
Tests for L{tpproxy.logbridge}: aioquic's C{logging} records go to
C{twisted.logger} at debug level, not to standard error.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy import logbridge
from tpproxy.test.support import Background, deferLater, freePort, run, tpCommand, twistCommand, waitForPort
from tpproxy.testing import TestPKI, loopbackServerTOML


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.handler = logbridge.install()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        # Whatever still reaches the standard library's last resort (which
        # writes to stderr) shows here.
        self.lastResort: list[logging.LogRecord] = []
        catcher = logging.Handler()
        catcher.emit = self.lastResort.append  # type: ignore[method-assign]
        saved = logging.lastResort
        logging.lastResort = catcher
        self.addCleanup(setattr, logging, "lastResort", saved)

    def test_installOnce(self) -> None:
        """
        L{logbridge.install} gives aioquic's loggers one handler, the same
        on every call, and stops them propagating.
        """
        self.assertIs(logbridge.install(), self.handler)
        for name in ("quic", "http3"):
            stdlib = logging.getLogger(name)
            self.assertEqual([h for h in stdlib.handlers if isinstance(h, logbridge.TwistedLoggerHandler)], [self.handler])
            self.assertFalse(stdlib.propagate)

    def test_warningBecomesDebugEvent(self) -> None:
        """
        A warning of aioquic (as its connection logs a peer's close) is a
        debug event in the logger's namespace, with the formatted text, and
        nothing reaches the last resort handler.
        """
        adapter = logging.LoggerAdapter(logging.getLogger("quic"), {})
        adapter.warning("[%s] Error: %d, reason: %s", "95fa", 298, "certificate not accepted")
        [event] = [e for e in self.events if e.get("log_namespace") == "quic"]
        self.assertIs(event["log_level"], LogLevel.debug)
        self.assertEqual(event["text"], "[95fa] Error: 298, reason: certificate not accepted")
        self.assertEqual(event["stdlib_level"], "WARNING")
        self.assertEqual(self.lastResort, [])

    def test_badFormat(self) -> None:
        """
        A record whose arguments do not fit its format is still logged.
        """
        logging.getLogger("http3").warning("%d items", "x")
        [event] = [e for e in self.events if e.get("log_namespace") == "http3"]
        self.assertIn("%d items", event["text"])


@defer.inlineCallbacks
def waitForOutput(process: Background, marker: bytes, timeout: float = 30) -> Any:
    """
    Wait until C{marker} is in what C{process} wrote on stdout (where
    C{twist} writes its log).
    """
    deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
    while marker not in b"".join(process.proto.out):
        if reactor.seconds() > deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{marker!r} not in the output after {timeout} s: {b''.join(process.proto.out)!r}")
        yield deferLater(0.05)


class RefusedOverQuicTests(TestCase):
    """
    A real C{tp connect} refused in the QUIC handshake by a real C{twist
    tp}: aioquic's log lines appear on neither side's stderr.
    """

    timeout = 120

    @defer.inlineCallbacks
    def refused(self, cert: str, key: str, ca: str) -> Any:
        """
        Run C{twist tp} (of a fresh PKI) and one C{tp connect --transport
        quic} with C{cert}, C{key} and C{ca}, which fails in the handshake.
        The client prints at most its status line and then the one line
        saying why it failed (docs/client.md), no aioquic C{Error: 298}
        line; the server's log has no C{stderr} lines.
        """
        port = freePort()
        path = self.pki.directory / "server.toml"
        path.write_text(loopbackServerTOML(port))
        client = self.pki.directory / "client.toml"
        client.write_text(f'server = "localhost:{port}"\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n')
        server = Background(self, twistCommand() + ["--log-format=text", "tp", "--config", str(path)])
        yield waitForPort(port)
        result = yield run(tpCommand() + ["--config", str(client), "--transport", "quic", "connect", f"127.0.0.1:{port}"], stdin=b"")
        self.assertNotEqual(result.status, 0, result)
        self.assertNotIn(b"Error: 298", result.err)
        # At most the status line (printed once TP answered the handshake),
        # then exactly one line saying why.
        *status, reason = result.err.decode().splitlines()
        self.assertTrue(reason.startswith("tp: "), result)
        self.assertLessEqual(len(status), 1, result)
        for line in status:
            self.assertTrue(line.startswith(f"Connecting to 127.0.0.1:{port} via "), result)
        # The server logs the audit event of the failed handshake after
        # aioquic's own record of the close.
        yield waitForOutput(server, b"handshake_failed")
        output = b"".join(server.proto.out) + server.stderr
        self.assertNotIn(b"stderr#", output, output.decode(errors="replace"))
        self.assertNotIn(b"Error: 298", output)

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.other = TestPKI.create(self.mktemp())

    def test_serverRefusesClient(self) -> Any:
        """
        A client certificate of another CA: the server closes with error
        298 (bad_certificate).

        Regression (was missing: nothing routed aioquic's C{logging}
        records): the server logged aioquic's C{[f275...] Error: 298,
        reason: ...} as C{[stderr#error]}.
        """
        self.other.client("alice")
        d = self.other.directory
        return self.refused(str(d / "alice.pem"), str(d / "alice.key"), self.pki.caPath)

    def test_clientRefusesServer(self) -> Any:
        """
        The client does not trust the server's certificate.

        Regression (was missing: nothing routed aioquic's C{logging}
        records): the client printed aioquic's C{[95fa...] Error: 298,
        reason: ...} on stderr between its status line and its reason.
        """
        self.pki.client("alice")
        d = self.pki.directory
        return self.refused(str(d / "alice.pem"), str(d / "alice.key"), self.other.caPath)
