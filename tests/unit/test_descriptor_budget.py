"""The worker's file descriptors shared out (`proxy.descriptors`), and the backend connections of all users held to
their share (`proxy.backend.client.BackendSockets`) against a loopback listener: idle ones of the least recently used
user closed for a new one, a 503 when none is idle."""

from __future__ import annotations

import asyncio
import re
import resource
from pathlib import Path

import pytest

from proxy.backend.client import BackendConnection, BackendSocketsExhausted, Upstream
from proxy.backend.forward import Pools, _failure
from proxy.config import Route
from proxy.descriptors import (
    OVER_CAP,
    DescriptorBudget,
    judged_limit,
    kdc_reserve_problem,
    past_cap,
    reload_reserve_problem,
    reserve_for,
)
from proxy.errors import BackendBusy
from proxy.tls.limits import HEADER_WAITS, HEALTH_CHECKS

RESERVE = 256  # at the default kerberos.max_in_flight (16): the fixed reserve the budget started with


@pytest.mark.parametrize(
    ("limit", "max_connections", "device", "backend"),
    [
        (65536, 10_000, 10_000, 65536 - RESERVE - 50 - 10_000),  # the systemd unit's LimitNOFILE: it holds them
        (20000, 10_000, (20000 - RESERVE - 50) // 2, (20000 - RESERVE - 50) // 2),  # each with a backend connection
        (1024, 10_000, 359, 359),  # a shell's default
        (512, 10_000, 167, 167),  # the reserve is a quarter of a small limit
        (1024, 100, 100, 1024 - RESERVE - 50 - 100),  # a small max_connections is kept; the backend gets the rest
    ],
)
def test_the_limit_is_shared_out(limit: int, max_connections: int, device: int, backend: int) -> None:
    """A reserve, then the connections a worker holds past its cap (50: 16 behind a balancer and the accept loop's
    one waiting for a slot, as many closing for them, 16 health checks gone on without one), then device connections
    (at most half of the rest and max_connections), then the backend's, never fewer than the device connections: each
    held request finds its backend connection. The connections past the cap were left out: a limit said to hold
    max_connections did not."""
    budget = DescriptorBudget.of(max_connections, 16, limit)
    assert OVER_CAP == 2 * (HEADER_WAITS + 1) + HEALTH_CHECKS
    assert (budget.device, budget.backend) == (device, backend)
    assert budget.reserve + budget.device + OVER_CAP + budget.backend == limit
    assert budget.backend >= budget.device
    assert budget.cut == (device < max_connections)
    assert budget.needed == 2 * max_connections + OVER_CAP + RESERVE


@pytest.mark.parametrize("sockets", [1, 2, 3, 8])
def test_the_connections_past_the_cap_are_counted_for_each_listening_socket(sockets: int) -> None:
    """Each listening socket runs an accept loop of its own: directly each holds a connection accepted at the cap, and
    behind a balancer each may take one wait past HEADER_WAITS (it checks the count before it awaits accept()), each
    counted twice (an idle keep-alive closed for it, still closing). A listener on three addresses (a name with three)
    needs 54 past the cap where one socket's count kept 50; the device and backend shares, and the limit that holds
    max_connections, count them."""
    budget = DescriptorBudget.of(10_000, 16, 20_000, sockets=sockets)
    assert budget.past_cap == past_cap(sockets) == 2 * (HEADER_WAITS + sockets) + HEALTH_CHECKS
    assert past_cap(1) == OVER_CAP
    assert budget.reserve + budget.device + budget.past_cap + budget.backend == 20_000
    assert budget.device == (20_000 - RESERVE - budget.past_cap) // 2
    assert budget.needed == 2 * 10_000 + budget.past_cap + RESERVE


@pytest.mark.parametrize(
    ("max_in_flight", "limit", "reserve"),
    [
        (16, 65536, 256),  # the default: 50 KDC threads, two descriptors each, and the rest
        (64, 65536, 156 + 2 * 194),  # three pools of 64 and the two probes' threads
        (1, 65536, 156 + 2 * 5),
        (64, 2048, 512),  # a quarter of the limit at most
    ],
)
def test_the_reserve_follows_kerberos_max_in_flight(max_in_flight: int, limit: int, reserve: int) -> None:
    """The reserve holds two descriptors for each thread that may be inside a KDC call (kerberos.max_in_flight per
    pool, three pools, and the readiness and directory probes), besides BASE_RESERVE: a fixed 256 came up short past
    about 55 KDC threads."""
    budget = DescriptorBudget.of(10_000, max_in_flight, limit)
    assert budget.reserve == reserve
    assert budget.needed == 2 * 10_000 + OVER_CAP + reserve_for(max_in_flight)


def test_a_max_in_flight_whose_kdc_threads_the_limit_cannot_hold_is_refused() -> None:
    """The KDC threads' descriptors must fit in a quarter of the limit: at 1,024, 42 per pool do (256), 43 do not; the
    refusal names the key, the most that fits and the limit that would hold the whole reserve."""
    assert kdc_reserve_problem(42, 1024) is None
    assert kdc_reserve_problem(16, 512) is None
    problem = kdc_reserve_problem(43, 1024)
    assert problem is not None
    assert problem.startswith("kerberos.max_in_flight = 43 ")
    assert "lower it to 42 or less" in problem
    assert f"raise the limit to {4 * reserve_for(43)}" in problem


def test_a_reload_may_run_no_more_kdc_threads_than_the_reserve_kept_at_start_holds() -> None:
    """Started at 16 in flight under 20,000 (reserve 256): a reload at 16 or fewer fits, 17 does not (262 wanted) and
    names the key, both reserves and "restart to apply"; under 1,024 a reserve cut to the quarter (256, from 64's
    544) refuses what the start would refuse."""
    running = DescriptorBudget.of(10_000, 16, 20_000)
    assert running.reserve == 256
    assert reload_reserve_problem(16, running) is None
    assert reload_reserve_problem(4, running) is None
    problem = reload_reserve_problem(17, running)
    assert problem is not None
    assert problem.startswith("kerberos.max_in_flight = 17 runs 53 KDC threads and needs a descriptor reserve of 262")
    assert "keeps a reserve of 256" in problem
    assert "restart to apply, or keep it at 16 or less" in problem
    assert reload_reserve_problem(43, DescriptorBudget.of(100, 16, 1024)) == kdc_reserve_problem(43, 1024)


def test_this_process_limit_is_read() -> None:
    """Without a limit given, the process's soft RLIMIT_NOFILE is the one shared out."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert DescriptorBudget.of(10, 16).limit == min(soft, 1 << 20)


async def _listener() -> tuple[asyncio.Server, Upstream]:
    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Upstream.of(f"http://127.0.0.1:{port}", None, None)


def _answered(connection: BackendConnection) -> None:
    """The connection carried a request and its whole answer: it can go back to its pool."""
    connection.begin("GET", 0)
    connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    connection.request_sent()


def test_past_the_limit_the_least_recently_used_users_idle_connection_makes_room() -> None:
    """Two connections for all users: alice's and bob's idle ones are kept until carol needs one; then alice's (the
    least recently used user) is closed, and bob's is kept."""

    async def case() -> None:
        server, upstream = await _listener()
        pools = Pools(max_connections=2)
        idle: dict[str, BackendConnection] = {}
        for user in ("alice", "bob"):
            with pools.lease(user) as pool:
                idle[user] = connection = await pool.acquire(upstream, 5)
                _answered(connection)
                pool.release(upstream, connection)
        assert pools.sockets.open == 2
        with pools.lease("carol") as pool:
            carols = await pool.acquire(upstream, 5)
            assert not idle["alice"].usable  # aborted
            assert idle["bob"].usable
            assert (pools.sockets.open, pools.sockets.reclaimed) == (2, 1)
            pool.discard(upstream, carols)
        assert pools.sockets.open == 1
        await pools.close()
        assert pools.sockets.open == 0
        server.close()

    asyncio.run(case())


def test_with_every_connection_busy_a_new_one_is_refused_with_503() -> None:
    """Nothing idle to close: the request is refused at once (503, Retry-After), not queued behind held requests, and
    the place is free again as soon as one of them ends."""

    async def case() -> None:
        server, upstream = await _listener()
        pools = Pools(max_connections=1)
        with pools.lease("alice") as alices:
            held = await alices.acquire(upstream, 5)
            with pools.lease("bob") as bobs:
                with pytest.raises(BackendSocketsExhausted) as refused:
                    await bobs.acquire(upstream, 5)
                assert pools.sockets.open == 1
                alices.discard(upstream, held)
                bobs.discard(upstream, await bobs.acquire(upstream, 5))
        route = Route(prefix="/", upstream="http://127.0.0.1:1", spn="HTTP/cas.lab.test")
        error = _failure(route, refused.value, None)
        assert isinstance(error, BackendBusy)
        assert (error.status, error.headers["Retry-After"], error.event) == (503, "30", "backend_connections_exhausted")
        assert "LimitNOFILE" in (error.hint or "")
        await pools.close()
        server.close()

    asyncio.run(case())


def test_a_reload_keeps_counting_the_same_connections() -> None:
    """A reloaded configuration's pools share the users' connections, and with them their count and limit."""
    pools = Pools(max_connections=7)
    assert pools.successor((), None).sockets is pools.sockets


def test_check_configs_limit_line_names_this_process_limit_and_the_units() -> None:
    """check-config's addition to a limit refusal names this process's hard limit as the one judged, the shipped
    unit's LimitNOFILE= as written there, and the command to run under the service's limit."""
    unit = (Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "kcd-proxy.service").read_text()
    (shipped,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, flags=re.MULTILINE)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    line = judged_limit("kcd-proxy check-config /etc/kcd-proxy/gateway.toml")
    assert f"this process's open-file limit ({'unlimited' if hard == resource.RLIM_INFINITY else hard}," in line
    assert f"LimitNOFILE= ({shipped} in deploy/systemd/kcd-proxy.service)" in line
    assert "prlimit --nofile=N:N kcd-proxy check-config /etc/kcd-proxy/gateway.toml (as root)" in line
