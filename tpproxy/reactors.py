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
    Opens outgoing TCP connections to names: L{tpproxy.dial.Dialer}, the
    client's L{tpproxy.connector.Connector}.
    """


class IServerReactor(IReactorCore, IReactorTCP, IReactorUDP, IReactorTime, IReactorPluggableNameResolver):
    """
    Runs a whole TP server: listeners (TCP and UDP), timers, name
    resolution and shutdown triggers (L{tpproxy.service.makeService}).
    """
