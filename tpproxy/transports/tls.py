# -*- test-case-name: tpproxy.test.test_halfclose,tpproxy.test.test_privates -*-
"""
The TLS transport TP runs on both ends, and the client's TLS options.

Twisted's L{TLSMemoryBIOProtocol} answers a peer's C{close_notify} with its
own and closes the connection, so a client that has finished sending (an
upload ending in EOF, C{nc -N}, C{ssh host cmd < file}) would lose the
reply.  L{HalfCloseTLSProtocol} instead reports a received C{close_notify}
as C{readConnectionLost} to an L{IHalfCloseableProtocol} and offers
C{loseWriteConnection}, which sends C{close_notify} and keeps reading.

That takes overriding private methods of Twisted's L{BufferingTLSTransport}.
Each private name TP overrides or reads is listed (L{_twistedPrivates}) and
checked when this module is imported (L{requireTwistedPrivates}): with a
Twisted where one is missing, renamed, or no longer called where TP relies
on it, the import fails with a message naming it, instead of TP running
without half-close (docs/private-apis.md).  The same check
(L{tpproxy.privates}) guards aioquic's in L{tpproxy.transports.quic}.

The server's side of the handshake (contexts, SNI, ALPN, the client
certificate check) is L{tpproxy.transports.servertls}.
"""

from __future__ import annotations

from typing import Any

from aioquic.tls import AlertDescription
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IHalfCloseableProtocol, IOpenSSLClientConnectionCreator
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.pki import Recent
from tpproxy.privates import PrivateAPIError, PrivateName, privateProblems
from tpproxy.wire import ALPN

#: Application bytes gathered from the TLS layer before one dataReceived.
#: OpenSSL returns at most one record (16 KiB) per read; handing the
#: application larger chunks saves a write call downstream per record.
RECEIVE_CHUNK = 2**18


def _twistedPrivates() -> tuple[PrivateName, ...]:
    B = BufferingTLSTransport
    return (
        PrivateName(B, "_flushReceiveBIO", (), ("dataReceived", "connectionLost"), "overridden: a received close_notify is readConnectionLost; else the connection closes"),
        PrivateName(B, "_checkHandshakeStatus", (), ("dataReceived", "makeConnection"), "overridden: the half-open place is given back at the handshake; else only at the end"),
        PrivateName(B, "_unbufferPendingWrites", (), ("dataReceived",), "overridden: a close_notify waiting for buffered writes goes out"),
        PrivateName(B, "_write", ("bytes",), ("write", "_unbufferPendingWrites"), "overridden: writes after loseWriteConnection are dropped"),
        PrivateName(B, "_flushSendBIO", (), ("_tlsShutdownFinished",), "called: sends what OpenSSL wrote"),
        PrivateName(B, "_shutdownTLS", (), ("loseConnection",), "called: finishes the TLS shutdown"),
        PrivateName(B, "_tlsShutdownFinished", ("reason",), ("_flushReceiveBIO",), "called: ends the connection"),
        PrivateName(B, "_tlsConnection", None, ("makeConnection",), "read: the pyOpenSSL connection"),
        PrivateName(B, "_appSendBuffer", None, ("makeConnection", "_bufferedWrite"), "read: writes waiting for the handshake"),
        PrivateName(B, "_handshakeDone", None, ("_checkHandshakeStatus",), "read: whether the handshake is over"),
        PrivateName(B, "_lostTLSConnection", None, ("_tlsShutdownFinished",), "read: whether TLS has ended"),
        PrivateName(B, "_aborted", None, ("abortConnection",), "read: whether the connection was aborted"),
        PrivateName(B, "_aggregator", None, ("__init__", "loseConnection"), "read: flushed before close_notify"),
    )


def requireTwistedPrivates() -> None:
    """
    Check the private names of Twisted's TLS transport that
    L{HalfCloseTLSProtocol} overrides or reads; raise L{PrivateAPIError}
    naming what is wrong.
    """
    problems = privateProblems(_twistedPrivates())
    if problems:
        import twisted

        raise PrivateAPIError(
            f"TP cannot run its TLS transport on Twisted {twisted.__version__}: " + "; ".join(problems) + " (docs/private-apis.md)"
        )


try:
    requireTwistedPrivates()
except PrivateAPIError as e:  # pragma: no cover - depends on Twisted's release
    raise ImportError(str(e)) from e


class HalfCloseTLSProtocol(BufferingTLSTransport):
    """
    A TLS transport that supports half-close in both directions.
    """

    _readEOF = False
    _writeEOF = False
    _writeEOFPending = False

    def _flushReceiveBIO(self) -> None:
        if self._readEOF:
            self._flushSendBIO()
            return
        chunks: list[bytes] = []
        size = 0
        eof = False
        while not self._lostTLSConnection:
            try:
                data = self._tlsConnection.recv(2**16)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                eof = True
                break
            except SSL.Error:
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(Failure())
                break
            else:
                chunks.append(data)
                size += len(data)
                if size >= RECEIVE_CHUNK:
                    self._deliver(chunks)
                    chunks = []
                    size = 0
        self._deliver(chunks)
        if eof:
            self._peerClosedWrite()
        self._flushSendBIO()

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted and not self._lostTLSConnection:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.wrappedProtocol.dataReceived(data)

    def _peerClosedWrite(self) -> None:
        self._readEOF = True
        if self._writeEOF or self.disconnecting or not IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            # Both directions are done (or the application cannot use a
            # half-open connection): finish the TLS shutdown and close.
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        else:
            self.wrappedProtocol.readConnectionLost()

    def loseWriteConnection(self) -> None:
        """
        Send TLS C{close_notify}: the peer reads EOF, and this side can go on
        reading until the peer does the same.
        """
        if self._writeEOF or self.disconnecting or not self.connected:
            return
        self._aggregator.flush()
        self._writeEOF = True
        if self._appSendBuffer or not self._handshakeDone:
            self._writeEOFPending = True
            return
        self._sendCloseNotify()

    def _sendCloseNotify(self) -> None:
        self._writeEOFPending = False
        try:
            bothDone = self._tlsConnection.shutdown()
        except SSL.Error:
            bothDone = False
        self._flushSendBIO()
        if bothDone or self._readEOF:
            self._tlsShutdownFinished(None)

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone:
            # Half-open no more (tpproxy.limits.HalfOpenGate).
            place = getattr(self, "tpHalfOpen", None)
            if place is not None:
                place.release()
        if self._writeEOFPending and self._handshakeDone and not self._appSendBuffer and not self._lostTLSConnection:
            self._sendCloseNotify()

    def _unbufferPendingWrites(self) -> None:
        super()._unbufferPendingWrites()
        if self._writeEOFPending and not self._appSendBuffer and self._handshakeDone:
            self._sendCloseNotify()

    def _write(self, bytes: bytes) -> None:
        if self._writeEOF and not self._writeEOFPending:
            return
        super()._write(bytes)


class TLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{HalfCloseTLSProtocol}s.
    """

    protocol = HalfCloseTLSProtocol


#: How many server certificates a client remembers as checked against its
#: server name.
CHECKED_NAMES = 64


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLSCreator:
    """
    Twisted's client TLS options (L{ssl.optionsForClientTLS}: SNI, the
    chain checked by OpenSSL, then the server's name checked by
    service_identity), but the name check is remembered per certificate:
    TP's client meets the same server certificate on every tunnel, and
    taking its names apart again was 7 % of C{tp up}'s CPU per connection
    (issue 17, measured).  The chain is still verified by OpenSSL on every
    handshake; only the pure function "does this certificate name this
    server" is remembered.
    """

    def __init__(self, options: ssl.CertificateOptions, hostname: str, alpn: bytes = ALPN) -> None:
        from service_identity.hazmat import DNS_ID, IPAddress_ID
        from twisted.internet.abstract import isIPAddress, isIPv6Address

        self.options = options
        self.hostname = hostname
        self.alpn = alpn
        literal = isIPAddress(hostname) or isIPv6Address(hostname)
        self.serverName = None if literal else hostname.encode("idna")
        self.serviceID = IPAddress_ID(hostname) if literal else DNS_ID(hostname)
        #: DER of the server certificates checked lately against the name.
        self.checked = Recent(CHECKED_NAMES)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.options.getContext())
        connection.set_alpn_protos([self.alpn])
        if self.serverName is not None:
            connection.set_tlsext_host_name(self.serverName)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol: Any) -> Any:
        protocol = [tlsProtocol]

        def verify(connection: SSL.Connection, cert: crypto.X509, error: int, depth: int, ok: int) -> bool:
            if not ok or depth != 0:
                return bool(ok)
            # The leaf, last: no reference to the protocol is kept after.
            tls = protocol.pop()
            try:
                der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
                if self.checked.recall(der):
                    return True
                from service_identity import CertificateError, VerificationError

                try:
                    self._check(cert)
                except (VerificationError, CertificateError):
                    # CertificateError: a name service_identity cannot
                    # read (an IP address as a DNS name): refused too.
                    tls.failVerification(Failure())
                    return False
                self.checked.remember(der, True)
                return True
            except BaseException:
                # Never raise out of an OpenSSL callback (the error would
                # be lost): log it, and refuse.
                from twisted.logger import Logger

                Logger().failure("while verifying the server certificate")
                return False

        return verify

    def _check(self, cert: crypto.X509) -> None:
        """
        service_identity's check of C{cert} against the server's name.
        """
        from service_identity.hazmat import verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        verify_service_identity(extract_patterns(cert), [self.serviceID], [])


def clientTLS(
    serverName: str, caCerts: list[x509.Certificate], chain: list[x509.Certificate], key: object, alpn: bytes = ALPN, tls13: bool = True
) -> ClientTLSCreator:
    """
    Client options: TLS 1.3 (unless C{tls13} is false), ALPN C{alpn}
    (C{tp/1}), the server certificate checked against C{caCerts} and
    C{serverName} (service_identity), and our client certificate.
    """
    trust = ssl.trustRootFromCertificates([ssl.Certificate(crypto.X509.from_cryptography(c)) for c in caCerts])
    keyPEM = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    certPEM = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[:1])
    client = ssl.PrivateCertificate.loadPEM(certPEM + keyPEM)
    extra = [crypto.X509.from_cryptography(c) for c in chain[1:]]
    options = ssl.CertificateOptions(
        privateKey=client.privateKey.original,
        certificate=client.original,
        trustRoot=trust,
        acceptableProtocols=[alpn],
        extraCertChain=extra,
        **({"raiseMinimumTo": ssl.TLSVersion.TLSv1_3} if tls13 else {}),
    )
    return ClientTLSCreator(options, serverName, alpn)


def receivedAlert(reason: object) -> int | None:
    """
    The TLS alert the peer sent, if C{reason} (a Failure or its value) is
    OpenSSL's error for a received alert (C{"tls alert certificate
    revoked"}, C{"tlsv1 alert unknown ca"}, ...); else L{None}.
    """
    value = getattr(reason, "value", reason)
    if not (isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list)):
        return None
    for item in value.args[0]:
        if isinstance(item, tuple) and len(item) == 3:
            head, sep, tail = str(item[2]).partition("alert ")
            if sep and head.strip() in ("ssl", "sslv3", "tls", "tlsv1", "tlsv13"):
                member = AlertDescription.__members__.get(tail.strip().replace(" ", "_"))
                if member is not None:
                    return int(member)
    return None


def describeTLSFailure(reason: object) -> str:
    """
    Turn an OpenSSL error (as a Failure's value) into one readable line.
    """
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = []
        for item in value.args[0]:
            if isinstance(item, tuple) and len(item) == 3:
                parts.append(str(item[2]))
        if parts:
            return "TLS error: " + "; ".join(parts)
    return str(value) or value.__class__.__name__
