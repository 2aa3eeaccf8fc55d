"""The compose lab's profile `ad`, built and run on a real Docker engine: realm AD.TEST on a Samba AD DC container.

As a newcomer runs it (docs/containers.md, "The Active Directory realm"): `docker-compose --profile ad build pki dc`,
`up -d ad-gateway` (the DC provisions the realm into its volume at its first start; `ad-handout` issues the AD users'
certificates from the `pki` service's CA and hands each container its files), `run --rm ad-device`, `down -v`. The
engine, the projects, the image tags and the teardown are test_compose.py's (`engine`, `Stack`, `bring_down`): each
run is a project of its own, its images become the build cache.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import REPO
from tests.integration.jsonlog import eventually
from tests.integration.test_compose import (
    PROJECT_PREFIX,
    SOCKET,
    TAG_PREFIX,
    Stack,
    _subnet,
    balancer_settings,
    bring_down,
    compose_env,
    engine,
)

__all__ = ["engine"]  # the fixture, shared with test_compose.py (its dockerd, its engine lock)

pytestmark = [pytest.mark.timeout(2400), pytest.mark.slow(seconds=15)]  # a build (minutes when cold), up and down

_DEVICE = ["python3", "-m", "proxy.lab.device", "--url", "https://proxy.lab.test:8443", "--cacert", "/lab/pki/root.pem"]


def _user(name: str) -> list[str]:
    return ["--cert", f"/lab/pki/ad-users/{name}.pem", "--key", f"/lab/pki/ad-users/{name}.key"]


@pytest.fixture(scope="module")
def ad_stack(engine: str) -> Iterator[Stack]:
    """The profile `ad` up, its gateway healthy, in a project of its own; brought down after."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    done = subprocess.run([REPO / "deploy" / "base-image.sh", engine], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    project = f"{PROJECT_PREFIX}{os.getpid()}{secrets.token_hex(3)}"
    env = compose_env(
        engine,
        os.environ,
        COMPOSE_PROJECT_NAME=project,
        KCD_IMAGE_TAG=f"{TAG_PREFIX}{project}",
        DOCKER_HOST=f"unix://{SOCKET}",
        # compose creates every network of the file, the balancer's too: on the default subnet it collided with a
        # container lab a developer (or another run) had up ("Pool overlaps with other one on this address space")
        **balancer_settings(_subnet(engine)),
    )
    s = Stack(engine, project, env, 0, 0, timings, profile="ad")
    try:
        mark = time.monotonic()
        s.compose("build", "pki", "dc")  # the kcd-proxy image (pki builds it) and the DC's
        timings["build"] = time.monotonic() - mark
        mark = time.monotonic()
        s.compose("up", "-d", "ad-gateway")  # waits for the DC's health: its first start provisions the realm
        eventually(lambda: s.health("ad-gateway") == "healthy", "ad-gateway healthy", timeout=300)
        timings["up"] = time.monotonic() - mark
        yield s
    finally:
        bring_down(s, started)


def _device(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return stack.compose("run", "--rm", "ad-device", *args, check=False, timeout=300)


def test_the_ad_device_is_served_as_alice_of_ad_test_by_constrained_delegation(ad_stack: Stack) -> None:
    """`run --rm ad-device`: alice's certificate in, the backend accepted a ticket of alice@AD.TEST for
    HTTP/cas.ad.test whose PAC carries the S4U2Proxy delegation record and names alice's account: the gateway, which
    holds only its own account's keys, got it by S4U2Self then S4U2Proxy from the Samba DC."""
    done = _device(ad_stack)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the backend saw: alice@AD.TEST via Negotiate" in done.stdout
    echo = json.loads(done.stdout[done.stdout.index("\n{") :])
    assert echo["principal"] == "alice@AD.TEST"
    assert echo["pac"]["sam_name"] == "alice"
    assert echo["pac"]["upn"] == "alice@ad.test"
    assert "delegation-info" in echo["pac"]["buffers"], echo["pac"]  # S4U2Proxy's record of the delegating service
    served = [e for e in ad_stack.logs("ad-gateway") if e.get("event") == "request" and e.get("status") == 200]
    assert {e.get("principal") for e in served} == {"alice@AD.TEST"}, served


def test_a_certificate_whose_name_has_no_account_is_refused_by_the_dc(ad_stack: Stack) -> None:
    """ghost's certificate comes from the same CA, but AD.TEST has no such account: the DC refuses the S4U2Self and
    the device gets 403 with the reason; nothing reaches the backend."""
    done = _device(ad_stack, *_DEVICE, *_user("ghost"))
    assert done.returncode != 0, done.stdout + done.stderr
    assert "403 Forbidden" in done.stdout
    assert "no Kerberos account matches ghost@AD.TEST" in done.stdout
    assert "the backend saw" not in done.stdout

    def dc_refused() -> bool:  # docker's log of the container may lag behind the device's exit
        logs = ad_stack.compose("logs", "--no-color", "dc").stdout
        return "S4U2Self principal to impersonate ghost@AD.TEST not found" in logs

    eventually(dc_refused, "the DC's log line refusing S4U2Self for ghost", timeout=60)


# test_compose.py's _CONNECT, each target tried at once in a thread of its own: an address the engine drops traffic to
# costs the 10 s timeout, and six such would cost a minute one after the other
_CONNECT_AT_ONCE = (
    "import socket, sys, threading\n"
    "def probe(host, port):\n"
    "    try:\n"
    "        socket.create_connection((host, int(port)), timeout=10).close()\n"
    "        sys.stdout.write(f'{host} {port} reached\\n')\n"
    "    except OSError as e:\n"
    "        sys.stdout.write(f'{host} {port} unreachable {type(e).__name__}\\n')\n"
    "threads = [threading.Thread(target=probe, args=a.rsplit(':', 1)) for a in sys.argv[1:]]\n"
    "for t in threads: t.start()\n"
    "for t in threads: t.join()\n"
)


def _address(stack: Stack, service: str) -> str:
    """The service's container's address (on the `ad` network: the DC and the backend are on no other)."""
    argv = [stack.docker, "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"]
    done = subprocess.run([*argv, stack.container(service)], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_the_ad_device_reaches_the_gateway_and_nothing_behind_it(ad_stack: Stack) -> None:
    """From the device's container the gateway answers; the DC (KDC, LDAP) and the backend do not, by name (which the
    device's network does not resolve) nor by address (which the engine must not route between the networks: Podman
    4.3's does, docs/containers.md)."""
    dc, backend = _address(ad_stack, "dc"), _address(ad_stack, "ad-backend")
    behind = ["dc:88", "dc:389", "ad-backend:8081", f"{dc}:88", f"{dc}:389", f"{backend}:8081"]
    targets = ["proxy.lab.test:8443", *behind]
    argv = ["python3", "-c", _CONNECT_AT_ONCE, *targets]
    done = ad_stack.compose("run", "--rm", "--no-deps", "ad-device", *argv, timeout=300)
    seen = {" ".join(line.split()[:2]): line.split()[2] for line in done.stdout.splitlines() if len(line.split()) > 2}
    assert seen == {
        "proxy.lab.test 8443": "reached",
        **{target.replace(":", " "): "unreachable" for target in behind},
    }, done.stdout


def test_the_dc_runs_as_root_with_two_capabilities_and_the_others_as_the_lab_user(ad_stack: Stack) -> None:
    """The DC's process holds exactly CAP_NET_BIND_SERVICE and CAP_CHOWN (effective and bounding), nothing more;
    the gateway and the backend run as uid 10001 with none."""

    def status(service: str) -> dict[str, str]:
        argv = [ad_stack.docker, "exec", ad_stack.container(service), "cat", "/proc/1/status"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
        return dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)

    dc = status("dc")
    two = (1 << 0) | (1 << 10)  # CAP_CHOWN, CAP_NET_BIND_SERVICE
    assert dc["Uid"].split()[0] == "0"
    assert int(dc["CapEff"], 16) == two, dc["CapEff"]
    assert int(dc["CapBnd"], 16) == two, dc["CapBnd"]
    for service in ("ad-gateway", "ad-backend"):
        other = status(service)
        assert other["Uid"].split()[0] == "10001", service
        assert int(other["CapEff"], 16) == 0, service
        assert int(other["CapBnd"], 16) == 0, service


def test_the_dc_serves_the_kdc_and_ldap_alone(ad_stack: Stack) -> None:
    """The DC served every service of Samba's AD DC but the file server on the `ad` network (the RPC endpoint mapper on
    135, DNS on 53, ...), where the gateway asks the KDC and LDAP alone: what a container broken into there, or a
    device on an engine that routes between the file's networks (Podman, docs/containers.md), could reach. It now
    runs only those two (`server services = kdc ldap`): from the gateway's container the KDC (88, kpasswd 464) and
    LDAP (389, 636, the global catalogue 3268) answer, RPC and DNS are closed."""
    dc = _address(ad_stack, "dc")
    served, closed = [88, 464, 389, 636, 3268], [135, 53]
    argv = ["python3", "-c", _CONNECT_AT_ONCE, *(f"{dc}:{port}" for port in served + closed)]
    done = subprocess.run(
        [ad_stack.docker, "exec", ad_stack.container("ad-gateway"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = {int(line.split()[1]): line.split()[2] for line in done.stdout.splitlines() if len(line.split()) > 2}
    assert seen == {**dict.fromkeys(served, "reached"), **dict.fromkeys(closed, "unreachable")}, done.stdout
