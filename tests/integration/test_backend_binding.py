"""`backend_binding = "connection"`: only the first request of each backend connection carries a Negotiate
token (IIS authPersistNonNTLM), through the real gateway to the lab's Exchange stand-in, with real tickets."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog
from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.test_delegation_crowd import new_users, tls_context
from tests.integration.test_proxying import Backend, _start_backend


@pytest.fixture(scope="module")
def bound_backend(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """IIS with authPersistNonNTLM: the first identity of a connection sticks to it."""
    yield from _start_backend(lab, tmp_path_factory.mktemp("binding-bound-backend"), "--connection-bound")


def _config(lab: LabLayout, bound_backend: Backend) -> str:
    """Connection-bound routes to the IIS-like backend and, misconfigured, to one that authenticates each request."""
    routes = f"""
[[routes]]
prefix = "/bound/"
upstream = "{bound_backend.url}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"

[[routes]]
prefix = "/per-request/"
upstream = "http://127.0.0.1:{lab.backend_port}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"
"""
    return lab_config(lab, port=free_port(), extra=routes)


@pytest.fixture(scope="module")
def gw(lab: LabLayout, bound_backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(lab, tmp_path_factory.mktemp("binding-gateway"), _config(lab, bound_backend))
    yield gateway
    gateway.stop()


@pytest.fixture
def fresh_gw(lab: LabLayout, bound_backend: Backend, tmp_path: Path) -> Iterator[Gateway]:
    """The same gateway, new: no user has a backend connection yet, whichever tests ran before (or beside)."""
    gateway = start_gateway(lab, tmp_path, _config(lab, bound_backend))
    yield gateway
    gateway.stop()


async def _device(
    gw: Gateway, lab: LabLayout, user: str, path: str, count: int, **headers: str
) -> list[dict[str, Any]]:
    """`count` keep-alive requests of one device (two connections at most), each answer's echo and status."""
    answers = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        for i in range(count):
            url = f"{gw.url}{path}?user={user}&i={i}"
            async with session.post(url, data=b"<Envelope/>", headers=headers, ssl=client_context(lab, user)) as r:
                body = await r.read()
                echo: dict[str, Any] = json.loads(body) if r.status == 200 else {}
                answers.append(
                    {**echo, "status": r.status, "user": user, "refused": r.headers.get("X-KCD-Refused-Stage")}
                )
    return answers


def test_the_summary_line_says_whether_a_token_went(lab: LabLayout, fresh_gw: Gateway) -> None:
    """On a connection-bound route the summary line carries backend_auth_sent, and it says what the backend
    got: true for the request that opened the backend connection, false for the ones after it on it."""
    gw = fresh_gw

    async def requests() -> list[dict[str, Any]]:
        echoes = []
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                url = f"{gw.url}/bound/summary-{uuid.uuid4().hex}"
                async with session.get(url, ssl=client_context(lab, "carol")) as r:
                    assert r.status == 200
                    echoes.append(await r.json())
        return echoes

    echoes = asyncio.run(requests())
    for echo in echoes:

        def same_path(line: dict[str, Any], path: str = echo["path"]) -> bool:
            return bool(line.get("path") == path)

        line = gw.wait_for("request", same_path)
        assert line["backend_auth_sent"] is echo["authorization_sent"]
        assert line["principal"] == "carol@LAB.TEST"
    # a new gateway: carol's backend pool is new, so the first request opened a connection
    assert [e["authorization_sent"] for e in echoes] == [True, False, False]


def test_interleaved_users_are_each_themselves_with_one_token_per_connection(lab: LabLayout, gw: Gateway) -> None:
    """Three users, two devices each, interleaving keep-alive requests on a connection-bound route: every
    answer is for the right user, no backend connection carries two users, and exactly the first request of
    each backend connection carried a token (the later ones none, served as the connection's identity)."""

    async def all_devices() -> list[dict[str, Any]]:
        devices = [_device(gw, lab, u, "/bound/EWS/Exchange.asmx", 12) for u in (*USERS, *USERS)]
        return [a for answers in await asyncio.gather(*devices) for a in answers]

    echoes = asyncio.run(all_devices())
    assert all(e["status"] == 200 for e in echoes), [e for e in echoes if e["status"] != 200][:3]
    assert all(e["principal"] == f"{e['user']}@LAB.TEST" for e in echoes)
    by_connection: dict[int, set[str]] = {}
    for e in echoes:
        by_connection.setdefault(e["connection_number"], set()).add(e["principal"])
    assert all(len(principals) == 1 for principals in by_connection.values()), by_connection
    assert len(by_connection) < len(echoes) / 3  # keep-alive to the backend really happened
    for e in echoes:
        first = e["connection_request_index"] == 1
        assert e["authorization_sent"] is first, e
        assert e["connection_identity_reused"] is not first, e


def test_a_devices_own_authorization_never_reaches_a_bound_connection(lab: LabLayout, gw: Gateway) -> None:
    """A device that sends its own Authorization (another user's Negotiate token, or Basic) on a
    connection-bound route: it is not forwarded, neither on the first request (the gateway's token replaces
    it) nor on later ones, which go without any Authorization and are served as the device's own user."""
    forged = "Negotiate " + base64.b64encode(b"\x60\x06not-bob's-token").decode()
    echoes = asyncio.run(_device(gw, lab, "alice", "/bound/owa/", 6, Authorization=forged))
    echoes += asyncio.run(_device(gw, lab, "alice", "/bound/owa/", 4, Authorization="Basic Ym9iOmJvYi1QYTU1"))
    assert all(e["status"] == 200 and e["principal"] == "alice@LAB.TEST" for e in echoes)
    assert all(e["authorization_sent"] is (e["connection_request_index"] == 1) for e in echoes)
    assert any(not e["authorization_sent"] for e in echoes)
    assert all("authorization" not in {k.lower() for k in e["headers"]} for e in echoes)


def test_a_backend_that_is_not_connection_bound_gets_502_never_another_identity(lab: LabLayout, gw: Gateway) -> None:
    """Misconfigured: a connection-bound route to a backend that authenticates each request. The request
    that went without a token gets 502 (never the backend's 401, never someone else's answer), the log says
    to set backend_binding = "request", and the connection that answered 401 is not used again."""
    gw.mark()
    answers = asyncio.run(_device(gw, lab, "bob", "/per-request/EWS/Exchange.asmx", 4))
    statuses = [a["status"] for a in answers]
    assert statuses[0] == 200
    assert answers[0]["principal"] == "bob@LAB.TEST"
    assert 502 in statuses
    assert 401 not in statuses
    assert all(a["principal"] == "bob@LAB.TEST" for a in answers if a["status"] == 200)
    assert all(a["refused"] == "backend" for a in answers if a["status"] == 502)
    refusal = gw.wait_for("backend_rejected_ticket", lambda e: "backend_binding" in str(e.get("fix", "")))
    assert 'set backend_binding = "request"' in refusal["fix"]
    # after a 502 the next request opens a new backend connection and carries a token again
    served = [a for a in answers[1:] if a["status"] == 200]
    assert all(a["authorization_sent"] and a["connection_request_index"] == 1 for a in served)


def test_two_mit_principals_differing_in_case_never_share_a_ticket_or_a_connection(
    lab: LabLayout, gw: Gateway, tmp_path: Path
) -> None:
    """`Name@LAB.TEST` and `name@LAB.TEST` are two principals to MIT (AD would have one account): two devices of each,
    interleaving keep-alive requests on the connection-bound route, are each served as their own principal, on backend
    connections of their own, each connection's one token on a ticket of that principal (the KDC logged one exchange
    for each, under its own case)."""
    lower = f"case{uuid.uuid4().hex[:8]}"
    upper = lower.capitalize()
    assert new_users(lab, [lower, upper]) == [lower, upper]
    contexts = {name: tls_context(lab, name, tmp_path) for name in (lower, upper)}
    kdc = KdcLog(lab.kdc_log)

    async def device(user: str) -> list[dict[str, Any]]:
        answers = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
            for i in range(8):
                url = f"{gw.url}/bound/EWS/Exchange.asmx?user={user}&i={i}"
                async with session.post(url, data=b"<Envelope/>", ssl=contexts[user]) as r:
                    assert r.status == 200, await r.text()
                    answers.append({**json.loads(await r.read()), "user": user})
        return answers

    async def devices() -> list[dict[str, Any]]:
        return [
            a for answers in await asyncio.gather(*(device(u) for u in (lower, upper, lower, upper))) for a in answers
        ]

    echoes = asyncio.run(devices())
    assert all(e["principal"] == f"{e['user']}@LAB.TEST" for e in echoes), [
        e for e in echoes if e["principal"] != f"{e['user']}@LAB.TEST"
    ]
    by_connection: dict[int, set[str]] = {}
    for e in echoes:
        by_connection.setdefault(e["connection_number"], set()).add(e["principal"])
    assert all(len(principals) == 1 for principals in by_connection.values()), by_connection
    mine = {f"{lower}@LAB.TEST", f"{upper}@LAB.TEST"}
    exchanges = Counter((r.extension, r.user) for r in kdc.settled() if r.extension and r.user in mine)
    assert exchanges == Counter({(s, f"{u}@LAB.TEST"): 1 for u in (lower, upper) for s in (S4U2SELF, S4U2PROXY)})
