"""
A real ACME server for the tests: Pebble (Let's Encrypt's RFC 8555 test CA)
on loopback, with C{pebble-challtestsrv} as its DNS server.

Pebble validates challenges for real: for C{http-01} it fetches
C{http://NAME:httpPort/.well-known/acme-challenge/TOKEN}, for
C{tls-alpn-01} it connects to C{NAME:tlsPort}, where C{NAME} resolves to
127.0.0.1 whatever it is (the DNS server answers every A query with
127.0.0.1 and no AAAA query at all).  The code under test runs its
responders on those two ports; L{Pebble.start} takes them.

Pebble keeps everything in memory: a restart (L{Pebble.restart}) forgets
accounts, orders and authorizations, and makes a new root and intermediate.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509 import verification
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from tpproxy.pki import CertificateAuthority
from tpproxy.test.support import Background, cleanEnv, deferLater, freePort, requireTool

#: The environment Pebble runs with unless the caller says otherwise: no
#: random sleep before validations, no valid nonce rejected as bad, and
#: (almost) no reuse of valid authorizations (see L{Pebble.start}).
DEFAULT_ENV: dict[str, str] = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


def freeTCPAndUDPPort(host: str = "127.0.0.1") -> int:
    """
    A port free on C{host} for both TCP and UDP (a DNS server takes both).

    @param host: the address the port is for.
    @return: the port number.
    """
    for _ in range(50):
        port = freePort(host=host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise AssertionError("found no port free for both TCP and UDP")


#: How many times to try free ports when one was taken before the server
#: could bind it.
_ATTEMPTS = 3


class _PortTaken(AssertionError):
    """
    A server could not bind a port L{freePort} had found free.
    """


def _probeDNS(managementPort: int, dnsPort: int) -> None:
    """
    Check that the C{pebble-challtestsrv} of these ports is the one just
    started, and answers over UDP: add an A record for a new name through
    the management port, and ask the DNS port for it.  (Blocking: run it in
    a thread.)

    @raise Exception: if it does not answer, or not with that record.
    """
    name = f"tp-probe-{secrets.token_hex(6)}.invalid"
    address = "127.{}.{}.{}".format(*secrets.token_bytes(3))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        f"http://127.0.0.1:{managementPort}/add-a",
        data=json.dumps({"host": name, "addresses": [address]}).encode(),
        method="POST",
    )
    with opener.open(request, timeout=2) as response:
        response.read()
    ident = secrets.randbits(16)
    question = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".")) + b"\0"
    query = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(query, ("127.0.0.1", dnsPort))
        reply = s.recv(4096)
    if reply[:2] != query[:2] or ipaddress.ip_address(address).packed not in reply[len(query):]:
        raise AssertionError(f"the DNS server on port {dnsPort} does not answer {name} with {address}")


def _output(process: Background, limit: int = 4000) -> str:
    """
    The end of what a process wrote (Pebble and C{pebble-challtestsrv} log
    to standard output, and write fatal errors to standard error).
    """
    data = b"".join(process.proto.out) + b"".join(process.proto.err)
    return data[-limit:].decode("utf-8", "replace")


class Pebble:
    """
    A running Pebble ACME server and its DNS server, stopped at the end of
    the test that started it.

    @ivar directory: the ACME directory URL, C{https://127.0.0.1:PORT/dir}.
    @ivar caBundle: the path of a PEM file holding the CA certificate that
        signed Pebble's HTTPS certificate (valid for C{127.0.0.1} and
        C{localhost}): the trust root an ACME client needs to reach
        L{directory} and L{managementURL}.  It is not the CA that Pebble
        issues certificates from: see L{roots}.
    @ivar managementURL: the base URL of Pebble's management interface,
        C{https://127.0.0.1:PORT} (C{/roots/0}, C{/intermediates/0},
        C{/cert-status-by-serial/SERIAL}, ...), same trust root.
    @ivar dnsManagementURL: the base URL of C{pebble-challtestsrv}'s
        management interface (plain HTTP), where a test can change DNS
        answers: C{POST /set-txt} with C{{"host": "_acme-challenge.NAME.",
        "value": "..."}} for C{dns-01}, C{/add-a}, C{/set-servfail}, ...
    @ivar httpPort: the port Pebble validates C{http-01} challenges on.
    @ivar tlsPort: the port Pebble validates C{tls-alpn-01} challenges on.
    @ivar port: the port of the ACME server.
    @ivar managementPort: the port of the management interface.
    @ivar dnsPort: the (UDP and TCP) port of the DNS server.
    @ivar dnsManagementPort: the port of C{pebble-challtestsrv}'s
        management interface.
    @ivar tempDir: the directory of Pebble's configuration and HTTPS
        certificate and key.
    @ivar config: the path of Pebble's configuration file.
    @ivar env: the environment Pebble runs with.
    @ivar strict: whether Pebble runs in its strict mode.
    @ivar certificateValidity: the lifetime in seconds of the certificates
        Pebble issues, or C{None} for Pebble's default (about 5 years).
    @ivar process: the running Pebble process (a L{Background}); its
        C{proto.out} holds Pebble's log (Pebble logs to standard output).
    @ivar dns: the running C{pebble-challtestsrv} process.
    """

    directory: str
    caBundle: str
    managementURL: str
    dnsManagementURL: str
    httpPort: int
    tlsPort: int
    port: int
    managementPort: int
    dnsPort: int
    dnsManagementPort: int
    tempDir: Path
    config: Path
    env: dict[str, str]
    strict: bool
    certificateValidity: int | None
    process: Background
    dns: Background

    def __init__(self) -> None:
        raise TypeError("use Pebble.start(testCase, httpPort, tlsPort)")

    @classmethod
    @defer.inlineCallbacks
    def start(
        cls,
        testCase: TestCase,
        httpPort: int,
        tlsPort: int,
        env: dict[str, str] | None = None,
        strict: bool = True,
        certificateValidity: int | None = None,
        timeout: float = 30,
    ) -> Any:
        """
        Start Pebble and its DNS server on free loopback ports, and wait
        until Pebble answers its directory and management requests.  Both
        processes are stopped at the cleanup of C{testCase}.

        Pebble runs with L{DEFAULT_ENV}: C{PEBBLE_VA_NOSLEEP=1},
        C{PEBBLE_WFE_NONCEREJECT=0} and C{PEBBLE_AUTHZREUSE=0} (with 0,
        Pebble still reuses an account's valid authorization for the same
        name 1% of the time: its test is C{rand.Intn(100) > percent}).
        Any C{PEBBLE_*} variable of the test runner's own environment is
        dropped.

        @param testCase: the test the servers belong to (for its temporary
            directory and cleanups).
        @param httpPort: the port Pebble validates C{http-01} on (where the
            code under test serves C{/.well-known/acme-challenge/}).
        @param tlsPort: the port Pebble validates C{tls-alpn-01} on.
        @param env: variables to add to (or override in) Pebble's
            environment, e.g. C{{"PEBBLE_WFE_NONCEREJECT": "50"}}.
            C{PEBBLE_VA_ALWAYS_VALID} is refused: validation is real.
        @param strict: run Pebble with C{-strict=true}: a challenge POST
            body must be exactly C{{}}, and no JWS body may carry the ACME
            v1 C{"resource"} field.
        @param certificateValidity: the lifetime in seconds of the
            certificates Pebble issues (its C{certificateValidityPeriod});
            C{None} keeps Pebble's default, about 5 years.  A renewal test
            wants it short.
        @param timeout: seconds to wait for each process to be ready.
        @return: a L{Deferred} firing with the running L{Pebble}.
        """
        pebble = requireTool("pebble")
        challtestsrv = requireTool("pebble-challtestsrv")
        extra = dict(env or {})
        if "PEBBLE_VA_ALWAYS_VALID" in extra:
            raise ValueError("PEBBLE_VA_ALWAYS_VALID would skip validation; the fixture validates for real")

        self = cls.__new__(cls)
        self._testCase = testCase
        self._pebble = pebble
        self._challtestsrv = challtestsrv
        self._timeout = timeout
        self.strict = strict
        self.certificateValidity = certificateValidity
        self.httpPort = httpPort
        self.tlsPort = tlsPort
        self.env = {k: v for k, v in cleanEnv().items() if not k.startswith("PEBBLE_")}
        self.env.update(DEFAULT_ENV)
        self.env.update(extra)

        d = Path(testCase.mktemp()).absolute()
        d.mkdir(parents=True)
        self.tempDir = d
        ca = CertificateAuthority.create("TP test Pebble HTTPS CA", days=2)
        server = ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), server=True, hours=48)
        (d / "https-ca.pem").write_bytes(ca.certPEM)
        server.write(d / "https-cert.pem", d / "https-key.pem")
        self.caBundle = str(d / "https-ca.pem")
        self._trustRoot = Certificate.loadPEM(ca.certPEM)

        self._pool = HTTPConnectionPool(reactor, persistent=True)
        testCase.addCleanup(self._pool.closeCachedConnections)
        self._http = HTTPClient(
            Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(self._trustRoot), pool=self._pool)
        )
        self.config = d / "pebble-config.json"

        # A port freePort found free may be taken before the server binds
        # it (by a test running beside this one): then try other ports.
        for attempt in range(_ATTEMPTS):
            try:
                yield self._launchDNS()
                break
            except _PortTaken:
                if attempt == _ATTEMPTS - 1:
                    raise
        for attempt in range(_ATTEMPTS):
            self.port = freePort()
            self.managementPort = freePort()
            self.directory = f"https://127.0.0.1:{self.port}/dir"
            self.managementURL = f"https://127.0.0.1:{self.managementPort}"
            self._writeConfig()
            try:
                yield self._launch()
                break
            except _PortTaken:
                if attempt == _ATTEMPTS - 1:
                    raise
        return self

    def _writeConfig(self) -> None:
        """
        Write Pebble's configuration file, L{config}.
        """
        config: dict[str, Any] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.managementPort}",
            "certificate": str(self.tempDir / "https-cert.pem"),
            "privateKey": str(self.tempDir / "https-key.pem"),
            "httpPort": self.httpPort,
            "tlsPort": self.tlsPort,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.certificateValidity is not None:
            config["certificateValidityPeriod"] = self.certificateValidity
        self.config.write_text(json.dumps({"pebble": config}, indent=2))

    @defer.inlineCallbacks
    def _launchDNS(self) -> Any:
        """
        Start C{pebble-challtestsrv} on free ports and wait until it listens.

        @raise _PortTaken: if it could not bind a port.
        """
        self.dnsPort = freeTCPAndUDPPort()
        self.dnsManagementPort = freePort()
        self.dnsManagementURL = f"http://127.0.0.1:{self.dnsManagementPort}"
        self.dns = Background(
            self._testCase,
            [
                self._challtestsrv,
                "-defaultIPv4", "127.0.0.1",
                "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dnsPort}",
                "-http01", "",
                "-https01", "",
                "-tlsalpn01", "",
                "-management", f"127.0.0.1:{self.dnsManagementPort}",
            ],
            env=cleanEnv(),
        )
        deadline = reactor.seconds() + self._timeout  # type: ignore[attr-defined]
        lastError: object = None
        while True:
            output = _output(self.dns)
            if "address already in use" in output:
                # It logs that, and keeps running.
                yield self.dns.stop()
                raise _PortTaken(output)
            if self.dns.proto.done.called:
                raise AssertionError(f"pebble-challtestsrv exited:\n{output}")
            try:
                yield deferToThread(_probeDNS, self.dnsManagementPort, self.dnsPort)
                return
            except Exception as e:
                lastError = e
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(
                    f"pebble-challtestsrv did not answer within {self._timeout:g} s "
                    f"(last error: {lastError!r}):\n{output}"
                )
            yield deferLater(0.05)

    @defer.inlineCallbacks
    def _launch(self) -> Any:
        """
        Start the Pebble process and wait until it answers.

        @raise _PortTaken: if it could not bind a port.
        """
        self.process = Background(
            self._testCase,
            [
                self._pebble,
                "-config", str(self.config),
                "-dnsserver", f"127.0.0.1:{self.dnsPort}",
                f"-strict={'true' if self.strict else 'false'}",
            ],
            env=self.env,
        )
        deadline = reactor.seconds() + self._timeout  # type: ignore[attr-defined]
        lastError: object = None
        for url in (self.directory, self.managementURL + "/roots/0"):
            while True:
                try:
                    response = yield self._http.get(url, timeout=2)
                    yield response.content()
                    if response.code == 200:
                        break
                    lastError = f"HTTP {response.code}"
                except Exception as e:
                    lastError = e
                output = _output(self.process)
                if self.process.proto.done.called:
                    if "address already in use" in output:
                        raise _PortTaken(output)
                    raise AssertionError(f"pebble exited before answering {url}:\n{output}")
                if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                    raise AssertionError(
                        f"pebble did not answer {url} within {self._timeout:g} s "
                        f"(last error: {lastError!r}); its output:\n{output}"
                    )
                yield deferLater(0.05)

    @property
    def running(self) -> bool:
        """
        Whether the Pebble process runs (the DNS server runs until cleanup).
        """
        return not self.process.proto.done.called

    @defer.inlineCallbacks
    def get(self, url: str) -> Any:
        """
        GET C{url} (on Pebble's ACME or management interface) over HTTPS,
        trusting L{caBundle}.

        @param url: an absolute C{https://127.0.0.1:...} URL.
        @return: a L{Deferred} firing with the body, or failing with
            L{AssertionError} on a status other than 200.
        """
        response = yield self._http.get(url, timeout=10)
        body = yield response.content()
        if response.code != 200:
            raise AssertionError(f"GET {url}: HTTP {response.code}: {body[:500]!r}")
        return body

    @defer.inlineCallbacks
    def _certificates(self, kind: str) -> Any:
        found: list[x509.Certificate] = []
        while True:
            response = yield self._http.get(f"{self.managementURL}/{kind}/{len(found)}", timeout=10)
            body = yield response.content()
            if response.code == 404 and found:
                return found
            if response.code != 200:
                raise AssertionError(f"GET {kind}/{len(found)}: HTTP {response.code}: {body[:500]!r}")
            found.append(x509.load_pem_x509_certificate(body))

    def roots(self) -> defer.Deferred[list[x509.Certificate]]:
        """
        Pebble's current root certificates: C{/roots/0}, then the alternate
        roots C{/roots/1}, ... if C{PEBBLE_ALTERNATE_ROOTS} asked for some.
        Pebble makes new ones at every start, so fetch them again after
        L{restart}.

        @return: a L{Deferred} firing with the roots, the default one first.
        """
        return self._certificates("roots")

    def intermediates(self) -> defer.Deferred[list[x509.Certificate]]:
        """
        Pebble's current intermediate certificates, C{/intermediates/0} (the
        one under C{/roots/0}) first.  Issued chains carry their
        intermediate anyway.

        @return: a L{Deferred} firing with the intermediates.
        """
        return self._certificates("intermediates")

    @defer.inlineCallbacks
    def verifyChain(self, chainPEM: bytes, name: str) -> Any:
        """
        Check that a PEM chain issued by this Pebble (leaf first, then
        intermediates, as an ACME certificate download gives it) verifies
        up to one of its current L{roots} as a server certificate for
        C{name}, with cryptography's RFC 5280 / CA/B Forum verifier.

        @param chainPEM: the chain.
        @param name: the DNS name (or IP address) the leaf must be valid for.
        @return: a L{Deferred} firing with the verified path (leaf ...
            root), or failing with
            L{cryptography.x509.verification.VerificationError}.
        """
        chain = x509.load_pem_x509_certificates(chainPEM)
        roots = yield self.roots()
        try:
            subject: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        verifier = verification.PolicyBuilder().store(verification.Store(roots)).build_server_verifier(subject)
        return verifier.verify(chain[0], chain[1:])

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """
        Stop Pebble (only Pebble: the DNS server keeps running), as in an
        outage of the CA.  Its ports refuse connections once this fires.

        @return: a L{Deferred} firing when the process has ended.
        """
        yield self.process.stop()

    @defer.inlineCallbacks
    def restart(self) -> Any:
        """
        Start Pebble again (stopping it first if it runs) on the same ports
        with the same configuration and environment, and wait until it
        answers.  The new Pebble has no accounts, orders or authorizations,
        and a new root and intermediate.

        @return: a L{Deferred} firing with this L{Pebble} when it answers.
        """
        yield self.stop()
        yield self._launch()
        return self
