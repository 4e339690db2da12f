# -*- test-case-name: tpproxy.test.test_quicinitial -*-
"""
Reading the TLS ClientHello out of a client's QUIC Initial packets, before
any QUIC implementation sees them, so that a router sharing UDP/443 can
send C{tp/1} connections to TP and everything else to an HTTP/3 server
(issue 14, part C).

Initial packets are encrypted, but with keys anyone can derive: they come
from the client's original destination connection id, which is in clear
in every long header (RFC 9001 section 5.2).  So a router can read the
ClientHello without taking part in the connection, and pass every byte on
untouched.

This is a small, strict, sans-IO reader in two parts:

  - L{parseInitialHeader} reads the clear part of the first packet of a
    datagram: a long header of QUIC version 1 (RFC 9000 section 17.2.2)
    or version 2 (RFC 9369; its own packet type bits, salt and labels) of
    type Initial: version, connection ids (at most 20 bytes each), token,
    and a Length that fits in the datagram.  It answers L{None} for
    anything else (a short header, another long packet type, another
    version, a truncated header) and never raises;
  - L{ClientHelloAssembler}, one per connection attempt (the caller keys
    it on the client's original destination connection id), takes the
    client's datagrams one by one.  For each it derives the client's
    Initial keys, removes header protection and decrypts every Initial
    packet coalesced in the datagram with that destination id (0-RTT and
    other long packets after it are skipped; a short header ends the
    datagram, and so do bytes that are not a packet, such as the zeros
    aioquic pads its datagrams with), reads the frames an Initial may
    hold (PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE; RFC 9000 section
    12.4), and puts the CRYPTO data back together by offset.  Frames may
    come in any order, split and repeated, in packets that are themselves
    reordered or repeated (Chromium's "chaos protection" scatters CRYPTO
    frames among PINGs and PADDING, and its post-quantum key share makes
    the ClientHello span two or more datagrams).  Once the handshake
    message is whole (type 1, a 24-bit length) its body is read by
    L{tpproxy.clienthello.parseClientHelloBody}.

What is refused, with L{InitialError} (a L{ValueError}): a datagram whose
first packet is not such an Initial; a datagram of fewer than 1200 bytes
(RFC 9000 section 14.1: a server drops those); a destination id or
version other than the first datagram's; a packet that does not decrypt
(so a router tells garbage from a client even if it looks like an
Initial); non-zero reserved bits; a packet without frames, or with a
frame an Initial may not hold (a STREAM frame, say); a CONNECTION_CLOSE
(the client gave up: no hello will come); CRYPTO bytes that differ from
bytes already received at the same offset; a handshake message that is
not a ClientHello; CRYPTO data past the end of the ClientHello; and the
bounds below.

The bounds: the ClientHello body may be at most C{limit} bytes (16 KiB by
default, as in L{tpproxy.clienthello}), and no CRYPTO byte may lie past
C{limit + 4}, so the reassembly buffer never holds more; at most
C{maxDatagrams} datagrams (8 by default) are fed before the hello must
be whole.  The work per datagram is linear in its size plus a copy of
the reassembly buffer: its frames are at most as many as its bytes, and
each finds its place among the ranges received by bisection.

A datagram that raises is not taken in: the assembler is as it was
before (but for the count of datagrams), so the caller may drop that
datagram and go on feeding the connection's others, and garbage cannot
spoil a real client's hello.  (Anyone who sees the destination id can
make Initials that decrypt, as against any QUIC server; if such a forged
datagram comes first, the client's own conflicts with it and is
refused.)  Once the hello is whole, every later datagram is answered with
it, unread.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from aioquic.quic.crypto import CryptoError, CryptoPair

from tpproxy.clienthello import (
    CLIENT_HELLO,
    DEFAULT_LIMIT,
    ClientHelloError,
    ClientHelloInfo,
    parseClientHelloBody,
)

#: QUIC version 1 (RFC 9000).
VERSION_1 = 0x00000001
#: QUIC version 2 (RFC 9369).
VERSION_2 = 0x6B3343CF

#: The long header packet types of each version, by the two type bits
#: (RFC 9000 section 17.2, RFC 9369 section 3.2).
_TYPES = {
    VERSION_1: ("initial", "0-rtt", "handshake", "retry"),
    VERSION_2: ("retry", "initial", "0-rtt", "handshake"),
}

#: The longest connection id of QUIC versions 1 and 2.
MAX_CID_LENGTH = 20
#: The smallest datagram that may carry a client's Initial packet.
MIN_DATAGRAM_SIZE = 1200
#: The default number of datagrams fed before the ClientHello must be whole.
DEFAULT_MAX_DATAGRAMS = 8

_FIXED_BIT = 0x40
#: Header protection samples 16 bytes, 4 bytes after the packet number's start.
_SAMPLE_END = 4 + 16

# Frame types an Initial packet may carry (RFC 9000 section 12.4, table 3).
_PADDING = 0x00
_PING = 0x01
_ACK = 0x02
_ACK_ECN = 0x03
_CRYPTO = 0x06
_CONNECTION_CLOSE = 0x1C


class InitialError(ValueError):
    """
    The datagram claims to carry a client's QUIC Initial packet but is not
    one, or not one this reader takes (see the module docstring).
    """


@dataclass(frozen=True)
class InitialHeader:
    """
    The clear part of the Initial packet that starts a datagram.

    @ivar version: C{VERSION_1} or C{VERSION_2}.
    @ivar destinationCID: the destination connection id; in a client's
        first flight, the original one, from which the Initial keys come.
    @ivar sourceCID: the client's connection id.
    @ivar token: the token (from a Retry or a NEW_TOKEN frame), often empty.
    @ivar packetLength: the size of this first packet; coalesced packets
        may follow it in the datagram.
    """

    version: int
    destinationCID: bytes
    sourceCID: bytes
    token: bytes
    packetLength: int


@dataclass(frozen=True)
class _LongPacket:
    kind: str
    start: int  # where the packet starts, in the datagram
    version: int
    destinationCID: bytes
    sourceCID: bytes
    token: bytes
    pnOffset: int  # where the packet number starts, in the datagram
    end: int  # where the packet ends, in the datagram


class _Reader:
    """
    A cursor over bytes; every read is bounds-checked and raises
    L{InitialError} naming what was being read.
    """

    def __init__(self, data: bytes, pos: int, what: str) -> None:
        self.data = data
        self.pos = pos
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining():
            raise InitialError(f"{self.what}: {field} needs {n} bytes, only {self.remaining()} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def varint(self, field: str) -> int:
        """
        A variable-length integer (RFC 9000 section 16).
        """
        if not self.remaining():
            raise InitialError(f"{self.what}: {field} is missing")
        size = 1 << (self.data[self.pos] >> 6)
        value = self.uint(size, field)
        return value & ((1 << (8 * size - 2)) - 1)


def _longPacket(data: bytes, start: int) -> _LongPacket:
    """
    Read the clear header of the long header packet at C{start}: QUIC
    version 1 or 2, a packet type with a Length (not Retry), connection
    ids of at most 20 bytes, a Length that fits in C{data}.

    @raise InitialError: if it is not such a packet.
    """
    r = _Reader(data, start, "long header")
    first = r.uint(1, "the first byte")
    if not first & 0x80:
        raise InitialError("a short header packet")
    version = r.uint(4, "the version")
    if version not in _TYPES:
        raise InitialError(f"QUIC version 0x{version:08x}, not 1 or 2")
    kind = _TYPES[version][(first & 0x30) >> 4]
    if kind == "retry":
        raise InitialError("a Retry packet")
    dcid = r.take(r.uint(1, "the destination connection id length"), "the destination connection id")
    scid = r.take(r.uint(1, "the source connection id length"), "the source connection id")
    for name, cid in (("destination", dcid), ("source", scid)):
        if len(cid) > MAX_CID_LENGTH:
            raise InitialError(f"a {name} connection id of {len(cid)} bytes (at most {MAX_CID_LENGTH})")
    token = b""
    if kind == "initial":
        token = r.take(r.varint("the token length"), "the token")
    # The fixed bit is 1, except that a client may clear it in an Initial
    # that carries a token from a server that allowed it (RFC 9287 3.1).
    if not first & _FIXED_BIT and not token:
        raise InitialError("the fixed bit is 0")
    length = r.varint("the Length")
    pnOffset = r.pos
    if length > r.remaining():
        raise InitialError(f"a {kind} packet of {length} bytes after its header, only {r.remaining()} in the datagram")
    return _LongPacket(kind, start, version, dcid, scid, token, pnOffset, pnOffset + length)


def parseInitialHeader(datagram: bytes) -> InitialHeader | None:
    """
    Read the header of the QUIC Initial packet that starts C{datagram}.

    @return: its header, or L{None} if the datagram does not start with a
        well-formed long header Initial packet of QUIC version 1 or 2.
    """
    try:
        packet = _longPacket(bytes(datagram), 0)
    except InitialError:
        return None
    if packet.kind != "initial":
        return None
    return InitialHeader(packet.version, packet.destinationCID, packet.sourceCID, packet.token, packet.end)


class _Ranges:
    """
    The CRYPTO stream received so far: the bytes, and the disjoint, sorted,
    non-adjacent ranges of offsets that hold them.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.starts: list[int] = []
        self.ends: list[int] = []

    def copy(self) -> _Ranges:
        other = _Ranges()
        other.data = bytearray(self.data)
        other.starts = list(self.starts)
        other.ends = list(self.ends)
        return other

    def add(self, offset: int, chunk: bytes) -> None:
        """
        Take C{chunk} at C{offset}.

        @raise InitialError: if it differs from bytes already received at
            the same offsets.
        """
        if not chunk:
            return
        end = offset + len(chunk)
        # The ranges that overlap or touch [offset, end).
        lo = bisect_left(self.ends, offset)
        hi = bisect_right(self.starts, end)
        for i in range(lo, hi):
            a, b = max(offset, self.starts[i]), min(end, self.ends[i])
            if a < b and self.data[a:b] != chunk[a - offset : b - offset]:
                raise InitialError(f"CRYPTO bytes {a} to {b} differ from those received before")
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = chunk
        if lo < hi:
            offset = min(offset, self.starts[lo])
            end = max(end, self.ends[hi - 1])
        self.starts[lo:hi] = [offset]
        self.ends[lo:hi] = [end]

    def prefix(self) -> int:
        """
        How many bytes from offset 0 on have been received.
        """
        return self.ends[0] if self.starts and self.starts[0] == 0 else 0

    def last(self) -> int:
        """
        The end of the furthest range received.
        """
        return self.ends[-1] if self.ends else 0


class ClientHelloAssembler:
    """
    Puts together the ClientHello a client sends in its Initial packets,
    one datagram at a time.

    @ivar limit: the largest ClientHello body accepted.
    @ivar maxDatagrams: how many datagrams may be fed before the hello is
        whole.
    @ivar minDatagramSize: the smallest datagram taken (1200, RFC 9000
        section 14.1); tests of the parsing itself may lower it.
    @ivar header: the header of the first datagram taken, L{None} before.
    @ivar datagrams: how many datagrams have been fed, taken or not.
    @ivar info: the ClientHello, once whole.
    """

    def __init__(
        self,
        limit: int = DEFAULT_LIMIT,
        maxDatagrams: int = DEFAULT_MAX_DATAGRAMS,
        minDatagramSize: int = MIN_DATAGRAM_SIZE,
    ) -> None:
        self.limit = limit
        self.maxDatagrams = maxDatagrams
        self.minDatagramSize = minDatagramSize
        self.header: InitialHeader | None = None
        self.datagrams = 0
        self.info: ClientHelloInfo | None = None
        self._crypto: CryptoPair | None = None
        self._ranges = _Ranges()
        self._nextPacketNumber = 0

    def feed(self, datagram: bytes) -> ClientHelloInfo | None:
        """
        Take the next datagram the client sent.

        @return: L{None} while the ClientHello is not whole, then the
            parsed hello (again for every later datagram, which is not
            looked at).
        @raise InitialError: if the datagram is not one of this client's
            Initial datagrams, holds what a client's Initials may not, or
            goes past a bound; the datagram is then not taken in.
        """
        if self.info is not None:
            return self.info
        self.datagrams += 1
        if self.datagrams > self.maxDatagrams:
            raise InitialError(f"no whole ClientHello in {self.maxDatagrams} datagrams")
        data = bytes(datagram)
        if len(data) < self.minDatagramSize:
            raise InitialError(f"a datagram of {len(data)} bytes (an Initial needs {self.minDatagramSize})")
        first = _longPacket(data, 0)
        if first.kind != "initial":
            raise InitialError(f"a datagram starting with a {first.kind} packet, not an Initial")
        header = InitialHeader(first.version, first.destinationCID, first.sourceCID, first.token, first.end)
        if self.header is None:
            crypto = CryptoPair()
            crypto.setup_initial(header.destinationCID, is_client=False, version=header.version)
        else:
            if (header.destinationCID, header.version) != (self.header.destinationCID, self.header.version):
                raise InitialError(
                    f"an Initial for connection id {header.destinationCID.hex()} version 0x{header.version:08x},"
                    f" not {self.header.destinationCID.hex()} 0x{self.header.version:08x}"
                )
            assert self._crypto is not None
            crypto = self._crypto

        ranges = self._ranges.copy()
        nextPacketNumber = self._nextPacketNumber
        packet: _LongPacket | None = first
        while packet is not None:
            if (
                packet.kind == "initial"
                and packet.version == header.version
                and packet.destinationCID == header.destinationCID
            ):
                number, payload = self._decrypt(crypto, data, packet, nextPacketNumber)
                nextPacketNumber = max(nextPacketNumber, number + 1)
                self._frames(payload, number, ranges)
            packet = self._next(data, packet.end)
        info = self._hello(ranges)

        # Everything checked: take the datagram in.
        if self.header is None:
            self.header = header
            self._crypto = crypto
        self._ranges = ranges
        self._nextPacketNumber = nextPacketNumber
        self.info = info
        return info

    @staticmethod
    def _next(data: bytes, pos: int) -> _LongPacket | None:
        """
        The long header packet coalesced at C{pos}, or L{None} at the end
        of the datagram, at a short header packet (which must come last),
        or at bytes that are not a packet (which are left alone: the
        datagram's first packet is what the client is judged on).
        """
        if pos >= len(data) or not data[pos] & 0x80:
            return None
        try:
            return _longPacket(data, pos)
        except InitialError:
            return None

    @staticmethod
    def _decrypt(crypto: CryptoPair, data: bytes, packet: _LongPacket, expected: int) -> tuple[int, bytes]:
        """
        Remove the protection of one Initial packet.

        @return: its packet number and its payload.
        """
        if packet.end - packet.pnOffset < _SAMPLE_END:
            raise InitialError(f"an Initial of {packet.end - packet.pnOffset} bytes after its header, too short to sample")
        try:
            plainHeader, payload, number = crypto.decrypt_packet(
                data[packet.start : packet.end], packet.pnOffset - packet.start, expected
            )
        except CryptoError as e:
            raise InitialError(f"an Initial packet that does not decrypt with the keys of its connection id ({e})") from None
        if plainHeader[0] & 0x0C:
            raise InitialError("an Initial packet with reserved bits set")
        if not payload:
            raise InitialError("an Initial packet without frames")
        return number, payload

    def _frames(self, payload: bytes, number: int, ranges: _Ranges) -> None:
        """
        Read the frames of a decrypted Initial packet, putting its CRYPTO
        data into C{ranges}.
        """
        r = _Reader(payload, 0, f"Initial packet {number}")
        bound = self.limit + 4
        while r.remaining():
            frameType = r.uint(1, "a frame type")
            if frameType in (_PADDING, _PING):
                continue
            if frameType in (_ACK, _ACK_ECN):
                r.varint("ACK largest acknowledged")
                r.varint("ACK delay")
                count = r.varint("ACK range count")
                r.varint("ACK first range")
                # Each range is two varints of at least one byte each, so
                # this loop ends within the payload.
                while count:
                    r.varint("ACK gap")
                    r.varint("ACK range length")
                    count -= 1
                if frameType == _ACK_ECN:
                    for name in ("ECT0", "ECT1", "ECN-CE"):
                        r.varint(f"ACK {name} count")
            elif frameType == _CRYPTO:
                offset = r.varint("CRYPTO offset")
                length = r.varint("CRYPTO length")
                if offset + length > bound:
                    raise InitialError(
                        f"CRYPTO data up to offset {offset + length}, past a ClientHello of {self.limit} bytes"
                    )
                ranges.add(offset, r.take(length, "CRYPTO data"))
            elif frameType == _CONNECTION_CLOSE:
                code = r.varint("CONNECTION_CLOSE error code")
                raise InitialError(f"the client closed the connection (error 0x{code:x})")
            else:
                raise InitialError(f"a frame of type 0x{frameType:02x} in an Initial packet")

    def _hello(self, ranges: _Ranges) -> ClientHelloInfo | None:
        """
        Check what has come of the handshake message, and parse it once it
        is whole.
        """
        have = ranges.prefix()
        data = ranges.data
        if have >= 1 and data[0] != CLIENT_HELLO:
            raise InitialError(f"a handshake message of type {data[0]}, not a ClientHello")
        if have < 4:
            return None
        length = int.from_bytes(data[1:4], "big")
        if length > self.limit:
            raise InitialError(f"a ClientHello of {length} bytes (limit {self.limit})")
        if ranges.last() > 4 + length:
            raise InitialError(f"CRYPTO data up to offset {ranges.last()}, past the ClientHello's {4 + length}")
        if have < 4 + length:
            return None
        try:
            return parseClientHelloBody(bytes(data[4 : 4 + length]))
        except ClientHelloError as e:
            raise InitialError(f"a malformed ClientHello: {e}") from e

