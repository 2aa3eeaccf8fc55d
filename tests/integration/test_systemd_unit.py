"""deploy/systemd/kcd-proxy.service's sandbox, run without systemd: what the gateway needs of it still works.

No systemd runs as PID 1 here, so the unit itself cannot be started (test_deploy.py has systemd verify it and
rate its exposure). What can run is the kernel's side of a directive: `MemoryDenyWriteExecute=yes` refuses a
mapping both writable and executable, and making one executable later; Linux 6.3+ does the same for a process
with `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)`, inherited by its children and kept across exec (systemd
253+ uses that prctl; Debian 12's 252 a seccomp filter with the same refusals). The gateway started that way
serves a certificate request and a Basic sign-in (every native library it loads: OpenSSL through `ssl` and
cryptography, MIT krb5 through python-gssapi and ctypes, uvloop, the HTTP parser), with two workers (forked).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import curl, free_port, lab_config, start_gateway

PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1
# Sets the flag, checks it is set, then runs the Python it was given with the rest of its arguments.
_MDWE_LAUNCHER = f"""\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_MDWE): errno {{ctypes.get_errno()}}")
assert libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0) == {PR_MDWE_REFUSE_EXEC_GAIN}
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _mdwe_launcher(tmp_path: Path) -> tuple[str, ...]:
    script = tmp_path / "mdwe.py"
    script.write_text(_MDWE_LAUNCHER)
    return (sys.executable, str(script))


def test_the_launcher_refuses_writable_executable_memory(tmp_path: Path) -> None:
    """The check is not a formality: under the launcher, a W+X mapping is refused (as under the unit)."""
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if plain.returncode != 0:
        pytest.fail(f"a W+X mapping fails even without the launcher: {plain.stderr}")
    refused = subprocess.run([*_mdwe_launcher(tmp_path), "-c", probe], capture_output=True, text=True, check=False)
    assert refused.returncode != 0, "a W+X mapping was made under PR_SET_MDWE"
    assert "PermissionError" in refused.stderr, refused.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_the_gateway_serves_without_writable_executable_memory(lab: LabLayout, tmp_path: Path, workers: int) -> None:
    """Under MemoryDenyWriteExecute's kernel equivalent the gateway serves alice's certificate and bob's Basic
    sign-in through S4U2Self/S4U2Proxy and Negotiate (one worker, and two forked ones)."""
    port = free_port()
    text = lab_config(lab, port=port) + '\n[authentication]\nmode = "certificate-or-basic"\n'
    text = text.replace("[listener]\n", f"[listener]\nworkers = {workers}\n", 1)
    gw = start_gateway(lab, tmp_path / "gw", text, launcher=_mdwe_launcher(tmp_path))
    try:
        done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", "alice")
        body, _, status = done.stdout.rpartition("\n")
        assert status == "200", done.stdout + done.stderr
        assert json.loads(body)["principal"] == "alice@LAB.TEST"
        done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", None, "-u", "bob:bob-Pa55")
        body, _, status = done.stdout.rpartition("\n")
        assert status == "200", done.stdout + done.stderr
        assert json.loads(body)["principal"] == "bob@LAB.TEST"
    finally:
        assert gw.stop() == 0, gw.log_path.read_text()[-3000:]
