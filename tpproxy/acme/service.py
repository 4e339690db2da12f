# -*- test-case-name: tpproxy.test.test_acme -*-
"""
TP's certificates from an ACME CA: a directory store, the two challenge
responders, and the service that issues and renews.

The shape is txacme's: an issuing service over a certificate store, a
periodic check (daily by default), renewal ahead of expiry (at 2/3 of the
lifetime by default) and structured log events; the protocol is RFC 8555
(L{tpproxy.acme.client}).

What is managed:
  - TP's own names (C{acme.names}): one certificate, renewed forever, swapped
    into the TLS and QUIC listeners for new connections when renewed.
  - E2E exposure names, on demand: L{IssuingService.certificateFor} is an
    L{ICertificateSource}; a name is renewed while TP serves it.

A CA that is down or refuses does not stop TP: it keeps serving what the
store holds, logs the failure, and retries with backoff (1 minute doubling
to 1 hour) until the CA answers.
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tpproxy.acme.client import IAcmeClient, IChallengeResponder
from tpproxy.acme.store import CertificateStore, Chain, dnsNames, renewalTime
from tpproxy.certsource import CertificateUnavailable, ICertificateSource
from tpproxy.config import DNS_NAME

log = Logger()


@implementer(ICertificateSource)
class IssuingService(service.Service):
    """
    Issues and renews certificates through an L{IAcmeClient}.

    @param client: the ACME client (an L{tpproxy.acme.client.AcmeClient};
        L{tpproxy.acme.testing.FakeAcmeClient} in tests).
    @param store: where certificates live.
    @param responders: challenge responders, in order of preference.
    @param clock: the time source for renewal decisions and scheduling (a
        L{task.Clock} in tests; the ACME requests themselves use the
        client's reactor).
    @param ownNames: TP's own names, one certificate for all, stored under
        the first; empty if TP's certificate is not from ACME.
    @param onCertificate: called with C{(name, chain, key)} whenever a
        certificate is issued, C{name} being the name it is stored under.
    @param inUse: whether an E2E name is still served; only such names are
        renewed.
    @param renewFraction: renew after this fraction of the lifetime.
    @param checkInterval: seconds between checks.
    @param onDemand: whether E2E names may be obtained on demand.
    """

    retryDelays = (60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

    def __init__(
        self,
        client: IAcmeClient,
        store: CertificateStore,
        responders: list[IChallengeResponder],
        clock: IReactorTime,
        ownNames: tuple[str, ...] = (),
        onCertificate: Callable[[str, Chain, Any], None] = lambda name, chain, key: None,
        inUse: Callable[[str], bool] = lambda name: False,
        renewFraction: float = 2 / 3,
        checkInterval: float = 86400.0,
        onDemand: bool = True,
    ) -> None:
        self.client = client
        self.store = store
        self.responders = {r.challengeType: r for r in responders}
        self.clock = clock
        self.ownNames = ownNames
        self.onCertificate = onCertificate
        self.inUse = inUse
        self.renewFraction = renewFraction
        self.checkInterval = checkInterval
        self.onDemand = onDemand
        #: E2E names this run obtained or served from the store.
        self.e2eNames: set[str] = set()
        self._pending: dict[str, defer.Deferred[tuple[Chain, Any]]] = {}
        self._waiters: dict[str, list[defer.Deferred[tuple[Chain, Any]]]] = {}
        self._failures: dict[str, int] = {}
        self._retries: dict[str, IDelayedCall] = {}
        self._nextCheck: IDelayedCall | None = None
        #: E2E names refused by the CA: no new order for them before this time.
        self._notBefore: dict[str, float] = {}
        #: When recent on-demand orders were placed (the budget's window).
        self._onDemandOrders: list[float] = []

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._scheduledCheck()

    def stopService(self) -> Any:
        super().stopService()
        if self._nextCheck is not None and self._nextCheck.active():
            self._nextCheck.cancel()
        self._nextCheck = None
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()
        for pending in list(self._pending.values()):
            pending.cancel()
        return None

    def _checkBy(self, when: float) -> None:
        """
        Make sure a check runs by C{when} (a new certificate may fall due
        before the next scheduled check).
        """
        call = self._nextCheck
        if call is not None and call.active() and call.getTime() > when:
            call.reset(max(60.0, when - self.clock.seconds()))

    def _scheduledCheck(self) -> None:
        """
        Check now, then again after C{checkInterval}, or sooner when a
        certificate falls due before that (short-lived certificates).
        """
        self._nextCheck = None
        try:
            self.check()
            due = [renewalTime(s[0][0], self.renewFraction) for s in map(self.store.load, self._units()) if s is not None]
        except Exception:
            log.failure("The certificate check failed; trying again at the next check")
            due = []
        now = self.clock.seconds()
        delay = min([self.checkInterval] + [max(60.0, when - now) for when in due])
        if self.running:
            self._nextCheck = self.clock.callLater(delay, self._scheduledCheck)

    # -- decisions --------------------------------------------------------

    def _fresh(self, stored: tuple[Chain, Any] | None, names: tuple[str, ...]) -> bool:
        """
        Is C{stored} good for C{names} until its renewal time?  A
        certificate for other names (C{acme.names} changed) is not.
        """
        if stored is None:
            return False
        leaf = stored[0][0]
        if not set(names) <= dnsNames(leaf):
            # acme.names changed.  (A CA may add names, e.g. www.: more is
            # fine, as IAcmeClient.issue allows.)
            return False
        if self.store.directoryOf(names[0]) not in (None, self.client.directoryURL):
            # acme.directory changed (staging to production, say).
            return False
        return self.clock.seconds() < renewalTime(leaf, self.renewFraction)

    def _units(self) -> list[str]:
        return [u[0] for u in self._unitNames()]

    def _unitNames(self) -> list[tuple[str, ...]]:
        units = []
        if self.ownNames:
            units.append(self.ownNames)
        units.extend((name,) for name in sorted(self.e2eNames) if self.inUse(name))
        return units

    def check(self) -> None:
        """
        Start renewing what is due: TP's own certificate, and E2E names
        still served.  Renewals run on; failures are logged and retried
        with backoff.
        """
        now = self.clock.seconds()
        for names in self._unitNames():
            if names[0] in self._pending or names[0] in self._retries or now < self._notBefore.get(names[0], 0):
                continue
            try:
                due = not self._fresh(self.store.load(names[0]), names)
            except Exception:
                log.failure("Cannot read the stored certificate of {name}; renewing it", name=names[0])
                due = True
            if due:
                self._renew(names)

    def _renew(self, names: tuple[str, ...]) -> defer.Deferred[None]:
        def failed(reason: Failure) -> None:
            if reason.check(defer.CancelledError):
                return
            delay = self._backoff(names[0])
            log.warn(
                "Could not renew the certificate of {names}, retrying in {delay:.0f} s: {error}",
                names=", ".join(names),
                delay=delay,
                error=reason.getErrorMessage(),
            )
            self._retries[names[0]] = self.clock.callLater(delay, retry)

        def retry() -> None:
            del self._retries[names[0]]
            if names != self.ownNames and not self.inUse(names[0]):
                # An E2E name nobody exposes any more: stop trying.
                self._failures.pop(names[0], None)
                return
            if self._fresh(self.store.load(names[0]), names):
                return  # renewed meanwhile (on demand)
            self._renew(names)

        return self.obtain(names).addCallbacks(lambda _: None, failed)

    def _backoff(self, name: str) -> float:
        """
        Seconds to wait before the next order for C{name}, by how many
        orders in a row failed.
        """
        count = max(1, self._failures.get(name, 1))
        return self.retryDelays[min(count - 1, len(self.retryDelays) - 1)]

    # -- issuing ----------------------------------------------------------

    def obtain(self, names: tuple[str, ...]) -> defer.Deferred[tuple[Chain, Any]]:
        """
        Issue a certificate for C{names} now, store it and announce it.
        There is one order at a time per name: callers asking meanwhile
        wait for the same result.
        """
        key = names[0]
        waiter: defer.Deferred[tuple[Chain, Any]] = defer.Deferred()
        if key in self._waiters:
            self._waiters[key].append(waiter)
            return waiter
        self._waiters[key] = [waiter]
        issuing = self._issue(names)
        self._pending[key] = issuing

        def done(result: Any) -> None:
            del self._pending[key]
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                # One failure per order, however many callers waited on it.
                self._failures[key] = self._failures.get(key, 0) + 1
            for each in self._waiters.pop(key):
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        issuing.addBoth(done)
        return waiter

    @defer.inlineCallbacks
    def _issue(self, names: tuple[str, ...]) -> Any:
        log.info("Requesting a certificate for {names} from {directory}", names=", ".join(names), directory=self.client.directoryURL)
        key = ec.generate_private_key(ec.SECP256R1())
        # Every request has its own timeout; this bounds the whole order
        # too, so a stalled CA cannot keep a name pending for ever.
        ordering = self.client.issue(list(names), key, self.responders)
        ordering.addTimeout(self.client.orderTimeout + 4 * self.client.timeout, self.client.reactor)
        chain = yield ordering
        self.store.save(names[0], chain, key, self.client.directoryURL)
        due = renewalTime(chain[0], self.renewFraction)
        if self.clock.seconds() >= due:
            # Already due by TP's clock (skew, or a CA issuing very short
            # lifetimes): keep it, but do not order again at every check.
            self._failures[names[0]] = self._failures.get(names[0], 0) + 1
            delay = self._backoff(names[0])
            self._notBefore[names[0]] = self.clock.seconds() + delay
            log.warn(
                "The new certificate of {names} is already due for renewal by TP's clock (clock skew?); next order in {delay:.0f} s at the earliest",
                names=", ".join(names),
                delay=delay,
            )
        else:
            self._failures.pop(names[0], None)
            self._notBefore.pop(names[0], None)
            self._checkBy(due)
        log.info(
            "Got a certificate for {names}, serial {serial:x}, valid until {notAfter}",
            names=", ".join(names),
            serial=chain[0].serial_number,
            notAfter=chain[0].not_valid_after_utc.isoformat(),
        )
        self.onCertificate(names[0], chain, key)
        return chain, key

    # -- ICertificateSource -------------------------------------------------

    #: At most this many on-demand (E2E) orders per hour, so that exposers
    #: cannot spend the account's rate limits (TP's own renewal needs them).
    onDemandPerHour = 20

    @defer.inlineCallbacks
    def certificateFor(self, name: str) -> Any:
        """
        The certificate of an E2E name: from the store while fresh, else
        from the CA now.  While the CA fails, a stored certificate valid for
        another hour is still served; a name the CA refused waits out its
        backoff before the next order.
        """
        if not self.onDemand:
            raise CertificateUnavailable("ACME certificates for E2E names are turned off (acme.e2e = false)")
        if not DNS_NAME.fullmatch(name) or name.startswith("*."):
            raise CertificateUnavailable(f"{name!r} is not a name an ACME CA can certify")
        names = (name,)
        stored = self.store.load(name)
        if not self._fresh(stored, names):
            now = self.clock.seconds()
            usable = (
                stored is not None
                and name in dnsNames(stored[0][0])
                and stored[0][0].not_valid_after_utc.timestamp() > now + 3600
                and self.store.directoryOf(name) in (None, self.client.directoryURL)
            )
            try:
                if now < self._notBefore.get(name, 0):
                    raise CertificateUnavailable(f"the ACME CA refused {name} recently; TP tries again after {self._notBefore[name] - now:.0f} s")
                if name not in self._pending:
                    self._onDemandOrders = [t for t in self._onDemandOrders if t > now - 3600]
                    if len(self._onDemandOrders) >= self.onDemandPerHour:
                        raise CertificateUnavailable(f"TP placed {self.onDemandPerHour} on-demand ACME orders in the last hour; try {name} later")
                    self._onDemandOrders.append(now)
                try:
                    stored = yield self.obtain(names)
                except defer.CancelledError:
                    raise
                except Exception as e:
                    self._notBefore[name] = self.clock.seconds() + self._backoff(name)
                    raise CertificateUnavailable(f"the ACME CA did not certify {name}: {e}") from None
                self._notBefore.pop(name, None)
            except CertificateUnavailable as e:
                if not usable:
                    raise
                log.warn("Serving the stored certificate of {name}, due for renewal: {error}", name=name, error=str(e))
        self.e2eNames.add(name)
        return stored
