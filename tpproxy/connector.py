# -*- test-case-name: tpproxy.test.test_quic -*-
"""
Opening tunnels to TP over QUIC or TLS, with C{auto}: QUIC first, TLS when
no QUIC answer comes within a short bound, and a memory of what worked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer

from tpproxy.protocols.client import TPClientProtocol, TunnelError, certificateRefusal, openTunnel
from tpproxy.reactors import IClientReactor
from tpproxy.wire import ClientHello

if TYPE_CHECKING:
    from tpproxy.transports.quic import ClientSession

# QUIC (aioquic, TP's QUIC transport) is imported when a connector first
# tries it: a client on TLS alone does without ~5 MB of it (issue 17).

#: How long C{auto} waits for a QUIC handshake before it takes TLS.
QUIC_PROBE_TIMEOUT = 1.5
#: How long C{auto} remembers that QUIC did not work for a server.
REMEMBER_TLS = 600.0
#: Client PING interval on QUIC connections (keeps NAT bindings and the
#: idle timeout from closing a quiet ssh session).
QUIC_KEEPALIVE = 15.0


#: QUIC's CONNECTION_CLOSE codes for TLS alerts (RFC 9001 §4.8).
CRYPTO_ERROR = 0x100


class QuicUnavailable(TunnelError):
    """
    QUIC did not get through to TP: its UDP port is unreachable, or nothing
    answered in time.  The one QUIC failure C{auto} remembers (a refused
    certificate, or TP's certificate failing verification, says nothing
    about whether QUIC works).
    """


def quicRefusal(session: ClientSession) -> TunnelError | None:
    """
    If TP closed C{session} with a TLS alert about the client certificate
    (CRYPTO_ERROR + alert), the error saying so in one line; else L{None}.

    Such an alert comes only once this client has finished its side of the
    TLS handshake (it sent its certificate after verifying TP's).  Before
    that, a CRYPTO_ERROR close is this client's own verdict on TP's
    certificate (or TP's on the handshake parameters), and is not about the
    client certificate.
    """
    from aioquic import tls

    if session.conn.tls.state is not tls.State.CLIENT_POST_HANDSHAKE:
        return None
    # aioquic's private _close_event: checked before QUIC is used
    # (tpproxy.transports.quic, docs/private-apis.md).
    event = session.conn._close_event
    code = getattr(event, "error_code", None)
    if not isinstance(code, int) or not CRYPTO_ERROR <= code < CRYPTO_ERROR + 0x100:
        return None
    return certificateRefusal(code - CRYPTO_ERROR, "QUIC")


def memoryPath() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "tp" / "transport.json"


def _readMemory() -> dict[str, Any]:
    try:
        data = json.loads(memoryPath().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remembered(server: str) -> str | None:
    entry = _readMemory().get(server)
    if isinstance(entry, dict) and isinstance(entry.get("until"), (int, float)) and entry["until"] > time.time():
        return str(entry.get("transport"))
    return None


def remember(server: str, transport: str | None) -> None:
    data = _readMemory()
    if transport is None:
        data.pop(server, None)
    else:
        data[server] = {"transport": transport, "until": time.time() + REMEMBER_TLS}
    path = memoryPath()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass


class Connector:
    """
    Opens tunnels for one client process.  Over QUIC all tunnels share one
    connection (one stream each).

    @ivar chosen: C{"quic"} or C{"tls"} once decided.
    """

    def __init__(self, reactor: IClientReactor, settings: Any) -> None:
        self.reactor = reactor
        self.settings = settings
        self.mode = settings.transport
        self.chosen: str | None = "tls" if self.mode == "tls" else None
        self.session: ClientSession | None = None
        #: PING interval of the QUIC connection.
        self.quicKeepalive = QUIC_KEEPALIVE
        self._connecting: defer.Deferred[ClientSession] | None = None
        self.tlsOptions = settings.tlsOptions()
        self.lastQuicError: str | None = None

    @defer.inlineCallbacks
    def choose(self) -> Any:
        """
        Decide the transport (once): C{tls} and C{quic} are what they say;
        C{auto} tries QUIC unless it failed for this server recently.
        """
        if self.chosen is not None:
            return self.chosen
        server = str(self.settings.server)
        if self.mode == "auto" and remembered(server) == "tls":
            self.chosen = "tls"
            return self.chosen
        timeout = QUIC_PROBE_TIMEOUT if self.mode == "auto" else self.settings.connectTimeout
        try:
            yield self.quicSession(timeout)
        except TunnelError as e:
            if self.mode == "quic":
                raise
            self.lastQuicError = str(e)
            if isinstance(e, QuicUnavailable):
                remember(server, "tls")
            self.chosen = "tls"
            return self.chosen
        if self.mode == "auto":
            remember(server, None)
        self.chosen = "quic"
        return self.chosen

    @defer.inlineCallbacks
    def quicSession(self, timeout: float) -> Any:
        if self.session is not None and not self.session.closed:
            return self.session
        if self._connecting is None:
            self._connecting = self._connectQuic(timeout)
        try:
            return (yield self._connecting)
        finally:
            self._connecting = None

    @defer.inlineCallbacks
    def _connectQuic(self, timeout: float) -> Any:
        from tpproxy.dial import resolveHost
        from tpproxy.transports.quic import clientConfiguration, connectQuic

        server = self.settings.server
        try:
            addresses = yield resolveHost(self.reactor, server.connectHost, server.port).addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            raise TunnelError(f"resolving {server.host} took longer than {timeout:g} s") from None
        if not addresses:
            raise TunnelError(f"{server.host} did not resolve")
        cas, chain, key = self.settings.materials()
        configuration = clientConfiguration(server.host, cas, chain, key)
        session = connectQuic(self.reactor, (addresses[0], server.port), configuration)
        ready = session.ready
        ready.addTimeout(timeout, self.reactor)
        try:
            yield ready
        except defer.TimeoutError:
            session.close(0, "gave up")
            session.socket.stop()
            raise QuicUnavailable(f"no QUIC answer from {server} within {timeout:g} s") from None
        except TunnelError as e:
            refused = quicRefusal(session)
            if refused is not None:
                raise refused from None
            if session.unreachableReason is not None:
                raise QuicUnavailable(str(e)) from None
            raise
        session.startKeepalive(self.quicKeepalive)
        self.session = session
        return session

    def rebind(self) -> str:
        """
        Move the QUIC connection, if any, to a new local UDP port, as a
        network change would (C{tp connect} does it on SIGUSR1: a way to
        test that TP and what is in front of it follow a client whose
        address changes).  Says what it did.
        """
        session = self.session
        if session is None or session.closed:
            return "no QUIC connection to move"
        session.rebind()
        host = session.localAddress
        return f"QUIC connection moved to local UDP port {host.port}"

    #: How long L{finish} waits for TP to acknowledge what was written.
    FINISH_GRACE = 2.0

    def close(self) -> None:
        """
        Close the QUIC connection, if any, now (CONNECTION_CLOSE goes out
        before the process exits).
        """
        session, self.session = self.session, None
        if session is not None and not session.closed:
            session.close(0, "client done")
            session.abandon()
            session.socket.stop()

    @defer.inlineCallbacks
    def finish(self) -> Any:
        """
        Close the QUIC connection, if any, once TP has acknowledged what
        was written on it (or after L{FINISH_GRACE} seconds): what C{tp
        connect} does when its tunnel has ended both ways, so that the last
        bytes it sent survive a lost packet.
        """
        session = self.session
        if session is not None and not session.closed:
            yield session.closeWhenDelivered("client done", self.FINISH_GRACE)
        self.close()

    @defer.inlineCallbacks
    def open(self, hello: ClientHello) -> Any:
        """
        Open one tunnel; fires with the end to splice (see L{openTunnel}).
        """
        transport = yield self.choose()
        if transport == "tls":
            return (
                yield openTunnel(
                    self.reactor, self.settings.server, self.tlsOptions, hello, self.settings.connectTimeout, self.settings.tlsOptions
                )
            )
        session = yield self.quicSession(self.settings.connectTimeout)
        ready: defer.Deferred[Any] = defer.Deferred()
        protocol = TPClientProtocol(hello, ready, self.settings.tlsOptions)
        protocol.handshakeDone = True
        stream = session.openStream(protocol)
        ready.addTimeout(self.settings.connectTimeout, self.reactor)

        def timedOut(f: Any) -> Any:
            if f.check(defer.TimeoutError):
                stream.abortConnection()
                raise TunnelError(f"no answer from TP at {self.settings.server} within {self.settings.connectTimeout:g} s")
            # TLS 1.3: the client's handshake ends before TP has checked
            # its certificate, so a refusal can end the first stream.
            refused = quicRefusal(session) if session.closed else None
            if refused is not None:
                raise refused
            return f

        return (yield ready.addErrback(timedOut))
