"""The AD realm's global names derive from its directory: two labs never share a namespace or a veth."""

from __future__ import annotations

from pathlib import Path

from proxy.lab import ad


def test_two_lab_directories_get_two_namespaces_and_valid_interface_names(tmp_path: Path) -> None:
    """Different directories give different namespace and veth names; veth names fit Linux's 15 characters."""
    one, two = ad.AdRealm.at(tmp_path / "a" / "ad"), ad.AdRealm.at(tmp_path / "b" / "ad")
    assert one.netns != two.netns
    assert set(one.veth).isdisjoint(two.veth)
    for name in (*one.veth, *two.veth):
        assert len(name) <= 15
    assert ad.AdRealm.at(tmp_path / "a" / "ad").netns == one.netns  # stable: a second `up` finds its namespace


def test_the_gateway_configuration_names_the_account_not_the_spn(tmp_path: Path) -> None:
    """The lab's gateway asks AD for a ticket as svc-kcdproxy@AD.TEST (AD gives none to a bare SPN)."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    text = ad.gateway_config(realm, port=9443, backend_port=9081)
    assert 'principal = "svc-kcdproxy@AD.TEST"' in text
    assert 'bind = "127.0.0.1:9443"' in text
    assert 'upstream = "http://127.0.0.1:9081"' in text
    assert 'spn = "HTTP/cas.ad.test"' in text
