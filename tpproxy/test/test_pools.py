"""
Pools (issue 13): several signalling connections of one identity serve one
E2E name or public port on one instance; each dialer is told to one of
them, and a member that left is told of nothing more.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy.reverse.registry import Registry, ReverseError
from tpproxy.service import certificateSource, makeServerTLS
from tpproxy.test.support import freePort
from tpproxy.test.test_cluster import RecordingControl, RecordingDialer
from tpproxy.testing import REVERSE_RULES, TestPKI, reverseTables
from tpproxy.wire import ClientHello, ErrorCode, FrameDecoder, WireError


class PoolTests(TestCase):
    """
    One registry (no store), its exposures' members recorded.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.clock = Clock()
        self.registry = self.makeRegistry(self.clock)

    def makeRegistry(self, clock: Any) -> Registry:
        config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki, exposers=("alice", "bob")))
        return Registry(clock, config.policy, makeServerTLS(config), certificateSource(config, reactor), "127.0.0.1")

    @defer.inlineCallbacks
    def pool(self, *members: str, name: str = "svc.localhost") -> Any:
        """
        alice's exposure of C{name}, one member per key in C{members}.
        """
        controls = []
        exposure = None
        for key in members:
            control = RecordingControl()
            joined = yield self.registry.expose(control, "alice", "e2e", name=name, member=key)
            self.assertTrue(exposure is None or joined is exposure)
            exposure = joined
            controls.append(control)
        return exposure, controls

    def dial(self, exposure: Any, count: int) -> list[tuple[str, RecordingDialer]]:
        dialers = []
        for i in range(count):
            dialer = RecordingDialer()
            sid = self.registry.incoming(exposure, dialer, "bob", f"192.0.2.1:{1000 + i}")
            assert sid is not None
            dialers.append((sid, dialer))
        return dialers

    @defer.inlineCallbacks
    def test_dialersSpreadOverMembers(self) -> Any:
        """
        Each dialer is told to exactly one member of the pool, and every
        member gets some: 100 dialers over two members.
        """
        exposure, (one, two) = yield self.pool("m1", "m2")
        self.assertEqual(len(exposure.members), 2)
        sids = [sid for sid, _ in self.dial(exposure, 100)]
        told = [s for s, _, _ in one.incoming] + [s for s, _, _ in two.incoming]
        self.assertEqual(sorted(told), sorted(sids))
        self.assertTrue(one.incoming and two.incoming, (len(one.incoming), len(two.incoming)))

    @defer.inlineCallbacks
    def test_memberLeftGetsNothing(self) -> Any:
        """
        When a member's signalling connection ends, the dialers it was told
        of and that still wait are told to another member at once (the
        same session ids, which the owner can then claim), and no later
        dialer is told to it.
        """
        exposure, (one, two) = yield self.pool("m1", "m2")
        dialers = dict(self.dial(exposure, 40))
        waiting = [s for s, _, _ in one.incoming]
        self.assertTrue(waiting)
        twoBefore = len(two.incoming)
        self.registry.leave(exposure, one)
        self.assertEqual([m.control for m in exposure.members], [two])
        self.assertEqual([s for s, _, _ in two.incoming[twoBefore:]], sorted(waiting))
        toldOne = len(one.incoming)
        later = self.dial(exposure, 20)
        self.assertEqual(len(one.incoming), toldOne)
        self.assertEqual([s for s, _, _ in two.incoming[-20:]], [s for s, _ in later])
        for sid in waiting:
            self.assertIs(self.registry.claim(sid, "alice").dialer, dialers[sid])
        self.assertTrue(all(not d.failed for d in dialers.values()))
        self.assertEqual(self.registry.nameExposure("svc.localhost"), exposure)

    @defer.inlineCallbacks
    def test_lastMemberTakesTheExposure(self) -> Any:
        """
        When the last member leaves, the name is no longer exposed and its
        waiting dialers fail with C{not_accepted}.
        """
        exposure, (one, two) = yield self.pool("m1", "m2")
        dialers = self.dial(exposure, 3)
        self.registry.leave(exposure, two)
        self.assertIs(self.registry.nameExposure("svc.localhost"), exposure)
        self.registry.leave(exposure, one)
        self.assertIsNone(self.registry.nameExposure("svc.localhost"))
        self.assertEqual([d.failed for _, d in dialers], [[(ErrorCode.NOT_ACCEPTED, "the E2E name svc.localhost went away")]] * 3)

    @defer.inlineCallbacks
    def test_sameMemberTakesOver(self) -> Any:
        """
        A C{listen} with the key of a member already in the pool (that
        exposer reconnecting) replaces that member's connection, which is
        closed; the pool does not grow, and the sessions the old connection
        was told of stay claimable.  Without a key, a C{listen} replaces
        the keyless member as before pools.
        """
        exposure, (one, two) = yield self.pool("m1", "m2")
        waiting = [sid for sid, _ in self.dial(exposure, 10)]
        again = RecordingControl()
        joined = yield self.registry.expose(again, "alice", "e2e", name="svc.localhost", member="m1")
        self.assertIs(joined, exposure)
        self.assertEqual([m.control for m in exposure.members], [again, two])
        self.assertEqual(one.closed, ["E2E name svc.localhost was taken over by a new session of alice"])
        self.registry.leave(exposure, one)  # the old connection ends: nothing changes
        self.assertEqual(len(exposure.members), 2)
        for sid in waiting:
            self.registry.claim(sid, "alice")
        keyless = RecordingControl()
        yield self.registry.expose(keyless, "alice", "e2e", name="svc.localhost")
        replacing = RecordingControl()
        yield self.registry.expose(replacing, "alice", "e2e", name="svc.localhost")
        self.assertEqual(keyless.closed, ["E2E name svc.localhost was taken over by a new session of alice"])
        self.assertEqual([m.control for m in exposure.members], [again, two, replacing])

    @defer.inlineCallbacks
    def test_otherIdentityCannotJoin(self) -> Any:
        """
        Only the owner's connections join a pool: bob is refused with
        C{name_taken} whatever member key he names, and alice's members
        are untouched.
        """
        exposure, controls = yield self.pool("m1")
        for key in ("m1", "m2", None):
            e = yield self.assertFailure(self.registry.expose(RecordingControl(), "bob", "e2e", name="svc.localhost", member=key), ReverseError)
            self.assertEqual(e.code, ErrorCode.NAME_TAKEN)
        self.assertEqual(([m.control for m in exposure.members], controls[0].closed), (controls, []))

    @defer.inlineCallbacks
    def test_goawayToEveryMember(self) -> Any:
        """
        A graceful stop tells every member of every pool.
        """
        exposure, controls = yield self.pool("m1", "m2", "m3")
        told = []
        for control in controls:
            control.goaway = told.append  # type: ignore[method-assign]
        self.assertEqual(self.registry.goaway("stopping"), 3)
        self.assertEqual(told, ["stopping"] * 3)

    @defer.inlineCallbacks
    def test_publicPortPool(self) -> Any:
        """
        Two members of one explicit public port share its listening
        socket; when one leaves the port still accepts, and a connection
        there is told to the one that remains.
        """
        self.registry = self.makeRegistry(reactor)  # it listens
        port = freePort()
        one, two = RecordingControl(), RecordingControl()
        exposure = yield self.registry.expose(one, "alice", "public", port=port, member="m1")
        joined = yield self.registry.expose(two, "alice", "public", port=port, member="m2")
        self.assertIs(joined, exposure)
        self.registry.leave(exposure, one)
        self.assertIs(self.registry.byPort[port], exposure)
        proto = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Protocol())
        self.addCleanup(proto.transport.abortConnection)
        while not two.incoming:
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((len(one.incoming), len(two.incoming)), (0, 1))
        self.registry.leave(exposure, two)
        self.assertNotIn(port, self.registry.byPort)


class MemberFieldTests(SynchronousTestCase):
    """
    The C{member} field of a C{listen} ClientHello.
    """

    def test_roundTrip(self) -> None:
        for hello in (
            ClientHello("listen", mode="e2e", name="svc.example.org", member="a1_B-2"),
            ClientHello("listen", mode="public", port=8080, member="x" * 64),
            ClientHello("listen", mode="public", port=0),
        ):
            self.assertEqual(ClientHello.fromObject(FrameDecoder().feedFrame(hello.toFrame())), hello)

    def test_invalid(self) -> None:
        """
        A member that is not 1-64 characters of A-Z a-z 0-9 _ - is a
        C{bad_request} naming the field.
        """
        for member in ("", "x" * 65, "a b", "é", 1, True, ["m"], {"m": 1}):
            with self.assertRaises(WireError) as caught:
                ClientHello.fromObject({"v": 1, "op": "listen", "mode": "e2e", "name": "svc.example.org", "member": member})
            self.assertEqual(caught.exception.code, ErrorCode.BAD_REQUEST)
            self.assertIn("field 'member'", caught.exception.message)


class Pending:
    """
    A certificate source whose answer the test gives (L{CertificateUnavailable}
    or a certificate), to act while a registration waits for it.
    """

    def __init__(self) -> None:
        self.waiting: list[defer.Deferred[Any]] = []

    def certificateFor(self, name: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append(d)
        return d


class RaceTests(TestCase):
    """
    Pools while a registration waits for its name's certificate, and
    takeovers of a member with dialers waiting (found in review).
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        config = self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki, exposers=("alice", "bob")))
        self.registry = Registry(Clock(), config.policy, makeServerTLS(config), certificateSource(config, reactor), "127.0.0.1")  # type: ignore[arg-type]

    def test_takeoverRetellsDialers(self) -> Any:
        """
        A takeover by the same member tells the new connection of the
        dialers the old one was told of (the old one is most likely dead),
        with the same session ids.
        """
        old = RecordingControl()
        exposure = self.successResultOf(self.registry.expose(old, "alice", "e2e", name="svc.localhost", member="m1"))
        sids = [self.registry.incoming(exposure, RecordingDialer(), "bob", f"192.0.2.1:{i}") for i in range(3)]
        new = RecordingControl()
        self.successResultOf(self.registry.expose(new, "alice", "e2e", name="svc.localhost", member="m1"))
        self.assertEqual(sorted(s for s, _, _ in new.incoming), sorted(sids))
        for sid in sids:
            self.registry.claim(sid, "alice")  # each still claimable, once

    def test_certificateFailsAfterJoin(self) -> Any:
        """
        While the first registration of a name waits for its certificate,
        a second member joins and the first member's connection is taken
        over; the certificate then cannot be had: every connection but
        the one whose registration failed is closed, none is left
        believing it exposes the name.
        """
        from tpproxy.certsource import CertificateUnavailable

        source = Pending()
        self.registry.certificates = source  # type: ignore[assignment]
        first, joined, newer = RecordingControl(), RecordingControl(), RecordingControl()
        registering = self.registry.expose(first, "alice", "e2e", name="svc.localhost", member="m1")
        self.successResultOf(self.registry.expose(joined, "alice", "e2e", name="svc.localhost", member="m2"))
        self.successResultOf(self.registry.expose(newer, "alice", "e2e", name="svc.localhost", member="m1"))
        source.waiting[0].errback(CertificateUnavailable("the CA is down"))
        e = self.failureResultOf(registering, ReverseError).value
        self.assertEqual(e.code, ErrorCode.NO_CERTIFICATE)
        self.assertIsNone(self.registry.nameExposure("svc.localhost"))
        self.assertEqual((joined.closed, newer.closed), (["no certificate for svc.localhost"], ["no certificate for svc.localhost"]))

    def test_takenOverWhileFetching(self) -> Any:
        """
        The first member's connection is taken over while the certificate
        is fetched: when it comes, the old registration is refused and the
        newer connection holds the name.
        """
        source = Pending()
        self.registry.certificates = source  # type: ignore[assignment]
        first, newer = RecordingControl(), RecordingControl()
        registering = self.registry.expose(first, "alice", "e2e", name="svc.localhost", member="m1")
        exposure = self.successResultOf(self.registry.expose(newer, "alice", "e2e", name="svc.localhost", member="m1"))
        chain, key = self.successResultOf(certificateSource(self.pki.serverConfig(REVERSE_RULES, **reverseTables(self.pki)), reactor).certificateFor("svc.localhost"))
        source.waiting[0].callback((chain, key))
        e = self.failureResultOf(registering, ReverseError).value
        self.assertIn("taken over by a newer session", e.message)
        self.assertIs(self.registry.nameExposure("svc.localhost"), exposure)
        self.assertEqual([m.control for m in exposure.members], [newer])
        self.assertIn("svc.localhost", self.registry.serverTLS.names)  # the name is served


class MissedTests(TestCase):
    """
    A pool member that let a session expire gets no new dialers for a
    while, as long as another member answers (a member whose connection
    died silently would otherwise get its share of dialers until TP
    notices, up to 3 x keepalive).
    """

    def test_memberThatMissedIsPassedOver(self) -> Any:
        from tpproxy.reverse.registry import MISS_MEMORY

        pki = TestPKI.create(self.mktemp())
        config = pki.serverConfig(REVERSE_RULES, **reverseTables(pki, exposers=("alice", "bob")))
        clock = Clock()
        registry = Registry(clock, config.policy, makeServerTLS(config), certificateSource(config, reactor), "127.0.0.1", acceptTimeout=10)  # type: ignore[arg-type]
        silent, answering = RecordingControl(), RecordingControl()
        exposure = self.successResultOf(registry.expose(silent, "alice", "e2e", name="svc.localhost", member="dead"))
        self.successResultOf(registry.expose(answering, "alice", "e2e", name="svc.localhost", member="alive"))
        # Dialers until the silent member has been told of one, which it
        # never accepts; the answering member accepts each of its own.
        while not silent.incoming:
            sid = registry.incoming(exposure, RecordingDialer(), "bob", "192.0.2.1:1")
            if answering.incoming and answering.incoming[-1][0] == sid:
                registry.claim(sid, "alice")
        clock.advance(10)
        told = len(silent.incoming)
        for i in range(30):
            sid = registry.incoming(exposure, RecordingDialer(), "bob", f"192.0.2.1:{i}")
            registry.claim(sid, "alice")
        self.assertEqual(len(silent.incoming), told)
        # After MISS_MEMORY it gets dialers again (it may have recovered).
        clock.advance(MISS_MEMORY)
        for i in range(40):
            registry.claim(registry.incoming(exposure, RecordingDialer(), "bob", f"192.0.2.2:{i}"), "alice")
        self.assertGreater(len(silent.incoming), told)
