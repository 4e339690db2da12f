# -*- test-case-name: tpproxy.test.test_cluster_store -*-
"""
The routing store on etcd v3, through etcd's JSON gateway (C{/v3/...}),
with treq: no client library beyond HTTP.

Keys (under a prefix, C{/tp/} by default; keys and values are base64 on
the gateway's wire):

  - C{PREFIX instances/ID}: an instance, value C{{"advertise": "HOST:PORT"}}
    (JSON), bound to the instance's lease;
  - C{PREFIX routes/name/NAME/ID} and C{PREFIX routes/port/PORT/ID}: instance
    C{ID} holds the route, value the identity it holds it for (UTF-8),
    bound to the instance's lease.

A claim is one transaction: put the holder key if no key exists under
C{PREFIX routes/KIND/KEY/} (C{create_revision == 0} over that range), else,
in a nested transaction, if every key there has the claiming identity as
its value (a pool), else read them (to say who holds the route).  etcd
runs a transaction atomically, so two different identities never both
hold a route, whichever instances they race from.

The watch is one long-lived C{POST /v3/watch} whose response is a stream
of JSON objects, one a line; a broken stream is opened again from the
revision after the last one seen (or, if etcd compacted it away, from a
new snapshot, turned into the events that lead there).
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

from treq.client import HTTPClient
from treq.content import content
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseNeverReceived
from zope.interface import implementer

from tpproxy.cluster.store import (
    NAME,
    PORT,
    Event,
    Holder,
    HolderAdded,
    HolderRemoved,
    Instance,
    InstanceDown,
    InstanceUp,
    IRoutingStore,
    IRoutingWatch,
    LeasedStore,
    LeaseGone,
    Route,
    RouteTaken,
    RoutingView,
    StoreError,
    StoreUnavailable,
    checkInstanceId,
)

log = Logger(namespace="tpproxy.cluster")

#: gRPC status codes that mean "try again later": UNAVAILABLE,
#: DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED.
_RETRYABLE = {14, 4, 10, 8}
#: The longest line a watch stream may send (a watch response carries at
#: most the events of one revision... or of a compacted catch-up).
MAX_WATCH_LINE = 64 * 1024 * 1024


class IEtcdReactor(IReactorTCP, IReactorTime):
    """
    What the etcd store needs of a reactor: TCP connections (HTTP to the
    gateway) and time (renewals, timeouts, reconnecting watches).
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _rangeEnd(prefix: bytes) -> bytes:
    """
    The end of the range of keys starting with C{prefix} (its last byte
    plus one; prefixes here end in C{/}, never in 0xff).
    """
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Keys:
    """
    The key layout under C{prefix} (see the module docstring).
    """

    def __init__(self, prefix: str = "/tp/") -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix or not prefix.isascii():
            raise ValueError(f"an etcd prefix starts and ends with '/': {prefix!r}")
        self.prefix = prefix.encode("ascii")
        self.instances = self.prefix + b"instances/"
        self.routes = self.prefix + b"routes/"

    def instance(self, instance: str) -> bytes:
        return self.instances + instance.encode("ascii")

    def route(self, route: Route) -> bytes:
        return self.routes + f"{route.kind}/{route.key}/".encode("ascii")

    def holder(self, route: Route, instance: str) -> bytes:
        return self.route(route) + instance.encode("ascii")

    def parse(self, key: bytes, value: bytes | None) -> Instance | Holder | tuple[str, Any] | None:
        """
        What C{key} holds: an L{Instance} or L{Holder} read with C{value},
        or, when C{value} is C{None} (a deleted key), C{("instance", id)}
        or C{("holder", (route, instance))}; C{None} for a key that is not
        TP's (logged).
        """
        try:
            if key.startswith(self.instances):
                iid = checkInstanceId(key[len(self.instances):].decode("ascii"))
                if value is None:
                    return ("instance", iid)
                advertise = json.loads(value)["advertise"]
                if not isinstance(advertise, str):
                    raise ValueError("advertise is not a string")
                return Instance(iid, advertise)
            if key.startswith(self.routes):
                kind, routeKey, iid = key[len(self.routes):].decode("ascii").split("/")
                route = Route.parse(kind, routeKey)
                checkInstanceId(iid)
                if value is None:
                    return ("holder", (route, iid))
                return Holder(route, iid, value.decode("utf-8"))
        except (ValueError, KeyError, TypeError) as e:
            log.warn("Ignoring key {key!r} of the routing store: {error}", key=key, error=str(e))
            return None
        return None


def _timedOut(result: Any, timeout: float) -> Failure:
    """
    A request cancelled by its timeout fails with C{TimeoutError} (treq
    would say C{ResponseNeverReceived}, which is retried).
    """
    return Failure(error.TimeoutError(f"no answer in {timeout:g} s"))


def _errorOf(url: str, status: int, body: Any) -> StoreError:
    """
    The exception for an error answer of the gateway (C{{"error": ...,
    "code": GRPC_CODE, "message": ...}}, or in a stream C{{"error":
    {"grpc_code": ..., "message": ...}}}).
    """
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message = err.get("grpc_code", err.get("code")), err.get("message", "")
    else:
        code, message = (body.get("code") if isinstance(body, dict) else None), (body.get("message") if isinstance(body, dict) else None) or str(err or body)[:200]
    text = f"{url}: HTTP {status}: {message}"
    if "lease not found" in str(message):
        return LeaseGone(text)
    if code in _RETRYABLE or status in (502, 503, 504):
        return StoreUnavailable(text)
    return StoreError(text)


@implementer(IRoutingStore)
class EtcdRoutingStore(LeasedStore):
    """
    One instance's routing store on etcd.

    @param reactor: for HTTP and time.
    @param endpoints: etcd client URLs (C{http://HOST:PORT}); a request
        that cannot connect to one tries the next.
    @param instance: this instance's id.
    @param advertise: the address its peers reach it at.
    @param ttl: the lease TTL in seconds (etcd's minimum is 1.5 times its
        election timeout: 2 s by default).
    @param prefix: the prefix of every key (several TP services may share
        one etcd under different prefixes).
    @param timeout: how long a request may take before it counts as
        L{StoreUnavailable}.
    @param httpClient: the treq client to use; by default one of this
        store, on its own connection pool, closed by L{stop}.
    """

    def __init__(
        self,
        reactor: IEtcdReactor,
        endpoints: list[str],
        instance: str,
        advertise: str,
        ttl: int = 10,
        prefix: str = "/tp/",
        timeout: float = 5.0,
        httpClient: HTTPClient | None = None,
    ) -> None:
        super().__init__(reactor, instance, advertise, ttl)
        if not endpoints or not all(e.startswith(("http://", "https://")) for e in endpoints):
            raise ValueError(f"etcd endpoints are http:// or https:// URLs: {endpoints!r}")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.keys = Keys(prefix)
        self.timeout = timeout
        self._reactor = reactor
        self._current = 0
        self._pool: HTTPConnectionPool | None = None
        if httpClient is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.retryAutomatically = False
            httpClient = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = httpClient

    # --- HTTP ---------------------------------------------------------------------

    @inlineCallbacks
    def _post(self, path: str, body: dict[str, Any], retried: bool = False) -> Any:
        """
        POST C{body} to C{/v3/PATH} of the first endpoint that accepts a
        connection, and answer its JSON.
        """
        data = json.dumps(body).encode()
        count = len(self.endpoints)
        refused: list[str] = []
        for attempt in range(count):
            url = self.endpoints[(self._current + attempt) % count]
            try:
                d = self._http.post(f"{url}/v3/{path}", data=data, headers={b"Content-Type": [b"application/json"]})
                d.addCallback(lambda response: content(response).addCallback(lambda raw: (response.code, raw)))
                d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=_timedOut)
                status, raw = yield d
            except error.ConnectError as e:
                refused.append(f"{url}: {e.__class__.__name__}")
                continue
            except (ResponseNeverReceived, RequestTransmissionFailed) as e:
                # A kept-alive connection the server had closed (etcd
                # restarted): say it again once on a new connection.  Every
                # request here may be repeated (see docs/cluster.md).
                if retried:
                    self._current = (self._current + attempt + 1) % count
                    raise StoreUnavailable(f"{url}: {e.__class__.__name__}: {e}") from e
                return (yield self._post(path, body, retried=True))
            except Exception as e:
                self._current = (self._current + attempt + 1) % count
                raise StoreUnavailable(f"{url}: {e.__class__.__name__}: {e}") from e
            self._current = (self._current + attempt) % count
            try:
                answer = json.loads(raw)
            except ValueError:
                if status != 200:
                    raise StoreUnavailable(f"{url}: HTTP {status}") from None
                raise StoreError(f"{url}: not JSON: {raw[:200]!r}") from None
            if status != 200 or (isinstance(answer, dict) and "error" in answer):
                raise _errorOf(url, status, answer)
            return answer
        raise StoreUnavailable("no etcd endpoint accepts connections (" + "; ".join(refused) + ")")

    # --- the primitives of LeasedStore ------------------------------------------------

    @inlineCallbacks
    def _grant(self, ttl: int) -> Any:
        answer = yield self._post("lease/grant", {"TTL": ttl})
        if answer.get("error"):
            raise StoreError(f"etcd refused a lease: {answer['error']}")
        return int(answer["ID"])

    @inlineCallbacks
    def _keepalive(self, lease: int) -> Any:
        answer = yield self._post("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    @inlineCallbacks
    def _revoke(self, lease: int) -> Any:
        try:
            yield self._post("lease/revoke", {"ID": str(lease)})
        except LeaseGone:
            pass

    def _put(self, key: bytes, value: bytes, lease: int) -> dict[str, Any]:
        return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}

    @inlineCallbacks
    def _register(self, lease: int) -> Any:
        value = json.dumps({"advertise": self.instance.advertise}).encode()
        yield self._post("kv/put", self._put(self.keys.instance(self.instance.id), value, lease)["request_put"])

    @inlineCallbacks
    def _claim(self, route: Route, identity: str, lease: int) -> Any:
        start = self.keys.route(route)
        span = {"key": _b64(start), "range_end": _b64(_rangeEnd(start))}
        put = self._put(self.keys.holder(route, self.instance.id), identity.encode("utf-8"), lease)
        answer = yield self._post("kv/txn", {
            "compare": [{"target": "CREATE", "result": "EQUAL", "create_revision": "0", **span}],
            "success": [put],
            "failure": [{"request_txn": {
                "compare": [{"target": "VALUE", "result": "EQUAL", "value": _b64(identity.encode("utf-8")), **span}],
                "success": [put],
                "failure": [{"request_range": span}],
            }}],
        })
        if answer.get("succeeded"):
            return
        try:
            inner = answer["responses"][0]["response_txn"]
            if inner.get("succeeded"):
                return
            kvs = inner["responses"][0]["response_range"].get("kvs", [])
        except (KeyError, IndexError, TypeError) as e:
            raise StoreError(f"unexpected answer to a claim: {answer!r:.300}") from e
        raise RouteTaken(route, frozenset(_unb64(kv.get("value", "")).decode("utf-8", "replace") for kv in kvs) - {identity})

    @inlineCallbacks
    def _delete(self, route: Route) -> Any:
        yield self._post("kv/deleterange", {"key": _b64(self.keys.holder(route, self.instance.id))})

    def _closeConnections(self) -> Deferred[None]:
        if self._pool is None:
            return defer.succeed(None)
        return self._pool.closeCachedConnections()

    # --- reads ------------------------------------------------------------------------

    @inlineCallbacks
    def _range(self, start: bytes, end: bytes) -> Any:
        answer = yield self._post("kv/range", {"key": _b64(start), "range_end": _b64(end)})
        revision = int(answer.get("header", {}).get("revision", 0))
        found = [self.keys.parse(_unb64(kv["key"]), _unb64(kv.get("value", ""))) for kv in answer.get("kvs", [])]
        return revision, found

    @inlineCallbacks
    def holders(self, route: Route) -> Any:
        start = self.keys.route(route)
        _, found = yield self._range(start, _rangeEnd(start))
        return frozenset(h for h in found if isinstance(h, Holder))

    @inlineCallbacks
    def instances(self) -> Any:
        _, found = yield self._range(self.keys.instances, _rangeEnd(self.keys.instances))
        return {i.id: i for i in found if isinstance(i, Instance)}

    @inlineCallbacks
    def snapshot(self) -> Any:
        """
        The whole routing state and the revision it was read at.
        """
        revision, found = yield self._range(self.keys.prefix, _rangeEnd(self.keys.prefix))
        instances = {i.id: i for i in found if isinstance(i, Instance)}
        holders = {h for h in found if isinstance(h, Holder)}
        return revision, instances, holders

    @inlineCallbacks
    def _watch(self, onEvent: Callable[[Event], None]) -> Any:
        w = EtcdWatch(self, onEvent)
        yield w._start()
        return w

    def _openWatchStream(self, revision: int) -> Deferred[Any]:
        """
        Open the watch stream of the whole prefix from C{revision}; fires
        with the response (whose body is the stream).
        """
        body = {"create_request": {
            "key": _b64(self.keys.prefix), "range_end": _b64(_rangeEnd(self.keys.prefix)),
            "start_revision": str(revision),
        }}
        url = self.endpoints[self._current]
        d = self._http.post(f"{url}/v3/watch", data=json.dumps(body).encode(), headers={b"Content-Type": [b"application/json"]})
        d.addTimeout(self.timeout, self._reactor)
        return d


class _Lines(Protocol):
    """
    The body of a watch response: JSON objects, one a line, each handed to
    C{onMessage}; C{onEnd} is called once with the reason when it ends (a
    message C{onMessage} raised on, or the connection's end).

    treq's C{collect} would parse the same chunks, but a watch must be
    stopped while no chunk comes, which needs the body's transport (an
    C{IPushProducer}, L{IResponse.deliverBody}): C{collect} keeps it.

    @ivar ended: fires when the connection is closed.
    """

    def __init__(self, onMessage: Callable[[Any], None], onEnd: Callable[[Failure], None]) -> None:
        self._buffer = b""
        self._onMessage = onMessage
        self._onEnd = onEnd
        self._reported = False
        self.ended: Deferred[None] = Deferred()

    def _report(self, reason: Failure) -> None:
        if not self._reported:
            self._reported = True
            self._onEnd(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._reported:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        try:
            if len(self._buffer) > MAX_WATCH_LINE:
                raise StoreError("a watch message is too long")
            for line in lines:
                if line.strip():
                    self._onMessage(json.loads(line))
        except Exception:
            self._report(Failure())
            self.transport.stopProducing()  # type: ignore[union-attr]

    def stop(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._report(reason)
        self.ended.callback(None)


@implementer(IRoutingWatch)
class EtcdWatch:
    """
    A watch of the whole routing state on etcd, reconnecting by itself
    (after 0.5 s, then doubling up to 5 s) from the revision after the last
    one it saw.
    """

    def __init__(self, store: EtcdRoutingStore, onEvent: Callable[[Event], None]) -> None:
        self._store = store
        self._onEvent = onEvent
        self._view = RoutingView()
        self._revision = 0
        self._stream: _Lines | None = None
        self._created: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        self._opening: Deferred[None] | None = None
        self._delay = 0.5
        self._failures = 0
        self._stopped = False

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            try:
                self._onEvent(event)
            except Exception:
                log.failure("A routing watch's observer failed on {event}", event=event)

    @inlineCallbacks
    def _resync(self) -> Any:
        revision, instances, holders = yield self._store.snapshot()
        self._revision = revision
        self._deliver(self._view.replace(instances, holders))

    @inlineCallbacks
    def _start(self) -> Any:
        yield self._resync()
        yield self._open()

    def _open(self) -> Deferred[None]:
        d = self._opening = self._openStream()

        def done(result: Any) -> Any:
            self._opening = None
            return result

        return d.addBoth(done)

    @inlineCallbacks
    def _openStream(self) -> Any:
        """
        Open the stream from the revision after L{_revision}; fire once etcd
        says the watch is created.
        """
        self._created = Deferred()
        try:
            response = yield self._store._openWatchStream(self._revision + 1)
        except Exception as e:
            raise StoreUnavailable(f"the watch stream did not open: {e.__class__.__name__}: {e}") from e
        if response.code != 200:
            raw = yield content(response)
            raise StoreUnavailable(f"the watch stream did not open: HTTP {response.code}: {raw[:200]!r}")
        stream = _Lines(self._message, self._ended)
        self._stream = stream
        response.deliverBody(stream)
        if self._stopped:
            stream.stop()
        created = self._created
        created.addTimeout(self._store.timeout, self._store._reactor)
        try:
            yield created
        except _Compacted:
            raise
        except Exception as e:
            if self._stream is stream:
                stream.stop()
            raise StoreUnavailable(f"the watch stream was not created: {e.__class__.__name__}: {e}") from e

    def _message(self, message: Any) -> None:
        if self._stopped:
            return
        if "error" in message:
            raise _errorOf(self._store.endpoints[self._store._current], 200, message)
        result = message.get("result", {})
        if int(result.get("compact_revision", 0) or 0) > 0:
            raise _Compacted(int(result["compact_revision"]))
        if result.get("created") and self._created is not None and not self._created.called:
            self._created.callback(None)
        if result.get("canceled"):
            raise StoreUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
        events: list[Event] = []
        for item in result.get("events", []):
            kv = item.get("kv", {})
            self._revision = max(self._revision, int(kv.get("mod_revision", 0)))
            key = _unb64(kv.get("key", ""))
            if item.get("type") == "DELETE":
                what = self._store.keys.parse(key, None)
                events += self._deleted(what)
            else:
                what = self._store.keys.parse(key, _unb64(kv.get("value", "")))
                events += self._put(what)
        changed = [e for e in events if self._view.apply(e)]
        self._deliver(changed)

    def _deleted(self, what: Any) -> list[Event]:
        if isinstance(what, tuple) and what[0] == "instance":
            old = self._view.instances().get(what[1])
            return [InstanceDown(old)] if old else []
        if isinstance(what, tuple) and what[0] == "holder":
            route, iid = what[1]
            return [HolderRemoved(h) for h in self._view.holders(route) if h.instance == iid]
        return []

    def _put(self, what: Any) -> list[Event]:
        if isinstance(what, Instance):
            old = self._view.instances().get(what.id)
            return ([InstanceDown(old)] if old and old != what else []) + [InstanceUp(what)]
        if isinstance(what, Holder):
            stale = [HolderRemoved(h) for h in self._view.holders(what.route) if h.instance == what.instance and h != what]
            return stale + [HolderAdded(what)]
        return []

    def _ended(self, reason: Failure) -> None:
        self._stream = None
        if self._created is not None and not self._created.called:
            self._created.errback(reason)
            return
        if self._stopped:
            return
        if reason.check(_Compacted):
            log.info(
                "The routing watch's next revision was compacted ({error}): reading a new snapshot",
                error=reason.getErrorMessage(),
            )
            self._revision = 0
            self._schedule()
            return
        self._failures += 1
        if self._failures == 1:
            log.warn(
                "The routing watch lost its stream ({error}); it keeps what it saw and reconnects",
                error=reason.getErrorMessage(),
            )
        self._schedule()

    def _schedule(self) -> None:
        self._retry = self._store._reactor.callLater(self._delay, self._reconnect)
        self._delay = min(self._delay * 2, 5.0)

    @inlineCallbacks
    def _reconnect(self) -> Any:
        self._retry = None
        if self._stopped:
            return
        try:
            if self._revision == 0:
                yield self._resync()
            yield self._open()
        except _Compacted:
            self._revision = 0
            if not self._stopped:
                self._schedule()
            return
        except StoreError:
            if not self._stopped:
                self._schedule()
            return
        if self._failures:
            log.info("The routing watch is back, after {failures} attempts", failures=self._failures)
        self._failures = 0
        self._delay = 0.5

    def reopen(self) -> None:
        """
        Open the stream again, from the revision after the last one seen:
        after an outage, a stream that did not see its connection end (a
        partition leaves TCP half-open) would wait forever.
        """
        if self._stream is not None and not self._stopped:
            self._stream.stop()

    def stop(self) -> Deferred[None]:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waits: list[Deferred[Any]] = []
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            waits.append(stream.ended)
        if self._opening is not None:
            waits.append(self._opening)
        return defer.DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def holders(self, route: Route) -> frozenset[Holder]:
        return self._view.holders(route)

    def routes(self, kind: str) -> frozenset[Route]:
        return self._view.routes(kind)

    def instances(self) -> dict[str, Instance]:
        return self._view.instances()


class _Compacted(Exception):
    """
    etcd compacted the revisions a watch asked for: read a new snapshot.
    """

    def __init__(self, revision: int) -> None:
        super().__init__(f"compacted at revision {revision}")
        self.revision = revision


__all__ = ["EtcdRoutingStore", "EtcdWatch", "IEtcdReactor", "Keys", "NAME", "PORT"]
