"""The CRL replay floor across a restart (`client_certificates.crl_state`), from outside: a real gateway reading the
issuing CA's CRL from a plain-HTTP URL (as a distribution point is), stopped and started again while that URL serves
an older CRL (a replay: still before its nextUpdate, from before a revocation)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import REPO, Gateway, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually
from tests.integration.test_revocation import connect, get

ISSUER = "CN=Lab Issuing CA"


class Scene:
    """The issuing CA's CRLs published under a name of this test's own on the lab's CRL server, and the gateway's
    configuration reading them from there (with the root's CRL from a file) every second."""

    def __init__(self, lab: LabLayout, tmp_path: Path) -> None:
        self.lab, self.tmp_path = lab, tmp_path
        self.alice = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "alice.pem").read_bytes())
        self.issuing = load_ca(lab.pki_dir, "issuing")
        self.root_crl = write_crl(tmp_path / "root.crl", load_ca(lab.pki_dir, "root"))
        self.published = lab.root / "crl-publish" / f"crl-state-{tmp_path.name}.crl"
        self.url = f"http://127.0.0.1:{lab.crl_port}/{self.published.name}"
        self.state = tmp_path / "state" / "crl-state.json"
        self.state.parent.mkdir(mode=0o700)
        self.port = free_port()

    def publish(self, number: int, *, alice_revoked: bool, hours_ago: float = 0.1) -> None:
        """CRL `number` of the issuing CA at the URL (replaced whole: a fetch never reads half of it)."""
        this_update = datetime.now(UTC) - timedelta(hours=hours_ago)
        revoked = [self.alice.serial_number] if alice_revoked else []
        crl = self.tmp_path / f"issuing-{number}.crl"
        write_crl(crl, self.issuing, revoked=revoked, number=number, this_update=this_update).replace(self.published)

    def config(self, *, kept: bool) -> str:
        """The lab gateway's configuration reading these CRLs; with `kept`, its floor in `self.state`."""
        text = lab_config(self.lab, port=self.port)
        lab_settings = f'crls = ["{self.lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\n'
        assert lab_settings in text
        settings = f'crls = ["{self.url}", "{self.root_crl}"]\ncrl_refresh_seconds = 1\nrevocation = "require"\n'
        if kept:
            settings += f'crl_state = "{self.state}"\n'
        return text.replace(lab_settings, settings)

    def start(self, name: str, *, kept: bool, workers: int = 1) -> Gateway:
        text = self.config(kept=kept)
        if workers > 1:
            bind = f'bind = "127.0.0.1:{self.port}"\n'
            text = text.replace(bind, f"{bind}workers = {workers}\n")
        return start_gateway(self.lab, self.tmp_path / name, text)

    def alice_answer(self, gw: Gateway) -> tuple[int, str]:
        conn = connect(self.lab, gw, "alice")
        try:
            return get(conn)
        finally:
            conn.close()

    def floors(self) -> list[dict[str, Any]]:
        """The floors the state file records for the issuing CA."""
        recorded: list[dict[str, Any]] = json.loads(self.state.read_text())["floors"]
        return [floor for floor in recorded if floor.get("issuer") == ISSUER]

    def recorded_number(self) -> int | None:
        """The issuing CA's CRL number in the state file (None: no file, or no floor for it)."""
        if not self.state.exists():
            return None
        floors = self.floors()
        return int(floors[0]["crl_number"]) if floors else None

    def replay_refused(self, name: str, replayed: int, floor: int) -> None:
        """CRL #`replayed` (alice not on it, a day old) served to a gateway started with the state file: alice is
        refused, and `crl_rejected` names the floor (#`floor`) the file kept across the restart."""
        self.publish(replayed, alice_revoked=False, hours_ago=24)
        gw = self.start(name, kept=True)
        try:
            assert self.alice_answer(gw)[0] == 403
            rejected = gw.wait_event("crl_rejected", source=self.url)
            assert f"(CRL number {floor}" in rejected["problem"]
        finally:
            assert gw.stop() == 0

    def close(self) -> None:
        self.published.unlink(missing_ok=True)


@pytest.fixture
def scene(lab: LabLayout, tmp_path: Path) -> Iterator[Scene]:
    """A `Scene`, its published CRL removed at the end."""
    scene = Scene(lab, tmp_path)
    try:
        yield scene
    finally:
        scene.close()


def _reload(gw: Gateway, text: str) -> None:
    gw.mark()
    gw.config_path.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_event("reloaded")


@pytest.mark.parametrize("kept", [True, False], ids=["crl_state", "without"])
def test_a_restarted_gateway_never_takes_a_crl_older_than_it_took_before(scene: Scene, kept: bool) -> None:
    """The gateway takes CRL #5001 (alice revoked) from the URL and is restarted while the URL serves #5000 (alice
    not revoked, still before its nextUpdate: a replay). Without `crl_state` the restarted gateway takes #5000 and
    serves alice again (today's behaviour, kept when the key is unset); with it, the floor read from the file
    refuses #5000 (`crl_rejected`, naming both CRLs and the file) and alice stays refused."""
    scene.publish(5001, alice_revoked=True)
    gw = scene.start("first", kept=kept)
    try:
        status, body = scene.alice_answer(gw)
        assert (status, "was revoked on" in body) == (403, True), body
    finally:
        assert gw.stop() == 0
    if kept:
        assert stat.S_IMODE(scene.state.stat().st_mode) == 0o600
        [floor] = scene.floors()
        assert floor["crl_number"] == 5001
        left = sorted(p.name for p in scene.state.parent.iterdir())
        assert left == [".crl-state.json.lock", "crl-state.json"]  # the writers' lock, no temporary file
    else:
        assert not scene.state.exists()
    scene.publish(5000, alice_revoked=False, hours_ago=24)
    gw = scene.start("second", kept=kept)
    try:
        status, body = scene.alice_answer(gw)
        if not kept:
            assert status == 200, body  # the hole the key closes
            return
        assert status == 403, body
        assert body.strip() == f"the revocation status could not be determined: no current CRL for issuer '{ISSUER}'"
        rejected = gw.wait_event("crl_rejected", source=scene.url)
        problem = rejected["problem"]
        assert problem.startswith(f"CRL #5000 of '{ISSUER}' is older than the one this gateway took (CRL number 5001")
        assert "replayed?" in problem
        assert str(scene.state) in problem
        assert scene.recorded_number() == 5001
    finally:
        assert gw.stop() == 0


def test_a_reload_adds_and_removes_the_crl_state(scene: Scene) -> None:
    """A gateway started without `crl_state` holds CRL #6001; a reload that adds the key writes its floor to the file
    at once (the CRLs it already held), and a newer CRL (#6002) raises it there; a reload that removes the key leaves
    the file as it was (#6003 taken, not recorded). A start with the key again refuses a replayed #6000 below the
    floor the file kept (#6002)."""
    scene.publish(6001, alice_revoked=True)
    gw = scene.start("first", kept=False)
    try:
        assert scene.alice_answer(gw)[0] == 403
        _reload(gw, scene.config(kept=True))
        eventually(lambda: scene.recorded_number() == 6001 or None, "the floor of CRL #6001 in the state file")
        gw.mark()
        scene.publish(6002, alice_revoked=True)
        eventually(lambda: scene.recorded_number() == 6002 or None, "the floor of CRL #6002 in the state file")
        _reload(gw, scene.config(kept=False))
        gw.mark()
        scene.publish(6003, alice_revoked=True)
        gw.wait_event("crl_loaded", source=scene.url, crl_number=6003)
        assert scene.recorded_number() == 6002
        assert scene.alice_answer(gw)[0] == 403
    finally:
        assert gw.stop() == 0
    scene.replay_refused("second", 6000, floor=6002)


def test_workers_keep_one_floor_in_the_file_and_in_memory(scene: Scene) -> None:
    """Two workers: a new CRL (#7002) taken by both is one floor in the file, the one they share in memory; after a
    restart of both, each worker refuses the replayed #7001 (`crl_rejected` from two processes) and alice is refused
    whichever worker the kernel gives her connection."""
    scene.publish(7002, alice_revoked=True)
    gw = scene.start("first", kept=True, workers=2)
    try:
        gw.wait_events("crl_loaded", 2, accept=lambda e: e["source"] == scene.url and e["crl_number"] == 7002)
        eventually(lambda: scene.recorded_number() == 7002 or None, "the floor of CRL #7002 in the state file")
        assert len(scene.floors()) == 1
    finally:
        assert gw.stop() == 0
    scene.publish(7001, alice_revoked=False, hours_ago=24)
    gw = scene.start("second", kept=True, workers=2)
    try:

        def refused_by_both() -> list[dict[str, Any]] | None:
            rejected = [e for e in gw.events("crl_rejected") if e["source"] == scene.url]
            return rejected if len({e["pid"] for e in rejected}) == 2 else None

        rejected = eventually(refused_by_both, "crl_rejected from both workers")
        assert all("(CRL number 7002" in e["problem"] for e in rejected)
        for _ in range(6):  # new connections: the kernel spreads them over both workers
            assert scene.alice_answer(gw)[0] == 403
        assert scene.recorded_number() == 7002
    finally:
        assert gw.stop() == 0


def test_a_damaged_state_file_stops_the_start_and_check_config_never_writes(scene: Scene) -> None:
    """`kcd-proxy run` with a state file that does not parse exits 2 with a configuration error naming the key and
    the file (never serving with an empty floor); check-config says the same, and on a sound file says ok without
    writing it (its mtime and bytes unchanged: run as root it would leave a file the gateway's user cannot replace)."""
    scene.publish(8001, alice_revoked=True)
    config = scene.tmp_path / "gateway.toml"
    config.write_text(scene.config(kept=True))
    scene.state.write_bytes(b'{"format": 1, "floors": [')
    scene.state.chmod(0o600)
    env = {**os.environ, **scene.lab.env()}
    run = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False)
    assert done.returncode == 2, done
    assert f"configuration error: client_certificates.crl_state: {scene.state} is damaged" in done.stderr
    check = [sys.executable, "-m", "proxy", "check-config", str(config)]
    done = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False)
    assert done.returncode == 1, done
    assert done.stdout.startswith(f"client_certificates.crl_state: {scene.state} is damaged"), done.stdout
    scene.state.unlink()
    gw = scene.start("first", kept=True)
    assert gw.stop() == 0
    written = (scene.state.stat().st_mtime_ns, scene.state.read_bytes())
    write_crl(scene.root_crl, load_ca(scene.lab.pki_dir, "root"), number=1001)  # a floor check-config raises
    done = subprocess.run(check, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, check=False)
    assert done.returncode == 0, done
    assert (scene.state.stat().st_mtime_ns, scene.state.read_bytes()) == written


def test_a_stuck_writer_never_holds_back_a_revocation(scene: Scene) -> None:
    """A process of the gateway's user holds the state's lock and never lets go (a writer stopped mid-write): CRL
    #9002, which revokes alice, still comes into force within the refresh, its write failing after the bounded wait
    (`crl_state_write_failed`, naming the lock); once the lock is free, the next round writes #9002's floor. Before,
    the refresh waited for the lock for ever, and alice, revoked, was served on."""
    scene.publish(9001, alice_revoked=False)
    gw = scene.start("first", kept=True)
    held = os.open(scene.state.parent / ".crl-state.json.lock", os.O_RDWR)
    try:
        assert scene.alice_answer(gw)[0] == 200
        fcntl.flock(held, fcntl.LOCK_EX)
        gw.mark()
        scene.publish(9002, alice_revoked=True)
        failed = gw.wait_event("crl_state_write_failed", path=str(scene.state))
        assert "is held by another process" in failed["error"]
        eventually(lambda: scene.alice_answer(gw)[0] == 403, "alice refused under CRL #9002")
        assert scene.recorded_number() == 9001
        fcntl.flock(held, fcntl.LOCK_UN)
        eventually(lambda: scene.recorded_number() == 9002 or None, "the floor of CRL #9002 in the state file")
    finally:
        os.close(held)
        assert gw.stop() == 0


def test_a_state_directory_others_can_write_stops_the_start(scene: Scene) -> None:
    """A state directory any local user may write (mode 1777, as /tmp): `kcd-proxy run` exits 2 with a configuration
    error naming the key, the directory and the fix, and check-config says the same; nothing is made there. Before,
    the gateway served with it, and another user could plant its lock file and stall every CRL refresh."""
    config = scene.tmp_path / "gateway.toml"
    config.write_text(scene.config(kept=True))
    scene.publish(9101, alice_revoked=False)
    scene.state.parent.chmod(0o1777)
    env = {**os.environ, **scene.lab.env()}
    run = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)
    assert done.returncode == 2, done
    expected = f"{scene.state.parent} is writable by others (mode 1777)"
    assert "configuration error: client_certificates.crl_state: " in done.stderr
    assert expected in done.stderr
    assert "chmod 700" in done.stderr
    check = [sys.executable, "-m", "proxy", "check-config", str(config)]
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, cwd=REPO, env=env, check=False)
    assert done.returncode == 1, done
    assert f"client_certificates.crl_state: {expected}" in done.stdout
    assert list(scene.state.parent.iterdir()) == []


def test_a_second_gateway_on_the_same_file_never_drops_the_firsts_floor(scene: Scene) -> None:
    """Two gateways running with one state file (against docs/revocation.md's advice, or a copy of the unit left
    running beside a new one): the first takes CRL #9202 (alice revoked) from the URL after the second started; the
    second, which reads only a root CRL of its own, then takes a new one and writes the file. Restarted while the URL
    replays #9201, the first still refuses it (the file kept #9202's floor) and alice. Before, the second's write
    replaced the file with its own table, read when it started (#9201), and the restarted first served alice again."""
    scene.publish(9201, alice_revoked=False)
    first = scene.start("first", kept=True)
    own_root = write_crl(scene.tmp_path / "root-second.crl", load_ca(scene.lab.pki_dir, "root"), number=2001)
    text = scene.config(kept=True).replace(f'"{scene.url}", "{scene.root_crl}"', f'"{own_root}"')
    assert scene.url not in text
    text = text.replace(f'bind = "127.0.0.1:{scene.port}"', f'bind = "127.0.0.1:{free_port()}"')
    second = start_gateway(scene.lab, scene.tmp_path / "second", text)
    try:
        assert scene.alice_answer(first)[0] == 200
        first.mark()
        scene.publish(9202, alice_revoked=True)
        first.wait_event("crl_loaded", source=scene.url, crl_number=9202)
        eventually(lambda: scene.recorded_number() == 9202 or None, "the floor of CRL #9202 in the state file")
        second.mark()
        write_crl(scene.tmp_path / "root-second-new.crl", load_ca(scene.lab.pki_dir, "root"), number=2002).replace(
            own_root
        )
        second.wait_event("crl_loaded", crl_number=2002)
        second.wait_event("crl_state_written", path=str(scene.state))
        assert scene.recorded_number() == 9202
    finally:
        assert second.stop() == 0
        assert first.stop() == 0
    scene.replay_refused("first-again", 9201, floor=9202)
