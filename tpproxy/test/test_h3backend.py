"""
TP's UDP port shared with a real HTTP/3 server (issue 14, part C;
L{tpproxy.transports.h3backend}): headless Chromium fetches a page over
h3 through TP's QUIC port from an aioquic HTTP/3 server behind it, while
C{tp --transport quic connect} works on the same port, and garbage or
truncated Initials disturb neither.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tpproxy.config import ConfigError, H3Backend, parseH3
from tpproxy.test.h3peers import fetchWithChromium, makeProfile, requireChromium, startH3Server
from tpproxy.test.support import Background, Echo, freePort, listenLocal, run, scrapeMetrics, tpCommand, twistCommand, waitForPort
from tpproxy.testing import TestPKI, loopbackServerTOML


class ConfigTests(TestCase):
    def test_backend(self) -> None:
        from pathlib import Path

        self.assertEqual(parseH3({"backend": "udp:127.0.0.1:8443"}, Path(".")), H3Backend("127.0.0.1", 8443))
        self.assertEqual(parseH3({"backend": "udp:[::1]:8443"}, Path(".")), H3Backend("::1", 8443))
        self.assertEqual(parseH3({"backend": "udp:localhost:8443"}, Path(".")), H3Backend("127.0.0.1", 8443))
        for bad in ({"backend": "tcp:127.0.0.1:8443"}, {"backend": "udp:www.example.org:8443"}, {"backend": "udp:127.0.0.1:0"},
                    {"backend": "udp:127.0.0.1:8443", "redirect": "https://x/"}, {"backend": 5}):
            with self.assertRaises(ConfigError):
                parseH3(bad, Path("."))


def realInitial(alpn: list[str]) -> bytes:
    """
    The first datagram of a real aioquic client offering C{alpn}.
    """
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=alpn, server_name="www.h3.test"))
    client.connect(("127.0.0.1", 443), now=0.0)
    return client.datagrams_to_send(now=0.0)[0][0]


class SharedPortTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        requireChromium()
        self.pki = TestPKI.create(self.mktemp())
        self.pki.client("alice")
        d = self.pki.directory
        # The web site's own certificate: TP's (for localhost) never reaches the browser.
        self.pki.ca.issue("www.h3.test", dns=("www.h3.test",), server=True).write(d / "site.pem", d / "site.key")
        self.marker = "tp-h3-" + os.urandom(8).hex()
        self.h3port, self.site = yield startH3Server(self, str(d / "site.pem"), str(d / "site.key"), marker=self.marker)
        self.echoPort, self.echo = listenLocal(self, Echo)
        self.port, self.admin = freePort(), freePort()
        config = d / "tp.toml"
        config.write_text(loopbackServerTOML(self.port, extra=f"""
[router]
backend = "tcp:127.0.0.1:{self.echoPort}"

[router.h3]
backend = "udp:127.0.0.1:{self.h3port}"

[admin]
listen = "tcp:{self.admin}:interface=127.0.0.1"
"""))
        self.client = d / "alice.toml"
        self.client.write_text(f'server = "127.0.0.1:{self.port}"\ncert = "{d / "alice.pem"}"\nkey = "{d / "alice.key"}"\nca = "{self.pki.caPath}"\n')
        self.server = Background(self, twistCommand() + ["--log-format=text", "--log-file=+", "tp", "--config", str(config)])
        yield self.server.waitForStderr(b"goes to the HTTP/3 server", timeout=60)
        yield waitForPort(self.port)
        yield waitForPort(self.admin)
        self.home = yield makeProfile(self.mktemp(), self.pki.ca.certPEM)

    def metrics(self) -> Any:
        return scrapeMetrics(f"http://127.0.0.1:{self.admin}/metrics")

    def fetch(self) -> defer.Deferred[str]:
        return fetchWithChromium(
            f"https://www.h3.test:{self.port}/", f"www.h3.test:{self.port}", self.home, resolve={"www.h3.test": "127.0.0.1"}
        )

    def tpConnect(self, payload: bytes) -> Any:
        return run(tpCommand() + ["--config", str(self.client), "--transport", "quic", "connect", f"127.0.0.1:{self.echoPort}"], stdin=payload)

    def garbage(self) -> int:
        """
        Send Initials that are not a client's: random bytes shaped as a v1
        Initial, a real Initial with one ciphertext byte flipped, and a
        real one cut short (under 1200 bytes: dropped before it is read).
        Answers how many reach the HTTP/3 router.
        """
        shaped = bytes([0xC3, 0, 0, 0, 1, 8]) + os.urandom(8) + bytes([0, 0]) + bytes([0x44, 0xD0]) + os.urandom(1300)
        real = realInitial(["h3"])
        flipped = real[:200] + bytes([real[200] ^ 0x55]) + real[201:]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for datagram in (shaped, flipped, real[:700]):
                s.sendto(datagram, ("127.0.0.1", self.port))
        return 2

    @defer.inlineCallbacks
    def test_browserAndTPShareThePort(self) -> Any:
        """
        Chromium gets the site's page over h3 through TP's UDP port (the
        site's own certificate: TP passes the connection untouched), at
        the same time as a QUIC tunnel echoes through TP on that port;
        garbage Initials before and between are dropped and counted, and
        neither side notices them.
        """
        sent = self.garbage()
        payload = os.urandom(256 * 1024)
        dom, echoed = yield defer.gatherResults([self.fetch(), self.tpConnect(payload)])
        self.assertIn(f'<p id="marker">{self.marker}</p>', dom)
        self.assertEqual((echoed.status, echoed.out), (0, payload), echoed.err)
        request = yield self.site.waitForRequest("/")
        self.assertEqual((request["alpn"], request["authority"]), ("h3", f"www.h3.test:{self.port}"))
        sent += self.garbage()
        dom = yield self.fetch()
        self.assertIn(self.marker, dom)
        echoed = yield self.tpConnect(b"after garbage")
        self.assertEqual(echoed.out, b"after garbage", echoed.err)
        m = yield self.metrics()
        self.assertGreaterEqual(m[("tp_quic_h3_backend_connections_total", ())], 2)
        self.assertGreater(m[("tp_quic_h3_backend_datagrams_total", (("direction", "to_backend"),))], 0)
        self.assertGreater(m[("tp_quic_h3_backend_datagrams_total", (("direction", "from_backend"),))], 0)
        self.assertEqual(m[("tp_quic_h3_backend_dropped_total", (("reason", "unreadable_initial"),))], sent)
        # The site saw its requests come from TP's address, not the browser's.
        self.assertTrue(all(r["peer"].startswith("127.0.0.1:") for r in self.site.requests))
        # TP's log has no traceback.
        self.assertNotIn(b"Traceback", self.server.stderr)
