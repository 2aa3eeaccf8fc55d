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
    _CONNECT,
    PROJECT_PREFIX,
    SOCKET,
    TAG_PREFIX,
    Stack,
    _subnet,
    bring_down,
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
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "KCD_IMAGE_TAG": f"{TAG_PREFIX}{project}",
        "DOCKER_HOST": f"unix://{SOCKET}",
        # the file's `balanced` network is made with the project (unused by profile ad): a subnet no other network
        # has, as test_compose.py's; the file's default one collided with another run's ("Pool overlaps")
        "KCD_LAB_BALANCER_SUBNET": _subnet(engine),
    }
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


def test_the_ad_device_reaches_the_gateway_and_nothing_behind_it(ad_stack: Stack) -> None:
    """From the device's container the gateway answers; the DC (KDC, LDAP) and the backend do not."""
    targets = ["proxy.lab.test:8443", "dc:88", "dc:389", "ad-backend:8081"]
    done = ad_stack.compose("run", "--rm", "--no-deps", "ad-device", "python3", "-c", _CONNECT, *targets, timeout=300)
    seen = {" ".join(line.split()[:2]): line.split()[2] for line in done.stdout.splitlines() if len(line.split()) > 2}
    assert seen == {
        "proxy.lab.test 8443": "reached",
        "dc 88": "unreachable",
        "dc 389": "unreachable",
        "ad-backend 8081": "unreachable",
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
