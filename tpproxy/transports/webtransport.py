# -*- test-case-name: tpproxy.test.test_webtransport -*-
"""
WebTransport sessions on TP's QUIC listener: browsers as TP clients
(issue 15; docs/webtransport.md).

A browser's connection negotiates ALPN C{h3} and presents no client
certificate (the WebTransport API has no way to).  Its extended CONNECT
(C{:protocol webtransport}) on TP's path carries a token minted on TP's
TLS port, where the browser did present its certificate
(L{tpproxy.webtoken}); only with a valid token, from an allowed
C{Origin}, is the session accepted, and it then is that certificate's
identity.  Nothing of a stream is served before: a stream of a session
that is not accepted is reset unread.

Each bidirectional stream of an accepted session is a TP tunnel: the same
L{tpproxy.protocols.server.TPServerProtocol} as a TLS connection or a QUIC
stream serves it (ClientHello, policy, limits, audit with C{via:
webtransport}).  UDP flows use the session's datagrams: each payload is the
flow id (a QUIC variable-length integer) and the packet, as on TP's own
QUIC.  Only C{connect} and C{udp} are served: a browser exposes nothing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from aioquic.h3.events import DataReceived, DatagramReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic import events
from twisted.logger import Logger

from tpproxy.transports.h3 import H3Responder, H3Response
from tpproxy.webtoken import Gate, Grant, TokenError

log = Logger(namespace="tpproxy.webtransport")

#: WebTransport sessions one QUIC connection may hold at once.
MAX_SESSIONS = 4
#: Refused CONNECTs after which the connection is closed.
MAX_REFUSALS = 8
#: Streams refused (of no accepted session) after which the connection is
#: closed: what a peer without a session can make TP refuse, and remember.
MAX_REFUSED_STREAMS = 64
#: The start of a WebTransport bidirectional stream: the signal value 0x41
#: as a two-byte QUIC variable-length integer.
_BIDI_SIGNAL = b"\x40\x41"
#: What a request other than a WebTransport CONNECT gets, without
#: C{[router.h3]}.
NOT_FOUND = H3Response.page("Not found: this is a TP server.\n", "text/plain; charset=utf-8", status=404)


class HashedCertificate:
    """
    The certificate TP serves to browsers' HTTP/3 connections when pages
    pass its hash to C{new WebTransport(url, {serverCertificateHashes})}:
    self-signed, ECDSA P-256, valid L{LIFETIME} (browsers accept at most 14
    days), made anew L{RENEW} before it ends.  The page learns the hash
    from the token endpoint, over the TLS connection it verified TP's own
    certificate on, so trust still rests on TP's certificate; and a
    browser needs no trust for a private CA on QUIC (which Chromium does
    not extend from its NSS database to QUIC without a flag: measured).

    @param hosts: gives the names and addresses it is for (TP's own).
    """

    LIFETIME = 10 * 86400.0
    RENEW = 3 * 86400.0

    def __init__(self, hosts: Any, clock: Any) -> None:
        self.hosts = hosts
        self.clock = clock
        self._current: tuple[list[Any], Any, float] | None = None
        self._previous: tuple[list[Any], Any, float] | None = None

    @staticmethod
    def servable(tpKey: Any) -> bool:
        """
        Whether it can stand in for a certificate of C{tpKey}: the TLS
        signature algorithm is chosen from TP's key before ALPN tells a
        browser from a TP client, so the kinds must match.
        """
        from cryptography.hazmat.primitives.asymmetric import ec

        return isinstance(tpKey, ec.EllipticCurvePrivateKey) and isinstance(tpKey.curve, ec.SECP256R1)

    def _make(self, now: float) -> tuple[list[Any], Any, float]:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        from tpproxy.pki import newKey

        key = newKey()
        names: list[x509.GeneralName] = []
        for host in sorted(self.hosts()):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        start = datetime.datetime.fromtimestamp(now - 60, datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "TP WebTransport")])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(seconds=self.LIFETIME))
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(key, hashes.SHA256())
        log.info("WebTransport certificate made, valid until {until:%Y-%m-%d %H:%M} UTC (served by hash)", until=cert.not_valid_after_utc)
        return [cert], key, now - 60 + self.LIFETIME

    def _fresh(self) -> tuple[list[Any], Any, float]:
        now = self.clock.seconds()
        if self._current is None or self._current[2] - now < self.RENEW:
            self._previous = self._current
            self._current = self._make(now)
        return self._current

    def current(self) -> tuple[list[Any], Any]:
        chain, key, _ = self._fresh()
        return chain, key

    def hashes(self) -> list[str]:
        """
        The SHA-256 of the certificate served now (and of the one before,
        while it is valid: a page may hold it across a renewal), base64.
        """
        import base64
        import hashlib

        from cryptography.hazmat.primitives.serialization import Encoding

        self._fresh()
        now = self.clock.seconds()
        served = [c for c in (self._current, self._previous) if c is not None and c[2] > now]
        return [base64.b64encode(hashlib.sha256(c[0][0].public_bytes(Encoding.DER)).digest()).decode() for c in served]


def _streamTransport() -> type:
    from tpproxy.transports.quic import QuicStreamTransport

    class WebTransportStream(QuicStreamTransport):
        """
        A bidirectional stream of a WebTransport session, as a TP tunnel's
        transport.
        """

        carrier = "webtransport"
        #: What a browser may ask for (L{tpproxy.protocols.server}).
        tpOperations = frozenset({"connect", "udp"})

    return WebTransportStream


class WebTransportSession:
    """
    One accepted session: what its streams' transports see as their
    C{session} (the QUIC connection, its clock and transmit, and this
    session's identity and UDP flows).

    @ivar grant: the token it was opened with.
    """

    def __init__(self, responder: WebTransportResponder, server: Any, sessionId: int, grant: Grant, origin: str) -> None:
        self.responder = responder
        self.server = server
        self.sessionId = sessionId
        self.grant = grant
        self.origin = origin
        self.peerCertificate = grant.certificate
        self.conn = server.conn
        self.clock = server.clock
        self.blocked = server.blocked
        #: UDP flows by flow id (tpproxy.transports.udp).
        self.flows: dict[int, Any] = {}
        self.streams: dict[int, Any] = {}
        self.closed = False

    @property
    def peer(self) -> Any:
        return self.server.peer

    def host(self) -> Any:
        return self.server.host()

    def transmitSoon(self) -> None:
        self.server.transmitSoon()

    def newStream(self, streamId: int) -> Any:
        from tpproxy.transports.quic import _address

        stream = _streamTransport()(self, streamId)
        self.streams[streamId] = stream
        self.server.streams[streamId] = stream
        protocol = self.server.listener.factory.buildProtocol(_address(self.peer))
        stream.attach(protocol)
        protocol.handshakeCompleted()
        return stream

    def openStream(self, protocol: Any) -> Any:
        raise NotImplementedError("TP opens no streams to a browser")

    def streamEnded(self, stream: Any) -> None:
        self.streams.pop(stream.streamId, None)
        self.server.streamEnded(stream)

    def datagramReceived(self, data: bytes) -> None:
        from tpproxy.transports.udp import deliverFlowDatagram

        deliverFlowDatagram(self.flows, data)

    def sendFlowDatagram(self, quarterId: int, payload: bytes) -> None:
        from tpproxy.transports.udp import encodeFlowDatagram

        if self.closed or self.server.closed:
            return
        self.responder.http.send_datagram(self.sessionId, encodeFlowDatagram(quarterId, payload))
        self.server.transmitSoon()

    def end(self, why: str) -> None:
        """
        The session is over (the browser closed it, or its connection
        ended): so are its tunnels.
        """
        if self.closed:
            return
        self.closed = True
        for stream in list(self.streams.values()):
            stream.abortConnection()
        log.info("WebTransport session {session} of {identity} ended: {why}", session=self.sessionId, identity=self.grant and _identity(self.grant), why=why)


def _identity(grant: Grant) -> str:
    from tpproxy.pki import identityOf

    try:
        return identityOf(grant.certificate).name
    except ValueError:
        return "?"


class WebTransportResponder(H3Responder):
    """
    The server side of a browser's HTTP/3 connection when WebTransport is
    on: WebTransport CONNECTs on the gate's path open sessions (with a
    token), other requests get C{response} (C{[router.h3]}) or 404.

    @param server: the connection's L{tpproxy.transports.quic.ServerSession}.
    @param gate: checks tokens and origins.
    """

    def __init__(self, conn: Any, response: H3Response | None, peer: str, server: Any, gate: Gate) -> None:
        super().__init__(conn, response or NOT_FOUND, peer, webtransport=True)
        self.server = server
        self.gate = gate
        self.sessions: dict[int, WebTransportSession] = {}
        #: Client bidirectional streams that carry WebTransport (not
        #: requests: no request limits apply; flow control does).
        self.wtStreams: set[int] = set()
        #: The first byte of streams that may be WebTransport's (L{_sniff}).
        self._heads: dict[int, bytes] = {}
        self.refusals = 0
        self.refusedStreams = 0

    def handleEvent(self, event: events.QuicEvent) -> None:
        if self.closed:
            return
        if isinstance(event, events.StreamDataReceived):
            streamId = event.stream_id
            if streamId not in self.wtStreams:
                self._sniff(streamId, event.data)
                if streamId not in self.wtStreams and not self._admit(streamId, len(event.data)):
                    return
        elif isinstance(event, events.StreamReset):
            stream = self.server.streams.get(event.stream_id)
            if stream is not None and event.stream_id in self.wtStreams:
                stream.reset()
            session = self.sessions.get(event.stream_id)
            if session is not None:
                self._endSession(session, "the browser reset the session's stream")
            if event.stream_id in self.refused:
                return
        elif isinstance(event, events.StopSendingReceived):
            if event.stream_id in self.refused:
                return
        elif not isinstance(event, events.DatagramFrameReceived):
            return
        for h3event in self.http.handle_event(event):
            if isinstance(h3event, WebTransportStreamDataReceived):
                self._streamData(h3event)
            elif isinstance(h3event, DatagramReceived):
                session = self.sessions.get(h3event.stream_id)
                if session is not None:
                    session.datagramReceived(h3event.data)
            elif isinstance(h3event, HeadersReceived):
                headers = dict(h3event.headers)
                if headers.get(b":method") == b"CONNECT" and headers.get(b":protocol") == b"webtransport":
                    self._connect(h3event, headers)
                else:
                    self._answer(h3event)
            elif isinstance(h3event, DataReceived) and h3event.stream_ended:
                session = self.sessions.get(h3event.stream_id)
                if session is not None:
                    self._endSession(session, "the browser closed it")

    def _sniff(self, streamId: int, data: bytes) -> None:
        """
        Tell a WebTransport stream from a request by its first two bytes
        (the signal 0x41), which QUIC may deliver in two pieces: a stream
        whose first byte could start the signal is an HTTP request (and
        counted as one) until its second byte says otherwise.
        """
        if streamId % 4 != 0 or streamId in self.refused:
            return
        seen = self.received.get(streamId, 0)
        if seen >= 2:
            return
        head = self._heads.pop(streamId, b"") + data[: 2 - seen]
        if head == _BIDI_SIGNAL:
            self.wtStreams.add(streamId)
            if self.sessions:
                # Not a request after all.  Before any session is accepted
                # it still counts as one (MAX_REQUESTS): an anonymous peer
                # gets no more streams by signalling WebTransport.
                self.received.pop(streamId, None)
            elif streamId not in self.received:
                self.received[streamId] = 0
        elif len(head) < 2 and _BIDI_SIGNAL.startswith(head):
            self._heads[streamId] = head

    # --- sessions -------------------------------------------------------------

    def _respond(self, streamId: int, status: int, body: str = "", end: bool = True) -> None:
        headers = [(b":status", str(status).encode()), (b"sec-webtransport-http3-draft", b"draft02")]
        if body:
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        self.http.send_headers(streamId, headers, end_stream=end and not body)
        if body:
            self.http.send_data(streamId, body.encode("utf-8"), end_stream=True)

    def _connect(self, event: HeadersReceived, headers: dict[bytes, bytes]) -> None:
        streamId = event.stream_id
        if streamId in self.answered:
            return
        self.answered.add(streamId)
        target = urlsplit(headers.get(b":path", b"").decode("utf-8", "replace"))
        origin = headers[b"origin"].decode("utf-8", "replace") if b"origin" in headers else None
        try:
            if target.path != self.gate.path:
                raise TokenError("wrong_path", f"WebTransport is served on {self.gate.path}, not {target.path[:100]!r}")
            if len(self.sessions) >= MAX_SESSIONS:
                raise TokenError("too_many_sessions", f"at most {MAX_SESSIONS} WebTransport sessions per connection")
            token = parse_qs(target.query).get("token", [None])[0]
            grant = self.gate.redeem(token, origin, self.server.clock.seconds())
            refused = self._certificateRefusal(grant)
            if refused is not None:
                raise TokenError("certificate", f"the token's client certificate is refused now: {refused}")
        except TokenError as e:
            self.refusals += 1
            log.info(
                "WebTransport session from {peer} (origin {origin}) refused: {reason} - {message}",
                peer=self.peer, origin=origin, reason=e.reason, message=e.message,
            )
            self.server.listener.webtransportRefused(e.reason)
            status = 404 if e.reason == "wrong_path" else 429 if e.reason in ("too_many_sessions", "busy") else 403
            self._respond(streamId, status, f"{e.reason}: {e.message}\n")
            if self.refusals >= MAX_REFUSALS:
                self._close(0x107, "too many refused WebTransport sessions")  # H3_EXCESSIVE_LOAD
            return
        assert origin is not None
        session = WebTransportSession(self, self.server, streamId, grant, origin)
        self.sessions[streamId] = session
        # An identity now: the connection's receive budget may grow as for
        # tp/1 (it stays fixed for anonymous HTTP/3).
        self.conn.tpAnonymous = False
        self._respond(streamId, 200, end=False)
        self.server.listener.webtransportAccepted()
        log.info(
            "WebTransport session {session} from {peer} as {identity} (origin {origin}, token {token})",
            session=streamId, peer=self.peer, identity=_identity(grant), origin=origin, token=grant.id[:8],
        )

    def _streamData(self, event: WebTransportStreamDataReceived) -> None:
        streamId = event.stream_id
        stream = self.server.streams.get(streamId)
        if stream is None:
            session = self.sessions.get(event.session_id)
            if session is None or session.closed or streamId % 4 != 0:
                # Not an accepted session's (or a unidirectional stream,
                # which TP has no use for): reset, unread.
                self._refuseStream(streamId)
                return
            refused = self._certificateRefusal(session.grant)
            if refused is not None:
                # A reload denied or revoked the identity since the session
                # opened (its tunnels were closed then): no new ones.
                self._refuseStream(streamId)
                self._endSession(session, f"its certificate is refused now: {refused}")
                self._respondEnd(event.session_id)
                return
            stream = session.newStream(streamId)
        stream.received(event.data, event.stream_ended)

    def _certificateRefusal(self, grant: Grant) -> str | None:
        from tpproxy.transports.quic import refusedNow

        return refusedNow(self.server.listener.factory, grant.certificate)

    def _respondEnd(self, sessionId: int) -> None:
        """
        Close a session's CONNECT stream from TP's side (FIN): the browser
        sees the session end.
        """
        try:
            self.conn.send_stream_data(sessionId, b"", end_stream=True)
        except (ValueError, AssertionError, RuntimeError):
            pass
        self.server.transmitSoon()

    def _refuseStream(self, streamId: int) -> None:
        if streamId in self.refused:
            return
        self.refused.add(streamId)
        self.wtStreams.discard(streamId)
        self._stop(streamId, 0x10C)  # H3_REQUEST_REJECTED
        if streamId % 4 == 0:
            try:
                self.conn.reset_stream(streamId, 0x10C)
            except ValueError:
                pass
        # Let the HTTP/3 layer drop what it holds for the stream.
        self.http.handle_event(events.StreamReset(error_code=0x10C, stream_id=streamId))
        self.refusedStreams += 1
        if self.refusedStreams > MAX_REFUSED_STREAMS:
            self._close(0x107, "too many refused WebTransport streams")  # H3_EXCESSIVE_LOAD

    def _refuse(self, streamId: int, code: int) -> None:
        super()._refuse(streamId, code)
        session = self.sessions.get(streamId)
        if session is not None:
            # Too much on the session's own stream (capsules): it ends.
            self._endSession(session, f"its CONNECT stream was refused ({code:#x})")

    def _endSession(self, session: WebTransportSession, why: str) -> None:
        self.sessions.pop(session.sessionId, None)
        session.end(why)

    def terminated(self, why: str) -> None:
        """
        The QUIC connection ended: so did its sessions.
        """
        for session in list(self.sessions.values()):
            self._endSession(session, why)
