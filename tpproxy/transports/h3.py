# -*- test-case-name: tpproxy.test.test_h3 -*-
"""
A small HTTP/3 responder for TP's QUIC listener, for a UDP port that TP
shares with a web site: browsers that reach TP's QUIC port with ALPN C{h3}
get one fixed answer (a redirect or a small static page) instead of a
failed handshake.

It runs on aioquic's sans-IO L{H3Connection}, fed by the QUIC session of
L{tpproxy.transports.quic}.  Every request gets the same response, whatever its method,
path or body; nothing in a request reaches TP's protocols.

What an anonymous client can make TP hold is bounded: the connection's
receive budget is fixed (L{tpproxy.transports.quic.TPQuicConnection} never raises
MAX_DATA for it), a request may not take more than L{REQUEST_LIMIT} bytes
before its headers are complete, a request body is never read (the server
answers, then sends STOP_SENDING), at most L{MAX_PENDING} responses wait for
acknowledgement, and a connection serves at most L{MAX_REQUESTS} requests.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from aioquic.h3.connection import ErrorCode, H3Connection, ProtocolError
from aioquic.h3.events import HeadersReceived
from aioquic.quic import events
from twisted.logger import Logger

log = Logger(namespace="tpproxy.h3")

#: The ALPN protocol ID of HTTP/3 (RFC 9114).
H3_ALPN = "h3"
#: Bytes a request stream may carry before its headers are complete (the
#: QPACK-compressed HEADERS frame of a browser's request is far smaller).
REQUEST_LIMIT = 32 * 1024
#: Bytes the client's unidirectional streams (control and QPACK) may carry
#: over the life of a connection.
UNI_LIMIT = 64 * 1024
#: Requests one connection may make; the next one closes the connection.
MAX_REQUESTS = 100
#: Responses not yet acknowledged by the client; more requests meanwhile
#: are refused with H3_REQUEST_REJECTED.
MAX_PENDING = 8
#: The largest body a response may have: a small page, not a web server.
MAX_BODY = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")
#: Connection-specific fields are malformed in HTTP/3 (RFC 9114 section
#: 4.2); content-length is computed from the body.
_RESERVED = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "content-length"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NO_BODY = frozenset({204, 304})


@dataclasses.dataclass(frozen=True)
class H3Response:
    """
    The one response of the HTTP/3 responder.

    @ivar status: the final status code, 200 to 599.
    @ivar headers: response fields as (name, value); names are lowercased,
        values must be printable ASCII.  Pseudo-header, connection-specific
        and C{content-length} fields are refused (the last is computed).
    @ivar body: the body, at most L{MAX_BODY} bytes (sent to all methods but
        C{HEAD}).
    """

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError(f"HTTP/3 response: status must be 200 to 599, not {self.status!r}")
        headers = []
        for name, value in self.headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise ValueError(f"HTTP/3 response: header {name!r}: name and value must be strings")
            name = name.lower()
            if not _TOKEN.match(name) or name in _RESERVED:
                raise ValueError(f"HTTP/3 response: header {name!r} is not allowed")
            if not value.isascii() or not value.isprintable():
                raise ValueError(f"HTTP/3 response: header {name!r} needs a printable ASCII value (percent-encode URLs)")
            headers.append((name, value))
        object.__setattr__(self, "headers", tuple(headers))
        if not isinstance(self.body, bytes):
            raise ValueError("HTTP/3 response: the body must be bytes")
        if len(self.body) > MAX_BODY:
            raise ValueError(f"HTTP/3 response: the body is {len(self.body)} bytes, at most {MAX_BODY} are served")
        if self.body and self.status in _NO_BODY:
            raise ValueError(f"HTTP/3 response: status {self.status} has no body")

    @classmethod
    def redirect(cls, url: str, status: int = 308) -> H3Response:
        """
        A redirect to C{url} (absolute, e.g. C{https://www.example.org/}),
        with an empty body.
        """
        if isinstance(status, bool) or status not in _REDIRECTS:
            raise ValueError(f"HTTP/3 response: {status!r} is not a redirect status (301, 302, 303, 307, 308)")
        if not isinstance(url, str) or not url:
            raise ValueError("HTTP/3 response: a redirect needs a URL")
        return cls(status, (("location", url),))

    @classmethod
    def page(cls, body: bytes | str, contentType: str = "text/html; charset=utf-8", status: int = 200) -> H3Response:
        """
        A static page: C{body} (a C{str} is encoded as UTF-8) served as
        C{contentType}.
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        return cls(status, (("content-type", contentType),), body)

    def fields(self, head: bool = False) -> list[tuple[bytes, bytes]]:
        """
        The HEADERS of the response, with C{:status} and C{content-length}.

        @param head: for a C{HEAD} request: no C{content-length} (RFC 9110
            makes it optional there, and HTTP/3 clients that check it
            against the DATA received, such as aioquic's, would fail).
        """
        fields = [(b":status", str(self.status).encode())]
        fields += [(name.encode(), value.encode()) for name, value in self.headers]
        if self.status != 204 and not head:
            fields.append((b"content-length", str(len(self.body)).encode()))
        return fields


class H3Responder:
    """
    The server side of one HTTP/3 connection, answering every request with
    C{response}.  Feed it the QUIC connection's stream and datagram events
    with L{handleEvent}; the caller transmits afterwards.

    @param conn: the server's L{tpproxy.transports.quic.TPQuicConnection}, after ALPN
        C{h3} was negotiated (the responder sends its SETTINGS at once).
    @param peer: for log messages.
    """

    def __init__(self, conn: Any, response: H3Response, peer: str = "", webtransport: bool = False) -> None:
        self.conn = conn
        self.response = response
        self.peer = peer
        self.http = H3Connection(conn, enable_webtransport=webtransport)
        #: Bytes received per request stream (at most MAX_REQUESTS entries).
        self.received: dict[int, int] = {}
        self.answered: set[int] = set()
        self.refused: set[int] = set()
        #: Answered streams whose response may not be acknowledged yet.
        self.pending: set[int] = set()
        self.uniReceived = 0
        self.closed = False

    @property
    def requests(self) -> int:
        return len(self.received)

    def handleEvent(self, event: events.QuicEvent) -> None:
        if self.closed:
            return
        if isinstance(event, events.StreamDataReceived):
            if not self._admit(event.stream_id, len(event.data)):
                return
        elif isinstance(event, (events.StreamReset, events.StopSendingReceived)):
            if event.stream_id in self.refused:
                # The H3 layer was already told the stream is gone.
                return
        else:
            # DATAGRAM frames and the rest: nothing for this responder.
            return
        for h3event in self.http.handle_event(event):
            if isinstance(h3event, HeadersReceived):
                self._answer(h3event)

    def _admit(self, streamId: int, size: int) -> bool:
        """
        Whether to hand C{size} more bytes of C{streamId} to the H3 layer.
        """
        if streamId % 4 == 2:
            # The client's control and QPACK streams.
            self.uniReceived += size
            if self.uniReceived > UNI_LIMIT:
                self._close(ErrorCode.H3_EXCESSIVE_LOAD, "too much data on control streams")
                return False
            return True
        if streamId % 4 != 0 or streamId in self.refused:
            # aioquic refuses data on streams of our own; refused requests
            # are not parsed any further.
            return False
        seen = self.received.get(streamId)
        if seen is None:
            if len(self.received) >= MAX_REQUESTS:
                self._close(ErrorCode.H3_EXCESSIVE_LOAD, "request limit reached")
                return False
            seen = 0
        seen += size
        self.received[streamId] = seen
        if seen <= REQUEST_LIMIT:
            return True
        if streamId not in self.answered:
            self._refuse(streamId, ErrorCode.H3_EXCESSIVE_LOAD)
        # The rest of an answered request's body: dropped unread.
        return False

    def _answer(self, event: HeadersReceived) -> None:
        streamId = event.stream_id
        if streamId in self.answered or streamId in self.refused:
            # Trailers: the request was answered when its headers came.
            return
        self.pending = {s for s in self.pending if self.conn.sendBuffered(s)}
        if len(self.pending) >= MAX_PENDING:
            self._refuse(streamId, ErrorCode.H3_REQUEST_REJECTED)
            return
        self.answered.add(streamId)
        request = dict(event.headers)
        response = self.response
        head = request.get(b":method") == b"HEAD"
        body = b"" if head else response.body
        try:
            self.http.send_headers(streamId, response.fields(head), end_stream=not body)
            if body:
                self.http.send_data(streamId, body, end_stream=True)
        except (ProtocolError, RuntimeError, ValueError) as e:
            # The client stopped the stream first.
            log.debug("HTTP/3 response to {peer} not sent: {error}", peer=self.peer, error=e)
            return
        self.pending.add(streamId)
        if not event.stream_ended:
            # The response does not depend on the body: stop it (RFC 9114
            # section 4.1, with H3_NO_ERROR).
            self._stop(streamId, ErrorCode.H3_NO_ERROR)
        log.debug(
            "HTTP/3 {method} {path} from {peer}: {status}",
            method=request.get(b":method", b"").decode("ascii", "replace"),
            path=request.get(b":path", b"").decode("ascii", "replace")[:200],
            peer=self.peer,
            status=response.status,
        )

    def _stop(self, streamId: int, code: int) -> None:
        try:
            self.conn.stop_stream(streamId, code)
        except ValueError:
            pass

    def _refuse(self, streamId: int, code: int) -> None:
        """
        Reset a request stream both ways, and make the H3 layer drop what it
        holds for it (a synthetic StreamReset: it frees the buffer and
        cancels the stream on the QPACK decoder stream).
        """
        self.refused.add(streamId)
        self._stop(streamId, code)
        self.conn.reset_stream(streamId, code)
        self.http.handle_event(events.StreamReset(error_code=code, stream_id=streamId))
        log.debug("HTTP/3 request from {peer} refused: {code:#x}", peer=self.peer, code=code)

    def _close(self, code: int, reason: str) -> None:
        self.closed = True
        self.conn.close(error_code=code, reason_phrase=reason)
        log.info("HTTP/3 connection from {peer} closed: {reason}", peer=self.peer, reason=reason)
