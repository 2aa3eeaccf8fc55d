"""The compose lab's file on Podman (Debian 12's 4.3), as docs/containers.md, "Podman", runs it: docker-compose against
Podman's Docker API (`podman system service`), with deploy/podman/containers.conf, and without systemd the health
checks run by deploy/podman/healthchecks.sh.

What is pinned here: docker-compose makes the file's networks and volumes on Podman, a second command finds the
networks as the file describes them, a service's container starts with the file's settings (init, read-only root)
under the engine's limits, the health-check runner makes a container healthy, and the profile `scale` runs: devices
through the balancer served by both gateways, which take PROXY headers from the balancer's fixed address alone (a host
process, and a device routed around the balancer while netavark's isolation is down, are refused their own headers).
The three images are built from the checkout on Docker (test_compose.py's engine and build cache: seconds once built)
and copied into Podman's store (`docker save | podman load`): building them on Podman took 395 s from nothing, Podman
sharing no build cache with Docker.

Each run is a compose project of its own (`kcdpodman<run>x<random>`, `_run_name`) on a Podman API socket of its own; it
removes its containers, networks, volumes and tags and stops its service, and what a killed run left is removed by
the next (`_remove_dead_runs`). The base image stays in Podman's store, as Docker's build cache stays in dockerd's.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from tests import leftovers
from tests.integration.conftest import REPO, free_port
from tests.integration.jsonlog import eventually
from tests.integration.test_compose import (
    _SCALED,
    FORGED,
    SOCKET,
    Forged,
    _docker,
    _keep_as_build_cache,
    _left_by,
    assert_forged_refused,
    balancer_settings,
    compose_env,
    docker_engine,
    forge,
    json_lines,
)

# the first run on a machine builds the three images on Docker (minutes: test_compose.py has the same timeout)
pytestmark = [pytest.mark.timeout(2400), pytest.mark.slow(seconds=40)]

CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
HEALTHCHECKS = REPO / "deploy" / "podman" / "healthchecks.sh"
BASE = "debian:bookworm-slim"
IMAGES = ("kcd-proxy", "kcd-proxy-kdc", "kcd-proxy-balancer")  # docker-compose.yml's, tagged KCD_IMAGE_TAG
PROJECT_LABEL = "com.docker.compose.project"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
NAME_PREFIX = "kcdpodman"  # every run's compose project and container: `_run_name`
_RUN_NAMED = re.compile(NAME_PREFIX + r"(\d+)t(\d+)n(\d+)x[0-9a-f]+")


def _run_name(run: leftovers.Run | None = None) -> str:
    """A name for this run's objects in Podman (a compose project, a container): `kcdpodman`, the run's controller as
    tests/leftovers.py marks a run (its pid, start and pid namespace), and a random part. A killed run's objects stay
    in Podman's store for good (no teardown ran, and leftovers stops processes only): the next run removes those of a
    run that has ended (`_remove_dead_runs`)."""
    if run is None:
        run = leftovers.Run.parse(os.environ.get(leftovers.MARK, "")) or leftovers.this_run(REPO)
    return f"{NAME_PREFIX}{run.pid}t{run.started}n{run.pid_namespace}x{secrets.token_hex(3)}"


def _ended(name: str) -> bool:
    """Whether `name` (a container's, network's, volume's or image tag's) is of a run that has ended: its controller's
    pid no longer the process that started then, judged in the pid namespace it was named in only."""
    found = _RUN_NAMED.search(name)
    if found is None:
        return False  # not a run's name (or an older checkout's, which says no run): left alone
    pid, started, pid_namespace = (int(part) for part in found.groups())
    return pid_namespace == leftovers.namespace("pid") and leftovers.start_time(pid) != started


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is missing: `make setup` installs it (Debian package {package})"
    return found


@dataclass(frozen=True)
class Engine:
    """Podman's Docker API on a socket of this run's, and the environment the docs' commands run in."""

    podman: str
    env: dict[str, str]

    def podman_lines(self, *args: str) -> list[str]:
        done = subprocess.run([self.podman, *args], capture_output=True, text=True, timeout=120, env=self.env)
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}"
        return done.stdout.splitlines()


def _answers(docker: str, env: dict[str, str]) -> bool:
    return subprocess.run([docker, "info"], capture_output=True, timeout=60, env=env, check=False).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """`podman system service` on a socket of this run's, with the repository's containers.conf, the base image in
    Podman's store, what killed runs left removed (`_remove_dead_runs`); stopped afterwards, ip_forward put back
    (netavark turns it on) unless a dockerd now needs it."""
    podman = _tool("podman", "podman")
    docker = _docker()
    for binary, package in (
        ("/usr/libexec/podman/catatonit", "catatonit"),
        ("/usr/lib/podman/netavark", "netavark"),
        ("/usr/lib/podman/aardvark-dns", "aardvark-dns"),
    ):
        assert Path(binary).is_file(), f"{binary} is missing: `make setup` installs it (Debian package {package})"
    env = compose_env(docker, CONTAINERS_CONF=str(CONTAINERS_CONF))  # compose's `run` uses that docker CLI too
    done = subprocess.run(
        [REPO / "deploy" / "base-image.sh", "podman"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    _remove_dead_runs(podman, env)
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    env["DOCKER_HOST"] = f"unix://{socket}"
    forward = IP_FORWARD.read_text()
    log = socket.with_name("service.log")
    with log.open("wb") as out:
        service = subprocess.Popen(
            [podman, "system", "service", "--time=0", f"unix://{socket}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        eventually(lambda: service.poll() is None and _answers(docker, env), f"Podman's API on {socket}", 120)
        yield Engine(podman, env)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        dockerd = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, check=False).returncode == 0
        if IP_FORWARD.read_text() != forward and not dockerd:  # a dockerd started meanwhile needs it on
            IP_FORWARD.write_text(forward)


def _remove_dead_runs(podman: str, env: dict[str, str]) -> None:
    """Remove what runs that ended without their teardown (killed) left in Podman (`_ended`): containers (a compose
    project's, named `<project>_<service>_<n>`, and the health test's), then networks and volumes of such projects,
    and image tags `test-<project>` (the base image keeps its own). A run still going is never touched."""

    def names(*listing: str) -> list[str]:
        done = subprocess.run([podman, *listing], capture_output=True, text=True, timeout=120, env=env, check=False)
        return [name for name in done.stdout.split() if _ended(name)]

    removals = [
        (["rm", "-f", "-v", "-t", "0"], names("ps", "-a", "--format", "{{.Names}}")),
        (["network", "rm"], names("network", "ls", "--format", "{{.Name}}")),
        (["volume", "rm"], names("volume", "ls", "--format", "{{.Name}}")),
        (["rmi"], names("images", "--format", "{{.Repository}}:{{.Tag}}")),
    ]
    for command, found in removals:
        if found:  # another run starting may remove them first: its failure here is no matter
            subprocess.run([podman, *command, *found], capture_output=True, timeout=600, env=env, check=False)


def _subnet(engine: Engine) -> str:
    """A /24 for the balancer's network that no Podman network uses."""
    used = []
    for name in engine.podman_lines("network", "ls", "--format", "{{.Name}}"):
        inspected = engine.podman_lines("network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}} {{end}}", name)
        used += [ipaddress.ip_network(s) for s in " ".join(inspected).split()]
    while True:
        candidate = ipaddress.ip_network(f"10.214.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)


@dataclass(frozen=True)
class Project:
    engine: Engine
    name: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        tool = _tool("docker-compose", "docker-compose")
        return subprocess.run(
            [tool, "--profile", "scale", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            env=self.env,
        )

    def container(self, service: str) -> str:
        return self.engine.podman_lines(
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--filter",
            f"label={PROJECT_LABEL}={self.name}",
        )[0]

    def health(self, service: str) -> str:
        return self.engine.podman_lines("inspect", "--format", "{{.State.Health.Status}}", self.container(service))[0]

    def address(self, service: str, network: str) -> str:
        """The service's address on the file's `network`, as Podman reports it."""
        fmt = "{{json .NetworkSettings.Networks}}"
        networks = json.loads(self.engine.podman_lines("inspect", "--format", fmt, self.container(service))[0])
        return str(networks[f"{self.name}_{network}"]["IPAddress"])

    def subnet(self, network: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        fmt = "{{range .Subnets}}{{.Subnet}}{{end}}"
        return ipaddress.ip_network(
            self.engine.podman_lines("network", "inspect", "--format", fmt, f"{self.name}_{network}")[0]
        )

    def logs(self, service: str) -> list[dict[str, object]]:
        """The service's JSON log lines."""
        done = subprocess.run(
            [self.engine.podman, "logs", self.container(service)],
            capture_output=True,
            text=True,
            env=self.engine.env,
            check=True,
        )
        return json_lines(done.stdout + done.stderr)

    def left(self) -> list[str]:
        """What of this project (containers, networks, volumes, image tags) is still in Podman."""
        label = f"label={PROJECT_LABEL}={self.name}"
        left = [f"container {c}" for c in self.engine.podman_lines("ps", "-a", "-q", "--filter", label)]
        left += [f"network {n}" for n in self.engine.podman_lines("network", "ls", "-q", "--filter", label)]
        left += [f"volume {v}" for v in self.engine.podman_lines("volume", "ls", "-q", "--filter", label)]
        tag = self.env["KCD_IMAGE_TAG"]
        refs = self.engine.podman_lines("images", "--format", "{{.Repository}}:{{.Tag}}")
        return left + [f"image {r}" for r in refs if r.endswith(f":{tag}")]


def _docker_images(docker: str, name: str, tag: str) -> None:
    """The three images built from this checkout on Docker (`docker-compose build`: test_compose.py's engine and its
    build cache, seconds once built), tagged `tag` there while they are copied out."""
    done = subprocess.run([REPO / "deploy" / "base-image.sh", docker], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    env = compose_env(docker, COMPOSE_PROJECT_NAME=name, KCD_IMAGE_TAG=tag, DOCKER_HOST=f"unix://{SOCKET}")
    tool = _tool("docker-compose", "docker-compose")
    build = [tool, "--profile", "scale", "build", "pki", "kdc", "balancer"]
    done = subprocess.run(build, capture_output=True, text=True, timeout=2400, check=False, cwd=REPO, env=env)
    assert done.returncode == 0, f"docker-compose build on Docker:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _copy_into_podman(engine: Engine, docker: str, refs: list[str]) -> None:
    """`docker save` of `refs` loaded into Podman's store (`podman load`), under the same names."""
    with subprocess.Popen([docker, "save", *refs], stdout=subprocess.PIPE) as save:
        load = subprocess.run(
            [engine.podman, "load"], stdin=save.stdout, capture_output=True, text=True, timeout=900, env=engine.env
        )
    assert save.returncode == 0, f"docker save {' '.join(refs)} failed"
    assert load.returncode == 0, f"podman load: {load.stderr}"


@pytest.fixture(scope="module")
def project(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The compose file's project on Podman with the lab's three images, built on Docker from this checkout (Podman
    shares no build cache with Docker: building them on Podman took 395 s from nothing) and copied into Podman's store
    under the run's tag; brought down after, and the tags removed on both engines (Docker's become its build cache)."""
    name = _run_name()
    env = {
        **engine.env,
        "COMPOSE_PROJECT_NAME": name,
        "KCD_GATEWAY_PORT": str(free_port()),
        "KCD_BALANCER_PORT": str(free_port()),
        **balancer_settings(_subnet(engine)),
        "KCD_IMAGE_TAG": f"test-{name}",
    }
    p = Project(engine, name, env)
    refs = [f"{image}:{env['KCD_IMAGE_TAG']}" for image in IMAGES]
    try:
        with docker_engine(tmp_path_factory) as docker:
            try:
                _docker_images(docker, name, env["KCD_IMAGE_TAG"])
                _copy_into_podman(engine, docker, refs)
            finally:
                _keep_as_build_cache(docker, env["KCD_IMAGE_TAG"])
                left = _left_by(docker, name, env["KCD_IMAGE_TAG"])
                assert left == [], f"the Podman test left these on Docker: {left}"
            yield p
    finally:
        p.compose("down", "-v", "--remove-orphans", "--timeout", "5")
        for ref in refs:
            subprocess.run([engine.podman, "rmi", ref], capture_output=True, env=engine.env, check=False)
        left = p.left()
        assert left == [], f"the Podman test left these behind: {left}"


# The device's container, as the file makes it, says its nofile limit, its init (pid 1) and how its root is mounted.
_INSIDE = "ulimit -n; tr '\\0' ' ' < /proc/1/cmdline; echo; sed -n 's#^[^ ]* / [^ ]* \\(r[ow]\\),.*#\\1#p' /proc/mounts"


def test_a_second_command_finds_the_networks_as_the_file_describes_them(project: Project) -> None:
    """A second `run --rm --no-deps device` after the first made the project's networks starts too: docker-compose
    compares each network's IPAM options with the file's, and Podman reports `driver: host-local` for the balancer's
    network, which has a subnet of its own ("needs to be recreated - IPAM option "driver" has changed": after `up -d`
    no device ran on Podman). Each device container starts with the file's settings: an init as pid 1 (`init: true`,
    Podman's catatonit), the nofile limit of deploy/podman/containers.conf (Podman's own default exceeded this host's
    hard limit: "error setting rlimit type 7"), a read-only root."""
    for attempt in ("first", "second"):
        done = project.compose("run", "--rm", "--no-deps", "device", "sh", "-c", _INSIDE)
        assert done.returncode == 0, f"{attempt} run: {done.stdout}{done.stderr}"
        lines = done.stdout.splitlines()
        assert lines[0] == "20000", lines
        assert lines[1].startswith("/run/podman-init -- sh -c"), lines
        assert lines[-1] == "ro", lines
    networks = project.engine.podman_lines("network", "ls", "--format", "{{.Name}}")
    assert f"{project.name}_balanced" in networks, networks


def test_the_health_check_runner_makes_a_container_healthy(engine: Engine) -> None:
    """Without systemd Podman never runs a container's health check (it schedules them with systemd timers): a container
    stays `starting`, and docker-compose's `condition: service_healthy` waits for ever. One round of
    deploy/podman/healthchecks.sh runs the check, and the container is `healthy`."""
    name = f"{_run_name()}-health"
    run = [engine.podman, "run", "-d", "--init", "--name", name, "--health-cmd", "true", "--health-interval", "1s"]
    done = subprocess.run([*run, BASE, "sleep", "300"], capture_output=True, text=True, env=engine.env, check=False)
    try:
        assert done.returncode == 0, done.stderr

        def health() -> str:
            return engine.podman_lines("inspect", "--format", "{{.State.Health.Status}}", name)[0]

        if not Path("/run/systemd/system").exists():  # no systemd: nothing runs the check but the runner
            assert health() == "starting"
        ran = subprocess.run([HEALTHCHECKS, "--once"], capture_output=True, text=True, env=engine.env, timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert eventually(lambda: health() == "healthy", f"{name} healthy", 30)
    finally:
        subprocess.run([engine.podman, "rm", "-f", "-t", "0", name], capture_output=True, env=engine.env, check=False)


def test_what_a_killed_run_left_in_podman_is_removed_by_the_next_run(engine: Engine) -> None:
    """A run killed before its teardown left its project in Podman for good (containers, networks, volumes, its image
    tags: tests/leftovers.py stops processes only). Made here as such a run leaves them (named for a run whose
    controller has ended: `_run_name`; labelled as docker-compose labels them, a `-health` container, a
    `test-kcdpodman...` tag), then the next run starts (this file's `engine` fixture, in a pytest of its own): they
    are gone, and a project named for this run, still going, is not touched."""
    started = leftovers.start_time(os.getpid())
    assert started is not None
    dead = _run_name(leftovers.Run(os.getpid(), started - 1, leftovers.namespace("pid"), 0, str(REPO)))
    label = f"{PROJECT_LABEL}={dead}"
    engine.podman_lines("network", "create", "--label", label, f"{dead}_default")
    engine.podman_lines("volume", "create", "--label", label, f"{dead}_state")
    engine.podman_lines("create", "--label", label, "--name", f"{dead}_device_1", BASE, "true")
    engine.podman_lines("create", "--name", f"{dead}-health", BASE, "true")
    engine.podman_lines("tag", BASE, f"{IMAGES[0]}:test-{dead}")
    live = _run_name()
    engine.podman_lines("network", "create", "--label", f"{PROJECT_LABEL}={live}", f"{live}_default")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("PYTEST_XDIST_WORKER", None)
        next_run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
        done = subprocess.run(
            [*next_run, f"{Path(__file__)}::test_the_health_check_runner_makes_a_container_healthy"],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        left = [n for n in engine.podman_lines("ps", "-a", "--format", "{{.Names}}") if n.startswith(dead)]
        left += [n for n in engine.podman_lines("network", "ls", "--format", "{{.Name}}") if n.startswith(dead)]
        left += [n for n in engine.podman_lines("volume", "ls", "--format", "{{.Name}}") if n.startswith(dead)]
        left += [r for r in engine.podman_lines("images", "--format", "{{.Repository}}:{{.Tag}}") if dead in r]
        assert left == [], f"a killed run's objects were left: {left}"
        assert f"{live}_default" in engine.podman_lines("network", "ls", "--format", "{{.Name}}")
    finally:
        for command in (
            ["network", "rm", f"{live}_default", f"{dead}_default"],
            ["rm", "-f", f"{dead}_device_1", f"{dead}-health"],
            ["volume", "rm", f"{dead}_state"],
            ["rmi", f"{IMAGES[0]}:test-{dead}"],
        ):
            subprocess.run([engine.podman, *command], capture_output=True, env=engine.env, check=False)


def _healthy(project: Project, service: str) -> bool:
    return project.health(service) == "healthy"


@pytest.fixture(scope="module")
def balanced(project: Project) -> Iterator[Project]:
    """The profile scale up on Podman (`up -d balancer`: the lab, gateway-1 and gateway-2 healthy, the balancer), with
    deploy/podman/healthchecks.sh running the health checks meanwhile, as docs/containers.md says to."""
    runner = subprocess.Popen(
        [HEALTHCHECKS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=project.env
    )
    try:
        done = project.compose("up", "-d", "balancer", timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        for service in ("gateway-1", "gateway-2"):
            eventually(partial(_healthy, project, service), f"{service} healthy on Podman", 300)
        yield project
    finally:
        os.killpg(runner.pid, signal.SIGTERM)
        runner.wait(timeout=30)


def test_devices_through_the_balancer_are_served_by_both_gateways_on_podman(balanced: Project) -> None:
    """Profile scale on Podman: four devices through HAProxy (`run --rm device-scaled`, each a connection of its own)
    are served by gateway-1 and gateway-2, which take the balancer's PROXY headers from its own fixed address
    (`KCD_LAB_BALANCER_ADDRESS`) and log the device's address on the front network."""
    # a device answered 503 ("try again shortly": a gateway's KDC not reached, seen in 2 of 4 full runs) tries again
    # once after 5 s, as a device does; the four must still each be served as alice
    loop = 'for _ in $(seq "$0"); do "$@" || { sleep 5; "$@"; } || exit; done'
    done = balanced.compose("run", "--rm", "device-scaled", "sh", "-c", loop, "4", *_SCALED)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("the backend saw: alice@LAB.TEST via Negotiate") == 4, done.stdout
    front = balanced.subnet("front")
    for replica in ("gateway-1", "gateway-2"):
        requests = [e for e in balanced.logs(replica) if e.get("event") == "request"]
        assert requests, f"{replica} served no request"
        assert all(ipaddress.ip_address(str(e["client"])) in front for e in requests), requests
    address = balanced.env["KCD_LAB_BALANCER_ADDRESS"]
    assert balanced.address("balancer", "balanced") == address


def test_a_host_process_naming_a_device_of_its_own_to_a_gateway_behind_the_balancer_is_refused_on_podman(
    balanced: Project, tmp_path: Path
) -> None:
    """As on Docker (test_compose.py): the host's own address on the balancer's network (its bridge's .1) was inside
    the subnet the gateways took PROXY headers from, so a process on the host connecting to gateway-1 there could name
    any device and be served as it. The gateways now take them from the balancer's fixed address alone: refused."""
    pki_container = balanced.compose("ps", "-a", "-q", "pki").stdout.strip()
    copy = [_docker(), "cp", f"{pki_container}:/lab/pki", str(tmp_path / "pki")]
    subprocess.run(copy, check=True, capture_output=True, env=balanced.env, timeout=120)
    forged = forge(balanced.address("gateway-1", "balanced"), tmp_path / "pki")
    assert_forged_refused(lambda: balanced.logs("gateway-1"), forged)
    assert ipaddress.ip_address(forged.local.rpartition(":")[0]) in balanced.subnet("balanced"), forged


_CONNECT = (
    "import socket, sys\n"
    "for address in sys.argv[1:]:\n"
    "    host, _, port = address.rpartition(':')\n"
    "    try:\n"
    "        socket.create_connection((host, int(port)), timeout=10).close()\n"
    "        print(address, 'reached')\n"
    "    except OSError as e:\n"
    "        print(address, 'unreachable', type(e).__name__)\n"
)


# From a device's container: straight to a gateway's `address`, a PROXY header naming argv[2], then alice's TLS
# handshake and a request; the status line, or how the connection ended, after the connection's own end
_FORGE = """
import socket, ssl, sys
address, forged = sys.argv[1:3]
tls = ssl.create_default_context(cafile="/lab/pki/root.pem")
tls.load_cert_chain("/lab/pki/users/alice.pem", "/lab/pki/users/alice.key")
with socket.create_connection((address, 8443), timeout=30) as raw:
    print("local %s:%s" % raw.getsockname()[:2])
    raw.sendall(f"PROXY TCP4 {forged} {address} 40000 8443\\r\\n".encode())
    try:
        with tls.wrap_socket(raw, server_hostname="proxy.lab.test") as device:
            device.sendall(b"GET / HTTP/1.1\\r\\nHost: proxy.lab.test\\r\\nConnection: close\\r\\n\\r\\n")
            print("said", device.recv(200).split(b"\\r\\n")[0].decode())
    except OSError as e:
        print("said closed:", type(e).__name__)
"""


def _isolation_jumps() -> list[str]:
    """The host's FORWARD rules that send traffic to netavark's isolation chains."""
    done = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, timeout=60, check=True)
    return [rule for rule in done.stdout.splitlines() if "NETAVARK_ISOLATION" in rule]


def test_a_device_routed_around_the_balancer_on_podman_is_refused_its_forged_proxy_header(balanced: Project) -> None:
    """docker-compose's networks on Podman (through its API) each have netavark's `isolate` option, and while the
    host's FORWARD chain jumps to netavark's isolation chains a device reaches nothing on another network. netavark 1.4
    removes that jump, for every network of the host, when the last container of any isolated network leaves (here a
    one-shot on a network of its own, as another project's last container would), until a container is the first on a
    network again: meanwhile `device-scaled` reaches the KDC, the backend, the CRL server and gateway-1 on `balanced`,
    masqueraded to that network's own `.1`. The gateways took PROXY headers from that whole network, so such a
    device's own header was taken (any address it named); they now take them from the balancer's fixed address alone:
    refused before TLS."""
    for network in ("lab", "devices", "balanced", "front", "ad", "ad-devices"):
        fmt = "{{.Options}}"
        options = balanced.engine.podman_lines("network", "inspect", "--format", fmt, f"{balanced.name}_{network}")
        assert "isolate:true" in options[0], (network, options)
    started = balanced.compose("run", "-d", "--no-deps", "device-scaled", "sleep", "600")
    assert started.returncode == 0, started.stdout + started.stderr
    device = started.stdout.split()[-1]
    other = f"{balanced.name}_oneshot"
    engine = balanced.engine
    try:
        engine.podman_lines("network", "create", "--opt", "isolate=true", other)
        engine.podman_lines("run", "--rm", "--network", other, BASE, "true")  # its last container leaves
        assert _isolation_jumps() == [], "netavark kept its isolation: the device below would reach nothing"
        kdc, backend, crl = (balanced.address(s, "lab") for s in ("kdc", "backend", "crl"))
        gateway = balanced.address("gateway-1", "balanced")
        targets = [f"{kdc}:8088", f"{backend}:8081", f"{crl}:8082", f"{gateway}:8443"]
        reach = engine.podman_lines("exec", device, "python3", "-c", _CONNECT, *targets)
        assert dict(line.split()[:2] for line in reach) == dict.fromkeys(targets, "reached"), reach
        said = dict(
            line.split(" ", 1) for line in engine.podman_lines("exec", device, "python3", "-c", _FORGE, gateway, FORGED)
        )
        # gateway-1 sees it from `balanced`'s own address (netavark's masquerade), the device's port kept
        seen_as = f"{balanced.subnet('balanced')[1]}:{said['local'].rpartition(':')[2]}"
        assert_forged_refused(lambda: balanced.logs("gateway-1"), Forged(seen_as, said["said"]))
    finally:
        subprocess.run([engine.podman, "rm", "-f", "-t", "0", device], capture_output=True, env=engine.env, check=False)
        subprocess.run([engine.podman, "network", "rm", other], capture_output=True, env=engine.env, check=False)
