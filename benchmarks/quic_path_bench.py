#!/usr/bin/env python3
"""
TP's QUIC on a path with a real MTU (issue 17): one bulk stream through
C{tp --transport quic up} -> C{twist tp} across a veth link whose MTU is
C{--mtu} (1500 by default, as on the internet), against plain aioquic on
the same link in the same run, and TP over TLS for scale (root: network
namespaces).

    sudo .venv/bin/python benchmarks/quic_path_bench.py [--mtu 1500] [--size MB] [--runs N]

Set-up, all started by this script and removed at the end:

  - two network namespaces, C{s} (TP's side) and C{c} (the client's), joined by a veth pair with
    MTU C{--mtu} on both ends (10.99.0.1 in s, 10.99.0.2 in c);
    loopback is not on the path, so a datagram larger than the MTU is
    refused by the kernel (TP sets DF) and TP's path MTU search
    (tpproxy.transports.pmtu) has to find the size;
  - in s: a sink (this script with C{--sink}: C{U} reads to EOF and
    answers C{got N}; C{D N} sends N bytes), C{twist tp} on 10.99.0.1
    (the dev CA of C{tp init-dev}, a server certificate for 10.99.0.1);
  - in c: C{tp --transport quic up} and C{tp --transport tls up} to that
    TP, forwarding to the sink; the transfers are made by this script with
    C{--client} in c;
  - plain aioquic (benchmarks/aioquic_baseline.py's server and client,
    one stream, its asyncio layer) between the same two addresses, at its
    default 1200-byte datagrams and at the largest the MTU carries (an
    aioquic user who configured the size by hand).

Measured, chains taking turns, C{--runs} times each: C{--size} MB up and
down (TP) or up (aioquic); the median MB/s, and for TP the CPU seconds
of both TP processes per GB and the datagram size TP's QUIC settled on
(from the UDP counters: bytes per datagram on the veth).  Reported: a
table with the ratios TP/aioquic, and
benchmarks/results/quic-path-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    BIN,
    REPO,
    RESULTS,
    BenchError,
    OtherLoad,
    Processes,
    cpuSeconds,
    exitOnSignals,
    fmt,
    formatTable,
    initDev,
    machine,
    now,
    ratio,
    tpVersions,
    waitForLog,
    workdir,
    writeJSON,
)

MB = 1_000_000
SRV, CLI = "10.99.0.1", "10.99.0.2"
CHUNK = 65536


def countToEOF(sock: socket.socket) -> int:
    """
    Read C{sock} to EOF; the bytes read.
    """
    total = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return total
        total += len(data)


# --- the sink and the client (run in the namespaces) ------------------------------


def runSink(host: str) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(64)
    print(f"PORT {listener.getsockname()[1]}", flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            head = conn.recv(1)
            if head == b"U":
                conn.sendall(f"got {countToEOF(conn)}\n".encode())
            elif head == b"D":
                line = b""
                while not line.endswith(b"\n"):
                    line += conn.recv(1)
                left = int(line)
                block = os.urandom(CHUNK)
                while left:
                    n = min(left, CHUNK)
                    conn.sendall(block[:n])
                    left -= n

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def runClient(port: int, mode: str, n: int) -> None:
    """
    One transfer through the local end of a chain; prints its seconds.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    started = time.perf_counter()
    if mode == "up":
        sock.sendall(b"U")
        block = os.urandom(CHUNK)
        left = n
        while left:
            k = min(left, CHUNK)
            sock.sendall(block[:k])
            left -= k
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while not answer.endswith(b"\n"):
            data = sock.recv(100)
            if not data:
                break
            answer += data
        if answer.strip() != f"got {n}".encode():
            raise SystemExit(f"the sink answered {answer!r} for {n} bytes")
    else:
        sock.sendall(b"D%d\n" % n)
        got = countToEOF(sock)
        if got != n:
            raise SystemExit(f"got {got} of {n} bytes")
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)


# --- the run ---------------------------------------------------------------------


def vethCounters(net: Any, ns: str) -> dict[str, int]:
    """
    Packets and bytes sent and received on C{ns}'s end of the veth.
    """
    text = net.sh(*net.exec(ns), "cat", "/proc/net/dev")
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.strip().startswith(net.prefix):
            f = rest.split()
            return {"rx_bytes": int(f[0]), "rx_packets": int(f[1]), "tx_bytes": int(f[8]), "tx_packets": int(f[9])}
    raise BenchError(f"no veth in {ns}")


def setUp(net: Any, procs: Processes, d: Path, mtu: int) -> dict[str, int]:
    net.add("s")
    net.add("c")
    net.link("s", [f"{SRV}/24"], "c", [f"{CLI}/24"])
    for a, b in (("s", "c"), ("c", "s")):
        net.sh(net.ip, "-n", net.ns(a), "link", "set", "dev", f"{net.prefix}{a}{b}", "mtu", str(mtu))
    port = 4433
    rule = f'\n[[rules]]\ncomment = "the sink, across the veth"\nidentities = ["group:dev"]\nhosts = ["{SRV}/32"]\nports = "*"\n'
    initDev(d, port, f'listen = ["tcp:{port}:interface={SRV}"]', append=rule)
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.load(d / "ca.pem", d / "ca.key")
    ca.issue(SRV, ips=(SRV,), server=True, hours=24).write(d / "server.pem", d / "server.key")
    sink = procs.start("sink", net.exec("s") + [sys.executable, __file__, "--sink", SRV], stdout=subprocess.PIPE)
    assert sink.stdout is not None
    line = sink.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise BenchError(f"the sink did not start: {line!r}")
    sinkPort = int(line.split()[1])
    procs.start("twist-tp", net.exec("s") + [str(BIN / "twist"), "tp", "--config", str(d / "server.toml")])
    waitForLog(procs, "twist-tp", re.compile(r"QUIC"), "start QUIC")
    ports = {"sink": sinkPort, "tp_quic": 20001, "tp_tls": 20002}
    for chain, transport in (("tp_quic", "quic"), ("tp_tls", "tls")):
        procs.start(chain, net.exec("c") + [
            str(BIN / "tp"), "--config", str(d / "client.toml"), "--server", f"{SRV}:{port}", "--transport", transport,
            "up", f"{SRV}:{sinkPort}", str(ports[chain]),
        ])
        waitForLog(procs, chain, re.compile(r"^Forwarding ", re.M), "start forwarding")
    return ports


def transfer(net: Any, port: int, mode: str, n: int) -> float:
    out = subprocess.run(
        net.exec("c") + [sys.executable, __file__, "--client", str(port), mode, str(n)], capture_output=True, timeout=600, text=True
    )
    if out.returncode:
        raise BenchError(f"transfer {mode} through port {port} failed: {out.stderr.strip() or out.stdout.strip()}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def aioquic(net: Any, procs: Processes, d: Path, n: int, size: int, i: int) -> float:
    """
    One upload of C{n} bytes with plain aioquic at C{size}-byte datagrams.
    """
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.load(d / "ca.pem", d / "ca.key")
    if not (d / "aioquic.pem").exists():
        ca.issue(SRV, ips=(SRV,), server=True, hours=24).write(d / "aioquic.pem", d / "aioquic.key")
    port = 20100 + i
    script = str(Path(__file__).with_name("aioquic_baseline.py"))
    name = f"aioquic-{i}"
    proc = procs.start(
        name, net.exec("s") + [sys.executable, script, "--serve", str(port), str(d / "aioquic.pem"), str(d / "aioquic.key"),
                                 "--host", SRV, "--max-datagram-size", str(size)],
        stdout=subprocess.PIPE, env={"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise BenchError(f"aioquic server did not start: {procs.logTail(name)}")
    out = subprocess.run(
        net.exec("c") + [sys.executable, script, "--connect", SRV, str(port), str(n), "--max-datagram-size", str(size)],
        capture_output=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    if out.returncode:
        raise BenchError(f"aioquic client failed: {out.stderr.decode(errors='replace')[-500:]}")
    received, elapsed = proc.stdout.readline().split()
    procs.kill(name)
    # aioquic_baseline's client sends whole 64 KiB chunks: n rounded up.
    if not n <= int(received) < n + 65536:
        raise BenchError(f"aioquic server received {int(received)} of {n} bytes")
    return float(elapsed) * n / int(received)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtu", type=int, default=1500, help="MTU of the veth link (default 1500)")
    parser.add_argument("--size", type=float, default=50, help="MB per transfer (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="transfers per chain and direction, median reported (default 3)")
    parser.add_argument("--json", default=str(RESULTS / "quic-path-latest.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--sink", metavar="HOST", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=3, metavar=("PORT", "MODE", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        runSink(args.sink)
        return 0
    if args.client:
        runClient(int(args.client[0]), args.client[1], int(args.client[2]))
        return 0
    exitOnSignals()
    sys.path.insert(0, str(REPO))
    from p2p_bench import Cleanups

    from tpproxy.test.netns import Namespaces

    cleanups = Cleanups()
    started = time.monotonic()
    load = OtherLoad()
    try:
        with workdir("tp-quic-path-", args.keep) as d:
            procs = Processes(d)
            cleanups.addCleanup(procs.stopAll)
            try:
                net = Namespaces(cleanups)  # type: ignore[arg-type]
            except Exception as e:
                raise BenchError(f"network namespaces: {e}") from None
            return run(args, net, procs, d, load, started)
    except BenchError as e:
        print(f"quic_path_bench: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanups.run()


def run(args: argparse.Namespace, net: Any, procs: Processes, d: Path, load: OtherLoad, started: float) -> int:
    n = int(args.size * MB)
    print(f"Setting up: veth MTU {args.mtu} between namespaces, twist tp, tp up (quic, tls), sink ...", flush=True)
    ports = setUp(net, procs, d, args.mtu)
    # The largest size of TP's search (tpproxy.transports.pmtu.LADDER; not
    # imported: the script also measures trees without it) that fits.
    fits = args.mtu - 28
    best = max(s for s in (1200, 1232, 1452, 1472, 8952, 8972, 16384) if s <= fits)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    sizes: dict[str, list[float]] = {}
    pids = [procs.pid("twist-tp")]
    for run in range(args.runs):
        for chain in ("tp_quic", "tp_tls"):
            for mode in ("up", "down"):
                key = f"{chain}_{mode}"
                before = vethCounters(net, "c")
                cpuBefore = sum(cpuSeconds(p) for p in pids + [procs.pid(chain)])
                seconds = transfer(net, ports[chain], mode, n)
                after = vethCounters(net, "c")
                spent = sum(cpuSeconds(p) for p in pids + [procs.pid(chain)]) - cpuBefore
                rates.setdefault(key, []).append(n / MB / seconds)
                cpu.setdefault(key, []).append(spent / (n / 1e9))
                # The data direction's packets: bytes per packet, IP header included.
                direction = "tx" if mode == "up" else "rx"
                sizes.setdefault(key, []).append(
                    (after[f"{direction}_bytes"] - before[f"{direction}_bytes"]) / max(1, after[f"{direction}_packets"] - before[f"{direction}_packets"])
                )
                print(f"  run {run + 1} {key:12} {rates[key][-1]:8.1f} MB/s  {cpu[key][-1]:6.1f} CPU-s/GB  "
                      f"{sizes[key][-1]:7.0f} B/packet", flush=True)
        for size in sorted({1200, best}):
            key = f"aioquic_{size}_up"
            seconds = aioquic(net, procs, d, n, size, run * 2 + (size != 1200))
            rates.setdefault(key, []).append(n / MB / seconds)
            print(f"  run {run + 1} {key:12} {rates[key][-1]:8.1f} MB/s", flush=True)
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    medCPU = {k: round(statistics.median(v), 1) for k, v in cpu.items()}
    medSize = {k: round(statistics.median(v)) for k, v in sizes.items()}
    results: dict[str, Any] = {
        "meta": {
            "date": now(), "machine": machine(), "versions": tpVersions(), "mtu": args.mtu, "mb": "10^6 bytes",
            "size_mb": args.size, "runs": args.runs, "largest_ladder_size_that_fits": best,
        },
        "mb_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "median_mb_per_s": med,
        "median_tp_cpu_s_per_gb": medCPU,
        "median_bytes_per_packet_on_veth": medSize,
    }
    rows = []
    base = med.get("aioquic_1200_up")
    tuned = med.get(f"aioquic_{best}_up")
    for key, label in (("tp_quic_up", "TP quic upload"), ("tp_quic_down", "TP quic download"), ("tp_tls_up", "TP tls upload"),
                       ("tp_tls_down", "TP tls download"), ("aioquic_1200_up", "aioquic 1200 B upload"),
                       (f"aioquic_{best}_up", f"aioquic {best} B upload")):
        if key in med:
            rows.append({"measure": label + " (MB/s)", "value": med[key], "cpu": medCPU.get(key), "bytes": medSize.get(key),
                         "vs1200": ratio(med[key], base), "vsbest": ratio(med[key], tuned), "digits": 1})
    table = formatTable(rows, [("value", "MB/s"), ("cpu", "CPU/GB"), ("bytes", "B/pkt")], [("vs1200", "/aioq1200"), ("vsbest", f"/aioq{best}")])
    results["meta"]["other_cpu"] = load.measure(procs)
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(f"veth MTU {args.mtu}, {args.size:g} MB x {args.runs} (median); B/pkt: bytes per packet on the veth in the data direction (IP header included)")
    print(f"Other work on the machine: {results['meta']['other_cpu']}")
    print(table)
    written = writeJSON(args.json, results)
    print(f"\nWrote {written} ({results['meta']['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
