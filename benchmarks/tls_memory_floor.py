#!/usr/bin/env python3
"""
What one idle TLS 1.3 server connection costs in OpenSSL alone, with no
Twisted and no TP: N in-memory handshakes (pyOpenSSL, memory BIOs as
Twisted's TLS uses them, or a socket pair), one byte each way, then the
server connections are kept and glibc's in-use heap (mallinfo2) is read.

    .venv/bin/python benchmarks/tls_memory_floor.py            # 1000 connections per variant

Variants: with and without SSL_MODE_RELEASE_BUFFERS, with and without a
client certificate, memory BIOs or a socket BIO.  It tells how much of TP's
memory per tunnel (benchmarks/README.md, "Hardening") OpenSSL takes before
TP holds anything.  The certificates are TP's test PKI (tpproxy.testing.TestPKI),
made in a temporary directory; the figures are printed and written to
benchmarks/results/tls_memory_floor.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import socket
import sys
from pathlib import Path
from typing import Any

from harness import RESULTS, machine, now, tpVersions, workdir, writeJSON
from OpenSSL import SSL, crypto


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def inUse() -> int:
    return int(_libc.mallinfo2().uordblks)


def contexts(pki: Path, releaseBuffers: bool, clientCert: bool) -> tuple[SSL.Context, SSL.Context]:
    def load(name: str) -> bytes:
        return (pki / name).read_bytes()

    server = SSL.Context(SSL.TLS_METHOD)
    server.set_min_proto_version(SSL.TLS1_3_VERSION)
    server.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, load("server.pem")))
    server.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, load("server.key")))
    server.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, load("ca.pem")))
    server.set_options(SSL.OP_NO_TICKET)
    server.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if releaseBuffers:
        server.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if clientCert:
        server.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: True)
    client = SSL.Context(SSL.TLS_METHOD)
    client.set_min_proto_version(SSL.TLS1_3_VERSION)
    client.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, load("alice.pem")))
    client.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, load("alice.key")))
    client.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return server, client


def memoryPair(server: SSL.Context, client: SSL.Context) -> Any:
    s = SSL.Connection(server, None)
    s.set_accept_state()
    c = SSL.Connection(client, None)
    c.set_connect_state()
    for _ in range(10):
        for a, b in ((c, s), (s, c)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    c.send(b"x")
    s.bio_write(c.bio_read(65536))
    s.recv(10)
    s.send(b"y")
    c.bio_write(s.bio_read(65536))
    c.recv(10)
    return s


def socketPair(server: SSL.Context, client: SSL.Context) -> Any:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    s = SSL.Connection(server, a)
    s.set_accept_state()
    c = SSL.Connection(client, b)
    c.set_connect_state()
    for _ in range(20):
        for x in (c, s):
            try:
                x.do_handshake()
            except (SSL.WantReadError, SSL.WantWriteError):
                pass
    c.send(b"x")
    s.recv(10)
    s.send(b"y")
    c.recv(10)
    return (s, a)


def measure(make: Any, server: SSL.Context, client: SSL.Context, n: int) -> float:
    keep = [make(server, client) for _ in range(200)]  # warm up the heap
    keep.clear()
    gc.collect()
    before = inUse()
    keep = [make(server, client) for _ in range(n)]
    gc.collect()
    per = (inUse() - before) / n / 1024
    del keep
    return per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="connections per variant")
    parser.add_argument("--json", default=str(RESULTS / "tls_memory_floor.json"), help="where to write the results")
    args = parser.parse_args(argv)
    from tpproxy.testing import TestPKI

    variants = []
    with workdir("tp-tls-memory-") as directory:
        pki = TestPKI.create(directory)
        pki.client("alice")
        print(f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, {args.n} server connections per variant, KiB each (glibc in-use heap)")
        for releaseBuffers in (False, True):
            for clientCert in (False, True):
                server, client = contexts(pki.directory, releaseBuffers, clientCert)
                for name, make in (("memory BIOs", memoryPair), ("socket BIO", socketPair)):
                    per = measure(make, server, client, args.n)
                    print(f"  release_buffers={releaseBuffers!s:5} client_cert={clientCert!s:5} {name:11}: {per:5.1f} KiB")
                    variants.append({"release_buffers": releaseBuffers, "client_cert": clientCert, "bio": name, "kib_per_connection": round(per, 1)})
    writeJSON(args.json, {"meta": {"date": now(), "machine": machine(), "versions": tpVersions(), "connections": args.n}, "variants": variants})
    return 0


if __name__ == "__main__":
    sys.exit(main())
