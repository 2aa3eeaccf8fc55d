"""The admin listener: health, readiness and metrics of the running gateway.

Off by default; `[admin] bind = "127.0.0.1:9443"` turns it on, as plain HTTP on loopback. Bound anywhere
else, the configuration requires TLS (`admin.certificate`, `admin.private_key`) and client certificates
(`admin.client_ca`) from an allow-list (`admin.allowed_clients`: subjects in RFC 4514 form or SHA-256
fingerprints); TLS can be set on loopback too.

- `GET /healthz`: 200 while the process serves; says which configuration generation is in force.
- `GET /readyz`: 200 when the gateway can serve, 503 otherwise, with the reasons as JSON: the KDC answers
  and accepts the gateway's key (an AS exchange and a ticket to itself, at most every
  `READY_CACHE_SECONDS`), and, unless revocation is off, every CRL is current.
- `GET /metrics`: Prometheus text format (`proxy.observability.metrics`).
- `GET /traces?limit=N`, `GET /` and `GET /trace/<id>`: recent requests' traces as JSON, a page listing
  them, and one drawn as a sequence diagram (`proxy.observability.tracepage`).

`make_admin_app(live)` builds the aiohttp application; `live` (`app[LIVE_KEY]`) is the running gateway's
state, so other views (traces, say) add their routes to the same application.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import structlog
from aiohttp import web
from cryptography import x509

from proxy.config import Admin
from proxy.errors import ConfigError, GatewayError
from proxy.live import Live
from proxy.observability.metrics import CONTENT_TYPE
from proxy.observability.tracepage import add_trace_views

log = structlog.get_logger("proxy.admin")
LIVE_KEY = web.AppKey("live", Live)
READY_CACHE_SECONDS = 10.0


class Readiness:
    """Whether the KDC answers, remembered for READY_CACHE_SECONDS so probes do not load the KDC."""

    def __init__(self, live: Live, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._live = live
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: tuple[float, str | None] | None = None

    async def kdc_problem(self) -> str | None:
        async with self._lock:
            if self._last is not None and self._clock() - self._last[0] < READY_CACHE_SECONDS:
                return self._last[1]
            problem = await self._probe()
            self._last = (self._clock(), problem)
            return problem

    async def _probe(self) -> str | None:
        from proxy.kerberos.probe import KerberosProbe

        settings = self._live.config.kerberos
        try:
            await asyncio.wait_for(asyncio.to_thread(KerberosProbe(settings).self_ticket), settings.kdc_timeout)
        except TimeoutError:
            return f"no answer from the KDC within {settings.kdc_timeout:g} s"
        except GatewayError as e:
            return f"{e.reason} ({e.hint})" if e.hint else e.reason
        return None


def crl_problems(live: Live, now: datetime) -> list[str]:
    """Why the CRLs are not current (nothing when revocation is off)."""
    if live.config.client_certificates.revocation == "off":
        return []
    reports = live.gateway.revocation.status()
    if not reports:
        return ["no CRL source is configured"]
    problems = []
    for crl in reports:
        if not crl.current:
            stale = f"stale since {crl.next_update.isoformat()}" if crl.next_update else "no usable CRL"
            problems.append(f"{crl.source}: {stale}" + (f" ({crl.last_error})" if crl.last_error else ""))
    return problems


READINESS_KEY = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    live = request.app[LIVE_KEY]
    return web.json_response({"status": "ok", "generation": live.generation, "loaded_at": live.loaded_at.isoformat()})


async def readyz(request: web.Request) -> web.Response:
    live = request.app[LIVE_KEY]
    kdc = await request.app[READINESS_KEY].kdc_problem()
    crls = crl_problems(live, datetime.now(UTC))
    ready = kdc is None and not crls
    body = {"ready": ready, "kdc": kdc or "ok", "crls": crls or "ok", "generation": live.generation}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[LIVE_KEY].metrics.render(), headers={"Content-Type": CONTENT_TYPE})


def make_admin_app(live: Live) -> web.Application:
    """The admin application over the running gateway's state; other views add their routes to it."""
    admin = live.config.admin
    allowed = admin.allowed_clients if admin is not None else ()
    app = web.Application(middlewares=[_allow_list(allowed)] if allowed else [])
    app[LIVE_KEY] = live
    app[READINESS_KEY] = Readiness(live)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_trace_views(app, live.traces)
    return app


def admin_ssl_context(admin: Admin) -> ssl.SSLContext | None:
    if admin.certificate is None or admin.private_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(admin.certificate, admin.private_key)
    if admin.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=admin.client_ca)
    return ctx


def _allow_list(allowed: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    names: list[x509.Name] = []
    fingerprints: set[str] = set()
    for entry in allowed:
        if "=" in entry:
            names.append(x509.Name.from_rfc4514_string(entry))
        else:
            fingerprints.add(entry.replace(":", "").lower())

    @web.middleware
    async def allow_list(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if der:
            cert = x509.load_der_x509_certificate(der)
            if cert.subject in names or hashlib.sha256(der).hexdigest() in fingerprints:
                return await handler(request)
            log.warning("admin_refused", stage="admin", subject=cert.subject.rfc4514_string(), path=request.path)
        raise web.HTTPForbidden(text="this client certificate is not on the admin allow-list\n")

    return allow_list


async def start_admin(live: Live) -> web.AppRunner | None:
    """Serve the admin application on `[admin] bind`, if set; the caller cleans the runner up."""
    admin = live.config.admin
    if admin is None:
        return None
    runner = web.AppRunner(make_admin_app(live), access_log=None, handle_signals=False)
    await runner.setup()
    # Several workers each serve the admin port too (SO_REUSEPORT): each scrape reaches one of them.
    shared = live.config.listener.workers > 1
    site = web.TCPSite(runner, admin.host, admin.port, ssl_context=admin_ssl_context(admin), reuse_port=shared)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            [f"admin.bind: cannot listen on {admin.host}:{admin.port}: {e.strerror} (in {live.config.path})"]
        ) from None
    log.info("admin_listening", bind=f"{admin.host}:{admin.port}", tls=admin.tls)
    return runner
