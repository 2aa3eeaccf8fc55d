"""docs/deploying.md, "An MIT KDC instead of Active Directory", executed: its marked kadmin.local and ldapmodify
blocks, as written, make a gateway principal in the lab's MIT realm (LDAP back end), and `kcd-proxy doctor` with
that principal and the keytab the block wrote passes every check; with the first block alone it fails S4U2Proxy,
naming the delegation list, so the second block is what grants it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from proxy.lab import kdc
from proxy.lab.layout import BACKEND_SERVICE, REALM, LabLayout
from tests.integration.conftest import REPO, free_port, lab_config

GUIDE = REPO / "docs" / "deploying.md"
BLOCK = re.compile(r"<!-- mit: (step \d+) -->\n```sh\n(.*?)```", re.DOTALL)
GATEWAY = "HTTP/docgw.lab.test"  # the guide's HTTP/kcd-gw.corp.example.com: the lab's own gateway keeps its principal


def guide_blocks() -> list[tuple[str, str]]:
    """The MIT section's marked blocks, in order: (step, shell text)."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(GUIDE.read_text())]


def in_the_lab(text: str, lab: LabLayout) -> str:
    """The guide's example names replaced by the lab realm's, and its password prompt by the lab's password."""
    for theirs, ours in (
        ("HTTP/kcd-gw.corp.example.com", GATEWAY),
        ("HTTP/mail.corp.example.com", BACKEND_SERVICE),
        ("ldap://ldap.corp.example.com", f"ldap://127.0.0.1:{lab.ldap_port}"),
        ("dc=corp,dc=example,dc=com", kdc.SUFFIX),
        ("CORP.EXAMPLE.COM", REALM),
        (" -W ", f" -w {kdc.ROOT_PASSWORD} "),
    ):
        text = text.replace(theirs, ours)
    return text


def _run(lab: LabLayout, argv: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **lab.env(), "LDAPNOINIT": "1"}  # the lab's KRB5_CONFIG and KRB5_KDC_PROFILE
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=180, check=False)


def _delete_principal(lab: LabLayout, cwd: Path) -> None:
    _run(lab, ["kadmin.local", "-q", f"delprinc -force {GATEWAY}"], cwd)


def _doctor(lab: LabLayout, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = lab_config(lab, port=free_port())
    config = config.replace(f'principal = "HTTP/proxy.lab.test@{REALM}"', f'principal = "{GATEWAY}@{REALM}"')
    config = config.replace(str(lab.proxy_keytab), str(tmp_path / "kcd-proxy.keytab"))
    path = tmp_path / "gateway.toml"
    path.write_text(config)
    return _run(lab, [sys.executable, "-m", "proxy", "doctor", "--config", str(path), "--user", "alice@lab.test"], REPO)


def test_the_guide_has_the_mit_blocks_for_principal_keytab_and_delegation() -> None:
    """The MIT section carries its two executable blocks (the test below would otherwise prove nothing)."""
    assert [step for step, _ in guide_blocks()] == ["step 1", "step 2"]


def test_the_guides_mit_steps_make_a_gateway_principal_that_doctor_passes(lab: LabLayout, tmp_path: Path) -> None:
    """The MIT blocks of docs/deploying.md, run as written against the lab's LDAP-backed KDC: the first gives a
    principal with OK_TO_AUTH_AS_DELEGATE and a keytab at the KDC's kvno, with which doctor fails only S4U2Proxy
    (not in the delegation list); after the second (krbAllowedToDelegateTo by ldapmodify) doctor passes every check."""
    _delete_principal(lab, tmp_path)  # a previous run's, if it was interrupted
    try:
        (step1, first), (step2, second) = guide_blocks()
        done = _run(lab, ["bash", "-c", "set -euo pipefail\n" + in_the_lab(first, lab)], tmp_path)
        assert done.returncode == 0, f"{step1}: {done.stderr[-2000:]}"  # kadmin.local exits 0 on failure: below
        shown = _run(lab, ["kadmin.local", "-q", f"getprinc {GATEWAY}"], tmp_path).stdout
        assert "Attributes: OK_TO_AUTH_AS_DELEGATE" in shown, shown
        kvno = re.search(r"Key: vno (\d+), aes256", shown)
        assert kvno is not None, shown
        listed = _run(lab, ["klist", "-kt", str(tmp_path / "kcd-proxy.keytab")], tmp_path).stdout
        assert re.search(rf"^\s*{kvno.group(1)} .* {re.escape(GATEWAY)}@{REALM}$", listed, re.MULTILINE), listed

        before = _doctor(lab, tmp_path)
        assert before.returncode == 1, before.stdout + before.stderr
        assert re.search(r"PASS\s+s4u2self\s", before.stdout), before.stdout
        assert re.search(rf"FAIL\s+s4u2proxy {re.escape(BACKEND_SERVICE)}\s", before.stdout), before.stdout
        assert "not in the delegation list" in before.stdout, before.stdout

        done = _run(lab, ["bash", "-c", "set -euo pipefail\n" + in_the_lab(second, lab)], tmp_path)
        assert done.returncode == 0, f"{step2}: {done.stderr[-2000:]}"
        after = _doctor(lab, tmp_path)
        assert after.returncode == 0, after.stdout + after.stderr
        for check in ("kdc", "keytab", "clock", "s4u2self", f"s4u2proxy {BACKEND_SERVICE}", "ticket /"):
            assert re.search(rf"PASS\s+{re.escape(check)}\s", after.stdout), after.stdout
    finally:
        _delete_principal(lab, tmp_path)
