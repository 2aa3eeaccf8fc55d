"""Prometheus metrics: what the gateway has done (counters, histograms) and what it holds now (gauges).

Counters are fed from each request's `Trace` when the request ends (`observe`: its route, status,
stage timings, ticket cache result and, for a refusal, the stage and the audit event that the middleware
noted as `refused_stage` and `refusal`), from the TLS listener for refused handshakes
(`handshake_refused`) and from the PROXY gate for connections it closed (`proxy_header_refused`): stages
do not know about metrics. Gauges are read when `/metrics` is scraped,
through hooks the running gateway sets: open connections (aiohttp's handlers), and the CRL store's
status list (`proxy.certs.sources.CrlStatus` rows).
Label values are bounded: route prefixes, status codes, stage names and refusal events, OpenSSL's
handshake reasons, the PROXY gate's four kinds; never a user, serial, address or path.

The registry is the gateway's own (not prometheus_client's global one), so several gateways can live in
one process (tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.certs.sources import CrlStatus
from proxy.observability.trace import Trace

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LONG_POLL_AFTER = 1.0  # seconds: a request in flight longer than this is being held (Ping, streaming)
_KDC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.ticket_cache = Counter(
            "kcd_ticket_cache", "Kerberos stages by ticket cache result (hit: no KDC exchange)", ["result"], registry=r
        )
        self.stage_seconds = Histogram("kcd_stage_seconds", "Time spent in each stage", ["stage"], registry=r)
        self.reloads = Counter("kcd_reloads", "Configuration reloads, by outcome", ["outcome"], registry=r)
        self.connection_waits = Counter(
            "kcd_listener_connection_waits",
            "Times new connections had to wait in the listen backlog because listener.max_connections were open",
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
        self.crls: Callable[[], Iterable[CrlStatus]] = list
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
        """A connection closed before TLS by the PROXY gate (`proxy.tls.proxy_protocol.Refusal`: four values)."""
        self._child(self.refusals, "proxy_protocol", reason).inc()

    def headers_refused(self) -> None:
        """A request refused with 431 for its header block, before any stage (and before a trace) began."""
        self.refusals.labels("request", "request_headers_too_large").inc()
        self._child(self.requests, "", "431").inc()

    def observe(self, trace: Trace, status: int) -> None:
        """A request has ended with `status`: count it from what its trace recorded."""
        self._in_flight.pop(trace.id, None)
        facts = trace.facts
        self._child(self.requests, str(facts.get("route", "")), str(status)).inc()
        for stage, ms in trace.ms.items():
            self._child(self.stage_seconds, stage).observe(ms / 1000)
        refused_stage, refusal = facts.get("refused_stage"), str(facts.get("refusal", "refused"))
        if refused_stage is not None:
            self.refusals.labels(str(refused_stage), refusal).inc()
        rule = facts.get("mapping")
        if rule is not None:
            self._child(self.mappings, str(rule)).inc()
        cached = facts.get("impersonation_cached")
        if refused_stage == "kerberos":
            self.kdc_requests.labels(refusal).inc()
        elif cached is not None:
            self._child(self.ticket_cache, "hit" if cached else "miss").inc()
            if not cached:
                self.kdc_requests.labels("ok").inc()
                self.kdc_seconds.observe(trace.ms.get("kerberos", 0.0) / 1000)

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up in a plain dict: prometheus_client validates and locks on each
        `labels` call, and a request made about ten of them (bench/run.py). Label values are bounded (see
        above), so this dict is too."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- read at scrape time -------------------------------------------------------------------------------

    def in_flight(self) -> tuple[int, int]:
        """(requests in flight, of which held longer than LONG_POLL_AFTER)."""
        now = self._clock()
        held = sum(1 for start in self._in_flight.values() if now - start > LONG_POLL_AFTER)
        return len(self._in_flight), held

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
        yield _gauge("kcd_listener_connection_limit", "listener.max_connections", self._m.connection_limit)
        now = datetime.now(UTC)
        labels = ["source", "issuer"]
        age = GaugeMetricFamily("kcd_crl_age_seconds", "Seconds since the CRL's thisUpdate", labels=labels)
        left = GaugeMetricFamily(
            "kcd_crl_next_update_seconds", "Seconds until the CRL's nextUpdate (negative: stale)", labels=labels
        )
        for crl in self._m.crls():
            key = [crl.source, crl.issuer or ""]
            if crl.this_update is not None:
                age.add_metric(key, (now - crl.this_update).total_seconds())
            if crl.next_update is not None:
                left.add_metric(key, (crl.next_update - now).total_seconds())
        yield age
        yield left


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
