# -*- test-case-name: tpproxy.test.test_reload -*-
"""
What a running server holds, as the JSON document of the admin
listener's C{/status} (version 1, docs/operations.md), which C{tp status}
prints as tables.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

from tpproxy.cluster.store import Route
from tpproxy.protocols.server import TPServerFactory, TPServerProtocol

STATUS_VERSION = 1


def _tunnel(conn: TPServerProtocol, now: float) -> dict[str, Any]:
    hello = conn.hello
    assert hello is not None
    if conn.session is not None:
        up, down = conn.session.counts()
    else:
        up, down = conn.bytesIn, 0
    destination = f"{hello.host}:{hello.port}" if hello.op in ("connect", "udp") and not (conn.address or "").startswith("E2E ") else conn.address
    return {
        "identity": conn.identity.name if conn.identity else None,
        "op": conn.event,
        "destination": destination,
        "transport": hello.transport,
        "via": getattr(conn.transport, "carrier", "tls"),
        "peer": conn.peerAddress,
        "state": conn.phase,
        "bytes_up": up,
        "bytes_down": down,
        "age": round(now - conn.started, 3),
    }


def serverStatus(
    factory: TPServerFactory,
    reloader: Any,
    started: float,
    now: Callable[[], float],
    links: Any = None,
) -> dict[str, Any]:
    """
    The C{/status} document of the server whose TP factory is C{factory}
    (with C{links}, a L{tpproxy.cluster.peer.PeerLinks}: its cluster).
    """
    t = now()
    registry = factory.registry
    exposures = []
    for exposure in [*getattr(registry, "byPort", {}).values(), *getattr(registry, "byName", {}).values()]:
        # One row per signalling connection: a pool has several.
        for member in exposure.members:
            control = getattr(member.control, "conn", None)
            exposures.append(
                {
                    "kind": exposure.mode,
                    "port": exposure.port,
                    "name": exposure.name,
                    "identity": exposure.owner,
                    "members": len(exposure.members),
                    "via": getattr(getattr(control, "transport", None), "carrier", "tls"),
                    "age": round(t - control.started, 3) if control is not None else None,
                }
            )
    waiting = []
    for pending in getattr(registry, "sessions", {}).values():
        waiting.append(
            {
                "exposure": pending.exposure.name or pending.exposure.describe(),
                "identity": pending.dialerIdentity,
                "age": round(max(0.0, t - (pending.timer.getTime() - registry.acceptTimeout)), 3),
            }
        )
    certificates = []
    serverTLS = factory.serverTLS
    for name, notAfter in sorted((serverTLS.expiry if serverTLS is not None else {}).items()):
        when = datetime.datetime.fromtimestamp(notAfter, datetime.timezone.utc)
        certificates.append({"name": name, "not_after": when.strftime("%Y-%m-%dT%H:%M:%SZ"), "expires_in": round(notAfter - t, 1)})
    tunnels = [_tunnel(conn, t) for conn in factory.live if conn.hello is not None]
    tunnels.sort(key=lambda entry: -entry["age"])
    document = {
        "version": STATUS_VERSION,
        "server": {
            "started": started,
            "uptime": round(t - started, 3),
            "config": factory.config.path,
            "generation": reloader.generation,
            "loaded": reloader.loaded,
        },
        "tunnels": tunnels,
        "exposures": exposures,
        "dialers_waiting": waiting,
        "certificates": certificates,
    }
    if links is not None:
        document["cluster"] = clusterStatus(links)
    return document


def clusterStatus(links: Any) -> dict[str, Any]:
    """
    The C{cluster} part of C{/status}: this instance, whether the routing
    store answers, the live instances its watch saw, and the routes it
    forwards to other instances (with their holders).
    """
    registry = links.registry
    remote = []
    for kind, table in (("public", registry.remotePorts), ("e2e", registry.remoteNames)):
        for key, exposure in sorted(table.items()):
            route = Route.port(key) if kind == "public" else Route.name(key)
            remote.append(
                {
                    "kind": kind,
                    "port": exposure.port,
                    "name": exposure.name,
                    "identity": exposure.owner,
                    "instances": [h.instance for h in links.remoteHolders(route)],
                }
            )
    instances = links.watch.instances() if links.watch is not None else {}
    return {
        "instance": links.me,
        "store_up": not links.store.failedRenewals,
        "instances": [{"id": i.id, "advertise": i.advertise} for i in sorted(instances.values(), key=lambda i: i.id)],
        "remote": remote,
    }
