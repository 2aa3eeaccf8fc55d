"""Forwarding: the delegated request to the backend, the answer back to the device, both streamed.

Theory of operation
-------------------
Backend connections belong to one identity. IIS with `authPersistNonNTLM` (Exchange's default) binds
the first Kerberos identity of a TCP connection to the connection and ignores later tokens, so a pooled
connection that carried Alice's request would serve Bob as Alice. Each user principal therefore gets
its own connection pool (an aiohttp `ClientSession`); a pool is closed once its user has had no request
in flight for `idle_seconds`, or when more than `max_users` pools exist, least recently used first, but
never while one of its requests (an ActiveSync `Ping`, say) is still running.

With a route's `backend_binding = "request"` (the default) every request carries `Authorization:
Negotiate` with a fresh token, so the first request of each backend connection always has one (what IIS
binds the connection to), and a backend that authenticates each request (Apache, IIS without
`authPersistNonNTLM`) gets one too. A connection-bound backend ignores the later ones, which is harmless
because the connection only ever carries this user. With `backend_binding = "connection"` only the first
request of each backend connection carries a token, and the token is built only then (building it was
about a quarter of the gateway's CPU per request: bench/run.py, docs/performance.md): the user's connector
decides when it hands out the connection, from whether that connection has already carried one of this
user's tokens for this SPN and got an answer other than 401. On such a route a connection that answers
401 is closed, never reused. Any 401 from the
backend, whether a bare challenge, a `Negotiate` continuation (a KRB-ERROR such as clock skew or a
replay) or a challenge for another scheme, means the backend did not accept the delegated ticket: the
device gets 502, never a 401 it could not answer, and the log says what the backend wanted. The
mutual-authentication token a backend sends with its success (`WWW-Authenticate: Negotiate <AP-REP>`)
is dropped on the way to the device (`headers.to_client`).

Cookies pass through as the device and the backend send them; the pools keep no cookie jar. One would
add the backend's cookies to the device's later requests, even after the device dropped them (an OWA
sign-out), and skip them for upstreams named by IP address only.

Bodies stream both ways without being held whole, chunked or with a Content-Length, at the pace of the
slower side (aiohttp pauses reading when its buffers fill). An answer that has already arrived whole
when its headers are read (most ActiveSync and EWS answers are small) goes out in one write with a
Content-Length. `Expect: 100-continue` is answered here,
once every stage has said yes, just before the body is forwarded: a refused device never sends it.

Timeouts. The client-side timeout toward the backend has no total (aiohttp's default of 300 s would cut
ActiveSync `Ping` and EWS streaming notifications); the route's `connect_timeout` bounds the connection
and its `read_timeout` each wait for the backend's next bytes (504 before the answer has begun). On the
device's side, `listener.client_body_timeout` bounds each wait for its next body bytes (408) and
`listener.client_send_timeout` each wait for it to take ours. When the device goes away, aiohttp
cancels the handler (`handler_cancellation=True`), which closes the backend connection at once: the
backend sees its client leave and stops working on the request.

https upstreams are verified against the route's `ca_bundle` (the system's CAs without one), under the
route's `server_name` when set (it is then also the SNI), else the upstream's host name.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ssl
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from proxy.backend import headers
from proxy.config import Listener, Route
from proxy.errors import BackendRejectedTicket, BackendTimeout, BackendUnavailable, ClientBodyTimeout
from proxy.target import OriginForm, origin_form

log = structlog.get_logger("proxy.backend")
_CHUNK = 64 * 1024


def upstream_tls(route: Route) -> ssl.SSLContext:
    """The TLS client context for an https route: its CA bundle only, or the system's CAs."""
    return ssl.create_default_context(cafile=str(route.ca_bundle) if route.ca_bundle else None)


@dataclass
class _Pool:
    session: aiohttp.ClientSession
    in_flight: int = 0
    last_used: float = 0.0


class Pools:
    """One `ClientSession` per user principal, plus what every forwarded request needs: the TLS context
    of each https route, and the device-side idle limits of the listener."""

    def __init__(
        self,
        routes: Iterable[Route] = (),
        listener: Listener | None = None,
        *,
        max_users: int = 1000,
        idle_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools: OrderedDict[str, _Pool] = OrderedDict()
        self._max_users = max_users
        self._idle = idle_seconds
        self._clock = clock
        self._closing: set[asyncio.Task[None]] = set()
        self._tls = {route: upstream_tls(route) for route in routes if route.https}
        self._timeouts: dict[Route, aiohttp.ClientTimeout] = {}
        self.client_body_timeout = listener.client_body_timeout if listener else 60.0
        self.client_send_timeout = listener.client_send_timeout if listener else 60.0

    def timeout(self, route: Route) -> aiohttp.ClientTimeout:
        """The route's timeouts toward the backend (made once: the object is immutable)."""
        timeout = self._timeouts.get(route)
        if timeout is None:
            timeout = self._timeouts[route] = aiohttp.ClientTimeout(
                total=None, sock_connect=route.connect_timeout, sock_read=route.read_timeout
            )
        return timeout

    def tls(self, route: Route) -> ssl.SSLContext | bool:
        """What aiohttp's `ssl=` gets for this route: its context, or True (the default) for http."""
        if not route.https:
            return True
        if route not in self._tls:
            self._tls[route] = upstream_tls(route)
        return self._tls[route]

    @contextlib.contextmanager
    def lease(self, principal: str) -> Iterator[aiohttp.ClientSession]:
        """The user's session for the duration of one request; it is not closed while any are running."""
        pool = self._pools.pop(principal, None)
        if pool is None or pool.session.closed:
            pool = _Pool(self._new_session())
        self._pools[principal] = pool  # most recently used last
        pool.in_flight += 1
        self._evict(self._clock())
        try:
            yield pool.session
        finally:
            pool.in_flight -= 1
            pool.last_used = self._clock()

    def users(self) -> dict[str, int]:
        """Principals with a pool, and how many of their requests are in flight."""
        return {principal: pool.in_flight for principal, pool in self._pools.items()}

    @staticmethod
    def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=_Connector(limit_per_host=32, keepalive_timeout=30, ttl_dns_cache=60),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are the device's: see the module's docstring
            timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    def _evict(self, now: float) -> None:
        """Close idle pools and, over `max_users`, the least recently used ones; never busy ones."""
        excess = len(self._pools) - self._max_users
        idle: list[str] = []
        busy: list[str] = []
        for principal, pool in self._pools.items():
            if pool.in_flight:
                busy.append(principal)  # in use is recently used: moved back, so the next scan starts later
            elif excess > len(idle) or now - pool.last_used >= self._idle:
                idle.append(principal)
            else:
                break  # the rest were leased more recently
        for principal in busy:
            self._pools.move_to_end(principal)
        for principal in idle:
            task = asyncio.get_running_loop().create_task(self._pools.pop(principal).session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = [pool.session for pool in self._pools.values()]
        self._pools.clear()
        await asyncio.gather(*(s.close() for s in sessions), *self._closing, return_exceptions=True)


_REUSED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("kcd_backend_reused", default=None)

Authorization = str | Callable[[], str]  # the header's value, or how to make it (only when it is sent)


class ConnectionBinding:
    """One request's Negotiate token on a connection-bound route: sent only on a connection that has not
    carried one of this user's tokens for this SPN yet (the connector decides, `_Connector.connect`).

    `token_sent` and `protocol` say what happened; `bound()`, after an answer other than 401, records that
    the connection now carries the user's identity, so its later requests go without a token."""

    __slots__ = ("authorization", "bound_to", "protocol", "spn", "token_sent")

    def __init__(self, authorization: Authorization, spn: str) -> None:
        self.authorization = authorization
        self.spn = spn
        self.token_sent = False
        self.protocol: object | None = None
        self.bound_to: weakref.WeakKeyDictionary[object, str] | None = None

    def bound(self) -> None:
        if self.token_sent and self.protocol is not None and self.bound_to is not None:
            self.bound_to[self.protocol] = self.spn


_BINDING: contextvars.ContextVar[ConnectionBinding | None] = contextvars.ContextVar("kcd_binding", default=None)


class _Connector(aiohttp.TCPConnector):
    """A user's connection pool that tells each request whether it got a pooled connection or a new one.

    For the request's trace: the connections it handed out before are remembered (weakly); the answer goes
    to the request's task in `_REUSED`. aiohttp's TraceConfig signals say the same but cost about 20 µs per
    request (eight signal sends); this costs a set lookup."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[object] = weakref.WeakSet()
        self._bound: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()  # connection -> SPN

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109  aiohttp's own signature, overridden
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol is not None:
            _REUSED.set(protocol in self._handed_out)
            self._handed_out.add(protocol)
        binding = _BINDING.get()
        if binding is not None:
            try:
                self._authorize(req, protocol, binding)
            except BaseException:
                connection.close()
                raise
        return connection

    def _authorize(self, req: ClientRequest, protocol: object | None, binding: ConnectionBinding) -> None:
        """A connection-bound route's request: a token on a connection this user has not bound yet, else none."""
        binding.protocol, binding.bound_to = protocol, self._bound
        if protocol is not None and self._bound.get(protocol) == binding.spn:
            del req.headers["Authorization"]
            binding.token_sent = False
        else:
            value = binding.authorization
            req.headers["Authorization"] = value if isinstance(value, str) else value()
            binding.token_sent = True


class ClientBody:
    """The device's request body as it arrives; a wait longer than `idle` seconds for more ends it."""

    def __init__(self, content: aiohttp.StreamReader, idle: float) -> None:
        self._content = content
        self._idle = idle
        self.timed_out = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.timed_out = True
                raise
            if not chunk:
                return
            yield chunk


async def defer_continue(request: web.Request) -> None:
    """aiohttp's `expect_handler`: send nothing yet; `forward` answers `100 Continue` when it forwards."""


async def _send_continue(request: web.Request) -> None:
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response (as aiohttp does)


@dataclass(frozen=True)
class BackendResult:
    status: int
    ms: float  # time to the backend's response headers
    reused: bool | None = None  # whether the request went on a pooled connection (for the request's trace)
    token_sent: bool = True  # False: a connection-bound route's request on a connection already bound


async def forward(
    request: web.Request,
    route: Route,
    pools: Pools,
    principal: str,
    authorization: Authorization,
    extra_headers: Iterable[tuple[str, str]] = (),
    target: OriginForm | None = None,
) -> tuple[web.StreamResponse, BackendResult]:
    """Send `request` to the route's upstream as `principal` with `authorization`; stream the answer back.

    `authorization` may be a function that makes the header: on a `backend_binding = "connection"` route
    it is called only when the request goes on a connection that needs a token (see the module's docstring).
    The path sent is `target`'s (the one the route was chosen on: `proxy.target`), as is: yarl would
    otherwise decode, re-encode and resolve it again on its own terms."""
    target = target or origin_form(request.raw_path)
    url = URL(route.upstream + target.forward_with_query, encoded=True)
    binding = ConnectionBinding(authorization, route.spn) if route.backend_binding == "connection" else None
    if binding is None and not isinstance(authorization, str):
        authorization = authorization()
    out_headers = headers.to_backend(
        request.headers,
        client_ip=request.remote or "",
        client_host=request.host,
        upstream_host=None if route.preserve_host else route.upstream.split("://", 1)[1],
        authorization=authorization if isinstance(authorization, str) else "",  # set by the connector
        extra=extra_headers,
    )
    body = ClientBody(request.content, pools.client_body_timeout) if request.body_exists else None
    timeout = pools.timeout(route)
    with pools.lease(principal) as session:
        await _send_continue(request)
        start = time.perf_counter()
        _REUSED.set(None)
        _BINDING.set(binding)
        try:
            upstream = await session.request(
                request.method,
                url,
                headers=out_headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                compress=False,
                auto_decompress=False,
                ssl=pools.tls(route),
                server_hostname=route.server_name,
            )
        except (aiohttp.ClientError, TimeoutError) as e:  # refused, reset, TLS, not HTTP, timed out
            raise _failure(route, e, body) from None
        finally:
            _BINDING.set(None)
        ms = (time.perf_counter() - start) * 1000
        reused = _REUSED.get()
        async with upstream:
            if upstream.status == 401:
                if binding is not None:
                    upstream.close()  # a connection that answered 401 is never reused, let alone bound
                challenges = upstream.headers.getall("WWW-Authenticate", [])
                raise _rejected(route, challenges, token_sent=binding is None or binding.token_sent)
            if binding is not None:
                binding.bound()
            response = await _relay(request, upstream, pools.client_send_timeout, route)
        token_sent = binding is None or binding.token_sent
        return response, BackendResult(upstream.status, ms, reused, token_sent)


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, send_timeout: float, route: Route
) -> web.StreamResponse:
    """Stream the backend's answer to the device, chunk by chunk as it comes."""
    if _arrived_whole(request, upstream):
        return await _relay_whole(request, upstream, send_timeout, route)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(headers.to_client(upstream.headers))
    if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            async with asyncio.timeout(send_timeout):
                await response.write(chunk)
    except TimeoutError as e:
        # From the backend (read timeout) or the device (send timeout); either way the headers are gone
        # and all that is left is to cut the device's connection short.
        _cut(request, route, "stream_stalled", e)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        _cut(request, route, "backend_stream_broken", e)
    else:
        await response.write_eof()
    return response


def _arrived_whole(request: web.Request, upstream: aiohttp.ClientResponse) -> bool:
    """Whether the backend's whole answer is already here: a small one comes in the packet of its headers.

    Not for HEAD, 204 and 304, whose Content-Length (if any) describes a body they do not carry."""
    return upstream.content.is_eof() and request.method != "HEAD" and upstream.status not in (204, 304)


async def _relay_whole(
    request: web.Request, upstream: aiohttp.ClientResponse, send_timeout: float, route: Route
) -> web.StreamResponse:
    """An answer that has arrived whole goes to the device in one write (headers and body together, where
    streaming makes three: headers, body, end, each a TLS record and a send), with a Content-Length.
    Nothing waits for the backend here: the body is in aiohttp's buffer."""
    body = await upstream.read()
    response = web.Response(status=upstream.status, reason=upstream.reason, body=body)
    response.headers.extend(headers.to_client(upstream.headers))
    try:
        async with asyncio.timeout(send_timeout):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError as e:
        _cut(request, route, "stream_stalled", e)
    return response


def _cut(request: web.Request, route: Route, event: str, e: Exception) -> None:
    log.warning(event, upstream=route.upstream, error=f"{type(e).__name__}: {e}")
    if request.transport is not None:
        request.transport.abort()


def _failure(route: Route, e: Exception, body: ClientBody | None) -> Exception:
    """The error for a backend request that failed before its answer began."""
    where = f"{route.upstream} ({route.prefix})"
    if body is not None and body.timed_out:
        return ClientBodyTimeout("the request body stopped arriving", hint=f"client_body_timeout; to {where}")
    if isinstance(e, TimeoutError):
        return BackendTimeout(
            "the mail server did not answer in time; try again later",
            hint=f"{where}: {type(e).__name__}: no answer within connect_timeout={route.connect_timeout:g} s "
            f"or read_timeout={route.read_timeout:g} s",
        )
    return BackendUnavailable(
        "the mail server cannot be reached; try again later", hint=f"{where}: {type(e).__name__}: {e}"
    )


def _rejected(route: Route, challenges: list[str], *, token_sent: bool = True) -> BackendRejectedTicket:
    """A backend 401 to a delegated ticket, with what the backend's challenges say about why."""
    schemes = [c.split(None, 1) for c in challenges]
    negotiate = [parts for parts in schemes if parts and parts[0].lower() == "negotiate"]
    if not token_sent:
        why = (
            'backend_binding = "connection", and the backend asked again for credentials on a connection it had '
            'accepted a ticket on: it does not keep the identity per connection; set backend_binding = "request"'
        )
    elif any(len(parts) == 2 for parts in negotiate):
        why = (
            "it answered with a Negotiate continuation token (a Kerberos error: clock skew between the "
            "backend and the KDC, a replayed or mangled token, or a ticket for the wrong key)"
        )
    elif negotiate:
        why = f"is {route.spn} the SPN of the backend's account, and is its keytab current?"
    elif schemes:
        offered = ", ".join(parts[0] for parts in schemes if parts)
        why = f"it offers {offered} but not Negotiate: enable Kerberos (Negotiate) on the backend"
    else:
        why = "it sent no WWW-Authenticate challenge at all"
    return BackendRejectedTicket(
        "the mail server refused the gateway's Kerberos ticket",
        hint=f"{route.upstream} answered 401 to a ticket for {route.spn}: {why}",
    )
