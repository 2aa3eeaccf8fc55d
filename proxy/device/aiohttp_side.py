"""aiohttp's server behind the `DeviceRequest` interface (`listener.http_server = "aiohttp"`).

`AiohttpRequest` wraps one `web.Request`; the answer it gives is a `web.StreamResponse` that the
handler returns to aiohttp (`response`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import MultiMapping

from proxy.device.request import CONTINUE, expectations
from proxy.tls.limits import HeaderBlockBudget, frees_a_slot, idle_closed
from proxy.tls.server import _AlertingSSLProtocol


class AiohttpRequest:
    """A `proxy.device.request.DeviceRequest` over aiohttp's `web.Request`."""

    __slots__ = ("_request", "_stopping", "_version", "response")

    def __init__(self, request: web.Request, stopping: Callable[[], bool] = lambda: False) -> None:
        self._request = request
        self._stopping = stopping  # whether the gateway drains (`proxy.app.drain`): the answer then says it closes
        self._version = request.version
        self.response: web.StreamResponse | None = None
        if request.version < HttpVersion10:
            # aiohttp reads a request line without a version as HTTP/0.9, and writes its answer's status line
            # with the request's version (a cached property): the refusal goes out as HTTP/1.0, which closes.
            request._cache.pop("version", None)
            request._version = HttpVersion10
        elif request.version >= (2, 0):  # `HTTP/2.0` (llhttp reads it): its 505 goes out as HTTP/1.1, as the own one
            request._cache.pop("version", None)
            request._version = HttpVersion11

    @property
    def method(self) -> str:
        return self._request.method

    @property
    def raw_path(self) -> str:
        return self._request.raw_path

    @property
    def rel_raw_path(self) -> str:
        return self._request.rel_url.raw_path

    @property
    def path(self) -> str:
        return self._request.path

    @property
    def version(self) -> tuple[int, int]:
        return self._version  # as sent (HTTP/0.9 included), not as answered

    @property
    def headers(self) -> MultiMapping[str]:
        return self._request.headers

    @property
    def host(self) -> str:
        return self._request.host

    @property
    def remote(self) -> str | None:
        return self._request.remote

    @property
    def body_exists(self) -> bool:
        return self._request.body_exists

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._request.transport

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status

    @property
    def answer_started(self) -> bool:
        return self._request.writer.output_size > 0

    async def read_body(self) -> bytes:
        return await self._request.content.readany()

    async def send_continue(self) -> None:
        request = self._request
        if request.version >= (1, 1) and CONTINUE in expectations(request.headers):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the interim answer is not part of the response (as aiohttp does)

    def head_forwarded(self) -> None:
        """Nothing: aiohttp's request keeps its own fields."""

    async def answer(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> None:
        response = self.response = web.Response(status=status, reason=reason, body=body)
        response.headers.extend(headers)
        await self._prepare(response)
        await response.write_eof()

    def answer_written(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> bool | None:
        return None  # aiohttp's response is written by coroutines only: `answer`

    async def drain(self) -> None:
        return None  # never asked: `answer_written` writes nothing here

    async def start_answer(
        self, status: int, reason: str | None, headers: MultiMapping[str], content_length: int | None
    ) -> None:
        response = self.response = web.StreamResponse(status=status, reason=reason)
        response.headers.extend(headers)
        if content_length is not None:
            response.content_length = content_length
        await self._prepare(response)

    async def _prepare(self, response: web.StreamResponse) -> None:
        """The status line and header fields sent. While the gateway stops they say `Connection: close`, as the own
        server's do: aiohttp closes the connection after this answer (its shutdown), and told nothing, a device would
        send its next request on it, to be cut."""
        if self._stopping():
            response.force_close()
        await response.prepare(self._request)

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def end_answer(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self._request.transport is not None:
            self._request.transport.abort()


def awaiting_first_request(handlers: Iterable[Any]) -> bool:
    """Whether one of aiohttp's request handlers `handlers` has not read its first request head whole yet (none of it
    come, or part), and is not closing: the connection of a device whose handshake has just ended (one the kernel
    had queued for a worker that stops: `proxy.tls.limits.accept_queued`). Its own state is read, as `idle_handlers`
    does (`_request_count`: heads read whole)."""
    return any(not (h._request_count or h._close or h._force_close) for h in handlers)


def receiving_body(handlers: Iterable[Any]) -> bool:
    """Whether one of aiohttp's request handlers `handlers` serves a request whose body has not all come (an upload
    under way, or one waiting for its `100 Continue`). aiohttp's shutdown (`Server.pre_shutdown`: `close`) drops every
    byte a connection reads after it (`RequestHandler.data_received`), so such a request would wait for the rest of its
    body until cut. Read from its parser (`HeaderBlockBudget.body_coming`) while the handler is not waiting for a next
    request (`_waiter`, as `idle_handlers` reads it): a request read whole but not yet handled has no
    `_current_request` for a turn of the loop."""
    return any(
        isinstance(h._parser, HeaderBlockBudget) and h._parser.body_coming and h._waiter is None for h in handlers
    )


def idle_handlers(handlers: Iterable[Any], quiet: bool = True) -> Iterator[tuple[float, Callable[[float], bool]]]:
    """aiohttp's request handlers idle between two requests, as `proxy.tls.limits.IdleKeepAlives` scans them: since
    when (the loop's time the last answer ended), and the function that closes one for a new device.

    aiohttp offers no hook for "idle", so its handler's own state is read (a unit test, test_device_server, fails if
    aiohttp renames it): at least one request read (`_request_count`), waiting for the next (`_waiter` pending, no
    `_messages` queued), kept alive and not closing, no byte of a next request read by its parser (`HeaderBlockBudget`
    in front of it), and its TLS protocol past the handshake. `_next_keepalive_close_time` is when its keep-alive timer
    ends, set as each answer ends. With `quiet`, nothing may move on it either (`_AlertingSSLProtocol.quiet`: none of
    the device's bytes unread, half a TLS record included, none of ours unsent): what cannot be closed for a new
    device is not idle, not room for /readyz and not closed; without, the cheap part only, for the scan that orders
    connections by age (`proxy.tls.limits.IdleKeepAlives`)."""
    for handler in handlers:
        waiter = handler._waiter
        tls = tls_protocol(handler)
        if (
            waiter is None
            or waiter.done()
            or handler._messages
            or not handler._request_count
            or handler._force_close
            or handler._close
            or not handler._keepalive
            or not isinstance(handler._parser, HeaderBlockBudget)
            or not handler._parser.between_requests
            or not isinstance(tls, _AlertingSSLProtocol)
            or not frees_a_slot(tls._closed)  # a health check's place of its own: no room for a device
            or (quiet and not tls.quiet())
        ):
            continue
        yield handler._next_keepalive_close_time - handler.keepalive_timeout, functools.partial(_close_idle, handler)


def tls_protocol(handler: Any) -> object:
    """The TLS protocol under aiohttp's `handler` (asyncio's application transport's), or None."""
    return getattr(handler.transport, "_ssl_protocol", None)


def _close_idle(handler: Any, since: float) -> bool:
    """Close aiohttp's `handler`'s connection for a new device if it is still idle since `since` and nothing moves on
    it (as `proxy.device.server.DeviceConnection.close_idle`)."""
    found = next((s for s, _ in idle_handlers((handler,))), None)  # idle, quiet included
    tls = tls_protocol(handler)
    if found != since or not isinstance(tls, _AlertingSSLProtocol):
        return False
    idle_closed(handler.transport, since)
    tls.close_at_once()
    return True
