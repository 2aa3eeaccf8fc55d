"""Basic credentials against Active Directory (the Samba AD DC of `proxy.lab.ad`): the user names a device's mail
account sends (`alice`, `ADTEST\\alice`, `alice@ad.test`, in any ASCII case), a UPN whose suffix is not the realm
(`carol@corp.example`, found by AD's `uPNSuffixes` with `identity.enterprise_names`), a domain nobody configured,
and `certificate-and-basic` with the certificate and the password of one user. Each request is curl inside the
realm's namespace; the backend echoes whom it authenticated."""

from __future__ import annotations

import base64
import json
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    _locked,
    _start,
    ad_curl,
    kdc_log_offset,
    start_ad_gateway,
    status_and_body,
    wait_kdc_reason,
)
from tests.integration.test_ad_directory_outage import _relay_to
from tests.integration.test_ad_lockout import _directory_says

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

PASSWORDS = {user.name: user.password for user in ad.USERS}


def _gateway(realm: ad.AdRealm, directory: Path, backend: AdProcess, mode: str) -> AdProcess:
    """The AD lab gateway in `mode`, with enterprise names (carol's UPN suffix is not the realm), and the domains
    Basic names may carry: the realm's NetBIOS name ADTEST (not its first label, AD) and the UPN suffix."""
    return start_ad_gateway(
        realm,
        directory,
        backend,
        f'\n[authentication]\nmode = "{mode}"\n',
        source='"san-upn"\nenterprise_names = true\nrealm_map = { adtest = "AD.TEST", "corp.example" = "AD.TEST" }',
    )


@pytest.fixture(scope="module")
def basic_gw(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    gw = _gateway(ad_realm, tmp_path_factory.mktemp("ad-basic"), ad_backend, "basic")
    yield gw
    gw.stop()


def _basic(realm: ad.AdRealm, gw: AdProcess, name: str, password: str, user: str | None = None) -> tuple[int, str]:
    return status_and_body(ad_curl(realm, f"{gw.url}/owa/", user, "-u", f"{name}:{password}"))


@pytest.mark.parametrize("name", ["alice", "ADTEST\\alice", "adtest\\ALICE", "alice@ad.test", "Alice@AD.TEST"])
def test_the_names_a_device_sends_sign_alice_in(ad_realm: ad.AdRealm, basic_gw: AdProcess, name: str) -> None:
    """Every spelling of alice's name a mail account sends (bare, down-level, UPN; AD ignores case) is alice's own
    AS exchange with her password, and the backend serves alice."""
    status, body = _basic(ad_realm, basic_gw, name, PASSWORDS["alice"])
    assert status == 200, body
    assert json.loads(body)["principal"].lower() in ("alice@ad.test", "alice\\@ad.test@ad.test")  # as asked


@pytest.mark.parametrize("name", ["EVIL\\alice", "alice@evil.test", "ADTEST\\alice@evil.test", "\\alice"])
def test_a_name_of_another_domain_is_refused_before_the_kdc(
    ad_realm: ad.AdRealm, basic_gw: AdProcess, name: str
) -> None:
    """A domain the configuration does not name (or a name that mixes two forms) is 401 with the challenge, even
    with alice's right password: never alice of the default realm."""
    status, body = _basic(ad_realm, basic_gw, name, PASSWORDS["alice"])
    assert status == 401, body


def test_a_upn_suffix_outside_the_realm_signs_in_by_enterprise_name(ad_realm: ad.AdRealm, basic_gw: AdProcess) -> None:
    """carol@corp.example (a uPNSuffixes suffix, not the realm) with her password: the AS exchange asks for the
    NT-ENTERPRISE name, AD finds carol, and the backend serves carol."""
    status, body = _basic(ad_realm, basic_gw, "carol@corp.example", PASSWORDS["carol"])
    assert status == 200, body
    assert "carol" in json.loads(body)["principal"].lower()


def test_certificate_and_basic_with_one_users_certificate_and_password(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """certificate-and-basic, enterprise names: carol's certificate (UPN carol@corp.example) with carol's password
    under that same UPN is one user, served; with alice's password it is 403 (two users)."""
    gw = _gateway(ad_realm, tmp_path, ad_backend, "certificate-and-basic")
    try:
        status, body = _basic(ad_realm, gw, "carol@corp.example", PASSWORDS["carol"], user="carol")
        assert status == 200, body
        status, body = _basic(ad_realm, gw, "alice@ad.test", PASSWORDS["alice"], user="carol")
        assert status == 403, body
        status, body = _basic(ad_realm, gw, "alice@ad.test", PASSWORDS["alice"], user="alice")
        assert status == 200, body
    finally:
        gw.stop()


def test_certificate_and_basic_mallorys_certificate_with_alices_password_under_her_account_name(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """certificate-and-basic, enterprise names, no strong mapping: mallory's certificate (UPN alice@corp.example,
    which realm_map builds into alice@AD.TEST) with alice's password under her down-level or bare name (AD's ticket
    alice@AD.TEST) is two accounts: 403, never alice (it was served as alice: the built principal was taken for the
    account). Mallory with her own password under her certificate's UPN is mallory."""
    realm = ad_mapping_realm
    gw = _gateway(realm, tmp_path, ad_backend, "certificate-and-basic")

    def send(name: str, password: str) -> tuple[int, str]:
        cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert)]
        cmd += [
            "--cert",
            str(ad_mapping.cert(realm, "mallory-sid")),
            "--key",
            str(ad_mapping.key(realm, "mallory-sid")),
        ]
        cmd += ["-u", f"{name}:{password}", "-w", "\n%{http_code}", f"{gw.url}/owa/"]
        return status_and_body(realm.run(cmd, timeout=60))

    try:
        for name in ("ADTEST\\alice", "alice"):
            status, body = send(name, PASSWORDS["alice"])
            assert status == 403, body
        status, body = send(
            ad_mapping.MALLORY_UPN, next(u.password for u in ad_mapping.MAPPING_USERS if u.name == "mallory")
        )
        assert status == 200, body
        assert "alice\\@corp.example" in json.loads(body)["principal"].lower()  # AD's name for mallory's UPN
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("name", "password", "status"),
    [
        ("alice@ad.test", "not-her-password", 401),
        ("nobody@ad.test", "Nobody-Pa55", 401),
        ("dave@ad.test", PASSWORDS["dave"], 403),
        ("erin@ad.test", PASSWORDS["erin"], 200),
        ("pat@ad.test", PASSWORDS["pat"], 200),
    ],
)
def test_what_ad_says_of_a_password_is_what_the_device_gets(
    ad_realm: ad.AdRealm, basic_gw: AdProcess, name: str, password: str, status: int
) -> None:
    """A wrong password and an unknown user are the same 401 (challenge again); the disabled dave is 403 with his
    right password (AD says so whatever the password); erin (sensitive, cannot be delegated) and pat (Protected
    Users) sign in with their own tickets: no delegation is involved, so both are served."""
    got, body = _basic(ad_realm, basic_gw, name, password)
    assert got == status, body


def test_certificate_and_basic_under_strong_mapping_is_one_account_by_its_upn(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """mapping = "strong", enterprise names, certificate-and-basic: the mapping stage proves alice's certificate (SID
    extension) is her account and impersonates `alice@AD.TEST`; her password under her UPN is AD's
    `alice\\@ad.test@AD.TEST`: one account, served (it was 403). mallory's certificate (her UPN is
    `alice@corp.example`) with alice's password under alice's UPN is two accounts: 403."""
    realm = ad_mapping_realm
    port = realm.free_port()
    text = ad_mapping.gateway_config(realm, "strong", port=port, backend_port=ad_backend.port)
    text = text.replace("[identity]\n", "[identity]\nenterprise_names = true\n", 1)
    text += '\n[authentication]\nmode = "certificate-and-basic"\n'
    (tmp_path / "gateway.toml").write_text(text)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(tmp_path / "gateway.toml")]
    gw = _start(realm, argv, port, tmp_path / "gateway.log", scheme="https")

    def send(certificate: str, name: str, password: str) -> tuple[int, str]:
        cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert)]
        cmd += ["--cert", str(ad_mapping.cert(realm, certificate)), "--key", str(ad_mapping.key(realm, certificate))]
        cmd += ["-u", f"{name}:{password}", "-w", "\n%{http_code}", f"{gw.url}/owa/"]
        return status_and_body(realm.run(cmd, timeout=60))

    try:
        status, body = send("alice-sid", "alice@ad.test", PASSWORDS["alice"])
        assert status == 200, body
        status, body = send("alice-sid", "ADTEST\\alice", PASSWORDS["alice"])  # the mapped account's own name
        assert status in (200, 401), body  # 401 where ADTEST is not configured: never another user's
        status, body = send("mallory-sid", "alice@ad.test", PASSWORDS["alice"])
        assert status == 403, body
    finally:
        gw.stop()


def test_a_device_sending_latin1_signs_in_at_ad_and_costs_no_bad_password(
    ad_realm: ad.AdRealm, basic_gw: AdProcess
) -> None:
    """An AD user whose password holds ä and ö, from a device that encodes `user:password` in Latin-1: 200, and the
    DC's badPwdCount stays 0. AD derives the user's keys from the password's UTF-8; the Latin-1 bytes went to it as
    they came, a wrong password (401) that the DC counted towards the account's lockout on every poll."""
    name, password = f"latin{uuid.uuid4().hex[:6]}", "Pässwört-Ad-1"
    with _locked(ad_realm.root):
        ad_realm.samba_tool("user", "create", name, password)
    try:
        header = "Authorization: Basic " + base64.b64encode(f"{name}:{password}".encode("latin-1")).decode()
        status, body = status_and_body(ad_curl(ad_realm, f"{basic_gw.url}/owa/", None, "-H", header))
        assert status == 200, body
        assert json.loads(body)["principal"].lower() == f"{name}@ad.test"
        assert _directory_says(ad_realm, name) == (0, 0)
    finally:
        with _locked(ad_realm.root):
            ad_realm.samba_tool("user", "delete", name)


def test_a_basic_sign_in_under_the_gateways_upn_never_reaches_the_kdc(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The gateway's account (`svc-kcdproxy`, its kerberos.principal) with a UPN of another name and suffix
    (`kcd-…@corp.example`, as service accounts are often given): a Basic guess under that UPN is the same 401 as any
    wrong password and never reaches the KDC, where the gateway has a [directory] to ask whose UPN it is. Before, only
    kerberos.principal's spellings were refused: the KDC resolved the UPN (NT-ENTERPRISE) to the gateway's account and
    counted the wrong password against it (Samba: NT_STATUS_WRONG_PASSWORD mapped to ADTEST\\svc-kcdproxy), towards
    the lockout of the account every delegation needs. alice's wrong password after it still reaches the KDC."""
    ad_realm = ad_mapping_realm  # its [directory] names the DC, which only that fixture's hosts entry resolves
    account = ad.GATEWAY_ACCOUNT
    alias = f"kcd-{uuid.uuid4().hex[:6]}@corp.example"
    entry = f"dn: CN={account},CN=Users,{ad_realm.base_dn}\nchangetype: modify\nreplace: userPrincipalName\n"
    extra = '\n[authentication]\nmode = "basic"\n' + ad_mapping.directory_table(ad_realm, cache_seconds=0)
    source = '"san-upn"\nenterprise_names = true\nrealm_map = { adtest = "AD.TEST", "corp.example" = "AD.TEST" }'
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, extra, source=source)
    # every AD test's gateway is this account: its UPN is another only while this test holds the realm's lock
    with _locked(ad_realm.root):
        ad_realm.ldbmodify(entry + f"userPrincipalName: {alias}\n")
        try:
            offset = kdc_log_offset(ad_realm)
            status, body = _basic(ad_realm, gw, alias, "Wrong-1")
            assert status == 401, body
            assert body.startswith("the user name or password is incorrect"), body
            assert "kerberos.principal" in gw.wait_event("authentication_required", stage="authentication")["fix"]
            assert _basic(ad_realm, gw, "alice", "Wrong-2")[0] == 401
            wait_kdc_reason(ad_realm, offset, "NT_STATUS_WRONG_PASSWORD", "[ADTEST]\\[alice]")
            log = ad_realm.samba_log.read_bytes()[offset:].decode(errors="replace")
            wrong = [line for line in log.splitlines() if "NT_STATUS_WRONG_PASSWORD" in line]
            assert [
                line for line in wrong if f"[ADTEST]\\[{account}]" in line
            ] == []  # its own sign-ins are NT_STATUS_OK
        finally:
            ad_realm.ldbmodify(entry + f"userPrincipalName: {account}@{ad.DNS_DOMAIN}\n")
            gw.stop()


def test_a_hung_directory_holds_no_basic_sign_in_and_the_gateways_upn_stays_refused(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """Basic with a [directory] (cache_seconds = 0, timeout = 3) whose only server hangs once the gateway learnt its
    own account's UPN (`kcd-…@corp.example` on svc-kcdproxy): bob's and carol's sign-ins are served and the guess
    under that UPN is still the 401 that never reaches the KDC, and no more than one of the two served waits a
    [directory] timeout. Before, each sign-in the throttles let through waited for the gateway's account's look-up
    (the kept connection, then a new one), holding that user's KDC turn, and then sent the UPN's guess to the KDC.
    The server is a relay to the DC frozen with SIGSTOP (`test_ad_directory_outage`), once the gateway logged the UPN
    learnt (`gateway_upn_learnt`): alice's 200 did not say so (the look-up may outlast her sign-in)."""
    realm, timeout, account = ad_mapping_realm, 3, ad.GATEWAY_ACCOUNT  # the fixture resolves the DC's name
    alias = f"kcd-{uuid.uuid4().hex[:6]}@corp.example"
    entry = f"dn: CN={account},CN=Users,{realm.base_dn}\nchangetype: modify\nreplace: userPrincipalName\n"
    source = '"san-upn"\nenterprise_names = true\nrealm_map = { adtest = "AD.TEST", "corp.example" = "AD.TEST" }'
    with _relay_to(realm, tmp_path / "relay.log", 389) as (relay, port):
        urls = (f"ldap://{realm.dc_host}:{port}",)
        directory = ad_mapping.directory_table(realm, urls=urls, cache_seconds=0) + f"timeout = {timeout}\n"
        # every AD test's gateway is this account: its UPN is another only while this test holds the realm's lock
        # (test_a_basic_sign_in_under_the_gateways_upn_never_reaches_the_kdc's restored UPN was learnt here before)
        with _locked(realm.root):
            realm.ldbmodify(entry + f"userPrincipalName: {alias}\n")
            gw = start_ad_gateway(
                realm, tmp_path, ad_backend, '\n[authentication]\nmode = "basic"\n' + directory, source=source
            )
            try:
                status, body = _basic(
                    realm, gw, "alice", PASSWORDS["alice"]
                )  # starts the look-up of the gateway's account
                assert status == 200, body
                # the look-up may outlast alice's sign-in (it waits one timeout, the look-up may take two): learnt first
                assert gw.wait_event("gateway_upn_learnt")["upn"] == alias
                relay.send_signal(signal.SIGSTOP)
                took: dict[str, float] = {}
                answers: dict[str, int] = {}
                for name, password in (("bob", PASSWORDS["bob"]), ("carol", PASSWORDS["carol"]), (alias, "Wrong-1")):
                    start = time.monotonic()
                    answers[name], body = _basic(realm, gw, name, password)
                    took[name] = time.monotonic() - start
                assert answers == {"bob": 200, alias: 401, "carol": 200}, (answers, body)
                fix = gw.wait_event("authentication_required", stage="authentication")["fix"]
                assert f"{alias!r} is the UPN of the gateway's own account" in fix, fix
                slow = [
                    name for name in ("bob", "carol") if took[name] >= timeout
                ]  # a 401 waits for `Pace`: not counted
                assert len(slow) <= 1, took
            finally:
                relay.send_signal(signal.SIGCONT)
                realm.ldbmodify(entry + f"userPrincipalName: {account}@{ad.DNS_DOMAIN}\n")
                gw.stop()
