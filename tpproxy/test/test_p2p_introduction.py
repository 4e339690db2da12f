"""
The P2P introduction in TP's protocol (issue 16, docs/p2p.md), over real
TLS on 127.0.0.1: a dialer's connect to an E2E name with an ICE offer,
the exposer told of it with the dialer's certificate, its answer passed
back with the exposer's certificate; and each case where TP must not
introduce.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from twisted.internet import defer, protocol, reactor

from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint
from tpproxy.test.support import audits
from tpproxy.test.test_reverse import ControlClient, ReverseTestCase
from tpproxy.test.test_workers import waitFor
from tpproxy.wire import ClientHello

NAME = "bob.localhost"
OFFER = {"ufrag": "AbCd", "pwd": "0123456789abcdefghijkl", "candidates": ["1 1 UDP 2130706431 10.1.0.2 40000 typ host"]}
ANSWER = {"ufrag": "WxYz", "pwd": "lkjihgfedcba9876543210", "candidates": ["1 1 UDP 1694498815 198.51.100.2 50000 typ srflx raddr 10.2.0.2 rport 50000"]}


class P2PTestCase(ReverseTestCase):
    """
    bob exposes bob.localhost; alice may dial it; carol may not.
    """

    p2p = True

    def setUp(self) -> None:
        super().setUp()
        self.pki.client("carol")
        rule = {"identities": ["bob"], "names": NAME, "dialers": ["alice"], "p2p": self.p2p}
        self.startWithExposures([rule])

    @defer.inlineCallbacks
    def connect(self, who: str, hello: ClientHello) -> Any:
        endpoint = TLSClientEndpoint(reactor, ServerAddress("localhost", self.port), self.tlsOptions(who))
        client = yield endpoint.connect(protocol.Factory.forProtocol(lambda: ControlClient(hello)))
        self.addCleanup(lambda: client.lost.called or client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def expose(self, offers: bool = True) -> Any:
        control = yield self.connect("bob", ClientHello("listen", mode="e2e", name=NAME, p2p=True if offers else None))
        answer = yield control.answer
        self.assertTrue(answer.ok, answer)
        return control

    def certificate(self, who: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.pki.directory / f"{who}.pem").read_bytes())


class IntroductionTests(P2PTestCase):
    @defer.inlineCallbacks
    def test_introduced(self) -> Any:
        """
        alice's offer and certificate reach bob; bob's answer (on an accept
        of the session) and certificate reach alice; both connections end;
        alice's audit event says p2p, with both identities.
        """
        control = yield self.expose()
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        event = yield control.incoming.get().addTimeout(10, reactor)
        self.assertEqual(event["identity"], "alice")
        told = event["p2p"]
        self.assertEqual({k: told[k] for k in OFFER}, OFFER)
        self.assertEqual(x509.load_pem_x509_certificate(told["certificate"].encode()), self.certificate("alice"))
        accept = yield self.connect("bob", ClientHello("accept", session=event["session"], p2p=ANSWER))
        self.assertTrue((yield accept.answer).ok)
        hello = yield dialer.answer
        self.assertTrue(hello.ok, hello)
        p2p = hello.info["p2p"]
        self.assertEqual({k: p2p[k] for k in ANSWER}, ANSWER)
        self.assertEqual((p2p["identity"], p2p["session"]), ("bob", event["session"]))
        self.assertEqual(x509.load_pem_x509_certificate(p2p["certificate"].encode()), self.certificate("bob"))
        yield dialer.lost
        yield accept.lost
        yield waitFor(lambda: any(e.get("event") == "connect" for e in audits(self.observer)))
        events = [e for e in audits(self.observer) if e.get("event") == "connect"]
        self.assertEqual([(e["identity"], e["result"]) for e in events], [("alice", "p2p")])
        self.assertIn("introduced to bob", events[0]["detail"])
        self.assertEqual(self.factory.wrappedFactory.p2p["introduced"], 1)

    @defer.inlineCallbacks
    def test_notADialer(self) -> Any:
        """
        carol is not among the exposure's dialers: refused as any dial
        would be; bob hears nothing.
        """
        control = yield self.expose()
        dialer = yield self.connect("carol", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        hello = yield dialer.answer
        self.assertEqual(hello.code, "forbidden")
        self.assertIn("carol is not among the dialers", hello.message)
        self.assertEqual(len(control.incoming.pending), 0)
        self.assertEqual(self.factory.wrappedFactory.registry.sessions, {})

    @defer.inlineCallbacks
    def test_exposerDeclines(self) -> Any:
        """
        An accept without an answer: alice gets not_accepted and dials
        again without P2P.
        """
        control = yield self.expose()
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        event = yield control.incoming.get().addTimeout(10, reactor)
        accept = yield self.connect("bob", ClientHello("accept", session=event["session"]))
        yield accept.answer
        hello = yield dialer.answer
        self.assertEqual(hello.code, "not_accepted")
        self.assertIn("declined", hello.message)
        self.assertEqual(self.factory.wrappedFactory.p2p["declined"], 1)

    @defer.inlineCallbacks
    def test_exposerDidNotOffer(self) -> Any:
        """
        An exposer that did not offer P2P is never introduced: alice's dial
        goes on as a relayed E2E dial (answered at once, no p2p), and bob
        hears of no introduction.
        """
        control = yield self.expose(offers=False)
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        hello = yield dialer.answer
        self.assertTrue(hello.ok, hello)
        self.assertNotIn("p2p", hello.info)
        self.assertEqual(hello.info.get("e2e"), NAME)
        self.assertEqual(len(control.incoming.pending), 0)

    @defer.inlineCallbacks
    def test_malformedOffer(self) -> Any:
        """
        An offer that does not parse is a bad request.
        """
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p={"ufrag": "x", "pwd": "y", "candidates": []}))
        hello = yield dialer.answer
        self.assertEqual(hello.code, "bad_request")
        self.assertIn("ufrag", hello.message)

    @defer.inlineCallbacks
    def test_malformedP2PFields(self) -> Any:
        """
        A listen whose p2p is not a boolean, and a connect whose p2p_failed
        is not a session id, are bad requests.
        """
        from tpproxy.wire import encodeFrame

        class RawHello:
            def __init__(self, obj: dict[str, Any]) -> None:
                self.obj = obj

            def toFrame(self) -> bytes:
                return encodeFrame(self.obj)

        for obj, field in (
            ({"v": 1, "op": "listen", "mode": "e2e", "name": NAME, "p2p": "yes"}, "p2p"),
            ({"v": 1, "op": "connect", "host": NAME, "port": 22, "p2p_failed": "x"}, "p2p_failed"),
        ):
            client = yield self.connect("bob" if obj["op"] == "listen" else "alice", RawHello(obj))  # type: ignore[arg-type]
            answer = yield client.answer
            self.assertEqual(answer.code, "bad_request", obj)
            self.assertIn(field, answer.message)

    @defer.inlineCallbacks
    def test_madeUpFallbackNotCounted(self) -> Any:
        """
        A relayed dial naming a P2P session TP never introduced is served
        as usual, and not counted as a fallback.
        """
        yield self.expose()
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2pFailed="A" * 32))
        hello = yield dialer.answer
        self.assertTrue(hello.ok, hello)
        self.assertEqual(self.factory.wrappedFactory.p2p["fell_back"], 0)


class NotAllowedTests(P2PTestCase):
    """
    The exposure rule says p2p = false: never introduced, whatever the
    exposer offers.
    """

    p2p = False

    @defer.inlineCallbacks
    def test_ruleForbidsP2P(self) -> Any:
        control = yield self.expose()
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        hello = yield dialer.answer
        self.assertTrue(hello.ok, hello)
        self.assertNotIn("p2p", hello.info)
        self.assertEqual(len(control.incoming.pending), 0)
