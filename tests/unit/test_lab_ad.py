"""The AD realm's global names derive from its directory: two labs never share a namespace or a veth."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from proxy.lab import ad


def test_two_lab_directories_get_two_namespaces_and_valid_interface_names(tmp_path: Path) -> None:
    """Different directories give different namespace and veth names; veth names fit Linux's 15 characters."""
    one, two = ad.AdRealm.at(tmp_path / "a" / "ad"), ad.AdRealm.at(tmp_path / "b" / "ad")
    assert one.netns != two.netns
    assert set(one.veth).isdisjoint(two.veth)
    for name in (*one.veth, *two.veth):
        assert len(name) <= 15
    assert ad.AdRealm.at(tmp_path / "a" / "ad").netns == one.netns  # stable: a second `up` finds its namespace


def test_the_gateway_configuration_names_the_account_not_the_spn(tmp_path: Path) -> None:
    """The lab's gateway asks AD for a ticket as svc-kcdproxy@AD.TEST (AD gives none to a bare SPN)."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    text = ad.gateway_config(realm, port=9443, backend_port=9081)
    assert 'principal = "svc-kcdproxy@AD.TEST"' in text
    assert 'bind = "127.0.0.1:9443"' in text
    assert 'upstream = "http://127.0.0.1:9081"' in text
    assert 'spn = "HTTP/cas.ad.test"' in text


def test_a_stale_backend_pid_file_names_no_backend(tmp_path: Path) -> None:
    """`backend.pid` naming a live process that is not this realm's Exchange stand-in (the number given since to
    another program, say another test's gateway) is not taken for the backend, so neither `lab up --ad` skips starting
    it nor test_ad signals that program; the stand-in itself, run with this realm's krb5.conf, is found."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    realm.run_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "60"])
    stand_in = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "proxy.lab.backend",
            "--krb5-config",
            str(realm.krb5_conf),
        ]
    )
    try:
        (realm.run_dir / "backend.pid").write_text(f"{stranger.pid}\n")
        assert ad.backend_pid(realm) is None
        (realm.run_dir / "backend.pid").write_text(f"{stand_in.pid}\n")
        deadline = time.monotonic() + 30  # until the child has exec'd (its command line was pytest's before)
        while ad.backend_pid(realm) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ad.backend_pid(realm) == stand_in.pid
    finally:
        for proc in (stranger, stand_in):
            proc.kill()
            proc.wait()


FRESH_SHELL = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}


def _printed_gateway_command(line: str, realm: ad.AdRealm) -> str:
    """The command a printed `ip netns exec NS COMMAND run --config FILE` line runs in the namespace, up to `run`."""
    namespaced = line[line.index(f"ip netns exec {realm.netns} ") :].removeprefix(f"ip netns exec {realm.netns} ")
    return namespaced[: namespaced.index(" run --config ")]


def test_the_printed_gateway_commands_run_from_a_fresh_shell(tmp_path: Path) -> None:
    """The `kcd-proxy run` lines `lab env --ad` and the realm's gateway.toml print start kcd-proxy from a fresh shell
    (no virtualenv activated, another directory): they said `kcd-proxy`, which such a shell does not find (127)."""
    realm = ad.AdRealm.at(tmp_path / "ad")
    env = subprocess.run(
        [sys.executable, "-m", "proxy", "lab", "env", "--ad", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = [line for line in env.splitlines() if " run --config " in line]
    lines += [line for line in ad.gateway_config(realm).splitlines() if " run --config " in line]
    assert len(lines) == 2, (env, lines)
    for line in lines:
        command = _printed_gateway_command(line, realm)
        done = subprocess.run(
            ["bash", "-c", f"{command} run --help"],
            capture_output=True,
            text=True,
            env=FRESH_SHELL,
            cwd="/",
            timeout=60,
            check=False,
        )
        assert (done.returncode, "--config" in done.stdout) == (0, True), (line, done.stdout, done.stderr)
