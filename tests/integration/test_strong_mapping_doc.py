"""docs/strong-mapping.md's operator walk-through, executed: its blocks, as written, make an account, mint its
certificates with the openssl CLI, map one by `altSecurityIdentities` and send each through a `strong` gateway in
front of the lab's Samba DC, curl as the device; what they print is what the page says."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.test_ad_mapping import start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "strong-mapping.md"
BLOCK = re.compile(r"<!-- walk-through: (step \d+) -->\n```sh\n(.*?)```", re.DOTALL)
ENTRY = re.compile(r"altSecurityIdentities: (X509:<I>.*?<SR>[0-9a-f]+)")


def page_blocks() -> dict[str, str]:
    """The walk-through's blocks by step."""
    return {m.group(1): m.group(2) for m in BLOCK.finditer(PAGE.read_text())}


@pytest.fixture(scope="module")
def strong(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """The lab's `strong` gateway (gateway-strong.toml's settings) inside the namespace."""
    gw = start_gateway(ad_mapping_realm, tmp_path_factory.mktemp("walk-strong"), ad_backend, "strong")
    yield gw
    gw.stop()


def in_the_realm(text: str, realm: ad.AdRealm, gw: AdProcess, name: str) -> str:
    """The page's lab paths, gateway and account name replaced by the tests' realm's, gateway's and a name of the
    test's own (the workers share the realm)."""
    for theirs, ours in (
        (".lab/ad/samba/etc/smb.conf", str(realm.smb_conf)),
        (".lab/ad/samba/private/sam.ldb", str(realm.sam_ldb)),
        (".lab/ad/pki/", f"{realm.pki.root_cert.parent}/"),
        ("$(cat .lab/ad/netns)", realm.netns),
        (".lab/ad/gateway-strong.toml", str(gw.log_path.parent / "gateway.toml")),
        (".venv/bin/kcd-proxy", str(Path(sys.executable).parent / "kcd-proxy")),
        ("https://127.0.0.1:8443", gw.url),
        ("newhire", name),
    ):
        text = text.replace(theirs, ours)
    return text


def run_step(text: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A block in bash from `cwd`, stopping at a failed command, as a shell pastes it (no pipefail: step 3's explain
    exits 1 for the refusal it shows, into grep)."""
    done = subprocess.run(
        ["bash", "-c", "set -eu\n" + text], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_page_has_the_walk_through_blocks() -> None:
    """The page carries the six executable blocks (the test below would otherwise prove nothing)."""
    assert list(page_blocks()) == [f"step {n}" for n in range(1, 7)]


@pytest.mark.slow(seconds=20)
def test_the_walk_through_runs_as_written_and_gives_what_the_page_says(
    ad_mapping_realm: ad.AdRealm, strong: AdProcess, tmp_path: Path
) -> None:
    """Steps 1-6 as written: a SID, `explain` refusing the certificate without one and naming the very entry step 4
    builds by hand from openssl's serial, then 200 for the own SID, 403 for alice's, 200 for the mapped one."""
    realm, name = ad_mapping_realm, f"nh{secrets.token_hex(4)}"
    steps = {step: in_the_realm(text, realm, strong, name) for step, text in page_blocks().items()}
    try:
        assert "objectSid: S-1-5-21-" in run_step(steps["step 1"], tmp_path).stdout
        run_step(steps["step 2"], tmp_path)
        explained = run_step(steps["step 3"], tmp_path).stdout
        assert "mapping      REFUSED  the certificate is not strongly mapped" in explained, explained
        fix_entry = ENTRY.search(explained)
        assert fix_entry is not None, explained
        by_hand = run_step(steps["step 4"], tmp_path).stdout.splitlines()[0]
        assert by_hand == fix_entry.group(1)
        answers = run_step(steps["step 5"], tmp_path).stdout.splitlines()
        assert answers == [f"{name}-own-sid 200", f"{name}-alice-sid 403", f"{name}-plain 200"]
        walk = tmp_path / "walk"
        assert f'"principal": "{name}@{ad.REALM}"' in (walk / "plain.out").read_text()
        assert (walk / "alice-sid.out").read_text().strip() == (
            "the certificate belongs to another account (SID of another account)"
        )
        run_step(steps["step 6"], tmp_path)
        assert not walk.exists()
    finally:
        subprocess.run(
            ["samba-tool", "user", "delete", name, f"--configfile={realm.smb_conf}"], capture_output=True, check=False
        )
