# -*- test-case-name: tpproxy.test.test_p2pnet -*-
"""
The P2P test topology of issue 16 in network namespaces (root; see
L{tpproxy.test.netns}): TP on a public segment, two private LANs each
behind a NAT router, and the child processes the tests run inside them.

    hostA 10.1.0.2 -- 10.1.0.1 natA 203.0.113.2 --+
                                                  |  bridge in "public":
                                   public 203.0.113.1 (TP), .9 (a second
                                                  |  destination)
    hostB 10.2.0.2 -- 10.2.0.1 natB 203.0.113.3 --+

The three public addresses share one L2 segment, a Linux bridge in the
public namespace: natA and natB reach each other directly, not through
TP's IP stack (the public namespace does not forward).  Each NAT
masquerades its LAN to its public address, and Linux's NAT mapping is
endpoint-independent (measured by L{P2PNet.probe} in the tests): the first
flow of a source keeps its port if that is free on the public address
(else it gets another), and later flows of the same source reuse that
mapping whatever their destination, as long as one of its conntrack
entries lives (C{find_appropriate_src} in C{nf_nat_core.c}).
C{randomPorts=True} (C{masquerade fully-random}) skips that and maps every
new flow to a random port: endpoint-dependent mapping, a "symmetric" NAT.

Each NAT drops new flows from its public side to itself, as a router's
WAN firewall does (C{wanFirewall=False} leaves that out).  Without it,
hole punching fails when one peer's check reaches the other's NAT before
that NAT's host has sent to the peer (measured): the NAT accepts the
check (nothing listens; an ICMP error goes back) and confirms a conntrack
entry for it, so when its host then sends to the peer the 5-tuple is
taken and the NAT maps that flow to another port; no check of either side
then matches the other NAT's entries.  A packet dropped in the input
chain never confirms its conntrack entry.

Each NAT counts UDP in its forward chain in named nftables counters:
C{toPeer}/C{fromPeer} (to and from the other NAT's public address),
C{toTP}/C{fromTP}, and C{dropped}; C{unsolicited} counts new flows from
the public side to the NAT itself (dropped unless C{wanFirewall=False}).
C{blockUdpBetweenPeers=True} drops UDP between the two NATs' public
addresses (TP stays reachable), so a direct path cannot work.

Run as a program, this module is what the tests start inside the
namespaces: C{agent} (an aioice ICE agent driven by JSON lines on
stdin/stdout, the test being the signalling channel), C{stun} (one
binding request, made with aioice's codec), C{probe} (which public
address and port a NAT maps a socket to) and C{reflector} (a UDP server
answering each datagram with its source address).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessExitedAlready
from twisted.trial.unittest import TestCase

from tpproxy.test.netns import Namespaces

TP = "203.0.113.1"
#: A second public destination (on the public namespace's bridge too).
OTHER = "203.0.113.9"
NAT_PUBLIC = {"A": "203.0.113.2", "B": "203.0.113.3"}
LAN = {"A": ("10.1.0.1", "10.1.0.2"), "B": ("10.2.0.1", "10.2.0.2")}
#: Short namespace names (interface names are made of the namespace
#: prefix and two of these, and may have at most 15 characters).
NAMES = {"public": "p", "natA": "na", "natB": "nb", "hostA": "ha", "hostB": "hb"}


def writeDeployment(d: Any, port: int, name: str) -> None:
    """
    In directory C{d}: a CA, TP's certificate for L{TP}, alice's and bob's
    client certificates and configs (C{alice.toml}, C{bob.toml}: TP at
    L{TP}:C{port}), and C{tp.toml}: TP on L{TP}:C{port} (TLS and QUIC), alice
    may dial the E2E name C{name}, which bob may expose with C{p2p = true}.
    """
    from pathlib import Path

    from tpproxy.testing import TestPKI

    d = Path(d).absolute()
    pki = TestPKI.create(d)
    pki.ca.issue("tp.test", dns=("tp.test",), ips=(TP,), server=True).write(d / "server.pem", d / "server.key")
    for who in ("alice", "bob"):
        pki.client(who)
        (d / f"{who}.toml").write_text(f'server = "{TP}:{port}"\ncert = "{d / (who + ".pem")}"\nkey = "{d / (who + ".key")}"\nca = "{d / "ca.pem"}"\n')
    (d / "tp.toml").write_text(f"""
[server]
listen = "tcp:{port}:interface={TP}"
certificate = "server.pem"
key = "server.key"
client_ca = "ca.pem"
state_dir = "state"

[[rules]]
identities = ["alice"]
hosts = ["{name}"]
ports = "*"

[[exposures]]
identities = ["bob"]
names = ["{name}"]
dialers = ["alice"]
p2p = true

[reverse]
public_interface = "{TP}"

[e2e]
ca_certificate = "ca.pem"
ca_key = "ca.key"
""")


class P2PNet:
    """
    The namespaces of issue 16's topology, made for one test and removed at
    its cleanup.  Use L{exec} with C{"public"}, C{"natA"}, C{"natB"},
    C{"hostA"} or C{"hostB"}.
    """

    def __init__(self, testCase: TestCase, blockUdpBetweenPeers: bool = False, randomPorts: bool = False, wanFirewall: bool = True) -> None:
        self.testCase = testCase
        self.net = net = Namespaces(testCase)
        for short in NAMES.values():
            net.add(short)
        p = NAMES["public"]
        net.sh(net.ip, "-n", net.ns(p), "link", "add", "br0", "type", "bridge")
        net.sh(net.ip, "-n", net.ns(p), "addr", "add", f"{TP}/24", "dev", "br0")
        net.sh(net.ip, "-n", net.ns(p), "addr", "add", f"{OTHER}/24", "dev", "br0")
        net.sh(net.ip, "-n", net.ns(p), "link", "set", "br0", "up")
        for side in ("A", "B"):
            nat, host = NAMES[f"nat{side}"], NAMES[f"host{side}"]
            peer = NAT_PUBLIC["B" if side == "A" else "A"]
            net.link(p, [], nat, [f"{NAT_PUBLIC[side]}/24"])
            net.sh(net.ip, "-n", net.ns(p), "link", "set", f"{net.prefix}{p}{nat}", "master", "br0")
            gateway, address = LAN[side]
            net.link(nat, [f"{gateway}/24"], host, [f"{address}/24"])
            net.route(nat, TP)
            net.route(host, gateway)
            net.forwarding(nat)
            block = f"""
    ip daddr {peer} meta l4proto udp counter name dropped drop
    ip saddr {peer} meta l4proto udp counter name dropped drop""" if blockUdpBetweenPeers else ""
            net.nftables(nat, f"""
table ip p2p {{
  counter toPeer {{}}
  counter fromPeer {{}}
  counter toTP {{}}
  counter fromTP {{}}
  counter dropped {{}}
  counter unsolicited {{}}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{net.prefix}{nat}{p}" ct state new counter name unsolicited{" drop" if wanFirewall else ""}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;{block}
    ip daddr {peer} meta l4proto udp counter name toPeer
    ip saddr {peer} meta l4proto udp counter name fromPeer
    ip daddr {TP} meta l4proto udp counter name toTP
    ip saddr {TP} meta l4proto udp counter name fromTP
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{net.prefix}{nat}{p}" masquerade{" fully-random" if randomPorts else ""}
  }}
}}
""")

    def exec(self, name: str) -> list[str]:
        """
        The prefix that runs a command in namespace C{name} (C{"hostA"}...).
        """
        return self.net.exec(NAMES[name])

    def counters(self, nat: str) -> dict[str, tuple[int, int]]:
        """
        The UDP counters of NAT C{nat} (C{"natA"} or C{"natB"}): name to
        (packets, bytes).
        """
        text = self.net.sh(*self.exec(nat), self.net.nft, "-j", "list", "counters", "table", "ip", "p2p")
        found = {}
        for item in json.loads(text)["nftables"]:
            if "counter" in item:
                counter = item["counter"]
                found[counter["name"]] = (counter["packets"], counter["bytes"])
        return found

    def python(self, name: str, *argv: str) -> list[str]:
        """
        The command that runs this module as a program in namespace
        C{name}, with C{argv}.
        """
        return self.exec(name) + [sys.executable, "-m", "tpproxy.test.p2pnet", *argv]

    def reflector(self, port: int) -> Child:
        """
        A UDP reflector in the public namespace on C{port} of L{TP} and
        L{OTHER}: it answers each datagram with C{HOST PORT} of its source.
        """
        return Child(self.testCase, self.python("public", "reflector", str(port), TP, OTHER))

    def probe(self, name: str, sends: list[dict[str, Any]], timeout: float = 10) -> list[dict[str, Any]]:
        """
        Send one datagram per entry of C{sends} from namespace C{name} to a
        reflector and return what each came from, as the reflector saw it.

        Each entry is C{{"socket": KEY, "bind": [ADDRESS, PORT], "to":
        [HOST, PORT]}}: sockets are made at their key's first use, bound to
        C{bind}, where C{PORT} may be the key of an earlier socket (bind to
        the same port number).  Each result is C{{"local": [ADDRESS, PORT],
        "to": ..., "mapped": [ADDRESS, PORT]}}.
        """
        out = self.net.sh(*self.python(name, "probe", json.dumps(sends), str(timeout)))
        return json.loads(out)  # type: ignore[no-any-return]

    def stun(self, name: str, server: tuple[str, int], timeout: float = 20) -> dict[str, Any]:
        """
        A STUN binding request (made by aioice) from namespace C{name} to
        C{server}, resent until answered: C{{"local": [ADDRESS, PORT],
        "mapped": [ADDRESS, PORT]}} (the XOR-MAPPED-ADDRESS).
        """
        out = self.net.sh(*self.python(name, "stun", f"{server[0]}:{server[1]}", str(timeout)))
        return json.loads(out)  # type: ignore[no-any-return]


class Child(protocol.ProcessProtocol):
    """
    A child process speaking JSON lines on stdin/stdout, killed at the
    test's cleanup.  Its stderr is kept for failure messages.
    """

    def __init__(self, testCase: TestCase, argv: list[str]) -> None:
        self.lines: defer.DeferredQueue[dict[str, Any]] = defer.DeferredQueue()
        #: Every line, in order (for failure messages).
        self.seen: list[dict[str, Any]] = []
        self.buffer = b""
        self.err = b""
        self.done: defer.Deferred[int | None] = defer.Deferred()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = reactor.spawnProcess(self, argv[0], argv, env=env)  # type: ignore[attr-defined]
        testCase.addCleanup(self.stop)

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                message = json.loads(line)
                self.seen.append(message)
                self.lines.put(message)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.done.callback(reason.value.exitCode)

    def send(self, message: dict[str, Any]) -> None:
        self.process.write(json.dumps(message).encode() + b"\n")

    def next(self, timeout: float = 30) -> defer.Deferred[dict[str, Any]]:
        """
        The next line, parsed; an error with the child's stderr if none
        comes within C{timeout} seconds.
        """
        d = self.lines.get()
        d.addTimeout(timeout, reactor)

        def timedOut(f: Any) -> Any:
            f.trap(defer.TimeoutError)
            ended = "it exited" if self.done.called else "it still runs"
            raise AssertionError(f"no line from {self.process.args[-4:]} in {timeout:g} s ({ended}); its stderr:\n{self.err[-3000:].decode(errors='replace')}")

        return d.addErrback(timedOut)

    def stop(self) -> defer.Deferred[int | None] | None:
        if self.done.called:
            return None
        try:
            self.process.signalProcess("KILL")
        except ProcessExitedAlready:
            return None
        return self.done


# The programs run inside the namespaces.


def _reflector(port: int, addresses: list[str]) -> None:
    import selectors
    import socket

    # One socket per address, so each answer comes from the address asked.
    selector = selectors.DefaultSelector()
    for address in addresses:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        selector.register(sock, selectors.EVENT_READ)
    print(json.dumps({"listening": port}), flush=True)
    while True:
        for key, events in selector.select():
            sock = key.fileobj  # type: ignore[assignment]
            data, (host, sourcePort) = sock.recvfrom(2048)
            sock.sendto(f"{host} {sourcePort}".encode(), (host, sourcePort))


def _probe(sends: list[dict[str, Any]], timeout: float) -> None:
    import socket
    import time

    sockets: dict[str, socket.socket] = {}
    results = []
    for send in sends:
        key = send["socket"]
        if key not in sockets:
            address, port = send["bind"]
            if isinstance(port, str):
                port = sockets[port].getsockname()[1]
            sock = sockets[key] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, port))
            sock.settimeout(0.2)
        sock = sockets[key]
        to = (send["to"][0], send["to"][1])
        deadline = time.monotonic() + timeout
        while True:
            # Resent until answered: the reflector may not listen yet.
            sock.sendto(b"probe", to)
            try:
                data, source = sock.recvfrom(2048)
            except socket.timeout:
                source = None
            if source == to:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"no answer from {to} in {timeout} s")
        host, port = data.decode().split()
        results.append({"local": list(sock.getsockname()), "to": list(to), "mapped": [host, int(port)]})
    print(json.dumps(results))


def _stun(server: tuple[str, int], timeout: float) -> None:
    import socket
    import time

    from aioice import stun

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.settimeout(0.2)
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    started = time.monotonic()
    while True:
        # Resent until answered: TP may not listen yet.
        sock.sendto(bytes(request), server)
        try:
            data, source = sock.recvfrom(2048)
        except socket.timeout:
            source = None
        if source == server:
            response = stun.parse_message(data)
            if response.transaction_id == request.transaction_id:
                break
        if time.monotonic() - started > timeout:
            raise SystemExit(f"no STUN answer from {server} in {timeout} s")
    host, port = response.attributes["XOR-MAPPED-ADDRESS"]
    print(json.dumps({"local": list(sock.getsockname()), "mapped": [host, port], "class": response.message_class.name}))


async def _agent(controlling: bool, stun: tuple[str, int], connectTimeout: float, count: int, retransmissions: int | None) -> None:
    """
    One ICE agent.  Prints C{{"ice": {"username", "password",
    "candidates": [SDP...]}, "gathered": SECONDS}}, reads the peer's
    C{{"ice": ...}}, connects (at most C{connectTimeout} seconds), prints
    C{{"connected": {"local": CANDIDATE, "remote": CANDIDATE}, "seconds"}}
    or C{{"failed": WHY, "seconds"}}; when connected, sends C{count}
    datagrams of 1 KiB and receives as many, and prints C{{"sent": SHA,
    "received": SHA}} (over the payloads in sequence order).
    """
    import asyncio
    import hashlib
    import time

    import aioice
    from aioice import stun as aioiceStun

    if os.environ.get("P2PNET_DEBUG"):
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    if retransmissions is not None:
        # Read by every STUN transaction aioice starts (connectivity checks
        # and the binding request to TP alike).
        aioiceStun.RETRY_MAX = retransmissions
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(message: dict[str, Any]) -> None:
        print(json.dumps(message), flush=True)

    def describe(candidate: aioice.Candidate) -> dict[str, Any]:
        return {"type": candidate.type, "host": candidate.host, "port": candidate.port}

    connection = aioice.Connection(ice_controlling=controlling, stun_server=stun, use_ipv6=False)
    started = time.monotonic()
    await connection.gather_candidates()
    say({
        "ice": {
            "username": connection.local_username,
            "password": connection.local_password,
            "candidates": [c.to_sdp() for c in connection.local_candidates],
        },
        "gathered": time.monotonic() - started,
    })
    remote = json.loads(await reader.readline())["ice"]
    connection.remote_username = remote["username"]
    connection.remote_password = remote["password"]
    for sdp in remote["candidates"]:
        await connection.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
    await connection.add_remote_candidate(None)
    started = time.monotonic()
    try:
        await asyncio.wait_for(connection.connect(), connectTimeout)
    except (ConnectionError, asyncio.TimeoutError) as e:
        say({"failed": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - started})
        await connection.close()
        return
    # aioice has no public accessor for the selected pair.
    pair = connection._nominated[1]
    say({
        "connected": {"local": describe(pair.local_candidate), "remote": describe(pair.remote_candidate)},
        "seconds": time.monotonic() - started,
    })
    payloads = [os.urandom(1024) for i in range(count)]
    for i, payload in enumerate(payloads):
        await connection.send(i.to_bytes(4, "big") + payload)
    received: dict[int, bytes] = {}
    while len(received) < count:
        data = await asyncio.wait_for(connection.recv(), 10)
        received[int.from_bytes(data[:4], "big")] = data[4:]
    say({
        "sent": hashlib.sha256(b"".join(payloads)).hexdigest(),
        "received": hashlib.sha256(b"".join(received[i] for i in sorted(received))).hexdigest(),
    })
    # Keep answering the peer's checks until it has its data too.
    await reader.readline()
    await connection.close()


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tpproxy.test.p2pnet")
    commands = parser.add_subparsers(dest="command", required=True)
    agent = commands.add_parser("agent")
    agent.add_argument("--controlling", action="store_true")
    agent.add_argument("--stun", required=True, help="HOST:PORT")
    agent.add_argument("--connect-timeout", type=float, default=20)
    agent.add_argument("--count", type=int, default=8)
    agent.add_argument("--retransmissions", type=int)
    probe = commands.add_parser("probe")
    probe.add_argument("sends")
    probe.add_argument("timeout", type=float)
    reflector = commands.add_parser("reflector")
    reflector.add_argument("port", type=int)
    reflector.add_argument("addresses", nargs="+")
    stun = commands.add_parser("stun")
    stun.add_argument("server", help="HOST:PORT")
    stun.add_argument("timeout", type=float)
    args = parser.parse_args(argv)
    if args.command == "agent":
        import asyncio

        host, port = args.stun.rsplit(":", 1)
        asyncio.run(_agent(args.controlling, (host, int(port)), args.connect_timeout, args.count, args.retransmissions))
    elif args.command == "probe":
        _probe(json.loads(args.sends), args.timeout)
    elif args.command == "stun":
        host, port = args.server.rsplit(":", 1)
        _stun((host, int(port)), args.timeout)
    else:
        _reflector(args.port, args.addresses)


if __name__ == "__main__":
    main(sys.argv[1:])
