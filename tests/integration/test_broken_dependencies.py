"""A dependency imported only where it is used (bonsai, pyasn1_modules: docs/testing.md, what a start costs) that is
installed but does not import (a half-finished upgrade, a pyasn1 too new for its pyasn1_modules, libldap missing):
a gateway that would use it stops at its start naming it, never at a device's request later. Each case puts a broken
copy of the package first on the gateway's PYTHONPATH, as a broken install leaves one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, dead_port, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT

# A [directory] no gateway reaches (the start does not need it to answer), and the strong mode reading certificates'
# SIDs with pyasn1_modules and accounts with bonsai.
DIRECTORY = """
[directory]
urls = ["ldap://127.0.0.1:{port}"]
base_dn = "DC=lab,DC=test"
bind = "kerberos"
"""

BROKEN = {
    # what pyasn1_modules 0.2 says under pyasn1 0.6, and what bonsai says without its libldap
    "pyasn1_modules": ("rfc5280.py", "raise ImportError(\"cannot import name 'opentype' from 'pyasn1.type'\")\n"),
    "bonsai": ("__init__.py", 'raise ImportError("libldap.so.2: cannot open shared object file")\n'),
}


def _broken_copy(root: Path, package: str) -> Path:
    """A directory holding `package` as a broken install leaves it: found, but its import raises."""
    module, text = BROKEN[package]
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (root / package / module).write_text(text)
    return root


def _start(lab: LabLayout, config: Path, log: Path, path: Path) -> tuple[int | None, str]:
    """`kcd-proxy run` with `path` first on PYTHONPATH: its exit code once it ends, or None once it listens (then
    stopped); and its output."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **lab.env(), "PYTHONPATH": str(path)},
        )
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            code = proc.poll()
            text = log.read_text(errors="replace")
            if code is not None:
                return code, text
            if '"event": "listening"' in text:
                return None, text
            time.sleep(0.1)
        raise AssertionError(f"neither stopped nor listening after {WAIT} s: {log.read_text()[-3000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=WAIT)


@pytest.mark.parametrize("package", ["pyasn1_modules", "bonsai"])
def test_a_broken_lazily_imported_dependency_stops_the_start_naming_it(
    lab: LabLayout, tmp_path: Path, package: str
) -> None:
    """A strong-mapping gateway ([directory]) with `package` installed but broken stops at its start before it listens
    (exit 2), naming [directory], the package and what its import said: pyasn1_modules (the SID extension's decoder)
    was imported at a device's first certificate with a SID, so the gateway listened; bonsai's stopped it with a
    traceback (`uncaught_exception`)."""
    config = tmp_path / "gateway.toml"
    config.write_text(_strong(lab, free_port()))
    code, output = _start(lab, config, tmp_path / "gateway.log", _broken_copy(tmp_path / "site", package))
    assert code == 2, output[-3000:]
    assert f"configuration error: [directory] needs the package '{package}', which does not import" in output, output
    assert ("opentype" if package == "pyasn1_modules" else "libldap.so.2") in output, output[-3000:]


def _strong(lab: LabLayout, port: int) -> str:
    """The lab's configuration in `strong-or-audit` with a [directory] no gateway reaches."""
    text = lab_config(lab, port=port).replace('[identity]\nsource = "san-upn"\n', "")
    return text + '\n[identity]\nmapping = "strong-or-audit"\n' + DIRECTORY.format(port=dead_port())


def test_a_reload_adding_a_directory_with_a_broken_bonsai_is_refused_naming_it(lab: LabLayout, tmp_path: Path) -> None:
    """A gateway started without [directory] (bonsai never imported) and a broken bonsai: a reload adding [directory]
    is refused (`reload_refused`) naming the package, and the gateway serves on with what it had."""
    port = free_port()
    site = _broken_copy(tmp_path / "site", "bonsai")
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=port), env={"PYTHONPATH": str(site)})
    try:
        gw.mark()
        gw.config_path.write_text(_strong(lab, port))
        gw.proc.send_signal(signal.SIGHUP)
        refused = gw.wait_events("reload_refused")[-1]
        assert any("[directory] needs the package 'bonsai'" in p for p in refused["problems"]), refused
        assert gw.proc.poll() is None
    finally:
        gw.stop()


@pytest.mark.parametrize("package", ["pyasn1_modules", "bonsai"])
def test_check_config_says_what_run_would_of_a_broken_lazily_imported_dependency(
    lab: LabLayout, tmp_path: Path, package: str
) -> None:
    """check-config on the strong-mapping configuration with `package` installed but broken exits 1 (its exit code
    for a configuration `run` refuses) with `run`'s line naming [directory], the package and what its import said:
    session 22's note said check-config did not import them; it does, through `app.build` (this pins it)."""
    config = tmp_path / "gateway.toml"
    config.write_text(_strong(lab, free_port()))
    site = _broken_copy(tmp_path / "site", package)
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **lab.env(), "PYTHONPATH": str(site)},
        timeout=WAIT,
        check=False,
    )
    output = checked.stdout + checked.stderr
    assert checked.returncode == 1, output
    assert f"[directory] needs the package '{package}', which does not import" in checked.stdout, output
    assert ("opentype" if package == "pyasn1_modules" else "libldap.so.2") in checked.stdout, output
    assert "Traceback" not in output, output
