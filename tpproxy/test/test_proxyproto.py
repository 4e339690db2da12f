"""
Tests for L{tpproxy.proxyproto}: the PROXY protocol v2 header.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.proxyproto import LOCAL, PROXY, SIGNATURE, ProxyInfo, ProxyProtocolError, parseProxyV2, proxyV2Header


class HeaderTests(SynchronousTestCase):
    def test_signature(self) -> None:
        self.assertEqual(SIGNATURE, bytes.fromhex("0D0A0D0A000D0A515549540A"))

    def test_ipv4Bytes(self) -> None:
        """
        The exact bytes of a TCP over IPv4 header.
        """
        header = proxyV2Header(IPv4Address("TCP", "192.0.2.1", 54321), IPv4Address("TCP", "198.51.100.7", 443))
        self.assertEqual(
            header,
            bytes.fromhex("0D0A0D0A000D0A515549540A" "21" "11" "000C" "C0000201" "C6336407" "D431" "01BB"),
        )

    def test_ipv6Bytes(self) -> None:
        header = proxyV2Header(IPv6Address("TCP", "2001:db8::1", 1), IPv6Address("TCP", "::1", 443))
        self.assertEqual(header[:16], SIGNATURE + b"\x21\x21\x00\x24")
        self.assertEqual(
            header[16:],
            bytes.fromhex("20010db8000000000000000000000001" "00000000000000000000000000000001" "0001" "01BB"),
        )

    def test_udp(self) -> None:
        header = proxyV2Header(IPv4Address("UDP", "127.0.0.1", 5), IPv4Address("UDP", "127.0.0.2", 6))
        self.assertEqual(header[13], 0x12)

    def test_local(self) -> None:
        """
        UNIX sockets and unknown addresses give the LOCAL command.
        """
        expected = SIGNATURE + b"\x20\x00\x00\x00"
        self.assertEqual(proxyV2Header(UNIXAddress(b"/tmp/s"), UNIXAddress(b"/tmp/s")), expected)
        self.assertEqual(proxyV2Header(None, None), expected)
        self.assertEqual(proxyV2Header(IPv4Address("TCP", "127.0.0.1", 1), UNIXAddress(b"/x")), expected)
        self.assertEqual(parseProxyV2(expected + b"rest"), (ProxyInfo(LOCAL), b"rest"))

    def test_mixedFamilies(self) -> None:
        """
        An IPv4 client reaching an IPv6 address is written as IPv6, with its
        address mapped; two mapped addresses are written as IPv4.
        """
        info, _ = parseProxyV2(proxyV2Header(IPv4Address("TCP", "192.0.2.1", 1), IPv6Address("TCP", "::1", 2)))
        assert info is not None
        self.assertEqual(info.source, IPv6Address("TCP", "::ffff:c000:201", 1))
        info, _ = parseProxyV2(
            proxyV2Header(IPv6Address("TCP", "::ffff:192.0.2.1", 1), IPv6Address("TCP", "::ffff:127.0.0.1", 2))
        )
        assert info is not None
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.1", 1))
        self.assertEqual(info.destination, IPv4Address("TCP", "127.0.0.1", 2))

    def test_scopeDropped(self) -> None:
        info, _ = parseProxyV2(proxyV2Header(IPv6Address("TCP", "fe80::1%eth0", 1), IPv6Address("TCP", "fe80::2%eth0", 2)))
        assert info is not None
        self.assertEqual(info.source, IPv6Address("TCP", "fe80::1", 1))


class ParseTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        for src, dst in (
            (IPv4Address("TCP", "10.1.2.3", 40000), IPv4Address("TCP", "127.0.0.1", 443)),
            (IPv6Address("TCP", "2001:db8::5", 65535), IPv6Address("TCP", "2001:db8::6", 0)),
            (IPv4Address("UDP", "10.1.2.3", 1), IPv4Address("UDP", "10.1.2.4", 2)),
        ):
            header = proxyV2Header(src, dst, tlvs=((0x04, b""), (0xE0, b"x" * 300)))
            self.assertEqual(
                parseProxyV2(header + b"\x16\x03\x01payload"),
                (ProxyInfo(PROXY, src, dst, ((0x04, b""), (0xE0, b"x" * 300))), b"\x16\x03\x01payload"),
            )

    def test_everyPrefixNeedsMore(self) -> None:
        header = proxyV2Header(IPv4Address("TCP", "10.1.2.3", 40000), IPv4Address("TCP", "127.0.0.1", 443), ((1, b"h2"),))
        for i in range(len(header)):
            self.assertEqual(parseProxyV2(header[:i]), (None, header[:i]))

    def test_notProxy(self) -> None:
        """
        What is not a v2 header is refused from its first differing byte:
        a TLS record, HTTP, a v1 header.
        """
        for data in (b"\x16", b"G", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"\r\n\r\n\x00\r\nQUIT\r"):
            self.assertRaises(ProxyProtocolError, parseProxyV2, data)

    def assertError(self, data: bytes, message: str) -> None:
        with self.assertRaises(ProxyProtocolError) as e:
            parseProxyV2(data)
        self.assertIn(message, str(e.exception))

    def test_version(self) -> None:
        self.assertError(SIGNATURE + b"\x11", "version 1")
        self.assertError(SIGNATURE + b"\x22", "unknown command 2")

    def test_family(self) -> None:
        self.assertError(SIGNATURE + b"\x21\x41", "family/protocol")
        self.assertError(SIGNATURE + b"\x21\x13", "family/protocol")

    def test_shortAddresses(self) -> None:
        self.assertError(SIGNATURE + b"\x21\x11\x00\x0b" + b"\x00" * 11, "11 bytes of addresses")
        self.assertError(SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12, "needs 36")

    def test_badTLV(self) -> None:
        base = b"\x7f\x00\x00\x01" * 2 + b"\x00\x01\x00\x02"
        self.assertError(SIGNATURE + b"\x21\x11\x00\x0e" + base + b"\x01\x00", "truncated TLV")
        self.assertError(SIGNATURE + b"\x21\x11\x00\x10" + base + b"\x01\x00\x05\x00", "TLV 0x01 of 5 bytes")

    def test_unix(self) -> None:
        block = b"/run/a".ljust(108, b"\x00") + b"/run/b".ljust(108, b"\x00")
        info, rest = parseProxyV2(SIGNATURE + b"\x21\x31" + struct.pack(">H", len(block)) + block + b"x")
        self.assertEqual(info, ProxyInfo(PROXY, UNIXAddress(b"/run/a"), UNIXAddress(b"/run/b")))
        self.assertEqual(rest, b"x")

    def test_unspecIgnored(self) -> None:
        """
        With the UNSPEC family the receiver ignores the address block.
        """
        info, rest = parseProxyV2(SIGNATURE + b"\x21\x00\x00\x03abcdef")
        self.assertEqual((info, rest), (ProxyInfo(PROXY), b"def"))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_fuzz(self, data: bytes) -> None:
        for candidate in (data, SIGNATURE + data, SIGNATURE + b"\x21" + data):
            try:
                parseProxyV2(candidate)
            except ProxyProtocolError:
                pass
