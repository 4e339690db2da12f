"""
One side of a P2P session's direct path, as a child process for tests
(tpproxy.test.test_p2p_ice, and the namespace tests): ICE and the pinned
QUIC connection of L{tpproxy.p2p.ice}, with the test as TP (it relays the
offers and makes the introductions).

    python -m tpproxy.test.p2pagent dialer|exposer --pki DIR --me NAME \\
        --peer NAME --session ID [--size BYTES] [--timeout S] [--stun HOST:PORT]

C{--me} names the certificate and key this side presents (DIR/NAME.pem,
.key); C{--peer} the certificate TP introduced as the other side's.  The
CA is DIR/ca.pem.  JSON lines on stdout / stdin:

  - out C{{"offer": {...}}}, in C{{"offer": {...}}} (the peer's);
  - out C{{"connected": {"local", "remote", "pair", "seconds"}}} (the pair
    ICE selected, its types), or C{{"error": ...}};
  - out C{{"direct": {"seconds"}}} once the pinned QUIC connection is up,
    or C{{"refused": REASON}};
  - the dialer opens a stream and sends C{--size} random bytes, the
    exposer's service answers with as many of its own; each side reports
    C{{"transfer": {"sent", "received", "bytes"}}} (sha256s, bytes received);
  - out C{{"ended": {"reason", "serviceBytes", "streams"}}}: the end,
    and (exposer) how many bytes and streams reached its service.
"""

# Twisted's asyncio reactor, before anything imports the reactor: aioice
# runs on its event loop (tpproxy.p2p.ice).
from twisted.internet import asyncioreactor

asyncioreactor.install()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from twisted.internet import reactor, stdio  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from tpproxy.p2p.direct import Introduction  # noqa: E402
from tpproxy.p2p.ice import DirectDialer, DirectExposer, IceAgent  # noqa: E402
from tpproxy.pki import identityOf, loadCertificates, loadKey  # noqa: E402
from tpproxy.verify import ClientCertChecker, ClientVerifier  # noqa: E402

CHUNK = 64 * 1024


def say(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Transfer(Protocol):
    """
    Sends C{size} random bytes and FIN; hashes what comes back until the
    peer's FIN; reports when both directions have ended.
    """

    def __init__(self, size: int, counter: list[int] | None = None) -> None:
        self.payload = os.urandom(size)
        self.received = hashlib.sha256()
        self.count = 0
        self.counter = counter
        self.finished: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        for i in range(0, len(self.payload), CHUNK):
            self.transport.write(self.payload[i : i + CHUNK])
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received.update(data)
        self.count += len(data)
        if self.counter is not None:
            self.counter[0] += len(data)

    def readConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        say(transfer={"sent": hashlib.sha256(self.payload).hexdigest(), "received": self.received.hexdigest(), "bytes": self.count})
        self.finished.callback(None)


class Signalling(LineReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: list[Deferred[dict[str, Any]]] = []

    def next(self) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.lines.append(d)
        return d

    def lineReceived(self, line: bytes) -> None:
        if line.strip() and self.lines:
            self.lines.pop(0).callback(json.loads(line))

    def connectionLost(self, reason: Any = None) -> None:
        # The test went away: so do we.
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


async def main(options: argparse.Namespace, signalling: Signalling) -> int:
    d = options.pki
    chain, key = loadCertificates(f"{d}/{options.me}.pem"), loadKey(f"{d}/{options.me}.key")
    peerCert = loadCertificates(f"{d}/{options.peer}.pem")[0]
    introduction = Introduction(options.session, identityOf(peerCert).name, peerCert)
    base = ClientVerifier(loadCertificates(f"{d}/ca.pem"), ClientCertChecker(), reactor)  # type: ignore[arg-type]
    stun = None
    if options.stun:
        host, port = options.stun.rsplit(":", 1)
        stun = (host.strip("[]"), int(port))
    dialing = options.role == "dialer"
    agent = IceAgent(controlling=dialing, stunServer=stun, useIPv6=not options.ipv4)
    say(offer=await agent.gather())
    remote = (await signalling.next())["offer"]
    try:
        pair = await agent.connect(remote, options.timeout)
    except Exception as e:
        say(error=str(e))
        return 1
    say(connected={"local": pair.localType, "remote": pair.remoteType, "pair": pair.describe(), "seconds": round(pair.seconds, 3)})
    started = reactor.seconds()  # type: ignore[attr-defined]
    served = [0]
    streams: list[Transfer] = []
    end: Any
    if dialing:
        end = DirectDialer(agent, introduction, chain, key, base)
        ready = end.connect(options.timeout)
    else:

        def service() -> Transfer:
            t = Transfer(options.size, served)
            streams.append(t)
            return t

        end = DirectExposer(agent, introduction, chain, key, base, Factory.forProtocol(service))  # type: ignore[arg-type]
        ready = end.start(options.timeout)
    try:
        await ready
    except Exception as e:
        say(refused=str(e))
        reason = await end.done
        say(ended={"reason": reason, "serviceBytes": served[0], "streams": len(streams)})
        return 2
    say(direct={"seconds": round(reactor.seconds() - started, 3)})  # type: ignore[attr-defined]
    if dialing:
        transfer = Transfer(options.size)
        end.openStream(transfer)
        await transfer.finished
        end.close("done")
    reason = await end.done
    say(ended={"reason": reason, "serviceBytes": served[0], "streams": len(streams)})
    return 0


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["dialer", "exposer"])
    parser.add_argument("--pki", required=True)
    parser.add_argument("--me", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--size", type=int, default=1 << 20)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--stun")
    parser.add_argument("--ipv4", action="store_true", help="IPv4 candidates only")
    options = parser.parse_args()
    signalling = Signalling()
    stdio.StandardIO(signalling)
    status = [1]

    def finished(result: Any) -> None:
        if isinstance(result, int):
            status[0] = result
        else:
            say(error=f"{result.type.__name__}: {result.getErrorMessage()}")
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main(options, signalling)).addBoth(finished))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.exit(status[0])


if __name__ == "__main__":
    run()
