"""`forward` on a connection-bound route against a real loopback backend that records what each of its TCP
connections received: the token is built only for a new connection, and a token that cannot be built
stops the request before any byte reaches the backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.backend.forward import Pools, forward
from proxy.config import Route
from proxy.errors import GatewayError, KerberosRefused
from tests.integration.loopback import serving


@dataclass
class Seen:
    """What the backend received: (connection number, Authorization or None) per request."""

    requests: list[tuple[int, str | None]] = field(default_factory=list)
    connections: dict[int, int] = field(default_factory=dict)  # id(transport) -> number


def backend_app(seen: Seen) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        number = seen.connections.setdefault(id(request.transport), len(seen.connections) + 1)
        seen.requests.append((number, request.headers.get("Authorization")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def front_app(route: Route, pools: Pools, authorization: Callable[[], str]) -> web.Application:
    """A minimal gateway: forward as alice with `authorization`; a GatewayError becomes its status."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            response, _ = await forward(request, route, pools, "alice@LAB.TEST", authorization)
        except GatewayError as e:
            return web.Response(status=e.status, text=e.reason, headers={"X-Stage": e.stage})
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def scenario(tokens: Callable[[], str], requests: int) -> tuple[Seen, list[int]]:
    seen = Seen()
    async with serving(backend_app(seen)) as upstream:
        route = Route(prefix="/", upstream=upstream, spn="HTTP/cas.lab.test", backend_binding="connection")
        pools = Pools([route])
        try:
            async with serving(front_app(route, pools, tokens)) as front, aiohttp.ClientSession() as device:
                statuses = []
                for i in range(requests):
                    async with device.get(f"{front}/r{i}", headers={"Authorization": "Basic ZXZlOnNlY3JldA=="}) as r:
                        await r.read()
                        statuses.append(r.status)
        finally:
            await pools.close()
    return seen, statuses


def test_the_token_is_built_once_per_backend_connection() -> None:
    """Five requests on one kept-alive backend connection: the token is built once, the first request
    carries it, the others carry no Authorization at all (not the device's Basic header either)."""
    built: list[str] = []

    def token() -> str:
        built.append(f"Negotiate token-{len(built)}")
        return built[-1]

    seen, statuses = asyncio.run(scenario(token, 5))
    assert statuses == [200] * 5
    assert built == ["Negotiate token-0"]
    assert seen.requests == [(1, "Negotiate token-0"), (1, None), (1, None), (1, None), (1, None)]


def test_a_token_that_cannot_be_built_stops_the_request_before_the_backend() -> None:
    """When the token for a new backend connection cannot be made (the ticket went bad: a Kerberos refusal),
    the device gets that refusal and the backend receives nothing; the next request tries a new connection."""
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise KerberosRefused("the KDC refused", hint="test")
        return "Negotiate fresh"

    seen, statuses = asyncio.run(scenario(token, 3))
    assert statuses == [403, 200, 200]
    assert len(calls) == 2
    assert seen.requests == [(1, "Negotiate fresh"), (1, None)]
