# -*- test-case-name: tpproxy.test.test_privates -*-
"""
Private names of libraries TP does not own: checked, never trusted.

TP overrides or reads a few private names of Twisted
(L{tpproxy.transports.tls}, for half-close) and aioquic
(L{tpproxy.transports.quic}, for the client-certificate verdict, flow
control and connection ids); pyOpenSSL's bindings are checked by
L{tpproxy.verify}.  If a release renamed one, an override would silently
stop running.  Each user lists its names as L{PrivateName}s, and
L{privateProblems} checks them (at import for Twisted's, before QUIC is
served for aioquic's): docs/private-apis.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


class PrivateAPIError(RuntimeError):
    """
    A private name of a library (Twisted, aioquic) that TP overrides, hooks
    or reads is missing, has another shape, or is no longer used where TP
    relies on it.  TP then refuses to run the code that depends on it:
    running without the hook would skip what TP adds (the QUIC
    client-certificate verdict above all) without a word.
    """


@dataclasses.dataclass(frozen=True)
class PrivateName:
    """
    One private name TP uses on a class of a library it does not own.

    @ivar owner: the class.
    @ivar name: the attribute.
    @ivar parameters: for a method, the names of its parameters after
        C{self}, exactly; L{None} for a data attribute.
    @ivar namedBy: methods of C{owner} whose code must name C{name}: those
        that call a method TP overrides (else the override is dead code), or
        set a data attribute TP reads (else it is never set).
    @ivar use: what TP uses it for, and what breaks without it.
    """

    owner: type
    name: str
    parameters: tuple[str, ...] | None
    namedBy: tuple[str, ...]
    use: str


def namesIn(function: Any) -> frozenset[str]:
    """
    The attribute and global names the code of C{function} (and of the
    functions and comprehensions nested in it) mentions.
    """
    code = getattr(function, "__code__", None)
    if code is None:
        return frozenset()
    names: set[str] = set()
    todo = [code]
    while todo:
        c = todo.pop()
        names.update(c.co_names)
        todo.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    return frozenset(names)


def privateProblems(names: tuple[PrivateName, ...]) -> list[str]:
    """
    What is wrong with C{names} in the installed libraries: one line each;
    empty if all are as TP expects.
    """
    problems = []
    for p in names:
        where = f"{p.owner.__module__}.{p.owner.__qualname__}.{p.name}"
        if p.parameters is not None:
            attr = inspect.getattr_static(p.owner, p.name, None)
            if not inspect.isfunction(attr):
                problems.append(f"{where} is not a method")
                continue
            params = tuple(inspect.signature(attr).parameters)[1:]
            if params != p.parameters:
                problems.append(f"{where} takes ({', '.join(params)}), not ({', '.join(p.parameters)})")
                continue
        for caller in p.namedBy:
            # Every definition along the MRO: an override that calls
            # super() names only what it adds.
            functions = [vars(k)[caller] for k in p.owner.__mro__ if caller in vars(k)]
            if not functions:
                problems.append(f"{p.owner.__module__}.{p.owner.__qualname__}.{caller} is gone (it used {p.name})")
            elif not any(p.name in namesIn(f) for f in functions):
                problems.append(f"{p.owner.__module__}.{p.owner.__qualname__}.{caller} no longer uses {p.name}")
    return problems
