"""
The ceiling TP's QUIC transport works under: one stream of bulk data
between two plain aioquic endpoints (aioquic's own asyncio layer, no TP,
no relay), client and server in separate processes on loopback.

    .venv/bin/python benchmarks/aioquic_baseline.py [--size MB] [--repeat N]

TP over QUIC is compared with this in benchmarks/README.md: if TP is close
to it, the QUIC engine, not TP, bounds the throughput.  The server's
certificate comes from a CA made for the run (TP's CertificateAuthority);
the client does not verify it.  Each transfer gets a new server process
on a free UDP port; the rates are printed and written to
benchmarks/results/aioquic_baseline.json.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import subprocess
import sys
import time

from aioquic.asyncio import connect, serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived
from harness import REPO, RESULTS, Processes, freePorts, machine, now, serverCertificate, tpVersions, workdir, writeJSON

from tpproxy.pki import loadCertificates, loadKey

CHUNK = 65536


class Sink(QuicConnectionProtocol):
    def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **kw)
        self.received = 0
        self.started = 0.0

    def quic_event_received(self, event: object) -> None:
        if isinstance(event, StreamDataReceived):
            if not self.started:
                self.started = time.perf_counter()
            self.received += len(event.data)
            if event.end_stream:
                elapsed = time.perf_counter() - self.started
                print(f"{self.received} {elapsed}", flush=True)


async def server(port: int, cert: str, key: str, host: str = "127.0.0.1", datagramSize: int = 1200) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=["bench"], max_datagram_size=datagramSize)
    config.certificate, *config.certificate_chain = loadCertificates(cert)
    config.private_key = loadKey(key)
    srv = await serve(host, port, configuration=config, create_protocol=Sink)
    # asyncio's UDP transport reads 256 KiB per datagram otherwise.
    srv._transport.max_size = 65536  # type: ignore[attr-defined]
    print("ready", flush=True)
    await asyncio.sleep(3600)


async def client(port: int, size: int, host: str = "127.0.0.1", datagramSize: int = 1200) -> None:
    config = QuicConfiguration(is_client=True, alpn_protocols=["bench"], verify_mode=ssl.CERT_NONE, max_datagram_size=datagramSize)
    async with connect(host, port, configuration=config) as proto:
        proto._transport.max_size = 65536  # type: ignore[attr-defined]
        quic = proto._quic
        stream = quic.get_next_available_stream_id()
        chunk = b"\0" * CHUNK
        sent = 0
        while sent < size:
            quic.send_stream_data(stream, chunk, end_stream=sent + CHUNK >= size)
            sent += CHUNK
            proto.transmit()
            # Keep about 1 MiB queued, like a producer with back-pressure.
            while len(quic._streams[stream].sender._buffer) > 1 << 20:
                await asyncio.sleep(0.0005)
        while not quic._streams[stream].sender.is_finished:
            await asyncio.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100, help="MB per transfer (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers, median reported (default 3)")
    parser.add_argument("--json", default=str(RESULTS / "aioquic_baseline.json"), help="where to write the results")
    parser.add_argument("--max-datagram-size", type=int, default=1200,
                        help="aioquic's max_datagram_size on both ends (default 1200, aioquic's own default)")
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--connect", nargs=3, metavar=("HOST", "PORT", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(server(int(args.serve[0]), args.serve[1], args.serve[2], args.host, args.max_datagram_size))
        return 0
    if args.connect:
        # benchmarks/quic_path_bench.py: one upload from another namespace.
        asyncio.run(client(int(args.connect[1]), int(args.connect[2]), args.connect[0], args.max_datagram_size))
        return 0
    rates = []
    with workdir("tp-aioquic-baseline-") as directory:
        _, cert, key = serverCertificate(directory, "localhost", "bench CA")
        procs = Processes(directory)
        try:
            for i in range(args.repeat):
                (port,) = freePorts(1, socket.SOCK_DGRAM)
                name = f"server-{i + 1}"
                proc = procs.start(
                    name, [sys.executable, __file__, "--serve", str(port), cert, key, "--max-datagram-size", str(args.max_datagram_size)],
                    stdout=subprocess.PIPE, env={"PYTHONPATH": str(REPO)},
                )
                assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready", procs.logTail(name)
                asyncio.run(client(port, args.size * 1_000_000, datagramSize=args.max_datagram_size))
                received, elapsed = proc.stdout.readline().split()
                rates.append(int(received) / 1e6 / float(elapsed))
                procs.kill(name)
        finally:
            procs.stopAll()
    print(f"aioquic alone, one stream, {args.size} MB: " + ", ".join(f"{r:.1f}" for r in rates) + f" MB/s; median {statistics.median(rates):.1f} MB/s")
    writeJSON(args.json, {
        "meta": {"date": now(), "machine": machine(), "versions": tpVersions(), "mb": "10^6 bytes", "size_mb": args.size},
        "mb_per_s": [round(r, 1) for r in rates],
        "median_mb_per_s": round(statistics.median(rates), 1),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
