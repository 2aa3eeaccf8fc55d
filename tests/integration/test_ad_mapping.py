"""Strong certificate mapping against the Samba AD DC: real certificates, the real directory, the real KDC.

Each certificate of `proxy.lab.ad_mapping` goes through a real gateway inside the realm's namespace, with
curl as the device, in `strong` and in `strong-or-audit`; the gateway looks the account up over LDAP with
a Kerberos (SASL GSSAPI) bind, and the Exchange stand-in says who it served.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    _locked,
    _start,
    apply_lockout_policy,
    start_ad_gateway,
    status_and_body,
)
from tests.integration.jsonlog import eventually, whole_json_lines

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and certificates (frank, grace, heidi, ivan; SID extensions);
    the DC's name in /etc/netns/<namespace>/hosts as long as the realm is up (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


def start_gateway(
    realm: ad.AdRealm,
    directory: Path,
    backend: AdProcess,
    mode: str,
    directory_text: str | None = None,
    identity: str = "",
    account: str | None = None,
    kerberos: str = "",
) -> AdProcess:
    """`kcd-proxy run` inside the namespace with `[identity] mapping = mode` (and `identity` lines), and the
    realm's directory (or `directory_text`); `account`: the gateway signs in as that account, with its keytab;
    `kerberos`: lines for its `[kerberos]` table (`kdc_timeout = 2`)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = realm.free_port()
    text = ad_mapping.gateway_config(realm, mode, port=port, backend_port=backend.port, directory_text=directory_text)
    text = text.replace("[identity]\n", "[identity]\n" + identity, 1)
    text = text.replace("[kerberos]\n", "[kerberos]\n" + kerberos, 1)
    if account is not None:
        text = _as_account(realm, text, account)
    text += f'\n[traces]\nexport = "{directory / "traces.jsonl"}"\n'
    config = directory / "gateway.toml"
    config.write_text(text)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    return _start(realm, argv, port, directory / "gateway.log", scheme="https")


@pytest.fixture(scope="module")
def strong(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    gw = start_gateway(realm, tmp_path_factory.mktemp("strong"), ad_backend, "strong")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def audit(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    gw = start_gateway(realm, tmp_path_factory.mktemp("audit"), ad_backend, "strong-or-audit")
    yield gw
    gw.stop()


def curl(realm: ad.AdRealm, gw: AdProcess, name: str) -> tuple[int, str, dict[str, str]]:
    """curl inside the namespace with a mapping certificate (or, for a bare user name, the realm's plain one)."""
    gw.mark()  # the events the test then waits for are this request's, never an earlier test's
    cert, key = ad_mapping.cert(realm, name), ad_mapping.key(realm, name)
    if not cert.exists():
        cert, key = realm.user_cert(name), realm.user_key(name)
    argv = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert)]
    argv += ["--key", str(key), "-D", "/dev/stderr", "-w", "\n%{http_code}", f"{gw.url}/Microsoft-Server-ActiveSync"]
    done = realm.run(argv, timeout=60)
    status, body = status_and_body(done)
    headers = {}
    for line in done.stderr.splitlines():
        name_, sep, value = line.partition(":")
        if sep:
            headers[name_.strip().lower()] = value.strip()
    return status, body, headers


def summary(gw: AdProcess, upn: str) -> dict[str, Any]:
    """The summary line for `upn` of the last curl against `gw` (never an older test's line for that user)."""
    return gw.wait_event("request", upn=upn)


def served_as(body: str) -> str:
    principal: str = json.loads(body)["principal"]
    return principal


# -- strong ------------------------------------------------------------------------------------------------------


def test_sid_extension_of_the_account_is_admitted(realm: ad.AdRealm, strong: AdProcess) -> None:
    """alice's certificate with her own objectSid in the SID extension: served as alice, rule sid-extension."""
    status, body, _ = curl(realm, strong, "alice-sid")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"
    line = summary(strong, "alice@ad.test")
    assert (line["mapping"], line["mapping_weak"]) == ("sid-extension", False)
    assert line["account_sid"] == str(ad_mapping.object_sid(realm, "alice"))


@pytest.mark.parametrize("mode", ["strong", "audit"])
def test_upn_of_one_user_with_the_sid_of_another_is_refused(
    realm: ad.AdRealm, mode: str, request: pytest.FixtureRequest
) -> None:
    """alice's UPN with bob's SID (ESC1, Certifried): 403 at mapping in both modes; the KDC is never asked."""
    gw: AdProcess = request.getfixturevalue(mode)
    status, body, headers = curl(realm, gw, "alice-bob-sid")
    assert status == 403, body
    assert headers["x-kcd-refused-stage"] == "mapping"
    assert "SID of another account" in body
    event = gw.wait_event("mapping_refused", upn="alice@ad.test")
    assert str(ad_mapping.object_sid(realm, "bob")) in event["fix"]
    assert "kerberos" not in summary(gw, "alice@ad.test")["ms"]


def test_the_sid_url_maps_like_the_extension(realm: ad.AdRealm, strong: AdProcess) -> None:
    """alice's SID only as a subjectAltName URL (tag:microsoft.com,2022-09-14:sid:...): served as alice, rule
    sid-url; bob's SID in that URL: 403 'SID of another account'; alice's SID extension beside bob's SID URL:
    403 'two different SIDs'. The KDC is asked nothing for a refused one."""
    status, body, _ = curl(realm, strong, "alice-sid-url")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"
    line = summary(strong, "alice@ad.test")
    assert (line["mapping"], line["mapping_detail"]) == ("sid-url", str(ad_mapping.object_sid(realm, "alice")))
    for name, reason in (("alice-bob-sid-url", "SID of another account"), ("alice-sid-bob-url", "two different SIDs")):
        status, body, headers = curl(realm, strong, name)
        assert (status, headers["x-kcd-refused-stage"]) == (403, "mapping"), body
        assert reason in body
        event = strong.wait_event("mapping_refused", upn="alice@ad.test", reason=body.strip())
        assert str(ad_mapping.object_sid(realm, "bob")) in event["fix"]
        assert "kerberos" not in summary(strong, "alice@ad.test")["ms"]


def test_no_sid_extension_is_refused_with_the_fix(realm: ad.AdRealm, strong: AdProcess) -> None:
    """The realm's plain certificate for bob (UPN only): 403 'no SID extension'; the fix names the entry to add."""
    status, body, headers = curl(realm, strong, "bob")
    assert status == 403, body
    assert headers["x-kcd-refused-stage"] == "mapping"
    assert "no SID extension" in body
    event = strong.wait_event("mapping_refused", upn="bob@ad.test")
    assert "altSecurityIdentities: X509:<I>" in event["fix"]


def test_a_refusal_the_dc_fixes_says_when_the_gateway_sees_the_change(realm: ad.AdRealm, strong: AdProcess) -> None:
    """A refusal whose fix is a change on the DC (the altSecurityIdentities entry to add, the account to enable, the
    name to give an account) says the gateway keeps the directory's answer [directory] cache_seconds (300 s here): a
    TMG administrator added the entry the fix named and got the same 403 for five minutes, nothing saying why. A
    certificate to revoke (another account's SID) gets no such words: no change on the DC serves it."""
    for name, upn, event in (
        ("bob", "bob@ad.test", "mapping_refused"),
        ("dave-sid", "dave@ad.test", "account_refused"),
        ("ghost", "ghost@ad.test", "mapping_refused"),
    ):
        status, body, _ = curl(realm, strong, name)
        assert status == 403, body
        fix = strong.wait_event(event, upn=upn)["fix"]
        assert "the gateway sees a change on the DC within [directory] cache_seconds (300 s)" in fix, fix
    status, body, _ = curl(realm, strong, "alice-bob-sid")
    assert status == 403, body
    assert "cache_seconds" not in strong.wait_event("mapping_refused", upn="alice@ad.test")["fix"]


def test_strong_alt_security_identity_is_admitted(realm: ad.AdRealm, strong: AdProcess) -> None:
    """frank's certificate has no SID extension, his account lists it by issuer and reversed serial: served."""
    status, body, _ = curl(realm, strong, "frank-altsec")
    assert status == 200, body
    assert served_as(body) == "frank@AD.TEST"
    line = summary(strong, "frank@ad.test")
    assert line["mapping"] == "alt-security-identity"
    assert "<SR>" in line["mapping_detail"]


def test_weak_mapping_only_is_refused(realm: ad.AdRealm, strong: AdProcess) -> None:
    """grace's account lists her certificate by issuer and subject only (weak): 403, the weak kind named."""
    status, body, _ = curl(realm, strong, "grace-weak")
    assert status == 403, body
    assert "X509IssuerSubject" in body


@pytest.mark.parametrize(
    ("name", "upn", "reason"),
    [
        ("dave-sid", "dave@ad.test", "disabled"),
        ("heidi-sid", "heidi@ad.test", "locked out"),
        ("ivan-sid", "ivan@ad.test", "expired"),
    ],
)
def test_account_state_is_refused_before_the_kdc(
    realm: ad.AdRealm, strong: AdProcess, name: str, upn: str, reason: str
) -> None:
    """Disabled, locked-out and expired accounts with a valid SID certificate: 403 with that reason, no KDC request."""
    status, body, headers = curl(realm, strong, name)
    assert status == 403, body
    assert reason in body
    assert headers["x-kcd-refused-stage"] == "mapping"
    event = strong.wait_event("account_refused", upn=upn)
    assert event["fix"]
    assert "kerberos" not in summary(strong, upn)["ms"]


def test_trace_shows_the_mapping_stage(realm: ad.AdRealm, strong: AdProcess) -> None:
    """The exported trace of a mapped request has the mapping stage between identity and S4U2Self."""
    export = Path(strong.log_path.parent / "traces.jsonl")
    before = len(whole_json_lines(export)) if export.exists() else 0  # an earlier test's alice-sid is there too
    curl(realm, strong, "alice-sid")

    def served() -> dict[str, Any] | None:  # recorded once the answer has gone out: polled for
        new = whole_json_lines(export)[before:]
        return next((r for r in new if r["upn"] == "alice@ad.test" and r["status"] == 200), None)

    record = eventually(served, "the trace of alice's request")
    names = [s["name"] for s in record["stages"]]
    assert names.index("identity") < names.index("mapping") < names.index("s4u2self")
    mapping = record["stages"][names.index("mapping")]
    assert (mapping["rule"], mapping["account"]) == ("sid-extension", "CN=alice,CN=Users,DC=ad,DC=test")


# -- strong-or-audit ---------------------------------------------------------------------------------------------


def test_audit_serves_weakly_mapped_certificates_with_a_warning(realm: ad.AdRealm, audit: AdProcess) -> None:
    """In strong-or-audit the plain certificate and grace's weak one are served, each with a warning and the fix."""
    for name, upn in (("bob", "bob@ad.test"), ("grace-weak", "grace@ad.test")):
        status, body, _ = curl(realm, audit, name)
        assert status == 200, body
        assert served_as(body) == upn.split("@")[0] + "@AD.TEST"
        warning = audit.wait_event("weak_certificate_mapping", upn=upn)
        assert "altSecurityIdentities: X509:<I>" in warning["detail"]
        assert summary(audit, upn)["mapping"] == "weak-audit"


def test_audit_admits_strong_mappings_without_a_warning(realm: ad.AdRealm, audit: AdProcess) -> None:
    """In strong-or-audit a SID-extension and an altSecurityIdentities certificate are served as in strong."""
    for name, upn, rule in (
        ("alice-sid", "alice@ad.test", "sid-extension"),
        ("frank-altsec", "frank@ad.test", "alt-security-identity"),
    ):
        status, body, _ = curl(realm, audit, name)
        assert status == 200, body
        assert summary(audit, upn)["mapping"] == rule
    assert not [e for e in audit.events("weak_certificate_mapping") if e["upn"] in ("alice@ad.test", "frank@ad.test")]


def test_audit_still_refuses_account_state(realm: ad.AdRealm, audit: AdProcess) -> None:
    """Audit mode is about mapping only: a disabled account is refused there too."""
    status, body, _ = curl(realm, audit, "dave-sid")
    assert (status, "disabled" in body) == (403, True)


# -- the directory ------------------------------------------------------------------------------------------------


def test_directory_down_is_503_with_retry_after(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path) -> None:
    """No directory server answers: 503 with Retry-After for a SID certificate, never an admission."""
    dead = ad_mapping.directory_table(realm, urls=(f"ldap://127.0.0.1:{realm.free_port()}",))
    for mode in ("strong", "strong-or-audit"):
        gw = start_gateway(realm, tmp_path / mode, ad_backend, mode, directory_text=dead)
        try:
            for name in ("alice-sid", "bob"):
                status, body, headers = curl(realm, gw, name)
                assert status == 503, body
                assert headers["retry-after"]
                assert headers["x-kcd-refused-stage"] == "mapping"
            gw.wait_event("directory_unavailable")
        finally:
            gw.stop()


def test_second_server_is_used_when_the_first_is_down(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path) -> None:
    """urls are tried in order: a dead first server, then the DC, and the request is served."""
    urls = (f"ldap://127.0.0.1:{realm.free_port()}", f"ldap://{realm.dc_host}")
    gw = start_gateway(
        realm, tmp_path, ad_backend, "strong", directory_text=ad_mapping.directory_table(realm, urls=urls)
    )
    try:
        status, body, _ = curl(realm, gw, "alice-sid")
        assert status == 200, body
        gw.wait_event("directory_server_failed", url=urls[0])
    finally:
        gw.stop()


_CACHE_PROBE = """
import asyncio, json, sys
from pathlib import Path
from proxy import config
from proxy.directory import Directory

async def main():
    cfg = config.load(Path(sys.argv[1]))
    d = Directory(cfg.directory, cfg.kerberos)
    first = await asyncio.gather(*(d.account("alice@ad.test") for _ in range(20)))
    after_burst = d.searches
    await d.account("ALICE@ad.test")
    later = d.searches
    names = ["bob@ad.test", "dave@ad.test", "frank@ad.test", "grace@ad.test", "heidi@ad.test", "ivan@ad.test"]
    others = await asyncio.wait_for(asyncio.gather(*(d.account(n) for n in names)), 30)
    print(json.dumps({"burst": after_burst, "later": later, "sids": sorted({str(a.sid) for a in first}),
                      "others": [a.sam_account_name for a in others], "distinct": d.searches - later,
                      "binds": d.binds}))

asyncio.run(main())
"""


@pytest.mark.parametrize(("cache_seconds", "burst", "later"), [(300, 1, 1), (0, 1, 2)])
def test_cache_and_single_flight_against_the_dc(
    realm: ad.AdRealm, tmp_path: Path, cache_seconds: int, burst: int, later: int
) -> None:
    """20 concurrent look-ups of one account make one LDAP search; a later one is served from the cache
    (cache_seconds = 300) or searches again (cache_seconds = 0); six different accounts at once, over the
    one kept connection, are six searches that all complete."""
    cfg = tmp_path / "gateway.toml"
    directory_text = ad_mapping.directory_table(realm, cache_seconds=cache_seconds)
    cfg.write_text(ad_mapping.gateway_config(realm, "strong", directory_text=directory_text))
    done = realm.run([sys.executable, "-c", textwrap.dedent(_CACHE_PROBE), str(cfg)], timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["burst"], result["later"]) == (burst, later)
    assert result["sids"] == [str(ad_mapping.object_sid(realm, "alice"))]
    assert (result["others"], result["distinct"]) == (["bob", "dave", "frank", "grace", "heidi", "ivan"], 6)
    assert result["binds"] == 1  # one kept connection served them all (none timed out and was replaced)


# -- explain and doctor -------------------------------------------------------------------------------------------


def _command(realm: ad.AdRealm, tmp_path: Path, *args: str, identity: str = "") -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(ad_mapping.gateway_config(realm, "strong").replace("[identity]\n", "[identity]\n" + identity, 1))
    argv = [sys.executable, "-m", "proxy", *args, "--config", str(cfg)]
    return realm.run(argv, timeout=120)


def test_explain_shows_the_mapping_stage(realm: ad.AdRealm, tmp_path: Path) -> None:
    """explain: alice-sid accepted with a mapping step naming the rule; alice-bob-sid refused at mapping."""
    done = _command(realm, tmp_path, "explain", "--cert", str(ad_mapping.cert(realm, "alice-sid")), "--json")
    answer = json.loads(done.stdout)
    assert answer["accepted"] is True, done
    mapping = next(s for s in answer["steps"] if s["stage"] == "mapping")
    assert "SID extension is the objectSid of account CN=alice,CN=Users,DC=ad,DC=test" in mapping["summary"]
    done = _command(realm, tmp_path, "explain", "--cert", str(ad_mapping.cert(realm, "alice-bob-sid")), "--json")
    answer = json.loads(done.stdout)
    assert (answer["accepted"], answer["stage"]) == (False, "mapping"), done
    assert "SID of another account" in answer["reason"]
    assert [s["stage"] for s in answer["steps"]][-2:] == ["identity", "mapping"]


def test_doctor_checks_the_bind_and_the_canary_lookup(realm: ad.AdRealm, tmp_path: Path) -> None:
    """doctor: the Kerberos bind to the DC passes, and the canary user's account is found with its SID."""
    done = _command(realm, tmp_path, "doctor", "--user", "alice@ad.test")
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))}
    assert lines["directory"].startswith("PASS"), done.stdout
    assert "svc-kcdproxy@AD.TEST" in lines["directory"]
    assert lines["directory-lookup"].startswith("PASS"), done.stdout
    assert str(ad_mapping.object_sid(realm, "alice")) in lines["directory-lookup"]
    assert ", created 20" in lines["directory-lookup"]  # whenCreated, which strong-or-audit compares


def test_doctor_counts_strong_entries_in_words(realm: ad.AdRealm, tmp_path: Path) -> None:
    """doctor's look-up of frank, whose account holds one strong altSecurityIdentities entry, says "1 strong
    altSecurityIdentities entry" (singular); alice's, with none, "0 strong altSecurityIdentities entries"."""
    frank = _doctor_lines(_command(realm, tmp_path, "doctor", "--user", "frank@ad.test"))["directory-lookup"]
    assert frank.startswith("PASS"), frank
    assert frank.endswith("; 1 strong altSecurityIdentities entry"), frank
    alice = _doctor_lines(_command(realm, tmp_path, "doctor", "--user", "alice@ad.test"))["directory-lookup"]
    assert alice.endswith("; 0 strong altSecurityIdentities entries"), alice


def test_doctor_under_upn_mapping_names_the_one_cause_as_the_gateway(realm: ad.AdRealm, tmp_path: Path) -> None:
    """Under mapping = "upn" with a [directory] the gateway names the one cause of erin's evidence ticket that is
    not forwardable (`forwarding_named`: her NOT_DELEGATED); doctor's s4u2self check says the same, not both."""
    cfg = tmp_path / "upn.toml"
    cfg.write_text(ad_mapping.gateway_config(realm, "upn"))
    argv = [sys.executable, "-m", "proxy", "doctor", "--config", str(cfg), "--user", "erin@ad.test"]
    shown = _s4u2self_line(realm.run(argv, timeout=120))
    assert shown.startswith("FAIL"), shown
    assert "is set on CN=erin,CN=Users,DC=ad,DC=test (NOT_DELEGATED" in shown, shown
    assert "lacks protocol transition" not in shown, shown


def _doctor_lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))}


def test_doctor_impersonates_the_canarys_directory_account(realm: ad.AdRealm, tmp_path: Path) -> None:
    """With strong mapping doctor's S4U canary is the account the directory maps, as the gateway's: mallory's
    UPN alice@corp.example (realm_map to AD.TEST) is checked as mallory@AD.TEST, never alice@AD.TEST; carol's
    carol@corp.example (no realm serves it by name) as carol@AD.TEST, which the gateway serves."""
    identity = 'realm_map = { "corp.example" = "AD.TEST" }\n'
    lines = _doctor_lines(_command(realm, tmp_path, "doctor", "--user", ad_mapping.MALLORY_UPN, identity=identity))
    assert lines["s4u2self"].startswith("PASS"), lines
    assert "mallory@AD.TEST" in lines["s4u2self"]
    assert "the directory's account for alice@corp.example" in lines["s4u2self"]
    assert "alice@AD.TEST" not in "".join(lines.values())
    assert lines["s4u2proxy"].startswith("PASS"), lines
    lines = _doctor_lines(_command(realm, tmp_path, "doctor", "--user", "carol@corp.example"))
    assert lines["s4u2self"].startswith("PASS"), lines
    assert "carol@AD.TEST" in lines["s4u2self"]


def test_doctor_names_a_disabled_canary(realm: ad.AdRealm, tmp_path: Path) -> None:
    """doctor with a disabled canary: the look-up fails and says the account is disabled."""
    done = _command(realm, tmp_path, "doctor", "--user", "dave@ad.test")
    line = next(line for line in done.stdout.splitlines() if " directory-lookup " in f" {line} ")
    assert line.startswith("FAIL"), done.stdout
    assert "disabled" in line


def _s4u2self_line(done: subprocess.CompletedProcess[str]) -> str:
    """doctor's s4u2self check and its fix line, as printed."""
    lines = done.stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if re.match(r"(PASS|FAIL)\s+s4u2self\s", line))
    return lines[index] + "\n" + lines[index + 1]


def test_a_ticket_not_forwardable_names_its_one_cause_from_the_directory(
    realm: ad.AdRealm, audit: AdProcess, tmp_path: Path
) -> None:
    """An evidence ticket that is not forwardable has two causes on the DC, and the fix named both ("svc-kcdproxy
    lacks protocol transition, or erin is marked sensitive"): with a [directory] the gateway and doctor read the
    user's userAccountControl and name the one. erin: 'Account is sensitive and cannot be delegated' (NOT_DELEGATED)
    on her entry, `samba-tool user sensitive erin off`; alice behind svc-kcdnopt: she is not marked, so it is the
    gateway account's 'Use any authentication protocol' (TRUSTED_TO_AUTH_FOR_DELEGATION). explain --kdc says it too."""
    erin = "CN=erin,CN=Users,DC=ad,DC=test"
    status, body, _ = curl(realm, audit, "erin")
    assert status == 403, body
    assert "its evidence ticket is not forwardable" in body
    fix = audit.wait_event("kerberos_refused", upn="erin@ad.test")["fix"]
    assert f"'Account is sensitive and cannot be delegated' is set on {erin} (NOT_DELEGATED" in fix, fix
    assert "samba-tool user sensitive erin off" in fix
    assert "lacks protocol transition" not in fix
    doctor = _command(realm, tmp_path, "doctor", "--user", "erin@ad.test")
    shown = _s4u2self_line(doctor)
    assert shown.startswith("FAIL"), doctor.stdout
    assert f"is set on {erin} (NOT_DELEGATED" in shown, shown
    audit_config = tmp_path / "audit.toml"  # erin's certificate has no SID: explain it as strong-or-audit serves it
    audit_config.write_text(ad_mapping.gateway_config(realm, "strong-or-audit"))
    argv = [sys.executable, "-m", "proxy", "explain", "--config", str(audit_config), "--kdc", "--json"]
    explained = json.loads(realm.run([*argv, "--cert", str(realm.user_cert("erin"))], timeout=120).stdout)
    assert (explained["stage"], explained["reason"]) == ("kerberos", body.strip()), explained
    assert f"is set on {erin} (NOT_DELEGATED" in explained["fix"], explained

    nopt = tmp_path / "nopt"
    nopt.mkdir()
    (nopt / "gateway.toml").write_text(_as_account(realm, ad_mapping.gateway_config(realm, "strong"), ad.NO_PT_ACCOUNT))
    argv = [sys.executable, "-m", "proxy", "doctor", "--config", str(nopt / "gateway.toml"), "--user", "alice@ad.test"]
    shown = _s4u2self_line(realm.run(argv, timeout=120))
    assert shown.startswith("FAIL"), shown
    assert "CN=alice,CN=Users,DC=ad,DC=test is not marked 'Account is sensitive and cannot be delegated'" in shown
    assert f"the cause is {ad.NO_PT_ACCOUNT}@{ad.REALM}: it lacks protocol transition (TRUSTED_TO_AUTH_FOR" in shown
    assert "'Use any authentication protocol'" in shown
    assert f"samba-tool delegation for-any-protocol {ad.NO_PT_ACCOUNT} on" in shown


def _as_account(realm: ad.AdRealm, text: str, account: str) -> str:
    """A gateway configuration `text` signing in as `account` of the realm, with its keytab."""
    text = text.replace(f'"{realm.gateway_principal}"', f'"{account}@{ad.REALM}"')
    assert f'"{account}@{ad.REALM}"' in text
    return text.replace(str(realm.gateway_keytab), str(realm.keytab(account)))


def test_a_sensitive_user_behind_a_gateway_without_protocol_transition_is_told_both_causes(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """erin, marked 'Account is sensitive and cannot be delegated', behind svc-kcdnopt, which lacks 'Use any
    authentication protocol': both are causes of her ticket not forwardable, and the gateway's 403 hint and doctor
    name both, with their commands. Before, both said "svc-kcdnopt's protocol transition is not the cause": the
    administrator cleared erin's flag as told, and she was refused again for the gateway's."""
    erin = "CN=erin,CN=Users,DC=ad,DC=test"
    lacking = f"{ad.NO_PT_ACCOUNT}@{ad.REALM} lacks protocol transition too (TRUSTED_TO_AUTH_FOR_DELEGATION is clear"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong-or-audit", account=ad.NO_PT_ACCOUNT)
    try:
        status, body, _ = curl(realm, gw, "erin")
        assert status == 403, body
        fix = gw.wait_event("kerberos_refused", upn="erin@ad.test")["fix"]
    finally:
        gw.stop()
    assert f"'Account is sensitive and cannot be delegated' is set on {erin} (NOT_DELEGATED" in fix, fix
    assert lacking in fix, fix
    assert f"samba-tool delegation for-any-protocol {ad.NO_PT_ACCOUNT} on" in fix, fix
    assert "not the cause" not in fix, fix
    config = tmp_path / "doctor.toml"
    config.write_text(_as_account(realm, ad_mapping.gateway_config(realm, "strong"), ad.NO_PT_ACCOUNT))
    argv = [sys.executable, "-m", "proxy", "doctor", "--config", str(config), "--user", "erin@ad.test"]
    shown = _s4u2self_line(realm.run(argv, timeout=120))
    assert shown.startswith("FAIL"), shown
    assert f"is set on {erin} (NOT_DELEGATED" in shown, shown
    assert lacking in shown, shown
    assert "not the cause" not in shown, shown


def test_doctor_reads_the_gateway_accounts_delegation_tab(realm: ad.AdRealm, tmp_path: Path) -> None:
    """doctor's `delegation` check reads the gateway's own account as its Delegation tab shows it and tells all that is
    missing at once, where the KDC refuses one step at a time: svc-other (no protocol transition, no list) fails naming
    'Use any authentication protocol' and HTTP/cas.ad.test absent from msDS-AllowedToDelegateTo, with the commands for
    both; svc-kcdproxy passes; a route to HTTP/other.ad.test fails naming that SPN alone."""

    def delegation_line(text: str, name: str) -> str:
        (tmp_path / name).write_text(text)
        argv = [sys.executable, "-m", "proxy", "doctor", "--config", str(tmp_path / name)]
        lines = realm.run(argv, timeout=120).stdout.splitlines()
        index = next(i for i, line in enumerate(lines) if re.match(r"(PASS|FAIL|SKIP)\s+delegation\s", line))
        return "\n".join(lines[index : index + 2])

    strong = ad_mapping.gateway_config(realm, "strong")
    other = f"{ad.OTHER_ACCOUNT}@{ad.REALM}"
    text = strong.replace(f'"{realm.gateway_principal}"', f'"{other}"')
    shown = delegation_line(text.replace(str(realm.gateway_keytab), str(realm.keytab(ad.OTHER_ACCOUNT))), "other.toml")
    assert shown.startswith("FAIL"), shown
    assert "'Use any authentication protocol' is not chosen (TRUSTED_TO_AUTH_FOR_DELEGATION is clear" in shown
    assert f"msDS-AllowedToDelegateTo lists nothing, not {ad.BACKEND_SPN}" in shown
    assert f"samba-tool delegation for-any-protocol {ad.OTHER_ACCOUNT} on" in shown
    assert f"samba-tool delegation add-service {ad.OTHER_ACCOUNT} {ad.BACKEND_SPN}" in shown
    assert f"Set-ADUser {ad.OTHER_ACCOUNT} -Add @{{'msDS-AllowedToDelegateTo'='{ad.BACKEND_SPN}'}}" in shown

    shown = delegation_line(strong, "gateway.toml")
    assert shown.startswith("PASS"), shown
    assert f"msDS-AllowedToDelegateTo lists every route's SPN ({ad.BACKEND_SPN})" in shown

    route = '\n[[routes]]\nprefix = "/other/"\nupstream = "http://127.0.0.1:1"\nspn = "HTTP/other.ad.test"\n'
    shown = delegation_line(strong + route, "routes.toml")
    assert shown.startswith("FAIL"), shown
    assert f"msDS-AllowedToDelegateTo lists {ad.BACKEND_SPN}, not HTTP/other.ad.test" in shown
    assert "Use any authentication protocol' is not chosen" not in shown


LOCKOUT_USER = "lockdoctor"
LOCKOUT_PSO = "kcd-test-doctor-lockout"  # threshold 5 within 30 minutes, on LOCKOUT_USER only
LOCKOUT_PSO_DN = f"CN={LOCKOUT_PSO},CN=Password Settings Container,CN=System,DC=ad,DC=test"


@pytest.fixture
def lockout_user(realm: ad.AdRealm) -> Iterator[str]:
    """LOCKOUT_USER under a PSO of its own (5 bad passwords within 30 minutes), which the gateway's account may not
    read (AD's default); both deleted afterwards."""
    with _locked(realm.root):
        if LOCKOUT_USER in realm.samba_tool("user", "list"):
            realm.samba_tool("user", "delete", LOCKOUT_USER)
        if LOCKOUT_PSO in realm.samba_tool("domain", "passwordsettings", "pso", "list"):
            realm.samba_tool("domain", "passwordsettings", "pso", "delete", LOCKOUT_PSO)
        realm.samba_tool("user", "create", LOCKOUT_USER, "Lockdoctor-Ad-Pa55")
        apply_lockout_policy(realm, LOCKOUT_PSO, 11, 5, LOCKOUT_USER)
    try:
        yield LOCKOUT_USER
    finally:
        with _locked(realm.root):
            realm.samba_tool("user", "delete", LOCKOUT_USER)
            realm.samba_tool("domain", "passwordsettings", "pso", "delete", LOCKOUT_PSO)


def test_doctor_compares_the_basic_throttle_with_the_lockout_policies(
    realm: ad.AdRealm, lockout_user: str, tmp_path: Path
) -> None:
    """doctor in a Basic mode reads the domain's lockout policy and the canary's PSO from the DC. A PSO the gateway's
    account may not read (AD's default) is a skip naming it and the grant; once readable, a throttle that lets 5
    guesses through a 60 s window fails against it (threshold 5, 30 minutes), naming both keys and the PSO (what
    passes: test_ops_pure). The domain's line states the threshold the DC keeps."""
    domain = realm.ldbsearch("(objectClass=domain)", "lockoutThreshold", base="DC=ad,DC=test")
    threshold = int(domain.split("lockoutThreshold: ")[1].split()[0])
    upn = f"{lockout_user}@ad.test"
    config = ad_mapping.gateway_config(realm, "strong") + '\n[authentication]\nmode = "certificate-or-basic"\n'

    def doctor(per_user: int, window: int) -> dict[str, str]:
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(f"{config}basic_failures_per_user = {per_user}\nbasic_failure_window_seconds = {window}\n")
        done = realm.run([sys.executable, "-m", "proxy", "doctor", "--config", str(cfg), "--user", upn], timeout=120)
        lines = done.stdout.splitlines()
        found = {" ".join(line.split()[1:3]): line for line in lines if line.startswith(("PASS", "FAIL", "SKIP"))}
        found["fixes"] = "\n".join(line.strip() for line in lines if line.strip().startswith("fix:"))
        return found

    hidden = doctor(5, 60)
    assert hidden[f"basic-lockout {upn}"].startswith("SKIP"), hidden
    assert LOCKOUT_PSO_DN in hidden[f"basic-lockout {upn}"]
    assert "let svc-kcdproxy@AD.TEST read it" in hidden["fixes"], hidden["fixes"]
    domain_line = next(v for k, v in hidden.items() if k.startswith("basic-lockout") and upn not in k)
    if threshold == 0:
        assert domain_line.startswith("PASS"), domain_line
        assert "never locks" in domain_line, domain_line
    else:
        assert f"locks after {threshold} bad passwords" in domain_line, domain_line

    sid = realm.ldbsearch(f"(sAMAccountName={ad.GATEWAY_ACCOUNT})", "objectSid").split("objectSid: ")[1].split()[0]
    with _locked(realm.root):  # what an administrator grants: read on the PSO
        realm.samba_tool(
            "dsacl", "set", f"-H{realm.sam_ldb}", f"--objectdn={LOCKOUT_PSO_DN}", f"--sddl=(A;;RPLCRC;;;{sid})"
        )
    loose = doctor(5, 60)
    mine = loose[f"basic-lockout {upn}"]
    assert mine.startswith("FAIL"), loose
    assert f"{LOCKOUT_PSO_DN} locks after 5 bad passwords within 1800 s" in mine, mine
    assert "5 guesses" in mine, mine
    assert "basic_failure_window_seconds (60)" in mine, mine
    assert "basic_failures_per_user to 4 or less" in loose["fixes"], loose["fixes"]
    assert "basic_failure_window_seconds to 1800 or more" in loose["fixes"], loose["fixes"]


def test_the_mapped_account_is_impersonated_not_the_name(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """mallory's UPN is alice@corp.example and realm_map sends corp.example to AD.TEST: her rightly issued
    certificate is served as mallory@AD.TEST (the account the mapping found), never as alice@AD.TEST."""
    identity = 'realm_map = { "corp.example" = "AD.TEST" }\n'
    gw = start_gateway(realm, tmp_path, ad_backend, "strong", identity=identity)
    try:
        status, body, _ = curl(realm, gw, "mallory-sid")
        assert status == 200, body
        assert served_as(body) == "mallory@AD.TEST"
        line = summary(gw, ad_mapping.MALLORY_UPN)
        assert (line["principal"], line["mapping"]) == ("mallory@AD.TEST", "sid-extension")
    finally:
        gw.stop()


def test_upn_mode_refuses_the_account_a_realm_map_name_only_resembles(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """mapping = "upn" with realm_map corp.example -> AD.TEST: mallory's certificate (UPN alice@corp.example) makes
    the gateway ask for alice@AD.TEST, whose evidence ticket's PAC names alice@ad.test, not the certificate's UPN:
    403 at kerberos with that reason and a kdc_account_mismatch event, fresh or with alice's ticket cached, and
    nothing reaches the backend; alice herself and carol (her UPN is her PAC's) are served. The trace shows the
    refusal on the S4U2Self stage, whose evidence ticket's PAC names alice."""
    export = tmp_path / "traces.jsonl"
    source = '"san-upn"\nrealm_map = { "corp.example" = "AD.TEST" }'
    gw = start_ad_gateway(realm, tmp_path, ad_backend, f'\n[traces]\nexport = "{export}"\n', source=source)
    try:
        for attempt in ("fresh", "alice's ticket cached"):
            status, body, headers = curl(realm, gw, "mallory-sid")
            assert status == 403, (attempt, body)
            assert headers["x-kcd-refused-stage"] == "kerberos"
            assert "the KDC's account for alice@AD.TEST is not the certificate's" in body
            event = gw.wait_event("kdc_account_mismatch", upn=ad_mapping.MALLORY_UPN)
            assert "alice@ad.test" in event["fix"]
            assert "enterprise_names" in event["fix"]
            assert "backend" not in summary(gw, ad_mapping.MALLORY_UPN)["ms"]
            if attempt == "fresh":
                status, body, _ = curl(realm, gw, "alice")
                assert status == 200, body
                assert served_as(body) == "alice@AD.TEST"
                assert summary(gw, "alice@ad.test")["kdc_account"] == "upn alice@ad.test"
        assert len(gw.events("kdc_account_mismatch")) == 2
        status, body, _ = curl(realm, gw, "carol")
        assert (status, served_as(body)) == (200, "carol@AD.TEST"), body
        records = whole_json_lines(export)  # carol's may still be being written: whole lines only
        refused = next(r for r in records if r["upn"] == ad_mapping.MALLORY_UPN)
        evidence = next(s for s in refused["stages"] if s["name"] == "s4u2self")
        assert evidence["refused"] is True
        assert evidence["pac"]["upn"] == "alice@ad.test"
        assert "s4u2proxy" not in [s["name"] for s in refused["stages"]]
    finally:
        gw.stop()


def test_explain_kdc_refuses_the_account_a_realm_map_name_only_resembles(realm: ad.AdRealm, tmp_path: Path) -> None:
    """explain --kdc under mapping = "upn" with realm_map: mallory's certificate stops at kerberos with the same
    reason and fix as a request (the PAC names alice@ad.test); alice's is accepted."""
    cfg = tmp_path / "gateway.toml"
    realm_map = 'source = "san-upn"\nrealm_map = { "corp.example" = "AD.TEST" }\n'
    text = ad.gateway_config(realm).replace('source = "san-upn"\n', realm_map)
    cfg.write_text(text)
    explain = [sys.executable, "-m", "proxy", "explain", "--config", str(cfg), "--kdc", "--json", "--cert"]
    answer = json.loads(realm.run([*explain, str(ad_mapping.cert(realm, "mallory-sid"))], timeout=120).stdout)
    assert (answer["accepted"], answer["stage"]) == (False, "kerberos"), answer
    assert answer["reason"] == "the KDC's account for alice@AD.TEST is not the certificate's"
    assert "UPN alice@ad.test" in answer["fix"]
    answer = json.loads(realm.run([*explain, str(realm.user_cert("alice"))], timeout=120).stdout)
    assert answer["accepted"] is True, answer


NO_AUTH_DATA_ACCOUNT = "svc-kcdnoauth"  # this test's own gateway account: the shared svc-kcdproxy is never flagged
NO_AUTH_DATA_SPN = "HTTP/proxy-noauth.ad.test"
NO_AUTH_DATA_REQUIRED = 0x2000000  # userAccountControl: "do not put a PAC in tickets to this account"


def _no_auth_data_account(realm: ad.AdRealm) -> Path:
    """A second gateway account, made once in the realm's kept state: protocol transition, delegation to
    HTTP/cas.ad.test, AES keys, and NO_AUTH_DATA_REQUIRED; its keytab."""
    name, dn = NO_AUTH_DATA_ACCOUNT, f"CN={NO_AUTH_DATA_ACCOUNT},CN=Users,{realm.base_dn}"
    if f"sAMAccountName: {name}" not in realm.ldbsearch(f"(sAMAccountName={name})", "sAMAccountName"):
        realm.samba_tool("user", "create", name, ad.SERVICE_PASSWORD.format(account=name))
        realm.samba_tool("spn", "add", NO_AUTH_DATA_SPN, name)
        realm.samba_tool("delegation", "for-any-protocol", name, "on")
        realm.samba_tool("delegation", "add-service", name, ad.BACKEND_SPN)
        realm.ldbmodify(
            f"dn: {dn}\nchangetype: modify\nreplace: msDS-SupportedEncryptionTypes\nmsDS-SupportedEncryptionTypes: 24\n"
        )
    found = realm.ldbsearch(f"(sAMAccountName={name})", "userAccountControl")
    uac = int(next(line for line in found.splitlines() if line.startswith("userAccountControl:")).split(":")[1])
    if not uac & NO_AUTH_DATA_REQUIRED:
        uac |= NO_AUTH_DATA_REQUIRED
        realm.ldbmodify(f"dn: {dn}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {uac}\n")
    keytab = realm.keytab(name)
    if not keytab.exists():
        realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={name}@{ad.REALM}")
        keytab.chmod(0o644)
    return keytab


def test_a_gateway_account_with_no_auth_data_required_still_meets_the_check(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """A gateway account flagged NO_AUTH_DATA_REQUIRED under mapping = "upn" + realm_map: Samba 4.17 still puts the
    PAC in the evidence ticket (Windows leaves it out, and the default kdc_account = "auto" then refuses the ticket:
    test_kdc_account.py), so mallory's certificate is still refused as alice's account and alice is served; doctor's
    kdc-account check names the account the PAC states."""
    keytab = _no_auth_data_account(realm)
    uac = realm.ldbsearch(f"(sAMAccountName={NO_AUTH_DATA_ACCOUNT})", "userAccountControl")
    assert (
        int(next(x for x in uac.splitlines() if x.startswith("userAccountControl:")).split(":")[1])
        & NO_AUTH_DATA_REQUIRED
    )
    source = '"san-upn"\nrealm_map = { "corp.example" = "AD.TEST" }'
    principal = f'"{NO_AUTH_DATA_ACCOUNT}@{ad.REALM}"'
    gw = start_ad_gateway(realm, tmp_path, ad_backend, source=source, principal=principal, keytab=f'"{keytab}"')
    try:
        status, body, headers = curl(realm, gw, "mallory-sid")
        assert status == 403, body
        assert headers["x-kcd-refused-stage"] == "kerberos"
        assert "the KDC's account for alice@AD.TEST is not the certificate's" in body
        assert "alice@ad.test" in gw.wait_event("kdc_account_mismatch", upn=ad_mapping.MALLORY_UPN)["fix"]
        status, body, _ = curl(realm, gw, "alice")
        assert (status, served_as(body)) == (200, "alice@AD.TEST"), body
        assert summary(gw, "alice@ad.test")["kdc_account"] == "upn alice@ad.test"
    finally:
        gw.stop()
    doctor = [sys.executable, "-m", "proxy", "doctor", "--config", str(tmp_path / "gateway.toml")]
    out = realm.run([*doctor, "--user", "alice@ad.test"], timeout=180).stdout
    line = next(x for x in out.splitlines() if "kdc-account" in x)
    assert line.startswith("PASS"), out
    assert "upn alice@ad.test" in line


def test_simple_bind_over_ldaps(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path) -> None:
    """bind = "simple" over ldaps:// with the DC's CA: alice's SID certificate is served; a wrong password
    is 503 (the directory refuses us: never an admission) and the log says the bind failed."""
    ca = realm.samba_dir / "private" / "tls" / "ca.pem"
    for password, expected in ((ad.SERVICE_PASSWORD.format(account=ad.GATEWAY_ACCOUNT), 200), ("wrong", 503)):
        directory = tmp_path / str(expected)
        directory.mkdir()
        (directory / "ldap.pw").write_text(password + "\n")
        text = f"""
[directory]
urls = ["ldaps://{realm.dc_host}"]
base_dn = "{realm.base_dn}"
bind = "simple"
bind_dn = "CN={ad.GATEWAY_ACCOUNT},CN=Users,{realm.base_dn}"
password_file = "{directory / "ldap.pw"}"
ca_file = "{ca}"
"""
        gw = start_gateway(realm, directory, ad_backend, "strong", directory_text=text)
        try:
            status, body, _ = curl(realm, gw, "alice-sid")
            assert status == expected, body
            if expected == 503:
                assert "Invalid credentials" in gw.wait_event("directory_server_failed")["error"]
        finally:
            gw.stop()


_SILENT_SERVER = """
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[2], int(sys.argv[1])))
s.listen(16)
held = []
while True:
    conn, _ = s.accept()
    held.append(conn)  # accepted, never answered: a hung directory server
"""


def test_hung_directory_server_is_503_within_its_timeout(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """A server that accepts the connection and never answers: 503 after [directory] timeout, not a hung request."""
    port = realm.free_port()
    argv = [sys.executable, "-c", _SILENT_SERVER, str(port), realm.dc_address]
    silent = realm.popen(argv, log=tmp_path / "silent.log")
    try:
        deadline = time.monotonic() + 60
        while not realm.port_answers(port, realm.dc_address):
            assert silent.poll() is None, (tmp_path / "silent.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # the DC's name (the Kerberos bind gets its ticket for ldap/dc1.ad.test), a port where nothing answers
        text = ad_mapping.directory_table(realm, urls=(f"ldap://{realm.dc_host}:{port}",)) + "timeout = 1\n"
        gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=text)
        try:
            status, body, headers = curl(realm, gw, "alice-sid")
            assert status == 503, body
            assert headers["retry-after"]
            assert gw.wait_event("directory_server_failed")["error"] == "no answer in time"
            assert summary(gw, "alice@ad.test")["ms"]["mapping"] < 10_000  # bounded by the timeout, not curl's
        finally:
            gw.stop()
    finally:
        silent.kill()
        silent.wait()


def test_a_name_no_account_has(realm: ad.AdRealm, strong: AdProcess, audit: AdProcess) -> None:
    """ghost@ad.test, no account: strong refuses at mapping; audit lets the KDC decide (it refuses), with a warning."""
    status, body, headers = curl(realm, strong, "ghost")
    assert (status, headers["x-kcd-refused-stage"]) == (403, "mapping"), body
    assert "no account in the directory" in body
    status, body, headers = curl(realm, audit, "ghost")
    assert (status, headers["x-kcd-refused-stage"]) == (403, "kerberos"), body
    assert "under DC=ad,DC=test" in audit.wait_event("weak_certificate_mapping", upn="ghost@ad.test")["detail"]


def test_doctor_names_a_kerberos_bind_that_gets_no_ticket(realm: ad.AdRealm, tmp_path: Path) -> None:
    """The DC by its address (no ldap/10.213.0.1 SPN): the directory check fails and says why, with the fix."""
    cfg = tmp_path / "gateway.toml"
    text = ad_mapping.directory_table(realm, urls=(f"ldap://{realm.dc_address}",))
    cfg.write_text(ad_mapping.gateway_config(realm, "strong", directory_text=text))
    done = realm.run([sys.executable, "-m", "proxy", "doctor", "--config", str(cfg)], timeout=120)
    line = next(line for line in done.stdout.splitlines() if line.split()[1:2] == ["directory"])
    assert line.startswith("FAIL"), done.stdout
    assert f"no Kerberos ticket for the directory at ldap/{realm.dc_address}" in line


def test_two_upns_one_principal_apart_never_share_a_ticket(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """enterprise_names with realm_map corp.example -> AD.TEST: mallory's UPN alice@corp.example and alice's
    alice@ad.test both map to the principal alice@AD.TEST, but the KDC is asked for two different NT-ENTERPRISE
    names and impersonates two accounts. Each is served as their own account, in either order and with the
    other's ticket cached: the ticket cache is keyed by the name the KDC was asked for, so mallory's ticket is
    never alice's (nor refused to her as mallory's)."""
    source = f'"san-upn"\nrealm_map = {{ "{ad.OTHER_SUFFIX}" = "{ad.REALM}" }}\nenterprise_names = true'
    gw = start_ad_gateway(realm, tmp_path, ad_backend, source=source)
    try:
        for name, upn, account in (
            ("mallory-sid", ad_mapping.MALLORY_UPN, "upn alice@corp.example"),
            ("alice", "alice@ad.test", "upn alice@ad.test"),
            ("mallory-sid", ad_mapping.MALLORY_UPN, "upn alice@corp.example"),
            ("alice", "alice@ad.test", "upn alice@ad.test"),
        ):
            status, body, _ = curl(realm, gw, name)
            assert status == 200, (name, body)
            assert summary(gw, upn)["kdc_account"] == account
        assert not gw.events("kdc_account_mismatch")
    finally:
        gw.stop()


_DEVICE_SECRETS = {
    "Authorization": "Bearer ad-bearer-s3cret-Kp4",
    "Cookie": "session=ad-cookie-s3cret-Wq2",
    "X-Remote-User": "ad-xremote-s3cret-Mn8",
    "Proxy-Authorization": "Basic YWQtcHJveHktczNjcmV0LUp0Nw==",
}
_WRONG_BIND = "wr0ng-bind-s3cret-Lz3"


def test_strong_mapping_refusals_and_a_simple_bind_leak_no_secret(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The secrets audit's AD part (docs/hardening.md, section 9): a gateway with bind = "simple" (its password,
    right and then wrong) refusing certificates by strong mapping (another account's SID, no SID, weak only, a
    disabled account) and serving one, each request carrying the device's own Authorization, cookie and identity
    header: neither the log, the trace export nor the answers hold the bind password or the device's secrets."""
    ca = realm.samba_dir / "private" / "tls" / "ca.pem"
    right = ad.SERVICE_PASSWORD.format(account=ad.GATEWAY_ACCOUNT)
    outputs: dict[str, str] = {}
    for password, certificates in (
        (right, ("alice-sid", "alice-bob-sid", "bob", "grace-weak", "dave-sid")),
        (_WRONG_BIND, ("alice-sid",)),
    ):
        directory = tmp_path / ("right" if password == right else "wrong")
        directory.mkdir()
        (directory / "ldap.pw").write_text(password + "\n")
        text = f"""
[directory]
urls = ["ldaps://{realm.dc_host}"]
base_dn = "{realm.base_dn}"
bind = "simple"
bind_dn = "CN={ad.GATEWAY_ACCOUNT},CN=Users,{realm.base_dn}"
password_file = "{directory / "ldap.pw"}"
ca_file = "{ca}"
"""
        gw = start_gateway(realm, directory, ad_backend, "strong", directory_text=text)
        try:
            for name in certificates:
                argv = ["curl", "-sS", "-i", "--max-time", "30", "--cacert", str(realm.pki.root_cert)]
                cert, key = ad_mapping.cert(realm, name), ad_mapping.key(realm, name)
                if not cert.exists():  # the realm's plain certificate (as `curl` does)
                    cert, key = realm.user_cert(name), realm.user_key(name)
                argv += ["--cert", str(cert), "--key", str(key)]
                argv += [arg for header, value in _DEVICE_SECRETS.items() for arg in ("-H", f"{header}: {value}")]
                done = realm.run([*argv, f"{gw.url}/Microsoft-Server-ActiveSync"], timeout=60)
                outputs[f"{directory.name} {name}: answer"] = done.stdout + done.stderr
                assert " 200 " in done.stdout or " 403 " in done.stdout or " 503 " in done.stdout, done.stdout[:300]
        finally:
            gw.stop()
        outputs[f"{directory.name}: log"] = gw.log_path.read_text(errors="replace")
        outputs[f"{directory.name}: traces"] = (directory / "traces.jsonl").read_text(errors="replace")
    needles = {right: "the bind password", _WRONG_BIND: "a wrong bind password"}
    needles.update({"ad-bearer-s3cret-Kp4": "the device's Bearer token", "ad-xremote-s3cret-Mn8": "X-Remote-User"})
    needles.update({"YWQtcHJveHktczNjcmV0LUp0Nw==": "the device's Proxy-Authorization"})
    leaks = [(where, what) for where, text in outputs.items() for secret, what in needles.items() if secret in text]
    cookie = "ad-cookie-s3cret-Wq2"  # the backend's echo shows it: cookies go on to the backend (OWA's session)
    leaks += [
        (where, "the device's cookie") for where, text in outputs.items() if cookie in text and "answer" not in where
    ]
    assert not leaks, leaks
