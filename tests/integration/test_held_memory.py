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
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.backend.forward import Handover, Pools, forward, forward_device
from proxy.config import Route
from proxy.device.server import DeviceConnection, DeviceHttpRequest, DeviceLimits
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


async def device_fields_while_held() -> tuple[int, int, int, bytes]:
    """Our device-side server (plain TCP here: the TLS layer is not what is measured) forwarding a request whose
    header fields carry a marker to a loopback backend that holds it: the header mappings holding the marker
    before the backend has it and while it holds it, and the device's answer. The marker's field name has an
    underscore, so it is never forwarded (`proxy.backend.headers`): the backend's own copy is not counted."""
    marker = "held-" + "".join(chr(ord("a") + i % 26) for i in range(40))
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="pong")

    def holding_marker() -> int:
        gc.collect()
        mappings = (o for o in gc.get_objects() if isinstance(o, CIMultiDict | CIMultiDictProxy))
        return sum(1 for o in mappings if o.get("X_Device_Id") == marker)

    seen_before: list[int] = []
    backend = web.Application()
    backend.router.add_route("*", "/{tail:.*}", hold)
    async with serving(backend) as upstream:
        route = Route(prefix="/", upstream=upstream, spn="HTTP/cas.lab.test")
        pools = Pools([route])

        async def serve(request: DeviceHttpRequest) -> None:
            seen_before.append(holding_marker())
            await forward_device(request, route, pools, "alice@LAB.TEST", "Negotiate YQ==")

        limits = DeviceLimits(max_header_bytes=8192, max_field_bytes=4096, keepalive_timeout=30)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: DeviceConnection(serve, limits, on_headers_refused=lambda: None, on_unparsed=lambda _, s: None),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                f"POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\r\nHost: mail\r\nX_Device_Id: {marker}\r\n"
                "Content-Length: 4\r\n\r\nping".encode()
            )
            await asyncio.wait_for(arrived.wait(), 30)
            held = holding_marker()
            release.set()
            answer = await asyncio.wait_for(reader.readuntil(b"pong"), 30)
            writer.close()
        finally:
            server.close()
            await pools.close()
    return seen_before[0], held, len(seen_before), answer


def test_a_held_request_keeps_not_the_devices_header_fields() -> None:
    """Once the backend has the request's head, the device-side server keeps none of the device's header fields
    (a long-poll is held up to half an hour; a Basic password would be among them): they were there before, none is
    while the backend holds the request, and the device still gets its answer."""
    before, held, served, answer = asyncio.run(device_fields_while_held())
    assert before >= 1
    assert held == 0
    assert served == 1
    assert answer.startswith(b"HTTP/1.1 200 ")
