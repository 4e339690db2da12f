"""
Tests for L{tpproxy.transports.quicinitial}: the Initial datagrams of a
real aioquic client, Initial packets built here around real ClientHellos
(aioquic's TLS) with CRYPTO frames cut, scattered and repeated as Chromium
does, garbage of every kind, and a fuzz loop.
"""

from __future__ import annotations

import random

from aioquic import tls
from aioquic.buffer import Buffer, encode_uint_var
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.clienthello import ClientHelloInfo
from tpproxy.transports.quicinitial import (
    VERSION_1,
    VERSION_2,
    ClientHelloAssembler,
    InitialError,
    InitialHeader,
    parseInitialHeader,
)

DCID = bytes.fromhex("8394c8f03e515708")
SCID = bytes.fromhex("c0ffee00c0ffee00")
#: An ALPN list that makes aioquic's ClientHello about 2.1 KB: two datagrams.
BIG_ALPN = ["h3"] + [f"proto-{i:03d}-" + "x" * 90 for i in range(20)]


def clientDatagrams(
    alpn: list[str], serverName: str | None = "site.test", version: int = VERSION_1
) -> tuple[list[bytes], bytes]:
    """
    The first flight of a real aioquic client, and its original
    destination connection id.
    """
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name=serverName)
    config.original_version = version
    conn = QuicConnection(configuration=config)
    conn.connect(("192.0.2.1", 443), now=0.0)
    return [data for data, _ in conn.datagrams_to_send(now=0.0)], conn.original_destination_connection_id


def clientHello(alpn: list[str], serverName: str | None = "site.test") -> bytes:
    """
    A ClientHello handshake message (with its 4-byte header) made by
    aioquic's TLS.
    """
    ctx = tls.Context(is_client=True, alpn_protocols=alpn, server_name=serverName)
    ctx.handshake_extensions = [(0x39, b"\x01\x02\x47\xd0")]  # quic_transport_parameters
    buffers = {epoch: Buffer(capacity=65536) for epoch in tls.Epoch}
    ctx.handle_message(b"", buffers)
    return buffers[tls.Epoch.INITIAL].data


def crypto(offset: int, data: bytes) -> bytes:
    """
    A CRYPTO frame.
    """
    return b"\x06" + encode_uint_var(offset) + encode_uint_var(len(data)) + data


def packet(
    frames: bytes,
    number: int = 0,
    dcid: bytes = DCID,
    version: int = VERSION_1,
    token: bytes = b"",
    keys: bytes | None = None,
    padTo: int = 0,
    first: int | None = None,
    tokenField: bool = True,
) -> bytes:
    """
    One protected client Initial packet, padded with PADDING frames to
    C{padTo} bytes.

    @param keys: the connection id whose keys protect it (C{dcid}'s if
        L{None}).
    @param first: the first byte before protection (the default is an
        Initial of the version with a 2-byte packet number).
    @param tokenField: whether the header has a token length (only an
        Initial's has).
    """
    pair = CryptoPair()
    pair.setup_initial(dcid if keys is None else keys, is_client=True, version=version)
    if first is None:
        first = 0xC1 | (0x10 if version == VERSION_2 else 0x00)  # a 2-byte packet number
    pn = number.to_bytes((first & 0x03) + 1, "big")
    head = bytes([first]) + version.to_bytes(4, "big") + bytes([len(dcid)]) + dcid + bytes([len(SCID)]) + SCID
    if tokenField:
        head += encode_uint_var(len(token)) + token

    def header(payload: bytes) -> bytes:
        # A 2-byte Length is enough for every packet built here.
        return head + (0x4000 | (len(pn) + len(payload) + 16)).to_bytes(2, "big") + pn

    payload = frames
    size = len(header(payload)) + len(payload) + 16
    if size < padTo:
        payload += bytes(padTo - size)
    return pair.encrypt_packet(header(payload), payload, number)


def datagram(*frameLists: bytes, first: int = 0, **kw: object) -> bytes:
    """
    One datagram of 1200 bytes holding an Initial packet for each of
    C{frameLists}, numbered from C{first}; the last packet is padded.
    """
    packets = [packet(frames, number=first + i, **kw) for i, frames in enumerate(frameLists[:-1])]  # type: ignore[arg-type]
    used = sum(len(p) for p in packets)
    packets.append(packet(frameLists[-1], number=first + len(frameLists) - 1, padTo=1200 - used, **kw))  # type: ignore[arg-type]
    return b"".join(packets)


def split(data: bytes, size: int) -> list[tuple[int, bytes]]:
    """
    C{data} cut into (offset, chunk) pieces of C{size} bytes.
    """
    return [(i, data[i : i + size]) for i in range(0, len(data), size)]


def feedAll(assembler: ClientHelloAssembler, datagrams: list[bytes]) -> list[ClientHelloInfo | None]:
    return [assembler.feed(d) for d in datagrams]


class ParseInitialHeaderTests(SynchronousTestCase):
    """
    L{parseInitialHeader} reads the clear header of a first Initial packet
    and answers L{None} for anything else.
    """

    def test_aioquicClient(self) -> None:
        """
        The header of a real aioquic client's first datagram: version 1,
        its original destination id, its source id, no token.
        """
        datagrams, dcid = clientDatagrams(["h3"])
        header = parseInitialHeader(datagrams[0])
        assert header is not None
        self.assertEqual((header.version, header.destinationCID, header.token), (VERSION_1, dcid, b""))
        self.assertEqual(len(header.sourceCID), 8)
        self.assertLessEqual(header.packetLength, len(datagrams[0]))

    def test_version2(self) -> None:
        """
        A version 2 Initial (whose type bits are 01) is read as one.
        """
        datagrams, dcid = clientDatagrams(["h3"], version=VERSION_2)
        header = parseInitialHeader(datagrams[0])
        self.assertEqual(header and (header.version, header.destinationCID), (VERSION_2, dcid))

    def test_token(self) -> None:
        """
        The token is returned.
        """
        header = parseInitialHeader(packet(crypto(0, b"\x01"), token=b"tok", padTo=1200))
        self.assertEqual(
            header,
            InitialHeader(VERSION_1, DCID, SCID, b"tok", 1200),
        )

    def test_notInitial(self) -> None:
        """
        Short headers, other long packet types, other versions, version
        negotiation, overlong connection ids, a cleared fixed bit without a
        token, and truncations give L{None}.
        """
        good = packet(crypto(0, b"\x01"), padTo=1200)
        cases = {
            "empty": b"",
            "short header": b"\x40" + good[1:],
            "0-RTT v1": bytes([good[0] & 0xCF | 0x10]) + good[1:],
            "Handshake v1": bytes([good[0] & 0xCF | 0x20]) + good[1:],
            "Retry v1": bytes([good[0] & 0xCF | 0x30]) + good[1:],
            "Initial type bits under v2": good[:1] + VERSION_2.to_bytes(4, "big") + good[5:],
            "version 0xff00001d": good[:1] + bytes.fromhex("ff00001d") + good[5:],
            "version negotiation": good[:1] + bytes(4) + good[5:],
            "21-byte dcid": good[:5] + b"\x15" + bytes(21) + good[6 + 8 :],
            "fixed bit 0": bytes([good[0] & ~0x40 & 0xFF]) + good[1:],
        }
        for cut in (1, 5, 6, 10, 14, 15, 17, 18, 100, 1199):
            cases[f"cut to {cut}"] = good[:cut]
        for name, data in cases.items():
            self.assertIsNone(parseInitialHeader(data), name)

    def test_fixedBitWithToken(self) -> None:
        """
        A client may clear the fixed bit of an Initial that carries a token
        (RFC 9287 section 3.1).
        """
        header = parseInitialHeader(packet(crypto(0, b"\x01"), token=b"t", padTo=1200, first=0x81))
        self.assertEqual(header and header.token, b"t")

    def test_randomBytes(self) -> None:
        """
        Random bytes never raise.
        """
        rng = random.Random(1415)
        for _ in range(3000):
            data = rng.randbytes(rng.randrange(0, 1300))
            header = parseInitialHeader(data)
            self.assertIn(type(header), (InitialHeader, type(None)))


class RealClientTests(SynchronousTestCase):
    """
    L{ClientHelloAssembler} reads what a real aioquic client sends.
    """

    def check(self, alpn: list[str], serverName: str | None, version: int = VERSION_1) -> list[bytes]:
        datagrams, dcid = clientDatagrams(alpn, serverName, version)
        assembler = ClientHelloAssembler()
        results = feedAll(assembler, datagrams)
        self.assertEqual(results[:-1], [None] * (len(datagrams) - 1))
        info = results[-1]
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), (serverName, tuple(alpn)))
        self.assertIn(0x0304, info.supportedVersions)
        self.assertEqual(assembler.header and assembler.header.destinationCID, dcid)
        return datagrams

    def test_oneDatagram(self) -> None:
        """
        A small ClientHello in one datagram gives its SNI and ALPN.
        """
        self.assertEqual(len(self.check(["h3", "tp/1"], "site.test")), 1)

    def test_noServerName(self) -> None:
        """
        A ClientHello without SNI gives no server name.
        """
        self.check(["tp/1"], None)

    def test_version2(self) -> None:
        """
        QUIC version 2 Initials are read with their own keys.
        """
        self.check(["h3"], "v2.test", VERSION_2)

    def test_spansDatagrams(self) -> None:
        """
        A ClientHello that spans several datagrams is whole after the last.
        """
        self.assertGreater(len(self.check(BIG_ALPN, "big.test")), 1)
        self.assertGreater(len(self.check(BIG_ALPN, "big.test", VERSION_2)), 1)

    def test_reverseOrder(self) -> None:
        """
        The datagrams of a ClientHello may arrive in any order, and
        repeated.
        """
        datagrams, _ = clientDatagrams(BIG_ALPN, "big.test")
        self.assertGreater(len(datagrams), 1)
        assembler = ClientHelloAssembler()
        results = feedAll(assembler, [datagrams[-1], datagrams[-1]] + datagrams[-2::-1])
        self.assertEqual(results[:-1], [None] * (len(datagrams)))
        self.assertEqual(results[-1] and results[-1].alpn, tuple(BIG_ALPN))

    def test_afterWhole(self) -> None:
        """
        Once whole, the hello is answered again for every datagram, which
        is not looked at.
        """
        datagrams, _ = clientDatagrams(["h3"])
        assembler = ClientHelloAssembler()
        info = assembler.feed(datagrams[0])
        self.assertIs(assembler.feed(b"anything"), info)
        self.assertIs(assembler.info, info)

    def test_wrongKeys(self) -> None:
        """
        A datagram whose destination id was changed (so the keys differ)
        does not decrypt.
        """
        datagrams, dcid = clientDatagrams(["h3"])
        data = bytearray(datagrams[0])
        data[6] ^= 1  # the first byte of the destination id
        error = self.assertRaises(InitialError, ClientHelloAssembler().feed, bytes(data))
        self.assertIn("does not decrypt", str(error))

    def test_flippedCiphertext(self) -> None:
        """
        A flipped ciphertext byte fails authentication.
        """
        datagrams, _ = clientDatagrams(["h3"])
        data = bytearray(datagrams[0])
        data[300] ^= 0x80
        self.assertRaises(InitialError, ClientHelloAssembler().feed, bytes(data))

    def test_truncated(self) -> None:
        """
        A truncated Initial is refused: as too small a datagram, and, when
        that check is off, for its Length or its authentication.  (aioquic
        pads its datagrams with zeros after the packet, which are not part
        of the packet.)
        """
        datagrams, _ = clientDatagrams(["h3"])
        data = datagrams[0]
        end = parseInitialHeader(data).packetLength  # type: ignore[union-attr]
        self.assertLess(end, 1200)
        self.assertIn("1200", str(self.assertRaises(InitialError, ClientHelloAssembler().feed, data[:1199])))
        for cut in (0, 1, 7, 20, 40, 100, end - 1):
            self.assertRaises(InitialError, ClientHelloAssembler(minDatagramSize=0).feed, data[:cut])

    def test_otherConnection(self) -> None:
        """
        A datagram of another connection attempt (another destination id)
        is refused and not taken in; the assembler goes on with its own.
        """
        mine, _ = clientDatagrams(BIG_ALPN, "mine.test")
        other, _ = clientDatagrams(["h3"], "other.test")
        assembler = ClientHelloAssembler()
        self.assertIsNone(assembler.feed(mine[0]))
        self.assertIn("not", str(self.assertRaises(InitialError, assembler.feed, other[0])))
        info = feedAll(assembler, mine[1:])[-1]
        self.assertEqual(info and info.serverName, "mine.test")

    def test_badDatagramNotTaken(self) -> None:
        """
        A datagram that raises leaves the assembler as it was: the same
        connection's good datagram is read after it.
        """
        datagrams, _ = clientDatagrams(["h3"])
        assembler = ClientHelloAssembler()
        bad = bytearray(datagrams[0])
        bad[parseInitialHeader(datagrams[0]).packetLength - 1] ^= 1  # type: ignore[union-attr]
        self.assertRaises(InitialError, assembler.feed, bytes(bad))
        self.assertIsNone(assembler.header)
        info = assembler.feed(datagrams[0])
        self.assertEqual(info and info.alpn, ("h3",))

    def test_tooManyDatagrams(self) -> None:
        """
        After C{maxDatagrams} datagrams without a whole hello, every
        further datagram is refused.
        """
        datagrams, _ = clientDatagrams(BIG_ALPN)
        assembler = ClientHelloAssembler(maxDatagrams=3)
        for _ in range(3):
            self.assertIsNone(assembler.feed(datagrams[0]))
        error = self.assertRaises(InitialError, assembler.feed, datagrams[1])
        self.assertIn("3 datagrams", str(error))
        self.assertRaises(InitialError, assembler.feed, datagrams[1])


class BuiltPacketTests(SynchronousTestCase):
    """
    Initial packets built here around a real ClientHello: CRYPTO frames cut,
    reordered and repeated, and frames an Initial may not carry.
    """

    hello = clientHello(["h3", "tp/1"], "built.test")

    def assertHello(self, assembler: ClientHelloAssembler, datagrams: list[bytes]) -> ClientHelloInfo:
        results = feedAll(assembler, datagrams)
        self.assertEqual(results[:-1], [None] * (len(datagrams) - 1))
        info = results[-1]
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), ("built.test", ("h3", "tp/1")))
        return info

    def test_framesOutOfOrder(self) -> None:
        """
        CRYPTO frames in any order within a packet, scattered among PING
        and PADDING frames as Chromium's chaos protection does.
        """
        pieces = split(self.hello, 37)
        rng = random.Random(9001)
        rng.shuffle(pieces)
        frames = b"".join(crypto(o, c) + rng.choice([b"\x01", b"\x00\x00\x00", b""]) for o, c in pieces)
        self.assertHello(ClientHelloAssembler(), [datagram(frames)])

    def test_packetsOutOfOrder(self) -> None:
        """
        Several Initial packets coalesced in one datagram, each with a part
        of the hello, the later parts first.
        """
        pieces = split(self.hello, 100)
        frames = [b"".join(crypto(o, c) for o, c in pieces[i::3]) for i in (2, 1, 0)]
        self.assertHello(ClientHelloAssembler(), [datagram(*frames)])

    def test_overlapsAndRepeats(self) -> None:
        """
        Overlapping CRYPTO ranges and repeated packets (the same packet
        number) with the same bytes are fine.
        """
        h = self.hello
        first = datagram(crypto(0, h[:200]) + crypto(100, h[100:300]), first=0)
        again = datagram(crypto(50, h[50:250]), first=0)
        rest = datagram(crypto(150, h[150:]) + crypto(0, h[:10]), first=1)
        self.assertHello(ClientHelloAssembler(), [first, again, first, rest])

    def test_ackAndZeroRTT(self) -> None:
        """
        ACK frames (with ranges and ECN counts) are read past, a 0-RTT
        packet coalesced between two Initials is skipped, and zeros after
        the packets are left alone.
        """
        ack = b"\x02\x05\x00\x01\x00\x01\x01" + b"\x03\x05\x00\x00\x00\x07\x08\x09"
        initial = packet(ack + crypto(0, self.hello[:100]))
        zeroRTT = packet(b"\x08" * 40, number=0, first=0xD1, tokenField=False)
        rest = packet(crypto(100, self.hello[100:]), number=1)
        data = initial + zeroRTT + rest
        data += b"\x00" * (1200 - len(data))
        self.assertHello(ClientHelloAssembler(), [data])

    def test_version2Built(self) -> None:
        """
        Built version 2 packets are read too.
        """
        self.assertHello(ClientHelloAssembler(), [datagram(crypto(0, self.hello), version=VERSION_2)])

    def test_conflict(self) -> None:
        """
        CRYPTO bytes that differ from bytes received before at the same
        offset are refused, also within one datagram.
        """
        h = self.hello
        changed = h[:50] + bytes([h[50] ^ 1]) + h[51:100]
        assembler = ClientHelloAssembler()
        self.assertIsNone(assembler.feed(datagram(crypto(0, h[:100]))))
        error = self.assertRaises(InitialError, assembler.feed, datagram(crypto(40, changed[40:]), first=1))
        self.assertIn("differ", str(error))
        self.assertRaises(InitialError, ClientHelloAssembler().feed, datagram(crypto(0, h[:100]) + crypto(0, changed)))

    def test_forbiddenFrames(self) -> None:
        """
        A STREAM frame, a NEW_CONNECTION_ID frame, an unknown frame type, a
        packet without frames, a CONNECTION_CLOSE: each is refused.
        """
        h = crypto(0, self.hello[:100])
        for name, frames in [
            ("STREAM", h + b"\x0a\x00\x03abc"),
            ("NEW_CONNECTION_ID", h + b"\x18\x01\x00\x08" + bytes(8) + bytes(16)),
            ("2-byte type", h + b"\x40\x06"),
            ("CONNECTION_CLOSE", b"\x1c\x0a\x00\x00" + h),
        ]:
            self.assertRaises(InitialError, ClientHelloAssembler().feed, datagram(frames))
        error = self.assertRaises(
            InitialError, ClientHelloAssembler(minDatagramSize=0).feed, packet(b"", first=0xC3)
        )
        self.assertIn("frames", str(error))

    def test_reservedBits(self) -> None:
        """
        An Initial whose reserved bits are set (under protection) is
        refused.
        """
        data = packet(crypto(0, self.hello), first=0xC1 | 0x04, padTo=1200)
        self.assertIn("reserved", str(self.assertRaises(InitialError, ClientHelloAssembler().feed, data)))

    def test_notClientHello(self) -> None:
        """
        A handshake message of another type (2, ServerHello) is refused as
        soon as its first byte arrives.
        """
        data = datagram(crypto(0, b"\x02" + self.hello[1:20]))
        self.assertIn("type 2", str(self.assertRaises(InitialError, ClientHelloAssembler().feed, data)))

    def test_malformedHello(self) -> None:
        """
        A ClientHello whose body does not parse is refused.
        """
        body = bytes(40)
        data = datagram(crypto(0, b"\x01" + len(body).to_bytes(3, "big") + body))
        self.assertIn("malformed", str(self.assertRaises(InitialError, ClientHelloAssembler().feed, data)))

    def test_limits(self) -> None:
        """
        A ClientHello over the limit, CRYPTO data past the limit (before
        the length is known), and CRYPTO data past the end of the hello
        are refused.
        """
        limit = len(self.hello) - 4 - 1
        error = self.assertRaises(InitialError, ClientHelloAssembler(limit=limit).feed, datagram(crypto(0, self.hello[:10])))
        self.assertIn("limit", str(error))
        error = self.assertRaises(InitialError, ClientHelloAssembler().feed, datagram(crypto(16 * 1024 + 4, b"x")))
        self.assertIn("past", str(error))
        error = self.assertRaises(InitialError, ClientHelloAssembler().feed, datagram(crypto(2**62 - 2, b"x")))
        self.assertIn("past", str(error))
        extra = datagram(crypto(0, self.hello + b"more"))
        self.assertIn("past the ClientHello", str(self.assertRaises(InitialError, ClientHelloAssembler().feed, extra)))

    def test_limitExact(self) -> None:
        """
        A ClientHello of exactly the limit is read.
        """
        limit = len(self.hello) - 4
        self.assertHello(ClientHelloAssembler(limit=limit), [datagram(crypto(0, self.hello))])

    def test_manySmallFrames(self) -> None:
        """
        A hello sent one byte per CRYPTO frame, in two datagrams, the odd
        offsets first, is put back together.
        """
        big = clientHello(BIG_ALPN, "built.test")
        h = big[:800]
        pieces = split(h, 1)
        firstHalf = [b"".join(crypto(o, c) for o, c in pieces[1::2][i::2]) for i in range(2)]
        secondHalf = [b"".join(crypto(o, c) for o, c in pieces[0::2][i::2]) for i in range(2)]
        assembler = ClientHelloAssembler()
        datagrams = [datagram(frames, first=i) for i, frames in enumerate(firstHalf + secondHalf)]
        for d in datagrams:
            self.assertIsNone(assembler.feed(d))
        rest = split(big[800:], 1000)
        self.assertIsNone(assembler.feed(datagram(crypto(800 + rest[0][0], rest[0][1]), first=4)))
        info = assembler.feed(datagram(b"".join(crypto(800 + o, c) for o, c in rest[1:]), first=5))
        self.assertEqual(info and info.alpn, tuple(BIG_ALPN))


class FuzzTests(SynchronousTestCase):
    """
    Mutated Initials give a hello, L{None} or L{InitialError}; nothing else.
    """

    def test_mutations(self) -> None:
        rng = random.Random(20240514)
        hello = clientHello(["h3"], "fuzz.test")
        seeds = clientDatagrams(BIG_ALPN, "fuzz.test")[0] + clientDatagrams(["h3"], "v2.test", VERSION_2)[0]
        seeds += [datagram(b"".join(crypto(o, c) + b"\x01" for o, c in split(hello, 64)[::-1]))]
        outcomes = {"hello": 0, "none": 0, "error": 0}
        for i in range(3000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                how = rng.randrange(4)
                pos = rng.randrange(len(data))
                if how == 0:
                    data[pos] ^= 1 << rng.randrange(8)
                elif how == 1:
                    del data[pos:]
                elif how == 2:
                    data[pos : pos + 1] = rng.randbytes(rng.randrange(0, 30))
                else:
                    data[pos] = rng.choice([0x00, 0x40, 0x80, 0xC0, 0xFF])
                if not data:
                    data = bytearray(b"\xc0")
            for minimum in (1200, 0):
                try:
                    result = ClientHelloAssembler(minDatagramSize=minimum).feed(bytes(data))
                except InitialError:
                    outcomes["error"] += 1
                else:
                    self.assertIn(type(result), (ClientHelloInfo, type(None)))
                    outcomes["hello" if result else "none"] += 1
            self.assertIn(type(parseInitialHeader(bytes(data))), (InitialHeader, type(None)))
        self.assertGreater(outcomes["error"], 0)

    def test_plaintextMutations(self) -> None:
        """
        Mutated frames, correctly encrypted, so that the frame reader and
        the hello parser see them: hello, L{None} or L{InitialError}.
        """
        rng = random.Random(77)
        hello = clientHello(["h3", "tp/1"], "fuzz.test")
        frames = b"".join(crypto(o, c) + b"\x01\x00" for o, c in split(hello, 90))
        outcomes = {"hello": 0, "none": 0, "error": 0}
        for _ in range(2000):
            plain = bytearray(frames)
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(len(plain))
                if rng.randrange(2):
                    plain[pos] ^= 1 << rng.randrange(8)
                else:
                    plain[pos] = rng.choice([0x00, 0x01, 0x02, 0x03, 0x06, 0x1C, 0x40, 0x80, 0xC0, 0xFF])
            try:
                result = ClientHelloAssembler(minDatagramSize=0).feed(packet(bytes(plain)))
            except InitialError:
                outcomes["error"] += 1
            else:
                self.assertIn(type(result), (ClientHelloInfo, type(None)))
                outcomes["hello" if result else "none"] += 1
        self.assertGreater(outcomes["error"], 0)
        self.assertGreater(outcomes["hello"], 0)
