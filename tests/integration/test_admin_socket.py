"""`[admin] socket`: the admin listener on a Unix socket, asked with curl (`--unix-socket`) and `kcd-proxy trace`.

The gateway runs as a real `kcd-proxy run` against the lab; the socket is the only admin listener (no `bind`), or,
with `workers = 2`, the first worker's, answering for both."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually


def _curl(sock: Path, path: str, *headers: str) -> tuple[int, str]:
    """curl over the Unix socket: (status, body)."""
    args = ["curl", "-s", "--max-time", "30", "--unix-socket", str(sock), "-w", "\n%{http_code}"]
    for header in headers:
        args += ["-H", header]
    done = subprocess.run([*args, f"http://localhost{path}"], capture_output=True, text=True, timeout=60, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def _both_workers(sock: Path) -> str | None:
    """The socket's `/metrics` once it carries worker 2's samples, else None."""
    status, body = _curl(sock, "/metrics")
    return body if status == 200 and 'kcd_requests_in_flight{worker="2"}' in body else None


def _gateway(lab: LabLayout, directory: Path, sock: Path, extra: str = "") -> Gateway:
    port = free_port()
    text = lab_config(lab, port=port).replace(f'bind = "127.0.0.1:{port}"\n', f'bind = "127.0.0.1:{port}"\n{extra}')
    gw = start_gateway(lab, directory, text + f'\n[admin]\nsocket = "{sock}"\n')
    gw.wait_event("admin_listening", socket=str(sock))
    return gw


@pytest.fixture
def socket_only(lab: LabLayout, tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    sock = tmp_path / "run" / "admin.sock"
    sock.parent.mkdir()
    gw = _gateway(lab, tmp_path / "gw", sock)
    yield gw, sock
    gw.stop()


async def _requests(lab: LabLayout, gw: Gateway, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(gw.url + "/EWS/Exchange.asmx", ssl=client_context(lab, "alice")) as r,
        ):
            await r.read()
            statuses.append(r.status)
    return statuses


def test_the_admin_listener_answers_on_its_socket_only(lab: LabLayout, socket_only: tuple[Gateway, Path]) -> None:
    """Health, metrics and traces answer on the socket (mode 0600, the gateway's user only), whatever `Host` the
    client names (no page can reach a socket, so no name needs checking); no TCP admin port is opened; the
    socket file is gone once the gateway stops."""
    gw, sock = socket_only
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert _curl(sock, "/healthz")[0] == 200
    assert asyncio.run(_requests(lab, gw, 2)) == [200, 200]
    gw.wait_events("request", 2)
    status, body = _curl(sock, "/metrics", "Host: attacker.example")
    assert status == 200
    assert 'kcd_requests_total{route="/",status="200"} 2.0' in body
    assert "worker=" not in body  # one process: no label added
    assert [e.get("bind") for e in gw.events("admin_listening")] == [None]
    assert gw.stop() == 0
    assert not sock.exists()


def test_kcd_proxy_trace_reads_the_socket_of_its_configuration(
    lab: LabLayout, socket_only: tuple[Gateway, Path]
) -> None:
    """`kcd-proxy trace --config` of a gateway whose admin listener is a socket only asks that socket."""
    gw, _ = socket_only
    assert asyncio.run(_requests(lab, gw, 1)) == [200]
    line = gw.wait_events("request", 1)[0]
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "trace", "--config", str(gw.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KRB5_CONFIG": str(lab.krb5_conf)},
    )
    assert done.returncode == 0, done.stderr
    assert line["request_id"] in done.stdout


def test_a_plain_file_at_the_socket_path_is_never_removed(lab: LabLayout, tmp_path: Path) -> None:
    """A file that is not a socket where `admin.socket` points: the configuration is refused, naming the key, and
    the file is left as it was (a stale socket is replaced, anything else is the operator's)."""
    victim = tmp_path / "admin.sock"
    victim.write_text("keep me")
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=free_port()) + f'\n[admin]\nsocket = "{victim}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"admin.socket: a file that is not a socket is there: {victim}" in done.stdout + done.stderr
    assert victim.read_text() == "keep me"


def test_with_two_workers_the_socket_answers_for_both(lab: LabLayout, tmp_path: Path) -> None:
    """`workers = 2` and a socket: one worker binds it and its `/metrics` has both workers' samples."""
    sock = tmp_path / "admin.sock"
    gw = _gateway(lab, tmp_path / "gw", sock, extra="workers = 2\n")
    try:
        # worker 2 answers its sibling once it is up, which may be after worker 1's socket is: poll, not read once
        body = eventually(lambda: _both_workers(sock), "both workers' samples on the socket's /metrics")
        assert 'kcd_requests_in_flight{worker="1"}' in body
        assert len(gw.events("admin_listening")) == 1
    finally:
        gw.stop()


def test_a_second_gateway_never_takes_a_socket_another_one_answers_on(
    lab: LabLayout, socket_only: tuple[Gateway, Path], tmp_path: Path
) -> None:
    """A second gateway started with the first one's `admin.socket` (a second instance by hand, a unit started twice):
    the socket answers, so it is not stale; the second refuses to start, naming the key, and the first keeps its
    admin listener. The second removed the live socket and bound its own, and when it stopped it removed that too:
    the running gateway's health, metrics and traces were unreachable until it was restarted."""
    first, sock = socket_only
    config = tmp_path / "second.toml"
    config.write_text(lab_config(lab, port=free_port()) + f'\n[admin]\nsocket = "{sock}"\n')
    with (tmp_path / "second.log").open("wb") as out:
        second = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **lab.env()},
        )
    try:
        second.wait(timeout=60)
    except subprocess.TimeoutExpired:
        second.terminate()
        second.wait(timeout=30)
        raise AssertionError((tmp_path / "second.log").read_text()[-3000:]) from None
    said = (tmp_path / "second.log").read_text()
    assert second.returncode != 0, said
    assert "admin.socket" in said, said
    assert sock.is_socket()
    assert _curl(sock, "/healthz")[0] == 200  # the first gateway's, still
    assert first.proc.poll() is None
