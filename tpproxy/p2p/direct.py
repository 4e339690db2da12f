# -*- test-case-name: tpproxy.test.test_p2p_direct -*-
"""
The direct QUIC connection of a P2P session (docs/p2p.md): after TP has
authorized a dial and introduced the dialer and the exposer to each other
(each one's certificate, as TP verified it, given to the other), the two
run ICE, then QUIC over the path ICE chose, with mutual TLS in which each
side accepts exactly the certificate TP vouched for in *this* session, and
still checks that it chains to TP's client CAs, is in its validity period
and is not denied or revoked.

  - The exposer is the QUIC server.  It presents its own TP client
    certificate, and requests the dialer's: L{PinnedVerifier} refuses, in
    the handshake, any certificate but the vouched one (another identity's,
    or the dialer's own from an earlier session: each session has its
    introduction, its pin, and accepts one connection, L{Introduction.use}).
  - The dialer is the QUIC client.  It presents its TP client certificate
    and checks the exposer's after the handshake, before it sends a byte
    (L{serverRefusal}): aioquic's client verification wants a server name
    on a server certificate, which a TP client certificate is not, so the
    check is TP's own, the same as the server's.

ALPN is C{tp-p2p/1}; the streams then carry what a relayed E2E tunnel
carries.  Nothing here touches a socket: the connections are aioquic's
sans-IO engines (L{tpproxy.transports.quic.TPQuicConnection}).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tpproxy.verify import X509_V_ERR_APPLICATION_VERIFICATION, ClientVerifier, Refusal

#: The ALPN of a direct P2P connection.
P2P_ALPN = "tp-p2p/1"


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


@dataclass
class Introduction:
    """
    What TP tells one side of a P2P session about the other.

    @ivar session: TP's id of the session (random, one dial).
    @ivar peerIdentity: the other side's identity, as TP read it.
    @ivar peerCertificate: the other side's certificate, as TP verified it
        on its connection to TP.
    @ivar used: whether a direct connection was accepted for it already.
    """

    session: str
    peerIdentity: str
    peerCertificate: x509.Certificate
    used: bool = field(default=False)

    def use(self) -> bool:
        """
        Take the session's one direct connection: C{False} if it was taken.
        """
        if self.used:
            return False
        self.used = True
        return True


class PinnedVerifier:
    """
    A certificate check that accepts only C{introduction.peerCertificate},
    byte for byte, which must also pass C{base} (TP's chain, time, deny
    list and CRL checks, as on TP's own listeners).
    """

    def __init__(self, introduction: Introduction, base: ClientVerifier) -> None:
        self.introduction = introduction
        self.base = base

    def check(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> Refusal | None:
        if _der(leaf) != _der(self.introduction.peerCertificate):
            return Refusal(
                f"not the certificate TP vouched for in P2P session {self.introduction.session} "
                f"(expected {self.introduction.peerIdentity}'s)",
                X509_V_ERR_APPLICATION_VERIFICATION,
            )
        return self.base.check(leaf, intermediates)


def _configuration(isClient: bool, chain: list[x509.Certificate], key: Any, idleTimeout: float) -> QuicConfiguration:
    config = QuicConfiguration(is_client=isClient, alpn_protocols=[P2P_ALPN], max_datagram_frame_size=65536, idle_timeout=idleTimeout)
    config.certificate = chain[0]
    config.certificate_chain = chain[1:]
    config.private_key = key
    if isClient:
        import ssl

        # The exposer's certificate is checked by serverRefusal, against
        # the pin: aioquic's own check needs a server name it cannot have.
        config.verify_mode = ssl.CERT_NONE
        config.server_name = "tp-p2p"
    return config


def exposerConnection(
    introduction: Introduction, firstDatagram: bytes, chain: list[x509.Certificate], key: Any, base: ClientVerifier, idleTimeout: float = 60.0
) -> Any:
    """
    The exposer's end (QUIC server) of a session's direct connection,
    presenting C{chain} and accepting only the dialer TP vouched for, made
    for the dialer's first datagram (feed it that datagram next).

    @raise ValueError: C{firstDatagram} is not a QUIC Initial.
    """
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    from tpproxy.transports.quic import TPQuicConnection

    config = _configuration(False, chain, key, idleTimeout)
    header = pull_quic_header(Buffer(data=firstDatagram), host_cid_length=config.connection_id_length)
    conn = TPQuicConnection(configuration=config, original_destination_connection_id=header.destination_cid)
    conn.tpVerifier = PinnedVerifier(introduction, base)
    return conn


def dialerConnection(chain: list[x509.Certificate], key: Any, idleTimeout: float = 60.0) -> Any:
    """
    The dialer's end (QUIC client) of a session's direct connection,
    presenting C{chain}; check the exposer with L{serverRefusal} once the
    handshake completes, before sending anything.
    """
    from tpproxy.transports.quic import TPQuicConnection

    return TPQuicConnection(configuration=_configuration(True, chain, key, idleTimeout))


def serverRefusal(conn: Any, introduction: Introduction, base: ClientVerifier) -> str | None:
    """
    The dialer's check of the exposer after the handshake: why its
    certificate is refused, or C{None}.
    """
    leaf = conn.tls._peer_certificate
    if leaf is None:
        return "the exposer presented no certificate"
    if conn.tls.alpn_negotiated != P2P_ALPN:
        return f"the peer does not speak {P2P_ALPN}"
    refused = PinnedVerifier(introduction, base).check(leaf, list(conn.tls._peer_certificate_chain))
    return None if refused is None else refused.reason


def newSessionId() -> str:
    """
    A P2P session id: 128 random bits, hex.
    """
    return os.urandom(16).hex()
