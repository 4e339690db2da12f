"""
Tests for L{tpproxy.policy}: parsing C{[[rules]]} and C{[groups]}, and the
decisions of L{Policy.precheck} (by name, before DNS) and L{Policy.check}
(per resolved address).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tpproxy.policy import (
    PROTECTED,
    ConfigError,
    Decision,
    HostPattern,
    Policy,
    normalizeAddress,
    parsePolicy,
    protectedBlock,
)


def rule(hosts: Any, identities: Any = "*", ports: Any = "*", **kw: Any) -> dict[str, Any]:
    """
    One C{[[rules]]} table.
    """
    return {"identities": identities, "hosts": hosts, "ports": ports, **kw}


def policy(*rules: dict[str, Any], groups: Any = None) -> Policy:
    return parsePolicy(list(rules), groups)


#: Addresses that a name rule must never grant, whatever DNS says.
PROTECTED_ADDRESSES = [
    "169.254.169.254",
    "fd00:ec2::254",
    "100.100.100.200",
    "168.63.129.16",
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    "0.0.0.0",
    "0.1.2.3",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "169.254.1.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
]

ORDINARY_ADDRESSES = ["93.184.216.34", "10.1.2.3", "192.168.0.1", "2606:2800:220:1::1", "fd00::1", "::ffff:93.184.216.34"]


class DecisionMixin:
    def assertAllowed(self, decision: Decision, rule: int | None = None) -> None:
        self.assertTrue(decision.allowed, decision.reason)  # type: ignore[attr-defined]
        if rule is not None:
            self.assertEqual(decision.rule, rule)  # type: ignore[attr-defined]

    def assertDenied(self, decision: Decision, rule: int | None = None, reason: str | None = None) -> None:
        self.assertFalse(decision.allowed, decision.reason)  # type: ignore[attr-defined]
        self.assertEqual(decision.rule, rule)  # type: ignore[attr-defined]
        if reason is not None:
            self.assertIn(reason, decision.reason)  # type: ignore[attr-defined]


class DefaultDenyTests(DecisionMixin, SynchronousTestCase):
    def test_noRules(self) -> None:
        """
        With no rules, everything is denied, before and after DNS.
        """
        for p in (Policy(), parsePolicy(None, None), parsePolicy([], {})):
            self.assertDenied(
                p.precheck("alice", "example.org", 443, "tcp"),
                reason="no rule allows alice to reach example.org:443/tcp",
            )
            self.assertDenied(
                p.check("alice", "example.org", "93.184.216.34", 443, "tcp"),
                reason="no rule allows alice to reach 93.184.216.34 port 443/tcp",
            )
            self.assertDenied(p.check("alice", "127.0.0.1", "127.0.0.1", 22, "tcp"))

    def test_noMatchingRule(self) -> None:
        """
        When rules exist but none matches, the answer is deny.
        """
        p = policy(rule("db.example.org", identities="alice", ports=5432))
        self.assertDenied(p.precheck("alice", "www.example.org", 5432, "tcp"))
        self.assertDenied(p.check("alice", "www.example.org", "10.0.0.5", 5432, "tcp"))
        self.assertDenied(p.precheck("bob", "db.example.org", 5432, "tcp"))
        self.assertDenied(p.precheck("alice", "db.example.org", 5433, "tcp"))
        self.assertDenied(p.precheck("alice", "db.example.org", 5432, "udp"))
        self.assertAllowed(p.precheck("alice", "db.example.org", 5432, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "db.example.org", "10.0.0.5", 5432, "tcp"), rule=0)


class OrderTests(DecisionMixin, SynchronousTestCase):
    def test_denyBeforeAllowByName(self) -> None:
        """
        A deny rule before an allow rule wins, and a name deny is decided
        before DNS.
        """
        p = policy(rule("secret.example.org", action="deny"), rule("*.example.org"))
        self.assertDenied(
            p.precheck("alice", "secret.example.org", 443, "tcp"),
            rule=0,
            reason="secret.example.org is denied by rule 1 (deny)",
        )
        self.assertDenied(p.check("alice", "secret.example.org", "93.184.216.34", 443, "tcp"), rule=0)
        self.assertAllowed(p.precheck("alice", "www.example.org", 443, "tcp"), rule=1)
        self.assertAllowed(p.check("alice", "www.example.org", "93.184.216.34", 443, "tcp"), rule=1)

    def test_allowBeforeDenyByName(self) -> None:
        """
        An allow rule before a deny rule for the same name wins.
        """
        p = policy(rule("*.example.org"), rule("secret.example.org", action="deny"))
        self.assertAllowed(p.precheck("alice", "secret.example.org", 443, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "secret.example.org", "93.184.216.34", 443, "tcp"), rule=0)

    def test_denyByCIDR(self) -> None:
        """
        A deny rule naming a network refuses any name that resolves into
        it; the name itself passes the precheck, since only the address
        can tell.
        """
        p = policy(rule("10.0.0.0/8", action="deny"), rule("*.example.org"))
        self.assertAllowed(p.precheck("alice", "www.example.org", 443, "tcp"), rule=1)
        self.assertDenied(
            p.check("alice", "www.example.org", "10.1.2.3", 443, "tcp"),
            rule=0,
            reason="www.example.org (10.1.2.3) is denied by rule 1 (deny)",
        )
        self.assertDenied(p.check("alice", "www.example.org", "::ffff:10.1.2.3", 443, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "www.example.org", "11.1.2.3", 443, "tcp"), rule=1)

    def test_denyByCIDRLiteral(self) -> None:
        """
        An address literal inside a denied network is refused by the check.
        """
        p = policy(rule("10.0.0.0/8", action="deny"), rule("0.0.0.0/0"))
        self.assertTrue(p.precheck("alice", "10.1.2.3", 22, "tcp").allowed)
        self.assertDenied(p.check("alice", "10.1.2.3", "10.1.2.3", 22, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "11.1.2.3", "11.1.2.3", 22, "tcp"), rule=1)

    def test_allowCIDRBeforeDeny(self) -> None:
        """
        An allow rule naming a network, before a deny rule, wins for
        addresses in the network.
        """
        p = policy(rule("10.0.0.0/8"), rule("*", action="deny"))
        self.assertAllowed(p.check("alice", "db.internal", "10.0.0.1", 22, "tcp"), rule=0)
        self.assertDenied(p.check("alice", "db.internal", "11.0.0.1", 22, "tcp"), rule=1)

    def test_laterRulesWhenWhoDiffers(self) -> None:
        """
        A rule for other identities, ports or transports is passed over.
        """
        p = policy(
            rule("*", identities="bob", action="deny"),
            rule("*", ports=22, action="deny"),
            rule("*", transports="udp", action="deny"),
            rule("*.example.org", transports=["tcp", "udp"]),
        )
        self.assertAllowed(p.precheck("alice", "a.example.org", 443, "tcp"), rule=3)
        self.assertAllowed(p.check("alice", "a.example.org", "93.184.216.34", 443, "tcp"), rule=3)
        self.assertDenied(p.precheck("bob", "a.example.org", 443, "tcp"), rule=0)
        self.assertDenied(p.precheck("alice", "a.example.org", 22, "tcp"), rule=1)
        self.assertDenied(p.precheck("alice", "a.example.org", 53, "udp"), rule=2)


    def test_documentedExample(self) -> None:
        """
        The example of docs/policy.md: a deny rule for a subnet first, then
        an allow rule for admins; a name allowed by the second rule that
        resolves into the denied subnet is refused by the first.
        """
        p = policy(
            rule("10.9.0.0/16", action="deny", comment="nobody reaches the database subnet"),
            rule(
                ["*.example.org", "10.0.0.0/8", "2001:db8::/32"],
                identities=["group:admins", "*@ops.example.org"],
                ports=[22, "8000-8099"],
                transports=["tcp"],
            ),
            groups={"admins": ["alice@example.org", "spiffe://example.org/ops-laptop"]},
        )
        self.assertAllowed(p.precheck("alice@example.org", "evil.example.org", 22, "tcp"), rule=1)
        self.assertDenied(p.check("alice@example.org", "evil.example.org", "10.9.1.1", 22, "tcp"), rule=0)
        self.assertAllowed(p.check("alice@example.org", "evil.example.org", "10.1.1.1", 22, "tcp"), rule=1)
        self.assertAllowed(p.check("bob@ops.example.org", "db.internal", "2001:db8::7", 8099, "tcp"), rule=1)
        self.assertDenied(p.check("bob@ops.example.org", "db.internal", "2001:db8::7", 8100, "tcp"))
        self.assertDenied(p.precheck("carol@example.org", "www.example.org", 22, "tcp"))
        self.assertAllowed(p.check("spiffe://example.org/ops-laptop", "10.2.3.4", "10.2.3.4", 8000, "tcp"), rule=1)


class NameTests(DecisionMixin, SynchronousTestCase):
    def test_globCaseAndTrailingDot(self) -> None:
        """
        Name globs match case-insensitively, ignoring a trailing dot on
        either side; C{*} matches dots too.
        """
        p = policy(rule(["*.Example.ORG.", "exact.test"]))
        for host in ("www.example.org", "WWW.EXAMPLE.ORG", "www.example.org.", "a.b.example.org", "Exact.Test.", "exact.test"):
            self.assertAllowed(p.precheck("alice", host, 443, "tcp"))
            self.assertAllowed(p.check("alice", host, "93.184.216.34", 443, "tcp"))

    def test_globDoesNotOvermatch(self) -> None:
        """
        C{*.example.org} matches neither the bare domain nor a lookalike.
        """
        p = policy(rule(["*.example.org", "exact.test"]))
        for host in ("example.org", "evilexample.org", "www.example.org.evil", "example.org.evil.com", "xexact.test", "exact.test.x"):
            self.assertDenied(p.precheck("alice", host, 443, "tcp"))
            self.assertDenied(p.check("alice", host, "93.184.216.34", 443, "tcp"))

    def test_questionAndClass(self) -> None:
        """
        C{?} and C{[...]} work as in shell globs.
        """
        p = policy(rule(["db?.example.org", "node[0-2].example.org"]))
        self.assertAllowed(p.precheck("alice", "db1.example.org", 1, "tcp"))
        self.assertDenied(p.precheck("alice", "db12.example.org", 1, "tcp"))
        self.assertAllowed(p.precheck("alice", "node2.example.org", 1, "tcp"))
        self.assertDenied(p.precheck("alice", "node3.example.org", 1, "tcp"))

    def test_namePatternParsed(self) -> None:
        """
        A name pattern is stored lowercased without its trailing dot; an
        address pattern as a network.
        """
        self.assertEqual(HostPattern.parse("*.Example.ORG.", "k"), HostPattern("*.example.org"))
        self.assertEqual(
            HostPattern.parse("10.0.0.0/8", "k"), HostPattern("10.0.0.0/8", ipaddress.ip_network("10.0.0.0/8"))
        )
        self.assertEqual(HostPattern.parse("::1", "k").network, ipaddress.ip_network("::1/128"))
        self.assertEqual(HostPattern.parse("192.0.2.1", "k").network, ipaddress.ip_network("192.0.2.1/32"))


class LiteralTests(DecisionMixin, SynchronousTestCase):
    def test_literalNotMatchedByName(self) -> None:
        """
        An IP literal is matched only by address rules: a name rule, even
        C{*} or a glob that looks like addresses, does not match it, before
        or after DNS.
        """
        p = policy(rule("*"), rule("93.184.216.*"), rule("*.example.org"))
        for literal in ("93.184.216.34", "2606:2800:220:1::1"):
            self.assertDenied(p.precheck("alice", literal, 443, "tcp"), reason="no rule allows")
            self.assertDenied(p.check("alice", literal, literal, 443, "tcp"), reason="no rule allows")

    def test_literalByCIDR(self) -> None:
        """
        An address rule allows literals within its network, and only those.
        """
        p = policy(rule(["93.184.216.0/24", "2606:2800::/32"]))
        self.assertAllowed(p.precheck("alice", "93.184.216.34", 443, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "93.184.216.34", "93.184.216.34", 443, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "2606:2800:220:1::1", "2606:2800:220:1::1", 443, "tcp"), rule=0)
        self.assertDenied(p.check("alice", "93.184.217.34", "93.184.217.34", 443, "tcp"))

    def test_literalDenyByName(self) -> None:
        """
        A deny name rule does not refuse an IP literal (it is not a name),
        while a name matching it is refused before DNS.
        """
        p = policy(rule("*", action="deny"), rule("0.0.0.0/0"))
        self.assertDenied(p.precheck("alice", "www.example.org", 443, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "93.184.216.34", "93.184.216.34", 443, "tcp"), rule=1)


class PrecheckTests(DecisionMixin, SynchronousTestCase):
    def test_refusedWithoutDNS(self) -> None:
        """
        A name that no rule could allow is refused by the precheck.
        """
        p = policy(rule("*.example.org", identities="alice", ports=443))
        self.assertDenied(p.precheck("alice", "www.example.com", 443, "tcp"), reason="no rule allows")
        self.assertDenied(p.precheck("mallory", "www.example.org", 443, "tcp"))

    def test_addressRuleMayApply(self) -> None:
        """
        With an allow rule naming a network, any name passes the precheck
        (only its addresses can tell), and the check decides per address.
        """
        p = policy(rule("10.0.0.0/8"))
        decision = p.precheck("alice", "anything.example", 22, "tcp")
        self.assertAllowed(decision, rule=0)
        self.assertIn("may apply", decision.reason)
        self.assertAllowed(p.check("alice", "anything.example", "10.9.9.9", 22, "tcp"), rule=0)
        self.assertDenied(p.check("alice", "anything.example", "11.9.9.9", 22, "tcp"))

    def test_denyAddressRuleDoesNotDecideNames(self) -> None:
        """
        A deny rule naming a network says nothing about a name before DNS.
        """
        p = policy(rule("10.0.0.0/8", action="deny"))
        self.assertDenied(p.precheck("alice", "www.example.org", 22, "tcp"), reason="no rule allows")

    def test_checkIsPerAddress(self) -> None:
        """
        The check decides each resolved address on its own.
        """
        p = policy(rule(["192.0.2.0/24", "2001:db8::/32"]))
        self.assertAllowed(p.check("alice", "dual.example", "192.0.2.1", 22, "tcp"))
        self.assertAllowed(p.check("alice", "dual.example", "2001:db8::1", 22, "tcp"))
        self.assertDenied(p.check("alice", "dual.example", "198.51.100.1", 22, "tcp"))
        self.assertAllowed(p.check("alice", "dual.example", ipaddress.ip_address("192.0.2.9"), 22, "tcp"))


class PortAndTransportTests(DecisionMixin, SynchronousTestCase):
    def test_single(self) -> None:
        """
        A single port matches only itself, as an integer or a string.
        """
        for ports in (22, "22", [22]):
            p = policy(rule("h.example", ports=ports))
            self.assertEqual(p.rules[0].ports, ((22, 22),))
            self.assertAllowed(p.precheck("a", "h.example", 22, "tcp"))
            self.assertDenied(p.precheck("a", "h.example", 23, "tcp"))
            self.assertDenied(p.precheck("a", "h.example", 21, "tcp"))

    def test_range(self) -> None:
        """
        A range includes both ends.
        """
        p = policy(rule("h.example", ports="8000-8080"))
        self.assertEqual(p.rules[0].ports, ((8000, 8080),))
        for port, allowed in ((7999, False), (8000, True), (8042, True), (8080, True), (8081, False)):
            self.assertEqual(p.precheck("a", "h.example", port, "tcp").allowed, allowed, port)

    def test_star(self) -> None:
        """
        C{*} is every port, alone or in a list.
        """
        self.assertEqual(policy(rule("h", ports="*")).rules[0].ports, ((1, 65535),))
        self.assertEqual(policy(rule("h", ports=["*"])).rules[0].ports, ((1, 65535),))
        p = policy(rule("h.example", ports="*"))
        self.assertAllowed(p.precheck("a", "h.example", 1, "tcp"))
        self.assertAllowed(p.precheck("a", "h.example", 65535, "tcp"))

    def test_list(self) -> None:
        """
        A list mixes ports and ranges.
        """
        p = policy(rule("h.example", ports=[22, "443", "1000-1002", "65535"]))
        self.assertEqual(p.rules[0].ports, ((22, 22), (443, 443), (1000, 1002), (65535, 65535)))
        for port in (22, 443, 1000, 1001, 1002, 65535):
            self.assertAllowed(p.precheck("a", "h.example", port, "tcp"))
        for port in (21, 80, 999, 1003, 65534):
            self.assertDenied(p.precheck("a", "h.example", port, "tcp"))

    def test_transports(self) -> None:
        """
        A rule covers TCP only unless it lists UDP.
        """
        p = policy(rule("tcp.example"), rule("udp.example", transports="udp"), rule("both.example", transports=["tcp", "udp"]))
        self.assertEqual(p.rules[0].transports, {"tcp"})
        self.assertAllowed(p.precheck("a", "tcp.example", 53, "tcp"))
        self.assertDenied(p.precheck("a", "tcp.example", 53, "udp"))
        self.assertAllowed(p.precheck("a", "udp.example", 53, "udp"))
        self.assertDenied(p.precheck("a", "udp.example", 53, "tcp"))
        self.assertAllowed(p.precheck("a", "both.example", 53, "udp"))
        self.assertAllowed(p.check("a", "both.example", "192.0.2.1", 53, "tcp"))
        self.assertDenied(p.check("a", "udp.example", "192.0.2.1", 53, "tcp"))


class IdentityTests(DecisionMixin, SynchronousTestCase):
    def test_exact(self) -> None:
        """
        An exact identity matches itself only, case-sensitively.
        """
        p = policy(rule("h.example", identities=["alice@example.org"]))
        self.assertAllowed(p.precheck("alice@example.org", "h.example", 1, "tcp"))
        for other in ("Alice@example.org", "alice@example.org2", "xalice@example.org", "alice", ""):
            self.assertDenied(p.precheck(other, "h.example", 1, "tcp"), reason=f"no rule allows {other} ")

    def test_glob(self) -> None:
        """
        An identity glob matches by shell rules.
        """
        p = policy(rule("h.example", identities="spiffe://example.org/ns/prod/*"))
        self.assertAllowed(p.precheck("spiffe://example.org/ns/prod/web", "h.example", 1, "tcp"))
        self.assertDenied(p.precheck("spiffe://example.org/ns/dev/web", "h.example", 1, "tcp"))
        self.assertDenied(p.precheck("spiffe://example.org/ns/prod", "h.example", 1, "tcp"))

    def test_star(self) -> None:
        """
        C{*} matches every identity.
        """
        p = policy(rule("h.example", identities="*"))
        for who in ("alice", "spiffe://x/y", "bob@example.org"):
            self.assertAllowed(p.check(who, "h.example", "192.0.2.1", 1, "tcp"))

    def test_group(self) -> None:
        """
        C{group:NAME} stands for the group's members, globs included.
        """
        p = policy(
            rule("h.example", identities=["group:ops", "carol"]),
            groups={"ops": ["alice", "svc-*"], "unused": "dave"},
        )
        self.assertEqual(p.rules[0].identities, ("alice", "svc-*", "carol"))
        self.assertEqual(p.groups, {"ops": frozenset({"alice", "svc-*"}), "unused": frozenset({"dave"})})
        for who in ("alice", "svc-backup", "carol"):
            self.assertAllowed(p.precheck(who, "h.example", 1, "tcp"))
        for who in ("dave", "bob", "group:ops", "ops"):
            self.assertDenied(p.precheck(who, "h.example", 1, "tcp"))

    def test_undefinedGroup(self) -> None:
        """
        A rule naming a group that is not defined is a configuration error.
        """
        e = self.assertRaises(
            ConfigError, policy, rule("h"), rule("h", identities=["group:admins"]), groups={"ops": ["alice"]}
        )
        self.assertEqual(str(e), "rules[2].identities: group 'admins' is not defined in [groups]")
        e = self.assertRaises(ConfigError, policy, rule("h", identities="group:ops"))
        self.assertIn("group 'ops' is not defined", str(e))


class ProtectedTests(DecisionMixin, SynchronousTestCase):
    """
    DNS rebinding: a name rule never grants loopback, link-local,
    unspecified or cloud metadata addresses; only a rule naming them by
    address within their protected block does.
    """

    def test_nameRuleRefusesProtected(self) -> None:
        """
        A name rule allows the name, but not a protected address it
        resolves to.
        """
        p = policy(rule("*.example.org"))
        for address in PROTECTED_ADDRESSES:
            self.assertAllowed(p.precheck("alice", "rebind.example.org", 443, "tcp"))
            self.assertDenied(
                p.check("alice", "rebind.example.org", address, 443, "tcp"),
                reason="only a rule naming it by address",
            )

    def test_nameRuleAllowsOrdinary(self) -> None:
        """
        A name rule allows the ordinary addresses its name resolves to.
        """
        p = policy(rule("*.example.org"))
        for address in ORDINARY_ADDRESSES:
            self.assertAllowed(p.check("alice", "www.example.org", address, 443, "tcp"), rule=0)

    def test_starNameRule(self) -> None:
        """
        Even a C{*} name rule does not reach a protected address.
        """
        p = policy(rule("*"))
        self.assertDenied(
            p.check("alice", "localhost", "127.0.0.1", 22, "tcp"),
            reason="127.0.0.1 is loopback; only a rule naming it by address (within 127.0.0.0/8) may allow it",
        )
        self.assertDenied(
            p.check("alice", "metadata.google.internal", "169.254.169.254", 80, "tcp"),
            reason="169.254.169.254 is a cloud metadata service",
        )

    def test_wideAddressRule(self) -> None:
        """
        An address rule wider than a protected block (C{0.0.0.0/0},
        C{::/0}, C{169.254.0.0/16} for the metadata address) does not name
        it, for names and for literals alike; it does allow ordinary
        addresses.
        """
        p = policy(rule(["0.0.0.0/0", "::/0"]))
        for address in PROTECTED_ADDRESSES:
            self.assertDenied(p.check("alice", "h.example", address, 443, "tcp"), reason="only a rule naming it")
            literal = address.split("%")[0]
            self.assertDenied(p.check("alice", literal, address, 443, "tcp"), reason="only a rule naming it")
        for address in ORDINARY_ADDRESSES:
            self.assertAllowed(p.check("alice", "h.example", address, 443, "tcp"), rule=0)
        p = policy(rule("169.254.0.0/16"))
        self.assertAllowed(p.check("alice", "h.example", "169.254.1.1", 80, "tcp"))
        self.assertDenied(p.check("alice", "h.example", "169.254.169.254", 80, "tcp"), reason="a cloud metadata service")

    def test_namedByAddress(self) -> None:
        """
        A rule naming a protected address by an address or network within
        its block allows it, whether asked by name or by literal.
        """
        cases = [
            ("127.0.0.0/8", ["127.0.0.1", "127.1.2.3", "::ffff:127.0.0.1"]),
            ("127.0.0.1/32", ["127.0.0.1"]),
            ("127.0.0.1", ["127.0.0.1"]),
            ("::1/128", ["::1"]),
            ("::1", ["::1"]),
            ("169.254.169.254/32", ["169.254.169.254", "::ffff:169.254.169.254"]),
            ("fd00:ec2::254/128", ["fd00:ec2::254"]),
            ("169.254.0.0/16", ["169.254.1.1"]),
            ("fe80::/10", ["fe80::1", "fe80::1%eth0"]),
            ("fe80::/64", ["fe80::1"]),
            ("0.0.0.0/8", ["0.0.0.0"]),
            ("0.0.0.0/32", ["0.0.0.0"]),
            ("::/128", ["::"]),
            ("100.100.100.200/32", ["100.100.100.200"]),
            ("168.63.129.16", ["168.63.129.16"]),
        ]
        for network, addresses in cases:
            p = policy(rule(network))
            for address in addresses:
                self.assertAllowed(p.check("alice", "h.example", address, 22, "tcp"), rule=0)
                literal = address.split("%")[0]
                self.assertAllowed(p.check("alice", literal, address, 22, "tcp"), rule=0)

    def test_laterRuleNamesIt(self) -> None:
        """
        A name rule passed over for a protected address leaves the decision
        to later rules: one naming the address allows it, a deny denies it.
        """
        p = policy(rule("*"), rule("127.0.0.0/8"))
        self.assertAllowed(p.check("alice", "localhost", "127.0.0.1", 22, "tcp"), rule=1)
        p = policy(rule("*"), rule("127.0.0.0/8", action="deny"), rule("127.0.0.1"))
        self.assertDenied(p.check("alice", "localhost", "127.0.0.1", 22, "tcp"), rule=1)

    def test_denyStillDenies(self) -> None:
        """
        A deny rule matching by name refuses a protected address too.
        """
        p = policy(rule("localhost", action="deny"), rule("127.0.0.0/8"))
        self.assertDenied(p.precheck("alice", "localhost", 22, "tcp"), rule=0)
        self.assertDenied(p.check("alice", "localhost", "127.0.0.1", 22, "tcp"), rule=0)
        self.assertAllowed(p.check("alice", "127.0.0.1", "127.0.0.1", 22, "tcp"), rule=1)

    def test_protectedBlock(self) -> None:
        """
        L{protectedBlock} gives the narrowest listed block and why, or
        L{None}.
        """
        net, why = protectedBlock(ipaddress.ip_address("169.254.169.254"))  # type: ignore[misc]
        self.assertEqual((str(net), why), ("169.254.169.254/32", "a cloud metadata service"))
        net, why = protectedBlock(ipaddress.ip_address("169.254.9.9"))  # type: ignore[misc]
        self.assertEqual((str(net), why), ("169.254.0.0/16", "link-local"))
        net, why = protectedBlock(ipaddress.ip_address("::1"))  # type: ignore[misc]
        self.assertEqual((str(net), why), ("::1/128", "loopback"))
        self.assertIsNone(protectedBlock(ipaddress.ip_address("8.8.8.8")))
        self.assertIsNone(protectedBlock(ipaddress.ip_address("2001:db8::1")))
        self.assertEqual(len(PROTECTED), 10)

    def test_normalizeAddress(self) -> None:
        """
        IPv4-mapped IPv6 becomes IPv4, a zone index is dropped, and parsed
        addresses pass through.
        """
        self.assertEqual(normalizeAddress("::ffff:127.0.0.1"), ipaddress.IPv4Address("127.0.0.1"))
        self.assertEqual(normalizeAddress(ipaddress.ip_address("::ffff:10.0.0.1")), ipaddress.IPv4Address("10.0.0.1"))
        self.assertEqual(normalizeAddress("fe80::1%eth0"), ipaddress.IPv6Address("fe80::1"))
        self.assertEqual(normalizeAddress("10.0.0.1"), ipaddress.IPv4Address("10.0.0.1"))
        self.assertEqual(normalizeAddress("2001:db8::1"), ipaddress.IPv6Address("2001:db8::1"))


class ParsePolicyErrorTests(SynchronousTestCase):
    def assertConfigError(self, message: str, rules: Any, groups: Any = None) -> None:
        """
        Assert that parsing fails with a message starting with C{message}.
        """
        e = self.assertRaises(ConfigError, parsePolicy, rules, groups)
        self.assertTrue(str(e).startswith(message), f"{str(e)!r} does not start with {message!r}")

    def test_rulesNotArray(self) -> None:
        """
        C{rules} must be an array of tables.
        """
        self.assertConfigError("rules: expected an array of tables", {"hosts": "*"})
        self.assertConfigError("rules: expected an array of tables", "allow all")
        self.assertConfigError("rules[2]: expected a table", [rule("h"), "allow"])

    def test_unknownKeys(self) -> None:
        """
        Unknown keys in a rule are named; C{comment} is allowed.
        """
        self.assertConfigError("rules[2]: unknown key(s) host, port", [rule("h"), rule("h", host="x", port=1)])
        self.assertEqual(len(parsePolicy([rule("h", comment="why")], None).rules), 1)

    def test_action(self) -> None:
        """
        C{action} is C{allow} (the default) or C{deny}.
        """
        self.assertConfigError(
            "rules[1].action: expected \"allow\" or \"deny\", got 'permit'", [rule("h", action="permit")]
        )
        self.assertConfigError("rules[1].action:", [rule("h", action="ALLOW")])
        self.assertConfigError("rules[1].action:", [rule("h", action=True)])
        self.assertConfigError("rules[1].action:", [rule("h", action=["deny"])])
        self.assertEqual(parsePolicy([rule("h")], None).rules[0].action, "allow")
        self.assertEqual(parsePolicy([rule("h", action="deny")], None).rules[0].action, "deny")

    def test_missing(self) -> None:
        """
        C{identities}, C{hosts} and C{ports} are required.
        """
        for key in ("identities", "hosts", "ports"):
            raw = rule("h")
            del raw[key]
            self.assertConfigError(f"rules[2].{key}: missing", [rule("h"), raw])

    def test_stringLists(self) -> None:
        """
        C{identities}, C{hosts} and C{transports} must be a non-empty
        string or a list of them.
        """
        for key in ("identities", "hosts", "transports"):
            for value in (1, [""], "", ["a", 2], {"a": 1}, None):
                raw = rule("h")
                raw[key] = value
                self.assertConfigError(f"rules[1].{key}: expected a string or a list of non-empty strings", [raw])

    def test_badPorts(self) -> None:
        """
        Ports out of 1-65535, empty or malformed ranges and other types are
        refused, naming the rule.
        """
        for ports in (0, 65536, -1, "0", "65536", "80-79", "0-10", "1-65536", "abc", "80-", "-80", "1-2-3", "0x50", "80,443", [22, 0], [22, "x"]):
            self.assertConfigError("rules[2].ports: ", [rule("h"), rule("h", ports=ports)])
        for ports in (True, 1.5, [], None, {"a": 1}, [[22]], [True]):
            self.assertConfigError("rules[2].ports: ", [rule("h"), rule("h", ports=ports)])
        self.assertConfigError(
            "rules[1].ports: '80-79' is outside 1-65535 or an empty range", [rule("h", ports="80-79")]
        )
        self.assertConfigError(
            "rules[1].ports: 'http' is not a port or a range \"LO-HI\"", [rule("h", ports="http")]
        )

    def test_badCIDR(self) -> None:
        """
        A host that looks like an address must be a valid address or
        network.
        """
        for host in ("10.0.0.1/8", "10.0.0.0/33", "300.1.1.1", "1.2.3", "fe80::/129", "fe80::1::2", "10.0.0.0/", "10.0.0.0/x", "[::1]", "a.example:443"):
            e = self.assertRaises(ConfigError, parsePolicy, [rule("h"), rule(["ok.example", host])], None)
            self.assertTrue(
                str(e).startswith(f"rules[2].hosts: {host!r} is not a valid address or CIDR network"), str(e)
            )

    def test_badNameGlob(self) -> None:
        """
        A name entry of C{hosts} must be a host name glob
        (L{tpproxy.names.isHostGlob}): one that no host name can match is
        refused when the policy is read, not left to match nothing.  C{_},
        single labels and the glob wildcards are fine.
        """
        for host in ("exa mple.org", "a..example", ".example.org", "-db.example", "db-.example", "a" * 64 + ".example",
                     "example.org..", "*.123", "\u212a.example", "caf\u00e9.example", "a\\b"):
            e = self.assertRaises(ConfigError, parsePolicy, [rule("h"), rule(["ok.example", host])], None)
            self.assertTrue(str(e).startswith(f"rules[2].hosts: {host!r} is not a host name or name glob"), str(e))
        p = parsePolicy([rule(["_srv._tcp.example.org", "db", "node[0-2]?.x", "*", "DB.Example.ORG."])], None)
        self.assertEqual(
            [h.text for h in p.rules[0].hosts], ["_srv._tcp.example.org", "db", "node[0-2]?.x", "*", "db.example.org"]
        )

    def test_badExposureNames(self) -> None:
        """
        C{[[exposures]] names} are E2E name globs
        (L{tpproxy.names.isCertificateNameGlob}), normalized: no C{_}, no
        address, nothing no E2E name can match.
        """
        def exposures(*names: str) -> list[dict[str, Any]]:
            return [{"identities": "*", "names": list(names), "dialers": "*"}]

        p = parsePolicy([], None, exposures("*", "*.Localhost.", "nas", "node[0-2].example"))
        self.assertEqual(p.exposures[0].names, ("*", "*.localhost", "nas", "node[0-2].example"))
        for name in ("_ssh.localhost", "*_x", "a b", "a..localhost", "10.0.0.1", "\u212a.localhost"):
            e = self.assertRaises(ConfigError, parsePolicy, [], None, exposures("ok.localhost", name))
            self.assertTrue(str(e).startswith(f"exposures[1].names: {name!r} is not an E2E name"), str(e))

    def test_badTransport(self) -> None:
        """
        Transports are C{tcp} and C{udp}, lowercase.
        """
        for transport in ("sctp", "TCP", ["tcp", "quic"]):
            e = self.assertRaises(ConfigError, parsePolicy, [rule("h", transports=transport)], None)
            self.assertIn("rules[1].transports: ", str(e))
            self.assertIn('is not "tcp" or "udp"', str(e))

    def test_badGroups(self) -> None:
        """
        C{groups} is a table of names to identity lists.
        """
        self.assertConfigError("groups: expected a table", [], ["alice"])
        self.assertConfigError("groups.ops: expected a string or a list of non-empty strings", [], {"ops": [1]})
        self.assertConfigError("groups.ops: ", [], {"ops": [""]})


class StrictnessTests(SynchronousTestCase):
    """
    Entries that used to be accepted loosely are now exact.
    """

    def test_identityWildcardIsOnlyStar(self) -> None:
        """
        C{?} and C{[} in an identity entry are literal; C{*} is a wildcard.
        """
        from tpproxy.policy import identityMatches

        self.assertTrue(identityMatches("a?b", "a?b"))
        self.assertFalse(identityMatches("a?b", "axb"))
        self.assertFalse(identityMatches("dev[1]", "dev1"))
        self.assertTrue(identityMatches("*@example.org", "alice@example.org"))
        self.assertFalse(identityMatches("*@example.org", "alice@example.org.evil"))

    def test_portSpellings(self) -> None:
        """
        Ports are plain decimal digits: C{"8_0"}, C{" 80"} and C{"+80"} are
        refused, naming the key.
        """
        for bad in ("8_0", " 80", "+80", "80 - 90"):
            error = self.assertRaises(
                ConfigError, parsePolicy, [{"identities": "*", "hosts": "10.0.0.0/8", "ports": bad}], None
            )
            self.assertIn("rules[1].ports", str(error))

    def test_mappedNetworkRefused(self) -> None:
        """
        An IPv4-mapped IPv6 network would never match (addresses are checked
        as IPv4), so it is refused with a hint.
        """
        error = self.assertRaises(
            ConfigError, parsePolicy, [{"identities": "*", "hosts": "::ffff:10.0.0.0/104", "ports": 22}], None
        )
        self.assertIn("write the IPv4 form", str(error))


#: Exposure rules of issue 10: the dev group may expose any *.localhost name
#: to dev; bob may expose bob.localhost to alice only.  alice is in both
#: dialer lists (as a dev member and by name).
EXPOSURE_GROUPS = {"dev": ["alice", "mallory"]}
EXPOSE_DEV = {"identities": ["group:dev"], "names": "*.localhost", "dialers": ["group:dev"]}
EXPOSE_BOB = {"identities": ["bob"], "names": "bob.localhost", "dialers": ["alice"]}


class ExposureDialerTests(SynchronousTestCase):
    """
    L{Policy.mayExposeName} names the rule that authorized the exposer, and
    L{Policy.mayDialExposure} answers by that rule's dialers only, never by
    another rule that merely matches the name.
    """

    def grantedBy(self, policy: Policy, identity: str, name: str) -> Any:
        decision = policy.mayExposeName(identity, name)
        self.assertTrue(decision.allowed, decision)
        assert decision.rule is not None
        return policy.exposures[decision.rule]

    def checkBothExposers(self, exposures: list[dict[str, Any]]) -> None:
        policy = parsePolicy([], EXPOSURE_GROUPS, exposures)
        bobs = self.grantedBy(policy, "bob", "bob.localhost")
        self.assertEqual(bobs.identities, ("bob",))
        self.assertTrue(policy.mayDialExposure(bobs, "alice", "bob.localhost").allowed)
        refused = policy.mayDialExposure(bobs, "mallory", "bob.localhost")
        self.assertFalse(refused.allowed)
        self.assertIn("mallory is not among the dialers of bob.localhost", refused.reason)
        self.assertEqual(refused.rule, bobs.index)
        self.assertFalse(policy.mayDialExposure(bobs, "bob", "bob.localhost").allowed)
        # The same name exposed by a dev member is governed by the dev rule.
        alices = self.grantedBy(policy, "alice", "bob.localhost")
        self.assertEqual(alices.names, ("*.localhost",))
        self.assertTrue(policy.mayDialExposure(alices, "mallory", "bob.localhost").allowed)
        self.assertTrue(policy.mayDialExposure(alices, "alice", "bob.localhost").allowed)
        self.assertFalse(policy.mayDialExposure(alices, "bob", "bob.localhost").allowed)

    def test_wideRuleFirst(self) -> None:
        """
        The dev rule, which matches bob.localhost by its names but does not
        list bob, comes first: bob's exposure still has bob's dialers.
        """
        self.checkBothExposers([EXPOSE_DEV, EXPOSE_BOB])

    def test_exposerRuleFirst(self) -> None:
        """
        bob's rule first: the same answers.
        """
        self.checkBothExposers([EXPOSE_BOB, EXPOSE_DEV])

    def test_firstGrantingRuleDecides(self) -> None:
        """
        When several rules let the same exposer expose the name, the first
        of them in file order gives the dialers (the first match decides,
        as everywhere in the policy); the later one adds none.
        """
        wide = {"identities": ["bob"], "names": "*.localhost", "dialers": ["mallory"]}
        policy = parsePolicy([], EXPOSURE_GROUPS, [EXPOSE_BOB, wide])
        first = self.grantedBy(policy, "bob", "bob.localhost")
        self.assertEqual(first.index, 0)
        self.assertTrue(policy.mayDialExposure(first, "alice", "bob.localhost").allowed)
        self.assertFalse(policy.mayDialExposure(first, "mallory", "bob.localhost").allowed)
        policy = parsePolicy([], EXPOSURE_GROUPS, [wide, EXPOSE_BOB])
        first = self.grantedBy(policy, "bob", "bob.localhost")
        self.assertEqual(first.index, 0)
        self.assertTrue(policy.mayDialExposure(first, "mallory", "bob.localhost").allowed)
        self.assertFalse(policy.mayDialExposure(first, "alice", "bob.localhost").allowed)

    def test_groupDialers(self) -> None:
        """
        A C{group:NAME} dialer entry admits the group's members only.
        """
        policy = parsePolicy([], EXPOSURE_GROUPS, [EXPOSE_BOB, EXPOSE_DEV])
        devs = self.grantedBy(policy, "mallory", "m.localhost")
        self.assertTrue(policy.mayDialExposure(devs, "alice", "m.localhost").allowed)
        self.assertFalse(policy.mayDialExposure(devs, "bob", "m.localhost").allowed)
