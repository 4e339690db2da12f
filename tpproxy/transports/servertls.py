# -*- test-case-name: tpproxy.test.test_server -*-
"""
The server side of TP's mutual TLS: one OpenSSL context per listener and
per E2E name, chosen by SNI; ALPN C{tp/1} and ACME's tls-alpn-01; the
client certificate decided during the handshake by
L{tpproxy.verify.leafRefusal}, the same verdict as on QUIC.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from tpproxy.names import normalize
from tpproxy.pki import identityOf
from tpproxy.verify import (
    X509_V_ERR_APPLICATION_VERIFICATION,
    ClientCertChecker,
    Refusal,
    clientStore,
    leafRefusal,
    selfCheck,
    setConnectionVerify,
    setContextVerify,
    verifyCallback,
)
from tpproxy.wire import ALPN

#: RFC 8737: the ALPN protocol of ACME tls-alpn-01 validation.
ACME_TLS_ALPN = b"acme-tls/1"

log = Logger()


def _certificateNames(cert: x509.Certificate) -> frozenset[str]:
    names = {str(a.value).lower() for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.update(normalize(n) for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    return frozenset(names)


def _serverContext(chain: list[x509.Certificate], key: object, clientCAs: list[x509.Certificate], verify: Any) -> SSL.Context:
    """
    A TLS 1.3 server context that requires a client certificate from
    C{clientCAs}, with no session tickets, cache or renegotiation.
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    assert store is not None
    clientStore(clientCAs, store)
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in clientCAs])
    setContextVerify(ctx, verify)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Free the ~34 KiB of record buffers of an idle connection: most
    # tunnels are idle most of the time (docs/hardening.md).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server side of TP's mutual TLS: TLS 1.3 only, a client certificate
    required and verified during the handshake against the client CAs and
    the L{ClientCertChecker}, ALPN C{tp/1}, no session tickets or session
    cache (every connection proves its certificate anew).

    E2E exposure names get contexts of their own (L{addName}), chosen by
    SNI; their verification also asks whether the identity may dial the
    name.
    """

    def __init__(
        self,
        chain: list[x509.Certificate],
        key: object,
        clientCAs: list[x509.Certificate],
        checker: ClientCertChecker,
        alpn: tuple[bytes, ...] = (ALPN,),
    ) -> None:
        selfCheck()  # fail closed: refusals must reach the peer as alerts
        self.checker = checker
        self.clientCAs = clientCAs
        self.names: dict[str, SSL.Context] = {}
        self.innerNames: dict[str, SSL.Context] = {}
        self.nameVerify: dict[str, Any] = {}
        #: Each E2E name's chain and key, to rebuild its contexts when the
        #: client CAs change (L{reconfigure}).
        self._nameCertificates: dict[str, tuple[list[x509.Certificate], object]] = {}
        self.offered = tuple(alpn)
        #: tls-alpn-01 (RFC 8737) certificates by name, while a challenge
        #: is pending; see L{tpproxy.acme.responders.TLSALPN01Responder}.
        self.challengeCertificates: dict[str, tuple[x509.Certificate, Any]] = {}
        #: The OpenSSL verify callback of TP's own names (kept alive here
        #: and by each context).
        self._verifyCallback = verifyCallback(self._decide)
        self.setCertificate(chain, key)

    def _context(self, chain: list[x509.Certificate], key: object, verify: Any, role: str) -> SSL.Context:
        """
        A server context of one of three roles:
          - C{"listener"}: TP's own names; SNI may switch to an E2E name's
            context, ALPN C{tp/1}, tls-alpn-01 answered;
          - C{"name"}: an E2E name chosen by SNI on the listener; only
            tls-alpn-01 (its renewal) in ALPN.  (After a HelloRetryRequest
            OpenSSL runs the listener's SNI callback again; context, dialer
            check and C{tpSNIName} then change together, so that is safe.)
          - C{"inner"}: an E2E name inside a TP tunnel (L{NameTLS}): no SNI
            switch and no ALPN at all, so the name the tunnel was opened
            for is the only one whose certificate and dialer check apply,
            and no handshake without a client certificate can complete.
        """
        ctx = _serverContext(chain, key, self.clientCAs, verify)
        if role == "inner":
            return ctx
        offered = self.offered if role == "listener" else ()

        def selectALPN(conn: SSL.Connection, protos: list[bytes]) -> bytes | object:
            return self._selectALPN(conn, protos, offered)

        ctx.set_alpn_select_callback(selectALPN)
        if role == "listener":
            ctx.set_tlsext_servername_callback(self._selectName)
        return ctx

    def _selectALPN(self, conn: SSL.Connection, protos: list[bytes], offered: tuple[bytes, ...]) -> bytes | object:
        proto = conn.get_app_data()
        if protos == [ACME_TLS_ALPN]:
            # RFC 8737: a validator offers acme-tls/1 alone.  OpenSSL picks
            # the certificate after this callback, so the challenge
            # certificate set here is the one sent; the validator has no
            # client certificate, and the TP protocol closes such a
            # connection without serving anything (server.py).
            raw = conn.get_servername()
            name = normalize(raw.decode("ascii", "replace")) if raw else ""
            pair = self.challengeCertificates.get(name)
            if pair is None:
                return SSL.NO_OVERLAPPING_PROTOCOLS
            conn.use_certificate(pair[0])
            conn.use_privatekey(pair[1])
            conn.set_verify(SSL.VERIFY_NONE, None)
            if proto is not None:
                proto.tpACMEChallenge = name
            return ACME_TLS_ALPN
        if proto is not None:
            # pyOpenSSL cannot fail the handshake on no overlap; the
            # TP protocol refuses such a peer after it (see server.py).
            proto.tpALPNOffered = list(protos)
        for p in offered:
            if p in protos:
                return p
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def setCertificate(self, chain: list[x509.Certificate], key: object) -> None:
        """
        Serve TP's own names with C{chain} from now on: connections made
        before keep the context they started with.
        """
        self.context = self._context(chain, key, self._verifyCallback, "listener")
        self.ownNames = _certificateNames(chain[0])
        self.chain = chain
        self.key = key

    def _decide(self, conn: SSL.Connection, leaf: x509.Certificate) -> Refusal | None:
        """
        TP's checks of a client certificate whose chain OpenSSL verified
        (L{tpproxy.verify.leafRefusal}, the same as on QUIC).
        """
        return leafRefusal(self.checker, leaf)

    def _selectName(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if raw:
            name = normalize(raw.decode("ascii", "replace"))
            ctx = self.names.get(name)
            if ctx is not None:
                conn.set_context(ctx)
                # SSL_set_SSL_CTX swaps the certificate but keeps the verify
                # callback the connection started with: set the name's own,
                # which also asks whether the identity may dial the name.
                setConnectionVerify(conn, self.nameVerify[name])
                proto = conn.get_app_data()
                if proto is not None:
                    proto.tpSNIName = name

    def addName(self, name: str, chain: list[x509.Certificate], key: object, mayDial: Any) -> None:
        """
        Serve C{name} (an E2E exposure) with C{chain}: a client must present
        a certificate that passes the usual checks and for whose identity
        C{mayDial(identity)} allows.
        """

        def decide(conn: SSL.Connection, leaf: x509.Certificate) -> Refusal | None:
            refused = leafRefusal(self.checker, leaf)
            if refused is not None:
                return refused
            decision = mayDial(identityOf(leaf).name)
            if not decision.allowed:
                # OpenSSL sends handshake_failure for this code: no
                # X509_V_ERR_* code leads to access_denied.
                return Refusal(f"not allowed to dial {name}: {decision.reason}", X509_V_ERR_APPLICATION_VERIFICATION)
            return None

        verify = verifyCallback(decide)
        self.names[name] = self._context(chain, key, verify, "name")
        self.innerNames[name] = self._context(chain, key, verify, "inner")
        self.nameVerify[name] = verify
        self._nameCertificates[name] = (chain, key)

    def replaceName(self, name: str, chain: list[x509.Certificate], key: object) -> bool:
        """
        Serve the E2E name C{name}, if served now, with a renewed C{chain}
        from now on, with the same checks of dialers.

        @return: whether C{name} was served.
        """
        verify = self.nameVerify.get(name)
        if verify is None:
            return False
        self.names[name] = self._context(chain, key, verify, "name")
        self.innerNames[name] = self._context(chain, key, verify, "inner")
        self._nameCertificates[name] = (chain, key)
        return True

    @property
    def expiry(self) -> dict[str, float]:
        """
        When each served certificate expires (Unix time): C{"tp"} for TP's
        own, else the E2E name (for the metrics and C{/status}).
        """
        served = {"tp": self.chain, **{name: chain for name, (chain, _) in self._nameCertificates.items()}}
        return {name: chain[0].not_valid_after_utc.timestamp() for name, chain in served.items()}

    def reconfigure(
        self, clientCAs: list[x509.Certificate], checker: ClientCertChecker, chain: list[x509.Certificate] | None = None, key: object = None
    ) -> None:
        """
        A reload: verify client certificates against C{clientCAs} and
        C{checker} (deny lists, CRLs) from now on, and serve C{chain} if
        given.  Every context is rebuilt, since a context holds its CA
        store; connections made before keep theirs.
        """
        self.checker = checker
        self.clientCAs = clientCAs
        if chain is None:
            chain, key = self.chain, self.key
        self.setCertificate(chain, key)
        for name, (nameChain, nameKey) in self._nameCertificates.items():
            verify = self.nameVerify[name]
            self.names[name] = self._context(nameChain, nameKey, verify, "name")
            self.innerNames[name] = self._context(nameChain, nameKey, verify, "inner")

    def removeName(self, name: str) -> None:
        self.names.pop(name, None)
        self.innerNames.pop(name, None)
        self.nameVerify.pop(name, None)
        self._nameCertificates.pop(name, None)

    def servesOwnName(self, name: str) -> bool:
        """
        Is C{name} one of the names of TP's own certificate?  Such a name
        can never be an exposure: it would capture TP's own clients.
        """
        if name in self.ownNames:
            return True
        parent = name.split(".", 1)[1] if "." in name else ""
        return f"*.{parent}" in self.ownNames

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        return conn


@implementer(IOpenSSLServerConnectionCreator)
class NameTLS:
    """
    Server connections for one E2E name, for the TLS handshake that runs
    inside a TP tunnel.
    """

    def __init__(self, serverTLS: ServerTLS, name: str) -> None:
        self.context = serverTLS.innerNames[name]

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tlsProtocol)
        return conn
