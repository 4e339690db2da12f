#!/usr/bin/env python3
"""
Benchmark TP's shared port (the `[router]` passthrough) against a direct
connection to the same HTTPS web server, on loopback.

    .venv/bin/python benchmarks/router_bench.py [--quick]

Two paths to one HTTPS backend:

  direct   client -> backend (TLS 1.3, ended by the backend)
  router   client -> `twist tp` (its TLS port, with `[router] backend =
           "tcp:127.0.0.1:BACKEND"`: the router reads the ClientHello, sees
           neither ALPN tp/1 nor a TP name, connects to the backend and
           relays the untouched TLS stream both ways) -> backend

The backend is this script in its own process (`router_bench.py
--backend`): a threaded Python `ssl` HTTP/1.1 server, one thread per
connection, TLS 1.3 with its own certificate for site.test from a CA of its
own (not TP's), no session tickets (so every connection is a full
handshake, as TP does for its own clients), `Connection: close` after each
response.  `GET /bytes/N` answers N bytes (a 1 MB pseudo-random block
repeated), `GET /small` a 64-byte body.  `twist tp` is a separate process
too, so the load generators (curl and this script's threads) do not share
its CPU time, only the machine's two cores.

Measured, each on both paths:

  bulk       one HTTPS download of N MB by curl (`--http1.1 -o /dev/null
             -w %{speed_download}`), --repeat times, paths taking turns;
             the median is reported;
  rate       short HTTPS requests, each on a new TCP + TLS connection
             (connect, full TLS 1.3 handshake verifying the site's
             certificate, GET /small, read the 64 bytes, close), one at a
             time and then 10 at a time, after 10 warm-up requests;
             requests per second and latency percentiles.

Before the measurements, untimed: a 16 MB download on each path is hashed
(SHA-256) and compared, the client verifies the site's certificate (the
stream went through TP untouched), and a client offering ALPN tp/1 with the
dev client certificate gets TP on the same port.  TP's CPU time (from
/proc) is reported per GB and per request, and TP's log is scanned for
errors and refusals.

Options: --quick (50 MB x 3, 200 requests; the full run is 200 MB x 5, 1000
requests), --size MB, --conns N, --concurrency N (default 10), --repeat N,
--json PATH, --keep, --tp-log-level (twist's --log-level, default info).

Results are printed as a table with the ratio router/direct and written to
benchmarks/results/router.json.  Everything is started and stopped by this
script (by pid) in a temporary directory, with ports picked at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    BIN,
    LOOPBACK,
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
    initDev,
    logEvents,
    logLevel,
    machine,
    median,
    now,
    peakRSSMB,
    ratio,
    requireTool,
    requireTP,
    serverCertificate,
    serveThreaded,
    startServer,
    tpSource,
    tpVersions,
    waitForPort,
    workdir,
)

#: The web site's name, in its certificate and in SNI.
SITE = "site.test"
#: Both paths, in table order.
PATHS = ("direct", "router")
LABELS = {"direct": "direct", "router": "router"}
BLOCK_SIZE = 1 << 20
SMALL_BODY = b"x" * 63 + b"\n"
#: A request making no progress for this long counts as failed.
TIMEOUT = 10.0


def _block() -> bytes:
    return random.Random(2).randbytes(BLOCK_SIZE)


def expectedHash(n: int, block: bytes) -> str:
    h = hashlib.sha256()
    left = n
    while left:
        chunk = block[: min(left, len(block))]
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


# --- the backend: a threaded Python ssl HTTP/1.1 server -------------------------


def _readRequest(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise EOFError("EOF before the end of the request")
        data += chunk
        if len(data) > 65536:
            raise ValueError("request too long")
    return data.split(b"\r\n", 1)[0]


def _serve(conn: socket.socket, context: ssl.SSLContext, block: bytes) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(60)
        with context.wrap_socket(conn, server_side=True) as tls:
            line = _readRequest(tls)
            m = re.match(rb"GET /(bytes/(\d+)|small) HTTP/1\.1$", line)
            if m is None:
                tls.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            n = int(m.group(2)) if m.group(2) else len(SMALL_BODY)
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
            if m.group(2) is None:
                tls.sendall(head.encode() + SMALL_BODY)
            else:
                tls.sendall(head.encode())
                view = memoryview(block)
                left = n
                while left:
                    k = min(left, len(block))
                    tls.sendall(view[:k])
                    left -= k
            try:
                tls.unwrap()  # close_notify, then wait for the client's or its close
            except (OSError, ValueError):
                pass
    except (OSError, ValueError, EOFError):
        pass  # a client that left, or the start-up probe
    finally:
        conn.close()


def runBackend(cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    context.num_tickets = 0
    block = _block()
    serveThreaded(lambda conn: _serve(conn, context, block))


# --- set-up ------------------------------------------------------------------------


class Setup:
    """
    The backend and `twist tp` sharing its port with it.
    """

    def __init__(self, workdir: Path, logLevel: str = "info") -> None:
        self.dir = workdir
        self.logLevel = logLevel
        self.procs = Processes(workdir)
        requireTP()
        self.curl = requireTool("curl")
        self.entry: dict[str, int] = {}

    def start(self) -> None:
        d = self.dir
        (tpPort,) = freePorts(1)
        # The web site's certificate, from a CA of its own.
        self.webCA, cert, key = serverCertificate(d, SITE, "router bench web CA")
        self.backendPort = startServer(self.procs, "backend", [sys.executable, Path(__file__).resolve(), "--backend", cert, key])
        self.entry["direct"] = self.backendPort

        # TP: `tp init-dev`'s config, on 127.0.0.1 only, TLS only, sharing
        # its port with the backend.
        self.pki = pki = initDev(
            d / "pki",
            tpPort,
            f'listen = ["tcp:{tpPort}:interface=127.0.0.1"]\nquic = false',
            append=f'\n[router]\nbackend = "tcp:{LOOPBACK}:{self.backendPort}"\n',
            unexpected=r"(?m)^\[router\]",
        )
        self.procs.start("twist-tp", [BIN / "twist", f"--log-level={self.logLevel}", "tp", "--config", pki / "server.toml"])
        waitForPort(tpPort, self.procs, "twist tp")
        self.entry["router"] = tpPort
        self.tpPid = self.procs.pid("twist-tp")
        self.backendPid = self.procs.pid("backend")
        self.ports = {"backend": self.backendPort, "tp": tpPort}

    def tpCPU(self) -> float:
        return cpuSeconds(self.tpPid)

    def backendCPU(self) -> float:
        return cpuSeconds(self.backendPid)

    def stop(self) -> None:
        self.procs.stopAll()


# --- clients -----------------------------------------------------------------------


def siteContext(webCA: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(webCA))
    context.set_alpn_protocols(["http/1.1"])
    return context


def _readResponse(tls: ssl.SSLSocket, hasher: Any = None) -> tuple[bytes, int, bytes]:
    """
    Read one response with a Content-Length: its status line, the number
    of body bytes, and the body itself unless C{hasher} takes it.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            raise BenchError(f"EOF before the end of the response headers ({len(data)} bytes)")
        data += chunk
    head, _, first = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if m is None:
        raise BenchError(f"no Content-Length in {head[:200]!r}")
    length = int(m.group(1))
    chunks: list[bytes] = []
    take = hasher.update if hasher is not None else chunks.append
    take(first)
    count = len(first)
    while count < length:
        chunk = tls.recv(1 << 20)
        if not chunk:
            raise BenchError(f"EOF after {count} of {length} body bytes")
        count += len(chunk)
        take(chunk)
    if count != length:
        raise BenchError(f"{count} body bytes, Content-Length {length}")
    return head.split(b"\r\n", 1)[0], count, b"".join(chunks)


def get(port: int, context: ssl.SSLContext, path: str, hasher: Any = None) -> tuple[bytes, int, bytes, str | None]:
    """
    One HTTPS request on a new connection, the site's certificate verified.
    """
    with socket.create_connection((LOOPBACK, port), timeout=TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=SITE) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n".encode())
            status, count, body = _readResponse(tls, hasher)
            return status, count, body, tls.selected_alpn_protocol()


def shortRequest(port: int, context: ssl.SSLContext) -> float:
    start = time.perf_counter()
    status, _, body, _ = get(port, context, "/small")
    if status != b"HTTP/1.1 200 OK" or body != SMALL_BODY:
        raise BenchError(f"unexpected answer {status!r} {body[:40]!r}")
    return time.perf_counter() - start


def requestRate(port: int, context: ssl.SSLContext, total: int, concurrency: int) -> dict[str, Any]:
    """
    `total` short HTTPS requests, each on a new connection, `concurrency`
    at a time (each in a thread of its own, even one at a time).
    """
    runs = concurrently(lambda: shortRequest(port, context), total, concurrency, inline=False)
    return {
        "requests": total,
        "ok": len(runs.latencies),
        "errors": len(runs.errors),
        "error_samples": sorted(set(runs.errors))[:5],
        "seconds": round(runs.seconds, 4),
        "req_per_s": round(len(runs.latencies) / runs.seconds, 1),
        "latency_ms_p50": runs.percentileMs(0.5),
        "latency_ms_p90": runs.percentileMs(0.9),
        "latency_ms_p99": runs.percentileMs(0.99),
    }


def curlDownload(setup: Setup, port: int, n: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            setup.curl, "-sS", "--fail", "--http1.1", "--max-time", "300", "--cacert", str(setup.webCA),
            "--resolve", f"{SITE}:{port}:{LOOPBACK}", "-o", "/dev/null",
            "-w", "%{speed_download} %{size_download} %{http_version} %{time_total}",
            f"https://{SITE}:{port}/bytes/{n}",
        ],
        capture_output=True, text=True,
    )
    if out.returncode:
        raise BenchError(f"curl exited {out.returncode}: {out.stderr.strip()}")
    speed, size, version, total = out.stdout.split()
    if int(size) != n or version != "1.1":
        raise BenchError(f"curl got {size} bytes over HTTP/{version}, expected {n} over 1.1")
    return {"bytes_per_s": float(speed), "seconds": float(total)}


# --- measurements ------------------------------------------------------------------


def checks(setup: Setup, problems: list[str]) -> dict[str, Any]:
    """
    Untimed: a hashed 16 MB download on each path, the site's certificate
    verified; and TP itself still answers ALPN tp/1 on the shared port.
    """
    out: dict[str, Any] = {}
    n = 16 * MB
    wanted = expectedHash(n, _block())
    context = siteContext(setup.webCA)
    for path in PATHS:
        h = hashlib.sha256()
        try:
            status, count, _, alpn = get(setup.entry[path], context, f"/bytes/{n}", h)
            ok = status == b"HTTP/1.1 200 OK" and count == n and h.hexdigest() == wanted and alpn == "http/1.1"
            out[path] = {"ok": ok, "bytes": count, "sha256_match": h.hexdigest() == wanted, "alpn": alpn}
        except (OSError, BenchError, ssl.SSLError) as e:
            out[path] = {"ok": False, "error": str(e)}
        if not out[path]["ok"]:
            problems.append(f"{path}: 16 MB hashed download failed: {out[path]}")
    # TP on the same port: ALPN tp/1, the dev client certificate, TP's own
    # certificate (dev CA, localhost).
    tp = ssl.create_default_context(cafile=str(setup.pki / "ca.pem"))
    tp.load_cert_chain(str(setup.pki / "client.pem"), str(setup.pki / "client.key"))
    tp.set_alpn_protocols(["tp/1"])
    try:
        with socket.create_connection((LOOPBACK, setup.entry["router"]), timeout=TIMEOUT) as raw:
            with tp.wrap_socket(raw, server_hostname="localhost") as tls:
                alpn = tls.selected_alpn_protocol()
                subject = dict(x[0] for x in tls.getpeercert()["subject"])  # type: ignore[index]
        out["tp"] = {"ok": alpn == "tp/1", "alpn": alpn, "server_certificate": subject.get("commonName")}
    except (OSError, ssl.SSLError) as e:
        out["tp"] = {"ok": False, "error": str(e)}
    if not out["tp"]["ok"]:
        problems.append(f"TP did not answer ALPN tp/1 on its shared port: {out['tp']}")
    return out


def measureBulk(setup: Setup, n: int, repeats: int, problems: list[str]) -> dict[str, Any]:
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    tpCPU: list[float] = []
    backendCPU: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(repeats):
        for path in PATHS:
            tpBefore, backendBefore = setup.tpCPU(), setup.backendCPU()
            try:
                result = curlDownload(setup, setup.entry[path], n)
            except BenchError as e:
                problems.append(f"{path} download run {r + 1}: {e}")
                print(f"  !! {path} download run {r + 1}: {e}", flush=True)
                continue
            mbps = result["bytes_per_s"] / MB
            samples[path].append(mbps)
            backendCPU[path].append(setup.backendCPU() - backendBefore)
            if path == "router":
                tpCPU.append(setup.tpCPU() - tpBefore)
            print(f"  download {path:7} run {r + 1}: {mbps:9.1f} MB/s  ({result['seconds']:.2f} s)", flush=True)
    out: dict[str, Any] = {}
    for path in PATHS:
        s = samples[path]
        out[path] = {
            "mb_per_s": round(median(s), 1) if s else None,
            "samples_mb_per_s": [round(x, 1) for x in s],
            "bytes_per_run": n,
            "runs_ok": len(s),
            "backend_cpu_s_per_gb": round(median(backendCPU[path]) / n * 1e9, 2) if s else None,
            "tp_cpu_s_per_gb": round(median(tpCPU) / n * 1e9, 2) if path == "router" and tpCPU else None,
        }
    return out


def measureRate(setup: Setup, total: int, concurrency: int, problems: list[str]) -> dict[str, Any]:
    context = siteContext(setup.webCA)
    out: dict[str, Any] = {}
    for path in PATHS:
        port = setup.entry[path]
        requestRate(port, context, 10, 1)  # warm-up
        tpBefore, backendBefore = setup.tpCPU(), setup.backendCPU()
        r = requestRate(port, context, total, concurrency)
        if r["ok"]:
            r["backend_cpu_ms_per_req"] = round(1000 * (setup.backendCPU() - backendBefore) / r["ok"], 2)
            r["tp_cpu_ms_per_req"] = round(1000 * (setup.tpCPU() - tpBefore) / r["ok"], 2) if path == "router" else None
        if r["errors"]:
            problems.append(f"{path}: {r['errors']} of {total} requests failed (concurrency {concurrency}): {r['error_samples']}")
        out[path] = r
        print(f"  {path:7} concurrency {concurrency:2}: {r['req_per_s']:8.1f} req/s, p50 {r['latency_ms_p50']:.2f} ms, "
              f"p99 {r['latency_ms_p99']:.2f} ms", flush=True)
    return out


def scanLog(setup: Setup, problems: list[str]) -> dict[str, Any]:
    """
    TP's log (JSON events, one a line): errors, warnings, tracebacks, the
    router's refusals, and how many lines it wrote.
    """
    text = setup.procs.logText("twist-tp")
    if text is None:
        return {}
    events = logEvents(text)
    errors = [e for e in events if logLevel(e) in ("error", "critical") or e.get("isError")]
    warnings = [e for e in events if logLevel(e) == "warn"]
    refusals = [e.get("reason") for e in events if e.get("log_namespace") == "tpproxy.router" and "reason" in e]
    info = {
        "lines": text.count("\n"),
        "tracebacks": text.count("Traceback"),
        "error_events": len(errors),
        "warn_events": len(warnings),
        "router_refusals": refusals,
        "factory_start_stop_lines": sum(1 for e in events if str(e.get("log_format", "")).startswith(("Starting factory", "Stopping factory"))),
    }
    if info["tracebacks"] or errors or warnings:
        problems.append(f"TP logged {info['tracebacks']} traceback(s), {len(errors)} error(s), {len(warnings)} warning(s)")
    # One refusal is expected: the start-up port probe (connect, close)
    # (not logged below info).
    if len(refusals) > 1:
        problems.append(f"the router refused {len(refusals)} connections: {refusals[:5]}")
    return info


def buildTable(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    meta = results["meta"]
    rows: list[dict[str, Any]] = []

    def add(label: str, values: dict[str, float | None], digits: int = 1, withRatio: bool = True) -> None:
        rows.append({
            "measure": label,
            **{p: values.get(p) for p in PATHS},
            "router_over_direct": ratio(values.get("router"), values.get("direct")) if withRatio else None,
            "digits": digits,
        })

    bulk = results["bulk"]
    add(f"download {meta['bulk_mb']:g} MB, 1 conn, curl (MB/s)", {p: bulk[p]["mb_per_s"] for p in PATHS})
    seq, con = results["rate"]["sequential"], results["rate"]["concurrent"]
    c = meta["concurrency"]
    add("HTTPS requests, new conn each, sequential (req/s)", {p: seq[p]["req_per_s"] for p in PATHS})
    add(f"HTTPS requests, new conn each, {c} concurrent (req/s)", {p: con[p]["req_per_s"] for p in PATHS})
    for key, label in (("sequential", "sequential"), ("concurrent", f"{c} concurrent")):
        r = results["rate"][key]
        for q in ("p50", "p99"):
            add(f"  latency {q}, {label} (ms)", {p: r[p][f"latency_ms_{q}"] for p in PATHS}, 2)
    add("TP CPU per GB, download (s)", {"router": bulk["router"]["tp_cpu_s_per_gb"]}, 2, False)
    add("TP CPU per request, sequential (ms)", {"router": seq["router"].get("tp_cpu_ms_per_req")}, 2, False)
    add(f"TP CPU per request, {c} concurrent (ms)", {"router": con["router"].get("tp_cpu_ms_per_req")}, 2, False)
    add("backend CPU per request, sequential (ms)", {p: seq[p].get("backend_cpu_ms_per_req") for p in PATHS}, 2)
    add("peak RSS, twist tp (MB)", {"router": results["peak_rss_mb"]["twist_tp"]}, 1, False)

    table = formatTable(rows, [(p, LABELS[p]) for p in PATHS], [("router_over_direct", "router/direct")], ratioWidth=13, gap="")
    return table, rows


def versions(setup: Setup) -> dict[str, Any]:
    info = tpVersions()
    info["python_ssl"] = ssl.OPENSSL_VERSION
    out = subprocess.run([setup.curl, "--version"], capture_output=True, text=True)
    info["curl"] = out.stdout.splitlines()[0] if out.stdout else None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller run: 50 MB download x3, 200 requests per rate test")
    parser.add_argument("--size", type=float, help="MB (10^6 bytes) per download (default 200; --quick 50)")
    parser.add_argument("--conns", type=int, help="requests (new connection each) per rate test (default 1000; --quick 200)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent requests in the second rate test")
    parser.add_argument("--repeat", type=int, help="runs of each download, the median reported (default 5; --quick 3)")
    parser.add_argument("--json", default=str(RESULTS / "router.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    parser.add_argument("--tp-log-level", default="info", choices=("debug", "info", "warn", "error"),
                        help="twist --log-level for TP (default info, twist's default)")
    parser.add_argument("--backend", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backend:
        runBackend(*args.backend)
        return 0
    args.size = args.size or (50 if args.quick else 200)
    args.conns = args.conns or (200 if args.quick else 1000)
    args.repeat = args.repeat or (3 if args.quick else 5)
    exitOnSignals()
    try:
        with workdir("tp-router-bench-", args.keep) as directory:
            return run(args, directory)
    except BenchError as e:
        print(f"router_bench: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, directory: Path) -> int:
    """
    Start the backend and TP in C{directory}, measure, report; the exit
    status.
    """
    size, conns, repeat = args.size, args.conns, args.repeat
    n = int(size * MB)
    load = OtherLoad()
    problems: list[str] = []
    setup = Setup(directory, args.tp_log_level)
    try:
        print(f"Starting the HTTPS backend and twist tp ([router] passthrough to it) in {directory} ...", flush=True)
        setup.start()
        print(f"  ports: {setup.ports}", flush=True)
        results: dict[str, Any] = {
            "meta": {
                "date": now(),
                "quick": args.quick,
                "bulk_mb": size,
                "repeat": repeat,
                "requests": conns,
                "concurrency": args.concurrency,
                "mb": "10^6 bytes",
                "machine": machine(),
                "versions": versions(setup),
                "tp_source": tpSource(),
                "tp_log_level": args.tp_log_level,
                "paths": {
                    "direct": "client -> backend (threaded Python ssl HTTP/1.1 server, TLS 1.3, no tickets)",
                    "router": "client -> twist tp [router] passthrough (ClientHello read, TLS stream relayed untouched) -> backend",
                },
            }
        }
        print("Checks (untimed): 16 MB hashed download on each path, site certificate verified; ALPN tp/1 gets TP ...", flush=True)
        results["checks"] = checks(setup, problems)
        print(f"  {results['checks']}", flush=True)

        print(f"Download: {size:g} MB over one HTTPS connection (curl), {repeat} run(s) each ...", flush=True)
        results["bulk"] = measureBulk(setup, n, repeat, problems)
        results["rate"] = {}
        for key, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
            print(f"Request rate: {conns} HTTPS requests, a new connection each, concurrency {concurrency} ...", flush=True)
            results["rate"][key] = measureRate(setup, conns, concurrency, problems)
        setup.procs.check()

        results["meta"]["other_cpu"] = load.measure(setup.procs)
        results["peak_rss_mb"] = {"twist_tp": peakRSSMB(setup.tpPid), "backend": peakRSSMB(setup.backendPid)}
        time.sleep(0.3)
        results["tp_log"] = scanLog(setup, problems)
        table, rows = buildTable(results)
        results["table"] = rows
        results["problems"] = problems
        results["meta"]["wall_seconds"] = round(time.monotonic() - load.started, 1)

        m = results["meta"]["machine"]
        v = results["meta"]["versions"]
        print()
        print(f"TP {v.get('tp')} (Twisted {v.get('twisted')}, {v.get('tp_openssl')}); backend: Python ssl ({v.get('python_ssl')}); "
              f"{v.get('curl')}")
        print(f"{m['cpus']} CPU(s) {m['cpu_model']}, loopback; download {size:g} MB x {repeat} (median), "
              f"{conns} requests per rate test; twist --log-level={args.tp_log_level}")
        print(OtherLoad.describe(results["meta"]["other_cpu"]))
        print()
        print(table)
        print()
        print("router = client -> twist tp's shared port ([router] passthrough) -> backend; direct = client -> backend.")
        print("router/direct: below 1 is the router slower for rates, above 1 slower for latency.")
        log = results["tp_log"]
        print(f"TP log: {log.get('lines')} lines, {log.get('error_events')} errors, {log.get('warn_events')} warnings, "
              f"router refusals {log.get('router_refusals')} (1 expected: the start-up port probe), "
              f"{log.get('factory_start_stop_lines')} 'Starting/Stopping factory' lines")
        clean = "No problems: every download and request complete and verified, TP answered tp/1, no errors in TP's log."
        return finish(results, problems, clean, args.json)
    finally:
        setup.stop()


if __name__ == "__main__":
    sys.exit(main())
