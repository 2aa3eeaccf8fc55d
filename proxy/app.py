"""Wiring: configuration to a running gateway.

`build` loads what the configuration names (trust list, CRLs, Kerberos credentials) and fails with a
`ConfigError` naming the key when something is unusable. `serve` runs the listener until SIGTERM or
SIGINT. A refusal becomes a response, an audit event and the request's summary line here only: in
`own_server_handler` (the gateway's own server, `listener.http_server = "own"`) or in `make_app`'s middleware
(aiohttp's), both through `_refused` and `_end`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from cryptography import x509
from multidict import CIMultiDict, MultiMapping

from proxy.addresses import cannot_bind, host_port
from proxy.admin import start_admin
from proxy.auth.basic import BasicLogin
from proxy.auth.shared import SharedTable
from proxy.backend.forward import Pools, defer_continue
from proxy.certs.chain import TrustList, load_certificates
from proxy.certs.floors import CrlStateError, FloorTable, LocalFloors, PersistedFloors
from proxy.certs.kept import KeptCrls
from proxy.certs.live import LiveRevocation
from proxy.certs.revocation import load_crls
from proxy.config import MAX_FIELD_BYTES, Config
from proxy.descriptors import DescriptorBudget, kdc_reserve_problem
from proxy.device.aiohttp_side import AiohttpRequest, awaiting_first_request, idle_handlers, receiving_body
from proxy.device.request import CONTINUE, DeviceRequest, expectations
from proxy.device.server import DeviceConnection, DeviceLimits, close_all, connection_factory, idle_connections
from proxy.errors import (
    BadRequest,
    CertificateRevoked,
    ConfigError,
    DeviceUnnamed,
    ExpectationFailed,
    GatewayError,
    KdcNotAsked,
    MethodNotAllowed,
    TransferCodingNotImplemented,
    VersionNotSupported,
)
from proxy.kerberos.delegate import Delegator
from proxy.kerberos.profile import remove_stale_overlays
from proxy.live import Live
from proxy.observability.logging import logged_path, summary_fields
from proxy.observability.trace import Trace
from proxy.pipeline import Gateway, handle
from proxy.printable import printable
from proxy.tls import proxy_protocol
from proxy.tls.limits import (
    BACKLOG,
    AddressCap,
    ConnectionSlots,
    IdleKeepAlives,
    accept_connections,
    accept_queued,
    limit_header_block,
    listen_addresses,
    listen_sockets,
    serve_accepted,
)
from proxy.tls.server import UNNAMED, gate_factory
from proxy.workers import PASSED_ON, Worker, reload_asked_while_starting

if TYPE_CHECKING:  # bonsai's import is start-up CPU: imported where a [directory] is configured
    from proxy.directory import Directory


def _require(*names: str) -> None:
    """Libraries imported only where used (start-up CPU: bonsai by `_directory`, pyasn1_modules by `proxy.identity.sid`)
    must still be there at a start: one missing stops it, as when they were imported here, not a request later."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}: a dependency of kcd-proxy, reinstall it", name=name)


_require("bonsai", "pyasn1_modules")
log = structlog.get_logger("proxy")
TRACE_KEY = web.RequestKey("trace", Trace)
DEVICE_KEY = web.RequestKey("device", AiohttpRequest)


def build(
    config: Config,
    *,
    shared: SharedTable | None = None,
    previous: Gateway | None = None,
    serving: bool = False,
    crls_vetted: Collection[Path] = (),
    backend_connections: int | None = None,
    beside: bool = False,
    kept: KeptCrls | None = None,
) -> Gateway:
    """The gateway a configuration describes; `shared`: the workers' table (the Basic per-user throttle, the log of
    users whose delegated tickets a worker dropped, the CRL replay floors); `previous`: the gateway a reload replaces,
    whose CRLs the new ones start from (`CrlStore.inherit`); `serving`: a gateway that will serve (start, reload),
    which writes `client_certificates.crl_state` (check-config and explain only read it); `crls_vetted`: in a worker
    replacing a dead one with no sibling serving (`proxy.workers`: beside one, it is refused), the CRL files of the
    configuration the gateway started with, which that start vetted (matched by the file a name leads to, whatever name
    a reload gave it): one gone bad since (grown past MAX_CRL_BYTES, half rewritten) is logged (`crl_not_used`), not a
    start refused, which the supervisor answers by stopping the whole gateway (nor, in a configuration reloaded since
    that names it too, a reason to serve the started one instead: `proxy.cli`); `beside`: a replacement worker beside
    siblings serving, which refuses a CRL file giving it an older CRL than they took (below its replay floor: served
    without, it passed what theirs revokes) while one of them holds CRLs of that file (`KeptCrls.held_beside`);
    `backend_connections`: the backend's share of the descriptors the start set (`DescriptorBudget.backend`, counted
    with the listener's sockets), which a reload keeps; without it, the share under this process's limit for a listener
    on one socket; `kept`: a worker's, where its CRL store keeps what it takes and, in a replacement, starts from what
    its siblings took (`proxy.certs.kept`; a reload's keeps, never starts from them: it starts from the running store's,
    `CrlStore.inherit`)."""
    cc = config.client_certificates
    problems: list[str] = []
    loaded: dict[str, list[x509.Certificate]] = {"trust_anchors": [], "intermediates": []}
    for key, paths in (("trust_anchors", cc.trust_anchors), ("intermediates", cc.intermediates)):
        for i, path in enumerate(paths):
            try:
                loaded[key] += load_certificates(path)
            except ValueError as e:  # names the file and what is wrong with it
                problems.append(f"client_certificates.{key}[{i}]: {e} (in {config.path})")
    if problems:
        raise ConfigError(problems)
    try:
        trust = TrustList(anchors=tuple(loaded["trust_anchors"]), intermediates=tuple(loaded["intermediates"]))
    except ValueError as e:
        raise ConfigError([f"client_certificates.trust_anchors: {e} (in {config.path})"]) from None
    # by the file each name leads to now: a reload may name a started file otherwise (`dir/../x.crl`, a link to it)
    vetted = {os.path.realpath(p) for p in crls_vetted}
    for i, path in enumerate(cc.crls if previous is None else ()):  # a reload's: `Live.reload`
        if os.path.realpath(path) in vetted:
            continue
        try:
            load_crls(path)  # a file that does not parse stops the start; one that does not verify is logged
        except (ValueError, OSError) as e:  # OSError's strerror: "more than N bytes", not "[Errno 27] more than ..."
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            problems.append(f"client_certificates.crls[{i}]: {path}: {why} (in {config.path})")
    if problems:
        raise ConfigError(problems)
    if previous is not None:  # a reload keeps what it takes where its worker did, never starts from it (`inherit`)
        held = previous.revocation.crls.kept
        kept = None if held is None else dataclasses.replace(held, adopt=False)
    revocation = LiveRevocation(cc, trust, floors=_floors(config, shared, previous, serving=serving), kept=kept)
    if previous is None:
        for problem in revocation.load(now=datetime.now(UTC)):
            log.warning("crl_not_used", problem=problem)
        if beside:  # its files; its URLs once fetched (`serve`)
            _refuse_behind_floors(config, revocation)
    else:  # a reload: what a source held stays the floor a replayed CRL is refused below
        revocation.crls.inherit(previous.revocation.crls)
        revocation.crls.raise_floors()
        # Its files are read by its first refresh (`LiveRevocation.start`, awaited before it serves), in a thread: read
        # here, on the event loop the running gateway serves on, a large CA's CRL stalled every request for the whole
        # read (200,000 entries: 1.3-1.7 s under load), and so did parsing them above to refuse a file that is no CRL
        # (cryptography holds the GIL for it: 0.24 s for 1,000,000 entries, idle); the reload refuses such a file
        # after that refresh instead (`proxy.live`).
        # `crl_state` is written now, as at a start: proof it can be.
        revocation.crls.save_floors()
    floors = revocation.crls.floors
    if isinstance(floors, PersistedFloors) and floors.failed is not None:  # written once as it starts: proof it can
        raise ConfigError([f"client_certificates.crl_state: {floors.failed} (in {config.path})"])
    if cc.revocation == "off":
        log.warning("revocation_off", detail="client certificates are not checked against any CRL")
    for route in config.routes:
        if route.backend_auth == "basic" and not route.https:
            log.warning("basic_in_cleartext", route=route.prefix, detail="users' passwords go to a plain-http upstream")
    return Gateway(
        config=config,
        trust=trust,
        revocation=revocation,
        delegator=Delegator(config.kerberos, shared=shared),
        pools=Pools(
            config.routes,
            config.listener,
            max_connections=backend_connections
            or DescriptorBudget.of(config.listener.max_connections, config.kerberos.max_in_flight).backend,
        ),
        basic=BasicLogin(config.authentication, config.identity, config.kerberos, shared=shared),
        directory=_directory(config),
    )


def _refuse_behind_floors(config: Config, revocation: LiveRevocation, *, urls: bool = False) -> None:
    """A replacement worker beside siblings serving: a ConfigError naming each CRL source (files; URLs too once
    fetched) that gave it an older CRL than its siblings took (`CrlStore.behind_floors`), which it would serve without
    (`proxy.workers`)."""
    if behind := revocation.crls.behind_floors(urls=urls):
        serve = "the other workers serve with the newer one"
        raise ConfigError(
            [f"client_certificates.crls: {name}: {why}: {serve} (in {config.path})" for name, why in behind.items()]
        )


def _floors(
    config: Config, shared: SharedTable | None, previous: Gateway | None, *, serving: bool
) -> FloorTable | None:
    """The CRL replay floors (`proxy.certs.floors`): the workers' table, else the one the gateway a reload replaces
    kept (None: a gateway of one process without `crl_state`, as before it existed); with `crl_state`, that table
    (a new one where there is none) read from and written to the file."""
    table: FloorTable | None = shared
    if table is None and previous is not None:
        held = previous.revocation.crls.floors
        table = held.table if isinstance(held, PersistedFloors) else held
    path = config.client_certificates.crl_state
    if path is None:
        return table
    try:
        return PersistedFloors(table or LocalFloors(), path, writes=serving)
    except CrlStateError as e:
        raise ConfigError([f"client_certificates.crl_state: {e} (in {config.path})"]) from None


def _directory(config: Config) -> Directory | None:
    """The directory client, wherever a [directory] is configured: the mapping stage's under a strong mode; in every
    mode the judge of held requests' accounts (`proxy.held_mapping`), and doctor's."""
    if config.directory is None:
        return None
    # Imported here: start-up CPU a gateway without [directory] does not need. pyasn1_modules (the SID extension's
    # decoder, proxy.identity.sid) with bonsai, as only the modes with a directory read SIDs: one installed but broken
    # stops the start, or a reload adding [directory], naming it, not a device's certificate with a SID later.
    for module, package in (("pyasn1_modules.rfc5280", "pyasn1_modules"), ("proxy.directory", "bonsai")):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                [
                    f"[directory] needs the package {package!r}, which does not import here ({type(e).__name__}: {e});"
                    f" reinstall kcd-proxy's dependencies (in {config.path})"
                ]
            ) from None
    from proxy.directory import Directory

    return Directory(config.directory, config.kerberos)


_NOT_FORWARDED = frozenset({"TRACE", "TRACK", "CONNECT"})
# Methods whose content has no defined semantics (RFC 9110 9.3.1, 9.3.2): a body on them is refused, never forwarded.
# A backend that ignores a body on GET (as many do) reads it as the next request on the user's pooled connection.
_BODILESS = frozenset({"GET", "HEAD"})


def _carries_body(headers: MultiMapping[str]) -> bool:
    """Whether a request's framing says it has a body: a Transfer-Encoding, or a Content-Length other than 0 (both
    parsers have checked it is digits)."""
    length = headers.get("Content-Length")
    return "Transfer-Encoding" in headers or (length is not None and length.strip("0") != "")


def _refuse_unnamed(request: DeviceRequest) -> None:
    """A request relayed by a balancer that could not name its device (`proxy.tls.proxy_protocol`)."""
    if request.remote == UNNAMED[0]:
        raise DeviceUnnamed(
            "the balancer in front of the gateway named no device for this connection",
            hint="the balancer sent a PROXY header without the device's address (v1 UNKNOWN, or v2 family UNSPEC): a "
            "device the gateway cannot name is not served (every one would be the balancer's address for the "
            "throttles and the per-address cap); have the balancer relay TCP connections with their addresses, and "
            "send its health checks as v2 LOCAL",
        )


def _refuse_smuggling(request: DeviceRequest) -> None:
    """Shapes both device-side parsers let through that a gateway must not forward."""
    if request.version < (1, 0):
        raise BadRequest("the request line has no HTTP version (HTTP/0.9 is not served)")
    if request.version >= (2, 0):  # llhttp reads `HTTP/2.0`; a request line of HTTP/2 is no request of HTTP/2
        raise VersionNotSupported(f"HTTP/{request.version[0]}.{request.version[1]} is not served: only HTTP/1.x")
    if request.method in _NOT_FORWARDED:
        raise MethodNotAllowed(f"{request.method} is not forwarded")
    if request.method in _BODILESS and _carries_body(request.headers):
        raise BadRequest(
            f"a {request.method} request may not carry a body",
            hint="send it without Content-Length or Transfer-Encoding (RFC 9110 9.3.1), or with another method (POST)",
        )
    if "://" in request.raw_path.partition("?")[0]:  # the target as sent (aiohttp's request.url is always absolute)
        raise BadRequest("absolute-form request targets are not accepted here")
    codings = [c.strip().lower() for v in request.headers.getall("Transfer-Encoding", ()) for c in v.split(",")]
    if request.version < (1, 1) and "chunked" in codings:
        raise BadRequest("chunked transfer coding is not allowed with HTTP/1.0")
    if any(coding != "chunked" for coding in codings):  # llhttp lets `gzip, chunked` through
        raise TransferCodingNotImplemented(
            "only the chunked transfer coding is accepted",
            hint=f"Transfer-Encoding: {', '.join(codings)}; the body would reach the backend still coded",
        )
    unmet = [member for member in expectations(request.headers) if member != CONTINUE]
    if unmet:
        raise ExpectationFailed(
            f"Expect: {unmet[0][:64]!r} cannot be met; only 100-continue is",
            hint="the device may send the request again without that Expect member",
        )


def _begin(live: Live, request: DeviceRequest) -> Trace:
    """A request's trace, its log context and its metrics started."""
    trace = Trace()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=trace.id)
    trace.note(method=request.method, path=logged_path(request.path), client=request.remote)
    live.metrics.begin(trace)
    return trace


def _refused(e: GatewayError, trace: Trace) -> tuple[CIMultiDict[str], bytes]:
    """A refusal noted in the trace and logged as its audit event; the answer's headers and body."""
    trace.note(refused_stage=e.stage, reason=e.reason, refusal=e.event)
    trace.detail("refused", fix=e.hint)
    if isinstance(e, KdcNotAsked):
        trace.detail(e.stage, kdc_asked=False)  # a refusal, not a request that went to the KDC (metrics)
    told = {"revocation": e.revocation} if isinstance(e, CertificateRevoked) else {}  # revoked, or status unknown
    trace.note(**told)
    log.warning(e.event, stage=e.stage, reason=e.reason, fix=e.hint, **told, **_who(trace))
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/plain; charset=utf-8"})
    headers.extend({"X-KCD-Refused-Stage": e.stage, **e.headers, **e.challenge})
    return headers, f"{e.reason}\n".encode()


def _cut(live: Live, trace: Trace) -> None:
    """A request cancelled once the stop's drain ended (`serve`) was cut by the stop, not left by its device: its
    summary line says how the drain ended (`cut`: `drain_timeout` or `second_signal`)."""
    if live.cut is not None:
        trace.note(cut=live.cut)


def _end(live: Live, trace: Trace, status: int) -> None:
    line = trace.summary(status=status)
    if path := line.get("path"):  # anyone's to write, percent-encoded (`%E2%80%AE`, `%1B`); the trace keeps it as sent
        line["path"] = printable(path)
    summary_fields("request", line)
    live.metrics.observe(trace, status)
    live.traces.record(trace, status, live.config.traces)


_NOT_FOUND = b"404: Not Found"


def own_server_handler(live: Live) -> Callable[[DeviceRequest], Awaitable[None]]:
    """The request path on `proxy.device.server`: the stages, and where a refusal becomes an answer on this server
    (`make_app`'s middleware does it on aiohttp's)."""

    async def serve_request(request: DeviceRequest) -> None:
        trace = _begin(live, request)
        status = 500
        try:
            _refuse_unnamed(request)
            _refuse_smuggling(request)
            if not request.raw_path.startswith("/"):  # `OPTIONS *`: aiohttp's router matched nothing (404)
                status = 404
                await request.answer(404, None, CIMultiDict({"Content-Type": "text/plain; charset=utf-8"}), _NOT_FOUND)
                return
            with live.use() as gw:
                await handle(gw, request, trace)
            status = request.status or 500
        except asyncio.CancelledError:
            status = 499  # the device went away first (nginx's "client closed request"), or the stop cut it
            _cut(live, trace)
            raise
        except GatewayError as e:
            status = e.status
            headers, body = _refused(e, trace)
            if request.answer_started:
                request.abort()  # too late for this answer: the connection ends
            else:
                await request.answer(e.status, None, headers, body)
        except Exception:
            log.exception("request_failed", **_who(trace))
            if request.answer_started:
                request.abort()
            else:
                headers = CIMultiDict({"Content-Type": "text/plain; charset=utf-8"})
                await request.answer(500, None, headers, b"500 Internal Server Error\n")
        finally:
            _end(live, trace, status)

    return serve_request


def make_app(live: Live) -> web.Application:
    """The gateway's application on aiohttp's server (`listener.http_server = "aiohttp"`); each request runs
    with the configuration in force when it starts."""

    @web.middleware
    async def gateway_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        device = AiohttpRequest(request, stopping=lambda: live.stopping)
        request[DEVICE_KEY] = device
        trace = _begin(live, device)
        request[TRACE_KEY] = trace
        status = 500
        try:
            _refuse_unnamed(device)
            _refuse_smuggling(device)
            response = await handler(request)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the device went away first (nginx's "client closed request"), or the stop cut it
            _cut(live, trace)
            raise
        except web.HTTPException as e:  # aiohttp's own answers (`OPTIONS *` matches no route: 404)
            status = e.status
            raise
        except GatewayError as e:
            status = e.status
            headers, body = _refused(e, trace)
            response = web.Response(status=e.status, body=body)
            response.headers.extend(headers)
            if request.content.exception() is not None:
                await _answer_and_close(request, response)
            return response
        finally:
            _end(live, trace, status)

    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        device = request[DEVICE_KEY]
        with live.use() as gw:
            await handle(gw, device, request[TRACE_KEY])
        assert device.response is not None  # the backend stage answers, or raises
        return device.response

    app = web.Application(middlewares=[gateway_middleware], client_max_size=live.config.listener.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", proxy_handler, expect_handler=defer_continue)
    return app


async def _answer_and_close(request: web.Request, response: web.Response) -> None:
    """A refusal of a request whose body failed (its framing refused on a later read, `proxy.tls.limits`): written
    here, and the connection closed after it, as the own server does. Left to aiohttp, its lingering close would read
    the failed body again after the answer, get the same error and log it as "Unhandled exception" with a
    traceback."""
    response.force_close()  # Connection: close
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()  # no lingering read; what was written is flushed before the TLS close


async def _aiohttp_server(live: Live) -> web.AppRunner:
    """aiohttp's server for the request path (`listener.http_server = "aiohttp"`), set up."""
    runner = web.AppRunner(
        make_app(live),
        access_log=logging.getLogger("aiohttp.access"),  # only for `unparsed_requests`: no access log is written
        access_log_class=unparsed_requests(live),
        handle_signals=False,
        # at the stop (`serve`): a request in flight gets this long to finish, then it is cancelled (aiohttp reads 0
        # as no limit at all, so "cut at once" is a millisecond)
        shutdown_timeout=live.config.listener.drain_timeout or 0.001,
        keepalive_timeout=live.config.listener.keepalive_timeout,
        handler_cancellation=True,
        max_field_size=MAX_FIELD_BYTES,
        auto_decompress=False,  # a proxy passes bodies on as sent: codings and lengths are the backend's to read
    )
    await runner.setup()
    return runner


DRAIN_POLL = 0.05  # seconds between two looks at what a stopping gateway still holds
UNUSED_GRACE = 1.0  # seconds a connection that had no request yet when the stop came is given to send its first
# A worker of several gets one stop's signal twice when it is sent to the process group (Ctrl-C in a terminal) or
# cgroup (systemd's default KillMode=control-group): from its sender, and as the supervisor passes it on, and that
# second one cut its requests in flight at once. The passed-on copy comes as a signal of its own (`PASSED_ON`): one of
# each kind is one stop, however late the supervisor; a second of either kind is the stop asked again (Ctrl-C again).
# The worker cannot tell one stop sent to every process from two (itself alone, then the gateway): the words say both.
_EITHER_STOP = (
    "the same stop if it was sent to every process (Ctrl-C in a terminal, KillMode=control-group), else {later};"
    " either way the drain goes on, and one more stop cuts it"
)
STOP_AGAIN_DETAIL = {
    True: "the supervisor passed on a stop after this worker was sent one directly: "
    + _EITHER_STOP.format(later="the gateway's stop after this worker's own"),
    False: "this worker was sent a stop directly after the supervisor passed one on: "
    + _EITHER_STOP.format(later="one sent to this worker after the gateway's stop"),
}


async def drain(
    connections: set[DeviceConnection], slots: ConnectionSlots, seconds: float, hurry: asyncio.Event
) -> str:
    """Theory of operation: the stop of a gateway in a pool (SIGTERM: a rolling restart, `systemctl stop`, a pod
    deleted). The listening sockets are closed already, so a balancer's next connection here is refused and sent to
    another gateway (HAProxy's `option redispatch`), and /readyz answers 503 (`Live.stopping`); what the kernel had
    queued on them was accepted first (`accept_queued`) and is drained here with the rest. What the gateway holds
    is let go rather than cut: a connection between two requests is closed now; one serving a request answers it with
    `Connection: close`, then closes (`DeviceConnection.wind_down`); one whose handshake had just ended, or whose
    request head is still coming, gets UNUSED_GRACE to send it, and so does a TLS handshake or PROXY header under way
    (counted in `slots`): past it they are a slow client's, cut with the rest. Returns once every device connection
    owes its device nothing (closed, its answers handed to the kernel), after `seconds` (`listener.drain_timeout`),
    or at once when `hurry` is set (a second signal): what is still open then (a held ActiveSync Ping, a long
    download) is cut by the caller, as every connection was before the drain existed. Returns how it ended:
    "finished", "drain_timeout" or "second_signal"."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not hurry.is_set():
        if loop.time() - started >= seconds:
            return "drain_timeout"
        unused_too = loop.time() - started >= UNUSED_GRACE
        owing = [c for c in list(connections) if not c.wind_down(unused_too=unused_too)]
        if not owing and (slots.connections <= len(connections) or unused_too):  # a handshake: UNUSED_GRACE too
            return "finished"
        await asyncio.sleep(DRAIN_POLL)
    return "second_signal"


async def _first_requests(handlers: web.Server, slots: ConnectionSlots, seconds: float, hurry: asyncio.Event) -> None:
    """aiohttp's server, before its shutdown (`_hurried`), which closes at once a connection whose request has not
    come and drops what any connection reads after it: a connection still in its handshake or waiting for its first
    request is given UNUSED_GRACE (`seconds` if less) to send it, as `drain` gives one on the own server (a connection
    the kernel had queued for a worker that stops, `accept_queued`, is one: under load, some were closed unanswered);
    a request whose body is still coming (an upload, a `100 Continue` one) is given `seconds` for it, as `drain` waits
    for a request in flight. None after a second signal."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    grace, until = now + min(UNUSED_GRACE, seconds), now + seconds
    while not hurry.is_set() and loop.time() < until:
        first = loop.time() < grace and (
            slots.connections > len(handlers.connections) or awaiting_first_request(handlers.connections)
        )
        if not first and not receiving_body(handlers.connections):
            return
        await asyncio.sleep(DRAIN_POLL)


async def _hurried(cleanup: Awaitable[None], hurry: asyncio.Event, seconds: float) -> str:
    """aiohttp's runner cleanup (its drain), cancelled after `seconds` or when `hurry` is set first. Returns how it
    ended, as `drain` does. The bound is ours, not only its shutdown_timeout: aiohttp waits that long for a request's
    handler, then as long again for the handler it cancelled, which a handler waiting on its backend (a held Ping)
    does not notice (its payload is cancelled, not its task): a drain took twice drain_timeout (40 s at the default,
    past systemd's 30 s)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    work = asyncio.ensure_future(cleanup)
    second = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({work, second}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if work.done():
        work.result()
        return "drain_timeout" if loop.time() - started >= seconds else "finished"
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return "second_signal" if hurry.is_set() else "drain_timeout"


async def _start_up(gw: Gateway) -> None:
    """What a gateway awaits before it listens: its CRL URLs fetched once (then refreshed), and which of the realm's
    KDCs answer (`proxy.kerberos.kdcs`)."""
    await gw.revocation.start()
    await gw.delegator.watch_kdcs()


def _stopped(loop: asyncio.AbstractEventLoop, numbers: list[int]) -> None:
    """`stopped`, and from now on the stop signals and SIGHUP ignored: nothing is left to stop or reload, and the
    process ends (`proxy.workers.end_process`). Given back their default (asyncio's `remove_signal_handler`), one that
    came after (a process manager repeating SIGTERM, Ctrl-C held down, the supervisor's copy of a later stop) ended the
    process by the signal (-15; SIGINT a KeyboardInterrupt, -2, with tracebacks), some before `stopped` was written,
    and left its krb5.conf overlay (docs/hardening.md 68). asyncio gives no way to ignore a signal it handles but
    through its default: the microsecond between the two calls stays."""
    for number in numbers:
        loop.remove_signal_handler(number)
        signal.signal(number, signal.SIG_IGN)
    log.info("stopped")


async def _unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """`work` awaited, unless `stop` is set first: then it is cancelled, and False. A SIGTERM while the gateway starts
    (a CRL URL whose server never answers: `FETCH_TIMEOUT`, 10 s) waited for the start to end, then opened the
    listener, and only then stopped."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


def _unparsed(live: Live, remote: str | None, status: int) -> None:
    """The summary line and metrics of a request the server could not parse (what went wrong was logged)."""
    trace = Trace()
    live.metrics.begin(trace)
    trace.note(method=None, path=None, client=remote)
    trace.note(refused_stage="request", refusal="request_unparsed", reason="the request could not be parsed")
    structlog.contextvars.clear_contextvars()
    summary_fields("request", trace.summary(status=status))
    live.metrics.observe(trace, status)


def unparsed_requests(live: Live) -> type[AbstractAccessLogger]:
    """aiohttp's access-log hook, used for the requests aiohttp answers itself before any middleware runs (a
    request line or header field it cannot parse, or one too long: 400). They get the summary line and the
    metrics every other request gets, with the status the client got (what went wrong is the
    `aiohttp.server` line before it); the rest were logged by the middleware and are skipped here."""

    class UnparsedRequests(AbstractAccessLogger):
        def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
            if TRACE_KEY in request:  # the middleware saw it
                return
            _unparsed(live, request.remote, response.status)

    return UnparsedRequests


def _who(trace: Trace) -> dict[str, object]:
    keys = ("cert_subject", "cert_issuer", "cert_serial", "upn", "principal", "route", "spn")
    return {k: trace.facts[k] for k in keys if k in trace.facts}


def _descriptor_budget(config: Config, sockets: int) -> DescriptorBudget:
    """This worker's file descriptors shared out (`proxy.descriptors`) for a listener on `sockets` listening sockets,
    logged; a warning where the open-file limit cannot hold `listener.max_connections`, and a ConfigError where it
    cannot hold `kerberos.max_in_flight`'s KDC threads."""
    max_connections = config.listener.max_connections
    budget = DescriptorBudget.of(max_connections, config.kerberos.max_in_flight, sockets=sockets)
    if problem := kdc_reserve_problem(config.kerberos.max_in_flight, budget.limit):
        raise ConfigError([f"{problem} (in {config.path})"])
    figures = {
        "limit": budget.limit,
        "reserved": budget.reserve,
        "device_connections": budget.device,
        "backend_connections": budget.backend,
    }
    if budget.cut:
        log.warning(
            "descriptor_limit_low",
            **figures,
            max_connections=max_connections,
            fix=f"the open-file limit ({budget.limit}) holds {budget.device} device connections with a backend "
            f"connection each, not listener.max_connections = {max_connections}: raise it to {budget.needed} "
            "(LimitNOFILE= in the systemd unit, ulimit -Hn, the container's nofile), or lower max_connections",
        )
    else:
        log.info("descriptor_budget", **figures)
    return budget


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    worker: Worker | None = None,
    shared: SharedTable | None = None,
    crls_vetted: Collection[Path] = (),
) -> None:
    """Run the gateway until `stop` is set or the process gets SIGTERM/SIGINT; SIGHUP reloads (`proxy.live`).
    `worker`: this process is one of `listener.workers` (`proxy.workers`), whose admin listener answers for all;
    `shared`: the table its siblings count Basic failures in (`proxy.auth.shared`); `crls_vetted`: in a replacement
    worker, the CRL files the gateway's start vetted (`build`; `Worker.beside`: one that refuses them)."""
    remove_stale_overlays()  # krb5.conf overlays of gateways killed outright (proxy.kerberos.profile)
    listener = config.listener
    try:  # one listening socket (and accept loop) for each: the descriptors past the cap are counted per socket
        addresses = listen_addresses(listener.host, listener.port)
    except OSError as e:
        raise ConfigError(
            [
                f"listener.bind: cannot listen on {listener.host}:{listener.port}: "
                f"{cannot_bind('listener.bind', e)} (in {config.path})"
            ]
        ) from None
    budget = _descriptor_budget(config, len(addresses))  # before anything starts: it may refuse max_in_flight
    live = Live.start(
        config,
        shared=shared,
        crls_vetted=crls_vetted,
        descriptors=budget,
        beside=worker is not None and worker.beside,
        kept=worker.kept_crls if worker is not None else None,
    )
    live.reloaded_to = worker.reloaded if worker is not None else None  # a replacement serves it if the file is bad
    gw = live.gateway
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    came: list[signal.Signals] = []  # the signal that asked for the stop: /readyz and the `stopping` line name it
    passed: list[bool] = []  # for each, whether the supervisor passed it on (`PASSED_ON`), not its sender directly
    stop_signals: list[tuple[int, bool, signal.Signals]] = [
        (sig, False, sig) for sig in (signal.SIGTERM, signal.SIGINT)
    ]
    stop_signals += (
        [(PASSED_ON[sig], True, sig) for sig in (signal.SIGTERM, signal.SIGINT)] if worker is not None else []
    )

    def stop_on(sig: signal.Signals, by_supervisor: bool) -> None:
        came.append(sig)
        passed.append(by_supervisor)
        stop.set()

    for number, by_supervisor, sig in stop_signals:
        loop.add_signal_handler(number, stop_on, sig, by_supervisor)
    slots = ConnectionSlots(budget.device, on_wait=live.metrics.connection_waits.inc)
    live.metrics.accepted_connections = lambda: slots.connections
    live.metrics.connection_limit = budget.device
    live.metrics.backend_sockets = lambda: live.gateway.pools.sockets
    per_address = listener.max_connections_per_address
    cap = AddressCap(per_address, on_refused=live.metrics.address_connections_refused) if per_address else None
    if not await _unless_stopped(_start_up(gw), stop):  # SIGTERM while starting: nothing to drain, no listener opened
        log.info("stopping", drain_timeout=listener.drain_timeout, signal=came[0].name if came else None, starting=True)
        await live.close()
        live.traces.close()
        log.info("drained", outcome="finished", seconds=0.0, cut=0)
        _stopped(loop, [number for number, _, _ in stop_signals])
        return
    if worker is not None and worker.beside:  # its CRL URLs, now fetched once, as `build` did its files
        try:
            _refuse_behind_floors(config, gw.revocation, urls=True)
        except ConfigError:
            await live.close()
            live.traces.close()
            raise
    runner: web.AppRunner | None = None
    connections: set[DeviceConnection] = set()
    handler: Callable[[], asyncio.Protocol]
    if listener.http_server == "aiohttp":
        runner = await _aiohttp_server(live)
        assert runner.server is not None
        handlers = runner.server
        live.metrics.open_connections = lambda: len(handlers.connections)
        idle = IdleKeepAlives(
            lambda: idle_handlers(handlers.connections, quiet=False), lambda: idle_handlers(handlers.connections)
        )

        def handler() -> asyncio.Protocol:
            """aiohttp's request handler for a new connection, its header block capped (431 beyond)."""
            protocol = handlers()
            limit_header_block(protocol, listener.max_header_bytes, live.metrics.headers_refused)
            return protocol

    else:
        live.metrics.open_connections = lambda: len(connections)
        idle = IdleKeepAlives(lambda: idle_connections(connections, quiet=False), lambda: idle_connections(connections))
        limits = DeviceLimits(
            listener.max_header_bytes, MAX_FIELD_BYTES, listener.keepalive_timeout, listener.client_send_timeout
        )
        handler = connection_factory(
            own_server_handler(live),
            limits,
            on_headers_refused=live.metrics.headers_refused,
            on_unparsed=lambda remote, status: _unparsed(live, remote, status),
            connections=connections,
        )

    slots.idle = idle  # at the cap, an idle keep-alive gives way to a new device (proxy.tls.limits.IdleKeepAlives)
    live.metrics.idle_connections = idle.count
    live.metrics.reclaimed_connections = lambda: idle.reclaimed
    tls_gate = gate_factory(
        handler,
        lambda: live.ssl_context,
        listener.handshake_timeout,
        on_refused=live.metrics.handshake_refused,
        on_empty=live.metrics.empty_connections.inc,
        on_health_check=live.metrics.health_checks.inc,
    )
    factory: Callable[[Callable[[], None]], asyncio.Protocol] = tls_gate
    if listener.proxy_protocol:  # behind a balancer: its PROXY header first, then TLS
        factory = proxy_protocol.gate_factory(  # the balancers are asked per connection: a reload applies them
            tls_gate,
            lambda: live.balancers,
            listener.handshake_timeout,
            live.metrics.proxy_header_refused,
            on_empty=live.metrics.empty_connections.inc,
            cap=cap,  # the device's address, from the header: every connection comes from the balancer's
        )
    # each worker process binds the port (SO_REUSEPORT when there are several); the kernel spreads connections
    try:
        sockets = listen_sockets(addresses, reuse_port=listener.workers > 1, backlog=BACKLOG)
    except OSError as e:  # taken (several workers: the supervisor's check said so before), or not ours to bind
        raise ConfigError(
            [
                f"listener.bind: cannot listen on {listener.host}:{listener.port}: "
                f"{cannot_bind('listener.bind', e)} (in {config.path})"
            ]
        ) from None
    direct_cap = None if listener.proxy_protocol else cap
    header_first = listener.proxy_protocol  # at the cap, no idle keep-alive closed before the header is read
    accepting = [
        loop.create_task(accept_connections(sock, factory, slots, direct_cap, header_first=header_first))
        for sock in sockets
    ]
    if worker is not None:  # counted as serving by the supervisor from now on (`proxy.workers._serving`)
        worker.listens()
    log.info(
        "listening",
        bind=host_port(listener.host, listener.port),
        routes=[r.prefix for r in config.routes],
        event_loop=type(loop).__module__.partition(".")[0],  # the loop really running: "asyncio" or "uvloop"
        http_server=listener.http_server,
    )
    # What start-up built (libraries, trust list, CRLs, routes) lives as long as the process: out of the
    # collector's sight, full collections stop walking it (they were 6% of the CPU under load: bench/run.py).
    gc.freeze()
    admin = None
    watcher = loop.create_task(live.watch()) if config.reload.watch else None
    try:
        admin = await start_admin(live, worker)
        # SIGHUP reloads from here on, once nothing above still awaits the gateway start-up built: a reload retires
        # that gateway and closes what it owns, and start-up awaiting its first CRL fetch got CancelledError, which
        # ended the process (a worker exiting 1 that way stopped them all: proxy.workers). Until here, a SIGHUP is
        # remembered (`remember_reload`: `kcd-proxy run`, proxy.workers) and the reload it asked for runs now.
        loop.add_signal_handler(signal.SIGHUP, live.reload_soon)
        if reload_asked_while_starting():
            live.reload_soon()
        await stop.wait()
    finally:
        by = came[0].name if came else None  # None: `stop` set by the caller, not by a signal
        log.info("stopping", drain_timeout=listener.drain_timeout, signal=by)
        live.begin_stop(by)  # /readyz: 503 from now on (the admin listener answers through the drain); no reload
        hurry = asyncio.Event()  # a second SIGTERM or SIGINT (Ctrl-C again): what the drain still waits for is cut
        seen = {passed[0]} if passed else {False, True}  # the kinds this stop came as (none: any signal hurries)

        def second_signal(by_supervisor: bool) -> None:
            if by_supervisor in seen:
                hurry.set()
            else:
                seen.add(by_supervisor)
                log.info("stop_signal_again", passed_on=by_supervisor, detail=STOP_AGAIN_DETAIL[by_supervisor])

        for by_supervisor in passed[1:]:  # taken as the stop began (`stop_on`)
            second_signal(by_supervisor)
        for number, by_supervisor, _ in stop_signals:
            loop.add_signal_handler(number, second_signal, by_supervisor)
        if watcher is not None:
            watcher.cancel()
        for task in accepting:
            task.cancel()
        # the connections the kernel queued for this worker are taken and drained, then the sockets closed: the next
        # connection is refused (a balancer sends it to another gateway), or goes to a sibling worker
        queued = [c for sock in sockets for c in accept_queued(sock, slots, direct_cap)]
        if worker is not None:  # no longer counted as serving by the supervisor, though it drains (`proxy.workers`)
            worker.stops_listening()
        for conn, give_back in queued:
            await serve_accepted(loop, factory, conn, give_back)
        drain_started = loop.time()
        if runner is not None:  # aiohttp's own drain, up to its shutdown_timeout (listener.drain_timeout)
            assert runner.server is not None
            await _first_requests(runner.server, slots, listener.drain_timeout, hurry)
            left = listener.drain_timeout - (loop.time() - drain_started)
            outcome = await _hurried(runner.cleanup(), hurry, max(left, 0.0))
        else:
            outcome = await drain(connections, slots, listener.drain_timeout, hurry)
        cut = live.metrics.in_flight()[0]  # requests still in flight: cut now (each one's line says `cut`)
        if outcome != "finished":
            live.cut = outcome
        log.info("drained", outcome=outcome, seconds=round(loop.time() - drain_started, 3), cut=cut)
        if runner is not None and runner.server is not None:  # what aiohttp's cancelled cleanup left open
            for protocol in list(runner.server.connections):
                protocol.force_close()
        if admin is not None:
            await admin.cleanup()
        close_all(connections)
        await live.close()
        live.traces.close()
        _stopped(loop, [*(number for number, _, _ in stop_signals), signal.SIGHUP])
