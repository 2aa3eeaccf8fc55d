"""The request path's counts and stage timings, added up between scrapes: what a scrape shows is exact.

`Metrics.observe` runs for every request; it tallies the request counter, the stage histograms and the
ticket cache counter in plain dicts, and the registry adds the tallies to the Prometheus metrics when it
is read (`render`, or anything else that collects the registry). These tests compare a scrape with what
prometheus_client itself gives for the same observations, fed one by one: the same counts and buckets,
and sums equal to the rounding of float additions done in another order.
"""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.observability.metrics import Metrics
from proxy.observability.trace import Trace

STAGES = ("tls", "certificate", "revocation", "identity", "authentication", "kerberos", "backend")


def request(rng: random.Random, route: str, status: int, cached: bool | None) -> tuple[Trace, int]:
    trace = Trace()
    trace.note(route=route)
    if cached is not None:
        trace.note(impersonation_cached=cached)
    for stage in STAGES:
        trace.ms[stage] = round(rng.choice([rng.uniform(0, 0.02), rng.uniform(0, 30), rng.uniform(0, 20000)]), 3)
    return trace, status


def reference(traces: list[tuple[Trace, int]]) -> bytes:
    """What prometheus_client writes for the same requests, observed one at a time."""
    r = CollectorRegistry()
    requests = Counter("kcd_requests", "Requests answered, by route prefix and status", ["route", "status"], registry=r)
    stages = Histogram("kcd_stage_seconds", "Time spent in each stage", ["stage"], registry=r)
    cache = Counter(
        "kcd_ticket_cache", "Kerberos stages by ticket cache result (hit: no KDC exchange)", ["result"], registry=r
    )
    for trace, status in traces:
        requests.labels(trace.facts["route"], str(status)).inc()
        for stage, ms in trace.ms.items():
            stages.labels(stage).observe(ms / 1000)
        if (cached := trace.facts.get("impersonation_cached")) is not None:
            cache.labels("hit" if cached else "miss").inc()
    return generate_latest(r)


def families(text: bytes, names: tuple[str, ...]) -> list[str]:
    """The sample lines of these families (not their `_created`, a time), sorted."""
    wanted = {f"{name}{part}" for name in names for part in ("_total", "_bucket", "_count", "_sum")}
    return sorted(line for line in text.decode().splitlines() if line.split("{")[0].split(" ")[0] in wanted)


def test_a_scrape_shows_every_request_exactly() -> None:
    """Counts, buckets and sums equal prometheus_client's own for the same 3,000 requests, at every scrape."""
    rng = random.Random(18)
    m = Metrics()
    seen: list[tuple[Trace, int]] = []
    names = ("kcd_requests", "kcd_stage_seconds", "kcd_ticket_cache")
    for scrape in range(6):
        for _ in range(500):
            trace, status = request(
                rng, rng.choice(["/", "/bound/"]), rng.choice([200, 200, 403]), rng.choice([True, None])
            )
            m.begin(trace)
            m.observe(trace, status)
            seen.append((trace, status))
        ours, theirs = families(m.render(), names), families(reference(seen), names)
        assert [line.rsplit(" ", 1)[0] for line in ours] == [line.rsplit(" ", 1)[0] for line in theirs]
        for mine, expected in zip(ours, theirs, strict=True):
            if "_sum" in mine:
                assert math.isclose(float(mine.rsplit(" ", 1)[1]), float(expected.rsplit(" ", 1)[1]), rel_tol=1e-12)
            else:
                assert mine == expected, f"scrape {scrape}"


def test_the_registry_read_directly_sees_the_tallies() -> None:
    """Whoever collects the registry (not only `render`) gets the requests counted so far."""
    m = Metrics()
    for _ in range(3):
        trace = Trace()
        trace.note(route="/")
        trace.ms["backend"] = 1.5
        m.observe(trace, 200)
    assert m.registry.get_sample_value("kcd_requests_total", {"route": "/", "status": "200"}) == 3
    assert m.registry.get_sample_value("kcd_stage_seconds_count", {"stage": "backend"}) == 3
    assert m.registry.get_sample_value("kcd_stage_seconds_bucket", {"stage": "backend", "le": "0.005"}) == 3
    assert m.registry.get_sample_value("kcd_stage_seconds_sum", {"stage": "backend"}) == 0.0015 * 3


def test_tallies_are_bounded_without_scrapes() -> None:
    """A gateway nobody scrapes does not keep every request's timings: the tallies are added up as they grow."""
    m = Metrics()
    for _ in range(20_000):
        trace = Trace()
        trace.note(route="/")
        trace.ms["backend"] = 1.0
        m.observe(trace, 200)
    assert m.pending() <= 4096
    assert m.registry.get_sample_value("kcd_stage_seconds_count", {"stage": "backend"}) == 20_000
