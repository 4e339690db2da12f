# -*- test-case-name: tpproxy.test.test_config -*-
"""
Server and client configuration: TOML files read into frozen dataclasses,
validated at load so that a bad file stops TP with a message naming the key.
Relative paths in a file are relative to the directory of that file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from tpproxy.names import ACME_IDENTIFIER, isAcmeName, isCertificateName, normalize
from tpproxy.pki import normalizeSerial
from tpproxy.policy import ConfigError, Policy, parsePolicy

__all__ = ["ConfigError", "ServerConfig", "ClientConfig", "loadServerConfig", "loadClientConfig"]

DEFAULT_PORT = 443


def _readTOML(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def _resolvePath(base: Path, value: Any, key: str, mustExist: bool = True) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path")
    path = (base / os.path.expanduser(value)).resolve()
    if mustExist and not path.is_file():
        raise ConfigError(f"{key}: file {path} does not exist")
    return str(path)


def _pathList(base: Path, value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a file path or a list of file paths")
    return tuple(_resolvePath(base, v, key) for v in value)


def _seconds(table: dict[str, Any], name: str, default: float, key: str) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ConfigError(f"{key}.{name}: expected a number of seconds between 0 and 3600, got {value!r}")
    return float(value)


def _checkKeys(table: dict[str, Any], allowed: set[str], key: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}unknown key(s) {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class ServerConfig:
    """
    Everything a TP server needs, validated.
    """

    path: str
    listen: tuple[str, ...]
    certificate: str | None
    key: str | None
    clientCAs: tuple[str, ...]
    crl: str | None
    handshakeTimeout: float
    helloTimeout: float
    connectTimeout: float
    deniedIdentities: frozenset[str]
    deniedSerials: frozenset[str]
    policy: Policy = field(default_factory=Policy)
    publicInterface: str = "0.0.0.0"
    acceptTimeout: float = 10.0
    keepalive: float = 15.0
    e2eCA: tuple[str, str] | None = None
    e2eFiles: dict[str, tuple[str, str]] = field(default_factory=dict)
    quic: tuple[tuple[str, int], ...] = ()
    acme: AcmeConfig | None = None
    router: RouterConfig | None = None
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig())
    #: TP's own state (the QUIC stateless-reset secret, ...): C{server.state_dir}.
    stateDir: str | None = None
    admin: AdminConfig | None = None
    #: End a connection when its client certificate expires
    #: (C{server.disconnect_expired_cert}, like Teleport's).
    disconnectExpiredCert: bool = True
    #: How long live tunnels may go on after SIGTERM (C{server.drain_timeout}).
    drainTimeout: float = 10.0
    #: C{[cluster]}: several instances as one service (docs/cluster.md).
    cluster: ClusterConfig = field(default_factory=lambda: ClusterConfig())
    #: C{server.workers}: processes on this machine (docs/workers.md).
    workers: int = 1
    #: Which worker this process is (C{twist tp --worker I}), else C{None}.
    worker: int | None = None
    #: C{[webtransport]}: browsers as TP clients (docs/webtransport.md).
    webtransport: WebTransportConfig | None = None
    #: C{server.quic_max_datagram_size}: the largest datagram the path MTU
    #: search of a tp/1 QUIC connection may reach; 1200 turns it off
    #: (docs/quic.md).
    quicMaxDatagramSize: int = 16384


@dataclass(frozen=True)
class ClusterConfig:
    """
    C{[cluster]}: the routing store this instance shares with the other
    instances of its service.  Without C{etcd} it is the in-memory store:
    one instance, no peers (the default).
    """

    #: etcd client URLs; empty: the in-memory store.
    etcd: tuple[str, ...] = ()
    #: This instance's id, unique in the service.
    instance: str = "local"
    #: C{HOST:PORT} where peers reach this instance's C{peer_listen}.
    advertise: str = ""
    leaseTTL: int = 10
    prefix: str = "/tp/"
    timeout: float = 5.0
    #: The server endpoint of the peer listener (mutual TLS).
    peerListen: str | None = None

    @property
    def shared(self) -> bool:
        return bool(self.etcd)


_CLUSTER_KEYS = {"etcd", "instance", "advertise", "lease_ttl", "prefix", "timeout", "peer_listen"}
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PREFIX = re.compile(r"/(?:[A-Za-z0-9._-]+/)*")


def hostPort(value: Any, key: str) -> tuple[str, int]:
    """
    C{HOST:PORT} (an IPv6 address as C{[ADDRESS]:PORT}), port 1-65535.
    """
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        if sep and host and port.isdigit() and 0 < int(port) < 65536 and (bracketed or ":" not in host) and not any(c.isspace() or c in "/[]" for c in host):
            return host, int(port)
    raise ConfigError(f"{key}: expected HOST:PORT (an IPv6 address as [ADDRESS]:PORT), got {value!r}")


def parseCluster(table: Any) -> ClusterConfig:
    if table is None:
        return ClusterConfig()
    if not isinstance(table, dict):
        raise ConfigError("cluster: expected a table")
    _checkKeys(table, _CLUSTER_KEYS, "cluster")
    etcd = table.get("etcd", [])
    if isinstance(etcd, str):
        etcd = [etcd]
    if not isinstance(etcd, list) or not all(isinstance(e, str) and re.fullmatch(r"https?://[^/\s]+/?", e) for e in etcd) or ("etcd" in table and not etcd):
        raise ConfigError(f"cluster.etcd: expected a list of etcd client URLs such as \"http://10.0.0.5:2379\", got {etcd!r}")
    instance = table.get("instance", "local")
    if not isinstance(instance, str) or not _INSTANCE_ID.fullmatch(instance):
        raise ConfigError(f"cluster.instance: expected an id of letters, digits, '.', '_' and '-' (at most 63), got {instance!r}")
    if etcd and "instance" not in table:
        raise ConfigError("cluster.instance: missing (each instance of a cluster needs its own id)")
    advertise = table.get("advertise")
    if advertise is not None:
        hostPort(advertise, "cluster.advertise")
    elif etcd:
        raise ConfigError("cluster.advertise: missing (the HOST:PORT where the other instances reach this one's peer_listen)")
    ttl = table.get("lease_ttl", 10)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 2 <= ttl <= 3600:
        raise ConfigError(f"cluster.lease_ttl: expected a whole number of seconds, at least 2, got {ttl!r}")
    prefix = table.get("prefix", "/tp/")
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"cluster.prefix: expected a key prefix that starts and ends with '/' such as \"/tp/\", got {prefix!r}")
    peerListen = table.get("peer_listen")
    if peerListen is not None:
        peerListen = serverEndpoint(peerListen, "cluster.peer_listen")
    elif etcd:
        raise ConfigError("cluster.peer_listen: missing (an endpoint description such as \"tcp:7443\", where peers connect)")
    return ClusterConfig(
        etcd=tuple(etcd),
        instance=instance,
        advertise=advertise or "",
        leaseTTL=ttl,
        prefix=prefix,
        timeout=_seconds(table, "timeout", 5, "cluster"),
        peerListen=peerListen,
    )


@dataclass(frozen=True)
class AdminConfig:
    """
    C{[admin]}: the admin listener (metrics), off unless C{listen} is set
    (docs/operations.md).
    """

    listen: str
    #: If not L{None}: the listener speaks mutual TLS like the proxy and
    #: serves only these identities.
    identities: frozenset[str] | None = None


def parseAdmin(table: Any) -> AdminConfig | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("admin: expected a table")
    _checkKeys(table, {"listen", "identities"}, "admin")
    if "listen" not in table:
        raise ConfigError("admin.listen: missing (an endpoint description such as \"tcp:9090:interface=127.0.0.1\")")
    listen = serverEndpoint(table["listen"], "admin.listen")
    identities = table.get("identities")
    if identities is not None:
        if not isinstance(identities, list) or not identities or not all(isinstance(i, str) and i for i in identities):
            raise ConfigError("admin.identities: expected a non-empty list of identity names")
        identities = frozenset(identities)
    return AdminConfig(listen, identities)


@dataclass(frozen=True)
class LimitsConfig:
    """
    C{[limits]}: what TP lets unauthenticated peers hold (docs/hardening.md).

    A connection is I{half-open} from its first byte (TLS) or its first
    Initial packet (QUIC) until its handshake has completed with an
    accepted client certificate.
    """

    #: Half-open TLS connections at once, over all listeners; more are
    #: closed at accept, before any TLS.
    handshakes: int = 2048
    #: Half-open TLS connections at once from one source prefix (/32 IPv4, /64 IPv6).
    handshakesPerSource: int = 256
    #: Half-open QUIC connections at once, per QUIC listener.
    quicHandshakes: int = 2048
    #: Half-open QUIC connections at once from one source prefix.
    quicHandshakesPerSource: int = 256
    #: Half-open QUIC connections above which a new client must first prove
    #: its address with a stateless Retry (0: always).
    quicRetryAbove: int = 64
    #: The listen(2) backlog of TCP listeners TP makes from C{tcp:} descriptions.
    backlog: int = 4096
    # What authenticated identities may hold (docs/operations.md):
    #: Live tunnels over all identities.
    tunnels: int = 50000
    #: Live tunnels of one identity (every operation, signalling included).
    tunnelsPerIdentity: int = 512
    #: New tunnels of one identity per minute (a burst of as many at once).
    tunnelsPerIdentityPerMinute: int = 1200
    #: Live exposures (public ports and E2E names) of one identity.
    exposuresPerIdentity: int = 32
    #: Live UDP flows of one identity.
    udpFlowsPerIdentity: int = 256
    #: Seconds without a byte either way after which a tunnel is closed
    #: (0: never).  Signalling connections have their own keepalive.
    idleTimeout: int = 0


_LIMIT_KEYS = {
    "handshakes": "handshakes",
    "handshakes_per_source": "handshakesPerSource",
    "quic_handshakes": "quicHandshakes",
    "quic_handshakes_per_source": "quicHandshakesPerSource",
    "quic_retry_above": "quicRetryAbove",
    "backlog": "backlog",
    "tunnels": "tunnels",
    "tunnels_per_identity": "tunnelsPerIdentity",
    "tunnels_per_identity_per_minute": "tunnelsPerIdentityPerMinute",
    "exposures_per_identity": "exposuresPerIdentity",
    "udp_flows_per_identity": "udpFlowsPerIdentity",
    "idle_timeout": "idleTimeout",
}


def parseLimits(table: Any) -> LimitsConfig:
    if table is None:
        return LimitsConfig()
    if not isinstance(table, dict):
        raise ConfigError("limits: expected a table")
    _checkKeys(table, set(_LIMIT_KEYS), "limits")
    values: dict[str, int] = {}
    for key, attr in _LIMIT_KEYS.items():
        if key not in table:
            continue
        value = table[key]
        low = 0 if key in ("quic_retry_above", "idle_timeout") else 1
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 1_000_000:
            raise ConfigError(f"limits.{key}: expected a whole number from {low} to 1000000, got {value!r}")
        values[attr] = value
    return LimitsConfig(**values)


@dataclass(frozen=True)
class RouterConfig:
    """
    The C{[router]} table: TP shares its TLS port with a web site.
    Connections for TP (ALPN C{tp/1}, or an SNI TP serves) get TP; others
    go to C{backend} untouched, or, for C{terminateNames}, have their TLS
    ended by TP and their plaintext sent to C{terminateBackend}.
    """

    backend: str | None = None
    proxyProtocol: bool = False
    helloTimeout: float = 10.0
    terminateNames: tuple[str, ...] = ()
    terminateCertificate: str | None = None
    terminateKey: str | None = None
    terminateBackend: str | None = None
    terminateProxyProtocol: bool = False
    h3: Any = None


@dataclass(frozen=True)
class H3Backend:
    """
    C{[router.h3] backend}: the HTTP/3 server that gets every QUIC
    connection on TP's port that is not TP's (docs/quic.md).
    """

    host: str
    port: int


@dataclass(frozen=True)
class WebTransportConfig:
    """
    C{[webtransport]}: browsers as TP clients over WebTransport, with
    tokens minted on TP's TLS port (docs/webtransport.md).

    @ivar path: the WebTransport URL path (C{/tp}); TP's HTTPS pages and
        token endpoint live under it too.
    @ivar origins: the page origins allowed to mint and use tokens
        (C{https://app.example.org}); empty: the origins on TP's own
        certificate names (C{https://NAME} and C{https://NAME:PORT}).
    @ivar tokenLifetime: seconds a token lives (at most 60).
    """

    path: str = "/tp"
    origins: tuple[str, ...] = ()
    tokenLifetime: float = 30.0
    #: Serve browsers' HTTP/3 a short-lived certificate of TP's own, whose
    #: hash pages get with their token (C{certificate_hashes}).
    certificateHashes: bool = True


_ORIGIN = re.compile(r"https://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def parseWebTransport(table: Any) -> WebTransportConfig | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("webtransport: expected a table")
    _checkKeys(table, {"path", "origins", "token_lifetime", "certificate_hashes"}, "webtransport")
    path = table.get("path", "/tp")
    if not isinstance(path, str) or not re.fullmatch(r"/[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", path):
        raise ConfigError(f"webtransport.path: expected an absolute path such as \"/tp\" (letters, digits, . _ ~ -), got {path!r}")
    origins = table.get("origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError("webtransport.origins: expected a list of origins such as \"https://app.example.org\"")
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"webtransport.origins: {origin!r} is not an https origin (https://HOST or https://HOST:PORT, no path)")
    lifetime = table.get("token_lifetime", 30)
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or not 0 < lifetime <= 60:
        raise ConfigError(f"webtransport.token_lifetime: expected seconds, more than 0 and at most 60, got {lifetime!r}")
    return WebTransportConfig(path, tuple(o.lower() for o in origins), float(lifetime), _bool(table, "certificate_hashes", True, "webtransport"))


def _udpBackend(value: Any) -> H3Backend:
    import ipaddress

    example = 'such as "udp:127.0.0.1:8443" or "udp:[::1]:8443"'
    if not isinstance(value, str) or not value.startswith("udp:"):
        raise ConfigError(f"router.h3.backend: expected udp:ADDRESS:PORT {example}")
    host, _, port = value[4:].rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"router.h3.backend: {value!r}: the address must be an IP address (or localhost), {example}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"router.h3.backend: {value!r}: expected a port 1-65535, {example}")
    return H3Backend(host, int(port))


def parseH3(table: Any, base: Path) -> Any:
    """
    C{[router.h3]}: the built-in HTTP/3 answer for browsers on TP's QUIC
    port, or the HTTP/3 server that gets them (L{H3Backend}) (see quic.md,
    "Sharing UDP/443"); C{None} if absent.
    """
    from tpproxy.transports.h3 import H3Response

    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("router.h3: expected a table")
    _checkKeys(table, {"redirect", "page", "status", "content_type", "headers", "backend"}, "router.h3")
    if "backend" in table:
        others = sorted(set(table) - {"backend"})
        if others:
            raise ConfigError(f"router.h3: backend passes HTTP/3 to a server; {', '.join(others)} (TP's own answer) cannot go with it")
        return _udpBackend(table["backend"])
    if ("redirect" in table) == ("page" in table):
        raise ConfigError("router.h3: give exactly one of backend (an HTTP/3 server), redirect (a URL) or page (a file)")
    if "redirect" in table and "content_type" in table:
        raise ConfigError("router.h3.content_type: only for page")
    headers = table.get("headers", {})
    if not isinstance(headers, dict):
        raise ConfigError("router.h3.headers: expected a table of strings")
    try:
        if "redirect" in table:
            response = H3Response.redirect(table["redirect"], status=table.get("status", 308))
        else:
            path = _resolvePath(base, table["page"], "router.h3.page")
            response = H3Response.page(
                Path(path).read_bytes(), contentType=table.get("content_type", "text/html; charset=utf-8"), status=table.get("status", 200)
            )
        if headers:
            response = H3Response(response.status, response.headers + tuple(headers.items()), response.body)
    except (ValueError, OSError, TypeError) as e:
        raise ConfigError(f"router.h3: {e}") from None
    return response


def _endpoint(value: Any, key: str) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected a client endpoint description such as \"tcp:127.0.0.1:8443\"")
    return value


#: Server endpoint types TP listens on.  C{ssl:} is refused: TP's TLS is
#: its own (mutual TLS, half-close, ALPN), set up by C{[server]}.
_LISTEN_TYPES = ("tcp", "tcp6", "unix", "systemd")


def serverEndpoint(value: Any, key: str) -> str:
    """
    Check a server endpoint description (C{"tcp:443"},
    C{"tcp:9090:interface=127.0.0.1"}) by parsing it as Twisted will, so
    that a typo is a one-line configuration error at start, not a
    traceback.
    """
    example = "such as \"tcp:443\" or \"tcp:9090:interface=127.0.0.1\""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected an endpoint description {example}")
    kind = value.split(":", 1)[0].lower()
    if kind in ("ssl", "tls", "le", "lets"):
        raise ConfigError(
            f"{key}: {value!r}: TP does its own TLS (certificate, key and client_ca in [server]); "
            f"listen on plain TCP {example}"
        )
    if kind not in _LISTEN_TYPES:
        raise ConfigError(f"{key}: {value!r}: unknown endpoint type {kind!r} (use {', '.join(_LISTEN_TYPES)})")
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(object(), value)  # parses only; the reactor is not used
    except IndexError:
        if kind == "systemd":
            raise ConfigError(f"{key}: {value!r}: no such socket from systemd (run TP from a .socket unit)") from None
        raise ConfigError(f"{key}: {value!r} is not a valid endpoint description") from None
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{key}: {value!r} is not a valid endpoint description ({e})") from None
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ConfigError(f"{key}: {value!r}: port {port} is out of range (0-65535)")
    return value


def _bool(table: dict[str, Any], name: str, default: bool, key: str) -> bool:
    value = table.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}.{name}: expected true or false")
    return value


def parseRouter(router: Any, base: Path) -> RouterConfig | None:
    """
    Validate C{[router]}; C{None} if absent.
    """
    if router is None:
        return None
    if not isinstance(router, dict):
        raise ConfigError("router: expected a table")
    _checkKeys(router, {"backend", "proxy_protocol", "hello_timeout", "terminate", "h3"}, "router")
    backend = _endpoint(router["backend"], "router.backend") if "backend" in router else None
    terminate = router.get("terminate", {})
    if not isinstance(terminate, dict):
        raise ConfigError("router.terminate: expected a table")
    _checkKeys(terminate, {"names", "certificate", "key", "backend", "proxy_protocol"}, "router.terminate")
    names: tuple[str, ...] = ()
    certificate = key = terminateBackend = None
    if terminate:
        raw = terminate.get("names")
        if not isinstance(raw, list) or not raw or not all(isinstance(n, str) for n in raw):
            raise ConfigError("router.terminate.names: expected a list of DNS names")
        for name in raw:
            if name.startswith("*.") and isCertificateName(name[2:]):
                raise ConfigError(f"router.terminate.names: {name!r}: the router matches names exactly; list each name")
            if not isCertificateName(name):
                raise ConfigError(f"router.terminate.names: {name!r} is not a DNS name of letters, digits and hyphens")
        names = tuple(normalize(n) for n in raw)
        certificate = _resolvePath(base, terminate.get("certificate"), "router.terminate.certificate")
        key = _resolvePath(base, terminate.get("key"), "router.terminate.key")
        terminateBackend = _endpoint(terminate.get("backend"), "router.terminate.backend")
    if backend is None and not names:
        raise ConfigError("router: give a backend (passthrough) and/or a [router.terminate] table; without either there is nothing to share the port with")
    return RouterConfig(
        backend=backend,
        proxyProtocol=_bool(router, "proxy_protocol", False, "router"),
        helloTimeout=_seconds(router, "hello_timeout", 10, "router"),
        terminateNames=names,
        terminateCertificate=certificate,
        terminateKey=key,
        terminateBackend=terminateBackend,
        terminateProxyProtocol=_bool(terminate, "proxy_protocol", False, "router.terminate"),
        h3=parseH3(router.get("h3"), base),
    )


@dataclass(frozen=True)
class AcmeConfig:
    """
    The C{[acme]} table: where TP gets certificates from an ACME CA.
    """

    directory: str
    store: str
    accountKey: str
    contact: tuple[str, ...] = ()
    caBundle: str | None = None
    names: tuple[str, ...] = ()
    challenges: tuple[str, ...] = ("tls-alpn-01",)
    http01Listen: str | None = None
    onDemand: bool = True
    renewFraction: float = 2 / 3
    checkInterval: float = 86400.0


_ACME_KEYS = {
    "directory", "email", "account_key", "store", "ca_bundle", "names", "challenges", "http01_listen", "e2e",
    "renew_at", "check_interval",
}
#: An ACME identifier (L{tpproxy.names.ACME_IDENTIFIER}), under the name
#: L{tpproxy.acme} imports it by.
DNS_NAME = ACME_IDENTIFIER


def _interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 60 <= value <= 7 * 86400:
        raise ConfigError(f"acme.check_interval: expected a number of seconds between 60 and 604800, got {value!r}")
    return float(value)


def parseAcme(acme: Any, base: Path) -> AcmeConfig | None:
    """
    Validate C{[acme]}; C{None} if absent.
    """
    if acme is None:
        return None
    if not isinstance(acme, dict):
        raise ConfigError("acme: expected a table")
    _checkKeys(acme, _ACME_KEYS, "acme")
    directory = acme.get("directory")
    if not isinstance(directory, str) or not directory.startswith(("https://", "http://")):
        raise ConfigError("acme.directory: expected the CA's directory URL, e.g. \"https://acme-v02.api.letsencrypt.org/directory\"")
    if directory.startswith("http://"):
        from urllib.parse import urlsplit

        host = urlsplit(directory).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            raise ConfigError("acme.directory: must be https:// (plain http:// is allowed for a CA on loopback only)")
    store = _resolvePath(base, acme.get("store", "acme"), "acme.store", mustExist=False)
    accountKey = _resolvePath(base, acme.get("account_key", str(Path(store) / "account.key")), "acme.account_key", mustExist=False)
    email = acme.get("email")
    if email is not None and (not isinstance(email, str) or "@" not in email):
        raise ConfigError("acme.email: expected an email address")
    names = acme.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("acme.names: expected a list of DNS names")
    for name in names:
        if name.startswith("*.") and isAcmeName(name[2:]):
            raise ConfigError(f"acme.names: {name!r}: wildcards need the dns-01 challenge, which TP does not answer")
        if not isAcmeName(name):
            raise ConfigError(f"acme.names: {name!r} is not a DNS name an ACME CA certifies (two labels or more, of letters, digits and hyphens)")
    names = list(dict.fromkeys(normalize(n) for n in names))
    http01 = acme.get("http01_listen")
    if http01 is not None and (not isinstance(http01, str) or not http01):
        raise ConfigError("acme.http01_listen: expected an endpoint description such as \"tcp:80\"")
    default = ["tls-alpn-01"] + (["http-01"] if http01 else [])
    challenges = acme.get("challenges", default)
    if not isinstance(challenges, list) or not challenges or not all(c in ("tls-alpn-01", "http-01") for c in challenges):
        raise ConfigError("acme.challenges: expected a non-empty list of \"tls-alpn-01\" and/or \"http-01\"")
    if "http-01" in challenges and http01 is None:
        raise ConfigError("acme.challenges: http-01 needs acme.http01_listen (the port 80 endpoint of the responder)")
    renew = acme.get("renew_at", 2 / 3)
    if isinstance(renew, bool) or not isinstance(renew, (int, float)) or not 0 < renew < 1:
        raise ConfigError("acme.renew_at: expected the fraction of a certificate's lifetime after which to renew, e.g. 0.67")
    onDemand = acme.get("e2e", True)
    if not isinstance(onDemand, bool):
        raise ConfigError("acme.e2e: expected true or false")
    return AcmeConfig(
        directory=directory,
        store=store,
        accountKey=accountKey,
        contact=(f"mailto:{email}",) if email else (),
        caBundle=_resolvePath(base, acme["ca_bundle"], "acme.ca_bundle") if "ca_bundle" in acme else None,
        names=tuple(names),
        challenges=tuple(challenges),
        http01Listen=http01,
        onDemand=onDemand,
        renewFraction=float(renew),
        checkInterval=_interval(acme.get("check_interval", 86400)),
    )


_SERVER_KEYS = {
    "listen", "certificate", "key", "client_ca", "crl", "handshake_timeout", "hello_timeout", "connect_timeout", "quic",
    "state_dir", "disconnect_expired_cert", "drain_timeout", "workers", "quic_max_datagram_size",
}

_TCP_LISTEN = re.compile(r"tcp6?:(\d+)(?::interface=([^:]*(?:\\:[^:]*)*))?$")


def _quicAddresses(value: Any, listen: list[str]) -> tuple[tuple[str, int], ...]:
    """
    C{server.quic}: C{true} (default) listens for QUIC on the address and
    port of each plain C{tcp:PORT[:interface=ADDR]} entry of C{listen};
    C{false} turns QUIC off; a list of C{"ADDR:PORT"} names the addresses.
    """
    if value is False:
        return ()
    if value is True:
        found = []
        for description in listen:
            m = _TCP_LISTEN.match(description)
            if m and m.group(1) != "0":
                interface = (m.group(2) or ("::" if description.startswith("tcp6") else "0.0.0.0")).replace("\\:", ":")
                found.append((interface, int(m.group(1))))
        return tuple(found)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError("server.quic: expected true, false, or a list of \"ADDRESS:PORT\"")
    out = []
    for item in value:
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        try:
            import ipaddress

            ipaddress.ip_address(host)
            number = int(port)
            if not sep or not 0 <= number <= 65535:
                raise ValueError
        except ValueError:
            raise ConfigError(f"server.quic: {item!r} is not ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)") from None
        out.append((host, number))
    return tuple(out)


def _datagramSize(value: Any) -> int:
    """
    C{server.quic_max_datagram_size}: 1200 (no path MTU search) to 65527
    (the largest UDP payload).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1200 <= value <= 65527:
        raise ConfigError(f"server.quic_max_datagram_size: expected a whole number of bytes from 1200 to 65527, got {value!r}")
    return value


def parseServerConfig(data: dict[str, Any], base: Path, path: str = "<config>") -> ServerConfig:
    _checkKeys(data, {"server", "deny", "groups", "rules", "exposures", "reverse", "e2e", "acme", "router", "limits", "admin", "cluster", "webtransport"}, "")
    server = data.get("server")
    if not isinstance(server, dict):
        raise ConfigError("server: missing [server] table")
    _checkKeys(server, _SERVER_KEYS, "server")
    listen = server.get("listen", f"tcp:{DEFAULT_PORT}")
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not listen or not all(isinstance(x, str) and x for x in listen):
        raise ConfigError("server.listen: expected an endpoint description such as \"tcp:443\", or a list of them")
    for description in listen:
        serverEndpoint(description, "server.listen")
    acme = parseAcme(data.get("acme"), base)
    fromACME = acme is not None and bool(acme.names)
    required = ("client_ca",) if fromACME else ("certificate", "key", "client_ca")
    for name in required:
        if name not in server:
            raise ConfigError(f"server.{name}: missing" + ("" if name == "client_ca" else " (or set acme.names to get it from an ACME CA)"))
    if ("certificate" in server) != ("key" in server):
        raise ConfigError("server.certificate and server.key: give both or neither")
    certificate = _resolvePath(base, server["certificate"], "server.certificate") if "certificate" in server else None
    key = _resolvePath(base, server["key"], "server.key") if "key" in server else None
    clientCAs = _pathList(base, server["client_ca"], "server.client_ca")
    crl = _resolvePath(base, server["crl"], "server.crl") if "crl" in server else None

    deny = data.get("deny", {})
    if not isinstance(deny, dict):
        raise ConfigError("deny: expected a table")
    _checkKeys(deny, {"identities", "serials"}, "deny")
    deniedIdentities = deny.get("identities", [])
    deniedSerials = deny.get("serials", [])
    for name, value in (("identities", deniedIdentities), ("serials", deniedSerials)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"deny.{name}: expected a list of strings")
    normalized = set()
    for serial in deniedSerials:
        try:
            normalized.add(normalizeSerial(serial))
        except ValueError as e:
            raise ConfigError(f"deny.serials: {e}") from None

    policy = parsePolicy(data.get("rules"), data.get("groups"), data.get("exposures"))

    reverse = data.get("reverse", {})
    if not isinstance(reverse, dict):
        raise ConfigError("reverse: expected a table")
    _checkKeys(reverse, {"public_interface", "accept_timeout", "keepalive"}, "reverse")
    publicInterface = reverse.get("public_interface", "0.0.0.0")
    try:
        import ipaddress

        ipaddress.ip_address(publicInterface)
    except (ValueError, TypeError):
        raise ConfigError(f"reverse.public_interface: expected an IP address, got {publicInterface!r}") from None

    e2e = data.get("e2e", {})
    if not isinstance(e2e, dict):
        raise ConfigError("e2e: expected a table")
    _checkKeys(e2e, {"ca_certificate", "ca_key", "certificates"}, "e2e")
    e2eCA = None
    if "ca_certificate" in e2e or "ca_key" in e2e:
        e2eCA = (_resolvePath(base, e2e.get("ca_certificate"), "e2e.ca_certificate"), _resolvePath(base, e2e.get("ca_key"), "e2e.ca_key"))
    files: dict[str, tuple[str, str]] = {}
    certs = e2e.get("certificates", {})
    if not isinstance(certs, dict):
        raise ConfigError("e2e.certificates: expected a table of NAME = {certificate = ..., key = ...}")
    for name, entry in certs.items():
        where = f"e2e.certificates.{name!r}"
        if not isCertificateName(name):
            raise ConfigError(f"{where}: not an E2E name (a DNS name of letters, digits and hyphens; no wildcard)")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected {{certificate = \"...\", key = \"...\"}}")
        _checkKeys(entry, {"certificate", "key"}, where)
        files[normalize(name)] = (
            _resolvePath(base, entry.get("certificate"), f"{where}.certificate"),
            _resolvePath(base, entry.get("key"), f"{where}.key"),
        )
    config = ServerConfig(
        path=path,
        listen=tuple(listen),
        certificate=certificate,
        key=key,
        clientCAs=clientCAs,
        crl=crl,
        handshakeTimeout=_seconds(server, "handshake_timeout", 10, "server"),
        helloTimeout=_seconds(server, "hello_timeout", 10, "server"),
        connectTimeout=_seconds(server, "connect_timeout", 10, "server"),
        deniedIdentities=frozenset(deniedIdentities),
        deniedSerials=frozenset(normalized),
        policy=policy,
        publicInterface=publicInterface,
        acceptTimeout=_seconds(reverse, "accept_timeout", 10, "reverse"),
        keepalive=_seconds(reverse, "keepalive", 15, "reverse"),
        e2eCA=e2eCA,
        e2eFiles=files,
        quic=_quicAddresses(server.get("quic", True), listen),
        acme=acme,
        router=parseRouter(data.get("router"), base),
        limits=parseLimits(data.get("limits")),
        admin=parseAdmin(data.get("admin")),
        cluster=parseCluster(data.get("cluster")),
        disconnectExpiredCert=_bool(server, "disconnect_expired_cert", True, "server"),
        drainTimeout=_seconds(server, "drain_timeout", 10, "server"),
        stateDir=_resolvePath(base, server.get("state_dir", "state"), "server.state_dir", mustExist=False),
        workers=_workers(server.get("workers", 1)),
        webtransport=parseWebTransport(data.get("webtransport")),
        quicMaxDatagramSize=_datagramSize(server.get("quic_max_datagram_size", 16384)),
    )
    from tpproxy.workers import checkWorkers

    checkWorkers(config)
    if config.router is not None and config.router.h3 is not None and not config.quic:
        raise ConfigError("router.h3: an HTTP/3 answer needs QUIC (server.quic is false)")
    if config.webtransport is not None:
        if not config.quic:
            raise ConfigError("webtransport: WebTransport runs on QUIC (server.quic is false)")
        if config.router is not None and isinstance(config.router.h3, H3Backend):
            raise ConfigError(
                "webtransport: cannot go with router.h3.backend: both are HTTP/3 on TP's UDP port, and nothing in a "
                "QUIC Initial tells a WebTransport session from a page load (docs/webtransport.md)"
            )
    checkServerFiles(config)
    return config


def _workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ConfigError(f"server.workers: expected a whole number of processes from 1 to 64, got {value!r}")
    return value


def checkServerFiles(config: ServerConfig) -> None:
    """
    Load every certificate, key and CRL once, so that a broken file is
    reported at start with the key that names it.
    """
    from tpproxy.pki import loadCertificates, loadKey

    if config.certificate is not None and config.key is not None:
        try:
            loadCertificates(config.certificate)
        except ValueError as e:
            raise ConfigError(f"server.certificate: {config.certificate}: not a PEM certificate ({e})") from None
        try:
            loadKey(config.key)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"server.key: {config.key}: not an unencrypted PEM private key ({e})") from None
    if config.acme is not None and config.acme.caBundle is not None:
        try:
            loadCertificates(config.acme.caBundle)
        except ValueError as e:
            raise ConfigError(f"acme.ca_bundle: {config.acme.caBundle}: not a PEM certificate ({e})") from None
    cas = []
    for path in config.clientCAs:
        try:
            cas.extend(loadCertificates(path))
        except ValueError as e:
            raise ConfigError(f"server.client_ca: {path}: not a PEM certificate ({e})") from None
    if config.crl:
        loadCRL(config.crl, cas)


def loadCRL(path: str, cas: list[x509.Certificate]) -> x509.CertificateRevocationList:
    try:
        with open(path, "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
    except ValueError as e:
        raise ConfigError(f"server.crl: {path}: not a PEM CRL ({e})") from None
    for ca in cas:
        if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            return crl
    raise ConfigError(f"server.crl: {path}: not signed by any of the client CAs in server.client_ca")


def loadServerConfig(path: str | os.PathLike[str]) -> ServerConfig:
    p = Path(path).expanduser().resolve()
    data = _readTOML(p)
    return parseServerConfig(data, p.parent, str(p))


# --- client -------------------------------------------------------------------


def defaultClientConfigPath() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "tp" / "client.toml"


@dataclass(frozen=True)
class ClientConfig:
    server: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    connectTimeout: float = 15.0
    transport: str = "auto"
    #: The admin listener's URL, for C{tp status}.
    admin: str | None = None
    #: Every server of a list C{server}: C{tp expose} keeps a link to
    #: each (the other commands use the first, C{server}).
    servers: tuple[str, ...] = ()


_CLIENT_KEYS = {"server", "cert", "key", "ca", "connect_timeout", "transport", "admin"}


def loadClientConfig(path: str | os.PathLike[str]) -> ClientConfig:
    p = Path(path).expanduser().resolve()
    data = _readTOML(p)
    _checkKeys(data, _CLIENT_KEYS, str(p))
    values: dict[str, Any] = {}
    if "server" in data:
        server = data["server"]
        if isinstance(server, list) and server and all(isinstance(s, str) and s for s in server):
            values["server"], values["servers"] = server[0], tuple(server)
        elif isinstance(server, str) and server:
            values["server"], values["servers"] = server, (server,)
        else:
            raise ConfigError(f"{p}: server: expected \"HOST:PORT\", or a list of them (tp expose keeps a link to each)")
    for name in ("cert", "key", "ca"):
        if name in data:
            values[name] = _resolvePath(p.parent, data[name], f"{p}: {name}", mustExist=False)
    if "connect_timeout" in data:
        values["connectTimeout"] = _seconds(data, "connect_timeout", 15, str(p))
    if "transport" in data:
        if data["transport"] not in ("auto", "quic", "tls"):
            raise ConfigError(f"{p}: transport: expected \"auto\", \"quic\" or \"tls\", got {data['transport']!r}")
        values["transport"] = data["transport"]
    if "admin" in data:
        admin = data["admin"]
        if not isinstance(admin, str) or not admin.startswith(("http://", "https://")) or len(admin) < 10:
            raise ConfigError(f"{p}: admin: expected the admin listener's URL, such as \"http://127.0.0.1:9090\", got {admin!r}")
        values["admin"] = admin.rstrip("/")
    return ClientConfig(**values)
