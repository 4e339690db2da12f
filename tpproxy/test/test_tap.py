"""
The server's entry points: C{twist tp}, the .tac file, the embedded dev
default, and L{tpproxy.tap.makeService}.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet import defer
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

import tpproxy
from tpproxy import tap
from tpproxy.config import loadServerConfig
from tpproxy.devenv import ensureDevEnvironment, initDev
from tpproxy.test.support import (
    Background,
    HashSink,
    cleanEnv,
    freePort,
    listenLocal,
    run,
    sha256,
    tpCommand,
    twistCommand,
    waitForPort,
)
from tpproxy.testing import TestPKI

REPO = Path(tpproxy.__file__).resolve().parent.parent


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())

    def writeConfig(self, body: str) -> str:
        path = self.pki.directory / "server.toml"
        path.write_text(body)
        return str(path)

    def test_validConfig(self) -> None:
        """
        C{--config} loads the file, and makeService composes one listening
        service per C{listen} entry under a MultiService.
        """
        path = self.writeConfig(
            '[server]\nlisten = ["tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.2"]\n'
            'certificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n'
        )
        options = tap.Options()
        options.parseOptions(["--config", path])
        from twisted.internet.testing import MemoryReactorClock

        svc = tap.makeService(options, MemoryReactorClock())
        self.assertTrue(IServiceCollection.providedBy(svc))
        names = sorted(s.name for s in svc)  # type: ignore[attr-defined]
        self.assertEqual(names, ["drain", "memory", "metrics", "reload", "tls:tcp:0:interface=127.0.0.1", "tls:tcp:0:interface=127.0.0.2"])

    def test_badConfigNamesKey(self) -> None:
        """
        A bad value stops startup with a UsageError naming the key.
        """
        path = self.writeConfig(
            '[server]\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\nhello_timeout = -1\n'
        )
        options = tap.Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn("server.hello_timeout", str(error))

    def test_configFromEnvironment(self) -> None:
        """
        Without C{--config}, C{TP_CONFIG} names the file.
        """
        path = self.writeConfig('[server]\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n')
        self.patch(os, "environ", {**os.environ, "TP_CONFIG": path})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["serverConfig"].path, str(Path(path).resolve()))


class DevEnvironmentTests(SynchronousTestCase):
    def test_initDev(self) -> None:
        """
        C{initDev} writes a CA (key mode 0600), server and client
        certificates and configs that load.
        """
        home = Path(self.mktemp()).absolute()
        initDev(home, port=18999)
        for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key", "server.toml", "client.toml"):
            self.assertTrue((home / name).is_file(), name)
        self.assertEqual(stat.S_IMODE((home / "ca.key").stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE((home / "client.key").stat().st_mode), 0o600)
        config = loadServerConfig(home / "server.toml")
        self.assertIn("tcp:18999:interface=127.0.0.1", config.listen)
        decision = config.policy.check("dev", "127.0.0.1", "127.0.0.1", 22, "tcp")
        self.assertTrue(decision.allowed, decision)
        self.assertFalse(config.policy.check("dev", "10.0.0.1", "10.0.0.1", 22, "tcp").allowed)
        self.assertIn('server = "localhost:18999"', (home / "client.toml").read_text())

    def test_ensureRenewsExpiringClient(self) -> None:
        """
        An existing dev environment is kept, but its client certificate is
        renewed when it would expire within the hour.
        """
        home = Path(self.mktemp()).absolute()
        initDev(home)
        ca = (home / "ca.pem").read_bytes()
        from tpproxy.devenv import issueClient

        issueClient(home, "dev", hours=0.5, stem="client")
        before = (home / "client.pem").read_bytes()
        ensureDevEnvironment(home)
        self.assertEqual((home / "ca.pem").read_bytes(), ca)
        self.assertNotEqual((home / "client.pem").read_bytes(), before)
        after = (home / "client.pem").read_bytes()
        ensureDevEnvironment(home)
        self.assertEqual((home / "client.pem").read_bytes(), after)


class ProcessTests(TestCase):
    """
    The real C{twist tp} and C{twistd -ny tac/tp.tac} processes.
    """

    timeout = 120

    @defer.inlineCallbacks
    def roundTrip(self, clientConfig: str) -> Any:
        sinkPort, sink = listenLocal(self, HashSink)
        result = yield run(tpCommand() + ["--config", clientConfig, "connect", f"127.0.0.1:{sinkPort}"], stdin=b"plugin")
        self.assertEqual(result.status, 0, result)
        self.assertEqual(result.out, f"6 {sha256(b'plugin')}\n".encode())
        self.assertEqual(sink.accepted, 1)

    def devHome(self) -> tuple[Path, int]:
        home = Path(self.mktemp()).absolute()
        port = freePort()
        initDev(home, port=port)
        return home, port

    @defer.inlineCallbacks
    def test_twistPlugin(self) -> Any:
        """
        C{twist tp --config FILE} finds the plugin and serves.
        """
        home, port = self.devHome()
        server = Background(self, twistCommand() + ["tp", "--config", str(home / "server.toml")])
        yield waitForPort(port)
        yield self.roundTrip(str(home / "client.toml"))
        self.assertFalse(server.proto.done.called)

    @defer.inlineCallbacks
    def test_twistAsyncioReactor(self) -> Any:
        """
        C{twist --reactor=asyncio tp} serves TLS and QUIC too.
        """
        home, port = self.devHome()
        Background(self, twistCommand() + ["--reactor=asyncio", "tp", "--config", str(home / "server.toml")])
        yield waitForPort(port)
        for transport in ("quic", "tls"):
            sinkPort, sink = listenLocal(self, HashSink)
            result = yield run(
                tpCommand() + ["--config", str(home / "client.toml"), "--transport", transport, "connect", f"127.0.0.1:{sinkPort}"],
                stdin=b"plugin",
            )
            self.assertEqual(result.status, 0, result)
            self.assertEqual(result.out, f"6 {sha256(b'plugin')}\n".encode())
            self.assertIn(f"(v1, {transport})".encode(), result.err)

    @defer.inlineCallbacks
    def test_embeddedDefault(self) -> Any:
        """
        C{twist tp} with no configuration runs the dev environment from
        C{TP_HOME}.
        """
        home, port = self.devHome()
        Background(self, twistCommand() + ["--log-format=text", "tp"], env=cleanEnv(TP_HOME=str(home)))
        yield waitForPort(port)
        yield self.roundTrip(str(home / "client.toml"))

    @defer.inlineCallbacks
    def test_tac(self) -> Any:
        """
        C{twistd -ny tac/tp.tac} serves the configuration named by
        C{TP_CONFIG}.
        """
        home, port = self.devHome()
        twistd = Path(sys.executable).with_name("twistd")
        argv = [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]
        Background(
            self,
            argv + ["--pidfile=", "-ny", str(REPO / "tac" / "tp.tac")],
            env=cleanEnv(TP_CONFIG=str(home / "server.toml")),
        )
        yield waitForPort(port)
        yield self.roundTrip(str(home / "client.toml"))

    @defer.inlineCallbacks
    def test_badConfigStopsTwist(self) -> Any:
        """
        C{twist tp} with a bad file exits non-zero and names the key.
        """
        pki = TestPKI.create(self.mktemp())
        bad = pki.directory / "bad.toml"
        bad.write_text('[server]\ncertificate = "server.pem"\nkey = "missing.key"\nclient_ca = "ca.pem"\n')
        result = yield run(twistCommand() + ["tp", "--config", str(bad)])
        self.assertNotEqual(result.status, 0)
        self.assertIn(b"server.key", result.out + result.err)
        self.assertIn(b"does not exist", result.out + result.err)
