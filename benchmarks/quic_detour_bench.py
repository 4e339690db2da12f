#!/usr/bin/env python3
"""
What the detour costs a QUIC client whose packets land on another worker
than the one that owns its connection (issue 14 part B, docs/workers.md).

    .venv/bin/python benchmarks/quic_detour_bench.py [--size MB] [--runs N]

Set-up, all on loopback: one etcd, a socat sink, and C{twist tp} with
C{workers = 2} and an admin listener per worker.  One QUIC connection (TP's
own client, in this process) uploads C{--size} MB to the sink on a new
stream, then moves to a new source port (C{ClientSession.rebind}); the
kernel gives each new 4-tuple to one worker.  Each upload counts as
"direct" if no packet was forwarded between the workers meanwhile (from
the workers' C{tp_quic_forwarded_datagrams_total}), else "detour", until
each kind has C{--runs} uploads.  Reported: the median MB/s of each.

Results are printed and written to
benchmarks/results/quic-detour-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import (
    BIN,
    MB,
    RESULTS,
    BenchError,
    Processes,
    exitOnSignals,
    finish,
    freePorts,
    freeTCPAndUDPPort,
    machine,
    median,
    now,
    requireTool,
    requireTP,
    tpSource,
    tpVersions,
    workdir,
)
from workers_bench import SERVER_TOML, startBase


def forwarded(adminPorts: list[int]) -> float:
    total = 0.0
    for port in adminPorts:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("tp_quic_forwarded_datagrams_total "):
                    total += float(line.split()[1])
    return total


def measure(reactor: Any, pki: Path, port: int, sinkPort: int, adminPorts: list[int], size: int, runs: int, results: dict[str, Any]) -> Any:
    from twisted.internet import defer, threads

    from tpproxy.pki import loadCertificates, loadKey
    from tpproxy.protocols.client import TPClientProtocol
    from tpproxy.transports.quic import clientConfiguration, connectQuic
    from tpproxy.wire import ClientHello

    @defer.inlineCallbacks
    def run() -> Any:
        config = clientConfiguration("localhost", loadCertificates(str(pki / "ca.pem")), loadCertificates(str(pki / "alice.pem")), loadKey(str(pki / "alice.key")))
        session = connectQuic(reactor, ("127.0.0.1", port), config)
        yield session.ready
        chunk = b"\0" * MB
        try:
            for _ in range(12 * runs):
                if all(len(results[kind]) >= runs for kind in ("direct", "detour")):
                    break
                before = yield threads.deferToThread(forwarded, adminPorts)
                ready: defer.Deferred[Any] = defer.Deferred()
                session.openStream(TPClientProtocol(ClientHello.connect("127.0.0.1", sinkPort), ready))
                end = yield ready
                closed: defer.Deferred[None] = defer.Deferred()
                end.connectionLost = lambda reason, closed=closed: closed.called or closed.callback(None)
                end.transport.resumeProducing()
                started = reactor.seconds()
                for _ in range(size):
                    end.transport.write(chunk)
                end.transport.loseWriteConnection()
                yield closed
                elapsed = reactor.seconds() - started
                after = yield threads.deferToThread(forwarded, adminPorts)
                kind = "detour" if after - before > 10 else "direct"
                results[kind].append(round(size / elapsed, 1))
                print(f"  {kind}: {size / elapsed:.1f} MB/s ({after - before:g} packets forwarded)", flush=True)
                session.rebind()
        finally:
            session.close(0, "done")
            session.socket.stop()

    return run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20, help="MB per upload (default 20)")
    parser.add_argument("--runs", type=int, default=3, help="uploads of each kind (default 3)")
    args = parser.parse_args(argv)
    exitOnSignals()
    requireTP()
    socat = requireTool("socat")
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"started": now(), "machine": machine(), "versions": tpVersions(), "tp_source": tpSource(), "size_mb": args.size},
        "direct": [],
        "detour": [],
    }
    problems: list[str] = []
    with workdir("tp-quic-detour-") as d:
        procs = Processes(d)
        try:
            pki, etcd, sinkPort = startBase(procs, d, socat)
            port = freeTCPAndUDPPort()
            peerPort, adminPort = freePorts(1)[0], freePorts(1)[0]
            config = pki / "tp.toml"
            config.write_text(
                SERVER_TOML.format(port=port, peerPort=peerPort, workers=2, etcd=etcd, instance="detour").replace("quic = false\n", "")
                + f'\n[admin]\nlisten = "tcp:{adminPort}:interface=127.0.0.1"\n'
            )
            procs.start("twist", [BIN / "twist", "--log-format=text", "--log-file=+", "tp", "--config", config])
            deadline = time.monotonic() + 60
            while (procs.logText("twist") or "").count("Admin listener on") < 2 or (procs.logText("twist") or "").count("Peer links on") < 2:
                procs.check()
                if time.monotonic() > deadline:
                    raise BenchError(f"the workers did not start:\n{procs.logTail('twist')}")
                time.sleep(0.1)
            time.sleep(0.5)  # the admin sites start right after
            from twisted.internet import task

            try:
                task.react(lambda reactor: measure(reactor, pki, port, sinkPort, [adminPort, adminPort + 1], args.size, args.runs, results))
            except SystemExit as e:
                if e.code:
                    raise BenchError(f"the measurement failed (status {e.code}):\n{procs.logTail('twist')}") from None
            if not re.search(r"Worker \d started", procs.logText("twist") or ""):
                problems.append("no worker started")
        except BenchError as e:
            problems.append(str(e))
        finally:
            procs.stopAll()
    if results["direct"] and results["detour"]:
        results["summary"] = {
            "direct_mb_s": median(results["direct"]),
            "detour_mb_s": median(results["detour"]),
            "detour_over_direct": round(median(results["detour"]) / median(results["direct"]), 3),
        }
        print(f"\nQUIC upload {args.size} MB: direct {results['summary']['direct_mb_s']} MB/s, through the other worker "
              f"{results['summary']['detour_mb_s']} MB/s ({results['summary']['detour_over_direct']})")
    else:
        problems.append(f"not enough runs of each kind: {len(results['direct'])} direct, {len(results['detour'])} detour")
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    return finish(results, problems, "No problems.", RESULTS / "quic-detour-latest.json")


if __name__ == "__main__":
    sys.exit(main())
