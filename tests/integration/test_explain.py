"""`kcd-proxy explain`: a certificate through the gateway's stages without a client, verdict and evidence."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import config as config_module
from proxy.app import build
from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki, UserSpec, issue_user, write_pem
from proxy.ops.explain import Explanation, explain, load_leaf
from tests.integration.conftest import REPO, free_port, lab_config
from tests.integration.test_ticket_cache import _certificate_for, _kadmin


@pytest.fixture(scope="module")
def config(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = '\n[[routes]]\nprefix = "/not-delegable/"\nupstream = "http://127.0.0.1:{}"\nspn = "HTTP/other.lab.test"\n'
    path = tmp_path_factory.mktemp("explain") / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port(), extra=extra.format(lab.backend_port)))
    return path


def _explain(config: Path, cert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy", "explain", "--config", str(config), "--cert", str(cert), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def _json(config: Path, cert: Path, *args: str) -> tuple[int, dict[str, Any]]:
    res = _explain(config, cert, "--json", *args)
    assert res.stdout.count("\n") == 1, res  # exactly one JSON object on one line
    answer: dict[str, Any] = json.loads(res.stdout)
    return res.returncode, answer


def _user(lab: LabLayout, name: str) -> Path:
    return lab.pki_dir / "users" / f"{name}.pem"


def test_a_good_certificate_is_accepted_with_its_principal_route_and_spn(lab: LabLayout, config: Path) -> None:
    """Exit 0; the JSON names UPN, principal, route and SPN; the steps show the chain and the CRL used."""
    code, answer = _json(config, _user(lab, "alice"), "--path", "/Microsoft-Server-ActiveSync")
    assert code == 0
    assert {k: answer[k] for k in ("accepted", "stage", "reason", "upn", "principal", "route", "spn")} == {
        "accepted": True,
        "stage": None,
        "reason": None,
        "upn": "alice@lab.test",
        "principal": "alice@LAB.TEST",
        "route": "/",
        "spn": "HTTP/cas.lab.test",
    }
    steps = {s["stage"]: s for s in answer["steps"]}
    assert [line.split(":")[0] for line in steps["certificate"]["details"]] == ["leaf", "intermediate", "trust anchor"]
    assert steps["revocation"]["summary"].startswith("good")
    assert steps["revocation"]["details"] == [f"source: {lab.pki_dir / 'crls.pem'}"]


def test_with_the_kdc_the_real_s4u2self_and_s4u2proxy_are_reported(lab: LabLayout, config: Path) -> None:
    """--kdc: the evidence ticket is forwardable and the KDC issues the service ticket for the SPN."""
    code, answer = _json(config, _user(lab, "bob"), "--kdc")
    assert code == 0
    kerberos = [s["summary"] for s in answer["steps"] if s["stage"] == "kerberos"]
    assert kerberos[0].startswith("S4U2Self: the KDC issued HTTP/proxy.lab.test@LAB.TEST an evidence ticket")
    assert "bob@LAB.TEST (forwardable)" in kerberos[0]
    assert kerberos[1] == "S4U2Proxy: the KDC issued a service ticket for bob@LAB.TEST to HTTP/cas.lab.test"


def test_explain_with_the_kdc_makes_one_as_exchange(lab: LabLayout, config: Path) -> None:
    """`explain --kdc` asks for the gateway's TGT once: its S4U2Self probe and the Delegator's S4U2Self + S4U2Proxy use
    the same credentials (it made two AS exchanges, and the evidence ticket's authtime named either)."""
    offset = lab.kdc_log.stat().st_size
    code, _ = _json(config, _user(lab, "carol"), "--kdc")
    assert code == 0
    with lab.kdc_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    exchanges = [line for line in lines if "AS_REQ" in line and "HTTP/proxy.lab.test@LAB.TEST for krbtgt/" in line]
    assert len(exchanges) == 1, exchanges
    assert any("PROTOCOL-TRANSITION s4u-client=carol@LAB.TEST" in line for line in lines)


def test_the_evidence_tickets_authtime_is_named_as_the_gateways_tgts(lab: LabLayout, config: Path) -> None:
    """S4U2Self's ticket carries the authtime of the TGT it was asked with (the gateway's own, from its AS exchange in
    the KDC's log), not a time the user authenticated (protocol transition: the user never did); explain said
    "authenticated at", now it says whose time it is, and the time is the one the KDC logged for that AS exchange."""
    offset = lab.kdc_log.stat().st_size
    code, answer = _json(config, _user(lab, "bob"), "--kdc")
    assert code == 0
    with lab.kdc_log.open("rb") as log:
        log.seek(offset)
        written = log.read().decode()
    lines = written.splitlines()
    issued = {
        int(line.split("authtime ")[1].split(",")[0])
        for line in lines
        if "AS_REQ" in line and "HTTP/proxy.lab.test@LAB.TEST for krbtgt/LAB.TEST@LAB.TEST" in line
    }
    # the TGT S4U2Self was asked with: MIT logs the TGS_REQ (with its TGT's authtime), then PROTOCOL-TRANSITION;
    # explain made two AS exchanges (a fresh-clone run saw them a second apart; one now, the test above): the one
    # used is read all the same
    transition = [i for i, line in enumerate(lines) if "PROTOCOL-TRANSITION s4u-client=bob@LAB.TEST" in line]
    assert transition, written
    used = int(lines[transition[-1] - 1].split("authtime ")[1].split(",")[0])
    assert used in issued, written  # the gateway's own TGT, from its AS exchange in this run
    when = datetime.fromtimestamp(used, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (details,) = [s["details"] for s in answer["steps"] if s["summary"].startswith("S4U2Self")]
    assert details[0].startswith(f"authtime {when}, the gateway's own TGT's: bob@LAB.TEST did not authenticate")
    assert "authenticated at" not in details[0]


def test_a_non_forwardable_evidence_ticket_is_left_to_the_kdc_as_the_gateway_leaves_it(
    lab: LabLayout, config: Path, tmp_path: Path
) -> None:
    """A user marked sensitive (MIT: -allow_forwardable): the gateway asks S4U2Proxy anyway and the KDC refuses it
    (krb5kdc.log: EVIDENCE_TKT_NOT_FORWARDABLE), as it must, since Windows grants it under resource-based delegation.
    explain refused at the non-forwardable evidence ticket without asking: now it asks, and the refusal is the KDC's,
    with the same reason and the not-forwardable fix (MIT's kadmin commands in it: an MIT PAC shows no AD KDC)."""
    name = f"xs{uuid.uuid4().hex[:8]}"
    _kadmin(lab, f"addprinc -randkey -allow_forwardable {name}")
    cert, _ = _certificate_for(lab, name, tmp_path)
    offset = lab.kdc_log.stat().st_size
    code, answer = _json(config, cert, "--kdc")
    with lab.kdc_log.open("rb") as log:
        log.seek(offset)
        written = log.read().decode()
    assert (code, answer["accepted"], answer["stage"]) == (1, False, "kerberos")
    assert answer["reason"] == f"the gateway may not act for {name}@LAB.TEST: its evidence ticket is not forwardable"
    assert answer["fix"].startswith("evidence ticket not forwardable")
    assert "MIT: kadmin.local -q 'modprinc +allow_forwardable" in answer["fix"]  # no AD PAC: both realms, labelled
    assert "EVIDENCE_TKT_NOT_FORWARDABLE" in written, written
    assert "HTTP/proxy.lab.test@LAB.TEST for HTTP/cas.lab.test@LAB.TEST" in written


@pytest.mark.parametrize(
    ("user", "args", "stage", "reason"),
    [
        ("revoked", (), "revocation", "was revoked on"),
        ("expired", (), "certificate", "certificate expired on"),
        ("noupn", (), "identity", "no user principal name"),
        ("ghost", ("--kdc",), "kerberos", "no Kerberos account matches ghost@LAB.TEST"),
        ("dave", ("--kdc",), "kerberos", "the account dave@LAB.TEST is disabled or locked"),
        ("alice", ("--at", "2099-01-01T00:00:00Z"), "certificate", "certificate expired on"),
        ("carol", ("--kdc", "--path", "/not-delegable/x"), "kerberos", "may not act for carol@LAB.TEST"),
    ],
)
def test_a_refused_certificate_names_the_stage_and_the_reason(
    lab: LabLayout, config: Path, user: str, args: tuple[str, ...], stage: str, reason: str
) -> None:
    """`stage` is where a request would stop, `reason` what the device would be told (run in process)."""
    answer = asyncio.run(_in_process(config, load_leaf(_user(lab, user).read_bytes()), *args))
    assert answer.accepted is False
    assert answer.stage == stage
    assert answer.refused is not None
    assert reason in answer.refused.reason


async def _in_process(config: Path, leaf: x509.Certificate, *args: str) -> Explanation:
    rest = [a for a in args if a != "--kdc"]
    options = dict(zip(rest[::2], rest[1::2], strict=True))
    at = datetime.fromisoformat(options.get("--at", datetime.now(UTC).isoformat()))
    gw = build(config_module.load(config))
    try:
        return await explain(gw, leaf, path=options.get("--path", "/"), at=at, kdc="--kdc" in args)
    finally:
        await gw.revocation.close()
        gw.delegator.close()


def test_a_kdc_refusal_comes_with_the_fix(lab: LabLayout, config: Path) -> None:
    """Delegation to an SPN outside the allow-list: exit 1 at stage "kerberos" (issue 8), and the fix names the
    delegation list to change."""
    code, answer = _json(config, _user(lab, "carol"), "--kdc", "--path", "/not-delegable/x")
    assert (code, answer["accepted"], answer["stage"], answer["spn"]) == (1, False, "kerberos", "HTTP/other.lab.test")
    assert "add HTTP/other.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST" in answer["fix"]


def test_a_disabled_users_fix_names_the_mit_command_too(lab: LabLayout, config: Path) -> None:
    """The lab's disabled dave (MIT, `-allow_tix`) gets a fix an MIT operator can act on, beside AD's commands: it
    named Enable-ADAccount and samba-tool alone, against a KDC that has neither."""
    code, answer = _json(config, _user(lab, "dave"), "--kdc")
    assert (code, answer["stage"]) == (1, "kerberos")
    assert "Enable-ADAccount" in answer["fix"]
    assert "MIT: kadmin.local -q 'modprinc +allow_tix dave@LAB.TEST'" in answer["fix"]


def test_a_keytab_of_another_account_is_named_in_the_fix(lab: LabLayout, tmp_path: Path) -> None:
    """kerberos.keytab pointing at the backend's keytab: the Kerberos stage's fix names the principal the file holds
    keys for (it said "the keytab holds no key ...: export it again", leaving the learner to guess why)."""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(lab.backend_keytab)))
    code, answer = _json(path, _user(lab, "alice"), "--kdc")
    assert (code, answer["accepted"], answer["stage"]) == (1, False, "kerberos")
    assert "holds keys for HTTP/cas.lab.test@LAB.TEST only, none for HTTP/proxy.lab.test@LAB.TEST" in answer["fix"]


def test_a_ghost_user_passes_until_the_kdc_is_asked(lab: LabLayout, config: Path) -> None:
    """Without --kdc the Kerberos stage is not run, so a user unknown to the KDC is accepted so far."""
    code, answer = _json(config, _user(lab, "ghost"))
    assert (code, answer["accepted"], answer["principal"]) == (0, True, "ghost@LAB.TEST")
    assert answer["steps"][-1]["summary"].startswith("not asked")


def test_a_certificate_no_restriction_admits_is_refused_at_restrictions(lab: LabLayout, tmp_path: Path) -> None:
    """With a restriction rule the certificate does not match, the stage is "restrictions"."""
    rule = '\n[[client_certificates.restrictions]]\nname = "devices"\nsubject = "CN=*,OU=Devices,*"\n'
    text = lab_config(lab, port=free_port()).replace("\n[identity]", rule + "\n[identity]")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    code, answer = _json(path, _user(lab, "alice"))
    assert (code, answer["stage"]) == (1, "restrictions")
    assert "devices" in answer["reason"]


def test_a_path_nothing_is_published_at_is_refused_at_route(lab: LabLayout, tmp_path: Path) -> None:
    """No route matches the path: stage "route"."""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port()).replace('prefix = "/"', 'prefix = "/owa/"'))
    code, answer = _json(path, _user(lab, "alice"), "--path", "/EWS/Exchange.asmx")
    assert (code, answer["stage"], answer["route"]) == (1, "route", None)


def test_the_text_output_shows_each_stage_and_the_verdict(lab: LabLayout, config: Path) -> None:
    """Without --json: one line per stage, the evidence under it, the verdict last."""
    res = _explain(config, _user(lab, "revoked"))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines if line[:1].isalpha()][1:] == [
        "certificate",
        "restrictions",
        "revocation",
        "refused",
    ]
    assert lines[-1].startswith("refused at revocation: certificate serial 0x")


@pytest.mark.parametrize(
    "args",
    [
        ("--config", "{tmp}/missing.toml", "--cert", "{alice}"),
        ("--config", "{config}", "--cert", "{tmp}/missing.pem"),
        ("--config", "{config}", "--cert", "{config}"),
        ("--config", "{config}", "--cert", "{alice}", "--at", "yesterday"),
        ("--cert", "{alice}"),
    ],
    ids=["no configuration", "no certificate", "not a certificate", "bad time", "usage"],
)
def test_usage_and_configuration_errors_exit_2(
    lab: LabLayout, config: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A configuration that does not load, an unreadable certificate or bad arguments: exit 2, nothing on stdout."""
    names = {"tmp": tmp_path, "alice": _user(lab, "alice"), "config": config}
    argv = [sys.executable, "-m", "proxy", "explain", *(a.format(**names) for a in args)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert res.returncode == 2, res
    assert res.stdout == ""
    assert res.stderr.strip()


def test_explain_prints_no_terminal_control_sequence_from_a_certificate(
    lab: LabLayout, config: Path, tmp_path: Path
) -> None:
    """A certificate handed in by a user (a helpdesk ticket's attachment) whose subject carries escape sequences
    (`ESC ] 0 ; ... BEL` retitles the window, `ESC [ 2 J` clears the screen), issued by the lab's CA to alice:
    `explain` prints them as escapes (`\\x1b`), never raw to the operator's terminal."""
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[32mOK\x7f"  # ASCII: an e-mail address name
    key = ec.generate_private_key(ec.SECP256R1())
    spec = UserSpec(upn="alice@lab.test", email=f"{hostile}@lab.test")
    pem = tmp_path / "hostile.pem"
    write_pem(pem, [issue_user(Pki.at(lab.pki_dir), spec, key, now=datetime.now(UTC))])
    argv = [sys.executable, "-m", "proxy", "explain", "--config", str(config), "--cert", str(pem)]
    done = subprocess.run(argv, capture_output=True, timeout=60, cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout  # accepted: alice's, from the trusted CA
    text = done.stdout.decode("utf-8", errors="surrogateescape")
    assert "pwned" in text
    controls = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or "\ud800" <= c <= "\udfff"]
    assert controls == []
    assert "pwned\\x07\\x1b[2J" in text  # (RFC 4514 escapes the `;`)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_certificate_path_that_is_no_file_exits_2_instead_of_reading_for_ever(
    lab: LabLayout, config: Path, tmp_path: Path, kind: str
) -> None:
    """`--cert /dev/zero` read until memory ran out, `--cert` naming a FIFO waited for good: exit 2 and why."""
    cert = Path("/dev/zero")
    if kind == "fifo":
        cert = tmp_path / "cert.fifo"
        os.mkfifo(cert)
    res = _explain(config, cert)
    assert res.returncode == 2, res
    assert res.stdout == ""
    assert "not a regular file" in res.stderr, res.stderr
