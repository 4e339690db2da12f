"""
Network namespaces for tests: a small topology made with C{ip} and
C{nft} (root only; CI runs as root), removed at the test's cleanup.

Namespaces share the process table with the host, so a process started in
one with C{ip netns exec NS ...} is signalled and killed as usual; only
its network is its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SkipTest, TestCase


def requireNetns() -> tuple[str, str]:
    """
    The C{ip} and C{nft} programs, when this process may make namespaces
    (root).  Otherwise skip, except under C{CI=true}, where it is an error.
    """
    ip, nft = shutil.which("ip") or "/usr/sbin/ip", shutil.which("nft") or "/usr/sbin/nft"
    problems = []
    if os.geteuid() != 0:
        problems.append("network namespaces need root")
    for path, package in ((ip, "iproute2"), (nft, "nftables")):
        if not os.access(path, os.X_OK):
            problems.append(f"{os.path.basename(path)} is not installed (bash .ci/run installs {package})")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI") == "true":
            raise AssertionError(message + "; under CI=true this is an error")
        raise SkipTest(message)
    return ip, nft


class Namespaces:
    """
    Named network namespaces of one test: C{ns(name)} is the real name
    (prefixed with this process's id and a counter, so concurrent runs do
    not collide).
    """

    _count = 0

    def __init__(self, testCase: TestCase) -> None:
        self.ip, self.nft = requireNetns()
        Namespaces._count += 1
        self.prefix = f"tp{os.getpid() % 100000}n{Namespaces._count}"
        self.made: list[str] = []
        testCase.addCleanup(self.remove)

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def sh(self, *argv: str, input: bytes | None = None) -> str:
        result = subprocess.run(argv, input=input, capture_output=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return result.stdout.decode(errors="replace")

    def add(self, name: str) -> str:
        ns = self.ns(name)
        self.sh(self.ip, "netns", "add", ns)
        self.made.append(ns)
        self.sh(self.ip, "-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str, aAddresses: list[str], b: str, bAddresses: list[str]) -> None:
        """
        A veth pair between namespaces C{a} and C{b} (short names), with
        the given addresses (C{10.0.0.1/24}) on each end.
        """
        ends = (f"{self.prefix}{a}{b}", f"{self.prefix}{b}{a}")
        self.sh(self.ip, "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
        for end, name, addresses in ((ends[0], a, aAddresses), (ends[1], b, bAddresses)):
            ns = self.ns(name)
            self.sh(self.ip, "link", "set", end, "netns", ns)
            for address in addresses:
                self.sh(self.ip, "-n", ns, "addr", "add", address, "dev", end)
            self.sh(self.ip, "-n", ns, "link", "set", end, "up")

    def route(self, name: str, via: str) -> None:
        self.sh(self.ip, "-n", self.ns(name), "route", "add", "default", "via", via)

    def forwarding(self, name: str) -> None:
        self.sh(self.ip, "netns", "exec", self.ns(name), "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def nftables(self, name: str, rules: str) -> None:
        self.sh(self.ip, "netns", "exec", self.ns(name), self.nft, "-f", "-", input=rules.encode())

    def exec(self, name: str) -> list[str]:
        """
        The prefix that runs a command in namespace C{name}.
        """
        return [self.ip, "netns", "exec", self.ns(name)]

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    @defer.inlineCallbacks
    def waitForTCP(self, name: str, host: str, port: int, timeout: float = 30) -> Any:
        """
        Wait until something in namespace C{name} accepts TCP connections
        on C{host:port}.
        """
        deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
        probe = self.exec(name) + ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
        while subprocess.run(probe, capture_output=True, timeout=10).returncode != 0:
            if reactor.seconds() > deadline:  # type: ignore[attr-defined]
                raise AssertionError(f"nothing listens on {host}:{port} in {self.ns(name)} after {timeout} s")
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.1, d.callback, None)  # type: ignore[attr-defined]
            yield d

    def fetch(self, name: str, url: str) -> str:
        """
        C{url} fetched with curl from inside namespace C{name}.
        """
        return self.sh(*self.exec(name), "curl", "-sS", "--max-time", "10", url)
