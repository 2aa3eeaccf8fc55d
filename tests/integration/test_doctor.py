"""`kcd-proxy doctor`: the preflight against the lab, and against set-ups broken in the ways it must name."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from proxy.kerberos.keytab import read_keytab
from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_server_certificate
from tests.integration.conftest import REPO, dead_port, failing_routes, free_port, lab_config, wait_port
from tests.integration.test_ticket_cache import _kadmin
from tests.unit.test_keytab import _record


def _doctor(lab: LabLayout, tmp_path: Path, text: str, *args: str) -> tuple[int, dict[str, tuple[str, str, str]]]:
    """Run the command; its checks as name -> (status, detail, fix)."""
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    argv = [sys.executable, "-m", "proxy", "doctor", "--config", str(path), *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    checks: dict[str, tuple[str, str, str]] = {}
    name = ""
    for line in res.stdout.splitlines()[:-1]:
        if line.startswith(("PASS", "FAIL", "SKIP")):
            status, rest = line[:4].lower(), line[6:]
            name = next(n for n in _NAMES if rest.startswith(n + "  ")) if rest[:1] else ""
            checks[name] = (status, rest[len(name) :].strip(), "")
        elif line.strip().startswith("fix: "):
            status, detail, _ = checks[name]
            checks[name] = (status, detail, line.strip()[5:])
    assert res.stdout.splitlines()[-1].startswith(f"{len(checks)} checks: "), res
    return res.returncode, checks


_NAMES = sorted(
    [
        "kdc",
        "keytab",
        "clock",
        "s4u2self",
        "s4u2proxy HTTP/cas.lab.test",
        "s4u2proxy HTTP/other.lab.test",
        "kdc-account",
        *(
            f"{check} {prefix}"
            for check in ("negotiate", "ticket", "header-size")
            for prefix in ("/", "/dead/", "/wrong-key/", "/not-delegable/", "/tls/", "/tls-wrong-name/")
        ),
    ],
    key=len,
    reverse=True,
)


def test_the_lab_passes_every_check(lab: LabLayout, tmp_path: Path) -> None:
    """Against the lab with a canary user: KDC, keytab, clock, S4U2Self, S4U2Proxy, backend, header all pass."""
    code, checks = _doctor(lab, tmp_path, lab_config(lab, port=free_port()), "--user", "alice@lab.test")
    assert code == 0
    assert list(checks) == [
        "kdc",
        "keytab",
        "clock",
        "s4u2self",
        "kdc-account",
        "s4u2proxy HTTP/cas.lab.test",
        "negotiate /",
        "ticket /",
        "header-size /",
    ]
    assert {status for status, _, _ in checks.values()} == {"pass"}
    assert checks["kdc-account"][1] == "the evidence ticket's PAC for alice@LAB.TEST names no account (an MIT KDC's)"
    assert checks["s4u2self"][1] == "the evidence ticket for alice@LAB.TEST is forwardable"
    assert checks["keytab"][1].startswith("the KDC's key for HTTP/proxy.lab.test@LAB.TEST is version ")


def test_each_broken_route_fails_with_its_fix(lab: LabLayout, other_backend: str, tmp_path: Path) -> None:
    """An SPN outside the delegation list, a dead upstream, a backend without the SPN's key: each named and fixed."""
    extra = failing_routes(lab, other_backend) + '\n[doctor]\ncanary_user = "carol@lab.test"\n'
    code, checks = _doctor(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    assert code == 1
    status, detail, fix = checks["s4u2proxy HTTP/other.lab.test"]
    assert (status, detail) == ("fail", "the gateway may not act for carol@LAB.TEST at HTTP/other.lab.test")
    assert "add HTTP/other.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST" in fix
    assert checks["ticket /not-delegable/"][0] == "skip"
    assert checks["negotiate /dead/"][0] == "fail"
    assert checks["negotiate /dead/"][2] == "start the backend, or fix the route's upstream"
    status, detail, fix = checks["ticket /wrong-key/"]
    assert (status, detail.split(" refused")[0]) == ("fail", f"{other_backend}/wrong-key/")
    assert "register HTTP/cas.lab.test on the backend's account" in fix
    assert checks["negotiate /wrong-key/"][0] == "pass"
    assert {
        checks[n][0] for n in ("kdc", "keytab", "clock", "s4u2self", "s4u2proxy HTTP/cas.lab.test", "ticket /")
    } == {"pass"}


def test_a_stale_keytab_and_a_small_header_limit_fail(lab: LabLayout, tmp_path: Path) -> None:
    """A keytab whose key version the KDC no longer uses, and backends that accept only small headers."""
    stale = tmp_path / "stale.keytab"
    stale.write_bytes(
        b"\x05\x02" + b"".join(_record(e.principal, 7, e.enctype, e.key) for e in read_keytab(lab.proxy_keytab))
    )
    text = lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(stale))
    code, checks = _doctor(lab, tmp_path, text + "\n[doctor]\nbackend_header_limit = 600\n", "--user", "bob@lab.test")
    assert code == 1
    status, detail, fix = checks["keytab"]
    assert status == "fail"
    assert detail.endswith("the keytab holds only 7")
    assert "export the keytab again" in fix
    status, detail, fix = checks["header-size /"]
    assert status == "fail"
    assert "the backends accept 600" in detail
    assert "MaxFieldLength" in fix


def test_a_keytab_of_another_account_names_what_it_holds(lab: LabLayout, tmp_path: Path) -> None:
    """kerberos.keytab pointing at the backend's keytab (a learner's slip): the kdc check's fix says which principal
    the file holds keys for and that it is another account's keytab, where "export it again" was all it said; the
    keytab check, not run, names what the file holds (from the file alone) without repeating the failure and its fix."""
    text = lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(lab.backend_keytab))
    code, checks = _doctor(lab, tmp_path, text, "--user", "alice@lab.test")
    assert code == 1
    status, _, fix = checks["kdc"]
    assert status == "fail"
    assert "holds keys for HTTP/cas.lab.test@LAB.TEST only, none for HTTP/proxy.lab.test@LAB.TEST" in fix
    assert "another account's keytab" in fix
    assert "point kerberos.keytab at HTTP/proxy.lab.test@LAB.TEST's keytab" in fix
    status, detail, fix = checks["keytab"]
    assert (status, fix) == ("skip", "")
    assert detail == (
        f"not run: kdc failed on this keytab: {lab.backend_keytab} holds keys for HTTP/cas.lab.test@LAB.TEST only, "
        "none for HTTP/proxy.lab.test@LAB.TEST"
    )
    assert [name for name, (status, _, _) in checks.items() if status == "fail"] == ["kdc"]


def test_a_principal_spelt_in_another_case_than_the_keytabs_says_so(lab: LabLayout, tmp_path: Path) -> None:
    """kerberos.principal `http/proxy.lab.test@LAB.TEST` beside a keytab for `HTTP/proxy.lab.test@LAB.TEST`: MIT finds
    no key (names are compared with their case), and the fix gives the spelling the keytab has."""
    text = lab_config(lab, port=free_port()).replace(
        'principal = "HTTP/proxy.lab.test@LAB.TEST"', 'principal = "http/proxy.lab.test@LAB.TEST"'
    )
    assert 'principal = "http/proxy.lab.test@LAB.TEST"' in text
    code, checks = _doctor(lab, tmp_path, text)
    assert code == 1
    status, _, fix = checks["kdc"]
    assert status == "fail"
    assert 'set kerberos.principal = "HTTP/proxy.lab.test@LAB.TEST"' in fix
    assert checks["keytab"][0] == "skip"
    assert "none for http/proxy.lab.test@LAB.TEST" in checks["keytab"][1]


def test_an_unknown_canary_fails_s4u2self_and_no_canary_skips(lab: LabLayout, tmp_path: Path) -> None:
    """A canary the KDC does not know fails S4U2Self; without any canary those checks are skipped, exit 0."""
    text = lab_config(lab, port=free_port())
    code, checks = _doctor(lab, tmp_path, text, "--user", "ghost@lab.test")
    assert code == 1
    assert checks["s4u2self"][:2] == ("fail", "no Kerberos account matches ghost@LAB.TEST")
    code, checks = _doctor(lab, tmp_path, text)
    assert code == 0
    assert checks["s4u2self"][0] == "skip"
    assert "--user UPN" in checks["s4u2self"][1]
    assert checks["negotiate /"][0] == "pass"


def test_a_canary_whose_evidence_ticket_is_not_forwardable_fails_s4u2self_with_the_fix(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Issue 8: doctor checks that "S4U2Self gives a forwardable ticket". A canary of its own that MIT marks
    -allow_forwardable (AD's "sensitive and cannot be delegated"): s4u2self FAILs saying the evidence ticket is not
    forwardable, with the fix naming the flag on that account; S4U2Proxy fails after it; exit 1. Only the passing
    side of this check ran from outside."""
    name = f"dr{uuid.uuid4().hex[:8]}"
    _kadmin(lab, f"addprinc -randkey -allow_forwardable {name}")
    code, checks = _doctor(lab, tmp_path, lab_config(lab, port=free_port()), "--user", f"{name}@lab.test")
    assert code == 1
    status, detail, fix = checks["s4u2self"]
    assert (status, detail.split(":")[0]) == ("fail", f"the evidence ticket for {name}@LAB.TEST is not forwardable")
    assert f"modprinc +allow_forwardable {name}@LAB.TEST" in fix, fix
    assert checks["s4u2proxy HTTP/cas.lab.test"][0] == "fail"


def test_an_unreachable_kdc_fails_first_with_the_fix(lab: LabLayout, tmp_path: Path) -> None:
    """No KDC answering: the kdc check fails naming krb5.conf, and the checks that need a ticket are skipped."""
    dead = tmp_path / "krb5.conf"
    dead.write_text(lab.krb5_conf.read_text().replace(f":{lab.kdc_port}", f":{dead_port()}"))
    code, checks = _doctor(lab, tmp_path, lab_config(lab, port=free_port(), krb5_conf=dead))
    assert code == 1
    status, detail, fix = checks["kdc"]
    assert status == "fail"
    assert "unreachable" in detail
    assert "krb5.conf" in fix
    assert (checks["keytab"][0], checks["clock"][0]) == ("skip", "skip")


def _gateway_as_reqs(lab: LabLayout, offset: int) -> list[str]:
    """The AS exchanges the KDC logged for the gateway's principal since `offset` (one line each: the lab's principal
    needs no pre-authentication, so the KDC answers the first AS-REQ)."""
    with lab.kdc_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    return [line for line in lines if "AS_REQ" in line and "HTTP/proxy.lab.test@LAB.TEST for krbtgt/" in line]


def test_a_passing_run_makes_one_as_exchange(lab: LabLayout, tmp_path: Path) -> None:
    """The whole preflight with a canary (the gateway's ticket, S4U2Self, S4U2Proxy) asks the KDC for the gateway's
    TGT once: the probe and the delegations share the gateway's credentials (it made two AS exchanges)."""
    offset = lab.kdc_log.stat().st_size
    code, checks = _doctor(lab, tmp_path, lab_config(lab, port=free_port()), "--user", "alice@lab.test")
    assert code == 0, checks
    assert checks["s4u2proxy HTTP/cas.lab.test"][0] == "pass"
    assert len(_gateway_as_reqs(lab, offset)) == 1, _gateway_as_reqs(lab, offset)


def test_a_refused_gateway_key_fails_once_and_what_needs_it_is_not_run(lab: LabLayout, tmp_path: Path) -> None:
    """A keytab whose keys the KDC does not hold (the account's key changed, the version kept): `kdc` fails once with
    its fix; keytab and clock are skipped as before, and s4u2self, kdc-account, s4u2proxy and ticket are not run
    ("needs the gateway's own credentials, see kdc"), where s4u2self and s4u2proxy each repeated kdc's failure and
    asked the KDC again; the backend's own check (negotiate) still runs; one AS exchange in all; exit 1."""
    wrong = tmp_path / "wrong.keytab"
    records = (_record(e.principal, e.kvno, e.enctype, bytes(len(e.key))) for e in read_keytab(lab.proxy_keytab))
    wrong.write_bytes(b"\x05\x02" + b"".join(records))
    text = lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(wrong))
    offset = lab.kdc_log.stat().st_size
    code, checks = _doctor(lab, tmp_path, text, "--user", "alice@lab.test")
    assert code == 1
    assert [name for name, (status, _, _) in checks.items() if status == "fail"] == ["kdc"], checks
    assert checks["kdc"][2], "the kdc check names its fix"
    assert checks["clock"][0] == "skip"
    for name in ("s4u2self", "kdc-account", "s4u2proxy HTTP/cas.lab.test", "ticket /"):
        status, detail, fix = checks[name]
        assert (status, fix) == ("skip", ""), (name, checks[name])
        assert detail == "not run: needs the gateway's own credentials (see kdc)", (name, detail)
    assert checks["negotiate /"][0] == "pass"
    assert len(_gateway_as_reqs(lab, offset)) == 1, _gateway_as_reqs(lab, offset)


def test_an_https_upstream_is_checked_with_the_routes_server_name_as_the_gateway_does(
    lab: LabLayout, tmp_path: Path
) -> None:
    """An https backend whose certificate names cas.lab.test only, behind routes to https://127.0.0.1:<port> with
    `ca_bundle` and `server_name = "cas.lab.test"`: the gateway serves it (SNI and the name checked are
    server_name), and so does doctor's negotiate and ticket checks; with a server_name the certificate does not
    carry they fail, and the fix names ca_bundle and server_name, not "start the backend". Failed before: doctor
    checked the certificate against 127.0.0.1 ("IP address mismatch") and told the operator to start the backend."""
    chain, key, _ = write_server_certificate(
        tmp_path / "tls", load_ca(lab.pki_dir, "issuing"), cn="cas.lab.test", local=False
    )
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "proxy.lab.backend",
        "--keytab",
        str(lab.backend_keytab),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    argv += ["--krb5-config", str(lab.krb5_conf), "--rcache", str(tmp_path / "rc"), "--tls-cert", str(chain)]
    with (tmp_path / "backend.log").open("wb") as out:
        backend = subprocess.Popen([*argv, "--tls-key", str(key)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, backend)
        extra = ""
        for prefix, name in (("/tls/", "cas.lab.test"), ("/tls-wrong-name/", "mail.lab.test")):
            extra += f'\n[[routes]]\nprefix = "{prefix}"\nupstream = "https://127.0.0.1:{port}"\n'
            extra += f'spn = "HTTP/cas.lab.test"\nca_bundle = "{lab.pki_dir / "root.pem"}"\nserver_name = "{name}"\n'
        code, checks = _doctor(
            lab, tmp_path, lab_config(lab, port=free_port(), extra=extra), "--user", "alice@lab.test"
        )
        assert code == 1
        assert checks["negotiate /tls/"][0] == "pass", checks["negotiate /tls/"]
        assert checks["ticket /tls/"][0] == "pass", checks["ticket /tls/"]
        status, detail, fix = checks["negotiate /tls-wrong-name/"]
        assert status == "fail"
        assert "mail.lab.test" in detail, detail
        assert "server_name" in fix, fix
        assert "ca_bundle" in fix, fix
        assert "start the backend" not in fix, fix
    finally:
        backend.terminate()
        backend.wait(timeout=30)
