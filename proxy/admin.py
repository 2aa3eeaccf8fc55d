"""The admin listener: health, readiness and metrics of the running gateway.

Off by default; `[admin] bind = "127.0.0.1:9443"` turns it on, as plain HTTP on loopback. Bound anywhere
else, the configuration requires TLS (`admin.certificate`, `admin.private_key`) and client certificates
(`admin.client_ca`) from an allow-list (`admin.allowed_clients`: subjects in RFC 4514 form or SHA-256
fingerprints); TLS can be set on loopback too.

Without client certificates (loopback), every request must name the listener by a loopback name in its `Host`
(`127.0.0.1`, `[::1]`, `localhost`, or the bind's own host), else it gets 421. Loopback alone does not keep a
browser out: a page whose DNS name an attacker re-points at 127.0.0.1 (DNS rebinding) runs in the admin's
browser on this machine and could read the traces (who signed in, from which address, which paths); its
requests carry the attacker's name as `Host`. The name in `Host` is compared, never resolved.

- `GET /healthz`: 200 while the process serves; says which configuration generation is in force.
- `GET /readyz`: 200 when the gateway can serve, 503 otherwise, with the reasons as JSON: the KDC answers
  and accepts the gateway's key (an AS exchange and a ticket to itself, at most every
  `READY_CACHE_SECONDS`), and, under `revocation = "require"`, every CA has a current CRL (`crl_problems`: a stale
  source or one holding none is named in `crls` all the same, and is 503 only for a CA no other source holds a current
  CRL of). Under "best-effort" a stale
  CRL is named in the answer's `crls` but leaves it 200: the gateway serves on (its CA's certificates as unknown),
  and a 503 took every gateway sharing that CA out of its balancer at once, the outage best-effort is there to avoid.
  503 too while the device listener is full in every worker (`listener_problem`, a `listener` key): new devices
  would wait in its listen backlog, and a balancer sends them to a gateway with room instead. Only a worker that is
  full itself asks its siblings (each up to READY_ASK_TIMEOUT, 0.5 s: below kubelet's 1 s probe timeout): one with
  room answers at once, a stuck sibling or not, and a full one as soon as a sibling says it has room; a sibling that
  does not answer is taken as having no room, and an idle keep-alive connection counts as room (`listener_problem`).
  503 too, with a `stopping` key naming the signal that came (SIGTERM or SIGINT), while the gateway drains
  (`proxy.app.drain`): a balancer checking /readyz takes it out while it finishes its requests.
  With workers, a `workers` key while fewer serve than `listener.workers` ("1 of 2 workers serve ..."), still 200:
  degraded, not unready (`workers_problem`).
- `GET /metrics`: Prometheus text format (`proxy.observability.metrics`).
- `GET /traces?limit=N`, `GET /` and `GET /trace/<id>`: recent requests' traces as JSON, a page listing
  them, and one drawn as a sequence diagram (`proxy.observability.tracepage`).

At most ADMIN_MAX_CONNECTIONS connections are open at once; past that a new one takes the place of the oldest one
past its TLS handshake and not answering a request, else the oldest still in its TLS handshake (`_evict_oldest`),
which is closed (`admin_connection_limit_reached`; `_capped`: unfinished handshakes held every place for the
handshake timeout, and a probe was refused meanwhile), and one that sends nothing for ADMIN_SILENT_SECONDS is
closed, as is one idle that long between requests (aiohttp's keep-alive, 3630 s by default) or with a request head
still unfinished after it, and a TLS handshake not done by then: connections that never send a request, or stop
half-way, can neither take the file descriptors the device listener needs nor keep the admin listener full. Nor can
one that is never silent but never done: a request's head must be whole ADMIN_SILENT_SECONDS after the connection
opened or the last answer ended (aiohttp's keep-alive timer), a body the handler leaves unread is read for at most
10 s (aiohttp's lingering close), and a connection whose answers still wait to be sent at two looks
ADMIN_SILENT_SECONDS apart, the client having taken none of their bytes in between, is cut (`admin_send_stalled`): a
client reading them a byte at a time kept its connection, and with 64 of them /readyz, for as long as it liked (a
close waits for what is unsent, so no timer of aiohttp's ended it). Progress is the bytes the client's kernel
acknowledged (TCP_INFO's `tcpi_bytes_acked`) or the write buffer shrinking: a scraper on a slow link that keeps
reading a large answer is served on, while one that reads a byte now and then takes nothing its kernel would
acknowledge (its receive window stays closed until a good part of its buffer is free) and is cut.

`make_admin_app(live)` builds the aiohttp application; `live` (`app[LIVE_KEY]`) is the running gateway's
state, so other views (traces, say) add their routes to the same application.

With `[listener] workers = N` each worker serves this port too, and whichever one a request reaches answers for
all of them: `/metrics` with a `worker` label on every sample, `/traces` and the pages with every worker's records
(`proxy.observability.siblings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import ipaddress
import itertools
import os
import socket
import ssl
import struct
import time
import weakref
from asyncio import sslproto
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.addresses import cannot_bind
from proxy.certs.chain import TrustList, load_certificates, verify_chain
from proxy.certs.sources import CrlStore, sources_from_config
from proxy.config import Admin
from proxy.errors import CertificateRejected, CertificateRevoked, ConfigError, GatewayError
from proxy.kerberos.threads import KdcThreads, NoThread
from proxy.live import Live
from proxy.observability.metrics import CONTENT_TYPE
from proxy.observability.siblings import (
    READY_ASK_TIMEOUT,
    Occupancy,
    Siblings,
    TraceSource,
    serve_siblings,
    trace_record_bytes,
)
from proxy.observability.tracepage import STYLE_SOURCE, add_trace_views
from proxy.tls.limits import listen_addresses, listen_sockets, unquote_parse_errors
from proxy.tls.server import load_ca_file, load_certificate, socket_transport
from proxy.workers import Serving, Worker

log = structlog.get_logger("proxy.admin")
LIVE_KEY = web.AppKey("live", Live)
READY_CACHE_SECONDS = 10.0
ADMIN_MAX_CONNECTIONS = 64  # open at once; probes, scrapers and an operator's browser need a few
ADMIN_SILENT_SECONDS = 10.0  # a new connection that sends nothing for this long is closed
ADMIN_QUEUED_GRACE = 1.0  # seconds a connection found queued as the listener stops has to send its request
# an idle keep-alive connection, or a request head unfinished, is closed after ADMIN_SILENT_SECONDS too (aiohttp's
# keep-alive timer runs from the connection's start and after each answer, and closes it if no whole request came)
_RUNNER_SETTINGS: dict[str, Any] = {
    "access_log": None,
    "handle_signals": False,
    "keepalive_timeout": ADMIN_SILENT_SECONDS,
}


class Readiness:
    """Whether the KDC answers, remembered for READY_CACHE_SECONDS so probes do not load the KDC. Each probe is an AS
    exchange of its own with the keytab, made through the serving `Delegator` (`Delegator.fresh_credentials`): a key
    the KDC refused (a stale keytab: the account's password was reset), whether a request or a probe offered it, is
    not offered again until the file changes, by either, nor by the other admin listener (a port and a Unix socket
    each have a `Readiness`): each offer is a bad password against the account (AD locks it), and a balancer or
    kubelet asks /readyz every few seconds; the answer meanwhile is the refusal, with its fix."""

    def __init__(self, live: Live, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._live = live
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: tuple[float, str | None] | None = None
        # one thread of its own for the probe (proxy.kerberos.threads): a KDC that never answers holds it for MIT's
        # wait (about 25 s), past kdc_timeout; the next probe then finds it held and says so, without another
        self._thread = KdcThreads(1, live.config.kerberos.kdc_timeout, "ready-kdc")

    async def kdc_problem(self) -> str | None:
        async with self._lock:
            if self._last is not None and self._clock() - self._last[0] < READY_CACHE_SECONDS:
                return self._last[1]
            problem = await self._probe()
            self._last = (self._clock(), problem)
            return problem

    def close(self) -> None:
        """Start no more probes (one still inside MIT's wait ends on its own, and never holds up an exit)."""
        self._thread.close()

    async def _probe(self) -> str | None:
        from proxy.kerberos.probe import KerberosProbe

        settings = self._live.config.kerberos
        self._thread.timeout = settings.kdc_timeout  # as reloaded
        # the gateway's delegator remembers a refused key for the request path and every probe (class docstring)
        probe = KerberosProbe(settings, source=self._live.gateway.delegator.fresh_credentials)
        try:
            await self._thread.run(probe.self_ticket)
        except TimeoutError:
            return f"no answer from the KDC within {settings.kdc_timeout:g} s"
        except NoThread:  # the probe before this one still inside MIT's wait: its caller gave up at kdc_timeout
            return f"the KDC does not answer: an earlier probe still waits for it, past {settings.kdc_timeout:g} s"
        except GatewayError as e:
            return f"{e.reason} ({e.hint})" if e.hint else e.reason
        return None


def crl_problems(live: Live, now: datetime) -> tuple[list[str], bool]:
    """Why CRLs are not current (nothing when revocation is off), and whether a CA is left without a current CRL:
    under "require" the gateway refuses the certificates it issued, under "best-effort" it serves them as unknown.

    Judged per CA (the issuer and the key that signed, as the revocation stage looks CRLs up), not per source: a source
    whose CRL is stale, or that holds none (a failed fetch, a replay refused), is named all the same, but leaves its CA
    without a current CRL only when no other source holds one. A source holding none names no CA, so it counts unless
    every configured CA (its name and key: a renewed CA is two) has a current complete CRL from another source. Before,
    one stale mirror of a CA whose current CRL a file held made every gateway reading it not ready at once, though
    each served every device right."""
    if live.config.client_certificates.revocation == "off":
        return [], False
    revocation = live.gateway.revocation
    reports = revocation.status()
    if not reports:
        return ["no CRL source is configured"], True
    held = {(crl.issuer, crl.signer_key, crl.delta) for crl in reports if crl.current}
    complete = {(crl.issuer, crl.signer_key) for crl in reports if crl.current and not crl.delta}
    every_ca = all((ca.subject.rfc4514_string(), _spki(ca)) in complete for ca in revocation.crls.trust.certificates)
    problems, missing = [], False
    for crl in reports:
        if crl.current:
            continue
        stale = f"stale since {crl.next_update.isoformat()}" if crl.next_update else "no usable CRL"
        line = f"{crl.source}: {stale}" + (f" ({crl.last_error})" if crl.last_error else "")
        if crl.issuer is None:
            covered, held_note = every_ca, "every configured CA's current CRL is held from another source"
        else:
            covered, held_note = (
                (crl.issuer, crl.signer_key, crl.delta) in held,
                "a current CRL of that CA is held from another source",
            )
        missing |= not covered
        problems.append(f"{line}; {held_note}" if covered else line)
    return problems, missing


def _spki(ca: x509.Certificate) -> bytes:
    """The CA's key as a CRL's `signer_key` holds it: after a key renewal, a CRL of the CA's name signed by its other
    key lists only what that key signed (`proxy.certs.revocation`), and speaks for none of this key's certificates."""
    return ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


READINESS_KEY = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    live = request.app[LIVE_KEY]
    return web.json_response({"status": "ok", "generation": live.generation, "loaded_at": live.loaded_at.isoformat()})


async def readyz(request: web.Request) -> web.Response:
    live = request.app[LIVE_KEY]
    kdc = await request.app[READINESS_KEY].kdc_problem()
    crls, missing = crl_problems(live, datetime.now(UTC))
    refusing = missing and live.config.client_certificates.revocation == "require"  # best-effort serves on
    tls = live.served.problem(datetime.now(UTC)) if live.served is not None else None
    siblings = request.app.get(SIBLINGS_KEY)
    workers: dict[int, Occupancy | None] = {siblings.worker.number if siblings else 0: occupancy(live)}
    if siblings is not None and listener_problem(workers) is not None:  # with room here the answer is no sibling's:
        # a hung one is asked (READY_ASK_TIMEOUT) only by a full worker, and waited for only while none has room
        workers.update(await siblings.listeners(enough=lambda figures: listener_problem({0: figures}) is None))
    listener = listener_problem(workers)
    unanswered = sorted(number for number, figures in workers.items() if figures is None)
    ready = kdc is None and not refusing and tls is None and listener is None and not live.stopping
    body: dict[str, object] = {"ready": ready, "kdc": kdc or "ok", "crls": crls or "ok"}
    if live.stopping:  # only then, as the keys below
        by = f" ({live.stopped_by})" if live.stopped_by else ""  # the signal that came, SIGTERM or SIGINT
        body["stopping"] = (
            f"the gateway is stopping{by}: it takes no new connection and finishes the requests in flight "
            f"within listener.drain_timeout ({live.config.listener.drain_timeout:g} s)"
        )
    if tls is not None:  # only then: a ready answer's body is as it was
        body["tls"] = tls
    if listener is not None:  # likewise
        body["listener"] = listener
    if unanswered:  # likewise: a hung or replaced sibling, asked for READY_ASK_TIMEOUT seconds only
        who = ", ".join(f"worker {n}" for n in unanswered)
        body["unanswered"] = f"{who} did not answer within {READY_ASK_TIMEOUT:g} s (taken as having no room)"
    short = workers_problem(siblings.worker.serving()) if siblings is not None else None
    if short is not None:  # likewise; ready all the same (`workers_problem`)
        body["workers"] = short
    body["generation"] = live.generation
    return web.json_response(body, status=200 if ready else 503)


def record_bytes(live: Live) -> int:
    """The most one trace record of a sibling's may take, as configured now (a reload may change the bounds)."""
    config = live.config
    return trace_record_bytes(config.listener.max_header_bytes, config.client_certificates.max_chain_bytes)


def occupancy(live: Live) -> Occupancy:
    """This worker's device connections that are not idle keep-alives (TLS handshakes included) and their limit in force
    (`listener.max_connections`, or what the descriptor budget holds: `proxy.descriptors`); (0, 0) before the listener
    is set up. An idle keep-alive is room: a new device takes its slot (`proxy.tls.limits.IdleKeepAlives`); they are
    counted (a scan of the worker's connections) only when the worker is full."""
    metrics = live.metrics
    taken, limit = metrics.accepted_connections(), metrics.connection_limit
    if limit > 0 and taken >= limit:
        taken -= metrics.idle_connections()
    return taken, limit


def listener_problem(workers: Mapping[int, Occupancy | None]) -> str | None:
    """Why the gateway can take no new device connection (no worker's listener known to have room), or None.
    `workers`: each worker's occupancy by number (0 alone: no workers); None for a worker that did not answer.

    A TCP balancer health-checks with /readyz to send new devices where they can be served: past its limit a listener
    stops accepting, and a device's connection waits in the listen backlog until one of the connections held (an
    ActiveSync Ping, up to an hour) closes, while /readyz said 200. Not ready while no worker has room: the kernel
    spreads new connections over the workers, and while one has room most devices still get in, which a 503 would
    have turned away; the workers fill together, as the kernel spreads them evenly. A worker that did not answer is
    no room: hung, the connections the kernel gives its socket (SO_REUSEPORT) wait in its backlog as they do in a full
    one's; being replaced, it has no socket, and every new connection goes to the full ones (before, such a worker
    was taken as having room, and a full gateway beside a hung worker said 200). An idle keep-alive connection is room
    (`occupancy`): at the cap the oldest one is closed for a new device, served at once (nginx's way); a worker is full
    when every connection is busy (a request in flight, a held long-poll, an upload, a head coming in, a TLS handshake,
    or a connection yet to send its first request)."""
    figures = list(workers.values())
    if not figures or any(f is not None and (f[1] <= 0 or f[0] < f[1]) for f in figures):
        return None
    taken = ", ".join(
        f"{'' if number == 0 else f'worker {number}: '}{f[0]} of {f[1]}"
        for number, f in sorted(workers.items())
        if f is not None
    )
    silent = ", ".join(f"worker {number}" for number, f in sorted(workers.items()) if f is None)
    return (
        f"the device listener is full ({taken} connections: listener.max_connections, or fewer where the open-file "
        f"limit holds fewer{f'; {silent} did not answer' if silent else ''}): new devices wait in the listen backlog "
        "until a connection closes or turns idle (none is idle: an idle keep-alive would be closed for a new device)"
    )


def workers_problem(serving: Serving | None) -> str | None:
    """/readyz's `workers` key, "N of M workers serve" naming the others, when fewer workers serve than the gateway was
    started with (the supervisor's count, `Worker.serving`); None when all do, or without the count.

    Degraded, not unready: the workers serving take every new connection (one not serving has no socket in the
    port's SO_REUSEPORT group, so the kernel gives it none), at a part of the capacity, and they tell /readyz when
    they are full (`listener_problem`). A 503 would take a gateway that serves out of its balancer, and every gateway
    at once where the cause is shared (a CRL URL answering an older CRL to all of them keeps each one's replacement
    out: docs/hardening.md, section 42), the outage that taking one worker's place was meant to avoid."""
    if serving is None or len(serving.numbers) >= serving.configured:
        return None
    why = []
    if serving.stopped:  # its socket still takes its part of the new connections (SO_REUSEPORT), which wait
        why.append(
            f"{_named(serving.stopped)} stopped (SIGSTOP?): the connections the kernel gives its socket wait "
            "until it is continued (SIGCONT)"
        )
    if serving.stopping:
        why.append(
            f"{_named(serving.stopping)} stopping: its listener closed, it finishes its requests in flight and "
            "ends (a replacement follows unless the gateway stops)"
        )
    if gone := [n for n in serving.missing if n not in serving.stopped and n not in serving.stopping]:
        why.append(
            f"{_named(gone)} not: being replaced, or its replacement refused its configuration and is retried "
            "every 5 s; the log's worker_not_replaced names the file and the fix"
        )
    rest = "" if serving.stopped else "; the others take every new connection"
    return f"{len(serving.numbers)} of {serving.configured} workers serve ({'; '.join(why)}){rest}"


def _named(numbers: Iterable[int]) -> str:
    return ", ".join(f"worker {n}" for n in numbers)


SIBLINGS_KEY = web.AppKey("siblings", Siblings)


async def metrics(request: web.Request) -> web.Response:
    siblings = request.app.get(SIBLINGS_KEY)
    body = request.app[LIVE_KEY].metrics.render() if siblings is None else await siblings.metrics()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def make_admin_app(
    live: Live, siblings: Siblings | None = None, *, unix: bool = False, crls: AdminCrls | None = None
) -> web.Application:
    """The admin application over the running gateway's state (and, for a worker, its siblings'); other views add
    their routes to it. `unix`: for the Unix socket (`admin.socket`), whose file mode is its access control.
    `crls`: `[admin] crls`, for the allow-list's revocation check."""
    admin = live.config.admin
    allowed = admin.allowed_clients if admin is not None and not unix else ()
    middlewares = [_answering, *([_allow_list(allowed)] if allowed else [])]
    if admin is not None and admin.client_ca is None and not unix:
        middlewares.append(_loopback_host(admin.host))
    app = web.Application(middlewares=middlewares)
    app[LIVE_KEY] = live
    app[READINESS_KEY] = readiness = Readiness(live)
    if crls is not None:
        app[ADMIN_CRLS_KEY] = crls

    async def close_readiness(_: web.Application) -> None:
        readiness.close()

    app.on_cleanup.append(close_readiness)
    app.on_response_prepare.append(_admin_headers)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if siblings is not None:
        app[SIBLINGS_KEY] = siblings
    add_trace_views(app, siblings or TraceSource(live.traces))
    return app


# Every admin answer's: the trace pages are HTML that shows what devices sent (paths, names), so a browser runs no
# script and loads nothing (`default-src 'none'`), takes the pages' own style by its hash only, sends the filter form
# back here only, shows them in no frame; and sniffs no type (a JSON or text answer is never read as HTML).
ADMIN_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src {STYLE_SOURCE}; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def _admin_headers(_: web.Request, response: web.StreamResponse) -> None:
    """`ADMIN_HEADERS` on every answer of the admin application: pages, JSON, /metrics, refusals and errors."""
    response.headers.update(ADMIN_HEADERS)


def admin_ssl_context(admin: Admin, config: Path) -> ssl.SSLContext | None:
    """The admin listener's TLS context, or ConfigError naming the key and the file (`config`) OpenSSL refused.
    `client_ca` is read as the device trust list's files are (`load_ca_file`): PEM or DER, as check-config and
    `AdminCrls` read it (a DER file passed both, and the listener's `cafile` then refused it at start)."""
    if admin.certificate is None or admin.private_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(ctx, "admin", admin.certificate, admin.private_key, config)
    if admin.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            load_ca_file(ctx, admin.client_ca)
        except ValueError as e:
            raise ConfigError([f"admin.client_ca: {e} (in {config})"]) from None
    return ctx


def _allow_list(allowed: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Serve a request only from a client certificate on the allow-list (its exact subject, every attribute in
    order, or its SHA-256 fingerprint) that the gateway's CRLs do not list as revoked (`admin_revocation`)."""
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
            subject = cert.subject.rfc4514_string()
            if cert.subject in names or hashlib.sha256(der).hexdigest() in fingerprints:
                own = request.app.get(ADMIN_CRLS_KEY)
                revoked = admin_revocation(request.app[LIVE_KEY], cert, None if own is None else own.store)
                if revoked is None:
                    return await handler(request)
                log.warning(
                    "admin_refused", stage="admin", reason="revoked", subject=subject, path=request.path, detail=revoked
                )
                raise web.HTTPForbidden(text=f"this admin client certificate is refused: {revoked}\n")
            log.warning("admin_refused", stage="admin", reason="not_allowed", subject=subject, path=request.path)
        raise web.HTTPForbidden(text="this client certificate is not on the admin allow-list\n")

    return allow_list


def admin_revocation(live: Live, cert: x509.Certificate, own: CrlStore | None = None) -> str | None:
    """Why the admin client certificate `cert` is revoked, per the CRLs held now (`own`: `[admin] crls`, and the
    device side's); None if none lists it.

    Theory of operation. OpenSSL verified `cert` against `admin.client_ca` in the handshake, without CRLs. Each
    request (a kept-alive connection's too) is checked here, its chain built from the CAs each CRL set may be signed
    by: `[admin] crls` against `admin.client_ca` (an operators' CA of its own), and the CRL set the device side
    reads (`client_certificates.crls`, distribution points) against the device trust list. Both are refreshed every
    `client_certificates.crl_refresh_seconds`. A certificate neither speaks for is not checked. A missing or stale
    CRL does not refuse an operator (best-effort, whatever the device side's `revocation`): the admin listener is
    where that outage is looked into (`/readyz`, the CRL metrics and log lines)."""
    now = datetime.now(UTC)
    gateway = live.gateway
    sets = [] if own is None else [(own.trust, own.current)]
    if live.config.client_certificates.revocation != "off":
        sets.append((gateway.trust, gateway.revocation.crls.current))
    for trust, crls in sets:
        try:
            verified = verify_chain(cert, trust, at=now, purpose="any")
        except CertificateRejected:
            continue  # not under these CAs: these CRLs cannot speak for it
        try:
            crls.check(verified, at=now, policy="best-effort")
        except CertificateRevoked as e:
            return e.reason
    return None


class AdminCrls:
    """`[admin] crls`: the CRLs of `admin.client_ca`'s CAs, read at start and re-read (files) or re-fetched (URLs)
    every `client_certificates.crl_refresh_seconds`, with the device side's rules (`proxy.certs.sources`)."""

    def __init__(self, live: Live, admin: Admin) -> None:
        assert admin.client_ca is not None
        trust = _bundle_trust(load_certificates(admin.client_ca))
        refresh = live.config.client_certificates.crl_refresh_seconds
        self.store = CrlStore(trust, sources_from_config(admin.crls, admin.crl_urls), refresh_seconds=refresh)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for problem in self.store.load_files(now=datetime.now(UTC)):
            log.warning("admin_crl_problem", problem=problem)
        await self.store.refresh()
        self._task = asyncio.get_running_loop().create_task(self.store.run(self._stop))

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()


ADMIN_CRLS_KEY = web.AppKey("admin_crls", AdminCrls)


def _bundle_trust(bundle: list[x509.Certificate]) -> TrustList:
    """`admin.client_ca`, a bundle of the operators' root and intermediates, as OpenSSL reads it: its self-issued
    certificates are the anchors, the others intermediates (a bundle without a root: every one an anchor). With every
    certificate an anchor, a chain ended at the intermediate that issued it, and the root's CRL was never asked about
    that intermediate: a revoked operators' sub-CA went on admitting its operators."""
    roots = tuple(cert for cert in bundle if cert.subject == cert.issuer)
    if not roots:
        return TrustList(anchors=tuple(bundle))
    return TrustList(anchors=roots, intermediates=tuple(cert for cert in bundle if cert.subject != cert.issuer))


LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def _loopback_host(bind_host: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuse (421) a request whose `Host` is not a loopback name: see the module's docstring (DNS rebinding)."""
    allowed = LOOPBACK_NAMES | {bind_host.lower().strip("[]")}

    @web.middleware
    async def loopback_host(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is None or _is_loopback_name(host, allowed):
            return await handler(request)  # no Host at all: HTTP/1.0 from a script, never a browser
        log.warning("admin_refused", stage="admin", reason="host_not_loopback", host=host[:100], path=request.path)
        raise web.HTTPMisdirectedRequest(
            text="the admin listener answers to loopback names only (127.0.0.1, [::1], localhost)\n"
        )

    return loopback_host


def _is_loopback_name(host: str, allowed: frozenset[str]) -> bool:
    """Whether `Host` (host[:port]) names this machine by a loopback IP literal or an allowed name."""
    name = (host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]).lower()  # [::1]:9443
    if name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Refused(asyncio.Protocol):
    """A connection past ADMIN_MAX_CONNECTIONS when none open can make room for it: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


_TCP_INFO_BYTES_ACKED = struct.Struct("=Q")  # struct tcp_info's tcpi_bytes_acked (Linux 4.1 on), at this offset:
_BYTES_ACKED_AT = 120  # 8 bytes of states and flags, 23 u32 fields (rto .. total_retrans), 2 u64 pacing rates


@dataclass(frozen=True, slots=True)
class _Progress:
    """What a client had taken of a connection's answers at one look: the bytes its kernel acknowledged (TCP_INFO,
    where Linux offers it; None on a Unix socket or elsewhere) and the bytes still in the gateway's write buffer."""

    acked: int | None
    unsent: int

    @classmethod
    def of(cls, transport: asyncio.WriteTransport) -> _Progress:
        return cls(_bytes_acked(transport), transport.get_write_buffer_size())

    def moved_since(self, last: _Progress) -> bool:
        """Whether the client took bytes since `last`: its kernel acknowledged more, or the write buffer shrank (the
        kernel took bytes from it, which it does only as the client reads)."""
        return (self.acked is not None and last.acked is not None and self.acked > last.acked) or (
            self.unsent < last.unsent
        )


def _bytes_acked(transport: asyncio.BaseTransport) -> int | None:
    """The connection's `tcpi_bytes_acked` (TCP_INFO), or None where there is none (not TCP, not Linux)."""
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _BYTES_ACKED_AT + _TCP_INFO_BYTES_ACKED.size)
    except OSError:
        return None
    if len(info) < _BYTES_ACKED_AT + _TCP_INFO_BYTES_ACKED.size:
        return None  # a kernel older than tcpi_bytes_acked
    return int(_TCP_INFO_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0])


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one admin connection, counted from its creation (at accept) until the connection is
    lost, or until it is dropped unused (a TLS handshake that failed never reaches `connection_lost`)."""

    def __init__(self, inner: asyncio.Protocol, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done = weakref.finalize(self, done)
        self._transport: asyncio.WriteTransport | None = None  # once past the TLS handshake: what `evict` closes
        self._socket: asyncio.Transport | None = None  # its TCP connection, in its TLS handshake (`tls_started`)
        self._silent: asyncio.TimerHandle | None = None
        self._sending: asyncio.TimerHandle | None = None
        self._last: _Progress | None = None  # the last look's, if answers were waiting in the write buffer then
        self.heard = asyncio.Event()  # bytes received, or the connection lost: what a stopping listener awaits

    @property
    def answering(self) -> bool:
        """Whether a request of this connection is in its handler now (`_answering`)."""
        return self._transport is not None and id(self._transport) in _ANSWERING

    @property
    def handshaking(self) -> bool:
        """Whether it is still in its TLS handshake (`_AdminTls`)."""
        return self._transport is None and self._socket is not None

    def evict(self) -> None:
        """Close it now, to make room for a new connection (`_capped`): counted as gone at once. In its TLS handshake,
        its TCP connection is aborted under asyncio's TLS protocol, which then ends without a word."""
        self._done()
        if self._transport is not None:
            self._transport.abort()
        elif self._socket is not None:
            self._socket.abort()

    def tls_started(self, stream: asyncio.Transport) -> None:
        """Its TLS handshake began on `stream` (`_AdminTls`): what `evict` aborts until the handshake is done."""
        self._socket = stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.WriteTransport, transport)  # (a stream's: see below)
        self._socket = None  # asyncio's TLS protocol owns it (or it is `transport`): `evict` aborts `transport`
        # a connection that sends nothing for ADMIN_SILENT_SECONDS is closed (aiohttp would keep it for good)
        self._silent = asyncio.get_running_loop().call_later(ADMIN_SILENT_SECONDS, transport.close)
        # (uvloop's transports are not asyncio.WriteTransport subclasses; every stream transport is one in kind)
        writing = cast(asyncio.WriteTransport, transport)
        self._sending = asyncio.get_running_loop().call_later(ADMIN_SILENT_SECONDS, self._look, writing)
        self._inner.connection_made(transport)

    def _look(self, transport: asyncio.WriteTransport) -> None:
        """Cut the connection if answers waited in its write buffer at this look and the last, ADMIN_SILENT_SECONDS
        ago, and the client took none of their bytes in between (`_Progress`): it does not read them (a close waits
        for them to be sent, so not even aiohttp's keep-alive timer ends such a connection). A client that reads,
        however slowly (a scraper on a slow link reading a large /traces answer), is served on. Else look again then."""
        unsent = transport.get_write_buffer_size()
        now = _Progress.of(transport) if unsent else None
        if now is not None and self._last is not None and not now.moved_since(self._last):
            log.warning(
                "admin_send_stalled",
                unsent=unsent,
                seconds=ADMIN_SILENT_SECONDS,
                fix="the client did not read the answers: a scraper or probe this slow is stuck, and a client "
                "holding admin connections this way is cut",
            )
            transport.abort()
            return
        self._last = now
        self._sending = asyncio.get_running_loop().call_later(ADMIN_SILENT_SECONDS, self._look, transport)

    def data_received(self, data: bytes) -> None:
        self.heard.set()
        if self._silent is not None:
            self._silent.cancel()
            self._silent = None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.heard.set()
        for timer in (self._silent, self._sending):
            if timer is not None:
                timer.cancel()
        self._done()
        self._inner.connection_lost(exc)


@dataclass
class AdminListener:
    """What the admin listener started (servers, applications, a worker's answers to its siblings, the Unix socket
    files to remove); `cleanup` stops them all."""

    servers: list[asyncio.Server] = field(default_factory=list)
    runners: list[web.AppRunner] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    crls: AdminCrls | None = None
    # the admin application's listening sockets (TCP, Unix), each with the protocol factory its server serves with
    listening: list[tuple[socket.socket, Callable[[], asyncio.BaseProtocol]]] = field(default_factory=list)

    async def cleanup(self) -> None:
        """Stop serving. What the kernel had already queued on the listening sockets (a scrape, a probe: with several
        workers the port's SO_REUSEPORT group gives a closing socket's queue to no sibling, docs/operations.md) is
        accepted first and given ADMIN_QUEUED_GRACE to send its request, which aiohttp's shutdown then answers:
        closed with the socket, each was reset."""
        queued = [(conn, factory) for sock, factory in self.listening for conn in _queued(sock)]
        for server in self.servers:
            server.close()
        await _hear(queued)
        for runner in self.runners:
            await runner.cleanup()
        if self.crls is not None:
            await self.crls.close()
        for path in self.files:
            with contextlib.suppress(OSError):
                path.unlink()


def _queued(sock: socket.socket) -> list[socket.socket]:
    """The connections queued on the listening socket `sock`, accepted until none is left (at most
    ADMIN_MAX_CONNECTIONS: the cap closes the oldest for the rest anyway)."""
    taken: list[socket.socket] = []
    while len(taken) < ADMIN_MAX_CONNECTIONS:
        try:
            conn, _ = sock.accept()
        except OSError:  # BlockingIOError: none left
            break
        conn.setblocking(False)
        taken.append(conn)
    return taken


async def _hear(queued: list[tuple[socket.socket, Callable[[], asyncio.BaseProtocol]]]) -> None:
    """Serve each of `queued` (`AdminListener.cleanup`), and wait until each has received its request's bytes, or
    closed, for ADMIN_QUEUED_GRACE at most: aiohttp's shutdown closes a connection whose request has not come."""
    loop = asyncio.get_running_loop()
    counted: list[_Counted] = []
    for conn, factory in queued:
        try:
            _, protocol = await loop.connect_accepted_socket(factory, conn)
        except OSError:
            conn.close()
            continue
        inner = protocol._counted if isinstance(protocol, _AdminTls) else protocol
        if isinstance(inner, _Counted):
            counted.append(inner)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ADMIN_QUEUED_GRACE):
            await asyncio.gather(*(c.heard.wait() for c in counted))


def _capped(handlers: web.Server, context: ssl.SSLContext | None = None) -> Callable[[], asyncio.BaseProtocol]:
    """aiohttp's protocol factory, with at most ADMIN_MAX_CONNECTIONS connections open. Any local user reaches a
    loopback listener, and aiohttp keeps a connection that never sends a request open for good: without a cap, idle
    connections took the process's file descriptors from under the device listener. They are counted from the factory
    (accept), not from aiohttp's list: asyncio accepts a burst before any joins it.

    At the cap a new connection takes the place of the oldest one past its TLS handshake, which is closed: a client
    that keeps its connections busy within every timer (a request every few seconds on each, answered at once) held
    every place, and each new connection, /readyz's probe among them, was closed at once for as long as it liked. Its
    connections are now the oldest: a probe's, made and done in milliseconds, is closed only by as many new
    connections opened meanwhile. With TLS (`context`), a connection still in its handshake goes next, the oldest first
    (`_AdminTls`): ADMIN_MAX_CONNECTIONS handshakes begun and never finished held every place until the handshake
    timeout (ADMIN_SILENT_SECONDS), renewed at will, and each new connection, the probe's among them, was closed at
    once meanwhile; a probe's handshake, done in milliseconds, is now closed only by as many new connections opened
    during it. One whose request is being answered goes last (`_evict_oldest`): a flood of new connections would
    otherwise close a probe waiting for its /readyz."""
    open_: dict[int, weakref.ref[_Counted]] = {}  # by accept order, oldest first
    serials = itertools.count()
    full_since: bool = False

    def factory() -> asyncio.BaseProtocol:
        nonlocal full_since
        full = len(open_) >= ADMIN_MAX_CONNECTIONS
        if full and not full_since:
            log.warning(
                "admin_connection_limit_reached",
                limit=ADMIN_MAX_CONNECTIONS,
                detail="the oldest connections are closed to make room for new ones: idle ones first, then those "
                "still in their TLS handshake",
            )
        full_since = full
        if full and not _evict_oldest(open_):
            return _Refused()
        serial = next(serials)
        protocol = handlers()
        unquote_parse_errors(protocol)  # aiohttp's 400 would quote a bad header line back, a Cookie's included
        counted = _Counted(protocol, functools.partial(_forget, open_, serial))
        open_[serial] = weakref.ref(counted)
        return counted if context is None else _AdminTls(counted, context)

    return factory


class _AdminTls(asyncio.Protocol):
    """Takes an admin connection's TCP socket and starts its TLS handshake under asyncio's TLS protocol, after telling
    the connection's `_Counted` the socket, so that the cap can close it mid-handshake (`_Counted.evict`). Served with
    `create_server(ssl=...)`, asyncio held the socket out of reach until the handshake ended. The handshake is bounded
    by ADMIN_SILENT_SECONDS, as it was; once done, asyncio's protocol hands `_Counted` the TLS transport."""

    def __init__(self, counted: _Counted, context: ssl.SSLContext) -> None:
        self._counted = counted
        self._context = context

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Taken over here, before this returns: uvloop reads as soon as it has (see proxy.tls.server.TlsGate).
        stream = socket_transport(transport)
        tls = sslproto.SSLProtocol(
            asyncio.get_running_loop(),
            self._counted,
            self._context,
            None,  # type: ignore[arg-type]  # no waiter: nothing awaits the handshake, `_Counted` hears of its end
            server_side=True,
            ssl_handshake_timeout=ADMIN_SILENT_SECONDS,  # type: ignore[arg-type]  # typeshed says int; floats work
        )
        self._counted.tls_started(stream)
        stream.set_protocol(tls)
        tls.connection_made(stream)


def _forget(open_: dict[int, weakref.ref[_Counted]], serial: int) -> None:
    open_.pop(serial, None)


def _evict_oldest(open_: dict[int, weakref.ref[_Counted]]) -> bool:
    """Close the oldest of `open_` past its TLS handshake and not answering a request (`_Counted.evict`, which takes
    it out), else the oldest still in its handshake, else the oldest answering one; False if none is open. A probe's
    connection is not the oldest idle one while it waits for its answer: a flood of new connections (a local user's
    loop) made it the oldest within ADMIN_MAX_CONNECTIONS accepts, milliseconds, while its /readyz waited for the KDC,
    and closed it unanswered."""
    open_now = [c for ref in list(open_.values()) if (c := ref()) is not None]
    idle = (c for c in open_now if not c.handshaking and not c.answering)
    chosen = next(idle, None) or next((c for c in open_now if c.handshaking), None) or next(iter(open_now), None)
    if chosen is None:
        return False
    chosen.evict()
    return True


_ANSWERING: dict[int, int] = {}  # id() of a connection's transport -> its requests in a handler now (`_answering`)


@web.middleware
async def _answering(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Mark the request's connection as answering while its handler runs (`_Counted.answering`: the cap closes others
    first). Kept by the transport's id only while the handler runs, so an id reused later finds nothing."""
    key = id(request.transport)
    _ANSWERING[key] = _ANSWERING.get(key, 0) + 1
    try:
        return await handler(request)
    finally:
        left = _ANSWERING.pop(key) - 1
        if left:
            _ANSWERING[key] = left


async def start_admin(live: Live, worker: Worker | None = None) -> AdminListener | None:
    """Serve the admin application on `[admin] bind` and `[admin] socket`, if set (for a `worker`, answering for
    all workers, and answering its siblings on its own Unix socket); the caller cleans it up."""
    admin = live.config.admin
    if admin is None:
        return None
    started = AdminListener()
    siblings = None
    try:
        if worker is not None:
            siblings = Siblings(live.traces, worker, lambda: live.metrics.render(), lambda: record_bytes(live))
            served = await serve_siblings(worker, live.traces, lambda: live.metrics.render(), lambda: occupancy(live))
            started.runners.append(served)
            started.files.append(worker.socket)
        if admin.bound:
            if admin.crls or admin.crl_urls:
                started.crls = AdminCrls(live, admin)
                await started.crls.start()
            await _serve_bind(live, admin, siblings, worker, started)
        # One process binds a Unix socket's path: the first worker (whose number a replacement keeps) answers for all.
        if admin.socket is not None and (worker is None or worker.number == 1):
            await _serve_socket(live, admin.socket, siblings, started)
    except BaseException:
        await started.cleanup()
        raise
    return started


async def _serve_bind(
    live: Live, admin: Admin, siblings: Siblings | None, worker: Worker | None, started: AdminListener
) -> None:
    runner = web.AppRunner(make_admin_app(live, siblings, crls=started.crls), **_RUNNER_SETTINGS)
    await runner.setup()
    started.runners.append(runner)
    assert runner.server is not None
    # Several workers each serve the admin port too (SO_REUSEPORT): each scrape reaches one of them.
    shared = live.config.listener.workers > 1
    context = admin_ssl_context(admin, live.config.path)  # before the bind: OpenSSL's SSLError is an OSError too
    factory = _capped(runner.server, context)
    try:  # the sockets made here, not by create_server, so that a stop takes what is queued on them (`cleanup`)
        sockets = listen_sockets(listen_addresses(admin.host, admin.port), reuse_port=shared, backlog=100)
    except OSError as e:
        raise ConfigError(
            [
                f"admin.bind: cannot listen on {admin.host}:{admin.port}: "
                f"{cannot_bind('admin.bind', e)} (in {live.config.path})"
            ]
        ) from None
    for sock in sockets:
        started.listening.append((sock, factory))
        started.servers.append(await asyncio.get_running_loop().create_server(factory, sock=sock))
    siblings_at = {} if worker is None else {"siblings": str(worker.socket)}  # where this worker answers the others
    log.info("admin_listening", bind=f"{admin.host}:{admin.port}", tls=admin.tls, **siblings_at)


async def _serve_socket(live: Live, path: Path, siblings: Siblings | None, started: AdminListener) -> None:
    """The admin application on a Unix socket, mode 0600: the file's permissions are its access control (no TLS,
    no allow-list, and no `Host` check: a browser cannot reach a Unix socket, so no page can rebind a name to it).
    A socket left by a gateway that died is replaced; one a process answers on (a gateway running already), or any
    other file there, is refused (`admin.socket`)."""
    runner = web.AppRunner(make_admin_app(live, siblings, unix=True), **_RUNNER_SETTINGS)
    await runner.setup()
    started.runners.append(runner)
    assert runner.server is not None
    try:
        sock = _unix_socket(path)
        started.files.append(path)
        sock.setblocking(False)  # a stop accepts what is queued on it without waiting (`AdminListener.cleanup`)
        factory = _capped(runner.server)
        server = await asyncio.get_running_loop().create_unix_server(factory, sock=sock)
    except OSError as e:
        raise ConfigError([f"admin.socket: cannot listen on {path}: {e.strerror} (in {live.config.path})"]) from None
    started.listening.append((sock, factory))
    started.servers.append(server)
    log.info("admin_listening", socket=str(path))


def _answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at `path` (else it is a dead gateway's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:  # ECONNREFUSED: nobody listens there any more
            return False
    return True


def _unix_socket(path: Path) -> socket.socket:
    """A Unix socket bound at `path` with mode 0600 from the start (no moment when others could connect)."""
    if path.is_socket():
        if _answers(path):  # not stale: a running gateway's (a second instance must not take it)
            raise OSError(errno.EADDRINUSE, "another process answers on it (a gateway already running?)")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)  # Linux gives the socket's file this mode (less the umask) at bind
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    return sock
