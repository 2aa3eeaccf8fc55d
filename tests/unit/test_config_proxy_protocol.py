"""`[listener] proxy_protocol` and `trusted_proxies`: typed networks, and mistakes that name the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write

LISTENER = 'private_key = "tls/server.key"\n'


def _with(tmp_path: Path, lines: str) -> Path:
    return _write(tmp_path, GOOD.replace(LISTENER, LISTENER + lines, 1))


def test_off_by_default(tmp_path: Path) -> None:
    """Without the keys the listener takes TLS straight away and trusts no balancer."""
    listener = config.load(_write(tmp_path, GOOD)).listener
    assert (listener.proxy_protocol, listener.trusted_proxies) == (False, ())


def test_on_with_ipv4_and_ipv6_balancers(tmp_path: Path) -> None:
    """CIDR blocks come out as networks, parsed once."""
    text = 'proxy_protocol = true\ntrusted_proxies = ["10.0.1.0/24", "2001:db8::/64", "192.0.2.7/32"]\n'
    listener = config.load(_with(tmp_path, text)).listener
    assert listener.proxy_protocol is True
    assert listener.trusted_proxies == (
        ipaddress.ip_network("10.0.1.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
        ipaddress.ip_network("192.0.2.7/32"),
    )


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        ("proxy_protocol = true\n", "listener.trusted_proxies: proxy_protocol = true needs the balancers"),
        ('proxy_protocol = true\ntrusted_proxies = "10.0.0.0/8"\n', "listener.trusted_proxies: expected a list"),
        ('proxy_protocol = true\ntrusted_proxies = ["10.0.0.1/8"]\n', "listener.trusted_proxies[0]: expected a CIDR"),
        ('proxy_protocol = true\ntrusted_proxies = ["x", "10.0.0.0/8"]\n', "listener.trusted_proxies[0]: expected"),
        ("proxy_protocol = true\ntrusted_proxies = [10]\n", "listener.trusted_proxies[0]: expected a CIDR"),
        ('trusted_proxies = ["10.0.0.0/8"]\n', "listener.trusted_proxies: only meaningful with"),
        ('proxy_protocol = true\ntrusted_proxies = ["0.0.0.0/0"]\n', "listener.trusted_proxies[0]: 0.0.0.0/0 trusts"),
        ('proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8", "::/0"]\n', "listener.trusted_proxies[1]: ::/0"),
        ('proxy_protocol = "yes"\ntrusted_proxies = ["10.0.0.0/8"]\n', "listener.proxy_protocol: expected bool"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, lines: str, problem: str) -> None:
    """A forgotten list, a host address with a prefix, a non-string, a list without the switch, a block that
    trusts the whole Internet: each refused, naming the key."""
    with pytest.raises(ConfigError) as e:
        config.load(_with(tmp_path, lines))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
