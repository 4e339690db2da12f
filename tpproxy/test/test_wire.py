"""
Tests for L{tpproxy.wire}: the length-prefixed JSON frame codec and the
ClientHello / ServerHello messages of TP protocol version 1.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.names import isDestinationHost
from tpproxy.wire import (
    ALPN,
    HEADER,
    MAX_FRAME,
    OPERATIONS,
    RESERVED_OPERATIONS,
    TRANSPORTS,
    VERSION,
    ClientHello,
    ErrorCode,
    FrameDecoder,
    ServerHello,
    WireError,
    decodePayload,
    encodeFrame,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    # The same examples on every run: a failure shows again on the next run
    # (and in CI) without an example database.
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def rawFrame(payload: bytes, length: int | None = None) -> bytes:
    """
    A frame with C{payload} as its body, and C{length} (default: the real
    length) as its prefix.
    """
    return struct.pack("!I", len(payload) if length is None else length) + payload


def helloObject(**overrides: Any) -> dict[str, Any]:
    """
    A valid ClientHello object, with C{overrides} applied; a value of
    C{_DROP} removes the key.
    """
    obj: dict[str, Any] = {"v": 1, "op": "connect", "host": "example.org", "port": 443}
    for key, value in overrides.items():
        if value is _DROP:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


_DROP = object()


class WireErrorMixin:
    def assertWireError(self, code: ErrorCode, f: Any, *args: Any, contains: str | None = None) -> WireError:
        """
        Assert that C{f(*args)} raises L{WireError} with C{code}, and, if
        given, a message containing C{contains}.
        """
        e = self.assertRaises(WireError, f, *args)  # type: ignore[attr-defined]
        self.assertIs(e.code, code)  # type: ignore[attr-defined]
        if contains is not None:
            self.assertIn(contains, e.message)  # type: ignore[attr-defined]
        return e

    def decodeOne(self, data: bytes) -> dict[str, Any] | None:
        decoder = FrameDecoder()
        decoder.feed(data)
        return decoder.nextFrame()


class ConstantsTests(SynchronousTestCase):
    def test_versionAndALPN(self) -> None:
        """
        Version 1 is spoken, under ALPN C{tp/1}; a frame is at most 16 KiB
        after a 4-byte big-endian prefix.
        """
        self.assertEqual(VERSION, 1)
        self.assertEqual(ALPN, b"tp/1")
        self.assertEqual(MAX_FRAME, 16384)
        self.assertEqual(HEADER.size, 4)
        self.assertEqual(HEADER.pack(1), b"\x00\x00\x00\x01")

    def test_operations(self) -> None:
        """
        C{connect}, C{listen}, C{accept} and C{udp} are served; none is
        reserved; the transports are C{tcp} and C{udp}.
        """
        self.assertEqual(OPERATIONS, {"connect", "listen", "accept", "udp"})
        self.assertEqual(RESERVED_OPERATIONS, set())
        self.assertEqual(TRANSPORTS, {"tcp", "udp"})

    def test_errorCodes(self) -> None:
        """
        The error codes are stable strings, and compare equal to them.
        """
        self.assertEqual(
            {c.value for c in ErrorCode},
            {
                "bad_request",
                "unsupported_version",
                "forbidden",
                "resolve_failed",
                "connect_refused",
                "connect_timeout",
                "unreachable",
                "internal",
                "name_taken",
                "port_unavailable",
                "bad_session",
                "not_accepted",
                "no_certificate",
                "limit_exceeded",
                "not_exposed",
            },
        )
        self.assertEqual(ErrorCode.FORBIDDEN, "forbidden")
        self.assertIs(ErrorCode("bad_request"), ErrorCode.BAD_REQUEST)

    def test_wireError(self) -> None:
        """
        A L{WireError} carries its code and message, and shows both.
        """
        e = WireError(ErrorCode.FORBIDDEN, "no rule allows it")
        self.assertIs(e.code, ErrorCode.FORBIDDEN)
        self.assertEqual(e.message, "no rule allows it")
        self.assertEqual(str(e), "forbidden: no rule allows it")
        self.assertIsInstance(e, Exception)


class EncodeFrameTests(SynchronousTestCase):
    def test_format(self) -> None:
        """
        A frame is the 4-byte big-endian length of compact UTF-8 JSON,
        then that JSON.
        """
        frame = encodeFrame({"a": 1, "b": "é"})
        payload = '{"a":1,"b":"é"}'.encode("utf-8")
        self.assertEqual(frame, struct.pack("!I", len(payload)) + payload)

    def test_maximum(self) -> None:
        """
        A payload of exactly L{MAX_FRAME} bytes is encoded; one byte more
        raises L{ValueError}.
        """
        overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
        frame = encodeFrame({"p": "x" * (MAX_FRAME - overhead)})
        self.assertEqual(len(frame), HEADER.size + MAX_FRAME)
        self.assertEqual(frame[:4], struct.pack("!I", MAX_FRAME))
        e = self.assertRaises(ValueError, encodeFrame, {"p": "x" * (MAX_FRAME - overhead + 1)})
        self.assertIn(str(MAX_FRAME), str(e))


class FrameDecoderTests(WireErrorMixin, SynchronousTestCase):
    def test_needsMore(self) -> None:
        """
        Until a whole frame is buffered, L{FrameDecoder.nextFrame} returns
        L{None}, and the bytes stay buffered.
        """
        frame = encodeFrame({"a": 1})
        decoder = FrameDecoder()
        self.assertIsNone(decoder.nextFrame())
        decoder.feed(frame[:3])
        self.assertIsNone(decoder.nextFrame())
        decoder.feed(frame[3:4])
        self.assertIsNone(decoder.nextFrame())
        decoder.feed(frame[4:-1])
        self.assertIsNone(decoder.nextFrame())
        self.assertEqual(decoder.buffered(), len(frame) - 1)
        decoder.feed(frame[-1:])
        self.assertEqual(decoder.nextFrame(), {"a": 1})
        self.assertEqual(decoder.buffered(), 0)
        self.assertIsNone(decoder.nextFrame())

    def test_byteByByte(self) -> None:
        """
        A frame fed one byte at a time is decoded when its last byte
        arrives, not before.
        """
        frame = ClientHello("connect", "example.org", 22).toFrame()
        decoder = FrameDecoder()
        for i in range(len(frame) - 1):
            decoder.feed(frame[i : i + 1])
            self.assertIsNone(decoder.nextFrame())
        decoder.feed(frame[-1:])
        self.assertEqual(
            decoder.nextFrame(), {"v": 1, "op": "connect", "host": "example.org", "port": 22, "transport": "tcp"}
        )

    def test_twoFramesInOneFeed(self) -> None:
        """
        Two frames fed together come out one after the other.
        """
        decoder = FrameDecoder()
        decoder.feed(encodeFrame({"n": 1}) + encodeFrame({"n": 2}))
        self.assertEqual(decoder.nextFrame(), {"n": 1})
        self.assertEqual(decoder.nextFrame(), {"n": 2})
        self.assertIsNone(decoder.nextFrame())
        self.assertEqual(decoder.takeRest(), b"")

    def test_takeRest(self) -> None:
        """
        L{FrameDecoder.takeRest} returns exactly the bytes after the frames
        taken, even bytes that look like a frame, and empties the buffer.
        """
        tail = b"SSH-2.0-OpenSSH\r\n" + encodeFrame({"x": 1})
        decoder = FrameDecoder()
        decoder.feed(encodeFrame({"n": 1}) + tail[:5])
        self.assertEqual(decoder.nextFrame(), {"n": 1})
        decoder.feed(tail[5:])
        self.assertEqual(decoder.takeRest(), tail)
        self.assertEqual(decoder.buffered(), 0)
        self.assertEqual(decoder.takeRest(), b"")

    def test_takeRestBeforeFrame(self) -> None:
        """
        L{FrameDecoder.takeRest} before a frame is complete returns the
        partial frame's bytes.
        """
        decoder = FrameDecoder()
        decoder.feed(b"\x00\x00")
        self.assertEqual(decoder.takeRest(), b"\x00\x00")
        self.assertIsNone(decoder.nextFrame())

    def test_emptyFrame(self) -> None:
        """
        A frame of length 0 is refused with C{bad_request} as soon as its
        prefix is seen.
        """
        decoder = FrameDecoder()
        decoder.feed(b"\x00\x00\x00\x00")
        self.assertWireError(ErrorCode.BAD_REQUEST, decoder.nextFrame, contains="empty frame")

    def test_maximumFrame(self) -> None:
        """
        A frame of exactly L{MAX_FRAME} bytes is accepted.
        """
        payload = b'{"p":"' + b"x" * (MAX_FRAME - 8) + b'"}'
        self.assertEqual(len(payload), MAX_FRAME)
        self.assertEqual(self.decodeOne(rawFrame(payload)), {"p": "x" * (MAX_FRAME - 8)})

    def test_oversizeRefusedOnPrefix(self) -> None:
        """
        A prefix above L{MAX_FRAME} is refused with C{bad_request} once the
        4 prefix bytes are in, without waiting for (or buffering) a body.
        """
        for length in (MAX_FRAME + 1, 2**20, 2**32 - 1):
            decoder = FrameDecoder()
            header = struct.pack("!I", length)
            decoder.feed(header[:3])
            self.assertIsNone(decoder.nextFrame())
            decoder.feed(header[3:])
            self.assertWireError(ErrorCode.BAD_REQUEST, decoder.nextFrame, contains=f"frame of {length} bytes")
            self.assertEqual(decoder.buffered(), 4)

    def test_oversizeAfterFrame(self) -> None:
        """
        An oversize prefix right after a good frame is refused once that
        frame has been taken.
        """
        decoder = FrameDecoder()
        decoder.feed(encodeFrame({"a": 1}) + struct.pack("!I", MAX_FRAME + 1))
        self.assertEqual(decoder.nextFrame(), {"a": 1})
        self.assertWireError(ErrorCode.BAD_REQUEST, decoder.nextFrame, contains="exceeds the limit of 16384")

    def test_customLimit(self) -> None:
        """
        The limit can be lowered per decoder.
        """
        decoder = FrameDecoder(maxFrame=10)
        decoder.feed(rawFrame(b'{"a":"bcd"}'))
        self.assertWireError(ErrorCode.BAD_REQUEST, decoder.nextFrame, contains="exceeds the limit of 10")
        decoder = FrameDecoder(maxFrame=10)
        decoder.feed(rawFrame(b'{"a":"bc"}'))
        self.assertEqual(decoder.nextFrame(), {"a": "bc"})

    def test_invalidUTF8(self) -> None:
        """
        A body that is not UTF-8 is refused with C{bad_request}, naming the
        offending byte.
        """
        self.assertWireError(
            ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(b'{"a":"\xff"}'), contains="not valid UTF-8 (byte 6)"
        )
        # An overlong encoding and a lone surrogate are invalid UTF-8 too.
        self.assertWireError(ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(b'{"a":"\xc0\xaf"}'), contains="UTF-8")
        self.assertWireError(ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(b'{"a":"\xed\xa0\x80"}'), contains="UTF-8")

    def test_notJSON(self) -> None:
        """
        A body that is not JSON is refused with C{bad_request}.
        """
        for body in (b"hello", b"{", b'{"a":1,}', b"{'a':1}", b'{"a":1} x', b"\xef\xbb\xbf{}", b" "):
            self.assertWireError(ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(body), contains="not valid JSON")

    def test_notAnObject(self) -> None:
        """
        JSON that is not an object is refused with C{bad_request}.
        """
        for body in (b"[]", b'"connect"', b"1", b"null", b"true", b'[{"v":1}]'):
            self.assertWireError(
                ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(body), contains="frame must hold a JSON object"
            )

    def test_constants(self) -> None:
        """
        The non-standard JSON constants NaN, Infinity and -Infinity are
        refused, wherever they appear.
        """
        for name in ("NaN", "Infinity", "-Infinity"):
            body = b'{"v":1,"x":[1,{"y":' + name.encode() + b"}]}"
            self.assertWireError(
                ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(body), contains=f"JSON constant {name} is not allowed"
            )

    def test_duplicateKeys(self) -> None:
        """
        An object with a key twice is refused, at the top level or nested,
        so that two parsers cannot disagree about which value counts.
        """
        self.assertWireError(
            ErrorCode.BAD_REQUEST,
            self.decodeOne,
            rawFrame(b'{"host":"a.example","port":1,"host":"b.example"}'),
            contains="duplicate key 'host'",
        )
        self.assertWireError(
            ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(b'{"x":{"k":1,"k":1}}'), contains="duplicate key 'k'"
        )

    def test_deepNesting(self) -> None:
        """
        Deeply nested JSON within the size limit is refused with
        C{bad_request}, not a L{RecursionError}.
        """
        for body in (b"[" * (MAX_FRAME - 10), b'{"a":' * 2500 + b"1" + b"}" * 2500):
            self.assertLessEqual(len(body), MAX_FRAME)
            self.assertWireError(ErrorCode.BAD_REQUEST, self.decodeOne, rawFrame(body))
        self.assertWireError(
            ErrorCode.BAD_REQUEST, decodePayload, b"[" * 10000 + b"]" * 10000, contains="JSON is nested too deeply"
        )

    def test_hugeNumber(self) -> None:
        """
        An integer too long for Python to convert is refused with
        C{bad_request}.
        """
        self.assertWireError(ErrorCode.BAD_REQUEST, decodePayload, b'{"port":' + b"9" * 5000 + b"}")

    def test_unicode(self) -> None:
        """
        Non-ASCII UTF-8 and escaped characters decode.
        """
        self.assertEqual(decodePayload('{"m":"ünï\\u00e9"}'.encode()), {"m": "ünïé"})


class ClientHelloTests(WireErrorMixin, SynchronousTestCase):
    def test_valid(self) -> None:
        """
        A minimal ClientHello gives its fields, transport C{tcp} by default.
        """
        hello = ClientHello.fromObject(helloObject())
        self.assertEqual(hello, ClientHello(op="connect", host="example.org", port=443, transport="tcp", version=1))

    def test_connectTransportTCP(self) -> None:
        """
        C{transport} of a C{connect} may be given as C{tcp}, the default.
        """
        self.assertEqual(ClientHello.fromObject(helloObject(transport="tcp")).transport, "tcp")

    def test_connectOverUDPRefused(self) -> None:
        """
        A C{connect} with C{transport} C{udp} is a C{bad_request} that names
        the C{udp} operation: C{connect} is a TCP tunnel.

        Regression (was a bug in tpproxy/wire.py, ClientHello.fromObject):
        such a hello was accepted, then checked against TCP rules and
        relayed as TCP, while docs/protocol.md said it was checked against
        C{udp} rules.
        """
        self.assertWireError(
            ErrorCode.BAD_REQUEST,
            ClientHello.fromObject,
            helloObject(transport="udp"),
            contains="operation 'connect' is TCP only: a UDP flow is operation 'udp'",
        )

    def test_unknownKeysIgnored(self) -> None:
        """
        Keys this version does not know are ignored, whatever their value.
        """
        hello = ClientHello.fromObject(helloObject(future={"a": [1, None]}, flags=[], x=None, ok=True))
        self.assertEqual(hello, ClientHello("connect", "example.org", 443))

    def test_versionMissingOrWrongType(self) -> None:
        """
        A missing C{v}, or one that is not an integer (a boolean, a float,
        a string, null), is a C{bad_request}, not an unsupported version.
        """
        for v in (_DROP, "1", 1.0, True, False, None, [1], {"v": 1}):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ClientHello.fromObject,
                helloObject(v=v),
                contains="field 'v' (protocol version) must be an integer",
            )

    def test_unsupportedVersion(self) -> None:
        """
        An integer C{v} other than 1 is C{unsupported_version}, naming both
        versions.
        """
        for v in (0, 2, -1, 2**40):
            e = self.assertWireError(ErrorCode.UNSUPPORTED_VERSION, ClientHello.fromObject, helloObject(v=v))
            self.assertEqual(e.message, f"protocol version {v} is not supported; this server speaks 1")

    def test_versionCheckedFirst(self) -> None:
        """
        The version is checked before the rest, so that a newer client with
        a different message shape hears C{unsupported_version}.
        """
        self.assertWireError(
            ErrorCode.UNSUPPORTED_VERSION, ClientHello.fromObject, {"v": 2, "op": ["x"], "port": "y"}
        )

    def test_opWrongType(self) -> None:
        """
        A missing or non-string C{op} is a C{bad_request}.
        """
        for op in (_DROP, None, 1, ["connect"], {"connect": 1}, True):
            self.assertWireError(
                ErrorCode.BAD_REQUEST, ClientHello.fromObject, helloObject(op=op), contains="field 'op' must be a string"
            )

    def test_opUnknown(self) -> None:
        """
        An operation nobody defined is refused as unknown; names are
        case-sensitive.
        """
        for op in ("bind", "", "CONNECT", "connect ", "Connect"):
            e = self.assertWireError(ErrorCode.BAD_REQUEST, ClientHello.fromObject, helloObject(op=op))
            self.assertEqual(e.message, f"unknown operation {op!r}")

    def test_opReserved(self) -> None:
        """
        The reserved operations are refused as not supported by this server.
        """
        # No operation is reserved any more: udp is served (a UDP flow).
        hello = ClientHello.fromObject(helloObject(op="udp"))
        self.assertEqual((hello.op, hello.transport), ("udp", "udp"))

    def test_hostNames(self) -> None:
        """
        Destination host names (L{tpproxy.names.isDestinationHost}) are
        accepted as given: any case, C{_}, single labels, a final dot.
        """
        for host in (
            "example.org",
            "localhost",
            "a",
            "EXAMPLE.ORG",
            "example.org.",
            "a-b.c_d.example",
            "_srv._tcp.example",
            "xn--bcher-kva.example",
            "1.example",
            "123abc",
            ("a" * 63 + ".") * 3 + "a" * 61,  # 253 characters
            ("a" * 63 + ".") * 3 + "a" * 61 + ".",  # 253 and the final dot
            "a" * 63,
        ):
            self.assertEqual(ClientHello.fromObject(helloObject(host=host)).host, host)

    def test_hostAddresses(self) -> None:
        """
        IPv4 and IPv6 address literals are accepted.
        """
        for host in ("192.0.2.1", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::1", "::", "::ffff:127.0.0.1", "fe80::1"):
            self.assertEqual(ClientHello.fromObject(helloObject(host=host)).host, host)

    def test_hostInvalid(self) -> None:
        """
        Anything else in C{host} is a C{bad_request} naming the field.
        """
        for host in (
            _DROP,
            None,
            1,
            ["example.org"],
            "",
            " ",
            ".",
            "..",
            "exa mple.org",
            " example.org",
            "example..org",
            ".example.org",
            "-example.org",
            "ex/ample.org",
            "example.org:443",
            "[::1]",
            "user@example.org",
            "bücher.example",
            "example.org\x00",
            "a" * 64,
            ("a" * 63 + ".") * 3 + "a" * 62,  # 254 characters
            "a-.example",
            "example.123",
            "0x7f.1",
            "1.0x7f",
            "\u212a.example",  # the Kelvin sign, which lower() makes "k"
            "1.2.3",
            "256.1.1.1",
            "1.2.3.4.",
            "127.1",
            "01.02.03.04",
            "2001:db8::g",
            "1:2:3:4:5:6:7:8:9",
        ):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ClientHello.fromObject,
                helloObject(host=host),
                contains="field 'host' must be a DNS name or an IP address",
            )

    def test_hostTrailingNewline(self) -> None:
        """
        A host ending in a newline is refused.

        Regression (was a bug in tpproxy/wire.py, _HOSTNAME / validHost, now
        tpproxy/names.py): the pattern ends in
        C{$}, which also matches just before a final "\\n", so
        C{"example.org\\n"} is accepted as a DNS name and reaches the policy,
        the resolver and the logs.  The pattern should end in C{\\Z} (or use
        C{re.fullmatch}).
        """
        for host in ("example.org\n", "a\n", "example.org.\n"):
            self.assertFalse(isDestinationHost(host), repr(host))
            self.assertWireError(ErrorCode.BAD_REQUEST, ClientHello.fromObject, helloObject(host=host))

    def test_isDestinationHost(self) -> None:
        """
        L{isDestinationHost} accepts names and address literals and nothing else.
        """
        self.assertTrue(isDestinationHost("example.org"))
        self.assertTrue(isDestinationHost("10.0.0.1"))
        self.assertTrue(isDestinationHost("2001:db8::1"))
        self.assertFalse(isDestinationHost("10.0.0"))
        self.assertFalse(isDestinationHost(""))
        self.assertFalse(isDestinationHost("a b"))

    def test_portRange(self) -> None:
        """
        Ports 1 and 65535 are accepted.
        """
        for port in (1, 22, 65535):
            self.assertEqual(ClientHello.fromObject(helloObject(port=port)).port, port)

    def test_portInvalid(self) -> None:
        """
        A missing port, one out of 1-65535, a boolean, a float or a string
        is a C{bad_request} naming the field.
        """
        for port in (_DROP, 0, -1, 65536, 2**64, True, False, "443", 443.0, None, [443]):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ClientHello.fromObject,
                helloObject(port=port),
                contains="field 'port' must be an integer from 1 to 65535",
            )

    def test_transportInvalid(self) -> None:
        """
        A transport other than C{tcp} or C{udp} is a C{bad_request}.
        """
        for transport in ("TCP", "sctp", "", None, 6, True):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ClientHello.fromObject,
                helloObject(transport=transport),
                contains="field 'transport' must be 'tcp' or 'udp'",
            )

    def test_transportUnhashable(self) -> None:
        """
        A list or object in C{transport} is a C{bad_request}.

        Regression (was a bug in tpproxy/wire.py, ClientHello.fromObject): C{transport not in
        TRANSPORTS} tests membership of a frozenset, which raises
        L{TypeError} ("unhashable type") for a JSON array or object, so a
        client's bad hello escapes as an unhandled exception instead of a
        C{bad_request} ServerHello.
        """
        for transport in ([], ["tcp"], {}, {"tcp": 1}):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ClientHello.fromObject,
                helloObject(transport=transport),
                contains="field 'transport' must be 'tcp' or 'udp'",
            )

    def test_errorFitsInServerHello(self) -> None:
        """
        The message of every L{WireError} raised for a frame within the
        size limit can be sent back in a failure ServerHello.

        Regression (was a bug in tpproxy/wire.py, ClientHello.fromObject and _noDuplicates):
        the messages "unknown operation {op!r}" and "duplicate key
        {key!r}" echo client data without a bound.  C{repr} turns each
        DEL byte (1 byte in the frame) into C{\\x7f} (5 bytes once JSON
        escapes the backslash), so a 16 KiB hello yields a message of about
        64 KiB, and L{ServerHello.toFrame} (via L{encodeFrame}) raises
        L{ValueError} instead of producing the refusal: the server's
        C{_refuse} then fails and the client gets no C{bad_request}.
        """
        payloads = [
            encodeFrame({"v": 1, "op": "\x7f" * 16000}),
            encodeFrame({"v": 1, "op": "x" * 16340}),
            rawFrame(b'{"' + b"\x7f" * 8000 + b'":1,"' + b"\x7f" * 8000 + b'":1}'),
        ]
        for frame in payloads:
            self.assertLessEqual(len(frame), HEADER.size + MAX_FRAME)
            decoder = FrameDecoder()
            decoder.feed(frame)
            try:
                ClientHello.fromObject(decoder.nextFrame())  # type: ignore[arg-type]
            except WireError as e:
                error = e
            else:
                self.fail("the hello was accepted")
            self.assertIs(error.code, ErrorCode.BAD_REQUEST)
            try:
                reply = ServerHello.failure(error.code, error.message).toFrame()
            except ValueError as e:
                self.fail(f"a {len(frame)}-byte hello gets a {len(error.message)}-character error message: {e}")
            self.assertLessEqual(len(reply), HEADER.size + MAX_FRAME)

    def test_toFrame(self) -> None:
        """
        L{ClientHello.toFrame} writes every field.
        """
        frame = ClientHello("udp", "2001:db8::1", 5353, "udp").toFrame()
        self.assertEqual(
            json.loads(frame[4:]), {"v": 1, "op": "udp", "host": "2001:db8::1", "port": 5353, "transport": "udp"}
        )
        self.assertEqual(struct.unpack("!I", frame[:4])[0], len(frame) - 4)

    def test_roundTrip(self) -> None:
        """
        A ClientHello survives encoding and decoding.
        """
        for hello in (
            ClientHello("connect", "example.org", 443),
            ClientHello("udp", "192.0.2.1", 1, "udp"),
            ClientHello("connect", "::1", 65535),
        ):
            self.assertEqual(ClientHello.fromObject(self.decodeOne(hello.toFrame())), hello)  # type: ignore[arg-type]


class ServerHelloTests(WireErrorMixin, SynchronousTestCase):
    def test_success(self) -> None:
        """
        L{ServerHello.success} is ok, with its keywords as extra fields.
        """
        hello = ServerHello.success(address="192.0.2.1:443")
        self.assertTrue(hello.ok)
        self.assertIsNone(hello.code)
        self.assertEqual(hello.message, "")
        self.assertEqual(hello.info, {"address": "192.0.2.1:443"})
        self.assertEqual(json.loads(hello.toFrame()[4:]), {"v": 1, "ok": True, "address": "192.0.2.1:443"})

    def test_failure(self) -> None:
        """
        L{ServerHello.failure} carries the code's value and the message.
        """
        hello = ServerHello.failure(ErrorCode.FORBIDDEN, "no rule allows it")
        self.assertFalse(hello.ok)
        self.assertEqual(hello.code, "forbidden")
        self.assertEqual(
            json.loads(hello.toFrame()[4:]), {"v": 1, "ok": False, "error": "forbidden", "message": "no rule allows it"}
        )

    def test_roundTrip(self) -> None:
        """
        Successes and failures survive encoding and decoding.
        """
        for hello in (
            ServerHello.success(),
            ServerHello.success(address="[::1]:22", extra=[1, 2]),
            ServerHello.failure(ErrorCode.CONNECT_TIMEOUT, "took too long"),
            ServerHello.failure(ErrorCode.BAD_REQUEST, "ünïcode"),
        ):
            self.assertEqual(ServerHello.fromObject(self.decodeOne(hello.toFrame())), hello)  # type: ignore[arg-type]

    def test_unknownCodeKept(self) -> None:
        """
        An error code this client does not know is kept as a string, and
        extra fields are kept in C{info}.
        """
        hello = ServerHello.fromObject({"v": 1, "ok": False, "error": "quota_exceeded", "message": "m", "retry": 5})
        self.assertEqual(hello, ServerHello(ok=False, code="quota_exceeded", message="m", info={"retry": 5}))

    def test_messageOptional(self) -> None:
        """
        A failure without a message has an empty one.
        """
        hello = ServerHello.fromObject({"v": 1, "ok": False, "error": "internal"})
        self.assertEqual(hello.message, "")
        self.assertEqual(hello.code, "internal")

    def test_okInvalid(self) -> None:
        """
        A missing or non-boolean C{ok} is a C{bad_request}.
        """
        for ok in (_DROP, 1, 0, "true", None, []):
            obj: dict[str, Any] = {"v": 1}
            if ok is not _DROP:
                obj["ok"] = ok
            self.assertWireError(
                ErrorCode.BAD_REQUEST, ServerHello.fromObject, obj, contains="field 'ok' must be a boolean"
            )

    def test_version(self) -> None:
        """
        The version of a ServerHello is checked as a ClientHello's is.
        """
        self.assertWireError(ErrorCode.UNSUPPORTED_VERSION, ServerHello.fromObject, {"v": 2, "ok": True})
        self.assertWireError(ErrorCode.BAD_REQUEST, ServerHello.fromObject, {"v": True, "ok": True})
        self.assertWireError(ErrorCode.BAD_REQUEST, ServerHello.fromObject, {"ok": True})

    def test_failureFieldsInvalid(self) -> None:
        """
        A failure needs a string C{error}, and a string C{message} if any.
        """
        for obj in (
            {"v": 1, "ok": False},
            {"v": 1, "ok": False, "error": 1, "message": "m"},
            {"v": 1, "ok": False, "error": None},
            {"v": 1, "ok": False, "error": "internal", "message": None},
            {"v": 1, "ok": False, "error": "internal", "message": ["m"]},
        ):
            self.assertWireError(
                ErrorCode.BAD_REQUEST,
                ServerHello.fromObject,
                obj,
                contains="a failed ServerHello needs string fields 'error' and 'message'",
            )


# --- property-based fuzzing --------------------------------------------------

jsonScalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
jsonValues = st.recursive(
    jsonScalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
helloKeys = st.sampled_from(["v", "op", "host", "port", "transport"]) | st.text(max_size=6)
interesting = st.sampled_from(
    [1, 2, 0, True, "connect", "listen", "udp", "tcp", "example.org", "::1", "10.0.0.1", 443, 65536, "", None, [], {}]
)


@st.composite
def helloLike(draw: Any) -> dict[str, Any]:
    """
    A JSON object shaped like a ClientHello: a valid one with some fields
    dropped or replaced by arbitrary JSON values, and some keys added.
    """
    obj: dict[str, Any] = {"v": 1, "op": "connect", "host": "example.org", "port": 443, "transport": "tcp"}
    for key in list(obj):
        what = draw(st.sampled_from(["keep", "keep", "drop", "interesting", "json"]))
        if what == "drop":
            del obj[key]
        elif what == "interesting":
            obj[key] = draw(interesting)
        elif what == "json":
            obj[key] = draw(jsonValues)
    obj.update(draw(st.dictionaries(helloKeys, interesting | jsonValues, max_size=3)))
    return obj



@st.composite
def chunked(draw: Any, data: bytes) -> list[bytes]:
    """
    C{data} cut into pieces at arbitrary points.
    """
    if not data:
        return [b""]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    pieces = []
    last = 0
    for cut in cuts + [len(data)]:
        pieces.append(data[last:cut])
        last = cut
    return pieces


@st.composite
def streams(draw: Any) -> bytes:
    """
    A byte stream made of valid frames, frames with a random or oversize
    prefix, frames of random bytes, and plain random bytes.
    """
    parts = []
    for kind in draw(st.lists(st.sampled_from(["frame", "hello", "random", "body", "big"]), max_size=5)):
        if kind == "frame":
            parts.append(encodeFrame(draw(st.dictionaries(st.text(max_size=5), jsonValues, max_size=4))))
        elif kind == "hello":
            obj = draw(helloLike())
            try:
                parts.append(encodeFrame(obj))
            except (ValueError, UnicodeEncodeError):
                pass
        elif kind == "random":
            parts.append(draw(st.binary(max_size=40)))
        elif kind == "body":
            body = draw(st.binary(min_size=0, max_size=40))
            parts.append(rawFrame(body))
        else:
            parts.append(struct.pack("!I", draw(st.integers(MAX_FRAME + 1, 2**32 - 1))) + draw(st.binary(max_size=20)))
    return b"".join(parts)


def drain(decoder: FrameDecoder, frames: list[dict[str, Any]]) -> None:
    """
    Take every complete frame, checking the decoder's promises while doing
    so: whenever it asks for more bytes, what it buffers is one partial
    frame of at most L{MAX_FRAME} bytes.
    """
    while True:
        frame = decoder.nextFrame()
        if frame is None:
            buffered = decoder.buffered()
            assert buffered < HEADER.size + MAX_FRAME, buffered
            return
        assert isinstance(frame, dict)
        frames.append(frame)


class FuzzTests(SynchronousTestCase):
    @FUZZ
    @given(st.data())
    def test_decoderOnlyRaisesWireError(self, data: Any) -> None:
        """
        Whatever bytes arrive, in whatever pieces, the decoder yields
        objects or raises L{WireError}, never another exception, never
        buffers more than one partial frame while asking for more, and
        every object it yields is either a ClientHello or a L{WireError}.
        """
        stream = data.draw(streams())
        decoder = FrameDecoder()
        frames: list[dict[str, Any]] = []
        try:
            for piece in data.draw(chunked(stream)):
                decoder.feed(piece)
                drain(decoder, frames)
            for frame in frames:
                try:
                    ClientHello.fromObject(frame)
                except WireError:
                    pass
        except WireError as e:
            self.assertIsInstance(e.code, ErrorCode)
            ServerHello.failure(e.code, e.message).toFrame()

    @FUZZ
    @given(st.binary(max_size=200))
    def test_decodePayloadOnlyRaisesWireError(self, payload: bytes) -> None:
        """
        L{decodePayload} turns any bytes into a dict or a L{WireError}.
        """
        try:
            self.assertIsInstance(decodePayload(payload), dict)
        except WireError as e:
            self.assertIs(e.code, ErrorCode.BAD_REQUEST)

    @FUZZ
    @given(helloLike())
    @example({"v": 1, "op": "connect", "host": "example.org", "port": 443, "transport": []})
    @example({"v": 1, "op": "udp", "host": "example.org", "port": 443, "transport": "tcp"})
    @example({"v": 1, "op": "connect", "host": "example.org", "port": 443, "transport": "udp"})
    def test_clientHelloOnlyRaisesWireError(self, obj: dict[str, Any]) -> None:
        """
        L{ClientHello.fromObject} turns any JSON object shaped like a
        C{connect} or C{udp} hello into a ClientHello whose fields are
        valid, or raises L{WireError}; nothing else.  A C{connect} is always
        over TCP and a C{udp} flow always over UDP, whatever C{transport}
        says.
        """
        try:
            hello = ClientHello.fromObject(obj)
        except WireError as e:
            self.assertIn(e.code, (ErrorCode.BAD_REQUEST, ErrorCode.UNSUPPORTED_VERSION))
        else:
            self.assertIn(hello.op, ("connect", "udp"))
            self.assertEqual(hello.op, obj.get("op"))
            self.assertEqual(hello.transport, {"connect": "tcp", "udp": "udp"}[hello.op])
            self.assertTrue(isDestinationHost(hello.host))
            self.assertTrue(1 <= hello.port <= 65535)
            self.assertIn(hello.transport, TRANSPORTS)

    @FUZZ
    @given(st.integers(MAX_FRAME + 1, 2**32 - 1), st.data())
    def test_oversizeRefusedBeforeBody(self, length: int, data: Any) -> None:
        """
        After any valid frames, an oversize prefix fed in any pieces is
        refused as soon as its fourth byte is in, before any body byte.
        """
        count = data.draw(st.integers(0, 3))
        stream = b"".join(encodeFrame({"n": i}) for i in range(count)) + struct.pack("!I", length)
        decoder = FrameDecoder()
        fed = 0
        taken = []
        for piece in data.draw(chunked(stream)):
            decoder.feed(piece)
            fed += len(piece)
            while True:
                try:
                    frame = decoder.nextFrame()
                except WireError as e:
                    self.assertEqual(fed, len(stream), "refused before the whole prefix arrived")
                    self.assertIs(e.code, ErrorCode.BAD_REQUEST)
                    self.assertEqual(taken, [{"n": i} for i in range(count)])
                    self.assertEqual(decoder.buffered(), 4)
                    return
                if frame is None:
                    break
                taken.append(frame)
        self.fail("the oversize prefix was not refused")

    @FUZZ
    @given(
        st.sampled_from(["example.org", "a.b.c", "localhost", "192.0.2.7", "2001:db8::5", "::1"])
        | st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,10}){1,3}\Z"),
        st.integers(1, 65535),
        st.sampled_from(["connect", "udp"]),
        st.data(),
    )
    def test_roundTrip(self, host: str, port: int, op: str, data: Any) -> None:
        """
        Any valid ClientHello (a TCP C{connect} or a C{udp} flow), followed
        by payload bytes and fed in any pieces, decodes to itself, and
        C{takeRest} returns the payload.
        """
        hello = ClientHello(op, host, port, "tcp" if op == "connect" else "udp")
        rest = data.draw(st.binary(max_size=50))
        decoder = FrameDecoder()
        got = None
        for piece in data.draw(chunked(hello.toFrame() + rest)):
            decoder.feed(piece)
            if got is None:
                frame = decoder.nextFrame()
                if frame is not None:
                    got = ClientHello.fromObject(frame)
        self.assertEqual(got, hello)
        self.assertEqual(decoder.takeRest(), rest)


class ReverseHelloTests(SynchronousTestCase):
    """
    The C{listen} and C{accept} hellos, and events.
    """

    def roundTrip(self, hello: ClientHello) -> ClientHello:
        decoder = FrameDecoder()
        decoder.feed(hello.toFrame())
        frame = decoder.nextFrame()
        assert frame is not None
        return ClientHello.fromObject(frame)

    def test_listenPublic(self) -> None:
        hello = ClientHello("listen", mode="public", port=0)
        self.assertEqual(self.roundTrip(hello), hello)
        for port in (-1, 65536, "22", True):
            e = self.assertRaises(WireError, ClientHello.fromObject, {"v": 1, "op": "listen", "mode": "public", "port": port})
            self.assertIn("'port'", e.message)

    def test_listenE2E(self) -> None:
        """
        An E2E name is a certificate name (L{tpproxy.names.isCertificateName}),
        kept lowercase without a trailing dot; IP addresses and names with
        C{_}, which a destination host may hold, are refused.
        """
        hello = self.roundTrip(ClientHello("listen", mode="e2e", name="SSH.Alice.localhost."))
        self.assertEqual(hello.name, "ssh.alice.localhost")
        self.assertEqual(self.roundTrip(ClientHello("listen", mode="e2e", name="nas")).name, "nas")
        for name in ("10.0.0.1", "::1", "", "bad name", None, 5, "_ssh.alice.localhost", "a_b.localhost", "*.localhost", "a.localhost.."):
            e = self.assertRaises(WireError, ClientHello.fromObject, {"v": 1, "op": "listen", "mode": "e2e", "name": name})
            self.assertIn("'name'", e.message)

    def test_listenMode(self) -> None:
        e = self.assertRaises(WireError, ClientHello.fromObject, {"v": 1, "op": "listen", "mode": "private"})
        self.assertIn("'mode'", e.message)

    def test_accept(self) -> None:
        hello = ClientHello("accept", session="A" * 32)
        self.assertEqual(self.roundTrip(hello), hello)
        for session in ("short", "x" * 129, "has space in it ok", None, 1):
            e = self.assertRaises(WireError, ClientHello.fromObject, {"v": 1, "op": "accept", "session": session})
            self.assertIn("'session'", e.message)

    def test_events(self) -> None:
        from tpproxy.wire import encodeEvent, parseEvent

        decoder = FrameDecoder()
        decoder.feed(encodeEvent("incoming", session="s" * 20, identity="bob", peer="127.0.0.1:5"))
        frame = decoder.nextFrame()
        assert frame is not None
        event, fields = parseEvent(frame)
        self.assertEqual((event, fields["identity"]), ("incoming", "bob"))
        self.assertRaises(WireError, parseEvent, {"event": "incoming"})
        self.assertRaises(WireError, parseEvent, {"event": "incoming", "session": "s" * 20, "identity": 5})
        self.assertRaises(WireError, parseEvent, {"nope": 1})
        self.assertEqual(parseEvent({"event": "future"})[0], "future")


class FeedFrameTests(SynchronousTestCase):
    def test_feedFrame(self) -> None:
        """
        C{feedFrame} feeds and returns the next complete frame, or L{None},
        and raises like C{nextFrame} on a bad frame.
        """
        decoder = FrameDecoder()
        frame = ClientHello.connect("example.org", 22).toFrame()
        self.assertIsNone(decoder.feedFrame(frame[:5]))
        self.assertEqual(decoder.feedFrame(frame[5:] + b"rest")["host"], "example.org")
        self.assertEqual(decoder.takeRest(), b"rest")
        self.assertRaises(WireError, FrameDecoder().feedFrame, b"\x00\x00\x00\x00")
