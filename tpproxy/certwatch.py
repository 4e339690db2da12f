# -*- test-case-name: tpproxy.test.test_certwatch -*-
"""
A long-running client and its own short-lived certificate.

C{tp expose} and C{tp up} run for days; their client certificates may live
for hours (TP's intent) and are renewed by whatever tool writes the files
(C{tp issue}, an ACME or step client).  L{CertificateWatcher} polls the
certificate, key and CA files on an injected clock and hands a renewed,
loadable pair to the client, which moves to it make-before-break
(L{tpproxy.reverse.expose.Exposer.renewed}, L{renewConnector}).  If no
renewal appears, it says so once before the certificate expires, and once
when it has.

The clock's C{seconds()} is POSIX time, as a reactor's is (a test's
L{twisted.internet.task.Clock} is set to it): a certificate's notAfter and
the watcher's timers are on one time base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Seconds between two looks at the files.
POLL_INTERVAL = 30.0
#: After a change that does not load (a tool writing the certificate, then
#: the key), look again this much later.
SETTLE = 1.0
#: Warn this long before notAfter that no renewal appeared (at most a sixth
#: of the certificate's lifetime, for certificates of minutes).
WARN_BEFORE = 600.0


@dataclass(frozen=True)
class Materials:
    """
    A loaded client certificate chain, its key, and the CA certificates
    that sign TP's certificate.
    """

    cas: list[x509.Certificate]
    chain: list[x509.Certificate]
    key: Any

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def notBefore(self) -> float:
        return self.leaf.not_valid_before_utc.timestamp()

    @property
    def notAfter(self) -> float:
        return self.leaf.not_valid_after_utc.timestamp()

    def validUntil(self) -> str:
        return f"{self.leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"

    def sameAs(self, other: Materials) -> bool:
        """
        The same certificate, key and CAs (a touched file, or a tool that
        rewrote the same pair).
        """
        return (
            self.chain == other.chain
            and self.cas == other.cas
            and _publicKey(self.key) == _publicKey(other.key)
        )


def _publicKey(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def loadMaterials(settings: Any) -> Materials:
    """
    Load C{settings}' CA, certificate and key files (C{settings.materials()})
    and check that the key is the certificate's.

    @raise ValueError: the key does not match the certificate (a tool may be
        between writing the one and the other).
    @raise Exception: what C{settings.materials()} raises for a missing or
        bad file.
    """
    cas, chain, key = settings.materials()
    loaded = Materials(list(cas), list(chain), key)
    if _publicKey(key) != loaded.leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValueError(f"the key in {settings.key} is not the key of the certificate in {settings.cert}")
    return loaded


class LoadedSettings:
    """
    Client settings whose certificate, key and CAs are already loaded (and
    checked): C{materials()} and C{tlsOptions()} use them instead of reading
    the files again, which a renewing tool may be rewriting at that moment.
    Everything else is C{base}'s.
    """

    def __init__(self, base: Any, loaded: Materials) -> None:
        self.base = getattr(base, "base", base)
        self.loaded = loaded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def materials(self) -> tuple[list[x509.Certificate], list[x509.Certificate], Any]:
        return self.loaded.cas, self.loaded.chain, self.loaded.key

    def tlsOptions(self, serverName: str | None = None) -> Any:
        from tpproxy.transports.tls import clientTLS

        return clientTLS(serverName or self.base.server.host, self.loaded.cas, self.loaded.chain, self.loaded.key)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _inWords(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"{seconds / 60:.0f} min"
    return f"{max(0.0, seconds):.0f} s"


class CertificateWatcher:
    """
    Polls a client's certificate files and reports a renewed pair.

    It looks every C{interval} seconds, and also at two thirds of the
    certificate's lifetime (when renewing tools usually renew), when its
    expiry warning is due, and at its notAfter.  A look compares the files'
    modification time, size and inode; from two thirds of the lifetime on
    it reads them every time regardless, for tools that keep the time.  A
    renewal is a pair that loads, whose key is the certificate's, that
    differs from the current one and is valid now.

    @param clock: the timers and the time (POSIX seconds).
    @param paths: the files to watch (certificate, key, CA).
    @param load: loads the files (L{loadMaterials}).
    @param current: what the client uses now.
    @param renewed: called with the new L{Materials}.
    @param say: one line for the person running the client.
    @param name: how to name the certificate in those lines (its path).
    """

    _call: IDelayedCall | None = None

    def __init__(
        self,
        clock: IReactorTime,
        paths: Sequence[str],
        load: Callable[[], Materials],
        current: Materials,
        renewed: Callable[[Materials], None],
        say: Callable[[str], None],
        name: str,
        interval: float = POLL_INTERVAL,
        warnBefore: float = WARN_BEFORE,
    ) -> None:
        self.clock = clock
        self.paths = list(paths)
        self.load = load
        self.current = current
        self.renewed = renewed
        self.say = say
        self.name = name
        self.interval = interval
        self.warnBefore = warnBefore
        self._stamps = [_stamp(p) for p in self.paths]
        self._failed: tuple[Any, ...] | None = None
        self._rejected: tuple[Any, ...] | None = None
        self._newCertificate()

    def _newCertificate(self) -> None:
        current = self.current
        lifetime = max(0.0, current.notAfter - current.notBefore)
        self.lateAt = current.notBefore + lifetime * 2 / 3
        self.warnAt = current.notAfter - min(self.warnBefore, lifetime / 6)
        self.warned = False
        self.saidExpired = False

    def start(self) -> None:
        """
        Look now (a warning may be due at once) and from then on.
        """
        self.poll()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def poll(self) -> None:
        """
        Look at the files: take a renewed pair, warn of an expiry, and
        schedule the next look.
        """
        self._call = None
        now = self.clock.seconds()
        stamps = [_stamp(p) for p in self.paths]
        soon = False
        if stamps != self._stamps or now >= self.lateAt:
            soon = self._look(now, stamps)
        self._warn(now)
        self._schedule(now, SETTLE if soon else None)

    def _look(self, now: float, stamps: list[Any]) -> bool:
        """
        Read the files.  Returns whether to look again soon (they did not
        load, perhaps half-written).
        """
        key = tuple(stamps)
        try:
            loaded = self.load()
        except Exception as e:
            if self._failed != key:
                # Perhaps half-written: look again soon, and speak only if
                # the same files still do not load then.
                self._failed = key
                return True
            if self._rejected != key:
                self._rejected = key
                self.say(f"Cannot use the changed certificate files ({e}); still using the certificate valid until {self.current.validUntil()}")
            self._stamps = stamps
            return False
        self._failed = None
        self._stamps = stamps
        if loaded.sameAs(self.current):
            return False
        problem = None
        if loaded.notAfter <= now:
            problem = f"it expired at {loaded.validUntil()}"
        elif loaded.notBefore > now + 300:
            problem = f"it is not valid before {loaded.leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        if problem is not None:
            if self._rejected != key:
                self._rejected = key
                self.say(f"Not using the new certificate in {self.name}: {problem}")
            return False
        self.current = loaded
        self._newCertificate()
        self.renewed(loaded)
        return False

    def _warn(self, now: float) -> None:
        current = self.current
        if now >= current.notAfter:
            if not self.saidExpired:
                self.saidExpired = self.warned = True
                self.say(
                    f"The client certificate {self.name} expired at {current.validUntil()} and no renewed one has appeared: "
                    "TP refuses it until it is renewed"
                )
        elif now >= self.warnAt and not self.warned:
            self.warned = True
            self.say(
                f"The client certificate {self.name} expires at {current.validUntil()} (in {_inWords(current.notAfter - now)}) "
                "and no renewed one has appeared; renew it (tp issue, an ACME or step client) to stay connected"
            )

    def _schedule(self, now: float, soon: float | None) -> None:
        marks = [self.lateAt, self.warnAt, self.current.notAfter]
        when = min([now + self.interval] + [m for m in marks if m > now])
        delay = max(0.0, when - now)
        if soon is not None:
            delay = min(delay, soon)
        self._call = self.clock.callLater(delay, self.poll)


def watchCertificate(
    clock: IReactorTime, settings: Any, current: Materials, renewed: Callable[[Materials], None], say: Callable[[str], None]
) -> CertificateWatcher:
    """
    A started L{CertificateWatcher} of C{settings}' files (C{cert}, C{key},
    C{ca}), from C{current}.
    """
    base = getattr(settings, "base", settings)
    watcher = CertificateWatcher(
        clock, [base.cert, base.key, base.ca], lambda: loadMaterials(base), current, renewed, say, name=str(base.cert)
    )
    watcher.start()
    return watcher


def renewConnector(connector: Any, settings: Any) -> None:
    """
    Move a L{tpproxy.connector.Connector} (C{tp up}'s) to C{settings}' (a
    renewed certificate's): new TLS tunnels use it at once; the QUIC
    connection made with the old one keeps its tunnels until they end and
    then closes, and the next tunnel opens a new one.
    """
    connector.settings = settings
    connector.tlsOptions = settings.tlsOptions()
    old, connector.session = connector.session, None
    if old is not None and not old.closed:
        old.closeWhenIdle("the client certificate was renewed")


def followRenewals(clock: IReactorTime, settings: Any, connector: Any, say: Callable[[str], None]) -> CertificateWatcher:
    """
    Keep C{tp up}'s C{connector} on the current certificate: watch
    C{settings}' files and move the connector to each renewed pair.
    """
    current = loadMaterials(settings)

    def renewed(loaded: Materials) -> None:
        say(f"Loaded the renewed client certificate (valid until {loaded.validUntil()}); new tunnels use it")
        renewConnector(connector, LoadedSettings(settings, loaded))

    return watchCertificate(clock, settings, current, renewed, say)
