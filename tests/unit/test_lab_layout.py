"""A lab layout travels between processes and containers as KCD_LAB_* variables, and names its hosts."""

from __future__ import annotations

import os
import subprocess
import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout


def test_layout_survives_the_trip_through_the_environment(tmp_path: Path) -> None:
    """as_env() then from_env() gives the same layout: what `lab up` hands to `lab serve`."""
    layout = LabLayout(root=tmp_path, ldap_port=1389, kdc_port=1088, backend_port=1081, bind_host="0.0.0.0")
    layout = replace(layout, kdc_host="kdc", backend_host="backend", crl_host="crl")
    assert LabLayout.from_env(layout.as_env()) == layout


def test_unset_variables_keep_the_native_defaults(tmp_path: Path) -> None:
    """Only KCD_LAB_DIR set: loopback everywhere and the documented ports."""
    layout = LabLayout.from_env({"KCD_LAB_DIR": str(tmp_path)})
    assert layout == LabLayout(root=tmp_path)
    assert (layout.bind_host, layout.kdc_host, layout.kdc_port) == ("127.0.0.1", "127.0.0.1", 8088)


def test_explicit_root_wins_over_the_environment(tmp_path: Path) -> None:
    """`kcd-proxy lab --dir X` names the directory even when KCD_LAB_DIR says otherwise."""
    layout = LabLayout.from_env({"KCD_LAB_DIR": "/elsewhere", "KCD_LAB_KDC_PORT": "1234"}, root=tmp_path)
    assert (layout.root, layout.kdc_port) == (tmp_path, 1234)


@pytest.mark.parametrize("value", ["eighty", "0", "70000", "-1", ""])
def test_a_bad_port_names_its_variable(tmp_path: Path, value: str) -> None:
    """A port that is not 1..65535 is refused with the variable's name, not a traceback deep in a daemon."""
    with pytest.raises(ValueError, match="KCD_LAB_BACKEND_PORT"):
        LabLayout.from_env({"KCD_LAB_DIR": str(tmp_path), "KCD_LAB_BACKEND_PORT": value})


@pytest.mark.parametrize(
    ("bind", "local"), [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("10.1.2.3", "10.1.2.3")]
)
def test_a_wildcard_bind_is_reached_on_loopback(tmp_path: Path, bind: str, local: str) -> None:
    """Health checks reach a daemon bound to every interface through loopback, a specific address directly."""
    assert LabLayout(root=tmp_path, bind_host=bind).local_host == local


def test_make_lab_serves_the_configuration_of_the_lab_it_brought_up(tmp_path: Path) -> None:
    """`make lab` with the lab moved (`KCD_LAB_DIR`, or `KCD_LAB_*` ports) served config/lab.toml, which names the
    default lab's files and ports: the gateway did not start, or listened where the printed curl does not go. It
    serves the configuration `lab up` wrote for that lab, which is config/lab.toml's twin for the default lab."""
    repo = Path(__file__).parents[2]
    env = {**os.environ, "KCD_LAB_DIR": str(tmp_path / "moved")}
    plan = subprocess.run(["make", "-n", "lab"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    run = [line for line in plan.stdout.splitlines() if " -m proxy run " in line]
    assert len(run) == 1, plan.stdout
    assert run[0].endswith(f"--config {tmp_path / 'moved'}/gateway.toml"), run[0]
    layout = LabLayout.from_env(env, root=tmp_path / "moved")
    written = tomllib.loads(runner.gateway_config(layout, admin=True))
    checked_in = tomllib.loads((repo / "config" / "lab.toml").read_text())
    assert written["doctor"] == checked_in["doctor"]  # `kcd-proxy doctor --config` needs its canary too
    assert written["admin"] == checked_in["admin"]


def test_config_lab_toml_is_the_twin_of_what_lab_up_writes_for_the_default_lab() -> None:
    """Issue 2: `make lab` runs the gateway "with config/lab.toml". It serves the gateway.toml `lab up` wrote (the
    right one for a moved lab); for the default `.lab/` that file and config/lab.toml must say the same, key for key,
    with config/lab.toml's paths read relative to its own directory, as the gateway reads them."""
    repo = Path(__file__).parents[2]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KCD_LAB_")}
    layout = LabLayout.from_env(environment, root=repo / ".lab")
    written = tomllib.loads(runner.gateway_config(layout, admin=True))

    def resolved(value: object) -> object:
        if isinstance(value, dict):
            return {k: resolved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolved(v) for v in value]
        if isinstance(value, str) and value.startswith("../"):
            return str((repo / "config" / value).resolve())
        return value

    checked_in = resolved(tomllib.loads((repo / "config" / "lab.toml").read_text()))
    assert checked_in == written


def test_the_default_ports_are_outside_the_ephemeral_range() -> None:
    """No default lab port lies in the kernel's ephemeral range, where an outgoing connection's own end (on a busy
    machine, or a readiness probe connecting to itself) can hold it when the daemon binds."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    layout = LabLayout(root=Path("/nowhere"))
    ports = {f.name: getattr(layout, f.name) for f in fields(LabLayout) if f.name.endswith("_port")}
    assert len(ports) >= 7
    assert not [name for name, port in ports.items() if low <= port <= high], (low, high, ports)
