# -*- test-case-name: tpproxy.test.test_h3peers -*-
"""
A small HTTP/3 server for tests: the web site that TP's UDP port forwards
browsers' QUIC to.  It speaks only QUIC (ALPN C{h3}), so a page fetched
from it was fetched over HTTP/3.

Run as a process::

    python -m tpproxy.test.h3server --host 127.0.0.1 --port 0 \\
        --cert server.pem --key server.key --port-file port --marker TEXT

Once listening it writes the bound UDP port to C{--port-file} (atomically)
and prints C{{"listening": PORT}} as its first stdout line; then one JSON
line per request: C{{"method", "path", "authority", "alpn", "peer"}}
(C{peer} is C{HOST:PORT}, C{[HOST]:PORT} for IPv6).  It serves
C{GET /} (a small HTML page whose body holds the marker) and
C{GET /big?n=BYTES} (L{bigBody}); C{HEAD} too; anything else is 404 or
405.  It asks no client certificate.

It runs on Twisted's reactor: a L{DatagramProtocol} drives aioquic's
sans-IO L{QuicConnection} and L{H3Connection}, routing datagrams by the
connection ids the server issued (as aioquic's C{asyncio/server.py} does),
with one reactor timer per connection re-armed from C{get_timer()}.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

#: The largest body C{/big} serves (it is built in memory).
MAX_BIG = 256 * 1024 * 1024
_PATTERN = bytes(range(251)) * 64


def bigBody(n: int) -> bytes:
    """
    The C{n} bytes of C{/big?n=N}: byte I is C{I % 251}, so a client can
    check any range of it.
    """
    whole, rest = divmod(n, len(_PATTERN))
    return _PATTERN * whole + _PATTERN[:rest]


def page(marker: str) -> bytes:
    """
    The page of C{/}: small HTML whose body contains C{marker}.
    """
    text = html.escape(marker)
    return f"<!DOCTYPE html>\n<html><head><title>h3 test</title></head><body><p id=\"marker\">{text}</p></body></html>\n".encode()


class _Connection:
    """
    One QUIC connection of the server and its HTTP/3 layer.
    """

    def __init__(self, server: H3Server, quic: QuicConnection) -> None:
        self.server = server
        self.quic = quic
        self.h3: H3Connection | None = None
        self.alpn: str | None = None
        self.peer: NetworkAddress | None = None
        self.cids: set[bytes] = set()
        self.timer: IDelayedCall | None = None
        self.timerAt: float | None = None
        self.closed = False

    def datagramReceived(self, data: bytes, addr: NetworkAddress) -> None:
        self.peer = addr
        self.quic.receive_datagram(data, addr, now=self.server.clock.seconds())
        self._process()

    def _timeout(self) -> None:
        self.timer = None
        self.quic.handle_timer(now=self.server.clock.seconds())
        self._process()

    def _process(self) -> None:
        # Sending makes events too (the connection ids it issues).
        now = self.server.clock.seconds()
        while True:
            event = self.quic.next_event()
            while event is not None:
                self._handle(event)
                event = self.quic.next_event()
            if self.closed:
                return
            datagrams = self.quic.datagrams_to_send(now=now)
            for data, addr in datagrams:
                self.server.transport.write(data, addr)  # type: ignore[union-attr]
            if not datagrams:
                break
        at = self.quic.get_timer()
        if self.timer is not None and at != self.timerAt:
            self.timer.cancel()
            self.timer = None
        if at is not None and self.timer is None:
            self.timer = self.server.clock.callLater(max(0.0, at - now), self._timeout)
        self.timerAt = at

    def _handle(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionIdIssued):
            self.server.route(event.connection_id, self)
        elif isinstance(event, events.ConnectionIdRetired):
            self.server.unroute(event.connection_id, self)
        elif isinstance(event, events.ConnectionTerminated):
            self.closed = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.server.forget(self)
            return
        elif isinstance(event, events.ProtocolNegotiated):
            self.alpn = event.alpn_protocol
            if event.alpn_protocol in H3_ALPN:
                self.h3 = H3Connection(self.quic)
        if self.h3 is not None:
            for h3event in self.h3.handle_event(event):
                if isinstance(h3event, HeadersReceived):
                    self._request(h3event)

    def _request(self, event: HeadersReceived) -> None:
        assert self.h3 is not None
        request: dict[bytes, bytes] = {}
        for name, value in event.headers:
            request.setdefault(name, value)
        method = request.get(b":method", b"").decode("ascii", "replace")
        target = request.get(b":path", b"").decode("ascii", "replace")
        authority = request.get(b":authority", b"").decode("ascii", "replace")
        peer = None
        if self.peer is not None:
            peer = f"[{self.peer[0]}]:{self.peer[1]}" if ":" in self.peer[0] else f"{self.peer[0]}:{self.peer[1]}"
        self.server.log({"method": method, "path": target, "authority": authority, "alpn": self.alpn, "peer": peer})
        status, body, contentType = self.server.respond(method, target)
        fields = [(b":status", str(status).encode()), (b"server", b"tp-test-h3server"), (b"content-type", contentType.encode()), (b"cache-control", b"no-store")]
        if method == "HEAD":
            # No content-length: aioquic's client would hold it against the
            # empty body.
            self.h3.send_headers(event.stream_id, fields, end_stream=True)
            return
        self.h3.send_headers(event.stream_id, fields + [(b"content-length", str(len(body)).encode())])
        self.h3.send_data(event.stream_id, body, end_stream=True)


class H3Server(DatagramProtocol):
    """
    The HTTP/3 server on one UDP port.

    @ivar connections: every connection id that routes to a connection (the
        client's original destination id and the ids the server issued).
    """

    def __init__(self, configuration: QuicConfiguration, clock: IReactorTime, marker: str, log: Callable[[dict[str, object]], None]) -> None:
        self.configuration = configuration
        self.clock = clock
        self.marker = marker
        self.log = log
        self.connections: dict[bytes, _Connection] = {}

    def datagramReceived(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return
        if header.packet_type != QuicPacketType.VERSION_NEGOTIATION and header.version is not None and header.version not in self.configuration.supported_versions:
            packet = encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid, supported_versions=self.configuration.supported_versions
            )
            self.transport.write(packet, addr)  # type: ignore[union-attr]
            return
        connection = self.connections.get(header.destination_cid)
        if connection is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < SMALLEST_MAX_DATAGRAM_SIZE:
                return
            quic = QuicConnection(configuration=self.configuration, original_destination_connection_id=header.destination_cid)
            connection = _Connection(self, quic)
            self.route(header.destination_cid, connection)
            self.route(quic.host_cid, connection)
        connection.datagramReceived(data, addr)

    def route(self, cid: bytes, connection: _Connection) -> None:
        self.connections[cid] = connection
        connection.cids.add(cid)

    def unroute(self, cid: bytes, connection: _Connection) -> None:
        if self.connections.get(cid) is connection:
            del self.connections[cid]
        connection.cids.discard(cid)

    def forget(self, connection: _Connection) -> None:
        for cid in list(connection.cids):
            self.unroute(cid, connection)

    def respond(self, method: str, target: str) -> tuple[int, bytes, str]:
        """
        The (status, body, content type) of a request.
        """
        url = urlsplit(target)
        if url.path not in ("/", "/big"):
            return 404, b"not found\n", "text/plain"
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if url.path == "/":
            return 200, page(self.marker), "text/html; charset=utf-8"
        try:
            n = int(parse_qs(url.query).get("n", ["0"])[0])
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BIG:
            return 400, f"n must be 0 to {MAX_BIG}\n".encode(), "text/plain"
        return 200, bigBody(n), "application/octet-stream"

    def stopProtocol(self) -> None:
        for connection in set(self.connections.values()):
            if connection.timer is not None:
                connection.timer.cancel()
        self.connections.clear()


def configuration(cert: str, key: str) -> QuicConfiguration:
    """
    The server's QUIC configuration: ALPN h3 only, no client certificate.
    """
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=None)
    config.load_cert_chain(cert, key)
    return config


def _writeLine(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    """
    Run the server on the global reactor until SIGTERM or SIGINT.
    """
    parser = argparse.ArgumentParser(prog="python -m tpproxy.test.h3server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--port-file", help="written with the bound UDP port once listening")
    parser.add_argument("--marker", default="tp-h3-test-page", help="text the page of / contains")
    options = parser.parse_args(argv)
    from twisted.internet import reactor

    server = H3Server(configuration(options.cert, options.key), reactor, options.marker, _writeLine)  # type: ignore[arg-type]
    port = reactor.listenUDP(options.port, server, interface=options.host).getHost().port  # type: ignore[attr-defined]
    if options.port_file:
        partial = options.port_file + ".partial"
        with open(partial, "w") as f:
            f.write(f"{port}\n")
        os.replace(partial, options.port_file)
    _writeLine({"listening": port})
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
