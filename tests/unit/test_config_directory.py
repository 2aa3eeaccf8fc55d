"""`[identity] mapping` and `[directory]`: the keys exactly as issue #16 writes them, and errors that name them."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write

DIRECTORY = """
[directory]
urls = ["ldap://dc1.corp.example.com", "ldaps://dc2.corp.example.com:636"]
base_dn = "DC=corp,DC=example,DC=com"
bind = "kerberos"
cache_seconds = 300
"""


def _load(tmp_path: Path, text: str) -> config.Config:
    return config.load(_write(tmp_path, text))


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    return info.value.problems


def _mapping(mode: str, principal: str = "svc-kcdproxy@LAB.TEST") -> str:
    """GOOD with `[identity] mapping = mode`, and the gateway's account name as its principal."""
    text = GOOD.replace('source = "san-upn"', f'source = "san-upn"\nmapping = "{mode}"')
    return text.replace('principal = "HTTP/proxy.lab.test@LAB.TEST"', f'principal = "{principal}"')


def test_default_is_upn_mapping_and_no_directory(tmp_path: Path) -> None:
    """Without the keys the gateway behaves as before: mapping "upn", no directory."""
    cfg = _load(tmp_path, GOOD)
    assert (cfg.identity.mapping, cfg.directory) == ("upn", None)


def test_the_issue_example_loads(tmp_path: Path) -> None:
    """The issue's [directory] example, typed: URLs in order, base DN, Kerberos bind, cache seconds."""
    cfg = _load(tmp_path, _mapping("strong") + DIRECTORY)
    assert cfg.identity.mapping == "strong"
    assert cfg.directory is not None
    assert cfg.directory.urls == ("ldap://dc1.corp.example.com", "ldaps://dc2.corp.example.com:636")
    assert (cfg.directory.base_dn, cfg.directory.bind, cfg.directory.cache_seconds) == (
        "DC=corp,DC=example,DC=com",
        "kerberos",
        300.0,
    )


def test_strong_or_audit_is_a_mode(tmp_path: Path) -> None:
    """ "strong-or-audit" is accepted as written."""
    assert _load(tmp_path, _mapping("strong-or-audit") + DIRECTORY).identity.mapping == "strong-or-audit"


def test_unknown_mode_names_the_key(tmp_path: Path) -> None:
    """A mode outside upn / strong / strong-or-audit is refused under identity.mapping."""
    problems = _problems(tmp_path, _mapping("sid") + DIRECTORY)
    assert any(p.startswith("identity.mapping: expected one of upn, strong, strong-or-audit") for p in problems)


def test_strong_without_directory_names_the_key(tmp_path: Path) -> None:
    """mapping = "strong" with no [directory] is a configuration error, not a gateway that admits by name."""
    problems = _problems(tmp_path, _mapping("strong"))
    assert any(
        p.startswith('identity.mapping: "strong" looks accounts up: it needs a [directory] table') for p in problems
    )


def test_simple_bind_needs_ldaps_dn_and_password_file(tmp_path: Path) -> None:
    """bind = "simple" over ldap:// (a password in clear), without bind_dn or password_file: each key named."""
    text = _mapping("strong") + '\n[directory]\nurls = ["ldap://dc1"]\nbase_dn = "DC=corp,DC=com"\nbind = "simple"\n'
    problems = _problems(tmp_path, text)
    assert any(p.startswith('directory.urls[0]: bind = "simple" sends a password: only ldaps://') for p in problems)
    assert any(p.startswith("directory.bind_dn:") for p in problems)
    assert any(p.startswith("directory.password_file:") for p in problems)


def test_simple_bind_over_ldaps_loads_and_keeps_the_password_out_of_repr(tmp_path: Path) -> None:
    """A complete simple bind loads; the password file's path is not in the configuration's repr."""
    (tmp_path / "ldap.pw").write_text("secret\n")
    text = _mapping("strong") + (
        '\n[directory]\nurls = ["ldaps://dc1.corp.example.com"]\nbase_dn = "DC=corp,DC=com"\nbind = "simple"\n'
        'bind_dn = "CN=svc-kcdproxy,CN=Users,DC=corp,DC=com"\npassword_file = "ldap.pw"\n'
    )
    cfg = _load(tmp_path, text)
    assert cfg.directory is not None
    assert cfg.directory.password_file == tmp_path / "ldap.pw"
    assert "ldap.pw" not in repr(cfg.directory)


def test_kerberos_bind_refuses_simple_bind_keys(tmp_path: Path) -> None:
    """bind_dn under bind = "kerberos" is a mistake, named (the bind would silently ignore it)."""
    problems = _problems(tmp_path, _mapping("strong") + DIRECTORY + 'bind_dn = "CN=x,DC=corp,DC=com"\n')
    assert any(p.startswith('directory.bind_dn: only with bind = "simple"') for p in problems)


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('urls = ["http://dc1"]', "directory.urls[0]"),
        ('urls = ["ldap://"]', "directory.urls[0]"),
        ('urls = ["ldap://dc1/DC=corp"]', "directory.urls[0]"),
        ("urls = []", "directory.urls"),
        ('base_dn = "corp.example.com"', "directory.base_dn"),
        ('bind = "ntlm"', "directory.bind"),
        ("cache_seconds = -1", "directory.cache_seconds"),
        ('cache = "5m"', "directory.cache"),
    ],
)
def test_bad_directory_values_name_their_key(tmp_path: Path, line: str, key: str) -> None:
    """Each malformed [directory] value is reported under its own key."""
    name = line.split(" ", 1)[0]
    lines = [ln for ln in DIRECTORY.splitlines() if not ln.startswith(name + " ")]
    problems = _problems(tmp_path, _mapping("strong") + "\n".join([*lines, line]) + "\n")
    assert any(p.startswith(f"{key}: ") for p in problems), problems


def test_cache_seconds_zero_means_no_cache(tmp_path: Path) -> None:
    """cache_seconds = 0 is allowed: every request asks the directory."""
    text = _mapping("strong") + DIRECTORY.replace("cache_seconds = 300", "cache_seconds = 0")
    directory = _load(tmp_path, text).directory
    assert directory is not None
    assert directory.cache_seconds == 0.0


def test_base_dn_without_domain_components_is_refused(tmp_path: Path) -> None:
    """A base DN with no DC= parts gives no realm for the mapped accounts: refused under directory.base_dn."""
    text = _mapping("strong") + DIRECTORY.replace('"DC=corp,DC=example,DC=com"', '"O=Corp,C=DE"')
    assert any(p.startswith("directory.base_dn: needs the domain's DC= components") for p in _problems(tmp_path, text))


def test_certificate_backdating_compensation_defaults_to_ads_zero_and_reads_seconds(tmp_path: Path) -> None:
    """identity.certificate_backdating_compensation: 0 when absent (AD's default), else the seconds given."""
    assert _load(tmp_path, _mapping("strong-or-audit") + DIRECTORY).identity.certificate_backdating_compensation == 0
    text = _mapping("strong-or-audit").replace(
        'mapping = "strong-or-audit"', 'mapping = "strong-or-audit"\ncertificate_backdating_compensation = 3600'
    )
    assert _load(tmp_path, text + DIRECTORY).identity.certificate_backdating_compensation == 3600


@pytest.mark.parametrize("value", ["-1", '"1h"', "2000000000", "true"])
def test_a_bad_certificate_backdating_compensation_names_the_key(tmp_path: Path, value: str) -> None:
    """A negative, textual, boolean or over-50-years compensation is refused, naming the key."""
    text = _mapping("strong-or-audit").replace(
        'mapping = "strong-or-audit"', f'mapping = "strong-or-audit"\ncertificate_backdating_compensation = {value}'
    )
    problems = _problems(tmp_path, text + DIRECTORY)
    assert any(p.startswith("identity.certificate_backdating_compensation: ") for p in problems), problems
