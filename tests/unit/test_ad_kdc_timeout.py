"""The AD tests' gateways wait AD_KDC_TIMEOUT for Samba's KDC unless their configuration names its own wait
(`tests/integration/ad_fixtures.py`, `_start`; docs/hardening.md: a sign-in waits for any write to sam.ldb)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from proxy.lab import ad
from tests.integration import ad_fixtures


def _lab_config(tmp_path: Path, text: str | None = None) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(text if text is not None else ad.gateway_config(ad.AdRealm.at(tmp_path / "realm")))
    return config


def test_the_lab_configuration_gets_the_ad_tests_wait(tmp_path: Path) -> None:
    """The realm's generated configuration (no kdc_timeout: the 10 s default) is given AD_KDC_TIMEOUT, once, in
    [kerberos], and stays valid TOML."""
    config = _lab_config(tmp_path)
    ad_fixtures._wait_for_the_kdc(config)
    ad_fixtures._wait_for_the_kdc(config)
    assert tomllib.loads(config.read_text())["kerberos"]["kdc_timeout"] == ad_fixtures.AD_KDC_TIMEOUT == 60


def test_a_configuration_naming_its_own_wait_keeps_it(tmp_path: Path) -> None:
    """A test that sets kdc_timeout (a short one, to see a silent KDC refused in time) keeps its value."""
    text = ad.gateway_config(ad.AdRealm.at(tmp_path / "realm")).replace("[kerberos]\n", "[kerberos]\nkdc_timeout = 3\n")
    config = _lab_config(tmp_path, text)
    ad_fixtures._wait_for_the_kdc(config)
    assert config.read_text() == text
