# -*- test-case-name: tpproxy.test.test_p2p_ice -*-
"""
The direct path of a P2P session (docs/p2p.md), for Twisted code: ICE
(aioice) finds a UDP path between the dialer and the exposer, then the
pinned QUIC connection of L{tpproxy.p2p.direct} runs over it, driven as TP
drives every QUIC connection (L{tpproxy.transports.quic.QuicSession}, its
streams L{QuicStreamTransport}s).

  - L{IceAgent}: C{gather()} gives this side's offer (ICE credentials and
    candidates, for TP to relay), C{connect(remoteOffer, timeout)} runs
    the checks and fires with the L{SelectedPair}.
  - L{DirectDialer}: the QUIC client over a connected agent.  It checks
    the exposer against its introduction (L{serverRefusal}) before it
    sends anything, and is ready once the exposer confirmed the handshake
    (it accepted our certificate); then C{openStream(protocol)}.
  - L{DirectExposer}: the QUIC server over a connected agent, pinned to the
    dialer of its introduction, one connection per introduction; each
    stream the dialer opens goes to a protocol from its factory.

B{The reactor must be Twisted's asyncio reactor}: aioice is asyncio code,
and runs here on the reactor's own event loop.  Install it before anything
imports C{twisted.internet.reactor} (the C{tp} client does so for
C{--p2p}; a test child does it on its first lines, L{tpproxy.test.p2pagent})::

    from twisted.internet import asyncioreactor
    asyncioreactor.install()

With any other reactor, L{IceAgent} raises L{NotAsyncioReactor}.

aioice never offers loopback addresses (127.0.0.1, ::1) as candidates:
two agents on one machine meet on its other addresses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable

from aioice import Candidate, Connection
from aioice.ice import validate_password, validate_username
from aioquic.buffer import BufferReadError
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tpproxy.p2p.direct import Introduction, dialerConnection, exposerConnection, serverRefusal
from tpproxy.privates import PrivateAPIError, PrivateName, privateProblems
from tpproxy.transports.quic import CLOSE_REFUSED, STREAM_ABORTED, QuicSession, QuicStreamTransport, requireQuicPrivates
from tpproxy.verify import ClientVerifier
from tpproxy.wire import MAX_CANDIDATES

log = Logger()

#: At most this many candidates are taken from a remote offer.
#: The most candidates of an offer is what TP relays (tpproxy.wire.MAX_CANDIDATES).
#: The longest candidate line taken from a remote offer.
MAX_CANDIDATE_LENGTH = 256


class NotAsyncioReactor(RuntimeError):
    """
    The running reactor is not Twisted's asyncio reactor, which aioice needs.
    """


class IceError(ConnectionError):
    """
    ICE did not find a path (failed, timed out, or the remote offer was bad).
    """


class DirectRefused(ConnectionError):
    """
    The direct QUIC connection was refused: by the exposer's pin (we are not
    the dialer TP introduced), by ours (it is not the exposer TP introduced),
    or it did not complete in time.
    """


def _privates() -> tuple[PrivateName, ...]:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    return (
        PrivateName(AsyncioSelectorReactor, "_asyncioEventloop", None, ("__init__",), "the reactor's event loop, which aioice runs on"),
        PrivateName(Connection, "_nominated", None, ("__init__", "sendto"), "the selected pair: its candidate types and addresses"),
        PrivateName(
            QuicConnection,
            "_handshake_confirmed",
            None,
            ("__init__", "_confirm_handshake"),
            "the dialer is ready once the exposer confirmed the handshake (it accepted the dialer's certificate)",
        ),
    )


_checked = False


def _requirePrivates() -> None:
    global _checked
    if not _checked:
        problems = privateProblems(_privates())
        if problems:
            raise PrivateAPIError("TP cannot run P2P with this aioice/aioquic: " + "; ".join(problems))
        _checked = True


def asyncioLoop(reactor: IReactorTime) -> asyncio.AbstractEventLoop:
    """
    The asyncio event loop that C{reactor} runs on.

    @raise NotAsyncioReactor: C{reactor} is not Twisted's asyncio reactor.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    loop = getattr(reactor, "_asyncioEventloop", None)
    if not isinstance(reactor, AsyncioSelectorReactor) or loop is None:
        raise NotAsyncioReactor(
            f"P2P runs aioice, which needs Twisted's asyncio reactor, not {type(reactor).__name__}: "
            "call twisted.internet.asyncioreactor.install() before anything imports twisted.internet.reactor"
        )
    return loop


@dataclass(frozen=True)
class SelectedPair:
    """
    The candidate pair ICE selected.

    @ivar localType: the type of our candidate: C{host}, or C{relay}
        (aioice sends from the host socket for a server-reflexive path, so
        whether the peer saw us through a NAT is in I{its} C{remoteType}).
    @ivar remoteType: the peer's candidate: C{host}, C{srflx}, C{relay},
        or C{prflx} (an address learned from the checks themselves).
    @ivar seconds: how long C{connect} took.
    """

    local: tuple[str, int]
    localType: str
    remote: tuple[str, int]
    remoteType: str
    seconds: float

    def describe(self) -> str:
        return f"{self.localType} {self.local[0]}:{self.local[1]} -> {self.remoteType} {self.remote[0]}:{self.remote[1]}"


def _parseOffer(offer: Any) -> tuple[str, str, list[Candidate]]:
    """
    The credentials and candidates of a remote offer (from the network, via
    TP): checked, bounded.

    @raise IceError: it is not a well-formed offer.
    """
    try:
        ufrag, pwd, lines = offer["ufrag"], offer["pwd"], offer["candidates"]
        if not isinstance(ufrag, str) or not isinstance(pwd, str) or not isinstance(lines, list):
            raise ValueError("ufrag, pwd and candidates must be two strings and a list")
        validate_username(ufrag)
        validate_password(pwd)
        if len(lines) > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} candidates")
        candidates = []
        for line in lines:
            if not isinstance(line, str) or len(line) > MAX_CANDIDATE_LENGTH:
                raise ValueError(f"a candidate is not a string of at most {MAX_CANDIDATE_LENGTH} characters")
            candidate = Candidate.from_sdp(line)
            if candidate.transport.lower() != "udp":
                continue
            candidates.append(candidate)
    except (KeyError, TypeError, ValueError) as e:
        raise IceError(f"bad remote ICE offer: {e}") from None
    return ufrag, pwd, candidates


def _describe(candidates: list[Candidate]) -> str:
    return ", ".join(f"{c.type} {c.host}:{c.port}" for c in candidates) or "none"


class IceAgent:
    """
    One side's ICE agent for one P2P session, on the reactor's asyncio loop.

    @param controlling: C{True} for the dialer (it nominates the pair).
    @param stunServer: C{(host, port)} of a STUN server (TP's UDP port) for
        a server-reflexive candidate, or C{None} (host candidates only).
    @param useIPv6: offer IPv6 host candidates too.
    """

    selected: SelectedPair | None = None
    _closed: Deferred[None] | None = None

    def __init__(
        self, controlling: bool, stunServer: tuple[str, int] | None = None, reactor: IReactorTime | None = None, useIPv6: bool = True
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        assert reactor is not None
        self.reactor = reactor
        self.loop = asyncioLoop(reactor)
        _requirePrivates()
        self.connection = Connection(ice_controlling=controlling, stun_server=stunServer, use_ipv6=useIPv6)

    def _run(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromFuture(asyncio.ensure_future(coroutine, loop=self.loop))

    def gather(self) -> Deferred[dict[str, Any]]:
        """
        Gather this side's candidates: fires with the offer to send to the
        peer, C{{"ufrag", "pwd", "candidates": [SDP candidate lines]}}.
        Fails with L{IceError} if there is no candidate at all.
        """

        def offer(_: None) -> dict[str, Any]:
            c = self.connection
            if not c.local_candidates:
                raise IceError("no local ICE candidate (aioice skips loopback addresses; no other address, and no STUN answer)")
            # What TP relays is bounded: server-reflexive candidates first
            # (the ones that cross NATs), then host ones, at most MAX_CANDIDATES.
            ordered = sorted(c.local_candidates, key=lambda x: x.type != "srflx")[:MAX_CANDIDATES]
            return {"ufrag": c.local_username, "pwd": c.local_password, "candidates": [x.to_sdp() for x in ordered]}

        return self._run(self.connection.gather_candidates()).addCallback(offer)

    def connect(self, remoteOffer: dict[str, Any], timeout: float = 5.0) -> Deferred[SelectedPair]:
        """
        Run ICE with the peer's offer (after L{gather}): fires with the
        L{SelectedPair}, or fails with L{IceError} (no pair worked, or
        none within C{timeout} seconds; the agent is closed then).
        """
        try:
            ufrag, pwd, candidates = _parseOffer(remoteOffer)
        except IceError as e:
            self.close()
            return fail(e)
        c = self.connection
        c.remote_username, c.remote_password = ufrag, pwd
        started = self.reactor.seconds()

        async def run() -> None:
            for candidate in candidates:
                await c.add_remote_candidate(candidate)
            await c.add_remote_candidate(None)
            await c.connect()

        def selected(_: None) -> SelectedPair:
            pair = c._nominated[1]
            self.selected = SelectedPair(
                local=pair.local_addr,
                localType=pair.local_candidate.type,
                remote=pair.remote_addr,
                remoteType=pair.remote_candidate.type,
                seconds=self.reactor.seconds() - started,
            )
            log.info("ICE selected {pair} in {seconds:.3f} s", pair=self.selected.describe(), seconds=self.selected.seconds)
            return self.selected

        def failed(reason: Failure) -> Failure:
            local = _describe(c.local_candidates)
            if reason.check(DeferredTimeout):
                error = IceError(f"ICE found no path within {timeout:g} s (local candidates: {local}; remote: {_describe(candidates)})")
            else:
                error = IceError(f"ICE failed: {reason.getErrorMessage()} (local candidates: {local}; remote: {_describe(candidates)})")
            self.close()
            return Failure(error)

        def timedOut(result: Any, seconds: float) -> Failure:
            # The asyncio task was cancelled: its CancelledError is not
            # Twisted's, which addTimeout would turn into a TimeoutError.
            return Failure(DeferredTimeout(seconds, "ICE"))

        d = self._run(run())
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=timedOut)  # type: ignore[arg-type]
        return d.addCallbacks(selected, failed)

    def send(self, data: bytes) -> None:
        """
        Send one datagram on the selected pair.  aioice's C{send} completes
        without suspending (it ends in the UDP transport's C{sendto}), so
        its coroutine is run to its end right here: no task and no Deferred
        per datagram (measured: 12 % of the dialer's time went to those).
        """
        coroutine = self.connection.send(data)
        try:
            coroutine.send(None)
        except StopIteration:
            return
        except ConnectionError as e:
            self._sendFailed(Failure(e))
            return
        # It suspended after all (a later aioice): not sent, and said.
        coroutine.close()
        self._sendFailed(Failure(RuntimeError("aioice's send suspended: the datagram was not sent")))

    def _sendFailed(self, reason: Failure) -> None:
        if self._closed is None:
            log.debug("ICE send failed: {error}", error=reason.getErrorMessage())

    def receive(self, deliver: Callable[[bytes], None]) -> Deferred[None]:
        """
        Give each datagram received on the selected pair to C{deliver},
        until the agent closes (L{close}, or consent lost): the returned
        Deferred fires then.
        """
        c = self.connection

        def received(data: bytes, component: int) -> None:
            # aioice's protocols hand each datagram of the pair to this;
            # delivered at once instead of through its queue and a task
            # switch per datagram.  The queue still carries the end (None).
            try:
                deliver(data)
            except Exception:
                log.failure("while handling a datagram on the direct path")

        c.data_received = received  # type: ignore[method-assign]

        async def loop() -> None:
            while True:
                try:
                    data = await c.recv()
                except ConnectionError:
                    return
                try:
                    deliver(data)
                except Exception:
                    log.failure("while handling a datagram on the direct path")

        return self._run(loop())

    def close(self) -> Deferred[None]:
        """
        Close the agent's sockets; fires when done.
        """
        if self._closed is None:
            self._closed = self._run(self.connection.close())
        closed: Deferred[None] = Deferred()
        self._closed.addBoth(lambda result: closed.callback(None) or result)
        return closed


def _address(addr: tuple[str, int]) -> IPv4Address | IPv6Address:
    return IPv6Address("UDP", addr[0], addr[1]) if ":" in addr[0] else IPv4Address("UDP", addr[0], addr[1])


class _DirectSession(QuicSession):
    """
    A QUIC connection over an ICE agent's selected pair: datagrams go out
    with the agent's C{send}, and come in from its receive loop.
    """

    def __init__(self, conn: Any, agent: IceAgent, clock: IReactorTime, owner: _DirectEnd) -> None:
        assert agent.selected is not None
        super().__init__(conn, lambda data, addr: agent.send(data), clock, agent.selected.remote)
        self.localAddress = _address(agent.selected.local)
        self.owner = owner

    def process(self, transmit: bool = True) -> None:
        super().process(transmit=False)
        self.owner.processed(self)
        if transmit:
            self.transmit()

    def handshakeCompleted(self, event: events.HandshakeCompleted) -> None:
        self.owner.handshakeCompleted(self)

    def newStream(self, streamId: int) -> QuicStreamTransport | None:
        stream = self.owner.newStream(self, streamId)
        if stream is None:
            self.conn.stop_stream(streamId, STREAM_ABORTED)
        return stream

    def terminated(self, event: events.ConnectionTerminated) -> None:
        super().terminated(event)
        self.abandon()
        self.owner.terminated(self, event)


class _DirectEnd:
    """
    What the dialer and the exposer share: the agent, the session, C{ready}
    and C{done}.

    @ivar ready: fires with this object once the direct connection can carry
        streams, or fails with L{DirectRefused}.
    @ivar done: fires with the reason the connection ended.
    @ivar refusal: why the connection was refused, if it was.
    """

    session: _DirectSession | None = None
    refusal: str | None = None
    _deadline: Any = None

    def __init__(self, agent: IceAgent, introduction: Introduction, chain: list[x509.Certificate], key: Any, base: ClientVerifier, idleTimeout: float) -> None:
        if agent.selected is None:
            raise IceError("the ICE agent is not connected")
        # The pin is a hook on aioquic's handshake, and close() waits on its
        # streams: TP's checks of aioquic's private names run first.
        requireQuicPrivates()
        self.agent = agent
        self.clock = agent.reactor
        self.introduction = introduction
        self.chain, self.key, self.base = chain, key, base
        self.idleTimeout = idleTimeout
        self.ready: Deferred[Any] = Deferred()
        self.done: Deferred[str] = Deferred()

    def _start(self, timeout: float) -> Deferred[Any]:
        self.agent.receive(self.datagramReceived).addBoth(self._iceEnded)
        self._deadline = self.clock.callLater(timeout, self._expired, timeout)
        return self.ready

    def _expired(self, timeout: float) -> None:
        self._refuse(f"no direct QUIC connection within {timeout:g} s")

    def _refuse(self, reason: str, close: bool = True) -> None:
        if self.refusal is None:
            self.refusal = reason
        if not self.ready.called:
            self.ready.errback(DirectRefused(reason))
        if close and self.session is not None:
            self.session.close(CLOSE_REFUSED, reason[:100])
        elif self.session is None:
            self._end(reason)

    def _ready(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if not self.ready.called:
            self.ready.callback(self)

    def _iceEnded(self, result: Any) -> None:
        session = self.session
        if session is not None and not session.closed:
            session.terminated(events.ConnectionTerminated(error_code=0, frame_type=None, reason_phrase="the ICE path closed"))
        elif session is None:
            self._refuse("the ICE path closed")

    def _end(self, reason: str) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if not self.done.called:
            self.done.callback(reason)
        self.agent.close()

    # From the session.

    def datagramReceived(self, data: bytes) -> None:
        assert self.session is not None
        self.session.datagramReceived(data, self.agent.selected.remote)  # type: ignore[union-attr]

    def processed(self, session: _DirectSession) -> None:
        """
        The session has handled its events.
        """

    def handshakeCompleted(self, session: _DirectSession) -> None:
        pass

    def newStream(self, session: _DirectSession, streamId: int) -> QuicStreamTransport | None:
        return None

    def terminated(self, session: _DirectSession, event: events.ConnectionTerminated) -> None:
        reason = event.reason_phrase or f"error {event.error_code:#x}"
        if not self.ready.called:
            self._refuse(self.refusal or self._refusedBecause(session, reason), close=False)
        self._end(self.refusal or reason)

    def _refusedBecause(self, session: _DirectSession, reason: str) -> str:
        return reason

    def close(self, reason: str = "", grace: float = 2.0) -> None:
        """
        Close the direct connection, and then the ICE agent, once what was
        written on its streams is acknowledged (data and FIN, or reset),
        or after C{grace} seconds (L{QuicSession.closeWhenDelivered}):
        closing at once would drop the tail of what the peer has not
        acknowledged yet.
        """
        session = self.session
        if session is None:
            self._refuse(reason or "closed")
        elif not session.closed:
            session.closeWhenDelivered(reason, grace)


class DirectDialer(_DirectEnd):
    """
    The dialer's end of the direct path: a QUIC client (ALPN tp-p2p/1)
    presenting C{chain}/C{key}, over a connected L{IceAgent}, that accepts
    only the exposer of C{introduction} (still checked by C{base}: chain,
    time, deny list, CRLs).
    """

    def __init__(
        self, agent: IceAgent, introduction: Introduction, chain: list[x509.Certificate], key: Any, base: ClientVerifier, idleTimeout: float = 60.0
    ) -> None:
        super().__init__(agent, introduction, chain, key, base, idleTimeout)
        self.checked = False

    def connect(self, timeout: float = 5.0) -> Deferred[DirectDialer]:
        """
        Start the QUIC handshake: fires with this dialer once the exposer is
        checked and has accepted us, or fails with L{DirectRefused}.
        """
        conn = dialerConnection(self.chain, self.key, self.idleTimeout)
        self.session = _DirectSession(conn, self.agent, self.clock, self)
        conn.connect(self.agent.selected.remote, now=self.clock.seconds())  # type: ignore[union-attr]
        self.session.transmit()
        return self._start(timeout)

    def handshakeCompleted(self, session: _DirectSession) -> None:
        # Before anything of ours is sent: this is the exposer TP introduced.
        refused = serverRefusal(session.conn, self.introduction, self.base)
        if refused is not None:
            log.info("P2P session {session}: refused the exposer: {reason}", session=self.introduction.session, reason=refused)
            self._refuse(f"not the exposer TP introduced: {refused}")
            return
        self.checked = True

    def processed(self, session: _DirectSession) -> None:
        # Ready once the exposer confirmed the handshake (HANDSHAKE_DONE):
        # it accepted our certificate.
        if self.checked and not self.ready.called and session.conn._handshake_confirmed:
            self._ready()
        super().processed(session)

    def _refusedBecause(self, session: _DirectSession, reason: str) -> str:
        return f"the exposer refused the direct connection: {reason}"

    def openStream(self, protocol: Any) -> QuicStreamTransport:
        """
        Open a stream to the exposer carrying C{protocol} (once L{connect}
        has fired).
        """
        if not self.ready.called or self.refusal is not None or self.session is None:
            raise DirectRefused("the direct connection is not ready")
        return self.session.openStream(protocol)


class DirectExposer(_DirectEnd):
    """
    The exposer's end of the direct path: a QUIC server (ALPN tp-p2p/1)
    presenting C{chain}/C{key}, over a connected L{IceAgent}, that accepts
    only the dialer of C{introduction} (and takes the introduction's one
    connection, L{Introduction.use}); each stream the dialer opens is given
    to a protocol from C{factory}.
    """

    #: QUIC connections that may be the dialer's, at once, before one
    #: passes the pin: what reaches the exposer's end of the path first (a
    #: spoofed Initial, another identity's handshake) cannot take the place
    #: of the vouched dialer, which the deadline alone ends.
    MAX_HANDSHAKES = 4
    #: The connection id the accepted connection was made for.
    original = b""

    def __init__(
        self,
        agent: IceAgent,
        introduction: Introduction,
        chain: list[x509.Certificate],
        key: Any,
        base: ClientVerifier,
        factory: IProtocolFactory,
        idleTimeout: float = 60.0,
    ) -> None:
        super().__init__(agent, introduction, chain, key, base, idleTimeout)
        self.factory = factory
        self.accepted = False
        #: Connections not (yet) accepted, each with the connection ids
        #: that route to it.
        self.candidates: list[tuple[_DirectSession, bytes]] = []
        #: Why the last candidate was refused (for the deadline's message).
        self.lastRefusal: str | None = None

    def start(self, timeout: float = 5.0) -> Deferred[DirectExposer]:
        """
        Wait for the dialer's QUIC connection: fires with this exposer once
        the dialer's certificate passed the pin, or fails with
        L{DirectRefused} when no connection did within C{timeout} seconds
        (connections with other certificates are refused one by one
        meanwhile, and do not end the wait).
        """
        return self._start(timeout)

    def _expired(self, timeout: float) -> None:
        refused = f" (refused: {self.lastRefusal})" if self.lastRefusal else ""
        self._refuse(f"no direct QUIC connection from {self.introduction.peerIdentity} within {timeout:g} s{refused}")

    def _refuse(self, reason: str, close: bool = True) -> None:
        for session, _ in self.candidates:
            session.close(CLOSE_REFUSED, reason[:100])
            session.abandon()
        self.candidates = []
        super()._refuse(reason, close)

    @staticmethod
    def _routes(session: _DirectSession, original: bytes, cid: bytes) -> bool:
        # aioquic's _host_cids: checked with TP's other aioquic privates.
        return cid == original or any(c.cid == cid for c in session.conn._host_cids)

    def datagramReceived(self, data: bytes) -> None:
        from aioquic.buffer import Buffer
        from aioquic.quic.packet import QuicPacketType, pull_quic_header

        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except (ValueError, BufferReadError):
            return
        cid = header.destination_cid
        if self.session is not None:
            if self._routes(self.session, self.original, cid):
                self.session.datagramReceived(data, self.agent.selected.remote)  # type: ignore[union-attr]
            return
        for session, original in self.candidates:
            if self._routes(session, original, cid):
                session.datagramReceived(data, self.agent.selected.remote)  # type: ignore[union-attr]
                return
        if self.refusal is not None or header.packet_type != QuicPacketType.INITIAL:
            return
        if len(self.candidates) >= self.MAX_HANDSHAKES:
            # The oldest makes room: Initials from anyone on the path must
            # not hold every place until the deadline while the vouched
            # dialer retransmits its own.
            oldest, _ = self.candidates.pop(0)
            oldest.close(CLOSE_REFUSED, "too many handshakes")
            oldest.abandon()
            log.debug("P2P session {session}: {n} handshakes open, the oldest dropped", session=self.introduction.session, n=self.MAX_HANDSHAKES)
        try:
            conn = exposerConnection(self.introduction, data, self.chain, self.key, self.base, self.idleTimeout)
        except (ValueError, BufferReadError):
            log.debug("P2P session {session}: not a QUIC Initial, dropped", session=self.introduction.session)
            return
        session = _DirectSession(conn, self.agent, self.clock, self)
        self.candidates.append((session, cid))
        session.datagramReceived(data, self.agent.selected.remote)  # type: ignore[union-attr]

    def handshakeCompleted(self, session: _DirectSession) -> None:
        original = next((o for s, o in self.candidates if s is session), None)
        if self.session is not None or original is None or not self.introduction.use():
            session.close(CLOSE_REFUSED, f"P2P session {self.introduction.session} has had its direct connection")
            return
        self.session, self.original = session, original
        for other, _ in self.candidates:
            if other is not session:
                other.close(CLOSE_REFUSED, "another connection took this P2P session")
                other.abandon()
        self.candidates = []
        self.accepted = True
        log.info(
            "P2P session {session}: direct connection from {identity} over {pair}",
            session=self.introduction.session,
            identity=self.introduction.peerIdentity,
            pair=self.agent.selected.describe(),  # type: ignore[union-attr]
        )
        self._ready()

    def terminated(self, session: _DirectSession, event: events.ConnectionTerminated) -> None:
        if session is not self.session:
            # A candidate that did not pass the pin (or gave up): forgotten;
            # the vouched dialer may still come, until the deadline.
            self.candidates = [(s, o) for s, o in self.candidates if s is not session]
            reason = session.conn.tpRefusal or event.reason_phrase or f"error {event.error_code:#x}"
            self.lastRefusal = reason
            log.info("P2P session {session}: refused a connection: {reason}", session=self.introduction.session, reason=reason)
            return
        super().terminated(session, event)

    def _refusedBecause(self, session: _DirectSession, reason: str) -> str:
        # A dialer that refuses us closes before its handshake completes:
        # QUIC then carries only a transport error code (0xc).
        return f"the dialer ended the QUIC handshake: {reason}"

    def newStream(self, session: _DirectSession, streamId: int) -> QuicStreamTransport | None:
        if not self.accepted or streamId % 4 != 0:
            # Only the vouched dialer's own bidirectional streams.
            return None
        stream = QuicStreamTransport(session, streamId)
        session.streams[streamId] = stream
        stream.attach(self.factory.buildProtocol(_address(session.peer)))
        return stream
