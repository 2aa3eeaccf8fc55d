"""The compose lab, built and run on a real Docker engine: the device through the gateway and through the balancer.

What a newcomer would do, as the README says it: the base image made locally when the engine lacks it
(`deploy/base-image.sh`), `docker-compose build`, `up -d`, `run --rm device`, a curl from the host, `down`.
The engine is Debian's docker.io; when no daemon answers, the test starts `dockerd` itself and stops it at
the end (after any other run that uses it: a shared lock counts them), putting `ip_forward` back. Each run
is its own compose project, on free loopback ports and its own balancer subnet, with its own image tag, so runs never
collide. Builds are cached by the engine between runs. The first run on a machine builds everything (minutes):
the tests here have a long timeout of their own.

A run leaves the engine as it found it but for the build cache: `down -v` removes the project's containers, networks
(their `br-*` bridges) and volumes, the run's images become the `build-cache` tag (one image each: the previous one's
layers go but where the new one shares them, so the next run's build finds everything but the changed code), and the
teardown fails naming anything of the project, or an image of its tag, still there. Before, every checkout kept its
three images under a tag of its own, and every run from a fresh clone added one more (about 8 GB here). Runs killed
before their
teardown (a timeout's SIGKILL, a closed terminal) left their projects and images behind, and their networks' `br-*`
bridges stayed on the host after dockerd stopped: the run that stops the dockerd it started removes every `kcdtest*`
project and `test-*` image first, when no other run holds the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import pytest

from tests import leftovers
from tests.integration.conftest import REPO, free_port
from tests.integration.jsonlog import eventually

pytestmark = [pytest.mark.timeout(2400), pytest.mark.slow(seconds=15)]  # a build, up and down besides the tests

SOCKET = "/var/run/docker.sock"
LOCK = leftovers.ENGINE_LOCK  # shared: a run using the engine; exclusive: stopping it
IP_FORWARD = leftovers.IP_FORWARD
PROJECT_PREFIX = "kcdtest"  # every run's compose project: kcdtest<pid><random>
TAG_PREFIX = "test-"  # every run's image tag (KCD_IMAGE_TAG): test-<project>
CACHE_TAG = "build-cache"  # the last run's images, kept for the next run's build
# docker-compose.yml's images, tagged KCD_IMAGE_TAG (the dc's: profile ad, test_compose_ad.py)
IMAGES = ("kcd-proxy", "kcd-proxy-kdc", "kcd-proxy-balancer", "kcd-proxy-dc")
PROJECT_LABEL = "com.docker.compose.project"


def _docker() -> str:
    """Debian's docker CLI (what `make setup` installs) before any other on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise AssertionError("docker is missing: `make setup` installs it (Debian package docker.io)")


def compose_env(docker: str, caller: Mapping[str, str] = os.environ, **settings: str) -> dict[str, str]:
    """The environment the tests run docker-compose in: the caller's, `settings` added, with `docker` (the CLI the tests
    chose) first on PATH and the classic builder. Compose runs `docker build`, `docker start --attach` (`run`) and
    `docker exec` from PATH, where another CLI may come first (Docker's own beside Debian's engine); the build cache the
    runs keep is the classic builder's image layers, and Docker's CLI without buildx refuses DOCKER_BUILDKIT=1."""
    return {
        **caller,
        "PATH": f"{Path(docker).parent}{os.pathsep}{caller.get('PATH', '')}",
        "DOCKER_BUILDKIT": "0",
    } | settings


def _engine_answers(docker: str) -> bool:
    done = subprocess.run([docker, "info"], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


@contextlib.contextmanager
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Docker engine that answers: the running one, or a `dockerd` started here and stopped afterwards (once no
    other run holds it). The `engine` fixture here; test_podman.py builds the lab's images with it."""
    docker = _docker()
    assert shutil.which("dockerd"), "dockerd is missing: `make setup` installs it (Debian package docker.io)"
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        started: subprocess.Popen[bytes] | None = None
        forward = IP_FORWARD.read_text()
        bridge = Path("/sys/class/net/docker0").exists()
        if not _engine_answers(docker):
            log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
            # What to put back, in its environment: a run killed before its teardown leaves it to the next run
            # (tests/leftovers.py), which stops it once no run holds the engine.
            before = {leftovers.IP_FORWARD_BEFORE: forward.strip(), leftovers.DOCKER0_BEFORE: "yes" if bridge else "no"}
            with log.open("wb") as out:
                started = subprocess.Popen(
                    ["dockerd", f"--host=unix://{SOCKET}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, **before},
                )
            deadline = time.monotonic() + 180
            while not _engine_answers(docker):
                assert started.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"dockerd did not answer within 180 s: {log.read_text()[-2000:]}"
                time.sleep(1)
        try:
            yield docker
        finally:
            if started is not None:
                _stop_dockerd(lock, started, forward, bridge)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Docker engine that answers: the running one, or a `dockerd` started here and stopped afterwards."""
    with docker_engine(tmp_path_factory) as docker:
        yield docker


def _stop_dockerd(lock: TextIO, dockerd: subprocess.Popen[bytes], forward: str, bridge: bool) -> None:
    """Stop the dockerd this run started, once no other run holds the engine (at most 30 minutes' wait), after
    removing what killed runs left on it (`_remove_dead_runs`); put back ip_forward, and remove the docker0 bridge it
    made (dockerd leaves it behind)."""
    deadline = time.monotonic() + 1800
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                return  # another run still uses it; it is left running rather than pulled from under that run
            time.sleep(2)
    try:
        _remove_dead_runs(_docker())
    finally:
        _terminate(dockerd, forward, bridge)


def _terminate(dockerd: subprocess.Popen[bytes], forward: str, bridge: bool) -> None:
    dockerd.send_signal(signal.SIGTERM)
    try:
        dockerd.wait(timeout=60)
    except subprocess.TimeoutExpired:
        dockerd.kill()
        dockerd.wait()
    IP_FORWARD.write_text(forward)
    if not bridge:
        subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, check=False)


def _docker_lines(docker: str, *args: str) -> list[str]:
    done = subprocess.run([docker, *args], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.splitlines()


def _of_projects(docker: str, kind: str, projects: Callable[[str], bool]) -> list[str]:
    """The ids (volumes: names) of the engine's containers, networks or volumes whose compose project is one of
    `projects`."""
    listing = {"container": ["ps", "-a"], "network": ["network", "ls"], "volume": ["volume", "ls"]}[kind]
    key = "{{.Name}}" if kind == "volume" else "{{.ID}}"
    fmt = f'{key} {{{{.Label "{PROJECT_LABEL}"}}}}'
    lines = _docker_lines(docker, *listing, "--filter", f"label={PROJECT_LABEL}", "--format", fmt)
    return [ident for ident, _, project in (line.partition(" ") for line in lines) if projects(project)]


def _tagged(docker: str, tags: Callable[[str], bool]) -> list[str]:
    """The images of docker-compose.yml (`IMAGES`) with a tag among `tags`, as repository:tag."""
    lines = _docker_lines(docker, "images", "--format", "{{.Repository}}:{{.Tag}}")
    return [ref for ref in lines if ref.partition(":")[0] in IMAGES and tags(ref.partition(":")[2])]


def _remove(docker: str, projects: Callable[[str], bool], tags: Callable[[str], bool]) -> None:
    """Remove the containers, networks and volumes of `projects` and the images tagged among `tags` (an image whose
    layers another image or the build cache holds loses its tag only)."""
    removals = [
        (["rm", "-f", "-v"], _of_projects(docker, "container", projects)),
        (["network", "rm"], _of_projects(docker, "network", projects)),
        (["volume", "rm"], _of_projects(docker, "volume", projects)),
        (["image", "rm"], _tagged(docker, tags)),
    ]
    for command, names in removals:
        if names:  # removing many images takes minutes on a loaded machine (100 images, 4 GB: more than 5)
            subprocess.run([docker, *command, *names], capture_output=True, timeout=1800, check=False)


def _image_id(docker: str, ref: str) -> str:
    done = subprocess.run(
        [docker, "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def _keep_as_build_cache(docker: str, tag: str) -> None:
    """The run's images (tagged `tag`) become `CACHE_TAG` and lose `tag`; the previous cache image is removed, with
    the layers of its own (an image another run's tag still names stays)."""
    for image in IMAGES:
        built, cache = f"{image}:{tag}", f"{image}:{CACHE_TAG}"
        if not (new := _image_id(docker, built)):
            continue
        previous = _image_id(docker, cache)
        subprocess.run([docker, "tag", built, cache], capture_output=True, timeout=120, check=False)
        subprocess.run([docker, "image", "rm", built], capture_output=True, timeout=300, check=False)
        if previous and previous != new:
            subprocess.run([docker, "image", "rm", previous], capture_output=True, timeout=300, check=False)


def _left_by(docker: str, project: str, tag: str) -> list[str]:
    """What of `project` (and its images, tagged `tag`) is still on the engine."""
    left = [
        f"{kind} {ident}"
        for kind in ("container", "network", "volume")
        for ident in _of_projects(docker, kind, project.__eq__)
    ]
    return left + [f"image {ref}" for ref in _tagged(docker, tag.__eq__)]


def _remove_dead_runs(docker: str) -> None:
    """Every test project (`kcdtest*`) and test image (`test-*`; not the build cache) left on the engine: called
    while no run holds it, they are runs' that ended without their teardown (killed), or checkouts' (their tag was
    one per checkout, kept)."""
    _remove(docker, lambda project: project.startswith(PROJECT_PREFIX), lambda tag: tag.startswith(TAG_PREFIX))


@dataclass(frozen=True)
class Stack:
    docker: str
    project: str
    env: dict[str, str]
    gateway_port: int
    balancer_port: int
    timings: dict[str, float]
    profile: str = "scale"  # what `compose` names with --profile (test_compose_ad.py: ad)

    def compose(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
        tool = shutil.which("docker-compose")
        assert tool, "docker-compose is missing: `make setup` installs it (Debian package docker-compose)"
        done = subprocess.run(
            [tool, "--profile", self.profile, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            env=self.env,
        )
        if check:
            said = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            assert done.returncode == 0, f"docker-compose {' '.join(args)}:\n{said}"
        return done

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        done = subprocess.run(
            [self.docker, "inspect", "--format", "{{.State.Health.Status}}", self.container(service)],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()

    def logs(self, service: str) -> list[dict[str, object]]:
        """The service's JSON log lines."""
        cmd = [self.docker, "logs", self.container(service)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json_lines(done.stdout + done.stderr)


def json_lines(text: str) -> list[dict[str, object]]:
    """The JSON objects among a container's log lines (the engine's own lines and the entrypoint's left out)."""
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(entry := json.loads(line), dict):
                lines.append(entry)
    return lines


def _subnet(docker: str) -> str:
    """A /24 for the balancer's network that no other Docker network uses."""
    names = subprocess.run([docker, "network", "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
    used = []
    for name in names:
        done = subprocess.run(
            [docker, "network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        used += [ipaddress.ip_network(s) for s in done.stdout.split()]
    while True:
        candidate = ipaddress.ip_network(f"10.213.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return str(candidate)


def balancer_settings(subnet: str) -> dict[str, str]:
    """The compose variables that place the balancer: its network (`KCD_LAB_BALANCER_SUBNET`, a free /24) and its own
    fixed address on it (`KCD_LAB_BALANCER_ADDRESS`, the network's last one, .254, clear of the addresses the engines
    hand out from the bottom), the one address the gateways behind it take PROXY headers from."""
    return {"KCD_LAB_BALANCER_SUBNET": subnet, "KCD_LAB_BALANCER_ADDRESS": str(ipaddress.ip_network(subnet)[-2])}


@pytest.fixture(scope="module")
def stack(engine: str) -> Iterator[Stack]:
    """The compose lab and its `scale` profile, up and healthy, in a project of its own; brought down after."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    done = subprocess.run([REPO / "deploy" / "base-image.sh", engine], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    timings["base image"] = time.monotonic() - started
    project = f"{PROJECT_PREFIX}{os.getpid()}{secrets.token_hex(3)}"
    gateway_port, balancer_port = free_port(), free_port()
    env = compose_env(
        engine,
        os.environ,
        COMPOSE_PROJECT_NAME=project,
        KCD_GATEWAY_PORT=str(gateway_port),
        KCD_BALANCER_PORT=str(balancer_port),
        **balancer_settings(_subnet(engine)),
        # Image tags are global to the engine: one per run, so another run (other code) never replaces the images
        # under this one, and removed with the run. Layers, and so the build cache, are shared all the same.
        KCD_IMAGE_TAG=f"{TAG_PREFIX}{project}",
        DOCKER_HOST=f"unix://{SOCKET}",
    )
    s = Stack(engine, project, env, gateway_port, balancer_port, timings)
    try:
        mark = time.monotonic()
        s.compose("build")
        timings["build"] = time.monotonic() - mark
        mark = time.monotonic()
        s.compose("up", "-d", "gateway", "balancer")
        deadline = time.monotonic() + 300
        for service in ("gateway", "gateway-1", "gateway-2"):
            while (status := s.health(service)) != "healthy":
                assert time.monotonic() < deadline, f"{service} is {status!r} after 300 s: {s.compose('logs').stdout}"
                time.sleep(1)
        timings["up"] = time.monotonic() - mark
        yield s
    finally:
        bring_down(s, started)


def bring_down(s: Stack, started: float) -> None:
    """`down -v` of the stack's project, what it leaves removed, its images kept as the build cache; fails naming
    anything of the project still on the engine."""
    s.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
    _remove(s.docker, s.project.__eq__, lambda _tag: False)
    _keep_as_build_cache(s.docker, s.env["KCD_IMAGE_TAG"])
    s.timings["total"] = time.monotonic() - started
    print(f"compose test timings (s), profile {s.profile}:", {k: round(v) for k, v in s.timings.items()})
    left = _left_by(s.docker, s.project, s.env["KCD_IMAGE_TAG"])
    assert left == [], f"the compose test left these on the engine: {left}"


def test_compose_builds_with_the_tests_docker_cli_whatever_path_and_docker_buildkit_say(
    engine: str, tmp_path: Path
) -> None:
    """docker-compose 1.29 builds by running `docker build` from PATH: with Docker's own CLI first there (a static 28.2
    in /usr/local/bin here, without buildx) and DOCKER_BUILDKIT=1 exported, as Docker's documentation suggests, the
    stack's build failed ("BuildKit is enabled but the buildx component is missing or broken"). The tests' compose
    environment (`compose_env`) gives compose the CLI the tests chose and the classic builder: a build through it
    succeeds whatever the caller's PATH and DOCKER_BUILDKIT say."""
    project = f"{PROJECT_PREFIX}{os.getpid()}{secrets.token_hex(3)}"
    image = f"{IMAGES[0]}:{TAG_PREFIX}{project}"  # a run's tag: a killed run's is removed with the rest
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY tiny /tiny\n")
    (tmp_path / "tiny").write_text("a file\n")
    (tmp_path / "docker-compose.yml").write_text(f"services:\n  tiny:\n    build: .\n    image: {image}\n")
    first = shutil.which("docker")
    assert first, "docker is missing: `make setup` installs it (Debian package docker.io)"
    caller = {**os.environ, "DOCKER_BUILDKIT": "1", "PATH": f"{Path(first).parent}{os.pathsep}{os.environ['PATH']}"}
    env = compose_env(engine, caller, COMPOSE_PROJECT_NAME=project, DOCKER_HOST=f"unix://{SOCKET}")
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is missing: `make setup` installs it (Debian package docker-compose)"
    try:
        done = subprocess.run(
            [tool, "build"], capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, f"{first} first on PATH, DOCKER_BUILDKIT=1:\n{done.stdout}\n{done.stderr}"
        assert _image_id(engine, image)
    finally:
        subprocess.run([engine, "image", "rm", image], capture_output=True, timeout=300, check=False)


def _device(stack: Stack, service: str, *args: str) -> subprocess.CompletedProcess[str]:
    return stack.compose("run", "--rm", service, *args, check=False, timeout=300)


# docker-compose.yml's command of `device-scaled`: alice through the balancer
_SCALED = ["python3", "-m", "proxy.lab.device", "--url", "https://proxy.lab.test:8443", "--cacert", "/lab/pki/root.pem"]
_SCALED += ["--cert", "/lab/pki/users/alice.pem", "--key", "/lab/pki/users/alice.key"]


def _scaled_devices(stack: Stack, count: int) -> subprocess.CompletedProcess[str]:
    """`count` devices through the balancer, one after the other, in one `run --rm device-scaled`: each a process of
    its own, so a connection of its own that the balancer gives the next gateway; the first that fails ends the run
    with its exit code. A `docker-compose run` each (a container started and removed) took 20-30 s on a loaded
    machine, most of the test."""
    loop = 'for _ in $(seq "$0"); do "$@" || exit; done'
    return _device(stack, "device-scaled", "sh", "-c", loop, str(count), *_SCALED)


def test_device_gets_the_backends_answer_as_alice(stack: Stack) -> None:
    """`run --rm device`: alice's certificate in, the backend authenticated alice@LAB.TEST by Negotiate."""
    done = _device(stack, "device")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the backend saw: alice@LAB.TEST via Negotiate" in done.stdout


def test_a_revoked_certificate_is_refused(stack: Stack) -> None:
    """erin's certificate (users/revoked.pem) is on the lab CRL: refused, and nothing reaches the backend."""
    pki = "/lab/pki"
    args = ["python3", "-m", "proxy.lab.device", "--url", "https://proxy.lab.test:8443"]
    args += ["--cert", f"{pki}/users/revoked.pem", "--key", f"{pki}/users/revoked.key", "--cacert", f"{pki}/root.pem"]
    done = _device(stack, "device", *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "revoked" in done.stdout + done.stderr
    assert "the backend saw" not in done.stdout


def test_curl_from_the_host(stack: Stack, tmp_path: Path) -> None:
    """The README's commands: `docker cp` the lab's certificates out of the (exited) pki container, then curl on the
    published loopback port."""
    pki_container = stack.compose("ps", "-a", "-q", "pki").stdout.strip()
    subprocess.run([stack.docker, "cp", f"{pki_container}:/lab/pki", str(tmp_path / "pki")], check=True)
    pki = tmp_path / "pki"
    port = stack.gateway_port
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(pki / "root.pem")]
    cmd += ["--cert", str(pki / "users" / "alice.pem"), "--key", str(pki / "users" / "alice.key")]
    cmd += ["--resolve", f"proxy.lab.test:{port}:127.0.0.1", "-w", "\n%{http_code}"]
    done = subprocess.run(
        [*cmd, f"https://proxy.lab.test:{port}/EWS/Exchange.asmx"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", done.stdout + done.stderr
    assert json.loads(body)["principal"] == "alice@LAB.TEST"


def test_the_balancer_spreads_devices_over_both_gateways_which_see_the_device(stack: Stack) -> None:
    """Profile scale: four devices through HAProxy (send-proxy-v2; one `run`, each device a connection of its own)
    are served by gateway-1 and gateway-2, and each gateway logs and forwards the device's own address (the front
    network's), not the balancer's."""
    done = _scaled_devices(stack, 4)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("the backend saw: alice@LAB.TEST via Negotiate") == 4, done.stdout
    network = f"{stack.project}_front"
    front = subprocess.run(
        [stack.docker, "network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", network],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for replica in ("gateway-1", "gateway-2"):
        requests = [e for e in stack.logs(replica) if e.get("event") == "request"]
        assert requests, f"{replica} served no request"
        for entry in requests:
            assert ipaddress.ip_address(str(entry["client"])) in ipaddress.ip_network(front), entry


def test_a_gateway_behind_the_balancer_refuses_connections_that_bypass_it(stack: Stack) -> None:
    """A container on the lab network connecting to gateway-1 directly (no PROXY header, not the balancer's
    network) is closed before TLS, and gateway-1 logs why."""
    args = ["python3", "-m", "proxy.lab.device", "--url", "https://gateway-1:8443", "--cacert", "/lab/pki/root.pem"]
    args += ["--cert", "/lab/pki/users/alice.pem", "--key", "/lab/pki/users/alice.key"]

    def refused() -> bool:  # docker's log of the container may lag behind the device's exit: polled, not read once
        events = [e for e in stack.logs("gateway-1") if e.get("event") == "proxy_header_refused"]
        return any("not in listener.trusted_proxies" in str(e.get("reason")) for e in events)

    # On a loaded engine a `run --rm` can fail before its device connects (the container not started, the
    # network's name service not yet answering: one fresh-clone run saw the device fail with no refusal logged):
    # up to three devices, each of which must fail, until one connection's refusal is in gateway-1's log.
    attempts: list[str] = []
    for _ in range(3):
        done = _device(stack, "device", *args)
        assert done.returncode != 0, done.stdout + done.stderr
        attempts.append(f"exit {done.returncode}: {(done.stdout + done.stderr)[-600:]!r}")
        with contextlib.suppress(AssertionError):
            eventually(refused, "gateway-1's proxy_header_refused line", timeout=30.0)
            return
    raise AssertionError(
        f"no proxy_header_refused line in gateway-1's log for three devices that bypassed the balancer: {attempts}"
    )


FORGED = "203.0.113.77"  # TEST-NET-3: the device a forged PROXY header names
_REQUEST = b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Forged:
    """What `forge` saw: the connection's own end (`ip:port`, as the gateway logs its peer) and how it ended."""

    local: str
    said: str


def forge(address: str, pki: Path) -> Forged:
    """From this host, straight to a gateway's `address` on the balancer's network: a PROXY header naming `FORGED`,
    then alice's TLS handshake and a request. The answer's status line, or how the connection ended."""
    tls = ssl.create_default_context(cafile=str(pki / "root.pem"))
    tls.load_cert_chain(str(pki / "users" / "alice.pem"), str(pki / "users" / "alice.key"))
    with socket.create_connection((address, 8443), timeout=30) as raw:
        host, port = raw.getsockname()[:2]
        raw.sendall(f"PROXY TCP4 {FORGED} {address} 40000 8443\r\n".encode())
        try:
            with tls.wrap_socket(raw, server_hostname="proxy.lab.test") as device:
                device.sendall(_REQUEST)
                return Forged(f"{host}:{port}", device.recv(200).split(b"\r\n")[0].decode())
        except OSError as e:
            return Forged(f"{host}:{port}", f"closed: {type(e).__name__}: {e}")


def assert_forged_refused(logs: Callable[[], list[dict[str, object]]], forged: Forged) -> None:
    """gateway-1 closed the forged connection before TLS, its `proxy_header_refused` line naming the connection's own
    address as not trusted; fails naming the `request` line if it served the forged device instead."""

    def refused() -> dict[str, object] | None:
        lines = logs()
        served = [e for e in lines if e.get("event") == "request" and e.get("client") == FORGED]
        assert served == [], f"a forged PROXY header was taken: {served}"
        found = [e for e in lines if e.get("event") == "proxy_header_refused" and e.get("peer") == forged.local]
        return found[0] if found else None

    line = eventually(refused, f"gateway-1's proxy_header_refused line for {forged.local}", 30)
    assert "not in listener.trusted_proxies" in str(line.get("reason")), line
    assert forged.said.startswith("closed"), forged


def _address(stack: Stack, service: str, network: str) -> str:
    fmt = "{{json .NetworkSettings.Networks}}"
    done = subprocess.run(
        [stack.docker, "inspect", "--format", fmt, stack.container(service)], capture_output=True, text=True, check=True
    )
    return str(json.loads(done.stdout)[f"{stack.project}_{network}"]["IPAddress"])


def test_a_host_process_naming_a_device_of_its_own_to_a_gateway_behind_the_balancer_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """The gateways behind the balancer took PROXY headers from its whole network: the host's own address on that
    bridge (.1) is in it, so any process on the host (and gateway-2, on that network too) could connect to gateway-1
    and name any device (served as alice, logged as from 203.0.113.77). They now take them from the balancer's fixed
    address alone (`KCD_LAB_BALANCER_ADDRESS`, a /32): refused before TLS, logged with the address it came from."""
    pki_container = stack.compose("ps", "-a", "-q", "pki").stdout.strip()
    subprocess.run([stack.docker, "cp", f"{pki_container}:/lab/pki", str(tmp_path / "pki")], check=True)
    forged = forge(_address(stack, "gateway-1", "balanced"), tmp_path / "pki")
    assert_forged_refused(lambda: stack.logs("gateway-1"), forged)
    # the host's own address on that network: inside the subnet, and not the balancer's, which is fixed
    subnet = ipaddress.ip_network(stack.env["KCD_LAB_BALANCER_SUBNET"])
    assert ipaddress.ip_address(forged.local.rpartition(":")[0]) in subnet, forged
    assert _address(stack, "balancer", "balanced") == stack.env["KCD_LAB_BALANCER_ADDRESS"]


def test_the_gateway_image_imports_every_module_of_the_package(stack: Stack) -> None:
    """Every proxy.* module imports in the image: no runtime library (libldap for bonsai, libgssapi) left out."""
    walk = (
        "import importlib, pkgutil, proxy; "
        "names = [m.name for m in pkgutil.walk_packages(proxy.__path__, 'proxy.') if '__main__' not in m.name]; "
        "[importlib.import_module(n) for n in names]; print(len(names), 'modules')"
    )
    done = stack.compose("run", "--rm", "--no-deps", "device", "python3", "-c", walk, check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("modules")


# What no container but the lab's writers (pki, kdc) may hold: the CAs' keys, the KDC's master key stash and LDAP
# bind password, the LDAP database (every principal's keys), and the keytab of a service that is not its own.
_REALM_SECRETS = {
    "pki/root.key",
    "pki/issuing.key",
    "pki/ocsp.key",
    "pki/rogue/root.key",
    "kdc/stash",
    "kdc/ldap-service.keyfile",
    "ldap/data/data.mdb",
    "ldap/slapd.conf",
    "keytabs/other.keytab",
}
_LIST_LAB = (
    "import os, json; print(json.dumps(sorted(os.path.relpath(os.path.join(d, f), '/lab') "
    "for d, _, fs in os.walk('/lab') for f in fs)))"
)


def test_no_reader_of_the_lab_holds_a_ca_key_or_a_secret_of_the_realm(stack: Stack) -> None:
    """The gateway, backend, CRL server and device see in /lab what they read and nothing of the CAs' keys, the
    KDC's files or another service's keytab (they mounted the whole lab volume: the device read the CA's key)."""
    held: dict[str, set[str]] = {}
    for service in ("gateway", "backend", "crl"):
        done = subprocess.run(
            [stack.docker, "exec", stack.container(service), "python3", "-c", _LIST_LAB],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        held[service] = set(json.loads(done.stdout))
    done = stack.compose("run", "--rm", "--no-deps", "device", "python3", "-c", _LIST_LAB, timeout=300)
    held["device"] = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "keytabs/proxy.keytab" in held["gateway"]
    assert "pki/server.key" in held["gateway"]
    assert "pki/users/alice.key" in held["device"]
    for service, files in held.items():
        assert not files & _REALM_SECRETS, (service, sorted(files & _REALM_SECRETS))
        assert not any(f.startswith(("kdc/", "ldap/")) for f in files), service
        own = {"gateway": {"keytabs/proxy.keytab"}, "backend": {"keytabs/cas.keytab"}}.get(service, set())
        assert {f for f in files if f.endswith(".keytab")} == own, service
        if service != "device":
            assert not any(f.startswith("pki/users/") and f.endswith((".key", ".p12")) for f in files), service


def _readme_host_lines() -> str:
    """The README's container commands from its `docker cp` of the lab's PKI through the curl (continuation lines
    included), as printed."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Containers") :]
    block = block[block.index("```sh\n") + 6 :]
    lines = block[: block.index("```")].splitlines()
    start = next(i for i, line in enumerate(lines) if "docker cp" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("curl"))
    while lines[end].endswith("\\"):
        end += 1
    return "\n".join(lines[start : end + 1]) + "\n"


def _run_readme_host_lines(stack: Stack, where: Path) -> subprocess.CompletedProcess[str]:
    """The README's `docker cp` and curl lines, run by bash in `where` against this project, on its published port
    (`KCD_GATEWAY_PORT`, as a newcomer who moved it from `make lab`'s 8443 would have it set)."""
    env = {**stack.env, "COMPOSE_FILE": str(REPO / "docker-compose.yml")}
    script = "set -eu\n" + _readme_host_lines()
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False, cwd=where, env=env
    )


def test_the_readmes_curl_as_printed_follows_the_moved_port(stack: Stack, tmp_path: Path) -> None:
    """`make lab`'s gateway holds 127.0.0.1:8443, so a newcomer who followed the README's lab first moves this one
    with KCD_GATEWAY_PORT, as the README says: its curl, as printed, reaches this stack's gateway as alice. It named
    8443 outright and so reached `make lab`'s gateway, which refused the compose lab's certificates ("unable to get
    local issuer certificate")."""
    assert stack.gateway_port != 8443
    done = _run_readme_host_lines(stack, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["principal"] == "alice@LAB.TEST"


def test_the_readmes_copy_of_the_pki_replaces_an_earlier_labs(stack: Stack, tmp_path: Path) -> None:
    """A newcomer who ran the stack before (`down -v`, `up -d` again: a new PKI) still has the earlier lab's
    `lab-pki`: the README's lines, as printed, leave the lab's PKI of now there, and its curl gets alice's answer.
    `docker cp` into the existing directory put the new PKI under lab-pki/pki and the curl used the old root and
    keys ("unable to get local issuer certificate")."""
    from proxy.lab import pki

    pki.make_pki(tmp_path / "lab-pki", now=datetime.now(UTC))  # the earlier lab's PKI: other CA, other keys
    done = _run_readme_host_lines(stack, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["principal"] == "alice@LAB.TEST"
    assert not (tmp_path / "lab-pki" / "pki").exists()


def test_the_images_carry_no_apt_cache(stack: Stack) -> None:
    """No downloaded package, apt binary cache or package list stays in the three images (the local base image has
    no docker-clean apt hook as the official one has: 81-108 MB of /var/cache/apt were in every image)."""
    tag = stack.env["KCD_IMAGE_TAG"]
    for image in (f"kcd-proxy:{tag}", f"kcd-proxy-kdc:{tag}", f"kcd-proxy-balancer:{tag}"):
        run = [stack.docker, "run", "--rm", "--user", "0", "--network", "none", "--entrypoint", "find", image]
        done = subprocess.run(
            [*run, "/var/cache/apt", "/var/lib/apt/lists", "-type", "f", "-size", "+0c"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [], f"{image}: {done.stdout.split()[:5]} ..."


_CONNECT = (
    "import socket, sys\n"
    "for host, port in [(h, int(p)) for h, p in (a.split(':') for a in sys.argv[1:])]:\n"
    "    try:\n"
    "        socket.create_connection((host, port), timeout=10).close()\n"
    "        print(host, port, 'reached')\n"
    "    except OSError as e:\n"
    "        print(host, port, 'unreachable', type(e).__name__)\n"
)


def test_a_device_reaches_the_gateways_and_nothing_behind_them(stack: Stack) -> None:
    """The device's container reaches the gateway (and gateway-1, whose PROXY-protocol trust is what refuses it),
    never the backend, the KDC or the CRL server: it went round the gateway to the Exchange stand-in and the KDC."""
    targets = ["proxy.lab.test:8443", "gateway-1:8443", "backend:8081", "kdc:8088", "crl:8082"]
    done = stack.compose("run", "--rm", "--no-deps", "device", "python3", "-c", _CONNECT, *targets, timeout=300)
    seen = {" ".join(line.split()[:2]): line.split()[2] for line in done.stdout.splitlines() if len(line.split()) > 2}
    assert seen == {
        "proxy.lab.test 8443": "reached",
        "gateway-1 8443": "reached",
        "backend 8081": "unreachable",
        "kdc 8088": "unreachable",
        "crl 8082": "unreachable",
    }, done.stdout


def test_no_container_log_holds_a_password_or_a_key(stack: Stack) -> None:
    """Every service's log (pki, kdc and handout included, after the device runs above) holds no lab password (LDAP
    root, KDC master, the users'), no PEM private key and no Negotiate token: the compose logs the secrets audit
    (docs/hardening.md, section 9) did not cover."""
    from proxy.lab.kdc import MASTER_PASSWORD, ROOT_PASSWORD
    from proxy.lab.layout import DISABLED_USERS, USERS

    logs = stack.compose("logs", "--no-color", "--timestamps").stdout
    assert "handout" in logs  # every service's lines, the one-shots' included
    assert "lab files handed out" in logs
    needles = {ROOT_PASSWORD: "the LDAP root password", MASTER_PASSWORD: "the KDC master password"}
    needles |= {password: f"{user}'s password" for user, password in {**USERS, **DISABLED_USERS}.items()}
    needles |= {"PRIVATE KEY": "a PEM private key", "Negotiate YII": "a Negotiate token"}
    found = [what for needle, what in needles.items() if needle in logs]
    assert found == [], found


_STATE = "/var/lib/kcd-proxy/crl-state.json"
_PLANT = """
import json, sys
with open(sys.argv[1], "r+") as f:  # rewritten in place: its owner and mode 0600 stay
    state = json.load(f)
    state["floors"].append({"issuer": "CN=planted", "crl_number": 7, "this_update": "2026-01-01T00:00:00+00:00",
                            "scope": "ab" * 16})
    f.seek(0)
    f.truncate()
    json.dump(state, f)
"""


def test_a_restarted_gateway_container_keeps_its_crl_floors(stack: Stack) -> None:
    """The gateway keeps its CRL replay floors (`crl_state`) in a volume of its own, in a directory of its user's,
    mode 0700, as it requires (nothing set `crl_state` in the compose lab: a restarted container forgot its floors
    and would take a replayed older CRL again). A floor planted in the file is still there after `docker restart`,
    and the restarted gateway read it: it is among the floors its start wrote back. Runs last (a restart)."""
    container = stack.container("gateway")

    def inside(*argv: str) -> str:
        done = subprocess.run([stack.docker, "exec", container, *argv], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert inside("stat", "-c", "%a %u", str(Path(_STATE).parent), _STATE).split("\n")[:2] == ["700 10001", "600 10001"]
    before = json.loads(inside("cat", _STATE))["floors"]
    assert before, "the gateway wrote no floor of the lab's CRLs"
    inside("python3", "-c", _PLANT, _STATE)
    subprocess.run([stack.docker, "restart", "-t", "20", container], capture_output=True, check=True, timeout=120)
    eventually(lambda: stack.health("gateway") == "healthy", "the restarted gateway healthy", 120)
    after = json.loads(inside("cat", _STATE))["floors"]
    assert {f["scope"] for f in after} == {f["scope"] for f in before} | {"ab" * 16}, after
    written = [e for e in stack.logs("gateway") if e.get("event") == "crl_state_written"]
    assert written[-1]["floors"] == len(before) + 1, written


def test_a_replica_stopped_behind_the_balancer_drains_exits_0_and_the_devices_go_to_the_other(stack: Stack) -> None:
    """`docker-compose stop gateway-2` (SIGTERM through the container's init, `stop_grace_period: 30s`): the replica
    drains (`drained`, nothing held: `finished`), logs `stopped` and exits 0, not Docker's SIGKILL (137); devices sent
    through the balancer meanwhile are served by gateway-1. Runs last: the replica stays stopped."""
    container = stack.container("gateway-2")
    stack.compose("stop", "gateway-2", timeout=120)
    done = subprocess.run(
        [stack.docker, "inspect", "--format", "{{.State.ExitCode}}", container],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "0", done.stdout
    logs = [json.loads(line) for line in _container_log(stack, container) if line.startswith("{")]
    events = [e.get("event") for e in logs]
    assert [e for e in events if e in {"stopping", "drained", "stopped"}] == ["stopping", "drained", "stopped"], events
    assert next(e for e in logs if e.get("event") == "drained")["outcome"] == "finished"
    device = _scaled_devices(stack, 2)
    assert device.returncode == 0, device.stdout + device.stderr
    assert device.stdout.count("the backend saw: alice@LAB.TEST via Negotiate") == 2, device.stdout


def _container_log(stack: Stack, container: str) -> list[str]:
    """The lines a container (running or stopped) wrote."""
    done = subprocess.run([stack.docker, "logs", container], capture_output=True, text=True, check=True)
    return (done.stdout + done.stderr).splitlines()
