# -*- test-case-name: tpproxy.test.test_names -*-
"""
What a name is, for each place where TP takes one: one grammar per use, all
in this module, so that a name one part accepts is not refused by another
without a reason written here.

Rules every grammar shares (RFC 1034 section 3.1, RFC 1123 section 2.1):

  - ASCII only, compared case-insensitively: L{normalize} lowercases and
    drops one final dot.  (Lowercasing is done after the ASCII check:
    C{str.lower} maps the Kelvin sign U+212A to C{k}.)  Internationalized
    names are written as A-labels (C{xn--...}), taken as plain labels: their
    punycode is not checked;
  - labels of 1 to 63 characters, not starting or ending with a hyphen (a
    digit may start one, RFC 1123);
  - at most 253 characters, not counting a final dot (255 octets on the
    wire, RFC 1035 section 2.3.4);
  - the last label is not a number, decimal or C{0x} hex: C{inet_aton},
    and so C{getaddrinfo}, reads C{127.1}, C{0x7f.1} or C{1.2.3} as an IPv4
    address (as URL parsers do, WHATWG URL "ends in a number"), so such a
    "name" would mean one thing to the policy and the logs and another to
    the resolver.  IP literals are told apart with L{ipaddress} where a use
    takes them.

How the uses differ:

  - a destination host (L{isDestinationHost}: C{host} of a C{connect} or
    C{udp} ClientHello, C{tp connect}/C{up}/C{expose} HOST) is resolved by
    TP's resolver, so it may be a single label (C{db}, which the resolver
    may complete with its search domains), hold C{_} (DNS owner names such
    as C{_srv._tcp.example.org}; resolvers and hosts files take them), end
    in a dot (a fully qualified name: no search domains; kept as given,
    since it means something to the resolver), or be an IP literal;
  - a server name in a TLS ClientHello (L{serverName}, read by the router)
    is what clients send: like a host name, C{_} and single labels
    included.  RFC 6066 allows neither a final dot nor an IP literal, but
    clients send both: a final dot is dropped (as TP's own TLS server does
    with OpenSSL's SNI), and an IP literal is read as no server name, since
    no route is named by an address;
  - a certificate name (L{isCertificateName}: an E2E exposure name, the
    keys of C{[e2e.certificates]}, C{router.terminate.names}) is one TP
    serves under a certificate, so it has a certificate's name syntax:
    letters, digits and hyphens only, no C{_} (RFC 5280 section 4.2.1.6,
    "preferred name syntax"; the CA/Browser Forum rules forbid C{_}), no
    IP literal, no wildcard (these are exact names).  A single label is a
    name: a private CA (C{[e2e] ca_certificate}, C{tp init-dev}'s) or an
    operator's certificate file can name C{nas}, and TP's own dev name is
    C{localhost};
  - an ACME name (L{isAcmeName}: C{acme.names}, and E2E names certified by
    ACME) is a certificate name of at least two labels: an ACME CA
    certifies only names under a registered domain.  The ACME identifier
    (L{ACME_IDENTIFIER}) may start with C{*.} (RFC 8555 section 7.1.3),
    which TP cannot get (it answers no dns-01 challenge);
  - a name glob (L{isHostGlob} for C{[[rules]] hosts}, L{isCertificateNameGlob}
    for C{[[exposures]] names}) is matched with L{fnmatch.fnmatchcase}
    against names of the grammar it stands for: C{*} (any characters, dots
    included), C{?} and C{[...]} are wildcards.  A glob is accepted when
    writing one letter for each wildcard gives a name of that grammar: one
    that no name can match (C{"exa mple.org"}, C{"a..b"}, C{"*_x"} for E2E
    names) is a mistake in the file, refused when it is read.
"""

from __future__ import annotations

import ipaddress
import re

#: The longest name, in characters, without its final dot.
MAX_NAME = 253
#: The longest label.
MAX_LABEL = 63

_LDH = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LDH_UNDERSCORE = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NOT_A_NUMBER = r"(?!(?:[0-9]+|0x[0-9a-f]*)\Z)"
_LENGTH = rf"(?=.{{1,{MAX_NAME}}}\Z)"

#: A host name, lowercase without a final dot: labels of letters, digits,
#: hyphens and C{_}; one label or more (see L{isHostName}).
HOST_NAME = re.compile(rf"{_LENGTH}(?:{_LDH_UNDERSCORE}\.)*{_NOT_A_NUMBER}{_LDH_UNDERSCORE}\Z")
#: A certificate name, lowercase without a final dot: labels of letters,
#: digits and hyphens; one label or more (see L{isCertificateName}).
CERTIFICATE_NAME = re.compile(rf"{_LENGTH}(?:{_LDH}\.)*{_NOT_A_NUMBER}{_LDH}\Z")
#: An ACME C{dns} identifier, lowercase without a final dot: a certificate
#: name of two labels or more, optionally after C{*.} (a wildcard order,
#: RFC 8555 section 7.1.3).  L{tpproxy.acme} keys its store by these.
ACME_IDENTIFIER = re.compile(rf"{_LENGTH}(?:\*\.)?(?:{_LDH}\.)+{_NOT_A_NUMBER}{_LDH}\Z")

#: What L{fnmatch.fnmatchcase} reads as wildcards: C{*}, C{?}, C{[...]}.
_WILDCARDS = re.compile(r"\*|\?|\[!?\]?[^]]*\]")


def normalize(name: str) -> str:
    """
    The form in which TP compares and stores names: lowercase, without a
    final dot.  Only for names a grammar here accepted (ASCII).
    """
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def _normalized(name: object) -> str | None:
    """
    L{normalize}d C{name}, or L{None} if it is not an ASCII string.
    """
    if not isinstance(name, str) or not name.isascii():
        return None
    return normalize(name)


def isIPLiteral(text: str) -> bool:
    """
    Is C{text} an IPv4 or IPv6 address, as L{ipaddress} reads it (dotted
    quad with no leading zeros; IPv6 without brackets, maybe with a
    C{%zone})?
    """
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def isHostName(name: str) -> bool:
    """
    Is C{name} a host name a resolver can be asked for?  Any case, one
    final dot allowed, C{_} and single labels allowed (see the module
    docstring).  IP literals are not host names.
    """
    text = _normalized(name)
    return text is not None and HOST_NAME.fullmatch(text) is not None


def isDestinationHost(host: str) -> bool:
    """
    Can C{host} be dialled: an IP literal or a L{host name<isHostName>}?
    This is the C{host} of a C{connect} or C{udp} ClientHello and the HOST
    of C{tp connect HOST:PORT}.
    """
    return isIPLiteral(host) or isHostName(host)


def isCertificateName(name: str) -> bool:
    """
    Is C{name} a name TP can serve under a certificate (an E2E exposure
    name, an C{[e2e.certificates]} key, a C{router.terminate.names} entry)?
    Letters, digits and hyphens, one label or more, any case, one final
    dot allowed; no C{_}, no wildcard, no IP literal.
    """
    text = _normalized(name)
    return text is not None and CERTIFICATE_NAME.fullmatch(text) is not None


def isAcmeName(name: str) -> bool:
    """
    Is C{name} a name TP can get from an ACME CA: a L{certificate
    name<isCertificateName>} of two labels or more, not a wildcard?
    """
    text = _normalized(name)
    return text is not None and not text.startswith("*.") and ACME_IDENTIFIER.fullmatch(text) is not None


def serverName(raw: bytes) -> str | None:
    """
    Read the C{host_name} of a TLS server_name extension (RFC 6066 section
    3): the name, L{normalize}d; or L{None} for an IP literal (which RFC
    6066 does not allow in it, and which names no route).  Labels as in a
    L{host name<isHostName>}; a final dot is dropped.

    @raise ValueError: if C{raw} is not a host name, saying why.
    """
    if not raw.isascii():
        raise ValueError("host_name is not ASCII")
    text = raw.decode("ascii")
    if isIPLiteral(text):
        return None
    name = normalize(text)
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"host_name of {len(raw)} bytes")
    if HOST_NAME.fullmatch(name) is None:
        raise ValueError(f"{raw[:80]!r} is not a DNS host name")
    return name


def _globName(pattern: str) -> str:
    """
    C{pattern} with each wildcard written as one letter: a name that the
    glob matches if any name of the same grammar does.  (C{z}, not a hex
    digit, so that C{0x*} stays a possible name.)
    """
    return _WILDCARDS.sub("z", pattern)


def isHostGlob(pattern: str) -> bool:
    """
    Is C{pattern} a name glob of C{[[rules]] hosts}: a L{host
    name<isHostName>} in which C{*}, C{?} and C{[...]} may stand for
    characters?  (Addresses and networks in C{hosts} are told apart
    before, by L{tpproxy.policy.HostPattern.parse}.)
    """
    text = _normalized(pattern)
    return text is not None and HOST_NAME.fullmatch(_globName(text)) is not None


def isCertificateNameGlob(pattern: str) -> bool:
    """
    Is C{pattern} a name glob of C{[[exposures]] names}: a L{certificate
    name<isCertificateName>} in which C{*}, C{?} and C{[...]} may stand for
    characters?
    """
    text = _normalized(pattern)
    return text is not None and CERTIFICATE_NAME.fullmatch(_globName(text)) is not None
