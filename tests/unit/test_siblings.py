"""Every worker's figures and traces in one answer (proxy/observability/siblings.py): the pure merges."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy.observability.metrics import Metrics, workers_metrics
from proxy.observability.siblings import (
    ASK_TIMEOUT,
    MAX_TRACES,
    READY_ASK_TIMEOUT,
    Siblings,
    merge_metrics,
    merge_traces,
    ring_answer,
    serve_siblings,
    trace_record_bytes,
)
from proxy.observability.trace import Trace
from proxy.observability.traces import Cursor, TraceRing
from proxy.workers import Serving, Worker


def _served(metrics: Metrics, n: int, status: int = 200) -> bytes:
    for _ in range(n):
        trace = Trace()
        trace.note(route="/owa/")
        trace.ms["backend"] = 1.5
        metrics.begin(trace)
        metrics.observe(trace, status)
    return metrics.render()


def _samples(text: bytes, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name
    }


def test_each_sample_gets_its_worker_and_each_metric_one_description() -> None:
    """Two workers' expositions: every sample of each, labelled `worker`, under one HELP and TYPE per metric."""
    one, two = _served(Metrics(), 3), _served(Metrics(), 5, status=502)
    merged = merge_metrics({1: one, 2: two})
    text = merged.decode()
    requests = _samples(merged, "kcd_requests_total")
    assert requests == {
        (("route", "/owa/"), ("status", "200"), ("worker", "1")): 3.0,
        (("route", "/owa/"), ("status", "502"), ("worker", "2")): 5.0,
    }
    counts = _samples(merged, "kcd_stage_seconds_count")
    assert sorted(counts.values()) == [3.0, 5.0]
    described = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert described == [line for line in one.decode().splitlines() if line.startswith("# TYPE ")]
    assert all('worker="' in line for line in text.splitlines() if line and not line.startswith("#"))


def test_a_worker_that_did_not_answer_is_named() -> None:
    """A sibling that did not answer is a comment line (ignored by Prometheus); the others' samples are whole."""
    merged = merge_metrics({1: _served(Metrics(), 2), 2: None})
    assert merged.startswith(b"# worker 2 did not answer\n")
    assert sum(_samples(merged, "kcd_requests_total").values()) == 2.0


def test_the_gateways_worker_gauges_come_once_without_a_worker_label() -> None:
    """`kcd_workers_configured` and `kcd_workers_serving` (the supervisor's count) are the gateway's: one sample each,
    no `worker` label (every worker would report the same, and `sum without (worker)` add them up); unread, absent."""
    merged = merge_metrics({1: _served(Metrics(), 1), 2: None}, workers_metrics(Serving(2, (1,))))
    assert _samples(merged, "kcd_workers_configured") == {(): 2.0}
    assert _samples(merged, "kcd_workers_serving") == {(): 1.0}
    assert merged.decode().count("# TYPE kcd_workers_serving gauge") == 1
    assert b"kcd_workers_" not in merge_metrics({1: _served(Metrics(), 1)}, workers_metrics(None))


def test_one_worker_reads_back_as_it_was_but_for_the_label() -> None:
    """prometheus_client's parser and writer lose nothing: one worker's merge is its exposition plus the label."""
    text = _served(Metrics(), 4)
    merged = merge_metrics({7: text})
    unlabelled = merged.decode().replace(',worker="7"}', "}").replace('{worker="7"}', "")
    assert unlabelled == text.decode()


def test_traces_are_merged_newest_first_with_their_worker() -> None:
    """Records of two workers come back newest first across both, each with its worker, at most `limit`."""
    a = [{"id": "a2", "time": "2026-12-05T10:00:03.000Z"}, {"id": "a1", "time": "2026-12-05T10:00:01.000Z"}]
    b = [{"id": "b2", "time": "2026-12-05T10:00:02.500Z"}, {"id": "b1", "time": "2026-12-05T10:00:00.000Z"}]
    merged = merge_traces({1: a, 2: b}, limit=3)
    assert [(r["id"], r["worker"]) for r in merged] == [("a2", 1), ("b2", 2), ("a1", 1)]
    assert "worker" not in a[0]  # the workers' own records are not changed


def test_pages_after_a_cursor_cover_every_workers_records_once_in_the_merged_order() -> None:
    """`/traces?before=<id>` over two workers: paging two at a time from the merged list's records, ties of one
    millisecond within a worker and across workers included, lists every record exactly once, in the order one
    merged answer of them all has."""
    rings = {1: TraceRing(keep=50), 2: TraceRing(keep=50)}
    for number, seconds in [(1, 1.0), (2, 1.0), (1, 2.0), (1, 2.0), (2, 2.0), (2, 3.0), (1, 3.5), (2, 3.5), (2, 3.5)]:
        trace = Trace()
        trace.wall = 1_800_000_000 + seconds
        rings[number].record(trace, 200)
    everything = merge_traces({n: ring.recent(50) for n, ring in rings.items()}, limit=50)
    assert len(everything) == 9
    pages: list[dict[str, object]] = []
    cursor = None
    while True:
        page = merge_traces({n: ring_answer(ring, 2, None, cursor, n)["records"] for n, ring in rings.items()}, 2)
        if not page:
            break
        pages += page
        last = page[-1]
        cursor = Cursor(str(last["id"]), str(last["time"]), int(str(last["worker"])))
    assert [(r["id"], r["worker"]) for r in pages] == [(r["id"], r["worker"]) for r in everything]


def test_a_sibling_that_accepts_and_never_answers_is_none_within_readys_bound(tmp_path: Path) -> None:
    """/readyz's question (`Siblings.listeners`) of a sibling whose Unix socket accepts and never answers (a hung
    worker: the kernel accepts for it) comes back within READY_ASK_TIMEOUT, below kubelet's 1 s probe timeout, with
    that worker as None (taken as having no room: `listener_problem`); before, /readyz waited ASK_TIMEOUT (5 s)
    for it."""
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(tmp_path / "2.sock"))
    hung.listen(8)
    siblings = Siblings(TraceRing(keep=5), Worker(number=1, siblings=tmp_path), lambda: b"", lambda: 2**20)

    async def ask() -> tuple[dict[int, tuple[int, int] | None], float]:
        started = time.monotonic()
        answers = await siblings.listeners()
        return answers, time.monotonic() - started

    try:
        answers, took = asyncio.run(ask())
    finally:
        hung.close()
    assert answers == {2: None}
    assert READY_ASK_TIMEOUT <= took < 1.0 < ASK_TIMEOUT, took


def test_a_full_workers_question_ends_when_a_sibling_has_room(tmp_path: Path) -> None:
    """/readyz's question of a full worker (`Siblings.listeners` with `enough`): a sibling serving `/listener` with
    room (a real sibling app on its Unix socket) ends it at once, the hung sibling beside it (its socket accepts and
    never answers) left out rather than waited for READY_ASK_TIMEOUT; without `enough`, every sibling is waited for."""
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(tmp_path / "2.sock"))
    hung.listen(8)
    siblings = Siblings(TraceRing(keep=5), Worker(number=1, siblings=tmp_path), lambda: b"", lambda: 2**20)

    async def ask() -> tuple[dict[int, tuple[int, int] | None], float, dict[int, tuple[int, int] | None]]:
        runner = await serve_siblings(
            Worker(number=3, siblings=tmp_path), TraceRing(keep=5), lambda: b"", lambda: (1, 2)
        )
        try:
            started = time.monotonic()
            early = await siblings.listeners(enough=lambda figures: figures[0] < figures[1])
            took = time.monotonic() - started
            every = await siblings.listeners()
        finally:
            await runner.cleanup()
        return early, took, every

    try:
        early, took, every = asyncio.run(ask())
    finally:
        hung.close()
    assert early == {3: (1, 2)}  # the hung one's timeout not waited for: it would be there, as None
    assert took < 5 * READY_ASK_TIMEOUT, took  # (a loaded machine's slack)
    assert every == {2: None, 3: (1, 2)}


def test_a_worker_whose_answer_is_not_metrics_is_named_and_none_of_it_merged() -> None:
    """A sibling's /metrics that prometheus_client cannot read (not the format, not UTF-8, half good then bad) is a
    `# worker N did not answer` line, and nothing of it is merged (before, the parser raised: a 500 of the scrape)."""
    own = _served(Metrics(), 1)
    for answer in (b"not metrics", b"\xff\xfe", b"kcd_good 1\nkcd_bad{a=1} 1\n"):
        merged = merge_metrics({1: own, 2: answer}).decode()
        assert merged.startswith("# worker 2 did not answer\n"), merged[:200]
        assert 'worker="2"' not in merged
        assert "kcd_good" not in merged


def test_the_bound_of_a_trace_record_holds_a_record_at_the_configured_caps() -> None:
    """`trace_record_bytes` at the default caps holds a record whose path is a whole header block of bytes that are
    not UTF-8 (6 bytes each in JSON): the bound is above what a real worker's record reaches."""
    ring = TraceRing(keep=1)
    trace = Trace()
    trace.note(
        method="GET", path="/" + "\udcff" * (128 * 1024 - 1), client="127.0.0.1", cert_subject="CN=" + "é" * 9000
    )
    trace.ms["tls"] = 0.1
    ring.record(trace, 400)
    body = json.dumps(ring_answer(ring, 1, None)).encode()
    assert len(body) > 6 * 128 * 1024
    assert len(body) <= trace_record_bytes(128 * 1024, 10240)


async def _curl(sock: Path, url: str) -> tuple[int, str]:
    """`url` asked with curl on the Unix socket `sock`: the status and the body."""
    curl = ["curl", "-sS", "--max-time", "20", "--unix-socket", str(sock), "-w", "\n%{http_code}"]
    proc = await asyncio.create_subprocess_exec(*curl, url, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code), body


def test_a_siblings_traces_limit_is_checked_as_the_admin_views_is(tmp_path: Path) -> None:
    """A worker's own `/traces` on its sibling socket (asked with curl) takes `limit` as the admin view does
    (`traces_limit`): anything but a positive integer in ASCII digits, of nine digits at most, is a 400 with the admin
    view's error, and more than MAX_TRACES gets MAX_TRACES records. Before, `limit=x` was a 500 (int() raised) and
    `limit=5000` answered every record the ring kept (the gateway's own user alone reaches the socket)."""
    ring = TraceRing(keep=MAX_TRACES + 10)
    for _ in range(MAX_TRACES + 5):
        trace = Trace()
        trace.note(method="GET", path="/owa/", client="127.0.0.1")
        ring.record(trace, 200)
    asked = ("x", "0", "-1", "\u00b2", "1" * 10, "", "5000", "3")

    async def ask() -> dict[str, tuple[int, str]]:
        runner = await serve_siblings(Worker(number=1, siblings=tmp_path), ring, lambda: b"")
        answers: dict[str, tuple[int, str]] = {}
        try:
            for limit in asked:
                url = f"http://worker/traces?limit={urllib.parse.quote(limit)}"
                answers[limit] = await _curl(tmp_path / "1.sock", url)
        finally:
            await runner.cleanup()
        return answers

    answers = asyncio.run(ask())
    refused = (400, '{"error": "limit must be a positive integer"}\n')
    assert {limit: answers[limit] for limit in asked[:6]} == dict.fromkeys(asked[:6], refused)
    assert answers["5000"][0] == 200
    assert len(json.loads(answers["5000"][1])["records"]) == MAX_TRACES
    assert len(json.loads(answers["3"][1])["records"]) == 3


def test_a_siblings_traces_before_worker_is_checked(tmp_path: Path) -> None:
    """A worker's own `/traces` on its sibling socket (asked with curl) with a cursor (`before`) whose `before_worker`
    is not a worker's number (not ASCII digits, negative, more than nine digits, empty) is a 400 naming the parameter;
    a worker's number pages after the cursor. Before, what int() refuses was a 500 and a negative number was taken."""
    ring = TraceRing(keep=10)
    for _ in range(3):
        trace = Trace()
        trace.note(method="GET", path="/owa/", client="127.0.0.1")
        ring.record(trace, 200)
    newest = ring.recent(1, None)[0]
    asked = ("x", "-1", "\u00b2", "1" * 10, "", " 1", "1")

    async def ask() -> dict[str, tuple[int, str]]:
        runner = await serve_siblings(Worker(number=1, siblings=tmp_path), ring, lambda: b"")
        try:
            answers: dict[str, tuple[int, str]] = {}
            for worker in asked:
                query = urllib.parse.urlencode(
                    {"before": newest["id"], "before_time": newest["time"], "before_worker": worker}
                )
                answers[worker] = await _curl(tmp_path / "1.sock", f"http://worker/traces?{query}")
            return answers
        finally:
            await runner.cleanup()

    answers = asyncio.run(ask())
    refused = (400, '{"error": "before_worker must be a worker\'s number (a non-negative integer)"}\n')
    assert {worker: answers[worker] for worker in asked[:6]} == dict.fromkeys(asked[:6], refused)
    assert answers["1"][0] == 200
    assert len(json.loads(answers["1"][1])["records"]) == 2
