"""The integration tests' own harness on a shared machine: a port taken by someone else between `free_port()`
and the bind never passes for our daemon being ready, and a gateway is then started on another port; an in-process
server closed at a test's end listens no more for the next tests in that worker."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import curl, dead_port, free_port, lab_config, start_gateway, wait_port
from tests.integration.jsonlog import WAIT
from tests.integration.recorder import Recorder


def test_a_gateway_whose_port_was_taken_meanwhile_starts_on_another(lab: LabLayout, tmp_path: Path) -> None:
    """Another process listens on the port the test picked: start_gateway does not take that listener for the
    gateway (a connect would have), restarts it on a new port, and the gateway it returns serves alice."""
    with socket.create_server(("127.0.0.1", 0)) as thief:
        taken = thief.getsockname()[1]
        gw = start_gateway(lab, tmp_path, lab_config(lab, port=taken))
        try:
            assert gw.port != taken
            assert f'bind = "127.0.0.1:{gw.port}"' in gw.config_path.read_text()
            assert curl(lab, gw.url + "/owa/", "alice").stdout.endswith("\n200")
            assert gw.events("listening")[-1]["bind"] == f"127.0.0.1:{gw.port}"
        finally:
            assert gw.stop() == 0


def test_a_gateway_whose_admin_port_was_taken_meanwhile_starts_on_another(lab: LabLayout, tmp_path: Path) -> None:
    """Another process listens on the admin port the test picked: start_gateway restarts the gateway with its admin
    listener on a new port (`Gateway.admin`), which answers /readyz; it raised, as asyncio words the kernel's
    "address already in use" in lower case and only the listener's port was ever moved (left22's flake)."""
    with socket.create_server(("127.0.0.1", 0)) as thief:
        taken = f"127.0.0.1:{thief.getsockname()[1]}"
        gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{taken}"\n'))
        try:
            assert gw.admin is not None
            assert gw.admin != taken
            assert f'bind = "{gw.admin}"' in gw.config_path.read_text()
            with urllib.request.urlopen(f"http://{gw.admin}/readyz", timeout=WAIT) as r:
                assert r.status == 200
        finally:
            assert gw.stop() == 0


def test_wait_port_wants_the_process_itself_to_listen(tmp_path: Path) -> None:
    """A daemon whose port another process holds fails to bind: wait_port reports that it exited, never that
    it listens, although the port answers."""
    with socket.create_server(("127.0.0.1", 0)) as thief:
        port = thief.getsockname()[1]
        code = f"import socket, time; time.sleep(0.5); s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
        try:
            with pytest.raises(RuntimeError, match="exited with 1 before listening"):
                wait_port(port, proc, timeout=30)
        finally:
            proc.kill()
            proc.wait()
    free = free_port()
    code = f"import socket, time; s = socket.create_server(('127.0.0.1', {free})); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_port(free, proc)  # its own socket: ready
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_port_refuses_connections_and_cannot_be_taken() -> None:
    """dead_port() is refused to connect to, and no other socket can bind it while the test process runs."""
    port = dead_port()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as other, pytest.raises(OSError, match="Address already in use"):
        other.bind(("127.0.0.1", port))


def test_a_closed_recorder_listens_no_more_and_its_thread_ends() -> None:
    """A Recorder (the in-process upstream of many tests) that served a request and was closed: its accepting thread
    ends and a connection to its port is refused. Closing the socket alone left the thread blocked in accept() and
    the port listening for the rest of the worker's life, taking the next connection made to it."""
    recorder = Recorder()
    port = int(recorder.url.rpartition(":")[2])
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(b"GET /before HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert client.recv(65536).startswith(b"HTTP/1.1 ")  # served: the accepting thread is back in accept()
    recorder.close()
    assert not recorder._thread.is_alive()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
