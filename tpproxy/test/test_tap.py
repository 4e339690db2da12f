"""
The server's entry points: C{twist tp}, the .tac file, the embedded dev
default, and L{tpproxy.tap.makeService}.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import IServiceCollection
from twisted.internet import defer
from twisted.internet.error import CannotListenError
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


def twistdCommand() -> list[str]:
    twistd = Path(sys.executable).with_name("twistd")
    return [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]


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
        self.assertEqual([s.name for s in svc], ["tp"])  # type: ignore[attr-defined]
        names = sorted(s.name for s in svc.tp)  # type: ignore[attr-defined]
        self.assertEqual(names, ["drain", "idle", "memory", "metrics", "reload", "tls:tcp:0:interface=127.0.0.1", "tls:tcp:0:interface=127.0.0.2"])

    def test_badConfigNamesKey(self) -> None:
        """
        A bad value stops startup with one line naming the key
        (L{SystemExit} with the message: twist prints it alone, where a
        L{usage.UsageError} would be followed by twist's usage text).
        """
        path = self.writeConfig(
            '[server]\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\nhello_timeout = -1\n'
        )
        options = tap.Options()
        error = self.assertRaises(SystemExit, options.parseOptions, ["--config", path])
        self.assertIsInstance(error.code, str)
        self.assertRegex(error.code, r"^twistd? tp: bad configuration: server\.hello_timeout: ")
        self.assertNotIn("\n", error.code)

    def test_unknownOptionIsUsage(self) -> None:
        """
        A mistyped option is still a usage error (twist shows the usage).
        """
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--confgi", "x"])

    def test_configFromEnvironment(self) -> None:
        """
        Without C{--config}, C{TP_CONFIG} names the file.
        """
        path = self.writeConfig('[server]\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n')
        self.patch(os, "environ", {**os.environ, "TP_CONFIG": path})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["serverConfig"].path, str(Path(path).resolve()))


class CannotListenTests(SynchronousTestCase):
    """
    L{tap.cannotListen}: one line naming the address, why, and the config
    key to change.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        path = self.pki.directory / "server.toml"
        path.write_text(
            '[server]\nlisten = ["tcp:8443:interface=127.0.0.1", "tcp6:8443:interface=\\\\:\\\\:1"]\n'
            'certificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n'
            '[admin]\nlisten = "tcp:9090:interface=127.0.0.1"\n'
        )
        self.config = loadServerConfig(path)

    def line(self, interface: str, port: int, code: int) -> str:
        text = tap.cannotListen(CannotListenError(interface, port, OSError(code, os.strerror(code))), self.config)
        self.assertNotIn("\n", text)
        return text

    def test_inUse(self) -> None:
        text = self.line("::1", 8443, errno.EADDRINUSE)
        self.assertRegex(text, r"^twistd? tp: cannot listen on \[::1\]:8443: it is in use ")
        self.assertIn("ss -ltnup 'sport = :8443'", text)
        self.assertIn(f"choose another port in server.listen of {self.config.path}", text)

    def test_adminPort(self) -> None:
        """
        The key named is the one whose description holds the port.
        """
        text = self.line("127.0.0.1", 9090, errno.EADDRINUSE)
        self.assertIn("choose another port in admin.listen of", text)
        self.assertNotIn("server.listen", text)

    def test_privileged(self) -> None:
        text = self.line("", 443, errno.EACCES)
        self.assertIn("cannot listen on port 443 (all addresses): permission denied", text)
        self.assertIn("CAP_NET_BIND_SERVICE", text)

    def test_noSuchAddress(self) -> None:
        text = self.line("192.0.2.1", 8443, errno.EADDRNOTAVAIL)
        self.assertIn("192.0.2.1:8443: no interface of this machine has that address", text)


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
        # Browsers (docs/webtransport.md): WebTransport on, and the client
        # certificate as a PKCS#12 file with the documented password.
        from cryptography.hazmat.primitives.serialization import pkcs12

        from tpproxy.devenv import P12_PASSWORD

        self.assertIsNotNone(config.webtransport)
        self.assertEqual(stat.S_IMODE((home / "client.p12").stat().st_mode), 0o600)
        bundle = pkcs12.load_pkcs12((home / "client.p12").read_bytes(), P12_PASSWORD.encode())
        self.assertEqual(bundle.cert.certificate.public_bytes(Encoding.PEM), (home / "client.pem").read_bytes())

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
        # The browser's copy is renewed with it.
        from cryptography.hazmat.primitives.serialization import pkcs12

        bundle = pkcs12.load_pkcs12((home / "client.p12").read_bytes(), b"tp")
        self.assertEqual(bundle.cert.certificate.public_bytes(Encoding.PEM), (home / "client.pem").read_bytes())
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
        Background(
            self,
            twistdCommand() + ["--pidfile=", "-ny", str(REPO / "tac" / "tp.tac")],
            env=cleanEnv(TP_CONFIG=str(home / "server.toml")),
        )
        yield waitForPort(port)
        yield self.roundTrip(str(home / "client.toml"))

    @defer.inlineCallbacks
    def test_badConfigStopsTwist(self) -> Any:
        """
        C{twist tp} and C{twistd tp} with a bad file exit non-zero with one
        line naming the key, and no usage text.
        """
        pki = TestPKI.create(self.mktemp())
        bad = pki.directory / "bad.toml"
        bad.write_text('[server]\ncertificate = "server.pem"\nkey = "missing.key"\nclient_ca = "ca.pem"\n')
        for argv, program in [(twistCommand(), b"twist tp"), (twistdCommand() + ["--pidfile=", "-n"], b"twistd tp")]:
            result = yield run(argv + ["tp", "--config", str(bad)])
            self.assertNotEqual(result.status, 0)
            self.assertEqual(result.out, b"")
            lines = result.err.splitlines()
            self.assertEqual(len(lines), 1, result.err)
            self.assertTrue(lines[0].startswith(program + b": bad configuration: server.key: "), lines[0])
            self.assertIn(b"does not exist", lines[0])

    @defer.inlineCallbacks
    def test_badListenDescription(self) -> Any:
        """
        A listen entry Twisted cannot parse is one line too.
        """
        pki = TestPKI.create(self.mktemp())
        bad = pki.directory / "bad.toml"
        bad.write_text('[server]\nlisten = ["tcp:184x5"]\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n')
        result = yield run(twistCommand() + ["tp", "--config", str(bad)])
        self.assertNotEqual(result.status, 0)
        self.assertEqual(result.err.count(b"\n"), 1, result.err)
        self.assertIn(b"twist tp: bad configuration: server.listen: 'tcp:184x5'", result.err)

    @defer.inlineCallbacks
    def test_portInUse(self) -> Any:
        """
        A port another program holds ends C{twist tp} with one line naming
        the address and how to choose another port, instead of a
        CannotListenError traceback.
        """
        home, port = self.devHome()
        held = listenLocal(self, HashSink)[0]
        server = home / "server.toml"
        server.write_text(server.read_text().replace(f"tcp:{port}:", f"tcp:{held}:"))
        result = yield run(twistCommand() + ["--log-format=text", "tp", "--config", str(server)])
        self.assertNotEqual(result.status, 0)
        self.assertNotIn(b"Traceback", result.out + result.err)
        lines = result.err.splitlines()
        self.assertEqual(len(lines), 1, result.err)
        self.assertIn(f"twist tp: cannot listen on 127.0.0.1:{held}: it is in use".encode(), lines[0])
        self.assertIn(f"choose another port in server.listen of {server}".encode(), lines[0])
