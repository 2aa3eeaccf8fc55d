"""Every command, run as a process, on a configuration with a mistake: the exit code issue #8 states, and the
line naming the key and the file. A stranger's typo must never start a gateway or pass as a verdict."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
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


def _as_nobody(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`kcd-proxy ARGV`'s exit status and output, run as nobody in a forked child of this process (a new interpreter
    run as nobody could not import this checkout from a clone directory of mode 0700, as `mktemp -d` makes). The
    child gives up after 30 s (SIGALRM), so a gateway that starts serving ends the test instead of hanging it."""
    import importlib

    from proxy import cli

    # what the commands import when they run, imported before the child drops to nobody (this interpreter's own
    # standard library may be in a directory nobody may read: a pyenv build under /root)
    modules = ("proxy.app", "proxy.live", "proxy.ops.check", "proxy.ops.explain", "proxy.ops.doctor")
    for module in (*modules, "uvloop", "concurrent.futures.thread"):
        importlib.import_module(module)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  pytest's capture is not the file descriptors
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.environ.update(env)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler: the kernel ends it
            signal.alarm(30)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            status = cli.main(argv)
        except BaseException:  # whatever escaped is the test's to see, as the traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as out:
        output = out.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the commands as another user (nobody)")
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("key", ["kerberos.keytab", "listener.private_key"])
def test_a_file_the_gateways_user_cannot_read_is_named_with_the_fix(lab: LabLayout, command: str, key: str) -> None:
    """The gateway started as a user who cannot read its keytab or its TLS key (root's, mode 0600): each command
    exits as for any configuration error, naming the key, the file, the user and the fix. Before, `run` served with
    an unreadable keytab (every request then 502) and died with a PermissionError traceback on the TLS key; explain
    and doctor did much the same; only check-config named them."""
    shared = Path(tempfile.mkdtemp(prefix="kcd-unreadable-"))
    try:
        shared.chmod(0o755)  # nobody may reach the files: the configuration, the lab's PKI, krb5.conf and keytab
        for part in ("pki", "keytabs"):
            shutil.copytree(lab.root / part, shared / part)
        shutil.copy(lab.krb5_conf, shared / "krb5.conf")
        for path in (shared, *shared.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        secret = {
            "kerberos.keytab": shared / "keytabs" / "proxy.keytab",
            "listener.private_key": shared / "pki" / "server.key",
        }[key]
        secret.chmod(0o600)
        text = lab_config(lab, port=free_port()).replace(str(lab.root), str(shared))
        assert str(lab.root) not in text
        config = shared / "gateway.toml"
        config.write_text(text)
        config.chmod(0o644)
        argv = [a.replace(str(lab.root), str(shared)) for a in _argv(command, config, lab)[3:]]  # after `-m proxy`
        code, output = _as_nobody(argv, {**lab.env(), "KRB5_CONFIG": str(shared / "krb5.conf")})
        assert code == COMMANDS[command][1], output
        line = next(
            (x for x in output.splitlines() if f"{key}: {secret}: not readable by nobody (Permission denied)" in x),
            None,
        )
        assert line is not None, output
        assert "give the gateway's user read access" in line
        assert str(config) in line
        assert "Traceback" not in output
        assert '"listening"' not in output
    finally:
        shutil.rmtree(shared)
