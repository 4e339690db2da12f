"""
Headless Chromium as a TP client for tests: a profile that trusts the
test CA and holds a test client certificate, a policy that selects that
certificate for TP's origin without a dialog, and a page whose
C{console.log} lines the test reads.

How Chromium is made to present a client certificate without a person:
the certificate and key go into the profile's NSS database (C{pk12util}),
and Chromium's managed policy C{AutoSelectCertificateForUrls} names TP's
origin.  Chromium on Linux reads managed policies only from
C{/etc/chromium/policies/managed/} (no flag moves it), so a test writes one
file there, named for itself and scoped to its own origin, and removes it
at cleanup: that needs root (CI runs as root; elsewhere the test skips,
or fails under C{CI=true}).

WebTransport to a server whose certificate chains to a CA that is only in
the NSS database fails certificate verification (measured with Chromium
156) unless the origin is also given to C{--origin-to-force-quic-on}.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tpproxy.test.h3peers import CHROMIUM_FLAGS, chromiumPath
from tpproxy.test.support import cleanEnv, requireTool, run

POLICY_DIR = Path("/etc/chromium/policies/managed")
def _console(prefix: str) -> re.Pattern[str]:
    """
    The console lines a page writes as C{PREFIX <json>} (the test page:
    C{TPTEST}; the SSH demo: C{TP-DEMO}), as Chromium logs them on stderr.
    """
    return re.compile(r'INFO:CONSOLE[^\]]*\] "' + re.escape(prefix) + r' (.*)", source: ')
#: As L{CHROMIUM_FLAGS}, without C{--dump-dom} (the page runs until the
#: test has read what it wanted) or the QUIC handshake's verbose log.
FLAGS = tuple(f for f in CHROMIUM_FLAGS if f not in ("--dump-dom",) and not f.startswith("--vmodule"))


@defer.inlineCallbacks
def makeBrowserProfile(home: str | Path, caPEM: bytes, clientCert: Any = None, clientKey: Any = None, caCert: Any = None) -> Any:
    """
    A throwaway C{$HOME} whose NSS database trusts C{caPEM} for servers and,
    if given, holds the client certificate and key (from a PKCS#12 file,
    as a person would import it).
    """
    certutil = requireTool("certutil")
    home = Path(home).absolute()
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    (home / "ca.pem").write_bytes(caPEM)
    steps = [
        [certutil, "-N", "-d", f"sql:{db}", "--empty-password"],
        [certutil, "-A", "-d", f"sql:{db}", "-n", "tp-test-ca", "-t", "C,,", "-i", str(home / "ca.pem")],
    ]
    if clientCert is not None:
        pk12util = requireTool("pk12util")
        p12 = home / "client.p12"
        p12.write_bytes(pkcs12.serialize_key_and_certificates(b"tp-test-client", clientKey, clientCert, [caCert] if caCert else None, BestAvailableEncryption(b"test")))
        steps.append([pk12util, "-i", str(p12), "-d", f"sql:{db}", "-W", "test"])
    for argv in steps:
        result = yield run(argv, env=cleanEnv(HOME=str(home)), timeout=30)
        if result.status != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {result!r}")
    return str(home)


#: One policy file for every test (and process) at once: Chromium does not
#: merge a policy set in several files of the managed directory (one hides
#: the others), so tests running in parallel share this file, under a lock.
POLICY_FILE = POLICY_DIR / "tp-test.json"
_POLICY_LOCK = POLICY_DIR / ".tp-test.lock"


def _editPolicy(add: str | None = None, remove: str | None = None) -> None:
    import fcntl

    with open(_POLICY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            rules = json.loads(POLICY_FILE.read_text()).get("AutoSelectCertificateForUrls", [])
        except (OSError, ValueError):
            rules = []
        if add is not None:
            rules.append(add)
        if remove is not None and remove in rules:
            rules.remove(remove)
        if rules:
            temporary = POLICY_FILE.with_name(f".{POLICY_FILE.name}.{os.getpid()}")
            temporary.write_text(json.dumps({"AutoSelectCertificateForUrls": rules}))
            os.replace(temporary, POLICY_FILE)
        else:
            POLICY_FILE.unlink(missing_ok=True)


def autoSelectCertificate(testCase: TestCase, origin: str) -> None:
    """
    Make Chromium present the profile's client certificate to C{origin}
    (C{https://127.0.0.1:PORT}) without asking, until the test ends.
    """
    if os.geteuid() != 0:
        message = f"Chromium reads its certificate policy only from {POLICY_DIR}, which needs root"
        if os.environ.get("CI") == "true":
            raise AssertionError(message + "; under CI=true this is an error")
        raise SkipTest(message)
    POLICY_DIR.mkdir(parents=True, exist_ok=True)
    # The nonce keeps two tests' rules apart even for one origin.
    rule = json.dumps({"pattern": origin, "filter": {}, "tp-test": secrets.token_hex(4)})
    _editPolicy(add=rule)
    testCase.addCleanup(_editPolicy, remove=rule)


class Page(protocol.ProcessProtocol):
    """
    One headless Chromium showing one page; C{results} are the C{TPTEST}
    console lines it has written, decoded, in order.
    """

    def __init__(self, prefix: str = "TPTEST") -> None:
        self.console = _console(prefix)
        self.err = b""
        self.results: list[Any] = []
        self._waiting: list[tuple[Any, defer.Deferred[Any]]] = []
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.dataDir: str | None = None

    def errReceived(self, data: bytes) -> None:
        start = self.err.rfind(b"\n") + 1
        self.err += data
        *lines, _ = self.err[start:].split(b"\n")
        for line in lines:
            found = self.console.search(line.decode("utf-8", "replace"))
            if found is None:
                continue
            try:
                record = json.loads(found.group(1))
            except ValueError:
                record = {"unparsed": found.group(1)}
            self.results.append(record)
            for entry in list(self._waiting):
                match, d = entry
                if match(record):
                    self._waiting.remove(entry)
                    d.callback(record)

    def processEnded(self, reason: Failure) -> None:
        if self.dataDir is not None:
            shutil.rmtree(self.dataDir, ignore_errors=True)
        for _, d in self._waiting:
            d.errback(AssertionError(f"Chromium ended before the page said so; its stderr ends:\n{self.stderr[-3000:]}"))
        self._waiting = []
        self.ended.callback(None)

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def waitFor(self, match: Any, timeout: float = 60) -> defer.Deferred[Any]:
        """
        The first result (past or future) for which C{match(result)} holds.
        """
        from twisted.internet import reactor

        for record in self.results:
            if match(record):
                return defer.succeed(record)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append((match, d))

        def late(f: Failure) -> Failure:
            if f.check(defer.TimeoutError):
                raise AssertionError(f"the page said nothing that matched within {timeout:g} s; it said {self.results!r}; Chromium's stderr ends:\n{self.stderr[-3000:]}")
            return f

        return d.addTimeout(timeout, reactor).addErrback(late)

    def close(self) -> defer.Deferred[None]:
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
        return self.ended


def openPage(testCase: TestCase, url: str, home: str, quicOrigins: tuple[str, ...] = (), prefix: str = "TPTEST") -> Page:
    """
    Show C{url} in headless Chromium with C{HOME=home} (L{makeBrowserProfile}),
    QUIC forced (and so trusted with the profile's CA) for C{quicOrigins}
    (C{HOST:PORT}); Chromium is killed at the end of the test.
    """
    from twisted.internet import reactor

    chromium = requireTool(chromiumPath() or "chromium")
    page = Page(prefix)
    page.dataDir = tempfile.mkdtemp(prefix="chromium-", dir=home)
    argv = [chromium, *FLAGS, f"--user-data-dir={page.dataDir}"]
    argv += [f"--origin-to-force-quic-on={','.join(quicOrigins)}"] if quicOrigins else []
    argv += ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1", url]
    env = {"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    reactor.spawnProcess(page, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})  # type: ignore[attr-defined]
    page.transport.closeStdin()  # type: ignore[union-attr]
    testCase.addCleanup(page.close)
    return page
