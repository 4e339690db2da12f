"""
Red-team tests of P2P (issue 16, docs/p2p.md): each test is one attack on
the introduction or the direct path, and fails if the defence it names is
taken away.

  - In TP's protocol, over real TLS and QUIC on 127.0.0.1
    (L{IntroductionAttackTests}, L{QuicAttackTests}): a dialer TP would not
    relay, a foreign exposer claiming a session, replayed and late accepts,
    malformed and oversize offers and answers, fields smuggled into an
    offer or an answer, exposers and rules that must not introduce, and
    exactly what each side is told.
  - On the direct path, with two ICE agents as child processes on this
    machine's address (L{DirectPathAttackTests}): a peer on the path with
    another certificate, and one datagram from anyone who can reach the
    exposer's candidate, must not cost the vouched dialer its connection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy import wire
from tpproxy.p2p import ice
from tpproxy.p2p.direct import newSessionId
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.service import makeQuicListener
from tpproxy.test.support import closeAtEnd
from tpproxy.test.test_p2p_ice import Agent, requireHostAddress
from tpproxy.test.test_p2p_introduction import ANSWER, NAME, OFFER, P2PTestCase, waitFor
from tpproxy.test.test_cluster import ThreeInstances
from tpproxy.test.test_reverse import ControlClient
from tpproxy.testing import TestPKI
from tpproxy.transports.quic import clientConfiguration, connectQuic
from tpproxy.wire import ClientHello

ANSWER2 = {"ufrag": "Qrst", "pwd": "ZYXWVUTSRQPONMLKJIHGFE", "candidates": ["1 1 UDP 2130706431 10.9.0.9 9999 typ host"]}
OFFER2 = {"ufrag": "Efgh", "pwd": "abcdefghijklmnopqrstuv", "candidates": ["1 1 UDP 2130706431 10.8.0.8 8888 typ host"]}

#: Offers (and answers) TP must refuse with bad_request, and why.
BAD_OFFERS: list[tuple[str, Any]] = [
    ("not an object", ["AbCd", "0123456789abcdefghijkl", []]),
    ("a string", "AbCd 0123456789abcdefghijkl"),
    ("true", True),
    ("false", False),
    ("a number", 7),
    ("empty", {}),
    ("ufrag too short", dict(OFFER, ufrag="abc")),
    ("ufrag too long", dict(OFFER, ufrag="a" * 257)),
    ("ufrag not ICE characters", dict(OFFER, ufrag="Ab Cd")),
    ("ufrag non-ASCII", dict(OFFER, ufrag="Abcdé")),
    ("ufrag not a string", dict(OFFER, ufrag=1234)),
    ("pwd too short", dict(OFFER, pwd="0123456789abcdefghijk")),
    ("pwd too long", dict(OFFER, pwd="p" * 257)),
    ("pwd with a quote", dict(OFFER, pwd='0123456789abcdefghijk"')),
    ("candidates not a list", dict(OFFER, candidates="1 1 UDP 1 10.0.0.1 1 typ host")),
    ("candidates missing", {"ufrag": OFFER["ufrag"], "pwd": OFFER["pwd"]}),
    ("too many candidates", dict(OFFER, candidates=OFFER["candidates"] * (wire.MAX_CANDIDATES + 1))),
    ("a candidate too long", dict(OFFER, candidates=["1" * (wire.MAX_CANDIDATE + 1)])),
    ("an empty candidate", dict(OFFER, candidates=[""])),
    ("a non-ASCII candidate", dict(OFFER, candidates=["1 1 UDP 2130706431 10.1.0.2 40000 typ hôst"])),
    ("a candidate with a newline", dict(OFFER, candidates=["1 1 UDP 2130706431 10.1.0.2 40000 typ host\r\na=inject"])),
    ("a candidate with a NUL", dict(OFFER, candidates=["1 1 UDP 2130706431 10.1.0.2 40000 typ host\x00"])),
    ("a candidate not a string", dict(OFFER, candidates=[{"host": "10.1.0.2"}])),
    ("a nested list", dict(OFFER, candidates=[["1 1 UDP 2130706431 10.1.0.2 40000 typ host"]])),
]


def _pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.PEM).decode("ascii")


class AttackTestCase(P2PTestCase):
    """
    bob exposes bob.localhost with P2P allowed; alice may dial it; carol
    may reach the name by policy but is not among its dialers; mallory
    is another identity of the same CA (an exposer elsewhere).
    """

    @defer.inlineCallbacks
    def assertOrdinaryE2E(self, dialer: Any, control: Any) -> Any:
        """
        C{dialer}'s P2P dial got an ordinary E2E answer, exactly
        C{{"e2e": NAME}}; the exposer on C{control} was asked nothing, and
        TP made no session and counted no introduction.
        """
        hello = yield dialer.answer
        self.assertEqual((hello.ok, hello.info), (True, {"e2e": NAME}))
        self.assertEqual(len(control.incoming.pending), 0)
        self.assertEqual(self.tp.registry.sessions, {})
        self.assertEqual(sum(self.tp.p2p.values()), 0)

    @property
    def tp(self) -> Any:
        return self.factory.wrappedFactory

    @defer.inlineCallbacks
    def introduce(self, control: Any, who: str = "alice", offer: dict[str, Any] = OFFER) -> Any:
        """
        C{who} dials with C{offer}: the dialer's connection, and the
        C{incoming} event bob's control connection got for it.
        """
        dialer = yield self.connect(who, ClientHello("connect", host=NAME, port=22, p2p=offer))
        event = yield control.incoming.get().addTimeout(10, reactor)
        return dialer, event

    @defer.inlineCallbacks
    def accept(self, who: str, session: str, answer: Any = ANSWER) -> Any:
        """
        C{who} accepts C{session} with C{answer}: TP's answer to it.
        """
        end = yield self.connect(who, ClientHello("accept", session=session, p2p=answer))
        hello = yield end.answer
        yield end.lost.addTimeout(10, reactor)
        return hello

    def assertIntroducedTo(self, hello: Any, session: str, exposer: str, answer: dict[str, Any]) -> None:
        self.assertTrue(hello.ok, hello)
        p2p = hello.info["p2p"]
        self.assertEqual((p2p["session"], p2p["identity"]), (session, exposer))
        self.assertEqual(x509.load_pem_x509_certificate(p2p["certificate"].encode()), self.certificate(exposer))
        self.assertEqual({k: p2p[k] for k in answer}, answer)


class IntroductionAttackTests(AttackTestCase):
    @defer.inlineCallbacks
    def test_foreignExposerCannotAccept(self) -> Any:
        """
        mallory learned alice's P2P session id and accepts it with her own
        ICE answer: refused like an unknown id (bad_session), alice is told
        nothing, the session stays bob's, and bob's accept still introduces
        alice to bob (never to mallory).
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        refused = yield self.accept("mallory", event["session"], ANSWER2)
        self.assertEqual((refused.ok, refused.code, refused.message), (False, "bad_session", "unknown session"))
        self.assertFalse(dialer.answer.called)
        self.assertIn(event["session"], self.tp.registry.sessions)
        accepted = yield self.accept("bob", event["session"])
        self.assertTrue(accepted.ok, accepted)
        hello = yield dialer.answer
        self.assertIntroducedTo(hello, event["session"], "bob", ANSWER)
        self.assertEqual(self.tp.p2p["introduced"], 1)

    @defer.inlineCallbacks
    def test_replayedAccept(self) -> Any:
        """
        The session's one accept introduced alice: the same accept again
        (bob replaying it, with another answer) is refused as used, and
        alice's connection is already closed with the first answer.
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        self.assertTrue((yield self.accept("bob", event["session"])).ok)
        hello = yield dialer.answer
        self.assertIntroducedTo(hello, event["session"], "bob", ANSWER)
        yield dialer.lost
        again = yield self.accept("bob", event["session"], ANSWER2)
        self.assertEqual((again.ok, again.code, again.message), (False, "bad_session", "session is used"))
        self.assertEqual(self.tp.p2p["introduced"], 1)

    @defer.inlineCallbacks
    def test_acceptAfterDialerLeft(self) -> Any:
        """
        alice gave up before bob answered: TP notices at once (not at the
        accept timeout), so bob's late accept is refused (the session is
        spent) and nobody is introduced or audited as such.
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        dialer.transport.loseConnection()
        yield dialer.lost
        # Well within the accept timeout, which would spend it as expired.
        self.assertEqual(self.config.acceptTimeout, 10)
        yield waitFor(lambda: event["session"] not in self.tp.registry.sessions, timeout=5)
        late = yield self.accept("bob", event["session"])
        self.assertEqual((late.ok, late.code, late.message), (False, "bad_session", "session is dialer left"))
        self.assertEqual(self.tp.p2p["introduced"], 0)


    @defer.inlineCallbacks
    def test_malformedOffersOnConnect(self) -> Any:
        """
        Each malformed or oversize offer on a connect is a bad_request
        naming the p2p field: bob hears of none of them, no session is
        made, nothing is counted as an introduction.
        """
        control = yield self.expose()
        for why, offer in BAD_OFFERS:
            dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=offer))
            hello = yield dialer.answer
            self.assertEqual(hello.code, "bad_request", f"{why}: {hello}")
            self.assertIn("'p2p", hello.message, why)
            yield dialer.lost
        self.assertEqual(len(control.incoming.pending), 0)
        self.assertEqual(self.tp.registry.sessions, {})
        self.assertEqual(sum(self.tp.p2p.values()), 0)

    @defer.inlineCallbacks
    def test_malformedAnswersOnAccept(self) -> Any:
        """
        Each malformed or oversize answer on bob's accept is a bad_request
        that does not spend the session: alice is told nothing until bob's
        well-formed accept, which still introduces her.
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        for why, answer in BAD_OFFERS:
            if answer is False:
                continue  # p2p false on an accept: see test_acceptP2PFalse
            hello = yield self.accept("bob", event["session"], answer)
            self.assertEqual(hello.code, "bad_request", f"{why}: {hello}")
            self.assertIn("'p2p", hello.message, why)
        self.assertFalse(dialer.answer.called)
        self.assertTrue((yield self.accept("bob", event["session"])).ok)
        self.assertIntroducedTo((yield dialer.answer), event["session"], "bob", ANSWER)

    @defer.inlineCallbacks
    def test_acceptP2PFalse(self) -> Any:
        """
        C{"p2p": false} on an accept is not a way to decline (that is an
        accept without p2p): it is a bad request, and the session stays.
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        hello = yield self.accept("bob", event["session"], False)
        self.assertEqual(hello.code, "bad_request")
        self.assertFalse(dialer.answer.called)
        self.assertIn(event["session"], self.tp.registry.sessions)

    @defer.inlineCallbacks
    def test_largestOffersPassIntact(self) -> Any:
        """
        The largest offer and answer TP accepts (the most candidates, each
        of the longest, of characters JSON must escape, the longest
        credentials) still fit the frames that carry them on, with a
        certificate: relayed byte for byte, not an internal error.
        """
        big = {
            "ufrag": "u" * 256,
            "pwd": "p" * 256,
            "candidates": [f'{i:02d}"\\' * (wire.MAX_CANDIDATE // 4) for i in range(wire.MAX_CANDIDATES)],
        }
        self.assertEqual(len(big["candidates"][0]), wire.MAX_CANDIDATE)
        control = yield self.expose()
        dialer, event = yield self.introduce(control, offer=big)
        self.assertEqual({k: event["p2p"][k] for k in big}, big)
        self.assertTrue((yield self.accept("bob", event["session"], big)).ok)
        self.assertIntroducedTo((yield dialer.answer), event["session"], "bob", big)

    @defer.inlineCallbacks
    def test_exactlyWhatEachSideIsTold(self) -> Any:
        """
        bob is told the session, alice's identity and address as TP saw
        them, and her ICE offer and certificate; alice is told the session,
        bob's identity and certificate and his ICE answer; bob's accept is
        answered a bare ok.  Nothing else (no TP address, no other
        session's data): two introductions at once, answered in the other
        order, each get their own.
        """
        control = yield self.expose()
        first, event1 = yield self.introduce(control)
        second, event2 = yield self.introduce(control, offer=OFFER2)
        self.assertNotEqual(event1["session"], event2["session"])
        for event, dialer, offer in ((event1, first, OFFER), (event2, second, OFFER2)):
            self.assertEqual(set(event), {"event", "session", "identity", "peer", "p2p"})
            self.assertEqual(set(event["p2p"]), {"ufrag", "pwd", "candidates", "certificate"})
            self.assertEqual(event["identity"], "alice")
            host = dialer.transport.getHost()
            self.assertEqual(event["peer"], f"{host.host}:{host.port}")
            self.assertEqual({k: event["p2p"][k] for k in offer}, offer)
            self.assertEqual(x509.load_pem_x509_certificate(event["p2p"]["certificate"].encode()), self.certificate("alice"))
        end = yield self.connect("bob", ClientHello("accept", session=event2["session"], p2p=ANSWER2))
        bobHello = yield end.answer
        self.assertEqual((bobHello.ok, bobHello.info), (True, {}))
        self.assertTrue((yield self.accept("bob", event1["session"], ANSWER)).ok)
        for dialer, event, answer in ((first, event1, ANSWER), (second, event2, ANSWER2)):
            hello = yield dialer.answer
            self.assertEqual(set(hello.info), {"address", "p2p"})
            self.assertEqual(hello.info["address"], f"P2P {NAME}")
            self.assertEqual(set(hello.info["p2p"]), {"session", "identity", "certificate", "ufrag", "pwd", "candidates"})
            self.assertIntroducedTo(hello, event["session"], "bob", answer)

    @defer.inlineCallbacks
    def test_answerCannotReplaceVouchedFields(self) -> Any:
        """
        bob's answer carries its own C{certificate} (mallory's), C{identity}
        and C{session}: TP passes on only the ICE fields, so alice is still
        given bob's certificate as TP verified it, bob's identity and the
        real session (else an exposer could point the dialer's pin at any
        certificate).
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        forged = dict(ANSWER, certificate=_pem(self.certificate("mallory")), identity="mallory", session="A" * 32, address="10.0.0.1:1")
        self.assertTrue((yield self.accept("bob", event["session"], forged)).ok)
        hello = yield dialer.answer
        self.assertIntroducedTo(hello, event["session"], "bob", ANSWER)
        self.assertEqual(set(hello.info["p2p"]), {"session", "identity", "certificate", "ufrag", "pwd", "candidates"})
        self.assertEqual(hello.info["address"], f"P2P {NAME}")

    @defer.inlineCallbacks
    def test_offerCannotReplaceVouchedFields(self) -> Any:
        """
        alice's offer carries mallory's certificate and other fields: bob is
        given alice's certificate as TP verified it, and only the ICE fields
        of her offer.
        """
        control = yield self.expose()
        forged = dict(OFFER, certificate=_pem(self.certificate("mallory")), identity="mallory", session="A" * 32)
        dialer, event = yield self.introduce(control, offer=forged)
        self.assertEqual(set(event["p2p"]), {"ufrag", "pwd", "candidates", "certificate"})
        self.assertEqual(x509.load_pem_x509_certificate(event["p2p"]["certificate"].encode()), self.certificate("alice"))
        self.assertEqual((event["identity"], len(event["session"]) > 16), ("alice", True))
        self.assertNotEqual(event["session"], "A" * 32)

    @defer.inlineCallbacks
    def test_declineSpendsTheSession(self) -> Any:
        """
        bob declined (an accept without p2p): his later accept with an
        answer cannot turn the refusal into an introduction.
        """
        control = yield self.expose()
        dialer, event = yield self.introduce(control)
        self.assertTrue((yield self.accept("bob", event["session"], None)).ok)
        self.assertEqual((yield dialer.answer).code, "not_accepted")
        late = yield self.accept("bob", event["session"])
        self.assertEqual((late.code, late.message), ("bad_session", "session is used"))
        self.assertEqual((self.tp.p2p["introduced"], self.tp.p2p["declined"]), (0, 1))


class RuleForbidsAttackTests(AttackTestCase):
    """
    The exposure rule says p2p = false.
    """

    p2p = False

    @defer.inlineCallbacks
    def test_ordinaryTunnelLeaksNothing(self) -> Any:
        """
        alice asks for P2P: her answer is an ordinary E2E one, exactly
        C{{"e2e": NAME}} (no certificate of bob's, no session, no ICE
        answer), and bob is asked nothing.
        """
        control = yield self.expose()
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        yield self.assertOrdinaryE2E(dialer, control)


class QuicAttackTests(AttackTestCase):
    """
    The same attacks with TP's QUIC listener on the same port number:
    signalling and dials as streams of QUIC connections.
    """

    def setUp(self) -> None:
        super().setUp()
        self.listener = makeQuicListener(self.config, reactor, self.tp)
        self.udp = reactor.listenUDP(self.port, self.listener, interface="127.0.0.1")
        self.addCleanup(self.udp.stopListening)

    @defer.inlineCallbacks
    def quicStream(self, who: str, hello: ClientHello) -> Any:
        """
        A new QUIC connection to TP as C{who}, and a stream of it carrying
        C{hello} (a L{ControlClient}).
        """
        d = self.pki.directory
        config = clientConfiguration("localhost", loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / f"{who}.pem")), loadKey(str(d / f"{who}.key")))
        session = connectQuic(reactor, ("127.0.0.1", self.port), config)

        closeAtEnd(self, session)
        yield session.ready
        client = ControlClient(hello)
        session.openStream(client)
        return client

    @defer.inlineCallbacks
    def test_notADialerOverQuic(self) -> Any:
        """
        carol asks for P2P over QUIC: refused as over TLS (she is not
        among the dialers), and bob hears nothing; alice over QUIC, the
        same request, is introduced (so the refusal is carol's).
        """
        control = yield self.expose()
        carol = yield self.quicStream("carol", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        hello = yield carol.answer
        self.assertEqual(hello.code, "forbidden")
        self.assertIn("carol is not among the dialers", hello.message)
        self.assertEqual(len(control.incoming.pending), 0)
        self.assertEqual(self.tp.registry.sessions, {})
        alice = yield self.quicStream("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        event = yield control.incoming.get().addTimeout(10, reactor)
        self.assertEqual(event["identity"], "alice")
        self.assertTrue((yield self.accept("bob", event["session"])).ok)
        self.assertIntroducedTo((yield alice.answer), event["session"], "bob", ANSWER)

    @defer.inlineCallbacks
    def test_quicExposerIsNeverIntroduced(self) -> Any:
        """
        bob signals over QUIC and says p2p in his listen: TP does not
        introduce him (his incoming sessions are streams TP opens, which
        carry no answer), so alice's P2P dial is an ordinary E2E one:
        answered at once with exactly C{{"e2e": NAME}}, no certificate.
        """
        control = yield self.quicStream("bob", ClientHello("listen", mode="e2e", name=NAME, p2p=True))
        self.assertTrue((yield control.answer).ok)
        dialer = yield self.connect("alice", ClientHello("connect", host=NAME, port=22, p2p=OFFER))
        yield self.assertOrdinaryE2E(dialer, control)

    @defer.inlineCallbacks
    def test_introductionGoesToTheTLSMember(self) -> Any:
        """
        bob's exposure is a pool: a member over QUIC (which cannot be
        introduced, whatever it says) and one over TLS that offered P2P.
        Every introduction goes to the TLS member, never as an event on the
        QUIC member's stream.
        """
        quicMember = yield self.quicStream("bob", ClientHello("listen", mode="e2e", name=NAME, member="q", p2p=True))
        self.assertTrue((yield quicMember.answer).ok)
        tlsMember = yield self.connect("bob", ClientHello("listen", mode="e2e", name=NAME, member="t", p2p=True))
        self.assertTrue((yield tlsMember.answer).ok)
        for _ in range(3):
            dialer, event = yield self.introduce(tlsMember)
            self.assertTrue((yield self.accept("bob", event["session"])).ok)
            self.assertIntroducedTo((yield dialer.answer), event["session"], "bob", ANSWER)
        self.assertEqual(len(quicMember.incoming.pending), 0)


class OfferBoundsTests(SynchronousTestCase):
    """
    What TP relays, the other side's ICE agent must take.
    """


    def test_relayedOfferIsTaken(self) -> None:
        """
        The largest offer TP relays (wire.parseP2POffer) parses in the
        receiving agent (ice._parseOffer).
        """
        line = "1 1 udp 2130706431 192.0.2.7 4000 typ host"
        offer = wire.parseP2POffer({"ufrag": "abcd", "pwd": "p" * 22, "candidates": [line] * wire.MAX_CANDIDATES})
        ufrag, pwd, candidates = ice._parseOffer(offer)
        self.assertEqual(len(candidates), wire.MAX_CANDIDATES)


#: A dialer's side of the direct path (a child process on Twisted's asyncio
#: reactor, talking JSON lines like tpproxy.test.p2pagent) that waits for
#: the test's C{{"go": true}} after ICE connected, then makes one direct
#: QUIC attempt per C{--attempts} identity over the same ICE path (an
#: impostor on the path, then the vouched dialer): a refused attempt leaves
#: the path open for the next.
DIALER = """
import argparse

import tpproxy.test.p2pagent as p2pagent  # installs Twisted's asyncio reactor first
from twisted.internet import reactor, stdio
from twisted.internet.defer import Deferred

from tpproxy.p2p.direct import Introduction
from tpproxy.p2p.ice import DirectDialer, IceAgent
from tpproxy.pki import identityOf, loadCertificates, loadKey
from tpproxy.verify import ClientCertChecker, ClientVerifier

say = p2pagent.say


class Attempt(DirectDialer):
    # The child's one receive loop feeds the current attempt; the ICE path
    # outlives a refused one.
    def _start(self, timeout):
        self._deadline = self.clock.callLater(timeout, self._expired, timeout)
        return self.ready

    def _end(self, reason):
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if not self.done.called:
            self.done.callback(reason)


async def main(o, signalling):
    d = o.pki
    peer = loadCertificates(f"{d}/{o.peer}.pem")[0]
    introduction = Introduction(o.session, identityOf(peer).name, peer)
    base = ClientVerifier(loadCertificates(f"{d}/ca.pem"), ClientCertChecker(), reactor)
    agent = IceAgent(controlling=True, useIPv6=False)
    say(offer=await agent.gather())
    remote = (await signalling.next())["offer"]
    pair = await agent.connect(remote, o.timeout)
    say(connected={"pair": pair.describe()})
    await signalling.next()
    current = [None]
    agent.receive(lambda data: current[0] is not None and current[0].datagramReceived(data))
    for who in o.attempts:
        end = current[0] = Attempt(agent, introduction, loadCertificates(f"{d}/{who}.pem"), loadKey(f"{d}/{who}.key"), base)
        try:
            await end.connect(o.timeout)
        except Exception as e:
            say(refused={"as": who, "reason": str(e)})
            await end.done
            continue
        say(direct={"as": who})
        transfer = p2pagent.Transfer(o.size)
        end.openStream(transfer)
        await transfer.finished
        end.close("done")
        await end.done
        return 0
    return 2


parser = argparse.ArgumentParser()
for option in ("--pki", "--peer", "--session"):
    parser.add_argument(option, required=True)
parser.add_argument("--attempts", nargs="+", required=True)
parser.add_argument("--size", type=int, default=1 << 16)
parser.add_argument("--timeout", type=float, default=10.0)
options = parser.parse_args()
signalling = p2pagent.Signalling()
stdio.StandardIO(signalling)


def finished(result):
    if not isinstance(result, int):
        say(error=f"{result.type.__name__}: {result.getErrorMessage()}")
    if reactor.running:
        reactor.stop()


reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main(options, signalling)).addBoth(finished))
reactor.run()
"""

SIZE = 1 << 16


class DialerChild(Agent):
    """
    The L{DIALER} child, its JSON lines in a queue like a p2pagent's.
    """

    command = ("-c", DIALER)


def quicInitialLookalike() -> bytes:
    """
    One UDP datagram that parses as a QUIC v1 Initial (long header, 8-byte
    connection ids, 1200 bytes of payload) and decrypts to nothing: what
    anyone who can send to an address can send, without a certificate or
    the ICE credentials.
    """
    payload = os.urandom(1200)
    return bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8) + b"\x00" + (0x4000 | len(payload)).to_bytes(2, "big") + payload


class DirectPathAttackTests(TestCase):
    """
    alice was introduced to bob (exposer, the stock p2pagent); the test
    plays TP and the attacker.
    """

    timeout = 90

    def setUp(self) -> None:
        requireHostAddress()
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "carol"):
            self.pki.client(name)

    async def path(self, *attempts: str) -> tuple[DialerChild, Agent, str]:
        """
        bob exposes (introduced to alice), the dialer child dials (introduced
        to bob) with C{attempts}; offers relayed, ICE connected: the two, and
        bob's end of the path as C{HOST:PORT}.
        """
        session = newSessionId()
        d = str(self.pki.directory)
        exposer = Agent(self, ["exposer", "--pki", d, "--me", "bob", "--peer", "alice", "--session", session, "--size", str(SIZE), "--ipv4", "--timeout", "20"])
        dialer = DialerChild(self, ["--pki", d, "--peer", "bob", "--session", session, "--size", str(SIZE), "--attempts", *attempts])
        dialerOffer = (await dialer.expect("offer"))["offer"]
        exposerOffer = (await exposer.expect("offer"))["offer"]
        exposer.send({"offer": dialerOffer})
        dialer.send({"offer": exposerOffer})
        await dialer.expect("connected")
        connected = (await exposer.expect("connected"))["connected"]
        # "host 192.0.2.2:40000 -> host 192.0.2.2:40001": bob's is the first.
        bobEnd = connected["pair"].split(" -> ")[0].split(" ")[1]
        return dialer, exposer, bobEnd

    async def vouchedDialerGetsIn(self, dialer: Agent, exposer: Agent) -> None:
        """
        alice's direct connection comes up and carries bytes both ways,
        sha-checked; bob's service saw exactly one stream.
        """
        direct = await dialer.expect("direct", "refused")
        self.assertEqual(direct, {"direct": {"as": "alice"}}, f"bob's side: {exposer.seen}; {exposer.err.decode(errors='replace')[-2000:]}")
        await exposer.expect("direct")
        sent = (await dialer.expect("transfer"))["transfer"]
        served = (await exposer.expect("transfer"))["transfer"]
        self.assertEqual((served["bytes"], served["received"]), (SIZE, sent["sent"]))
        self.assertEqual((sent["bytes"], sent["received"]), (SIZE, served["sent"]))
        ended = (await exposer.expect("ended"))["ended"]
        self.assertEqual(ended["streams"], 1)

    @defer.inlineCallbacks
    def test_impostorOnThePathDoesNotUseTheIntroduction(self) -> Any:
        """
        carol (a valid certificate of the same CA, on alice's end of the
        ICE path) makes the first direct QUIC connection: bob's pin refuses
        her, and that refusal does not use up or end the introduction, so
        alice, right after on the same path, gets in.
        """
        dialer, exposer, _ = yield defer.Deferred.fromCoroutine(self.path("carol", "alice"))
        dialer.send({"go": True})
        refused = (yield defer.Deferred.fromCoroutine(dialer.expect("refused")))["refused"]
        self.assertEqual(refused["as"], "carol")
        self.assertIn("the exposer refused", refused["reason"])
        yield defer.Deferred.fromCoroutine(self.vouchedDialerGetsIn(dialer, exposer))


    @defer.inlineCallbacks
    def test_oneDatagramDoesNotTakeTheSession(self) -> Any:
        """
        Before alice's first packet, someone with neither certificate nor
        ICE credentials sends bob's end of the path one datagram shaped as
        a QUIC Initial (aioice hands any non-STUN datagram on, whatever its
        source): alice still gets in.
        """
        dialer, exposer, bobEnd = yield defer.Deferred.fromCoroutine(self.path("alice"))
        host, port = bobEnd.rsplit(":", 1)
        sender = reactor.listenUDP(0, protocol.DatagramProtocol(), interface=host)
        self.addCleanup(sender.stopListening)
        sender.write(quicInitialLookalike(), (host, int(port)))
        dialer.send({"go": True})
        yield defer.Deferred.fromCoroutine(self.vouchedDialerGetsIn(dialer, exposer))



class ClusterAttackTests(ThreeInstances, TestCase):
    """
    Three instances on etcd (tpproxy.test.test_cluster), with P2P allowed
    for the exposures.
    """

    def startInstance(self, i: int) -> Any:
        # test_cluster's configuration, with p2p = true on the exposure rule.
        original = Path.write_text

        def withP2P(path: Path, text: str, *args: Any, **kwargs: Any) -> int:
            if path.name == f"tp-{i}.toml":
                text = text.replace('dialers = ["alice", "bob"]\n', 'dialers = ["alice", "bob"]\np2p = true\n')
                assert "p2p = true" in text
            return original(path, text, *args, **kwargs)

        Path.write_text = withP2P  # type: ignore[method-assign]
        try:
            return super().startInstance(i)
        finally:
            Path.write_text = original  # type: ignore[method-assign]

    def tlsOptions(self, name: str) -> Any:
        from tpproxy.transports.tls import clientTLS

        d = self.pki.directory
        return clientTLS("localhost", loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / f"{name}.pem")), loadKey(str(d / f"{name}.key")))

    @defer.inlineCallbacks
    def at(self, i: int, who: str, hello: ClientHello) -> Any:
        from tpproxy.protocols.client import ServerAddress, TLSClientEndpoint

        endpoint = TLSClientEndpoint(reactor, ServerAddress(f"127.0.0.{i}", self.port), self.tlsOptions(who))
        client = yield endpoint.connect(protocol.Factory.forProtocol(lambda: ControlClient(hello)))
        self.addCleanup(lambda: client.lost.called or client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def test_noIntroductionInACluster(self) -> Any:
        """
        In a cluster, bob's accept of an introduction may reach another
        instance, whose peer link would not carry his answer (found by
        this test: alice then waited with no bound).  So TP introduces no
        one in a cluster (docs/p2p.md): alice's P2P dial is an ordinary
        relayed E2E dial, answered at once without p2p, and bob is told of
        no introduction.
        """
        name = "p2p.bob.localhost"
        control = yield self.at(1, "bob", ClientHello("listen", mode="e2e", name=name, p2p=True))
        self.assertTrue((yield control.answer).ok)
        dialer = yield self.at(1, "alice", ClientHello("connect", host=name, port=22, p2p=OFFER))
        hello = yield dialer.answer.addTimeout(20, reactor)
        self.assertTrue(hello.ok, hello)
        self.assertEqual(hello.info, {"e2e": name})
        self.assertEqual(len(control.incoming.pending), 0)
