"""
Tests for L{tpproxy.webtoken}: the tokens that bind a browser's
WebTransport session to the client certificate it presented on TP's TLS
port, and the L{Gate} that mints and redeems them.  Sans-IO: every time is
passed in.
"""

from __future__ import annotations

import base64
import hmac
import struct
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_der_private_key
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.pki import CertificateAuthority, newKey
from tpproxy.webtoken import (
    MAX_LIFETIME,
    MAX_TOKEN,
    VERSION,
    Gate,
    TokenError,
    TokenVerifier,
    certificateHosts,
    mint,
    originHost,
    read,
    tokenKey,
)

CA = CertificateAuthority.create("webtoken test CA")
ALICE = CA.issue("alice", client=True).cert
BOB = CA.issue("bob", client=True).cert
#: TP's own certificate, as TestPKI makes it.
SERVER = CA.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "::1"), server=True)
KEY = tokenKey(SERVER.key)
OTHER_KEY = tokenKey(newKey())
ORIGIN = "https://localhost:4433"
NOW = 1_700_000_000.0

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def signed(body: bytes, key: bytes = KEY) -> str:
    """
    A token of C{body}, MAC'd with C{key} as TP does.
    """
    return b64(body + hmac.digest(key, body, "sha256"))


def body(version: int = VERSION, tokenId: bytes = b"i" * 16, issued: float = NOW, expires: float = NOW + 30, audience: bytes = ORIGIN.encode(), cert: x509.Certificate = ALICE) -> bytes:
    return struct.pack("!B16sQQH", version, tokenId, int(issued * 1000), int(expires * 1000), len(audience)) + audience + cert.public_bytes(Encoding.DER)


def verifier(**kw: Any) -> TokenVerifier:
    return TokenVerifier(lambda: [KEY], **kw)


class TokenTests(SynchronousTestCase):
    """
    L{mint}, L{read} and L{TokenVerifier.redeem}.
    """

    def refused(self, reason: str, f: Any, *args: Any) -> TokenError:
        e = self.assertRaises(TokenError, f, *args)
        self.assertEqual(e.reason, reason, e)
        return e

    def test_roundTrip(self) -> None:
        """
        A minted token reads back as what it was minted with, and redeems
        once into a L{Grant} naming the certificate, audience and times.
        """
        token = mint(KEY, ALICE, ORIGIN, NOW, 30, tokenId=b"\x01" * 16)
        self.assertTrue(token.isascii())
        self.assertNotIn("=", token)
        self.assertEqual(read([KEY], token), (b"\x01" * 16, NOW, NOW + 30, ORIGIN, ALICE))
        grant = verifier().redeem(token, ORIGIN, NOW + 1)
        self.assertEqual((grant.id, grant.audience, grant.issued, grant.expires), ("01" * 16, ORIGIN, NOW, NOW + 30))
        self.assertEqual(grant.certificate, ALICE)

    def test_idsAreRandom(self) -> None:
        """
        Two tokens minted alike differ (a random id each): both redeem.
        """
        tokens = {mint(KEY, ALICE, ORIGIN, NOW) for _ in range(20)}
        self.assertEqual(len(tokens), 20)
        v = verifier()
        for token in tokens:
            v.redeem(token, ORIGIN, NOW)

    def test_expired(self) -> None:
        """
        A token is accepted until just before it expires; at its expiry and
        after, it is refused as C{expired}.
        """
        token = lambda: mint(KEY, ALICE, ORIGIN, NOW, 30)  # noqa: E731
        verifier().redeem(token(), ORIGIN, NOW + 29.999)
        self.refused("expired", verifier().redeem, token(), ORIGIN, NOW + 30)
        e = self.refused("expired", verifier().redeem, token(), ORIGIN, NOW + 3600)
        self.assertIn("new one", e.message)

    def test_notYetValid(self) -> None:
        """
        A token issued more than 5 s in the future (another instance's
        clock ahead) is refused as C{not_yet_valid}; within 5 s it is
        accepted.
        """
        self.refused("not_yet_valid", verifier().redeem, mint(KEY, ALICE, ORIGIN, NOW + 6, 30), ORIGIN, NOW)
        verifier().redeem(mint(KEY, ALICE, ORIGIN, NOW + 5, 30), ORIGIN, NOW)

    def test_wrongAudience(self) -> None:
        """
        A token is for the origin it was minted for: a CONNECT from another
        origin, or with no origin, is refused as C{wrong_audience}.
        """
        token = mint(KEY, ALICE, ORIGIN, NOW)
        self.refused("wrong_audience", verifier().redeem, token, "https://evil.example", NOW)
        self.refused("wrong_audience", verifier().redeem, token, "https://localhost:4434", NOW)
        self.refused("wrong_audience", verifier().redeem, token, None, NOW)

    def test_replayed(self) -> None:
        """
        A token opens one session: redeemed a second time it is refused as
        C{replayed}, also after other tokens were redeemed in between, and
        until it expires (then it is C{expired}).
        """
        v = verifier()
        token = mint(KEY, ALICE, ORIGIN, NOW, 30)
        v.redeem(token, ORIGIN, NOW)
        self.refused("replayed", v.redeem, token, ORIGIN, NOW + 1)
        for i in range(50):
            v.redeem(mint(KEY, BOB, ORIGIN, NOW + i * 0.5, 30), ORIGIN, NOW + i * 0.5)
        self.refused("replayed", v.redeem, token, ORIGIN, NOW + 29.9)
        self.refused("expired", v.redeem, token, ORIGIN, NOW + 30)

    def test_replayedRefusalsDoNotConsume(self) -> None:
        """
        A refused redemption (wrong origin) does not use the token up: from
        its own origin it still redeems, once.
        """
        v = verifier()
        token = mint(KEY, ALICE, ORIGIN, NOW)
        self.refused("wrong_audience", v.redeem, token, "https://evil.example", NOW)
        v.redeem(token, ORIGIN, NOW)
        self.refused("replayed", v.redeem, token, ORIGIN, NOW)

    def test_otherKey(self) -> None:
        """
        A token MAC'd with another key (another TP, a guess) is refused as
        C{bad_signature}.
        """
        self.refused("bad_signature", verifier().redeem, mint(OTHER_KEY, ALICE, ORIGIN, NOW), ORIGIN, NOW)

    def test_everyByteIsSigned(self) -> None:
        """
        Flipping any bit of any byte of a token (header, audience,
        certificate or MAC) makes it refused.
        """
        raw = unb64(mint(KEY, ALICE, ORIGIN, NOW, 30))
        for i in range(len(raw)):
            for bit in (0x01, 0x80):
                tampered = raw[:i] + bytes([raw[i] ^ bit]) + raw[i + 1 :]
                e = self.assertRaises(TokenError, verifier().redeem, b64(tampered), ORIGIN, NOW)
                self.assertIn(e.reason, ("bad_signature", "malformed"), (i, bit))

    def test_truncated(self) -> None:
        """
        A token cut short anywhere, or with bytes added, is refused.
        """
        token = mint(KEY, ALICE, ORIGIN, NOW, 30)
        raw = unb64(token)
        for n in range(len(raw)):
            self.assertRaises(TokenError, verifier().redeem, b64(raw[:n]), ORIGIN, NOW)
        self.assertRaises(TokenError, verifier().redeem, b64(raw + b"\0"), ORIGIN, NOW)
        self.assertRaises(TokenError, verifier().redeem, token[:-1], ORIGIN, NOW)

    def test_malformed(self) -> None:
        """
        Empty, too short, not base64url, not ASCII or longer than
        L{MAX_TOKEN} characters: C{malformed}, before any MAC is computed.
        """
        token = mint(KEY, ALICE, ORIGIN, NOW)
        for text in ("", "A", "AAAA", "!!!!", "====", "not a token at all", "é" + token, token + "\u2028", "A" * (MAX_TOKEN + 1)):
            self.refused("malformed", read, [KEY], text)

    @FUZZ
    @given(st.text(max_size=300))
    def test_garbageText(self, text: str) -> None:
        """
        Any text is either a token or a L{TokenError}: nothing else is raised.
        """
        try:
            verifier().redeem(text, ORIGIN, NOW)
        except TokenError:
            pass
        else:
            self.fail(f"{text!r} was accepted")

    @FUZZ
    @given(st.binary(max_size=600))
    def test_garbageBytes(self, raw: bytes) -> None:
        """
        Random bytes, base64url-encoded, are refused with a L{TokenError};
        so are they with a valid MAC, as long as they do not parse.
        """
        self.assertRaises(TokenError, verifier().redeem, b64(raw), ORIGIN, NOW)
        try:
            read([KEY], signed(raw))
        except TokenError as e:
            self.assertEqual(e.reason, "malformed")

    def test_version(self) -> None:
        """
        A token of another version, even one with a valid MAC, is
        C{malformed}, and says which version it has.
        """
        e = self.refused("malformed", read, [KEY], signed(body(version=2)))
        self.assertIn("version 2", e.message)
        read([KEY], signed(body()))

    def test_audienceCutShort(self) -> None:
        """
        An audience length longer than what follows (with a valid MAC) is
        C{malformed}; so is a certificate that does not parse.
        """
        raw = body()
        self.refused("malformed", read, [KEY], signed(raw[:33] + b"\xff\xff" + raw[35:]))
        self.refused("malformed", read, [KEY], signed(raw[:-10]))
        self.refused("malformed", read, [KEY], signed(body(audience=b"\xff\xfe")))

    def test_lifetimeBounds(self) -> None:
        """
        A token lives more than 0 and at most 60 s.
        """
        self.assertEqual(MAX_LIFETIME, 60.0)
        for bad in (0, -1, 60.1, 3600):
            self.assertRaises(ValueError, mint, KEY, ALICE, ORIGIN, NOW, bad)
        _, issued, expires, _, _ = read([KEY], mint(KEY, ALICE, ORIGIN, NOW, 60))
        self.assertEqual(expires - issued, 60)
        _, issued, expires, _, _ = read([KEY], mint(KEY, ALICE, ORIGIN, NOW, 0.5))
        self.assertEqual(expires - issued, 0.5)

    def test_audienceBound(self) -> None:
        """
        An audience longer than 1024 bytes is not minted.
        """
        self.assertRaises(ValueError, mint, KEY, ALICE, "https://" + "a" * 1020, NOW)

    def test_busy(self) -> None:
        """
        With C{maxRedeemed} unexpired ids remembered, a new token is
        refused as C{busy} (forgetting one would let it be replayed), and
        is not used up by that; once the remembered ones expire they are
        pruned and new tokens redeem again.
        """
        v = verifier(maxRedeemed=3)
        early = [mint(KEY, ALICE, ORIGIN, NOW, 10) for _ in range(3)]
        for token in early:
            v.redeem(token, ORIGIN, NOW)
        late = mint(KEY, ALICE, ORIGIN, NOW + 5, 30)
        self.refused("busy", v.redeem, late, ORIGIN, NOW + 5)
        self.refused("replayed", v.redeem, early[0], ORIGIN, NOW + 5)
        self.assertEqual(len(v.redeemed), 3)
        v.redeem(late, ORIGIN, NOW + 10)
        self.assertEqual(list(v.redeemed.values()), [NOW + 35])

    def test_pruned(self) -> None:
        """
        Redeemed ids are forgotten once their tokens expired (a replay of
        one is then refused as C{expired}): memory does not grow with the
        number of tokens ever redeemed.
        """
        v = verifier()
        for i in range(100):
            v.redeem(mint(KEY, ALICE, ORIGIN, NOW + i, 30), ORIGIN, NOW + i)
        self.assertEqual(len(v.redeemed), 30)
        v.redeem(mint(KEY, ALICE, ORIGIN, NOW + 1000, 30), ORIGIN, NOW + 1000)
        self.assertEqual(len(v.redeemed), 1)


class _Key:
    """
    TP's private key as a reload changes it.
    """

    def __init__(self) -> None:
        self.key: Any = newKey()

    def __call__(self) -> Any:
        return self.key


def gate(origins: tuple[str, ...] = (), server: x509.Certificate = SERVER.cert, key: Any = None, lifetime: float = 30) -> Gate:
    return Gate(key or (lambda: SERVER.key), lambda: [server], origins, lifetime)


class GateTests(SynchronousTestCase):
    """
    L{Gate}: origins, minting, redeeming, key changes.
    """

    def test_mintRedeem(self) -> None:
        """
        A token minted for a page of an allowed origin redeems from that
        origin (in any case), once; the gate counts what it minted.
        """
        g = gate()
        token = g.mint(ALICE, "https://LocalHost:4433", NOW)
        self.assertEqual(g.minted, 1)
        grant = g.redeem(token, "https://localhost:4433", NOW + 1)
        self.assertEqual((grant.audience, grant.certificate), ("https://localhost:4433", ALICE))
        self.assertEqual(grant.expires - grant.issued, 30)
        e = self.assertRaises(TokenError, g.redeem, token, "https://LOCALHOST:4433", NOW + 2)
        self.assertEqual(e.reason, "replayed")

    def test_mintRefusals(self) -> None:
        """
        No C{Origin}, or one not allowed: no token, and the refusal is
        counted by reason.
        """
        g = gate()
        e = self.assertRaises(TokenError, g.mint, ALICE, None, NOW)
        self.assertEqual(e.reason, "no_origin")
        e = self.assertRaises(TokenError, g.mint, ALICE, "https://evil.example", NOW)
        self.assertEqual(e.reason, "origin_not_allowed")
        e = self.assertRaises(TokenError, g.mint, ALICE, "http://localhost", NOW)
        self.assertEqual(e.reason, "origin_not_allowed")
        self.assertEqual((g.minted, g.refused), (0, {"no_origin": 1, "origin_not_allowed": 2}))

    def test_redeemRefusals(self) -> None:
        """
        A CONNECT without an allowed origin is refused before its token is
        looked at; one without a token says where to get one.
        """
        g = gate()
        token = g.mint(ALICE, ORIGIN, NOW)
        for origin in (None, "https://evil.example", "null"):
            e = self.assertRaises(TokenError, g.redeem, token, origin, NOW)
            self.assertEqual(e.reason, "origin_not_allowed")
        for empty in (None, ""):
            e = self.assertRaises(TokenError, g.redeem, empty, ORIGIN, NOW)
            self.assertEqual(e.reason, "no_token")
            self.assertIn("/tp/token", e.message)
        # None of that used the token up.
        g.redeem(token, ORIGIN, NOW)

    def test_lifetime(self) -> None:
        """
        The gate mints tokens of its configured lifetime.
        """
        token = gate(lifetime=60).mint(ALICE, ORIGIN, NOW)
        _, issued, expires, _, _ = read([KEY], token)
        self.assertEqual(expires - issued, 60)

    def test_configuredOrigins(self) -> None:
        """
        With C{origins} configured (lowercase, as the config makes them),
        exactly those are allowed, in any case; nothing else, not even TP's
        own names.
        """
        g = gate(origins=("https://app.example.org", "https://tp.example.org:8443"))
        for ok in ("https://app.example.org", "HTTPS://APP.EXAMPLE.ORG", "https://tp.example.org:8443"):
            self.assertTrue(g.originAllowed(ok), ok)
        for no in (
            None,
            "https://app.example.org:443",
            "https://app.example.org/",
            "https://app.example.org.evil.example",
            "https://evil.app.example.org",
            "http://app.example.org",
            "https://tp.example.org",
            "https://localhost",
            "null",
            "",
        ):
            self.assertFalse(g.originAllowed(no), no)

    def test_defaultOrigins(self) -> None:
        """
        Without C{origins}, the https origins of the names on TP's own
        certificate are allowed (DNS and IP SANs, with or without a port):
        not http, not a path, not other hosts.
        """
        g = gate()
        for ok in (
            "https://localhost",
            "https://localhost:4433",
            "https://LOCALHOST:4433",
            "https://127.0.0.1",
            "https://127.0.0.1:8443",
            "https://[::1]",
            "https://[::1]:8443",
        ):
            self.assertTrue(g.originAllowed(ok), ok)
        for no in (
            "http://localhost",
            "http://localhost:4433",
            "https://localhost/",
            "https://localhost/tp",
            "https://localhost?x=1",
            "https://localhost#x",
            "https://user@localhost",
            "https://localhost:99999",
            "https://localhost.evil.example",
            "https://evil.example",
            "https://127.0.0.2",
            "https://[::2]",
            "wss://localhost",
            "localhost",
            "null",
            "",
        ):
            self.assertFalse(g.originAllowed(no), no)

    def test_commonNameOrigin(self) -> None:
        """
        A certificate's common name counts as one of its hosts (a
        certificate without SANs).
        """
        server = CA.issue("tp.example.org", server=True).cert
        self.assertEqual(certificateHosts(server), frozenset({"tp.example.org"}))
        g = gate(server=server)
        self.assertTrue(g.originAllowed("https://tp.example.org"))
        self.assertTrue(g.originAllowed("https://TP.example.org:4433"))
        self.assertFalse(g.originAllowed("https://localhost"))

    def test_certificateHosts(self) -> None:
        """
        L{certificateHosts}: CN, DNS and IP SANs, lowercase, without a
        trailing dot; L{originHost}: the host of an https origin only.
        """
        server = CA.issue("TP", dns=("TP.Example.org.", "b.example"), ips=("192.0.2.1", "2001:db8::1"), server=True).cert
        self.assertEqual(certificateHosts(server), frozenset({"tp", "tp.example.org", "b.example", "192.0.2.1", "2001:db8::1"}))
        self.assertEqual(originHost("https://[2001:DB8::1]:443"), "2001:db8::1")
        self.assertEqual(originHost("https://A.Example"), "a.example")
        self.assertIsNone(originHost("http://a.example"))
        self.assertIsNone(originHost("https://a.example/x"))

    def test_previousKey(self) -> None:
        """
        After TP's key changes (a reload, a renewal with a new key), a
        token minted with the previous one still redeems, and new tokens
        use the new key; after a second change the oldest is no longer
        accepted.
        """
        key = _Key()
        g = gate(key=key)
        before = g.mint(ALICE, ORIGIN, NOW)
        older = g.mint(ALICE, ORIGIN, NOW)
        key.key = newKey()
        after = g.mint(ALICE, ORIGIN, NOW)
        self.assertEqual(read([tokenKey(key.key)], after)[4], ALICE)
        self.assertRaises(TokenError, read, [tokenKey(key.key)], before)
        g.redeem(before, ORIGIN, NOW + 1)
        g.redeem(after, ORIGIN, NOW + 1)
        key.key = newKey()
        e = self.assertRaises(TokenError, g.redeem, older, ORIGIN, NOW + 2)
        self.assertEqual(e.reason, "bad_signature")

    def test_previousKeyAcrossReloads(self) -> None:
        """
        A reload reads TP's key file again: the same key, in a new object.
        That is no key change, so it must not push the previous key out: a
        token minted with the key before the last real change still redeems
        (within its lifetime).
        """
        key = _Key()
        g = gate(key=key)
        token = g.mint(ALICE, ORIGIN, NOW)
        key.key = newKey()  # a real change
        g.keys()
        # A reload of the same key file: an equal key, another object.
        key.key = load_der_private_key(key.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()), None)
        g.redeem(token, ORIGIN, NOW + 1)
