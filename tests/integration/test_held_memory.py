"""A held long-poll keeps no Negotiate token: once the request's head is written to a real loopback backend
that holds its answer (an ActiveSync `Ping`), the gateway holds no reference to the token it was given."""

from __future__ import annotations

import asyncio
import gc
import sys
import types

import aiohttp
import httptools
import pytest
from aiohttp import web

from proxy.backend.forward import Handover, Pools, forward
from proxy.config import Route
from tests.integration.loopback import serving


def _response_parsers() -> int:
    gc.collect()
    return sum(isinstance(o, httptools.HttpResponseParser) for o in gc.get_objects())


def _backend_coroutines() -> dict[str, list[str]]:
    """The backend stage's coroutines alive now, with the locals each keeps (a suspended coroutine keeps its frame)."""
    return {
        o.cr_code.co_name: sorted(o.cr_frame.f_locals)
        for o in gc.get_objects()
        if isinstance(o, types.CoroutineType) and o.cr_frame is not None and "proxy/backend" in o.cr_code.co_filename
    }


async def held_references(method: str) -> tuple[int, int, str | None, int, int, dict[str, list[str]]]:
    """References to the token before it is handed over and while the backend holds the request; what the
    backend received; the device's status once the backend answered; and the llhttp parsers and coroutines of
    the backend stage alive while the request was held."""
    token = "Negotiate " + "".join(chr(ord("A") + i % 26) for i in range(2000))  # made here, held by nobody else
    arrived = asyncio.Event()
    release = asyncio.Event()
    got: list[str | None] = []

    async def hold(request: web.Request) -> web.Response:
        await request.read()
        got.append(request.headers.get("Authorization"))
        arrived.set()
        await release.wait()
        return web.Response(text="pong")

    backend = web.Application()
    backend.router.add_route("*", "/{tail:.*}", hold)
    async with serving(backend) as upstream:
        route = Route(prefix="/", upstream=upstream, spn="HTTP/cas.lab.test")
        pools = Pools([route])
        before = sys.getrefcount(token)
        handover: list[Handover] = [Handover(token)]

        async def front_handler(request: web.Request) -> web.StreamResponse:
            response, _ = await forward(request, route, pools, "alice@LAB.TEST", handover.pop())
            return response

        front = web.Application()
        front.router.add_route("*", "/{tail:.*}", front_handler)
        try:
            async with serving(front) as gateway, aiohttp.ClientSession() as device:
                call = asyncio.create_task(device.request(method, f"{gateway}/Microsoft-Server-ActiveSync", data=b"p"))
                await asyncio.wait_for(arrived.wait(), 30)
                held = sys.getrefcount(token)
                parsers = _response_parsers()
                frames = _backend_coroutines()
                release.set()
                async with await call as answer:
                    await answer.read()
                    status = answer.status
        finally:
            await pools.close()
    return before, held, got[0], status, parsers, frames


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_held_request_keeps_no_token(method: str) -> None:
    """While the backend holds the answer (a new connection, so no retry can need the head again), the gateway
    holds no reference to the token it sent, nor a parser for an answer none of whose bytes has come, and waits in
    `forward_device` (the request is not sent again: no frame of `_send`, none to wait for the
    head), whose frame keeps no headers; the backend got the token whole and the device its answer."""
    before, held, sent, status, parsers, frames = asyncio.run(held_references(method))
    assert parsers == 0, "an llhttp parser kept while no byte of the answer has come"
    assert sorted(frames) == ["forward", "forward_device"]  # `forward` is the aiohttp handler's wrapper
    assert "out_headers" not in frames["forward_device"]  # the headers' container is not kept either
    assert held == before, f"{held - before} reference(s) to the token kept while the request is held"
    assert sent is not None
    assert sent.startswith("Negotiate ABC")
    assert len(sent) == 2010
    assert status == 200


def test_a_handover_is_taken_once() -> None:
    """A handed-over header value is given once; asked again it raises rather than send an empty Authorization."""
    handover = Handover("Negotiate abc")
    assert handover() == "Negotiate abc"
    with pytest.raises(RuntimeError, match="handed over already"):
        handover()
