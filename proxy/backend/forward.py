"""Forwarding: the delegated request to the backend, the answer back to the device, both streamed.

Theory of operation
-------------------
Backend connections belong to one identity. IIS with `authPersistNonNTLM` (Exchange's default) binds
the first Kerberos identity of a TCP connection to the connection and ignores later tokens, so a pooled
connection that carried Alice's request would serve Bob as Alice. Each user principal therefore gets
its own connection pool (a `proxy.backend.client.UserPool`: the HTTP/1.1 client written for this job,
which parses the backend's answers strictly); a pool is closed once its user has had no request
in flight for `idle_seconds`, or when more than `max_users` pools exist, least recently used first, but
never while one of its requests (an ActiveSync `Ping`, say) is still running.

With a route's `backend_binding = "request"` (the default) every request carries `Authorization:
Negotiate` with a fresh token, so the first request of each backend connection always has one (what IIS
binds the connection to), and a backend that authenticates each request (Apache, IIS without
`authPersistNonNTLM`) gets one too. A connection-bound backend ignores the later ones, which is harmless
because the connection only ever carries this user. With `backend_binding = "connection"` only the first
request of each backend connection carries a token, and the token is built only then (building it was
about a quarter of the gateway's CPU per request: bench/run.py, docs/performance.md): once the user's pool
has handed out the connection, `_authorize` decides from whether that connection has already carried one
of this user's tokens for this SPN and got an answer other than 401 (`BackendConnection.bound_spn`). The token is
made once the connection is open, up to `connect_timeout` after the ticket was taken: a ticket that ended meanwhile
is asked for again first (`proxy.pipeline.OnceConnected`), never used for a token MIT refuses to make. On
such a route a connection that answers 401 is closed, never reused. Any 401 from the backend, whether a
bare challenge, a `Negotiate` continuation (a KRB-ERROR such as clock skew or a replay) or a challenge for
another scheme, means the backend did not accept the delegated ticket: the device gets 502, never a 401 it
could not answer, and the log says what the backend wanted. The mutual-authentication token a backend
sends with its success (`WWW-Authenticate: Negotiate <AP-REP>`) is dropped on the way to the device
(`headers.to_client`).

Cookies pass through as the device and the backend send them; the pools keep no cookie jar. One would add
the backend's cookies to the device's later requests, even after the device dropped them (an OWA
sign-out), and skip them for upstreams named by IP address only.

Bodies stream both ways without being held whole, chunked or with a Content-Length, at the pace of the
slower side (the backend connection stops reading while the device has not taken what is buffered). An
answer that has already arrived whole when its headers are read (most ActiveSync and EWS answers are
small) goes out in one write with a Content-Length. `Expect: 100-continue` is answered here, once every
stage has said yes, just before the body is forwarded: a refused device never sends it.

Timeouts. Nothing bounds a backend request as a whole (a total would cut ActiveSync `Ping` and EWS
streaming notifications); the route's `connect_timeout` bounds the connection (and a wait for one of the user's
connections when all `LIMIT_PER_UPSTREAM` are busy) and its `read_timeout` each
wait for the backend's next bytes or for it to take more of the request body (504 before the answer has
begun). On the device's side, `listener.client_body_timeout` bounds each wait for its next body bytes (408) and
`listener.client_send_timeout` each wait for it to take ours. When the device goes away, the device-side
server cancels the request's task (`proxy.device.server`; aiohttp's with `handler_cancellation=True`), which
closes the backend connection at once: the backend sees its client leave and stops working on the request.

https upstreams are verified against the route's `ca_bundle` (the system's CAs without one), under the
route's `server_name` when set (it is then also the SNI), else the upstream's host name.

A pooled connection the backend closed before answering is tried again once, on a new connection, when the
method is idempotent and nothing of the device's body has been read yet (`_send`); a new connection that
fails is not retried (aiohttp retried those too)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDict

from proxy.backend import headers
from proxy.backend.client import (
    IDEMPOTENT,
    BackendClosed,
    BackendProtocolError,
    BackendSockets,
    BackendSocketsExhausted,
    Exchange,
    PoolBusy,
    ResponseHead,
    Upstream,
    UserPool,
)
from proxy.config import Listener, Route
from proxy.device.aiohttp_side import AiohttpRequest
from proxy.device.request import DeviceRequest
from proxy.errors import (
    BackendBusy,
    BackendRejectedTicket,
    BackendTimeout,
    BackendUnavailable,
    ClientBodyTimeout,
)
from proxy.target import OriginForm, origin_form

log = structlog.get_logger("proxy.backend")


def upstream_tls(route: Route, bundle: bytes | None = None) -> ssl.SSLContext:
    """The TLS client context for an https route: the certificates of its CA bundle only, or the system's CAs.
    `bundle` is the bundle's bytes when the caller has read them: the context trusts exactly those (the ones
    `Pools.successor` compares), as the configuration's check read them (`x509.load_pem_x509_certificates`)."""
    if route.ca_bundle is None:
        return ssl.create_default_context()
    pem = route.ca_bundle.read_bytes() if bundle is None else bundle
    certificates = x509.load_pem_x509_certificates(pem)  # ValueError without one: a reload is then refused
    return ssl.create_default_context(cadata=b"".join(c.public_bytes(Encoding.DER) for c in certificates))


def _bundle(route: Route) -> bytes | None:
    """The bytes of an https route's CA bundle (None: the system's CAs), read once: what its context is made
    from and what a reload compares, so a bundle rewritten between two reads never leaves the old CA trusted."""
    return route.ca_bundle.read_bytes() if route.ca_bundle else None


@dataclass
class _Lease:
    pool: UserPool
    in_flight: int = 0
    last_used: float = 0.0


class _Leased:
    """One request's hold on a user's pool (a class: `contextlib.contextmanager` cost a per cent of the
    request path)."""

    __slots__ = ("_clock", "_lease")

    def __init__(self, lease: _Lease, clock: Callable[[], float]) -> None:
        self._lease = lease
        self._clock = clock

    def __enter__(self) -> UserPool:
        return self._lease.pool

    def __exit__(self, *exc: object) -> None:
        self._lease.in_flight -= 1
        self._lease.last_used = self._clock()


class Pools:
    """One `UserPool` per user principal (`proxy.backend.client`), plus what every forwarded request needs:
    each route's upstream and TLS context, read once, and the device-side idle limits of the listener. All the
    pools together hold at most `max_connections` backend connections (`BackendSockets`): past it, the
    connection idle the longest in the least recently used user's pool is closed for a new one."""

    def __init__(
        self,
        routes: Iterable[Route] = (),
        listener: Listener | None = None,
        *,
        max_users: int = 1000,
        idle_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        users: OrderedDict[str, _Lease] | None = None,
        max_connections: int = 1 << 20,
        sockets: BackendSockets | None = None,
    ) -> None:
        self._pools: OrderedDict[str, _Lease] = OrderedDict() if users is None else users
        self.sockets = BackendSockets(max_connections) if sockets is None else sockets
        self.sockets.reclaim = self._reclaim
        self._max_users = max_users
        self._idle = idle_seconds
        self._clock = clock
        self._bundles = {route: _bundle(route) for route in routes if route.https}  # what each context trusts
        self._tls = {route: upstream_tls(route, bundle) for route, bundle in self._bundles.items()}
        self._upstreams: dict[Route, Upstream] = {}
        self.client_body_timeout = listener.client_body_timeout if listener else 60.0
        self.client_send_timeout = listener.client_send_timeout if listener else 60.0

    def successor(self, routes: Iterable[Route], listener: Listener | None) -> Pools:
        """The pools of a reloaded configuration: the same users' backend connections (shared, not copied), and
        each route's TLS context and upstream made anew, except where the route and the bytes of its CA bundle
        are unchanged: there the old ones stay, and with them the users' warm connections. A bundle rewritten
        under the same name (a CA rotation) thus applies from the next request, on new connections."""
        routes = tuple(routes)
        new = Pools(
            routes,
            listener,
            max_users=self._max_users,
            idle_seconds=self._idle,
            clock=self._clock,
            users=self._pools,
            sockets=self.sockets,
        )
        new.client_send_timeout = self.client_send_timeout  # the device server's too: a restart changes both
        for route in routes:
            if route in self._tls and route in new._tls and self._bundles.get(route) == new._bundles[route]:
                new._tls[route] = self._tls[route]
            if route in self._upstreams and (not route.https or new._tls.get(route) is self._tls.get(route)):
                new._upstreams[route] = self._upstreams[route]
        return new

    def shares_users(self, other: Pools) -> bool:
        """Whether `other` holds the same users' connections (one is the other's `successor`)."""
        return self._pools is other._pools

    def tls(self, route: Route) -> ssl.SSLContext | bool:
        """The route's TLS context toward its upstream, or True (no context of its own) for http."""
        if not route.https:
            return True
        if route not in self._tls:
            bundle = self._bundles[route] = _bundle(route)
            self._tls[route] = upstream_tls(route, bundle)
        return self._tls[route]

    def upstream(self, route: Route) -> Upstream:
        """Where the route's requests go (made once per route)."""
        upstream = self._upstreams.get(route)
        if upstream is None:
            tls = self.tls(route)
            context = tls if isinstance(tls, ssl.SSLContext) else None
            upstream = self._upstreams[route] = Upstream.of(route.upstream, context, route.server_name)
        return upstream

    def lease(self, principal: str) -> _Leased:
        """The user's pool for the duration of one request (`with pools.lease(p) as pool`); it is not closed
        while any are running."""
        lease = self._pools.pop(principal, None)
        if lease is None or lease.pool.closed:
            lease = _Lease(UserPool(sockets=self.sockets))
        self._pools[principal] = lease  # most recently used last
        lease.in_flight += 1  # before eviction: a pool in use is never closed
        self._evict(self._clock())
        return _Leased(lease, self._clock)

    def _reclaim(self) -> bool:
        """Close one idle backend connection, the least recently used user's first; whether there was one."""
        return any(lease.pool.drop_idle() for lease in self._pools.values())

    def users(self) -> dict[str, int]:
        """Principals with a pool, and how many of their requests are in flight."""
        return {principal: lease.in_flight for principal, lease in self._pools.items()}

    def _evict(self, now: float) -> None:
        """Close idle pools and, over `max_users`, the least recently used ones; never busy ones."""
        excess = len(self._pools) - self._max_users
        idle: list[str] = []
        busy: list[str] = []
        for principal, lease in self._pools.items():
            if lease.in_flight:
                busy.append(principal)  # in use is recently used: moved back, so the next scan starts later
            elif excess > len(idle) or now - lease.last_used >= self._idle:
                idle.append(principal)
            else:
                break  # the rest were leased more recently
        for principal in busy:
            self._pools.move_to_end(principal)
        for principal in idle:
            self._pools.pop(principal).pool.close()

    async def close(self) -> None:
        for lease in self._pools.values():
            lease.pool.close()
        self._pools.clear()
        await asyncio.sleep(0)  # the transports' close callbacks run


# the header's value, or how to make it (only when it is sent: on a connection-bound route, once the connection is open)
Authorization = str | Callable[[], str] | Callable[[], Awaitable[str]]


async def _value(authorization: Authorization) -> str:
    """The header's value, made now if it is to be made."""
    if isinstance(authorization, str):
        return authorization
    made = authorization()
    return made if isinstance(made, str) else await made


class Handover:
    """A header value made earlier, given to the backend stage once: the caller's frame then no longer holds
    it, and the request's headers are its only holder until they are written (`_send`). An ActiveSync
    `Ping` is held up to half an hour; a Negotiate token is about 1.6 KiB of it (docs/performance.md)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: str | None = value

    def __call__(self) -> str:
        value, self._value = self._value, None
        if value is None:  # never an empty Authorization: a request goes with its token or not at all
            raise RuntimeError("the Authorization value was handed over already")
        return value


class ClientBody:
    """The device's request body as it arrives; a wait longer than `idle` seconds for more ends it.

    `started` says whether any of it has been taken from the device (then it cannot be sent again)."""

    def __init__(self, request: DeviceRequest, idle: float) -> None:
        self._request = request
        self._idle = idle
        self.timed_out = False
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await self._request.read_body()
            except TimeoutError:
                self.timed_out = True
                raise
            if not chunk:
                return
            self.started = True
            yield chunk


async def defer_continue(request: object) -> None:
    """aiohttp's `expect_handler`: send nothing yet; `forward` answers `100 Continue` when it forwards."""


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
) -> tuple[web.StreamResponse, BackendResult]:
    """`forward_device` for an aiohttp handler (the tests' backend stage without a gateway): the answer given is the
    response the handler returns."""
    device = AiohttpRequest(request)
    result = await forward_device(device, route, pools, principal, authorization)
    assert device.response is not None  # every path through forward_device answers, or raises
    return device.response, result


async def forward_device(
    request: DeviceRequest,
    route: Route,
    pools: Pools,
    principal: str,
    authorization: Authorization,
    extra_headers: Iterable[tuple[str, str]] = (),
    target: OriginForm | None = None,
) -> BackendResult:
    """Send `request` to the route's upstream as `principal` with `authorization`; stream the answer back.

    `authorization` may be a function that makes the header: on a `backend_binding = "connection"` route
    it is called only when the request goes on a connection that needs a token (see the module's docstring).
    The path sent is `target`'s (the one the route was chosen on: `proxy.target`), as is."""
    target = target or origin_form(request.raw_path)
    if route.backend_binding != "connection" and not isinstance(authorization, str):
        authorization = await _value(authorization)
    out_headers = headers.to_backend(
        request.headers,
        client_ip=request.remote or "",
        client_host=request.headers.get("Host", ""),  # as the device sent it (none: none), never a name of our own
        upstream_host=None if route.preserve_host else route.upstream.split("://", 1)[1],
        authorization=authorization if isinstance(authorization, str) else "",  # set per connection
        extra=extra_headers,
    )
    sent_bytes = len(authorization) if isinstance(authorization, str) else 0  # a number; the token is not kept
    if route.backend_binding != "connection":
        authorization = ""  # in the headers now, and gone with them once they are written (`_send`)
    body = ClientBody(request, pools.client_body_timeout) if request.body_exists else None
    upstream = pools.upstream(route)
    with pools.lease(principal) as pool:
        await request.send_continue()
        start = time.perf_counter()
        try:
            exchange, head, token_sent = await _send(
                pool, upstream, route, request.method, target.forward_with_query, out_headers, body, authorization
            )
            del out_headers  # written, never sent again: a held long-poll does not keep even their container
            request.head_forwarded()  # nor the device's header fields
            if head is None:  # the request cannot be sent again: its answer is awaited here, without `_send`'s frame
                try:
                    head = await exchange.connection.response_head()
                except BackendClosed:
                    await exchange.abandon()  # (the body's sender stops reading the device's body)
                    raise
                except BaseException:
                    exchange.finish(reuse=False)
                    raise
        except (OSError, TimeoutError, BackendProtocolError, BackendSocketsExhausted) as e:  # refused, reset, TLS, ...
            raise _failure(route, e, body) from None
        ms = (time.perf_counter() - start) * 1000
        if head.status in (400, 431) and token_sent and sent_bytes > LARGE_AUTHORIZATION:
            _large_token_refused(route, principal, head.status, sent_bytes)
        if head.status == 401:
            # on a connection-bound route a connection that answered 401 is never reused, let alone bound
            exchange.finish(reuse=route.backend_binding != "connection")
            raise _rejected(route, head.headers.getall("WWW-Authenticate", []), token_sent=token_sent)
        try:
            if token_sent and route.backend_binding == "connection":
                exchange.connection.bound_spn = route.spn  # its later requests go without a token
            whole = await _relay(request, exchange, head, pools.client_send_timeout, route)
        except BaseException:
            exchange.finish(reuse=False)  # the device left, or the answer broke: the backend sees it at once
            raise
        exchange.finish(reuse=whole)
        return BackendResult(head.status, ms, exchange.reused, token_sent)


async def _send(
    pool: UserPool,
    upstream: Upstream,
    route: Route,
    method: str,
    target: str,
    out_headers: CIMultiDict[str],
    body: ClientBody | None,
    authorization: Authorization,
) -> tuple[Exchange, ResponseHead | None, bool]:
    """The request on one of the user's connections, up to the answer's head; and whether it carried a token.

    A pooled connection the backend closed before answering is tried once more, on a new connection, when
    nothing of the request can have been acted on: an idempotent method, its body (if any) not read yet. A request
    that cannot be sent again returns once it is written, without the head (None): the caller waits for it, so a
    held long-poll does not keep this coroutine's frame and locals (docs/performance.md)."""
    fresh = False
    while True:
        connection = await pool.acquire(upstream, route.connect_timeout, fresh=fresh)
        try:
            token_sent = await _authorize(connection.bound_spn, out_headers, route, authorization)
        except BaseException:
            pool.unused(upstream, connection)  # nothing was written on it
            raise
        exchange = Exchange(pool, upstream, connection)
        try:
            exchange.start(method, target, out_headers, body, route.read_timeout)
            if fresh or not exchange.reused or method not in IDEMPOTENT:  # never sent again (see below)
                out_headers.clear()  # a held long-poll keeps neither the token nor the headers built for it
                return exchange, None, token_sent
            head = await connection.response_head()
        except BackendClosed as e:
            await exchange.abandon()
            retry = exchange.reused and not e.answered and method in IDEMPOTENT
            if fresh or not retry or (body is not None and body.started):
                raise
            fresh = True
            continue
        except BaseException:
            exchange.finish(reuse=False)
            raise
        return exchange, head, token_sent


async def _authorize(
    bound_spn: str | None, out_headers: CIMultiDict[str], route: Route, authorization: Authorization
) -> bool:
    """On a connection-bound route: a token on a connection not yet bound to this user for this SPN, else
    none (and no Authorization at all). Elsewhere the token is already in the headers."""
    if route.backend_binding != "connection":
        return True
    if bound_spn == route.spn:
        out_headers.popall("Authorization", None)
        return False
    out_headers["Authorization"] = await _value(authorization)
    return True


async def _relay(
    request: DeviceRequest, exchange: Exchange, head: ResponseHead, send_timeout: float, route: Route
) -> bool:
    """Stream the backend's answer to the device, chunk by chunk as it comes; and whether it ended whole."""
    connection = exchange.connection
    if connection.complete and request.method != "HEAD" and head.status not in (204, 304):
        return await _relay_whole(request, exchange, head, send_timeout, route)
    await request.start_answer(head.status, head.reason, headers.to_client(head.headers), head.content_length)
    try:
        while chunk := await connection.read():
            async with asyncio.timeout(send_timeout):
                await request.write(chunk)
    except TimeoutError as e:
        # From the backend (read timeout) or the device (send timeout); either way the headers are gone
        # and all that is left is to cut the device's connection short.
        _cut(request, route, "stream_stalled", e)
        return False
    except (OSError, BackendProtocolError) as e:
        _cut(request, route, "backend_stream_broken", e)
        return False
    await request.end_answer()
    return True


async def _relay_whole(
    request: DeviceRequest, exchange: Exchange, head: ResponseHead, send_timeout: float, route: Route
) -> bool:
    """An answer that has arrived whole goes to the device in one write (headers and body together, where
    streaming makes three: headers, body, end, each a TLS record and a send), with a Content-Length.
    Nothing waits for the backend here: the body is in the connection's buffer.

    The device's wait is bounded by `send_timeout`; a timer is armed only when the device has yet to take the
    answer once it is written (`answer_written`), which on a keep-alive request it mostly has not: a timeout
    acts only where its block waits, and `asyncio.timeout()` made, armed and cancelled cost about 4 µs a
    request (docs/performance.md)."""
    status, reason, to_client, body = (
        head.status,
        head.reason,
        headers.to_client(head.headers),
        exchange.connection.body(),
    )
    waits = request.answer_written(status, reason, to_client, body)
    if waits is False:
        return True
    try:
        async with asyncio.timeout(send_timeout):
            if waits is None:  # this server writes only by waiting
                await request.answer(status, reason, to_client, body)
            else:
                await request.drain()
    except TimeoutError as e:
        _cut(request, route, "stream_stalled", e)
    return True


# Header field limits of common servers: nginx, Apache and aiohttp refuse fields over 8 KiB; IIS (http.sys) over 16 KiB.
LARGE_AUTHORIZATION = 8 * 1024


def _large_token_refused(route: Route, principal: str, status: int, sent_bytes: int) -> None:
    """The backend said 400 (or 431) to a request carrying a large Negotiate header: most likely that header. The
    answer goes to the device as the backend gave it; the log says why and what to change."""
    log.warning(
        "backend_refused_large_token",
        principal=principal,
        spn=route.spn,
        upstream=route.upstream,
        backend_status=status,
        negotiate_header_bytes=sent_bytes,
        fix=f"{route.upstream} answered {status} to a request whose Authorization header was {sent_bytes} bytes: the "
        f"user's Kerberos ticket carries their groups (the PAC), and the backend's header limit is smaller. IIS "
        f"(http.sys) refuses a field over MaxFieldLength and a request over MaxRequestBytes (both 16384 by "
        f"default): raise both (DWORD, up to 65534) under HKLM\\SYSTEM\\CurrentControlSet\\Services\\HTTP\\"
        f"Parameters and restart the HTTP service; Kerberos MaxTokenSize (48000 by default) bounds the ticket "
        f"itself. Or reduce the user's group memberships (nested and SID-history groups count too)",
    )


def _cut(request: DeviceRequest, route: Route, event: str, e: Exception) -> None:
    log.warning(event, upstream=route.upstream, error=f"{type(e).__name__}: {e}")
    request.abort()


def _failure(route: Route, e: Exception, body: ClientBody | None) -> Exception:
    """The error for a backend request that failed before its answer began."""
    where = f"{route.upstream} ({route.prefix})"
    if body is not None and body.timed_out:
        return ClientBodyTimeout("the request body stopped arriving", hint=f"client_body_timeout; to {where}")
    if isinstance(e, BackendSocketsExhausted):
        return BackendBusy(
            "the gateway is serving as many requests as it can; try again later",
            hint=f"{where}: {e} (the process's open-file limit: docs/throttles-and-limits.md); raise LimitNOFILE, "
            "or add workers or gateways",
        )
    if isinstance(e, PoolBusy):
        return BackendTimeout(
            "the mail server did not answer in time; try again later",
            hint=f"{where}: {e} for connect_timeout={route.connect_timeout:g} s; the user's requests wait for one",
        )
    if isinstance(e, TimeoutError):
        return BackendTimeout(
            "the mail server did not answer in time; try again later",
            hint=f"{where}: {type(e).__name__}: no answer within connect_timeout={route.connect_timeout:g} s "
            f"or read_timeout={route.read_timeout:g} s",
        )
    if isinstance(e, BackendProtocolError):  # it was reached, and answered with something that is not HTTP/1.1
        return BackendUnavailable(
            "the mail server cannot be reached; try again later",
            hint=f"{where}: the exchange is not valid HTTP/1.1: {e}; the backend, or a device between it and the "
            "gateway, is broken, or routes[].upstream names a server of another protocol",
        )
    return BackendUnavailable(
        "the mail server cannot be reached; try again later",
        hint=f"{where}: {type(e).__name__}: {e}; is the backend running and reachable from the gateway, and is "
        "routes[].upstream its address?",
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
