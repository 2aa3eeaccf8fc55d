"""The AD lab's tools (samba-tool, ldbmodify) failing against the real Samba realm: the error names the step, never
the password the step was given (`proxy.lab.tools`)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, kdc_log_offset

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


def _weak() -> str:
    """A password the domain's policy refuses (lower-case letters only: one character class of the three needed)."""
    return "weak" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16))


def _strong() -> str:
    return f"Lt-{secrets.token_hex(8)}-Pa55"


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("existing name", lambda password: ("user", "create", "alice", password)),
        ("refused by policy", lambda password: ("user", "create", f"lt{secrets.token_hex(4)}", password)),
        ("invalid name", lambda password: ("user", "create", "bad/name*?", password)),
        ("no such user", lambda password: ("user", "setpassword", "nobody-here", f"--newpassword={password}")),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_failing_samba_tool_step_names_the_command_but_not_the_password(
    ad_realm: ad.AdRealm, capfd: pytest.CaptureFixture[str], case: str, args: object
) -> None:
    """samba-tool refusing a step (the user exists, the policy refuses the password, the name is invalid, no such user)
    raises AdRealmError naming `samba-tool user ...` and samba-tool's reason; the password is in neither the message,
    nor this process's stdout/stderr, nor Samba's log (it quoted `samba-tool user create alice <password>` whole)."""
    password = _weak() if case == "refused by policy" else _strong()
    argv = args(password)  # type: ignore[operator]
    offset = kdc_log_offset(ad_realm)
    with pytest.raises(ad.AdRealmError) as e:
        ad_realm.samba_tool(*argv)
    message = str(e.value)
    assert f"samba-tool {argv[0]} {argv[1]}" in message
    assert "exited with" in message
    assert password not in message
    assert "***" in message
    out, err = capfd.readouterr()
    assert password not in out + err
    assert password not in ad_realm.samba_log.read_bytes()[offset:].decode(errors="replace")


def test_a_provisioning_step_that_fails_does_not_quote_the_admin_password() -> None:
    """`samba-tool domain provision --adminpass=...` refusing its arguments (here an option it does not know): the
    error names the command with `--adminpass=***`."""
    password = _strong()
    argv = ["samba-tool", "domain", "provision", f"--adminpass={password}", "--no-such-option-of-samba"]
    with pytest.raises(ad.AdRealmError) as e:
        ad._run(argv)
    assert "samba-tool domain provision" in str(e.value)
    assert "--adminpass=***" in str(e.value)
    assert password not in str(e.value)


def test_a_samba_whose_kdc_is_slow_to_accept_is_waited_for_never_stopped(tmp_path: Path) -> None:
    """`ad.ensure` on a realm whose samba runs but whose port 88 does not accept (a loaded machine; here a stand-in
    process in a namespace of its own, nothing on 88) waits up to its deadline and raises naming the pid and the fix,
    leaving the process running: it stopped everything in the namespace after one 2 s probe, under another run."""
    if os.geteuid() != 0:
        pytest.skip("the AD realm's namespace needs root (make test runs as root)")
    realm = ad.AdRealm.at(tmp_path / "ad")
    ad.ensure_namespace(realm)
    try:
        realm.marker.parent.mkdir(parents=True, exist_ok=True)
        realm.marker.write_text("a realm another run started\n")
        samba = realm.popen(["sleep", "600"], log=realm.run_dir / "stand-in.log")
        (realm.run_dir / "samba.pid").write_text(f"{samba.pid}\n")  # `ip netns exec` execs sleep: the same pid
        with pytest.raises(ad.AdRealmError) as refused:
            ad.ensure(realm, wait=2)
        assert f"samba (pid {samba.pid}) runs in namespace {realm.netns}" in str(refused.value)
        assert "lab down --ad" in str(refused.value)
        assert samba.poll() is None, "the realm's samba was stopped"
    finally:
        ad.down(realm)
    assert samba.wait(timeout=30) is not None


_KILLED_CALLER = """
import sys
from proxy.lab import tools
tools.run(sys.argv[1:], RuntimeError, timeout=600)
"""


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid`, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for init to reap it has ended)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_a_samba_tool_whose_caller_is_killed_ends_with_it(tmp_path: Path) -> None:
    """`samba-tool domain provision` run by the lab's tools (as `ad.ensure` runs it, with the realm's shared lock named
    in its environment) from a process that is then SIGKILLed (a test run or worker killed midway) ends at once: it
    went on alone, adopted by init, writing a half-made realm that the next session provisions again in the same
    directory, and a run stopping what killed runs left leaves it running while any session holds the realm."""
    target = tmp_path / "provision"
    argv = [
        "samba-tool", "domain", "provision", f"--targetdir={target}", "--realm=SCENE.TEST", "--domain=SCENE",
        "--server-role=dc", "--dns-backend=NONE", f"--adminpass={_strong()}",
    ]  # fmt: skip
    repo = str(Path(__file__).resolve().parents[2])
    caller = subprocess.Popen([sys.executable, "-c", _KILLED_CALLER, *argv], env={**os.environ, "PYTHONPATH": repo})
    tool = None
    try:
        deadline = time.monotonic() + 60
        while tool is None and time.monotonic() < deadline and caller.poll() is None:
            running = [pid for pid in _children(caller.pid) if b"samba-tool" in _cmdline(pid)]
            tool = running[0] if running else None
            time.sleep(0.1)
        assert tool is not None, "samba-tool did not start"
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 30
        while _alive(tool) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(tool), f"samba-tool (pid {tool}) went on after its caller was killed"
    finally:
        caller.kill()
        if tool is not None and _alive(tool):
            os.kill(tool, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""
