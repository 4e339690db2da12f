#!/usr/bin/env python3
"""
UDP packet rate and loss through TP, on loopback, in one run:

    direct          client -> UDP echo
    TP over QUIC    client -> tp up -u (QUIC DATAGRAM frames) -> twist tp -> UDP echo
    TP over TLS     client -> tp up -u (framed on TLS)        -> twist tp -> UDP echo

For each chain the client sends PACKETS datagrams of SIZE bytes, in
windows of at most WINDOW unanswered packets (so it measures what the
chain sustains, not how deep the socket buffers are), and waits up to a
second for stragglers.  It prints packets per second of echoed traffic and
the share of packets lost, and writes benchmarks/results/udp.json.  `twist
tp` runs from a `tp init-dev` config listening on 127.0.0.1 only (TLS, and
QUIC on the UDP port of the same number); everything is started in a
temporary directory and stopped at the end.

    .venv/bin/python benchmarks/udp_bench.py [--packets N] [--size BYTES] [--window N]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path

from harness import (
    BIN,
    LOOPBACK,
    RESULTS,
    BenchError,
    Processes,
    exitOnSignals,
    freeTCPAndUDPPort,
    initDev,
    requireTP,
    waitForLog,
    waitForPort,
    workdir,
    writeJSON,
)


def echoServer(stop: threading.Event) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def run() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except socket.timeout:
                continue
            sock.sendto(data, addr)
        sock.close()

    threading.Thread(target=run, daemon=True).start()
    return sock.getsockname()[1]


def measure(port: int, packets: int, size: int, window: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect(("127.0.0.1", port))
    payload = os.urandom(size - 4)
    # Warm up (the flow's tunnel is opened by the first packet).
    for _ in range(50):
        sock.send(b"\xff\xff\xff\xff" + payload)
        if select.select([sock], [], [], 2)[0]:
            sock.recv(65536)
            break
    while select.select([sock], [], [], 0.2)[0]:
        sock.recv(65536)
    received = 0
    sent = 0
    started = time.perf_counter()
    lastArrival = started
    while sent < packets or received < sent:
        while sent < packets and sent - received < window:
            sock.send(sent.to_bytes(4, "big") + payload)
            sent += 1
        ready = select.select([sock], [], [], 1.0)[0]
        if not ready:
            break  # a second without an answer: the rest is lost
        while select.select([sock], [], [], 0)[0]:
            sock.recv(65536)
            received += 1
            lastArrival = time.perf_counter()
        if received >= packets:
            break
    sock.close()
    elapsed = max(lastArrival - started, 1e-6)
    return {"sent": sent, "received": received, "pps": received / elapsed, "loss": 1 - received / sent if sent else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=20000, help="datagrams sent through each chain (default 20000)")
    parser.add_argument("--size", type=int, default=200, help="bytes per datagram (default 200)")
    parser.add_argument("--window", type=int, default=64, help="at most this many datagrams unanswered (default 64)")
    parser.add_argument("--json", default=str(RESULTS / "udp.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    args = parser.parse_args(argv)
    exitOnSignals()
    try:
        with workdir("tp-udp-bench-", args.keep) as directory:
            results = run(args, directory)
    except BenchError as e:
        print(f"udp_bench: error: {e}", file=sys.stderr)
        return 2
    print(f"UDP through TP on loopback: {args.packets} packets of {args.size} bytes, at most {args.window} in flight")
    print(f"{'chain':<10} {'packets/s':>10} {'loss':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['pps']:>10.0f} {100 * r['loss']:>7.2f}%")
    for name in ("tp_quic", "tp_tls"):
        print(f"{name}/direct packet rate: {results[name]['pps'] / results['direct']['pps']:.3f}")
    writeJSON(args.json, {"args": {k: vars(args)[k] for k in ("packets", "size", "window")}, "results": results})
    return 0


def run(args: argparse.Namespace, directory: Path) -> dict[str, dict[str, float]]:
    """
    Measure the direct chain and TP over QUIC and over TLS.
    """
    requireTP()
    stop = threading.Event()
    echo = echoServer(stop)
    procs = Processes(directory)
    results: dict[str, dict[str, float]] = {}
    try:
        tpPort = freeTCPAndUDPPort()
        pki = initDev(directory / "dev", tpPort, f'listen = ["tcp:{tpPort}:interface=127.0.0.1"]')
        procs.start("twist-tp", [BIN / "twist", "--log-format=text", "tp", "--config", pki / "server.toml"])
        waitForPort(tpPort, procs, "twist tp")
        results["direct"] = measure(echo, args.packets, args.size, args.window)
        for transport in ("quic", "tls"):
            name = f"tp-up-{transport}"
            procs.start(
                name, [BIN / "tp", "--config", pki / "client.toml", "--transport", transport, "up", "-u", f"{LOOPBACK}:{echo}", "0"]
            )
            forwarding = waitForLog(procs, name, re.compile(r"Forwarding UDP 127\.0\.0\.1:(\d+) .*Ctrl-C stops"))
            results[f"tp_{transport}"] = measure(int(forwarding.group(1)), args.packets, args.size, args.window)
    finally:
        procs.stopAll()
        stop.set()
    return results


if __name__ == "__main__":
    sys.exit(main())
