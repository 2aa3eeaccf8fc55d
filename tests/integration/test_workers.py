"""`[listener] workers = 2`: two processes serve one port (SO_REUSEPORT) under a supervisor.

The gateway runs as a real `kcd-proxy run` process against the lab. Each JSON log line carries the pid
of the process that wrote it, which is how the tests see which worker served a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from proxy import config as config_module
from proxy.certs.revocation import MAX_CRL_BYTES
from proxy.lab import runner
from proxy.lab.layout import LabLayout
from proxy.live import replacement_config
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually, whole_json_lines
from tests.integration.test_drain import Held, _send
from tests.integration.test_revocation import _CrlServer

# Scheduled among the long files (tests/schedule.py): 48 tests of 2-25 s (workers started, killed, retried every
# 5 s), about 5 min on one worker; unmarked, it went after the quick files and could end the run minutes after the rest.
pytestmark = pytest.mark.slow(seconds=6)


def _with_workers(lab: LabLayout, port: int, workers: int) -> str:
    text = lab_config(lab, port=port)
    bind = f'bind = "127.0.0.1:{port}"\n'
    return text.replace(bind, f"{bind}workers = {workers}\n")


def _replacement(gw: Gateway, *gone: int) -> dict[str, Any]:
    """The `listening` line of a worker that is none of `gone` (the workers killed): their replacement's."""
    return gw.wait_for("listening", lambda e: e.get("pid") not in gone, what="a replacement")


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _alive(pid: int) -> bool:
    """Whether any thread of `pid` still runs: a process SIGKILLed shows its first thread a zombie while the others
    still end, and those hold its descriptors (its sockets still answered: a directory left with `1.sock` in it)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


def _serving_a_certificate_copy(lab: LabLayout, tmp_path: Path, text: str) -> tuple[Gateway, Path, bytes]:
    """A gateway of `text` serving a copy of the lab's listener certificate chain, which a test may then half rewrite:
    the gateway, the copy and its whole bytes."""
    original = lab.pki_dir / "server-chain.pem"
    copy = tmp_path / original.name
    whole = original.read_bytes()
    copy.write_bytes(whole)
    return start_gateway(lab, tmp_path / "gw", text.replace(str(original), str(copy))), copy, whole


def _refused_or_failed(gw: Gateway) -> list[dict[str, Any]]:
    """The `worker_not_replaced` and `worker_failed_to_start` lines since `gw.mark()`, once there is one."""
    ends = ("worker_not_replaced", "worker_failed_to_start")
    return eventually(
        lambda: [e for e in gw.logs()[gw.since :] if e.get("event") in ends] or None, "the second replacement's end"
    )


def _listening_pids(gw: Gateway, count: int, timeout: float = WAIT) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [e["pid"] for e in gw.events("listening")]
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} workers listening: {gw.log_path.read_text()[-3000:]}")


async def _fresh_connections(lab: LabLayout, gw: Gateway, n: int, user: str = "alice") -> list[int]:
    """n requests of `user`, each on a new TLS connection, so the kernel places each anew."""
    statuses = []
    for _ in range(n):
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(gw.url + "/EWS/Exchange.asmx", ssl=client_context(lab, user)) as r,
        ):
            await r.read()
            statuses.append(r.status)
    return statuses


@pytest.fixture
def two_workers(lab: LabLayout, tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(lab, tmp_path / "gw", _with_workers(lab, free_port(), 2))
    yield gw
    gw.stop()


def test_two_workers_serve_requests_and_sigterm_stops_all(lab: LabLayout, two_workers: Gateway) -> None:
    """Two distinct worker processes, children of the supervisor, serve requests; SIGTERM stops all of them."""
    gw = two_workers
    workers = _listening_pids(gw, 2)
    assert len(set(workers)) == 2
    assert gw.proc.pid not in workers
    assert all(_parent(pid) == gw.proc.pid for pid in workers)

    assert asyncio.run(_fresh_connections(lab, gw, 24)) == [200] * 24
    served = {e["pid"] for e in gw.wait_events("request", 24)}  # each line follows its answer
    assert served == set(workers)  # 24 connections all on one worker: 1 chance in 2**23

    assert gw.stop() == 0
    assert not any(_alive(pid) for pid in workers)
    stopped = {e["worker"] for e in gw.events("worker_stopped")}
    assert stopped == set(workers)


def _overlays(pid: int) -> list[Path]:
    """The krb5.conf overlay files (proxy.kerberos.profile) that process `pid` wrote."""
    return sorted(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kcd-proxy-krb5-{pid}-*.conf"))


def test_each_worker_removes_its_krb5_overlay_when_it_stops(lab: LabLayout, two_workers: Gateway) -> None:
    """Each worker writes its own krb5.conf overlay and removes it on SIGTERM, though a worker ends by os._exit
    (no atexit handler): a gateway restarted by a service manager leaves no file behind per start."""
    gw = two_workers
    workers = _listening_pids(gw, 2)
    assert all(len(_overlays(pid)) == 1 for pid in workers)
    assert gw.stop() == 0
    assert [p for pid in workers for p in _overlays(pid)] == []


def test_a_worker_that_dies_is_replaced(lab: LabLayout, two_workers: Gateway) -> None:
    """A worker killed outright is replaced; the gateway keeps serving with two workers."""
    gw = two_workers
    first, second = _listening_pids(gw, 2)
    os.kill(first, signal.SIGKILL)
    pids = _listening_pids(gw, 3)
    assert pids[2] not in (first, second)
    assert _parent(pids[2]) == gw.proc.pid
    assert gw.wait_event("worker_exited", worker=first)["code"] == -signal.SIGKILL
    assert asyncio.run(_fresh_connections(lab, gw, 4)) == [200] * 4
    assert gw.proc.poll() is None


def test_sighup_reaches_every_worker_which_reloads_in_place(lab: LabLayout, two_workers: Gateway) -> None:
    """SIGHUP (systemd's ExecReload) to the supervisor: each worker reloads; none stops or is replaced."""
    gw = two_workers
    workers = _listening_pids(gw, 2)
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while {e["pid"] for e in gw.events("reloaded")} != set(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {e["pid"] for e in gw.events("reloaded")} == set(workers), gw.log_path.read_text()[-3000:]
    assert asyncio.run(_fresh_connections(lab, gw, 8)) == [200] * 8
    assert gw.proc.poll() is None
    assert all(_alive(pid) for pid in workers)
    assert gw.events("worker_exited") == []


def test_a_worker_replaced_after_a_reload_serves_the_reloaded_configuration(lab: LabLayout, tmp_path: Path) -> None:
    """A worker that dies after a SIGHUP reload is replaced by one serving what its siblings reloaded: it was
    forked with the configuration the supervisor read at start, so a route the reload retired (or a CA it no
    longer trusted, a CRL it added) came back on about half of the new connections. Keys a reload leaves for a
    restart (here the listener's address) stay as the gateway started with them, in every worker."""
    port = free_port()
    retired = '\n[[routes]]\nprefix = "/retired/"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path / "gw", _with_workers(lab, port, 2) + retired)
    try:
        first, second = _listening_pids(gw, 2)
        assert all("/retired/" in e["routes"] for e in gw.events("listening"))
        edited = tmp_path / "edited.toml"
        edited.write_text(_with_workers(lab, free_port(), 2))  # another port too: that one needs a restart
        edited.replace(gw.config_path)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            assert "/retired/" not in gw.wait_event("reloaded", pid=pid)["routes"]
        os.kill(first, signal.SIGKILL)
        replacement = _listening_pids(gw, 3)[2]
        listening = gw.wait_event("listening", pid=replacement)
        assert "/retired/" not in listening["routes"]
        assert listening["bind"] == f"127.0.0.1:{port}"
        assert gw.events("worker_configuration_refused") == []
        assert asyncio.run(_fresh_connections(lab, gw, 4)) == [200] * 4
    finally:
        gw.stop()


@pytest.mark.parametrize("broken", ["does-not-load", "does-not-build"])
def test_a_worker_replaced_while_the_file_is_broken_after_a_reload_serves_what_its_siblings_reloaded(
    lab: LabLayout, tmp_path: Path, broken: str
) -> None:
    """A reload retires a route (or a CA, or tightens `revocation`), then the file is caught half edited (no SIGHUP
    yet), or names a CRL file that does not parse, as a worker dies: the replacement refused the file and served the
    configuration the gateway started with, the retired route back on about half of the new connections beside a
    sibling that had retired it. It now serves the configuration its siblings last reloaded
    (`worker_configuration_refused` says which, `serves`)."""
    retired = '\n[[routes]]\nprefix = "/retired/"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path / "gw", _with_workers(lab, free_port(), 2) + retired)
    try:
        first, second = _listening_pids(gw, 2)
        reloaded = gw.config_path.read_text().replace(retired, "")
        gw.config_path.write_text(reloaded)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            assert "/retired/" not in gw.wait_event("reloaded", pid=pid)["routes"]
        if broken == "does-not-load":
            gw.config_path.write_text(reloaded + "\n[listener\n")  # an editor's save caught half way
        else:  # loads and passes the checks a replacement makes, but its build refuses the CRL file
            garbage = tmp_path / "garbage.crl"
            garbage.write_bytes(b"not a CRL")
            crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
            assert crls in reloaded
            gw.config_path.write_text(reloaded.replace(crls, f'crls = ["{lab.pki_dir / "crls.pem"}", "{garbage}"]'))
        os.kill(first, signal.SIGKILL)
        replacement = _listening_pids(gw, 3)[2]
        refused = gw.wait_event("worker_configuration_refused", pid=replacement)
        assert refused["config"] == str(gw.config_path)
        listening = gw.wait_event("listening", pid=replacement)
        assert "/retired/" not in listening["routes"], listening
        assert refused["serves"] == "reloaded", refused
        assert gw.events("worker_not_replaced") == []
    finally:
        gw.stop()


def test_a_worker_replaced_after_the_proxy_protocol_was_turned_off_believes_its_siblings_balancers(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Behind a balancer, a reload turning `proxy_protocol` off (a restart-only key: every worker still reads PROXY
    headers) keeps the balancers last in force; a worker replaced after it kept `proxy_protocol` as started but took
    the file's empty `trusted_proxies`, and so closed every connection the kernel gave it ('untrusted_peer') beside
    siblings serving them. The replacement believes the balancers its siblings believe."""
    port = free_port()
    balanced = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(balanced, gateway_port=port, behind_balancer=True)
    gw = start_gateway(
        lab, tmp_path / "gw", text.replace(f'bind = "127.0.0.1:{port}"\n', f'bind = "127.0.0.1:{port}"\nworkers = 2\n')
    )
    try:
        first, second = _listening_pids(gw, 2)
        started = config_module.load(gw.config_path)
        assert started.listener.proxy_protocol
        assert started.listener.workers == 2
        edited = tmp_path / "edited.toml"
        edited.write_text(_with_workers(lab, port, 2))  # no PROXY protocol: needs a restart
        edited.replace(gw.config_path)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            gw.wait_event("reloaded", pid=pid)
        assert {e["key"] for e in gw.events("reload_needs_restart")} >= {"listener.proxy_protocol"}
        served = replacement_config(started)  # what a replacement serves, read in this process
        assert served.listener.proxy_protocol
        assert served.listener.trusted_proxies == started.listener.trusted_proxies
        os.kill(first, signal.SIGKILL)
        replacement = _listening_pids(gw, 3)[2]
        gw.wait_event("listening", pid=replacement)
        statuses = [_through_balancer(lab, gw) for _ in range(8)]  # the kernel spreads them over both workers
        assert statuses == [200] * 8, gw.events("proxy_header_refused")
        assert gw.events("proxy_header_refused") == []
    finally:
        gw.stop()


def _through_balancer(lab: LabLayout, gw: Gateway) -> int | str:
    """One request on a new connection from 127.0.0.1 as a balancer passes it on (a PROXY v1 header, then TLS); the
    status, or the error of a connection the gateway closed."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    try:
        raw.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 443\r\n")
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        raw.close()


def test_a_worker_replaced_while_the_file_is_broken_serves_and_says_so(lab: LabLayout, tmp_path: Path) -> None:
    """A worker that dies while the configuration file does not load (a half-edited file) is still replaced: the
    replacement serves the configuration the gateway started with and logs `worker_configuration_refused` with
    the problem (the supervisor is never stopped by it); once the file is fixed a SIGHUP reloads every worker."""
    gw = start_gateway(lab, tmp_path / "gw", _with_workers(lab, free_port(), 2))
    try:
        first, second = _listening_pids(gw, 2)
        good = gw.config_path.read_text()
        gw.config_path.write_text(good + "\n[listener\n")
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _listening_pids(gw, 3)[2]
        refused = gw.wait_event("worker_configuration_refused", pid=replacement)
        assert refused["problems"]
        assert refused["config"] == str(gw.config_path)
        assert asyncio.run(_fresh_connections(lab, gw, 4)) == [200] * 4
        gw.config_path.write_text(good)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (second, replacement):
            gw.wait_event("reloaded", pid=pid)
        assert gw.proc.poll() is None
    finally:
        gw.stop()


def test_a_worker_replaced_while_the_file_does_not_build_is_not_started_and_the_gateway_stays(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A file that loads and passes the cross-checks a replacement makes but does not build (here a CRL file that does
    not parse: check-config's CRL part is a reload's to skip) is refused by the reload, and the workers keep serving;
    a worker replaced then failed to start on it within MIN_UPTIME, and the supervisor stopped the whole gateway. Its
    replacement then served the configuration the gateway started with, which may be older than its siblings' (they
    cannot be told apart from siblings that took the file before it went bad). While a sibling serves, the replacement
    is now not started (`worker_not_replaced`, naming the file), and the gateway stays; once the file builds again, a
    replacement serves it."""
    port = free_port()
    gw = start_gateway(lab, tmp_path / "gw", _with_workers(lab, port, 2))
    try:
        first, second = _listening_pids(gw, 2)
        garbage = tmp_path / "garbage.crl"
        garbage.write_bytes(b"not a CRL")
        crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
        text = gw.config_path.read_text()
        assert crls in text
        gw.config_path.write_text(text.replace(crls, f'crls = ["{lab.pki_dir / "crls.pem"}", "{garbage}"]'))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            gw.wait_event("reload_refused", pid=pid)
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert any(str(garbage) in problem for problem in refused["problems"]), refused
        assert asyncio.run(_fresh_connections(lab, gw, 4)) == [200] * 4
        assert gw.events("worker_configuration_refused") == []
        gw.config_path.write_text(text)
        _replacement(gw, first, second)
        assert gw.events("worker_failed_to_start") == []
        assert gw.proc.poll() is None
    finally:
        gw.stop()


def _revoked_on_each(lab: LabLayout, gw: Gateway, workers: set[int], user: str = "carol") -> None:
    """New connections of `user` (whose certificate a CRL revokes) until each of `workers` has refused one: each 403."""
    cert = x509.load_pem_x509_certificate((lab.pki_dir / "users" / f"{user}.pem").read_bytes())
    subject = cert.subject.rfc4514_string()
    served: set[int] = set()
    deadline = time.monotonic() + WAIT
    while served != workers:  # the kernel places each new connection anew
        assert asyncio.run(_fresh_connections(lab, gw, 1, user)) == [403], served
        served = {e["pid"] for e in gw.events("request", gw.since) if e.get("cert_subject") == subject}
        assert served <= workers, served
        assert time.monotonic() < deadline, f"only {served} answered"


def _carol_revoked(lab: LabLayout, tmp_path: Path) -> tuple[Path, Path]:
    """The issuing CA's CRL revoking carol (number 3001) and the root's, in files of the test's own."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    crl = write_crl(tmp_path / "issuing.crl", issuing, revoked=[carol.serial_number], number=3001)
    return crl, write_crl(tmp_path / "root.crl", root)


def _best_effort_with(lab: LabLayout, crls: list[Path], extra: str = "") -> str:
    """Two workers, `revocation = "best-effort"`, the CRL files `crls` in place of the lab's."""
    text = _with_workers(lab, free_port(), 2)
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    require = 'revocation = "require"'
    assert lab_crls in text
    assert require in text
    named = ", ".join(f'"{path}"' for path in crls)
    return text.replace(lab_crls, f"crls = [{named}]").replace(require, 'revocation = "best-effort"') + extra


def _spoil(crl: Path, how: str) -> bytes:
    """The CRL file grown past `MAX_CRL_BYTES` (sparse zeros) or caught half rewritten by its publisher; returns what
    it held."""
    whole = crl.read_bytes()
    with crl.open("r+b") as f:
        f.truncate(MAX_CRL_BYTES + 1 if how == "over-the-limit" else len(whole) // 2)
    return whole


@pytest.mark.parametrize("gone_bad", ["over-the-limit", "half-rewritten"])
def test_a_replacement_that_cannot_read_a_crl_file_its_siblings_use_is_not_started(
    lab: LabLayout, tmp_path: Path, gone_bad: str
) -> None:
    """Under best-effort, the issuing CA's CRL file (revoking carol) grows past `MAX_CRL_BYTES` or is caught half
    rewritten, and a worker dies: its replacement served without the file's CRLs (`crl_not_used`) and so served carol,
    whom its sibling, keeping its last CRLs, refused: 200 or 403 by the kernel's pick. While a sibling serves, such a
    replacement is now not started: `worker_not_replaced` names the file, carol is refused on every connection, and once
    the file is whole a replacement serves with it."""
    crl, root_crl = _carol_revoked(lab, tmp_path)
    gw = start_gateway(lab, tmp_path / "gw", _best_effort_with(lab, [crl, root_crl]))
    try:
        first, second = _listening_pids(gw, 2)
        whole = _spoil(crl, gone_bad)
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert any(str(crl) in problem for problem in refused["problems"]), refused
        assert refused["serving"] == 1, refused
        assert asyncio.run(_fresh_connections(lab, gw, 6, "carol")) == [403] * 6
        assert {e["pid"] for e in gw.events("listening", gw.since)} == set()
        crl.write_bytes(whole)
        replacement = _replacement(gw, first, second)
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
        assert gw.events("worker_failed_to_start") == []
        assert gw.proc.poll() is None
    finally:
        gw.stop()


def test_a_replacement_with_no_sibling_serving_serves_without_the_crl_file_it_cannot_read(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Both workers die while the issuing CA's CRL file is caught half rewritten: a replacement with no sibling serving
    is not held back by it (nothing would serve) but serves as the revocation mode says for a source it cannot read
    (`crl_not_used`, naming the file), as before; the gateway stays."""
    crl, root_crl = _carol_revoked(lab, tmp_path)
    gw = start_gateway(lab, tmp_path / "gw", _best_effort_with(lab, [crl, root_crl]))
    try:
        first, second = _listening_pids(gw, 2)
        _spoil(crl, "half-rewritten")
        gw.mark()
        os.kill(first, signal.SIGKILL)
        os.kill(second, signal.SIGKILL)
        replacement = _replacement(gw, first, second)
        unused = gw.wait_event("crl_not_used", pid=replacement["pid"])
        assert str(crl) in unused["problem"], unused
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2
        assert gw.events("worker_failed_to_start") == []
        assert gw.proc.poll() is None
    finally:
        gw.stop()


def test_a_replacement_whose_reloaded_crl_file_has_gone_bad_never_serves_the_started_configuration(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Started best-effort with the root's CRL only and a route `/retired/`; a reload adds the issuing CA's CRL file
    (revoking carol), tightens `revocation` to "require" and retires the route; the file is then caught half rewritten
    and a worker dies. The replacement refused the reloaded configuration over the file and fell back to the started
    one: best-effort, without the file, with `/retired/` (older than its sibling's on each count), and served carol.
    It is now not started while its sibling serves (`worker_not_replaced`, naming the file); once the file is whole a
    replacement serves the reloaded configuration."""
    crl, root_crl = _carol_revoked(lab, tmp_path)
    retired = '\n[[routes]]\nprefix = "/retired/"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path / "gw", _best_effort_with(lab, [root_crl], retired))
    try:
        first, second = _listening_pids(gw, 2)
        reloaded = gw.config_path.read_text().replace(retired, "").replace('"best-effort"', '"require"')
        gw.config_path.write_text(reloaded.replace(f'crls = ["{root_crl}"]', f'crls = ["{crl}", "{root_crl}"]'))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            assert "/retired/" not in gw.wait_event("reloaded", pid=pid)["routes"]
        whole = _spoil(crl, "half-rewritten")
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert any(str(crl) in problem for problem in refused["problems"]), refused
        assert asyncio.run(_fresh_connections(lab, gw, 6, "carol")) == [403] * 6
        assert gw.events("worker_configuration_refused") == []
        assert {e["pid"] for e in gw.events("listening", gw.since)} == set()
        crl.write_bytes(whole)
        replacement = _replacement(gw, first, second)
        assert "/retired/" not in replacement["routes"]
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
    finally:
        gw.stop()


@pytest.mark.parametrize("half", ["trust_anchors", "listener.certificate"])
def test_a_replacement_refusing_a_half_rewritten_file_leaves_its_sibling_serving(
    lab: LabLayout, tmp_path: Path, half: str
) -> None:
    """The trust anchors or the listener's certificate the gateway started with, caught half rewritten when a worker
    is replaced: the replacement refused the file as a start does, within MIN_UPTIME, and the supervisor stopped the
    whole gateway (`worker_failed_to_start`) though its sibling served with what it had loaded. The sibling now
    serves on, the supervisor names the fix (`worker_not_replaced`) and tries again, and once the file is whole
    again a replacement listens."""
    text = _with_workers(lab, free_port(), 2)
    original = lab.pki_dir / ("root.pem" if half == "trust_anchors" else "server-chain.pem")
    assert str(original) in text, (original, text)
    copy = tmp_path / original.name
    whole = original.read_bytes()
    copy.write_bytes(whole)
    gw = start_gateway(lab, tmp_path / "gw", text.replace(str(original), str(copy)))
    try:
        first, second = _listening_pids(gw, 2)
        copy.write_bytes(whole[: len(whole) // 2])  # a publisher caught half way through writing it in place
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert "write it whole" in refused["fix"], refused
        assert refused["serving"] == 1, refused
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2  # the sibling, with what it loaded
        assert gw.events("worker_failed_to_start") == []
        assert gw.proc.poll() is None
        copy.write_bytes(whole)
        replacement = _replacement(gw, first, second)
        assert _alive(second), replacement
    finally:
        gw.stop()


def test_the_last_serving_worker_dying_while_a_replacement_is_retried_stops_the_gateway(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A replacement in retry (`worker_not_replaced`, the listener's certificate half rewritten), then its serving
    sibling killed: the sibling's replacement fails as well and nothing serves. The supervisor counted any live
    worker as serving (a replacement still starting too) and measured a worker's uptime when it reaped it, after its
    retry pause, so it retried for ever with no worker listening. It now stops as when the last serving worker fails
    to start (`worker_failed_to_start`, the worker's code), and no worker is left."""
    text = _with_workers(lab, free_port(), 2)
    gw, copy, whole = _serving_a_certificate_copy(lab, tmp_path, text)
    try:
        first, second = _listening_pids(gw, 2)
        copy.write_bytes(whole[: len(whole) // 2])
        gw.mark()
        os.kill(first, signal.SIGKILL)
        gw.wait_event("worker_not_replaced")
        os.kill(second, signal.SIGKILL)
        try:
            code = gw.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the supervisor runs on with no worker serving: {[e['event'] for e in gw.logs()[-12:]]}"
            ) from None
        assert code == 2, code
        failed = gw.events("worker_failed_to_start")
        assert len(failed) == 1, failed
        assert gw.events("supervisor_stopped")
        started = [e["worker"] for e in gw.events("worker_started")]
        assert not [pid for pid in started if _alive(pid)], started
    finally:
        gw.stop()


def test_a_replacement_listening_for_less_than_min_uptime_serves_on_when_its_sibling_dies(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A worker SIGKILLed and replaced, then its sibling SIGKILLed as soon as the replacement listens, the listener's
    certificate half rewritten in between: the supervisor counted a replacement as serving only past MIN_UPTIME, so
    the sibling's replacement was forked as a lone one, failed on the file, and the gateway stopped
    (`worker_failed_to_start`, exit 2) while the first replacement served. A replacement counts once it listens: the
    second refuses beside it (`worker_not_replaced`, serving 1), the gateway runs on and devices are served."""
    text = _with_workers(lab, free_port(), 2)
    gw, copy, whole = _serving_a_certificate_copy(lab, tmp_path, text)
    try:
        first, second = _listening_pids(gw, 2)
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(gw, first, second)
        copy.write_bytes(whole[: len(whole) // 2])
        os.kill(second, signal.SIGKILL)
        ended = _refused_or_failed(gw)
        assert [e["event"] for e in ended][:1] == ["worker_not_replaced"], [e["event"] for e in gw.logs()[-12:]]
        assert ended[0]["serving"] == 1, ended
        assert gw.proc.poll() is None
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2  # the first replacement, with what it loaded
        assert _alive(replacement["pid"])
    finally:
        gw.stop()


def test_a_lone_replacement_failing_while_another_still_starts_does_not_stop_the_gateway(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A worker SIGKILLed, its replacement held in its first CRL fetch (a distribution point that does not answer yet),
    then the listener's certificate half rewritten and the other worker SIGKILLed: its replacement, with none beside
    it, fails on the file. The supervisor stopped the gateway there (nothing listened at that moment), killing the
    replacement about to serve with what it had read whole. It now waits for that one (`worker_not_replaced`,
    `serving` 0, `starting` 1) and retries; once it listens the gateway serves, and the retry refuses beside it."""
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    crl = write_crl(tmp_path / "3001.crl", issuing, number=3001).read_bytes()
    holding, held, release = threading.Event(), threading.Event(), threading.Event()

    def answer(_path: str, _headers: Message) -> tuple[int, bytes]:
        if holding.is_set():
            held.set()
            release.wait(WAIT)
        return 200, crl

    server = _CrlServer(answer)
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    root_crl = write_crl(tmp_path / "root.crl", root)
    text = _best_effort_with(lab, [root_crl]).replace(f'crls = ["{root_crl}"]', f'crls = ["{url}", "{root_crl}"]')
    gw, copy, whole = _serving_a_certificate_copy(lab, tmp_path, text)
    try:
        first, second = _listening_pids(gw, 2)
        holding.set()
        gw.mark()
        os.kill(first, signal.SIGKILL)
        eventually(held.is_set, "the replacement's CRL fetch, held")
        copy.write_bytes(whole[: len(whole) // 2])
        os.kill(second, signal.SIGKILL)
        ended = _refused_or_failed(gw)
        assert [e["event"] for e in ended][:1] == ["worker_not_replaced"], [e["event"] for e in gw.logs()[-12:]]
        assert (ended[0]["serving"], ended[0]["starting"]) == (0, 1), ended
        assert gw.proc.poll() is None
        holding.clear()
        release.set()
        replacement = _replacement(gw, first, second)
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2
        gw.wait_event("worker_not_replaced", serving=1)  # the retry, beside the one that listens now
        copy.write_bytes(whole)
        gw.wait_for("listening", lambda e: e.get("pid") not in (first, second, replacement["pid"]), what="the retry")
    finally:
        release.set()
        gw.stop()
        server.close()


def test_a_sighup_while_the_workers_start_reaches_them_all(lab: LabLayout, tmp_path: Path) -> None:
    """systemd's ExecReload (or a configuration tool) right after a start: SIGHUP reached workers still starting,
    which ignored it until their reload handler was in place, and served the configuration read before the edit
    beside siblings that had reloaded it. A worker now remembers a SIGHUP that came while it started and reloads
    once it serves: every worker ends up serving the edited file. (Reloading before it served, a worker's start-up
    awaited the first CRL fetch of the gateway the reload retired and closed, died of CancelledError, and the
    supervisor stopped them all.)"""
    port = free_port()
    retired = '\n[[routes]]\nprefix = "/retired/"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'
    config = tmp_path / "gw" / "gateway.toml"
    config.parent.mkdir()
    config.write_text(_with_workers(lab, port, 2) + retired)
    log = tmp_path / "gw" / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **lab.env()},
        )
    try:

        def lines(event: str) -> list[dict[str, Any]]:
            found = []
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    if (record := json.loads(line)).get("event") == event:
                        found.append(record)
            return found

        workers = eventually(lambda: [e["worker"] for e in lines("worker_started")] or None, "a worker forked")
        edited = tmp_path / "edited.toml"
        edited.write_text(_with_workers(lab, port, 2))
        edited.replace(config)
        proc.send_signal(signal.SIGHUP)  # the first worker was forked a moment ago: it is still starting

        def serving_the_edit() -> bool:
            assert proc.poll() is None, f"the gateway ended ({proc.returncode})"  # a worker crashed: it stops them all
            started = [e["worker"] for e in lines("worker_started")]
            if len(started) < 2 or len(lines("listening")) < 2:
                return False
            latest: dict[int, list[str]] = {}  # a worker's routes: its last `listening` or `reloaded` line's
            for record in whole_json_lines(log):
                if record.get("event") in ("listening", "reloaded"):
                    latest[record["pid"]] = record["routes"]
            return all("/retired/" not in latest.get(pid, ["/retired/"]) for pid in started)

        try:
            eventually(serving_the_edit, "every worker serving the edited file")
        except AssertionError as e:  # raised before an assert message would be built: the log's tail says why
            raise AssertionError(f"{e}\n{log.read_text(errors='replace')[-6000:]}") from None
        assert workers
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_workers_do_not_outlive_a_killed_supervisor(lab: LabLayout, two_workers: Gateway) -> None:
    """SIGKILL to the supervisor (which it cannot pass on): the workers stop too, the port is free again."""
    gw = two_workers
    workers = _listening_pids(gw, 2)
    gw.proc.kill()
    gw.proc.wait()
    deadline = time.monotonic() + WAIT
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [pid for pid in workers if _alive(pid)]
    for pid in orphans:  # leave nothing running, even when this fails
        os.kill(pid, signal.SIGKILL)
    assert orphans == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", gw.port))  # nothing holds the port any more


def test_a_second_gateway_on_a_served_port_refuses_to_start(lab: LabLayout, two_workers: Gateway) -> None:
    """SO_REUSEPORT would let it share the port silently: the supervisor's check refuses instead."""
    done = _run(lab, two_workers.config_path, timeout=30)
    assert done.returncode == 2
    assert f"cannot serve: 127.0.0.1:{two_workers.port}: Address already in use" in done.stderr


def test_a_second_gateway_with_workers_on_a_served_port_names_the_key_the_file_and_the_fix(
    lab: LabLayout, two_workers: Gateway
) -> None:
    """The same gateway started twice (several workers): its refusal names `listener.bind`, the configuration file and
    what to do, as a lone gateway's does; it said only "cannot serve: 127.0.0.1:PORT: Address already in use"."""
    done = _run(lab, two_workers.config_path, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("cannot serve: "))
    assert f"127.0.0.1:{two_workers.port}: Address already in use" in line
    assert f"(in {two_workers.config_path})" in line
    assert "stop it, or give listener.bind another port" in line


def test_a_lone_gateway_on_a_taken_port_names_listener_bind(lab: LabLayout, tmp_path: Path) -> None:
    """One worker (no supervisor) whose address is taken: exit 2 and one line naming `listener.bind`, the address
    and why, as `admin.bind` does; never an uncaught exception's traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.toml"
        config.write_text(lab_config(lab, port=port))
        done = _run(lab, config, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    wanted = f"configuration error: listener.bind: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert wanted in done.stderr
    assert "stop it, or give listener.bind another port" in done.stderr  # what to do, as with workers
    assert "Traceback" not in done.stdout + done.stderr


def test_a_lone_gateway_on_a_taken_admin_port_says_why_and_what_to_do(lab: LabLayout, tmp_path: Path) -> None:
    """One worker whose `[admin] bind` is taken: the line names `admin.bind`, the system's reason and what to do, as
    `listener.bind`'s does; it said asyncio's "error while attempting to bind on address ('127.0.0.1', N): address
    already in use" and no fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "gateway.toml"
        config.write_text(lab_config(lab, port=free_port()) + f'\n[admin]\nbind = "127.0.0.1:{port}"\n')
        done = _run(lab, config, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    wanted = (
        f"configuration error: admin.bind: cannot listen on 127.0.0.1:{port}: Address already in use: something "
        "listens there already (this gateway started before?): stop it, or give admin.bind another port (in "
    )
    assert wanted in done.stderr, done.stderr


_UNBINDABLE = {
    # an address no interface has (TEST-NET-1: copied from another machine's configuration)
    "192.0.2.1": (
        "Cannot assign requested address",
        "no interface of this machine has that address: give listener.bind one of its addresses",
    ),
    # a host name the resolver does not know (the certificate's name, say, where no DNS has it)
    "gateway.invalid": (
        "Name or service not known",
        "the host name does not resolve on this machine: give listener.bind one of its IP addresses",
    ),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("host", list(_UNBINDABLE))
def test_a_bind_this_machine_cannot_take_is_named_as_such(
    lab: LabLayout, tmp_path: Path, host: str, workers: int
) -> None:
    """`listener.bind` on an address no interface has, or on a host name that does not resolve: the line gives the
    reason and what to do. One worker said only the system's reason ("Cannot assign requested address", "Name or
    service not known"); with workers the supervisor said "something listens there already (this gateway started
    before?)", which is wrong."""
    reason, fix = _UNBINDABLE[host]
    config = tmp_path / "gateway.toml"
    port = free_port()
    text = _with_workers(lab, port, workers) if workers > 1 else lab_config(lab, port=port)
    config.write_text(text.replace(f'bind = "127.0.0.1:{port}"', f'bind = "{host}:{port}"'))
    done = _run(lab, config, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{host}:{port}: {reason}" in done.stderr, done.stderr
    assert fix in done.stderr, done.stderr
    assert "something listens there" not in done.stderr


def test_a_port_below_1024_without_cap_net_bind_service_says_what_to_grant(lab: LabLayout, tmp_path: Path) -> None:
    """`listener.bind` on port 443 started without CAP_NET_BIND_SERVICE (as a user of its own without the systemd
    unit's grant; here root with the capability dropped by `setpriv`): the line names the capability; it said only
    "Permission denied"."""
    port = next(p for p in range(1023, 900, -1) if _bindable(p))
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=port))
    drop = ["setpriv", "--inh-caps=-net_bind_service", "--bounding-set=-net_bind_service"] if os.geteuid() == 0 else []
    done = subprocess.run(
        [*drop, sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **lab.env()},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"listener.bind: cannot listen on 127.0.0.1:{port}: Permission denied: " in done.stderr, done.stderr
    assert "CAP_NET_BIND_SERVICE" in done.stderr


def _bindable(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (a probe bind, closed at once)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_an_admin_listener_on_the_workers_port_is_refused_before_any_starts(lab: LabLayout, tmp_path: Path) -> None:
    """`[admin] bind` copied from `listener.bind` with two workers: both sockets took SO_REUSEPORT and the kernel
    gave about half of the devices' connections to the plain-HTTP admin listener (their TLS failed; `/traces`
    answered on the device port). The configuration is refused, naming both keys, before a worker starts."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(_with_workers(lab, port, 2) + f'\n[admin]\nbind = "127.0.0.1:{port}"\n')
    done = _run(lab, config, timeout=60)
    assert done.returncode != 0, done.stdout + done.stderr
    assert f"admin.bind: 127.0.0.1:{port} takes connections meant for listener.bind" in done.stderr
    assert "worker_started" not in done.stdout


def test_a_second_gateway_on_a_served_admin_port_refuses_to_start(lab: LabLayout, tmp_path: Path) -> None:
    """Two gateways with several workers each, the second given the first one's admin port by mistake: SO_REUSEPORT
    let the second's workers share it silently, and each scrape or `/readyz` probe reached either gateway (one's
    readiness answered by the other). The supervisor checks the admin port as it checks the listener's."""
    admin_port = free_port()
    admin = f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    first = start_gateway(lab, tmp_path / "first", _with_workers(lab, free_port(), 2) + admin)
    try:
        config = tmp_path / "second.toml"
        config.write_text(_with_workers(lab, free_port(), 2) + f'\n[admin]\nbind = "{first.admin}"\n')  # as started
        done = _run(lab, config, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"cannot serve: admin.bind {first.admin}: Address already in use" in done.stderr
        assert "worker_started" not in done.stdout
    finally:
        first.stop()


def test_workers_that_cannot_start_stop_the_supervisor(lab: LabLayout, tmp_path: Path) -> None:
    """A configuration every worker fails on (a private key that is not one) ends the supervisor, no loop."""
    bad_key = tmp_path / "server.key"
    bad_key.write_text("not a key\n")
    config = tmp_path / "gateway.toml"
    config.write_text(_with_workers(lab, free_port(), 2).replace(str(lab.pki_dir / "server.key"), str(bad_key)))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **lab.env()},
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert time.monotonic() - started < 20
    assert "worker_failed_to_start" in done.stdout


def _run(lab: LabLayout, config: Path, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """`kcd-proxy run` on `config` as a process of its own, until it exits (these configurations never serve)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **lab.env()},
    )


def _scrape(url: str) -> str:
    """One GET on a new connection (so the kernel places each on either worker's admin socket)."""
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310  loopback
        return str(r.read().decode())


def _samples(text: str, name: str) -> dict[str, float]:
    """The samples of metric `name` in a Prometheus text exposition, by their label text."""
    out = {}
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head.startswith(name + "{"):
            out[head[len(name) :]] = float(value)
    return out


@pytest.fixture
def two_workers_admin(lab: LabLayout, tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    admin = free_port()
    text = _with_workers(lab, free_port(), 2) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw = start_gateway(lab, tmp_path / "gw", text)
    yield gw, f"http://127.0.0.1:{admin}"
    gw.stop()


def test_metrics_and_traces_count_every_worker(lab: LabLayout, two_workers_admin: tuple[Gateway, str]) -> None:
    """With two workers each scrape of `/metrics` has every worker's figures, each with a `worker` label, and
    `/traces` every worker's requests, whichever worker the kernel gave the scrape: before, each answer came from
    one worker only, and a scrape missed the other's requests."""
    gw, admin = two_workers_admin
    workers = _listening_pids(gw, 2)
    assert asyncio.run(_fresh_connections(lab, gw, 16)) == [200] * 16
    served = gw.wait_events("request", 16)
    assert {e["pid"] for e in served} == set(workers)  # both served some: 1 chance in 2**15 otherwise
    ids = {e["request_id"] for e in served}
    for _ in range(8):
        text = _scrape(admin + "/metrics")
        requests = _samples(text, "kcd_requests_total")
        assert sum(requests.values()) == 16, text
        assert {label.split('worker="')[1].split('"')[0] for label in requests} == {"1", "2"}, requests
        assert text.count("# TYPE kcd_requests_total counter") == 1
        records = json.loads(_scrape(admin + "/traces?limit=100"))
        assert {r["id"] for r in records} == ids
        times = [r["time"] for r in records]
        assert times == sorted(times, reverse=True)  # newest first, across workers
        assert {r["worker"] for r in records} == {1, 2}
        assert json.loads(_scrape(admin + "/traces?limit=3"))[0]["id"] == records[0]["id"]
    for trace_id in ids:  # one trace by id, whichever worker holds it
        assert json.loads(_scrape(f"{admin}/traces/{trace_id}"))["id"] == trace_id


def test_a_replaced_worker_answers_under_the_number_it_replaced(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """A worker killed outright is replaced under its number (series stay `worker="1"` and `"2"`, never a third);
    once the replacement listens, every scrape has both; the supervisor's socket directory goes when it stops."""
    gw, admin = two_workers_admin
    first, _ = _listening_pids(gw, 2)
    sockets = {Path(e["siblings"]) for e in gw.wait_events("admin_listening", 2)}
    assert {s.name for s in sockets} == {"1.sock", "2.sock"}
    assert all(s.exists() for s in sockets)
    os.kill(first, signal.SIGKILL)
    replacement = _listening_pids(gw, 3)[2]
    gw.wait_for("admin_listening", lambda e: e["pid"] == replacement)
    for _ in range(8):
        text = _scrape(admin + "/metrics")
        assert "did not answer" not in text, text
        in_flight = _samples(text, "kcd_requests_in_flight")
        assert set(in_flight) == {'{worker="1"}', '{worker="2"}'}, in_flight
    assert gw.stop() == 0
    assert not any(s.parent.exists() for s in sockets)


def test_readyz_answers_within_a_second_while_a_sibling_hangs(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """One worker stopped (SIGSTOP): a /readyz the other worker takes answers within 1 s (kubelet's default probe
    timeout), not after the 5 s a sibling had: with room itself it asks no sibling (review37), so the body names none
    unanswered (a full worker asks for READY_ASK_TIMEOUT at most: tests/unit/test_siblings.py). A probe the kernel gave
    the stopped worker's own admin socket gets nothing, as from any hung process: it is asked again on a new
    connection."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    listening = gw.wait_events("admin_listening", 2)
    number = {e["pid"]: int(Path(e["siblings"]).stem) for e in listening}
    stopped = next(iter(number))
    assert json.loads(_scrape(admin + "/readyz"))["ready"] is True  # the KDC's answer cached: not in the timing
    os.kill(stopped, signal.SIGSTOP)
    try:
        deadline, answers = time.monotonic() + WAIT, list[tuple[float, int, dict[str, Any]]]()
        while len(answers) < 3 and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                with urllib.request.urlopen(admin + "/readyz", timeout=2) as r:  # noqa: S310  loopback
                    answers.append((time.monotonic() - start, r.status, json.loads(r.read())))
            except (TimeoutError, urllib.error.URLError):
                continue  # the stopped worker's socket, or (before the bound) the live one waiting for it
        assert len(answers) == 3, f"no /readyz answer within 2 s while worker {number[stopped]} is stopped"
        for took, status, body in answers:
            assert took < 1.0, (took, body)
            assert (status, body["ready"]) == (200, True), body
            assert "unanswered" not in body, body
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert "unanswered" not in json.loads(_scrape(admin + "/readyz"))


def test_a_worker_not_replaced_is_counted_in_metrics_and_readyz_until_it_is(lab: LabLayout, tmp_path: Path) -> None:
    """A worker killed while the listener's certificate is half rewritten is not replaced (`worker_not_replaced`,
    retried every 5 s) and the gateway serves one worker short: only the log said so. `/metrics` now has
    `kcd_workers_configured 2` and `kcd_workers_serving 1` (no `worker` label: the gateway's, not a worker's), and
    `/readyz` stays 200 with a `workers` key naming 1 of 2; once the file is whole, the count is back to 2 and the key
    gone."""
    admin = free_port()
    text = _with_workers(lab, free_port(), 2) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw, copy, whole = _serving_a_certificate_copy(lab, tmp_path, text)
    url = f"http://127.0.0.1:{admin}"
    try:
        first, second = _listening_pids(gw, 2)
        number = {e["pid"]: int(Path(e["siblings"]).stem) for e in gw.wait_events("admin_listening", 2)}
        scraped = _scrape(url + "/metrics")
        assert _samples(scraped, "kcd_workers_configured") == {"": 2}, scraped
        assert _samples(scraped, "kcd_workers_serving") == {"": 2}, scraped
        assert "workers" not in json.loads(_scrape(url + "/readyz"))
        copy.write_bytes(whole[: len(whole) // 2])  # a publisher caught half way through writing it in place
        gw.mark()
        os.kill(first, signal.SIGKILL)
        gw.wait_event("worker_not_replaced")

        def serving(count: int) -> str | None:
            text = _scrape(url + "/metrics")
            return text if _samples(text, "kcd_workers_serving") == {"": count} else None

        scraped = eventually(lambda: serving(1), "kcd_workers_serving 1")
        assert _samples(scraped, "kcd_workers_configured") == {"": 2}, scraped
        with urllib.request.urlopen(url + "/readyz", timeout=30) as r:  # noqa: S310  loopback
            status, body = r.status, json.loads(r.read())
        assert (status, body["ready"]) == (200, True), body  # degraded, not out of the balancer
        assert body["workers"].startswith("1 of 2 workers serve"), body
        assert f"(worker {number[first]} not" in body["workers"], body
        copy.write_bytes(whole)
        eventually(lambda: serving(2), "kcd_workers_serving 2 once the file is whole")
        assert _alive(second)
        for _ in range(4):  # whichever worker the kernel gives the probe
            assert "workers" not in json.loads(_scrape(url + "/readyz"))
    finally:
        gw.stop()


def _readyz(url: str) -> dict[str, Any] | None:
    """One /readyz on a new connection; None when the kernel gave it a worker that does not answer (stopped) or is not
    ready (stopping: 503)."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:  # noqa: S310  loopback
            return dict(json.loads(r.read()))
    except (TimeoutError, urllib.error.URLError):
        return None


def test_a_stopped_worker_is_not_counted_as_serving_until_it_is_continued(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """A worker stopped (SIGSTOP) serves nothing while the kernel still gives its socket part of the new connections:
    `/readyz` (still 200) names it in `workers`, "1 of 2 workers serve (worker N stopped ...)", and once it is
    continued (SIGCONT) the key is gone. It was counted as serving: alive was all the supervisor looked at."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    number = {e["pid"]: int(Path(e["siblings"]).stem) for e in gw.wait_events("admin_listening", 2)}
    stopped = next(iter(number))
    os.kill(stopped, signal.SIGSTOP)
    try:

        def short() -> dict[str, Any] | None:
            body = _readyz(admin)
            return body if body is not None and "workers" in body else None

        # each poll the kernel gives the stopped worker costs _readyz's 2 s: 30 s, for a loaded machine
        body = eventually(short, "a workers key while a worker is stopped", timeout=30)
        assert body["ready"] is True, body  # degraded, not out of the balancer
        assert body["workers"].startswith("1 of 2 workers serve"), body
        assert f"worker {number[stopped]} stopped" in body["workers"], body
    finally:
        os.kill(stopped, signal.SIGCONT)

    def whole() -> bool:
        return all((body := _readyz(admin)) is not None and "workers" not in body for _ in range(4))

    eventually(whole, "no workers key once the worker is continued", timeout=30)


def test_a_gateway_with_a_stopped_worker_stops_on_sigterm(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """SIGTERM to the supervisor while a worker is stopped (SIGSTOP): the gateway stops (exit 0) and no worker is left.
    The stopped worker never acted on the SIGTERM passed on to it (its handler runs only once it is continued), and the
    supervisor waited for it for ever, past a unit's TimeoutStopSec (systemd's KillMode=mixed, ours, signals the
    supervisor alone, so no SIGCONT reached the worker); the supervisor now sends SIGCONT after it, as systemd does."""
    gw, _ = two_workers_admin
    first, second = _listening_pids(gw, 2)
    os.kill(first, signal.SIGSTOP)
    gw.proc.send_signal(signal.SIGTERM)
    try:
        assert gw.proc.wait(timeout=20) == 0
    except subprocess.TimeoutExpired:
        os.kill(first, signal.SIGCONT)
        raise AssertionError("the supervisor still waits for the stopped worker 20 s after SIGTERM") from None
    assert not _alive(first)
    assert not _alive(second)


def _six_held(lab: LabLayout, gw: Gateway, admin: str, path: str) -> list[Held]:
    """Six requests for `path` sent, once the workers' metrics count all six in flight."""
    held = [_send(lab, gw.port, path) for _ in range(6)]
    eventually(
        lambda: sum(_samples(_scrape(admin + "/metrics"), "kcd_requests_in_flight").values()) == len(held),
        "six requests held",
    )
    return held


def test_one_signal_to_the_supervisor_and_its_workers_drains_them_not_cuts_them(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """SIGINT to the supervisor and to every worker at once (Ctrl-C in a terminal signals the process group, systemd's
    default KillMode=control-group every process): the supervisor passes it on, so each worker got it twice, and the
    second, coming once its drain had begun, cut its requests in flight (`second_signal`): 1 Ctrl-C in 4 with requests
    held, measured here, and every time the supervisor is late (held stopped here until the workers stop). The copy
    the supervisor passes on is now a signal of its own (`PASSED_ON`), one of each kind the same stop, however late:
    the held requests are answered, the drain finishes."""
    gw, admin = two_workers_admin
    workers = _listening_pids(gw, 2)
    held = _six_held(lab, gw, admin, "/EWS/Exchange.asmx?hold=8")
    gw.mark()
    os.kill(gw.proc.pid, signal.SIGSTOP)  # late: it passes the signal on once the workers have begun to drain
    for pid in (*workers, gw.proc.pid):
        os.kill(pid, signal.SIGINT)
    for pid in workers:
        gw.wait_event("stopping", pid=pid)
    os.kill(gw.proc.pid, signal.SIGCONT)
    assert gw.proc.wait(timeout=WAIT) == 0
    assert [(e["outcome"], e["cut"]) for e in gw.events("drained")] == [("finished", 0)] * 2
    assert [r.result() for r in held] == [(200, None)] * len(held)


def test_a_worker_stopped_alone_then_the_gateway_is_not_told_it_is_the_same_stop(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """`kill -TERM` to one worker holding requests, then SIGTERM to the supervisor once it drains: the supervisor's
    copy reaches it as `stop_signal_again` (its drain goes on, every request answered), whose detail no longer says
    "the same stop": a worker cannot tell a copy of its own stop from the gateway's later one, and says both."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    pid_of = {int(Path(e["siblings"]).stem): e["pid"] for e in gw.wait_events("admin_listening", 2)}
    held = _six_held(lab, gw, admin, "/EWS/Exchange.asmx?hold=8")
    figures = _samples(_scrape(admin + "/metrics"), "kcd_requests_in_flight")
    busy = next(label for label, n in figures.items() if n > 0)
    draining = pid_of[int(busy.split('worker="')[1].split('"')[0])]
    gw.mark()
    os.kill(draining, signal.SIGTERM)
    gw.wait_event("stopping", pid=draining)
    gw.proc.send_signal(signal.SIGTERM)
    again = gw.wait_event("stop_signal_again", pid=draining)
    assert again["passed_on"] is True, again
    assert not again["detail"].startswith("the same stop"), again
    assert again["detail"].startswith("the supervisor passed on a stop after this worker was sent one directly"), again
    assert gw.proc.wait(timeout=WAIT) == 0
    assert [r.result() for r in held] == [(200, None)] * len(held)
    assert [(e["outcome"], e["cut"]) for e in gw.events("drained")] == [("finished", 0)] * 2


def test_ctrl_c_again_still_cuts_what_the_workers_drain(lab: LabLayout, two_workers_admin: tuple[Gateway, str]) -> None:
    """SIGTERM to the supervisor with requests held, then SIGINT (Ctrl-C again), sent every 0.2 s until the workers
    drain no more: the second the supervisor passes on cuts what they hold (`second_signal`), as before."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    held = _six_held(lab, gw, admin, "/EWS/Exchange.asmx?hold=60")
    gw.mark()
    gw.proc.send_signal(signal.SIGTERM)

    def drained() -> list[dict[str, Any]] | None:
        if gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGINT)
        lines = gw.events("drained")
        return lines if len(lines) == 2 else None

    lines = eventually(drained, "both workers drained")
    # a worker the kernel gave none of the six (1 chance in 32) finishes its drain before the second signal
    assert all(e["outcome"] == "second_signal" for e in lines if e["cut"]), lines
    assert sum(e["cut"] for e in lines) == len(held)  # however the kernel spread them
    assert gw.proc.wait(timeout=WAIT) == 0


def test_ctrl_c_twice_in_quick_succession_cuts_what_the_workers_drain(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """Ctrl-C pressed twice in quick succession (SIGINT to the supervisor and both workers, again once the workers
    said `stopping`) cuts what they hold (`second_signal`): a worker tells the supervisor's copy from its sender's and
    takes one of each for one stop. Within 1 s of the first (review54's `SAME_STOP`) every copy was the same stop: the
    workers drained on to `drain_timeout`, the operator's second Ctrl-C taken for the first."""
    gw, admin = two_workers_admin
    workers = _listening_pids(gw, 2)
    held = _six_held(lab, gw, admin, "/EWS/Exchange.asmx?hold=60")
    gw.mark()
    for pid in (gw.proc.pid, *workers):  # the terminal signals the process group
        os.kill(pid, signal.SIGINT)
    for pid in workers:
        gw.wait_event("stopping", pid=pid)
    for pid in (gw.proc.pid, *workers):  # Ctrl-C again
        os.kill(pid, signal.SIGINT)
    lines = gw.wait_events("drained", 2)
    assert all(e["outcome"] == "second_signal" for e in lines if e["cut"]), lines
    assert sum(e["cut"] for e in lines) == len(held)  # however the kernel spread them
    assert gw.proc.wait(timeout=WAIT) == 0


def test_a_worker_stopping_on_its_own_is_not_counted_as_serving_while_it_drains(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """One worker sent SIGTERM closes its listener at once but drains its requests in flight (held here until
    released): from its `stopping` line it serves no new connection, and `kcd_workers_serving` says 1, `/readyz`'s
    `workers` names it. It was counted as serving until it exited, up to `drain_timeout` later."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    pid_of = {int(Path(e["siblings"]).stem): e["pid"] for e in gw.wait_events("admin_listening", 2)}
    key = f"drain{os.getpid()}"

    def serving(count: int) -> str | None:
        try:
            text = _scrape(admin + "/metrics")
        except ConnectionError:  # a scrape the kernel queued on the draining worker's admin socket as it closed
            return None
        return text if _samples(text, "kcd_workers_serving") == {"": count} else None

    held = [_send(lab, gw.port, f"/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60&hold_until={key}") for _ in range(6)]
    try:

        def in_flight() -> dict[str, float] | None:
            figures = _samples(_scrape(admin + "/metrics"), "kcd_requests_in_flight")
            return figures if sum(figures.values()) == len(held) else None

        busy = next(label for label, n in eventually(in_flight, "six requests held").items() if n > 0)
        draining = int(busy.split('worker="')[1].split('"')[0])  # holds one or more: its drain waits for them
        gw.mark()
        os.kill(pid_of[draining], signal.SIGTERM)
        gw.wait_event("stopping", pid=pid_of[draining])
        eventually(lambda: serving(1), "kcd_workers_serving 1 while a worker drains", timeout=10)
        assert _alive(pid_of[draining])  # still draining: its held requests are not answered yet
        body = eventually(lambda: _readyz(admin), "the serving worker's /readyz (the draining one's is 503)")
        assert f"worker {draining} stopping" in body["workers"], body
    finally:
        _send(lab, gw.port, f"/Microsoft-Server-ActiveSync?Cmd=Ping&lab_release={key}").result()  # the other worker
    assert [r.result() for r in held] == [(200, None)] * len(held)
    eventually(lambda: serving(2), "kcd_workers_serving 2 once its replacement listens")


def test_a_killed_supervisor_leaves_no_socket_directory(lab: LabLayout, two_workers_admin: tuple[Gateway, str]) -> None:
    """SIGKILL to the supervisor (which cannot remove its private directory then): the workers, stopping because
    their parent died, remove their sockets and the last one the directory, so none is left in the temp directory;
    after a reload too, whose text the directory keeps for a replacement (`reloaded.toml`, and its lock), and with the
    supervisor's count of workers serving in it (`serving.json`, section 48)."""
    gw, _ = two_workers_admin
    workers = _listening_pids(gw, 2)
    directory = {Path(e["siblings"]).parent for e in gw.wait_events("admin_listening", 2)}.pop()
    assert directory.is_dir()
    gw.proc.send_signal(signal.SIGHUP)
    for pid in workers:
        gw.wait_event("reloaded", pid=pid)
    assert (directory / "reloaded.toml").read_bytes() == gw.config_path.read_bytes()
    assert (directory / ".reloaded.toml.lock").exists()  # the reloads' lock (`proxy.live._kept_lock`) goes too
    assert json.loads((directory / "serving.json").read_text()) == {"configured": 2, "serving": [1, 2]}
    gw.proc.kill()
    gw.proc.wait()
    deadline = time.monotonic() + WAIT
    while (directory.exists() or any(_alive(pid) for pid in workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [pid for pid in workers if _alive(pid)]:
        os.kill(pid, signal.SIGKILL)
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())


def test_a_supervisor_killed_while_a_replacement_is_retried_leaves_no_socket_directory(
    lab: LabLayout, tmp_path: Path
) -> None:
    """SIGKILL to the supervisor while it retries a replacement (`worker_not_replaced`, the listener's certificate half
    rewritten): the worker killed before left its Unix socket (`<n>.sock`) in the private directory, so the last
    worker stopping could not remove the directory and it stayed in the temp directory. The supervisor now removes
    a dead worker's socket when it reaps it."""
    admin = free_port()
    text = _with_workers(lab, free_port(), 2) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw, copy, whole = _serving_a_certificate_copy(lab, tmp_path, text)
    try:
        first, second = _listening_pids(gw, 2)
        directory = {Path(e["siblings"]).parent for e in gw.wait_events("admin_listening", 2)}.pop()
        copy.write_bytes(whole[: len(whole) // 2])
        gw.mark()
        os.kill(first, signal.SIGKILL)
        gw.wait_event("worker_not_replaced")
        gw.proc.kill()
        gw.proc.wait()
        deadline = time.monotonic() + WAIT
        while (directory.exists() or _alive(second)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(second, signal.SIGKILL)
        gw.stop()
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())


def test_a_supervisor_killed_before_it_reaped_a_killed_worker_leaves_no_socket_directory(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """A worker and the supervisor SIGKILLed together (the supervisor held stopped so that it cannot reap the worker
    first, as `kill -9` to both does when it wins the race): the dead worker's socket and listening mark, which only the
    supervisor removed as it reaped it, stayed, so the last worker stopping could not remove the directory. Such a
    worker now removes what no live sibling holds: a socket nothing answers on, and every mark."""
    gw, _ = two_workers_admin
    first, second = _listening_pids(gw, 2)
    directory = {Path(e["siblings"]).parent for e in gw.wait_events("admin_listening", 2)}.pop()
    os.kill(gw.proc.pid, signal.SIGSTOP)
    os.kill(first, signal.SIGKILL)
    eventually(lambda: not _alive(first), "the worker dead (a zombie, unreaped)")
    gw.proc.kill()
    gw.proc.wait()
    try:
        eventually(lambda: not directory.exists() and not _alive(second), "the directory removed", timeout=20)
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(second, signal.SIGKILL)
        raise AssertionError(sorted(p.name for p in directory.iterdir())) from None


def test_a_trace_id_with_a_path_in_it_is_no_trace_not_a_question_for_another_path(
    lab: LabLayout, two_workers_admin: tuple[Gateway, str]
) -> None:
    """`/traces/..%2Fmetrics` (and the page `/trace/...`): the id was put in the path asked of the sibling workers,
    which then asked them `/metrics` and answered 500 on the text it got back; an id that is not a trace id is 404."""
    gw, admin = two_workers_admin
    _listening_pids(gw, 2)
    for path in ("/traces/..%2Fmetrics", "/traces/%2E%2E%2Fmetrics", "/trace/..%2Fmetrics", "/traces/x%3Flimit=1"):
        for _ in range(4):  # whichever worker the kernel gives the scrape
            with pytest.raises(urllib.error.HTTPError) as refused:
                _scrape(admin + path)
            assert refused.value.code == 404, (path, refused.value.read())


@pytest.mark.parametrize("revocation", ["require", "best-effort"])
def test_a_replacement_worker_never_takes_a_crl_older_than_its_siblings_held(
    lab: LabLayout, tmp_path: Path, revocation: str
) -> None:
    """Two workers read the issuing CA's CRL number 3001, which revokes carol. The file is then replaced by number
    3000, from before her revocation and still within its nextUpdate (a replay: a stale mirror, a compromised
    distribution point), and a worker dies. Its replacement built its CRL store afresh and took 3000: carol was
    served again on every connection the kernel gave it. The workers keep the highest CRL number seen per issuer, key
    and scope in the memory they share (`proxy.auth.shared`), so the replacement refused 3000 ("replayed?") and served
    without the issuing CA's CRL: under "require" it refused every device of that CA (alice too), under "best-effort"
    it served carol again (13 of 20 connections, all on it; left26). Beside its sibling it was then not started
    (`worker_not_replaced`, naming the file and the floor: one worker short while the file held 3000). It now starts
    from the CRL its siblings keep (`proxy.certs.kept`: `crl_taken_from_siblings`, 3001), refuses the file's 3000 and
    serves: carol is refused by both workers, alice served (left31)."""
    crl, root_crl = _carol_revoked(lab, tmp_path)
    issuing = load_ca(lab.pki_dir, "issuing")
    text = _best_effort_with(lab, [crl, root_crl])
    gw = start_gateway(lab, tmp_path / "gw", text.replace('"best-effort"', f'"{revocation}"'))
    try:
        first, second = _listening_pids(gw, 2)
        write_crl(tmp_path / "older.crl", issuing, number=3000).replace(crl)  # carol not yet revoked
        gw.mark()
        os.kill(first, signal.SIGKILL)
        replacement = _replacement(gw, first, second)
        taken = gw.wait_event("crl_taken_from_siblings", pid=replacement["pid"], source=str(crl))
        assert taken["crl_number"] == 3001, taken
        _revoked_on_each(lab, gw, {second, replacement["pid"]})
        assert asyncio.run(_fresh_connections(lab, gw, 4, "alice")) == [200] * 4
        assert gw.events("worker_not_replaced", gw.since) == []
    finally:
        assert gw.stop() == 0


def test_a_replacement_refusing_beside_a_sibling_that_died_meanwhile_is_followed_not_the_gateway_stopped(
    lab: LabLayout, tmp_path: Path
) -> None:
    """merge50 (left26's refusal, review50's count): a replacement forked beside a serving sibling refuses a CRL URL's
    replayed answer (3000 after 3001) only because that sibling serves; the sibling dies while the replacement's fetch
    is held. By the time the replacement ends nothing serves, and counted as any failed start with none serving it
    stopped the whole gateway (`worker_failed_to_start`), though a replacement with none beside it serves as a lone one
    does (without that CA's CRL, best-effort). It is now followed by such a replacement: both numbers are replaced and
    the gateway stays. (The CRLs the workers keep for a replacement, which would spare it the refusal, are removed
    first: `proxy.certs.kept`, left31.) The other number's replacement, forked once the lone one listened, refused the
    replayed CRL beside it every 5 s (`worker_not_replaced`), though that sibling held no CRL of that CA either and
    passed the same certificates: one worker short, protecting nothing. A replacement now refuses only beside a sibling
    whose kept file for that source is not empty (`KeptCrls.held_beside`, left34): both numbers serve, and carol, whom
    no worker holds a CRL for, gets the same answer from each (200, best-effort); alice 200."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    newer = write_crl(tmp_path / "3001.crl", issuing, revoked=[carol.serial_number], number=3001).read_bytes()
    older = write_crl(tmp_path / "3000.crl", issuing, number=3000).read_bytes()
    held, asked, release = threading.Event(), threading.Event(), threading.Event()

    def answer(_path: str, _headers: Message) -> tuple[int, bytes]:
        if not held.is_set():
            return 200, newer
        asked.set()
        release.wait(8.0)  # under the gateway's FETCH_TIMEOUT: the answer comes, late
        return 200, older

    server = _CrlServer(answer)
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    root_crl = write_crl(tmp_path / "root.crl", root)
    text = _best_effort_with(lab, [root_crl], f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n')
    gw = start_gateway(lab, tmp_path / "gw", text.replace(f'crls = ["{root_crl}"]', f'crls = ["{url}", "{root_crl}"]'))
    try:
        first, second = _listening_pids(gw, 2)
        directory = {Path(e["siblings"]).parent for e in gw.wait_events("admin_listening", 2)}.pop()
        shutil.rmtree(directory / "crls")
        held.set()
        gw.mark()
        os.kill(first, signal.SIGKILL)
        assert asked.wait(WAIT), "no replacement fetched the CRL URL"
        os.kill(second, signal.SIGKILL)
        gw.wait_event("worker_exited", worker=second)
        release.set()
        _replacement(gw, first, second)  # both killed: one serves with none beside it
        assert gw.proc.poll() is None, [e["event"] for e in gw.logs()[-12:]]
        assert gw.events("worker_failed_to_start") == []
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2
        serving = _two_listening_since(gw, {first, second})
        gw.wait_events("request", 2)  # alice's two lines, written after she had her answers: not after the next mark
        gw.mark()  # one of them dies: its replacement is forked beside the other, which holds no CRL of that CA
        os.kill(serving[0], signal.SIGKILL)
        replacement = _first_end(gw, (first, second, serving[0]))
        assert replacement["event"] == "listening", replacement
        _same_answer_on_each(lab, gw, {serving[1], replacement["pid"]}, "carol", 200)
        _same_answer_on_each(lab, gw, {serving[1], replacement["pid"]}, "alice", 200)
        assert gw.events("worker_not_replaced", gw.since) == []
    finally:
        gw.stop()
        server.close()


def _two_listening_since(gw: Gateway, gone: set[int]) -> list[int]:
    """The pids of two workers listening since `gw.mark()` that are none of `gone`: both numbers replaced."""

    def both() -> list[int] | None:
        pids = sorted({e["pid"] for e in gw.events("listening", gw.since)} - gone)
        return pids if len(pids) >= 2 else None

    return eventually(both, "both numbers replaced")


def _first_end(gw: Gateway, gone: tuple[int, ...]) -> dict[str, Any]:
    """A replacement's `listening` line (of a pid none of `gone`) or the supervisor's `worker_not_replaced`, whichever
    comes first since `gw.mark()`."""

    def ended() -> dict[str, Any] | None:
        for e in gw.logs()[gw.since :]:
            if e.get("event") == "worker_not_replaced" or (e.get("event") == "listening" and e.get("pid") not in gone):
                return e
        return None

    return eventually(ended, "the replacement listening, or worker_not_replaced")


def _same_answer_on_each(lab: LabLayout, gw: Gateway, workers: set[int], user: str, status: int) -> None:
    """New connections of `user` until each of `workers` has answered one (since `gw.mark()`): every answer `status`."""
    cert = x509.load_pem_x509_certificate((lab.pki_dir / "users" / f"{user}.pem").read_bytes())
    subject = cert.subject.rfc4514_string()
    answered: set[int] = set()
    deadline = time.monotonic() + WAIT
    while answered != workers:  # the kernel places each new connection anew
        assert asyncio.run(_fresh_connections(lab, gw, 1, user)) == [status], answered
        answered = {e["pid"] for e in gw.events("request", gw.since) if e.get("cert_subject") == subject}
        assert answered <= workers, answered
        assert time.monotonic() < deadline, f"only {answered} answered"


def test_a_replacement_whose_reloaded_trust_anchor_is_half_rewritten_never_serves_the_started_configuration(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A reload moves `trust_anchors` to a file of the operator's and retires a route; that file is then caught half
    rewritten and a worker dies. The replacement's cross-checks refused the file and it served the configuration the
    gateway started with, the retired route back on it (`worker_configuration_refused`). Beside its sibling it is now
    not started (`worker_not_replaced`, naming the file) and once the file is whole a replacement serves the reloaded
    configuration."""
    retired = '\n[[routes]]\nprefix = "/retired/"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'
    text = _with_workers(lab, free_port(), 2)
    root = lab.pki_dir / "root.pem"
    assert f'trust_anchors = ["{root}"]' in text
    anchors = tmp_path / "anchors.pem"
    whole = root.read_bytes()
    anchors.write_bytes(whole)
    gw = start_gateway(lab, tmp_path / "gw", text + retired)
    try:
        first, second = _listening_pids(gw, 2)
        gw.config_path.write_text(text.replace(f'trust_anchors = ["{root}"]', f'trust_anchors = ["{anchors}"]'))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            assert "/retired/" not in gw.wait_event("reloaded", pid=pid)["routes"]
        anchors.write_bytes(whole[: len(whole) // 2])
        gw.mark()
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")
        assert any(str(anchors) in p for p in refused["problems"]), refused
        assert gw.events("worker_configuration_refused") == []
        assert asyncio.run(_fresh_connections(lab, gw, 2)) == [200] * 2
        anchors.write_bytes(whole)
        replacement = _replacement(gw, first, second)
        assert "/retired/" not in replacement["routes"]
    finally:
        gw.stop()


@pytest.mark.parametrize("named", ["as-started", "through-dotdot", "through-a-symlink"])
def test_a_worker_replaced_while_a_crl_file_of_a_reloaded_configuration_has_gone_bad_serves_the_reloaded_one(
    lab: LabLayout, tmp_path: Path, named: str
) -> None:
    """A reload tightened `revocation` from "best-effort" to "require"; the issuing CA's CRL file, which both the
    started and the reloaded configuration name, is then caught half rewritten and both workers die. A replacement
    with no sibling serving (beside one it is not started: `test_a_replacement_whose_reloaded_crl_file_has_gone_bad_`
    `never_serves_the_started_configuration`) refused the reloaded configuration over that file and fell back to the
    started one (`crls_vetted`), served best-effort without the CRL: carol, revoked,
    got 200 from it. It now serves the reloaded configuration, the file's CRLs not used (`crl_not_used`), so carol is
    refused on every worker. So too when the reload names the file by another name (`dir/../issuing.crl`, a symbolic
    link to it): the started files were matched by name, and the replacement fell back to the started configuration
    as before. (review50's test, one worker killed; merge50 kills both, where `crls_vetted` still applies.)"""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    crl = write_crl(tmp_path / "issuing.crl", issuing, revoked=[carol.serial_number], number=3001)
    root_crl = write_crl(tmp_path / "root.crl", root)
    text = _with_workers(lab, free_port(), 2)
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    require = 'revocation = "require"'
    assert lab_crls in text
    assert require in text
    text = text.replace(lab_crls, f'crls = ["{crl}", "{root_crl}"]')
    gw = start_gateway(lab, tmp_path / "gw", text.replace(require, 'revocation = "best-effort"'))
    try:
        first, second = _listening_pids(gw, 2)
        alias = {"as-started": crl, "through-dotdot": tmp_path / "gw" / ".." / crl.name, "through-a-symlink": None}
        link = tmp_path / "current.crl"
        link.symlink_to(crl)
        named_as = alias[named] or link
        gw.config_path.write_text(text.replace(f'"{crl}"', f'"{named_as}"'))  # "require" again
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            gw.wait_event("reloaded", pid=pid)
        with crl.open("r+b") as f:
            f.truncate(len(crl.read_bytes()) // 2)
        os.kill(first, signal.SIGKILL)
        os.kill(second, signal.SIGKILL)
        replacements = set(_listening_pids(gw, 4)[2:])
        served: set[int] = set()
        subject = carol.subject.rfc4514_string()
        deadline = time.monotonic() + WAIT
        while served != replacements:  # new connections until both replacements answered carol
            assert asyncio.run(_fresh_connections(lab, gw, 1, "carol")) == [403], served
            served = {e["pid"] for e in gw.events("request", gw.since) if e.get("cert_subject") == subject}
            assert time.monotonic() < deadline, f"only {served} answered"
        for pid in replacements:
            assert str(named_as) in gw.wait_event("crl_not_used", pid=pid)["problem"]
        assert gw.events("worker_configuration_refused") == []
        assert gw.events("worker_not_replaced") == []
    finally:
        gw.stop()


def _route(prefix: str) -> str:
    return f'\n[[routes]]\nprefix = "{prefix}"\nupstream = "http://127.0.0.1:9"\nspn = "HTTP/cas.lab.test"\n'


def _private_directory(pid: int) -> Path:
    """The supervisor's private directory (`proxy.workers`), found by worker `pid`'s listening mark in it."""
    marks = list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"kcd-proxy-workers-*/{pid}.listening"))
    assert len(marks) == 1, marks
    return marks[0].parent


class _HeldCrlServer(_CrlServer):
    """The lab's issuing CRL at any path; the `hold`-th GET (counted from 1) waits for `release` before its answer."""

    def __init__(self, crl: bytes, hold: int) -> None:
        self.asked = 0
        self.release = threading.Event()

        def answer(_path: str, _headers: Message) -> tuple[int, bytes]:
            self.asked += 1
            if self.asked == hold:
                self.release.wait(WAIT)
            return 200, crl

        super().__init__(answer)


@pytest.mark.slow(seconds=25)
def test_a_reload_that_read_the_file_before_a_siblings_later_one_does_not_leave_its_older_text_for_a_replacement(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Two SIGHUPs in quick succession: worker Y's first reload is held in its CRL fetch while X reloads the first
    text, then the second; the file is then caught half edited, and Y's held reload ends after X's second one (its own
    second reload refused). Y killed: its replacement served the first text (the older one, kept last by Y), beside X
    serving the second. The text read last is kept: the replacement serves X's."""
    held = _HeldCrlServer(Path(lab.pki_dir / "issuing.crl").read_bytes(), hold=2)
    crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    base = _with_workers(lab, free_port(), 2)
    assert crls in base
    gw = start_gateway(lab, tmp_path / "gw", base)
    try:
        _listening_pids(gw, 2)
        url = f"http://127.0.0.1:{held.port}/issuing.crl"
        gw.config_path.write_text(
            base.replace(crls, f'crls = ["{lab.pki_dir / "crls.pem"}", "{url}"]') + _route("/first/")
        )
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        eventually(lambda: held.asked >= 2 or None, "both workers fetching the CRL URL")
        fast = gw.wait_event("reloaded")["pid"]  # the other one's fetch is held
        gw.config_path.write_text(base + _route("/second/"))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for("reloaded", lambda e: e["pid"] == fast and "/second/" in e["routes"], what="the second reload")
        gw.config_path.write_text(base + _route("/second/") + "\n[listener\n")  # an editor's save caught half way
        held.release.set()
        slow = gw.wait_for("reloaded", lambda e: e["pid"] != fast, what="the held reload")["pid"]
        order = [e["pid"] for e in gw.events("reloaded", gw.since)]
        assert order == [fast, fast, slow], order  # the scene: the held reload ended after X's second one
        gw.wait_event("reload_refused", pid=slow)  # its second reload read the broken file
        os.kill(slow, signal.SIGKILL)
        listening = _replacement(gw, fast, slow)
        assert "/second/" in listening["routes"], listening  # X's; not "/first/"
        assert gw.wait_event("worker_configuration_refused", pid=listening["pid"])["serves"] == "reloaded"
    finally:
        gw.stop()
        held.close()


@pytest.mark.slow(seconds=20)
def test_a_reload_whose_text_cannot_be_kept_leaves_no_older_text_for_a_replacement(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Both workers reload a second text that cannot be kept (`reloaded_configuration_unkept`: here each worker's part
    file taken by a directory, as a full disk would refuse it); the file is then caught half edited and a worker
    killed: its replacement served the first reload's text, kept before, beside its sibling serving the second. It now
    refuses (`worker_not_replaced`, retried) and the sibling serves on with the second."""
    base = _with_workers(lab, free_port(), 2)
    gw = start_gateway(lab, tmp_path / "gw", base)
    try:
        first, second = _listening_pids(gw, 2)
        private = _private_directory(first)
        gw.config_path.write_text(base + _route("/first/"))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            gw.wait_event("reloaded", pid=pid)
        assert b"/first/" in (private / "reloaded.toml").read_bytes()
        for pid in (first, second):
            (private / f".reloaded.toml.{pid}").mkdir()
        gw.config_path.write_text(base + _route("/second/"))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        for pid in (first, second):
            assert "/second/" in gw.wait_event("reloaded", pid=pid)["routes"]
        gw.wait_events("reloaded_configuration_unkept")  # the worker that read the file later, at least
        assert (private / "reloaded.toml").read_bytes() == b""  # the first reload's text is not left
        gw.config_path.write_text(base + _route("/second/") + "\n[listener\n")  # an editor's save caught half way
        os.kill(first, signal.SIGKILL)
        refused = gw.wait_event("worker_not_replaced")  # the replacement refused, retried every 5 s
        assert any("listener" in problem for problem in refused["problems"]), refused
        assert [e for e in gw.events("listening", gw.since) if "/first/" in e["routes"]] == []
        assert _alive(second)
    finally:
        gw.stop()
