"""A worker leaving (a drain of its own, the gateway's stop) and the connections the kernel had already queued for it.

With `workers = 2` each worker listens on a socket of its own in the port's SO_REUSEPORT group, and the kernel
completes a connection's TCP handshake and queues it on one of them before the worker accepts it. A worker closing its
listener reset what was so queued (unless `net.ipv4.tcp_migrate_req` is 1, which this machine's is not: the kernel
then gives it to a sibling): for a device, a request failed; for a scrape, a reset. The window is made wide here by
stopping the worker (SIGSTOP) while connections queue on its sockets, then sending it SIGTERM and SIGCONT: it stops
with every one of them still queued. Which connections wait there is read from the kernel (`ss`: a listening
socket's Recv-Q is its accept queue), not guessed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, free_port, start_gateway
from tests.integration.jsonlog import eventually
from tests.integration.test_drain import Held, _send
from tests.integration.test_workers import _alive, _listening_pids, _private_directory, _with_workers

pytestmark = pytest.mark.slow(seconds=6)

SENT = 24  # connections opened while a worker is stopped: the kernel hashes about half of them onto its socket


def _queued(port: int, pid: int) -> int:
    """How many connections the kernel has queued on worker `pid`'s listening socket for `port` (its accept queue)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if f"pid={pid}," in line)


def _queue_on(stopped: int, port: int, send: Callable[[], Held]) -> list[Held]:
    """`SENT` connections opened to `port` while worker `stopped` is stopped (SIGSTOP): once each is either answered
    (by its sibling) or waits in the stopped one's accept queue. At least a few must wait there."""
    sent = [send() for _ in range(SENT)]

    def settled() -> int | None:
        queued = _queued(port, stopped)
        return queued if queued + sum(not h.thread.is_alive() for h in sent) == len(sent) else None

    queued = eventually(settled, "each connection answered by the sibling or queued on the stopped worker")
    assert queued >= 3, f"only {queued} of {SENT} connections queued on the stopped worker"
    return sent


def _scrape(url: str) -> Held:
    """A GET of `url` on a connection of its own, in a thread (as `_send`)."""

    def run() -> None:
        try:
            with urllib.request.urlopen(url, timeout=90) as r:  # noqa: S310  loopback
                held.body.append(r.read())
                held.status.append(r.status)
        except OSError as e:
            held.error.append(e)

    held = Held(threading.Thread(target=run, daemon=True))
    held.thread.start()
    return held


def _all_answered(sent: list[Held]) -> None:
    lost = [r for h in sent if (r := h.result()) != (200, None)]
    assert not lost, f"{len(lost)} of {len(sent)} lost: {lost}"


@pytest.fixture
def two_workers_admin(lab: LabLayout, tmp_path: Path) -> Iterator[tuple[Gateway, int]]:
    admin = free_port()
    text = _with_workers(lab, free_port(), 2) + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw = start_gateway(lab, tmp_path / "gw", text)
    yield gw, admin
    gw.stop()


def _leave_with_queue(gw: Gateway, leaving: int) -> None:
    """Worker `leaving` (stopped) sent SIGTERM, then continued: it stops with its queue as it was."""
    gw.mark()
    os.kill(leaving, signal.SIGTERM)
    os.kill(leaving, signal.SIGCONT)
    gw.wait_event("stopped", pid=leaving)


@pytest.mark.parametrize("server", ["own", "aiohttp"])
def test_device_connections_queued_on_a_worker_that_drains_are_served(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A worker sent SIGTERM on its own (a drain; its replacement follows) with device connections in its accept
    queue: each is served (200), none reset, on either device-side server. Before, every connection still queued
    when it closed its listener was reset by the kernel (the device's handshake failed: a request lost)."""
    text = _with_workers(lab, free_port(), 2).replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\n', 1)
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        leaving, _sibling = _listening_pids(gw, 2)
        os.kill(leaving, signal.SIGSTOP)
        try:
            sent = _queue_on(leaving, gw.port, lambda: _send(lab, gw.port, "/EWS/Exchange.asmx"))
            _leave_with_queue(gw, leaving)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leaving, signal.SIGCONT)
        _all_answered(sent)
        drained = gw.wait_event("drained", pid=leaving)
        assert drained["outcome"] == "finished", drained
    finally:
        gw.stop()


def test_scrapes_queued_on_a_worker_that_drains_are_answered(
    lab: LabLayout, two_workers_admin: tuple[Gateway, int]
) -> None:
    """The same for the admin listener, which its workers share with SO_REUSEPORT too: a scrape (here `/healthz`)
    queued on the leaving worker's admin socket is answered, not reset (session 22 saw Prometheus's scrape reset)."""
    gw, admin = two_workers_admin
    leaving, _sibling = _listening_pids(gw, 2)
    gw.wait_events("admin_listening", 2)
    os.kill(leaving, signal.SIGSTOP)
    try:
        sent = _queue_on(leaving, admin, lambda: _scrape(f"http://127.0.0.1:{admin}/healthz"))
        _leave_with_queue(gw, leaving)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leaving, signal.SIGCONT)
    _all_answered(sent)


def test_a_gateway_killed_whole_leaves_its_directory_to_the_next_start(lab: LabLayout, tmp_path: Path) -> None:
    """`kill -9` to the supervisor and both workers at once (each stopped first, so that none acts on another's death
    before it is killed too): none lives on to remove the private directory, which stayed in the temp directory for
    good. The next gateway started removes it (`workers_directory_removed`), and leaves a running gateway's alone."""
    killed = start_gateway(lab, tmp_path / "killed", _with_workers(lab, free_port(), 2))
    running = start_gateway(lab, tmp_path / "running", _with_workers(lab, free_port(), 2))
    try:
        workers = _listening_pids(killed, 2)
        directory = _private_directory(workers[0])
        kept = _private_directory(_listening_pids(running, 2)[0])
        for pid in (killed.proc.pid, *workers):
            os.kill(pid, signal.SIGSTOP)
        for pid in (killed.proc.pid, *workers):
            os.kill(pid, signal.SIGKILL)
        killed.proc.wait()
        eventually(lambda: not any(_alive(pid) for pid in workers) or None, "the killed workers gone")
        assert directory.is_dir()  # nothing of that gateway left to remove it
        after = start_gateway(lab, tmp_path / "after", _with_workers(lab, free_port(), 2))
        try:
            line = after.wait_event("workers_directory_removed", directory=str(directory))
            assert line["supervisor"] == killed.proc.pid, line
            assert not directory.exists()
            assert kept.is_dir()
            _listening_pids(after, 2)
            assert all(e["directory"] != str(kept) for e in after.events("workers_directory_removed"))
        finally:
            after.stop()
    finally:
        running.stop()
        killed.stop()
