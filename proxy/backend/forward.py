"""Forwarding: the delegated request to the backend, the answer back to the device, both streamed.

Backend connections belong to one identity. IIS with `authPersistNonNTLM` (Exchange's default) binds
the first Kerberos identity of a TCP connection to the connection and ignores later tokens, so a pooled
connection that carried Alice's request would serve Bob as Alice. Each user principal therefore gets
its own connection pool (an aiohttp `ClientSession`), and pools are closed when evicted or idle.

Bodies stream both ways without being held whole. The client-side timeout has no total (aiohttp's
default of 300 s would cut ActiveSync `Ping` long-polls); the route's read timeout bounds the wait for
each chunk instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web

from proxy.backend import headers
from proxy.config import Route
from proxy.errors import BackendRejectedTicket, BackendUnavailable

log = structlog.get_logger("proxy.backend")
_CHUNK = 64 * 1024


class Pools:
    """One `ClientSession` per user principal, least recently used evicted first."""

    def __init__(self, *, max_users: int = 1000, idle_seconds: float = 300.0) -> None:
        self._sessions: OrderedDict[str, tuple[aiohttp.ClientSession, float]] = OrderedDict()
        self._max_users = max_users
        self._idle = idle_seconds
        self._closing: set[asyncio.Task[None]] = set()

    def session(self, principal: str) -> aiohttp.ClientSession:
        now = time.monotonic()
        entry = self._sessions.pop(principal, None)
        session = entry[0] if entry is not None else None
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=32, keepalive_timeout=30, ttl_dns_cache=60),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            )
        self._sessions[principal] = (session, now)
        self._evict(now)
        return session

    def _evict(self, now: float) -> None:
        while self._sessions:
            principal, (session, used) = next(iter(self._sessions.items()))
            if len(self._sessions) <= self._max_users and now - used < self._idle:
                break
            del self._sessions[principal]
            task = asyncio.get_running_loop().create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = [s for s, _ in self._sessions.values()]
        self._sessions.clear()
        await asyncio.gather(*(s.close() for s in sessions), *self._closing, return_exceptions=True)


@dataclass(frozen=True)
class BackendResult:
    status: int
    ms: float  # time to the backend's response headers


async def forward(
    request: web.Request,
    route: Route,
    *,
    session: aiohttp.ClientSession,
    authorization: str,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> tuple[web.StreamResponse, BackendResult]:
    """Send `request` to the route's upstream with `authorization`; stream the answer back."""
    client_ip = request.remote or ""
    upstream_host = None if route.preserve_host else _host_header(route.upstream)
    out_headers = headers.to_backend(
        request.headers,
        client_ip=client_ip,
        client_host=request.host,
        upstream_host=upstream_host,
        authorization=authorization,
        extra=extra_headers,
    )
    body = request.content if request.body_exists else None
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=route.connect_timeout, sock_read=route.read_timeout)
    try:
        upstream = await session.request(
            request.method,
            route.upstream + request.rel_url.raw_path_qs,
            headers=out_headers,
            data=body,
            allow_redirects=False,
            timeout=timeout,
            compress=False,
            auto_decompress=False,
        )
    except (aiohttp.ClientConnectionError, TimeoutError) as e:
        raise BackendUnavailable(
            "the mail server cannot be reached; try again later",
            hint=f"{route.upstream} ({route.prefix}): {type(e).__name__}: {e}",
        ) from None
    ms = (time.perf_counter() - start) * 1000
    async with upstream:
        if upstream.status == 401:
            challenge = upstream.headers.get("WWW-Authenticate", "")
            raise BackendRejectedTicket(
                "the mail server refused the gateway's Kerberos ticket",
                hint=f"{route.upstream} answered 401 ({challenge[:60]!r}) to a ticket for {route.spn}: "
                f"is {route.spn} the SPN of the backend's account, and is its keytab current?",
            )
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(headers.to_client(upstream.headers))
        if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
            # Headers are gone already: all that is left is to cut the client's connection short.
            log.warning("backend_stream_broken", upstream=route.upstream, error=f"{type(e).__name__}: {e}")
            if request.transport is not None:
                request.transport.abort()
            return response, BackendResult(upstream.status, ms)
        await response.write_eof()
    return response, BackendResult(upstream.status, ms)


def _host_header(upstream: str) -> str:
    return upstream.split("://", 1)[1]
