"""rhost values: one key per host whatever the spelling, IPv6 counted per prefix, odd forms refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from authd import rhost
from authd.lockout import Locked, Lockout
from authd.protocol import ProtocolError, decode_line

from ..clock import ManualClock
from .helpers import config, login, run

RHOST_ONLY = {"user": {"max_failures": 0}}


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("::FFFF:c633:6407", "198.51.100.7"),
        ("64:ff9b::198.51.100.7", "198.51.100.7"),  # NAT64 well-known prefix: the IPv4 host behind it
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:0db8:0001:0002:0000:0000:0000:0001", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("Mail.Example.ORG.", "mail.example.org"),
        ("localhost", "localhost"),
        ("_gateway", "_gateway"),
        ("3com.example", "3com.example"),
    ],
)
def test_every_spelling_of_a_host_gets_one_key(value: str, key: str) -> None:
    assert rhost.key(rhost.parse(value), 64) == key


@pytest.mark.parametrize(
    "value",
    [
        "198.051.100.007",  # octal to inet_aton, decimal to a reader
        "3325256711",  # one integer
        "0xc6336407",
        "0xc6.0x33.0x64.0x07",
        "198.51.25607",  # inet_aton's a.b.c form
        "198.51.100.7.",
        "198.51.100",
        "1.2.3.256",
        "2001:db8::1::2",
        "2001:db8::/64",
        "host name",
        "host\x1b[31m",
        "-leading.example",
        "müller.example",
        "a" * 64 + ".example",
        "",
    ],
)
def test_ambiguous_or_malformed_values_are_refused_without_quoting_them(value: str) -> None:
    with pytest.raises(ValueError) as exc:
        rhost.parse(value)
    assert str(exc.value) == rhost.INVALID
    request = {"id": 7, "op": "auth", "user": "alice", "password": "pw", "service": "login", "rhost": value}
    reply = decode_line(json.dumps(request).encode())
    if value:  # an empty rhost is refused by the length check instead
        assert isinstance(reply, ProtocolError) and reply.id == 7 and reply.error == "bad_request"
        assert reply.message == rhost.INVALID


def test_the_prefix_is_configurable() -> None:
    host = rhost.parse("2001:db8:1:2:3:4:5:6")
    assert rhost.key(host, 48) == "2001:db8:1::/48"
    assert rhost.key(host, 128) == "2001:db8:1:2:3:4:5:6"
    assert rhost.key(rhost.parse("198.51.100.7"), 48) == "198.51.100.7", "IPv4 is always one address"


@run
async def test_spellings_of_one_ipv4_share_a_budget(db_path: Path) -> None:
    lockout = Lockout(config(rhost={"max_failures": 3}, **RHOST_ONLY), db_path, clock=ManualClock())
    await login(lockout, "u1", "x", "198.51.100.7")
    await login(lockout, "u2", "x", "::ffff:198.51.100.7")
    (lock,) = await login(lockout, "u3", "x", "64:ff9b::c633:6407")
    assert lock.key == "198.51.100.7"
    lockout.close()


@run
async def test_addresses_in_one_ipv6_64_share_a_budget(db_path: Path) -> None:
    lockout = Lockout(config(rhost={"max_failures": 20}, **RHOST_ONLY), db_path, clock=ManualClock())
    imposed = [await login(lockout, f"u{i}", "x", f"2001:db8:5:6::{i + 1:x}") for i in range(20)]
    assert imposed[:19] == [()] * 19
    (lock,) = imposed[19]
    assert (lock.scope, lock.key) == ("rhost", "2001:db8:5:6::/64")
    assert isinstance(await lockout.begin("v", "2001:db8:5:6:aaaa::1", "x"), Locked)
    assert await login(lockout, "v", "x", "2001:db8:5:7::1") == (), "the next /64 is another host"
    assert lockout.unlock("2001:db8:5:6::beef", "rhost"), "an address inside the /64 clears it"
    await login(lockout, "w", "x", "2001:db8:5:6::1")
    assert lockout.unlock("2001:db8:5:6::/64", "rhost"), "so does the key as lockouts lists it"
    lockout.close()


@run
async def test_prefix_128_counts_each_address(db_path: Path) -> None:
    lockout = Lockout(config(rhost={"max_failures": 2}, ipv6_prefix=128, **RHOST_ONLY), db_path, clock=ManualClock())
    for i in range(5):
        assert await login(lockout, "u", f"x{i}", f"2001:db8::{i + 1}") == ()
    lockout.close()


@run
async def test_an_exempt_address_inside_a_counted_64_stays_exempt(db_path: Path) -> None:
    table = {"rhost": {"max_failures": 2}, "exempt_rhosts": ["2001:db8::10"], **RHOST_ONLY}
    lockout = Lockout(config(**table), db_path, clock=ManualClock())
    for i in range(5):
        assert await login(lockout, "monitor", f"x{i}", "2001:db8::10") == ()
    await login(lockout, "u", "a", "2001:db8::1")
    (lock,) = await login(lockout, "u", "b", "2001:db8::2")
    assert lock.key == "2001:db8::/64"
    assert not isinstance(await lockout.begin("monitor", "2001:db8::10", "y"), Locked)
    assert [row.key for row in lockout.lockouts()] == ["2001:db8::/64"], "only a network wholly exempt is hidden"
    lockout.close()


@run
async def test_host_names_count_case_folded(db_path: Path) -> None:
    lockout = Lockout(config(rhost={"max_failures": 2}, **RHOST_ONLY), db_path, clock=ManualClock())
    await login(lockout, "u", "a", "Mail.Example.org")
    (lock,) = await login(lockout, "u", "b", "mail.example.org.")
    assert lock.key == "mail.example.org"
    lockout.close()


@run
async def test_values_a_front_end_let_through_share_one_key(db_path: Path) -> None:
    """The native protocol refuses them; another front end that did not still cannot use them to rotate keys."""
    lockout = Lockout(config(rhost={"max_failures": 2}, **RHOST_ONLY), db_path, clock=ManualClock())
    await login(lockout, "u", "a", "3325256711")
    (lock,) = await login(lockout, "u", "b", "198.051.100.007")
    assert lock.key == "(invalid)"
    lockout.close()
