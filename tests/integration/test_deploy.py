"""Deployment artefacts: docker-compose.yml, the images and the systemd unit, checked without a Docker engine
(test_compose.py builds and runs them on one).

The compose file is checked three ways: Debian's docker-compose parses and
validates it (`config -q`); every command and health check is parsed by the project's own argument
parsers (it names a real console script or module, with arguments they accept); and the services run
exactly the entry points the native lab runs (`proxy.lab.runner.SERVE`), which the integration tests
exercise. The systemd unit goes through `systemd-analyze verify` and `security --offline`.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.lab import ad_compose, backend, device, probe, runner, serve
from proxy.lab import handout as handout_module
from proxy.lab.layout import LabLayout, variable
from tests.integration.conftest import REPO, dead_port

COMPOSE = REPO / "docker-compose.yml"
UNIT = REPO / "deploy" / "systemd" / "kcd-proxy.service"
CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# Modules a service may run with `python3 -m`, and their argument parsers.
MODULE_PARSERS = {
    "proxy.lab.device": device.parse_args,
    "proxy.lab.probe": probe.parse_args,
    "proxy.lab.backend": backend._parse_args,  # profile ad: the AD keytab (`lab serve backend`: the MIT one)
}
AD_SERVICES = {"dc", "ad-handout", "ad-backend", "ad-gateway", "ad-device"}  # profile ad (docs/containers.md)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _lab_services() -> dict[str, dict[str, Any]]:
    """The services that run the kcd-proxy package on the lab volume (all but the balancer)."""
    return {name: s for name, s in _services().items() if name != "balancer"}


def _layout(service: dict[str, Any]) -> LabLayout:
    return LabLayout.from_env(service["environment"])


def _check_argv(argv: list[str]) -> None:
    """An exec-form command names a console script or module of this project, with arguments it accepts."""
    assert isinstance(argv, list), f"{argv!r}: use the exec form (a list), never a shell string"
    if argv[0] in CONSOLE_SCRIPTS:
        module, _, function = CONSOLE_SCRIPTS[argv[0]].partition(":")
        assert callable(getattr(importlib.import_module(module), function))
        args = cli.parser().parse_args(argv[1:])  # argparse exits (SystemExit) on anything it rejects
        if args.command == "lab" and args.action in ("serve", "probe"):
            assert args.component in (serve.COMPONENTS if args.action == "serve" else serve.PROBES), argv
        return
    assert argv[:2] == ["python3", "-m"], f"{argv!r}: not a console script of pyproject.toml nor `python3 -m`"
    assert argv[2] in MODULE_PARSERS, f"{argv[2]}: not a module known to run as a service"
    MODULE_PARSERS[argv[2]](argv[3:])


def test_docker_compose_validates_the_file() -> None:
    """Debian's docker-compose (no engine needed) parses and validates docker-compose.yml."""
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: `make setup` installs it (Debian package docker-compose)"
    done = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # not even a warning


def test_the_lab_services_are_all_there() -> None:
    """The issue's four services, plus the one-shot pki and handout steps and the CRL server; the profile `scale`
    adds the balancer, two gateways behind it and a device in front of it; the profile `ad` the realm AD.TEST (its
    DC, its handout, backend, gateway and device), and nothing else."""
    services = _services()
    assert (
        set(services)
        == {"pki", "kdc", "handout", "backend", "crl", "gateway", "device"}
        | {
            "balancer",
            "gateway-1",
            "gateway-2",
            "device-scaled",
        }
        | AD_SERVICES
    )
    profiled = {name: s["profiles"] for name, s in services.items() if s.get("profiles")}
    scaled = {"balancer", "gateway-1", "gateway-2", "device-scaled"}
    assert profiled == {name: ["scale"] for name in scaled} | {name: ["ad"] for name in AD_SERVICES}


def test_every_command_and_health_check_exists_in_the_project() -> None:
    """Each service's command and health check parses with the project's own command-line parsers."""
    for name, service in _lab_services().items():
        assert "entrypoint" not in service, name
        _check_argv(service["command"])
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD", f"{name}: health check must be exec form"
            _check_argv(test[1:])


# What a health check has no use for: the command line's imports (configuration, TLS, HTTP, Kerberos libraries).
HEAVY_MODULES = ("cryptography", "aiohttp", "gssapi", "bonsai", "proxy.config", "proxy.cli")


def test_the_health_checks_import_only_what_they_ask_with(tmp_path: Path) -> None:
    """Each service's health check, run here against ports nothing answers on, says what is wrong and exits 1
    without importing the command line (cryptography, aiohttp, gssapi...): `kcd-proxy lab probe` did, 0.24 s of CPU
    every 5 s in every container, 2 s of wall time at load 28, and at load 30 every probe passed its 5 s timeout:
    `docker-compose up -d` stopped on "Container is unhealthy" while every service answered."""
    dead = {variable(name): str(dead_port()) for name in ("ldap_port", "kdc_port", "backend_port", "crl_port")}
    dead[variable("admin_port")] = str(dead_port())
    for name, service in _lab_services().items():
        if "healthcheck" not in service:
            continue
        argv = service["healthcheck"]["test"][1:]
        assert argv[:3] == ["python3", "-m", "proxy.lab.probe"], name
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "KCD_LAB_DIR": str(tmp_path), **dead}
        done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 1, (name, done.stdout, done.stderr[-2000:])
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
        assert "proxy.lab.layout" in imported, name  # the import profile is there to look at
        heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY_MODULES or m in HEAVY_MODULES)
        assert heavy == [], (name, heavy)
        assert argv[-1] in done.stdout + done.stderr, (name, done.stdout)


def test_the_balancer_passes_tcp_with_proxy_v2_to_both_gateways() -> None:
    """HAProxy in TCP mode (TLS ends on the gateways), send-proxy-v2 to gateway-1 and gateway-2, which expect it
    from the balancer's network only; the devices in front reach no gateway but through the balancer."""
    cfg = (REPO / "deploy" / "balancer" / "haproxy.cfg").read_text()
    assert re.search(r"^\s+mode tcp$", cfg, re.MULTILINE)
    servers = re.findall(r"^\s+server (\S+) (\S+) (.*)$", cfg, re.MULTILINE)
    assert [(name, address, options.split()) for name, address, options in servers] == [
        (f"gateway-{n}", f"gateway-{n}:8443", ["send-proxy-v2", "check", "check-send-proxy", "inter", "2s"])
        for n in (1, 2)
    ]
    assert re.search(r"^\s+option redispatch$", cfg, re.MULTILINE)  # a dead gateway's devices go to another
    services = _services()
    for replica in ("gateway-1", "gateway-2"):
        assert services[replica]["command"] == ["kcd-proxy", "run", "--config", "/lab/gateway-balanced.toml"]
        assert set(services[replica]["networks"]) == {"lab", "balanced", "devices"}
    assert set(services["balancer"]["networks"]) == {"balanced", "front"}
    assert services["device-scaled"]["networks"] == ["front"]
    # the gateways take PROXY headers from the balancer's own fixed address (a /32), not from its network's subnet
    address = services["balancer"]["networks"]["balanced"]["ipv4_address"]
    assert re.fullmatch(r"\$\{KCD_LAB_BALANCER_ADDRESS:-[0-9.]+\}", address), address
    assert services["pki"]["environment"]["KCD_LAB_BALANCER_SUBNET"] == f"{address}/32"
    [config] = _compose()["networks"]["balanced"]["ipam"]["config"]
    assert list(config) == ["subnet"]
    assert re.fullmatch(r"\$\{KCD_LAB_BALANCER_SUBNET:-[0-9./]+\}", config["subnet"]), config
    default = ipaddress.ip_address(address.split(":-")[1].rstrip("}"))
    assert default in ipaddress.ip_network(config["subnet"].split(":-")[1].rstrip("}")), (address, config)


def test_compose_runs_the_entry_points_the_native_lab_runs() -> None:
    """kdc, backend and crl run `kcd-proxy lab serve <name>`, exactly what `lab up` spawns natively."""
    services = _services()
    for name, args in runner.SERVE.items():
        assert services[name]["command"] == ["kcd-proxy", *args]
    assert services["pki"]["command"] == ["kcd-proxy", "lab", "init"]
    assert services["gateway"]["command"][:2] == ["kcd-proxy", "run"]


def test_services_refer_to_files_the_lab_makes_in_the_volume() -> None:
    """The gateway's configuration and the device's certificate are where `lab init` puts them."""
    services = _services()
    gateway = _layout(services["gateway"])
    assert services["gateway"]["command"][2:] == ["--config", str(gateway.root / "gateway.toml")]
    args = device.parse_args(services["device"]["command"][3:])
    pki = _layout(services["device"]).pki_dir
    assert (args.cert, args.key, args.cacert) == (
        str(pki / "users" / "alice.pem"),
        str(pki / "users" / "alice.key"),
        str(pki / "root.pem"),
    )


def test_only_the_gateway_publishes_a_port_and_only_on_loopback() -> None:
    """Nothing of the lab but the gateway (and the balancer) is reachable from outside Docker, on 127.0.0.1 only."""
    published = {name: s["ports"] for name, s in _services().items() if "ports" in s}
    port = LabLayout(root=Path()).gateway_port
    assert published == {
        "gateway": [f"127.0.0.1:${{KCD_GATEWAY_PORT:-{port}}}:8443"],
        "balancer": ["127.0.0.1:${KCD_BALANCER_PORT:-8444}:8443"],
    }


# The lab volume holds the CAs' keys, the KDC's master key and LDAP database and every keytab: only the parts
# that write it mount it; each other part mounts a volume of its own that `lab handout` fills with its files.
WRITERS = {"pki": "lab:/lab", "kdc": "lab:/lab", "handout": "lab:/lab:ro", "dc": "ad:/lab/ad"}
OWN_VOLUME = {
    "gateway": "lab-gateway:/lab:ro",
    "gateway-1": "lab-gateway:/lab:ro",
    "gateway-2": "lab-gateway:/lab:ro",
    "backend": "lab-backend:/lab",  # its replay cache, in run/
    "crl": "lab-crl:/lab:ro",
    "device": "lab-device:/lab:ro",
    "device-scaled": "lab-device:/lab:ro",
    "ad-gateway": "ad-gateway:/lab:ro",
    "ad-backend": "ad-backend:/lab",
    "ad-device": "ad-device:/lab:ro",
}
# The profile ad's handout signs the AD users' certificates with the lab's CA (lab, writable), reads the keytabs.
AD_HANDOUT = ["lab:/lab", "ad:/lab/ad:ro"] + [f"ad-{part}:/handout/{part}" for part in handout_module.AD_PARTS]

STATE_VOLUMES = {
    "gateway": "gateway-state",
    "gateway-1": "gateway-1-state",
    "gateway-2": "gateway-2-state",
    "ad-gateway": "ad-gateway-state",
}


def test_only_the_writers_mount_the_lab_volume_and_each_reader_its_own() -> None:
    """pki and kdc mount the lab volume (handout reads it); the gateway, backend, CRL server and devices each mount
    only the volume `lab handout` fills for them, read-only but for the backend's replay cache (and each gateway its
    own state volume besides, which holds no lab file)."""
    compose = _compose()
    services = _lab_services()
    for name, service in services.items():
        root = service["environment"]["KCD_LAB_DIR"]
        assert root == "/lab", name
        if name in ("handout", "ad-handout"):
            continue
        lab_volumes = [v for v in service["volumes"] if v.split(":")[0] not in STATE_VOLUMES.values()]
        assert lab_volumes == [WRITERS.get(name) or OWN_VOLUME[name]], name
        if name in STATE_VOLUMES:  # the gateway's own writable state, no lab file in it (its test is below)
            assert service["volumes"][1].split(":")[0] == STATE_VOLUMES[name], name
    handout = services["handout"]
    assert handout["volumes"] == ["lab:/lab:ro"] + [f"lab-{part}:/handout/{part}" for part in handout_module.PARTS]
    assert handout["command"] == ["kcd-proxy", "lab", "handout", "--into", "/handout"]
    assert services["ad-handout"]["volumes"] == AD_HANDOUT
    assert services["ad-handout"]["command"] == ["kcd-proxy", "lab", "handout", "--ad", "--into", "/handout"]
    ad_volumes = {"ad"} | {f"ad-{part}" for part in handout_module.AD_PARTS}
    assert (
        set(compose["volumes"])
        == {"lab"} | {f"lab-{part}" for part in handout_module.PARTS} | set(STATE_VOLUMES.values()) | ad_volumes
    )
    assert set(WRITERS) | set(OWN_VOLUME) | {"ad-handout"} == set(services)


def test_every_gateway_keeps_its_crl_floors_in_a_volume_of_its_own(tmp_path: Path) -> None:
    """`client_certificates.crl_state` in the compose lab (nothing set it: a restarted gateway container forgot its
    CRL floors and took a replayed older CRL again): the configuration each `kcd-proxy run` service reads, as `lab
    init` writes it with the compose environment, names a state file in a directory where a named volume of that
    gateway's alone is mounted writable; the image makes that directory the gateway's user's, mode 0700, which a
    fresh named volume takes over (Docker copies the mount point's owner and mode into it), and check-config's test
    of the directory passes for one made so."""
    from proxy.ops.check import crl_state

    services = _services()
    layout = LabLayout.from_env(services["pki"]["environment"], root=tmp_path)
    runner.init(layout)
    ad_layout = LabLayout.from_env(services["dc"]["environment"], root=tmp_path)  # the dc writes ad/gateway.toml
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "gateway.toml").write_text(ad_compose.gateway_toml(ad_layout))
    final = _stages(REPO / "deploy" / "gateway" / "Dockerfile")[-1]
    gateways = {name: s for name, s in services.items() if s.get("command", [])[:2] == ["kcd-proxy", "run"]}
    assert set(gateways) == {"gateway", "gateway-1", "gateway-2", "ad-gateway"}
    volumes_used = []
    for name, service in gateways.items():
        config_path = Path(service["command"][service["command"].index("--config") + 1])
        text = (tmp_path / config_path.relative_to("/lab")).read_text()
        state = Path(tomllib.loads(text)["client_certificates"]["crl_state"])
        mounts = [v.split(":") for v in service["volumes"]]
        (volume,) = [v for v, target, *mode in mounts if target == str(state.parent)]
        assert [mode for v, target, *mode in mounts if v == volume] == [[]], f"{name}: {volume} mounted read-only"
        assert volume in _compose()["volumes"], volume
        volumes_used.append(volume)
        assert f"install -d -o kcd-proxy -g kcd-proxy -m 0700 {state.parent}" in final, name
    assert len(set(volumes_used)) == len(volumes_used), f"two gateways share a state volume: {volumes_used}"

    made = tmp_path / "state"
    made.mkdir(mode=0o700)
    assert list(crl_state(made / "crl-state.json")) == []


def test_the_handout_gives_each_part_the_files_it_reads_and_no_secret_of_another(tmp_path: Path) -> None:
    """`lab handout` after `lab init` and the KDC (its files stood in for): the gateway gets every file its
    configurations name and no CA key, KDC file or other keytab; the device the users' keys, the CRL server the
    CRLs, the backend its keytab; none of them anything of kdc/ or ldap/."""
    layout = LabLayout.from_env(_services()["pki"]["environment"], root=tmp_path / "lab")
    runner.init(layout)
    for secret in (layout.proxy_keytab, layout.backend_keytab, layout.other_keytab, layout.kdc_dir / "stash"):
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(b"secret")
    layout.krb5_conf.write_text("[libdefaults]\n")
    (layout.ldap_dir / "data").mkdir(parents=True)
    (layout.ldap_dir / "data" / "data.mdb").write_bytes(b"secret")
    into = tmp_path / "handout"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0

    def held(part: str) -> set[str]:
        return _handed_out(into, part)

    gateway = held("gateway")
    state = Path(layout.state_dir)  # the gateway's own writable volume (crl_state): nothing of the lab's goes there
    for name in handout_module.GATEWAY_CONFIGS:
        named = [
            path
            for path in re.findall(r'"(/[^"]+)"', (layout.root / name).read_text())
            if state not in Path(path).parents
        ]
        assert named, name
        assert {str(Path(path).relative_to(layout.root)) for path in named} <= gateway, name
    assert {"pki/server.key", "keytabs/proxy.keytab"} <= gateway
    assert "pki/users/alice.key" in held("device")
    assert {"pki/issuing.crl", "pki/root.crl", "crl-publish/issuing.crl", "crl-publish/root.crl"} == held("crl")
    assert held("backend") == {"krb5.conf", "keytabs/cas.keytab"}
    assert (into / "backend" / "run").is_dir()

    def secrets(part: str) -> set[str]:
        return {p for p in held(part) if p.endswith((".key", ".keytab", ".p12", "stash", ".mdb", ".keyfile"))}

    assert secrets("gateway") == {"pki/server.key", "keytabs/proxy.keytab"}
    assert secrets("backend") == {"keytabs/cas.keytab"}
    assert secrets("crl") == set()
    assert secrets("device")
    assert all(p.startswith("pki/users/") for p in secrets("device"))
    for part in handout_module.PARTS:
        assert not any(p.startswith(("kdc/", "ldap/")) for p in held(part)), part
    assert (into / "gateway" / "pki" / "server.key").stat().st_mode & 0o077 == 0  # the key stays its owner's
    published = into / "crl" / "crl-publish" / "issuing.crl"
    assert published.is_symlink()
    assert published.readlink() == layout.pki_dir / "issuing.crl"


def test_a_rerun_handout_does_not_follow_a_link_a_container_planted_in_its_volume(tmp_path: Path) -> None:
    """The backend mounts its volume writable (its replay cache): a backend that replaced `keytabs/` there with a link
    into the device's volume had the next `lab handout` write the backend's keytab through it, into the device's
    `pki/users/` (a device then held a key of the backend's service). The link is replaced by a directory of its
    own; nothing is written where it pointed."""
    layout = LabLayout.from_env(_services()["pki"]["environment"], root=tmp_path / "lab")
    runner.init(layout)
    for secret in (layout.proxy_keytab, layout.backend_keytab):
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(b"secret")
        secret.chmod(0o600)
    layout.krb5_conf.write_text("[libdefaults]\n")
    into = tmp_path / "handout"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    planted = into / "backend" / "keytabs"
    shutil.rmtree(planted)
    planted.symlink_to(into / "device" / "pki" / "users")
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    assert not (into / "device" / "pki" / "users" / "cas.keytab").exists()
    assert not planted.is_symlink()
    assert planted.is_dir()
    assert (planted / "cas.keytab").read_bytes() == b"secret"
    assert (planted / "cas.keytab").stat().st_mode & 0o777 == 0o600


def test_a_link_raced_in_after_the_handout_made_a_directory_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend, whose volume is writable, swaps `keytabs/` for a link into the device's volume after the handout
    made sure it was a directory and before it writes the keytab there (a race a container renaming in a loop can
    win; made certain here by doing it right after that step): nothing is written through the link, no keytab and no
    temporary file lands in the device's `pki/users/`, and the run ends. Before, the directory was checked by path and
    the file then opened by path, and the backend's keytab was written through the link raced in between."""
    layout = _lab_for_handout(tmp_path / "lab")
    into = tmp_path / "handout"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    users = into / "device" / "pki" / "users"
    before = sorted(p.name for p in users.iterdir())
    step = handout_module._directory

    def raced(volume: Path, relative: Path) -> object:
        made = step(volume, relative)
        if volume.name == "backend" and relative == Path("keytabs"):
            (volume / "keytabs").rename(volume / "keytabs-moved")
            (volume / "keytabs").symlink_to(users)
        return made

    monkeypatch.setattr(handout_module, "_directory", raced)
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    assert sorted(p.name for p in users.iterdir()) == before
    assert not (users / "cas.keytab").exists()


def _handed_out(into: Path, part: str) -> set[str]:
    """What a part's volume holds: files and links (to directories too), the handout's own list left out."""
    volume = into / part
    held = (p for p in volume.rglob("*") if p.is_symlink() or not p.is_dir())
    return {str(p.relative_to(volume)) for p in held if p.name != handout_module.MANIFEST}


def _lab_for_handout(root: Path) -> LabLayout:
    """`lab init` and the KDC's keytabs stood in for: what `lab handout` reads."""
    layout = LabLayout.from_env(_services()["pki"]["environment"], root=root)
    runner.init(layout)
    for secret in (layout.proxy_keytab, layout.backend_keytab, layout.other_keytab):
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(b"secret")
        secret.chmod(0o600)
    layout.krb5_conf.write_text("[libdefaults]\n")
    return layout


def test_a_rerun_handout_leaves_exactly_what_the_lab_hands_out_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user deleted from the lab after a handout (alice's certificate and key), and files an earlier handout gave the
    gateway that it no longer gets (another service's keytab, a configuration in a directory of its own): the re-run
    removes them (and the directory left empty), so the device no longer holds alice's key nor the gateway the old
    keytab; each volume then holds what a handout into empty volumes gives, and what a container made there itself (the
    backend's replay cache, a file the device wrote) stays. A re-run left them all."""
    layout = _lab_for_handout(tmp_path / "lab")
    into = tmp_path / "handout"
    old_config = layout.root / "old" / "gateway-old.toml"
    old_config.parent.mkdir()
    old_config.write_text("# an earlier lab's\n")
    then = handout_module.files

    def earlier(lab: LabLayout, part: str) -> list[Path]:
        extra = [lab.other_keytab, old_config] if part == "gateway" else []
        return [*then(lab, part), *extra]

    monkeypatch.setattr(handout_module, "files", earlier)
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    monkeypatch.undo()
    assert {"keytabs/other.keytab", "old/gateway-old.toml"} <= _handed_out(into, "gateway")
    assert {"pki/users/alice.pem", "pki/users/alice.key"} <= _handed_out(into, "device")
    (into / "backend" / "run" / "cas.rcache2").write_bytes(b"the backend's own")
    (into / "device" / "notes.txt").write_text("the device's own")
    for name in ("alice.pem", "alice.key", "alice.p12"):
        (layout.pki_dir / "users" / name).unlink(missing_ok=True)

    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    fresh = tmp_path / "fresh"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(fresh)]) == 0
    for part in handout_module.PARTS:
        extra = {"backend": {"run/cas.rcache2"}, "device": {"notes.txt"}}.get(part, set())
        assert _handed_out(into, part) == _handed_out(fresh, part) | extra, part
    assert not any(name.startswith("pki/users/alice.") for name in _handed_out(into, "device"))
    assert "keytabs/other.keytab" not in _handed_out(into, "gateway")
    assert not (into / "gateway" / "old").exists()
    assert (into / "backend" / "run" / "cas.rcache2").read_bytes() == b"the backend's own"


def test_a_rerun_handout_removes_nothing_outside_what_it_wrote(tmp_path: Path) -> None:
    """The backend's volume is writable, so its list of what the handout wrote is not to be believed: entries leading
    out of the volume (`..`, an absolute path, through a link planted into the device's volume, the list itself a link
    to the device's list) and one naming a directory remove nothing; the re-run still writes every file and a list of
    its own."""
    layout = _lab_for_handout(tmp_path / "lab")
    into = tmp_path / "handout"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    outside = tmp_path / "outside.txt"
    outside.write_text("not the handout's")
    backend = into / "backend"
    (backend / "through").symlink_to(into / "device" / "pki")
    (backend / "held").mkdir()
    (backend / "held" / "cache").write_text("the backend's own")
    hostile = [
        "../device/pki/users/bob.key",
        str(outside),
        "through/users/bob.pem",
        "held",
        "run",
        "keytabs/../../gateway/krb5.conf",
    ]
    (backend / handout_module.MANIFEST).write_text("\n".join(hostile) + "\n")
    device_before = _handed_out(into, "device")
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    assert outside.read_text() == "not the handout's"
    assert _handed_out(into, "device") == device_before
    assert (into / "gateway" / "krb5.conf").exists()
    assert (backend / "held" / "cache").read_text() == "the backend's own"
    assert (backend / "run").is_dir()
    assert _handed_out(into, "backend") == {"krb5.conf", "keytabs/cas.keytab", "through", "held/cache"}
    listed = (backend / handout_module.MANIFEST).read_text().splitlines()
    assert listed == ["keytabs/cas.keytab", "krb5.conf"]

    (backend / handout_module.MANIFEST).unlink()
    (backend / handout_module.MANIFEST).symlink_to(into / "device" / handout_module.MANIFEST)
    device_list = (into / "device" / handout_module.MANIFEST).read_text()
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    assert (into / "device" / handout_module.MANIFEST).read_text() == device_list
    assert _handed_out(into, "device") == device_before
    assert not (backend / handout_module.MANIFEST).is_symlink()


def test_a_list_no_file_can_be_named_by_does_not_stop_the_handout(tmp_path: Path) -> None:
    """The backend writes into its own volume's list an entry with a NUL byte or one with a name longer than a file
    name may be: the re-run stopped in the backend's part (a traceback, ValueError "embedded null byte"; exit 1, "File
    name too long" from the unlink), so the CRL server's and the devices' volumes, handed out after it, kept what they
    had (a deleted user's key stayed on the device). Now such entries (and one under an over-long directory, one not
    UTF-8) name nothing, the re-run hands every part out, and the backend's list is its own again."""
    layout = _lab_for_handout(tmp_path / "lab")
    into = tmp_path / "handout"
    assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0
    backend = into / "backend"
    for hostile in ("keytabs/a\x00b", "x" * 300, f"{'d' * 300}/cas.keytab", "keytabs/\udcff"):
        (backend / handout_module.MANIFEST).write_bytes(f"krb5.conf\n{hostile}\n".encode(errors="surrogateescape"))
        for name in ("alice.pem", "alice.key", "alice.p12"):
            (layout.pki_dir / "users" / name).unlink(missing_ok=True)
        assert cli.main(["lab", "handout", "--dir", str(layout.root), "--into", str(into)]) == 0, hostile
        assert not any(name.startswith("pki/users/alice.") for name in _handed_out(into, "device")), hostile
        listed = (backend / handout_module.MANIFEST).read_text().splitlines()
        assert listed == ["keytabs/cas.keytab", "krb5.conf"], hostile
        assert (into / "gateway" / "krb5.conf").exists()


def test_the_devices_share_a_network_with_the_gateways_alone() -> None:
    """`device` is on the network `devices` only, where the gateway answers as proxy.lab.test; the KDC, backend and
    CRL server are on `lab`, which no device joins (test_compose.py connects from a device to check)."""
    services = _services()
    assert services["device"]["networks"] == ["devices"]
    assert set(services["gateway"]["networks"]) == {"lab", "devices"}
    assert services["gateway"]["networks"]["devices"]["aliases"] == ["proxy.lab.test"]
    on_devices = {name for name, s in services.items() if "devices" in s.get("networks", [])}
    assert on_devices == {"device", "gateway", "gateway-1", "gateway-2"}
    for name in ("kdc", "backend", "crl"):
        assert services[name]["networks"] == ["lab"], name
    # profile ad: its device reaches its gateway alone; the DC and the backend are on `ad`, which no device joins
    assert services["ad-device"]["networks"] == ["ad-devices"]
    assert set(services["ad-gateway"]["networks"]) == {"ad", "ad-devices"}
    assert services["ad-gateway"]["networks"]["ad-devices"]["aliases"] == ["proxy.lab.test"]
    assert {name for name, s in services.items() if "ad-devices" in s.get("networks", [])} == {
        "ad-device",
        "ad-gateway",
    }
    for name in ("dc", "ad-backend", "ad-handout"):
        assert services[name]["networks"] == ["ad"], name


def test_the_layout_in_every_container_names_services_that_exist() -> None:
    """Daemons listen on the container network; kdc_host, backend_host and crl_host are service names (the dc reads
    only its directories from the layout: Samba listens on every interface of its container)."""
    for name, service in _lab_services().items():
        if name == "dc":
            continue
        layout = _layout(service)
        assert layout.bind_host == "0.0.0.0", name
        assert {layout.kdc_host, layout.backend_host, layout.crl_host} == {"kdc", "backend", "crl"}, name


def test_dependencies_wait_for_health_or_completion() -> None:
    """A service waits for `service_healthy` only of services with a health check; pki and handout run to completion
    (the gateways wait for the backend and the CRL server, which wait for handout)."""
    services = _services()
    for name, service in services.items():
        for dep, how in service.get("depends_on", {}).items():
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no health check"
            elif condition == "service_started":
                assert (name, dep) == ("device-scaled", "balancer"), name  # HAProxy has no health check here
            else:
                assert condition == "service_completed_successfully", name
                completed = {("kdc", "pki"), ("backend", "handout"), ("crl", "handout")}
                completed |= {("ad-handout", "pki"), ("ad-backend", "ad-handout")}
                assert (name, dep) in completed, name
    assert set(services["handout"]["depends_on"]) == {"kdc"}  # healthy: provisioned, its keytabs written
    assert set(services["ad-handout"]["depends_on"]) == {"pki", "dc"}  # the lab's CA, the dc's keytabs
    assert set(services["ad-gateway"]["depends_on"]) == {"dc", "ad-backend"}
    assert set(services["ad-device"]["depends_on"]) == {"ad-gateway"}
    for gateway in ("gateway", "gateway-1", "gateway-2"):
        assert set(services[gateway]["depends_on"]) == {"kdc", "backend", "crl"}
    assert set(services["device"]["depends_on"]) == {"gateway"}
    assert set(services["balancer"]["depends_on"]) == {"gateway-1", "gateway-2"}


def test_containers_drop_privileges() -> None:
    """No capabilities, no privilege gain, read-only root file system; the images run as a non-root user. The one
    exception is Samba's DC (profile ad), which runs as root: with two capabilities of root's, no others."""
    for name, service in _services().items():
        assert service["cap_drop"] == ["ALL"], name
        assert service.get("cap_add", []) == (["NET_BIND_SERVICE", "CHOWN"] if name == "dc" else []), name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service["read_only"] is True, name
        assert "privileged" not in service, name
        assert "user" not in service, name
    for dockerfile in sorted((REPO / "deploy").glob("*/Dockerfile")):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        if dockerfile.parent.name == "dc":
            assert users == [], dockerfile  # root (docker-compose.yml: cap_drop ALL, then the two it needs)
            continue
        assert users, dockerfile
        assert users[-1] not in ("root", "0"), dockerfile


def test_each_image_is_built_once() -> None:
    """One service builds each image (the first of its users that compose starts); the others name it."""
    services = _services()
    builders: dict[str, list[str]] = {}
    for name, service in services.items():
        if "build" in service:
            builders.setdefault(service["image"], []).append(name)
    assert builders == {
        "kcd-proxy:${KCD_IMAGE_TAG:-lab}": ["pki"],
        "kcd-proxy-kdc:${KCD_IMAGE_TAG:-lab}": ["kdc"],
        "kcd-proxy-balancer:${KCD_IMAGE_TAG:-lab}": ["balancer"],
        "kcd-proxy-dc:${KCD_IMAGE_TAG:-lab}": ["dc"],
    }
    assert {s["image"] for s in services.values()} == set(builders)


def _stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's stages, each from its FROM line on, comments left out."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.startswith("#")]
    return ["FROM" + stage for stage in "\n".join(lines).split("\nFROM")[1:]]


def test_images_run_as_uid_and_gid_10001_and_own_lab() -> None:
    """Group and user 10001 made explicitly (useradd --user-group gave gid 999); /lab belongs to them in the
    images that mount the lab volume first, so a fresh volume is theirs (the kdc image lacked it)."""
    for name in ("gateway", "kdc", "balancer"):
        final = _stages(REPO / "deploy" / name / "Dockerfile")[-1]
        assert "groupadd --system --gid 10001 kcd-proxy" in final, name
        assert "useradd --system --uid 10001 --gid 10001" in final, name
        assert "--user-group" not in final, name
        if name != "balancer":
            assert "install -d -o kcd-proxy -g kcd-proxy -m 0755 /lab" in final, name


def test_each_image_exposes_the_ports_its_daemons_listen_on() -> None:
    """EXPOSE names the lab's ports (the kdc image said 58088, the KDC's port before the lab moved it below the
    ephemeral range: `docker ps` showed it, and `docker run -P` published a port nothing listens on)."""
    layout = LabLayout(root=Path())
    expected = {
        "gateway": [f"{layout.gateway_port}"],
        "kdc": [f"{layout.kdc_port}/tcp", f"{layout.kdc_port}/udp"],
        "balancer": ["8443"],
    }
    for name, ports in expected.items():
        exposed = re.findall(r"^EXPOSE\s+(.+)$", (REPO / "deploy" / name / "Dockerfile").read_text(), re.MULTILINE)
        assert [port for line in exposed for port in line.split()] == ports, name


def test_no_compiler_in_the_images_and_gssapi_compiled_once() -> None:
    """The kdc image has two stages like the gateway's: gcc and headers stay in the build stage, which is the
    same, line for line, in both Dockerfiles (the engine's cache then compiles python-gssapi once)."""
    gateway = _stages(REPO / "deploy" / "gateway" / "Dockerfile")
    kdc = _stages(REPO / "deploy" / "kdc" / "Dockerfile")
    dc = _stages(REPO / "deploy" / "dc" / "Dockerfile")
    assert len(gateway) == len(kdc) == len(dc) == 2
    assert gateway[0] == kdc[0] == dc[0]
    for final in (gateway[-1], kdc[-1], dc[-1]):
        for dev in ("gcc", "python3-dev", "libkrb5-dev", "python3-venv"):
            assert not re.search(rf"\b{dev}\b", final), dev


def test_builds_install_the_pinned_versions_of_the_declared_dependencies() -> None:
    """The build stage installs exactly pyproject's dependencies, each pinned (==) in constraints.txt."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    build = _stages(REPO / "deploy" / "gateway" / "Dockerfile")[0]
    installed = re.search(r"-c /src/constraints.txt\s*\\?\s*([^\n]+)", build)
    assert installed, build
    assert set(installed.group(1).split()) == declared
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    pinned = {name.lower().replace("_", "-") for name in pins}
    assert declared <= pinned
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()  # `make setup` installs the same versions


def test_the_base_image_keeps_no_apt_cache_and_each_image_cleans_its_own() -> None:
    """base-image.sh writes apt's no-cache settings into the image (not as --aptopt: mmdebstrap's own apt then
    lost the packages it had downloaded); every final stage that installs packages runs `apt-get clean`, for a
    base image without them (test_compose.py looks into the built images)."""
    script = (REPO / "deploy" / "base-image.sh").read_text()
    settings = ('APT::Keep-Downloaded-Packages "false";', 'Dir::Cache::pkgcache "";', 'Dir::Cache::srcpkgcache "";')
    for setting in settings:
        assert f"'{setting}'" in script, setting
    assert "--aptopt='APT::Keep" not in script
    assert '--customize-hook="cp $work/zz-kcd-no-cache' in script
    for name in ("gateway", "kdc", "balancer"):
        final = _stages(REPO / "deploy" / name / "Dockerfile")[-1]
        assert "apt-get install" in final, name
        assert "&& apt-get clean && rm -rf /var/lib/apt/lists/*" in final, name


def test_commands_given_work_with_compose_v1() -> None:
    """The README, docs/containers.md and the compose header give no v2-only command (`docker compose cp`, `docker
    compose ...`), and mention `up --exit-code-from` only to warn against it."""
    for path in (COMPOSE, REPO / "README.md", REPO / "docs" / "containers.md"):
        text = path.read_text()
        assert not re.search(r"docker compose (cp|up|run|build|down|ps)\b", text), path
        for line in text.splitlines():
            if "--exit-code-from" in line:
                assert "Not `up --exit-code-from" in line or "not `up --exit-code-from" in line, line


def test_images_are_built_from_files_that_exist() -> None:
    """Each build names a Dockerfile under deploy/, and what it copies from the repository exists."""
    for name, service in _services().items():
        if "build" not in service:
            continue
        build = service["build"]
        dockerfile = REPO / build["context"] / build["dockerfile"]
        assert dockerfile.is_file(), name
        assert dockerfile.parent.parent == REPO / "deploy", name
        for line in re.findall(r"^COPY\s+(?!--from)(.+)$", dockerfile.read_text(), re.MULTILINE):
            *sources, _ = line.split()
            assert all((REPO / build["context"] / s).exists() for s in sources), f"{dockerfile}: {line}"


def test_build_context_leaves_out_the_lab_and_the_virtualenv() -> None:
    """`.dockerignore` keeps the native lab's keys and keytabs (and .venv) out of what `docker build` sends."""
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".lab", ".venv", ".git"} <= ignored


def test_compose_layout_writes_container_names_into_the_lab_files(tmp_path: Path) -> None:
    """`lab init` with the compose environment: gateway.toml and the CRL URLs name the services, and the
    gateway listens on the container network (the KDC's files are checked natively in test_kdc.py)."""
    from cryptography import x509

    layout = LabLayout.from_env(_services()["pki"]["environment"], root=tmp_path)
    runner.init(layout)
    text = (tmp_path / "gateway.toml").read_text()
    assert 'bind = "0.0.0.0:8443"' in text
    assert 'upstream = "http://backend:8081"' in text
    leaf = x509.load_pem_x509_certificate((layout.pki_dir / "users" / "alice.pem").read_bytes())
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    urls = [name.value for point in points for name in point.full_name or []]
    assert urls == ["http://crl:8082/issuing.crl"]


# --- systemd ------------------------------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    """The unit's directives, each with every value it is given."""
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return directives


def test_unit_has_the_hardening_the_issue_asks_for() -> None:
    """Dedicated user, no privilege gain, read-only system, keytab as a read-only credential, SIGHUP reload."""
    unit = _unit()
    assert (unit["User"], unit["Group"]) == (["kcd-proxy"], ["kcd-proxy"])
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert unit[key] == ["yes"], key
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert "kcd-proxy.keytab:/etc/kcd-proxy/kcd-proxy.keytab" in unit["LoadCredential"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillMode"] == ["mixed"]  # SIGTERM to the supervisor, which stops its workers
    program, *args = unit["ExecStart"][0].split()
    assert Path(program).name in CONSOLE_SCRIPTS
    _check_argv(["kcd-proxy", *args])


def test_the_files_the_example_configuration_has_the_gateway_write_are_writable_under_the_unit() -> None:
    """`[admin] socket`, `[traces] export` and `client_certificates.crl_state` at the paths config/example.toml and
    the docs give lie in directories the unit makes the gateway's (ProtectSystem=strict left it none: the socket
    failed, traces were never written; the CRL state's start failed, its directory read-only)."""
    unit = _unit()
    assert unit["ProtectSystem"] == ["strict"]
    writable = [Path("/run", name) for name in unit.get("RuntimeDirectory", [])]
    writable += [Path("/var/log", name) for name in unit.get("LogsDirectory", [])]
    writable += [Path("/var/lib", name) for name in unit.get("StateDirectory", [])]
    names = ("config/example.toml", "docs/deploying.md", "docs/operations.md", "README.md")
    texts = [(REPO / name).read_text() for name in names]
    paths = {Path(m) for text in texts for m in re.findall(r'(?:socket|export|crl_state) = "(/[^"]+)"', text)}
    expected = {Path("/run/kcd-proxy/admin.sock"), Path("/var/log/kcd-proxy/traces.jsonl")}
    assert expected | {Path("/var/lib/kcd-proxy/crl-state.json")} <= paths
    for path in paths:
        assert any(path.parent == directory for directory in writable), f"{path}: read-only under {UNIT.name}"
    assert unit.get("RuntimeDirectoryMode", ["0755"]) == ["0750"]  # the socket is 0600; the group may list it
    assert unit.get("LogsDirectoryMode", ["0755"]) == ["0750"]  # traces name users: not for every local user
    assert unit.get("StateDirectoryMode", ["0755"]) == ["0700"]  # the CRL floors: the gateway's alone


def test_unit_denies_writable_executable_memory() -> None:
    """MemoryDenyWriteExecute=yes: test_systemd_unit.py shows the gateway serving under its kernel equivalent."""
    assert _unit()["MemoryDenyWriteExecute"] == ["yes"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say about the unit (pointed at this checkout's kcd-proxy)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make setup` installs it (Debian package systemd)"
    kcd_proxy = Path(shutil.which("kcd-proxy") or REPO / ".venv" / "bin" / "kcd-proxy")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/kcd-proxy/bin/kcd-proxy", str(kcd_proxy)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_systemd_rates_the_unit_well_hardened(tmp_path: Path) -> None:
    """`systemd-analyze security --offline` rates its exposure 2.0 or better (10 is an unhardened service)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    done = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True, check=False
    )
    found = re.search(r"Overall exposure level for kcd-proxy\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= 2.0, done.stdout


def test_base_image_without_an_engine_stops_at_once_and_says_how_to_start_one(tmp_path: Path) -> None:
    """`make base-image` with no engine answering (a machine without systemd, where installing docker.io starts no
    daemon): it stops before building anything, naming the engine, the CLI's reason and how to start it, with each
    docker CLI the machine has first on PATH (Debian's, and another before it). It built the root file system first
    (mmdebstrap: 26-43 s, minutes on a busy machine) and only then failed at `docker import`; with Debian's CLI, which
    writes the reason to stdout, the reason it gave was "errors pretty printing info"."""
    fake = tmp_path / "bin"
    fake.mkdir()
    called = tmp_path / "mmdebstrap-called"
    (fake / "mmdebstrap").write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    (fake / "mmdebstrap").chmod(0o755)
    clis = {Path(c).resolve() for c in ("/usr/bin/docker", shutil.which("docker")) if c and Path(c).is_file()}
    assert clis, "docker is missing: `make setup` installs it (Debian package docker.io)"
    for docker_cli in sorted(clis):
        (fake / "docker").unlink(missing_ok=True)
        (fake / "docker").symlink_to(docker_cli)
        env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
        done = subprocess.run(
            [REPO / "deploy" / "base-image.sh"], capture_output=True, text=True, timeout=120, check=False, env=env
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert not called.exists(), done.stdout + done.stderr
        said = f"{docker_cli}: {done.stderr}"
        assert "base-image: docker does not answer (" in done.stderr, said
        assert f"Cannot connect to the Docker daemon at unix://{tmp_path}/none.sock" in done.stderr, said
        assert "dockerd --host=unix:///var/run/docker.sock &" in done.stderr, said
        assert "systemctl start docker" in done.stderr, said


def test_the_dc_probe_asks_for_the_realm_the_dc_provisions() -> None:
    """The dc's health check sends its AS-REQ to the realm `lab serve dc` provisions (the probe names it itself, so as
    not to import the AD lab's module: cryptography), and the compose lab's gateway configuration names that realm's
    principal."""
    from proxy.lab import ad

    assert serve.AD_REALM == ad.REALM
    text = ad_compose.gateway_toml(LabLayout(root=Path("/lab")))
    assert tomllib.loads(text)["kerberos"]["principal"] == f"svc-kcdproxy@{ad.REALM}"
