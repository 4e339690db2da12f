"""
TP.js in a real browser (issue 15): headless Chromium, with the test's
client certificate in its NSS database and selected by policy, loads a
page from TP's TLS port, mints a token there, opens a WebTransport session
on TP's QUIC port and runs tunnels through it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.trial.unittest import TestCase

from tpproxy.pki import loadCertificates, loadKey
from tpproxy.service import makeQuicListener, makeServerFactory
from tpproxy.test.browser import autoSelectCertificate, makeBrowserProfile, openPage
from tpproxy.test.support import Echo, auditObserver, audits, freePort, listenLocal
from tpproxy.testing import TestPKI
from tpproxy.web.site import STATIC, makeSite

PAGES = Path(__file__).parent / "webpages"


def xorshift(size: int, seed: int) -> bytes:
    """
    The test page's pattern (wttest.html), recomputed.
    """
    out = bytearray(size)
    x = seed or 1
    for i in range(size):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


class DNSResponder(DatagramProtocol):
    """
    Answers every A query with 192.0.2.53, echoing its id and question.
    """

    def __init__(self) -> None:
        self.queries = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.queries += 1
        question = data[12:]
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 53])
        self.transport.write(data[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer, addr)  # type: ignore[union-attr]


class Sink(Protocol):
    """
    Counts what it gets; answers C{"got N"} when the client is done.
    """

    def connectionMade(self) -> None:
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(f"got {self.count}".encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class BrowserTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.pki = TestPKI.create(self.mktemp())
        certPath, keyPath = self.pki.client("alice")
        self.port = freePort()
        rules = [
            {"identities": "alice", "hosts": ["127.0.0.1"], "ports": "*", "transports": ["tcp", "udp"]},
        ]
        config = self.pki.serverConfig(
            rules, listen=f"tcp:{self.port}:interface=127.0.0.1", quic=[f"127.0.0.1:{self.port}"], webtransport={}
        )
        # The page comes over TCP from "localhost"; WebTransport goes to
        # 127.0.0.1, the origin QUIC is forced for (which makes Chromium
        # accept the test CA on QUIC, and would also force the page itself
        # onto HTTP/3, where TP asks for no client certificate).
        self.origin = f"https://localhost:{self.port}"
        self.wt = f"https://127.0.0.1:{self.port}/tp"
        factory = makeServerFactory(config, reactor)
        tp = factory.wrappedFactory
        self.tp = tp
        static = Path(self.mktemp())
        shutil.copytree(STATIC, static)
        shutil.copy(PAGES / "wttest.html", static / "wttest.html")
        tp.web = makeSite(tp.gate, reactor, str(static))
        tcp = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        self.quic = makeQuicListener(config, reactor, tp)
        udp = reactor.listenUDP(self.port, self.quic, interface="127.0.0.1")

        def stop() -> Any:
            for proto in list(factory.protocols):
                proto.transport.abortConnection()
            return defer.gatherResults([defer.maybeDeferred(tcp.stopListening), defer.maybeDeferred(udp.stopListening)])

        self.addCleanup(stop)
        d = self.pki.directory
        self.home = yield makeBrowserProfile(
            Path(self.mktemp()), self.pki.ca.certPEM, loadCertificates(certPath)[0], loadKey(keyPath), self.pki.ca.cert
        )
        autoSelectCertificate(self, self.origin)
        self.audits = auditObserver(self)

    def page(self, *steps: dict[str, Any]) -> Any:
        plan = quote(json.dumps({"steps": list(steps), "wt": self.wt}))
        return openPage(self, f"{self.origin}/tp/wttest.html#{plan}", self.home, (f"127.0.0.1:{self.port}",))

    @defer.inlineCallbacks
    def test_echoOneMegabyte(self) -> Any:
        """
        A page mints a token with its client certificate, opens a session,
        and moves 1 MiB each way through a TCP tunnel to an echo server:
        the same bytes come back (SHA-256 in the page and here).  The
        tunnel is audited as alice's, via webtransport.
        """
        echoPort, echo = listenLocal(self, Echo)
        size = 1024 * 1024
        page = self.page({"do": "mint"}, {"do": "connect"}, {"do": "echo", "host": "127.0.0.1", "port": echoPort, "size": size, "seed": 11})
        minted = yield page.waitFor(lambda r: r.get("do") == "mint")
        self.assertEqual(minted.get("identity"), "alice", minted)
        result = yield page.waitFor(lambda r: r.get("do") == "echo")
        expected = hashlib.sha256(xorshift(size, 11)).hexdigest()
        self.assertEqual((result.get("sent"), result.get("received")), (size, size), result)
        self.assertEqual(result["sentSha"], expected)
        self.assertEqual(result["receivedSha"], expected)
        self.assertEqual(result["address"], "127.0.0.1")
        self.assertEqual(echo.accepted, 1)
        self.assertEqual(self.quic.webtransportSessions.get("accepted"), 1)
