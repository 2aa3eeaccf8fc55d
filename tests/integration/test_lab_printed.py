"""What `kcd-proxy lab up` (and `lab env`) prints for a newcomer to paste, run as printed.

`make lab` prints the requests to try through the gateway: a lab user's certificate, a certificate the gateway
refuses, and a Basic sign-in (on `gateway-basic.toml`, the lab's configuration in `certificate-or-basic` mode,
which the printed line says how to serve). Each is run here with its flags as printed; only the port is the
test gateway's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, start_gateway


def _printed_curls(text: str) -> list[list[str]]:
    """The curl commands in `text`, each joined across its `\\` continuation lines and split as a shell would."""
    commands, current = [], ""
    for line in text.splitlines():
        if current or line.startswith("curl "):
            current += line.removesuffix("\\")
            if not line.endswith("\\"):
                commands.append(shlex.split(current))
                current = ""
    return commands


def _run(argv: list[str], url: str) -> tuple[str, int]:
    """The printed curl, its URL moved to the test gateway's port; the body and the status."""
    path = urlsplit(argv[-1]).path
    done = subprocess.run(
        [*argv[:-1], "-sS", "--max-time", "60", "-w", "\n%{http_code}", url + path],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    body, _, code = done.stdout.rpartition("\n")
    return body + done.stderr, int(code)


def test_the_printed_requests_run_as_printed(lab: LabLayout, tmp_path: Path) -> None:
    """`lab env` prints alice's certificate request (200 as alice), a revoked certificate's (403 naming the
    revocation) and a Basic sign-in with alice's password (200 as alice) on gateway-basic.toml; only the first
    was printed, so a newcomer had no Basic or refused request to try."""
    env = {**os.environ, **lab.as_env()}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "lab", "env"], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    curls = _printed_curls(done.stdout)
    assert len(curls) == 3, done.stdout
    basic = lab.root / "gateway-basic.toml"
    assert f"--config {basic}" in done.stdout
    text = basic.read_text()
    assert tomllib.loads(text)["authentication"]["mode"] == "certificate-or-basic"
    gw = start_gateway(lab, tmp_path, text.split("\n[admin]\n", 1)[0])  # its admin port may be another lab's
    try:
        certificate, revoked, password = curls
        body, status = _run(certificate, gw.url)
        assert (status, json.loads(body)["principal"]) == (200, "alice@LAB.TEST"), body
        assert any(arg.endswith("revoked.pem") for arg in revoked)
        body, status = _run(revoked, gw.url)
        assert status == 403, body
        assert "was revoked" in body
        assert "-u" in password
        body, status = _run(password, gw.url)
        assert (status, json.loads(body)["principal"]) == (200, "alice@LAB.TEST"), body
    finally:
        gw.stop()
