"""The lab calls a daemon ready when it answers a real request (proxy.lab.readiness), never on a TCP connect:
an impostor that accepts connections on a lab port is not taken for the KDC, slapd or the backend."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import readiness, runner
from proxy.lab.kdc import SUFFIX, realm_answers
from proxy.lab.layout import REALM, LabLayout
from proxy.lab.serve import probe
from tests.integration.conftest import free_port
from tests.integration.jsonlog import eventually


@pytest.fixture
def impostor() -> Iterator[socket.socket]:
    """A loopback port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def test_the_lab_kdc_and_slapd_answer_real_requests(lab: LabLayout) -> None:
    """The running lab's KDC answers the readiness AS-REQ with 'client not found' (it read its database, the KDC
    log names the probe's client), slapd a root DSE search naming the lab's suffix; `lab probe kdc` passes."""
    assert readiness.kdc_answers(lab.local_host, lab.kdc_port, REALM) is None
    assert readiness.ldap_answers(f"ldap://127.0.0.1:{lab.ldap_port}/", SUFFIX) is None
    assert realm_answers(lab) == {"slapd": None, "krb5kdc": None}
    assert probe(lab, "kdc") is None
    eventually(
        lambda: f"CLIENT_NOT_FOUND: {readiness.CLIENT_NAME}@{REALM}" in lab.kdc_log.read_text(errors="replace"),
        "the readiness AS-REQ in the KDC log",
    )


def test_a_port_that_only_accepts_is_no_kdc_and_no_ldap_server(impostor: socket.socket) -> None:
    """A listener that accepts and stays silent fails both questions, each saying what it saw."""
    port = impostor.getsockname()[1]
    kdc = readiness.kdc_answers("127.0.0.1", port, REALM, timeout=1)
    assert kdc is not None
    assert f"127.0.0.1:{port}" in kdc
    ldap = readiness.ldap_answers(f"ldap://127.0.0.1:{port}/", SUFFIX, timeout=1)
    assert ldap is not None
    assert f"127.0.0.1:{port}" in ldap


def test_an_http_server_is_no_kdc(lab: LabLayout) -> None:
    """The lab backend's port answers, but HTTP: the readiness AS-REQ says it is not a KDC."""
    answer = readiness.kdc_answers("127.0.0.1", lab.backend_port, REALM)
    assert answer is not None
    assert "not Kerberos" in answer or "closed the connection" in answer


def test_lab_up_is_not_fooled_by_an_impostor_on_the_backend_port(tmp_path: Path, impostor: socket.socket) -> None:
    """`lab up` with the backend's port held by a silent listener fails, naming the port and KCD_LAB_BACKEND_PORT,
    before anything starts (it used to bring the realm up and then fail on the backend's readiness), instead of
    reporting a lab whose backend never started (a TCP connect to the impostor used to pass); the backend's
    readiness probe is not fooled by the impostor either, for a port taken after that check."""
    layout = LabLayout(
        root=tmp_path / "lab",
        ldap_port=free_port(),
        kdc_port=free_port(),
        backend_port=impostor.getsockname()[1],
        crl_port=free_port(),
        ocsp_port=free_port(),
        gateway_port=free_port(),
    )
    try:
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{layout.backend_port} \\(KCD_LAB_BACKEND_PORT\\)"):
            runner.up(layout)
        assert not any(runner.status(layout).values())  # nothing was started
        assert probe(layout, "backend") is not None
    finally:
        runner.down(layout)
    assert not any(runner.status(layout).values())


def test_an_answer_that_is_not_http_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    """`lab probe` on a port where something else answers bytes that are not HTTP (another lab's KDC took the
    port the CRL server was to bind: its KRB-ERROR came back to the GET) reports what it saw, so `lab up` fails
    with the RuntimeError the test session's lab retries on new ports; it raised BadStatusLine and the session's
    lab was not retried (every test of a module erred)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        layout = LabLayout(
            root=tmp_path / "lab",
            ldap_port=free_port(),
            kdc_port=free_port(),
            backend_port=port,
            crl_port=port,
            ocsp_port=free_port(),
            gateway_port=free_port(),
        )

        def answer_garbage() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"\x00\x00\x00\x58~V0T\xa0\x03\x02\x01\x05 not an HTTP status line\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        for part in ("crl", "backend"):
            problem = probe(layout, part)
            assert problem is not None
            assert f"127.0.0.1:{port}" in problem
        thread.join(timeout=30)
