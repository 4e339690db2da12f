# -*- test-case-name: tpproxy.test.test_p2p_netns -*-
"""
The two TP clients of a P2P session (docs/p2p.md): C{tp connect --p2p}
(the dialer) and C{tp expose --e2e NAME --p2p} (the exposer).  Both need
Twisted's asyncio reactor (L{tpproxy.p2p.ice}); C{tp} installs it for
C{--p2p}.

The dialer gathers its ICE candidates (TP's own UDP port is its STUN
server), asks TP for the name with its offer, and then either:

  - gets an introduction: runs ICE and the pinned direct QUIC connection
    (L{tpproxy.p2p.ice.DirectDialer}) and carries the tunnel on a stream of
    it; if that does not complete within L{DIRECT_TIMEOUT}, dials again the
    usual way (C{auto}) or fails (C{only});
  - or gets an ordinary E2E answer (TP did not introduce): that tunnel is
    used as it is, with no extra round trip.

The exposer, told of a dialer with an offer, gathers its own candidates,
answers with an C{accept} carrying them, runs ICE (controlled), and serves
the dialer's streams from the local service (L{tpproxy.p2p.ice.DirectExposer}).
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography import x509
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from tpproxy.p2p.direct import Introduction
from tpproxy.protocols.client import tcpEndpoint
from tpproxy.protocols.relay import RelayEnd, splice
from tpproxy.verify import ClientCertChecker, ClientVerifier
from tpproxy.wire import ClientHello

#: Seconds ICE and the direct handshake get before the dial goes through TP.
DIRECT_TIMEOUT = 5.0


class DirectEnd(RelayEnd):
    """
    The dialer's end of a direct stream, spliced like a relayed tunnel.
    """

    rest = b""


@defer.inlineCallbacks
def stunServer(reactor: Any, settings: Any) -> Any:
    """
    TP's UDP port as the STUN server: TP's address (resolved) and port.
    """
    host = settings.server.connectHost
    address = yield reactor.resolve(host)
    return (address, settings.server.port)


def _verifier(reactor: Any, settings: Any) -> tuple[ClientVerifier, list[x509.Certificate], Any]:
    from tpproxy.pki import loadCertificates, loadKey

    cas = loadCertificates(settings.ca)
    chain, key = loadCertificates(settings.cert), loadKey(settings.key)
    return ClientVerifier(cas, ClientCertChecker(), reactor), chain, key


@defer.inlineCallbacks
def dial(reactor: Any, settings: Any, connector: Any, host: str, port: int, mode: str, say: Callable[[str], None]) -> Any:
    """
    A tunnel to C{host}:C{port}, directly if TP introduces us and the
    direct path works, else through TP (C{mode} C{auto}), or fail (C{only}).

    @return: a Deferred firing with C{(end, how)}: the end to splice (its
        C{rest} what came after its answer) and C{"p2p"} or C{"relayed"}.
    """
    from tpproxy.p2p.ice import DirectDialer, DirectRefused, IceAgent, IceError
    from tpproxy.protocols.client import TunnelError

    #: What ends a direct attempt (anything else is a bug, and raised).
    noDirectPath = (IceError, DirectRefused, defer.TimeoutError, ConnectionError, ValueError, KeyError)

    agent = None
    try:
        stun = yield stunServer(reactor, settings)
        agent = IceAgent(controlling=True, stunServer=stun, reactor=reactor)
        offer = yield agent.gather()
    except noDirectPath + (OSError,) as e:
        if agent is not None:
            agent.close()
        if mode == "only":
            raise TunnelError(f"no direct path to {host}: {e}") from None
        say(f"No direct path ({e}); going through TP")
        return (yield connector.open(ClientHello.connect(host, port))), "relayed"
    try:
        tunnel = yield connector.open(ClientHello("connect", host=host, port=port, p2p=offer))
    except Exception as e:
        agent.close()
        if mode == "only" or getattr(e, "code", None) != "not_accepted":
            raise
        say(f"No direct path ({getattr(e, 'message', e)}); going through TP")
        return (yield connector.open(ClientHello.connect(host, port))), "relayed"
    answer = tunnel.serverHello.info.get("p2p") if tunnel.serverHello is not None else None
    if answer is None:
        agent.close()
        if mode == "only":
            tunnel.transport.loseConnection()
            raise TunnelError(f"TP does not allow a direct path to {host} (the exposure rule or the exposer): --p2p only")
        return tunnel, "relayed"
    tunnel.transport.loseConnection()
    base, chain, key = _verifier(reactor, settings)
    try:
        certificate = x509.load_pem_x509_certificate(answer["certificate"].encode("ascii"))
        introduction = Introduction(answer["session"], answer["identity"], certificate)
        pair = yield agent.connect(answer, timeout=DIRECT_TIMEOUT)
        direct = DirectDialer(agent, introduction, chain, key, base)
        yield direct.connect(timeout=DIRECT_TIMEOUT)
    except noDirectPath as e:
        agent.close()
        if mode == "only":
            raise TunnelError(f"no direct path to {host}: {e}") from None
        say(f"No direct path ({e}); going through TP")
        return (yield connector.open(ClientHello("connect", host=host, port=port, p2pFailed=answer["session"]))), "relayed"
    end = DirectEnd()
    direct.openStream(end)
    end.transport.pauseProducing()
    end.direct = direct  # type: ignore[attr-defined]
    say(f"Direct path to {answer['identity']} ({pair.describe()})")
    return end, "p2p"


class _DirectStream(RelayEnd):
    """
    The exposer's side of a direct stream: connects the local service and
    splices.
    """

    def __init__(self, reactor: Any, local: tuple[str, int], say: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.local = local
        self.say = say
        self.pending = b""

    def connectionMade(self) -> None:
        from tpproxy.reverse.expose import LocalTarget

        self.transport.pauseProducing()  # type: ignore[union-attr]
        target = connectProtocol(tcpEndpoint(self.reactor, self.local[0], self.local[1], 10), LocalTarget())
        target.addCallbacks(self._joined, self._failed)

    def preSpliceData(self, data: bytes) -> None:
        self.pending += data

    def _joined(self, local: Any) -> None:
        pending, local.pending = local.pending, b""
        splice(self, local, fromA=self.pending, fromB=pending)
        self.pending = b""
        self.transport.resumeProducing()  # type: ignore[union-attr]
        local.transport.resumeProducing()

    def _failed(self, reason: Failure) -> None:
        self.say(f"Direct stream: cannot reach {self.local[0]}:{self.local[1]}: {reason.getErrorMessage()}")
        self.transport.loseConnection()  # type: ignore[union-attr]


@defer.inlineCallbacks
def answerIntroduction(
    reactor: Any, settings: Any, accept: Callable[[ClientHello], Any], local: tuple[str, int], session: str, identity: str | None, offer: dict[str, Any], say: Callable[[str], None]
) -> Any:
    """
    The exposer's side of an introduction: gather, answer TP with an
    C{accept} carrying the offer, run ICE (controlled) and serve the
    dialer's streams from C{local} over the pinned direct connection.

    @param accept: opens an accept connection for a hello; fires with its
        end once TP answered.
    """
    from tpproxy.p2p.ice import DirectExposer, IceAgent

    stun = yield stunServer(reactor, settings)
    agent = IceAgent(controlling=False, stunServer=stun, reactor=reactor)
    try:
        mine = yield agent.gather()
        end = yield accept(ClientHello("accept", session=session, p2p=mine))
        end.transport.loseConnection()
        certificate = x509.load_pem_x509_certificate(offer["certificate"].encode("ascii"))
        introduction = Introduction(session, identity or "?", certificate)
        pair = yield agent.connect(offer, timeout=DIRECT_TIMEOUT)
        base, chain, key = _verifier(reactor, settings)
        factory = Factory.forProtocol(lambda: _DirectStream(reactor, local, say))
        exposer = DirectExposer(agent, introduction, chain, key, base, factory)
        yield exposer.start(timeout=DIRECT_TIMEOUT)
    except Exception as e:  # noqa: BLE001 -- any failure ends this introduction only, and is said
        agent.close()
        say(f"Direct connection from {identity} failed: {e}")
        return None
    say(f"Direct connection from {identity} ({pair.describe()})")
    return exposer
