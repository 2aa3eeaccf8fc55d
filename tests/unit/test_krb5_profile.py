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
