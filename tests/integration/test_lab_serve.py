"""The containers' entry points, run natively: `lab serve`, `lab probe` and the scripted device.

The session lab (conftest.py) is brought up by `runner.up`, which starts the kdc, backend and crl parts
through `kcd-proxy lab serve <name>`, the commands the compose services run; every integration test
therefore goes through them. These tests pin that, the health checks, the device's output, and how
`serve kdc` behaves as a container's main process (it stops the realm on SIGTERM, and exits when a
daemon dies so that the container restarts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import kdc, runner
from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, dead_port, free_port, lab_config, start_gateway

PY = sys.executable


def _kcd(layout: LabLayout, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **layout.as_env()}
    return subprocess.run(
        [PY, "-m", "proxy", *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def _device(lab: LabLayout, url: str, user: str) -> subprocess.CompletedProcess[str]:
    users = lab.pki_dir / "users"
    argv = [PY, "-m", "proxy.lab.device", "--url", url, "--cert", str(users / f"{user}.pem")]
    argv += ["--key", str(users / f"{user}.key"), "--cacert", str(lab.pki_dir / "root.pem")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_native_lab_runs_through_the_serve_entry_points(lab: LabLayout) -> None:
    """Each lab part `lab up` started is a `python -m proxy lab serve <name>` process."""
    for name, args in runner.SERVE.items():
        pid = int((lab.run_dir / f"{name}.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        assert argv == [PY, "-m", "proxy", *args]


@pytest.mark.parametrize("component", ["kdc", "backend", "crl"])
def test_health_checks_pass_on_the_running_lab(lab: LabLayout, component: str) -> None:
    """`kcd-proxy lab probe <part>`, the containers' health check, says ok for each running part."""
    done = _kcd(lab, "lab", "probe", component)
    assert (done.returncode, done.stdout.strip()) == (0, f"{component}: ok"), done.stderr


def _handshake_events(gw: Gateway) -> int:
    return gw.log_path.read_text().count('"tls_handshake_')


def test_gateway_health_check_asks_the_admin_listener(lab: LabLayout, tmp_path: Path) -> None:
    """The gateway probe passes once the admin listener's /readyz says 200, leaves no half-done TLS handshake
    in the gateway's log (a bare TCP probe logged one every 5 s), and fails, naming the URL, where none answers."""
    layout = LabLayout.from_env({**lab.as_env(), "KCD_LAB_ADMIN_PORT": str(free_port())})
    gw = start_gateway(lab, tmp_path / "gw", runner.gateway_config(layout, gateway_port=free_port(), admin=True))
    try:
        deadline = time.monotonic() + 60
        while (done := _kcd(layout, "lab", "probe", "gateway")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (done.returncode, done.stdout.strip()) == (0, "gateway: ok"), done.stdout
        before = _handshake_events(gw)  # start_gateway waits for the log's `listening` line: no TCP probe
        for _ in range(3):
            assert _kcd(layout, "lab", "probe", "gateway").returncode == 0
    finally:
        gw.stop()
    assert _handshake_events(gw) == before == 0
    dead = LabLayout.from_env({**lab.as_env(), "KCD_LAB_ADMIN_PORT": str(dead_port())})
    done = _kcd(dead, "lab", "probe", "gateway")
    assert done.returncode == 1
    assert f"http://127.0.0.1:{dead.admin_port}/readyz" in done.stdout


def test_probe_of_a_part_that_is_not_running_fails(tmp_path: Path) -> None:
    """A health check is not a formality: an empty lab directory probes as down, naming the daemons and their logs."""
    empty = LabLayout(root=tmp_path, ldap_port=free_port(), kdc_port=free_port(), backend_port=free_port())
    done = _kcd(empty, "lab", "probe", "kdc")
    assert done.returncode == 1
    assert done.stdout.startswith("kdc: slapd is not running")
    assert f"krb5kdc is not running (pid file {empty.run_dir / 'krb5kdc.pid'}); its log: {empty.kdc_log}" in done.stdout
    assert _kcd(empty, "lab", "probe", "backend").returncode == 1
    assert _kcd(empty, "lab", "probe", "nothing").returncode == 2


def test_crl_server_publishes_the_crls_and_nothing_else(lab: LabLayout) -> None:
    """`lab serve crl` serves the issuing CA's CRL byte for byte, and never the PKI's private keys."""
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{lab.crl_port}/issuing.crl", timeout=30) as r:
        assert r.read() == (lab.pki_dir / "issuing.crl").read_bytes()
    for path in ("/issuing.key", "/../pki/issuing.key", "/server.key"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{lab.crl_port}{path}", timeout=30)
        assert e.value.code == 404, path


def test_device_reaches_the_backend_as_its_certificate_user(lab: LabLayout, tmp_path: Path) -> None:
    """The scripted device: OPTIONS then POST through the gateway; the backend's echo names bob, body intact."""
    fresh = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))  # no earlier backend connection of bob's
    try:
        done = _device(lab, fresh.url, "bob")
    finally:
        assert fresh.stop() == 0
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "OPTIONS /Microsoft-Server-ActiveSync: 200 OK",
        "  MS-ASProtocolVersions: 2.5,12.0,12.1,14.0,14.1,16.0,16.1",
    ]
    assert "  the backend saw: bob@LAB.TEST via Negotiate" in lines
    assert "  body intact: True" in lines
    echo = json.loads(done.stdout[done.stdout.index("{") :])
    assert (echo["method"], echo["path"], echo["site"]) == ("POST", "/Microsoft-Server-ActiveSync", "activesync")
    assert "Cmd=FolderSync" in echo["query"]
    assert echo["connection_request_index"] == 2  # OPTIONS and POST on one kept-alive connection


def test_device_reports_a_refusal_and_fails(lab: LabLayout, gateway: Gateway) -> None:
    """A revoked certificate: the device prints the gateway's stage and reason and exits 1."""
    done = _device(lab, gateway.url, "revoked")
    assert done.returncode == 1
    assert "POST /Microsoft-Server-ActiveSync?Cmd=FolderSync: 403 Forbidden" in done.stdout
    assert "refused at revocation: " in done.stdout


def test_device_reports_a_refused_handshake_and_fails(lab: LabLayout, gateway: Gateway) -> None:
    """A certificate from an untrusted CA ends in the TLS handshake: exit 1 with the alert on stderr."""
    done = _device(lab, gateway.url, "untrusted")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "SSL" in done.stderr
    assert gateway.url in done.stderr


@pytest.fixture
def realm_layout(tmp_path: Path) -> Iterator[LabLayout]:
    layout = LabLayout(root=tmp_path / "lab", ldap_port=free_port(), kdc_port=free_port())
    yield layout
    kdc.stop_realm(layout)


def _serve_kdc(layout: LabLayout) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PY, "-m", "proxy", "lab", "serve", "kdc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **layout.as_env()},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first line comes once the realm is up
    assert line.startswith("lab kdc: realm up"), line + proc.stdout.read()
    assert kdc.realm_status(layout) == {"slapd": True, "krb5kdc": True}
    return proc


def test_serve_kdc_stops_the_realm_on_sigterm(realm_layout: LabLayout) -> None:
    """`serve kdc` as a container's main process: SIGTERM stops slapd and krb5kdc, then it exits 0."""
    proc = _serve_kdc(realm_layout)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert kdc.realm_status(realm_layout) == {"slapd": False, "krb5kdc": False}


def test_serve_kdc_exits_when_a_daemon_dies(realm_layout: LabLayout) -> None:
    """If krb5kdc dies, `serve kdc` stops slapd too and exits 1, so the container restarts whole."""
    proc = _serve_kdc(realm_layout)
    os.kill(int((realm_layout.run_dir / "krb5kdc.pid").read_text()), signal.SIGKILL)
    started = time.monotonic()
    assert proc.wait(timeout=20) == 1
    assert time.monotonic() - started < 10
    assert proc.stdout is not None
    assert "krb5kdc stopped; stopping the realm" in proc.stdout.read()
    assert kdc.realm_status(realm_layout) == {"slapd": False, "krb5kdc": False}


def test_the_labs_keytabs_and_private_keys_are_readable_by_their_owner_only(lab: LabLayout) -> None:
    """The gateway's keytab is a protocol-transition account's key (whoever reads it can be any lab user at
    HTTP/cas), and the PKI's keys and .p12 bundles (password "lab") are the users' and the CAs': none of them is
    readable by the group or by other users of the machine (the keytabs were written 0644)."""
    secrets = [*lab.keytab_dir.glob("*.keytab"), *lab.pki_dir.rglob("*.key"), *lab.pki_dir.rglob("*.p12")]
    assert lab.proxy_keytab in secrets
    assert any(p.suffix == ".p12" for p in secrets)
    loose = {str(p.relative_to(lab.root)): oct(p.stat().st_mode & 0o777) for p in secrets if p.stat().st_mode & 0o077}
    assert loose == {}


def test_lab_down_leaves_alone_a_program_that_took_a_stale_pid_files_number(tmp_path: Path) -> None:
    """A pid file left behind (the lab's process died, the machine restarted) whose number now belongs to another
    program: `lab status` does not count that program as the lab's backend, and `lab down` does not signal it (it
    sent SIGTERM to its whole process group)."""
    layout = LabLayout(root=tmp_path, ldap_port=free_port(), kdc_port=free_port(), backend_port=free_port())
    layout.run_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)  # a group leader, as the lab's were
    try:
        (layout.run_dir / "backend.pid").write_text(f"{stranger.pid}\n")
        status = _kcd(layout, "lab", "status")
        assert json.loads(status.stdout)["backend"] is False, status.stdout
        done = _kcd(layout, "lab", "down")
        assert done.returncode == 0, done.stderr
        assert stranger.poll() is None  # still running
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
