"""
Connection ids that name the instance's slot, the messages that carry a
QUIC packet between instances, and the router that claims slots and
carries them (L{tpproxy.transports.cidroute},
L{tpproxy.cluster.quicroute}).
"""

from __future__ import annotations

from typing import Any

from aioquic.quic import connection
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.cluster.memory import MemoryBackend, MemoryRoutingStore
from tpproxy.cluster.quicroute import MAC_SIZE, QuicRouter, preferredSlot, udpAddressOf
from tpproxy.cluster.store import Route, RouteTaken
from tpproxy.transports.cidroute import (
    CID_LENGTH,
    FORWARD,
    RETURN,
    TaggedRandom,
    decodeMessage,
    encodeForward,
    encodeReturn,
    installTaggedIds,
    slotOf,
    tagFor,
)


class TagTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        for slot in (0, 1, 17, 63):
            cid = bytes([tagFor(slot)]) + b"\x99" * (CID_LENGTH - 1)
            self.assertEqual(slotOf(cid), slot)

    def test_untagged(self) -> None:
        """
        Ids of another form name no slot: another length, or a first
        byte whose top bits are not 01 (a client's random Initial id
        mostly, an unroutable id).
        """
        for cid in (b"", b"\x40" * 7, b"\x40" * 9, b"\x00" + b"x" * 7, b"\x80" + b"x" * 7, b"\xc5" + b"x" * 7):
            self.assertIsNone(slotOf(cid), cid)

    def test_bounds(self) -> None:
        for slot in (-1, 64):
            with self.assertRaises(ValueError):
                tagFor(slot)
            with self.assertRaises(ValueError):
                TaggedRandom().setSlot(slot)

    def test_aioquicIssuesTaggedIds(self) -> None:
        """
        Once installed, every id a new aioquic connection issues names the
        slot, the rest random; without a slot ids are unroutable (top bits
        11); other random draws are untouched.
        """
        self.addCleanup(setattr, connection, "os", connection.os)
        ids = installTaggedIds(5)
        seen = set()
        for _ in range(20):
            conn = connection.QuicConnection(configuration=QuicConfiguration(is_client=True))
            self.assertEqual(slotOf(conn.host_cid), 5)
            seen.add(conn.host_cid)
        self.assertEqual(len(seen), 20)
        ids.setSlot(None)
        firsts = set()
        for _ in range(50):
            conn = connection.QuicConnection(configuration=QuicConfiguration(is_client=True))
            self.assertIsNone(slotOf(conn.host_cid))
            self.assertEqual(conn.host_cid[0] & 0xC0, 0xC0)
            firsts.add(conn.host_cid[0])
        self.assertGreater(len(firsts), 1, "the six low bits of an unroutable id are random")
        self.assertEqual(len(connection.os.urandom(16)), 16)
        self.assertIs(installTaggedIds(3), ids, "installed once per process")


class MessageTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        for addr in (("127.0.0.1", 4433), ("::1", 1), ("2001:db8::5", 65535), ("10.1.2.3", 0)):
            self.assertEqual(decodeMessage(encodeForward(9, 4, 3, addr, b"packet")), (FORWARD, 9, 4, 3, 0, addr, b"packet"))
            self.assertEqual(decodeMessage(encodeForward(9, 4, 3, addr, b"p", answerViaSender=True))[4], 1)
            self.assertEqual(decodeMessage(encodeReturn(4, 9, 0, addr, b"answer")), (RETURN, 4, 9, 0, 0, addr, b"answer"))

    def test_garbage(self) -> None:
        good = encodeForward(9, 4, 3, ("10.0.0.1", 5), b"x")
        for bad in (b"", b"\x00" * 10, bytes([3]) + good[1:], good[:1] + bytes([64]) + good[2:], good[:5] + bytes([5]) + good[6:]):
            with self.assertRaises(ValueError):
                decodeMessage(bad)


class Listener:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any, Any]] = []
        self.out: list[tuple[bytes, Any]] = []
        self.forward: Any = None

    def datagramReceived(self, data: bytes, addr: Any, forwarded: bool = False, via: Any = None) -> None:
        assert forwarded
        self.got.append((data, addr, via))

    def sendOut(self, data: bytes, addr: Any) -> None:
        self.out.append((data, addr))


class Sent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class Links:
    watch: Any = None


CLIENT = ("192.0.2.7", 5000)


class RouterTests(SynchronousTestCase):
    """
    L{QuicRouter}: instances claim distinct slots in a shared store; what
    one sends, the holder of the slot takes only with the MAC of TP's key.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend(self.clock)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.watchLinks = Links()
        watcher = MemoryRoutingStore(self.clock, "watcher", "127.0.0.9:1", backend=self.backend)
        watcher.start()
        watch = self.successResultOf(watcher.watch(lambda event: None))
        self.addCleanup(watch.stop)
        self.watchLinks.watch = watch

    def router(self, instance: str, advertise: str, key: Any = None) -> tuple[QuicRouter, Listener]:
        store = MemoryRoutingStore(self.clock, instance, advertise, backend=self.backend)
        self.successResultOf(store.start())
        listener = Listener()
        usedKey = key if key is not None else self.key
        router = QuicRouter(store, self.watchLinks, [listener], lambda: usedKey, TaggedRandom(), self.clock)
        router.transport = Sent()  # type: ignore[assignment]
        router.attach()
        self.successResultOf(router.claim())
        return router, listener

    def sent(self, router: QuicRouter) -> list[tuple[bytes, Any]]:
        sent, router.transport.sent = router.transport.sent, []  # type: ignore[union-attr]
        return sent

    def test_distinctSlots(self) -> None:
        """
        Two instances whose ids prefer the same slot get two slots: the
        second claim loses and takes the next one.  Each names its slot in
        the ids it issues.
        """
        names = {}
        for i in range(1000):
            names.setdefault(preferredSlot(f"i{i}"), []).append(f"i{i}")
        first, second = next(v for v in names.values() if len(v) >= 2)[:2]
        a, _ = self.router(first, "10.0.0.1:7443")
        b, _ = self.router(second, "10.0.0.2:7443")
        self.assertEqual(a.slot, preferredSlot(first))
        self.assertEqual(b.slot, (a.slot + 1) % 64)
        self.assertEqual(a.ids.slot, a.slot)
        self.assertEqual(b.ids.slot, b.slot)

    def test_deliveredSameHost(self) -> None:
        """
        A packet for another worker on the same host reaches its listener,
        to be answered from its own socket (no C{via}).
        """
        a, _ = self.router("a", "127.0.0.1:7443")
        b, listener = self.router("b", "127.0.0.1:7444")
        self.assertTrue(a.listeners[0].forward(b.slot, b"quic packet", CLIENT))
        [(message, to)] = self.sent(a)
        self.assertEqual(to, ("127.0.0.1", 7444))
        b.datagramReceived(message, ("127.0.0.1", 7443))
        self.assertEqual(listener.got, [(b"quic packet", CLIENT, None)])

    def test_answersGoBackThroughTheReceiver(self) -> None:
        """
        Between hosts, the owner's answers to the client go back to the
        instance that received the client's packet, which sends them from
        its listener's socket.
        """
        a, listenerA = self.router("a", "10.0.0.1:7443")
        b, listenerB = self.router("b", "10.0.0.2:7443")
        a.forward(0, b.slot, b"quic packet", CLIENT)
        [(message, _)] = self.sent(a)
        b.datagramReceived(message, ("10.0.0.1", 7443))
        [(data, addr, via)] = listenerB.got
        self.assertIsNotNone(via)
        via(b"answer", CLIENT)
        [(back, to)] = self.sent(b)
        self.assertEqual(to, ("10.0.0.1", 7443))
        a.datagramReceived(back, ("10.0.0.2", 7443))
        self.assertEqual((listenerA.out, listenerA.got, b.returned), ([(b"answer", CLIENT)], [], 1))

    def test_forgedRejected(self) -> None:
        """
        A message under another key, with a flipped byte, or too short is
        dropped and counted; nothing reaches the listener.
        """
        a, _ = self.router("a", "10.0.0.1:7443", key=ec.generate_private_key(ec.SECP256R1()))
        b, listener = self.router("b", "10.0.0.2:7443")
        a.forward(0, b.slot, b"quic packet", CLIENT)
        [(forged, _)] = self.sent(a)
        b.datagramReceived(forged, None)
        b.forward(0, a.slot, b"x", CLIENT)  # b's own key: a valid message, for a
        [(good, _)] = self.sent(b)
        good = encodeForward(b.slot, a.slot, 0, CLIENT, b"quic packet")
        signed = b._sign(good)
        b.datagramReceived(signed[:-1] + bytes([signed[-1] ^ 1]), None)
        b.datagramReceived(signed[:MAC_SIZE] + bytes([signed[MAC_SIZE] ^ 1]) + signed[MAC_SIZE + 1 :], None)
        b.datagramReceived(b"short", None)
        self.assertEqual((listener.got, b.rejected), ([], 4))
        b.datagramReceived(signed, None)
        self.assertEqual(len(listener.got), 1)

    def test_forAnotherSlotRejected(self) -> None:
        """
        A message for slot S that reaches an instance holding another slot
        (S moved) is dropped: the destination is inside what the MAC
        covers.
        """
        a, _ = self.router("a", "10.0.0.1:7443")
        b, listener = self.router("b", "10.0.0.2:7443")
        b.datagramReceived(a._sign(encodeForward((b.slot + 1) % 64, a.slot, 0, CLIENT, b"p")), None)
        b.datagramReceived(a._sign(encodeForward(b.slot, a.slot, 5, CLIENT, b"p")), None)  # no listener 5
        self.assertEqual((listener.got, b.rejected), ([], 2))

    def test_noHolder(self) -> None:
        """
        A packet for a slot no live instance holds, or for this instance's
        own slot, is not sent, and the listener is told so (it then
        answers it as a packet of an unknown connection).
        """
        a, listener = self.router("a", "10.0.0.1:7443")
        self.assertFalse(listener.forward((a.slot + 7) % 64, b"p", CLIENT))
        self.assertFalse(listener.forward(a.slot, b"p", CLIENT))
        self.assertEqual((self.sent(a), a.undelivered), ([], 1))

    def test_holderGone(self) -> None:
        """
        When the holder of a slot stops (its lease revoked), packets for
        it are no longer sent there.
        """
        a, _ = self.router("a", "10.0.0.1:7443")
        b, _ = self.router("b", "10.0.0.2:7443")
        self.assertTrue(a.forward(0, b.slot, b"p", CLIENT))
        self.successResultOf(b.store.stop())
        self.assertTrue(a.forward(0, b.slot, b"p", CLIENT), "what the watch said is used for LOOKUP_TTL")
        self.clock.advance(QuicRouter.LOOKUP_TTL)
        self.assertFalse(a.forward(0, b.slot, b"p", CLIENT))

    def test_previousKeyAccepted(self) -> None:
        """
        After a reload changed TP's key, messages signed with the one
        before are still taken (the other instances reload later).
        """
        keys = [self.key]
        b, listener = self.router("b", "10.0.0.2:7443")
        b.privateKey = lambda: keys[-1]
        a, _ = self.router("a", "10.0.0.1:7443")
        old = a._sign(encodeForward(b.slot, a.slot, 0, CLIENT, b"p"))
        keys.append(ec.generate_private_key(ec.SECP256R1()))
        b.datagramReceived(old, None)
        self.assertEqual(len(listener.got), 1)

    def test_lostSlotClaimedAgain(self) -> None:
        """
        A slot lost while the store was away is given up (new ids are
        unroutable until) a free one is claimed.
        """
        a, _ = self.router("a", "10.0.0.1:7443")
        mine = a.slot
        assert mine is not None
        self.successResultOf(a.store.release(Route.slot(mine)))
        other, _ = self.router("other", "10.0.0.3:7443")
        self.successResultOf(other.store.claim(Route.slot(mine), "other"))
        a._lost(RouteTaken(Route.slot(mine), frozenset({"other"})), "a")
        self.assertNotEqual(a.slot, mine)
        self.assertIsNotNone(a.slot)
        self.assertEqual(a.ids.slot, a.slot)


class AddressTests(SynchronousTestCase):
    def test_udpAddressOf(self) -> None:
        self.assertEqual(udpAddressOf("tcp:7443"), ("0.0.0.0", 7443))
        self.assertEqual(udpAddressOf("tcp:7443:interface=10.0.0.1"), ("10.0.0.1", 7443))
        self.assertEqual(udpAddressOf("tcp:port=7443:interface=10.0.0.1"), ("10.0.0.1", 7443))
        self.assertEqual(udpAddressOf("tcp6:7443:interface=\\:\\:1"), ("::1", 7443))
        for bad in ("unix:/x", "tcp:interface=1.2.3.4"):
            with self.assertRaises(ValueError):
                udpAddressOf(bad)


def bareListener() -> Any:
    from tpproxy.transports.quic import QuicListener

    # Only what datagramReceived reads of an unknown short-header packet.
    listener = QuicListener.__new__(QuicListener)
    listener.configuration = QuicConfiguration(is_client=False)
    listener.sessions = {}
    listener.returnVia = {}
    listener.h3backend = None
    listener.forwarded = 0
    return listener


class ListenerTests(SynchronousTestCase):
    def test_forwardedNotForwardedAgain(self) -> None:
        """
        A packet another instance handed over is never handed on: with a
        stale view that names this instance's own address, one packet
        from the network would circle forever (found in review).
        """
        handed: list[Any] = []
        listener = bareListener()
        listener.forward = lambda owner, data, addr: handed.append(owner) or True
        resets: list[bytes] = []
        listener._statelessReset = lambda cid, size, addr: resets.append(cid)
        cid = bytes([tagFor(1)]) + b"\x11" * 7
        packet = bytes([0x40]) + cid + b"\x00" * 40  # a short-header packet
        listener.datagramReceived(packet, CLIENT)
        self.assertEqual((handed, listener.forwarded), ([1], 1))
        listener.datagramReceived(packet, CLIENT, forwarded=True)
        self.assertEqual((handed, resets), ([1], [cid]))

    def test_returnPath(self) -> None:
        """
        Answers to a client whose packets came through another instance
        go back that way, until a packet from it arrives directly; the
        paths kept are bounded.
        """
        listener = bareListener()
        listener._statelessReset = lambda cid, size, addr: None
        out: list[Any] = []
        listener.sendOut = lambda data, addr: out.append(("direct", data, addr))
        packet = bytes([0x40]) + bytes([tagFor(1)]) + b"\x11" * 7 + b"\x00" * 40
        listener.datagramReceived(packet, CLIENT, forwarded=True, via=lambda data, addr: out.append(("via", data, addr)))
        listener.sendDatagram(b"answer", CLIENT)
        listener.sendDatagram(b"other", ("192.0.2.8", 1))
        listener.datagramReceived(packet, CLIENT)
        listener.sendDatagram(b"later", CLIENT)
        self.assertEqual(out, [("via", b"answer", CLIENT), ("direct", b"other", ("192.0.2.8", 1)), ("direct", b"later", CLIENT)])
        listener.MAX_RETURN_PATHS = 3
        for port in range(5):
            listener.datagramReceived(packet, ("192.0.2.9", port), forwarded=True, via=lambda data, addr: None)
        self.assertEqual(list(listener.returnVia), [("192.0.2.9", 2), ("192.0.2.9", 3), ("192.0.2.9", 4)])
