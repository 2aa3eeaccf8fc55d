"""Configuration of authentication modes, identity sources, restrictions and backend_auth; the TLS request."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.lab.pki import make_pki
from proxy.tls.server import server_context
from tests.unit.test_config import GOOD, _write

FULL = (
    GOOD.replace('source = "san-upn"', 'source = ["san-upn", "subject-cn"]\nenterprise_names = true')
    + """
[[routes]]
prefix = "/basic/"
upstream = "https://legacy.lab.test"
backend_auth = "basic"

[authentication]
mode = "certificate-or-basic"
basic_realm = "Mail"
basic_cache_seconds = 0
basic_failures_per_user = 3

[[client_certificates.restrictions]]
name = "devices"
issuer = "CN=Lab Issuing CA,O=Lab"
subject = "CN=*,OU=Devices"
eku = ["1.3.6.1.5.5.7.3.2"]

[[client_certificates.restrictions]]
extension = { oid = "1.3.6.1.4.1.311.21.7", value = "1.3.6.1.4.1.311.21.8.1" }
"""
)


def test_defaults_are_certificate_only_in_the_gateways_realm(tmp_path: Path) -> None:
    """Without the new keys: certificate mode, the UPN as identity, names without a domain in kerberos' realm."""
    cfg = config.load(_write(tmp_path, GOOD))
    assert cfg.authentication == config.Authentication()
    assert cfg.authentication.client_certificate == "required"
    assert (cfg.identity.sources, cfg.identity.enterprise_names) == (("san-upn",), False)
    assert cfg.identity.default_realm == "LAB.TEST"
    assert cfg.client_certificates.restrictions == ()
    assert {route.backend_auth for route in cfg.routes} == {"negotiate"}


def test_every_key_is_typed(tmp_path: Path) -> None:
    """Modes, source lists, restrictions (named or numbered) and backend_auth come out as typed values."""
    cfg = config.load(_write(tmp_path, FULL))
    assert cfg.authentication == config.Authentication(
        mode="certificate-or-basic", basic_realm="Mail", basic_cache_seconds=0.0, basic_failures_per_user=3
    )
    assert cfg.authentication.client_certificate == "optional"
    assert cfg.identity.sources == ("san-upn", "subject-cn")
    assert cfg.identity.enterprise_names is True
    devices, template = cfg.client_certificates.restrictions
    assert devices == config.Restriction(
        name="devices", issuer="CN=Lab Issuing CA,O=Lab", subject="CN=*,OU=Devices", eku=("1.3.6.1.5.5.7.3.2",)
    )
    assert template.name == "client_certificates.restrictions[1]"
    assert (template.extension_oid, template.extension_value) == ("1.3.6.1.4.1.311.21.7", "1.3.6.1.4.1.311.21.8.1")
    route = cfg.route_for("/basic/x")
    assert route is not None
    assert route.backend_auth == "basic"


BROKEN = [
    ('mode = "certificate-or-basic"', 'mode = "password"', "authentication.mode: expected one of"),
    ('basic_realm = "Mail"', 'basic_realm = "say \\"hi\\""', "authentication.basic_realm: must be printable"),
    ("basic_cache_seconds = 0", "basic_cache_seconds = -1", "authentication.basic_cache_seconds: must be 0"),
    ("basic_failures_per_user = 3", "basic_failures_per_user = 0", "authentication.basic_failures_per_user: must be"),
    (
        "basic_failures_per_user = 3",
        "basic_failures_per_user = 3\nbasic_failure_window_seconds = 0",
        "authentication.basic_failure_window_seconds: must be positive",
    ),
    ('source = ["san-upn", "subject-cn"]', 'source = ["san-upn", "x509"]', "identity.source[1]: expected one of"),
    ('source = ["san-upn", "subject-cn"]', "source = []", "identity.source: expected one of"),
    ('source = ["san-upn", "subject-cn"]', 'source = ["san-upn", "san-upn"]', "identity.source: lists a source twice"),
    ('mode = "certificate-or-basic"', 'mode = "certificate"', 'routes[2].backend_auth: "basic" needs'),
    ('backend_auth = "basic"', 'backend_auth = "ntlm"', "routes[2].backend_auth: expected one of"),
    ('issuer = "CN=Lab Issuing CA,O=Lab"', 'issuer = "Lab Issuing CA"', "client_certificates.restrictions[0].issuer"),
    ('eku = ["1.3.6.1.5.5.7.3.2"]', 'eku = ["clientAuth"]', "client_certificates.restrictions[0].eku[0]: expected"),
    ('oid = "1.3.6.1.4.1.311.21.7"', 'oid = "template"', "client_certificates.restrictions[1].extension.oid"),
    ('name = "devices"', 'name = "devices"\ncolour = "red"', "client_certificates.restrictions[0].colour: unknown"),
    (
        'subject = "CN=*,OU=Devices"',
        'subject = "CN=alice\\u202e*"',  # TOML reads the character itself: no subject as logged holds one
        "client_certificates.restrictions[0].subject: holds invisible characters, which no subject as matched holds:"
        " the glob matches the subject as the log's cert_subject shows it, such characters as escapes; copy"
        " cert_subject's value from the log line, quotes included, or write the escapes as TOML then reads them:"
        ' subject = "CN=alice\\\\u202e*"',
    ),
    (
        'issuer = "CN=Lab Issuing CA,O=Lab"',
        'issuer = "CN=Lab\\u202e CA"',  # TOML reads the character itself: no issuer as logged holds one
        "client_certificates.restrictions[0].issuer: holds invisible characters, which no issuer as matched holds:"
        " the issuer matches as the log's cert_issuer shows it, such characters as escapes; copy cert_issuer's value"
        " from the log line, quotes included, or write the escapes as TOML then reads them:"
        ' issuer = "CN=Lab\\\\u202e CA"',
    ),
    (
        'extension = { oid = "1.3.6.1.4.1.311.21.7", value = "1.3.6.1.4.1.311.21.8.1" }',
        'name = "empty"',
        "client_certificates.restrictions[1]: sets no criterion",
    ),
]


@pytest.mark.parametrize(("old", "new", "problem"), BROKEN)
def test_broken_values_name_their_key(tmp_path: Path, old: str, new: str, problem: str) -> None:
    """Each broken value of the new sections is reported with its key and the file."""
    assert old in FULL
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, FULL.replace(old, new, 1)))
    assert any(p.startswith(problem) and str(tmp_path / "gateway.toml") in p for p in e.value.problems), (
        e.value.problems
    )


@pytest.mark.parametrize(
    ("mode", "verify"),
    [
        ("certificate", ssl.CERT_REQUIRED),
        ("certificate-or-basic", ssl.CERT_OPTIONAL),
        ("certificate-and-basic", ssl.CERT_OPTIONAL),
        ("basic", ssl.CERT_NONE),
    ],
)
def test_tls_asks_for_a_certificate_as_the_mode_needs(tmp_path: Path, mode: str, verify: ssl.VerifyMode) -> None:
    """Required for certificate; optional (still verified when sent) with a Basic fallback; not asked for in basic."""
    pki = make_pki(tmp_path / "lab-pki", now=datetime.now(UTC))
    text = (
        GOOD.replace("tls/server-chain.pem", str(pki.server_chain))
        .replace("tls/server.key", str(pki.server_key))
        .replace("pki/root.pem", str(pki.root_cert))
        .replace("pki/issuing.pem", str(pki.issuing_cert))
    )
    cfg = config.load(_write(tmp_path, text + f'\n[authentication]\nmode = "{mode}"\n'))
    assert server_context(cfg).verify_mode == verify


@pytest.mark.parametrize(
    ("written", "loaded"),
    [
        ("CN=Lab Issuing CA,O=Lab", "CN=Lab Issuing CA,O=Lab"),
        ("CN=Devices CA\\u202eexe.txt\\x1b[31m", "CN=Devices CA\\u202eexe.txt\\x1b[31m"),  # as cert_issuer shows it
        ("CN=a\\\\u202e", "CN=a\\\\u202e"),  # an RFC 4514 escaped backslash, then the text "u202e"
        ("O=a\\,b,CN=x", "O=a\\,b,CN=x"),
    ],
)
def test_a_restriction_issuer_is_loaded_as_the_log_shows_it(tmp_path: Path, written: str, loaded: str) -> None:
    """A restriction's issuer, written as the log's cert_issuer shows it (invisible characters as escapes), loads as
    that text: what `proxy.certs.restrictions` compares with the names of the chain, shown the same way."""
    text = FULL.replace('issuer = "CN=Lab Issuing CA,O=Lab"', f"issuer = {json.dumps(written)}", 1)
    assert config.load(_write(tmp_path, text)).client_certificates.restrictions[0].issuer == loaded
