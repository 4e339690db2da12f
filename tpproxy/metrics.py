# -*- test-case-name: tpproxy.test.test_metrics -*-
"""
TP's metrics, in the Prometheus text format (C{prometheus_client}).

Two sources, so that the data path pays nothing for metrics:

  - B{The audit stream.}  Every connection already ends in exactly one
    audit event (namespace C{tpproxy.audit}) with its operation, transport,
    result code, bytes and duration.  L{Metrics.observe} is a log observer
    that turns each such event into counter and histogram updates, so the
    counters agree with the audit log by construction.
  - B{Collectors at scrape time.}  Live state (tunnels, exposures, waiting
    dialers, QUIC sessions, UDP flows, certificate expiry) is read from the
    objects that hold it when Prometheus scrapes, through small callables
    registered with L{Metrics.gauge}; nothing is updated per packet.

Labels are bounded: operation, transport, carrier, result code (the audit
codes, a closed set), handshake-failure reason (a closed set,
L{failureReason}).  No label carries an identity, an address or a
destination: their number is not bounded by anything the operator
controls (docs/operations.md).

Each server has its own L{CollectorRegistry} (not the process-global one),
so tests and several services in one process do not see each other.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver
from zope.interface import implementer

import tpproxy

#: Durations of tunnels, in seconds: from a second to a day.
DURATION_BUCKETS = (0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600)

#: Tunnel set-up times, in seconds: from a local dial to a slow resolver.
SETUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

#: Reasons for a failed handshake, in the order they are looked for in the
#: audit event's detail (lower case).  The first match names the reason;
#: anything else is C{other}.
FAILURE_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("timeout", ("timeout", "no quic handshake within", "timed out")),
    ("certificate_required", ("certificate required", "did not return a certificate", "no client certificate")),
    ("certificate_expired", ("expired", "not yet valid")),
    ("certificate_revoked", ("revoked", "deny list", "denied by")),
    ("unknown_ca", ("unknown ca", "unable to get", "self-signed", "self signed", "untrusted")),
    ("bad_certificate", ("certificate", "verify")),
    ("protocol", ("alpn", "version", "wrong", "unexpected", "decode", "protocol")),
)


def failureReason(detail: object) -> str:
    """
    The bounded reason label for a failed handshake's audit detail.
    """
    text = str(detail or "").lower()
    for reason, needles in FAILURE_REASONS:
        if any(n in text for n in needles):
            return reason
    return "other"


class _Callback(Collector):
    """
    A gauge (or, with C{counter}, a counter) family read at scrape time
    from C{read()}, which returns C{{label values: value}}.
    """

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], read: Callable[[], Mapping[tuple[str, ...], float]], counter: bool = False
    ):
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.read = read
        self.family = CounterMetricFamily if counter else GaugeMetricFamily

    def describe(self) -> Iterable[Any]:
        return [self.family(self.name, self.documentation, labels=list(self.labels))]

    def collect(self) -> Iterable[Any]:
        family = self.family(self.name, self.documentation, labels=list(self.labels))
        for values, value in sorted(self.read().items()):
            family.add_metric(list(values), float(value))
        yield family


@implementer(ILogObserver)
class Metrics:
    """
    The metrics of one TP server.

    @ivar registry: what the admin listener's C{/metrics} serves.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter(
            "tp_connections",
            "Connections that ended, by operation, transport asked for, carrier (tls, quic) and audit result code",
            ["op", "transport", "via", "result"],
            registry=r,
        )
        self.bytes = Counter(
            "tp_bytes",
            "Bytes relayed by tunnels that ended, by direction (up: client to destination) and operation",
            ["direction", "op"],
            registry=r,
        )
        self.handshakeFailures = Counter(
            "tp_handshake_failures",
            "TLS and QUIC handshakes refused or failed, by carrier and reason",
            ["via", "reason"],
            registry=r,
        )
        self.durations = Histogram(
            "tp_tunnel_duration_seconds",
            "How long tunnels lived, by operation (connections that reached a tunnel)",
            ["op"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.setup = Histogram(
            "tp_tunnel_setup_seconds",
            "From ClientHello to ServerHello (policy, resolution, dial or registration), by operation",
            ["op"],
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.incoming = Counter(
            "tp_reverse_incoming",
            "Dialers announced to an exposer (reverse sessions started)",
            registry=r,
        )
        self.reloads = Counter("tp_config_reloads", "Configuration reloads, by result (ok, rejected)", ["result"], registry=r)
        self.lastReload = Gauge(
            "tp_config_last_reload_timestamp_seconds", "When the configuration in force was loaded (Unix time)", registry=r
        )
        self.lastReloadOK = Gauge("tp_config_last_reload_success", "1 if the last reload attempt succeeded, else 0", registry=r)
        self.lastReload.set(time.time())
        self.lastReloadOK.set(1)
        Info("tp_build", "The TP version running", registry=r).info({"version": tpproxy.__version__})

    def gauge(
        self, name: str, documentation: str, labels: tuple[str, ...], read: Callable[[], Mapping[tuple[str, ...], float]], counter: bool = False
    ) -> None:
        """
        Register a gauge family (or, with C{counter}, a counter family
        kept by its owner) whose values C{read()} returns at each scrape,
        as C{{(label value, ...): value}}.
        """
        self.registry.register(_Callback(name, documentation, labels, read, counter))

    def __call__(self, event: Mapping[str, Any]) -> None:
        """
        Count one log event if it is an audit event.
        """
        if event.get("log_namespace") != "tpproxy.audit":
            return
        op = str(event.get("event") or "unknown")
        if op == "incoming":
            self.incoming.inc()
            return
        result = str(event.get("result") or "unknown")
        via = str(event.get("via") or event.get("transport") or ("quic" if op == "quic" else "tls"))
        transport = str(event.get("transport") or "none")
        self.connections.labels(op, transport, via, result).inc()
        if result == "handshake_failed":
            self.handshakeFailures.labels(via, failureReason(event.get("detail"))).inc()
            return
        up, down = event.get("bytes_up") or 0, event.get("bytes_down") or 0
        if up:
            self.bytes.labels("up", op).inc(up)
        if down:
            self.bytes.labels("down", op).inc(down)
        setup = event.get("setup")
        if isinstance(setup, (int, float)):
            self.setup.labels(op).observe(setup)
        duration = event.get("duration")
        if result == "ok" and isinstance(duration, (int, float)):
            self.durations.labels(op).observe(duration)

    def reloaded(self, ok: bool, when: float | None = None) -> None:
        """
        Record a reload attempt.
        """
        self.reloads.labels("ok" if ok else "rejected").inc()
        self.lastReloadOK.set(1 if ok else 0)
        if ok:
            self.lastReload.set(time.time() if when is None else when)
