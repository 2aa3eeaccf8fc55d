"""`make lab` where a lab port is taken (other engineers' labs use the default ports on a shared machine).

A newcomer who runs `kcd-proxy lab up` (what `make lab` runs first) while another process holds one of the lab's
ports must get one clear line naming the port and the `KCD_LAB_*` variable that moves it, no traceback, and no
half-started lab; and a port held by something that answers like a lab part (another lab's Exchange stand-in)
must not pass for ours.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout
from tests.integration.conftest import free_port


def _layout(root: Path) -> LabLayout:
    return LabLayout(
        root=root,
        ldap_port=free_port(),
        kdc_port=free_port(),
        backend_port=free_port(),
        crl_port=free_port(),
        ocsp_port=free_port(),
        gateway_port=free_port(),
        admin_port=free_port(),
    )


def _lab_up(layout: LabLayout) -> subprocess.CompletedProcess[str]:
    """`python -m proxy lab up` as `make lab` runs it, with the layout as the newcomer's KCD_LAB_* variables."""
    env = {**os.environ, **layout.as_env()}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "lab", "up"], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A loopback port with a listener that accepts and never answers (a process of someone else's)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
        pass


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another lab's backend on a port: answers 200 to every GET, as `lab probe backend` expects of ours."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _refused_cleanly(layout: LabLayout, done: subprocess.CompletedProcess[str], port: int, variable: str) -> None:
    try:
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        assert f"127.0.0.1:{port}" in done.stderr, done.stderr
        assert variable in done.stderr, done.stderr
        assert not any(runner.status(layout).values()), runner.status(layout)
    finally:
        runner.down(layout)


def test_a_taken_kdc_port_names_its_variable(tmp_path: Path, listening: socket.socket) -> None:
    """The KDC's port held by another process: exit 1 with the port and KCD_LAB_KDC_PORT, no traceback (was a
    RuntimeError traceback saying 'give the LabLayout other ports'), and nothing of the lab left running."""
    port = listening.getsockname()[1]
    layout = LabLayout.from_env({**_layout(tmp_path / "lab").as_env(), "KCD_LAB_KDC_PORT": str(port)})
    _refused_cleanly(layout, _lab_up(layout), port, "KCD_LAB_KDC_PORT")


def test_another_labs_backend_on_the_port_is_not_taken_for_ours(tmp_path: Path, impostor: int) -> None:
    """The backend's port held by something answering 200 (another lab's stand-in): `lab up` refuses, naming
    KCD_LAB_BACKEND_PORT; it used to pass the readiness probe against the impostor and exit 0, while its own
    backend had died on 'address in use' and the gateway would have delegated to the other lab's backend."""
    layout = LabLayout.from_env({**_layout(tmp_path / "lab").as_env(), "KCD_LAB_BACKEND_PORT": str(impostor)})
    _refused_cleanly(layout, _lab_up(layout), impostor, "KCD_LAB_BACKEND_PORT")


def test_a_refusal_names_the_gateways_taken_ports_too(tmp_path: Path, listening: socket.socket) -> None:
    """Another lab on the KDC's and the gateway's ports: the one refusal names KCD_LAB_GATEWAY_PORT beside
    KCD_LAB_KDC_PORT, so the newcomer moves both at once; it named the parts' ports alone, and `make lab` run again
    with those moved got past `lab up` to fail at the gateway's listener.bind, a key of a file the lab writes."""
    with socket.socket() as gateway:
        gateway.bind(("127.0.0.1", 0))
        gateway.listen()
        kdc_port, gateway_port = listening.getsockname()[1], gateway.getsockname()[1]
        ports = {"KCD_LAB_KDC_PORT": str(kdc_port), "KCD_LAB_GATEWAY_PORT": str(gateway_port)}
        layout = LabLayout.from_env({**_layout(tmp_path / "lab").as_env(), **ports})
        done = _lab_up(layout)
        _refused_cleanly(layout, done, kdc_port, "KCD_LAB_KDC_PORT")
        assert f"127.0.0.1:{gateway_port} (KCD_LAB_GATEWAY_PORT)" in done.stderr, done.stderr
