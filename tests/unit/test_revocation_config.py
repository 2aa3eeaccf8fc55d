"""The revocation keys of [client_certificates]: CRL files and URLs, refresh, distribution points, OCSP."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError

BASE = """
[listener]
bind = "127.0.0.1:8443"
certificate = "server.pem"
private_key = "server.key"

[client_certificates]
trust_anchors = ["root.pem"]
{revocation}

[kerberos]
principal = "HTTP/proxy.lab.test@LAB.TEST"
keytab = "proxy.keytab"

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:8081"
"""


def load(tmp_path: Path, revocation: str) -> config.ClientCertificates:
    for name in ("server.pem", "server.key", "root.pem", "proxy.keytab", "crls.pem"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.format(revocation=revocation))
    return config.load(path).client_certificates


def problems(tmp_path: Path, revocation: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, revocation)
    return info.value.problems


def test_crls_mix_files_and_urls(tmp_path: Path) -> None:
    """Files (relative to the configuration) and http(s) URLs go to their own typed fields; defaults apply."""
    cc = load(tmp_path, 'crls = ["crls.pem", "http://pki.lab.test/issuing.crl", "https://pki.lab.test/root.crl"]')
    assert cc.crls == (tmp_path / "crls.pem",)
    assert cc.crl_urls == ("http://pki.lab.test/issuing.crl", "https://pki.lab.test/root.crl")
    assert (cc.crl_refresh_seconds, cc.use_distribution_points, cc.revocation, cc.ocsp) == (
        60.0,
        False,
        "require",
        "off",
    )


def test_all_revocation_keys(tmp_path: Path) -> None:
    """The issue's example: refresh interval, distribution points, both policies."""
    cc = load(
        tmp_path,
        'crls = ["http://pki/issuing.crl"]\ncrl_refresh_seconds = 5\nuse_distribution_points = true\n'
        'revocation = "best-effort"\nocsp = "prefer"',
    )
    assert (cc.crl_refresh_seconds, cc.use_distribution_points, cc.revocation, cc.ocsp) == (
        5.0,
        True,
        "best-effort",
        "prefer",
    )


def test_distribution_points_alone_allow_require(tmp_path: Path) -> None:
    """With no CRL configured but use_distribution_points, "require" is the default and is accepted."""
    assert load(tmp_path, "use_distribution_points = true").revocation == "require"


def test_bad_revocation_keys_name_their_key(tmp_path: Path) -> None:
    """An ldap:// CRL, a non-positive interval and an unknown OCSP policy are each reported with their key."""
    found = problems(
        tmp_path,
        'crls = ["crls.pem", "ldap:///CN=CA?certificateRevocationList"]\ncrl_refresh_seconds = 0\nocsp = "always"',
    )
    where = f"(in {tmp_path / 'gateway.toml'})"
    assert found == [
        "client_certificates.crls[1]: only files and http(s) URLs are supported, "
        f"got 'ldap:///CN=CA?certificateRevocationList' {where}",
        f"client_certificates.ocsp: expected one of off, prefer, require; got 'always' {where}",
        f"client_certificates.crl_refresh_seconds: must be positive, got 0.0 {where}",
    ]


def test_require_without_any_crl_source_is_refused(tmp_path: Path) -> None:
    """revocation = "require" with neither CRLs nor distribution points would refuse everyone."""
    (problem,) = problems(tmp_path, 'revocation = "require"')
    assert problem.startswith('client_certificates.revocation: "require" needs at least one CRL')
