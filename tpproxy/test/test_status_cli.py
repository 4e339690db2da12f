"""
C{tp status}: TP's admin listener (the real L{tpproxy.admin.adminSite},
serving a fixed C{/status} document) on loopback HTTP and HTTPS with a
client certificate made here, read by the real C{tp} command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tpproxy import cli
from tpproxy.admin import adminSite
from tpproxy.metrics import Metrics
from tpproxy.pki import loadCertificates, loadKey
from tpproxy.test.support import cleanEnv, freePort, run, tpCommand
from tpproxy.testing import TestPKI
from tpproxy.transports.servertls import ServerTLS
from tpproxy.verify import ClientCertChecker

#: The document of the lead's C{/status} format, version 1.
DOCUMENT: dict[str, Any] = {
    "version": 1,
    "server": {"started": 1796390000.0, "uptime": 12.5, "config": "/etc/tp/server.toml", "generation": 2, "loaded": 1796390010.0},
    "tunnels": [
        {
            "identity": "alice",
            "op": "connect",
            "destination": "127.0.0.1:22",
            "transport": "tcp",
            "via": "tls",
            "peer": "127.0.0.1:50123",
            "bytes_up": 100,
            "bytes_down": 2000,
            "age": 3.2,
        }
    ],
    "exposures": [
        {"kind": "public", "port": 40022, "name": None, "identity": "alice", "via": "quic", "age": 100.0},
        {"kind": "e2e", "port": None, "name": "nas.example.org", "identity": "bob", "via": "tls", "age": 5.0},
    ],
    "dialers_waiting": [{"exposure": "nas.example.org", "identity": "carol", "age": 0.5}],
    "certificates": [{"name": "tp", "not_after": "2026-12-05T10:00:00Z", "expires_in": 70000.0}],
}


def rows(text: str, title: str) -> list[list[str]]:
    """
    The rows of the table C{title} in C{text}, cells split on runs of
    spaces (no cell of the test document holds two spaces), header first.
    """
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title + " (") or line == f"{title}: none")
    found = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        found.append([cell for cell in line.split("  ") if cell.strip() != ""])
    return [[cell.strip() for cell in row] for row in found]


class FormatTests(SynchronousTestCase):
    def test_tables(self) -> None:
        """
        Each section is a table of its entries; missing values are C{-};
        bytes and ages are made readable.
        """
        text = cli.formatStatus(DOCUMENT, "http://127.0.0.1:9090")
        first = text.splitlines()[0]
        self.assertIn("TP at http://127.0.0.1:9090: up 12.5s (since 2026-12-04 13:13:20 UTC)", first)
        self.assertIn("config /etc/tp/server.toml, generation 2 (loaded 2026-12-04 13:13:30 UTC)", first)
        self.assertEqual(
            rows(text, "Tunnels"),
            [
                ["IDENTITY", "OP", "DESTINATION", "TRANSPORT", "VIA", "PEER", "UP", "DOWN", "AGE"],
                ["alice", "connect", "127.0.0.1:22", "tcp", "tls", "127.0.0.1:50123", "100 B", "2.0 KiB", "3.2s"],
            ],
        )
        self.assertEqual(
            rows(text, "Exposures"),
            [
                ["KIND", "PORT/NAME", "IDENTITY", "VIA", "AGE"],
                ["public", "40022", "alice", "quic", "1m40s"],
                ["e2e", "nas.example.org", "bob", "tls", "5.0s"],
            ],
        )
        self.assertEqual(rows(text, "Dialers waiting"), [["EXPOSURE", "IDENTITY", "WAITING"], ["nas.example.org", "carol", "0.5s"]])
        self.assertEqual(rows(text, "Certificates"), [["NAME", "NOT AFTER", "EXPIRES IN"], ["tp", "2026-12-05T10:00:00Z", "19h26m"]])
        self.assertIn("Tunnels (1)\n", text)
        self.assertIn("Exposures (2)\n", text)

    def test_empty(self) -> None:
        """
        An empty section says C{none}; a tunnel's C{state}, when TP sends
        it, gets a column; an expired certificate says so.
        """
        document = {
            **DOCUMENT,
            "tunnels": [{**DOCUMENT["tunnels"][0], "state": "spliced", "identity": None}],
            "exposures": [],
            "dialers_waiting": [],
            "certificates": [{"name": "old", "not_after": "2026-01-01T00:00:00Z", "expires_in": -7200.0}],
        }
        text = cli.formatStatus(document, "u")
        self.assertEqual(rows(text, "Tunnels")[0][6], "STATE")
        self.assertEqual(rows(text, "Tunnels")[1][:1] + rows(text, "Tunnels")[1][6:7], ["-", "spliced"])
        self.assertIn("\nExposures: none\n", text)
        self.assertIn("\nDialers waiting: none\n", text)
        self.assertEqual(rows(text, "Certificates")[1][2], "EXPIRED 2h00m ago")

    def test_cluster(self) -> None:
        """
        A clustered TP's document has a C{cluster} part: a line with the
        instance, whether the routing store answers and the live
        instances, then the routes held elsewhere with their holders.
        Without it (one instance) neither appears.
        """
        cluster = {
            "instance": "tp-3",
            "store_up": False,
            "instances": [{"id": "tp-1", "advertise": "10.0.0.1:7443"}, {"id": "tp-3", "advertise": "10.0.0.3:7443"}],
            "remote": [
                {"kind": "public", "port": 40022, "name": None, "identity": "alice", "instances": ["tp-1", "tp-2"]},
                {"kind": "e2e", "port": None, "name": "nas.example.org", "identity": "bob", "instances": []},
            ],
        }
        text = cli.formatStatus({**DOCUMENT, "cluster": cluster}, "u")
        self.assertIn("\nCluster: instance tp-3, routing store UNAVAILABLE, live instances: tp-1, tp-3\n", text)
        self.assertEqual(
            rows(text, "Routed to other instances"),
            [["KIND", "PORT/NAME", "IDENTITY", "HELD AT"], ["public", "40022", "alice", "tp-1, tp-2"], ["e2e", "nas.example.org", "bob", "-"]],
        )
        self.assertNotIn("Cluster", cli.formatStatus(DOCUMENT, "u"))

    def test_units(self) -> None:
        self.assertEqual(
            [cli.formatDuration(s) for s in (0.25, 59.94, 60, 3599, 3600, 86399, 90000, None)],
            ["0.2s", "59.9s", "1m00s", "59m59s", "1h00m", "23h59m", "1d1h", "-"],
        )
        self.assertEqual(
            [cli.formatBytes(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 1024**3, None)],
            ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "3.0 GiB", "-"],
        )


class OptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("TP_")})
        os.environ["XDG_CONFIG_HOME"] = str(Path(self.mktemp()).absolute())

    def request(self, *argv: str) -> cli.StatusRequest:
        return cli.statusRequest(cli.buildParser().parse_args(["status", *argv]))

    def test_urls(self) -> None:
        """
        The default admin URL, and C{/status} added to the one given.
        """
        self.assertEqual(self.request().url, "http://127.0.0.1:9090/status")
        self.assertEqual(self.request("--admin", "http://[::1]:9091/").url, "http://[::1]:9091/status")
        self.assertEqual(self.request("--admin", "http://tp.example:9091/status").url, "http://tp.example:9091/status")
        self.assertIsNone(self.request().tls)

    def test_badURL(self) -> None:
        for url in ("ftp://x:1", "127.0.0.1:9090", "http://x:99999"):
            error = self.assertRaises(cli.UsageError, self.request, "--admin", url)
            self.assertIn("--admin", str(error))

    def test_httpsNeedsCertificate(self) -> None:
        error = self.assertRaises(cli.UsageError, self.request, "--admin", "https://127.0.0.1:9090")
        self.assertIn("--cert, --key, --ca: needed for an https admin listener", str(error))


class StatusCommandTests(TestCase):
    """
    The C{tp status} process against a live admin listener.
    """

    timeout = 60

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.env = cleanEnv(XDG_CONFIG_HOME=str(Path(self.mktemp()).absolute()))

    def serve(self, identities: frozenset[str] | None = None, tls: bool = False) -> int:
        """
        TP's admin site serving L{DOCUMENT} on a loopback port (mutual TLS
        with TP's checks when C{tls}); its port.
        """
        factory: Any = adminSite(Metrics(), identities, status=lambda: DOCUMENT)
        if tls:
            d = self.pki.directory
            context = ServerTLS(
                loadCertificates(str(d / "server.pem")),
                loadKey(str(d / "server.key")),
                [self.pki.ca.cert],
                ClientCertChecker(),
                alpn=(b"http/1.1",),
            )
            factory = TLSMemoryBIOFactory(context, False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    def status(self, *argv: str) -> defer.Deferred[Any]:
        return run(tpCommand() + ["status", *argv], env=self.env)

    def assertOneLine(self, result: Any, status: int, *fragments: str) -> None:
        self.assertEqual(result.status, status, result)
        self.assertEqual(result.out, b"")
        lines = result.err.decode().splitlines()
        self.assertEqual(len(lines), 1, result.err)
        self.assertTrue(lines[0].startswith("tp status: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    @defer.inlineCallbacks
    def test_tables(self) -> Any:
        port = self.serve()
        result = yield self.status("--admin", f"http://127.0.0.1:{port}")
        self.assertEqual(result.status, 0, result)
        text = result.out.decode()
        self.assertIn(f"TP at http://127.0.0.1:{port}: up 12.5s", text)
        self.assertIn(["alice", "connect", "127.0.0.1:22", "tcp", "tls", "127.0.0.1:50123", "100 B", "2.0 KiB", "3.2s"], rows(text, "Tunnels"))
        self.assertIn(["e2e", "nas.example.org", "bob", "tls", "5.0s"], rows(text, "Exposures"))
        self.assertIn(["nas.example.org", "carol", "0.5s"], rows(text, "Dialers waiting"))
        self.assertIn(["tp", "2026-12-05T10:00:00Z", "19h26m"], rows(text, "Certificates"))
        self.assertEqual(result.err, b"")

    @defer.inlineCallbacks
    def test_json(self) -> Any:
        """
        C{--json} prints the document as TP sent it.
        """
        port = self.serve()
        result = yield self.status("--admin", f"http://127.0.0.1:{port}", "--json")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, json.dumps(DOCUMENT, indent=1).encode() + b"\n")

    @defer.inlineCallbacks
    def test_configKeyAdmin(self) -> Any:
        """
        Without C{--admin}, the client config's C{admin} key names the
        listener.
        """
        port = self.serve()
        config = self.pki.directory / "client.toml"
        config.write_text(f'admin = "http://127.0.0.1:{port}"\n')
        result = yield self.status("--config", str(config), "--json")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(json.loads(result.out), DOCUMENT)

    @defer.inlineCallbacks
    def test_notListening(self) -> Any:
        port = freePort()
        result = yield self.status("--admin", f"http://127.0.0.1:{port}")
        self.assertOneLine(result, 1, f"http://127.0.0.1:{port}/status", "connection refused", "is [admin] listen set in the server config")

    @defer.inlineCallbacks
    def test_forbidden(self) -> Any:
        """
        A listener that serves only listed identities answers plain HTTP
        with 403: one line, exit 3, and what to do.
        """
        port = self.serve(identities=frozenset({"alice"}))
        result = yield self.status("--admin", f"http://127.0.0.1:{port}")
        self.assertOneLine(result, 3, "refused: The admin listener needs a client certificate", "use https://")

    def clientConfig(self, name: str) -> str:
        cert, key = self.pki.client(name)
        path = self.pki.directory / f"{name}.toml"
        path.write_text(f'cert = "{cert}"\nkey = "{key}"\nca = "{self.pki.caPath}"\n')
        return str(path)

    @defer.inlineCallbacks
    def test_https(self) -> Any:
        """
        Over https, C{tp status} checks TP's certificate and presents the
        client certificate of its config; an identity the listener does
        not list is refused in one line.
        """
        port = self.serve(identities=frozenset({"alice"}), tls=True)
        result = yield self.status("--config", self.clientConfig("alice"), "--admin", f"https://localhost:{port}")
        self.assertEqual(result.status, 0, result)
        self.assertIn(["tp", "2026-12-05T10:00:00Z", "19h26m"], rows(result.out.decode(), "Certificates"))
        result = yield self.status("--config", self.clientConfig("bob"), "--admin", f"https://localhost:{port}")
        self.assertOneLine(result, 3, "refused: bob may not use the admin listener")

    @defer.inlineCallbacks
    def test_httpsWrongCA(self) -> Any:
        port = self.serve(identities=frozenset({"alice"}), tls=True)
        other = TestPKI.create(self.mktemp())
        result = yield self.status("--config", self.clientConfig("alice"), "--ca", other.caPath, "--admin", f"https://localhost:{port}")
        self.assertOneLine(result, 1, "TLS handshake with TP's admin listener", "certificate verify failed")

    @defer.inlineCallbacks
    def test_httpToTLS(self) -> Any:
        """
        Plain HTTP to a listener that speaks TLS: one line that says to use
        https://.
        """
        port = self.serve(identities=frozenset({"alice"}), tls=True)
        result = yield self.status("--admin", f"http://127.0.0.1:{port}", "--connect-timeout", "5")
        self.assertOneLine(result, 1, "use https://")
