# -*- test-case-name: tpproxy.test.test_firstframe -*-
"""
"First frame, then raw bytes": how every TP connection starts.

A ClientHello (read by the server), a ServerHello (read by C{tp connect}
and C{tp expose}, and again inside an E2E tunnel), the C{incoming} event
opening a QUIC stream to an exposer: each is one length-prefixed frame
(L{tpproxy.wire}) followed by bytes that belong to someone else (the
splice, or an event loop).  L{FirstFrameReader} is that one reader, sans-IO:
bytes go in, and out comes L{None} (more bytes needed), a L{Frame} (the
parsed first frame and the bytes after it), L{Raw} bytes (everything after
the frame), or L{Malformed} (the first frame was refused).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar, Union

from tpproxy.wire import MAX_FRAME, FrameDecoder, WireError

T = TypeVar("T")


@dataclass(frozen=True)
class Frame(Generic[T]):
    """
    The first frame, parsed.

    @ivar message: what the parser made of it.
    @ivar rest: the bytes that followed it in the same feed.
    """

    message: T
    rest: bytes


@dataclass(frozen=True)
class Raw:
    """
    Bytes after the first frame.
    """

    data: bytes


@dataclass(frozen=True)
class Malformed:
    """
    The first frame was malformed, too large, or refused by the parser.
    """

    error: WireError


Output = Union[Frame[T], Raw, Malformed, None]


class ReaderState(enum.Enum):
    WAITING = "waiting"  # for the first frame
    PASSING = "passing"  # raw bytes after it
    FAILED = "failed"  # the first frame was malformed


class FirstFrameReader(Generic[T]):
    """
    Reads one frame, then passes bytes through.

    @param parse: makes the message out of the frame's JSON object (for
        instance L{tpproxy.wire.ServerHello.fromObject}); a L{WireError}
        it raises makes the output L{Malformed}.
    """

    def __init__(self, parse: Callable[[dict[str, Any]], T], maxFrame: int = MAX_FRAME) -> None:
        self.parse = parse
        self.state = ReaderState.WAITING
        self._decoder = FrameDecoder(maxFrame)

    def feed(self, data: bytes) -> Output[T]:
        """
        Bytes read from the connection.

        @return: L{None} while the first frame is incomplete, and for bytes
            read after a L{Malformed} (the caller is closing; they are
            dropped); the L{Frame} once; L{Raw} for every non-empty feed
            after it.
        """
        if self.state is ReaderState.PASSING:
            return Raw(data) if data else None
        if self.state is ReaderState.FAILED:
            return None
        try:
            obj = self._decoder.feedFrame(data)
            if obj is None:
                return None
            message = self.parse(obj)
        except WireError as e:
            self.state = ReaderState.FAILED
            self._decoder.takeRest()
            return Malformed(e)
        self.state = ReaderState.PASSING
        return Frame(message, self._decoder.takeRest())

    def buffered(self) -> int:
        """
        Bytes held while waiting for the first frame.
        """
        return self._decoder.buffered()
