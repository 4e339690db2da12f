"""
Tests for L{tpproxy.clienthello}: real ClientHellos made by OpenSSL at test
time, reframed and cut in every way, hand-built malformed ones, and fuzzing.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.clienthello import (
    ALERT_HANDSHAKE_FAILURE,
    DEFAULT_LIMIT,
    ClientHelloError,
    ClientHelloInfo,
    ClientHelloParser,
    parseClientHello,
)


def realClientHello(
    serverName: bytes | None = b"site.test",
    alpn: list[bytes] | None = None,
    tls12: bool = False,
) -> bytes:
    """
    The bytes OpenSSL sends to open a TLS connection: one or more records
    carrying its ClientHello.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    if tls12:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if serverName is not None:
        conn.set_tlsext_host_name(serverName)
    if alpn:
        conn.set_alpn_protos(alpn)
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(2**20)


def handshakeBytes(records: bytes) -> bytes:
    """
    The handshake stream carried by C{records}.
    """
    out = b""
    while records:
        length = int.from_bytes(records[3:5], "big")
        out += records[5 : 5 + length]
        records = records[5 + length :]
    return out


def frame(handshake: bytes, sizes: list[int] | int, version: int = 0x0303) -> bytes:
    """
    Put a handshake stream into records of C{sizes} bytes (cycling through
    the list; the last record takes what is left).
    """
    if isinstance(sizes, int):
        sizes = [sizes]
    out = b""
    i = 0
    while handshake:
        size = sizes[i % len(sizes)]
        i += 1
        chunk, handshake = handshake[:size], handshake[size:]
        out += struct.pack(">BHH", 22, version, len(chunk)) + chunk
    return out


def extension(extType: int, data: bytes) -> bytes:
    return struct.pack(">HH", extType, len(data)) + data


def sni(*names: bytes, nameType: int = 0) -> bytes:
    entries = b"".join(struct.pack(">BH", nameType, len(n)) + n for n in names)
    return extension(0, struct.pack(">H", len(entries)) + entries)


def alpnExtension(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return extension(16, struct.pack(">H", len(entries)) + entries)


def helloBody(
    extensions: bytes | None = b"",
    version: int = 0x0303,
    sessionID: bytes = b"",
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    body = struct.pack(">H", version) + b"R" * 32
    body += bytes([len(sessionID)]) + sessionID
    body += struct.pack(">H", len(suites)) + suites
    body += bytes([len(compression)]) + compression
    if extensions is not None:
        body += struct.pack(">H", len(extensions)) + extensions
    return body


def hello(body: bytes, msgType: int = 1) -> bytes:
    """
    A ClientHello handshake message in one record.
    """
    return frame(bytes([msgType]) + len(body).to_bytes(3, "big") + body, 2**14)


class RealHelloTests(SynchronousTestCase):
    """
    ClientHellos made by OpenSSL.
    """

    def test_sniAndALPN(self) -> None:
        data = realClientHello(b"Site.Test", [b"tp/1", b"h2"])
        info = parseClientHello(data)
        assert info is not None
        self.assertEqual(info.serverName, "site.test")
        self.assertEqual(info.alpn, ("tp/1", "h2"))
        self.assertIn(0x0304, info.supportedVersions)
        self.assertEqual(info.legacyVersion, 0x0303)
        self.assertIn(0, info.extensions)
        self.assertIn(16, info.extensions)
        self.assertEqual(info.length, len(handshakeBytes(data)) - 4)

    def test_neither(self) -> None:
        info = parseClientHello(realClientHello(None, None))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), (None, ()))
        self.assertNotIn(0, info.extensions)
        self.assertNotIn(16, info.extensions)

    def test_sniOnly(self) -> None:
        info = parseClientHello(realClientHello(b"www.example.com", None))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), ("www.example.com", ()))

    def test_alpnOnly(self) -> None:
        info = parseClientHello(realClientHello(None, [b"http/1.1"]))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), (None, ("http/1.1",)))

    def test_tls12(self) -> None:
        """
        A TLS 1.2 ClientHello has no supported_versions.
        """
        info = parseClientHello(realClientHello(b"old.test", [b"h2"], tls12=True))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn, info.supportedVersions), ("old.test", ("h2",), ()))

    def test_oneByteAtATime(self) -> None:
        """
        Fed one byte at a time, every prefix needs more and the last byte
        completes the hello.
        """
        data = realClientHello(b"site.test", [b"tp/1"])
        parser = ClientHelloParser()
        for i in range(len(data) - 1):
            self.assertIsNone(parser.feed(data[i : i + 1]), i)
        info = parser.feed(data[-1:])
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), ("site.test", ("tp/1",)))
        self.assertRaises(RuntimeError, parser.feed, b"")

    def test_everyPrefix(self) -> None:
        data = realClientHello(b"site.test", [b"tp/1", b"h2"])
        for i in range(len(data)):
            self.assertIsNone(parseClientHello(data[:i]), i)

    def test_reframed(self) -> None:
        """
        The handshake message split into records of any size parses the
        same, also one byte at a time.
        """
        data = realClientHello(b"site.test", [b"h2", b"http/1.1"])
        expected = parseClientHello(data)
        hs = handshakeBytes(data)
        for sizes in ([1], [2], [3], [4], [5], [7, 1], [100], [1, 2, 3, 50], [len(hs) - 1]):
            reframed = frame(hs, sizes)
            self.assertEqual(parseClientHello(reframed), expected, sizes)
            parser = ClientHelloParser()
            results = [parser.feed(reframed[i : i + 1]) for i in range(len(reframed))]
            self.assertEqual(results[-1], expected)
            self.assertEqual(results[:-1], [None] * (len(reframed) - 1))

    def test_trailingBytesIgnored(self) -> None:
        """
        Records after the ClientHello's (a ChangeCipherSpec, early data) are
        the caller's business.
        """
        data = realClientHello(b"site.test", [b"tp/1"])
        self.assertEqual(parseClientHello(data + b"\x14\x03\x03\x00\x01\x01garbage"), parseClientHello(data))

    def test_bigHelloAcrossRecords(self) -> None:
        """
        OpenSSL splits a ClientHello over 16 KiB into several records; with a
        limit high enough it parses, with the default it is too big.
        """
        names = [b"p%03d" % i + b"x" * 60 for i in range(300)]
        data = realClientHello(b"site.test", names)
        self.assertGreater(data.count(b"\x16\x03\x01"), 1)
        info = parseClientHello(data, limit=64 * 1024)
        assert info is not None
        self.assertEqual(len(info.alpn), 300)
        self.assertGreater(info.length, DEFAULT_LIMIT)
        with self.assertRaises(ClientHelloError) as e:
            parseClientHello(data)
        self.assertIn("too big", str(e.exception))
        self.assertEqual(e.exception.alert, ALERT_HANDSHAKE_FAILURE)

    def test_tooBigFromTheHeader(self) -> None:
        """
        The size limit is enforced as soon as the handshake header arrives.
        """
        header = b"\x16\x03\x01\x00\x04\x01\x00\x40\x01"
        self.assertRaisesRegex(ClientHelloError, "too big", parseClientHello, header, limit=16 * 1024)
        self.assertIsNone(parseClientHello(header, limit=16 * 1024 + 1))
        # ... also when the record carrying it is not complete:
        partial = b"\x16\x03\x01\x40\x00\x01\x00\x40\x01"
        self.assertRaisesRegex(ClientHelloError, "too big", parseClientHello, partial, limit=16 * 1024)
        self.assertIsNone(parseClientHello(partial, limit=16 * 1024 + 1))
        # ... and split over records:
        split = b"\x16\x03\x01\x00\x02\x01\x00\x16\x03\x01\x40\x00\x40\x01"
        self.assertRaisesRegex(ClientHelloError, "too big", parseClientHello, split, limit=16 * 1024)

    def test_recordLongerThanHello(self) -> None:
        """
        A record that would carry more than the ClientHello is refused as
        soon as the handshake header shows it.
        """
        self.assertRaisesRegex(
            ClientHelloError, "3 bytes follow", parseClientHello, b"\x16\x03\x01\x00\x32\x01\x00\x00\x2b"
        )


class PlaintextTests(SynchronousTestCase):
    """
    What is not TLS is refused from its first byte.
    """

    def test_http(self) -> None:
        for first in (b"G", b"GET / HTTP/1.1\r\n", b"P", b"\x00", b"SSH-2.0-", b"\x80"):
            with self.assertRaises(ClientHelloError) as e:
                ClientHelloParser().feed(first)
            self.assertIsNone(e.exception.alert, first)

    def test_secondByte(self) -> None:
        self.assertRaises(ClientHelloError, parseClientHello, b"\x16\x04")
        self.assertIsNone(parseClientHello(b"\x16\x03"))

    def test_recordVersion(self) -> None:
        for v in range(5):
            self.assertIsNone(parseClientHello(bytes([22, 3, v])))
        self.assertRaises(ClientHelloError, parseClientHello, b"\x16\x03\x05")

    def test_emptyString(self) -> None:
        self.assertIsNone(parseClientHello(b""))


class MalformedTests(SynchronousTestCase):
    """
    Hand-built ClientHellos, each wrong in one way.
    """

    def assertError(self, data: bytes, message: str) -> None:
        with self.assertRaises(ClientHelloError) as e:
            parseClientHello(data)
        self.assertIn(message, str(e.exception))

    def test_wellFormed(self) -> None:
        """
        The builder itself makes a hello that parses.
        """
        info = parseClientHello(hello(helloBody(sni(b"a.test") + alpnExtension(b"tp/1"))))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn), ("a.test", ("tp/1",)))

    def test_noExtensions(self) -> None:
        """
        A hello without an extensions block (allowed before TLS 1.3) has no
        name and no ALPN.
        """
        info = parseClientHello(hello(helloBody(None)))
        assert info is not None
        self.assertEqual((info.serverName, info.alpn, info.extensions), (None, (), ()))

    def test_emptyRecord(self) -> None:
        self.assertError(b"\x16\x03\x01\x00\x00", "empty handshake record")

    def test_recordTooLarge(self) -> None:
        self.assertError(b"\x16\x03\x01\xff\xff", "record of 65535 bytes")

    def test_notClientHello(self) -> None:
        self.assertError(hello(helloBody(), msgType=2), "not a ClientHello")
        self.assertError(b"\x16\x03\x01\x00\x01\x02", "not a ClientHello")

    def test_otherRecordInside(self) -> None:
        """
        A record of another content type may not interrupt the ClientHello.
        """
        hs = handshakeBytes(hello(helloBody()))
        data = frame(hs[:10], 10) + b"\x15\x03\x03\x00\x02\x02\x28" + frame(hs[10:], 100)
        self.assertError(data, "content type 21 in the middle")

    def test_trailingHandshakeBytes(self) -> None:
        hs = handshakeBytes(hello(helloBody()))
        self.assertError(frame(hs + b"\x02\x00", 2**14), "2 bytes follow the ClientHello")

    def test_legacyVersion(self) -> None:
        self.assertError(hello(helloBody(version=0x0200)), "legacy_version 0x0200")

    def test_shortBody(self) -> None:
        self.assertError(hello(b"\x03\x03" + b"R" * 10), "random needs 32 bytes")

    def test_sessionID(self) -> None:
        self.assertIsNotNone(parseClientHello(hello(helloBody(sessionID=b"s" * 32))))
        self.assertError(hello(helloBody(sessionID=b"s" * 33)), "legacy_session_id of 33 bytes")

    def test_cipherSuites(self) -> None:
        self.assertError(hello(helloBody(suites=b"\x13\x01\x13")), "cipher_suites of 3 bytes")
        self.assertError(hello(helloBody(suites=b"")), "cipher_suites of 0 bytes")

    def test_compression(self) -> None:
        self.assertError(hello(helloBody(compression=b"")), "null compression")
        self.assertError(hello(helloBody(compression=b"\x01")), "null compression")

    def test_extensionsLength(self) -> None:
        body = helloBody(sni(b"a.test"))
        # One byte more in the extensions block than its length says:
        self.assertError(hello(body + b"\x00"), "stray bytes after extensions")
        # An extension longer than the block:
        bad = helloBody(b"") [:-2] + struct.pack(">H", 4) + struct.pack(">HH", 16, 10)
        self.assertError(hello(bad), "needs 10 bytes")
        # A block length that runs past the end of the hello:
        self.assertError(hello(body[:-1]), "needs")

    def test_duplicateExtension(self) -> None:
        self.assertError(hello(helloBody(sni(b"a.test") + sni(b"b.test"))), "extension 0 appears twice")
        self.assertError(hello(helloBody(extension(0xAAAA, b"") + extension(0xAAAA, b"x"))), "appears twice")

    def test_sniNames(self) -> None:
        """
        A host_name is read as L{tpproxy.names.serverName} says: lowercased,
        without a final dot, C{_} and single labels allowed; an IP literal
        is read as no name; anything else is refused with
        C{illegal_parameter}.
        """
        for name, expected in (
            (b"A.Test", "a.test"),
            (b"a.test.", "a.test"),
            (b"localhost", "localhost"),
            (b"_srv.x-y.test", "_srv.x-y.test"),
            (b"1.2.3.4", None),
            (b"2001:db8::1", None),
        ):
            info = parseClientHello(hello(helloBody(sni(name))))
            assert info is not None
            self.assertEqual(info.serverName, expected)
            self.assertEqual(info.extensions, (0,))
        for bad in (b"", b".", b"a..test", b"-a.test", b"a-.test", b"caf\xc3\xa9.test", b"a test", b"a/b", b"a\x00b",
                    b"x" * 64 + b".test", b"[::1]", b"a.test..", b"a" * 254, b"1.2.3", b"a.0x7f"):
            with self.assertRaises(ClientHelloError, msg=repr(bad)):
                parseClientHello(hello(helloBody(sni(bad))))

    def test_sniStructure(self) -> None:
        self.assertError(hello(helloBody(sni(b"a.test", nameType=1))), "name_type 1")
        self.assertError(hello(helloBody(sni(b"a.test", b"b.test"))), "one name only")
        self.assertError(hello(helloBody(sni())), "empty server_name_list")
        self.assertError(hello(helloBody(extension(0, b""))), "length of server_name_list")
        self.assertError(hello(helloBody(extension(0, b"\x00\x04\x00\x00\x01a\x00"))), "stray bytes after server_name_list")

    def test_alpnStructure(self) -> None:
        self.assertError(hello(helloBody(alpnExtension())), "empty protocol_name_list")
        self.assertError(hello(helloBody(alpnExtension(b"h2", b""))), "empty protocol name")
        self.assertError(hello(helloBody(extension(16, b"\x00\x03\x05h2"))), "needs 5 bytes")
        info = parseClientHello(hello(helloBody(alpnExtension(b"\xff\x00", b"tp/1"))))
        assert info is not None
        self.assertEqual(info.alpn, ("\xff\x00", "tp/1"))

    def test_supportedVersions(self) -> None:
        info = parseClientHello(hello(helloBody(extension(43, b"\x04\x03\x04\x03\x03"))))
        assert info is not None
        self.assertEqual(info.supportedVersions, (0x0304, 0x0303))
        self.assertError(hello(helloBody(extension(43, b"\x03\x03\x04\x03"))), "list of 3 bytes")
        self.assertError(hello(helloBody(extension(43, b"\x00"))), "list of 0 bytes")


_HELLOS = [
    realClientHello(b"site.test", [b"tp/1", b"h2"]),
    realClientHello(None, None, tls12=True),
]

_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parseInChunks(data: bytes, cuts: list[int]) -> ClientHelloInfo | None:
    """
    Feed C{data} cut at C{cuts}; only L{ClientHelloError} may escape.
    """
    parser = ClientHelloParser()
    last = 0
    result = None
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        result = parser.feed(data[last:cut])
        last = cut
        if result is not None:
            return result
    return result


class FuzzTests(SynchronousTestCase):
    """
    Whatever the input, the parser answers L{None}, a hello, or
    L{ClientHelloError}.
    """

    @_fuzz
    @given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
    def test_arbitraryBytes(self, data: bytes, cuts: list[int]) -> None:
        try:
            _parseInChunks(data, cuts)
        except ClientHelloError:
            pass

    @_fuzz
    @given(st.binary(max_size=400))
    def test_arbitraryRecord(self, payload: bytes) -> None:
        """
        Arbitrary bytes inside a well-formed record and handshake header.
        """
        data = hello(payload)
        try:
            parseClientHello(data)
        except ClientHelloError:
            pass

    @_fuzz
    @given(
        st.sampled_from(_HELLOS),
        st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=7)), min_size=1, max_size=6),
    )
    def test_bitFlips(self, data: bytes, flips: list[tuple[int, int]]) -> None:
        mutated = bytearray(data)
        for pos, bit in flips:
            mutated[pos % len(mutated)] ^= 1 << bit
        try:
            _parseInChunks(bytes(mutated), [])
        except ClientHelloError:
            pass

    @_fuzz
    @given(st.sampled_from(_HELLOS), st.integers(min_value=0), st.binary(min_size=1, max_size=3))
    def test_overwrite(self, data: bytes, pos: int, junk: bytes) -> None:
        """
        Random values written over some bytes, lengths among them.
        """
        pos %= len(data)
        mutated = data[:pos] + junk + data[pos + len(junk) :]
        try:
            _parseInChunks(mutated, [pos])
        except ClientHelloError:
            pass

    @_fuzz
    @given(st.sampled_from(_HELLOS), st.integers(min_value=0), st.integers(min_value=1, max_value=50))
    def test_insertOrDelete(self, data: bytes, pos: int, size: int) -> None:
        pos %= len(data)
        for mutated in (data[:pos] + data[pos + size :], data[:pos] + b"\x00" * size + data[pos:]):
            try:
                parseClientHello(mutated)
            except ClientHelloError:
                pass

    @_fuzz
    @given(st.sampled_from(_HELLOS), st.integers(min_value=0), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
    def test_truncatedNeedsMore(self, data: bytes, length: int, cuts: list[int]) -> None:
        """
        A prefix of a valid hello, however it arrives, needs more.
        """
        prefix = data[: length % len(data)]
        self.assertIsNone(_parseInChunks(prefix, cuts))

    @_fuzz
    @given(st.sampled_from(_HELLOS), st.lists(st.integers(min_value=1, max_value=80), min_size=1, max_size=5))
    def test_reframedParsesTheSame(self, data: bytes, sizes: list[int]) -> None:
        self.assertEqual(parseClientHello(frame(handshakeBytes(data), sizes)), parseClientHello(data))
