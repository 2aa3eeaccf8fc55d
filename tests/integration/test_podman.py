"""The compose lab's file on Podman (Debian 12's 4.3), as docs/containers.md, "Podman", runs it: docker-compose against
Podman's Docker API (`podman system service`), with deploy/podman/containers.conf, and without systemd the health
checks run by deploy/podman/healthchecks.sh.

What is pinned here is the cheap part, in seconds once the base image is in Podman's store (`deploy/base-image.sh
podman`: about a minute the first time): docker-compose makes the file's networks and volumes on Podman, a second
command finds the networks as the file describes them, a service's container starts with the file's settings (init,
read-only root) under the engine's limits, and the health-check runner makes a container healthy. The base image,
tagged with the run's tag, stands in for the three images: building them on Podman (5-6 minutes on 2 cores, beside
the Docker test's own builds: Podman shares no build cache with Docker) and running the whole lab would add minutes
to every fresh `make test`; docs/containers.md has the whole run's steps and times, done by hand.

Each run is a compose project of its own (`kcdpodman<run>x<random>`, `_run_name`) on a Podman API socket of its own; it
removes its containers, networks, volumes and tags and stops its service, and what a killed run left is removed by
the next (`_remove_dead_runs`). The base image stays in Podman's store, as Docker's build cache stays in dockerd's.
"""

from __future__ import annotations

import ipaddress
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
from pathlib import Path

import pytest

from tests import leftovers
from tests.integration.conftest import REPO, free_port
from tests.integration.jsonlog import eventually
from tests.integration.test_compose import _docker, compose_env

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow(seconds=20)]

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

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        tool = _tool("docker-compose", "docker-compose")
        return subprocess.run(
            [tool, "--profile", "scale", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=REPO,
            env=self.env,
        )

    def left(self) -> list[str]:
        """What of this project (containers, networks, volumes, image tags) is still in Podman."""
        label = f"label={PROJECT_LABEL}={self.name}"
        left = [f"container {c}" for c in self.engine.podman_lines("ps", "-a", "-q", "--filter", label)]
        left += [f"network {n}" for n in self.engine.podman_lines("network", "ls", "-q", "--filter", label)]
        left += [f"volume {v}" for v in self.engine.podman_lines("volume", "ls", "-q", "--filter", label)]
        tag = self.env["KCD_IMAGE_TAG"]
        refs = self.engine.podman_lines("images", "--format", "{{.Repository}}:{{.Tag}}")
        return left + [f"image {r}" for r in refs if r.endswith(f":{tag}")]


@pytest.fixture(scope="module")
def project(engine: Engine) -> Iterator[Project]:
    """The compose file's project on Podman, the base image standing in for the three images (tagged with the run's
    tag); brought down after, and the tags removed (`podman rmi` of a name: the base image keeps its own)."""
    name = _run_name()
    env = {
        **engine.env,
        "COMPOSE_PROJECT_NAME": name,
        "KCD_GATEWAY_PORT": str(free_port()),
        "KCD_BALANCER_PORT": str(free_port()),
        "KCD_LAB_BALANCER_SUBNET": _subnet(engine),
        "KCD_IMAGE_TAG": f"test-{name}",
    }
    p = Project(engine, name, env)
    try:
        for image in IMAGES:
            engine.podman_lines("tag", BASE, f"{image}:{env['KCD_IMAGE_TAG']}")
        yield p
    finally:
        p.compose("down", "-v", "--remove-orphans", "--timeout", "5")
        for image in IMAGES:
            ref = f"{image}:{env['KCD_IMAGE_TAG']}"
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
