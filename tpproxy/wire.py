# -*- test-case-name: tpproxy.test.test_wire -*-
"""
The TP wire protocol, version 1, as a sans-IO codec.

Nothing here touches a socket, a clock or Twisted: bytes go in through
L{FrameDecoder.feed}, and parsed messages (or a L{WireError} carrying a
stable error code) come out.  The TLS and QUIC transports share it.

A frame is a 4-byte unsigned big-endian length N (1 <= N <= L{MAX_FRAME})
followed by N bytes of UTF-8 JSON holding one object.  See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from tpproxy.names import isCertificateName, isDestinationHost, normalize

VERSION = 1
ALPN = b"tp/1"
MAX_FRAME = 16 * 1024
HEADER = struct.Struct("!I")
#: Longest human-readable message a ServerHello carries.
MAX_MESSAGE = 1024

#: Operations this version of the protocol defines.
OPERATIONS = frozenset({"connect", "listen", "accept", "udp"})
RESERVED_OPERATIONS: frozenset[str] = frozenset()
TRANSPORTS = frozenset({"tcp", "udp"})


class ErrorCode(str, enum.Enum):
    """
    Stable, machine-readable error codes carried in a ServerHello.
    """

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    FORBIDDEN = "forbidden"
    RESOLVE_FAILED = "resolve_failed"
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    UNREACHABLE = "unreachable"
    INTERNAL = "internal"
    NAME_TAKEN = "name_taken"
    PORT_UNAVAILABLE = "port_unavailable"
    BAD_SESSION = "bad_session"
    NOT_ACCEPTED = "not_accepted"
    NO_CERTIFICATE = "no_certificate"
    LIMIT_EXCEEDED = "limit_exceeded"
    NOT_EXPOSED = "not_exposed"


class WireError(Exception):
    """
    A frame or message could not be accepted.

    @ivar code: the L{ErrorCode} to send to the peer.
    @ivar message: a human-readable explanation, safe to send to the peer.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


def _bad(message: str) -> WireError:
    return WireError(ErrorCode.BAD_REQUEST, message)


def _quote(value: object, limit: int = 64) -> str:
    """
    A short, printable rendering of a client-supplied value for an error
    message, so that refusals always fit in a ServerHello.
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encodeFrame(obj: dict[str, Any]) -> bytes:
    """
    Serialize one JSON object as a length-prefixed frame.

    @raise ValueError: if the encoded object is larger than L{MAX_FRAME}.
    """
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def _rejectConstant(name: str) -> Any:
    raise _bad(f"JSON constant {name} is not allowed")


def _noDuplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _bad(f"duplicate key {_quote(key)}")
        result[key] = value
    return result


def decodePayload(payload: bytes) -> dict[str, Any]:
    """
    Parse the body of one frame into a JSON object.

    @raise WireError: with L{ErrorCode.BAD_REQUEST} for anything that is not
        a UTF-8 JSON object.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"frame is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_rejectConstant, object_pairs_hook=_noDuplicates)
    except WireError:
        raise
    except RecursionError:
        raise _bad("JSON is nested too deeply") from None
    except ValueError as e:
        raise _bad(f"frame is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _bad("frame must hold a JSON object")
    return obj


class FrameDecoder:
    """
    Incremental decoder of length-prefixed JSON frames.

    Feed it bytes with L{feed}; take complete frames with L{nextFrame}.
    Whatever follows the frames taken so far is returned by L{takeRest},
    which is how a transport switches to raw byte forwarding after the
    hello.  A length prefix above L{MAX_FRAME} is refused as soon as the
    4 prefix bytes are seen, so the decoder never waits for or buffers an
    oversize frame.
    """

    def __init__(self, maxFrame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._maxFrame = maxFrame

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def nextFrame(self) -> dict[str, Any] | None:
        """
        Return the next complete frame's object, or L{None} if more bytes
        are needed.

        @raise WireError: if the frame is malformed or too large.
        """
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length == 0:
            raise _bad("empty frame")
        if length > self._maxFrame:
            raise _bad(f"frame of {length} bytes exceeds the limit of {self._maxFrame}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return decodePayload(payload)

    def feedFrame(self, data: bytes) -> dict[str, Any] | None:
        """
        L{feed} then L{nextFrame}: for readers that take one frame at a time.
        """
        self._buffer += data
        return self.nextFrame()

    def buffered(self) -> int:
        return len(self._buffer)

    def takeRest(self) -> bytes:
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


def _checkVersion(obj: dict[str, Any]) -> None:
    version = obj.get("v")
    if type(version) is not int:
        raise _bad("field 'v' (protocol version) must be an integer")
    if version != VERSION:
        raise WireError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {_quote(version)} is not supported; this server speaks {VERSION}",
        )


@dataclass(frozen=True)
class ClientHello:
    """
    The first message of a client.

    - C{connect}: open a TCP tunnel to C{host}:C{port}; C{transport} may
      only be C{tcp} (a C{udp} one is refused with C{bad_request}).
    - C{udp}: open a UDP flow to C{host}:C{port} (see L{tpproxy.transports.udp}).
    - C{listen}: expose something, in C{mode} C{public} (TP listens on
      C{port}, 0 = TP picks) or C{e2e} (TP serves C{name}).  The connection
      then carries events (L{encodeEvent}).  C{member} (optional) names
      the exposer's link: a C{listen} of the same identity and member
      replaces that link's registration (a reconnect); one with another
      member joins the exposure's pool (docs/protocol.md).
    - C{accept}: this new connection serves the incoming C{session}.

    C{host} is a destination host (L{tpproxy.names.isDestinationHost}),
    kept as the client wrote it; C{name} a certificate name
    (L{tpproxy.names.isCertificateName}), kept normalized.
    """

    op: str
    host: str = ""
    port: int = 0
    transport: str = "tcp"
    mode: str | None = None
    name: str | None = None
    session: str | None = None
    member: str | None = None
    version: int = VERSION
    #: P2P (docs/p2p.md): on C{connect}, the dialer's ICE offer; on
    #: C{accept}, the exposer's ICE answer (L{parseP2POffer}); on C{listen},
    #: C{True} when the exposer can be introduced to dialers.
    p2p: Any = None
    #: On C{connect}: the P2P session that found no direct path, which
    #: this relayed dial replaces (for TP's counts).
    p2pFailed: str | None = None

    @classmethod
    def connect(cls, host: str, port: int) -> ClientHello:
        """
        A C{connect} (always TCP) to C{host}:C{port}.
        """
        return cls("connect", host=host, port=port)

    def toFrame(self) -> bytes:
        obj: dict[str, Any] = {"v": self.version, "op": self.op}
        if self.p2p is not None:
            obj["p2p"] = self.p2p
        if self.p2pFailed is not None:
            obj["p2p_failed"] = self.p2pFailed
        if self.op in ("connect", "udp"):
            obj.update(host=self.host, port=self.port, transport=self.transport)
        elif self.op == "listen":
            obj["mode"] = self.mode
            if self.mode == "public":
                obj["port"] = self.port
            else:
                obj["name"] = self.name
            if self.member is not None:
                obj["member"] = self.member
        elif self.op == "accept":
            obj["session"] = self.session
        return encodeFrame(obj)

    @classmethod
    def fromObject(cls, obj: dict[str, Any]) -> ClientHello:
        """
        Validate a decoded frame as a ClientHello.  Unknown keys are ignored
        so that later minor additions stay compatible.

        @raise WireError: naming the field at fault.
        """
        _checkVersion(obj)
        op = obj.get("op")
        if not isinstance(op, str):
            raise _bad("field 'op' must be a string")
        if op not in OPERATIONS:
            if op in RESERVED_OPERATIONS:
                raise _bad(f"operation {op!r} is not supported by this server")
            raise _bad(f"unknown operation {_quote(op)}")
        if op == "listen":
            return cls._listen(obj)
        if op == "accept":
            session = obj.get("session")
            if not isinstance(session, str) or not _SESSION.fullmatch(session):
                raise _bad("field 'session' must be a session id (16-128 characters of A-Z a-z 0-9 _ -)")
            return cls(op=op, session=session, p2p=parseP2POffer(obj["p2p"]) if obj.get("p2p") is not None else None)
        host = obj.get("host")
        if not isinstance(host, str) or not isDestinationHost(host):
            raise _bad("field 'host' must be a DNS name or an IP address")
        port = obj.get("port")
        if type(port) is not int or not 1 <= port <= 65535:
            raise _bad("field 'port' must be an integer from 1 to 65535")
        if op == "udp":
            return cls(op=op, host=host, port=port, transport="udp", version=VERSION)
        transport = obj.get("transport", "tcp")
        if not isinstance(transport, str) or transport not in TRANSPORTS:
            raise _bad("field 'transport' must be 'tcp' or 'udp'")
        if transport != "tcp":
            # One meaning per request: C{connect} is a TCP tunnel, and a UDP
            # flow is the C{udp} operation (its own framing and rules).
            raise _bad("operation 'connect' is TCP only: a UDP flow is operation 'udp'")
        p2p = parseP2POffer(obj["p2p"]) if obj.get("p2p") is not None else None
        failed = obj.get("p2p_failed")
        if failed is not None and (not isinstance(failed, str) or not _SESSION.fullmatch(failed)):
            raise _bad("field 'p2p_failed' must be a session id (16-128 characters of A-Z a-z 0-9 _ -)")
        return cls(op=op, host=host, port=port, transport=transport, version=VERSION, p2p=p2p, p2pFailed=failed)

    @classmethod
    def _listen(cls, obj: dict[str, Any]) -> ClientHello:
        mode = obj.get("mode")
        member = obj.get("member")
        offers = obj.get("p2p", False)
        if not isinstance(offers, bool):
            raise _bad("field 'p2p' of a listen must be true or false")
        if member is not None and (not isinstance(member, str) or not _MEMBER.fullmatch(member)):
            raise _bad("field 'member' must be 1-64 characters of A-Z a-z 0-9 _ -")
        if mode == "public":
            port = obj.get("port", 0)
            if type(port) is not int or not 0 <= port <= 65535:
                raise _bad("field 'port' must be an integer from 0 (TP picks) to 65535")
            return cls(op="listen", mode=mode, port=port, member=member)
        if mode == "e2e":
            name = obj.get("name")
            if not isinstance(name, str) or not isCertificateName(name):
                raise _bad("field 'name' must be a DNS name of letters, digits and hyphens (no '_', not an address)")
            return cls(op="listen", mode=mode, name=normalize(name), member=member, p2p=True if offers else None)
        raise _bad("field 'mode' must be 'public' or 'e2e'")


#: ICE credentials (RFC 8445 section 5.3: ice-chars) and bounds.
_ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
MAX_CANDIDATES = 20
MAX_CANDIDATE = 256


def parseP2POffer(value: Any) -> dict[str, Any]:
    """
    An ICE offer or answer (docs/p2p.md): C{{"ufrag", "pwd", "candidates"}},
    with credentials of ICE characters (ufrag 4-256, pwd 22-256) and at most
    L{MAX_CANDIDATES} candidate lines of printable ASCII, each at most
    L{MAX_CANDIDATE} characters.  TP passes candidates on unread.

    @raise WireError: naming what is wrong.
    """
    if not isinstance(value, dict):
        raise _bad("field 'p2p' must be an object with 'ufrag', 'pwd' and 'candidates'")
    ufrag, pwd, candidates = value.get("ufrag"), value.get("pwd"), value.get("candidates")
    if not isinstance(ufrag, str) or not 4 <= len(ufrag) <= 256 or not _ICE_CHARS.fullmatch(ufrag):
        raise _bad("field 'p2p.ufrag' must be 4-256 ICE characters (A-Z a-z 0-9 + /)")
    if not isinstance(pwd, str) or not 22 <= len(pwd) <= 256 or not _ICE_CHARS.fullmatch(pwd):
        raise _bad("field 'p2p.pwd' must be 22-256 ICE characters (A-Z a-z 0-9 + /)")
    if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES:
        raise _bad(f"field 'p2p.candidates' must be a list of at most {MAX_CANDIDATES} candidates")
    for candidate in candidates:
        if not isinstance(candidate, str) or not 1 <= len(candidate) <= MAX_CANDIDATE or not candidate.isascii() or not candidate.isprintable():
            raise _bad(f"each of 'p2p.candidates' must be a candidate line of 1-{MAX_CANDIDATE} printable ASCII characters")
    return {"ufrag": ufrag, "pwd": pwd, "candidates": list(candidates)}


_SESSION = re.compile(r"[A-Za-z0-9_-]{16,128}")
_MEMBER = re.compile(r"[A-Za-z0-9_-]{1,64}")


#: Events on a C{listen} connection, and the fields each carries.
EVENTS: dict[str, tuple[str, ...]] = {
    "incoming": ("session", "identity", "peer"),
    "ping": (),
    "pong": (),
}


def encodeEvent(event: str, **fields: Any) -> bytes:
    return encodeFrame({"event": event, **fields})


def parseEvent(obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """
    Validate an event frame.  Unknown events are returned as they are, for
    the caller to ignore; known ones must carry their string fields.

    @raise WireError: if the frame is not an event or lacks a field.
    """
    event = obj.get("event")
    if not isinstance(event, str):
        raise _bad("field 'event' must be a string")
    for name in EVENTS.get(event, ()):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise _bad(f"field {name!r} of event {event!r} must be a string")
    if event == "incoming" and not isinstance(obj.get("session"), str):
        raise _bad("event 'incoming' needs a 'session'")
    return event, obj


@dataclass(frozen=True)
class ServerHello:
    """
    The server's answer: success, or an error code and message.

    @ivar code: an L{ErrorCode} value on failure.  On the client side an
        unknown code from a newer server is kept as the plain string.
    @ivar info: extra fields (for instance C{address}, the dialled address).
    """

    ok: bool
    code: str | None = None
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, **info: Any) -> ServerHello:
        return cls(ok=True, info=info)

    @classmethod
    def failure(cls, code: ErrorCode, message: str) -> ServerHello:
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        return cls(ok=False, code=code.value, message=message)

    def toFrame(self) -> bytes:
        obj: dict[str, Any] = {"v": VERSION, "ok": self.ok}
        if not self.ok:
            obj["error"] = self.code
            obj["message"] = self.message
        obj.update(self.info)
        return encodeFrame(obj)

    @classmethod
    def fromObject(cls, obj: dict[str, Any]) -> ServerHello:
        _checkVersion(obj)
        ok = obj.get("ok")
        if not isinstance(ok, bool):
            raise _bad("field 'ok' must be a boolean")
        info = {k: v for k, v in obj.items() if k not in ("v", "ok", "error", "message")}
        if ok:
            return cls(ok=True, info=info)
        code = obj.get("error")
        message = obj.get("message", "")
        if not isinstance(code, str) or not isinstance(message, str):
            raise _bad("a failed ServerHello needs string fields 'error' and 'message'")
        return cls(ok=False, code=code, message=message, info=info)
