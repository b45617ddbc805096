"""Remote host values (PAM_RHOST): one spelling per host, so a lockout key cannot be dodged.

A client names the remote host by IP address or by host name. The C library reads many
spellings of one IPv4 address (`3325256711`, `0xc6.51.100.7`, `198.051.100.007` — where the
leading zeros mean octal to `inet_aton` but decimal to a person), and one IPv6 host usually
has a whole /64 to pick addresses from. If the lockout counted each spelling or address apart,
rotating them would reset the rhost budget. So a value is either an address, parsed by the
stdlib `ipaddress` (which takes only the plain dotted quad and standard IPv6 text), or a DNS
host name whose last label starts with a letter, which no numeric spelling does. Everything
else is refused: the numeric forms are ambiguous, and anything that is neither an address nor
a name has no host to count. IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 well-known-prefix
(`64:ff9b::a.b.c.d`) addresses are the IPv4 host they carry. Names are case-folded and lose a
trailing dot; they are counted as given (PAM_RHOST may carry a reverse-DNS name) and never
resolved, which would put DNS in the path of every login.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from ipaddress import IPv4Address, IPv6Address, IPv6Network

Host = IPv4Address | IPv6Address | str
"""A parsed rhost: an address, or a lower-case host name without trailing dot."""

INVALID = "rhost must be an IP address (a.b.c.d or IPv6) or a host name; other numeric forms are ambiguous"
"""The one error message: it never quotes the value, which a client chose."""

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z)(?:{_LABEL}\.)*(?=[a-z_]){_LABEL}\.?\Z")
"""A DNS name (underscores allowed, as in systemd-resolved's `_gateway`) whose last label does
not start with a digit, so no spelling of an address (all digits, or `0x...`) is taken for one."""

_NAT64 = IPv6Network("64:ff9b::/96")


@functools.lru_cache(maxsize=4096)
def parse(value: str) -> Host:
    """The host a value names; ValueError (with the message INVALID) if it names none clearly."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        name = value.lower()
        if not HOSTNAME.match(name):
            raise ValueError(INVALID) from None
        return name.rstrip(".")
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        bare = IPv6Address(int(address))  # without a %scope, which names an interface, not a host
        if bare in _NAT64:
            return IPv4Address(int(bare) & 0xFFFFFFFF)
        return bare
    return address


def key(host: Host, ipv6_prefix: int) -> str:
    """What the lockout counts `host` under: the address, its IPv6 /`ipv6_prefix`, or the name."""
    if isinstance(host, IPv6Address) and ipv6_prefix < 128:
        shift = 128 - ipv6_prefix
        return str(IPv6Network((int(host) >> shift << shift, ipv6_prefix)))
    return str(host)
