"""
The direct path of a P2P session over real sockets (issue 16,
tpproxy.p2p.ice): two agent processes (tpproxy.test.p2pagent, each on
Twisted's asyncio reactor) run ICE with host candidates on this machine,
then the pinned QUIC connection; the test plays TP, relaying their offers
and introducing each to the other's certificate.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from aioice.ice import get_host_addresses
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tpproxy.p2p.direct import newSessionId
from tpproxy.p2p.ice import IceAgent, IceError, NotAsyncioReactor, _parseOffer, _privates
from tpproxy.privates import privateProblems
from tpproxy.test.p2pnet import Child
from tpproxy.testing import TestPKI
from tpproxy.wire import MAX_CANDIDATES

SIZE = 1 << 20


def requireHostAddress() -> None:
    """
    aioice never offers 127.0.0.1: two agents on this machine meet on
    another IPv4 address.  Without one the test is skipped, except under
    C{CI=true}, where it is an error.
    """
    if get_host_addresses(use_ipv4=True, use_ipv6=False):
        return
    message = "no IPv4 address but loopback: aioice has no host candidate"
    if os.environ.get("CI") == "true":
        raise AssertionError(message + "; under CI=true this is an error")
    raise SkipTest(message)


class Agent(Child):
    """
    A p2pagent child (L{tpproxy.test.p2pagent}): its JSON lines in a queue,
    its stderr kept for failure messages, killed at cleanup.
    """

    #: How Python runs the child.
    command: tuple[str, ...] = ("-m", "tpproxy.test.p2pagent")

    def __init__(self, testCase: TestCase, argv: list[str]) -> None:
        super().__init__(testCase, [sys.executable, *self.command, *argv])

    @property
    def ended(self) -> defer.Deferred[int | None]:
        return self.done

    async def expect(self, *keys: str) -> dict[str, Any]:
        """
        The next message, which must have one of C{keys}.
        """
        message = await self.lines.get()
        if not any(k in message for k in keys):
            raise AssertionError(f"expected {keys}, got {message}; stderr: {self.err.decode(errors='replace')[-3000:]}")
        return message


class DirectPathTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        requireHostAddress()
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "carol"):
            self.pki.client(name)

    def agent(self, role: str, me: str, peer: str, session: str, *extra: str) -> Agent:
        return Agent(self, [role, "--pki", str(self.pki.directory), "--me", me, "--peer", peer, "--session", session, "--size", str(SIZE), "--ipv4", *extra])

    async def session(self, dialerAs: str, dialerIntroducedTo: str, exposerAs: str, exposerIntroducedTo: str) -> tuple[Agent, Agent]:
        """
        Start a dialer and an exposer and play TP: relay their offers, and
        wait until ICE connected them.
        """
        session = newSessionId()
        dialer = self.agent("dialer", dialerAs, dialerIntroducedTo, session)
        exposer = self.agent("exposer", exposerAs, exposerIntroducedTo, session)
        dialerOffer = (await dialer.expect("offer"))["offer"]
        exposerOffer = (await exposer.expect("offer"))["offer"]
        exposer.send({"offer": dialerOffer})
        dialer.send({"offer": exposerOffer})
        for agent in (dialer, exposer):
            connected = (await agent.expect("connected"))["connected"]
            self.assertEqual((connected["local"], connected["remote"]), ("host", "host"), connected)
        return dialer, exposer

    @defer.inlineCallbacks
    def test_vouchedPeersMoveBytes(self) -> Any:
        """
        Alice dials, bob exposes, each introduced to the other's
        certificate: ICE selects a host/host pair, the pinned QUIC
        connection comes up, and 1 MiB goes each way, sha-checked.
        """
        dialer, exposer = yield defer.Deferred.fromCoroutine(self.session("alice", "bob", "bob", "alice"))
        yield defer.Deferred.fromCoroutine(dialer.expect("direct"))
        yield defer.Deferred.fromCoroutine(exposer.expect("direct"))
        sent = (yield defer.Deferred.fromCoroutine(dialer.expect("transfer")))["transfer"]
        served = (yield defer.Deferred.fromCoroutine(exposer.expect("transfer")))["transfer"]
        self.assertEqual((served["bytes"], served["received"]), (SIZE, sent["sent"]))
        self.assertEqual((sent["bytes"], sent["received"]), (SIZE, served["sent"]))
        self.assertEqual((yield dialer.ended), 0, dialer.err)
        self.assertEqual((yield exposer.ended), 0, exposer.err)

    @defer.inlineCallbacks
    def test_unvouchedDialerRefused(self) -> Any:
        """
        TP introduced alice to bob, but carol (same CA, valid certificate,
        and bob's ICE credentials) dials: ICE connects (it knows no
        identities), bob's pin refuses carol in the QUIC handshake, carol
        is told, and nothing reaches bob's service.
        """
        dialer, exposer = yield defer.Deferred.fromCoroutine(self.session("carol", "bob", "bob", "alice"))
        refused = (yield defer.Deferred.fromCoroutine(dialer.expect("refused")))["refused"]
        self.assertIn("the exposer refused", refused)
        refusedByBob = (yield defer.Deferred.fromCoroutine(exposer.expect("refused")))["refused"]
        self.assertIn("not the certificate TP vouched for", refusedByBob)
        ended = (yield defer.Deferred.fromCoroutine(exposer.expect("ended")))["ended"]
        self.assertEqual((ended["serviceBytes"], ended["streams"]), (0, 0))
        self.assertEqual((yield exposer.ended), 2)
        self.assertEqual((yield dialer.ended), 2)

    @defer.inlineCallbacks
    def test_wrongExposerRefusedByDialer(self) -> Any:
        """
        Alice was introduced to bob, but carol answers (introduced to
        alice, with her own certificate): alice's check refuses carol right
        after the handshake, before alice sends anything, so carol never
        completes hers and gets no stream.
        """
        dialer, exposer = yield defer.Deferred.fromCoroutine(self.session("alice", "bob", "carol", "alice"))
        refused = (yield defer.Deferred.fromCoroutine(dialer.expect("refused")))["refused"]
        self.assertIn("not the exposer TP introduced", refused)
        self.assertIn("bob", refused)
        # carol waits for alice until her deadline (a refused handshake
        # does not end an exposer's wait: test_p2p_attacks), then gives up.
        refusedByCarol = (yield defer.Deferred.fromCoroutine(exposer.expect("refused")))["refused"]
        self.assertIn("no direct QUIC connection from alice within", refusedByCarol)
        ended = (yield defer.Deferred.fromCoroutine(exposer.expect("ended")))["ended"]
        self.assertEqual((ended["serviceBytes"], ended["streams"]), (0, 0))
        self.assertEqual((yield dialer.ended), 2)
        self.assertEqual((yield exposer.ended), 2)

    @defer.inlineCallbacks
    def test_noPathTimesOut(self) -> Any:
        """
        The only remote candidate is an address nothing answers from: the
        dialer's ICE fails at its bound (2 s), saying which candidates it
        tried.
        """
        dialer = self.agent("dialer", "alice", "bob", newSessionId(), "--timeout", "2")
        yield defer.Deferred.fromCoroutine(dialer.expect("offer"))
        started = reactor.seconds()  # type: ignore[attr-defined]
        dialer.send({"offer": {"ufrag": "abcd", "pwd": "p" * 22, "candidates": ["1 1 udp 2130706431 203.0.113.1 9 typ host"]}})
        error = (yield defer.Deferred.fromCoroutine(dialer.expect("error")))["error"]
        self.assertIn("ICE found no path within 2 s", error)
        self.assertIn("remote: host 203.0.113.1:9", error)
        self.assertLess(reactor.seconds() - started, 10)  # type: ignore[attr-defined]
        self.assertEqual((yield dialer.ended), 1)


class OfferTests(SynchronousTestCase):
    """
    What a remote offer (relayed by TP from the other side) may be.
    """

    good = {"ufrag": "abcd", "pwd": "p" * 22, "candidates": ["1 1 udp 2130706431 192.0.2.7 4000 typ host"]}

    def test_wellFormed(self) -> None:
        ufrag, pwd, candidates = _parseOffer(self.good)
        self.assertEqual((ufrag, pwd, [(c.host, c.port, c.type) for c in candidates]), ("abcd", "p" * 22, [("192.0.2.7", 4000, "host")]))

    def test_refused(self) -> None:
        """
        Missing keys, bad credentials, a malformed or overlong candidate
        and too many candidates are refused with L{IceError}.
        """
        line = self.good["candidates"][0]
        for bad in (
            {},
            dict(self.good, ufrag="a b"),
            dict(self.good, pwd="short"),
            dict(self.good, candidates="not a list"),
            dict(self.good, candidates=["1 1 udp"]),
            dict(self.good, candidates=[line + " x" * 200]),
            dict(self.good, candidates=[line] * (MAX_CANDIDATES + 1)),
        ):
            self.assertRaises(IceError, _parseOffer, bad)

    def test_notAsyncio(self) -> None:
        """
        aioice needs Twisted's asyncio reactor: with any other, an agent is
        refused with a message saying how to install it.
        """
        error = self.assertRaises(NotAsyncioReactor, IceAgent, True, reactor=task.Clock())
        self.assertIn("asyncioreactor.install()", str(error))

    def test_privateNames(self) -> None:
        """
        The private names of aioice, aioquic and Twisted the direct path
        reads are there in the installed versions.
        """
        self.assertEqual(privateProblems(_privates()), [])
