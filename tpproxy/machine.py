# -*- test-case-name: tpproxy.test.test_machine -*-
"""
Explicit state machines: a state enum and a transition table.

A machine's whole behaviour is its table, written once at the top of its
class::

    TRANSITIONS = {
        (State.DIALLING, "dialled"): (State.SPLICED, "_splice"),
        (State.CLOSED, "dialled"): (State.CLOSED, "_dropOutbound"),
        ...
    }

An input names a row: the machine moves to the row's state, then calls the
row's output method (if any) with the input's arguments.  An input with no
row in the current state is a bug, and raises L{IllegalTransition} instead
of being silently ignored: an input the machine must tolerate (a late dial
result after the client left, say) has a row of its own.

Nothing here does I/O.  Twisted's C{automat} (which Twisted itself depends
on) would do the same job; this is the 30-line version that keeps each
machine's state a plain enum a test or a log line can read.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Generic, Mapping, TypeVar

S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(Exception):
    """
    An input arrived in a state that has no row for it.
    """

    def __init__(self, machine: str, state: enum.Enum, input: str) -> None:
        super().__init__(f"{machine}: input {input!r} is illegal in state {state.name}")
        self.machine = machine
        self.state = state
        self.input = input


class Machine(Generic[S]):
    """
    A base for classes whose behaviour is a transition table.

    @cvar TRANSITIONS: C{(state, input) -> (next state, output method name
        or None)}.
    @ivar state: the current state.
    """

    TRANSITIONS: ClassVar[Mapping[tuple[Any, str], tuple[Any, str | None]]] = {}
    state: S

    def _input(self, name: str, *args: Any, **kw: Any) -> Any:
        """
        Take input C{name}: move to the next state, then run the output.

        @raise IllegalTransition: if the current state has no row for it.
        """
        try:
            nextState, output = self.TRANSITIONS[self.state, name]
        except KeyError:
            raise IllegalTransition(type(self).__name__, self.state, name) from None
        self.state = nextState
        if output is not None:
            return getattr(self, output)(*args, **kw)
        return None

    @classmethod
    def inputs(cls) -> frozenset[str]:
        """
        Every input some state of this machine takes.
        """
        return frozenset(name for _, name in cls.TRANSITIONS)
