#!/usr/bin/env python3
"""
What workers buy (issue 14, part A): full mutual-TLS handshakes per second
and bulk through C{twist tp} with C{server.workers} = 1 and = 2, in one run.

    .venv/bin/python benchmarks/workers_bench.py [--quick]

Set-up, all on loopback and started by this script: one etcd (workers are
cluster instances), a sink (socat into /dev/null), and C{twist tp} with the
same configuration but for C{workers}, started anew for each measurement;
the two settings alternate, two rounds each (one with C{--quick}).

  - Handshakes: two C{openssl s_time -new} at once (C, so that the load
    generator costs little CPU next to TP's), each making full TLS 1.3
    handshakes with a client certificate for C{--seconds}.  TP verifies the
    certificate and waits for a ClientHello that does not come; s_time
    closes at once.  Reported: handshakes per second (both generators),
    TP's CPU per handshake (the pool and all its workers) and the
    generators' own CPU.
  - Bulk: two C{openssl s_client} at once, each sending a C{connect}
    ClientHello to the sink then C{--size} MB, through TP (one TLS
    connection each).  Reported: MB/s (both together, from the first byte
    sent to the last connection's end) and TP's CPU per GB.

The machine's other load during the run is reported, to tell a noisy run.
Results are printed as a table and written to
benchmarks/results/workers-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    BIN,
    MB,
    RESULTS,
    BenchError,
    OtherLoad,
    Processes,
    cpuSeconds,
    exitOnSignals,
    finish,
    formatTable,
    freePorts,
    freeTCPAndUDPPort,
    machine,
    median,
    now,
    ratio,
    requireTool,
    requireTP,
    startEtcd,
    tpSource,
    tpVersions,
    waitForLog,
    workdir,
)

SERVER_TOML = """
[server]
listen = "tcp:{port}:interface=127.0.0.1"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
workers = {workers}
quic = false

[[rules]]
identities = "*"
hosts = ["127.0.0.1"]
ports = "*"

[limits]
tunnels_per_identity_per_minute = 1000000
tunnels_per_identity = 100000
handshakes_per_source = 100000

[cluster]
etcd = ["{etcd}"]
instance = "{instance}"
advertise = "127.0.0.1:{peerPort}"
peer_listen = "tcp:{peerPort}:interface=127.0.0.1"
"""


def makePKI(directory: Path) -> None:
    from tpproxy.pki import CertificateAuthority, keyPEM, writePrivate

    directory.mkdir(parents=True)
    ca = CertificateAuthority.create("TP workers bench CA")
    (directory / "ca.pem").write_bytes(ca.certPEM)
    writePrivate(directory / "ca.key", keyPEM(ca.key))
    ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(directory / "server.pem", directory / "server.key")
    ca.issue("alice", client=True).write(directory / "alice.pem", directory / "alice.key")


def startBase(procs: Processes, d: Path, socat: str) -> tuple[Path, str, int]:
    """
    What both worker benchmarks start first: the certificates (in
    C{d/pki}), one etcd and a socat sink; returns the certificates'
    directory, etcd's URL and the sink's port.
    """
    pki = d / "pki"
    makePKI(pki)
    etcd, _ = startEtcd(procs, d / "etcd")
    sinkPort = freePorts(1)[0]
    procs.start("sink", [socat, "-u", f"TCP-LISTEN:{sinkPort},bind=127.0.0.1,fork,reuseaddr", "OPEN:/dev/null"])
    return pki, etcd, sinkPort


def waitChildren(procs: list[subprocess.Popen[bytes]], timeout: float) -> float:
    """
    Wait for C{procs}; the CPU seconds they used (from their rusage).
    """
    deadline = time.monotonic() + timeout
    used = 0.0
    for proc in procs:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                used += usage.ru_utime + usage.ru_stime
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise BenchError(f"{proc.args[:2]} did not finish within {timeout:g} s")
            time.sleep(0.02)
    return used


class Setting:
    """
    One C{twist tp} with C{workers} processes, its pids (pool and workers).
    """

    def __init__(self, procs: Processes, pki: Path, etcd: str, workers: int, label: str) -> None:
        self.procs = procs
        self.name = f"twist-{label}"
        self.port = freeTCPAndUDPPort()
        peerPort = freePorts(1)[0]
        config = pki / f"{label}.toml"
        config.write_text(SERVER_TOML.format(port=self.port, peerPort=peerPort, workers=workers, etcd=etcd, instance=label))
        procs.start(self.name, [BIN / "twist", "--log-format=text", "--log-file=+", "tp", "--config", config])
        deadline = time.monotonic() + 60
        while (self.procs.logText(self.name) or "").count("Peer links on") < workers:
            procs.check()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: its workers did not start:\n{procs.logTail(self.name)}")
            time.sleep(0.1)
        waitForLog(procs, self.name, re.compile(r"TP serving TLS"), "listen")
        self.pids = [procs.pid(self.name)] + [int(p) for p in re.findall(r"Worker \d+ started \(pid (\d+)\)", procs.logText(self.name) or "")]

    def cpu(self) -> float:
        return sum(cpuSeconds(pid) for pid in self.pids)

    def stop(self) -> None:
        self.procs.stopOne(self.name, 30)
        del self.procs.procs[self.name]


def handshakes(setting: Setting, pki: Path, seconds: int, openssl: str, generators: int) -> dict[str, Any]:
    argv = [
        openssl, "s_time", "-connect", f"127.0.0.1:{setting.port}", "-new", "-tls1_3", "-time", str(seconds),
        "-cert", str(pki / "alice.pem"), "-key", str(pki / "alice.key"), "-CAfile", str(pki / "ca.pem"),
    ]
    before = setting.cpu()
    gens = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(generators)]
    outputs = [g.stdout.read().decode(errors="replace") for g in gens]  # type: ignore[union-attr]
    genCPU = waitChildren(gens, seconds + 30)
    tpCPU = setting.cpu() - before
    count, wall = 0, 0.0
    for out in outputs:
        match = re.search(r"(\d+) connections in (\d+) real seconds", out)
        if match is None:
            raise BenchError(f"openssl s_time said:\n{out[-1500:]}")
        count += int(match.group(1))
        wall = max(wall, float(match.group(2)))
    return {
        "handshakes": count,
        "per_s": round(count / wall, 1),
        "tp_cpu_ms_per_handshake": round(1000 * tpCPU / count, 3) if count else None,
        "tp_cores": round(tpCPU / wall, 2),
        "generator_cores": round(genCPU / wall, 2),
    }


def bulk(setting: Setting, pki: Path, sinkPort: int, size: int, openssl: str) -> dict[str, Any]:
    from tpproxy.wire import ClientHello

    hello = pki / "hello.bin"
    hello.write_bytes(ClientHello.connect("127.0.0.1", sinkPort).toFrame())
    script = (
        f"(cat {hello}; head -c {size * MB} /dev/zero) | {openssl} s_client -quiet -no_ign_eof -alpn tp/1 -tls1_3 "
        f"-connect 127.0.0.1:{setting.port} -servername localhost -cert {pki / 'alice.pem'} -key {pki / 'alice.key'} "
        f"-CAfile {pki / 'ca.pem'} > /dev/null 2>&1"
    )
    before = setting.cpu()
    started = time.monotonic()
    senders = [subprocess.Popen(["sh", "-c", script]) for _ in range(2)]
    genCPU = waitChildren(senders, 600)
    wall = time.monotonic() - started
    tpCPU = setting.cpu() - before
    return {
        "mb_s": round(2 * size / wall, 1),
        "tp_cpu_s_per_gb": round(tpCPU / (2 * size / 1000), 2),
        "tp_cores": round(tpCPU / wall, 2),
        "sender_cores": round(genCPU / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, 4 s of handshakes, 100 MB per sender")
    parser.add_argument("--seconds", type=int, default=None, help="seconds of handshakes per measurement (default 8)")
    parser.add_argument("--size", type=int, default=None, help="MB per bulk sender (default 300)")
    parser.add_argument("--generators", type=int, default=4, help="openssl s_time processes at once (default 4)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory and logs")
    args = parser.parse_args(argv)
    seconds = args.seconds or (4 if args.quick else 8)
    size = args.size or (100 if args.quick else 300)
    rounds = 1 if args.quick else 2
    exitOnSignals()
    requireTP()
    openssl = requireTool("openssl")
    socat = requireTool("socat")
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"started": now(), "machine": machine(), "versions": tpVersions(), "tp_source": tpSource(), "seconds": seconds, "size_mb": size},
        "measured": {"1": [], "2": []},
    }
    problems: list[str] = []
    with workdir("tp-workers-bench-", args.keep) as d:
        procs = Processes(d)
        try:
            pki, etcd, sinkPort = startBase(procs, d, socat)
            other = OtherLoad()
            for r in range(rounds):
                for workers in (1, 2):
                    print(f"round {r + 1}, workers = {workers}", flush=True)
                    setting = Setting(procs, pki, etcd, workers, f"r{r}w{workers}")
                    try:
                        h = handshakes(setting, pki, seconds, openssl, args.generators)
                        print(f"  handshakes: {h}", flush=True)
                        b = bulk(setting, pki, sinkPort, size, openssl)
                        print(f"  bulk: {b}", flush=True)
                        results["measured"][str(workers)].append({"handshakes": h, "bulk": b})
                    finally:
                        setting.stop()
            results["other_load"] = other.measure(procs)
            print(OtherLoad.describe(results["other_load"]))
        except BenchError as e:
            problems.append(str(e))
        finally:
            procs.stopAll()
    one, two = results["measured"]["1"], results["measured"]["2"]
    if one and two:
        def mid(runs: list[dict[str, Any]], part: str, key: str) -> float:
            return median([run[part][key] for run in runs])

        rows = [
            (f"handshakes per second ({args.generators} generators)", mid(one, "handshakes", "per_s"), mid(two, "handshakes", "per_s")),
            ("  TP CPU per handshake (ms)", mid(one, "handshakes", "tp_cpu_ms_per_handshake"), mid(two, "handshakes", "tp_cpu_ms_per_handshake")),
            ("  TP cores busy", mid(one, "handshakes", "tp_cores"), mid(two, "handshakes", "tp_cores")),
            ("  generators' cores busy", mid(one, "handshakes", "generator_cores"), mid(two, "handshakes", "generator_cores")),
            ("bulk, 2 connections (MB/s)", mid(one, "bulk", "mb_s"), mid(two, "bulk", "mb_s")),
            ("  TP CPU per GB (s)", mid(one, "bulk", "tp_cpu_s_per_gb"), mid(two, "bulk", "tp_cpu_s_per_gb")),
            ("  TP cores busy", mid(one, "bulk", "tp_cores"), mid(two, "bulk", "tp_cores")),
            ("  senders' cores busy", mid(one, "bulk", "sender_cores"), mid(two, "bulk", "sender_cores")),
        ]
        print()
        table = [{"measure": label, "one": a, "two": b, "ratio": ratio(b, a), "digits": 3 if "ms" in label else 2 if "cores" in label or "(s)" in label else 1} for label, a, b in rows]
        print(formatTable(table, [("one", "workers=1"), ("two", "workers=2")], [("ratio", "2/1")]))
        results["summary"] = {
            "handshakes_2_over_1": ratio(rows[0][2], rows[0][1]),
            "bulk_2_over_1": ratio(rows[4][2], rows[4][1]),
        }
        print(f"\nhandshakes/s workers=2 over workers=1: {results['summary']['handshakes_2_over_1']} (target >= 1.6)")
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    return finish(results, problems, "No problems.", RESULTS / "workers-latest.json")


if __name__ == "__main__":
    sys.exit(main())
