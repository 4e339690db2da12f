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
the share of packets lost, and writes benchmarks/results/udp.json.

    /work/venv/bin/python benchmarks/udp_bench.py [--packets N] [--size BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def freePort(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def waitFor(proc: subprocess.Popen, marker: bytes, timeout: float = 20) -> bytes:
    deadline = time.time() + timeout
    seen = b""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    while time.time() < deadline:
        chunk = proc.stderr.read() or b""
        seen += chunk
        if marker in seen:
            return seen
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {marker!r}: {seen!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    stop = threading.Event()
    echo = echoServer(stop)
    procs: list[subprocess.Popen] = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": tmp}
        tpPort = freePort(socket.SOCK_STREAM)
        subprocess.run([BIN / "tp", "init-dev", f"{tmp}/dev", "--port", str(tpPort)], check=True, capture_output=True)
        config = Path(f"{tmp}/dev/server.toml")
        text = config.read_text()
        start = text.index("listen = [")
        end = text.index("\n", start)
        config.write_text(text[:start] + f'listen = ["tcp:{tpPort}:interface=127.0.0.1"]' + text[end:])
        try:
            server = subprocess.Popen([BIN / "twist", "--log-format=text", "tp", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            procs.append(server)
            time.sleep(1.5)
            results["direct"] = measure(echo, args.packets, args.size, args.window)
            for transport in ("quic", "tls"):
                up = subprocess.Popen(
                    [BIN / "tp", "--config", f"{tmp}/dev/client.toml", "--transport", transport, "up", "-u", f"127.0.0.1:{echo}", "0"],
                    stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                )
                procs.append(up)
                line = waitFor(up, b"Ctrl-C stops")
                local = int(line.split(b"Forwarding UDP 127.0.0.1:")[1].split(b" ")[0])
                results[f"tp_{transport}"] = measure(local, args.packets, args.size, args.window)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            stop.set()
    print(f"UDP through TP on loopback: {args.packets} packets of {args.size} bytes, at most {args.window} in flight")
    print(f"{'chain':<10} {'packets/s':>10} {'loss':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['pps']:>10.0f} {100 * r['loss']:>7.2f}%")
    for name in ("tp_quic", "tp_tls"):
        print(f"{name}/direct packet rate: {results[name]['pps'] / results['direct']['pps']:.3f}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "udp.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
