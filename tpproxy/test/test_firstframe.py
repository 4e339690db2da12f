"""
Tests for L{tpproxy.firstframe}: one frame, then raw bytes, with no I/O.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tpproxy.firstframe import FirstFrameReader, Frame, Malformed, Raw, ReaderState
from tpproxy.wire import HEADER, MAX_FRAME, ClientHello, ErrorCode, ServerHello, WireError, encodeFrame

HELLO = ServerHello.success(address="192.0.2.1").toFrame()


class FirstFrameReaderTests(SynchronousTestCase):
    def reader(self) -> FirstFrameReader[ServerHello]:
        return FirstFrameReader(ServerHello.fromObject)

    def test_wholeFrame(self) -> None:
        """
        A complete frame in one feed comes out parsed, with no rest.
        """
        reader = self.reader()
        self.assertEqual(reader.feed(HELLO), Frame(ServerHello.success(address="192.0.2.1"), b""))
        self.assertIs(reader.state, ReaderState.PASSING)

    def test_frameThenBytes(self) -> None:
        """
        Bytes after the frame in the same feed are the frame's C{rest}.
        """
        out = self.reader().feed(HELLO + b"SSH-2.0")
        self.assertEqual(out, Frame(ServerHello.success(address="192.0.2.1"), b"SSH-2.0"))

    def test_inPieces(self) -> None:
        """
        A frame fed a byte at a time gives L{None} until its last byte.
        """
        reader = self.reader()
        outs = [reader.feed(HELLO[i : i + 1]) for i in range(len(HELLO))]
        self.assertEqual(outs[:-1], [None] * (len(HELLO) - 1))
        self.assertIsInstance(outs[-1], Frame)
        self.assertEqual(reader.buffered(), 0)

    def test_buffered(self) -> None:
        """
        L{FirstFrameReader.buffered} counts what waits for the frame.
        """
        reader = self.reader()
        reader.feed(HELLO[:5])
        self.assertEqual(reader.buffered(), 5)

    def test_rawAfterFrame(self) -> None:
        """
        Every non-empty feed after the frame is L{Raw}, unparsed (even if it
        looks like a frame); an empty one is L{None}.
        """
        reader = self.reader()
        reader.feed(HELLO)
        self.assertEqual(reader.feed(HELLO), Raw(HELLO))
        self.assertEqual(reader.feed(b"x"), Raw(b"x"))
        self.assertIsNone(reader.feed(b""))

    def test_malformedFrame(self) -> None:
        """
        A malformed frame is L{Malformed} with the wire's error, and bytes
        after it are dropped (L{None}).
        """
        reader = self.reader()
        out = reader.feed(HEADER.pack(2) + b"[]")
        assert isinstance(out, Malformed)
        self.assertEqual(out.error.code, ErrorCode.BAD_REQUEST)
        self.assertIs(reader.state, ReaderState.FAILED)
        self.assertIsNone(reader.feed(HELLO))
        self.assertEqual(reader.buffered(), 0)

    def test_oversizeAtOnce(self) -> None:
        """
        A length above the limit is refused from its 4 prefix bytes alone.
        """
        out = self.reader().feed(HEADER.pack(MAX_FRAME + 1))
        assert isinstance(out, Malformed)
        self.assertIn("exceeds", out.error.message)

    def test_parserRefuses(self) -> None:
        """
        A L{WireError} from the parser is L{Malformed} too: a ClientHello is
        not a ServerHello.
        """
        out = self.reader().feed(ClientHello.connect("example.org", 22).toFrame())
        assert isinstance(out, Malformed)
        self.assertIn("'ok'", out.error.message)

    def test_anyParser(self) -> None:
        """
        The parser decides what the message is.
        """

        def parse(obj: dict[str, Any]) -> str:
            if "event" not in obj:
                raise WireError(ErrorCode.BAD_REQUEST, "no event")
            return str(obj["event"])

        reader: FirstFrameReader[str] = FirstFrameReader(parse)
        self.assertEqual(reader.feed(encodeFrame({"event": "incoming"}) + b"!"), Frame("incoming", b"!"))
