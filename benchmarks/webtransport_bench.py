#!/usr/bin/env python3
"""
One WebTransport stream from a real browser through TP to a sink, against
TP's own QUIC client (and its TLS client) on the same path, in one run
(issue 15, docs/webtransport.md).

    .venv/bin/python benchmarks/webtransport_bench.py [--size MB] [--runs N] [--no-tls]

Set-up, all on loopback and started by this script:

  - certificates from a CA made for the run (ECDSA P-256: TP's, the page
    server's and client C{alice}'s);
  - a sink (this script with C{--sink}, a process of its own): each
    connection is read to EOF, then answered C{got N} and closed;
  - C{twist tp} with TLS and QUIC on one port, C{[webtransport]} with its
    defaults (C{certificate_hashes = true}: Chromium gets TP's
    WebTransport certificate by hash and needs no QUIC flag) and a rule
    letting alice reach the sink;
  - the page server: HTTPS on C{https://localhost:PAGEPORT} (a thread of
    this script) serving the benchmark page and a copy of TP's C{tp.js};
    the page mints its token cross-origin at
    C{https://127.0.0.1:TPPORT/tp/token} (CORS with credentials: TP's
    default origins are the names on its certificate, C{localhost} among
    them), and reports to this server;
  - headless Chromium (Debian C{chromium}) with alice's certificate in a
    throwaway NSS database and selected for TP's origin by the managed
    policy C{AutoSelectCertificateForUrls} (a file in
    C{/etc/chromium/policies/managed/}, removed at the end: needs root).

Measured, one stream at a time, C{--runs} times each:

  - browser: the page opens one WebTransport session and, per run, a new
    tunnel (bidirectional stream) to the sink, writes C{--size} MB in
    64 KiB chunks (each write awaited, as tp.js users write), closes, and
    waits for the sink's answer; the seconds come from the page's own
    C{performance.now()}.  Around each upload the page calls the page
    server, which samples the CPU of C{twist tp} and of Chromium's process
    tree from C{/proc};
  - tp-quic: TP's own QUIC client (C{connectQuic} + C{TPClientProtocol},
    in this process) on one connection, a new stream per run, the same
    bytes to the same sink, timed from the first write to the answer;
  - tp-tls (unless C{--no-tls}): TP's TLS client, a new connection per
    run, the same way.

Reported: MB/s (median), C{twist tp}'s CPU seconds per GB and the
client's (Chromium's processes, or this script), with the ratios
browser / tp-quic and browser / tp-tls.  The machine's other load is
reported too.  Results are printed as a table and written to
benchmarks/results/webtransport-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from harness import (
    BIN,
    LOOPBACK,
    MB,
    RESULTS,
    BenchError,
    OtherLoad,
    Processes,
    cpuSeconds,
    exitOnSignals,
    finish,
    formatTable,
    freeTCPAndUDPPort,
    machine,
    median,
    now,
    peakRSSMB,
    ratio,
    requireTool,
    requireTP,
    serveThreaded,
    startServer,
    tpSource,
    tpVersions,
    waitForPort,
    workdir,
)

from tpproxy.test import browser  # noqa: E402 (after harness puts the tree first)
from tpproxy.test.h3peers import chromiumPath  # noqa: E402

#: Beyond the flags Chromium runs with in the tests
#: (L{tpproxy.test.browser.FLAGS}): keep it off DNS.
HOST_RULES = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"
CHAINS = ("browser", "tp_quic", "tp_tls")
LABELS = {"browser": "browser", "tp_quic": "tp-quic", "tp_tls": "tp-tls"}

SERVER_TOML = """
[server]
listen = "tcp:{port}:interface=127.0.0.1"
quic = ["127.0.0.1:{port}"]
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"

[[rules]]
identities = ["alice"]
hosts = ["127.0.0.1"]
ports = [{sinkPort}]
transports = ["tcp"]

[limits]
tunnels_per_identity_per_minute = 100000
tunnels_per_identity = 10000

[webtransport]
"""

#: The page: mints a token at TP (cross-origin), opens one session, and
#: per run uploads on a new tunnel as tpproxy/test/webpages/wttest.html's
#: "upload" step does, reporting to this script's page server.
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>TP WebTransport benchmark</title>
<script type="module">
import { connect, mintToken, TPError } from "./tp.js";

const plan = JSON.parse(decodeURIComponent(location.hash.slice(1)));
const post = (path, record) => fetch(path, { method: "POST", body: JSON.stringify(record), cache: "no-store" });
const say = (record) => {
  console.log("TPBENCH " + JSON.stringify(record));
  return post("/report", record);
};

async function readAll(readable) {
  const reader = readable.getReader();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += new TextDecoder().decode(value);
  }
  return text;
}

try {
  await say({ do: "loaded" });
  const minted = await mintToken(plan.token);
  await say({ do: "mint", identity: minted.identity, url: minted.url, hashes: minted.serverCertificateHashes.length });
  const tp = await connect(minted.url, minted);
  await say({ do: "connect" });
  const chunk = new Uint8Array(65536);
  crypto.getRandomValues(chunk);
  for (let run = 0; run < plan.runs; run++) {
    const tunnel = await tp.openTCP({ host: plan.host, port: plan.port });
    const writer = tunnel.writable.getWriter();
    await post("/mark", { run, phase: "start" });
    const started = performance.now();
    for (let sent = 0; sent < plan.size; sent += chunk.length) {
      await writer.write(plan.size - sent >= chunk.length ? chunk : chunk.subarray(0, plan.size - sent));
    }
    await writer.close();
    const answer = await readAll(tunnel.readable);
    const seconds = (performance.now() - started) / 1000;
    await post("/mark", { run, phase: "end" });
    await say({ do: "upload", run, seconds, bytes: plan.size, answer });
  }
  tp.close();
} catch (e) {
  await say({ error: e instanceof TPError ? e.code : "exception", message: String(e && e.message || e) });
}
await say({ done: true });
</script>
"""


# --- the sink (its own process) ------------------------------------------------


def _sinkConnection(conn: socket.socket) -> None:
    buffer = bytearray(1 << 20)
    count = 0
    with conn:
        while True:
            n = conn.recv_into(buffer)
            if not n:
                break
            count += n
        conn.sendall(f"got {count}".encode())


def runSink() -> None:
    serveThreaded(_sinkConnection)


# --- CPU of a process tree -------------------------------------------------------


def treeCPU(root: int) -> float:
    """
    CPU seconds of C{root} and its live descendants (Chromium's renderer,
    GPU and network service processes).
    """
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    total = 0.0
    for pid in parents:
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += cpuSeconds(pid)
    return total


# --- the page server (a thread of this script) ---------------------------------------


class PageServer:
    """
    HTTPS on 127.0.0.1 (as C{https://localhost:PORT}): the page, C{tp.js},
    the page's reports (queued in L{reports}) and its marks around each
    upload (at which the CPU of TP and of Chromium is sampled).
    """

    def __init__(self, cert: Path, key: Path, tpJS: bytes, twistPid: int) -> None:
        self.reports: queue.Queue[dict[str, Any]] = queue.Queue()
        self.marks: dict[tuple[int, str], dict[str, float]] = {}
        self.chromiumPid: int | None = None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, status: int, body: bytes = b"", kind: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/bench.html":
                    self.answer(200, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/tp.js":
                    self.answer(200, tpJS, "text/javascript; charset=utf-8")
                else:
                    self.answer(404)

            def do_POST(self) -> None:
                record = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                if self.path == "/mark":
                    sample = {"t": time.monotonic(), "twist": cpuSeconds(twistPid)}
                    if server.chromiumPid is not None:
                        sample["chromium"] = treeCPU(server.chromiumPid)
                    server.marks[(record["run"], record["phase"])] = sample
                elif self.path == "/report":
                    server.reports.put(record)
                else:
                    self.answer(404)
                    return
                self.answer(204)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def next(self, procs: Processes, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            procs.check()
            try:
                return self.reports.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise BenchError(f"the page said nothing for {timeout:g} s:\n{procs.logTail('chromium')}") from None

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- set-up ------------------------------------------------------------------------


def makePKI(directory: Path) -> None:
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

    from tpproxy.pki import CertificateAuthority, keyPEM, loadCertificates, loadKey, writePrivate

    directory.mkdir(parents=True)
    ca = CertificateAuthority.create("TP WebTransport bench CA")
    (directory / "ca.pem").write_bytes(ca.certPEM)
    writePrivate(directory / "ca.key", keyPEM(ca.key))
    ca.issue("localhost", dns=("localhost",), ips=("127.0.0.1",), server=True).write(directory / "server.pem", directory / "server.key")
    ca.issue("localhost", dns=("localhost",), server=True).write(directory / "page.pem", directory / "page.key")
    ca.issue("alice", client=True).write(directory / "alice.pem", directory / "alice.key")
    (directory / "alice.p12").write_bytes(pkcs12.serialize_key_and_certificates(
        b"tp-bench-alice", loadKey(str(directory / "alice.key")), loadCertificates(str(directory / "alice.pem"))[0],
        [ca.cert], BestAvailableEncryption(b"bench"),
    ))


def browserProfile(home: Path, pki: Path) -> None:
    """
    A throwaway C{$HOME} whose NSS database trusts the run's CA and holds
    alice's certificate and key.
    """
    certutil, pk12util = requireTool("certutil"), requireTool("pk12util")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    env = dict(os.environ, HOME=str(home))
    for argv in (
        [certutil, "-N", "-d", f"sql:{db}", "--empty-password"],
        [certutil, "-A", "-d", f"sql:{db}", "-n", "tp-bench-ca", "-t", "C,,", "-i", str(pki / "ca.pem")],
        [pk12util, "-i", str(pki / "alice.p12"), "-d", f"sql:{db}", "-W", "bench"],
    ):
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
        if out.returncode:
            raise BenchError(f"{' '.join(argv)} failed: {out.stdout}{out.stderr}")


class CertificatePolicy:
    """
    Chromium's managed policy selecting the profile's client certificate for
    C{origin} without a dialog, for the duration of a C{with} block: a rule
    in the one policy file the browser tests share under a lock
    (L{tpproxy.test.browser}; Chromium does not merge that policy across
    files, so a file of our own would hide a test's rules, or theirs ours).
    """

    def __init__(self, origin: str) -> None:
        if os.geteuid() != 0:
            raise BenchError(f"Chromium reads its certificate policy only from {browser.POLICY_DIR}, which needs root")
        self.rule = json.dumps({"pattern": origin, "filter": {}, "tp-bench": secrets.token_hex(4)})

    def __enter__(self) -> CertificatePolicy:
        browser.POLICY_DIR.mkdir(parents=True, exist_ok=True)
        browser._editPolicy(add=self.rule)
        return self

    def __exit__(self, *exc: Any) -> None:
        browser._editPolicy(remove=self.rule)


# --- the measurements ------------------------------------------------------------------


def measureBrowser(procs: Processes, d: Path, pki: Path, port: int, sinkPort: int, size: int, runs: int, problems: list[str]) -> dict[str, Any]:
    """
    Chromium uploads C{size} MB C{runs} times on one WebTransport session.
    """
    from tpproxy.web.site import STATIC

    chromium = chromiumPath() or requireTool("chromium")
    home = d / "browser"
    browserProfile(home, pki)
    page = PageServer(pki / "page.pem", pki / "page.key", (Path(STATIC) / "tp.js").read_bytes(), procs.pid("twist"))
    out: dict[str, Any] = {"runs": []}
    try:
        plan = {"token": f"https://127.0.0.1:{port}/tp/token", "host": LOOPBACK, "port": sinkPort, "size": size * MB, "runs": runs}
        url = f"https://localhost:{page.port}/bench.html#{quote(json.dumps(plan))}"
        policy = CertificatePolicy(f"https://127.0.0.1:{port}")
        with policy:
            proc = procs.start(
                "chromium", [chromium, *browser.FLAGS, HOST_RULES, f"--user-data-dir={home / 'data'}", url],
                env={"HOME": str(home), "LANG": "C.UTF-8"},
            )
            page.chromiumPid = proc.pid
            started = time.monotonic()
            while True:
                record = page.next(procs, timeout=(120 + size) if "mint" in out else 30)
                if record.get("done"):
                    break
                if "error" in record:
                    raise BenchError(f"the page failed: {record['error']}: {record['message']}\n{procs.logTail('twist')}")
                if record.get("do") == "loaded":
                    out["page_loaded_s"] = round(time.monotonic() - started, 2)
                elif record.get("do") == "mint":
                    out["mint"] = record
                    print(f"  browser: token for {record['identity']}, WebTransport to {record['url']} "
                          f"(certificate by hash: {bool(record['hashes'])})", flush=True)
                    out["startup_s"] = round(time.monotonic() - started, 2)
                elif record.get("do") == "upload":
                    run = record["run"]
                    a, b = page.marks[(run, "start")], page.marks[(run, "end")]
                    gb = record["bytes"] / 1e9
                    one = {
                        "mb_per_s": round(record["bytes"] / MB / record["seconds"], 1),
                        "seconds": round(record["seconds"], 3),
                        "tp_cpu_s_per_gb": round((b["twist"] - a["twist"]) / gb, 2),
                        "client_cpu_s_per_gb": round((b["chromium"] - a["chromium"]) / gb, 2),
                        "answer": record["answer"],
                    }
                    out["runs"].append(one)
                    print(f"  browser: {one['mb_per_s']} MB/s (TP {one['tp_cpu_s_per_gb']} CPU-s/GB, "
                          f"Chromium {one['client_cpu_s_per_gb']})", flush=True)
                    if record["answer"] != f"got {record['bytes']}":
                        problems.append(f"browser run {run}: the sink answered {record['answer']!r}, {record['bytes']} bytes were sent")
            out["chromium_browser_process_peak_rss_mb"] = peakRSSMB(proc.pid)
    finally:
        page.stop()
        if "chromium" in procs.procs:
            procs.kill("chromium")
    return out


def measureTP(reactor: Any, pki: Path, port: int, sinkPort: int, size: int, runs: int, tls: bool, twistPid: int, results: dict[str, Any], problems: list[str]) -> Any:
    """
    TP's own clients upload C{size} MB C{runs} times: over QUIC, one
    connection and a stream per run; over TLS, a connection per run.
    """
    from twisted.internet import defer

    from tpproxy.pki import loadCertificates, loadKey
    from tpproxy.protocols.client import ServerAddress, TPClientProtocol, openTunnel
    from tpproxy.transports.quic import clientConfiguration, connectQuic
    from tpproxy.transports.tls import clientTLS
    from tpproxy.wire import ClientHello

    ca = loadCertificates(str(pki / "ca.pem"))
    chain, key = loadCertificates(str(pki / "alice.pem")), loadKey(str(pki / "alice.key"))
    hello = ClientHello.connect(LOOPBACK, sinkPort)
    chunk = os.urandom(65536)

    @defer.inlineCallbacks
    def upload(chain_: str, end: Any) -> Any:
        closed: defer.Deferred[None] = defer.Deferred()
        end.connectionLost = lambda reason, closed=closed: closed.called or closed.callback(None)
        end.transport.resumeProducing()
        me, tp = cpuSeconds(os.getpid()), cpuSeconds(twistPid)
        started = reactor.seconds()
        left = size * MB
        while left:
            end.transport.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        end.transport.loseWriteConnection()
        yield closed
        elapsed = reactor.seconds() - started
        gb = size * MB / 1e9
        one = {
            "mb_per_s": round(size / elapsed, 1),
            "seconds": round(elapsed, 3),
            "tp_cpu_s_per_gb": round((cpuSeconds(twistPid) - tp) / gb, 2),
            "client_cpu_s_per_gb": round((cpuSeconds(os.getpid()) - me) / gb, 2),
            "answer": end.rest.decode(errors="replace"),
        }
        results[chain_]["runs"].append(one)
        print(f"  {LABELS[chain_]}: {one['mb_per_s']} MB/s (TP {one['tp_cpu_s_per_gb']} CPU-s/GB, "
              f"client {one['client_cpu_s_per_gb']})", flush=True)
        if end.rest != f"got {size * MB}".encode():
            problems.append(f"{chain_}: the sink answered {end.rest!r}, {size * MB} bytes were sent")

    @defer.inlineCallbacks
    def run() -> Any:
        results["tp_quic"] = {"runs": []}
        session = connectQuic(reactor, (LOOPBACK, port), clientConfiguration("localhost", ca, chain, key))
        yield session.ready
        try:
            for _ in range(runs):
                ready: defer.Deferred[Any] = defer.Deferred()
                session.openStream(TPClientProtocol(hello, ready))
                end = yield ready
                yield upload("tp_quic", end)
        finally:
            session.close(0, "done")
            session.socket.stop()
        if tls:
            results["tp_tls"] = {"runs": []}
            options = clientTLS("localhost", ca, chain, key)
            for _ in range(runs):
                end = yield openTunnel(reactor, ServerAddress("localhost", port, LOOPBACK), options, hello)
                yield upload("tp_tls", end)

    return run()


def summarize(chain: dict[str, Any]) -> None:
    runs = chain["runs"]
    chain["mb_per_s"] = median([r["mb_per_s"] for r in runs]) if runs else None
    chain["tp_cpu_s_per_gb"] = median([r["tp_cpu_s_per_gb"] for r in runs]) if runs else None
    chain["client_cpu_s_per_gb"] = median([r["client_cpu_s_per_gb"] for r in runs]) if runs else None


def buildTable(results: dict[str, Any]) -> str:
    chains = [c for c in CHAINS if c in results and results[c].get("mb_per_s")]
    ratios = [(f"browser/{c}", f"br/{LABELS[c].split('-')[1]}") for c in chains if c != "browser" and "browser" in chains]
    rows = []
    size = results["meta"]["size_mb"]
    for key, label, digits in (
        ("mb_per_s", f"upload {size} MB, one stream, median (MB/s)", 1),
        ("tp_cpu_s_per_gb", "twist tp CPU per GB (s)", 2),
        ("client_cpu_s_per_gb", "client CPU per GB (s)", 2),
    ):
        row: dict[str, Any] = {"measure": label, "digits": digits}
        row.update({c: results[c][key] for c in chains})
        row.update({r: ratio(results["browser"][key], results[r.split("/")[1]][key]) for r, _ in ratios})
        rows.append(row)
    results["table"] = [dict(r) for r in rows]
    return formatTable(rows, [(c, LABELS[c]) for c in chains], ratios)


def scanLog(text: str, problems: list[str]) -> dict[str, Any]:
    """
    Tracebacks and error or warning events in C{twist tp}'s (text) log.
    """
    bad = [line for line in text.splitlines() if re.search(r"Traceback|\[.*#(error|critical|warn)\]|Unhandled", line)]
    for line in bad[:10]:
        problems.append(f"twist tp logged: {line.strip()[:300]}")
    return {
        "webtransport_sessions_ended": len(re.findall(r"WebTransport session \S+ of \S+ ended", text)),
        "quic_connections": len(re.findall(r"QUIC connection from", text)),
        "problem_lines": len(bad),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="MB per upload (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="uploads per client (default 3)")
    parser.add_argument("--no-tls", action="store_true", help="skip TP's TLS client")
    parser.add_argument("--json", default=str(RESULTS / "webtransport-latest.json"), help="where the results go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        runSink()
        return 0
    exitOnSignals()
    requireTP()
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"started": now(), "machine": machine(), "versions": tpVersions(), "tp_source": tpSource(),
                 "size_mb": args.size, "runs": args.runs},
    }
    problems: list[str] = []
    load = OtherLoad()
    with workdir("tp-webtransport-bench-", args.keep) as d:
        procs = Processes(d)
        try:
            pki = d / "pki"
            makePKI(pki)
            sinkPort = startServer(procs, "sink", [sys.executable, Path(__file__).resolve(), "--sink"])
            port = freeTCPAndUDPPort()
            config = pki / "tp.toml"
            config.write_text(SERVER_TOML.format(port=port, sinkPort=sinkPort))
            procs.start("twist", [BIN / "twist", "--log-format=text", "--log-file=+", "tp", "--config", config])
            waitForPort(port, procs, "twist tp")
            twistPid = procs.pid("twist")
            print(f"twist tp on 127.0.0.1:{port} (TLS and QUIC), sink on {sinkPort}; {args.size} MB x {args.runs}", flush=True)
            results["browser"] = measureBrowser(procs, d, pki, port, sinkPort, args.size, args.runs, problems)
            from twisted.internet import task

            try:
                task.react(lambda reactor: measureTP(reactor, pki, port, sinkPort, args.size, args.runs, not args.no_tls, twistPid, results, problems))
            except SystemExit as e:
                if e.code:
                    raise BenchError(f"TP's own clients failed (status {e.code}):\n{procs.logTail('twist')}") from None
            results["twist_peak_rss_mb"] = peakRSSMB(twistPid)
            results["twist_log"] = scanLog(procs.logText("twist") or "", problems)
        except BenchError as e:
            problems.append(str(e))
        finally:
            results["other_load"] = load.measure(procs)
            procs.stopAll()
    for chain in CHAINS:
        if chain in results:
            summarize(results[chain])
            if len(results[chain]["runs"]) < args.runs:
                problems.append(f"{chain}: {len(results[chain]['runs'])} of {args.runs} uploads made")
    if results.get("browser", {}).get("mb_per_s"):
        print()
        print(buildTable(results))
    print("\n" + OtherLoad.describe(results["other_load"]))
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    return finish(results, problems, "No problems.", args.json)


if __name__ == "__main__":
    sys.exit(main())
