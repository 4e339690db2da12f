# -*- test-case-name: tpproxy.test.test_quicroute -*-
"""
QUIC packets routed by connection id between the instances of a cluster
(issue 14, part B; docs/cluster.md "QUIC behind a load balancer").

Each instance holds a I{slot} (0-63) in the routing store, claimed as a
route of kind L{SLOT} with the instance id as its holder: a compare-and-set
like every claim, bound to the instance's lease, so no two live instances
hold one slot.  Every QUIC connection id it issues names its slot
(L{tpproxy.transports.cidroute}).  A packet that reaches an instance whose
id names another slot is forwarded to that slot's holder: one UDP datagram
to the holder's peer port (C{cluster.advertise}: TCP carries peer links,
UDP these packets).  The workers of one machine are instances too, so the
same path carries packets between them.

Answers: the owner answers the client itself, from its own socket, when
the receiving instance is on the same host (workers share TP's address
and port).  Otherwise the client would see the answer come from another
address than the one it sent to, and a load balancer that NATs (an
nftables DNAT, a cloud's UDP balancer) answers only what went through it:
so the owner sends those answers back to the receiving instance, which
sends them from the socket the client's packets arrived on.

Each message carries an HMAC-SHA256 (truncated to 16 bytes) keyed from
TP's own private key, which every instance of a cluster holds (peer links
pin it, docs/cluster.md): a message without the right one is dropped and
counted.  The previous key is also accepted for a while after a reload
changed it, since instances are not reloaded at one instant.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Callable

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from tpproxy.cluster.store import SLOT, RouteTaken, Route, StoreError
from tpproxy.transports.cidroute import (
    ANSWER_VIA_SENDER,
    FORWARD,
    RETURN,
    SLOTS,
    TaggedRandom,
    decodeMessage,
    encodeForward,
    encodeReturn,
)

log = Logger(namespace="tpproxy.cluster")

#: Bytes of the truncated HMAC-SHA256 that starts each message.
MAC_SIZE = 16
#: Seconds between tries to claim a slot while the store does not answer.
RETRY = 1.0


def macKey(privateKey: Any) -> bytes:
    """
    The key that signs QUIC routing messages, derived from TP's private
    key (a one-way hash: the message key reveals nothing of TP's key).
    """
    der = privateKey.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return hashlib.sha256(b"tp quic routing v1\0" + der).digest()


def preferredSlot(instance: str) -> int:
    """
    Where an instance starts looking for a free slot: a hash of its id,
    so that an instance that restarts usually gets its old slot back.
    """
    return hashlib.sha256(instance.encode("utf-8")).digest()[0] % SLOTS


_SPLIT = re.compile(r"(?<!\\):")


def udpAddressOf(description: str) -> tuple[str, int]:
    """
    The interface and port of a TCP server endpoint description
    (C{tcp:7443}, C{tcp:port=7443:interface=10.0.0.1}, C{tcp6:7443:
    interface=\\:\\:1}): where an instance binds its routing socket, on
    UDP, next to its peer listener.
    """
    parts = [p.replace("\\:", ":") for p in _SPLIT.split(description)]
    kind, args = parts[0].lower(), parts[1:]
    interface = "::" if kind == "tcp6" else "0.0.0.0"
    port = None
    for arg in args:
        name, eq, value = arg.partition("=")
        if not eq:
            port = int(arg) if port is None else port
        elif name == "port":
            port = int(value)
        elif name == "interface":
            interface = value
    if kind not in ("tcp", "tcp6") or port is None:
        raise ValueError(f"QUIC routing needs a TCP peer_listen with a port, not {description!r}")
    return interface, port


def _hostPort(advertise: str) -> tuple[str, int]:
    host, _, port = advertise.rpartition(":")
    return host.strip("[]"), int(port)


class QuicRouter(DatagramProtocol):
    """
    One instance's end of QUIC routing: its slot, and its routing socket.

    @param store: the routing store (to claim a slot).
    @param view: what answers C{holders(route)} and C{instances()} from
        the store's watch (L{tpproxy.cluster.peer.PeerLinks}, whose
        C{watch} it reads; C{None} until the watch runs).
    @param listeners: this instance's QUIC listeners, by number (the same
        configuration on every instance numbers them alike).
    @param keys: gives TP's current private key.
    @param ids: what aioquic draws connection ids from
        (L{tpproxy.transports.cidroute.installTaggedIds}).
    """

    def __init__(
        self,
        store: Any,
        links: Any,
        listeners: list[Any],
        privateKey: Callable[[], Any],
        ids: TaggedRandom,
        clock: IReactorTime,
    ) -> None:
        self.store = store
        self.links = links
        self.listeners = listeners
        self.privateKey = privateKey
        self.ids = ids
        self.clock = clock
        self.me = store.instance.id
        self.myHost = _hostPort(store.instance.advertise)[0]
        self.slot: int | None = None
        self._keys: list[tuple[Any, bytes]] = []
        self._returners: dict[tuple[int, int], Callable[[bytes, Any], None]] = {}
        self._lookups: dict[int, tuple[tuple[str, str, int] | None, float]] = {}
        self._retry: Any = None
        self.stopped = False
        #: Messages dropped for a bad MAC or framing, or not for this slot.
        self.rejected = 0
        #: Packets that could not be handed over (no live holder of the slot).
        self.undelivered = 0
        #: Answers sent back through the instance that received the client's packets.
        self.returned = 0
        store.observeLoss(self._lost)

    # --- the slot -------------------------------------------------------------------

    def claim(self) -> defer.Deferred[None]:
        """
        Claim a free slot: from L{preferredSlot} on, skipping those the
        watch shows held, trying the next on a lost race; while the store
        does not answer, try again each L{RETRY} seconds.  Until then new
        connection ids are unroutable (the instance still serves QUIC;
        only packets after an address change may not find it).
        """
        return self._claim()

    @defer.inlineCallbacks
    def _claim(self) -> Any:
        start = preferredSlot(self.me)
        watch = getattr(self.links, "watch", None)
        for i in range(SLOTS):
            if self.stopped:
                return
            slot = (start + i) % SLOTS
            route = Route.slot(slot)
            if watch is not None and any(h.instance != self.me for h in watch.holders(route)):
                continue
            try:
                yield self.store.claim(route, self.me)
            except RouteTaken:
                continue
            except StoreError as e:
                log.warn("Could not claim a QUIC routing slot ({error}); trying again in {retry:g} s", error=str(e), retry=RETRY)
                self._retry = self.clock.callLater(RETRY, self.claim)
                return
            self.slot = slot
            self.ids.setSlot(slot)
            log.info("QUIC routing slot {slot} (connection ids start with 0x{tag:02x})", slot=slot, tag=0x40 | slot)
            return
        log.error("All {slots} QUIC routing slots are held: this instance's QUIC connections do not survive an address change that reaches another instance", slots=SLOTS)

    def _lost(self, taken: RouteTaken, identity: str) -> None:
        if taken.route.kind != SLOT or self.slot is None or taken.route != Route.slot(self.slot):
            return
        log.warn("Lost QUIC routing slot {slot} to {holders}; claiming another", slot=self.slot, holders=sorted(taken.holders))
        self.slot = None
        self.ids.setSlot(None)
        if not self.stopped:
            self.claim()

    def stop(self) -> None:
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self.ids.setSlot(None)
        self.slot = None

    # --- keys -----------------------------------------------------------------------

    def _macKeys(self) -> list[bytes]:
        key = self.privateKey()
        if not self._keys or self._keys[0][0] is not key:
            self._keys = [(key, macKey(key))] + self._keys[:1]
        return [k for _, k in self._keys]

    def _sign(self, message: bytes) -> bytes:
        return hmac.digest(self._macKeys()[0], message, "sha256")[:MAC_SIZE] + message

    def _verify(self, signed: bytes) -> bytes | None:
        mac, message = signed[:MAC_SIZE], signed[MAC_SIZE:]
        for key in self._macKeys():
            if hmac.compare_digest(mac, hmac.digest(key, message, "sha256")[:MAC_SIZE]):
                return message
        return None

    # --- sending --------------------------------------------------------------------

    #: Seconds an answer of L{addressOf} is used before the watch is read
    #: again (it is asked for every packet on a moved path).
    LOOKUP_TTL = 1.0

    def addressOf(self, slot: int) -> tuple[str, str, int] | None:
        """
        The instance holding C{slot}, and its routing address, as the
        watch saw them at most L{LOOKUP_TTL} seconds ago; C{None} if no
        live instance holds it.
        """
        now = self.clock.seconds()
        cached = self._lookups.get(slot)
        if cached is not None and now - cached[1] < self.LOOKUP_TTL:
            return cached[0]
        found = self._lookup(slot)
        self._lookups[slot] = (found, now)
        return found

    def _lookup(self, slot: int) -> tuple[str, str, int] | None:
        watch = getattr(self.links, "watch", None)
        if watch is None:
            return None
        live = watch.instances()
        for holder in sorted(watch.holders(Route.slot(slot))):
            instance = live.get(holder.instance)
            if instance is not None:
                host, port = _hostPort(instance.advertise)
                return instance.id, host, port
        return None

    def attach(self) -> None:
        self._macKeys()  # remembered, so that it is still taken after a reload
        for index, listener in enumerate(self.listeners):
            listener.forward = lambda owner, data, addr, index=index: self.forward(index, owner, data, addr)

    def detach(self) -> None:
        for listener in self.listeners:
            listener.forward = None

    def forward(self, listener: int, owner: int, data: bytes, addr: tuple[str, int]) -> bool:
        """
        Hand C{data}, received from C{addr}, to the holder of slot
        C{owner}; C{False} if there is none (or it is this instance) to
        take it, so the listener treats the packet as one of an unknown
        connection.
        """
        if owner == self.slot or self.slot is None:
            return False
        target = self.addressOf(owner)
        if target is None or target[0] == self.me or self.transport is None:
            self.undelivered += 1
            return False
        _, host, port = target
        message = encodeForward(owner, self.slot, listener, addr, data, answerViaSender=host != self.myHost)
        self._write(self._sign(message), (host, port))
        return True

    def _write(self, signed: bytes, to: tuple[str, int]) -> None:
        try:
            self.transport.write(signed, to)
        except OSError:
            self.undelivered += 1  # dropped, as the network may drop a packet

    def _returner(self, sender: int, listener: int) -> Callable[[bytes, Any], None]:
        returner = self._returners.get((sender, listener))
        if returner is None:
            returner = self._returners[sender, listener] = self._newReturner(sender, listener)
        return returner

    def _newReturner(self, sender: int, listener: int) -> Callable[[bytes, Any], None]:
        def send(data: bytes, addr: Any) -> None:
            target = self.addressOf(sender)
            if target is None or self.transport is None or self.slot is None:
                self.undelivered += 1
                return
            self.returned += 1
            self._write(self._sign(encodeReturn(sender, self.slot, listener, addr, data)), (target[1], target[2]))

        return send

    # --- receiving ------------------------------------------------------------------

    def datagramReceived(self, signed: bytes, source: Any) -> None:
        message = self._verify(signed)
        try:
            if message is None:
                raise ValueError("bad MAC")
            kind, slot, sender, index, flags, client, data = decodeMessage(message)
            if slot != self.slot or index >= len(self.listeners):
                raise ValueError(f"for slot {slot}, listener {index}")  # stale: the slot moved
        except ValueError:
            self.rejected += 1
            return
        listener = self.listeners[index]
        if kind == FORWARD:
            via = self._returner(sender, index) if flags & ANSWER_VIA_SENDER else None
            listener.datagramReceived(data, client, forwarded=True, via=via)
        elif kind == RETURN:
            listener.sendOut(data, client)


class QuicRouteService(service.Service):
    """
    Runs an instance's L{QuicRouter}: its routing socket on the peer
    port's interface and port (UDP), and its slot.
    """

    def __init__(self, reactor: IReactorUDP, router: QuicRouter, address: tuple[str, int]) -> None:
        self.reactor = reactor
        self.router = router
        self.address = address
        self.port: Any = None

    def startService(self) -> None:
        from tpproxy.transports.quic import _bigBuffers

        super().startService()
        router = self.router
        self.port = self.reactor.listenUDP(self.address[1], router, interface=self.address[0], maxPacketSize=65536 + 128)
        _bigBuffers(self.port)
        router.attach()
        router.claim()

    def stopService(self) -> Any:
        super().stopService()
        self.router.detach()
        self.router.stop()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
