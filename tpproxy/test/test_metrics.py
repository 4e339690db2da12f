"""
Tests for L{tpproxy.metrics} and L{tpproxy.admin}: audit events become
counters, live state is read at scrape time, labels stay bounded.
"""

from __future__ import annotations

import ssl as stdlib_ssl
import urllib.error
import urllib.request
from typing import Any

import treq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tpproxy.metrics import Metrics, failureReason
from tpproxy.service import makeService
from tpproxy.test.support import (
    Echo,
    auditObserver,
    audits,
    deferLater,
    freePort,
    listenLocal,
    requireTool,
    run,
    tpCommand,
    waitForPort,
)
from tpproxy.testing import TestPKI


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


class LiveScrapeTests(TestCase):
    """
    A real TP from L{makeService} with an admin listener, real C{tp
    connect} clients over TLS and QUIC, and scrapes over HTTP.
    """

    timeout = 120

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        self.pki.client("bob")
        self.observer = auditObserver(self)
        self.echoPort, _ = listenLocal(self, Echo)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def startTP(self, admin: dict[str, Any]) -> None:
        self.port = freePort()
        self.adminPort = freePort()
        admin = dict(admin, listen=f"tcp:{self.adminPort}:interface=127.0.0.1")
        config = self.pki.serverConfig(listen=f"tcp:{self.port}:interface=127.0.0.1", admin=admin)
        self.service = makeService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.clientConfig = self.pki.directory / "client.toml"
        self.clientConfig.write_text(
            f'server = "localhost:{self.port}"\ncert = "{self.pki.directory / "alice.pem"}"\n'
            f'key = "{self.pki.directory / "alice.key"}"\nca = "{self.pki.caPath}"\n'
        )

    def connect(self, destination: str, data: bytes, *options: str) -> Any:
        return run(tpCommand() + ["--config", str(self.clientConfig), *options, "connect", destination], stdin=data)

    @defer.inlineCallbacks
    def waitForAudits(self, count: int) -> Any:
        for _ in range(500):
            if len(audits(self.observer)) >= count:
                return audits(self.observer)
            yield deferLater(0.02)
        self.fail(f"{len(audits(self.observer))} audit events, expected {count}")

    def scrape(self, path: str = "/metrics") -> Any:
        return treq.get(f"http://127.0.0.1:{self.adminPort}{path}", pool=self.pool)

    @defer.inlineCallbacks
    def test_valuesAfterKnownTraffic(self) -> Any:
        """
        After one tunnel over TLS, one over QUIC and one refused
        destination, the scrape counts each under its labels, with the
        bytes each way; TP's own certificate expiry is there; and the real
        C{promtool check metrics} accepts the scrape.
        """
        self.startTP({})
        echo = f"127.0.0.1:{self.echoPort}"
        tls = yield self.connect(echo, b"hello", "--transport", "tls")
        self.assertEqual((tls.status, tls.out), (0, b"hello"), tls.err)
        quic = yield self.connect(echo, b"world!", "--transport", "quic")
        self.assertEqual((quic.status, quic.out), (0, b"world!"), quic.err)
        refused = yield self.connect("10.1.2.3:22", b"", "--transport", "tls")
        self.assertNotEqual(refused.status, 0)
        yield self.waitForAudits(3)
        response = yield self.scrape()
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        body = yield response.text()
        s = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                s[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        connections = lambda via, result: s.get(  # noqa: E731
            ("tp_connections_total", (("op", "connect"), ("result", result), ("transport", "tcp"), ("via", via)))
        )
        self.assertEqual(connections("tls", "ok"), 1, body)
        self.assertEqual(connections("quic", "ok"), 1)
        self.assertEqual(connections("tls", "forbidden"), 1)
        self.assertEqual(s[("tp_bytes_total", (("direction", "up"), ("op", "connect")))], 11)
        self.assertEqual(s[("tp_bytes_total", (("direction", "down"), ("op", "connect")))], 11)
        # The two answered tunnels have a set-up time; the refused one none.
        self.assertEqual(s[("tp_tunnel_setup_seconds_count", (("op", "connect"),))], 2)
        expiry = s[("tp_certificate_expiry_seconds", (("name", "tp"),))]
        self.assertGreater(expiry, 3600)
        self.assertEqual(s[("tp_exposures", (("kind", "public"),))], 0)
        # The QUIC client's connection is gone or going; none is half-open.
        self.assertEqual(s[("tp_handshakes_in_progress", (("via", "quic"),))], 0)
        promtool = requireTool("promtool")
        path = self.pki.directory / "scrape.txt"
        path.write_text(body)
        check = yield run(["sh", "-c", f"{promtool} check metrics < {path}"])
        self.assertEqual(check.status, 0, check.out + check.err)

    @defer.inlineCallbacks
    def test_identities(self) -> Any:
        """
        With C{identities}, the admin listener speaks mutual TLS: a listed
        identity gets the metrics, another valid identity a 403 naming it,
        and a client without a certificate no TLS at all.
        """
        self.startTP({"identities": ["alice"]})

        def get(name: str | None) -> tuple[int, bytes]:
            ctx = stdlib_ssl.create_default_context(cafile=self.pki.caPath)
            if name is not None:
                ctx.load_cert_chain(str(self.pki.directory / f"{name}.pem"), str(self.pki.directory / f"{name}.key"))
            try:
                with urllib.request.urlopen(f"https://localhost:{self.adminPort}/metrics", context=ctx, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        yield waitForPort(self.adminPort)
        code, body = yield deferToThread(get, "alice")
        self.assertEqual(code, 200)
        self.assertIn(b"tp_build_info", body)
        code, body = yield deferToThread(get, "bob")
        self.assertEqual((code, body), (403, b"bob may not use the admin listener\n"))
        failure = yield self.assertFailure(deferToThread(get, None), urllib.error.URLError, stdlib_ssl.SSLError, ConnectionError)
        self.assertIsNotNone(failure)

    @defer.inlineCallbacks
    def test_plainRefusesOtherPaths(self) -> Any:
        """
        The admin listener serves /metrics only.
        """
        self.startTP({})
        yield waitForPort(self.adminPort)
        response = yield self.scrape("/status.php")
        self.assertEqual(response.code, 404)
