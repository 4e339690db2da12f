# -*- test-case-name: tpproxy.test.test_verdicts -*-
"""
One verdict on a client certificate, for TLS and QUIC alike.

Both transports run the same verifier: OpenSSL's C{X509_verify_cert} on a
store made by L{clientStore} (the client CAs, purpose C{sslclient}, the
default flags), followed by the same TP checks on the leaf (L{leafRefusal}:
no CA certificate as a client, the CRLs, the deny list).  On TLS, OpenSSL
runs it inside the handshake and calls L{verifyCallback} for each
certificate; on QUIC, L{ClientVerifier} runs it with
C{X509StoreContext} at the listener's clock.  A refusal is a L{Refusal}:
the reason for the log, and the C{X509_V_ERR_*} code from which OpenSSL
picks the TLS alert (L{alertFor} applies the same table on QUIC).

pyOpenSSL's own verify-callback wrapper returns 0 without setting an error
when the callback refuses, so OpenSSL sends C{internal_error}.  TP installs
its own callback, with pyOpenSSL's private C{_lib}/C{_ffi} bindings, that
sets the error code of its refusal on the store context; the names it uses
are checked when this module is imported (L{_checkBindings}) and TP refuses
to start without them (docs/decisions.md).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable

from aioquic import tls as quictls
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from tpproxy.pki import certificateOf, identityOf, normalizeSerial, serialHex

log = Logger(namespace="tpproxy.verify")

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError as e:  # pragma: no cover - depends on pyOpenSSL's layout
    raise ImportError(f"TP needs pyOpenSSL's private _util bindings to report certificate refusals: {e}") from e

#: The private names TP uses; all must exist (checked at import).
_REQUIRED_LIB = (
    "SSL_CTX_set_verify",
    "SSL_set_verify",
    "X509_STORE_CTX_get_current_cert",
    "X509_STORE_CTX_get_error",
    "X509_STORE_CTX_get_error_depth",
    "X509_STORE_CTX_set_error",
    "X509_STORE_CTX_get_ex_data",
    "SSL_get_ex_data_X509_STORE_CTX_idx",
    "X509_STORE_set_purpose",
    "X509_PURPOSE_SSL_CLIENT",
    "X509_up_ref",
)


def _checkBindings() -> None:
    missing = [name for name in _REQUIRED_LIB if not hasattr(_lib, name)]
    if not hasattr(SSL.Connection, "_reverse_mapping"):
        missing.append("SSL.Connection._reverse_mapping")
    if not hasattr(crypto.X509, "_from_raw_x509_ptr"):
        missing.append("crypto.X509._from_raw_x509_ptr")
    if not hasattr(crypto.X509Store(), "_store"):
        missing.append("crypto.X509Store._store")
    context = SSL.Context(SSL.TLS_METHOD)
    if not hasattr(context, "_context"):
        missing.append("SSL.Context._context")
    if not hasattr(SSL.Connection(context, None), "_ssl"):
        missing.append("SSL.Connection._ssl")
    if missing:
        raise ImportError("TP cannot verify client certificates with this pyOpenSSL: missing " + ", ".join(missing))


_checkBindings()

# OpenSSL X509_V_ERR_* codes TP reports or explains.
X509_V_ERR_UNSPECIFIED = 1
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_CERT_REVOKED = 23
X509_V_ERR_CERT_REJECTED = 28
X509_V_ERR_APPLICATION_VERIFICATION = 50

_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unknown issuer (not signed by a trusted client CA)",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded (an intermediate CA the issuing CA may not have)",
    26: "certificate not allowed for client authentication (extended key usage)",
    28: "certificate rejected",
    66: "the certificate's key is too weak (TP requires at least RSA-2048 or P-256)",
    67: "a CA key in the chain is too weak",
    68: "a signature in the chain uses too weak a digest",
}


def verifyErrorText(errnum: int) -> str:
    """
    A readable line for OpenSSL's C{X509_V_ERR_*} code C{errnum}.
    """
    return _VERIFY_ERRORS.get(errnum, f"certificate verification error {errnum}")


# OpenSSL's ssl_x509err2alert, for the codes a client certificate can get
# (checked against OpenSSL by test_verdicts, which compares the alert of
# each refusal over TLS and QUIC).
_UNKNOWN_CA = frozenset({2, 3, 18, 19, 20, 21, 22, 25, 33, 79})
_BAD_CERTIFICATE = frozenset({4, 5, 6, 9, 11, 13, 14, 15, 16, 27, 28, *range(62, 69), 94})


def alertFor(code: int) -> quictls.AlertDescription:
    """
    The TLS alert OpenSSL sends for a verification failure with
    C{X509_V_ERR_*} code C{code}; QUIC sends the same.
    """
    A = quictls.AlertDescription
    if code in _UNKNOWN_CA:
        return A.unknown_ca
    if code in _BAD_CERTIFICATE:
        return A.bad_certificate
    if code in (10, 12):
        return A.certificate_expired
    if code == 23:
        return A.certificate_revoked
    if code == 26:
        return A.unsupported_certificate
    if code in (7, 8):
        return A.decrypt_error
    if code == 50:
        return A.handshake_failure
    if code in (1, 17, 69, 70):
        return A.internal_error
    return A.certificate_unknown


@dataclass(frozen=True)
class Refusal:
    """
    Why a client certificate is refused.

    @ivar reason: one line for the log and the audit event.
    @ivar code: the C{X509_V_ERR_*} code reported to OpenSSL, which picks
        the TLS alert from it (L{alertFor}).
    """

    reason: str
    code: int

    @property
    def alert(self) -> quictls.AlertDescription:
        return alertFor(self.code)


def chainRefusal(code: int) -> Refusal:
    """
    The refusal for OpenSSL's chain verification error C{code}, worded the
    same on both transports.
    """
    return Refusal(f"certificate not accepted: {verifyErrorText(code)}", code)


class ClientCertChecker:
    """
    The checks TP adds to the CA chain check for a client certificate: the
    deny list of identities and serials, and the CRLs.  Shared by every
    transport that takes client certificates.
    """

    def __init__(
        self,
        deniedIdentities: frozenset[str] = frozenset(),
        deniedSerials: frozenset[str] = frozenset(),
        crls: tuple[x509.CertificateRevocationList, ...] = (),
    ) -> None:
        self.deniedIdentities = deniedIdentities
        self.deniedSerials = frozenset(normalizeSerial(s) for s in deniedSerials)
        self._revoked: dict[bytes, frozenset[int]] = {}
        for crl in crls:
            key = crl.issuer.public_bytes()
            serials = frozenset(r.serial_number for r in crl)
            self._revoked[key] = self._revoked.get(key, frozenset()) | serials

    def check(self, cert: x509.Certificate) -> Refusal | None:
        """
        Return why C{cert} (whose chain is already verified) is refused, or
        L{None} if it is acceptable.  A deny-listed certificate gets the
        code of a revoked one: the deny list is TP's own revocation, and no
        OpenSSL error code leads to the C{access_denied} alert.
        """
        if cert.serial_number in self._revoked.get(cert.issuer.public_bytes(), frozenset()):
            return Refusal(f"certificate serial {serialHex(cert.serial_number)} is revoked (CRL)", X509_V_ERR_CERT_REVOKED)
        serial = serialHex(cert.serial_number)
        if serial in self.deniedSerials:
            return Refusal(f"certificate serial {serial} is on the deny list", X509_V_ERR_CERT_REVOKED)
        try:
            identity = identityOf(cert)
        except ValueError as e:
            return Refusal(str(e), X509_V_ERR_CERT_REJECTED)
        if identity.name in self.deniedIdentities:
            return Refusal(f"identity {identity.name} is on the deny list", X509_V_ERR_CERT_REVOKED)
        return None

    def refusal(self, cert: x509.Certificate) -> str | None:
        """
        The reason of L{check}, or L{None}.
        """
        refused = self.check(cert)
        return None if refused is None else refused.reason


def leafRefusal(checker: ClientCertChecker, leaf: x509.Certificate) -> Refusal | None:
    """
    TP's checks of a client certificate whose chain OpenSSL has verified:
    it must not be a CA certificate (docs/identity.md, "CA certificates as
    client certificates"), then the CRLs and deny list of C{checker}.
    """
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        return Refusal("a CA certificate (basic constraints CA:TRUE) cannot be a client certificate", X509_V_ERR_CERT_REJECTED)
    return checker.check(leaf)


def clientStore(cas: list[x509.Certificate], store: crypto.X509Store | None = None) -> crypto.X509Store:
    """
    Configure C{store} (a new one if L{None}) as the one store TP verifies
    client certificates with: the client CAs, the C{sslclient} purpose
    (what OpenSSL's TLS server sets too), OpenSSL's default flags.
    """
    if store is None:
        store = crypto.X509Store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    if _lib.X509_STORE_set_purpose(store._store, _lib.X509_PURPOSE_SSL_CLIENT) != 1:
        raise RuntimeError("OpenSSL refused to set the sslclient purpose on the client CA store")
    return store


#: The security bits OpenSSL's TLS server requires of every key and
#: signature in a client's chain: its default security level 2 (TP sets no
#: other).  C{X509StoreContext} has no security level, so L{ClientVerifier}
#: applies the same rule itself (L{securityRefusal}); test_verdicts checks
#: that an RSA-1024 leaf gets the same verdict on both transports.
SECURITY_BITS = 112

X509_V_ERR_EE_KEY_TOO_SMALL = 66
X509_V_ERR_CA_KEY_TOO_SMALL = 67
X509_V_ERR_CA_MD_TOO_WEAK = 68

_HASH_BITS = {"md5": 39, "sha1": 63, "sha224": 112, "sha256": 128, "sha384": 192, "sha512": 256, "sha3-224": 112, "sha3-256": 128, "sha3-384": 192, "sha3-512": 256}


def _keyBits(key: Any) -> int:
    """
    OpenSSL's security bits of a public key (C{EVP_PKEY_get_security_bits}).
    """
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

    if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)):
        size = key.key_size
        for bits, security in ((15360, 256), (7680, 192), (3072, 128), (2048, 112), (1024, 80)):
            if size >= bits:
                return security
        return 0
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.curve.key_size // 2
    if isinstance(key, ed25519.Ed25519PublicKey):
        return 128
    if isinstance(key, ed448.Ed448PublicKey):
        return 224
    return 0


def securityRefusal(chain: list[x509.Certificate]) -> Refusal | None:
    """
    OpenSSL's security-level checks of a verified C{chain} (leaf first,
    trust anchor last): every key, and every signature but the anchor's
    own, must have L{SECURITY_BITS}.
    """
    for depth, cert in enumerate(chain):
        if _keyBits(cert.public_key()) < SECURITY_BITS:
            code = X509_V_ERR_EE_KEY_TOO_SMALL if depth == 0 else X509_V_ERR_CA_KEY_TOO_SMALL
            return Refusal(f"certificate not accepted: {verifyErrorText(code)}", code)
    for cert in chain[:-1]:
        algorithm = cert.signature_hash_algorithm
        if algorithm is not None and _HASH_BITS.get(algorithm.name, 0) < SECURITY_BITS:
            return Refusal(f"certificate not accepted: {verifyErrorText(X509_V_ERR_CA_MD_TOO_WEAK)}", X509_V_ERR_CA_MD_TOO_WEAK)
    return None


class ClientVerifier:
    """
    The client-certificate check of TP's QUIC listener: the same OpenSSL
    verification as the TLS listener (L{clientStore}, at the time of
    C{clock}), OpenSSL's security level (L{securityRefusal}), then
    L{leafRefusal}.
    """

    def __init__(self, cas: list[x509.Certificate], checker: ClientCertChecker, clock: IReactorTime) -> None:
        self.cas = list(cas)
        self.checker = checker
        self.clock = clock

    def check(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> Refusal | None:
        """
        Verify C{leaf}, sent with C{intermediates}; return the refusal or
        L{None}.
        """
        # A store per check: OpenSSL keeps the first time set on a store's
        # parameters (a later set_time did not move it back; ClockTests).
        store = clientStore(self.cas)
        store.set_time(datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc).replace(tzinfo=None))
        context = crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(leaf), [crypto.X509.from_cryptography(c) for c in intermediates]
        )
        try:
            verified = context.get_verified_chain()
        except crypto.X509StoreContextError as e:
            code = e.errors[0] if e.errors and isinstance(e.errors[0], int) else X509_V_ERR_UNSPECIFIED
            return chainRefusal(code)
        weak = securityRefusal([certificateOf(c) for c in verified])
        if weak is not None:
            return weak
        return leafRefusal(self.checker, leaf)

    def refusal(self, leaf: x509.Certificate, chain: list[x509.Certificate]) -> str | None:
        """
        The reason of L{check}, or L{None}.
        """
        refused = self.check(leaf, chain)
        return None if refused is None else refused.reason


class AlertRefused(quictls.Alert):
    """
    aioquic's alert for a refused client certificate, carrying the alert
    description of the L{Refusal} (the one TLS would send).
    """

    def __init__(self, refusal: Refusal) -> None:
        # aioquic sends this text as the CONNECTION_CLOSE reason: the
        # peer learns what a TLS peer learns from the alert, no more (the
        # detailed reason is logged, as on TLS).
        super().__init__(HUMAN_REASONS.get(refusal.alert, "the client certificate is not accepted"))
        self.description = refusal.alert
        self.refusal = refusal


#: A decision on the leaf of a TLS connection whose chain verified:
#: C{decide(connection, leaf)}.
Decide = Callable[[SSL.Connection, x509.Certificate], "Refusal | None"]

VERIFY_MODE = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE


def _record(conn: SSL.Connection, reason: str) -> None:
    proto = conn.get_app_data()
    if proto is not None and getattr(proto, "tpRefusal", None) is None:
        proto.tpRefusal = reason


def verifyCallback(decide: Decide) -> Any:
    """
    An OpenSSL verify callback (a cffi callback: keep a reference as long
    as a context or connection uses it) that keeps OpenSSL's chain verdict,
    asks C{decide} about the leaf, and on a refusal sets its code on the
    store context, so that OpenSSL sends the matching alert.  The reason is
    recorded as C{tpRefusal} on the connection's app data.
    """

    def callback(ok: int, storeContext: Any) -> int:
        try:
            depth = _lib.X509_STORE_CTX_get_error_depth(storeContext)
            ssl = _lib.X509_STORE_CTX_get_ex_data(storeContext, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
            conn = SSL.Connection._reverse_mapping[ssl]
            if not ok:
                _record(conn, chainRefusal(_lib.X509_STORE_CTX_get_error(storeContext)).reason)
                return 0
            if depth != 0:
                return 1
            raw = _lib.X509_STORE_CTX_get_current_cert(storeContext)
            _lib.X509_up_ref(raw)
            leaf = certificateOf(crypto.X509._from_raw_x509_ptr(raw))
            refused = decide(conn, leaf)
            if refused is None:
                return 1
            _record(conn, refused.reason)
            _lib.X509_STORE_CTX_set_error(storeContext, refused.code)
            return 0
        except BaseException:
            log.failure("Client certificate check failed")
            _lib.X509_STORE_CTX_set_error(storeContext, X509_V_ERR_UNSPECIFIED)
            return 0

    return _ffi.callback("int (*)(int, X509_STORE_CTX *)", callback)


def setContextVerify(context: SSL.Context, callback: Any) -> None:
    """
    Require a client certificate on C{context}, checked by C{callback}
    (from L{verifyCallback}), which the context keeps alive.
    """
    context.set_verify(VERIFY_MODE, None)
    context.tpVerifyCallback = callback  # type: ignore[attr-defined]
    _lib.SSL_CTX_set_verify(context._context, VERIFY_MODE, callback)


def setConnectionVerify(conn: SSL.Connection, callback: Any) -> None:
    """
    Check C{conn}'s client certificate with C{callback} (after an SNI
    switch of context, which keeps the verify callback of the first),
    kept alive by the connection.
    """
    conn.tpVerifyCallback = callback  # type: ignore[attr-defined]
    _lib.SSL_set_verify(conn._ssl, VERIFY_MODE, callback)


#: Why TP refused, for each alert TP sends about a client certificate: the
#: end of the one line C{tp} prints (docs/client.md), after "TP refused the
#: TLS connection: " (or QUIC).
HUMAN_REASONS: dict[quictls.AlertDescription, str] = {
    quictls.AlertDescription.certificate_required: "client certificate required, and none was sent (check cert and key in the client config)",
    quictls.AlertDescription.certificate_revoked: "the client certificate is revoked or on TP's deny list",
    quictls.AlertDescription.certificate_expired: "the client certificate has expired",
    quictls.AlertDescription.unknown_ca: "the client certificate is not from a CA that TP trusts, or its chain is incomplete or not allowed",
    quictls.AlertDescription.bad_certificate: "the client certificate is not valid yet, is a CA certificate, or names no identity",
    quictls.AlertDescription.unsupported_certificate: "the client certificate is not for client authentication (extended key usage)",
    quictls.AlertDescription.decrypt_error: "a signature in the client certificate's chain does not verify",
    quictls.AlertDescription.handshake_failure: "this client certificate may not dial that name (or there are no common TLS parameters)",
    quictls.AlertDescription.access_denied: "this client certificate is denied access",
    quictls.AlertDescription.certificate_unknown: "the client certificate is not accepted",
    quictls.AlertDescription.internal_error: "TP failed while checking the client certificate (see TP's log)",
}


def humanReason(alert: int, transport: str = "TLS", name: str | None = None) -> str | None:
    """
    The line for the TLS alert C{alert} TP sent on C{transport} (C{"TLS"},
    C{"QUIC"}, or C{"E2E TLS"} for the inner handshake with the E2E name
    C{name}), or L{None} for an alert that is not about the client
    certificate.
    """
    try:
        why = HUMAN_REASONS.get(quictls.AlertDescription(alert))
    except ValueError:
        return None
    if why is None:
        return None
    to = f" to {name}" if name else ""
    return f"TP refused the {transport} connection{to}: {why}"


_selfChecked = False


def refusedHandshake(code: int) -> str:
    """
    Run an in-memory TLS 1.3 handshake whose client certificate TP's
    verify callback refuses with C{X509_V_ERR_*} code C{code}; return the
    error text the client got (OpenSSL names the alert it received).
    """
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.create("TP self-check CA", days=1)
    server, client = ca.issue("localhost", dns=("localhost",), server=True), ca.issue("self-check", client=True)
    serverContext = SSL.Context(SSL.TLS_METHOD)
    serverContext.set_min_proto_version(SSL.TLS1_3_VERSION)
    serverContext.use_certificate(crypto.X509.from_cryptography(server.cert))
    serverContext.use_privatekey(crypto.PKey.from_cryptography_key(server.key))
    clientStore([ca.cert], serverContext.get_cert_store())
    setContextVerify(serverContext, verifyCallback(lambda conn, leaf: Refusal("self-check", code)))
    clientContext = SSL.Context(SSL.TLS_METHOD)
    clientContext.use_certificate(crypto.X509.from_cryptography(client.cert))
    clientContext.use_privatekey(crypto.PKey.from_cryptography_key(client.key))
    serverConn, clientConn = SSL.Connection(serverContext, None), SSL.Connection(clientContext, None)
    serverConn.set_accept_state()
    clientConn.set_connect_state()
    received = ""
    for _ in range(8):
        for a, b in ((clientConn, serverConn), (serverConn, clientConn)):
            try:
                a.do_handshake()
                if a is clientConn:
                    a.recv(1)
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                if a is clientConn:
                    received = received or str(e)
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return received


def selfCheck() -> None:
    """
    Prove, once per process, that a refusal reaches the peer as its alert:
    an in-memory handshake refused as revoked (L{refusedHandshake}) must
    end with C{certificate_revoked} at the client.  Raise L{RuntimeError}
    otherwise (TP then refuses to start): the private bindings behave
    differently in this pyOpenSSL or OpenSSL.
    """
    global _selfChecked
    if _selfChecked:
        return
    received = refusedHandshake(X509_V_ERR_CERT_REVOKED)
    if "certificate revoked" not in received:
        raise RuntimeError(f"TP cannot report client-certificate refusals with this pyOpenSSL/OpenSSL (self-check got {received!r})")
    _selfChecked = True
