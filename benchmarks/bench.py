#!/usr/bin/env python3
"""
Benchmark TP against an equivalent stunnel mutual-TLS relay, on loopback.

    .venv/bin/python benchmarks/bench.py [--quick]

Five chains carry the same traffic to the same sink/source server:

  direct      client -> sink
  tp          client -> `tp up` (plain in, TLS out) -> `twist tp` (TLS in,
              plain out) -> sink
  tp_quic     client -> `tp --transport quic up` (plain in, one QUIC
              connection out, one stream per client connection) -> `twist
              tp` (its QUIC listener, on the UDP port of the same number as
              its TLS port; plain out) -> sink
  tp_reverse  client -> public port of `twist tp` (plain in) -> (a new TLS
              connection from the exposer, `accept` hello) -> `tp expose
              127.0.0.1:SINK --public PORT` (TLS in, plain out) -> sink
  stunnel     client -> stunnel client mode (plain in, TLS out with the client
              certificate) -> stunnel server mode (TLS 1.3 only, client
              certificate required and verified) -> sink

Every proxy chain is two processes with one mutual-TLS hop between them (TLS
1.3 over TCP, or QUIC, whose handshake is TLS 1.3), and uses the same CA,
server certificate and client certificate, made at run time by `tp init-dev`
in a temporary directory.  The QUIC and reverse chains share the `twist tp`
process with the forward one.  Its exposer keeps a signalling
connection to `twist tp`; for every client connection to the public port TP
sends an `incoming` event on it, and the exposer opens a new mutual-TLS
connection to TP (`accept` hello) and a connection to the sink, which TP and
the exposer then splice.

Measured: bulk throughput of one connection (upload and download), and the
rate of short connections (connect, send a line, read it back, close),
sequential and concurrent.  Every transfer is counted byte for byte, and an
untimed check sends hashed random data both ways (and one upload ended by a
half-close) through each chain.  At the end, `tp up` and `tp expose` get
SIGTERM while `twist tp` is still up: they should exit within 3 s, and the
public port should stop being served.  CPU time the rest of the machine used
during the run is reported, to tell a noisy run.

Results are printed as a table and written to benchmarks/results/latest.json.
Everything (temporary directory, sink, TP, stunnel) is started and removed by
this script; the ports are picked at run time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

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
    fmt,
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
    serveThreaded,
    startServer,
    statusKB,
    tpSource,
    tpVersions,
    udpPortFree,
    waitForLog,
    waitForPort,
    workdir,
)

CHUNK = 1 << 20
#: A transfer making no progress for this long (on loopback) counts as a stall.
STALL_TIMEOUT = 10.0
#: Every chain, in table order (a TP without `--transport` has no tp_quic).
CHAINS = ("direct", "tp", "tp_quic", "tp_reverse", "stunnel")
#: Column headings of the table.
LABELS = {"direct": "direct", "tp": "TP fwd", "tp_quic": "TP quic", "tp_reverse": "TP rev", "stunnel": "stunnel"}
#: The ratio columns: JSON key, heading, numerator chain, denominator chain.
RATIOS = (
    ("tp_over_stunnel", "fwd/stun", "tp", "stunnel"),
    ("tp_reverse_over_stunnel", "rev/stun", "tp_reverse", "stunnel"),
    ("tp_reverse_over_tp", "rev/fwd", "tp_reverse", "tp"),
    ("tp_quic_over_stunnel", "quic/stun", "tp_quic", "stunnel"),
    ("tp_quic_over_tp", "quic/tls", "tp_quic", "tp"),
)
#: The issue's target for one stream through TP over QUIC (MB/s, each way).
QUIC_TARGET_MB_S = 60.0


# --- the sink / source server ---------------------------------------------
#
# Runs in its own process (`bench.py --sink`), one thread per connection.
# Line protocol, each command a line ending in \n:
#   SYNC            -> "GO\n"; read the next command (used to exclude the
#                      tunnel set-up from the bulk timings)
#   ECHO <text>     -> the same line back; then wait for EOF and close
#   UP <n>          -> read exactly n bytes, answer "OK <count>\n", wait EOF
#   DOWN <n>        -> send n bytes, shut down writing, wait EOF
#   UPHASH          -> read to EOF (the client half-closes), answer
#                      "<count> <sha256>\n", close
#   UPHASHN <n>     -> read exactly n bytes, answer "<count> <sha256>\n", wait EOF
#   DOWNHASH <n> <seed> -> send "<sha256>\n" then n pseudo-random bytes, shut
#                      down writing, wait EOF


def _patternBlock() -> bytes:
    return bytes(random.Random(1).randbytes(CHUNK))


def pseudoRandom(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def readline(self, limit: int = 65536) -> bytes:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"EOF before a line (had {len(self.buf)} bytes)")
            self.buf += data
            if len(self.buf) > limit:
                raise ValueError("line too long")
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def take(self) -> bytes:
        data, self.buf = self.buf, b""
        return data


def _drainToEOF(sock: socket.socket) -> int:
    n = 0
    buf = bytearray(65536)
    while True:
        got = sock.recv_into(buf)
        if not got:
            return n
        n += got


def _readExactly(sock: socket.socket, reader: LineReader, n: int, hasher: Any = None) -> int:
    early = reader.take()
    if len(early) > n:
        raise ValueError("more bytes than announced")
    count = len(early)
    if hasher is not None and early:
        hasher.update(early)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while count < n:
        got = sock.recv_into(view[: min(CHUNK, n - count)])
        if not got:
            break
        if hasher is not None:
            hasher.update(view[:got])
        count += got
    return count


def _sendCount(sock: socket.socket, n: int, block: bytes) -> None:
    view = memoryview(block)
    left = n
    while left:
        k = min(left, len(block))
        sock.sendall(view[:k])
        left -= k


def _sinkConnection(conn: socket.socket, block: bytes, log: Callable[[str], None]) -> None:
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = LineReader(conn)
        while True:
            line = reader.readline()
            word, _, arg = line.partition(b" ")
            if word == b"SYNC":
                conn.sendall(b"GO\n")
                continue
            if word == b"ECHO":
                conn.sendall(line + b"\n")
                _drainToEOF(conn)
            elif word == b"UP":
                n = int(arg)
                count = _readExactly(conn, reader, n)
                conn.sendall(b"OK %d\n" % count)
                if count != n:
                    log(f"UP {n}: connection ended after {count} bytes")
                _drainToEOF(conn)
            elif word == b"DOWN":
                _sendCount(conn, int(arg), block)
                conn.shutdown(socket.SHUT_WR)
                _drainToEOF(conn)
            elif word == b"UPHASH":
                h = hashlib.sha256()
                early = reader.take()
                h.update(early)
                count = len(early)
                buf = bytearray(CHUNK)
                while True:
                    got = conn.recv_into(buf)
                    if not got:
                        break
                    h.update(memoryview(buf)[:got])
                    count += got
                conn.sendall(b"%d %s\n" % (count, h.hexdigest().encode()))
            elif word == b"UPHASHN":
                h = hashlib.sha256()
                count = _readExactly(conn, reader, int(arg), h)
                conn.sendall(b"%d %s\n" % (count, h.hexdigest().encode()))
                _drainToEOF(conn)
            elif word == b"DOWNHASH":
                n, seed = (int(x) for x in arg.split())
                data = pseudoRandom(n, seed)
                conn.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n")
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                _drainToEOF(conn)
            else:
                log(f"unknown command {line[:40]!r}")
            return
    except (OSError, EOFError, ValueError) as e:
        log(f"connection error: {e!r}")
    finally:
        conn.close()


def runSink() -> None:
    block = _patternBlock()
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            sys.stderr.write(f"sink: {message}\n")
            sys.stderr.flush()

    serveThreaded(lambda conn: _sinkConnection(conn, block, log))


# --- UDP counters, for the QUIC chain ---------------------------------------


def udpCounters() -> dict[str, int]:
    """
    The machine's UDP counters (/proc/net/snmp): datagrams in and out, and
    the drops (receive/send buffer full) that QUIC would have to resend.
    """
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])}
    except (OSError, IndexError, ValueError):
        return {}


def quicSockets(port: int) -> dict[str, dict[str, int]]:
    """
    The UDP sockets of the QUIC hop, from /proc/net/udp: TP's listener
    (local port C{port}) and the clients connected to it (remote port
    C{port}), each with its receive buffer size and the datagrams the
    kernel dropped on it because that buffer was full.
    """
    out: dict[str, dict[str, int]] = {}
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) < 13:
            continue
        local, remote = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        rxQueue = int(f[4].split(":")[1], 16)
        if local == port:
            name = "server (twist tp)"
        elif remote == port:
            name = f"client (local port {local})"
        else:
            continue
        out[name] = {"drops": int(f[12]), "rx_queue_bytes": rxQueue, "inode": int(f[9])}
    return out


STUNNEL_GLOBAL = """\
foreground = yes
pid =
syslog = no
output = {log}
debug = notice

[{name}]
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
sslVersionMin = TLSv1.3
; TP disables session resumption (every connection proves its certificate
; anew); so does this.
sessionResume = no
options = NO_TICKET
"""


class Setup:
    """
    The sink, TP forward (`tp up` + `twist tp`), TP over QUIC (`tp
    --transport quic up` + the same `twist tp`), TP reverse (`tp expose` +
    the same `twist tp`) and stunnel (client + server), all on loopback.
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs = Processes(workdir)
        requireTP()
        self.stunnel = requireTool("stunnel4", "stunnel")
        self.entry: dict[str, int] = {}
        self.proxyPids: dict[str, list[int]] = {c: [] for c in CHAINS}
        self.pidNames: dict[int, str] = {}
        #: --transport for the TP clients, if this TP has the option.
        self.transportArgs: list[str] = []
        #: The chains measured: all, or all but tp_quic if tp has no --transport.
        self.chains: tuple[str, ...] = CHAINS

    def pinTransport(self, transport: str) -> str | None:
        """
        Newer TP clients choose QUIC or TLS to TP (--transport, default auto);
        the comparison with stunnel is about TLS over TCP, so pin it.
        Returns the transport pinned, or None if this TP has no such option.
        """
        out = subprocess.run([str(BIN / "tp"), "--help"], capture_output=True, text=True)
        if "--transport" not in out.stdout:
            if transport != "tls":
                raise BenchError(f"this tp has no --transport option (asked for {transport})")
            # No QUIC in this TP: measure the other chains.
            self.chains = tuple(c for c in CHAINS if c != "tp_quic")
            return None
        self.transportArgs = ["--transport", transport]
        return transport

    def start(self) -> None:
        d = self.dir
        for _ in range(50):
            tpPort, upPort, quicUpPort, publicPort, stunnelServerPort, stunnelClientPort = freePorts(6)
            # twist tp's QUIC listener takes the UDP port of the same number.
            if udpPortFree(tpPort):
                break
        else:
            raise BenchError("found no port free for both TCP and UDP")
        quic = "tp_quic" in self.chains

        # The sink.
        self.sinkPort = startServer(self.procs, "sink", [sys.executable, Path(__file__).resolve(), "--sink"])
        self.sinkPid = self.procs.pid("sink")
        self.entry["direct"] = self.sinkPort

        # Certificates and TP configs, by `tp init-dev`, to listen on
        # 127.0.0.1 only (init-dev also adds ::1 where it works): TLS on TCP
        # and, said explicitly, QUIC on UDP, both on tpPort (`quic = true`,
        # the default, would derive the same from `listen`).
        listen = f'listen = ["tcp:{tpPort}:interface=127.0.0.1"]'
        if quic:
            listen += f'\nquic = ["{LOOPBACK}:{tpPort}"]'
        pki = self.pki = initDev(d / "pki", tpPort, listen, unexpected=r"(?m)^quic\s*=")

        # TP: the server, then `tp up` in front of it.
        self.procs.start("twist-tp", [str(BIN / "twist"), "tp", "--config", str(pki / "server.toml")])
        waitForPort(tpPort, self.procs, "twist tp")
        if quic:
            # The start-up line names what it listens on.
            served = waitForLog(self.procs, "twist-tp", re.compile(r'"quic": "([^"]*)"')).group(1)
            if served != f"{LOOPBACK}:{tpPort}":
                raise BenchError(f"twist tp serves QUIC on {served!r}, expected {LOOPBACK}:{tpPort}")
        self.procs.start(
            "tp-up",
            [
                str(BIN / "tp"), "--config", str(pki / "client.toml"), "--server", f"{LOOPBACK}:{tpPort}",
                *self.transportArgs, "up", f"{LOOPBACK}:{self.sinkPort}", str(upPort),
            ],
        )
        waitForPort(upPort, self.procs, "tp up")
        self.entry["tp"] = upPort
        self.proxyPids["tp"] = [self.procs.procs["tp-up"].pid, self.procs.procs["twist-tp"].pid]

        # TP over QUIC: a second `tp up`, pinned to QUIC, to the same server
        # and sink.  It makes its one QUIC connection at start (with
        # --transport quic a failed handshake ends the process) and then
        # prints "Forwarding ... (vX, quic)"; every client connection is a
        # new stream on that connection.
        if quic:
            self.procs.start(
                "tp-up-quic",
                [
                    str(BIN / "tp"), "--config", str(pki / "client.toml"), "--server", f"{LOOPBACK}:{tpPort}",
                    "--transport", "quic", "up", f"{LOOPBACK}:{self.sinkPort}", str(quicUpPort),
                ],
            )
            chosen = waitForLog(self.procs, "tp-up-quic", re.compile(r"^Forwarding \S+ to \S+ via \S+ \(v\S+, (\w+)\)", re.M)).group(1)
            if chosen != "quic":
                raise BenchError(f"tp --transport quic up reports transport {chosen!r}")
            waitForPort(quicUpPort, self.procs, "tp --transport quic up")
            self.entry["tp_quic"] = quicUpPort
            self.proxyPids["tp_quic"] = [self.procs.procs["tp-up-quic"].pid, self.procs.procs["twist-tp"].pid]

        # TP reverse: `tp expose` registers the sink as a public port of the
        # same `twist tp` (on its [reverse] public_interface, 127.0.0.1 in the
        # dev config).  The "Exposing ... as public port N" line on its stderr
        # says the port is listening; no probe connection is needed.
        self.procs.start(
            "tp-expose",
            [
                str(BIN / "tp"), "--config", str(pki / "client.toml"), "--server", f"{LOOPBACK}:{tpPort}",
                *self.transportArgs, "expose", f"{LOOPBACK}:{self.sinkPort}", "--public", str(publicPort),
            ],
        )
        exposed = int(
            waitForLog(
                self.procs, "tp-expose", re.compile(r"^Exposing \S+ as public port (\d+) via ", re.M), "report a public port"
            ).group(1)
        )
        if exposed != publicPort:
            raise BenchError(f"tp expose asked for public port {publicPort} but reports {exposed}")
        self.entry["tp_reverse"] = exposed
        self.proxyPids["tp_reverse"] = [self.procs.procs["tp-expose"].pid, self.procs.procs["twist-tp"].pid]

        # stunnel: server mode, then client mode in front of it.
        server = STUNNEL_GLOBAL.format(
            log=d / "stunnel-server.out", name="tp-bench-server", accept=stunnelServerPort, connect=self.sinkPort,
            cert=pki / "server.pem", key=pki / "server.key", ca=pki / "ca.pem",
        )
        server += "requireCert = yes\n"
        (d / "stunnel-server.conf").write_text(server)
        client = STUNNEL_GLOBAL.format(
            log=d / "stunnel-client.out", name="tp-bench-client", accept=stunnelClientPort, connect=stunnelServerPort,
            cert=pki / "client.pem", key=pki / "client.key", ca=pki / "ca.pem",
        )
        # Check the server certificate names 127.0.0.1, as `tp` does.
        client += "client = yes\ncheckIP = 127.0.0.1\n"
        (d / "stunnel-client.conf").write_text(client)
        self.procs.start("stunnel-server", [self.stunnel, str(d / "stunnel-server.conf")])
        waitForPort(stunnelServerPort, self.procs, "stunnel server")
        self.procs.start("stunnel-client", [self.stunnel, str(d / "stunnel-client.conf")])
        waitForPort(stunnelClientPort, self.procs, "stunnel client")
        self.entry["stunnel"] = stunnelClientPort
        self.proxyPids["stunnel"] = [self.procs.procs["stunnel-client"].pid, self.procs.procs["stunnel-server"].pid]
        self.ports = {
            "sink": self.sinkPort, "tp_server": tpPort, "tp_up": upPort, "tp_public": publicPort,
            "stunnel_server": stunnelServerPort, "stunnel_client": stunnelClientPort,
        }
        if quic:
            self.ports["tp_server_quic_udp"] = tpPort
            self.ports["tp_up_quic"] = quicUpPort
        self.pidNames = {proc.pid: name for name, proc in self.procs.procs.items()}

    def proxyCPU(self, chain: str) -> float:
        return sum(cpuSeconds(pid) for pid in self.proxyPids[chain])

    def proxyCPUByProcess(self, chain: str) -> dict[str, float]:
        return {self.pidNames.get(pid, str(pid)): cpuSeconds(pid) for pid in self.proxyPids[chain]}

    def peakRSSByProcess(self) -> dict[str, float | None]:
        """
        Peak resident memory (VmHWM) of each proxy process, in MB.
        """
        out: dict[str, float | None] = {}
        for pid in sorted({p for pids in self.proxyPids.values() for p in pids}):
            out[self.pidNames.get(pid, str(pid))] = peakRSSMB(pid)
        return out

    def peakRSS(self, chain: str) -> float | None:
        """
        Peak resident memory (VmHWM) of the chain's processes, summed, in MB.
        """
        if not self.proxyPids[chain]:
            return None
        kbs = [statusKB(pid, "VmHWM") for pid in self.proxyPids[chain]]
        if None in kbs:
            return None
        return round(sum(kbs) * 1024 / MB, 1)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.procs.stopAll()


# --- the client side of the measurements ----------------------------------


def connect(port: int, timeout: float = STALL_TIMEOUT) -> tuple[socket.socket, LineReader]:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, LineReader(sock)


def expectLine(reader: LineReader, what: str) -> bytes:
    try:
        return reader.readline()
    except socket.timeout:
        raise BenchError(f"{what}: no answer within {reader.sock.gettimeout():g} s (stall)") from None
    except EOFError as e:
        raise BenchError(f"{what}: connection closed early ({e})") from None


def sync(sock: socket.socket, reader: LineReader, what: str) -> None:
    sock.sendall(b"SYNC\n")
    if expectLine(reader, what) != b"GO":
        raise BenchError(f"{what}: bad answer to SYNC")


def bulkUpload(port: int, n: int, block: bytes) -> float:
    """
    Send n bytes on one connection; the sink counts them.  Returns seconds
    from the first byte sent to the sink's receipt for all n.
    """
    what = f"upload of {n} bytes"
    sock, reader = connect(port)
    try:
        sync(sock, reader, what)
        view = memoryview(block)
        start = time.perf_counter()
        sock.sendall(b"UP %d\n" % n)
        left = n
        try:
            while left:
                k = min(left, len(block))
                sock.sendall(view[:k])
                left -= k
        except socket.timeout:
            raise BenchError(f"{what}: stalled after sending {n - left} bytes (no progress for {STALL_TIMEOUT:g} s)") from None
        answer = expectLine(reader, what)
        elapsed = time.perf_counter() - start
        if answer != b"OK %d" % n:
            raise BenchError(f"{what}: sink answered {answer!r}")
        return elapsed
    finally:
        sock.close()


def bulkDownload(port: int, n: int) -> tuple[float, str | None]:
    """
    Receive n bytes on one connection, then EOF; count them.  Returns the
    seconds from the request to the last of the n bytes, and None or what
    went wrong with the EOF that must follow them.
    """
    what = f"download of {n} bytes"
    sock, reader = connect(port)
    try:
        sync(sock, reader, what)
        buf = bytearray(CHUNK)
        start = time.perf_counter()
        sock.sendall(b"DOWN %d\n" % n)
        count = len(reader.take())
        try:
            while count < n:
                got = sock.recv_into(buf)
                if not got:
                    raise BenchError(f"{what}: EOF after {count} bytes ({n - count} missing)")
                count += got
        except socket.timeout:
            raise BenchError(f"{what}: stalled after {count} bytes (no progress for {STALL_TIMEOUT:g} s)") from None
        elapsed = time.perf_counter() - start
        try:
            extra = _drainToEOF(sock)
        except socket.timeout:
            return elapsed, f"{what}: all {n} bytes arrived, but no EOF within {STALL_TIMEOUT:g} s after them"
        if extra:
            raise BenchError(f"{what}: received {count + extra} bytes")
        return elapsed, None
    finally:
        sock.close()


def shortConnection(port: int, payload: bytes) -> float:
    start = time.perf_counter()
    sock, reader = connect(port)
    try:
        sock.sendall(payload)
        answer = expectLine(reader, "short connection")
        if answer + b"\n" != payload:
            raise BenchError(f"short connection: echo mismatch ({answer[:40]!r})")
    finally:
        sock.close()
    return time.perf_counter() - start


def connectionRate(port: int, total: int, concurrency: int) -> dict[str, Any]:
    """
    Run `total` short connections, `concurrency` at a time.
    """
    payload = b"ECHO " + b"x" * 58 + b"\n"  # 64 bytes
    runs = concurrently(lambda: shortConnection(port, payload), total, concurrency)
    return {
        "connections": total,
        "ok": len(runs.latencies),
        "errors": len(runs.errors),
        "error_samples": sorted(set(runs.errors))[:5],
        "seconds": round(runs.seconds, 4),
        "conn_per_s": round(len(runs.latencies) / runs.seconds, 1),
        "latency_ms_p50": runs.percentileMs(0.5),
        "latency_ms_p99": runs.percentileMs(0.99),
    }


def integrityChecks(port: int, n: int, runs: int, timeout: float) -> dict[str, Any]:
    """
    Untimed, `runs` times each: random data up with its sha256 checked by the
    sink; pseudo-random data down, read to EOF, its sha256 checked here; and
    an upload ended by a half-close (shutdown(SHUT_WR)) whose answer must
    still come back.
    """
    data = os.urandom(n)
    digest = hashlib.sha256(data).hexdigest().encode()

    def upload() -> str | None:
        sock, reader = connect(port, timeout)
        try:
            sock.sendall(b"UPHASHN %d\n" % n)
            sock.sendall(data)
            answer = expectLine(reader, "hashed upload")
            return None if answer == b"%d %s" % (n, digest) else f"sink got {answer.decode()!r}, sent {n} {digest.decode()}"
        finally:
            sock.close()

    def download() -> str | None:
        sock, reader = connect(port, timeout)
        try:
            seed = random.randrange(1 << 30)
            sock.sendall(b"DOWNHASH %d %d\n" % (n, seed))
            announced = expectLine(reader, "hashed download").decode()
            h = hashlib.sha256()
            early = reader.take()
            h.update(early)
            count = len(early)
            buf = bytearray(CHUNK)
            try:
                while True:
                    got = sock.recv_into(buf)
                    if not got:
                        break
                    h.update(memoryview(buf)[:got])
                    count += got
            except socket.timeout:
                return f"download read to EOF: stalled after {count} of {n} bytes (no EOF within {timeout:g} s)"
            if count != n or h.hexdigest() != announced:
                return f"received {count} bytes with sha256 {h.hexdigest()}, sink sent {n} with {announced}"
            return None
        finally:
            sock.close()

    def halfClose() -> str | None:
        sock, reader = connect(port, timeout)
        try:
            sock.sendall(b"UPHASH\n")
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = expectLine(reader, "upload ended by half-close")
            return None if answer == b"%d %s" % (n, digest) else f"sink got {answer.decode()!r}, sent {n} {digest.decode()}"
        finally:
            sock.close()

    results: dict[str, Any] = {"bytes_each": n, "runs": runs}
    for name, check in (("upload_sha256", upload), ("download_sha256_to_eof", download), ("half_close_upload", halfClose)):
        failures: list[str] = []
        for _ in range(runs):
            try:
                problem = check()
            except (OSError, BenchError) as e:
                problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                failures.append(problem)
        results[name] = {"ok": runs - len(failures), "failed": len(failures), "failures": sorted(set(failures))[:3]}
    return results


# --- orchestration ----------------------------------------------------------


def measureBulk(setup: Setup, direction: str, n: int, repeats: int, problems: list[str]) -> dict[str, Any]:
    block = _patternBlock()
    out: dict[str, Any] = {}
    samples: dict[str, list[float]] = {c: [] for c in setup.chains}
    cpu: dict[str, list[float]] = {c: [] for c in setup.chains}
    cpuByProcess: dict[str, dict[str, list[float]]] = {c: {} for c in setup.chains}
    errors: dict[str, list[str]] = {c: [] for c in setup.chains}
    for r in range(repeats):
        for chain in setup.chains:
            port = setup.entry[chain]
            before = setup.proxyCPU(chain)
            beforeEach = setup.proxyCPUByProcess(chain)
            eofProblem = None
            try:
                if direction == "upload":
                    t = bulkUpload(port, n, block)
                else:
                    t, eofProblem = bulkDownload(port, n)
            except (BenchError, OSError) as e:
                message = f"{chain} {direction} run {r + 1}: {e}"
                errors[chain].append(str(e))
                problems.append(message)
                print(f"  !! {message}", flush=True)
                continue
            samples[chain].append(n / MB / t)
            cpu[chain].append(setup.proxyCPU(chain) - before)
            for name, used in setup.proxyCPUByProcess(chain).items():
                cpuByProcess[chain].setdefault(name, []).append(used - beforeEach[name])
            print(f"  {direction:8} {chain:10} run {r + 1}: {n / MB / t:9.1f} MB/s  ({t:.2f} s)", flush=True)
            if eofProblem:
                message = f"{chain} {direction} run {r + 1}: {eofProblem}"
                errors[chain].append(eofProblem)
                problems.append(message)
                print(f"  !! {message}", flush=True)
    for chain in setup.chains:
        s = samples[chain]
        out[chain] = {
            "mb_per_s": round(median(s), 1) if s else None,
            "mb_per_s_best": round(max(s), 1) if s else None,
            "samples_mb_per_s": [round(x, 1) for x in s],
            "bytes_per_run": n,
            "runs_ok": len(s),
            "errors": errors[chain],
            "proxy_cpu_s_per_gb": round(median(cpu[chain]) / n * 1e9, 2) if s and chain != "direct" else None,
            "proxy_cpu_s_per_gb_by_process": {
                name: round(median(v) / n * 1e9, 2) for name, v in cpuByProcess[chain].items()
            } if s and chain != "direct" else None,
        }
    return out


def measureRate(setup: Setup, total: int, concurrency: int, problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for chain in setup.chains:
        port = setup.entry[chain]
        connectionRate(port, 10, 1)  # warm-up
        before = setup.proxyCPU(chain)
        beforeEach = setup.proxyCPUByProcess(chain)
        result = connectionRate(port, total, concurrency)
        used = setup.proxyCPU(chain) - before
        result["proxy_cpu_ms_per_conn"] = round(1000 * used / max(1, result["ok"]), 3) if chain != "direct" else None
        if chain != "direct":
            result["proxy_cpu_ms_per_conn_by_process"] = {
                name: round(1000 * (t - beforeEach[name]) / max(1, result["ok"]), 3)
                for name, t in setup.proxyCPUByProcess(chain).items()
            }
        if result["errors"]:
            problems.append(f"{chain} connection rate (concurrency {concurrency}): {result['errors']} of {total} failed: {result['error_samples']}")
        out[chain] = result
        print(
            f"  conc {concurrency:2} {chain:10}: {result['conn_per_s']:8.1f} conn/s  p50 {result['latency_ms_p50']:.2f} ms"
            f"  p99 {result['latency_ms_p99']:.2f} ms  errors {result['errors']}",
            flush=True,
        )
    return out


def _stackFrame(frame: str) -> str:
    """
    "function (path:line)" from py-spy, as "function (short path)".
    """
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    function, path = m.groups()
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/(tpproxy/)", r"\1", path)
    return f"{function} ({path})"


def summarizeStacks(path: Path, top: int = 15) -> dict[str, Any]:
    """
    The functions a py-spy "raw" (collapsed stacks) profile spent most
    samples in: by self time, and by time inclusive of what they called.
    """
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_stackFrame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n

    def ranked(counts: dict[str, int], skip: Callable[[str], bool] = lambda f: False) -> list[list[Any]]:
        rows = [[round(100 * n / total, 1), f] for f, n in counts.items() if total and not skip(f)]
        return sorted(rows, key=lambda r: -r[0])[:top]

    # Inclusive: leave out the frames of the reactor loop and the entry
    # points, on (nearly) every stack.
    plumbing = re.compile(
        r"\((twisted/python/|twisted/internet/(base|posixbase|epollreactor|task)\.py|twisted/application/|tpproxy/cli\.py"
        r"|[^/]*twist\)|[^/]*tp\))|^<module>"
    )
    return {"samples": total, "self_pct": ranked(own), "inclusive_pct": ranked(inclusive, lambda f: bool(plumbing.search(f)))}


#: py-spy samples per second.
PROFILE_RATE = 250
#: The processes py-spy samples for each chain it can profile.
PROFILED = {"tp": ("twist-tp", "tp-up"), "tp_quic": ("twist-tp", "tp-up-quic")}


def profileChain(setup: Setup, chain: str, seconds: float, rate: float | None, outdir: Path, problems: list[str]) -> dict[str, Any]:
    """
    py-spy on the two TP processes of C{chain} (L{PROFILED}) during one
    upload, one download, each sized (from the measured rate) to outlast the
    sampling, and then short connections one at a time for as long;
    collapsed stacks written to C{outdir}, the top functions returned.
    """
    pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)
    port = setup.entry[chain]
    pids = {name: setup.procs.procs[name].pid for name in PROFILED[chain]}
    n = int(max(20.0, (rate or 10.0) * (seconds + 5)) * MB)
    out: dict[str, Any] = {"seconds": seconds, "bytes": n, "pids": pids}
    payload = b"ECHO " + b"x" * 58 + b"\n"
    for phase in ("upload", "download", "connections"):
        done: dict[str, Any] = {}
        stop = threading.Event()

        def work() -> None:
            try:
                if phase == "upload":
                    done["seconds"] = bulkUpload(port, n, _patternBlock())
                elif phase == "download":
                    done["seconds"], done["eof"] = bulkDownload(port, n)
                else:
                    count, started = 0, time.monotonic()
                    while not stop.is_set():
                        shortConnection(port, payload)
                        count += 1
                    done["conn_per_s"] = count / (time.monotonic() - started)
            except (BenchError, OSError) as e:
                done["error"] = str(e)

        thread = threading.Thread(target=work)
        thread.start()
        time.sleep(1.0)
        before = {name: cpuSeconds(pid) for name, pid in pids.items()}
        started = time.monotonic()
        files = {name: outdir / f"profile-{chain}-{phase}-{name}.txt" for name in pids}
        spies = {
            name: subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(PROFILE_RATE), "--format", "raw",
                 "--output", str(files[name])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for name, pid in pids.items()
        }
        for name, spy in spies.items():
            _, err = spy.communicate(timeout=seconds + 30)
            if spy.returncode:
                raise BenchError(f"py-spy on {name} failed: {err.decode(errors='replace')[-300:]}")
        elapsed = time.monotonic() - started
        cores = {name: round((cpuSeconds(pid) - before[name]) / elapsed, 2) for name, pid in pids.items()}
        stop.set()
        thread.join()
        if done.get("error") or done.get("eof"):
            problems.append(f"{chain} {phase} while profiled: {done.get('error') or done.get('eof')}")
        if phase == "connections":
            speed = f"{fmt(done.get('conn_per_s'))} conn/s"
        else:
            speed = f"{fmt(round(n / MB / done['seconds'], 1) if 'seconds' in done else None)} MB/s"
        out[phase] = {
            "rate": speed,
            "cores_used": cores,
            "processes": {name: summarizeStacks(files[name]) for name in pids},
        }
        print(f"  {chain} {phase}: {speed} while sampled, cores used {cores}", flush=True)
        for name in pids:
            summary = out[phase]["processes"][name]
            print(f"    {name} inclusive: " + "; ".join(f"{pct}% {f.split(' (')[0]}" for pct, f in summary["inclusive_pct"][:8]))
            print(f"    {name} self:      " + "; ".join(f"{pct}% {f.split(' (')[0]}" for pct, f in summary["self_pct"][:8]),
                  flush=True)
    return out


def buildTable(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    meta = results["meta"]
    size = meta["bulk_mb"]
    chains = tuple(meta["chains_measured"])
    ratios = tuple(r for r in RATIOS if r[2] in chains and r[3] in chains)

    def add(label: str, values: dict[str, float | None], digits: int = 1, higherIsBetter: bool = True) -> None:
        rows.append({
            "measure": label,
            **{c: values.get(c) for c in chains},
            **{key: ratio(values.get(a), values.get(b)) for key, _, a, b in ratios},
            "higher_is_better": higherIsBetter,
            "digits": digits,
        })

    for direction in ("upload", "download"):
        b = results["bulk"][direction]
        add(f"{direction} {size:g} MB, 1 conn (MB/s)", {c: b[c]["mb_per_s"] for c in chains})
    for key, label in (("sequential", "sequential"), ("concurrent", f"{meta['concurrency']} concurrent")):
        r = results["connection_rate"][key]
        add(f"short connections, {label} (conn/s)", {c: r[c]["conn_per_s"] for c in chains})
    for key, label in (("sequential", "sequential"), ("concurrent", f"{meta['concurrency']} concurrent")):
        r = results["connection_rate"][key]
        add(f"  latency p50, {label} (ms)", {c: r[c]["latency_ms_p50"] for c in chains}, 2, False)
        add(f"  latency p99, {label} (ms)", {c: r[c]["latency_ms_p99"] for c in chains}, 2, False)
    for direction in ("upload", "download"):
        b = results["bulk"][direction]
        add(f"proxy CPU per GB, {direction} (s)", {c: b[c]["proxy_cpu_s_per_gb"] for c in chains}, 2, False)
    for key, label in (("sequential", "sequential"), ("concurrent", f"{meta['concurrency']} concurrent")):
        r = results["connection_rate"][key]
        add(f"proxy CPU per conn, {label} (ms)", {c: r[c]["proxy_cpu_ms_per_conn"] for c in chains}, 2, False)
    add("proxy peak RSS, both processes (MB)", results["peak_rss_mb"], 1, False)

    table = formatTable(rows, [(c, LABELS[c]) for c in chains], [(key, label) for key, label, _, _ in ratios])
    return table, rows


def versions(setup: Setup) -> dict[str, Any]:
    info = tpVersions()
    out = subprocess.run([setup.stunnel, "-version"], capture_output=True, text=True)
    text = out.stdout + out.stderr
    for line in text.splitlines():
        if line.startswith("stunnel "):
            info["stunnel"] = line.strip()
        elif line.startswith("Running"):
            info["stunnel_openssl"] = " ".join(line.split()[2:])
    info["python"] = platform.python_version()
    return info


def chosenTransports(setup: Setup) -> dict[str, str | None]:
    """
    The transport each TP client process says it uses, from its
    "Forwarding ... (vN, quic)" or "Exposing ... (vN, tls)" line.
    """
    out: dict[str, str | None] = {}
    for name in ("tp-up", "tp-up-quic", "tp-expose"):
        if name in setup.procs.procs:
            text = setup.procs.logText(name) or ""
            m = re.search(r"^(?:Forwarding|Exposing) .* \(v\S+, (\w+)\)", text, re.M)
            out[name] = m.group(1) if m else None
    return out


def scanLogs(setup: Setup, problems: list[str]) -> dict[str, Any]:
    """
    Look through TP's logs for tracebacks, errors and failed connections
    (twist logs JSON, one event a line, when its output is not a terminal;
    `tp up` and `tp expose` write plain lines, and only one is expected from
    each: "Forwarding ..." or "Exposing ...").  `twist tp` should have
    accepted one QUIC connection per `tp` process on QUIC (each keeps one
    for all its streams).
    """
    found: dict[str, Any] = {}
    transports = chosenTransports(setup)
    found["client_transports"] = transports
    for name in ("twist-tp", "tp-up", "tp-up-quic"):
        if name not in setup.procs.procs:
            continue
        text = setup.procs.logText(name)
        if text is None:
            continue
        events = logEvents(text)
        info: dict[str, Any] = {"lines": len(text.splitlines()), "tracebacks": text.count("Traceback")}
        errors = [e for e in events if logLevel(e) in ("error", "critical") or e.get("isError")]
        warnings = [e for e in events if logLevel(e) == "warn"]
        info["error_events"] = len(errors)
        info["warn_events"] = len(warnings)
        if name == "twist-tp":
            # One audit event per TLS connection when it closes, by hello op
            # (connect, listen, accept; handshake failures count as connect),
            # and one "incoming" event per connection to a public port.
            audits: dict[str, dict[str, int]] = {}
            for e in events:
                if e.get("log_namespace") == "tpproxy.audit" and e.get("event") != "incoming":
                    byResult = audits.setdefault(e.get("event", "?"), {})
                    byResult[e.get("result", "?")] = byResult.get(e.get("result", "?"), 0) + 1
            info["audit_results"] = audits
            incoming = sum(1 for e in events if e.get("log_namespace") == "tpproxy.audit" and e.get("event") == "incoming")
            info["incoming_events"] = incoming
            # Over TLS the exposer answers each "incoming" event with a new
            # connection and an `accept` hello; over QUIC TP opens a stream
            # to it instead, and no `accept` is audited.  Either way each
            # public connection is audited as `public` when it ends.
            accepted = audits.get("accept", {})
            notOK = {k: v for k, v in accepted.items() if k != "ok"}
            wanted = incoming if transports.get("tp-expose") != "quic" else 0
            if notOK or accepted.get("ok", 0) != wanted:
                problems.append(
                    f"twist-tp log: {incoming} incoming event(s) on the public port, accept connections {accepted}"
                )
            public = audits.get("public")
            if public is not None and (set(public) - {"ok"} or public.get("ok", 0) != incoming):
                problems.append(f"twist-tp log: {incoming} incoming event(s) on the public port, public connections {public}")
            # QUIC: one "QUIC connection from ..." per connection accepted,
            # and a "quic" audit event for each failed QUIC handshake.
            quic = sum(
                1 for e in events
                if e.get("log_namespace") == "tpproxy.quic" and str(e.get("log_format", "")).startswith("QUIC connection from")
            )
            info["quic_connections"] = quic
            expected = sum(1 for t in transports.values() if t == "quic")
            if quic != expected:
                problems.append(f"twist-tp log: {quic} QUIC connection(s) accepted, expected {expected} (a reconnect?)")
            if audits.get("quic"):
                problems.append(f"twist-tp log: failed QUIC handshakes {audits['quic']}")
        else:
            # `tp up` writes plain lines: one "Forwarding ...", then one line
            # per tunnel that failed.
            plain = [line for line in text.splitlines() if line.strip() and not line.lstrip("\x1e").startswith("{")]
            unexpected = [line for line in plain if not line.startswith("Forwarding ")]
            info["unexpected_lines"] = len(unexpected)
            if unexpected:
                problems.append(f"{name} log: {len(unexpected)} unexpected line(s), e.g. {unexpected[:3]}")
                info["samples"] = unexpected[:10]
        bad = info["tracebacks"] + len(errors) + len(warnings)
        if bad:
            problems.append(
                f"{name} log: {info['tracebacks']} traceback(s), {len(errors)} error event(s), {len(warnings)} warning(s)"
            )
            info["error_samples"] = [_eventText(e) for e in (errors + warnings)[:5]]
            info["tail"] = setup.procs.logTail(name, 20)
        found[name] = info
    text = setup.procs.logText("tp-expose")
    if text is not None:
        lines = [line for line in text.splitlines() if line.strip()]
        unexpected = [line for line in lines if not re.match(r"^Exposing \S+ as public port \d+ via ", line)]
        info = {"lines": len(lines), "tracebacks": text.count("Traceback"), "unexpected_lines": len(unexpected)}
        if len(lines) - len(unexpected) != 1:
            problems.append(f"tp-expose log: {len(lines) - len(unexpected)} 'Exposing' lines, expected 1 (reconnected?)")
        if unexpected:
            problems.append(f"tp-expose log: {len(unexpected)} unexpected line(s), e.g. {unexpected[:3]}")
            info["samples"] = unexpected[:10]
        found["tp-expose"] = info
    # The sink's own complaints (a connection ended early, ...), for the
    # record; the port probes at start cause one or two.
    sinkLog = setup.procs.logText("sink")
    if sinkLog is not None:
        sinkLines = sinkLog.splitlines()
        found["sink"] = {"lines": len(sinkLines), "samples": sinkLines[:5]}
    return found


def _eventText(e: dict[str, Any]) -> str:
    text = str(e.get("log_format") or e.get("log_text") or e)
    try:
        fields = {k: v for k, v in e.items() if isinstance(v, (str, int, float)) and not k.startswith("log_")}
        text = text.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError):
        pass
    return text[:300]


def shutdownCheck(setup: Setup, problems: list[str], timeout: float = 3.0) -> dict[str, Any]:
    """
    At the end: SIGTERM the TP clients (`tp up`, `tp up` on QUIC, `tp
    expose`) while
    `twist tp` is still up; each should exit promptly ("Ctrl-C stops"), and
    the exposer's public port should stop taking connections.
    """
    procs = setup.procs.procs
    names = tuple(n for n in ("tp-up", "tp-up-quic", "tp-expose") if n in procs)
    exited: dict[str, float] = {}
    publicPort = None
    started = time.monotonic()
    for name in names:
        if procs[name].poll() is None:
            procs[name].terminate()
    while True:
        now = time.monotonic() - started
        for name in names:
            if name not in exited and procs[name].poll() is not None:
                exited[name] = round(now, 2)
        if publicPort is None and (now >= 1.0 or "tp-expose" in exited):
            # Is the exposure still served?  (A connection refused is right.)
            try:
                shortConnection(setup.entry["tp_reverse"], b"ECHO " + b"x" * 58 + b"\n")
                publicPort = f"still served (echo came back) {now:.1f} s after SIGTERM to tp expose"
            except ConnectionRefusedError:
                publicPort = "refused"
            except (OSError, BenchError) as e:
                publicPort = f"closed without an answer ({e})"
        if (len(exited) == len(names) and publicPort is not None) or now > timeout:
            break
        time.sleep(0.02)
    out: dict[str, Any] = {"public_port_after_sigterm": publicPort, "timeout_s": timeout}
    for name in names:
        out[name] = {"exited_after_s": exited.get(name), "status": procs[name].returncode}
        if name not in exited:
            problems.append(f"{name} still running {timeout:g} s after SIGTERM (while twist tp is up)")
    if publicPort and publicPort.startswith("still served"):
        problems.append(f"public port of tp expose {publicPort}")
    return out


def tlsCheck(setup: Setup) -> dict[str, Any]:
    """
    What each TLS server negotiates with a client certificate, seen by
    `openssl s_client`: protocol, cipher, and session tickets sent.
    """
    openssl = shutil.which("openssl")
    if not openssl:
        return {"skipped": "no openssl command"}
    pki = setup.pki
    out: dict[str, Any] = {}
    for name, port, extra in (
        ("tp", setup.ports["tp_server"], ["-alpn", "tp/1"]),
        ("stunnel", setup.ports["stunnel_server"], []),
    ):
        argv = [
            openssl, "s_client", "-connect", f"{LOOPBACK}:{port}", "-cert", str(pki / "client.pem"),
            "-key", str(pki / "client.key"), "-CAfile", str(pki / "ca.pem"), "-tls1_3", "-msg", *extra,
        ]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(0.5)  # let post-handshake messages (tickets) arrive
        try:
            text = proc.communicate(b"", timeout=15)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            text = proc.communicate()[0].decode(errors="replace")
        m = re.search(r"New, (\S+), Cipher is (\S+)", text)
        out[name] = {
            "protocol": m.group(1) if m else None,
            "cipher": m.group(2) if m else None,
            "new_session_tickets": len(re.findall(r"Handshake \[length [0-9a-f]+\], NewSessionTicket", text)),
            "verify": "ok" if "Verify return code: 0 (ok)" in text else "not ok",
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller run: 50 MB bulk, 100 connections")
    parser.add_argument("--size", type=float, help="MB (10^6 bytes) per bulk transfer (default 200; --quick 50)")
    parser.add_argument("--conns", type=int, help="short connections per rate test (default 300; --quick 100)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent connections in the second rate test")
    parser.add_argument("--repeat", type=int, help="runs of each bulk transfer, the median reported (default 5; --quick 3)")
    parser.add_argument("--check-size", type=float, default=8, help="MB per hashed integrity transfer (untimed)")
    parser.add_argument("--check-runs", type=int, default=5, help="runs of each integrity check")
    parser.add_argument("--json", default=str(RESULTS / "latest.json"), help="where to write the results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    parser.add_argument("--tp-transport", choices=("tls", "quic", "auto"), default="tls",
                        help="transport from the TP clients to twist tp, for TP versions with --transport (default tls, "
                             "like stunnel)")
    parser.add_argument("--profile", type=float, metavar="SECONDS",
                        help="after the measurements, sample the two TP processes of each --profile-chains chain with "
                             "py-spy for SECONDS during an upload, a download and sequential short connections; stacks "
                             "written next to --json")
    parser.add_argument("--profile-chains", default="tp,tp_quic",
                        help="chains --profile samples, comma-separated, from: " + ", ".join(PROFILED) + " (default both)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        runSink()
        return 0
    args.size = args.size or (50 if args.quick else 200)
    args.conns = args.conns or (100 if args.quick else 300)
    args.repeat = args.repeat or (3 if args.quick else 5)
    exitOnSignals()
    try:
        with workdir("tp-bench-", args.keep) as directory:
            return run(args, directory)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, directory: Path) -> int:
    """
    Set up every chain in C{directory}, measure, report; the exit status.
    """
    size, conns = args.size, args.conns
    n = int(size * MB)
    load = OtherLoad()
    problems: list[str] = []
    setup = Setup(directory)
    try:
        transport = setup.pinTransport(args.tp_transport)
        print(f"Starting sink, TP (forward and reverse) and stunnel in {directory} ...", flush=True)
        setup.start()
        print(f"  ports: {setup.ports}", flush=True)
        results: dict[str, Any] = {
            "meta": {
                "date": now(),
                "quick": args.quick,
                "bulk_mb": size,
                "repeat": args.repeat,
                "connections": conns,
                "concurrency": args.concurrency,
                "mb": "10^6 bytes",
                "machine": machine(),
                "versions": versions(setup),
                "tp_source": tpSource(),
                "stall_timeout_s": STALL_TIMEOUT,
                "tp_client_transport": transport or "tls (this tp has no --transport option)",
                "tp_client_transport_applies_to": ["tp", "tp_reverse"],
                "chains_measured": list(setup.chains),
                "chains": {
                    "direct": "client -> sink",
                    "tp": "client -> tp up -> (TLS 1.3, mutual) -> twist tp -> sink",
                    "tp_quic": "client -> tp --transport quic up -> (one QUIC connection, mutual TLS 1.3 handshake; "
                               "one stream per client connection) -> twist tp (UDP, same port number) -> sink; "
                               "twist tp shared with the tp chain",
                    "tp_reverse": "client -> twist tp public port -> (TLS 1.3, mutual: a new accept connection from "
                                  "the exposer per client connection, announced on its signalling connection) -> "
                                  "tp expose --public -> sink; twist tp shared with the tp chain",
                    "stunnel": "client -> stunnel client -> (TLS 1.3, mutual) -> stunnel server -> sink",
                },
            }
        }

        print(f"Integrity checks (untimed): {args.check_runs} x {args.check_size:g} MB each way, sha256 + byte count, EOF and half-close ...", flush=True)
        checks = {}
        for chain in setup.chains:
            checks[chain] = integrityChecks(setup.entry[chain], int(args.check_size * MB), args.check_runs, 5.0)
            summary = ", ".join(f"{k} {v['ok']}/{args.check_runs}" for k, v in checks[chain].items() if isinstance(v, dict))
            print(f"  {chain:10} {summary}", flush=True)
            for name, verdict in checks[chain].items():
                if isinstance(verdict, dict) and verdict["failed"]:
                    problems.append(f"{chain} integrity {name}: {verdict['failed']} of {args.check_runs} failed: {verdict['failures']}")
        results["integrity"] = checks
        udpBefore = udpCounters()
        results["tls"] = tlsCheck(setup)
        print(f"TLS as seen by openssl s_client: {results['tls']}", flush=True)

        results["bulk"] = {}
        for direction in ("upload", "download"):
            print(f"Bulk {direction}: {size:g} MB on one connection, {args.repeat} run(s) each ...", flush=True)
            results["bulk"][direction] = measureBulk(setup, direction, n, args.repeat, problems)

        results["connection_rate"] = {}
        for key, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
            print(f"Connection rate: {conns} short connections, concurrency {concurrency} ...", flush=True)
            results["connection_rate"][key] = measureRate(setup, conns, concurrency, problems)

        setup.procs.check()
        udpAfter = udpCounters()
        # Only the QUIC chain uses UDP here: these are its datagrams (and any
        # the rest of the machine sent meanwhile).
        results["udp_counters_during_measurements"] = {k: udpAfter[k] - udpBefore.get(k, 0) for k in udpAfter}
        if "tp_quic" in setup.chains:
            # Which end dropped datagrams (a full receive buffer: the QUIC
            # sender then resends, and halves its congestion window).
            results["quic_socket_drops"] = quicSockets(setup.ports["tp_server"])
        if args.profile:
            results["profile"] = {}
            for chain in args.profile_chains.split(","):
                if chain not in PROFILED:
                    raise BenchError(f"--profile-chains: no chain {chain!r} (one of {', '.join(PROFILED)})")
                if chain not in setup.chains:
                    continue
                print(f"Profiling {chain} with py-spy, {args.profile:g} s per phase ...", flush=True)
                rate = results["bulk"]["upload"][chain]["mb_per_s"]
                results["profile"][chain] = profileChain(setup, chain, args.profile, rate, Path(args.json).parent, problems)

        if "tp_quic" in setup.chains:
            up = results["bulk"]["upload"]["tp_quic"]["mb_per_s"]
            down = results["bulk"]["download"]["tp_quic"]["mb_per_s"]
            results["quic_target"] = {
                "target_mb_per_s": QUIC_TARGET_MB_S,
                "upload_mb_per_s": up,
                "download_mb_per_s": down,
                "upload_met": bool(up and up >= QUIC_TARGET_MB_S),
                "download_met": bool(down and down >= QUIC_TARGET_MB_S),
            }
        # Other work on the machine during the run skews everything here:
        # CPU time the machine used that was not this run's.
        results["meta"]["other_cpu"] = load.measure(setup.procs)
        results["peak_rss_mb"] = {c: setup.peakRSS(c) for c in setup.chains}
        results["peak_rss_mb_by_process"] = setup.peakRSSByProcess()
        time.sleep(0.5)  # let TP log the audit events of the last connections
        results["logs"] = scanLogs(setup, problems)
        results["shutdown"] = shutdownCheck(setup, problems)
        print(f"SIGTERM to the TP clients: {results['shutdown']}", flush=True)
        table, rows = buildTable(results)
        results["table"] = rows
        results["problems"] = problems
        results["meta"]["wall_seconds"] = round(time.monotonic() - load.started, 1)

        m = results["meta"]["machine"]
        v = results["meta"]["versions"]
        print()
        print(f"TP {v.get('tp')} (Twisted {v.get('twisted')}, {v.get('tp_openssl')}) vs {v.get('stunnel')} ({v.get('stunnel_openssl')})")
        print(f"{m['cpus']} CPU(s) {m['cpu_model']}, loopback; bulk {size:g} MB x {args.repeat} (median), "
              f"{conns} short connections per rate test")
        print(OtherLoad.describe(results["meta"]["other_cpu"]))
        print()
        print(table)
        print()
        hop = transport or "tls"
        print(f"fwd = TP forward (tp up -> twist tp, over {hop}), quic = TP forward over QUIC (tp --transport quic up -> "
              f"twist tp),\nrev = TP reverse (twist tp public port -> tp expose, over {hop}), stun = stunnel; "
              "quic/tls = TP quic / TP fwd.")
        print("Ratios: above 1 is the first ahead for rates, behind for latency, CPU and memory.")
        print("The peak RSS of TP quic and TP rev counts twist tp, which they share with TP fwd.")
        if "quic_target" in results:
            q = results["quic_target"]
            verdict = "met" if q["upload_met"] and q["download_met"] else "NOT met"
            print(f"QUIC target {QUIC_TARGET_MB_S:g} MB/s for one stream: upload {fmt(q['upload_mb_per_s'])} MB/s, "
                  f"download {fmt(q['download_mb_per_s'])} MB/s -> {verdict}")
        udp = results["udp_counters_during_measurements"]
        if udp:
            print(f"UDP during the measurements: {udp.get('InDatagrams')} datagrams in, {udp.get('OutDatagrams')} out, "
                  f"receive-buffer drops {udp.get('RcvbufErrors')}, send-buffer drops {udp.get('SndbufErrors')}")
        if results.get("quic_socket_drops"):
            print("Datagrams dropped per QUIC socket (whole run, receive buffer full): "
                  + ", ".join(f"{k} {v['drops']}" for k, v in results["quic_socket_drops"].items()))
        tpLog = results["logs"].get("twist-tp", {})
        print(f"TP audit results: {tpLog.get('audit_results')}, incoming events {tpLog.get('incoming_events')}, "
              f"QUIC connections {tpLog.get('quic_connections')}")
        print("  (connect: 1 handshake_failed = the port probe at start, 1 hello_timeout = the openssl probe)")
        clean = "No problems: every transfer complete and verified, no failed connections, no errors in TP's logs."
        return finish(results, problems, clean, args.json)
    finally:
        setup.stop()


if __name__ == "__main__":
    sys.exit(main())
