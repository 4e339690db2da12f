"""
Tests for L{tpproxy.reload} and the admin listener's C{/status} and
C{/reload}: a real TP from L{makeService} on loopback, real TLS tunnels
from threads with client certificates made at test time, and config files
rewritten between reloads.
"""

from __future__ import annotations

import datetime
import json
import re
import socket
import ssl as stdlib_ssl
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from tpproxy.service import makeService
from tpproxy.test.support import (
    Background,
    Echo,
    auditObserver,
    audits,
    deferLater,
    freePort,
    listenLocal,
    run,
    tpCommand,
    twistCommand,
    waitForPort,
    waitUntilRefused,
)
from tpproxy.testing import TestPKI
from tpproxy.wire import ClientHello, FrameDecoder


class Tunnel:
    """
    A blocking TP client tunnel (TLS 1.3, ALPN tp/1, a client certificate)
    to an echo server; use its methods from a thread.
    """

    def __init__(self, pki: TestPKI, port: int, name: str, host: str, destination: int) -> None:
        ctx = stdlib_ssl.create_default_context(cafile=pki.caPath)
        ctx.load_cert_chain(str(pki.directory / f"{name}.pem"), str(pki.directory / f"{name}.key"))
        ctx.set_alpn_protocols(["tp/1"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.sock.sendall(ClientHello.connect(host, destination).toFrame())
        decoder = FrameDecoder()
        while True:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("TP closed before its ServerHello")
            hello = decoder.feedFrame(chunk)
            if hello is not None:
                break
        self.hello = hello
        self.rest = decoder.takeRest()

    def echo(self, data: bytes) -> bytes:
        """
        Send C{data}, read the same number of bytes back; C{b""} if the
        tunnel is closed.
        """
        try:
            self.sock.sendall(data)
            got = self.rest
            self.rest = b""
            while len(got) < len(data):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b""
                got += chunk
            return got
        except (OSError, stdlib_ssl.SSLError):
            return b""

    def close(self) -> None:
        self.sock.close()


class ReloadTestCase(TestCase):
    timeout = 120
    #: server.quic in the configs written.
    quic = "false"

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        for name in ("alice", "bob", "carol"):
            self.pki.client(name)
        self.echoPort, _ = listenLocal(self, Echo)
        self.observer = auditObserver(self)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.configPath = self.pki.directory / "tp.toml"

    def writeConfig(self, identities: list[str], deny: list[str] = (), extra: str = "") -> None:
        """
        A config that lets C{identities} reach the echo port, and nothing
        else.
        """
        rules = "".join(
            f'\n[[rules]]\nidentities = "{name}"\nhosts = ["127.0.0.1/32"]\nports = [{self.echoPort}]\n' for name in identities
        )
        denied = ", ".join(f'"{d}"' for d in deny)
        self.configPath.write_text(
            f'[server]\nlisten = "tcp:{self.port}:interface=127.0.0.1"\ncertificate = "server.pem"\nkey = "server.key"\n'
            f'client_ca = "ca.pem"\nquic = {self.quic}\n\n[deny]\nidentities = [{denied}]\n\n'
            f'[admin]\nlisten = "tcp:{self.adminPort}:interface=127.0.0.1"\n{extra}{rules}'
        )

    def startTP(self, identities: list[str], extra: str = "") -> None:
        from tpproxy.config import loadServerConfig

        self.port = freePort()
        self.adminPort = freePort()
        self.writeConfig(identities, extra=extra)
        self.service = makeService(loadServerConfig(self.configPath), reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.stopService() if self.service.running else None)
        self.reloader = self.service.reloader  # type: ignore[attr-defined]

    def clientConfig(self, name: str) -> str:
        path = self.pki.directory / f"{name}-client.toml"
        d = self.pki.directory
        path.write_text(f'server = "localhost:{self.port}"\ncert = "{d / name}.pem"\nkey = "{d / name}.key"\nca = "{self.pki.caPath}"\n')
        return str(path)

    @defer.inlineCallbacks
    def tunnel(self, name: str) -> Any:
        t = yield deferToThread(Tunnel, self.pki, self.port, name, "127.0.0.1", self.echoPort)
        self.addCleanup(t.close)
        return t

    @defer.inlineCallbacks
    def waitForAudit(self, **fields: Any) -> Any:
        """
        The first audit event with C{fields}, waiting up to 10 s for it.
        """
        for _ in range(500):
            for event in audits(self.observer):
                if all(event.get(k) == v for k, v in fields.items()):
                    return event
            yield deferLater(0.02)
        self.fail(f"no audit event with {fields}: {[ (e.get('identity'), e.get('result')) for e in audits(self.observer)]}")


class RevocationTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_ruleRemovedCutsOnlyThatIdentity(self) -> Any:
        """
        A reload that removes alice's rule closes alice's live tunnel within
        a second, audited as C{revoked} with the reason; bob's tunnel,
        opened before the reload, keeps echoing; a new tunnel for alice is
        refused.
        """
        self.startTP(["alice", "bob"])
        alice = yield self.tunnel("alice")
        bob = yield self.tunnel("bob")
        self.assertEqual((alice.hello["ok"], bob.hello["ok"]), (True, True))
        self.assertEqual((yield deferToThread(alice.echo, b"a1")), b"a1")
        self.writeConfig(["bob"])
        before = reactor.seconds()
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        self.assertIn("1 live connection(s) closed", summary)
        event = yield self.waitForAudit(identity="alice", result="revoked")
        self.assertLess(reactor.seconds() - before, 1.0)
        self.assertIn("no longer allowed", event["detail"])
        self.assertIn(f"127.0.0.1:{self.echoPort}", event["detail"])
        self.assertEqual((yield deferToThread(alice.echo, b"a2")), b"")
        self.assertEqual((yield deferToThread(bob.echo, b"still here")), b"still here")
        again = yield self.tunnel("alice")
        self.assertEqual((again.hello["ok"], again.hello["error"]), (False, "forbidden"))

    @defer.inlineCallbacks
    def test_denyListRevokes(self) -> Any:
        """
        Adding an identity to the deny list closes its live tunnels: zero
        trust applies to connections made before the change.
        """
        self.startTP(["alice", "bob"])
        alice = yield self.tunnel("alice")
        bob = yield self.tunnel("bob")
        self.writeConfig(["alice", "bob"], deny=["alice"])
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        event = yield self.waitForAudit(identity="alice", result="revoked")
        self.assertIn("deny", event["detail"])
        self.assertEqual((yield deferToThread(bob.echo, b"b")), b"b")
        self.assertEqual((yield deferToThread(alice.echo, b"a")), b"")

    @defer.inlineCallbacks
    def test_badConfigKeepsOld(self) -> Any:
        """
        A config that fails validation (TOML error, unknown key, missing
        certificate file) is rejected with the start-up message; the old
        policy stays in force, live tunnels stay, and the metrics count the
        rejections.
        """
        self.startTP(["alice"])
        alice = yield self.tunnel("alice")
        good = self.configPath.read_text()
        broken = {
            "this is = not [toml": "bad configuration:",
            good + "\n[server2]\nx = 1\n": "bad configuration: unknown key(s) server2",
            good.replace('certificate = "server.pem"', 'certificate = "gone.pem"'): "bad configuration: server.certificate",
        }
        for text, message in broken.items():
            self.configPath.write_text(text)
            ok, error = self.reloader.reload()
            self.assertFalse(ok)
            self.assertTrue(error.startswith(message), error)
            self.assertNotIn("\n", error)
        self.assertEqual(self.reloader.generation, 1)
        self.assertEqual((yield deferToThread(alice.echo, b"alive")), b"alive")
        fresh = yield self.tunnel("alice")
        self.assertTrue(fresh.hello["ok"])
        response = yield treq.get(f"http://127.0.0.1:{self.adminPort}/metrics", pool=self.pool)
        body = yield response.text()
        self.assertIn('tp_config_reloads_total{result="rejected"} 3.0', body)
        self.assertIn("tp_config_last_reload_success 0.0", body)

    @defer.inlineCallbacks
    def test_newRuleAppliesToNewTunnels(self) -> Any:
        """
        A reload that adds a rule lets the identity in from then on.
        """
        self.startTP(["alice"])
        refused = yield self.tunnel("carol")
        self.assertEqual(refused.hello["error"], "forbidden")
        self.writeConfig(["alice", "carol"])
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        self.assertIn("generation 2", summary)
        carol = yield self.tunnel("carol")
        self.assertEqual((yield deferToThread(carol.echo, b"c")), b"c")

    @defer.inlineCallbacks
    def test_listenerChangeNeedsRestart(self) -> Any:
        """
        A changed listener address is not applied and the summary says it
        needs a restart; the old listener keeps serving.
        """
        self.startTP(["alice"])
        text = self.configPath.read_text().replace(f"tcp:{self.port}:", f"tcp:{freePort()}:")
        self.configPath.write_text(text)
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        self.assertIn("not applied until a restart: server.listen", summary)
        alice = yield self.tunnel("alice")
        self.assertTrue(alice.hello["ok"])


class AdminTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_statusAndReload(self) -> Any:
        """
        C{/status} lists a live tunnel with its identity, destination,
        carrier and bytes, and TP's certificate; C{POST /reload} reloads
        (200) or refuses a bad file (422) with the message.
        """
        self.startTP(["alice"])
        alice = yield self.tunnel("alice")
        self.assertEqual((yield deferToThread(alice.echo, b"12345")), b"12345")
        response = yield treq.get(f"http://127.0.0.1:{self.adminPort}/status", pool=self.pool)
        status = json.loads((yield response.text()))
        self.assertEqual(status["version"], 1)
        self.assertEqual(status["server"]["generation"], 1)
        self.assertEqual(status["server"]["config"], str(self.configPath))
        [tunnel] = status["tunnels"]
        self.assertEqual(
            {k: tunnel[k] for k in ("identity", "op", "destination", "transport", "via", "bytes_up", "bytes_down")},
            {
                "identity": "alice",
                "op": "connect",
                "destination": f"127.0.0.1:{self.echoPort}",
                "transport": "tcp",
                "via": "tls",
                "bytes_up": 5,
                "bytes_down": 5,
            },
        )
        self.assertEqual([c["name"] for c in status["certificates"]], ["tp"])
        response = yield treq.get(f"http://127.0.0.1:{self.adminPort}/metrics", pool=self.pool)
        metrics = yield response.text()
        self.assertIn('tp_tunnels{op="connect",via="tls"} 1.0', metrics)
        self.assertIn("tp_identities_active 1.0", metrics)
        self.assertGreater(status["certificates"][0]["expires_in"], 3600)
        response = yield treq.post(f"http://127.0.0.1:{self.adminPort}/reload", pool=self.pool)
        self.assertEqual(response.code, 200)
        self.assertTrue(json.loads((yield response.text()))["ok"])
        self.configPath.write_text("[server\n")
        response = yield treq.post(f"http://127.0.0.1:{self.adminPort}/reload", pool=self.pool)
        self.assertEqual(response.code, 422)
        answer = json.loads((yield response.text()))
        self.assertEqual(answer["ok"], False)
        self.assertTrue(answer["message"].startswith("bad configuration:"))
        response = yield treq.get(f"http://127.0.0.1:{self.adminPort}/status", pool=self.pool)
        self.assertEqual(json.loads((yield response.text()))["server"]["generation"], 2)


class QuicRevocationTests(ReloadTestCase):
    @property
    def quic(self) -> str:  # type: ignore[override]
        return f'["127.0.0.1:{self.port}"]'

    @defer.inlineCallbacks
    def test_quicTunnelRevoked(self) -> Any:
        """
        A tunnel carried on a QUIC stream (a real C{tp connect --transport
        quic}) is revoked like a TLS one: closed, audited with C{via}
        quic, and the client exits.
        """
        self.startTP(["alice", "bob"])
        argv = tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "quic", "connect", f"127.0.0.1:{self.echoPort}"]
        alice = Background(self, argv)
        alice.transport.write(b"over quic\n")
        for _ in range(500):
            if b"over quic\n" in b"".join(alice.proto.out):
                break
            yield deferLater(0.02)
        else:
            self.fail(f"no echo over QUIC: {alice.stderr.decode()}")
        self.writeConfig(["bob"])
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        event = yield self.waitForAudit(identity="alice", result="revoked")
        self.assertEqual(event["via"], "quic")
        yield alice.proto.done


class DrainTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_tunnelsFinishThenStop(self) -> Any:
        """
        On stop, TP takes no new connections and tells its exposer to go
        away, while a live tunnel keeps echoing; when that tunnel ends,
        the stop completes, well before the drain timeout.
        """
        self.startTP(["alice"], extra='[reverse]\npublic_interface = "127.0.0.1"\n\n[[exposures]]\nidentities = ["bob"]\npublic_ports = "1024-65535"\n\n')
        self.configPath.write_text(self.configPath.read_text().replace("quic = false\n", "quic = false\ndrain_timeout = 60\n"))
        self.assertTrue(self.reloader.reload()[0])
        alice = yield self.tunnel("alice")
        argv = tpCommand() + ["--config", self.clientConfig("bob"), "--transport", "tls", "expose", f"127.0.0.1:{self.echoPort}", "--public"]
        exposer = Background(self, argv)
        yield exposer.waitForStderr(b"; Ctrl-C stops")
        started = reactor.seconds()
        stopping = self.service.stopService()
        self.assertNoResult(stopping)
        told = [e for e in self.observer if "told to go away" in str(e.get("log_format", ""))]
        self.assertEqual(told[0]["told"], 1)
        self.assertEqual(told[0]["tunnels"], 1)
        yield waitUntilRefused(self.port, "TP's listener while stopping")
        self.assertEqual((yield deferToThread(alice.echo, b"still draining")), b"still draining")
        self.assertNoResult(stopping)
        yield deferToThread(alice.close)
        yield stopping
        self.assertLess(reactor.seconds() - started, 30)
        event = yield self.waitForAudit(identity="alice", event="connect")
        self.assertEqual(event["result"], "ok")
        listen = yield self.waitForAudit(identity="bob", event="listen")
        self.assertEqual((listen["result"], listen["detail"]), ("drained", "TP stopped"))

    @defer.inlineCallbacks
    def test_drainTimeout(self) -> Any:
        """
        A tunnel still open at the drain timeout is closed, audited as
        C{drained}.
        """
        self.startTP(["alice"])
        self.configPath.write_text(self.configPath.read_text().replace("quic = false\n", "quic = false\ndrain_timeout = 1\n"))
        self.assertTrue(self.reloader.reload()[0])
        alice = yield self.tunnel("alice")
        yield self.service.stopService()
        event = yield self.waitForAudit(identity="alice", event="connect")
        self.assertEqual(event["result"], "drained")
        self.assertIn("drain timeout (1 s) ended", event["detail"])
        self.assertEqual((yield deferToThread(alice.echo, b"x")), b"")


class ExpiryTests(ReloadTestCase):
    def shortLived(self, name: str, seconds: float) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        self.pki.client(name, notBefore=now - datetime.timedelta(minutes=1), notAfter=now + datetime.timedelta(seconds=seconds))

    @defer.inlineCallbacks
    def test_closedAtNotAfter(self) -> Any:
        """
        A tunnel whose client certificate expires is closed at its notAfter,
        audited as C{expired}.
        """
        self.startTP(["dave"])
        self.shortLived("dave", 3)
        dave = yield self.tunnel("dave")
        self.assertEqual((yield deferToThread(dave.echo, b"d")), b"d")
        event = yield self.waitForAudit(identity="dave", result="expired")
        self.assertIn("the client certificate expired at", event["detail"])
        self.assertEqual((yield deferToThread(dave.echo, b"d")), b"")

    @defer.inlineCallbacks
    def test_renewedIdentityKeepsItsTunnels(self) -> Any:
        """
        A tunnel opened with a certificate about to expire goes on past its
        notAfter once the same identity has completed a handshake with a
        renewed certificate (what a long-running client does, client.md);
        without that renewal, the same kind of tunnel ends at notAfter.
        """
        self.startTP(["frank", "gina"])
        self.shortLived("frank", 3)
        self.shortLived("gina", 3)
        frank = yield self.tunnel("frank")
        gina = yield self.tunnel("gina")
        notAfter = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
        self.pki.client("frank")  # renewed: a day, same identity, new serial
        renewed = yield self.tunnel("frank")
        self.assertTrue(renewed.hello["ok"])
        yield self.waitForAudit(identity="gina", result="expired")
        while datetime.datetime.now(datetime.timezone.utc) < notAfter + datetime.timedelta(seconds=1):
            yield deferLater(0.2)
        self.assertEqual((yield deferToThread(frank.echo, b"past notAfter")), b"past notAfter")
        self.assertEqual((yield deferToThread(gina.echo, b"x")), b"")
        self.assertFalse([e for e in audits(self.observer) if e.get("identity") == "frank"])

    @defer.inlineCallbacks
    def test_keptWhenTurnedOff(self) -> Any:
        """
        With C{disconnect_expired_cert = false}, the tunnel still echoes
        after its certificate's notAfter has passed.
        """
        self.startTP(["erin"], extra="")
        self.configPath.write_text(
            self.configPath.read_text().replace("quic = false\n", "quic = false\ndisconnect_expired_cert = false\n")
        )
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        self.shortLived("erin", 2)
        erin = yield self.tunnel("erin")
        notAfter = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
        while datetime.datetime.now(datetime.timezone.utc) < notAfter + datetime.timedelta(seconds=1):
            self.assertEqual((yield deferToThread(erin.echo, b"e")), b"e")
            yield deferLater(0.2)
        self.assertFalse([e for e in audits(self.observer) if e.get("identity") == "erin"])


class SignalTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_sighup(self) -> Any:
        """
        C{SIGHUP} to a real C{twist tp} reloads its config file; a bad file
        is refused with the one-line message and the process keeps serving.
        """
        pki = TestPKI.create(self.mktemp())
        port = freePort()
        path = Path(pki.directory) / "tp.toml"
        base = (
            f'[server]\nlisten = "tcp:{port}:interface=127.0.0.1"\ncertificate = "server.pem"\nkey = "server.key"\n'
            'client_ca = "ca.pem"\nquic = false\n'
        )
        path.write_text(base)
        proc = Background(self, twistCommand() + ["--log-format", "text", "--log-file", "+", "tp", "--config", str(path)])
        yield waitForPort(port)
        path.write_text(base + '\n[[rules]]\nidentities = "*"\nhosts = ["127.0.0.1/32"]\nports = [22]\n')
        proc.transport.signalProcess("HUP")
        yield proc.waitForStderr(b"generation 2: 1 policy rule(s)")
        path.write_text(base + "\nbogus = 1\n")
        proc.transport.signalProcess("HUP")
        yield proc.waitForStderr(b"Reload of " + str(path).encode() + b" rejected")
        yield waitForPort(port)


class ExposureRevocationTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_exposureRuleRemoved(self) -> Any:
        """
        A reload whose exposure rules no longer let alice expose public
        ports closes her exposure (audited C{revoked}) and its port stops
        accepting; bob's exposure, still allowed, keeps its port.
        """
        rules = (
            '[reverse]\npublic_interface = "127.0.0.1"\n\n'
            '[[exposures]]\nidentities = ["{who}"]\npublic_ports = "1024-65535"\n\n'
        )
        self.startTP(["alice"], extra=rules.format(who='alice", "bob'))
        exposers = {}
        for name in ("alice", "bob"):
            argv = tpCommand() + ["--config", self.clientConfig(name), "--transport", "tls", "expose", f"127.0.0.1:{self.echoPort}", "--public"]
            proc = Background(self, argv)
            try:
                line = yield proc.waitForStderr(b"; Ctrl-C stops")
            except defer.TimeoutError:
                self.fail(f"tp expose for {name} did not register: {proc.stderr.decode()}")
            exposers[name] = int(re.search(rb"as public port (\d+)", line).group(1))
        self.writeConfig(["alice"], extra=rules.format(who="bob"))
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        event = yield self.waitForAudit(identity="alice", event="listen", result="revoked")
        self.assertIn(f"public port {exposers['alice']} may no longer be exposed", event["detail"])
        yield waitUntilRefused(exposers["alice"], "alice's revoked public port")
        got = yield deferToThread(echoOnce, exposers["bob"], b"via bob")
        self.assertEqual(got, b"via bob")


def echoOnce(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        return got


class DialerRevocationTests(ReloadTestCase):
    @defer.inlineCallbacks
    def waitForOutput(self, proc: Background, data: bytes) -> Any:
        for _ in range(500):
            if data in b"".join(proc.proto.out):
                return
            yield deferLater(0.02)
        self.fail(f"no {data!r} on stdout; stderr: {proc.stderr.decode()}")

    @defer.inlineCallbacks
    def test_dialerRemovedFromExposureRule(self) -> Any:
        """
        bob and carol each hold an E2E tunnel (TLS inside a TP tunnel, a
        real C{tp connect}) to alice's exposure; a reload that leaves only
        carol among the rule's dialers closes bob's tunnel (audited
        C{revoked}, naming the exposure rule) and carol's keeps echoing.
        """
        rules = (
            '[reverse]\npublic_interface = "127.0.0.1"\n\n[e2e]\nca_certificate = "ca.pem"\nca_key = "ca.key"\n\n'
            '[[exposures]]\nidentities = ["alice"]\nnames = "*.localhost"\ndialers = [{dialers}]\n\n'
            '[[rules]]\nidentities = "*"\nhosts = "*.localhost"\nports = "*"\n'
        )
        self.startTP([], extra=rules.format(dialers='"bob", "carol"'))
        argv = tpCommand() + ["--config", self.clientConfig("alice"), "--transport", "tls", "expose", f"127.0.0.1:{self.echoPort}", "--e2e", "svc.localhost"]
        exposer = Background(self, argv)
        yield exposer.waitForStderr(b"; Ctrl-C stops")
        dialers = {}
        for name in ("bob", "carol"):
            proc = Background(self, tpCommand() + ["--config", self.clientConfig(name), "--transport", "tls", "connect", "svc.localhost:1"])
            proc.transport.write(f"hello from {name}\n".encode())
            yield self.waitForOutput(proc, f"hello from {name}\n".encode())
            dialers[name] = proc
        self.writeConfig([], extra=rules.format(dialers='"carol"'))
        ok, summary = self.reloader.reload()
        self.assertTrue(ok, summary)
        event = yield self.waitForAudit(identity="bob", result="revoked")
        self.assertIn("may no longer dial svc.localhost", event["detail"])
        self.assertIn("exposures[1]", event["detail"])
        result = yield dialers["bob"].proto.done
        self.assertNotEqual(result.status, None)
        dialers["carol"].transport.write(b"carol again\n")
        yield self.waitForOutput(dialers["carol"], b"carol again\n")


class LimitTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_tunnelsPerIdentity(self) -> Any:
        """
        Past C{tunnels_per_identity}, a new tunnel of that identity is
        refused with C{limit_exceeded} naming the key, another identity is
        still served, and the place comes back when a tunnel ends.
        """
        self.startTP(["alice", "bob"], extra="[limits]\ntunnels_per_identity = 2\n\n")
        first = yield self.tunnel("alice")
        yield self.tunnel("alice")
        third = yield self.tunnel("alice")
        self.assertEqual((third.hello["ok"], third.hello["error"]), (False, "limit_exceeded"))
        self.assertIn("limits.tunnels_per_identity", third.hello["message"])
        bob = yield self.tunnel("bob")
        self.assertTrue(bob.hello["ok"])
        yield deferToThread(first.close)
        yield self.waitForAudit(identity="alice", result="ok")
        again = yield self.tunnel("alice")
        self.assertTrue(again.hello["ok"], again.hello)

    @defer.inlineCallbacks
    def test_perMinute(self) -> Any:
        """
        More than C{tunnels_per_identity_per_minute} new tunnels in a burst:
        the next is refused, although none is open any more.
        """
        self.startTP(["alice"], extra="[limits]\ntunnels_per_identity_per_minute = 3\n\n")
        for _ in range(3):
            t = yield self.tunnel("alice")
            self.assertTrue(t.hello["ok"])
            yield deferToThread(t.close)
        fourth = yield self.tunnel("alice")
        self.assertEqual(fourth.hello["error"], "limit_exceeded")
        self.assertIn("per_minute", fourth.hello["message"])

    @defer.inlineCallbacks
    def test_globalCap(self) -> Any:
        """
        C{tunnels} caps all identities together.
        """
        self.startTP(["alice", "bob"], extra="[limits]\ntunnels = 1\n\n")
        alice = yield self.tunnel("alice")
        self.assertTrue(alice.hello["ok"])
        bob = yield self.tunnel("bob")
        self.assertEqual(bob.hello["error"], "limit_exceeded")
        self.assertIn("limits.tunnels)", bob.hello["message"])

    @defer.inlineCallbacks
    def test_exposuresPerIdentity(self) -> Any:
        """
        A second exposure of an identity allowed one is refused with
        C{limit_exceeded}; C{tp expose} says so.
        """
        self.startTP(
            [],
            extra='[limits]\nexposures_per_identity = 1\n\n[reverse]\npublic_interface = "127.0.0.1"\n\n'
            '[[exposures]]\nidentities = ["bob"]\npublic_ports = "1024-65535"\n\n',
        )
        argv = tpCommand() + ["--config", self.clientConfig("bob"), "--transport", "tls", "expose", f"127.0.0.1:{self.echoPort}", "--public"]
        first = Background(self, argv)
        yield first.waitForStderr(b"; Ctrl-C stops")
        second = yield run(argv, stdin=None, timeout=60)
        self.assertNotEqual(second.status, 0)
        self.assertIn(b"limits.exposures_per_identity", second.err)

    @defer.inlineCallbacks
    def test_idleTimeout(self) -> Any:
        """
        With C{idle_timeout = 1}, a silent tunnel is closed (audited
        C{idle}) while one that keeps echoing lives on past it.
        """
        self.startTP(["alice", "bob"], extra="[limits]\nidle_timeout = 1\n\n")
        silent = yield self.tunnel("alice")
        busy = yield self.tunnel("bob")
        for _ in range(15):
            self.assertEqual((yield deferToThread(busy.echo, b"b")), b"b")
            yield deferLater(0.2)
        event = yield self.waitForAudit(identity="alice", result="idle")
        self.assertIn("limits.idle_timeout", event["detail"])
        self.assertEqual((yield deferToThread(silent.echo, b"a")), b"")
        self.assertFalse([e for e in audits(self.observer) if e.get("identity") == "bob"])

    @defer.inlineCallbacks
    def test_notExposed(self) -> Any:
        """
        C{connect} to a name only an exposure can have, which nobody
        exposes now, is refused with C{not_exposed}, not as a name that
        did not resolve; a name no exposure rule names still gets
        C{resolve_failed}.
        """
        self.startTP(
            [],
            extra='[[exposures]]\nidentities = ["bob"]\nnames = "*.tp-test.invalid"\ndialers = ["alice"]\n\n'
            '[[rules]]\nidentities = "*"\nhosts = "*.invalid"\nports = "*"\n',
        )
        t = yield deferToThread(Tunnel, self.pki, self.port, "alice", "svc.tp-test.invalid", 22)
        self.addCleanup(t.close)
        self.assertEqual((t.hello["error"], t.hello["message"]), ("not_exposed", "nobody exposes svc.tp-test.invalid right now"))
        other = yield deferToThread(Tunnel, self.pki, self.port, "alice", "svc.elsewhere.invalid", 22)
        self.addCleanup(other.close)
        self.assertEqual(other.hello["error"], "resolve_failed")


class StatusCommandTests(ReloadTestCase):
    @defer.inlineCallbacks
    def test_tpStatusAgainstLiveTP(self) -> Any:
        """
        C{tp status} reads a live TP's C{/status}: the table names the
        tunnel's identity and destination, and C{--json} is the document
        TP serves.
        """
        self.startTP(["alice"])
        alice = yield self.tunnel("alice")
        self.assertEqual((yield deferToThread(alice.echo, b"status")), b"status")
        admin = f"http://127.0.0.1:{self.adminPort}"
        table = yield run(tpCommand() + ["status", "--admin", admin], stdin=None, timeout=60)
        self.assertEqual(table.status, 0, table.err)
        self.assertIn(b"alice", table.out)
        self.assertIn(f"127.0.0.1:{self.echoPort}".encode(), table.out)
        raw = yield run(tpCommand() + ["status", "--admin", admin, "--json"], stdin=None, timeout=60)
        document = json.loads(raw.out)
        self.assertEqual([t["identity"] for t in document["tunnels"]], ["alice"])
        self.assertEqual(document["server"]["generation"], 1)
