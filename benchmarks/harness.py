"""
What every benchmark in this directory sets up, samples and reports the
same way, so that each script holds only what it measures.

  - where things are: this checkout (C{REPO}), the venv running the script
    and its C{tp} and C{twist} (C{BIN}, beside C{sys.executable});
  - ports picked at run time (C{freePorts}, C{freeTCPAndUDPPort});
  - processes started with a log each and stopped by pid at the end
    (L{Processes}), waiting for a port or a log line (C{waitForPort},
    C{waitForLog}), and helper servers that print the port they took
    (C{startServer} in the parent, C{serveThreaded} in the child);
  - certificates: C{tp init-dev}'s dev PKI and configs with the listen line
    replaced (C{initDev}), or one server certificate from a CA made for the
    run (C{serverCertificate});
  - C{/proc} sampling: CPU seconds and memory of a process (C{cpuSeconds},
    C{statusKB}), and the work the rest of the machine did meanwhile
    (L{OtherLoad});
  - many short operations, some at a time, timed (C{concurrently});
  - the report: a table with ratio columns (C{formatTable}), the problems
    found, and the JSON file (C{finish}), with the machine, versions and
    TP source measured (C{machine}, C{tpVersions}, C{tpSource}).

Every script runs from a fresh clone after the README's install command
(C{python3 -m venv .venv && .venv/bin/pip install .}), as
C{.venv/bin/python benchmarks/SCRIPT.py}; this module imports nothing from
TP at import time, so helper child processes stay light.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

#: This directory, and the checkout it is in.
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: The venv running the script: its `tp` and `twist` are the TP measured.
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
#: MB, as every figure here counts it.
MB = 1_000_000
#: Where results go unless --json says otherwise (git ignores it).
RESULTS = HERE / "results"


class BenchError(Exception):
    """
    The set-up failed, or a measurement could not be made.
    """


def requireTP() -> None:
    """
    Stop unless TP is installed in the venv running the script.
    """
    for tool in ("tp", "twist"):
        if not (BIN / tool).exists():
            raise BenchError(
                f"{BIN / tool} does not exist (install TP into the venv that runs this script: "
                "python3 -m venv .venv && .venv/bin/pip install ., then .venv/bin/python benchmarks/...)"
            )


def requireTool(*names: str) -> str:
    """
    The path of the first of C{names} on PATH (e.g. stunnel4, stunnel).
    """
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise BenchError(f"{' or '.join(names)} is not installed")


# --- ports -----------------------------------------------------------------


def freePorts(count: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """
    C{count} distinct ports free on 127.0.0.1 now (TCP, or UDP with
    C{kind=socket.SOCK_DGRAM}).
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def udpPortFree(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def freeTCPAndUDPPort() -> int:
    """
    A port free for both TCP and UDP: `twist tp` serves TLS and QUIC on the
    same number.
    """
    for _ in range(100):
        (port,) = freePorts(1)
        if udpPortFree(port):
            return port
    raise BenchError("found no port free for both TCP and UDP")


# --- processes ---------------------------------------------------------------


class Processes:
    """
    The processes a benchmark starts, each with its output in
    C{logdir/NAME.log}, and stopped by pid at the end (L{stopAll}).
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The TP client may remember per server which transport worked (in
        # $XDG_CACHE_HOME/tp): keep that in the temporary directory.
        self.env = dict(os.environ, XDG_CACHE_HOME=str(logdir / "cache"))

    def start(
        self,
        name: str,
        argv: Sequence[str | Path],
        stdout: Any = None,
        stderr: Any = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """
        Start C{argv} in a session of its own; stdout and stderr go to its
        log unless given (e.g. C{subprocess.PIPE}).  C{env} adds to the
        environment (e.g. C{PYTHONPATH} for another TP tree).
        """
        log = open(self.logPath(name), "wb")
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else log,
            stderr=stderr if stderr is not None else log,
            cwd=cwd,
            env=dict(self.env, **(env or {})),
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def logPath(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def logText(self, name: str) -> str | None:
        try:
            return self.logPath(name).read_text(errors="replace")
        except OSError:
            return None

    def logTail(self, name: str, lines: int = 20) -> str:
        return "\n".join((self.logText(name) or "").splitlines()[-lines:])

    def check(self) -> None:
        """
        Raise L{BenchError} if any process has exited.
        """
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{self.logTail(name)}")

    def stopOne(self, name: str, timeout: float, sig: int = signal.SIGTERM) -> float | None:
        """
        Send C{sig} to one process; the seconds it took to exit, or None if
        it was still running after C{timeout} (it is left running).
        """
        proc = self.procs[name]
        if proc.poll() is not None:
            return 0.0
        start = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return round(time.monotonic() - start, 2)

    def kill(self, name: str, timeout: float = 15) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout)

    def stopAll(self) -> None:
        """
        SIGTERM every process still running; SIGKILL those not gone 5 s later.
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def waitForPort(
    port: int,
    procs: Processes | None = None,
    what: str = "the server",
    timeout: float = 20.0,
    interval: float = 0.05,
    connectTimeout: float = 1.0,
) -> float:
    """
    Connect to 127.0.0.1:C{port} until it answers (each failed try
    C{interval} s apart; a process of C{procs} that exits fails it at once).
    Returns C{time.monotonic()} when it answered.
    """
    deadline = time.monotonic() + timeout
    while True:
        if procs is not None:
            procs.check()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=connectTimeout):
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout:g} s") from None
            time.sleep(interval)


def waitForLog(procs: Processes, name: str, pattern: re.Pattern[str], what: str | None = None, timeout: float = 20.0) -> re.Match[str]:
    """
    Wait for C{pattern} in a process's log; the match.
    """
    deadline = time.monotonic() + timeout
    while True:
        procs.check()
        m = pattern.search(procs.logText(name) or "")
        if m:
            return m
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not {what or f'log {pattern.pattern!r}'} within {timeout:g} s:\n{procs.logTail(name)}")
        time.sleep(0.05)


def startServer(procs: Processes, name: str, argv: Sequence[str | Path]) -> int:
    """
    Start a helper server (a child running L{serveThreaded}) and return the
    port it says it took.
    """
    proc = procs.start(name, argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("PORT "):
        raise BenchError(f"{name} did not start: {line!r}\n{procs.logTail(name)}")
    return int(line.split()[1])


def startEtcd(procs: Processes, directory: Path, timeout: float = 20) -> tuple[str, int]:
    """
    A one-member etcd on free loopback ports with its data in C{directory}
    and fast elections (as C{tpproxy.cluster.testing} runs it for the
    tests); returns its client URL and port once C{/health} says true.
    """
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(etcd).exists():
        raise BenchError("etcd is not installed (Debian: apt-get install etcd-server)")
    clientPort, peerPort = freePorts(2)
    url, peer = f"http://127.0.0.1:{clientPort}", f"http://127.0.0.1:{peerPort}"
    procs.start("etcd", [
        etcd, "--name", "tp-bench", "--data-dir", directory,
        "--listen-client-urls", url, "--advertise-client-urls", url,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"tp-bench={peer}",
        "--heartbeat-interval", "10", "--election-timeout", "100",
        "--logger", "zap", "--log-level", "warn",
    ])
    from tpproxy.cluster.testing import etcdAnswers

    deadline = time.monotonic() + timeout
    while True:
        procs.check()
        if etcdAnswers(clientPort):
            return url, clientPort
        if time.monotonic() > deadline:
            raise BenchError(f"etcd did not answer within {timeout:g} s:\n{procs.logTail('etcd')}")
        time.sleep(0.05)


def serveThreaded(handle: Callable[[socket.socket], None]) -> None:
    """
    In a helper server process: listen on 127.0.0.1 (a port of the
    kernel's choosing, printed as C{PORT N}), call C{handle(connection)} in
    a thread of its own for each connection, until SIGTERM.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LOOPBACK, 0))
    server.listen(1024)
    sys.stdout.write(f"PORT {server.getsockname()[1]}\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def exitOnSignals() -> None:
    """
    SIGTERM and SIGHUP end the script through C{SystemExit}, so its
    clean-up (stopping what it started) runs.
    """

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)


@contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """
    A fresh temporary directory, removed at the end unless C{keep}.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"Kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


# --- certificates and configs ---------------------------------------------------


def initDev(
    directory: Path,
    port: int,
    listen: str,
    append: str = "",
    unexpected: str | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """
    `tp init-dev DIRECTORY --port PORT`: the dev CA, server and client
    certificates (P-256 ECDSA) and configs.  Its server.toml gets C{listen}
    in place of its C{listen = [...]} line (127.0.0.1 and ::1) and
    C{append} at the end.

    @param unexpected: a regular expression that must not match the
        generated server.toml (a setting the caller is about to add).
    @param env: the environment of `tp init-dev` (e.g. C{PYTHONPATH} for
        another TP tree).
    @return: C{directory}.
    """
    out = subprocess.run(
        [str(BIN / "tp"), "init-dev", str(directory), "--port", str(port)], capture_output=True, text=True, env=env
    )
    if out.returncode:
        raise BenchError(f"tp init-dev failed: {out.stderr}")
    config = directory / "server.toml"
    toml = config.read_text()
    toml, n = re.subn(r"(?m)^listen = \[.*\]$", lambda m: listen, toml)
    if n != 1 or (unexpected is not None and re.search(unexpected, toml.replace(listen, ""))):
        raise BenchError(f"unexpected server.toml from tp init-dev (no one listen line, or {unexpected!r} already)")
    config.write_text(toml + append)
    return directory


def serverCertificate(directory: Path, name: str, caName: str) -> tuple[Path, Path, Path]:
    """
    A CA made for the run (not TP's) and a server certificate for C{name}
    from it: the paths of the CA certificate, the certificate and its key.
    """
    from tpproxy.pki import CertificateAuthority

    ca = CertificateAuthority.create(caName)
    caPath, cert, key = directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / f"{name}.key"
    caPath.write_bytes(ca.certPEM)
    ca.issue(name, dns=(name,), server=True).write(cert, key)
    return caPath, cert, key


# --- /proc ---------------------------------------------------------------------


def cpuSeconds(pid: int) -> float:
    """
    User + system CPU time of a process (all its threads), from /proc.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def statusKB(pid: int, key: str) -> int | None:
    """
    A kB figure of /proc/PID/status: C{VmHWM} (peak resident memory) or
    C{VmRSS}; None if the process or the line is gone.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peakRSSMB(pid: int) -> float | None:
    """
    Peak resident memory (VmHWM) of a process, in MB.
    """
    kb = statusKB(pid, "VmHWM")
    return None if kb is None else round(kb * 1024 / MB, 1)


def machineBusySeconds() -> float:
    """
    CPU seconds (user, nice, system, irq, softirq) the whole machine has
    used since boot.
    """
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")


def ownSeconds(procs: Processes) -> float:
    """
    CPU seconds used by this script (all threads), its finished children and
    its running processes.
    """
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + sum(cpuSeconds(p.pid) for p in procs.procs.values() if p.poll() is None)


class OtherLoad:
    """
    The CPU time the machine used during a run that was not the run's own:
    other work on a 2-core machine skews every figure.
    """

    #: Above this many cores busy on average, a run is marked NOISY.
    NOISY = 0.1

    def __init__(self) -> None:
        self.busyAtStart = machineBusySeconds()
        self.loadAtStart = os.getloadavg()
        self.started = time.monotonic()

    def measure(self, procs: Processes) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        raw = machineBusySeconds() - self.busyAtStart - ownSeconds(procs)
        foreign = max(0.0, raw)
        return {
            "cpu_seconds": round(foreign, 1),
            "cpu_seconds_unclipped": round(raw, 2),
            "cores_busy_on_average": round(foreign / elapsed, 2),
            "loadavg_start": [round(x, 2) for x in self.loadAtStart],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        }

    @classmethod
    def describe(cls, other: dict[str, Any]) -> str:
        return (
            f"Other work on the machine during the run: {other['cpu_seconds']} CPU-seconds "
            f"({other['cores_busy_on_average']} cores busy on average; load average {other['loadavg_end'][0]})"
            + ("  -- NOISY, compare with care" if other["cores_busy_on_average"] > cls.NOISY else "")
        )


# --- load ---------------------------------------------------------------------------


@dataclass
class Timings:
    """
    What L{concurrently} saw: the seconds each operation took (sorted), the
    errors, and the wall time of the whole.
    """

    latencies: list[float]
    errors: list[str]
    seconds: float

    def percentileMs(self, p: float) -> float:
        lat = self.latencies
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else 0.0


def concurrently(one: Callable[[], float], total: int, concurrency: int, inline: bool = True) -> Timings:
    """
    Run C{one()} (it returns its own latency in seconds) C{total} times,
    C{concurrency} at a time, each in a thread; with C{inline} and a
    concurrency of 1, in the calling thread.  An C{OSError} or
    L{BenchError} counts as an error and the run goes on.
    """
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                t = one()
            except (OSError, BenchError) as e:
                with lock:
                    errors.append(str(e) or repr(e))
                continue
            with lock:
                latencies.append(t)

    start = time.perf_counter()
    if inline and concurrency == 1:
        worker()
    else:
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return Timings(latencies, errors, elapsed)


# --- the report ---------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def formatTable(
    rows: list[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    ratios: Sequence[tuple[str, str]],
    ratioWidth: int = 9,
    gap: str = " ",
) -> str:
    """
    The text table of C{rows} (dicts with C{measure}, a value per column
    key, a ratio per ratio key, and C{digits} for the values, which this
    removes from each row once used).

    @param columns: (key, heading) of the value columns, 8 wide.
    @param ratios: (key, heading) of the ratio columns, C{ratioWidth} wide,
        after C{gap}.
    """
    width = max(len(r["measure"]) for r in rows)
    header = f"{'measure':<{width}}" + "".join(f"  {label:>8}" for _, label in columns) + gap
    header += "".join(f"  {label:>{ratioWidth}}" for _, label in ratios)
    lines = [header, "-" * len(header)]
    for r in rows:
        d = r.pop("digits")
        line = f"{r['measure']:<{width}}" + "".join(f"  {fmt(r[key], d):>8}" for key, _ in columns) + gap
        line += "".join(f"  {fmt(r[key], 3):>{ratioWidth}}" for key, _ in ratios)
        lines.append(line)
    return "\n".join(lines)


def writeJSON(path: Path | str, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def finish(results: dict[str, Any], problems: list[str], clean: str, path: Path | str) -> int:
    """
    Print the problems found (or C{clean} if none), write the JSON; the
    exit status: 0 clean, 1 problems found.
    """
    if problems:
        print("\nPROBLEMS:")
        for p in problems:
            print(f"  - {p}")
    else:
        print(clean)
    written = writeJSON(path, results)
    print(f"\nWrote {written} ({results['meta']['wall_seconds']} s)")
    return 1 if problems else 0


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "hostname": platform.node(),
    }


def tpVersions() -> dict[str, Any]:
    """
    TP's version and those of the TLS stack under it.
    """
    info: dict[str, Any] = {}
    try:
        import OpenSSL
        from OpenSSL import SSL

        import tpproxy
        import twisted

        info["tp"] = tpproxy.__version__
        info["twisted"] = twisted.__version__
        info["pyopenssl"] = OpenSSL.__version__
        info["tp_openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except ImportError as e:
        info["import_error"] = str(e)
    return info


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def tpSource() -> dict[str, Any]:
    """
    The TP source measured (read-only git queries): the tree the venv
    imports `tpproxy` from, its commit and uncommitted changes.  After a
    plain `pip install .` that is a copy in site-packages, not a checkout:
    then the commit is this checkout's, with the files of the copy that
    differ from it (a tree changed since the install is not what runs).
    """
    import tpproxy

    package = Path(tpproxy.__file__).resolve().parent
    root = package.parent
    info: dict[str, Any] = {"path": str(root)}
    head = _git(root, "rev-parse", "--show-toplevel")
    if head is not None and head.returncode == 0 and Path(head.stdout.strip()).resolve() == root:
        commit = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "tpproxy")
        if commit is not None and commit.returncode == 0 and dirty is not None:
            info["commit"] = commit.stdout.strip()
            info["uncommitted_changes_in_tpproxy"] = [line[3:] for line in dirty.stdout.splitlines()]
        return info
    info["installed_copy_of"] = str(REPO)
    commit = _git(REPO, "rev-parse", "--short", "HEAD")
    if commit is not None and commit.returncode == 0:
        info["commit"] = commit.stdout.strip()
    checkout = REPO / "tpproxy"
    names = {p.relative_to(package) for p in package.rglob("*.py")} | {p.relative_to(checkout) for p in checkout.rglob("*.py")}
    info["differs_from_checkout"] = sorted(
        str(n) for n in names
        if not (package / n).is_file() or not (checkout / n).is_file() or (package / n).read_bytes() != (checkout / n).read_bytes()
    )
    return info


def logEvents(text: str) -> list[dict[str, Any]]:
    """
    The events of a `twist` log (JSON, one event a line, each opened by
    \\x1e, when its output is not a terminal).
    """
    events = []
    # Not splitlines(): it also splits at the \x1e that opens each event.
    for line in text.split("\n"):
        line = line.strip("\x1e \n")
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def logLevel(event: dict[str, Any]) -> str | None:
    return (event.get("log_level") or {}).get("name")

