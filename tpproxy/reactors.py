# -*- test-case-name: tpproxy.test.test_tap -*-
"""
What TP needs from a reactor, as interfaces (STYLE.md section 7).

Code that takes a reactor says which of the reactor's interfaces it uses,
so a test knows what its fake must provide (a L{Clock} for L{IReactorTime}
alone, a L{MemoryReactorClock} for TCP and time).  Where one object needs
several, the combinations below name them once, as treq's C{_ITreqReactor}
does.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)


class IDialReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    Opens TCP connections to names, with timeouts: the server's
    L{tpproxy.dial.Dialer}, and every client (L{tpproxy.connector},
    L{tpproxy.protocols.client}, C{tp expose}).
    """


class IUDPReactor(IReactorUDP, IReactorTime):
    """
    UDP ports and a clock: QUIC (aioquic's timers run on it) and the
    server's end of a UDP flow (its idle timer).
    """


class IServerReactor(IReactorCore, IReactorTCP, IReactorUDP, IReactorTime, IReactorPluggableNameResolver):
    """
    Runs a whole TP server: listeners (TCP and UDP), timers, name
    resolution and shutdown triggers (L{tpproxy.service.makeService}).
    """


class IClientReactor(IReactorCore, IReactorTCP, IReactorUDP, IReactorTime, IReactorPluggableNameResolver):
    """
    Runs a TP client (C{tp connect}, C{tp up}, C{tp expose}): TCP and QUIC
    (UDP) to TP, local listeners, timers, name resolution and shutdown
    triggers.
    """
