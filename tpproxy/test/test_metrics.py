"""
Tests for L{tpproxy.metrics} and L{tpproxy.admin}: audit events become
counters, live state is read at scrape time, labels stay bounded.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.metrics import Metrics, failureReason


def audit(**fields: object) -> dict[str, object]:
    event: dict[str, object] = {"log_namespace": "tpproxy.audit"}
    event.update(fields)
    return event


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a scrape, parsed back from the text format.
    """
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class AuditCountingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def test_connectionCounted(self) -> None:
        """
        An audit event of a finished tunnel counts one connection with its
        operation, transport, carrier and result, and adds its bytes.
        """
        self.metrics(audit(event="connect", transport="tcp", via="tls", result="ok", bytes_up=100, bytes_down=2500, duration=1.5))
        self.metrics(audit(event="connect", transport="tcp", via="quic", result="ok", bytes_up=7, bytes_down=0, duration=0.2))
        self.metrics(audit(event="connect", transport="tcp", via="tls", result="forbidden", bytes_up=0, bytes_down=0, duration=0.01))
        s = samples(self.metrics)
        labels = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
        self.assertEqual(s[("tp_connections_total", labels(op="connect", transport="tcp", via="tls", result="ok"))], 1)
        self.assertEqual(s[("tp_connections_total", labels(op="connect", transport="tcp", via="quic", result="ok"))], 1)
        self.assertEqual(s[("tp_connections_total", labels(op="connect", transport="tcp", via="tls", result="forbidden"))], 1)
        self.assertEqual(s[("tp_bytes_total", labels(direction="up", op="connect"))], 107)
        self.assertEqual(s[("tp_bytes_total", labels(direction="down", op="connect"))], 2500)
        # Two tunnels reached "ok": their durations are in the histogram.
        self.assertEqual(s[("tp_tunnel_duration_seconds_count", labels(op="connect"))], 2)
        self.assertEqual(s[("tp_tunnel_duration_seconds_sum", labels(op="connect"))], 1.7)

    def test_handshakeFailureReason(self) -> None:
        """
        A failed handshake counts under a bounded reason.
        """
        self.metrics(audit(event="connect", transport=None, via="tls", result="handshake_failed", detail="TLS error: tlsv13 alert certificate required"))
        self.metrics(audit(event="quic", transport="quic", result="handshake_failed", detail="no QUIC handshake within 10 s"))
        s = samples(self.metrics)
        self.assertEqual(s[("tp_handshake_failures_total", (("reason", "certificate_required"), ("via", "tls")))], 1)
        self.assertEqual(s[("tp_handshake_failures_total", (("reason", "timeout"), ("via", "quic")))], 1)

    def test_otherNamespacesIgnored(self) -> None:
        """
        Only audit events count: a log line that looks like one in another
        namespace changes nothing.
        """
        before = samples(self.metrics)
        self.metrics({"log_namespace": "tpproxy.server", "event": "connect", "result": "ok"})
        self.assertEqual(samples(self.metrics), before)

    def test_incoming(self) -> None:
        """
        An C{incoming} audit event counts a reverse session, not a
        connection.
        """
        self.metrics(audit(event="incoming", exposure="x", owner="y"))
        s = samples(self.metrics)
        self.assertEqual(s[("tp_reverse_incoming_total", ())], 1)
        self.assertFalse([k for k in s if k[0] == "tp_connections_total"])


class ReasonTests(SynchronousTestCase):
    def test_reasons(self) -> None:
        """
        Each kind of refusal TP logs maps to its reason; unknown text to
        C{other}; the set is closed.
        """
        cases = {
            "TLS error: tlsv13 alert certificate required": "certificate_required",
            "certificate expired at 2026-01-01": "certificate_expired",
            "certificate revoked (serial 1a)": "certificate_revoked",
            "TLS error: tlsv1 alert unknown ca": "unknown_ca",
            "no QUIC handshake within 10 s": "timeout",
            "TLS error: wrong version number": "protocol",
            "": "other",
            None: "other",
            "something new": "other",
        }
        for detail, reason in cases.items():
            self.assertEqual(failureReason(detail), reason, detail)


class GaugeTests(SynchronousTestCase):
    def test_readAtScrape(self) -> None:
        """
        A gauge registered with a callable is read at each scrape, not when
        registered.
        """
        metrics = Metrics()
        state = {("tls", "connect"): 2}
        metrics.gauge("tp_tunnels", "Live tunnels", ("via", "op"), lambda: state)
        self.assertEqual(samples(metrics)[("tp_tunnels", (("op", "connect"), ("via", "tls")))], 2)
        state[("quic", "udp")] = 5
        state[("tls", "connect")] = 0
        s = samples(metrics)
        self.assertEqual(s[("tp_tunnels", (("op", "udp"), ("via", "quic")))], 5)
        self.assertEqual(s[("tp_tunnels", (("op", "connect"), ("via", "tls")))], 0)

    def test_buildInfo(self) -> None:
        """
        The build info names TP's version.
        """
        import tpproxy

        s = samples(Metrics())
        self.assertEqual(s[("tp_build_info", (("version", tpproxy.__version__),))], 1)

    def test_registriesSeparate(self) -> None:
        """
        Two servers in one process count separately.
        """
        a, b = Metrics(), Metrics()
        a(audit(event="connect", transport="tcp", via="tls", result="ok"))
        self.assertNotIn(("tp_connections_total", (("op", "connect"), ("result", "ok"), ("transport", "tcp"), ("via", "tls"))), samples(b))
