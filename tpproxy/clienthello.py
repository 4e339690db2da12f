# -*- test-case-name: tpproxy.test.test_clienthello -*-
"""
Reading a TLS ClientHello without terminating TLS: the server name (SNI)
and the ALPN protocols a client offers, so that a router can choose where
the connection goes before any TLS library sees it.

This is a small, strict, sans-IO parser.  L{ClientHelloParser.feed} takes
the bytes received so far, in chunks as they arrive, and answers L{None}
("need more"), a L{ClientHelloInfo}, or raises L{ClientHelloError}.  Nothing
else can come out of it for any input: every length is checked against the
bytes that hold it before it is used.

What is parsed (RFC 8446 sections 4.1.2 and 5.1, RFC 6066 section 3, RFC
7301 section 3.1):

  - the record layer: content type 22 (handshake), record version 0x0300 to
    0x0304, record length 1 to L{MAX_RECORD}.  A handshake message may be
    fragmented over several records, and a record over several reads.  A
    first byte that is not 22 is refused at once, so plaintext (an HTTP
    request on the TLS port) is told apart from its first byte;
  - the handshake header: type 1 (ClientHello) and a 24-bit length that
    must not exceed the parser's limit (16 KiB by default);
  - the ClientHello body: legacy_version, random, legacy_session_id (at
    most 32 bytes), cipher_suites (an even count of bytes, at least one
    suite), legacy_compression_methods (must offer null), and the
    extensions, whose lengths must add up exactly, with no extension type
    twice;
  - server_name (type 0): exactly one entry, of type host_name, read by
    L{tpproxy.names.serverName}: an ASCII DNS name (letters, digits, C{-},
    C{_}, dots), returned lowercased and without a trailing dot; an IP
    literal, which RFC 6066 does not allow there, is read as no name;
  - application_layer_protocol_negotiation (type 16): a non-empty list of
    non-empty names;
  - supported_versions (type 43): a list of 16-bit versions.

The record holding the last byte of the ClientHello must end with it (RFC
8446 section 5.1: a handshake message before a key change aligns with a
record boundary).  What follows those records is not looked at: the caller
passes every byte on, untouched, to whoever terminates TLS.

Because the parser is incremental, total work is linear in the input, and
because empty handshake records are refused, the input it buffers is
bounded (at most six bytes per byte of ClientHello, with one-byte records).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tpproxy.names import serverName

#: Record content type of handshake messages.
HANDSHAKE = 22
#: Handshake message type of a ClientHello.
CLIENT_HELLO = 1

#: The largest plaintext record is 2^14 bytes; a little more is tolerated.
MAX_RECORD = 2**14 + 2048
#: The default limit on the size of a ClientHello (the handshake message
#: body, not counting its 4-byte header or the record headers).
DEFAULT_LIMIT = 16 * 1024

# Extension types.
EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43

# TLS alert descriptions a server would answer these errors with.
ALERT_UNEXPECTED_MESSAGE = 10
ALERT_RECORD_OVERFLOW = 22
ALERT_HANDSHAKE_FAILURE = 40
ALERT_ILLEGAL_PARAMETER = 47
ALERT_DECODE_ERROR = 50
ALERT_PROTOCOL_VERSION = 70


class ClientHelloError(ValueError):
    """
    The bytes are not a well-formed TLS ClientHello.

    @ivar alert: the TLS alert description a server would answer with, or
        L{None} if the bytes are not TLS at all (no alert makes sense then).
    """

    def __init__(self, message: str, alert: int | None = ALERT_DECODE_ERROR) -> None:
        super().__init__(message)
        self.alert = alert


@dataclass(frozen=True)
class ClientHelloInfo:
    """
    What a router needs from a ClientHello.

    @ivar serverName: the SNI host_name, lowercased, without a trailing dot;
        L{None} if the client sent no server_name extension, or an IP
        literal in it.
    @ivar alpn: the ALPN protocol names offered, in the client's order
        (decoded as Latin-1, so every byte string maps to one text); empty
        if the client sent no ALPN extension.
    @ivar supportedVersions: the versions of the supported_versions
        extension (C{0x0304} is TLS 1.3), empty if absent.
    @ivar legacyVersion: the ClientHello's legacy_version field.
    @ivar extensions: the extension types, in the order sent.
    @ivar length: the size of the ClientHello handshake message body.
    """

    serverName: str | None
    alpn: tuple[str, ...] = ()
    supportedVersions: tuple[int, ...] = ()
    legacyVersion: int = 0x0303
    extensions: tuple[int, ...] = ()
    length: int = 0


class _Reader:
    """
    A cursor over one length-delimited block; every read is bounds-checked.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining():
            raise ClientHelloError(
                f"{self.what}: {field} needs {n} bytes, only {self.remaining()} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, lengthSize: int, field: str) -> bytes:
        return self.take(self.uint(lengthSize, f"the length of {field}"), field)

    def end(self, field: str) -> None:
        if self.remaining():
            raise ClientHelloError(f"{self.what}: {self.remaining()} stray bytes after {field}")


def _hostName(raw: bytes) -> str | None:
    """
    Check and normalize an SNI host_name (L{tpproxy.names.serverName}).
    """
    try:
        return serverName(raw)
    except ValueError as e:
        raise ClientHelloError(f"server_name: {e}", ALERT_ILLEGAL_PARAMETER) from None


def _serverName(data: bytes) -> str | None:
    outer = _Reader(data, "server_name")
    names = _Reader(outer.vector(2, "server_name_list"), "server_name_list")
    outer.end("server_name_list")
    if not names.remaining():
        raise ClientHelloError("server_name: empty server_name_list")
    nameType = names.uint(1, "name_type")
    if nameType != 0:
        raise ClientHelloError(f"server_name: name_type {nameType}, only host_name (0) is defined", ALERT_ILLEGAL_PARAMETER)
    host = names.vector(2, "host_name")
    names.end("the host_name (one name only)")
    return _hostName(host)


def _alpn(data: bytes) -> tuple[str, ...]:
    outer = _Reader(data, "ALPN")
    names = _Reader(outer.vector(2, "protocol_name_list"), "ALPN protocol_name_list")
    outer.end("protocol_name_list")
    if not names.remaining():
        raise ClientHelloError("ALPN: empty protocol_name_list")
    result = []
    while names.remaining():
        name = names.vector(1, "protocol name")
        if not name:
            raise ClientHelloError("ALPN: empty protocol name")
        result.append(name.decode("latin-1"))
    return tuple(result)


def _supportedVersions(data: bytes) -> tuple[int, ...]:
    outer = _Reader(data, "supported_versions")
    versions = outer.vector(1, "versions")
    outer.end("versions")
    if not versions or len(versions) % 2:
        raise ClientHelloError(f"supported_versions: a list of {len(versions)} bytes")
    return tuple(v for (v,) in struct.iter_unpack(">H", versions))


def parseClientHelloBody(body: bytes) -> ClientHelloInfo:
    """
    Parse the body of a ClientHello handshake message (after its 4-byte
    handshake header).

    @raise ClientHelloError: if it is malformed.
    """
    r = _Reader(body, "ClientHello")
    legacyVersion = r.uint(2, "legacy_version")
    if not 0x0300 <= legacyVersion <= 0x0304:
        raise ClientHelloError(f"ClientHello: legacy_version 0x{legacyVersion:04x}", ALERT_PROTOCOL_VERSION)
    r.take(32, "random")
    sessionID = r.vector(1, "legacy_session_id")
    if len(sessionID) > 32:
        raise ClientHelloError(f"ClientHello: legacy_session_id of {len(sessionID)} bytes (at most 32)")
    suites = r.vector(2, "cipher_suites")
    if len(suites) < 2 or len(suites) % 2:
        raise ClientHelloError(f"ClientHello: cipher_suites of {len(suites)} bytes")
    compression = r.vector(1, "legacy_compression_methods")
    if b"\x00" not in compression:
        raise ClientHelloError("ClientHello: the null compression method is not offered", ALERT_ILLEGAL_PARAMETER)
    serverName: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    types: list[int] = []
    if r.remaining():
        block = _Reader(r.vector(2, "extensions"), "extensions")
        r.end("extensions")
        seen: set[int] = set()
        while block.remaining():
            extType = block.uint(2, "extension type")
            extData = block.vector(2, f"extension {extType}")
            if extType in seen:
                raise ClientHelloError(f"ClientHello: extension {extType} appears twice", ALERT_ILLEGAL_PARAMETER)
            seen.add(extType)
            types.append(extType)
            if extType == EXT_SERVER_NAME:
                serverName = _serverName(extData)
            elif extType == EXT_ALPN:
                alpn = _alpn(extData)
            elif extType == EXT_SUPPORTED_VERSIONS:
                versions = _supportedVersions(extData)
    return ClientHelloInfo(
        serverName=serverName,
        alpn=alpn,
        supportedVersions=versions,
        legacyVersion=legacyVersion,
        extensions=tuple(types),
        length=len(body),
    )


class ClientHelloParser:
    """
    Incremental parser of the records that carry a ClientHello.

    Feed it what arrives; it keeps only what it has not yet consumed.  Once
    it has answered a L{ClientHelloInfo} or raised, it is done: feeding it
    more raises L{RuntimeError}.

    @ivar limit: the largest ClientHello body accepted.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._pending = bytearray()  # record bytes not yet consumed
        self._handshake = bytearray()  # handshake message bytes gathered
        self._length: int | None = None  # the ClientHello body length
        self._done = False

    def feed(self, data: bytes) -> ClientHelloInfo | None:
        """
        Add the next bytes received.

        @return: L{None} if more bytes are needed, else the parsed hello.
        @raise ClientHelloError: if the bytes are not a ClientHello, or one
            larger than C{limit}.
        """
        if self._done:
            raise RuntimeError("ClientHelloParser has finished")
        try:
            result = self._feed(data)
        except ClientHelloError:
            self._done = True
            raise
        if result is not None:
            self._done = True
        return result

    def _feed(self, data: bytes) -> ClientHelloInfo | None:
        pending = self._pending
        pending += data
        while True:
            self._checkRecordHeader(pending)
            if len(pending) < 5:
                return None
            length = int.from_bytes(pending[3:5], "big")
            if len(pending) < 5 + length:
                # Check what has come of the record: the handshake header
                # says the size of the ClientHello before it is all there.
                head = self._handshake[:4] + pending[5:9] if self._length is None else b""
                self._checkHandshakeHeader(head, len(self._handshake) + length)
                return None
            fragment = bytes(pending[5 : 5 + length])
            del pending[: 5 + length]
            info = self._handshakeFragment(fragment)
            if info is not None:
                return info

    def _checkRecordHeader(self, header: bytearray) -> None:
        """
        Check as much of a record header as has arrived: refuse what is not
        TLS as soon as its first byte shows it.
        """
        if not header:
            return
        if header[0] != HANDSHAKE:
            if self._handshake:
                raise ClientHelloError(
                    f"record of content type {header[0]} in the middle of the ClientHello",
                    ALERT_UNEXPECTED_MESSAGE,
                )
            if header[0] & 0x80:
                raise ClientHelloError(
                    f"not a TLS handshake record (first byte 0x{header[0]:02x}; SSLv2-style hellos are not supported)",
                    None,
                )
            raise ClientHelloError(f"not a TLS handshake: starts with {bytes(header[:8])!r}", None)
        if len(header) > 1 and header[1] != 3:
            raise ClientHelloError(f"not a TLS record: version byte 0x{header[1]:02x}", None)
        if len(header) > 2 and header[2] > 4:
            raise ClientHelloError(f"TLS record version 0x03{header[2]:02x}", ALERT_PROTOCOL_VERSION)
        if len(header) >= 5:
            length = int.from_bytes(header[3:5], "big")
            if length == 0:
                raise ClientHelloError("empty handshake record", ALERT_UNEXPECTED_MESSAGE)
            if length > MAX_RECORD:
                raise ClientHelloError(f"TLS record of {length} bytes", ALERT_RECORD_OVERFLOW)

    def _checkHandshakeHeader(self, head: bytes | bytearray, total: int) -> None:
        """
        Check the handshake header as far as it has arrived, C{head} (what
        there is of the first four handshake bytes; only needed until the
        length is known), and that the record being read, which brings the
        handshake bytes to C{total}, carries nothing after the ClientHello.
        """
        if self._length is None:
            if not head:
                return
            if head[0] != CLIENT_HELLO:
                raise ClientHelloError(f"handshake message of type {head[0]}, not a ClientHello", ALERT_UNEXPECTED_MESSAGE)
            if len(head) < 4:
                return
            self._length = int.from_bytes(head[1:4], "big")
            if self._length > self.limit:
                raise ClientHelloError(
                    f"ClientHello too big: {self._length} bytes (limit {self.limit})", ALERT_HANDSHAKE_FAILURE
                )
        extra = total - (4 + self._length)
        if extra > 0:
            raise ClientHelloError(f"{extra} bytes follow the ClientHello in its record", ALERT_UNEXPECTED_MESSAGE)

    def _handshakeFragment(self, fragment: bytes) -> ClientHelloInfo | None:
        hs = self._handshake
        hs += fragment
        self._checkHandshakeHeader(hs[:4] if self._length is None else b"", len(hs))
        if self._length is None:
            return None
        end = 4 + self._length
        if len(hs) < end:
            return None
        return parseClientHelloBody(bytes(hs[4:end]))


def parseClientHello(data: bytes, limit: int = DEFAULT_LIMIT) -> ClientHelloInfo | None:
    """
    Parse the ClientHello at the start of C{data}, all the bytes received
    so far.

    @return: L{None} if more bytes are needed, else the parsed hello.
    @raise ClientHelloError: if C{data} does not start with a ClientHello of
        at most C{limit} bytes.
    """
    return ClientHelloParser(limit).feed(data)
