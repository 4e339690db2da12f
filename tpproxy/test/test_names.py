"""
The name grammars of L{tpproxy.names}, side by side: where they differ,
they differ on purpose, and the table says how.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.names import (
    ACME_IDENTIFIER,
    isAcmeName,
    isCertificateName,
    isCertificateNameGlob,
    isDestinationHost,
    isHostGlob,
    isHostName,
    normalize,
    serverName,
)

L63 = "a" * 63
#: 253 characters: the longest name.
N253 = (L63 + ".") * 3 + "a" * 61

Y, N = True, False
#: SNI verdicts: the name read, L{None} (read as no name), or refused.
ERR = "refused"

#: (name, destination host, SNI, certificate name (E2E), ACME name,
#: [[rules]] hosts glob, [[exposures]] names glob)
TABLE: list[tuple[str, bool, str | None, bool, bool, bool, bool]] = [
    # A single label: a resolver may complete it; a private CA may certify
    # it; an ACME CA will not.
    ("db", Y, "db", Y, N, Y, Y),
    ("localhost", Y, "localhost", Y, N, Y, Y),
    ("db.example.org", Y, "db.example.org", Y, Y, Y, Y),
    # _: in DNS owner names, not in certificate names.
    ("_srv._tcp.example.org", Y, "_srv._tcp.example.org", N, N, Y, N),
    ("a_b.example.org", Y, "a_b.example.org", N, N, Y, N),
    # A final dot: allowed everywhere, dropped by normalize (and kept as
    # given in a ClientHello host, where it means "no search domains").
    ("db.example.org.", Y, "db.example.org", Y, Y, Y, Y),
    ("db.example.org..", N, ERR, N, N, N, N),
    (".", N, ERR, N, N, N, N),
    # Case does not matter.
    ("DB.Example.ORG", Y, "db.example.org", Y, Y, Y, Y),
    # IDN as A-labels.
    ("xn--bcher-kva.example", Y, "xn--bcher-kva.example", Y, Y, Y, Y),
    ("bücher.example", N, ERR, N, N, N, N),
    # Label and name lengths.
    (L63 + ".example", Y, L63 + ".example", Y, Y, Y, Y),
    ("a" * 64 + ".example", N, ERR, N, N, N, N),
    (N253, Y, N253, Y, Y, Y, Y),
    (N253 + ".", Y, N253, Y, Y, Y, Y),
    (N253 + "a", N, ERR, N, N, N, N),
    # Empty labels and hyphens at the ends of a label.
    ("a..example", N, ERR, N, N, N, N),
    (".example", N, ERR, N, N, N, N),
    ("", N, ERR, N, N, N, N),
    ("-db.example", N, ERR, N, N, N, N),
    ("db-.example", N, ERR, N, N, N, N),
    ("d-b.example", Y, "d-b.example", Y, Y, Y, Y),
    ("1db.example", Y, "1db.example", Y, Y, Y, Y),
    # IP literals: a destination host may be one; no name grammar takes
    # them; in SNI one is read as no name.
    ("192.0.2.1", Y, None, N, N, N, N),
    ("2001:db8::1", Y, None, N, N, N, N),
    ("::ffff:127.0.0.1", Y, None, N, N, N, N),
    # As a glob, "[::1]" is one character of ":1" (policy.HostPattern
    # reads it as an address first, and refuses it).
    ("[::1]", N, ERR, N, N, Y, Y),
    # A last label that is a number: inet_aton reads these as addresses.
    ("127.1", N, ERR, N, N, N, N),
    ("1.2.3", N, ERR, N, N, N, N),
    ("example.123", N, ERR, N, N, N, N),
    ("0x7f.1", N, ERR, N, N, N, N),
    ("1.0x7f", N, ERR, N, N, N, N),
    ("123.example", Y, "123.example", Y, Y, Y, Y),
    ("1.0xz", Y, "1.0xz", Y, Y, Y, Y),
    # Wildcards: only globs take them (in an ACME identifier, see below).
    ("*.example.org", N, ERR, N, N, Y, Y),
    ("*", N, ERR, N, N, Y, Y),
    ("db?.example.org", N, ERR, N, N, Y, Y),
    ("node[0-2].example.org", N, ERR, N, N, Y, Y),
    ("*_x.example.org", N, ERR, N, N, Y, N),
    ("*.1", N, ERR, N, N, N, N),
    # Not names at all.
    ("exa mple.org", N, ERR, N, N, N, N),
    ("example.org\n", N, ERR, N, N, N, N),
    ("example.org:443", N, ERR, N, N, N, N),
    # The Kelvin sign, which str.lower() turns into an ASCII "k".
    ("\u212a.example", N, ERR, N, N, N, N),
]


class TableTests(SynchronousTestCase):
    """
    Each name of L{TABLE} gets the verdict the table gives under each
    grammar.
    """

    def test_table(self) -> None:
        grammars = [
            ("destination host", isDestinationHost),
            ("certificate name", isCertificateName),
            ("ACME name", isAcmeName),
            ("host glob", isHostGlob),
            ("certificate name glob", isCertificateNameGlob),
        ]
        wrong = []
        for name, host, sni, cert, acme, hostGlob, certGlob in TABLE:
            for (grammar, accepts), expected in zip(grammars, (host, cert, acme, hostGlob, certGlob)):
                if accepts(name) is not expected:
                    wrong.append(f"{grammar}({name[:70]!r}) is {not expected}")
            try:
                got: str | None = serverName(name.encode("utf-8"))
            except ValueError:
                got = ERR
            if got != sni:
                wrong.append(f"serverName({name[:70]!r}) is {got!r}, not {sni!r}")
        self.assertEqual(wrong, [])

    def test_hostNameIsNotAnAddress(self) -> None:
        """
        L{isHostName} is the name half of L{isDestinationHost}: addresses
        are not host names.
        """
        self.assertTrue(isDestinationHost("192.0.2.1"))
        self.assertFalse(isHostName("192.0.2.1"))
        self.assertTrue(isHostName("db"))

    def test_acmeIdentifier(self) -> None:
        """
        L{ACME_IDENTIFIER} (C{tpproxy.config.DNS_NAME} for the ACME store)
        is an ACME name, lowercase without a final dot, or a wildcard one;
        L{isAcmeName} refuses the wildcard, which needs dns-01.
        """
        for text in ("tp.example.org", "*.example.org"):
            self.assertIsNotNone(ACME_IDENTIFIER.fullmatch(text), text)
        for text in ("*.org", "tp", "TP.example.org", "tp.example.org.", "*.*.example.org", "_a.example.org", "tp.example.org\n"):
            self.assertIsNone(ACME_IDENTIFIER.fullmatch(text), text)
        self.assertFalse(isAcmeName("*.example.org"))

    def test_configReExport(self) -> None:
        """
        L{tpproxy.acme} imports C{DNS_NAME} from L{tpproxy.config}: it is
        L{ACME_IDENTIFIER}.
        """
        from tpproxy.config import DNS_NAME

        self.assertIs(DNS_NAME, ACME_IDENTIFIER)

    def test_normalize(self) -> None:
        """
        L{normalize} lowercases and drops one final dot, no more.
        """
        self.assertEqual(normalize("DB.Example.ORG."), "db.example.org")
        self.assertEqual(normalize("db.example.org"), "db.example.org")
        self.assertEqual(normalize("a.."), "a.")


#: Short strings over the characters that matter, so that most draws sit on
#: the edges between grammars.
_texts = st.text(alphabet="aZ09x-_.*?[]\u212a", max_size=12)


class InclusionTests(SynchronousTestCase):
    """
    The grammars nest as the module says, for any text.
    """

    @settings(max_examples=2000, derandomize=True, database=None, deadline=None)
    @given(_texts)
    def test_nested(self, text: str) -> None:
        """
        An ACME name is a certificate name; a certificate name is a host
        name and a server name TP reads from SNI as its normalized self;
        a host name is a destination host; each name is a glob of its own
        grammar that matches it.
        """
        if isAcmeName(text):
            self.assertTrue(isCertificateName(text))
        if isCertificateName(text):
            self.assertTrue(isHostName(text))
            self.assertTrue(isCertificateNameGlob(text))
            self.assertEqual(serverName(text.encode("ascii")), normalize(text))
        if isHostName(text):
            self.assertTrue(isDestinationHost(text))
            self.assertTrue(isHostGlob(text))
            self.assertEqual(serverName(text.encode("ascii")), normalize(text))
        if isCertificateNameGlob(text):
            self.assertTrue(isHostGlob(text))
