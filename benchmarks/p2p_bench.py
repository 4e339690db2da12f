#!/usr/bin/env python3
"""
P2P direct against relayed (issue 16, docs/p2p.md): the same E2E name
dialed with C{tp connect --p2p only} (ICE, then QUIC pinned to what TP
vouched for, straight between the two NATs) and with C{tp connect --p2p
off} (through TP), in one run, in network namespaces (root).

    sudo .venv/bin/python benchmarks/p2p_bench.py [--size MB] [--runs N] [--pings N] [--delays 0,10]

Set-up, all started by this script and removed at the end (also on
Ctrl-C or SIGTERM):

  - the topology of the P2P tests (L{tpproxy.test.p2pnet.P2PNet}): TP on
    a public bridge (203.0.113.1), hostA behind natA and hostB behind
    natB, both NATs masquerading (endpoint-independent mapping, a WAN
    firewall), plus a table of this script's own in natA counting every
    byte (any protocol) it forwards towards TP and towards natB;
  - a CA made for the run: TP's certificate, alice (the dialer) and bob
    (the exposer); C{twist tp} in the public namespace with the rule and
    the exposure rule (C{p2p = true}) of the P2P tests;
  - in hostB, a sink on 127.0.0.1 (this script with C{--sink}): a
    connection starting with C{U} is answered C{ready} at once, read to
    EOF and answered C{got N}; one starting with C{E} is echoed;
  - in hostB, C{tp expose 127.0.0.1:SINK --e2e NAME --p2p};
  - in hostA, one C{tp connect --p2p only|off NAME:1} process per
    measurement, its stdin and stdout pipes to this script.

The veth links have no artificial delay: every namespace is on this one
kernel, so both paths run at loopback speed and the figures are about CPU
cost.  C{--delays 0,10} (the default) then measures again with C{tc netem
delay 10ms} on TP's bridge device in the public namespace: it delays what
TP sends (to either NAT), not what the bridge forwards between natA and
natB, so TP is 10 ms of round trip away from each host and the direct
path is not slowed.

Measured, alternating direct and relayed, C{--runs} times each:

  - bulk: the process is started, C{--size} MB are written to its stdin,
    stdin is closed; timed from the process start to the sink's C{got N}
    (MB/s over that time), with the sink's C{ready} (the first byte back:
    connection set-up, with ICE and the direct handshake for direct)
    reported apart and the MB/s after it;
  - latency: one connection per run, C{--pings} messages of
    C{--ping-bytes} bytes each, each written after the last one came back
    (p50/p99 of the round trips, in ms), and the time from the process
    start to the first echo;
  - CPU seconds of C{twist tp} (from /proc) during each, of the exposer,
    and of the dialer process (its rusage); and the bytes natA forwarded
    towards TP and towards natB.

Reported: a table per delay with the ratios direct/relayed, and
benchmarks/results/p2p-latest.json (git-ignored).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
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
    machine,
    now,
    ratio,
    requireTP,
    serveThreaded,
    startServer,
    tpSource,
    tpVersions,
    waitForLog,
    workdir,
)

PORT = 4443
NAME = "sink.p2p.test"
MODES = ("direct", "relayed")
P2P = {"direct": "only", "relayed": "off"}
CHUNK = 65536


# --- the sink (a child in hostB) -------------------------------------------------


def handle(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        mode = conn.recv(1)
        if mode == b"U":
            conn.sendall(b"ready\n")
            total = 0
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(f"got {total}\n".encode())
        elif mode == b"E":
            while data := conn.recv(65536):
                conn.sendall(data)


# --- namespaces, without a test case -----------------------------------------------


class Cleanups:
    """
    What L{tpproxy.test.netns.Namespaces} and L{tpproxy.test.p2pnet.P2PNet}
    need of a test case: C{addCleanup}, run here by L{run} (in reverse).
    """

    def __init__(self) -> None:
        self.calls: list[Callable[[], Any]] = []

    def addCleanup(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.append(lambda: f(*args))

    def run(self) -> None:
        while self.calls:
            try:
                self.calls.pop()()
            except Exception as e:  # keep removing the rest
                print(f"clean-up: {e}", file=sys.stderr)


COUNT_RULES = """
table ip bench {{
  counter toTP {{}}
  counter toPeer {{}}
  counter fromTP {{}}
  counter fromPeer {{}}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    ip daddr {tp} counter name toTP
    ip saddr {tp} counter name fromTP
    ip daddr {peer} counter name toPeer
    ip saddr {peer} counter name fromPeer
  }}
}}
"""


def benchCounters(net: Any) -> dict[str, int]:
    """
    Bytes natA forwarded, any protocol: name to bytes.
    """
    import json

    text = net.net.sh(*net.exec("natA"), net.net.nft, "-j", "list", "counters", "table", "ip", "bench")
    return {item["counter"]["name"]: item["counter"]["bytes"] for item in json.loads(text)["nftables"] if "counter" in item}


def makeTopology(cleanups: Cleanups) -> Any:
    from tpproxy.test.p2pnet import NAMES, NAT_PUBLIC, TP, P2PNet

    net = P2PNet(cleanups)  # type: ignore[arg-type]
    net.net.nftables(NAMES["natA"], COUNT_RULES.format(tp=TP, peer=NAT_PUBLIC["B"]))
    return net


def makePKI(d: Path) -> None:
    from tpproxy.test.p2pnet import writeDeployment

    writeDeployment(d, PORT, NAME)



def setDelay(net: Any, ms: int) -> None:
    """
    C{netem delay MS} on TP's bridge device: what TP sends waits MS ms;
    what the bridge forwards between the NATs does not pass it.
    """
    from tpproxy.test.p2pnet import NAMES

    ns = net.net.ns(NAMES["public"])
    if ms:
        out = subprocess.run(
            ["tc", "-n", ns, "qdisc", "replace", "dev", "br0", "root", "netem", "delay", f"{ms}ms", "limit", "100000"],
            capture_output=True, text=True, timeout=30,
        )
        if out.returncode:
            raise NoDelay(f"tc netem failed ({out.stderr.strip()}): this kernel has no sch_netem?")
    else:
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "br0", "root"], capture_output=True, timeout=30)


class NoDelay(Exception):
    """
    The delay could not be set (a kernel without netem): that phase is
    skipped, and said so.
    """


def tcpConnectMs(net: Any, name: str, host: str, port: int) -> float:
    """
    The quickest of 5 TCP handshakes from namespace C{name} to C{host:port}
    (one round trip), in ms.
    """
    code = (
        "import socket,time\nbest=9e9\nfor i in range(5):\n t=time.perf_counter()\n"
        f" s=socket.create_connection(({host!r},{port}),5)\n best=min(best,time.perf_counter()-t)\n s.close()\n"
        "print(best*1000)"
    )
    return round(float(net.net.sh(*net.exec(name), sys.executable, "-c", code)), 3)


# --- one dial ------------------------------------------------------------------


class Dial:
    """
    One C{tp connect --p2p MODE NAME:1} in hostA, its stdin and stdout
    ours, its stderr collected; killed if it runs longer than C{timeout}.
    """

    def __init__(self, net: Any, procs: Processes, d: Path, mode: str, transport: str, timeout: float) -> None:
        argv = net.exec("hostA") + [str(BIN / "tp"), "--config", str(d / "alice.toml"), "connect", "--p2p", P2P[mode], f"{NAME}:1"]
        if transport != "auto":
            argv[-1:-1] = ["--transport", transport]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=procs.env, start_new_session=True
        )
        self.err = b""
        self.killed = False
        self.rusage: Any = None
        threading.Thread(target=self._readErr, daemon=True).start()
        self.watchdog = threading.Timer(timeout, self._kill)
        self.watchdog.start()

    def _readErr(self) -> None:
        assert self.proc.stderr is not None
        while data := self.proc.stderr.read(4096):
            self.err += data

    def _kill(self) -> None:
        self.killed = True
        self.proc.kill()

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)

    def closeStdin(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    def readUntil(self, buffer: bytearray, marker: bytes | int) -> bytes:
        """
        Read stdout until C{buffer} holds C{marker} (or that many bytes);
        return what came up to it and keep the rest in C{buffer}.
        """
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            end = marker if isinstance(marker, int) else (buffer.find(marker) + len(marker) if marker in buffer else -1)
            if (isinstance(marker, int) and len(buffer) >= marker) or (not isinstance(marker, int) and end > 0):
                out = bytes(buffer[:end])
                del buffer[:end]
                return out
            data = os.read(fd, 1 << 20)
            if not data:
                raise BenchError(f"tp connect ended its output{' (killed: too slow)' if self.killed else ''}: {self.errText()}")
            buffer += data

    def finish(self) -> float:
        """
        Close stdin, read to EOF, reap the process; its CPU seconds.
        """
        self.closeStdin()
        assert self.proc.stdout is not None
        while os.read(self.proc.stdout.fileno(), 1 << 20):
            pass
        _, status, self.rusage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.watchdog.cancel()
        return self.rusage.ru_utime + self.rusage.ru_stime

    def abort(self) -> None:
        self.watchdog.cancel()
        if self.proc.returncode is None:
            self.proc.kill()
            try:
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass

    def errText(self) -> str:
        return self.err.decode(errors="replace").strip()[-1500:]

    def status(self) -> str:
        m = re.search(r"\(v\d+, (\w+)\)", self.err.decode(errors="replace"))
        return m.group(1) if m else "?"


class Sampler:
    """
    CPU seconds of TP and of the exposer, and natA's counters, around one
    measurement.
    """

    def __init__(self, net: Any, procs: Processes) -> None:
        self.net, self.procs = net, procs
        self.cpu = {n: cpuSeconds(procs.pid(n)) for n in ("twist", "expose")}
        self.bytes = benchCounters(net)

    def delta(self) -> dict[str, Any]:
        after = benchCounters(self.net)
        return {
            "tp_cpu_s": round(cpuSeconds(self.procs.pid("twist")) - self.cpu["twist"], 3),
            "exposer_cpu_s": round(cpuSeconds(self.procs.pid("expose")) - self.cpu["expose"], 3),
            "natA_to_tp_mb": round((after["toTP"] - self.bytes["toTP"]) / MB, 3),
            "natA_to_natB_mb": round((after["toPeer"] - self.bytes["toPeer"]) / MB, 3),
        }


def bulk(net: Any, procs: Processes, d: Path, mode: str, transport: str, size: int) -> dict[str, Any]:
    """
    Upload C{size} MB through one dial; see the module docstring.
    """
    sample = Sampler(net, procs)
    dial = Dial(net, procs, d, mode, transport, timeout=60 + size * 2)
    total = size * MB
    failed: list[BaseException] = []

    def writer() -> None:
        chunk = os.urandom(CHUNK)
        try:
            dial.write(b"U")
            left = total
            while left:
                dial.write(chunk[: min(left, CHUNK)])
                left -= min(left, CHUNK)
            dial.closeStdin()
        except OSError as e:
            failed.append(e)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    buffer = bytearray()
    try:
        dial.readUntil(buffer, b"ready\n")
        ready = time.monotonic()
        answer = dial.readUntil(buffer, b"\n").decode(errors="replace").strip()
        done = time.monotonic()
        thread.join(10)
        dialerCPU = dial.finish()
    finally:
        dial.abort()
    if failed:
        raise BenchError(f"{mode}: writing to tp connect failed: {failed[0]}: {dial.errText()}")
    if answer != f"got {total}":
        raise BenchError(f"{mode}: the sink answered {answer!r}, {total} bytes were sent")
    gb = total / 1e9
    one = {
        "mb_per_s": round(size / (done - dial.started), 2),
        "mb_per_s_after_first_byte": round(size / (done - ready), 2),
        "first_byte_s": round(ready - dial.started, 3),
        "seconds": round(done - dial.started, 3),
        "dialer_cpu_s": round(dialerCPU, 3),
        "status": dial.status(),
        **sample.delta(),
    }
    for key in ("tp_cpu_s", "exposer_cpu_s", "dialer_cpu_s"):
        one[key.replace("_cpu_s", "_cpu_s_per_gb")] = round(one[key] / gb, 2)
    return one


def latency(net: Any, procs: Processes, d: Path, mode: str, transport: str, pings: int, size: int) -> dict[str, Any]:
    """
    C{pings} round trips of C{size} bytes through an echo on one dial.
    """
    sample = Sampler(net, procs)
    dial = Dial(net, procs, d, mode, transport, timeout=60 + pings)
    message = os.urandom(size)
    buffer = bytearray()
    rtts = []
    try:
        dial.write(b"E" + message)
        if dial.readUntil(buffer, size) != message:
            raise BenchError(f"{mode}: the echo differs")
        first = time.monotonic() - dial.started
        for _ in range(pings):
            t = time.perf_counter()
            dial.write(message)
            echoed = dial.readUntil(buffer, size)
            rtts.append(time.perf_counter() - t)
            if echoed != message:
                raise BenchError(f"{mode}: the echo differs")
        dialerCPU = dial.finish()
    finally:
        dial.abort()
    rtts.sort()
    return {
        "first_echo_s": round(first, 3),
        "p50_ms": round(1000 * percentile(rtts, 0.5), 3),
        "p99_ms": round(1000 * percentile(rtts, 0.99), 3),
        "max_ms": round(1000 * rtts[-1], 3),
        "dialer_cpu_s": round(dialerCPU, 3),
        "status": dial.status(),
        **sample.delta(),
    }


def percentile(sortedValues: list[float], p: float) -> float:
    return sortedValues[min(len(sortedValues) - 1, int(p * len(sortedValues)))]


# --- the run -----------------------------------------------------------------------


def measurePhase(net: Any, procs: Processes, d: Path, args: argparse.Namespace, delay: int, problems: list[str]) -> dict[str, Any]:
    from tpproxy.test.p2pnet import NAT_PUBLIC, TP

    try:
        setDelay(net, delay)
    except NoDelay as e:
        print(f"\n== TP delay {delay} ms: skipped, {e}", flush=True)
        return {"tp_delay_ms": delay, "skipped": str(e)}
    phase: dict[str, Any] = {
        "tp_delay_ms": delay,
        "tcp_connect_ms": {
            "hostA_to_tp": tcpConnectMs(net, "hostA", TP, PORT),
            "hostB_to_tp": tcpConnectMs(net, "hostB", TP, PORT),
        },
    }
    print(f"\n== TP delay {delay} ms (TCP handshake hostA->TP {phase['tcp_connect_ms']['hostA_to_tp']} ms, "
          f"hostB->TP {phase['tcp_connect_ms']['hostB_to_tp']} ms; natA-natB {NAT_PUBLIC['A']}-{NAT_PUBLIC['B']} undelayed)", flush=True)
    for mode in MODES:
        phase[mode] = {"bulk": [], "latency": []}
        # A dial not counted: the first of a kind pays for imports and the
        # client's transport choice.
        try:
            latency(net, procs, d, mode, args.transport, 5, args.ping_bytes)
        except BenchError as e:
            problems.append(f"delay {delay} ms, warm-up {mode}: {e}")
    for run in range(args.runs):
        for mode in MODES:
            try:
                one = bulk(net, procs, d, mode, args.transport, args.size)
            except BenchError as e:
                problems.append(f"delay {delay} ms, bulk {mode} run {run + 1}: {e}")
                continue
            phase[mode]["bulk"].append(one)
            print(f"  bulk {mode:7} ({one['status']}): {one['mb_per_s']} MB/s from start, {one['mb_per_s_after_first_byte']} after the "
                  f"first byte ({one['first_byte_s']} s); CPU/GB TP {one['tp_cpu_s_per_gb']}, exposer {one['exposer_cpu_s_per_gb']}, "
                  f"dialer {one['dialer_cpu_s_per_gb']}; natA->TP {one['natA_to_tp_mb']} MB, natA->natB {one['natA_to_natB_mb']} MB", flush=True)
        for mode in MODES:
            try:
                one = latency(net, procs, d, mode, args.transport, args.pings, args.ping_bytes)
            except BenchError as e:
                problems.append(f"delay {delay} ms, latency {mode} run {run + 1}: {e}")
                continue
            phase[mode]["latency"].append(one)
            print(f"  echo {mode:7} ({one['status']}): p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms, first echo {one['first_echo_s']} s; "
                  f"TP CPU {one['tp_cpu_s']} s", flush=True)
    for mode in MODES:
        for kind in ("bulk", "latency"):
            for one in phase[mode][kind]:
                want = "p2p" if mode == "direct" else None
                if (want and one["status"] != want) or (not want and one["status"] in ("p2p", "?")):
                    problems.append(f"delay {delay} ms, {kind} {mode}: status line says {one['status']!r}")
        summarize(phase[mode])
    return phase


def summarize(chain: dict[str, Any]) -> None:
    def med(kind: str, key: str) -> float | None:
        values = [r[key] for r in chain[kind]]
        return round(statistics.median(values), 3) if values else None

    chain["summary"] = {
        **{key: med("bulk", key) for key in (
            "mb_per_s", "mb_per_s_after_first_byte", "first_byte_s", "tp_cpu_s_per_gb", "exposer_cpu_s_per_gb",
            "dialer_cpu_s_per_gb", "natA_to_tp_mb", "natA_to_natB_mb")},
        **{f"echo_{key}": med("latency", key) for key in ("p50_ms", "p99_ms", "first_echo_s", "tp_cpu_s")},
    }


ROWS = (
    ("mb_per_s", "upload {size} MB, from process start (MB/s)", 1),
    ("mb_per_s_after_first_byte", "upload, after the first byte back (MB/s)", 1),
    ("first_byte_s", "first byte back, from process start (s)", 2),
    ("echo_p50_ms", "echo {bytes} B round trip p50 (ms)", 3),
    ("echo_p99_ms", "echo {bytes} B round trip p99 (ms)", 3),
    ("echo_first_echo_s", "first echo, from process start (s)", 2),
    ("tp_cpu_s_per_gb", "twist tp CPU per GB uploaded (s)", 2),
    ("echo_tp_cpu_s", "twist tp CPU per echo run (s)", 3),
    ("exposer_cpu_s_per_gb", "tp expose CPU per GB (s)", 2),
    ("dialer_cpu_s_per_gb", "tp connect CPU per GB (s)", 2),
    ("natA_to_tp_mb", "natA -> TP per upload (MB)", 1),
    ("natA_to_natB_mb", "natA -> natB per upload (MB)", 1),
)


def buildTable(phase: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for key, label, digits in ROWS:
        row: dict[str, Any] = {"measure": label.format(size=args.size, bytes=args.ping_bytes), "digits": digits}
        for mode in MODES:
            row[mode] = phase[mode]["summary"][key]
        row["ratio"] = ratio(row["direct"], row["relayed"])
        rows.append(row)
    phase["table"] = [dict(r) for r in rows]
    return formatTable(rows, [(m, m) for m in MODES], [("ratio", "dir/rel")])


def scanLogs(procs: Processes, problems: list[str]) -> dict[str, Any]:
    twist = procs.logText("twist") or ""
    for name in ("twist", "expose"):
        bad = [line for line in (procs.logText(name) or "").splitlines() if re.search(r"Traceback|Unhandled|#(error|critical)\]", line)]
        for line in bad[:5]:
            problems.append(f"{name} logged: {line.strip()[:300]}")
    return {
        "tp_introductions": len(re.findall(r": p2p - introduced to bob", twist)),
        "tp_relayed_tunnels": len(re.findall(r": ok - inner identity alice", twist)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="MB per upload (default 50)")
    parser.add_argument("--runs", type=int, default=3, help="uploads and echo runs per path and delay (default 3)")
    parser.add_argument("--pings", type=int, default=200, help="round trips per echo run (default 200)")
    parser.add_argument("--ping-bytes", type=int, default=64, help="bytes per round trip (default 64)")
    parser.add_argument("--delays", default="0,10", help="TP's netem delay in ms, one measurement each (default 0,10)")
    parser.add_argument("--transport", choices=("auto", "quic", "tls"), default="auto", help="tp connect's and tp expose's way to TP (default auto)")
    parser.add_argument("--json", default=str(RESULTS / "p2p-latest.json"), help="where the results go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        serveThreaded(handle)
        return 0
    exitOnSignals()
    requireTP()
    delays = [int(x) for x in args.delays.split(",") if x.strip()]
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {"started": now(), "machine": machine(), "versions": tpVersions(), "tp_source": tpSource(), "size_mb": args.size,
                 "runs": args.runs, "pings": args.pings, "ping_bytes": args.ping_bytes, "transport": args.transport,
                 "links": "veth pairs and a bridge, no artificial delay except netem on TP's br0 for a delay > 0"},
        "phases": {},
    }
    problems: list[str] = []
    load = OtherLoad()
    cleanups = Cleanups()
    tables = []
    with workdir("tp-p2p-bench-", args.keep) as d:
        procs = Processes(d)
        procs.env = {k: v for k, v in procs.env.items() if not k.startswith("TP_")}
        try:
            net = makeTopology(cleanups)
            makePKI(d / "pki")
            pki = d / "pki"
            procs.start("twist", net.exec("public") + [BIN / "twist", "--log-format=text", "--log-file=+", "tp", "--config", pki / "tp.toml"], cwd=pki)
            waitForLog(procs, "twist", re.compile("TP serving"), timeout=60)
            sinkPort = startServer(procs, "sink", net.exec("hostB") + [sys.executable, Path(__file__).resolve(), "--sink"])
            expose = [BIN / "tp", "--config", pki / "bob.toml", "expose", f"127.0.0.1:{sinkPort}", "--e2e", NAME, "--p2p"]
            if args.transport != "auto":
                expose[-1:-1] = ["--transport", args.transport]
            procs.start("expose", net.exec("hostB") + expose)
            exposing = waitForLog(procs, "expose", re.compile(r"Exposing .*\(v\d+, (\w+)\)"), timeout=60)
            results["meta"]["exposer_transport"] = exposing.group(1)
            print(f"twist tp in the public namespace, sink and tp expose --e2e --p2p in hostB, dials from hostA; "
                  f"{args.size} MB x {args.runs}, {args.pings} x {args.ping_bytes} B echoes", flush=True)
            for delay in delays:
                phase = measurePhase(net, procs, pki, args, delay, problems)
                results["phases"][str(delay)] = phase
                tables.append((delay, phase["skipped"] if "skipped" in phase else buildTable(phase, args)))
            results["twist_log"] = scanLogs(procs, problems)
        except (BenchError, AssertionError) as e:  # AssertionError: a namespace command failed
            problems.append(str(e))
        finally:
            results["other_load"] = load.measure(procs)
            procs.stopAll()
            cleanups.run()
    for delay, table in tables:
        print(f"\nTP delay {delay} ms (netem on TP's bridge device; natA-natB undelayed):\n{table}" if delay else
              f"\nNo added delay (veth and bridge at loopback speed):\n{table}")
    print("\n" + OtherLoad.describe(results["other_load"]))
    results["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    return finish(results, problems, "No problems.", args.json)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
