#!/usr/bin/env python3
"""
The cost of a peer hop (issue 13): a dial of an E2E name through the
instance that holds it, against the same dial through another instance of
the cluster, which forwards it over a peer link, in one run.

    .venv/bin/python benchmarks/cluster_bench.py [--quick]

Set-up, all on loopback and started by this script:

  - one etcd (a single member, fast elections, as C{tpproxy.cluster.testing}
    runs it for the tests);
  - two C{twist tp} instances sharing it, A on 127.0.0.1 and B on
    127.0.0.2, on the same port (as behind one anycast address), each with
    C{[cluster]} and its peer listener on its own address;
  - the sink of C{bench.py} (bulk up/down, echo) on 127.0.0.1;
  - C{tp expose 127.0.0.1:SINK --e2e sink.alice.localhost} registered at A
    (identity alice);
  - two C{tp up sink.alice.localhost:7 LOCALPORT} (identity bob), one with
    A as its server and one with B:

      direct  client -> tp up -> A -> exposer -> sink
      hop     client -> tp up -> B -> (peer link) -> A -> exposer -> sink

Every client connection to a C{tp up} is a new TP connection (TLS over TCP,
pinned), an inner E2E handshake with the name, and, for the hop, a new peer
link from B to A.  The two chains are measured alternately, each
measurement in turn: bulk upload and download of one connection (median of
the runs), then sequential short connections (connect, a 64-byte echo,
close), whose latencies give p50 and p99.  The report gives hop/direct
ratios, the latency the hop adds, and the CPU each process spent per GB and
per connection on each chain.  CPU time the rest of the machine used during
the run is reported, to tell a noisy run.

Results are printed as a table and written to
benchmarks/results/cluster-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench import _patternBlock, bulkDownload, bulkUpload, integrityChecks, shortConnection
from harness import (
    BIN,
    MB,
    RESULTS,
    BenchError,
    OtherLoad,
    Processes,
    concurrently,
    cpuSeconds,
    exitOnSignals,
    finish,
    formatTable,
    freePorts,
    freeTCPAndUDPPort,
    machine,
    median,
    now,
    peakRSSMB,
    ratio,
    requireTP,
    startEtcd,
    startServer,
    tpSource,
    tpVersions,
    waitForLog,
    workdir,
)

#: The E2E name the exposer registers at A.
NAME = "sink.alice.localhost"
#: The two chains, in table order: (key, heading, TP instance the dialer uses).
CHAINS = (("direct", "via A", 1), ("hop", "via B", 2))
#: The issue's target for bulk through a peer hop, as a fraction of direct.
BULK_TARGET = 0.8
#: A short connection's request: the sink echoes it (64 bytes).
ECHO = b"ECHO " + b"x" * 58 + b"\n"

SERVER_TOML = """\
[server]
listen = "tcp:{port}:interface=127.0.0.{i}"
quic = false
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
state_dir = "state-{i}"

[[rules]]
identities = "*"
hosts = ["127.0.0.0/8", "*.localhost"]
ports = "*"

[[exposures]]
identities = ["alice"]
names = "*.localhost"
dialers = ["bob"]

[reverse]
public_interface = "127.0.0.{i}"

[e2e]
ca_certificate = "ca.pem"
ca_key = "ca.key"

[cluster]
etcd = ["{etcd}"]
instance = "tp-{i}"
advertise = "127.0.0.{i}:{peerPort}"
peer_listen = "tcp:{peerPort}:interface=127.0.0.{i}"
"""


def makePKI(directory: Path) -> None:
    """
    A CA (also the E2E names' CA), TP's server certificate valid for both
    instances' addresses, and client certificates for alice (the exposer)
    and bob (the dialer).
    """
    from tpproxy.pki import CertificateAuthority, keyPEM, writePrivate

    directory.mkdir(parents=True)
    ca = CertificateAuthority.create("TP cluster bench CA")
    (directory / "ca.pem").write_bytes(ca.certPEM)
    writePrivate(directory / "ca.key", keyPEM(ca.key))
    ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1", "127.0.0.2"), server=True).write(
        directory / "server.pem", directory / "server.key"
    )
    for name in ("alice", "bob"):
        ca.issue(name, client=True).write(directory / f"{name}.pem", directory / f"{name}.key")


class Cluster:
    """
    etcd, the two instances, the sink, the exposer and the two C{tp up}.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.procs = Processes(directory)
        requireTP()
        #: Local port of each chain's `tp up`.
        self.entry: dict[str, int] = {}
        #: Process name -> pid, for the CPU figures.
        self.pids: dict[str, int] = {}

    def start(self) -> None:
        d = self.dir
        pki = d / "pki"
        makePKI(pki)

        url, clientPort = startEtcd(self.procs, d / "etcd")

        # The sink (bench.py's), then A and B.
        self.sinkPort = startServer(self.procs, "sink", [sys.executable, Path(__file__).resolve().with_name("bench.py"), "--sink"])
        port, peerPort = freeTCPAndUDPPort(), freePorts(1)[0]
        for i in (1, 2):
            config = pki / f"tp-{i}.toml"
            config.write_text(SERVER_TOML.format(port=port, peerPort=peerPort, i=i, etcd=url))
            self.procs.start(f"twist-{'AB'[i - 1]}", [BIN / "twist", "--log-format=text", "--log-file=+", "tp", "--config", config])
        for name in ("twist-A", "twist-B"):
            waitForLog(self.procs, name, re.compile(r"Peer links on"), "open its peer listener")

        def client(identity: str, i: int, *argv: str) -> list[str | Path]:
            return [
                BIN / "tp", "--server", f"127.0.0.{i}:{port}", "--cert", pki / f"{identity}.pem", "--key", pki / f"{identity}.key",
                "--ca", pki / "ca.pem", "--transport", "tls", *argv,
            ]

        # The exposer registers the sink's name at A; B learns the route
        # from etcd.
        self.procs.start("tp-expose", client("alice", 1, "expose", f"127.0.0.1:{self.sinkPort}", "--e2e", NAME))
        waitForLog(self.procs, "tp-expose", re.compile(r"; Ctrl-C stops"), "register its E2E name")
        waitForLog(self.procs, "twist-B", re.compile(re.escape(f"Routing E2E name {NAME} of alice to instance(s) ['tp-1']")), "route the name to A")

        # A `tp up` per chain, bob dialling the name through A or B.
        for (chain, _, i), local in zip(CHAINS, freePorts(len(CHAINS))):
            name = f"tp-up-{chain}"
            self.procs.start(name, client("bob", i, "up", f"{NAME}:7", str(local)))
            waitForLog(self.procs, name, re.compile(r"^Forwarding \S+ to \S+ via \S+ \(v\S+, tls\)", re.M), "listen")
            self.entry[chain] = local
        self.ports = {"tp": port, "peer": peerPort, "etcd": clientPort, "sink": self.sinkPort, **{f"tp_up_{c}": p for c, p in self.entry.items()}}
        self.pids = {name: proc.pid for name, proc in self.procs.procs.items() if name not in ("etcd", "sink")}

    def cpu(self) -> dict[str, float]:
        return {name: cpuSeconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        """
        TP's processes first, so that each instance can revoke its lease
        while etcd still answers; then the rest.
        """
        for name in ("tp-up-direct", "tp-up-hop", "tp-expose", "twist-B", "twist-A"):
            if name in self.procs.procs:
                self.procs.stopOne(name, 15)
        self.procs.stopAll()


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def measure(cluster: Cluster, args: argparse.Namespace, problems: list[str]) -> dict[str, Any]:
    """
    Bulk upload, bulk download and sequential short connections, the two
    chains taking turns at each.
    """
    block = _patternBlock()
    n = args.size * MB
    chains = [c for c, _, _ in CHAINS]
    out: dict[str, Any] = {c: {"upload_mb_s": [], "download_mb_s": [], "cpu_s": {}} for c in chains}

    def charge(chain: str, kind: str, used: dict[str, float]) -> None:
        table = out[chain]["cpu_s"].setdefault(kind, {})
        for name, seconds in used.items():
            table[name] = table.get(name, 0.0) + seconds

    for r in range(args.repeat):
        for direction in ("upload", "download"):
            for chain in chains if r % 2 == 0 else reversed(chains):
                port = cluster.entry[chain]
                before = cluster.cpu()
                try:
                    if direction == "upload":
                        seconds = bulkUpload(port, n, block)
                    else:
                        seconds, eofProblem = bulkDownload(port, n)
                        if eofProblem:
                            problems.append(f"{chain}: {eofProblem}")
                except (OSError, BenchError) as e:
                    problems.append(f"{chain} {direction} {r + 1}: {e}")
                    continue
                charge(chain, direction, spent(before, cluster.cpu()))
                out[chain][f"{direction}_mb_s"].append(round(n / MB / seconds, 1))
                print(f"  {direction} {args.size} MB via {chain}: {n / MB / seconds:.1f} MB/s", flush=True)
    # Short connections: in rounds of 10 per chain, alternating, so that a
    # change in the machine's load falls on both.
    rounds = max(1, args.connections // 10)
    rate: dict[str, dict[str, Any]] = {c: {"latencies": [], "seconds": 0.0, "errors": []} for c in chains}
    for r in range(rounds):
        for chain in chains if r % 2 == 0 else reversed(chains):
            before = cluster.cpu()
            port = cluster.entry[chain]
            got = concurrently(lambda: shortConnection(port, ECHO), 10, 1)
            charge(chain, "connections", spent(before, cluster.cpu()))
            rate[chain]["seconds"] += got.seconds
            rate[chain]["errors"] += got.errors
            rate[chain]["latencies"] += got.latencies
    for chain in chains:
        lat = sorted(rate[chain]["latencies"])
        ok = len(lat)
        total = rounds * 10
        if ok != total:
            problems.append(f"{chain}: {total - ok} of {total} short connections failed: {rate[chain]['errors'][:3]}")
        out[chain]["connections"] = {
            "connections": total,
            "ok": ok,
            "conn_per_s": round(ok / rate[chain]["seconds"], 1) if rate[chain]["seconds"] else None,
            "latency_ms_p50": round(1000 * lat[min(ok - 1, int(0.5 * ok))], 3) if lat else None,
            "latency_ms_p99": round(1000 * lat[min(ok - 1, int(0.99 * ok))], 3) if lat else None,
            "error_samples": sorted(set(rate[chain]["errors"]))[:5],
        }
        print(f"  {total} short connections via {chain}: {out[chain]['connections']['conn_per_s']} conn/s", flush=True)
    for chain in chains:
        for kind, table in out[chain]["cpu_s"].items():
            out[chain]["cpu_s"][kind] = {name: round(s, 3) for name, s in table.items()}
    return out


def buildTable(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["measured"]
    rows: list[dict[str, Any]] = []

    def add(label: str, direct: float | None, hop: float | None, digits: int = 1, compare: bool = True) -> None:
        rows.append({"measure": label, "direct": direct, "hop": hop, "ratio": ratio(hop, direct) if compare else None, "digits": digits})

    for direction in ("upload", "download"):
        add(f"{direction} {args.size} MB, median of {args.repeat} (MB/s)",
            median(m["direct"][f"{direction}_mb_s"]) or None, median(m["hop"][f"{direction}_mb_s"]) or None)
    c = {chain: m[chain]["connections"] for chain in ("direct", "hop")}
    add("new connections, sequential (conn/s)", c["direct"]["conn_per_s"], c["hop"]["conn_per_s"])
    add("  latency p50 (ms)", c["direct"]["latency_ms_p50"], c["hop"]["latency_ms_p50"], 2)
    add("  latency p99 (ms)", c["direct"]["latency_ms_p99"], c["hop"]["latency_ms_p99"], 2)
    gb = args.size * args.repeat * 2 / 1000
    conns = {chain: c[chain]["ok"] or 1 for chain in c}
    for name in ("twist-A", "twist-B", "tp-up", "tp-expose"):
        def cpu(chain: str, kind: str) -> float:
            table = m[chain]["cpu_s"].get(kind, {})
            if name == "tp-up":
                return table.get(f"tp-up-{chain}", 0.0)
            return table.get(name, 0.0)

        perGB = {ch: (cpu(ch, "upload") + cpu(ch, "download")) / gb for ch in ("direct", "hop")}
        perConn = {ch: 1000 * cpu(ch, "connections") / conns[ch] for ch in ("direct", "hop")}
        # B carries no traffic of the direct chain: no ratio for it.
        add(f"CPU per GB, {name} (s)", round(perGB["direct"], 2), round(perGB["hop"], 2), 2, name != "twist-B")
        add(f"CPU per connection, {name} (ms)", round(perConn["direct"], 2), round(perConn["hop"], 2), 2, name != "twist-B")
    return formatTable(rows, [("direct", "via A"), ("hop", "via B")], [("ratio", "B/A")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Dial an E2E name through the instance holding it (A) and through another instance "
        "of the cluster (B, a peer hop to A), alternately in one run: bulk, connection rate, latency, CPU.",
        epilog="Needs etcd (Debian: etcd-server) and TP installed in the venv running the script.",
    )
    parser.add_argument("--quick", action="store_true", help="a small run: 10 MB once each way, 30 connections")
    parser.add_argument("--size", type=int, default=50, help="MB per bulk transfer (default 50)")
    parser.add_argument("--repeat", type=int, default=3, help="bulk transfers per chain and direction; the median counts (default 3)")
    parser.add_argument("--connections", type=int, default=100, help="sequential short connections per chain (default 100)")
    parser.add_argument("--json", default=str(RESULTS / "cluster-latest.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeat, args.connections = 10, 1, 30
    exitOnSignals()
    with workdir("tp-cluster-bench-", args.keep) as directory:
        return run(args, directory)


def run(args: argparse.Namespace, directory: Path) -> int:
    started = time.monotonic()
    cluster = Cluster(directory)
    problems: list[str] = []
    results: dict[str, Any] = {
        "meta": {"started": now(), "machine": machine(), "versions": tpVersions(), "tp_source": tpSource(),
                 "size_mb": args.size, "repeat": args.repeat, "connections": args.connections},
    }
    try:
        print(f"Starting etcd, twist tp A (127.0.0.1) and B (127.0.0.2), the sink, tp expose and two tp up in {directory} ...", flush=True)
        cluster.start()
        results["meta"]["ports"] = cluster.ports
        other = OtherLoad()
        checks = {chain: integrityChecks(cluster.entry[chain], 1 * MB, 1, 10.0) for chain, _, _ in CHAINS}
        for chain, check in checks.items():
            for name, outcome in check.items():
                if isinstance(outcome, dict) and outcome.get("failed"):
                    problems.append(f"{chain}: integrity check {name} failed: {outcome['failures']}")
        results["integrity"] = checks
        results["measured"] = measure(cluster, args, problems)
        results["other_load"] = other.measure(cluster.procs)
        results["peak_rss_mb"] = {name: peakRSSMB(pid) for name, pid in cluster.pids.items()}
        cluster.procs.check()
    except BenchError as e:
        problems.append(str(e))
        results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
        return finish(results, problems, "", args.json)
    finally:
        cluster.stop()
    for name in ("twist-A", "twist-B"):
        text = cluster.procs.logText(name) or ""
        errors = [line for line in text.splitlines() if "Traceback" in line or "Unhandled" in line]
        if errors:
            problems.append(f"{name} logged {len(errors)} tracebacks/unhandled errors: {errors[:2]}")

    m = results["measured"]
    summary: dict[str, Any] = {}
    for direction in ("upload", "download"):
        summary[f"{direction}_hop_over_direct"] = ratio(median(m["hop"][f"{direction}_mb_s"]), median(m["direct"][f"{direction}_mb_s"]))
    summary["conn_rate_hop_over_direct"] = ratio(m["hop"]["connections"]["conn_per_s"], m["direct"]["connections"]["conn_per_s"])
    for p in ("p50", "p99"):
        a, b = m["direct"]["connections"][f"latency_ms_{p}"], m["hop"]["connections"][f"latency_ms_{p}"]
        summary[f"added_latency_ms_{p}"] = round(b - a, 2) if a is not None and b is not None else None
    summary["bulk_target_met"] = all((summary[f"{d}_hop_over_direct"] or 0) >= BULK_TARGET for d in ("upload", "download"))
    results["summary"] = summary
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)

    print()
    print(OtherLoad.describe(results["other_load"]))
    print()
    print(buildTable(results, args))
    print()
    print(f"Added by the peer hop: {summary['added_latency_ms_p50']} ms at p50, {summary['added_latency_ms_p99']} ms at p99; "
          f"bulk hop/direct {summary['upload_hop_over_direct']} up, {summary['download_hop_over_direct']} down "
          f"(target >= {BULK_TARGET}: {'met' if summary['bulk_target_met'] else 'NOT met'})")
    print(f"Peak RSS (MB): {results['peak_rss_mb']}")
    print("via A = tp up -> A (holds the name) -> exposer -> sink; via B = tp up -> B -> peer link -> A -> exposer -> sink; "
          "tp-up is each chain's own tp up; CPU per GB counts upload and download together.")
    return finish(results, problems, "No problems: every transfer and connection complete and verified.", args.json)


if __name__ == "__main__":
    sys.exit(main())
