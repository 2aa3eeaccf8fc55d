"""The gateway against Active Directory: a Samba AD DC (`proxy.lab.ad`), the gateway, the Exchange
stand-in and curl all inside the realm's network namespace."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from proxy.lab import ad
from tests import leftovers
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    _locked,
    ad_curl,
    kdc_log_offset,
    start_ad_gateway,
    status_and_body,
    users_lock,
    wait_kdc_reason,
)
from tests.integration.jsonlog import WAIT, eventually

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def ad_gateway(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    gw = start_ad_gateway(ad_realm, tmp_path_factory.mktemp("ad-gateway"), ad_backend)
    yield gw
    gw.stop()


def test_delegated_request_reaches_backend_as_the_ad_user(ad_realm: ad.AdRealm, ad_gateway: AdProcess) -> None:
    """alice's certificate in, S4U2Self + S4U2Proxy against Samba's KDC, and the backend serves alice@AD.TEST."""
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/Microsoft-Server-ActiveSync", "alice"))
    assert status == 200, body
    assert json.loads(body)["principal"] == "alice@AD.TEST"


def test_the_realm_runs_only_inside_its_namespace(ad_realm: ad.AdRealm) -> None:
    """Every samba process lives in the realm's network namespace, not the host's; the KDC answers in there."""
    assert ad_realm.port_answers(88)
    inside = Path("/run/netns", ad_realm.netns).stat().st_ino
    host = Path("/proc/self/ns/net").stat().st_ino
    samba = [pid for pid in ad.namespace_pids(ad_realm) if Path(f"/proc/{pid}/comm").read_text().strip() == "samba"]
    assert samba
    for pid in samba:
        assert Path(f"/proc/{pid}/ns/net").stat().st_ino == inside != host


def _program(pid: int) -> str:
    """The name of the program the process runs (its executable's: samba's daemons rename themselves)."""
    return Path(f"/proc/{pid}/exe").readlink().name


def test_no_run_stops_the_realms_samba_while_this_one_uses_it(ad_realm: ad.AdRealm) -> None:
    """Each process of samba's that carries a run's mark (smbd, cleanupd, smbd-notifyd: samba's own daemons write
    their titles over their environment) names the realm's users lock beside it, and this session holds that lock
    shared: a run starting meanwhile (tests/leftovers.py) leaves them running even once the run that started them has
    ended."""
    run = f"{leftovers.MARK}=".encode()
    named = f"{leftovers.SHARED_LOCK}={users_lock(ad_realm)}".encode()
    marked = {}
    for pid in ad.namespace_pids(ad_realm):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if any(variable.startswith(run) for variable in environ) and _program(pid) in ("samba", "smbd"):
                marked[pid] = named in environ
    assert marked, "no process of samba's carries a run's mark"
    assert all(marked.values()), f"samba's processes that name no users lock: {marked}"
    with users_lock(ad_realm).open("rb") as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lab_down_leaves_a_realm_a_run_uses(ad_realm: ad.AdRealm) -> None:
    """`kcd-proxy lab down --ad --dir DIR` and `lab down --dir DIR`, DIR the tests' realm's parent (ad_fixtures.py
    tells how to address it so), while this session holds the realm's users lock: both refuse, naming the lock, and
    samba keeps answering in its namespace (before: both stopped it and removed the namespace under the run)."""
    lab = [sys.executable, "-m", "proxy", "lab", "down", "--dir", str(ad_realm.root.parent)]
    for argv in ([*lab, "--ad"], lab):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"in use: {users_lock(ad_realm)} is held" in done.stderr, done.stderr
        assert ad.running(ad_realm), f"{argv} stopped the realm: {done.stdout}{done.stderr}"


_STUBBORN = """
import pathlib, signal, sys, time
marks = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (marks / "termed").touch())
(marks / "ready").touch()
deadline = time.monotonic() + 60
while not (marks / "release").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _lab_down_while_a_run_starts(tmp_path: Path, realm: ad.AdRealm) -> None:
    """`kcd-proxy lab down --ad` on `realm`'s namespace, where one process outlives its SIGTERM until told: while it
    waits for that process, a run's session (the realm's directory made, as the ad_realm fixture does, and its users
    lock taken shared) must wait; once released, the namespace is stopped and gone."""
    subprocess.run(["ip", "netns", "add", realm.netns], check=True)
    stubborn = subprocess.Popen(realm.netns_argv([sys.executable, "-c", _STUBBORN, str(tmp_path)]))
    down: subprocess.Popen[str] | None = None
    try:
        eventually(lambda: (tmp_path / "ready").exists(), what="the stubborn process in the namespace")
        argv = [sys.executable, "-m", "proxy", "lab", "down", "--ad", "--dir", str(tmp_path)]
        down = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        eventually(lambda: (tmp_path / "termed").exists(), what="lab down's SIGTERM")
        realm.root.mkdir(parents=True, exist_ok=True)
        with users_lock(realm).open("a") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a run's session: it must wait for the stop to end
        (tmp_path / "release").touch()
        stubborn.wait(timeout=60)  # reaped here, its parent: lab down waits for the namespace to empty
        output, _ = down.communicate(timeout=60)
        assert down.returncode == 0, output
        assert not ad.namespace_exists(realm)
    finally:
        (tmp_path / "release").touch()
        stubborn.kill()
        stubborn.wait()
        if down is not None and down.poll() is None:
            down.kill()
            down.wait()
        ad.down(realm)


def test_lab_down_holds_the_realms_users_lock_until_the_realm_is_stopped(tmp_path: Path) -> None:
    """`kcd-proxy lab down --ad` on a realm nobody uses holds its users lock exclusively while it stops the processes
    in the realm's namespace (one here that outlives its SIGTERM until told): a run starting meanwhile waits for the
    lock instead of having samba stopped under it (before: the lock was let go once found free, before the stop)."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    realm = ad.AdRealm.at(tmp_path / "ad")
    realm.root.mkdir()
    users_lock(realm).touch()
    _lab_down_while_a_run_starts(tmp_path, realm)


def test_lab_down_holds_the_users_lock_of_a_realm_whose_directory_is_not_there_yet(tmp_path: Path) -> None:
    """`kcd-proxy lab down --ad` on a namespace whose realm directory is gone (or not made yet) holds the users lock
    while it stops the namespace: a run creating the directory meanwhile waits instead of having its realm stopped."""
    if os.geteuid() != 0:
        pytest.skip("a network namespace needs root")
    # no directory: `rm -rf .lab` with samba running, or a first run starting
    _lab_down_while_a_run_starts(tmp_path, ad.AdRealm.at(tmp_path / "ad"))


def test_a_sensitive_user_is_refused_because_the_evidence_ticket_is_not_forwardable(
    ad_realm: ad.AdRealm, ad_gateway: AdProcess, tmp_path: Path
) -> None:
    """erin is 'sensitive and cannot be delegated': Samba issues a non-forwardable evidence ticket, S4U2Proxy is
    refused (BADOPTION), the device gets 403 naming the evidence ticket, the log's fix names the sensitive flag.
    Without a [directory] the fix cannot name the one cause, but the evidence ticket's PAC (logon-info: an AD KDC)
    says the realm is AD: the fix gives AD's commands only (samba-tool, PowerShell), never MIT's kadmin; doctor's
    s4u2self check says the same."""
    ad_gateway.mark()
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/owa/", "erin"))
    assert status == 403
    assert "the gateway may not act for erin@AD.TEST: its evidence ticket is not forwardable" in body
    event = ad_gateway.wait_event("kerberos_refused", principal="erin@AD.TEST")
    assert "marked sensitive" in event["fix"]
    assert "kadmin" not in event["fix"], event["fix"]
    assert "samba-tool user sensitive erin off" in event["fix"], event["fix"]
    assert "Set-ADAccountControl erin -AccountNotDelegated $false" in event["fix"], event["fix"]
    config = tmp_path / "gateway.toml"
    config.write_text(ad.gateway_config(ad_realm, port=ad_realm.free_port(), backend_port=ad_realm.free_port()))
    doctor = _run_kcd(ad_realm, "doctor", "--config", str(config), "--user", "erin@ad.test")
    shown = next(line for line in doctor.stdout.splitlines() if "fix: evidence ticket not forwardable" in line)
    assert "kadmin" not in shown, shown
    assert "samba-tool user sensitive erin off" in shown, shown


def test_pinned_samba_delegates_a_protected_users_member(ad_realm: ad.AdRealm, ad_gateway: AdProcess) -> None:
    """pat is in Protected Users, which Samba 4.17's KDC does not apply to delegation (Windows refuses): served."""
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/owa/", "pat"))
    assert status == 200, body
    assert json.loads(body)["principal"] == "pat@AD.TEST"


def test_the_backend_accepts_a_ticket_with_alices_pac(ad_realm: ad.AdRealm, ad_gateway: AdProcess) -> None:
    """The service ticket the backend accepts carries AD's PAC: its UPN, alice's SID and the S4U2Proxy record."""
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/EWS/Exchange.asmx", "alice"))
    assert status == 200, body
    pac = json.loads(body)["pac"]
    assert pac["size"] > 500
    assert pac["upn"] == "alice@ad.test"
    assert pac["sam_name"] == "alice"
    assert pac["sid"].startswith("S-1-5-21-")
    assert {"logon-info", "upn-dns-info", "delegation-info"} <= set(pac["buffers"])
    sid = ad_realm.ldbsearch("(sAMAccountName=alice)", "objectSid")
    assert f"objectSid: {pac['sid']}" in sid


def test_an_ad_delegations_trace_reads_as_delegation_flow_says(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """docs/delegation-flow.md's "On the AD realm", on bob's first request to a fresh gateway: both tickets carry
    forwardable, renewable, pre-authent and transited-policy-checked (0x40a80000, no enc-pa-rep), the authtime of the
    gateway's own AS exchange in Samba's log, its end ten hours after that and renewal a day; the evidence ticket is
    to the gateway's account name at its msDS-KeyVersionNumber; its PAC has UPN_DNS_INFO and no delegation-info,
    which the service ticket's (the backend's) adds; Samba's log names the protocol transition and the delegation."""
    admin = ad_realm.free_port()
    offset = kdc_log_offset(ad_realm)
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, f'\n[admin]\nbind = "127.0.0.1:{admin}"\n')
    try:
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "bob"))
        assert status == 200, body
        backend_pac = json.loads(body)["pac"]
        traces = ad_realm.run(["curl", "-sS", f"http://127.0.0.1:{admin}/traces?limit=1"], timeout=30)
        stages = {s["name"]: s for s in json.loads(traces.stdout)[0]["stages"]}
    finally:
        gw.stop()
    evidence, service = stages["s4u2self"], stages["s4u2proxy"]
    assert (evidence["client"], evidence["server"]) == ("bob@AD.TEST", ad_realm.gateway_principal)
    assert (service["client"], service["server"]) == ("bob@AD.TEST", f"{ad.BACKEND_SPN}@{ad.REALM}")
    kvno = ad_realm.ldbsearch(f"(sAMAccountName={ad.GATEWAY_ACCOUNT})", "msDS-KeyVersionNumber")
    assert f"msDS-KeyVersionNumber: {evidence['kvno']}\n" in kvno, kvno
    when = {}
    for ticket in (evidence, service):
        assert ticket["flags"] == ["forwardable", "renewable", "pre-authent", "transited-policy-checked"], ticket
        assert ticket["flags_hex"] == "0x40a80000"
        times = {k: datetime.fromisoformat(ticket[k].replace("Z", "+00:00")) for k in ("authtime", "end", "renew_till")}
        assert times["end"] - times["authtime"] == timedelta(hours=10), ticket
        assert times["renew_till"] - times["authtime"] == timedelta(days=1), ticket
        when[ticket["name"]] = times["authtime"]
    assert when["s4u2self"] == when["s4u2proxy"]
    auth = int(when["s4u2self"].timestamp())  # the gateway's own AS exchange, as Samba logged it
    wait_kdc_reason(ad_realm, offset, "AS-REQ SUCCESS", f"{ad_realm.gateway_principal} krbtgt/", f"auth={auth} ")
    assert {"logon-info", "upn-dns-info", "full-checksum"} <= set(evidence["pac"]["buffers"])
    assert "delegation-info" not in evidence["pac"]["buffers"]
    assert (evidence["pac"]["upn"], evidence["pac"]["sam_name"]) == ("bob@ad.test", "bob")
    assert "delegation-info" in backend_pac["buffers"]
    assert backend_pac["sid"] == evidence["pac"]["sid"]
    gw_name = ad_realm.gateway_principal
    wait_kdc_reason(
        ad_realm, offset, f"s4u2self {gw_name} impersonating bob@AD.TEST to service {gw_name} [forwardable]"
    )
    wait_kdc_reason(
        ad_realm, offset, f"constrained delegation for bob@AD.TEST from {gw_name} ", f"to {service['server']}"
    )


def test_a_upn_suffix_outside_the_realm_without_enterprise_names_is_the_users_403(
    ad_realm: ad.AdRealm, ad_gateway: AdProcess
) -> None:
    """carol@corp.example without enterprise_names: S4U2Self asks for carol@CORP.EXAMPLE ('Server not found'); the
    device gets 403 and the log a user-side refusal naming enterprise_names, never the kerberos_misconfigured alarm."""
    mark = ad_gateway.mark()
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/owa/", "carol"))
    assert status == 403
    assert "no Kerberos realm serves carol@CORP.EXAMPLE's UPN suffix" in body
    event = ad_gateway.wait_event("kerberos_refused", principal="carol@CORP.EXAMPLE")
    assert "identity.enterprise_names = true" in event["fix"]
    assert "identity.realm_map" in event["fix"]
    assert not [e for e in ad_gateway.events("kerberos_misconfigured", mark) if e.get("upn") == "carol@corp.example"]


def test_enterprise_names_end_to_end_log_and_cache_by_the_kdcs_name(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """With enterprise_names, carol@corp.example is found by its uPNSuffixes suffix; Samba returns the client name
    as asked (carol\\@corp.example@AD.TEST, not canonicalised): the backend, the summary line, the ticket cache and
    the trace all use that name, the trace shows the evidence ticket's PAC, and the second request is a cache hit."""
    admin = ad_realm.free_port()
    gw = start_ad_gateway(
        ad_realm,
        tmp_path,
        ad_backend,
        f'\n[admin]\nbind = "127.0.0.1:{admin}"\n',
        source='"san-upn"\nenterprise_names = true',
    )
    kdc_name = "carol\\@corp.example@AD.TEST"
    try:
        for _ in range(2):
            status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "carol"))
            assert status == 200, body
            echo = json.loads(body)
            assert echo["principal"] == kdc_name
            assert echo["pac"]["upn"] == "carol@corp.example"
            assert echo["pac"]["sam_name"] == "carol"
        first = gw.wait_event("request", principal=kdc_name, impersonation_cached=False)
        assert first["requested_principal"] == "carol@CORP.EXAMPLE"
        assert first["upn"] == "carol@corp.example"
        gw.wait_event("request", principal=kdc_name, impersonation_cached=True)
        assert not [e for e in gw.events("request") if e.get("principal") == "carol@CORP.EXAMPLE"]

        traces = ad_realm.run(["curl", "-sS", f"http://127.0.0.1:{admin}/traces?limit=2"], timeout=30)
        records = json.loads(traces.stdout)
        fresh = next(r for r in records if not r.get("impersonation_cached"))
        evidence = next(s for s in fresh["stages"] if s["name"] == "s4u2self")
        assert evidence["client"] == kdc_name
        assert evidence["pac"]["upn"] == "carol@corp.example"
        assert evidence["pac"]["sid"].startswith("S-1-5-21-")
        page = ad_realm.run(["curl", "-sS", f"http://127.0.0.1:{admin}/trace/{fresh['id']}"], timeout=30)
        assert evidence["pac"]["sid"] in page.stdout
    finally:
        gw.stop()


def test_a_gateway_account_without_protocol_transition_is_refused_with_that_fix(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-kcdnopt may delegate to HTTP/cas.ad.test but lacks 'use any authentication protocol': 403, evidence
    ticket not forwardable, the fix names protocol transition."""
    gw = start_ad_gateway(
        ad_realm,
        tmp_path,
        ad_backend,
        principal=f'"{ad.NO_PT_ACCOUNT}@{ad.REALM}"',
        keytab=f'"{ad_realm.keytab(ad.NO_PT_ACCOUNT)}"',
    )
    try:
        offset = kdc_log_offset(ad_realm)
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
        assert status == 403
        assert "evidence ticket is not forwardable" in body
        wait_kdc_reason(ad_realm, offset, f"{ad.NO_PT_ACCOUNT}@{ad.REALM}", "reason=Missing forwardable flag")
        event = gw.wait_event("kerberos_refused", principal="alice@AD.TEST")
        assert f"{ad.NO_PT_ACCOUNT}@{ad.REALM} lacks protocol transition" in event["fix"]
    finally:
        gw.stop()


def test_an_unknown_spn_is_the_operators_502(ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path) -> None:
    """A route whose SPN no account has: 'Server not found' from S4U2Proxy, a 502 and kerberos_misconfigured
    telling the operator to register the SPN."""
    upstream = f"http://127.0.0.1:{ad_backend.port}"
    extra = f'\n[[routes]]\nprefix = "/nowhere/"\nupstream = "{upstream}"\nspn = "HTTP/nowhere.ad.test"\n'
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, extra)
    try:
        status, _body = status_and_body(ad_curl(ad_realm, f"{gw.url}/nowhere/x", "alice"))
        assert status == 502
        event = gw.wait_event("kerberos_misconfigured", principal="alice@AD.TEST")
        assert "register the SPN" in event["fix"]
        assert "HTTP/nowhere.ad.test" in event["fix"]
    finally:
        gw.stop()


def test_the_gateways_spn_as_principal_is_its_own_misconfiguration(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """principal = HTTP/proxy.ad.test@AD.TEST (the keytab holds it): AD refuses the AS-REQ ('client not found').
    Every request is a 502 logged as kerberos_misconfigured telling the operator to use the account's name, never
    as the user's 'no Kerberos account matches'."""
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, principal=f'"{ad.GATEWAY_SPN}@{ad.REALM}"')
    try:
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
        assert status == 502
        assert "no Kerberos account matches" not in body
        event = gw.wait_event("kerberos_misconfigured", principal="alice@AD.TEST")
        assert "service account's name" in event["fix"]
        assert "never to a bare SPN" in event["fix"]
        assert not gw.events("kerberos_refused")
    finally:
        gw.stop()


def _run_kcd(ad_realm: ad.AdRealm, *args: str) -> subprocess.CompletedProcess[str]:
    return ad_realm.run([sys.executable, "-m", "proxy", *args], timeout=180)


def test_doctor_and_explain_give_the_same_ad_explanations(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """For dave (disabled) and carol (UPN suffix, no enterprise names), `explain --kdc` and `doctor` name the same
    cause and fix as the gateway's log; with the SPN as principal, doctor's kdc check says to use the account name."""
    config = tmp_path / "gateway.toml"
    config.write_text(ad.gateway_config(ad_realm, port=ad_realm.free_port(), backend_port=ad_backend.port))
    for user, upn, cause in (
        ("dave", "dave@ad.test", "is disabled"),
        ("carol", "carol@corp.example", "enterprise_names"),
    ):
        explained = _run_kcd(
            ad_realm, "explain", "--config", str(config), "--cert", str(ad_realm.user_cert(user)), "--kdc", "--json"
        )
        assert explained.returncode == 1, explained.stdout + explained.stderr
        verdict = json.loads(explained.stdout)
        assert verdict["stage"] == "kerberos"
        assert cause in verdict["reason"] + verdict["fix"]
        doctor = _run_kcd(ad_realm, "doctor", "--config", str(config), "--user", upn)
        assert doctor.returncode == 1
        fix = verdict["fix"].rpartition(" [")[0]  # the library's message in brackets: its minor code varies
        assert f"fix: {fix} [" in doctor.stdout, doctor.stdout
        assert re.search(r"FAIL\s+s4u2self\s", doctor.stdout)

    spn = tmp_path / "spn.toml"
    spn.write_text(config.read_text().replace(ad_realm.gateway_principal, f"{ad.GATEWAY_SPN}@{ad.REALM}"))
    doctor = _run_kcd(ad_realm, "doctor", "--config", str(spn))
    assert re.search(r"FAIL\s+kdc\s", doctor.stdout), doctor.stdout
    assert "service account's name" in doctor.stdout


def test_check_config_tells_an_ad_keytab_wants_the_account_name(ad_realm: ad.AdRealm, tmp_path: Path) -> None:
    """A keytab exported for the account only (as samba-tool or msktutil write it) and the SPN as principal:
    check-config's keytab line says to use the account's name."""
    keytab = tmp_path / "account.keytab"
    ad_realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={ad_realm.gateway_principal}")
    config = tmp_path / "gateway.toml"
    text = ad.gateway_config(ad_realm).replace(str(ad_realm.gateway_keytab), str(keytab))
    config.write_text(text.replace(ad_realm.gateway_principal, f"{ad.GATEWAY_SPN}@{ad.REALM}"))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert f"set kerberos.principal to the service account's name ({ad_realm.gateway_principal})" in done.stdout


def test_pinned_samba_ignores_resource_based_delegation(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-other allows svc-kcdproxy by resource-based delegation (samba-tool delegation add-principal): Samba
    4.17's KDC ignores it, so a route to HTTP/other.ad.test stays refused with 403 (Windows would honour it)."""
    extra = (
        f'\n[[routes]]\nprefix = "/other/"\nupstream = "http://127.0.0.1:{ad_backend.port}"\nspn = "{ad.OTHER_SPN}"\n'
    )
    ad_realm.samba_tool("delegation", "add-principal", ad.OTHER_ACCOUNT, ad.GATEWAY_ACCOUNT)
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, extra)
    try:
        assert ad.GATEWAY_ACCOUNT in ad_realm.samba_tool("delegation", "show", ad.OTHER_ACCOUNT)
        offset = kdc_log_offset(ad_realm)
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/other/x", "bob"))
        assert status == 403
        assert f"may not act for bob@AD.TEST at {ad.OTHER_SPN}" in body
        wait_kdc_reason(ad_realm, offset, "impersonatee=bob@AD.TEST", "reason=Constrained delegation not allowed")
    finally:
        gw.stop()
        ad_realm.samba_tool("delegation", "del-principal", ad.OTHER_ACCOUNT, ad.GATEWAY_ACCOUNT)


def test_lab_up_ad_prints_a_curl_that_works_inside_the_namespace(ad_realm: ad.AdRealm, tmp_path: Path) -> None:
    """`kcd-proxy lab up --ad` (what `make lab-ad` runs first) returns at once on a running realm, starts the
    Exchange stand-in in the namespace and prints an `ip netns exec ... curl`; with the gateway it configured
    running in there, that curl, pasted as printed, gets alice through, and `kcd-proxy trace` with that configuration
    shows her request (it had no admin listener: "traces are not served"). It also writes, and names, the
    `gateway-strong.toml` the README's strong-mapping section points to and its audit twin
    `gateway-strong-or-audit.toml`, which check-config finds sound, each naming itself in its run line (both named
    gateway.toml) and serving traces on the lab's admin port (both had no [admin]: `trace` refused them)."""
    lab_dir = ad_realm.root.parent
    assert ad_realm.root.name == "ad"
    argv = [sys.executable, "-m", "proxy", "lab", "up", "--ad", "--dir", str(lab_dir)]
    with _locked(ad_realm.root):  # it makes the strong-mapping accounts and files, as `ad_mapping_realm` does
        up = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert up.returncode == 0, up.stderr
    strong = ad_realm.root / "gateway-strong.toml"  # the strong-mapping twin the README names, beside the realm
    assert f'# [identity] mapping = "strong": {strong};' in up.stdout, up.stdout
    audit = ad_realm.root / "gateway-strong-or-audit.toml"  # the migration's audit step, beside it
    assert f'# [identity] mapping = "strong-or-audit": {audit}' in up.stdout, up.stdout
    assert f"# either in place of gateway.toml (the same ports): {ad.run_line(ad_realm, 'FILE')}\n" in up.stdout
    for config, mode in ((strong, "strong"), (audit, "strong-or-audit")):
        text = config.read_text()
        assert f'\nmapping = "{mode}"\n' in text
        assert f"# Run it inside the realm's namespace: {ad.run_line(ad_realm, config)}\n" in text, text.splitlines()[1]
        assert f'\n[admin]\nbind = "127.0.0.1:{ad.LAB_ADMIN_PORT}"\n' in text
        checked = ad_realm.run([sys.executable, "-m", "proxy", "check-config", str(config)], timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    printed = up.stdout[up.stdout.index(f"ip netns exec {ad_realm.netns} curl") :].replace("\\\n", " ").strip()
    gw = ad_realm.popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(ad_realm.root / "gateway.toml")], log=tmp_path / "gw.log"
    )
    try:
        deadline = time.monotonic() + 60
        while not ad_realm.port_answers(ad.LAB_GATEWAY_PORT, "127.0.0.1"):
            assert gw.poll() is None, (tmp_path / "gw.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "gw.log").read_text()[-2000:]
            time.sleep(0.2)
        done = subprocess.run(["bash", "-c", printed + " -sS"], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["principal"] == "alice@AD.TEST"
        trace = [sys.executable, "-m", "proxy", "trace", "--config", str(ad_realm.root / "gateway.toml")]
        shown = ad_realm.run(trace, timeout=60)  # what the README's operations commands show, in the AD lab too
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "alice@ad.test" in shown.stdout, shown.stdout
        for config in (strong, audit):  # `trace --config` with the strong twins reads the same admin port
            shown = ad_realm.run([*trace[:-1], str(config)], timeout=60)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert "alice@ad.test" in shown.stdout, shown.stdout
    finally:
        gw.terminate()
        gw.wait(timeout=15)
        backend = ad.backend_pid(ad_realm)  # this realm's, never a number a stale pid file names
        if backend is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(backend, signal.SIGTERM)
        (ad_realm.run_dir / "backend.pid").unlink(missing_ok=True)


def test_lab_down_ends_every_process_in_the_namespace_and_removes_it(tmp_path: Path) -> None:
    """`kcd-proxy lab down` stops whatever runs in the AD realm's namespace and deletes the namespace, and the
    namespace's files under /etc/netns (the DC's name) with it."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    ad.ensure_namespace(realm)  # the namespace alone: taking it down needs no provisioned realm
    etc = Path("/etc/netns", realm.netns)
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    sleeper = realm.popen(["sleep", "600"], log=tmp_path / "sleep.log")
    deadline = time.monotonic() + WAIT
    while not ad.namespace_pids(realm) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ad.namespace_pids(realm)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "lab", "down", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sleeper.wait(timeout=15) is not None
    assert not Path("/run/netns", realm.netns).exists()
    assert not etc.exists()


def test_taking_the_realm_down_removes_its_namespace_files(tmp_path: Path) -> None:
    """`ad.down` (what the tests' realm fixture calls, not only the CLI) leaves nothing under /etc/netns."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    ad.ensure_namespace(realm)
    etc = Path("/etc/netns", realm.netns)
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    ad.down(realm)
    assert not Path("/run/netns", realm.netns).exists()
    assert not etc.exists()


@pytest.mark.parametrize(
    ("user", "status", "reason", "kdc_says"),
    [
        ("dave", 403, "the account dave@AD.TEST is disabled", ("ERR_POLICY", "reason=Principal may not act as client")),
        (
            "erin",
            403,
            "its evidence ticket is not forwardable",
            ("ERR_BADOPTION", "impersonatee=erin@AD.TEST", "reason=Missing forwardable flag"),
        ),
        (
            "ghost",
            403,
            "no Kerberos account matches ghost@AD.TEST",
            ("ERR_C_PRINCIPAL_UNKNOWN", "reason=S4U2Self principal to impersonate not found"),
        ),
        ("carol", 403, "UPN suffix", ("Server not found in database: krbtgt/CORP.EXAMPLE@AD.TEST",)),
    ],
)
def test_each_refusal_matches_the_reason_samba_logged(
    ad_realm: ad.AdRealm, ad_gateway: AdProcess, user: str, status: int, reason: str, kdc_says: tuple[str, ...]
) -> None:
    """The device's status and reason, set beside what Samba's KDC logged for that request: the gateway's
    explanation is the KDC's actual refusal, not a guess."""
    offset = kdc_log_offset(ad_realm)
    got, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/owa/", user))
    assert (got, reason in body) == (status, True), body
    wait_kdc_reason(ad_realm, offset, *kdc_says)


def test_realm_map_is_the_other_fix_for_a_upn_suffix_outside_the_realm(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The refusal's other fix works too: realm_map corp.example -> AD.TEST makes carol carol@AD.TEST, which AD
    finds by account name; the backend serves carol@AD.TEST."""
    gw = start_ad_gateway(
        ad_realm, tmp_path, ad_backend, source='"san-upn"\nrealm_map = { "corp.example" = "AD.TEST" }'
    )
    try:
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "carol"))
        assert status == 200, body
        assert json.loads(body)["principal"] == "carol@AD.TEST"
    finally:
        gw.stop()
