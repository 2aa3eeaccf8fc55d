"""Every command, run as a process, on a configuration with a mistake: the exit code issue #8 states, and the
line naming the key and the file. A stranger's typo must never start a gateway or pass as a verdict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, free_port, lab_config

# A mistake, and the line that must name it (the key, then the file).
MISTAKES = [
    ("unknown key", ("[listener]\n", '[listener]\nbnid = "127.0.0.1:1"\n'), "listener.bnid: unknown key"),
    ("bad value", ('source = "san-upn"\n', 'source = "san-upn"\nmapping = "strict"\n'), "identity.mapping: expected"),
    ("bad type", ("[listener]\n", '[listener]\nworkers = "2"\n'), "listener.workers: expected int"),
    (
        "bad backdating",
        ('source = "san-upn"\n', 'source = "san-upn"\ncertificate_backdating_compensation = -1\n'),
        "identity.certificate_backdating_compensation: must be seconds from 0",
    ),
    (  # issue 14: a name that starts like localhost is resolved, not prefix-matched
        "admin not loopback",
        ("[listener]\n", '[admin]\nbind = "localhost.attacker.example:9443"\n\n[listener]\n'),
        "admin.bind: localhost.attacker.example is not loopback",
    ),
]

# Each command: its arguments after the file, and the exit status a configuration error gives.
COMMANDS = {
    "check-config": ((), 1),
    "explain": (("--cert", "{alice}"), 2),
    "doctor": ((), 2),
    "run": ((), 2),
}


def _argv(command: str, config: Path, lab: LabLayout) -> list[str]:
    extra, _ = COMMANDS[command]
    alice = str(lab.pki_dir / "users" / "alice.pem")
    target = [str(config)] if command == "check-config" else ["--config", str(config)]
    return [sys.executable, "-m", "proxy", command, *target, *(a.format(alice=alice) for a in extra)]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("edit", "named"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_named_with_the_commands_exit_code(
    lab: LabLayout, tmp_path: Path, command: str, edit: tuple[str, str], named: str
) -> None:
    """check-config exits 1, explain, doctor and run exit 2; the output names the key and the file; run
    serves nothing and no command prints a traceback."""
    config = tmp_path / "gateway.toml"
    text = lab_config(lab, port=free_port())
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1], 1))
    done = subprocess.run(
        _argv(command, config, lab),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
        env={**os.environ, **lab.env()},
    )
    output = done.stdout + done.stderr
    assert done.returncode == COMMANDS[command][1], output
    line = next((x for x in output.splitlines() if named in x), None)
    assert line is not None, output
    assert str(config) in line
    assert "Traceback" not in output
    if command in ("explain", "doctor", "run"):
        assert done.stdout == ""  # the verdict's place stays empty: the problem is on stderr


@pytest.mark.parametrize("command", ["explain", "check-config", "lab env"])
def test_a_reader_that_went_away_ends_the_command_quietly(lab: LabLayout, tmp_path: Path, command: str) -> None:
    """A command whose output pipe has no reader (`kcd-proxy explain ... | head -1` once head has exited) ends
    with 141 (as a shell tool killed by SIGPIPE) and nothing on stderr: no traceback, no critical log line."""
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=free_port()))
    argv = {
        "explain": ["explain", "--config", str(config), "--cert", str(lab.pki_dir / "users" / "alice.pem"), "--json"],
        "check-config": ["check-config", str(config)],
        "lab env": ["lab", "env", "--dir", str(lab.root)],
    }[command]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
            env={**os.environ, **lab.env()},
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
