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
from twisted.internet.protocol import DatagramProtocol, Protocol
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
    """
    TP's own certificate on WebTransport too (C{certificate_hashes =
    false}), from a private CA that the browser trusts in its NSS database
    and, for QUIC, for an origin given to C{--origin-to-force-quic-on}.
    """

    timeout = 180
    #: webtransport.certificate_hashes
    hashes = False

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.pki = TestPKI.create(self.mktemp())
        certPath, keyPath = self.pki.client("alice")
        self.port = freePort()
        rules = [
            {"identities": "alice", "hosts": ["127.0.0.1"], "ports": "*", "transports": ["tcp", "udp"]},
        ]
        config = self.pki.serverConfig(
            rules, listen=f"tcp:{self.port}:interface=127.0.0.1", quic=[f"127.0.0.1:{self.port}"],
            webtransport={"certificate_hashes": self.hashes},
        )
        # The page comes over TCP from "localhost"; WebTransport goes to
        # 127.0.0.1, the origin QUIC is forced for (which makes Chromium
        # accept the test CA on QUIC, and would also force the page itself
        # onto HTTP/3, where TP asks for no client certificate).
        self.origin = f"https://localhost:{self.port}"
        self.wt = f"https://127.0.0.1:{self.port}/tp"
        factory = self.factory = makeServerFactory(config, reactor)
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
        self.home = yield makeBrowserProfile(
            Path(self.mktemp()), self.pki.ca.certPEM, loadCertificates(certPath)[0], loadKey(keyPath), self.pki.ca.cert
        )
        autoSelectCertificate(self, self.origin)
        self.audits = auditObserver(self)

    def page(self, *steps: dict[str, Any]) -> Any:
        plan = quote(json.dumps({"steps": list(steps), "wt": self.wt, "hashes": self.hashes}))
        forced = () if self.hashes else (f"127.0.0.1:{self.port}",)
        return openPage(self, f"{self.origin}/tp/wttest.html#{plan}", self.home, forced)

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

    @defer.inlineCallbacks
    def test_forbidden(self) -> Any:
        """
        A destination the policy does not allow alice: the page gets a
        TPError with code C{forbidden} and TP's own message; the refusal is
        audited as alice's, via webtransport.
        """
        page = self.page({"do": "mint"}, {"do": "connect"}, {"do": "tcp", "host": "127.0.0.2", "port": 22})
        result = yield page.waitFor(lambda r: r.get("do") == "tcp")
        self.assertEqual(result.get("error"), "forbidden", result)
        self.assertIn("alice", result["message"])
        self.assertIn("127.0.0.2", result["message"])
        refused = [e for e in audits(self.audits) if e.get("via") == "webtransport"]
        self.assertEqual([(e["identity"], e["result"]) for e in refused], [("alice", "forbidden")])

    @defer.inlineCallbacks
    def test_refusedTokens(self) -> Any:
        """
        No token, an expired one, a replayed one, one for another origin
        and one signed with another key: each session is refused before
        anything is served (no tunnel is audited; the page never got a
        session to open a stream on), and TP counts each reason.  A fresh
        token still works after.
        """
        from cryptography.hazmat.primitives.asymmetric import ec

        from tpproxy import webtoken

        gate = self.tp.gate
        cert = loadCertificates(str(self.pki.directory / "alice.pem"))[0]
        now = reactor.seconds()
        expired = webtoken.mint(gate.keys()[0], cert, self.origin, now - 120, 30)
        otherOrigin = webtoken.mint(gate.keys()[0], cert, "https://other.example", now, 30)
        otherKey = webtoken.mint(webtoken.tokenKey(ec.generate_private_key(ec.SECP256R1())), cert, self.origin, now, 30)
        page = self.page(
            {"do": "connect", "token": ""},
            {"do": "connect", "token": expired},
            {"do": "connect", "token": otherOrigin},
            {"do": "connect", "token": otherKey},
            {"do": "mint"},
            {"do": "connect"},
            {"do": "close"},
            {"do": "connect"},
            {"do": "mint"},
            {"do": "connect"},
            {"do": "tcp", "host": "127.0.0.1", "port": listenLocal(self, Echo)[0]},
        )
        yield page.waitFor(lambda r: r.get("done"))
        connects = [r for r in page.results if r.get("do") == "connect"]
        self.assertEqual([r.get("connected", r.get("error")) for r in connects], ["session_refused"] * 4 + [True, "session_refused", True], connects)
        self.assertEqual(
            self.quic.webtransportSessions,
            {"no_token": 1, "expired": 1, "wrong_audience": 1, "bad_signature": 1, "accepted": 2, "replayed": 1},
        )
        tunnels = [e for e in audits(self.audits) if e.get("via") == "webtransport"]
        self.assertEqual([(e["identity"], e["result"]) for e in tunnels], [("alice", "ok")])
        # What an operator scrapes says the same.
        from prometheus_client import generate_latest

        from tpproxy.limits import HalfOpenCounter
        from tpproxy.service import makeMetrics

        text = generate_latest(makeMetrics(reactor, self.factory, HalfOpenCounter(10, 10), [self.quic]).registry).decode()
        for line in (
            'tp_webtransport_sessions_total{result="accepted"} 2.0',
            'tp_webtransport_sessions_total{result="replayed"} 1.0',
            'tp_webtransport_sessions_total{result="expired"} 1.0',
            'tp_webtransport_tokens_total{result="minted"} 2.0',
        ):
            self.assertIn(line, text)

    @defer.inlineCallbacks
    def test_dnsOverUDP(self) -> Any:
        """
        A UDP flow from the page: a DNS query through TP to a resolver on
        loopback, in WebTransport datagrams, and its answer back.
        """
        dns = DNSResponder()
        port = reactor.listenUDP(0, dns, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        page = self.page({"do": "mint"}, {"do": "connect"}, {"do": "dns", "host": "127.0.0.1", "port": port.getHost().port, "name": "example.test"})
        result = yield page.waitFor(lambda r: r.get("do") == "dns")
        self.assertEqual((result.get("id"), result.get("answers"), result.get("address")), (True, 1, "192.0.2.53"), result)
        self.assertEqual(dns.queries, 1)


class HashedCertificateTests(TestCase):
    """
    The default: browsers' HTTP/3 gets a short-lived certificate of TP's
    own, whose hash the page receives with its token; no browser flag, and
    the page and WebTransport on one origin.
    """

    timeout = 180
    hashes = True
    setUp = BrowserTests.setUp
    page = BrowserTests.page

    @defer.inlineCallbacks
    def test_echoOverHashedCertificate(self) -> Any:
        """
        Chromium accepts TP's WebTransport certificate by the hash the
        token endpoint gave, and 256 KiB go through and back.
        """
        echoPort, echo = listenLocal(self, Echo)
        page = self.page({"do": "mint"}, {"do": "connect"}, {"do": "echo", "host": "127.0.0.1", "port": echoPort, "size": 256 * 1024, "seed": 5})
        result = yield page.waitFor(lambda r: r.get("do") == "echo")
        expected = hashlib.sha256(xorshift(256 * 1024, 5)).hexdigest()
        self.assertEqual((result.get("sentSha"), result.get("receivedSha")), (expected, expected), page.results)
        served = self.tp.gate.certificate.current()[0][0]
        self.assertEqual(served.subject.rfc4514_string(), "CN=TP WebTransport")
        self.assertLessEqual((served.not_valid_after_utc - served.not_valid_before_utc).days, 14)


class SSHDemoTests(TestCase):
    """
    The SSH demo TP serves (issue 15): SSH in the page, over a TP tunnel
    through WebTransport, to a real OpenSSH server.
    """

    timeout = 180
    hashes = True
    setUp = BrowserTests.setUp

    def demo(self, sshd: Any, **fields: str) -> Any:
        from tpproxy.test.browser import openPage

        fragment = "&".join(f"{name}={quote(value, safe='')}" for name, value in {"url": self.wt, "autoconnect": "1", **fields}.items())
        return openPage(self, f"{self.origin}/tp/ssh.html#{fragment}", self.home, prefix="TP-DEMO")

    @defer.inlineCallbacks
    def test_sshEchoHello(self) -> Any:
        """
        The demo logs in to sshd with the user's ECDSA key, after checking
        the host key against the fingerprint ssh-keygen gives, runs C{echo
        hello} in a shell, and C{hello} appears on its own line of the
        terminal.  TP saw one tunnel, alice's, via webtransport.
        """
        from tpproxy.test.support import SSHD, requireTool, run

        sshd = yield SSHD.start(self, keyType="ecdsa")
        # Before sshd stops: end the tunnel (a killed browser sends no
        # CONNECTION_CLOSE, and sshd's session would wait for TP's idle timeout).
        self.addCleanup(lambda: [p.transport.abortConnection() for p in list(self.tp.live)])
        keygen = requireTool("ssh-keygen")
        listed = yield run([keygen, "-lf", str(sshd.dir / "host.pub")])
        fingerprint = listed.out.split()[1].decode()
        self.assertTrue(fingerprint.startswith("SHA256:"), listed)
        page = self.demo(
            sshd, host="127.0.0.1", port=str(sshd.port), user=sshd.user, key=(sshd.dir / "user").read_text(), hostkey=fingerprint, run="echo hello",
        )
        screen = yield page.waitFor(lambda r: r.get("event") == "error" or (r.get("event") == "screen" and "hello" in r.get("lines", [])), timeout=90)
        self.assertEqual(screen.get("event"), "screen", page.results)
        hostkey = [r for r in page.results if r.get("event") == "hostkey"]
        self.assertEqual(hostkey[0].get("fingerprint"), fingerprint, hostkey)
        self.assertTrue(any(r.get("event") == "authenticated" for r in page.results), page.results)
        tunnels = [e for e in audits(self.audits) if e.get("via") == "webtransport"]
        self.assertLessEqual(len(tunnels), 1)
        self.assertEqual([(t.identity.name, t.hello.port) for t in self.tp.live if t.hello is not None], [("alice", sshd.port)])

    @defer.inlineCallbacks
    def test_forbiddenInTheDemo(self) -> Any:
        """
        A destination the policy forbids: the demo shows TP's code and
        message.
        """
        page = self.demo(None, host="127.0.0.2", port="22", user="nobody", password="x")
        error = yield page.waitFor(lambda r: r.get("event") == "error", timeout=60)
        self.assertEqual(error.get("code"), "forbidden", error)
        self.assertIn("127.0.0.2", error.get("message", ""))
