"""The krb5 context held open so MIT keeps krb5.conf parsed between tokens (proxy.kerberos.profile)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.kerberos import profile


def test_one_context_is_held_per_configuration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "krb5.conf"
    conf.write_text("[libdefaults]\n    default_realm = LAB.TEST\n")
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    monkeypatch.setattr(profile, "_held", {})
    assert profile.hold_profile()
    first = profile._held[str(conf)]
    assert first.value  # a krb5_context pointer from libkrb5
    assert profile.hold_profile()
    assert profile._held == {str(conf): first}  # the second call opens nothing more


def test_a_configuration_krb5_refuses_holds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "krb5.conf"
    conf.write_text("[libdefaults\n")  # a syntax error: krb5_init_context fails, tokens would fail too
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    monkeypatch.setattr(profile, "_held", {})
    assert not profile.hold_profile()
    assert profile._held == {}


def test_the_profile_is_the_overlay_then_the_configured_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_profile: KRB5_CONFIG names the gateway's overlay (forwardable = true) first, then kerberos.krb5_config;
    without one, what KRB5_CONFIG named before, else /etc/krb5.conf; a second call does not stack overlays."""
    conf = tmp_path / "krb5.conf"
    monkeypatch.setenv("KRB5_CONFIG", "/somewhere/else.conf")
    value = profile.use_profile(conf)
    overlay, _, rest = value.partition(":")
    assert rest == str(conf)
    assert Path(overlay).read_text() == "[libdefaults]\n    forwardable = true\n"
    assert profile.use_profile(None) == f"{overlay}:{conf}"  # the environment's, without the overlay again
    monkeypatch.delenv("KRB5_CONFIG")
    assert profile.use_profile(None) == f"{overlay}:/etc/krb5.conf"
