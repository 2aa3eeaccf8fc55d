"""Wiring: configuration to a running gateway.

`build` loads what the configuration names (trust list, CRLs, Kerberos credentials) and fails with a
`ConfigError` naming the key when something is unusable. `serve` runs the listener until SIGTERM or
SIGINT. The middleware here is the one place where a refusal becomes a response, an audit event and
the request's summary line.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiohttp import web
from cryptography import x509

from proxy.backend.forward import Pools
from proxy.certs.chain import TrustList
from proxy.certs.revocation import CrlSet, load_crls
from proxy.config import Config
from proxy.errors import BadRequest, ConfigError, GatewayError
from proxy.kerberos.delegate import Delegator
from proxy.observability.trace import Trace
from proxy.pipeline import Gateway, handle
from proxy.tls.server import gate_factory, server_context

log = structlog.get_logger("proxy")
TRACE_KEY = web.RequestKey("trace", Trace)


def build(config: Config) -> Gateway:
    cc = config.client_certificates
    problems: list[str] = []
    try:
        trust = TrustList.load(cc.trust_anchors, cc.intermediates)
    except (ValueError, OSError) as e:
        raise ConfigError([f"client_certificates.trust_anchors: {e} (in {config.path})"]) from None
    loaded: list[tuple[str, x509.CertificateRevocationList]] = []
    for i, path in enumerate(cc.crls):
        try:
            loaded.extend((str(path), crl) for crl in load_crls(path))
        except (ValueError, OSError) as e:
            problems.append(f"client_certificates.crls[{i}]: {path}: {e} (in {config.path})")
    if problems:
        raise ConfigError(problems)
    crls, crl_problems = CrlSet.build(loaded, trust, at=datetime.now(UTC))
    for problem in crl_problems:
        log.warning("crl_not_used", problem=problem)
    if cc.revocation == "off":
        log.warning("revocation_off", detail="client certificates are not checked against any CRL")
    return Gateway(config=config, trust=trust, crls=crls, delegator=Delegator(config.kerberos), pools=Pools())


def _refuse_smuggling(request: web.Request) -> None:
    """Shapes aiohttp lets through that a gateway must not forward."""
    if request.url.is_absolute() and request.message.url.is_absolute():
        raise BadRequest("absolute-form request targets are not accepted here")
    if request.version < (1, 1) and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        raise BadRequest("chunked transfer coding is not allowed with HTTP/1.0")


def make_app(gw: Gateway) -> web.Application:
    @web.middleware
    async def gateway_middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        trace = Trace()
        request[TRACE_KEY] = trace
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=trace.id)
        trace.note(method=request.method, path=request.path, client=request.remote)
        status = 500
        try:
            _refuse_smuggling(request)
            response = await handler(request)
            status = response.status
            return response
        except GatewayError as e:
            status = e.status
            trace.note(refused_stage=e.stage, reason=e.reason)
            log.warning(e.event, stage=e.stage, reason=e.reason, fix=e.hint, **_who(trace))
            return web.Response(
                status=e.status,
                text=f"{e.reason}\n",
                headers={"X-KCD-Refused-Stage": e.stage, **e.headers},
            )
        finally:
            log.info("request", status=status, **trace.summary())

    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        return await handle(gw, request, request[TRACE_KEY])

    app = web.Application(middlewares=[gateway_middleware], client_max_size=gw.config.listener.max_body_bytes)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


def _who(trace: Trace) -> dict[str, object]:
    keys = ("cert_subject", "cert_issuer", "cert_serial", "upn", "principal", "route", "spn")
    return {k: trace.facts[k] for k in keys if k in trace.facts}


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Run the gateway until `stop` is set or the process gets SIGTERM/SIGINT."""
    gw = build(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        make_app(gw),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=config.listener.keepalive_timeout,
        handler_cancellation=True,
        max_field_size=96 * 1024,
    )
    await runner.setup()
    assert runner.server is not None
    ctx = server_context(config)
    listener = config.listener
    server = await loop.create_server(
        gate_factory(runner.server, ctx, listener.handshake_timeout),
        listener.host,
        listener.port,
        reuse_address=True,
        backlog=1024,
    )
    log.info("listening", bind=f"{listener.host}:{listener.port}", routes=[r.prefix for r in config.routes])
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        server.close()
        await runner.cleanup()
        await gw.pools.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")
