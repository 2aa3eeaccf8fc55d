"""`[listener] workers = 2`: a replacement worker and the CRLs its siblings hold (`proxy.certs.kept`).

Real `kcd-proxy run` supervisors against the lab, a CRL distribution point of the test's own on loopback (plain HTTP:
anyone on its path can answer an older genuine CRL), workers SIGKILLed; devices are aiohttp clients with the lab's
certificates, placed on a worker by the kernel (SO_REUSEPORT), each request's worker read from its log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.kept import _name as kept_name
from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, free_port, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_revocation import _CrlServer
from tests.integration.test_workers import (
    _alive,
    _best_effort_with,
    _first_end,
    _fresh_connections,
    _listening_pids,
    _replacement,
    _revoked_on_each,
    _scrape,
    _with_workers,
)

pytestmark = pytest.mark.slow(seconds=8)


def _issuing_crls(lab: LabLayout, tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """The issuing CA's CRL number 3001 revoking carol, its number 3000 from before (a genuine CRL to replay), and the
    root's CRL in a file."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    newer = write_crl(tmp_path / "3001.crl", issuing, revoked=[carol.serial_number], number=3001).read_bytes()
    older = write_crl(tmp_path / "3000.crl", issuing, number=3000).read_bytes()
    return newer, older, write_crl(tmp_path / "root.crl", root)


def _with_url(lab: LabLayout, url: str, root_crl: Path, extra: str = "") -> str:
    return _best_effort_with(lab, [root_crl], extra).replace(
        f'crls = ["{root_crl}"]', f'crls = ["{url}", "{root_crl}"]'
    )


def _refreshing_every_second(
    lab: LabLayout, tmp_path: Path, root_crl: Path, answer: dict[str, tuple[int, bytes]]
) -> tuple[_CrlServer, str, Gateway]:
    """A two-worker gateway with an admin listener reading, every second, the root's CRL file and the issuing CA's CRL
    from a URL of the test's answering `answer["crl"]` as the test sets it: the URL's server, the URL, the gateway."""
    server = _CrlServer(lambda _path, _headers: answer["crl"])
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    text = _with_url(lab, url, root_crl, f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n')
    crls = f'crls = ["{url}", "{root_crl}"]'
    return server, url, start_gateway(lab, tmp_path / "gw", text.replace(crls, f"{crls}\ncrl_refresh_seconds = 1"))


def test_a_replacement_given_an_older_crl_by_a_url_serves_with_the_one_its_siblings_hold(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The issuing CA's CRL URL answers 3001 (carol revoked), then 3000 (a replay) as a worker dies: the replacement was
    not started (`worker_not_replaced` every 5 s, one worker short for as long as the replay lasts). It now starts from
    the CRL its siblings keep (`crl_taken_from_siblings`, 3001), refuses the URL's 3000 as older, and serves: carol is
    refused by both workers, alice served."""
    newer, older, root_crl = _issuing_crls(lab, tmp_path)
    answer = {"crl": newer}
    server = _CrlServer(lambda _path, _headers: (200, answer["crl"]))
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    gw = start_gateway(lab, tmp_path / "gw", _with_url(lab, url, root_crl))
    try:
        first, second = _listening_pids(gw, 2)
        answer["crl"] = older
        gw.mark()
        os.kill(first, signal.SIGKILL)
        ended = _first_end(gw, (first, second))
        assert ended["event"] == "listening", ended
        taken = gw.wait_event("crl_taken_from_siblings", pid=ended["pid"])
        assert (taken["source"], taken["crl_number"]) == (url, 3001), taken
        refused = gw.wait_event("crl_rejected", pid=ended["pid"])
        assert "#3000" in refused["problem"], refused
        assert "replayed?" in refused["problem"], refused
        _revoked_on_each(lab, gw, {second, ended["pid"]})
        assert set(asyncio.run(_fresh_connections(lab, gw, 4))) == {200}
        assert gw.events("worker_not_replaced", gw.since) == []
    finally:
        gw.stop()
        server.close()


@pytest.mark.slow(seconds=25)
def test_a_replacement_whose_first_crl_fetch_hangs_times_out_and_serves_with_its_siblings_crl(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The CRL URL accepts and never answers as a worker dies: the replacement's first fetch waits `FETCH_TIMEOUT`
    (10 s) meanwhile its sibling serves and /readyz says 1 of 2 workers serve; then the fetch fails and the replacement
    served without the issuing CA's CRL (best-effort): carol, revoked, got 200 from it and 403 from its sibling. It now
    holds the CRL its siblings keep, and both refuse her."""
    newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    hanging, release = threading.Event(), threading.Event()

    def answer(_path: str, _headers: Message) -> tuple[int, bytes]:
        if hanging.is_set():
            release.wait(WAIT)
        return 200, newer

    server = _CrlServer(answer)
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    admin = free_port()
    gw = start_gateway(lab, tmp_path / "gw", _with_url(lab, url, root_crl, f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'))
    try:
        first, second = _listening_pids(gw, 2)
        hanging.set()
        gw.mark()
        os.kill(first, signal.SIGKILL)
        started = gw.wait_event("worker_started")
        hung = time.monotonic()
        assert set(asyncio.run(_fresh_connections(lab, gw, 3))) == {200}  # the sibling serves meanwhile

        def short() -> dict[str, Any] | None:
            body = json.loads(_scrape(f"http://127.0.0.1:{admin}/readyz"))
            return body if "workers" in body else None

        assert eventually(short, "/readyz naming the worker not serving")["workers"].startswith("1 of 2 workers serve")
        failed = gw.wait_event("crl_fetch_failed", pid=started["worker"])
        assert time.monotonic() - hung < 10.0 + 15.0, failed  # bounded by FETCH_TIMEOUT (and a loaded machine)
        replacement = _replacement(gw, first, second)
        assert replacement["pid"] == started["worker"]
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
        assert gw.events("worker_not_replaced", gw.since) == []
    finally:
        release.set()
        gw.stop()
        server.close()


def _siblings(gw: Gateway) -> tuple[Path, dict[int, int]]:
    """The supervisor's private directory and each worker's number by pid (from the admin listeners' lines)."""
    lines = gw.wait_events("admin_listening", 2)
    return Path(lines[0]["siblings"]).parent, {e["pid"]: int(Path(e["siblings"]).stem) for e in lines}


@pytest.mark.parametrize("kept", ["older", "forged"])
def test_a_replacement_never_takes_a_kept_crl_it_cannot_vet(lab: LabLayout, tmp_path: Path, kept: str) -> None:
    """The workers' kept CRLs (`crls/` in the supervisor's directory) rewritten with an older genuine CRL (3000, carol
    not revoked) or one of the CA's name signed by another key (9999, carol not revoked): a replacement given 3000 by
    the URL takes neither (below the floor; not verified) and is not started, as before the kept CRLs
    (`worker_not_replaced`, the URL and "replayed?"); carol is refused meanwhile, and once the URL answers a newer CRL
    a replacement serves it."""
    newer, older, root_crl = _issuing_crls(lab, tmp_path)
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing = load_ca(lab.pki_dir, "issuing")
    planted = older
    if kept == "forged":
        impostor = (issuing[0], ec.generate_private_key(ec.SECP256R1()))
        planted = write_crl(tmp_path / "forged.crl", impostor, number=9999).read_bytes()
    answer = {"crl": newer}
    server = _CrlServer(lambda _path, _headers: (200, answer["crl"]))
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    admin = f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n'
    gw = start_gateway(lab, tmp_path / "gw", _with_url(lab, url, root_crl, admin))
    try:
        first, second = _listening_pids(gw, 2)
        directory, _ = _siblings(gw)
        files = sorted((directory / "crls").glob("*.crl"))
        assert len(files) == 4, files  # two sources, two workers
        for path in files:
            if path.read_bytes() == newer:
                path.write_bytes(planted)
        answer["crl"] = older
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert any(url in p and "replayed?" in p for p in refused["problems"]), refused
        assert asyncio.run(_fresh_connections(lab, gw, 4, "carol")) == [403] * 4
        answer["crl"] = write_crl(
            tmp_path / "3002.crl", issuing, revoked=[carol.serial_number], number=3002
        ).read_bytes()
        replacement = _replacement(gw, first, second)
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
    finally:
        gw.stop()
        server.close()


def test_a_supervisor_killed_as_a_replacement_refuses_leaves_no_directory(lab: LabLayout, tmp_path: Path) -> None:
    """The supervisor stopped (SIGSTOP) as a replacement refuses beside its sibling (the listener's certificate half
    rewritten), then SIGKILLed: the replacement's `<n>.refused`, which only the supervisor takes, stayed in the private
    directory, and with it the directory, which the last worker could not remove. A worker outliving its supervisor
    now removes what only the supervisor would have read (`*.refused`) and the kept CRLs."""
    admin = f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n'
    original = lab.pki_dir / "server-chain.pem"
    copy = tmp_path / original.name
    whole = original.read_bytes()
    copy.write_bytes(whole)
    text = (_with_workers(lab, free_port(), 2) + admin).replace(str(original), str(copy))
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        first, second = _listening_pids(gw, 2)
        directory, number = _siblings(gw)
        copy.write_bytes(whole[: len(whole) // 2])
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refusal = directory / f"{number[first]}.refused"
        for _ in range(3):  # the supervisor stopped before it took the refusal: else the next retry
            started = gw.wait_event("worker_started")
            gw.proc.send_signal(signal.SIGSTOP)
            eventually(lambda: not _alive(started["worker"]), "the replacement's end")  # noqa: B023
            if refusal.exists():
                break
            gw.mark()
            gw.proc.send_signal(signal.SIGCONT)
        assert refusal.exists()
        gw.proc.kill()
        gw.proc.wait()
        eventually(lambda: not _alive(second), "the sibling's end")
        deadline = time.monotonic() + 5.0  # the sibling has ended: its removal is done, or never will be
        while directory.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(second, signal.SIGKILL)
        gw.stop()
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())


@pytest.mark.slow(seconds=25)
def test_a_replacement_after_a_reload_moved_the_crl_url_holds_what_its_siblings_took_from_the_old_one(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A reload points the issuing CA's CRL at a new URL that does not answer: the siblings hold the old URL's CRL
    (3001, carol revoked: `CrlStore.inherit`), and a replacement, which found nothing kept for the new URL, served
    carol. The reload now keeps what each worker holds under the new URL, and the replacement refuses carol too."""
    newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    server = _CrlServer(lambda path, _headers: (200, newer) if path == "/old.crl" else (404, b""))
    old, new = (f"http://127.0.0.1:{server.port}/{name}.crl" for name in ("old", "new"))
    gw = start_gateway(lab, tmp_path / "gw", _with_url(lab, old, root_crl))
    try:
        first, second = _listening_pids(gw, 2)
        edited = tmp_path / "edited.toml"
        edited.write_text(gw.config_path.read_text().replace(old, new))
        edited.replace(gw.config_path)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            gw.wait_event("reloaded", pid=pid)
        _revoked_on_each(lab, gw, {first, second})
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(gw, first, second)
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
    finally:
        gw.stop()
        server.close()


@pytest.mark.slow(seconds=15)
def test_a_crl_url_padding_its_crl_costs_the_kept_files_nothing(lab: LabLayout, tmp_path: Path) -> None:
    """The CRL URL answers its genuine CRL in a PEM file with 8 MiB of text before the block (anyone on a plain-HTTP
    path can, fresh at each refresh, up to MAX_CRL_BYTES): each worker wrote all of it to its kept file, memory on a
    tmpfs. A worker now keeps the CRLs alone, and a replacement starts from them (carol refused)."""
    newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    padded = b"x" * (8 << 20) + b"\n" + newer
    server = _CrlServer(lambda _path, _headers: (200, padded))
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    admin = f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n'
    gw = start_gateway(lab, tmp_path / "gw", _with_url(lab, url, root_crl, admin))
    try:
        first, second = _listening_pids(gw, 2)
        directory, _ = _siblings(gw)

        def kept() -> list[Path] | None:
            files = list((directory / "crls").glob("*.crl"))
            return files if len(files) == 4 else None  # two sources, two workers

        files = eventually(kept, "the workers' kept files")
        assert max(path.stat().st_size for path in files) < len(newer) * 2, [p.stat().st_size for p in files]
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(gw, first, second)
        taken = gw.wait_event("crl_taken_from_siblings", pid=replacement["pid"])
        assert (taken["source"], taken["crl_number"]) == (url, 3001), taken
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
    finally:
        gw.stop()
        server.close()


@pytest.mark.slow(seconds=20)
def test_a_replacement_starts_from_the_kept_file_last_written_whatever_its_worker_number(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The CRL URL (anyone on its plain-HTTP path) answers the root's genuine CRL, not the issuing CA's, which both
    workers take, then the issuing CA's 3002 (carol revoked), which only worker 1 takes (worker 2 stopped; worker 1
    keeps the root's CRL after it, a scope its source left out), then nothing, as worker 2 dies: its replacement took
    the file of the highest number, the dead worker's root CRL, and served carol beside a sibling refusing her. It now
    takes the file written last (worker 1's 3002)."""
    _newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing = load_ca(lab.pki_dir, "issuing")
    newest = write_crl(tmp_path / "3002.crl", issuing, revoked=[carol.serial_number], number=3002)
    answer = {"crl": (200, root_crl.read_bytes())}
    server, url, gw = _refreshing_every_second(lab, tmp_path, root_crl, answer)
    try:
        _listening_pids(gw, 2)
        directory, number = _siblings(gw)
        one, two = sorted(number, key=number.__getitem__)
        files = {pid: directory / "crls" / f"{kept_name(url)}.{number[pid]}.crl" for pid in (one, two)}

        def written(pid: int, data: bytes) -> None:  # the worker's kept file for the URL starts with `data`
            def starts() -> bool:
                with contextlib.suppress(OSError):
                    return files[pid].read_bytes().startswith(data)
                return False

            eventually(starts, f"{data[:30]!r}... kept by {pid}")

        for pid in (one, two):
            written(pid, root_crl.read_bytes())
        os.kill(two, signal.SIGSTOP)
        answer["crl"] = (200, newest.read_bytes())
        written(one, newest.read_bytes())
        answer["crl"] = (404, b"")
        gw.mark()
        os.kill(two, signal.SIGKILL)
        replacement = _replacement(gw, one, two)
        _revoked_on_each(lab, gw, {one, replacement["pid"]})
    finally:
        gw.stop()
        server.close()


@pytest.mark.parametrize("then", ["replayed", "withheld", "not a CRL"])
def test_a_running_worker_whose_read_leaves_it_holding_nothing_takes_the_crl_its_sibling_keeps(
    lab: LabLayout, tmp_path: Path, then: str
) -> None:
    """Neither worker holds the issuing CA's CRL (its URL answered 404 at their start); then the URL (anyone on its
    plain-HTTP path) answers 3001 (carol revoked) to worker 1 alone (worker 2 stopped), and once worker 2 is continued
    gives it 3000 (refused below the floor 3001, left34), a 404 or bytes that are no CRL (review58): worker 2 held
    nothing, so carol got 403 from worker 1 and 200 from worker 2 (best-effort), not a replacement's refusal but the
    same split. A worker whose read of a source leaves it holding no CRL of it now starts it from its siblings' kept
    files, as a replacement does (`crl_taken_from_siblings`): carol 403 on both."""
    newer, older, root_crl = _issuing_crls(lab, tmp_path)
    given = {"replayed": (200, older), "withheld": (404, b""), "not a CRL": (200, b"not a CRL")}[then]
    said = "crl_fetch_failed" if then == "withheld" else "crl_rejected"
    answer = {"crl": (404, b"")}
    server, url, gw = _refreshing_every_second(lab, tmp_path, root_crl, answer)
    try:
        _listening_pids(gw, 2)
        directory, number = _siblings(gw)
        one, two = sorted(number, key=number.__getitem__)
        kept = directory / "crls" / f"{kept_name(url)}.{number[one]}.crl"
        os.kill(two, signal.SIGSTOP)
        answer["crl"] = (200, newer)
        eventually(lambda: kept.exists() and kept.read_bytes() == newer, "3001 kept by worker 1")
        answer["crl"] = given
        gw.mark()
        os.kill(two, signal.SIGCONT)
        gw.wait_events(said, 2, accept=lambda e: e.get("pid") == two and e.get("source") == url)
        _revoked_on_each(lab, gw, {one, two})
        taken = gw.wait_event("crl_taken_from_siblings", pid=two, source=url)
        assert taken["crl_number"] == 3001, taken
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(two, signal.SIGCONT)
        gw.stop()
        server.close()


def test_a_kept_file_that_cannot_be_written_is_logged_naming_why(lab: LabLayout, tmp_path: Path) -> None:
    """A worker whose kept file cannot be written (as on a full disk: a directory in the file's place here) when it
    takes the issuing CA's 3001 says so (`crl_not_kept`, `error`): nothing said it before, and a replacement beside it
    then refusing a replay, or a sibling withheld the URL serving without the CRL, was owed to a disk no line named."""
    newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    answer = {"crl": (404, b"")}
    server, url, gw = _refreshing_every_second(lab, tmp_path, root_crl, answer)
    try:
        _listening_pids(gw, 2)
        directory, number = _siblings(gw)
        one = min(number, key=number.__getitem__)
        kept = directory / "crls" / f"{kept_name(url)}.{number[one]}.crl"
        eventually(kept.exists, "worker 1's kept file (empty: it holds nothing of the URL)")
        kept.unlink()
        kept.mkdir()  # its next write cannot replace it, as a full disk fails it
        gw.mark()
        answer["crl"] = (200, newer)
        line = gw.wait_event("crl_not_kept", pid=one, source=url)
        assert "Is a directory" in line["error"], line
    finally:
        gw.stop()
        server.close()


@pytest.mark.slow(seconds=25)
def test_a_replacement_forked_before_the_reload_that_moved_the_crl_url_takes_its_sibling_s_crl_after_it(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The configuration's issuing-CA CRL URL edited to a new URL that does not answer, and a worker dies before the
    SIGHUP: its replacement reads the edited file, finds nothing kept under the new URL (its sibling keeps 3001 under
    the old one) and holds nothing. Once the SIGHUP came, the sibling kept 3001 under the new URL (`inherit`), but the
    replacement, holding nothing before its reload, held nothing after it and served carol (200) beside the sibling
    refusing her, for as long as the new URL did not answer. A worker whose read leaves it holding nothing now starts
    from its siblings' kept CRLs: carol 403 on both."""
    newer, _older, root_crl = _issuing_crls(lab, tmp_path)
    server = _CrlServer(lambda path, _headers: (200, newer) if path == "/old.crl" else (404, b""))
    old, new = (f"http://127.0.0.1:{server.port}/{name}.crl" for name in ("old", "new"))
    text = _with_url(lab, old, root_crl)
    crls = f'crls = ["{old}", "{root_crl}"]'
    gw = start_gateway(lab, tmp_path / "gw", text.replace(crls, f"{crls}\ncrl_refresh_seconds = 1"))
    try:
        first, second = _listening_pids(gw, 2)
        edited = tmp_path / "edited.toml"
        edited.write_text(gw.config_path.read_text().replace(old, new))
        edited.replace(gw.config_path)
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(gw, first, second)["pid"]
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (second, replacement):
            gw.wait_event("reloaded", pid=pid)
        gw.wait_event("crl_taken_from_siblings", pid=replacement, source=new)
        _revoked_on_each(lab, gw, {second, replacement})
    finally:
        gw.stop()
        server.close()
