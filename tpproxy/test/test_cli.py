"""
The C{tp} command line: argument parsing and settings resolution.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tpproxy import cli
from tpproxy.testing import TestPKI


class HostPortTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """
        HOST:PORT, [V6]:PORT and, where a default port is allowed, HOST.
        """
        self.assertEqual(cli.parseHostPort("example.org:22", "x"), ("example.org", 22))
        self.assertEqual(cli.parseHostPort("[::1]:8443", "x"), ("::1", 8443))
        self.assertEqual(cli.parseHostPort("10.0.0.1:1", "x"), ("10.0.0.1", 1))
        self.assertEqual(cli.parseHostPort("tp.example.org", "x", defaultPort=443), ("tp.example.org", 443))
        self.assertEqual(cli.parseHostPort("[2001:db8::1]", "x", defaultPort=443), ("2001:db8::1", 443))
        # A destination host (tpproxy.names.isDestinationHost), kept as given:
        # a single label, C{_}, any case, a final dot.
        self.assertEqual(cli.parseHostPort("db:5432", "x"), ("db", 5432))
        self.assertEqual(cli.parseHostPort("_svc._tcp.Example.org.:1", "x"), ("_svc._tcp.Example.org.", 1))

    def test_errors(self) -> None:
        """
        Each malformed target gets a message naming the argument.
        """
        for text, fragment in [
            ("example.org", "expected HOST:PORT"),
            ("example.org:0", "port must be a number from 1 to 65535"),
            ("example.org:99999", "port must be"),
            ("example.org:ssh", "port must be"),
            ("::1:22", "IPv6 as [ADDRESS]:PORT"),
            ("[::1:22", "unclosed '['"),
            ("exa mple.org:22", "is not a host name or IP address"),
            (":22", "is not a host name"),
            ("a-.example.org:22", "is not a host name"),
            ("127.1:22", "is not a host name"),
        ]:
            error = self.assertRaises(cli.UsageError, cli.parseHostPort, text, "HOST:PORT")
            self.assertIn("HOST:PORT", str(error))
            self.assertIn(fragment, str(error), text)


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.cert, self.key = self.pki.client("alice")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("TP_")})
        os.environ["XDG_CONFIG_HOME"] = str(Path(self.mktemp()).absolute())

    def parse(self, *argv: str) -> Any:
        return cli.buildParser().parse_args(list(argv))

    def test_flagsBeforeAndAfter(self) -> None:
        """
        Connection options are accepted before and after the subcommand.
        """
        before = cli.resolveSettings(
            self.parse("--server", "tp.example.org", "--cert", self.cert, "--key", self.key, "--ca", self.pki.caPath, "connect", "h:22")
        )
        after = cli.resolveSettings(
            self.parse("connect", "h:22", "--server", "tp.example.org", "--cert", self.cert, "--key", self.key, "--ca", self.pki.caPath)
        )
        self.assertEqual(before, after)
        self.assertEqual(str(before.server), "tp.example.org:443")

    def test_fileThenFlags(self) -> None:
        """
        The config file gives defaults (relative paths from its directory);
        flags override it; C{TP_CONFIG} names the file when C{--config} is
        absent.
        """
        config = self.pki.directory / "client.toml"
        config.write_text('server = "tp.example.org:8443"\ncert = "alice.pem"\nkey = "alice.key"\nca = "ca.pem"\nconnect_timeout = 3\n')
        settings = cli.resolveSettings(self.parse("--config", str(config), "connect", "h:22"))
        self.assertEqual(settings.cert, self.cert)
        self.assertEqual(settings.connectTimeout, 3.0)
        self.assertEqual(str(settings.server), "tp.example.org:8443")
        os.environ["TP_CONFIG"] = str(config)
        settings = cli.resolveSettings(self.parse("connect", "h:22", "--server", "[::1]:9"))
        self.assertEqual(str(settings.server), "[::1]:9")
        self.assertEqual(settings.key, self.key)

    def test_defaultPath(self) -> None:
        """
        Without --config or TP_CONFIG, the per-user file is read if present.
        """
        d = Path(os.environ["XDG_CONFIG_HOME"]) / "tp"
        d.mkdir(parents=True)
        (d / "client.toml").write_text(f'server = "x.example:1"\ncert = "{self.cert}"\nkey = "{self.key}"\nca = "{self.pki.caPath}"\n')
        settings = cli.resolveSettings(self.parse("connect", "h:22"))
        self.assertEqual(str(settings.server), "x.example:1")

    def test_missing(self) -> None:
        error = self.assertRaises(cli.UsageError, cli.resolveSettings, self.parse("connect", "h:22", "--cert", self.cert))
        self.assertIn("missing --server, --key, --ca", str(error))

    def test_unusableFiles(self) -> None:
        """
        A missing or broken certificate file is reported with its option.
        """
        settings = cli.resolveSettings(
            self.parse("connect", "h:22", "--server", "s:1", "--cert", "/nonexistent", "--key", self.key, "--ca", self.pki.caPath)
        )
        error = self.assertRaises(cli.UsageError, settings.tlsOptions)
        self.assertIn("--cert: file /nonexistent does not exist", str(error))
        settings = cli.resolveSettings(
            self.parse("connect", "h:22", "--server", "s:1", "--cert", self.cert, "--key", self.pki.caPath, "--ca", self.pki.caPath)
        )
        error = self.assertRaises(cli.UsageError, settings.tlsOptions)
        self.assertIn("--key:", str(error))

    def test_e2eName(self) -> None:
        """
        C{tp expose --e2e NAME} takes a certificate name
        (L{tpproxy.names.isCertificateName}): no C{_}, no address, no
        wildcard; refused before anything is dialled.
        """
        for name in ("_ssh.example.org", "10.0.0.1", "*.example.org", "a b"):
            args = self.parse("expose", "127.0.0.1:22", "--e2e", name, "--server", "s:1", "--cert", self.cert, "--key", self.key, "--ca", self.pki.caPath)
            error = self.assertRaises(cli.UsageError, cli._run, None, args, io.StringIO())
            self.assertIn(f"--e2e: {name!r} is not a DNS name", str(error))

    def test_badConfigKey(self) -> None:
        config = self.pki.directory / "bad.toml"
        config.write_text('server = "s:1"\nsevrer = "typo"\n')
        error = self.assertRaises(cli.UsageError, cli.resolveSettings, self.parse("--config", str(config), "connect", "h:22"))
        self.assertIn("sevrer", str(error))


class MainTests(SynchronousTestCase):
    def test_helpExplains(self) -> None:
        """
        C{tp --help} lists the commands, the ssh example and exit statuses.
        """
        out = io.StringIO()
        self.patch(cli.sys, "stdout", out)
        self.assertRaises(SystemExit, cli.main, ["--help"])
        text = out.getvalue()
        for fragment in ("connect", "up", "init-dev", "issue", 'ProxyCommand="tp connect %h:%p"', "exit status", "--server"):
            self.assertIn(fragment, text)

    def test_initDevAndIssue(self) -> None:
        """
        C{tp init-dev DIR} refuses to overwrite without --force; C{tp issue}
        makes another client certificate from its CA.
        """
        home = Path(self.mktemp()).absolute()
        out = io.StringIO()
        self.patch(cli.sys, "stdout", out)
        err = io.StringIO()
        self.patch(cli.sys, "stderr", err)
        exit = self.assertRaises(SystemExit, cli.main, ["init-dev", str(home), "--port", "18001"])
        self.assertEqual(exit.code, 0)
        self.assertIn("twist tp --config", out.getvalue())
        exit = self.assertRaises(SystemExit, cli.main, ["init-dev", str(home)])
        self.assertEqual(exit.code, 2)
        self.assertIn("--force", err.getvalue())
        exit = self.assertRaises(SystemExit, cli.main, ["issue", str(home), "bob", "--hours", "2"])
        self.assertEqual(exit.code, 0)
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((home / "bob.pem").read_bytes())
        from tpproxy.pki import identityOf

        self.assertEqual(identityOf(cert).name, "bob")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLess(lifetime.total_seconds(), 2 * 3600 + 600)


class NumberOptionTests(SynchronousTestCase):
    """
    Every numeric option of C{tp} is checked by argparse, so a bad value is
    a one-line usage error (exit 2), not a traceback later.
    """

    def refused(self, *argv: str) -> str:
        err = io.StringIO()
        self.patch(cli.sys, "stderr", err)
        exit = self.assertRaises(SystemExit, cli.buildParser().parse_args, list(argv))
        self.assertEqual(exit.code, 2)
        lines = err.getvalue().splitlines()
        self.assertNotIn("Traceback", err.getvalue())
        return lines[-1]

    def test_connectTimeout(self) -> None:
        """
        C{--connect-timeout} takes more than 0 and at most 3600 seconds (as
        the config key C{connect_timeout}), before or after the command.
        """
        for value in ("-3", "0", "nan", "inf", "3601", "soon"):
            for argv in (["--connect-timeout", value, "connect", "h:22"], ["connect", "h:22", "--connect-timeout", value]):
                line = self.refused(*argv)
                self.assertIn("argument --connect-timeout: expected a number of seconds more than 0 and at most 3600", line)
                self.assertIn(repr(value), line)
        args = cli.buildParser().parse_args(["connect", "h:22", "--connect-timeout", "0.25"])
        self.assertEqual(args.connect_timeout, 0.25)

    def test_connectTimeoutOverridesFile(self) -> None:
        """
        The checked value overrides the config file's C{connect_timeout}.
        """
        pki = TestPKI.create(self.mktemp())
        cert, key = pki.client("alice")
        config = pki.directory / "client.toml"
        config.write_text(f'server = "s:1"\ncert = "{cert}"\nkey = "{key}"\nca = "{pki.caPath}"\nconnect_timeout = 3\n')
        args = cli.buildParser().parse_args(["--config", str(config), "--connect-timeout", "0.5", "connect", "h:22"])
        self.assertEqual(cli.resolveSettings(args).connectTimeout, 0.5)

    def test_hours(self) -> None:
        """
        C{tp issue --hours} takes more than 0 and at most ten years.
        """
        for value in ("0", "-1", "1e9", "nan", "x"):
            self.assertIn("argument --hours: expected a number of hours more than 0 and at most 87600", self.refused("issue", "d", "n", "--hours", value))
        self.assertEqual(cli.buildParser().parse_args(["issue", "d", "n", "--hours", "0.5"]).hours, 0.5)

    def test_ports(self) -> None:
        """
        Port numbers: C{tp up}'s LOCALPORT and C{--public} from 0, C{tp
        init-dev --port} from 1, to 65535.
        """
        self.assertIn("argument LOCALPORT: expected a port number from 0 to 65535 (0 picks a free port)", self.refused("up", "h:1", "-5"))
        self.assertIn("argument LOCALPORT", self.refused("up", "h:1", "65536"))
        self.assertIn("argument --public: expected a port number from 0 to 65535", self.refused("expose", "h:1", "--public", "70000"))
        self.assertIn("argument --port: expected a port number from 1 to 65535", self.refused("init-dev", "d", "--port", "0"))
        self.assertEqual(cli.buildParser().parse_args(["up", "h:1", "0"]).localport, 0)
        self.assertEqual(cli.buildParser().parse_args(["expose", "h:1", "--public"]).public, 0)

    def test_keepalive(self) -> None:
        self.assertIn("argument --keepalive: expected a number of seconds from 0.5 to 3600", self.refused("expose", "h:1", "--e2e", "a.example", "--keepalive", "0.1"))
        self.assertIn("argument --keepalive", self.refused("expose", "h:1", "--e2e", "a.example", "--keepalive", "nan"))


class HelpTests(SynchronousTestCase):
    def test_connectHelpShowsProxyCommand(self) -> None:
        """
        C{tp connect --help} shows the ProxyCommand as ssh wants it,
        C{%h:%p} (not C{%%h:%%p}).
        """
        out = io.StringIO()
        self.patch(cli.sys, "stdout", out)
        self.assertRaises(SystemExit, cli.buildParser().parse_args, ["connect", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn('ProxyCommand="tp connect %h:%p"', text)
        self.assertNotIn("%%", text)


class InitDevCommandsTests(SynchronousTestCase):
    def test_commandsRunAsPrinted(self) -> None:
        """
        The commands C{tp init-dev} prints run as written: the scripts'
        paths when the shell would not find them (a virtualenv that is not
        activated), their bare names when it would.
        """
        import sys

        twist = Path(sys.executable).with_name("twist")
        self.assertTrue(twist.exists(), "twist is installed beside this Python")
        home = Path(self.mktemp()).absolute()
        for path, expected in [("/nonexistent", f"{twist} tp --config"), (str(twist.parent), "   twist tp --config")]:
            self.patch(os, "environ", {**os.environ, "PATH": path})
            out = io.StringIO()
            self.patch(cli.sys, "stdout", out)
            exit = self.assertRaises(SystemExit, cli.main, ["init-dev", str(home), "--force"])
            self.assertEqual(exit.code, 0)
            self.assertIn(expected, out.getvalue())
