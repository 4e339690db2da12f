# -*- test-case-name: tpproxy.test.test_webtoken -*-
"""
Session tokens for browsers on WebTransport (docs/webtransport.md).

A browser cannot present a client certificate on a WebTransport session,
but it does over TLS on TCP.  So TP's HTTPS endpoint on its TLS port, which
a client certificate reaches only after the handshake verified it, mints a
token that carries that certificate; the page passes the token on its
WebTransport CONNECT, and the session is that certificate's identity.

A token is, base64url without padding::

    version (1) | id (16, random) | issued (8) | expires (8) | audience
    length (2) | audience | certificate (DER) | HMAC-SHA256 (32)

with times in milliseconds since the epoch, big-endian, and the MAC keyed
from TP's private key (L{tokenKey}), so that every worker and instance that
holds the key checks it.  It is:

  - short-lived: at most L{MAX_LIFETIME} seconds;
  - audience-bound: to the C{Origin} of the page that asked for it, which
    must be the C{Origin} of the CONNECT;
  - single-use: a L{TokenVerifier} remembers the ids it redeemed until they
    expire (per process: see docs/webtransport.md for what that means in
    a cluster).

Nothing here touches a socket or a clock: times are passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

VERSION = 1
#: The longest a token may live, in seconds (issue 15: at most 60).
MAX_LIFETIME = 60.0
#: What a token lives by default.
DEFAULT_LIFETIME = 30.0
ID_SIZE = 16
MAC_SIZE = 32
#: The largest token accepted, in characters (a certificate chain of a few
#: KiB fits; a CONNECT's path is bounded by the HTTP/3 responder anyway).
MAX_TOKEN = 8192
#: Redeemed ids remembered at once: beyond, new tokens are refused until
#: old ones expire (forgetting an unexpired id would let it be replayed).
MAX_REDEEMED = 100_000
_HEAD = struct.Struct("!B16sQQH")


class TokenError(Exception):
    """
    A token was refused.

    @ivar reason: one of C{malformed}, C{bad_signature}, C{expired},
        C{not_yet_valid}, C{wrong_audience}, C{replayed}, C{busy}.
    @ivar message: for people (the log, the refused CONNECT's body).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def tokenKey(privateKey: Any) -> bytes:
    """
    The key that signs tokens, derived one-way from TP's private key.
    """
    der = privateKey.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return hashlib.sha256(b"tp webtransport token v1\0" + der).digest()


@dataclass(frozen=True)
class Grant:
    """
    What a valid token says.

    @ivar id: its random id (hex).
    @ivar audience: the origin it is bound to.
    @ivar issued: Unix time it was minted.
    @ivar expires: Unix time it stops being accepted.
    @ivar certificate: the client certificate TP verified when minting.
    """

    id: str
    audience: str
    issued: float
    expires: float
    certificate: x509.Certificate


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or len(text) > MAX_TOKEN or not text.isascii():
        raise TokenError("malformed", "not a TP token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "not a TP token (base64url expected)") from None


def mint(key: bytes, certificate: x509.Certificate, audience: str, now: float, lifetime: float = DEFAULT_LIFETIME, tokenId: bytes | None = None) -> str:
    """
    A token for C{certificate}, bound to C{audience}, valid from C{now}
    for C{lifetime} seconds (at most L{MAX_LIFETIME}).
    """
    if not 0 < lifetime <= MAX_LIFETIME:
        raise ValueError(f"a token lives more than 0 and at most {MAX_LIFETIME:g} seconds, not {lifetime!r}")
    aud = audience.encode("utf-8")
    if len(aud) > 1024:
        raise ValueError("the audience is longer than 1024 bytes")
    body = _HEAD.pack(VERSION, tokenId or os.urandom(ID_SIZE), int(now * 1000), int((now + lifetime) * 1000), len(aud)) + aud
    body += certificate.public_bytes(Encoding.DER)
    return _b64encode(body + hmac.digest(key, body, "sha256"))


def read(keys: list[bytes], token: str) -> tuple[bytes, float, float, str, x509.Certificate]:
    """
    Check a token's MAC with each of C{keys} and parse it: (id, issued,
    expires, audience, certificate).  Times are not checked here.

    @raise TokenError: C{malformed} or C{bad_signature}.
    """
    raw = _b64decode(token)
    if len(raw) < _HEAD.size + MAC_SIZE:
        raise TokenError("malformed", "not a TP token (too short)")
    body, mac = raw[:-MAC_SIZE], raw[-MAC_SIZE:]
    if not any(hmac.compare_digest(mac, hmac.digest(key, body, "sha256")) for key in keys):
        raise TokenError("bad_signature", "the token was not made by this TP (or TP's key changed since)")
    version, tokenId, issued, expires, audLength = _HEAD.unpack_from(body)
    if version != VERSION:
        raise TokenError("malformed", f"token version {version} is not {VERSION}")
    rest = body[_HEAD.size :]
    if len(rest) < audLength:
        raise TokenError("malformed", "the token is cut short")
    try:
        audience = rest[:audLength].decode("utf-8")
        certificate = x509.load_der_x509_certificate(rest[audLength:])
    except ValueError:
        raise TokenError("malformed", "the token's audience or certificate does not parse") from None
    return tokenId, issued / 1000, expires / 1000, audience, certificate


class TokenVerifier:
    """
    Redeems tokens: checks MAC, time and audience, and that the token was
    not redeemed before (by this process).

    @param keys: gives the keys to try, the current first (the previous
        one is kept for a while after a reload changed TP's key).
    """

    def __init__(self, keys: Callable[[], list[bytes]], maxRedeemed: int = MAX_REDEEMED) -> None:
        self.keys = keys
        self.maxRedeemed = maxRedeemed
        #: Redeemed ids, to when they expire, oldest first.
        self.redeemed: OrderedDict[bytes, float] = OrderedDict()

    def _prune(self, now: float) -> None:
        while self.redeemed:
            tokenId, expires = next(iter(self.redeemed.items()))
            if expires > now:
                break
            del self.redeemed[tokenId]

    def redeem(self, token: str, origin: str | None, now: float) -> Grant:
        """
        Accept C{token} once, for a CONNECT whose C{Origin} is C{origin}.

        @raise TokenError: why it is refused.
        """
        tokenId, issued, expires, audience, certificate = read(self.keys(), token)
        if now >= expires:
            raise TokenError("expired", f"the token expired {now - expires:.1f} s ago; ask for a new one")
        if issued > now + 5:
            raise TokenError("not_yet_valid", "the token was issued in the future (clock skew between TP instances?)")
        if origin != audience:
            raise TokenError("wrong_audience", f"the token is for origin {audience!r}, this session's origin is {origin!r}")
        self._prune(now)
        if tokenId in self.redeemed:
            raise TokenError("replayed", "the token was used before: a token opens one session")
        if len(self.redeemed) >= self.maxRedeemed:
            raise TokenError("busy", "too many tokens in use; try again in a minute")
        # Ids are kept in order of expiry as long as lifetimes are alike;
        # an out-of-order one only stays a little longer than needed.
        self.redeemed[tokenId] = expires
        return Grant(tokenId.hex(), audience, issued, expires, certificate)


def originHost(origin: str) -> str | None:
    """
    The host of an C{https} origin (lowercase, IPv6 without brackets), or
    C{None} for anything else.
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(origin)
        if parts.scheme != "https" or parts.path or parts.query or parts.fragment or parts.username:
            return None
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return None
    return parts.hostname


def certificateHosts(cert: x509.Certificate) -> frozenset[str]:
    """
    The names and addresses a server certificate is for: its common name,
    DNS names and IP addresses, lowercase.
    """
    hosts = {str(a.value).lower() for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset(hosts)
    hosts.update(n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName))
    hosts.update(str(a) for a in san.get_values_for_type(x509.IPAddress))
    return frozenset(hosts)


class Gate:
    """
    Where tokens are minted and redeemed, with the origins allowed to do
    either: C{origins} if configured, else every C{https} origin on one of
    the names of TP's own certificate (C{serverChain()[0]}).

    @param privateKey: gives TP's current private key (it signs tokens).
    """

    def __init__(
        self,
        privateKey: Callable[[], Any],
        serverChain: Callable[[], list[x509.Certificate]],
        origins: tuple[str, ...] = (),
        lifetime: float = DEFAULT_LIFETIME,
        path: str = "/tp",
    ) -> None:
        self.privateKey = privateKey
        self.serverChain = serverChain
        self.origins = frozenset(origins)
        self.lifetime = lifetime
        self.path = path
        self._keys: list[tuple[Any, bytes]] = []
        self.verifier = TokenVerifier(self.keys)
        #: What browsers' HTTP/3 connections are served, by hash
        #: (L{tpproxy.transports.webtransport.HashedCertificate}), or
        #: C{None}: TP's own certificate.
        self.certificate: Any = None
        #: Tokens minted, and mints refused by reason.
        self.minted = 0
        self.refused: dict[str, int] = {}

    def keys(self) -> list[bytes]:
        """
        The current token key, then the previous one (a reload that loads
        the same key file again changes nothing: keys are compared by
        value).
        """
        key = self.privateKey()
        if not self._keys or self._keys[0][0] is not key:
            derived = tokenKey(key)
            if self._keys and self._keys[0][1] == derived:
                self._keys[0] = (key, derived)
            else:
                self._keys = [(key, derived)] + self._keys[:1]
        return [k for _, k in self._keys]

    def originAllowed(self, origin: str | None) -> bool:
        if origin is None:
            return False
        origin = origin.lower()
        if self.origins:
            return origin in self.origins
        host = originHost(origin)
        return host is not None and host in certificateHosts(self.serverChain()[0])

    def _refuse(self, reason: str, message: str) -> TokenError:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return TokenError(reason, message)

    def mint(self, certificate: x509.Certificate, origin: str | None, now: float) -> str:
        """
        A token for a page of C{origin} whose browser presented
        C{certificate} (verified by TP's TLS handshake).

        @raise TokenError: C{no_origin} or C{origin_not_allowed}.
        """
        if origin is None:
            raise self._refuse("no_origin", "an Origin header is required: a token is bound to the origin of the page that uses it")
        if not self.originAllowed(origin):
            raise self._refuse("origin_not_allowed", f"origin {origin!r} may not use TP over WebTransport (webtransport.origins)")
        self.minted += 1
        return mint(self.keys()[0], certificate, origin.lower(), now, self.lifetime)

    def redeem(self, token: str | None, origin: str | None, now: float) -> Grant:
        """
        The grant of a CONNECT's C{token}, if it may open a session from a
        page of C{origin}.

        @raise TokenError: why not.
        """
        if origin is None or not self.originAllowed(origin):
            raise TokenError("origin_not_allowed", f"origin {origin!r} may not use TP over WebTransport (webtransport.origins)")
        if not token:
            raise TokenError("no_token", f"no token: ask TP's POST {self.path}/token for one, then connect to {self.path}?token=...")
        return self.verifier.redeem(token, origin.lower(), now)
