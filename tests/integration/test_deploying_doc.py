"""docs/deploying.md, executed: its samba-tool blocks, as written, make a gateway account in the lab's AD realm,
and `kcd-proxy doctor` with that account passes every check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "deploying.md"
BLOCK = re.compile(r"<!-- samba-tool: (step \d+) -->\n```sh\n(.*?)```", re.DOTALL)
ACCOUNT = "svc-docgw"  # the guide's svc-kcdproxy, under a name of its own: the realm's gateway keeps its account


def guide_blocks() -> list[tuple[str, str]]:
    """The guide's samba-tool blocks, in order: (step, shell text)."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(GUIDE.read_text())]


def in_the_lab(text: str, realm: ad.AdRealm, out: Path) -> str:
    """The guide's names replaced by the lab realm's (the guide's example names are the deployment's)."""
    for theirs, ours in (
        ("/etc/kcd-proxy/", f"{out}/"),
        ("/var/lib/samba/private/sam.ldb", str(realm.sam_ldb)),
        ("svc-kcdproxy", ACCOUNT),
        ("HTTP/kcd-gw.corp.example.com", "HTTP/docgw.ad.test"),
        ("HTTP/mail.corp.example.com", ad.BACKEND_SPN),
        ("DC=corp,DC=example,DC=com", ad.BASE_DN),
        ("CORP.EXAMPLE.COM", ad.REALM),
    ):
        text = text.replace(theirs, ours)
    return text


def run_block(realm: ad.AdRealm, text: str) -> subprocess.CompletedProcess[str]:
    """A guide block in bash, its samba-tool and ldbmodify pointed at the lab DC's configuration."""
    preamble = (
        "set -euo pipefail\n"
        f'samba-tool() {{ command samba-tool "$@" --configfile={realm.smb_conf}; }}\n'
        f'ldbmodify() {{ command ldbmodify "$@" --configfile={realm.smb_conf}; }}\n'
    )
    return subprocess.run(["bash", "-c", preamble + text], capture_output=True, text=True, timeout=300, check=False)


def _delete_account(realm: ad.AdRealm) -> None:
    subprocess.run(
        ["samba-tool", "user", "delete", ACCOUNT, f"--configfile={realm.smb_conf}"],
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_the_guide_has_samba_tool_blocks_for_account_delegation_and_keytab() -> None:
    """The guide carries the three executable blocks (the test below would otherwise prove nothing)."""
    steps = [step for step, _ in guide_blocks()]
    assert steps == ["step 1", "step 2", "step 3"]


def test_the_guides_samba_tool_steps_make_a_gateway_account_that_doctor_passes(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """Steps 1-3 of docs/deploying.md, run as written against the lab DC, give an account with its SPN, AES
    keys, protocol transition and delegation to HTTP/cas.ad.test, and a keytab; doctor then passes every check."""
    _delete_account(ad_realm)  # a previous run's, if it was interrupted
    try:
        for step, text in guide_blocks():
            done = run_block(ad_realm, in_the_lab(text, ad_realm, tmp_path))
            assert done.returncode == 0, f"{step}: {done.stderr[-2000:]}"
            if step == "step 2":
                assert ad.BACKEND_SPN in done.stdout
                assert "UF_TRUSTED_TO_AUTHENTICATE_FOR_DELEGATION: True" in done.stdout, done.stdout
        keytab = tmp_path / "kcd-proxy.keytab"
        listed = subprocess.run(["klist", "-ke", str(keytab)], capture_output=True, text=True, check=True).stdout
        assert f"{ACCOUNT}@{ad.REALM} (aes256-cts-hmac-sha1-96)" in listed
        assert f"HTTP/docgw.ad.test@{ad.REALM} (aes256-cts-hmac-sha1-96)" in listed

        config = ad.gateway_config(ad_realm, port=ad_realm.free_port(), backend_port=ad_backend.port)
        config = config.replace(ad_realm.gateway_principal, f"{ACCOUNT}@{ad.REALM}")
        config = config.replace(str(ad_realm.gateway_keytab), str(keytab))
        path = tmp_path / "gateway.toml"
        path.write_text(config)
        doctor = ad_realm.run([sys.executable, "-m", "proxy", "doctor", "--config", str(path)], timeout=180)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        for check in ("kdc", "keytab", "clock", "s4u2self", f"s4u2proxy {ad.BACKEND_SPN}", "ticket /"):
            assert re.search(rf"PASS\s+{re.escape(check)}\s", doctor.stdout), doctor.stdout
    finally:
        _delete_account(ad_realm)
