# -*- test-case-name: tpproxy.test.test_quic_memory,tpproxy.test.test_quic,tpproxy.test.test_privates -*-
"""
QUIC for TP: aioquic's sans-IO C{QuicConnection} driven from a Twisted
C{DatagramProtocol} and the reactor's clock (no asyncio layer), with
mutual TLS as strict as TP's TLS listener, and each QUIC stream presented to
TP's protocols as an ordinary Twisted transport.

Why this way round (docs/decisions.md): one event loop and one clock for
everything, tests on a fake clock, any reactor (epoll or asyncio), and
write coalescing under TP's control.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from aioquic import tls
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    MAX_STREAM_DATA_FRAME_CAPACITY,
    QuicConnection,
    QuicFrameType,
)
from aioquic.quic.packet import QuicPacketType, encode_quic_retry, encode_quic_version_negotiation, pull_quic_header
from aioquic.quic.packet_builder import QuicDeliveryState, QuicPacketBuilder
from aioquic.quic.retry import TOKEN_LIFETIME, QuicRetryTokenHandler
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost, MessageLengthError
from twisted.internet.interfaces import IConsumer, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.config import LimitsConfig
from tpproxy.limits import HalfOpenCounter, RateLimitedLog, TokenBucket, sourcePrefix
from tpproxy.pki import identityOf, replacePrivate
from tpproxy.privates import PrivateAPIError, PrivateName, privateProblems
from tpproxy.reactors import IUDPReactor
from tpproxy.transports.cidroute import slotOf
from tpproxy.transports.h3 import H3_ALPN, H3Responder, H3Response
from tpproxy.transports.pmtu import BASE as PMTU_BASE
from tpproxy.transports.pmtu import DEFAULT_MAX as PMTU_DEFAULT_MAX
from tpproxy.transports.pmtu import PathMTUSearch
from tpproxy.verify import AlertRefused, ClientVerifier
from tpproxy.wire import ALPN

log = Logger(namespace="tpproxy.quic")

#: TP's ALPN protocol ID as aioquic spells it.
TP_ALPN = ALPN.decode()

#: Receive window per stream: TP credits the peer with what it has handed
#: on plus this much, so a stalled destination stalls its stream only.
STREAM_WINDOW = 4 * 1024 * 1024
#: Unacknowledged bytes on a stream above which its producer is paused.
SEND_HIGH_WATER = 2 * 1024 * 1024
SEND_LOW_WATER = 512 * 1024
#: Error codes TP uses when it resets or stops a stream, or closes.
STREAM_ABORTED = 0x100
CLOSE_REFUSED = 0x101



class AlertCertificateRequired(tls.Alert):
    """
    No client certificate: TLS 1.3's C{certificate_required}, what
    OpenSSL sends on TP's TLS listener too.
    """

    description = tls.AlertDescription.certificate_required


#: How long a Retry token is good for (aioquic's tokens: AES-GCM under a
#: key of the listener, binding the client's address and port and both
#: connection IDs; a client answers a Retry at once).
RETRY_TOKEN_LIFETIME = TOKEN_LIFETIME
#: New-connection Initials a second above which every new client must pass
#: a Retry, however few connections are half-open: trying to decrypt a
#: flood of garbage Initials costs ~0.5 ms each (a connection object and
#: its keys), answering it with a Retry ~20 us (measured).
RETRY_RATE = 100
#: Stateless resets TP sends, a second on average and at once.
RESET_RATE = 100.0
RESET_BURST = 200.0
#: STUN binding responses per second, and in a burst (tpproxy.stun): enough
#: for many clients' ICE gathering, too few to make TP a useful reflector
#: (at most 52 bytes each: under 100 KB/s).
STUN_RATE = 1000.0
STUN_BURST = 2000.0
#: The largest stateless reset TP sends (it never answers with more).
MAX_RESET = 43
#: The file, in TP's state directory, of the stateless-reset secret.
RESET_SECRET_FILE = "quic-reset.key"


def resetToken(secret: bytes, cid: bytes) -> bytes:
    """
    The stateless reset token (RFC 9000 §10.3) of connection ID C{cid}:
    derived from TP's secret, so that TP can still compute it after a
    restart that forgot the connection.
    """
    return hmac.new(secret, b"tp stateless reset\0" + cid, hashlib.sha256).digest()[:16]


def loadResetSecret(stateDir: str | None) -> bytes:
    """
    The 32-byte stateless-reset secret kept in C{stateDir} (made 0700, the
    file 0600, on first use).  Without a state directory, or if it cannot
    be written, a secret for this process only: resets then work until TP
    restarts, and a warning says so.
    """
    if stateDir is None:
        return os.urandom(32)
    path = Path(stateDir) / RESET_SECRET_FILE
    try:
        data = path.read_bytes()
        if len(data) == 32:
            return data
        log.warn("Ignoring {path}: not a 32-byte secret; making a new one", path=str(path))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("Cannot read {path} ({error}): QUIC stateless resets will not survive a restart", path=str(path), error=e)
        return os.urandom(32)
    secret = os.urandom(32)
    try:
        Path(stateDir).mkdir(mode=0o700, parents=True, exist_ok=True)
        replacePrivate(path, secret)
    except OSError as e:
        log.warn("Cannot write {path} ({error}): QUIC stateless resets will not survive a restart", path=str(path), error=e)
    return secret


def _bareAddress(addr: Any) -> tuple[str, int]:
    """
    C{addr} without an IPv6 zone (C{fe80::1%eth0}), as aioquic's Retry
    tokens encode addresses with L{ipaddress}.
    """
    return addr[0].split("%", 1)[0], int(addr[1])


class _ProbeBuilder(QuicPacketBuilder):
    """
    Builds a path MTU probe.  Its packet is not counted in flight, so that
    neither its bytes nor its loss touch congestion control, and not as
    ack-eliciting on this side: it arms no probe timeout (on an idle
    connection the timeout, timed from the last packet counted, was already
    past and declared the probe lost before its ACK could come) and does
    not extend the idle or closing timers.  The peer acknowledges it all
    the same (it carries a PING); a probe that is not acknowledged is
    declared lost when a later packet is.
    """

    def flush(self) -> tuple[list[bytes], list[Any]]:
        datagrams, packets = super().flush()
        for packet in packets:
            packet.in_flight = False
            packet.is_ack_eliciting = False
        return datagrams, packets


class TPQuicConnection(QuicConnection):
    """
    aioquic's connection with TP's changes: the server requests and
    verifies client certificates inside the TLS handshake (for every ALPN
    protocol but those in C{tpAnonymousAlpn}, i.e. the h3 responder's), and
    stream receive windows follow what TP has consumed.

    Relies on aioquic internals, each listed in L{_aioquicPrivates} with
    what it is for: C{tls.Context._request_client_certificate},
    C{_server_handle_certificate}, C{_peer_certificate(_chain)},
    C{QuicConnection._initialize}, C{_alpn_handler} (called by
    C{tls.Context._server_handle_hello} between ALPN negotiation and the
    CertificateRequest), C{_write_stream_limits}, C{_write_connection_limits}
    with C{_local_max_data}, and the connection IDs.  A listener checks them
    all, and runs the certificate hook in memory, before it serves
    (L{requireQuicPrivates}); TP refuses to serve QUIC if any is off.
    """

    tpVerifier: ClientVerifier | None = None
    tpRefusal: str | None = None
    #: ALPN protocols the server serves without a client certificate (set by
    #: the listener when the h3 responder is on).
    tpAnonymousAlpn: frozenset[str] = frozenset()
    #: Whether one of those was negotiated: no client certificate was
    #: requested, and the connection's receive budget (MAX_DATA) is fixed.
    tpAnonymous = False
    #: Gives (chain, key) served to an anonymous (h3) connection instead
    #: of TP's own, or C{None} (TP's own).
    tpAnonymousCertificate: Any = None

    #: The listener's stateless-reset secret: the server's connection IDs
    #: get tokens derived from it (L{resetToken}) instead of random ones.
    tpResetSecret: bytes | None = None

    def __init__(self, *a: Any, resetSecret: bytes | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tpConsumed: dict[int, int] = {}
        if resetSecret is not None and not self._is_client:
            self.tpResetSecret = resetSecret
            self._deriveResetTokens()

    def _deriveResetTokens(self) -> None:
        secret = self.tpResetSecret
        assert secret is not None
        for cid in self._host_cids:
            cid.stateless_reset_token = resetToken(secret, cid.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        if self.tpResetSecret is not None:
            self._deriveResetTokens()

    def isStatelessReset(self, data: bytes) -> bool:
        """
        Client side: is C{data} a stateless reset from the server, i.e. a
        short-header datagram ending with the reset token the server gave
        for one of the connection IDs we may send to?
        """
        if not 21 <= len(data) <= MAX_RESET or data[0] & 0x80:
            # Not a reset TP sends; the data packets of a transfer never
            # get as far as the token comparison.
            return False
        tail = data[-16:]
        peers = [self._peer_cid] + list(self._peer_cid_available)
        return any(c.stateless_reset_token and hmac.compare_digest(c.stateless_reset_token, tail) for c in peers)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self._is_client or self.tpVerifier is None:
            return
        self.tls._request_client_certificate = True
        original = self.tls._server_handle_certificate
        verifier = self.tpVerifier

        def handleCertificate(input_buf: Buffer) -> None:
            original(input_buf)
            leaf = self.tls._peer_certificate
            if leaf is None:
                self.tpRefusal = "no client certificate"
                raise AlertCertificateRequired("a client certificate is required")
            # The verdict of TP's TLS listener (tpproxy.verify), and the
            # alert OpenSSL would send there.
            refused = verifier.check(leaf, list(self.tls._peer_certificate_chain))
            if refused is not None:
                self.tpRefusal = refused.reason
                raise AlertRefused(refused)

        self.tls._server_handle_certificate = handleCertificate

    def _alpn_handler(self, alpn_protocol: str) -> None:
        """
        aioquic calls this from C{tls.Context._server_handle_hello} once the
        ALPN protocol is chosen, before that method writes the server's
        flight, CertificateRequest included if C{_request_client_certificate}
        is set.  So the request (set in L{_initialize}: it stays on if this
        is never reached) is dropped here only for an anonymous protocol.
        """
        super()._alpn_handler(alpn_protocol)
        if self._is_client or self.tpVerifier is None:
            return
        self.tpAnonymous = alpn_protocol in self.tpAnonymousAlpn
        self.tls._request_client_certificate = not self.tpAnonymous
        if self.tpAnonymous and self.tpAnonymousCertificate is not None:
            # WebTransport's own certificate (served by hash,
            # tpproxy.transports.webtransport.HashedCertificate): sent after
            # this, and signed with a key of the kind the signature
            # algorithm was chosen for (the listener checks they match).
            chain, key = self.tpAnonymousCertificate()
            self.tls.certificate = chain[0]
            self.tls.certificate_chain = chain[1:]
            self.tls.certificate_private_key = key

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        """
        aioquic doubles MAX_DATA whenever half of it is used.  An anonymous
        (h3) connection keeps its first one: whatever it sends, in order or
        not, TP never receives more than C{max_data} bytes of stream data on
        it.
        """
        if not self.tpAnonymous:
            return super()._write_connection_limits(builder, space)
        limit = self._local_max_data
        used = limit.used
        limit.used = min(used, limit.value // 2)
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        consumed = self.tpConsumed.get(stream.stream_id)
        if consumed is None or not stream.max_stream_data_local:
            return super()._write_stream_limits(builder, space, stream)
        target = consumed + STREAM_WINDOW
        if target > stream.max_stream_data_local:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    # Path MTU discovery (tpproxy.transports.pmtu).

    #: The search of a tp/1 connection (L{enablePathMTU}), or L{None}:
    #: 1200-byte datagrams throughout (h3, WebTransport, P2P).
    tpPmtu: PathMTUSearch | None = None
    _tpPmtuPath: Any = None

    def enablePathMTU(self, maximum: int) -> None:
        """
        Probe for larger datagrams than 1200 bytes, up to C{maximum}, once
        the handshake is complete, and watch for a path that stops carrying
        them.  The peer must read datagrams of that size (TP's sockets read
        up to 64 KiB).
        """
        if maximum <= PMTU_BASE or self.tpPmtu is not None:
            return
        search = self.tpPmtu = PathMTUSearch(maximum)
        cc = self._loss._cc
        acked, lost = cc.on_packet_acked, cc.on_packets_lost

        def onPacketAcked(*, now: float, packet: Any) -> None:
            search.packetAcknowledged(packet.sent_bytes)
            acked(now=now, packet=packet)

        def onPacketsLost(*, now: float, packets: Any) -> None:
            packets = list(packets)
            for packet in packets:
                if search.packetLost(packet.sent_bytes):
                    log.info("QUIC path to {peer}: {size}-byte datagrams stopped getting through; back to {base}",
                             peer=self._network_paths[0].addr, size=self._max_datagram_size, base=PMTU_BASE)
                    self._tpFollowSearch()
            lost(now=now, packets=packets)

        cc.on_packet_acked = onPacketAcked
        cc.on_packets_lost = onPacketsLost

    def _tpFollowSearch(self) -> None:
        """
        Send datagrams of up to the search's current size from now on.
        """
        assert self.tpPmtu is not None
        size = self.tpPmtu.current
        if size != self._max_datagram_size:
            self._max_datagram_size = size
            self._loss._cc._max_datagram_size = size
            self._loss._pacer._max_datagram_size = size

    def pathChanged(self) -> None:
        """
        This end moved to a new path (the client's new socket): what held
        on the old one says nothing about it (RFC 8899 section 5.2).
        """
        if self.tpPmtu is not None:
            self.tpPmtu.newPath()
            self._tpFollowSearch()

    def get_timer(self) -> float | None:
        # An outstanding probe's deadline (a probe arms none of aioquic's
        # timers).
        timer = super().get_timer()
        deadline = self.tpPmtu.deadline if self.tpPmtu is not None else None
        if deadline is not None and self._state not in END_STATES and (timer is None or deadline < timer):
            return deadline
        return timer

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        search = self.tpPmtu
        if search is None:
            return
        search.expire(now)
        if search.timeouts(self._loss._pto_count):
            log.info("QUIC path to {peer}: nothing acknowledged for {count} probe timeouts at {size}-byte datagrams; back to {base}",
                     peer=self._network_paths[0].addr, count=self._loss._pto_count, size=self._max_datagram_size, base=PMTU_BASE)
            self._tpFollowSearch()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        search = self.tpPmtu
        if search is None or not self._handshake_confirmed or self._state in END_STATES:
            return super().datagrams_to_send(now)
        path = self._network_paths[0]
        if path is not self._tpPmtuPath:
            if self._tpPmtuPath is not None:
                # The peer moved to a new path: not one datagram above the
                # base size goes to it before a probe shows it carries more.
                self.pathChanged()
            self._tpPmtuPath = path
        datagrams = super().datagrams_to_send(now)
        if not path.is_validated or self._state in END_STATES:
            # Not to a path not yet validated, nor after CONNECTION_CLOSE
            # (which the call above may just have sent).
            return datagrams
        # Three probe timeouts: ample for an ACK, delayed or not.
        size = search.nextProbe(now, 3 * self._loss.get_probe_timeout())
        if size is not None:
            datagrams += self._tpProbe(size, search.generation, path, now)
        return datagrams

    def _tpProbe(self, size: int, generation: int, path: Any, now: float) -> list[tuple[bytes, Any]]:
        """
        One probe: a PING padded to C{size} bytes, outside congestion
        control (its loss says nothing about congestion, RFC 9000 section
        14.4), whose fate goes to the search.
        """
        builder = _ProbeBuilder(
            host_cid=self.host_cid,
            is_client=self._is_client,
            max_datagram_size=size,
            packet_number=self._packet_number,
            peer_cid=self._peer_cid.cid,
            peer_token=self._peer_token,
            quic_logger=self._quic_logger,
            spin_bit=self._spin_bit,
            version=self._version,
        )
        builder.start_packet(QuicPacketType.ONE_RTT, self._cryptos[tls.Epoch.ONE_RTT])
        builder.start_frame(QuicFrameType.PING, handler=self._tpProbeDelivered, handler_args=(size, generation))
        # Padding to the whole size, inside the packet (it is a 1-RTT one).
        builder._datagram_needs_padding = True
        return self._flush_builder(builder=builder, network_path=path, peer_cid=self._peer_cid.cid, now=now)

    def _tpProbeDelivered(self, delivery: QuicDeliveryState, size: int, generation: int) -> None:
        search = self.tpPmtu
        if search is None or generation != search.generation:
            # A probe of an earlier search (another path): says nothing.
            return
        if delivery == QuicDeliveryState.ACKED:
            search.acknowledged(size)
            if search.current != self._max_datagram_size:
                log.debug("QUIC path to {peer} carries {size}-byte datagrams", peer=self._network_paths[0].addr, size=size)
                self._tpFollowSearch()
        else:
            search.lost(size)

    def datagramTooBig(self, size: int) -> None:
        """
        The kernel refused a datagram of C{size} bytes (C{EMSGSIZE}: larger
        than the MTU it knows for the route; TP's QUIC sockets never
        fragment).
        """
        search = self.tpPmtu
        if search is None or size <= PMTU_BASE:
            return
        search.tooBig(size)
        self._tpFollowSearch()

    def sendBuffered(self, streamId: int) -> int:
        """
        Bytes written to a stream and not yet acknowledged.
        """
        stream = self._streams.get(streamId)
        return 0 if stream is None else len(stream.sender._buffer)


# --- aioquic's private names: checked, never trusted -------------------------


def _aioquicPrivates() -> tuple[PrivateName, ...]:
    from aioquic.quic.connection import Limit
    from aioquic.quic.stream import QuicStream, QuicStreamSender

    from aioquic.quic.congestion.cubic import CubicCongestionControl
    from aioquic.quic.congestion.reno import RenoCongestionControl
    from aioquic.quic.recovery import QuicPacketPacer, QuicPacketRecovery

    C, Q = tls.Context, QuicConnection
    pmtu = "else datagrams stay at 1200 bytes or the probe fails"
    verdict = "the client-certificate verdict (CAs, CRLs, deny list) would not run"
    return (
        PrivateName(C, "_server_handle_certificate", ("input_buf",), ("_handle_reassembled_message",), f"TP wraps it per connection with its verdict; else {verdict}"),
        PrivateName(C, "_request_client_certificate", None, ("__init__", "_server_handle_hello"), "set to ask for a client certificate; else none is asked for"),
        PrivateName(C, "_peer_certificate", None, ("__init__", "_set_peer_certificate"), "the client's leaf, for the verdict and the identity"),
        PrivateName(C, "_peer_certificate_chain", None, ("__init__", "_set_peer_certificate"), "the client's intermediates, for the verdict"),
        PrivateName(Q, "_initialize", ("peer_cid",), ("receive_datagram", "_connect"), f"where TP installs its hook on the new tls.Context; else {verdict}"),
        PrivateName(Q, "_alpn_handler", ("alpn_protocol",), ("_initialize",), "drops the certificate request for h3 only; else browsers are asked for one"),
        PrivateName(Q, "_write_connection_limits", ("builder", "space"), ("_write_application",), "keeps an h3 connection's MAX_DATA fixed; else it doubles"),
        PrivateName(Q, "_write_stream_limits", ("builder", "space", "stream"), ("_write_application",), "credits a stream with what TP consumed; else a slow destination lets TP's memory fill"),
        PrivateName(Q, "_on_max_stream_data_delivery", ("delivery", "stream"), ("_write_stream_limits",), "the handler of the MAX_STREAM_DATA frames TP writes"),
        PrivateName(Q, "_replenish_connection_ids", (), ("_handle_retire_connection_id_frame",), "gives new connection IDs TP's reset tokens; else resets fail after a restart"),
        PrivateName(Q, "_host_cids", None, ("__init__", "_replenish_connection_ids"), "the server's connection IDs and their reset tokens"),
        PrivateName(Q, "_peer_cid", None, ("__init__",), "the client's reset tokens (stateless reset)"),
        PrivateName(Q, "_peer_cid_available", None, ("__init__",), "the client's reset tokens (stateless reset)"),
        PrivateName(Q, "_is_client", None, ("__init__",), "which side a connection is"),
        PrivateName(Q, "_streams", None, ("__init__",), "send buffers, for backpressure"),
        PrivateName(Q, "_local_max_data", None, ("__init__", "_write_connection_limits"), "the connection's receive budget"),
        PrivateName(Q, "_close_event", None, ("__init__", "close"), "the client reads why TP closed (tpproxy.connector.quicRefusal)"),
        PrivateName(QuicStreamSender, "_buffer", None, ("__init__",), "bytes not yet acknowledged, for backpressure"),
        PrivateName(QuicStreamSender, "_buffer_fin", None, ("__init__", "write"), "whether a FIN was written, for a close that waits for delivery"),
        PrivateName(Q, "datagrams_to_send", ("now",), (), "TP appends its path MTU probe"),
        PrivateName(Q, "_flush_builder", ("builder", "network_path", "peer_cid", "now"), ("datagrams_to_send",), f"registers a path MTU probe; {pmtu}"),
        PrivateName(Q, "_max_datagram_size", None, ("__init__", "datagrams_to_send"), f"the size datagrams are built to; {pmtu}"),
        PrivateName(Q, "_loss", None, ("__init__",), f"the congestion controller and pacer told the size; {pmtu}"),
        PrivateName(Q, "handle_timer", ("now",), (), "TP times out a path MTU probe and checks for a black hole after it"),
        PrivateName(Q, "get_timer", (), (), "TP adds a path MTU probe's deadline"),
        PrivateName(QuicPacketRecovery, "_pto_count", None, ("__init__", "on_loss_detection_timeout"), f"probe timeouts in a row, for a black hole; {pmtu}"),
        PrivateName(Q, "_network_paths", None, ("__init__", "datagrams_to_send"), f"the path probed, and whether it moved; {pmtu}"),
        PrivateName(Q, "_cryptos", None, ("__init__",), f"the 1-RTT keys a probe is sealed with; {pmtu}"),
        PrivateName(Q, "_handshake_confirmed", None, ("__init__",), f"probes wait for it; {pmtu}"),
        PrivateName(Q, "_packet_number", None, ("__init__", "datagrams_to_send"), f"a probe's packet number; {pmtu}"),
        PrivateName(Q, "_state", None, ("__init__", "datagrams_to_send"), f"no probe once the connection closes; {pmtu}"),
        PrivateName(Q, "_peer_token", None, ("__init__", "datagrams_to_send"), f"a probe's packet builder; {pmtu}"),
        PrivateName(Q, "_quic_logger", None, ("__init__", "datagrams_to_send"), f"a probe's packet builder; {pmtu}"),
        PrivateName(Q, "_spin_bit", None, ("__init__", "datagrams_to_send"), f"a probe's packet builder; {pmtu}"),
        PrivateName(Q, "_version", None, ("__init__", "datagrams_to_send"), f"a probe's packet builder; {pmtu}"),
        PrivateName(QuicPacketBuilder, "__init__", ("host_cid", "peer_cid", "version", "is_client", "max_datagram_size", "packet_number", "peer_token", "quic_logger", "spin_bit"), (), f"builds a probe; {pmtu}"),
        PrivateName(QuicPacketBuilder, "start_frame", ("frame_type", "capacity", "handler", "handler_args"), (), f"a probe's PING and its delivery handler; {pmtu}"),
        PrivateName(QuicPacketBuilder, "flush", (), (), f"a probe's packets, marked out of flight; {pmtu}"),
        PrivateName(QuicPacketRecovery, "on_packet_sent", ("packet", "space"), (), f"counts in flight and ack-eliciting from the packet's flags; {pmtu}"),
        PrivateName(RenoCongestionControl, "on_packet_acked", ("now", "packet"), (), f"wrapped to watch for a black hole; {pmtu}"),
        PrivateName(RenoCongestionControl, "on_packets_lost", ("now", "packets"), (), f"wrapped to watch for a black hole; {pmtu}"),
        PrivateName(CubicCongestionControl, "on_packet_acked", ("now", "packet"), (), f"wrapped to watch for a black hole; {pmtu}"),
        PrivateName(CubicCongestionControl, "on_packets_lost", ("now", "packets"), (), f"wrapped to watch for a black hole; {pmtu}"),
        PrivateName(QuicPacketRecovery, "_cc", None, ("__init__", "on_ack_received"), f"told the size; watched for a black hole; {pmtu}"),
        PrivateName(QuicPacketRecovery, "_pacer", None, ("__init__",), f"told the size; {pmtu}"),
        PrivateName(RenoCongestionControl, "_max_datagram_size", None, ("__init__", "on_packet_acked"), f"the window's quantum; {pmtu}"),
        PrivateName(CubicCongestionControl, "_max_datagram_size", None, ("__init__", "on_packet_acked"), f"the window's quantum; {pmtu}"),
        PrivateName(QuicPacketPacer, "_max_datagram_size", None, ("__init__", "update_rate"), f"the pacing quantum; {pmtu}"),
        PrivateName(QuicPacketBuilder, "_datagram_needs_padding", None, ("__init__", "_end_packet"), f"pads a probe to its size; {pmtu}"),
        PrivateName(QuicStream, "max_stream_data_local", None, ("__init__",), "a stream's receive limit"),
        PrivateName(QuicStream, "max_stream_data_local_sent", None, ("__init__",), "a stream's receive limit"),
        PrivateName(Limit, "used", None, ("__init__",), "the connection's receive budget"),
        PrivateName(Limit, "value", None, ("__init__",), "the connection's receive budget"),
    )


class _RefuseAll:
    """
    A verifier that refuses every client certificate, for L{selfCheck}.
    """

    def __init__(self) -> None:
        self.leaves: list[x509.Certificate] = []

    def check(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> Any:
        from tpproxy.verify import X509_V_ERR_CERT_REVOKED, Refusal

        self.leaves.append(leaf)
        return Refusal("self-check", X509_V_ERR_CERT_REVOKED)


def _selfCheckHandshake(withCertificate: bool) -> tuple[TPQuicConnection, TPQuicConnection, _RefuseAll]:
    """
    An in-memory handshake between a TP client and a TP server whose
    verifier refuses every certificate; the client sends one or not.
    """
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.create("TP QUIC self-check CA", days=1)
    server = ca.issue("localhost", dns=("localhost",), server=True)
    config = QuicConfiguration(is_client=True, alpn_protocols=[TP_ALPN], server_name="localhost")
    config.cadata = ca.certPEM
    if withCertificate:
        client = ca.issue("self-check", client=True)
        config.certificate, config.private_key = client.cert, client.key
    clientConn = TPQuicConnection(configuration=config)
    verifier = _RefuseAll()
    now = 1.0
    clientAddr, serverAddr = ("127.0.0.1", 1), ("127.0.0.1", 2)
    clientConn.connect(serverAddr, now=now)
    serverConn: TPQuicConnection | None = None
    for _ in range(10):
        moved = False
        for data, _ in clientConn.datagrams_to_send(now=now):
            if serverConn is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                serverConn = TPQuicConnection(
                    configuration=serverConfiguration([server.cert], server.key),
                    original_destination_connection_id=header.destination_cid,
                )
                serverConn.tpVerifier = verifier  # type: ignore[assignment]
            serverConn.receive_datagram(data, clientAddr, now=now)
            moved = True
        if serverConn is not None:
            for data, _ in serverConn.datagrams_to_send(now=now):
                clientConn.receive_datagram(data, serverAddr, now=now)
                moved = True
        if not moved:
            break
    assert serverConn is not None
    return clientConn, serverConn, verifier


def _closedWith(conn: TPQuicConnection) -> int | None:
    event = conn._close_event
    return None if event is None else event.error_code


def selfCheckProblems() -> list[str]:
    """
    Run TP's hooks on aioquic for real, in memory: a client whose
    certificate the verifier refuses, and one with no certificate, must be
    refused inside the handshake with the alert TLS would send
    (C{certificate_revoked}, C{certificate_required}).  What went
    otherwise, one line each.
    """
    import logging

    problems = []
    # aioquic logs each refusal as a warning: not news here.
    quiet = logging.getLogger("quic")
    wasDisabled, quiet.disabled = quiet.disabled, True
    revoked = 0x100 + int(tls.AlertDescription.certificate_revoked)
    required = 0x100 + int(tls.AlertDescription.certificate_required)
    try:
        client, server, verifier = _selfCheckHandshake(withCertificate=True)
        if not verifier.leaves:
            problems.append("the certificate hook did not run: the verifier never saw the client's certificate")
        if _closedWith(client) != revoked or server.tpRefusal != "self-check":
            problems.append(f"a refused certificate was not refused (client closed with {_closedWith(client)!r})")
        client, server, verifier = _selfCheckHandshake(withCertificate=False)
        if _closedWith(client) != required or server.tpRefusal != "no client certificate":
            problems.append(f"a client without a certificate was not refused (client closed with {_closedWith(client)!r})")
    except Exception as e:  # anything at all: the hooks do not work
        problems.append(f"the self-check handshake failed: {e.__class__.__name__}: {e}")
    finally:
        quiet.disabled = wasDisabled
    return problems


_quicChecked = False


def requireQuicPrivates() -> None:
    """
    Check, once per process, every private name of aioquic TP uses
    (L{privateProblems}), then run the hooks (L{selfCheckProblems}).
    Raise L{PrivateAPIError} naming what is wrong otherwise: TP does not
    serve QUIC without its checks.
    """
    global _quicChecked
    if _quicChecked:
        return
    problems = privateProblems(_aioquicPrivates())
    if not problems:
        problems = selfCheckProblems()
    if problems:
        import aioquic

        raise PrivateAPIError(
            f"TP cannot serve QUIC with aioquic {aioquic.__version__}: " + "; ".join(problems) + " (docs/private-apis.md)"
        )
    _quicChecked = True


class _PeerCertificate:
    """
    What C{transport.getPeerCertificate()} returns for a QUIC stream: the
    shape TP's protocols use of pyOpenSSL's X509.
    """

    def __init__(self, cert: x509.Certificate) -> None:
        self._cert = cert

    def to_cryptography(self) -> x509.Certificate:
        return self._cert


def _address(addr: Any) -> IPv4Address | IPv6Address:
    host, port = addr[0], addr[1]
    return IPv6Address("UDP", host, port) if ":" in host else IPv4Address("UDP", host, port)


@implementer(ITransport, IConsumer, IPushProducer)
class QuicStreamTransport:
    """
    One bidirectional QUIC stream as a Twisted transport with half-close:
    C{loseWriteConnection} sends FIN, a received FIN is
    C{readConnectionLost}; C{connectionLost} comes when both directions
    have ended, or at once on a reset or the end of the connection.
    """

    negotiatedProtocol = ALPN
    disconnecting = False
    carrier = "quic"

    def __init__(self, session: QuicSession, streamId: int) -> None:
        self.session = session
        self.streamId = streamId
        self.protocol: Any = None
        self.producer: Any = None
        self.producerPaused = False
        self.paused = False
        self.held: list[bytes] = []
        self.heldEOF = False
        self.finSent = False
        self.finReceived = False
        self.lost = False
        session.conn.tpConsumed[streamId] = 0

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    # --- ITransport ---------------------------------------------------------

    def _send(self, data: bytes, end: bool = False) -> bool:
        try:
            self.session.conn.send_stream_data(self.streamId, data, end_stream=end)
        except (RuntimeError, AssertionError, ValueError):
            # The stream was reset, or the peer stopped it (STOP_SENDING):
            # nothing more can be sent on it.
            self.finSent = True
            return False
        return True

    def write(self, data: bytes) -> None:
        if self.finSent or self.lost or not data:
            return
        if not self._send(data):
            return
        self.session.transmitSoon()
        if self.producer is not None and not self.producerPaused:
            if self.session.conn.sendBuffered(self.streamId) > SEND_HIGH_WATER:
                self.producerPaused = True
                self.session.blocked.add(self)
                self.producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        if self.finSent or self.lost:
            return
        self._send(b"", end=True)
        self.finSent = True
        self.session.transmitSoon()
        self._maybeDone()

    def loseConnection(self) -> None:
        if self.lost:
            return
        self.disconnecting = True
        self.loseWriteConnection()
        if not self.finReceived and not self.lost:
            # Nothing more is wanted from the peer.
            self.session.conn.stop_stream(self.streamId, STREAM_ABORTED)
            self.session.transmitSoon()
            self._lose(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        if self.lost:
            return
        conn = self.session.conn
        if not self.finSent:
            conn.reset_stream(self.streamId, STREAM_ABORTED)
        if not self.finReceived:
            conn.stop_stream(self.streamId, STREAM_ABORTED)
        self.session.transmitSoon()
        self._lose(Failure(ConnectionLost("stream aborted")))

    def getPeer(self) -> Any:
        return _address(self.session.peer)

    def getHost(self) -> Any:
        return self.session.host()

    def getPeerCertificate(self) -> _PeerCertificate | None:
        cert = self.session.peerCertificate
        return None if cert is None else _PeerCertificate(cert)

    # --- producer / consumer -------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.producerPaused = False

    def unregisterProducer(self) -> None:
        self.producer = None
        self.session.blocked.discard(self)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        held, self.held = self.held, []
        for i, chunk in enumerate(held):
            if self.paused or self.lost:
                # Paused again by what we delivered: keep the rest, in order.
                self.held = held[i:] + self.held
                break
            self._deliver(chunk)
        if self.heldEOF and not self.paused and not self.held:
            self.heldEOF = False
            self._eof()
        self.session.transmitSoon()

    def stopProducing(self) -> None:
        self.abortConnection()

    def checkSendBuffer(self) -> None:
        if self.producer is not None and self.producerPaused:
            if self.session.conn.sendBuffered(self.streamId) < SEND_LOW_WATER:
                self.producerPaused = False
                self.session.blocked.discard(self)
                self.producer.resumeProducing()

    # --- from the session ----------------------------------------------------

    def received(self, data: bytes, end: bool) -> None:
        if self.lost:
            return
        if data:
            if self.paused or self.held:
                self.held.append(data)
            else:
                self._deliver(data)
        if end:
            if self.paused or self.held:
                self.heldEOF = True
            else:
                self._eof()

    def _deliver(self, data: bytes) -> None:
        self.session.conn.tpConsumed[self.streamId] = self.session.conn.tpConsumed.get(self.streamId, 0) + len(data)
        self.protocol.dataReceived(data)

    def _eof(self) -> None:
        self.finReceived = True
        readLost = getattr(self.protocol, "readConnectionLost", None)
        if readLost is not None:
            readLost()
        else:
            self.loseConnection()
        self._maybeDone()

    def reset(self) -> None:
        self._lose(Failure(ConnectionLost("the peer reset the stream")))

    def _maybeDone(self) -> None:
        if self.finSent and self.finReceived:
            self._lose(Failure(ConnectionDone()))

    def _lose(self, reason: Failure) -> None:
        if self.lost:
            return
        self.lost = True
        self.session.streamEnded(self)
        # Like Twisted's own transports, never call connectionLost from
        # inside loseConnection: TLS stacked on a stream relies on that.
        self.session.clock.callLater(0, self.protocol.connectionLost, reason)


class QuicSession:
    """
    One QUIC connection, client or server side: feeds datagrams in, sends
    what aioquic wants sent, keeps the timer, and dispatches events.

    @param send: C{send(data, addr)} puts one datagram on the wire.
    """

    peerCertificate: x509.Certificate | None = None
    abandoned = False
    #: C{sendBatch([(data, addr), ...])} puts what aioquic wants sent on
    #: the wire and says which size the kernel refused as too big
    #: (L{DatagramSender}), where the session's socket has one; else each
    #: datagram goes to C{send}.
    sendBatch: Callable[[list[tuple[bytes, Any]]], int | None] | None = None

    def __init__(self, conn: TPQuicConnection, send: Callable[[bytes, Any], None], clock: IReactorTime, peer: Any) -> None:
        self.conn = conn
        self.send = send
        self.clock = clock
        self.peer = peer
        self.streams: dict[int, QuicStreamTransport] = {}
        self.blocked: set[QuicStreamTransport] = set()
        #: UDP flows by quarter stream ID (tpproxy.transports.udp).
        self.flows: dict[int, Any] = {}
        self._timer: Any = None
        self._flush: Any = None
        self.closed = False
        self.localAddress: Any = None

    def host(self) -> Any:
        return self.localAddress

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.abandoned:
            return
        self.peer = addr
        self.conn.receive_datagram(data, addr, now=self.clock.seconds())
        # One transmit for all the datagrams read in this reactor turn
        # (Twisted reads a batch per readiness event): ACKs and data for a
        # batch go out together instead of after every datagram.
        self.process(transmit=False)
        # An ACK may complete what a closeWhenDelivered waits for.
        self._checkDelivered()
        self.transmitSoon()

    def process(self, transmit: bool = True) -> None:
        while True:
            event = self.conn.next_event()
            if event is None:
                break
            self.handleEvent(event)
        for stream in list(self.blocked):
            stream.checkSendBuffer()
        if transmit:
            self.transmit()

    def handleEvent(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                stream = self.newStream(event.stream_id)
                if stream is None:
                    return
            stream.received(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset()
        elif isinstance(event, events.HandshakeCompleted):
            self.peerCertificate = self.conn.tls._peer_certificate
            self.handshakeCompleted(event)
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated(event)
        elif isinstance(event, events.DatagramFrameReceived):
            self.datagramFrameReceived(event.data)
        elif isinstance(event, events.ConnectionIdIssued):
            self.connectionIdIssued(event.connection_id)
        elif isinstance(event, events.ConnectionIdRetired):
            self.connectionIdRetired(event.connection_id)

    # Hooks for the server and client sides.

    def newStream(self, streamId: int) -> QuicStreamTransport | None:
        return None

    def openStream(self, protocol: Any) -> QuicStreamTransport:
        """
        Open a bidirectional stream of our own, carrying C{protocol}.
        """
        streamId = self.conn.get_next_available_stream_id()
        stream = QuicStreamTransport(self, streamId)
        self.streams[streamId] = stream
        stream.attach(protocol)
        self.transmitSoon()
        return stream

    def handshakeCompleted(self, event: events.HandshakeCompleted) -> None:
        pass

    def datagramFrameReceived(self, data: bytes) -> None:
        from tpproxy.transports.udp import deliverFlowDatagram

        deliverFlowDatagram(self.flows, data)

    def sendFlowDatagram(self, quarterId: int, payload: bytes) -> None:
        from tpproxy.transports.udp import encodeFlowDatagram

        if self.closed:
            return
        self.conn.send_datagram_frame(encodeFlowDatagram(quarterId, payload))
        self.transmitSoon()

    def connectionIdIssued(self, cid: bytes) -> None:
        pass

    def connectionIdRetired(self, cid: bytes) -> None:
        pass

    def terminated(self, event: events.ConnectionTerminated) -> None:
        self.closed = True
        self._checkDelivered()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        reason = Failure(ConnectionLost(f"QUIC connection closed: {event.reason_phrase or event.error_code}"))
        for stream in list(self.streams.values()):
            stream._lose(reason)

    def streamEnded(self, stream: QuicStreamTransport) -> None:
        self.streams.pop(stream.streamId, None)
        self.blocked.discard(stream)
        self.conn.tpConsumed.pop(stream.streamId, None)

    #: Set by L{closeWhenDelivered}: (reason, grace timer, Deferred).
    _delivering: tuple[str, Any, defer.Deferred[None]] | None = None

    def delivered(self) -> bool:
        """
        Whether the peer has acknowledged everything written on this
        connection's streams: their data, and the FIN where one was written.
        """
        # aioquic's _streams and its senders' _buffer/_buffer_fin (checked
        # with TP's other aioquic privates).
        for stream in self.conn._streams.values():
            sender = stream.sender
            if len(sender._buffer) or (sender._buffer_fin is not None and not sender.is_finished):
                return False
        return True

    def closeWhenDelivered(self, reason: str, grace: float = 2.0) -> defer.Deferred[None]:
        """
        Close the connection once L{delivered}, or after C{grace} seconds,
        whichever comes first; fires once CONNECTION_CLOSE went out.
        Closing at once would drop the tail of what the peer has not
        acknowledged yet: a packet lost just before the close is never
        sent again (C{tp connect}'s end, L{tpproxy.connector.Connector.finish},
        and the P2P direct path's, L{tpproxy.p2p.ice._DirectEnd.close}).
        """
        if self._delivering is not None:
            return _chained(self._delivering[2])
        done: defer.Deferred[None] = defer.Deferred()
        if self.closed or self.conn._state in END_STATES:
            done.callback(None)
            return done
        timer = self.clock.callLater(grace, self._closeDelivering)
        self._delivering = (reason, timer, done)
        self._checkDelivered()
        return _chained(done)

    def _checkDelivered(self) -> None:
        if self._delivering is not None and (self.closed or self.delivered()):
            self._closeDelivering()

    def _closeDelivering(self) -> None:
        delivering, self._delivering = self._delivering, None
        if delivering is None:
            return
        reason, timer, done = delivering
        if timer.active():
            timer.cancel()
        if not self.closed:
            self.close(0, reason)
        done.callback(None)

    # Sending.

    def transmitSoon(self) -> None:
        """
        Send at the end of this reactor turn, so that the writes of one turn
        go out in as few packets as possible.
        """
        if self._flush is None and not (self.closed and self._timer is None):
            self._flush = self.clock.callLater(0, self._flushNow)

    def _flushNow(self) -> None:
        self._flush = None
        self.transmit()

    def transmit(self) -> None:
        if self.abandoned:
            return
        now = self.clock.seconds()
        datagrams = self.conn.datagrams_to_send(now=now)
        if self.sendBatch is None:
            for data, addr in datagrams:
                self.send(data, addr)
        elif datagrams:
            tooBig = self.sendBatch(datagrams)
            if tooBig is not None:
                # Larger than the route's MTU: a path MTU probe, or a route
                # that shrank.
                self.conn.datagramTooBig(tooBig)
        when = self.conn.get_timer()
        if self._timer is not None and self._timer.active():
            if when is None:
                self._timer.cancel()
                self._timer = None
                return
            self._timer.reset(max(0.0, when - now))
        elif when is not None:
            self._timer = self.clock.callLater(max(0.0, when - now), self._onTimer)

    def _onTimer(self) -> None:
        self._timer = None
        self.conn.handle_timer(now=self.clock.seconds())
        self.process()


    def close(self, code: int = 0, reason: str = "") -> None:
        if not self.closed:
            self.conn.close(error_code=code, reason_phrase=reason)
            self.transmit()

    def abandon(self) -> None:
        """
        Stop all timers: for a process or listener going away, after
        L{close} has sent CONNECTION_CLOSE (the draining period is skipped).
        """
        self.closed = True
        self.abandoned = True
        for name in ("_timer", "_flush", "_pinger"):
            call = getattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)


# --- the server ---------------------------------------------------------------


def serverConfiguration(chain: list[x509.Certificate], key: Any, idleTimeout: float = 60.0) -> QuicConfiguration:
    """
    The QUIC server configuration: ALPN tp/1, TP's certificate, DATAGRAM
    frames on, and no session tickets (no resumption, so no 0-RTT: every
    connection proves its client certificate).
    """
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN.decode()],
        max_datagram_frame_size=65536,
        idle_timeout=idleTimeout,
    )
    config.certificate = chain[0]
    config.certificate_chain = chain[1:]
    config.private_key = key
    return config


#: The QUIC events of an h3 connection that go to its H3 responder, and
#: never to TP's stream logic.
_H3_EVENTS = (events.StreamDataReceived, events.StreamReset, events.StopSendingReceived, events.DatagramFrameReceived)


class ServerSession(QuicSession):
    """
    A client's QUIC connection to TP.  With ALPN tp/1, each bidirectional
    stream the client opens gets its own TP server protocol, exactly as a
    TLS connection would, with the connection's client certificate as its
    identity.  With ALPN h3 (when the listener has an H3 response), the
    connection's streams and datagrams all go to an L{H3Responder}.
    """

    #: The HTTP/3 responder of an h3 connection, else C{None}.
    responder: H3Responder | None = None

    def __init__(self, listener: QuicListener, conn: TPQuicConnection, peer: Any, prefix: str = "") -> None:
        super().__init__(conn, listener.sendDatagram, listener.reactor, peer)
        self.sendBatch = listener.sendBatch
        self.listener = listener
        self.localAddress = listener.transport.getHost() if listener.transport else None
        self.identity: str | None = None
        self.started = listener.reactor.seconds()
        #: The source prefix this connection counts against while half-open.
        self.prefix = prefix
        #: Until the handshake completes: a place in the listener's count
        #: of half-open connections, and a deadline.
        self.halfOpen = False
        self.deadline: Any = None
        #: The connection IDs under which the listener knows this session.
        self.cids: set[bytes] = set()

    def firstDatagram(self, data: bytes, addr: Any) -> bool:
        """
        Feed the datagram that made this session.  C{False} if nothing came
        of it (it did not decrypt, or held nothing to answer): the listener
        then drops the session, which has sent nothing and set no timer.
        """
        now = self.clock.seconds()
        self.conn.receive_datagram(data, addr, now=now)
        out = self.conn.datagrams_to_send(now=now)
        if not out:
            return False
        for datagram, to in out:
            self.send(datagram, to)
        self.process()
        return not self.closed

    def startDeadline(self, timeout: float) -> None:
        self.halfOpen = True
        self.deadline = self.clock.callLater(timeout, self.handshakeExpired, timeout)

    def handshakeExpired(self, timeout: float) -> None:
        """
        The handshake did not complete in time: close, and forget at once
        (no draining period for a connection that never authenticated).
        """
        self.deadline = None
        self._auditFailure(f"no QUIC handshake within {timeout:g} s")
        self.close(CLOSE_REFUSED, "handshake timeout")
        self.listener.forget(self)
        self.abandon()

    def _auditFailure(self, detail: str) -> None:
        from tpproxy.protocols.server import audit

        audit.info(
            "{identity} {destination}: {result}{detail_sep}{detail}",
            event="quic",
            peer=str(_address(self.peer)),
            identity=None,
            serial=None,
            destination=None,
            transport="quic",
            address=None,
            result="handshake_failed",
            detail=detail,
            detail_sep=" - ",
            bytes_up=0,
            bytes_down=0,
            duration=round(self.listener.reactor.seconds() - self.started, 3),
        )

    def abandon(self) -> None:
        super().abandon()
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def handleEvent(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ProtocolNegotiated):
            # Emitted inside the handshake, before any stream can exist.
            if event.alpn_protocol == H3_ALPN and self.conn.tpAnonymous:
                if self.listener.webtransport is not None:
                    from tpproxy.transports.webtransport import WebTransportResponder

                    from tpproxy.protocols.relay import describeAddress

                    self.responder = WebTransportResponder(
                        self.conn, self.listener.h3, describeAddress(_address(self.peer)), self, self.listener.webtransport
                    )
                elif self.listener.h3 is not None:
                    self.responder = H3Responder(self.conn, self.listener.h3, str(_address(self.peer)))
            return
        if self.responder is not None and isinstance(event, _H3_EVENTS):
            self.responder.handleEvent(event)
            return
        super().handleEvent(event)

    def handshakeCompleted(self, event: events.HandshakeCompleted) -> None:
        self.listener.handshakeDone(self)
        if event.alpn_protocol != TP_ALPN:
            if self.responder is None:
                # Cannot happen: the listener offers h3 only with a responder.
                self.close(CLOSE_REFUSED, "no application protocol")
            else:
                log.debug("HTTP/3 connection from {peer}", peer=_address(self.peer))
            return
        if self.peerCertificate is None:
            # Cannot happen: the handshake hook refuses a missing one.
            self.close(CLOSE_REFUSED, "client certificate required")
            return
        self.identity = identityOf(self.peerCertificate).name
        log.info("QUIC connection from {peer} as {identity}", peer=_address(self.peer), identity=self.identity)
        self.conn.enablePathMTU(self.listener.maxDatagramSize)

    def newStream(self, streamId: int) -> QuicStreamTransport | None:
        if self.identity is None or streamId % 4 != 0 or self.conn.tls.alpn_negotiated != TP_ALPN:
            # Only client-initiated bidirectional streams, after the handshake
            # of a tp/1 connection with a client certificate.
            self.conn.stop_stream(streamId, STREAM_ABORTED)
            return None
        refused = self.certificateRefusal()
        if refused is not None:
            # A reload denied or revoked the identity since the handshake
            # (its live tunnels were closed then), or the certificate
            # expired: no new tunnel, and the connection ends.
            log.info("QUIC connection of {identity} from {peer} closed: {reason}", identity=self.identity, peer=_address(self.peer), reason=refused)
            self.conn.stop_stream(streamId, STREAM_ABORTED)
            self.close(CLOSE_REFUSED, refused[:100])
            return None
        stream = QuicStreamTransport(self, streamId)
        self.streams[streamId] = stream
        protocol = self.listener.factory.buildProtocol(_address(self.peer))
        stream.attach(protocol)
        protocol.handshakeCompleted()
        return stream

    def certificateRefusal(self) -> str | None:
        """
        Why this connection's client certificate would be refused now, or
        C{None}: checked for each new stream, since a connection outlives
        reloads (L{refusedNow}).
        """
        if self.peerCertificate is None:
            return "no client certificate"
        refused = refusedNow(self.listener.factory, self.peerCertificate)
        return None if refused is None else f"the client certificate is refused now: {refused}"

    def connectionIdIssued(self, cid: bytes) -> None:
        self.listener.register(self, cid)

    def connectionIdRetired(self, cid: bytes) -> None:
        self.listener.unregister(self, cid)

    def terminated(self, event: events.ConnectionTerminated) -> None:
        super().terminated(event)
        refusal = self.conn.tpRefusal
        ended = getattr(self.responder, "terminated", None)
        if ended is not None:
            ended(f"the QUIC connection closed: {event.reason_phrase or event.error_code}")
        if self.responder is not None:
            # A browser's connection: no TP identity, nothing to audit.
            log.debug(
                "HTTP/3 connection from {peer} ended: {reason}",
                peer=_address(self.peer),
                reason=event.reason_phrase or f"error {event.error_code:#x}",
            )
        elif refusal is not None or self.identity is None:
            self._auditFailure(refusal or f"QUIC handshake failed: {event.reason_phrase or event.error_code}")
        self.listener.forget(self)
        self.abandon()


def refusedNow(factory: Any, cert: x509.Certificate) -> str | None:
    """
    Why C{cert}, accepted earlier (in a handshake, or in a WebTransport
    token), would be refused now by C{factory}'s TP: expired (with
    C{server.disconnect_expired_cert}), or denied or revoked by the current
    deny lists and CRLs; C{None} if it still passes.
    """
    from tpproxy.verify import leafRefusal

    config = getattr(factory, "config", None)
    wallClock = getattr(factory, "wallClock", time.time)
    if getattr(config, "disconnectExpiredCert", True) and cert.not_valid_after_utc.timestamp() <= wallClock():
        return "it expired"
    serverTLS = getattr(factory, "serverTLS", None)
    refused = leafRefusal(serverTLS.checker, cert) if serverTLS is not None else None
    return None if refused is None else refused.reason


#: The largest datagram TP's QUIC sockets read: what a path MTU search
#: may reach (tpproxy.transports.pmtu), with room to spare.
RECEIVE_SIZE = 65536

#: Linux's IP_MTU_DISCOVER, IPV6_MTU_DISCOVER and their PMTUDISC_PROBE
#: value: not in Python's socket module.  PROBE sets DF and never
#: fragments, like DO, but ignores the path MTU learnt from ICMP "packet
#: too big": anyone can forge one (the review showed one spoofed ICMP
#: making every send to a client's address, 1200 bytes included, fail with
#: EMSGSIZE for 10 minutes under DO).  TP's probes find the path MTU.
_IP_MTU_DISCOVER, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE = 10, 23, 3


def _bigBuffers(transport: Any) -> None:
    """
    4 MiB UDP socket buffers: drops under load halve the congestion window
    (measured: ~0.1 % drops on the client with the 208 KiB default).  And
    never fragment: a datagram larger than the interface's MTU fails with
    C{EMSGSIZE} instead of going out in IP fragments, so that a path MTU
    probe measures the path (RFC 9000 section 14: QUIC sets DF), and no
    forged ICMP lowers what TP may send (L{_PMTUDISC_PROBE}).
    """
    import socket

    sock = transport.getHandle()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
        except OSError:
            pass
    if not sys.platform.startswith("linux"):
        return
    options = [(socket.IPPROTO_IP, _IP_MTU_DISCOVER)]
    if getattr(sock, "family", None) == socket.AF_INET6:
        # Both: a dual-stack socket sends IPv4 too.
        options.append((socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER))
    for level, option in options:
        try:
            sock.setsockopt(level, option, _PMTUDISC_PROBE)
        except OSError:
            pass


#: Send errors that drop the datagram, as Twisted's UDP port does: QUIC
#: resends what is lost.
_DROPPED = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.EINTR})


class DatagramSender:
    """
    Puts the datagrams of one C{datagrams_to_send()} on a UDP port,
    straight on its socket (on a port with no real socket, the tests'
    memory ports, through its C{write}).

    A datagram the kernel refuses as larger than the route's MTU
    (C{EMSGSIZE}: TP's QUIC sockets never fragment) is reported to the
    caller, for the path MTU search; other errors drop the datagram.  (UDP
    GSO, one C{sendmsg} for a run of equal-size datagrams, was measured
    here and dropped: no gain, the time goes to aioquic's Python per
    packet, not to system calls; benchmarks/README.md.)
    """

    def __init__(self, port: Any, connected: bool = False, refused: Callable[[], None] | None = None) -> None:
        import socket

        self.port = port
        getHandle = getattr(port, "getHandle", None)
        handle = getHandle() if getHandle is not None else None
        self.socket = handle if isinstance(handle, socket.socket) else None
        self.connected = connected
        self.refused = refused

    def send(self, datagrams: list[tuple[bytes, Any]]) -> int | None:
        """
        Send C{datagrams} (data and address; the address is ignored on a
        connected port), in order.

        @return: the size of a datagram refused as too big, if any (the
            others are sent all the same), else L{None}.
        """
        tooBig = None
        sock = self.socket
        for data, addr in datagrams:
            try:
                if sock is None:
                    self.port.write(data, None if self.connected else addr)
                elif self.connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except MessageLengthError:
                tooBig = len(data)
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    tooBig = len(data)
                elif e.errno == errno.ECONNREFUSED and self.refused is not None:
                    self.refused()
                    return tooBig
                elif e.errno not in _DROPPED:
                    log.debug("QUIC send to {addr} failed: {error}", addr=addr, error=e)
        return tooBig


class QuicListener(DatagramProtocol):
    """
    TP's QUIC listener: demultiplexes datagrams to connections by
    connection ID, as aioquic's own asyncio server does.

    @param factory: builds the TP server protocol for each stream (the same
        L{TPServerFactory} the TLS listener uses).
    @param h3: with a response, the listener also offers ALPN C{h3} (after
        C{tp/1}, so a client offering both gets tp/1) and answers HTTP/3
        requests with it (L{tpproxy.transports.h3}), without asking for a client
        certificate.  tp/1 connections are as strict as without it.
    """

    #: The largest datagram the path MTU search of a tp/1 connection may
    #: reach (server.quic_max_datagram_size); 1200 turns the search off.
    maxDatagramSize = PMTU_DEFAULT_MAX

    def __init__(
        self,
        reactor: IUDPReactor,
        configuration: QuicConfiguration,
        verifier: ClientVerifier,
        factory: Any,
        h3: H3Response | None = None,
        limits: LimitsConfig | None = None,
        handshakeTimeout: float = 10.0,
        resetSecret: bytes | None = None,
    ) -> None:
        requireQuicPrivates()
        protocols = list(configuration.alpn_protocols or [])
        if h3 is not None and H3_ALPN not in protocols:
            configuration = dataclasses.replace(configuration, alpn_protocols=protocols + [H3_ALPN])
        elif h3 is None and H3_ALPN in protocols:
            raise ValueError("the QUIC configuration offers h3, but there is no H3 response")
        self.h3 = h3
        #: With C{[webtransport]}: the L{tpproxy.webtoken.Gate} of browser
        #: sessions (L{useWebTransport}).
        self.webtransport: Any = None
        #: WebTransport CONNECTs: accepted, and refused by reason.
        self.webtransportSessions: dict[str, int] = {}
        self.reactor = reactor
        self.configuration = configuration
        self.verifier = verifier
        self.factory = factory
        self.sessions: dict[bytes, ServerSession] = {}
        #: With C{[router.h3] backend}: the routing of other QUIC
        #: connections to that HTTP/3 server (L{useH3Backend}).
        self.h3backend: Any = None
        #: Client addresses answered through another instance, and how
        #: (L{datagramReceived}'s C{via}), oldest first.
        self.returnVia: dict[Any, Callable[[bytes, Any], None]] = {}
        self.limits = limits if limits is not None else LimitsConfig()
        self.handshakeTimeout = handshakeTimeout
        #: Half-open connections (docs/hardening.md), against the caps.
        self.halfOpen = HalfOpenCounter(self.limits.quicHandshakes, self.limits.quicHandshakesPerSource)
        self.retryTokens = QuicRetryTokenHandler()
        self.resetSecret = resetSecret if resetSecret is not None else os.urandom(32)
        self.resets = TokenBucket(RESET_RATE, RESET_BURST)
        self.stunBucket = TokenBucket(STUN_RATE, STUN_BURST)
        #: STUN binding requests: answered, malformed, rate_limited.
        self.stun: dict[str, int] = {}
        self._refusals = RateLimitedLog()
        #: What the listener turned away, by kind (for logs and benchmarks).
        self.dropped: dict[str, int] = {}
        #: New-connection Initials in this second and the one before.
        self._second = 0
        self._attempts = 0
        self._attemptsBefore = 0

    def useH3Backend(self, address: tuple[str, int]) -> None:
        """
        Pass every QUIC connection that does not offer ALPN C{tp/1} to the
        HTTP/3 server at C{address}, untouched
        (L{tpproxy.transports.h3backend}).
        """
        from tpproxy.transports.h3backend import H3Backend

        if self.h3 is not None:
            raise ValueError("an HTTP/3 backend and TP's own HTTP/3 answer exclude each other")
        self.h3backend = H3Backend(
            self.reactor, self.reactor, address, self._initialForTP, self.sendOut,
            lambda alpn: TP_ALPN in alpn, self.configuration.connection_id_length,
        )

    def useWebTransport(self, gate: Any) -> None:
        """
        Also serve WebTransport sessions of browsers (ALPN C{h3}, no client
        certificate asked; identity from a token C{gate} checks:
        L{tpproxy.transports.webtransport}).
        """
        if self.h3backend is not None:
            raise ValueError("WebTransport and an HTTP/3 backend exclude each other")
        self.webtransport = gate
        protocols = list(self.configuration.alpn_protocols or [])
        if H3_ALPN not in protocols:
            self.configuration = dataclasses.replace(self.configuration, alpn_protocols=protocols + [H3_ALPN])

    def webtransportAccepted(self) -> None:
        self.webtransportSessions["accepted"] = self.webtransportSessions.get("accepted", 0) + 1

    def webtransportRefused(self, reason: str) -> None:
        self.webtransportSessions[reason] = self.webtransportSessions.get(reason, 0) + 1

    def _initialForTP(self, data: bytes, addr: Any) -> None:
        """
        An Initial datagram whose ClientHello offers C{tp/1}, read by the
        HTTP/3 backend's router: TP's own.
        """
        header = pull_quic_header(Buffer(data=data), host_cid_length=self.configuration.connection_id_length)
        session = self.sessions.get(header.destination_cid)
        if session is not None:
            session.datagramReceived(data, addr)
        else:
            self._admit(header, data, addr)

    def _admit(self, header: Any, data: bytes, addr: Any) -> None:
        """
        A client's Initial for a new TP connection: none while draining.
        """
        if self.draining:
            self._drop("draining")
            return
        self._newConnection(header, data, addr)

    def setCertificate(self, chain: list[x509.Certificate], key: Any) -> None:
        """
        Serve C{chain} to connections made from now on; live connections
        keep the configuration they started with.
        """
        self.configuration = dataclasses.replace(
            self.configuration, certificate=chain[0], certificate_chain=chain[1:], private_key=key
        )

    #: A graceful stop is under way: no new connections, the live ones
    #: finish (tpproxy.service.DrainService).
    draining = False
    #: In a cluster: C{forward(slot, datagram, addr)}, which hands a
    #: packet for another instance's connection to it and says whether it
    #: could (L{tpproxy.cluster.quicroute.QuicRouter}).
    forward: Any = None
    #: Packets handed to another instance.
    forwarded = 0
    #: At most this many client addresses are answered through another
    #: instance (L{returnVia}); the oldest is forgotten first.
    MAX_RETURN_PATHS = 65536

    def reconfigure(
        self, cas: list[x509.Certificate], checker: Any, limits: LimitsConfig, handshakeTimeout: float, chain: list[x509.Certificate], key: Any
    ) -> None:
        """
        A reload: client CAs, certificate checks, limits and the handshake
        deadline for connections made from now on (L{tpproxy.reload});
        live connections are judged by the reload itself.
        """
        self.verifier = ClientVerifier(cas, checker, self.reactor)
        self.limits = limits
        self.halfOpen.total = limits.quicHandshakes
        self.halfOpen.perSource = limits.quicHandshakesPerSource
        self.handshakeTimeout = handshakeTimeout
        self.setCertificate(chain, key)

    #: The UDP port, kept past C{transport}: Twisted's DatagramProtocol
    #: drops C{transport} just before L{stopProtocol}, while the socket is
    #: still open, and the goodbyes of a stopping server go out then.
    _port: Any = None

    def startProtocol(self) -> None:
        self._port = self.transport
        _bigBuffers(self.transport)

    _sender: DatagramSender | None = None

    def sendBatch(self, datagrams: list[tuple[bytes, Any]]) -> int | None:
        """
        Send a connection's datagrams (L{DatagramSender.send}), those to a
        client whose packets came through another instance back through it
        (L{returnVia}).
        """
        if self.returnVia:
            direct = []
            for data, addr in datagrams:
                via = self.returnVia.get(addr)
                if via is None:
                    direct.append((data, addr))
                else:
                    via(data, addr)
            datagrams = direct
        port = self.transport if self.transport is not None else self._port
        if port is None:
            return None
        if self._sender is None or self._sender.port is not port:
            self._sender = DatagramSender(port)
        return self._sender.send(datagrams)

    def sendDatagram(self, data: bytes, addr: Any) -> None:
        """
        Send C{data} to C{addr}: from this socket, or, for a client whose
        packets arrive through another instance behind a NAT
        (L{returnVia}), back through that instance.
        """
        via = self.returnVia.get(addr) if self.returnVia else None
        if via is not None:
            via(data, addr)
            return
        self.sendOut(data, addr)

    def sendOut(self, data: bytes, addr: Any) -> None:
        """
        Send C{data} to C{addr} from this socket.
        """
        port = self.transport if self.transport is not None else self._port
        if port is None:
            return
        try:
            port.write(data, addr)
        except (OSError, AttributeError, MessageLengthError) as e:
            # AttributeError: the port's socket is already gone.
            log.debug("QUIC send to {addr} failed: {error}", addr=addr, error=e)

    def datagramReceived(self, data: bytes, addr: Any, forwarded: bool = False, via: Callable[[bytes, Any], None] | None = None) -> None:
        """
        A datagram from C{addr}.

        @param forwarded: another instance received it and handed it here
            (L{tpproxy.cluster.quicroute.QuicRouter}), so it is never
            handed on.
        @param via: sends a datagram back through that instance: answers
            to C{addr} go that way until a packet from C{addr} arrives
            otherwise (L{returnVia}).
        """
        if data and data[0] < 4:
            # STUN, not QUIC (RFC 7983): a binding request for the
            # client's reflexive address (tpproxy.stun).
            self._stun(data, addr)
            return
        if via is not None:
            self.returnVia.pop(addr, None)
            self.returnVia[addr] = via
            if len(self.returnVia) > self.MAX_RETURN_PATHS:
                del self.returnVia[next(iter(self.returnVia))]
        elif self.returnVia:
            self.returnVia.pop(addr, None)
        buf = Buffer(data=data)
        try:
            header = pull_quic_header(buf, host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in self.configuration.supported_versions
        ):
            self.sendDatagram(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=self.configuration.supported_versions,
                ),
                addr,
            )
            return
        session = self.sessions.get(header.destination_cid)
        if session is not None:
            session.datagramReceived(data, addr)
            return
        backend = self.h3backend
        if backend is not None:
            flow = backend.flowOf(data, addr, header.destination_cid, not data[0] & 0x80)
            if flow is not None:
                backend.fromClient(flow, data)
                return
        if self.forward is not None and not forwarded and header.packet_type != QuicPacketType.INITIAL:
            owner = slotOf(header.destination_cid)
            if owner is not None and self.forward(owner, data, addr):
                # Another instance's connection, whose client's address
                # changed (docs/cluster.md): that instance answers it.
                # (A slot no live instance holds gets nothing: the packet
                # is then answered as one for an unknown connection.)
                self.forwarded += 1
                return
        if backend is not None and header.packet_type != QuicPacketType.INITIAL:
            # Not TP's (docs/quic.md): the HTTP/3 server's.
            backend.forward(data, addr)
            return
        if not data[0] & 0x80:
            self._statelessReset(header.destination_cid, len(data), addr)
            return
        if len(data) < 1200 or header.packet_type != QuicPacketType.INITIAL:
            return
        if backend is not None:
            backend.initial(data, addr, header.destination_cid)
            return
        self._admit(header, data, addr)

    def _stun(self, data: bytes, addr: Any) -> None:
        from tpproxy.stun import NotStun, answer

        try:
            response = answer(data, addr[0], addr[1])
        except NotStun as e:
            self.stun["malformed"] = self.stun.get("malformed", 0) + 1
            log.debug("STUN from {addr} not answered: {why}", addr=addr, why=e)
            return
        if not self.stunBucket.take(self.reactor.seconds()):
            self.stun["rate_limited"] = self.stun.get("rate_limited", 0) + 1
            return
        self.stun["answered"] = self.stun.get("answered", 0) + 1
        self.sendOut(response, addr)

    def _drop(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1

    def _busy(self, now: float) -> bool:
        """
        Count one new-connection Initial; are they coming faster than
        L{RETRY_RATE} a second?
        """
        second = int(now)
        if second != self._second:
            self._attemptsBefore = self._attempts if second == self._second + 1 else 0
            self._second, self._attempts = second, 0
        self._attempts += 1
        return max(self._attempts, self._attemptsBefore) > RETRY_RATE

    def _newConnection(self, header: Any, data: bytes, addr: Any) -> None:
        """
        An Initial for no known connection: validate the address (Retry)
        when many handshakes are open or many Initials arrive, take a
        half-open place, and keep a session only if the datagram decrypts
        and gets an answer.
        """
        now = self.reactor.seconds()
        busy = self._busy(now)
        originalCID = header.destination_cid
        retryCID = None
        if header.token:
            try:
                originalCID = self.retryTokens.validate_token(
                    address=_bareAddress(addr), destination_cid=header.destination_cid, token=header.token, now=now
                )
            except ValueError as e:
                # Forged, replayed from elsewhere, or late: no state, no
                # answer (an answer would serve a spoofed source).
                self._drop("bad_token")
                log.debug("QUIC Initial from {addr} with a bad token: {why}", addr=addr, why=e)
                return
            retryCID = header.destination_cid
        elif busy or self.halfOpen.count >= self.limits.quicRetryAbove:
            self._drop("retry")
            newCID = os.urandom(self.configuration.connection_id_length)
            self.sendDatagram(
                encode_quic_retry(
                    version=header.version,
                    source_cid=newCID,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=self.retryTokens.create_token(
                        address=_bareAddress(addr),
                        original_destination_connection_id=header.destination_cid,
                        retry_source_connection_id=newCID,
                        now=now,
                    ),
                ),
                addr,
            )
            return
        prefix = sourcePrefix(addr[0])
        refusal = self.halfOpen.admit(prefix)
        if refusal is not None:
            self._drop("cap")
            count = self._refusals.due(now)
            if count is not None:
                log.warn("QUIC: turned away {count} new connection(s): {reason}", count=count, reason=refusal)
            return
        conn = TPQuicConnection(
            configuration=self.configuration,
            original_destination_connection_id=originalCID,
            retry_source_connection_id=retryCID,
            resetSecret=self.resetSecret,
        )
        conn.tpVerifier = self.verifier
        if self.h3 is not None or self.webtransport is not None:
            conn.tpAnonymousAlpn = frozenset({H3_ALPN})
        hashed = getattr(self.webtransport, "certificate", None)
        if hashed is not None and hashed.servable(self.configuration.private_key):
            conn.tpAnonymousCertificate = hashed.current
        session = ServerSession(self, conn, addr, prefix)
        session.startDeadline(self.handshakeTimeout)
        self.register(session, header.destination_cid)
        self.register(session, conn.host_cid)
        try:
            kept = session.firstDatagram(data, addr)
        except (ValueError, BufferReadError, AssertionError) as e:
            log.debug("QUIC Initial from {addr} broke the engine: {error}", addr=addr, error=e)
            kept = False
        if not kept:
            self._drop("undecryptable")
            self.forget(session)
            session.abandon()

    def register(self, session: ServerSession, cid: bytes) -> None:
        self.sessions[cid] = session
        session.cids.add(cid)

    def unregister(self, session: ServerSession, cid: bytes) -> None:
        if self.sessions.get(cid) is session:
            del self.sessions[cid]
        session.cids.discard(cid)

    def handshakeDone(self, session: ServerSession) -> None:
        """
        C{session} finished its handshake: it is half-open no more.
        """
        if session.halfOpen:
            session.halfOpen = False
            self.halfOpen.release(session.prefix)
        if session.deadline is not None and session.deadline.active():
            session.deadline.cancel()
        session.deadline = None

    def forget(self, session: ServerSession) -> None:
        """
        C{session} has ended: drop its connection IDs (O(1) in the number
        of sessions) and its half-open place.
        """
        for cid in session.cids:
            if self.sessions.get(cid) is session:
                del self.sessions[cid]
        session.cids = set()
        self.handshakeDone(session)

    def _statelessReset(self, cid: bytes, size: int, addr: Any) -> None:
        """
        A short-header packet for a connection TP does not know (after a
        restart, say): answer with a stateless reset (RFC 9000 §10.3), so
        the peer gives up at once instead of at its idle timeout.  Smaller
        than the packet that caused it (no loops, no amplification), at
        least 21 bytes, and rate-limited.
        """
        if len(cid) != self.configuration.connection_id_length or size <= 21:
            return
        if not self.resets.take(self.reactor.seconds()):
            self._drop("reset_limited")
            return
        length = min(size - 1, MAX_RESET)
        first = 0x40 | (os.urandom(1)[0] & 0x3F)
        self.sendDatagram(bytes([first]) + os.urandom(length - 17) + resetToken(self.resetSecret, cid), addr)

    def stopProtocol(self) -> None:
        """
        The listener stops (TP shuts down or restarts): every connection
        is told at once with CONNECTION_CLOSE, so that exposers and clients
        reconnect without waiting for their idle timeout.
        """
        reason = Failure(ConnectionLost("the QUIC listener stopped"))
        if self.h3backend is not None:
            self.h3backend.stop()
        for session in set(self.sessions.values()):
            session.close(0, "server shutting down")
            session.abandon()
            self.handshakeDone(session)
            for stream in list(session.streams.values()):
                stream._lose(reason)
        self.sessions.clear()
        self._port = None


# --- the client ---------------------------------------------------------------


def clientConfiguration(
    serverName: str, caCerts: list[x509.Certificate], chain: list[x509.Certificate], key: Any, idleTimeout: float = 60.0
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN.decode()],
        server_name=serverName,
        max_datagram_frame_size=65536,
        idle_timeout=idleTimeout,
    )
    config.cadata = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in caCerts)
    config.certificate = chain[0]
    config.certificate_chain = chain[1:]
    config.private_key = key
    return config


def _chained(d: defer.Deferred[None]) -> defer.Deferred[None]:
    """
    A new Deferred that fires when C{d} does (each caller gets its own).
    """
    mine: defer.Deferred[None] = defer.Deferred()
    d.addBoth(lambda result: (mine.callback(None), result)[1])
    return mine


class ClientSession(QuicSession):
    """
    TP's client end of a QUIC connection.  C{ready} fires when the
    handshake completes; L{openStream} then gives a transport per tunnel.
    """

    #: The largest datagram the path MTU search may reach.
    maxDatagramSize = PMTU_DEFAULT_MAX

    def __init__(self, reactor: IUDPReactor, conn: TPQuicConnection, socket: ClientSocket, server: Any) -> None:
        super().__init__(conn, socket.sendDatagram, reactor, server)
        self.sendBatch = getattr(socket, "sendBatch", None)
        from twisted.internet import defer

        self.reactor = reactor
        self.socket = socket
        self.ready: defer.Deferred[ClientSession] = defer.Deferred()
        self.done: defer.Deferred[None] = defer.Deferred()
        #: Builds the protocol for a stream TP opens (tp expose over QUIC).
        self.incomingHandler: Callable[[], Any] | None = None
        self.localAddress = socket.transport.getHost() if socket.transport else None
        #: Why TP's UDP port could not be reached before the handshake
        #: (ICMP port unreachable), if that is how the handshake failed.
        self.unreachableReason: str | None = None
        #: Set by L{closeWhenIdle}: the reason to close with once the last
        #: stream has ended.
        self.closingWhenIdle: str | None = None

    def closeWhenIdle(self, reason: str) -> None:
        """
        Open no more streams here and close the connection once the last
        stream has ended (at once if none is open): a client that moved to
        a new connection (a renewed certificate, TP going away) lets the
        tunnels on this one run until they end.  Streams TP opens from now
        on are refused.
        """
        self.closingWhenIdle = reason
        self.incomingHandler = None
        self._closeIfIdle()

    def _closeIfIdle(self) -> None:
        if self.closingWhenIdle is not None and not self.streams and not self.closed:
            self.close(0, self.closingWhenIdle)

    def streamEnded(self, stream: QuicStreamTransport) -> None:
        super().streamEnded(stream)
        self._closeIfIdle()

    def handshakeCompleted(self, event: events.HandshakeCompleted) -> None:
        if event.alpn_protocol == TP_ALPN:
            self.conn.enablePathMTU(self.maxDatagramSize)
        if not self.ready.called:
            self.ready.callback(self)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if not self.abandoned and self.conn.isStatelessReset(data):
            # TP no longer knows this connection (it restarted): end now,
            # not at the idle timeout, so that a reconnect can follow.
            self.terminated(
                events.ConnectionTerminated(
                    error_code=0, frame_type=None, reason_phrase="stateless reset: TP no longer knows this connection (restarted?)"
                )
            )
            return
        super().datagramReceived(data, addr)

    def terminated(self, event: events.ConnectionTerminated) -> None:
        super().terminated(event)
        pinger = getattr(self, "_pinger", None)
        if pinger is not None and pinger.active():
            pinger.cancel()
        message = event.reason_phrase or f"error {event.error_code:#x}"
        if not self.ready.called:
            from tpproxy.protocols.client import TunnelError

            self.ready.errback(TunnelError(f"QUIC handshake with TP failed: {message}"))
        if not self.done.called:
            self.done.callback(None)
        self.socket.stop()
        self.abandon()

    def startKeepalive(self, interval: float) -> None:
        def ping() -> None:
            if self.closed:
                return
            self.conn.send_ping(0)
            self.transmit()
            self._pinger = self.reactor.callLater(interval, ping)

        self._pinger = self.reactor.callLater(interval, ping)

    def unreachable(self, why: str) -> None:
        if not self.ready.called:
            from tpproxy.protocols.client import TunnelError

            self.unreachableReason = why
            self.ready.errback(TunnelError(f"QUIC: {why}"))
            self.closed = True
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self.socket.stop()
            if not self.done.called:
                self.done.callback(None)

    def socketLost(self, socket: ClientSocket) -> None:
        if socket is not self.socket or self.closed:
            return
        if not self.ready.called:
            self.unreachable("UDP port unreachable (no QUIC listener, or UDP blocked)")
        else:
            self.rebind()

    def newStream(self, streamId: int) -> QuicStreamTransport | None:
        """
        A stream TP opened: an incoming session of a reverse tunnel whose
        signalling runs on this connection.
        """
        if streamId % 4 != 1 or self.incomingHandler is None:
            self.conn.stop_stream(streamId, STREAM_ABORTED)
            return None
        stream = QuicStreamTransport(self, streamId)
        self.streams[streamId] = stream
        stream.attach(self.incomingHandler())
        return stream

    def rebind(self) -> None:
        """
        Move to a new local UDP port (a network change, or a test of one):
        the server validates the new path and the streams go on.
        """
        old = self.socket
        self.socket = ClientSocket(self.reactor, self, old.family, old.server)
        self.send = self.socket.sendDatagram
        self.sendBatch = self.socket.sendBatch
        self.conn.pathChanged()
        self.localAddress = self.socket.transport.getHost()
        old.stop()
        self.conn.change_connection_id()
        self.transmit()


class ClientSocket(DatagramProtocol):
    """
    The client's UDP socket, connected to the server so that an ICMP "port
    unreachable" (no QUIC listener, UDP blocked) is reported at once.
    """

    def __init__(self, reactor: IUDPReactor, session: ClientSession | None, family: str, server: Any) -> None:
        self.session = session
        self.family = family
        self.server = server
        interface = "::" if family == "ipv6" else "0.0.0.0"
        self.port = reactor.listenUDP(0, self, interface=interface, maxPacketSize=65536)

    _sender: DatagramSender | None = None

    def startProtocol(self) -> None:
        _bigBuffers(self.transport)
        self.transport.connect(self.server[0], self.server[1])  # type: ignore[union-attr]
        self._sender = DatagramSender(self.transport, connected=True, refused=self.connectionRefused)

    def sendDatagram(self, data: bytes, addr: Any) -> None:
        if self.transport is None or self.port is None:
            return
        try:
            self.transport.write(data)
        except (OSError, MessageLengthError) as e:
            log.debug("QUIC send failed: {error}", error=e)

    def sendBatch(self, datagrams: list[tuple[bytes, Any]]) -> int | None:
        """
        Send a connection's datagrams (L{DatagramSender.send}).
        """
        if self.transport is None or self.port is None or self._sender is None:
            return None
        return self._sender.send(datagrams)

    def connectionRefused(self) -> None:
        if self.session is not None:
            self.session.unreachable("UDP port unreachable (no QUIC listener, or UDP blocked)")

    def stopProtocol(self) -> None:
        """
        The UDP port closed without L{stop}: Twisted's epoll reactor closes
        a connected UDP socket when an ICMP "port unreachable" comes back
        (it sees only the error event), instead of calling
        C{connectionRefused}.  Before the handshake that is a refusal; after
        it (TP restarting, say), carry on from a new socket, so that the
        connection ends by a stateless reset or CONNECTION_CLOSE from TP,
        never by a forged ICMP.
        """
        if self.port is None or self.session is None:
            return
        self.port = None
        session = self.session
        session.reactor.callLater(0, session.socketLost, self)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self.session is not None:
            self.session.datagramReceived(data, addr)

    def stop(self) -> None:
        self.session = None
        if self.port is not None:
            self.port.stopListening()
            self.port = None


def connectQuic(reactor: IUDPReactor, address: tuple[str, int], configuration: QuicConfiguration) -> ClientSession:
    """
    Start a QUIC connection to C{address} (an IP address and port); wait on
    the returned session's C{ready}.
    """
    family = "ipv6" if ":" in address[0] else "ipv4"
    socket = ClientSocket(reactor, None, family, address)
    conn = TPQuicConnection(configuration=configuration)
    session = ClientSession(reactor, conn, socket, address)
    socket.session = session
    conn.connect(address, now=reactor.seconds())
    session.transmit()
    return session

