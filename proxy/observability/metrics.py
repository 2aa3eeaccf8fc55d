"""Prometheus metrics: what the gateway has done (counters, histograms) and what it holds now (gauges).

Counters are fed from each request's `Trace` when the request ends (`observe`: its route, status,
stage timings, ticket cache result and, for a refusal, the stage and the audit event that the middleware
noted as `refused_stage` and `refusal`), from the TLS listener for refused handshakes
(`handshake_refused`), for connections that ended before their first TLS byte (`empty_connections`) and for a
balancer's TLS health checks without a certificate (`health_checks`), and
from the PROXY gate for connections it closed (`proxy_header_refused`), from the listener for connections
over the per-address cap (`address_connections_refused`): stages
do not know about metrics. Gauges are read when `/metrics` is scraped,
through hooks the running gateway sets: open connections (aiohttp's handlers), and the CRL store's
status list (`proxy.certs.sources.CrlStatus` rows).
Label values are bounded: route prefixes, status codes, stage names and refusal events, OpenSSL's
handshake reasons, the PROXY gate's four kinds; never a user, serial, address or path.

The registry is the gateway's own (not prometheus_client's global one), so several gateways can live in
one process (tests).

The request path does not update prometheus_client's metrics one observation at a time (each `inc` or
`observe` takes a lock, and a request made about nine of them: bench/run.py). It tallies the request
counter, the stage histograms and the ticket cache counter in plain dicts (`_Tally`), and the tallies are
added to the metrics whenever the registry is read, before anything else is (the tally is the registry's
first collector), or once they hold 4,096 requests. A scrape shows the counts and buckets that observing
one by one would have shown, and the same sums to the rounding of float additions done in another order
(`tests/unit/test_metrics_tally.py`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.backend.client import BackendSockets
from proxy.certs.sources import CrlStatus
from proxy.kerberos.ccache import S4UFacts
from proxy.observability.trace import Trace
from proxy.workers import Serving

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LONG_POLL_AFTER = 1.0  # seconds: a request in flight longer than this is being held (Ping, streaming)
_STAGE_BUCKETS = Histogram.DEFAULT_BUCKETS  # ends with +Inf
_KDC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._tally = _Tally()
        r.register(self._tally)  # first: a read of the registry adds up the tallies before reading any metric
        self.requests = Counter(
            "kcd_requests", "Requests answered, by route prefix and status", ["route", "status"], registry=r
        )
        self.refusals = Counter(
            "kcd_refusals",
            "Refusals by stage and reason (the audit event; OpenSSL's reason for a TLS handshake)",
            ["stage", "reason"],
            registry=r,
        )
        self.kdc_requests = Counter(
            "kcd_kdc_requests",
            "Kerberos stages that went to the KDC (S4U2Self + S4U2Proxy), by outcome (ok or the refusal)",
            ["outcome"],
            registry=r,
        )
        self.kdc_seconds = Histogram(
            "kcd_kdc_request_seconds", "Time of Kerberos stages that went to the KDC", buckets=_KDC_BUCKETS, registry=r
        )
        self.kdc_exchange_seconds = Histogram(
            "kcd_kdc_exchange_seconds",
            "Time of each KDC exchange of those Kerberos stages, by exchange: s4u2self, s4u2proxy, and as (the "
            "gateway's own TGT, when the stage had to fetch it first)",
            ["exchange"],
            buckets=_KDC_BUCKETS,
            registry=r,
        )
        self.ticket_cache = Counter(
            "kcd_ticket_cache", "Kerberos stages by ticket cache result (hit: no KDC exchange)", ["result"], registry=r
        )
        self.stage_seconds = self._tally.stage_seconds = Histogram(
            "kcd_stage_seconds", "Time spent in each stage", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.reloads = Counter("kcd_reloads", "Configuration reloads, by outcome", ["outcome"], registry=r)
        self.connection_waits = Counter(
            "kcd_listener_connection_waits",
            "Times new connections had to wait in the listen backlog because listener.max_connections were open",
            registry=r,
        )
        self.empty_connections = Counter(
            "kcd_listener_empty_connections",
            "Connections that ended (reset or closed by the client) before their first TLS byte, a PROXY header "
            "aside: health checks (HAProxy's end with a reset, often before they are accepted) and port scans; "
            "not refusals",
            registry=r,
        )
        self.health_checks = Counter(
            "kcd_listener_health_checks",
            "The balancers' own TLS health checks (a PROXY v2 LOCAL header, then a handshake without a client "
            "certificate: HAProxy's check-ssl), refused as any connection without one; not refusals",
            registry=r,
        )
        self.mappings = Counter(
            "kcd_certificate_mappings",
            "Certificates admitted by the mapping stage, by rule (weak-audit: served only by strong-or-audit)",
            ["rule"],
            registry=r,
        )
        self.open_connections: Callable[[], int] = lambda: 0
        self.accepted_connections: Callable[[], int] = lambda: 0  # from accept to close, TLS handshakes included
        self.connection_limit = 0
        self.idle_connections: Callable[[], int] = lambda: 0  # idle keep-alives (a scan: asked of a full worker only)
        self.reclaimed_connections: Callable[[], int] = lambda: 0  # idle keep-alives closed for new devices
        self.backend_sockets: Callable[[], BackendSockets | None] = lambda: None  # all users' backend connections
        self.crls: Callable[[], Iterable[CrlStatus]] = list
        self.held_unjudged: Callable[[], int] = lambda: 0  # `proxy.held_mapping.HeldMappings.unjudged`
        self.trace_export_errors: Callable[[], int] = lambda: 0  # `proxy.observability.traces.TraceRing.export_errors`
        self._clock = clock
        self._in_flight: dict[str, float] = {}  # trace id -> when the request started
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r.register(_Gauges(self))

    # -- fed by the request middleware and the TLS listener ---------------------------------------------

    def begin(self, trace: Trace) -> None:
        self._in_flight[trace.id] = self._clock()

    def handshake_refused(self, reason: str) -> None:
        self.refusals.labels("tls", reason).inc()

    def proxy_header_refused(self, reason: str) -> None:
        """A connection closed before TLS by the PROXY gate (`proxy.tls.proxy_protocol.Refusal`: five values)."""
        self._child(self.refusals, "proxy_protocol", reason).inc()

    def address_connections_refused(self) -> None:
        """A connection reset before TLS: its address had listener.max_connections_per_address open."""
        self._child(self.refusals, "listener", "connections_per_address").inc()

    def headers_refused(self) -> None:
        """A request refused with 431 for its header block, before any stage (and before a trace) began."""
        self.refusals.labels("request", "request_headers_too_large").inc()
        self._child(self.requests, "", "431").inc()

    def observe(self, trace: Trace, status: int) -> None:
        """A request has ended with `status`: count it from what its trace recorded."""
        self._in_flight.pop(trace.id, None)
        facts = trace.facts
        tally = self._tally
        tally.count(self._child(self.requests, str(facts.get("route", "")), str(status)))
        tally.observe_stages(trace.ms)
        refused_stage, refusal = facts.get("refused_stage"), str(facts.get("refusal", "refused"))
        if refused_stage is not None:
            self.refusals.labels(str(refused_stage), refusal).inc()
        rule = facts.get("mapping")
        if rule is not None:
            self._child(self.mappings, str(rule)).inc()
        cached = facts.get("impersonation_cached")
        if refused_stage == "kerberos":
            if trace.details.get("kerberos", {}).get("kdc_asked", True):  # not one refused before (KdcNotAsked)
                self.kdc_requests.labels(refusal).inc()
        elif cached is not None:
            tally.count(self._child(self.ticket_cache, "hit" if cached else "miss"))
            if not cached:
                self.kdc_requests.labels("ok").inc()
                self.kdc_seconds.observe(trace.ms.get("kerberos", 0.0) / 1000)
                self._exchanges(trace.details.get("kerberos", {}).get("facts"))

    def _exchanges(self, facts: S4UFacts | None) -> None:
        """Each KDC exchange of a Kerberos stage that went to the KDC, in `kcd_kdc_exchange_seconds{exchange}`: the
        stage's one `kcd_kdc_request_seconds` (kept as it was, for the dashboards that read it) did not say whether
        S4U2Self or S4U2Proxy was the slow one. Bounded label: three values."""
        if not isinstance(facts, S4UFacts):
            return
        self._child(self.kdc_exchange_seconds, "s4u2self").observe(facts.s4u2self_ms / 1000)
        if facts.s4u2proxy_ms is not None:
            self._child(self.kdc_exchange_seconds, "s4u2proxy").observe(facts.s4u2proxy_ms / 1000)
        if facts.gateway_tgt_ms is not None:
            self._child(self.kdc_exchange_seconds, "as").observe(facts.gateway_tgt_ms / 1000)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up in a plain dict: prometheus_client validates and locks on each
        `labels` call, and a request made about ten of them (bench/run.py). Label values are bounded (see
        above), so this dict is too."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def pending(self) -> int:
        """Requests tallied and not yet added to the metrics (at most 4,096)."""
        return self._tally.size

    # -- read at scrape time -------------------------------------------------------------------------------

    def in_flight(self) -> tuple[int, int]:
        """(requests in flight, of which held longer than LONG_POLL_AFTER)."""
        now = self._clock()
        held = sum(1 for start in self._in_flight.values() if now - start > LONG_POLL_AFTER)
        return len(self._in_flight), held

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Tally(Collector):
    """Counter increments and stage timings of the request path, not yet added to the metrics.

    A collector of the registry that yields nothing: collecting it adds the tallies up (module docstring)."""

    LIMIT = 4096  # requests tallied at most between two additions, scraped or not
    _BOUNDS = tuple(float(b) for b in _STAGE_BUCKETS)

    def __init__(self) -> None:
        self.stage_seconds: Histogram | None = None  # set once the registry holds it (after this collector)
        self.counts: dict[Any, int] = {}  # a Counter's child -> increments
        self.stages: dict[str, tuple[Any, list[float]]] = {}  # stage -> (its child, [count per bucket..., sum])
        self.size = 0

    def count(self, child: Any) -> None:
        self.counts[child] = self.counts.get(child, 0) + 1

    def observe_stages(self, ms: dict[str, float]) -> None:
        """`stage_seconds.labels(stage).observe(ms / 1000)` for each stage, tallied."""
        bounds, stages = self._BOUNDS, self.stages
        for stage, stage_ms in ms.items():
            entry = stages.get(stage)
            if entry is None:  # the child is made now, as `observe` would have made it (its _created time)
                assert self.stage_seconds is not None
                entry = stages[stage] = (self.stage_seconds.labels(stage), [0.0] * (len(bounds) + 1))
            tally, value = entry[1], stage_ms / 1000
            if value <= bounds[-1]:  # `observe`'s bucket: the first bound >= value (none for NaN)
                tally[bisect_left(bounds, value)] += 1
            tally[-1] += value
        self.size += 1
        if self.size >= self.LIMIT:
            self.add_up()

    def add_up(self) -> None:
        counts, self.counts = self.counts, {}
        self.size = 0
        for child, n in counts.items():
            child.inc(n)
        for child, tally in self.stages.values():
            # prometheus_client's Histogram child keeps one value per bucket and one for the sum (`observe`)
            for i, in_bucket in enumerate(tally[:-1]):
                if in_bucket:
                    child._buckets[i].inc(in_bucket)
                    tally[i] = 0.0
            if tally[-1]:
                child._sum.inc(tally[-1])
                tally[-1] = 0.0

    def collect(self) -> Iterator[Metric]:
        self.add_up()
        return iter(())


class _Gauges(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        in_flight, held = self._m.in_flight()
        yield _gauge("kcd_requests_in_flight", "Requests being handled", in_flight)
        yield _gauge("kcd_long_polls_held", f"Requests in flight for more than {LONG_POLL_AFTER:g} s", held)
        yield _gauge("kcd_open_connections", "Client connections past the TLS handshake", self._m.open_connections())
        yield _gauge(
            "kcd_listener_connections",
            "Client connections open, from accept to close (TLS handshakes included)",
            self._m.accepted_connections(),
        )
        yield _gauge(
            "kcd_listener_connection_limit",
            "listener.max_connections, or less where the open-file limit holds fewer (proxy.descriptors)",
            self._m.connection_limit,
        )
        yield CounterMetricFamily(
            "kcd_listener_connections_reclaimed",
            "Idle keep-alive connections closed to serve a new device at kcd_listener_connection_limit",
            value=self._m.reclaimed_connections(),
        )
        sockets = self._m.backend_sockets()
        if sockets is not None:
            yield _gauge("kcd_backend_connections", "Backend connections open, all users and upstreams", sockets.open)
            yield _gauge(
                "kcd_backend_connection_limit",
                "Backend connections the worker's open-file limit allows (proxy.descriptors)",
                sockets.limit,
            )
            yield CounterMetricFamily(
                "kcd_backend_connections_reclaimed",
                "Idle backend connections closed to make room for another user's at kcd_backend_connection_limit",
                value=sockets.reclaimed,
            )
        yield _gauge(
            "kcd_held_users_unjudged",
            "Users with requests held whose last directory sweep reached no directory server: served on unjudged "
            "(fail open) until one answers",
            self._m.held_unjudged(),
        )
        yield CounterMetricFamily(
            "kcd_trace_export_errors",
            "Traces whose append to [traces] export failed (a full disk, an unwritable file): not exported",
            value=self._m.trace_export_errors(),
        )
        now = datetime.now(UTC)
        labels = ["source", "issuer"]
        age = GaugeMetricFamily("kcd_crl_age_seconds", "Seconds since the CRL's thisUpdate", labels=labels)
        left = GaugeMetricFamily(
            "kcd_crl_next_update_seconds", "Seconds until the CRL's nextUpdate (negative: stale)", labels=labels
        )
        fetched = GaugeMetricFamily(
            "kcd_crl_last_fetch_timestamp_seconds", "When the CRL source was last read or fetched", labels=["source"]
        )
        succeeded = GaugeMetricFamily(
            "kcd_crl_last_success_timestamp_seconds",
            "When the CRL source last gave a CRL that was accepted",
            labels=["source"],
        )
        failing = GaugeMetricFamily(
            "kcd_crl_last_error",
            "1 while the source's last read or fetch failed, the error as a label",
            labels=["source", "error"],
        )
        sources: set[str] = set()
        for crl in self._m.crls():
            key = [crl.source, crl.issuer or ""]
            if crl.this_update is not None:
                age.add_metric(key, (now - crl.this_update).total_seconds())
            if crl.next_update is not None:
                left.add_metric(key, (crl.next_update - now).total_seconds())
            if crl.source in sources:  # a file of several CRLs: one fetch
                continue
            sources.add(crl.source)
            if crl.last_fetch is not None:
                fetched.add_metric([crl.source], crl.last_fetch.timestamp())
            if crl.last_success is not None:
                succeeded.add_metric([crl.source], crl.last_success.timestamp())
            if crl.last_error:
                failing.add_metric([crl.source, crl.last_error], 1)
        yield from (age, left, fetched, succeeded, failing)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def workers_metrics(serving: Serving | None) -> list[GaugeMetricFamily]:
    """The gateway's own gauges of its workers (`Worker.serving`, the supervisor's count), with no `worker` label:
    every worker would report the same figures, which `sum without (worker)` would add up. None unread: no gauges."""
    if serving is None:
        return []
    return [
        _gauge("kcd_workers_configured", "Workers the gateway was started with (listener.workers)", serving.configured),
        _gauge(
            "kcd_workers_serving",
            "Workers serving: alive and not stopped, listening (or one of the first workers), not stopping; fewer "
            "than kcd_workers_configured while a worker is not replaced (worker_not_replaced)",
            len(serving.numbers),
        ),
    ]
