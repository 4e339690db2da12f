# -*- test-case-name: tpproxy.test.test_policy -*-
"""
Authorization as pure decisions: (identity, destination) -> allow or deny.

Rules are read in order and the first that matches decides; when none
matches, the answer is deny.  A destination is checked twice: once by the
name the client asked for (L{Policy.precheck}, before any DNS query), and
once per address actually dialled (L{Policy.check}), so that a DNS answer
cannot slip a forbidden address past a name rule.  docs/policy.md explains
the rules for people.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Iterable, Union

from tpproxy.names import isCertificateNameGlob, isHostGlob, normalize

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


class ConfigError(Exception):
    """
    A configuration value is wrong.  The message names the key.
    """


#: Addresses that only a rule naming them by address may reach: a name
#: rule never grants them, and neither does an address rule wider than the
#: block itself (C{0.0.0.0/0} does not "name" the metadata service).
PROTECTED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in [
        ("169.254.169.254/32", "a cloud metadata service"),
        ("fd00:ec2::254/128", "a cloud metadata service"),
        ("100.100.100.200/32", "a cloud metadata service"),
        ("168.63.129.16/32", "a cloud platform service address"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
    ]
)


def normalizeAddress(address: str | IPAddress) -> IPAddress:
    """
    Parse an address, mapping IPv4-mapped IPv6 (C{::ffff:a.b.c.d}) to IPv4
    and dropping any zone index.
    """
    if isinstance(address, str):
        address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def protectedBlock(address: IPAddress) -> tuple[IPNetwork, str] | None:
    for net, why in PROTECTED:
        if address.version == net.version and address in net:
            return net, why
    return None


_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def identityMatches(pattern: str, identity: str) -> bool:
    """
    Match an identity against a rule entry: exact, with C{*} as the only
    wildcard (identities may contain C{?} or C{[}, which stay literal).
    """
    if "*" not in pattern:
        return pattern == identity
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), identity, re.DOTALL) is not None


def _isIPLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPattern:
    """
    One entry of a rule's C{hosts}: a name glob (L{tpproxy.names.isHostGlob},
    stored normalized) or an address network.
    """

    text: str
    network: IPNetwork | None = None

    @classmethod
    def parse(cls, text: str, key: str) -> HostPattern:
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{key}: expected a non-empty string, got {text!r}")
        looksLikeAddress = "/" in text or ":" in text or text.replace(".", "").isdigit()
        if looksLikeAddress:
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as e:
                raise ConfigError(f"{key}: {text!r} is not a valid address or CIDR network ({e})") from None
            if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):  # type: ignore[arg-type]
                raise ConfigError(f"{key}: {text!r} is IPv4-mapped IPv6; write the IPv4 form (TP checks mapped addresses as IPv4)")
            return cls(text, network)
        if not isHostGlob(text):
            raise ConfigError(
                f"{key}: {text!r} is not a host name or name glob (letters, digits, '-', '_', dots; '*', '?', '[...]' as wildcards)"
            )
        return cls(normalize(text))

    def matchesName(self, host: str) -> bool:
        return self.network is None and fnmatchcase(normalize(host), self.text)

    def matchesAddress(self, address: IPAddress) -> bool:
        return self.network is not None and address.version == self.network.version and address in self.network


@dataclass(frozen=True)
class Rule:
    """
    One policy rule.  Identity entries are exact names, globs, C{*} or
    C{group:NAME} (already expanded when the rule is built).
    """

    index: int
    action: str
    identities: tuple[str, ...]
    hosts: tuple[HostPattern, ...]
    ports: tuple[tuple[int, int], ...]
    transports: frozenset[str]

    def matchesWho(self, identity: str, port: int, transport: str) -> bool:
        return (
            transport in self.transports
            and any(lo <= port <= hi for lo, hi in self.ports)
            and any(identityMatches(pattern, identity) for pattern in self.identities)
        )

    def describe(self) -> str:
        return f"rule {self.index + 1} ({self.action})"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rule: int | None = None


@dataclass(frozen=True)
class ExposureRule:
    """
    Who may expose what (reverse tunnels), and who may dial E2E names.
    """

    index: int
    identities: tuple[str, ...]
    publicPorts: tuple[tuple[int, int], ...]
    names: tuple[str, ...]
    dialers: tuple[str, ...]
    #: Whether TP may introduce dialers of these names to their exposer for
    #: a direct (P2P) path instead of relaying (docs/p2p.md).
    p2p: bool = False

    def describe(self) -> str:
        return f"exposures[{self.index + 1}]"


def _anyIdentity(patterns: Iterable[str], identity: str) -> bool:
    return any(identityMatches(p, identity) for p in patterns)


@dataclass(frozen=True)
class Policy:
    """
    The authorization policy of one TP server.
    """

    rules: tuple[Rule, ...] = ()
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    exposures: tuple[ExposureRule, ...] = ()

    def publicPortRanges(self, identity: str) -> tuple[tuple[int, int], ...]:
        """
        The public port ranges C{identity} may expose, in rule order.
        """
        return tuple(r for rule in self.exposures if _anyIdentity(rule.identities, identity) for r in rule.publicPorts)

    def mayExposePort(self, identity: str, port: int) -> Decision:
        for rule in self.exposures:
            if _anyIdentity(rule.identities, identity) and any(lo <= port <= hi for lo, hi in rule.publicPorts):
                return Decision(True, f"allowed by {rule.describe()}", rule.index)
        return Decision(False, f"no exposure rule lets {identity} expose public port {port}")

    def mayExposeName(self, identity: str, name: str) -> Decision:
        for rule in self.exposures:
            if _anyIdentity(rule.identities, identity) and any(fnmatchcase(name, n) for n in rule.names):
                return Decision(True, f"allowed by {rule.describe()}", rule.index)
        return Decision(False, f"no exposure rule lets {identity} expose the name {name}")

    def exposableName(self, name: str) -> bool:
        """
        Could C{name} be an E2E exposure (some exposure rule names it)?
        """
        return any(fnmatchcase(name, n) for rule in self.exposures for n in rule.names)

    def mayDialExposure(self, grantedBy: ExposureRule, identity: str, name: str) -> Decision:
        """
        May C{identity} reach the E2E exposure C{name} that the exposure
        rule C{grantedBy} let its exposer make?  The dialers of an exposure
        are those of the rule that authorized its exposer for its name (the
        rule of L{mayExposeName}'s decision: the first rule in file order
        that lists the exposer and matches the name), never those of
        another rule that merely matches the name: each rule speaks only
        for the exposures it authorized (docs/policy.md).
        """
        if _anyIdentity(grantedBy.dialers, identity):
            return Decision(True, f"allowed by {grantedBy.describe()}", grantedBy.index)
        return Decision(False, f"{identity} is not among the dialers of {name} ({grantedBy.describe()})", grantedBy.index)

    def precheck(self, identity: str, host: str, port: int, transport: str) -> Decision:
        """
        Decide what can be decided before resolving C{host}: a request that
        no rule could allow, or that a name rule denies, is refused without
        a DNS query.  A positive answer only means "resolve and check each
        address with L{check}".
        """
        literal = _isIPLiteral(host)
        for rule in self.rules:
            if not rule.matchesWho(identity, port, transport):
                continue
            for pattern in rule.hosts:
                if pattern.network is not None:
                    if rule.action == "allow" or literal:
                        # The address decides; check() will tell.
                        return Decision(True, f"{rule.describe()} may apply", rule.index)
                elif not literal and pattern.matchesName(host):
                    if rule.action == "deny":
                        return Decision(False, f"{host} is denied by {rule.describe()}", rule.index)
                    return Decision(True, f"{rule.describe()} matches {host}", rule.index)
        return Decision(False, f"no rule allows {identity} to reach {host}:{port}/{transport}")

    def checkName(self, identity: str, name: str, port: int, transport: str) -> Decision:
        """
        Decide by name alone, for destinations TP serves itself (E2E
        exposure names), which are never resolved: the first rule whose
        name pattern matches decides.
        """
        for rule in self.rules:
            if rule.matchesWho(identity, port, transport) and any(p.matchesName(name) for p in rule.hosts):
                if rule.action == "deny":
                    return Decision(False, f"{name} is denied by {rule.describe()}", rule.index)
                return Decision(True, f"allowed by {rule.describe()}", rule.index)
        return Decision(False, f"no rule allows {identity} to reach {name}:{port}/{transport}")

    def check(self, identity: str, host: str, address: str | IPAddress, port: int, transport: str) -> Decision:
        """
        Decide whether C{identity} may dial C{address}, which C{host}
        resolved to (C{host} may be the address literal itself).
        """
        addr = normalizeAddress(address)
        literal = _isIPLiteral(host)
        protected = protectedBlock(addr)
        skipped: str | None = None
        for rule in self.rules:
            if not rule.matchesWho(identity, port, transport):
                continue
            for pattern in rule.hosts:
                byAddress = pattern.matchesAddress(addr)
                byName = not literal and pattern.matchesName(host)
                if not (byAddress or byName):
                    continue
                if rule.action == "deny":
                    return Decision(False, f"{host} ({addr}) is denied by {rule.describe()}", rule.index)
                if protected is not None:
                    block, why = protected
                    named = byAddress and pattern.network is not None and pattern.network.subnet_of(block)  # type: ignore[arg-type]
                    if not named:
                        skipped = (
                            f"{addr} is {why}; only a rule naming it by address "
                            f"(within {block}) may allow it"
                        )
                        continue
                return Decision(True, f"allowed by {rule.describe()}", rule.index)
        return Decision(False, skipped or f"no rule allows {identity} to reach {addr} port {port}/{transport}")


# --- building a policy from configuration ------------------------------------


def _stringList(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected a string or a list of non-empty strings")
    return value


def _ports(value: Any, key: str) -> tuple[tuple[int, int], ...]:
    if value == "*":
        return ((1, 65535),)
    if isinstance(value, (int, str)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}: expected a port, a range \"LO-HI\", \"*\", or a list of these")
    ranges = []
    for item in value:
        if item == "*":
            ranges.append((1, 65535))
            continue
        if type(item) is int:
            lo = hi = item
        elif isinstance(item, str):
            if not re.fullmatch(r"\d{1,5}(-\d{1,5})?", item):
                raise ConfigError(f"{key}: {item!r} is not a port or a range \"LO-HI\"")
            try:
                if "-" in item:
                    a, b = item.split("-", 1)
                    lo, hi = int(a), int(b)
                else:
                    lo = hi = int(item)
            except ValueError:
                raise ConfigError(f"{key}: {item!r} is not a port or a range \"LO-HI\"") from None
        else:
            raise ConfigError(f"{key}: {item!r} is not a port or a range \"LO-HI\"")
        if not (1 <= lo <= hi <= 65535):
            raise ConfigError(f"{key}: {item!r} is outside 1-65535 or an empty range")
        ranges.append((lo, hi))
    return tuple(ranges)


def parseGroups(value: Any, key: str = "groups") -> dict[str, frozenset[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of group name = [identities]")
    return {name: frozenset(_stringList(members, f"{key}.{name}")) for name, members in value.items()}


def expandIdentities(entries: Iterable[str], groups: dict[str, frozenset[str]], key: str) -> tuple[str, ...]:
    out: list[str] = []
    for entry in entries:
        if entry.startswith("group:"):
            name = entry[len("group:") :]
            if name not in groups:
                raise ConfigError(f"{key}: group {name!r} is not defined in [groups]")
            out.extend(sorted(groups[name]))
        else:
            out.append(entry)
    return tuple(out)


_RULE_KEYS = {"action", "identities", "hosts", "ports", "transports", "comment"}
_EXPOSURE_KEYS = {"identities", "public_ports", "names", "dialers", "p2p", "comment"}


def _exposureName(pattern: str, key: str) -> str:
    """
    An entry of C{[[exposures]] names}: an E2E name glob
    (L{tpproxy.names.isCertificateNameGlob}), normalized.
    """
    if not isCertificateNameGlob(pattern):
        raise ConfigError(f"{key}: {pattern!r} is not an E2E name or name glob (letters, digits, '-', dots; '*', '?', '[...]' as wildcards)")
    return normalize(pattern)


def parseExposures(value: Any, groups: dict[str, frozenset[str]]) -> tuple[ExposureRule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("exposures: expected an array of tables ([[exposures]])")
    built = []
    for i, raw in enumerate(value):
        key = f"exposures[{i + 1}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a table")
        unknown = set(raw) - _EXPOSURE_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(unknown))}")
        if "identities" not in raw:
            raise ConfigError(f"{key}.identities: missing")
        identities = expandIdentities(_stringList(raw["identities"], f"{key}.identities"), groups, f"{key}.identities")
        ports = _ports(raw["public_ports"], f"{key}.public_ports") if "public_ports" in raw else ()
        names = tuple(_exposureName(n, f"{key}.names") for n in _stringList(raw["names"], f"{key}.names")) if raw.get("names") else ()
        dialers = (
            expandIdentities(_stringList(raw["dialers"], f"{key}.dialers"), groups, f"{key}.dialers") if "dialers" in raw else ()
        )
        if names and not dialers:
            raise ConfigError(f"{key}.dialers: missing (who may dial these E2E names?)")
        if not ports and not names:
            raise ConfigError(f"{key}: give public_ports, names, or both")
        p2p = raw.get("p2p", False)
        if not isinstance(p2p, bool):
            raise ConfigError(f"{key}.p2p: expected true or false")
        if p2p and not names:
            raise ConfigError(f"{key}.p2p: only E2E names can be dialed directly (a public port has no dialers to introduce)")
        built.append(ExposureRule(i, identities, ports, names, dialers, p2p))
    return tuple(built)


def parsePolicy(rules: Any, groups: Any, exposures: Any = None) -> Policy:
    """
    Build a L{Policy} from the C{[[rules]]} and C{[groups]} of the server
    configuration.

    @raise ConfigError: naming the key at fault.
    """
    groupMap = parseGroups(groups)
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise ConfigError("rules: expected an array of tables ([[rules]])")
    built = []
    for i, raw in enumerate(rules):
        key = f"rules[{i + 1}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: expected a table")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {', '.join(sorted(unknown))}")
        action = raw.get("action", "allow")
        if action not in ("allow", "deny"):
            raise ConfigError(f"{key}.action: expected \"allow\" or \"deny\", got {action!r}")
        for required in ("identities", "hosts", "ports"):
            if required not in raw:
                raise ConfigError(f"{key}.{required}: missing")
        identities = expandIdentities(_stringList(raw["identities"], f"{key}.identities"), groupMap, f"{key}.identities")
        hosts = tuple(HostPattern.parse(h, f"{key}.hosts") for h in _stringList(raw["hosts"], f"{key}.hosts"))
        ports = _ports(raw["ports"], f"{key}.ports")
        transports = _stringList(raw.get("transports", ["tcp"]), f"{key}.transports")
        for t in transports:
            if t not in ("tcp", "udp"):
                raise ConfigError(f"{key}.transports: {t!r} is not \"tcp\" or \"udp\"")
        built.append(Rule(i, action, identities, hosts, ports, frozenset(transports)))
    return Policy(tuple(built), groupMap, parseExposures(exposures, groupMap))
