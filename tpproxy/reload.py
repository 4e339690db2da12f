# -*- test-case-name: tpproxy.test.test_reload -*-
"""
Reload without dropping tunnels, and revocation that bites
(docs/operations.md).

L{Reloader.reload} reads the config file again.  A file that fails
validation is rejected with the same one-line message as at start, and the
configuration in force stays.  A valid one replaces the policy, groups,
exposure rules, deny lists, CRLs, client CAs, TP's certificate (unless ACME
manages it), timeouts and limits for everything that starts from then on;
listener addresses are not re-bound (the log says which changes need a
restart).

Then every live connection is judged again under the new configuration
(L{stillAllowed}): its client certificate (deny lists, CRLs, CAs), its
destination (connect, udp), its exposure (listen) or its right to dial an
exposure (E2E, SNI, accept).  What is no longer allowed is closed with an
audit event C{revoked} naming the reason; the rest is untouched, and its
bytes keep flowing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from twisted.logger import Logger

from tpproxy.config import ConfigError, ServerConfig, loadCRL, loadServerConfig
from tpproxy.dial import Dialer
from tpproxy.limits import HalfOpenCounter
from tpproxy.pki import loadCertificates
from tpproxy.policy import Policy
from tpproxy.protocols.server import TPServerFactory, TPServerProtocol
from tpproxy.transports.servertls import ServerTLS
from tpproxy.verify import ClientCertChecker, leafRefusal

log = Logger(namespace="tpproxy.reload")
audit = Logger(namespace="tpproxy.audit")

#: Keys whose change needs a restart: they name sockets or files bound at
#: start.
RESTART_KEYS = (
    ("listen", "server.listen"),
    ("quic", "server.quic"),
    ("stateDir", "server.state_dir"),
    ("admin", "[admin]"),
    ("router", "[router]"),
    ("acme", "[acme]"),
    ("publicInterface", "reverse.public_interface"),
    ("cluster", "[cluster]"),
    ("workers", "server.workers"),
)


def checkerOf(config: ServerConfig, cas: list[Any]) -> ClientCertChecker:
    crls = (loadCRL(config.crl, cas),) if config.crl else ()
    return ClientCertChecker(config.deniedIdentities, config.deniedSerials, crls)


def _mayExpose(policy: Policy, identity: str, exposure: Any) -> Any:
    if exposure.mode == "public":
        return policy.mayExposePort(identity, exposure.port)
    return policy.mayExposeName(identity, exposure.name)


def stillAllowed(conn: TPServerProtocol, policy: Policy, checker: ClientCertChecker, registry: Any) -> str | None:
    """
    Why the live connection C{conn} is no longer allowed under C{policy}
    and C{checker}, or L{None} if it still is.

    Judged: the client certificate of every connection past its
    handshake; the dialled address of a C{connect} or C{udp} tunnel; the
    exposure of a signalling (C{listen}) or C{accept} connection, against
    the exposure rules; the right of an E2E dialer (through a tunnel or
    by SNI) to reach the name, against the rule that granted its
    exposure.
    """
    if conn.certificate is None or conn.identity is None:
        return None  # in its handshake: the new contexts decide
    refusal = leafRefusal(checker, conn.certificate)
    if refusal is not None:
        return f"the client certificate is refused now: {refusal.reason}"
    identity = conn.identity.name
    hello, session, address = conn.hello, conn.session, conn.address
    if hello is None or session is None:
        return None
    if conn.event in ("listen", "accept"):
        exposure = getattr(session, "exposure", None)
        if exposure is None:
            return None
        decision = _mayExpose(policy, identity, exposure)
        if not decision.allowed:
            return f"{exposure.describe()} may no longer be exposed: {decision.reason}"
        return None
    if address and address.startswith("E2E "):
        name = address[4:]
        if conn.event == "connect":
            decision = policy.checkName(identity, name, hello.port, hello.transport)
            if not decision.allowed:
                return f"{name} is no longer allowed: {decision.reason}"
        exposure = registry.nameExposure(name)
        if exposure is not None:
            decision = registry.mayDial(exposure, identity)
            if not decision.allowed:
                return f"may no longer dial {name}: {decision.reason}"
        return None
    if conn.event in ("connect", "udp") and conn.result == "ok" and address:
        transport = "udp" if conn.event == "udp" else "tcp"
        decision = policy.check(identity, hello.host, address, hello.port, transport)
        if not decision.allowed:
            return f"{hello.host}:{hello.port} ({address}) is no longer allowed: {decision.reason}"
    return None


class Reloader:
    """
    Reloads one server's configuration in place.

    @ivar generation: 1 for the configuration TP started with, one more for
        each reload that took effect.
    """

    def __init__(
        self,
        config: ServerConfig,
        factory: TPServerFactory,
        serverTLS: ServerTLS,
        quicListeners: list[Any],
        handshakes: HalfOpenCounter,
        metrics: Any = None,
        acmeManaged: bool = False,
        load: Callable[[str], ServerConfig] = loadServerConfig,
    ) -> None:
        self.config = config
        self.factory = factory
        self.serverTLS = serverTLS
        self.quicListeners = quicListeners
        self.handshakes = handshakes
        self.metrics = metrics
        self.acmeManaged = acmeManaged
        self.load = load
        self.generation = 1
        self.loaded = time.time()
        #: Other TLS servers that follow the client CAs and checks (the
        #: admin listener with identities).
        self.alsoTLS: list[ServerTLS] = []

    def reload(self) -> tuple[bool, str]:
        """
        Read the config file again and apply it; then close what it no
        longer allows.

        @return: whether it took effect, and a one-line summary (or the
            error).
        """
        path = self.config.path
        try:
            new = self.load(path)
            cas = [ca for p in new.clientCAs for ca in loadCertificates(p)]
            checker = checkerOf(new, cas)
            chain = key = None
            if not self.acmeManaged and new.certificate and new.key:
                from tpproxy.service import serverCertificate

                chain, key = serverCertificate(new)
        except (ConfigError, OSError, ValueError) as e:
            message = f"bad configuration: {e}"
            log.error(
                "Reload of {path} rejected, the configuration of generation {generation} stays in force: {error}",
                path=path,
                generation=self.generation,
                error=message,
            )
            if self.metrics is not None:
                self.metrics.reloaded(False)
            return False, message
        restart = [key for attr, key in RESTART_KEYS if getattr(new, attr) != getattr(self.config, attr)]
        self._apply(new, cas, checker, chain, key)
        self.generation += 1
        self.loaded = time.time()
        closed = self.sweep()
        if self.metrics is not None:
            self.metrics.reloaded(True, self.loaded)
        summary = (
            f"generation {self.generation}: {len(new.policy.rules)} policy rule(s), "
            f"{len(new.policy.exposures)} exposure rule(s); {closed} live connection(s) closed"
        )
        if restart:
            summary += f"; not applied until a restart: {', '.join(restart)}"
        log.info("Reloaded {path}, {summary}", path=path, summary=summary)
        return True, summary

    def _apply(self, new: ServerConfig, cas: list[Any], checker: ClientCertChecker, chain: Any, key: Any) -> None:
        factory = self.factory
        # Listener addresses and files bound at start stay as they are.
        new = dataclasses.replace(new, **{attr: getattr(self.config, attr) for attr, _ in RESTART_KEYS})
        factory.config = new
        factory.dialer = Dialer(factory.reactor, new.policy, new.connectTimeout)
        registry = factory.registry
        if hasattr(registry, "reconfigure"):
            registry.reconfigure(new.policy, new.acceptTimeout)
        self.serverTLS.reconfigure(cas, checker, chain, key)
        for other in self.alsoTLS:
            other.reconfigure(cas, checker, chain, key)
        for quic in self.quicListeners:
            quic.reconfigure(cas, checker, new.limits, new.handshakeTimeout, self.serverTLS.chain, self.serverTLS.key)
        self.handshakes.total = new.limits.handshakes
        self.handshakes.perSource = new.limits.handshakesPerSource
        self.config = new

    def sweep(self) -> int:
        """
        Close every live connection the configuration in force no longer
        allows (a dialer waiting for an exposer is one: its connection is
        live).

        @return: how many were closed.
        """
        config = self.factory.config
        checker = self.serverTLS.checker
        registry = self.factory.registry
        closed = 0
        for conn in list(self.factory.live):
            try:
                reason = stillAllowed(conn, config.policy, checker, registry)
            except Exception:
                # Fail closed: a connection TP cannot judge is not kept.
                log.failure("Cannot judge {peer} against the new configuration; closing it", peer=conn.peerAddress)
                reason = "could not be checked against the new configuration"
            if reason is not None:
                conn.revoke("revoked", reason)
                closed += 1
        return closed
