#!/usr/bin/env python3
"""
Hostile traffic against a real `twist tp`, on loopback only (issue 10):

  quic-garbage   20,000 undecryptable 1200-byte QUIC Initials (random DCIDs)
                 at 4,000/s from 64 sockets on 127.0.0.2-9
  quic-halfopen  real aioquic Initials that never go on (5,000 at 1,000/s)
                 from 64 sockets on 127.0.0.10-17
  tcp-flood      three processes (127.0.0.2, .3, .4) each keeping up to
                 6,000 silent TCP connections open, re-opening as TP closes
                 them, for 30 s
  burst          500 simultaneous TCP connects, time until all are accepted
  restart        `tp expose` over QUIC and over TLS; `twist tp` restarted
                 with SIGTERM and with SIGKILL; time until the exposer says
                 it is registered again, from the new process listening
  memory         N idle tunnels (TLS, spliced to a local sink): server RSS
                 before, with all open, after all closed (+ trim interval)

During each flood, and for 80 s (QUIC) or 20 s (TCP) after, a legitimate client probes every
250 ms from 127.0.0.1: a new TLS tunnel (handshake with a client
certificate, ClientHello, ServerHello ok) and a new QUIC connection with a
tunnel.  The probe client is this tree's code; the server is the tree named
by --tree (default: this repository), so the same script measures an older
commit checked out elsewhere:

    git worktree add /tmp/old a0e903a
    .venv/bin/python benchmarks/hardening_bench.py --tree /tmp/old --json old.json
    .venv/bin/python benchmarks/hardening_bench.py --json new.json

Every flood is bounded in count and time and goes to 127.0.0.0/8 only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from harness import (
    BIN,
    REPO,
    Processes,
    freeTCPAndUDPPort,
    initDev,
    statusKB,
    waitForPort,
    workdir,
    writeJSON,
)

# The probe client is this checkout's code, whichever tree the server runs.
sys.path.insert(0, str(REPO))


# --- processes -----------------------------------------------------------------


class Server:
    """
    `twist tp` from a tree, on 127.0.0.1:PORT (TCP and UDP), restartable;
    each start logs to its own C{twist-N.log}.
    """

    def __init__(self, procs: Processes, tree: Path, pki: Path, port: int) -> None:
        self.procs = procs
        self.tree = tree
        self.pki = pki
        self.port = port
        self.name: str | None = None
        self.starts = 0

    def start(self) -> float:
        """
        Start it; the C{time.monotonic()} at which its TLS port answered.
        """
        self.starts += 1
        self.name = f"twist-{self.starts}"
        self.procs.start(self.name, [BIN / "twist", "tp", "--config", self.pki / "server.toml"], cwd=self.tree, env=self.env())
        return waitForPort(self.port, None, "twist tp", timeout=30, interval=0.02, connectTimeout=0.5)

    def env(self) -> dict[str, str]:
        """
        What runs TP from the tree under test.
        """
        return {"PYTHONPATH": str(self.tree)}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.name is not None and self.procs.stopOne(self.name, 15, sig) is None:
            # Too busy to stop (the old QUIC flood outage): kill it.
            self.procs.kill(self.name)
        self.name = None

    def rss(self) -> int:
        assert self.name is not None
        return statusKB(self.procs.pid(self.name), "VmRSS") or 0


def echoServer() -> tuple[int, socket.socket]:
    """
    A threaded echo/sink on 127.0.0.1 (it holds every tunnel's far end).
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    held: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True, name="echo").start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], listener


# --- the probe -----------------------------------------------------------------


class Prober:
    """
    Legitimate clients, in a Twisted reactor on a thread: a TLS tunnel and
    a QUIC tunnel, each on a new connection, every 250 ms.
    """

    def __init__(self, pki: Path, port: int, echoPort: int) -> None:
        from twisted.internet import reactor

        from tpproxy.cli import Settings
        from tpproxy.protocols.client import ServerAddress

        self.reactor = reactor
        self.settings = Settings(ServerAddress("127.0.0.1", port), str(pki / "client.pem"), str(pki / "client.key"), str(pki / "ca.pem"), 10.0, "quic")
        self.tlsOptions = self.settings.tlsOptions()
        self.echoPort = echoPort
        self.samples: dict[str, list[tuple[float, float | None]]] = {"tls": [], "quic": []}
        self.running = False
        threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True).start()

    def _probeTLS(self) -> Any:
        from tpproxy.protocols.client import openTunnel
        from tpproxy.wire import ClientHello

        return openTunnel(self.reactor, self.settings.server, self.tlsOptions, ClientHello.connect("127.0.0.1", self.echoPort), 10.0)

    def _probeQUIC(self) -> Any:
        from twisted.internet import defer

        from tpproxy.connector import Connector
        from tpproxy.wire import ClientHello

        connector = Connector(self.reactor, self.settings)
        d = defer.ensureDeferred(connector.open(ClientHello.connect("127.0.0.1", self.echoPort)))
        d.addBoth(lambda r: (connector.close(), r)[1])
        return d

    def _one(self, kind: str) -> None:
        start = time.monotonic()
        d = self._probeTLS() if kind == "tls" else self._probeQUIC()

        def done(result: Any) -> None:
            ok = not hasattr(result, "getErrorMessage")
            self.samples[kind].append((start, time.monotonic() - start if ok else None))
            transport = getattr(result, "transport", None)
            if ok and transport is not None:
                transport.loseConnection()

        d.addBoth(done)

    def _tick(self) -> None:
        if not self.running:
            return
        self._one("tls")
        self._one("quic")
        self.reactor.callLater(0.25, self._tick)

    def start(self) -> None:
        self.samples = {"tls": [], "quic": []}
        self.started = time.monotonic()
        self.running = True
        self.reactor.callFromThread(self._tick)

    def stop(self) -> dict[str, Any]:
        self.running = False
        time.sleep(10.5)  # the last probes' timeout
        out: dict[str, Any] = {}
        for kind, samples in self.samples.items():
            times = [t for _, t in samples if t is not None]
            out[kind] = {
                "probes": len(samples),
                "failed": sum(1 for _, t in samples if t is None),
                "median_ms": round(1000 * statistics.median(times), 1) if times else None,
                "worst_ms": round(1000 * max(times), 1) if times else None,
                "over_1s": sum(1 for t in times if t > 1.0),
                # When the slow or failed probes started, in seconds from
                # the start of the flood.
                "slow_at_s": [round(start - self.started, 1) for start, t in samples if t is None or t > 1.0],
            }
        return out


# --- floods (run as child processes of this script) ----------------------------


def udpSockets(firstHost: int) -> list[socket.socket]:
    """
    64 UDP sockets on 127.0.0.FIRST .. FIRST+7: many source ports, and
    several source prefixes.
    """
    socks = []
    for i in range(64):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.0.{firstHost + i % 8}", 0))
        socks.append(s)
    return socks


def paced(count: int, rate: float, send: Callable[[int], None]) -> None:
    """
    Call C{send(n)} for n in range(count), C{rate} times a second.
    """
    start = time.monotonic()
    for n in range(count):
        send(n)
        lag = start + n / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)


def floodQuicGarbage(port: int, count: int, rate: float) -> None:
    socks = udpSockets(2)

    def send(n: int) -> None:
        head = bytes([0xC3]) + (1).to_bytes(4, "big") + bytes([8]) + os.urandom(8) + bytes([8]) + os.urandom(8) + b"\x00"
        left = 1200 - len(head) - 2
        socks[n % 64].sendto(head + (0x4000 | left).to_bytes(2, "big") + os.urandom(left), ("127.0.0.1", port))

    paced(count, rate, send)


def floodQuicHalfOpen(port: int, count: int, rate: float, pki: str) -> None:
    from aioquic.quic.connection import QuicConnection

    from tpproxy.pki import loadCertificates, loadKey
    from tpproxy.transports.quic import clientConfiguration

    d = Path(pki)
    config = clientConfiguration("localhost", loadCertificates(str(d / "ca.pem")), loadCertificates(str(d / "client.pem")), loadKey(str(d / "client.key")))
    socks = udpSockets(10)

    def send(n: int) -> None:
        conn = QuicConnection(configuration=config)
        conn.connect(("127.0.0.1", port), now=time.time())
        for data, _ in conn.datagrams_to_send(now=time.time()):
            socks[n % 64].sendto(data, ("127.0.0.1", port))

    paced(count, rate, send)


def floodTCP(port: int, source: str, hold: int, seconds: float) -> None:
    import selectors

    sel = selectors.DefaultSelector()
    opened = 0
    end = time.monotonic() + seconds
    live = 0

    def openOne() -> None:
        nonlocal opened, live
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((source, 0))
            s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            return
        sel.register(s, selectors.EVENT_READ)
        opened += 1
        live += 1

    while time.monotonic() < end:
        while live < hold and time.monotonic() < end:
            openOne()
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()  # type: ignore[union-attr]
                live -= 1
    print(json.dumps({"opened": opened}))


# --- measurements ---------------------------------------------------------------


def child(procs: Processes, name: str, args: list[str]) -> subprocess.Popen[bytes]:
    """
    A flood: this script (this checkout's code) with C{--child}.
    """
    return procs.start(name, [sys.executable, Path(__file__).resolve(), *args], stdout=subprocess.PIPE, env={"PYTHONPATH": str(REPO)})


def duringFlood(name: str, server: Server, prober: Prober, floods: list[subprocess.Popen[bytes]], after: float = 20.0) -> dict[str, Any]:
    rss0 = server.rss()
    peak = rss0
    prober.start()
    while any(f.poll() is None for f in floods):
        peak = max(peak, server.rss())
        time.sleep(0.2)
    end = time.monotonic() + after
    while time.monotonic() < end:
        peak = max(peak, server.rss())
        time.sleep(0.2)
    probes = prober.stop()
    result = {"rss_before_kb": rss0, "rss_peak_kb": peak, "rss_after_kb": server.rss(), "probes": probes}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def burst(port: int, n: int = 500) -> float:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.setblocking(False)
    start = time.monotonic()
    for s in socks:
        s.connect_ex(("127.0.0.1", port))
    pending = set(socks)
    import select

    while pending and time.monotonic() - start < 30:
        _, writable, _ = select.select([], list(pending)[:1000], [], 0.5)
        for s in writable:
            pending.discard(s)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    return elapsed


def restartTimes(server: Server, pki: Path, echoPort: int, transport: str, sig: int) -> float | None:
    name = f"expose-{transport}-{signal.Signals(sig).name}"
    exposer = server.procs.start(
        name,
        [BIN / "tp", "--config", pki / "client.toml", "--transport", transport, "expose", f"127.0.0.1:{echoPort}", "--e2e", f"{transport}.dev.localhost"],
        stderr=subprocess.PIPE,
        env=server.env(),  # the exposer of the tree under test
    )
    assert exposer.stderr is not None
    lines: list[tuple[float, bytes]] = []

    def read() -> None:
        for line in exposer.stderr:  # type: ignore[union-attr]
            lines.append((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 30
    while not any(b"Ctrl-C stops" in line for _, line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop(sig)
    ready = server.start()
    back = None
    deadline = time.monotonic() + 90
    while back is None and time.monotonic() < deadline:
        for t, line in lines:
            if b" again via" in line:
                back = t - ready
        time.sleep(0.05)
    if server.procs.stopOne(name, 10) is None:
        server.procs.kill(name)
    return None if back is None else round(back, 2)


def memory(server: Server, prober: Prober, echoPort: int, counts: list[int]) -> dict[str, Any]:
    from twisted.internet import defer

    out: dict[str, Any] = {}
    for n in counts:
        rss0 = server.rss()
        ends: list[Any] = []
        done = threading.Event()

        @defer.inlineCallbacks
        def openAll() -> Any:
            for i in range(0, n, 100):
                batch = [prober._probeTLS() for _ in range(min(100, n - i))]
                results = yield defer.DeferredList(batch, consumeErrors=True)
                ends.extend(r for ok, r in results if ok)
            done.set()

        prober.reactor.callFromThread(openAll)
        done.wait(600)
        time.sleep(3)
        rssOpen = server.rss()
        opened = len(ends)

        def closeAll() -> None:
            for end in ends:
                end.transport.loseConnection()

        prober.reactor.callFromThread(closeAll)
        time.sleep(5)
        rssClosed = server.rss()
        time.sleep(12)  # TP's trim check runs every 10 s
        rssTrimmed = server.rss()
        out[str(n)] = {
            "opened": opened,
            "rss_before_kb": rss0,
            "rss_open_kb": rssOpen,
            "kib_per_tunnel": round((rssOpen - rss0) / max(opened, 1), 1),
            "rss_closed_kb": rssClosed,
            "rss_after_trim_kb": rssTrimmed,
        }
        print(f"memory {n}: {json.dumps(out[str(n)])}", flush=True)
    return out


def setUp(procs: Processes, tree: Path, backlog: int | None = None) -> tuple[Server, Path]:
    port = freeTCPAndUDPPort()
    pki = initDev(
        procs.logdir / "pki",
        port,
        f'listen = ["tcp:{port}:interface=127.0.0.1"]\nquic = ["127.0.0.1:{port}"]',
        append="" if backlog is None else f"\n[limits]\nbacklog = {backlog}\n",
        env=dict(os.environ, PYTHONPATH=str(tree)),
    )
    return Server(procs, tree, pki, port), pki


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO, help="the TP source tree whose twist tp is attacked")
    parser.add_argument("--json", type=Path, help="write the results here (they are printed in any case)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    parser.add_argument("--only", action="append", help="run only these parts (quic-garbage, quic-halfopen, tcp-flood, burst, restart, memory)")
    parser.add_argument("--tunnels", type=int, action="append", help="tunnel counts for memory (default 2000 and 9000)")
    parser.add_argument(
        "--backlog",
        type=int,
        help="[limits] backlog for the server (the kernel caps it at net.core.somaxconn, which is reported)",
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "quic-garbage":
            floodQuicGarbage(int(rest[0]), int(rest[1]), float(rest[2]))
        elif kind == "quic-halfopen":
            floodQuicHalfOpen(int(rest[0]), int(rest[1]), float(rest[2]), rest[3])
        elif kind == "tcp":
            floodTCP(int(rest[0]), rest[1], int(rest[2]), float(rest[3]))
        return 0

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parts = args.only or ["quic-garbage", "quic-halfopen", "tcp-flood", "burst", "restart", "memory"]
    results: dict[str, Any] = {"tree": str(args.tree), "commit": subprocess.run(["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    with workdir("tp-hardening-", args.keep) as directory:
        procs = Processes(directory)
        try:
            server, pki = setUp(procs, args.tree, args.backlog)
            results["somaxconn"] = int(Path("/proc/sys/net/core/somaxconn").read_text())
            results["backlog"] = args.backlog
            echoPort, _ = echoServer()
            server.start()
            prober = Prober(pki, server.port, echoPort)
            if "quic-garbage" in parts:
                # 80 s after: the sessions of a flood reach their 60 s idle
                # timeout within it (where TP kept them, that was the outage).
                results["quic_garbage"] = duringFlood(
                    "quic-garbage", server, prober, [child(procs, "flood-quic-garbage", ["--child", "quic-garbage", str(server.port), "20000", "4000"])], after=80
                )
            if "quic-halfopen" in parts:
                results["quic_halfopen"] = duringFlood(
                    "quic-halfopen", server, prober, [child(procs, "flood-quic-halfopen", ["--child", "quic-halfopen", str(server.port), "5000", "1000", str(pki)])], after=80
                )
            if "tcp-flood" in parts:
                floods = [
                    child(procs, f"flood-tcp-{i}", ["--child", "tcp", str(server.port), f"127.0.0.{i}", "6000", "30"]) for i in (2, 3, 4)
                ]
                results["tcp_flood"] = duringFlood("tcp-flood", server, prober, floods)
            if "burst" in parts:
                results["burst_500_s"] = round(burst(server.port), 2)
                print(f"burst: {results['burst_500_s']} s", flush=True)
            if "restart" in parts:
                results["restart"] = {}
                for transport in ("quic", "tls"):
                    for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)):
                        results["restart"][f"{transport} {name}"] = restartTimes(server, pki, echoPort, transport, sig)
                        print(f"restart {transport} {name}: {results['restart'][f'{transport} {name}']} s", flush=True)
            if "memory" in parts:
                server.stop()
                server.start()
                results["memory"] = memory(server, prober, echoPort, args.tunnels or [2000, 9000])
        finally:
            procs.stopAll()
    if args.json:
        writeJSON(args.json, results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
