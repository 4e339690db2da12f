# -*- test-case-name: tpproxy.test.test_dial -*-
"""
Dialling a destination on behalf of an identity: policy, resolution, the
address check, the connection attempt, each mapped to a wire error code.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHostResolution,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.logger import Logger
from zope.interface import implementer

from tpproxy.policy import Policy
from tpproxy.reactors import IDialReactor
from tpproxy.wire import ErrorCode

log = Logger()


class DialError(Exception):
    """
    A destination could not be reached; C{code} goes to the client.
    """

    def __init__(self, code: ErrorCode, message: str, address: str | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.address = address


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.deferred: defer.Deferred[list[str]] = defer.Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if address.host not in self.addresses:
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        self.deferred.callback(self.addresses)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def resolveHost(reactor: IReactorPluggableNameResolver, host: str, port: int) -> defer.Deferred[list[str]]:
    """
    The addresses of C{host} (IPv4 and IPv6, in the resolver's order), by
    the reactor's resolver; an IP literal is its own answer.
    """
    literal = _literal(host)
    if literal is not None:
        return defer.succeed([literal])
    collector = _Collector()
    reactor.nameResolver.resolveHostName(
        collector, host, portNumber=port, addressTypes=[IPv4Address, IPv6Address], transportSemantics="TCP"
    )
    return collector.deferred


class Dialer:
    """
    Opens TCP connections for authorized identities.

    @param reactor: provides C{IReactorTCP}, C{IReactorTime} and
        C{IReactorPluggableNameResolver}.
    """

    def __init__(self, reactor: IDialReactor, policy: Policy, connectTimeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.connectTimeout = connectTimeout

    def resolve(self, host: str, port: int) -> defer.Deferred[list[str]]:
        return resolveHost(self.reactor, host, port)

    @defer.inlineCallbacks
    def dial(self, identity: str, host: str, port: int, factory: IProtocolFactory) -> Any:
        """
        Check, resolve, check each address, connect.

        @return: a L{Deferred} firing with C{(protocol, address)}, or failing
            with L{DialError}.
        """
        deadline = self.reactor.seconds() + self.connectTimeout
        allowed = yield self.allowedAddresses(identity, host, port, "tcp")
        return (yield self._connectAny(allowed, port, factory, deadline))

    @defer.inlineCallbacks
    def allowedAddresses(self, identity: str, host: str, port: int, transport: str) -> Any:
        """
        Check the name, resolve it, and check each address.

        @return: a L{Deferred} firing with the allowed addresses (in the
            resolver's order), or failing with L{DialError}.
        """
        decision = self.policy.precheck(identity, host, port, transport)
        if not decision.allowed:
            raise DialError(ErrorCode.FORBIDDEN, decision.reason)
        resolving = self.resolve(host, port)
        resolving.addTimeout(self.connectTimeout, self.reactor)
        try:
            addresses = yield resolving
        except defer.TimeoutError:
            raise DialError(ErrorCode.RESOLVE_FAILED, f"resolving {host} took longer than {self.connectTimeout:g} s")
        if not addresses:
            raise DialError(ErrorCode.RESOLVE_FAILED, f"{host} did not resolve to any address")
        allowed: list[str] = []
        refusals: list[str] = []
        for address in addresses:
            verdict = self.policy.check(identity, host, address, port, transport)
            (allowed if verdict.allowed else refusals).append(address if verdict.allowed else verdict.reason)
        if not allowed:
            raise DialError(ErrorCode.FORBIDDEN, refusals[0], addresses[0])
        return allowed

    @defer.inlineCallbacks
    def _connectAny(self, addresses: Sequence[str], port: int, factory: IProtocolFactory, deadline: float) -> Any:
        last: DialError | None = None
        for address in addresses:
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                break
            endpointType = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = endpointType(self.reactor, address, port, timeout=max(1, int(remaining + 0.999)))
            attempt = endpoint.connect(factory)
            attempt.addTimeout(remaining, self.reactor)
            try:
                protocol = yield attempt
            except (error.TimeoutError, defer.TimeoutError, error.ConnectingCancelledError):
                # addTimeout cancels the attempt: ConnectingCancelledError.
                last = DialError(ErrorCode.CONNECT_TIMEOUT, f"no answer from {address} port {port} within the connect timeout", address)
            except error.ConnectionRefusedError:
                last = DialError(ErrorCode.CONNECT_REFUSED, f"{address} port {port} refused the connection", address)
            except error.ConnectError as e:
                last = DialError(ErrorCode.UNREACHABLE, f"{address} port {port} is unreachable ({e.osError or e.__class__.__name__})", address)
            else:
                return (protocol, address)
        if last is None:
            last = DialError(ErrorCode.CONNECT_TIMEOUT, f"no connection within {self.connectTimeout:g} s")
        raise last
