"""The admin listener's figures and traces for every worker, whichever worker a scrape reaches.

Theory of operation. With `[listener] workers = N` every worker serves the admin port (SO_REUSEPORT), and the
kernel gives each scrape to one of them; each worker's metrics and trace ring are its own (`proxy.workers`). So
each worker also answers its siblings on a Unix socket of its own, `<number>.sock` in the supervisor's private
directory (mode 0700): `/metrics` and `/traces` of that worker alone (`sibling_app`). The worker a scrape reaches
asks every other socket there, at most `ASK_TIMEOUT` seconds each, all at once, and answers with the whole:

- `/metrics`: every worker's samples, each with a `worker` label (its number, 1..N, which a replacement keeps;
  Prometheus sums them with `sum without (worker)`), one `# HELP`/`# TYPE` per metric (`merge_metrics`, which
  reads and writes the text format with prometheus_client's own parser and writer). A worker that does not answer
  (one being replaced) is named in a comment line, and logged;
- `/traces` and the pages: every worker's records, newest first, each with `worker` (`merge_traces`); a trace by
  id is looked for in this worker's ring first, then in the others'.
- `/readyz`: each worker's device connections and their limit (`listeners`), for the listener's part of the answer
  (`proxy.admin.listener_problem`), asked for `READY_ASK_TIMEOUT` seconds only: a probe waits for no hung sibling
  longer than kubelet's default probe timeout (1 s) allows; one that did not answer is named in the answer. An answer
  that is not the figures, or longer than `LISTENER_ANSWER_BYTES`, is taken as none (what else answers on a worker's
  socket is a process of the gateway's user: a 500 of /readyz, and a gigabyte read into the asking worker's memory
  for as long as the question may take, 500 MiB, were what it made).
- the gateway's own `kcd_workers_configured` and `kcd_workers_serving` (`workers_metrics`), read from what the
  supervisor wrote (`Worker.serving`), not asked of the siblings: a worker not replaced has no socket to answer on,
  and every worker would report the same figures.

The same holds for `/metrics` and `/traces`: a sibling's answer is read up to a bound no worker's answer reaches
(`METRICS_ANSWER_BYTES`; `trace_answer_bytes` for the records asked) and one that is not metrics, or not records, is
taken as no answer (named, and logged as `admin_worker_unanswered`), never a 500 of the scrape.

None of this is on the request path: a request still only appends its trace to its worker's ring and tallies its
counters; the asking is done when the admin listener is read. With one worker nothing changes, not even a label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.observability.metrics import workers_metrics
from proxy.observability.traces import Cursor, TraceRing
from proxy.workers import Worker

log = structlog.get_logger("proxy.admin")
ASK_TIMEOUT = 5.0  # seconds a sibling has to answer one question
READY_ASK_TIMEOUT = 0.5  # for /readyz: below kubelet's default probe timeout (1 s), a hung sibling included
LISTENER_ANSWER_BYTES = 4096  # the most of a sibling's /listener answer read (its figures are some 40 bytes)
# the most of a sibling's /metrics read: its series are bounded by the configuration (routes by status, refusal
# reasons, CRL sources); measured, 5.7 KiB fresh, 7.9 MiB for 1,000 routes answering 40 statuses each
METRICS_ANSWER_BYTES = 64 * 1024 * 1024
TRACE_RECORD_REST = 64 * 1024  # a trace record's bytes besides its path and certificate names (stages, reasons)
TRACE_ID = re.compile(r"[0-9a-f]{16}")  # `proxy.observability.trace.trace_id`
DEFAULT_LIMIT = 50  # `/traces` records when `limit` is not given
MAX_TRACES = 1000  # `/traces` records at most, whatever `limit` asks (`traces_limit`)
Occupancy = tuple[int, int]  # a worker's device connections (TLS handshakes included) and their limit in force


@dataclass(frozen=True)
class Recent:
    """What the trace views show: records newest first, how many are held and how many may be kept (all workers)."""

    records: list[dict[str, Any]]
    held: int
    keep: int


class TraceSource:
    """The traces of this process's ring (one worker, or no supervisor)."""

    def __init__(self, ring: TraceRing) -> None:
        self.ring = ring

    async def recent(self, limit: int, user: str | None, before: str | None = None) -> Recent | None:
        """Up to `limit` records, newest first (of `user`; after trace `before`); None if `before` is not held."""
        if before is not None and self.ring.get(before) is None:
            return None
        cursor = None if before is None else Cursor(before)
        return Recent(self.ring.recent(limit, user, cursor), len(self.ring), self.ring.keep)

    async def get(self, trace_id: str) -> dict[str, Any] | None:
        return self.ring.get(trace_id)


class Siblings(TraceSource):
    """This worker's ring and metrics, and its siblings', asked on their Unix sockets."""

    def __init__(
        self, ring: TraceRing, worker: Worker, render: Callable[[], bytes], record_bytes: Callable[[], int]
    ) -> None:
        super().__init__(ring)
        self.worker = worker
        self._render = render  # this worker's `Metrics.render`
        self._record_bytes = record_bytes  # the most one trace record can take (`trace_record_bytes`), as configured

    async def ask(
        self,
        path: str,
        query: Mapping[str, str] | None = None,
        *,
        within: float = ASK_TIMEOUT,
        limit: int | None = None,
    ) -> dict[int, bytes | None]:
        """`path` asked of every other worker at once, `within` seconds each: its body by number, None where it did
        not answer 200 (or, with `limit`, answered more bytes than that)."""
        numbers = self._numbers()
        bodies = await asyncio.gather(*(self._ask_one(n, path, query, within, limit) for n in numbers))
        return dict(zip(numbers, bodies, strict=True))

    def _numbers(self) -> list[int]:
        """The other workers' numbers, from their sockets."""
        return sorted(
            int(p.stem) for p in self.worker.siblings.glob("*.sock") if p.stem.isdigit() and p != self.worker.socket
        )

    async def _ask_one(
        self, number: int, path: str, query: Mapping[str, str] | None, within: float, limit: int | None
    ) -> bytes | None:
        connector = aiohttp.UnixConnector(path=str(self.worker.siblings / f"{number}.sock"))
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=within)) as session,
                session.get(f"http://worker{path}", params=query) as answer,
            ):
                body = await (answer.read() if limit is None else _body_within(answer, limit))
                if body is None:
                    log.warning("admin_worker_unanswered", worker=number, path=path, error=f"over {limit} bytes")
                return body if answer.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("admin_worker_unanswered", worker=number, path=path, error=type(e).__name__)
            return None

    async def metrics(self) -> bytes:
        others = await self.ask("/metrics", limit=METRICS_ANSWER_BYTES)
        return merge_metrics({self.worker.number: self._render(), **others}, workers_metrics(self.worker.serving()))

    async def listeners(self, *, enough: Callable[[Occupancy], bool] | None = None) -> dict[int, Occupancy | None]:
        """Every other worker's device connections and their limit; None where it did not answer within
        `READY_ASK_TIMEOUT` seconds (this is /readyz's question). With `enough`, the answers as soon as one worker's
        figures satisfy it, the workers not heard from by then left out: a full worker's /readyz, told by one sibling
        that it has room, has its answer, and waited READY_ASK_TIMEOUT for a hung one besides."""
        numbers = self._numbers()
        asked = {
            asyncio.ensure_future(self._ask_one(n, "/listener", None, READY_ASK_TIMEOUT, LISTENER_ANSWER_BYTES)): n
            for n in numbers
        }
        answers: dict[int, Occupancy | None] = {}
        pending = set(asked)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    body = task.result()
                    occupancy = None if body is None else _figures(asked[task], body)
                    answers[asked[task]] = occupancy
                    if enough is not None and occupancy is not None and enough(occupancy):
                        return answers
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return answers

    async def recent(self, limit: int, user: str | None, before: str | None = None) -> Recent | None:
        query = {"limit": str(limit), **({"user": user} if user else {})}
        cursor = None
        if before is not None:
            held = await self.get(before)
            if held is None:
                return None
            cursor = Cursor(before, str(held.get("time", "")), int(held["worker"]))
            query |= {"before": cursor.id, "before_time": cursor.time or "", "before_worker": str(cursor.worker)}
        answers = {self.worker.number: ring_answer(self.ring, limit, user, cursor, self.worker.number)}
        bound = limit * self._record_bytes() + TRACE_RECORD_REST
        for number, body in (await self.ask("/traces", query, limit=bound)).items():
            if body is not None and (answer := _ring_answer(number, body)) is not None:
                answers[number] = answer
        records = merge_traces({n: a["records"] for n, a in answers.items()}, limit)
        return Recent(records, sum(a["held"] for a in answers.values()), sum(a["keep"] for a in answers.values()))

    async def get(self, trace_id: str) -> dict[str, Any] | None:
        record = self.ring.get(trace_id)
        if record is not None:
            return {**record, "worker": self.worker.number}
        if not TRACE_ID.fullmatch(trace_id):  # it goes into the path asked of the others: `../metrics` is no id
            return None
        for number, body in (await self.ask(f"/traces/{trace_id}", limit=self._record_bytes())).items():
            if body is not None and (record := _record(number, trace_id, body)) is not None:
                return {**record, "worker": number}
        return None


def trace_record_bytes(max_header_bytes: int, max_chain_bytes: int) -> int:
    """The most one trace record takes as JSON: its path (up to a request's whole header block,
    `listener.max_header_bytes`) and its certificates' names (up to the chain, `client_certificates.max_chain_bytes`)
    at 6 bytes a byte (`\\udcff`: a byte of a path that was not UTF-8), and `TRACE_RECORD_REST` besides. Measured:
    1,000 records of a 128 KiB path of such bytes made a 750 MiB answer; 1,000 ordinary ones, 0.9 MiB."""
    return 6 * (max_header_bytes + max_chain_bytes) + TRACE_RECORD_REST


async def _body_within(answer: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """`answer`'s body, read as it comes; None as soon as it is longer than `limit` bytes (the rest never read)."""
    body = bytearray()
    async for chunk in answer.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _figures(number: int, body: bytes) -> Occupancy | None:
    """Worker `number`'s /listener answer as its figures; None (logged) when it is not `{"connections", "limit"}`."""
    try:
        figures = json.loads(body)
        return int(figures["connections"]), int(figures["limit"])
    except (ValueError, KeyError, TypeError, OverflowError):
        log.warning("admin_worker_unanswered", worker=number, path="/listener", error="not its figures")
        return None


def _ring_answer(number: int, body: bytes) -> dict[str, Any] | None:
    """Worker `number`'s /traces answer (`ring_answer`'s shape); None (logged) when it is not that."""
    try:
        answer = json.loads(body)
        if (
            isinstance(answer, dict)
            and isinstance(answer.get("records"), list)
            and all(isinstance(r, dict) for r in answer["records"])
            and all(type(answer.get(k)) is int for k in ("held", "keep"))
        ):
            return answer
    except ValueError:  # not JSON (nor UTF-8)
        pass
    log.warning("admin_worker_unanswered", worker=number, path="/traces", error="not its records")
    return None


def _record(number: int, trace_id: str, body: bytes) -> dict[str, Any] | None:
    """Worker `number`'s answer for trace `trace_id`: the record, or None (logged) when it is not that record."""
    try:
        record = json.loads(body)
        if isinstance(record, dict) and record.get("id") == trace_id:
            return record
    except ValueError:
        pass
    log.warning("admin_worker_unanswered", worker=number, path="/traces/<id>", error="not the record asked for")
    return None


def merge_metrics(texts: Mapping[int, bytes | None], gateway: Iterable[Metric] = ()) -> bytes:
    """Prometheus text expositions by worker number into one: each sample labelled with its `worker`, each metric
    described once, in the order the metrics first appear, then the `gateway`'s own (`workers_metrics`), unlabelled.
    A worker without an answer (None), or whose answer is not the text format, is a comment line."""
    families: dict[str, Metric] = {}
    missing = []
    for number, text in sorted(texts.items()):
        parsed = None if text is None else _families(number, text)
        if parsed is None:
            missing.append(number)
            continue
        for family in parsed:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            worker = {"worker": str(number)}
            merged.samples.extend(s._replace(labels={**s.labels, **worker}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), *gateway]))
    notes = "".join(f"# worker {n} did not answer\n" for n in missing).encode()
    return notes + generate_latest(registry)


def _families(number: int, text: bytes) -> list[Metric] | None:
    """Worker `number`'s /metrics answer read whole (no half of one merged); None (logged) when it is not that."""
    try:
        return list(text_string_to_metric_families(text.decode()))
    except (ValueError, IndexError, KeyError, TypeError):  # what prometheus_client's parser raises on what it refuses
        log.warning("admin_worker_unanswered", worker=number, path="/metrics", error="not its metrics")
        return None


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_traces(records: Mapping[int, list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Each worker's records (newest first) into one list, newest first, each with its `worker`; at most `limit`."""
    merged = [{**r, "worker": number} for number, rs in records.items() for r in rs]
    # ISO 8601 in UTC, to the millisecond; a tie by worker number, then each ring's order (the sort is stable):
    # the order `Cursor` pages in
    merged.sort(key=lambda r: (str(r.get("time", "")), r["worker"]), reverse=True)
    return merged[:limit]


def ring_answer(
    ring: TraceRing, limit: int, user: str | None, cursor: Cursor | None = None, worker: int = 0
) -> dict[str, Any]:
    """One worker's part of `/traces` (that worker's number `worker`): its records (newest first; after `cursor`),
    how many it holds and may keep."""
    return {"records": ring.recent(limit, user, cursor, worker), "held": len(ring), "keep": ring.keep}


def traces_limit(request: web.Request) -> int:
    """`/traces`'s `limit` (DEFAULT_LIMIT if absent), at most MAX_TRACES: `[traces] keep` may hold 100,000, and one
    answer renders every record it lists. The admin view's (`proxy.observability.tracepage`) and a worker's own on its
    sibling socket, which only the gateway's user reaches, but which took any integer (or raised: a 500) before."""
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    # ASCII digits only (str.isdigit takes "²", which int() refuses), and few of them (int() refuses 4,301)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) < 1:
        raise web.HTTPBadRequest(
            text='{"error": "limit must be a positive integer"}\n', content_type="application/json"
        )
    return min(int(raw), MAX_TRACES)


def _worker_number(raw: str) -> int:
    """A sibling `/traces` cursor's `before_worker` (the worker holding the cursor's trace, which the worker that
    asked sets): a worker's number, or a 400 naming the parameter (int() raised on anything else: a 500)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # as `traces_limit`: no "²", no 4,301 digits
        raise web.HTTPBadRequest(
            text='{"error": "before_worker must be a worker\'s number (a non-negative integer)"}\n',
            content_type="application/json",
        )
    return int(raw)


def sibling_app(
    ring: TraceRing, render: Callable[[], bytes], number: int = 0, listener: Callable[[], Occupancy] = lambda: (0, 0)
) -> web.Application:
    """What worker `number` tells its siblings: its own `/metrics`, `/traces` (`{"records", "held", "keep"}`) and
    `/listener` (`{"connections", "limit"}`, from `listener`)."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=render())

    async def occupancy(_request: web.Request) -> web.Response:
        connections, limit = listener()
        return web.json_response({"connections": connections, "limit": limit})

    async def traces(request: web.Request) -> web.Response:
        limit = traces_limit(request)  # as the admin view that asked checked it: anything else is no sibling's
        cursor = None
        if "before" in request.query:  # set by the worker that asked, from the trace it found
            q = request.query
            cursor = Cursor(q["before"], q.get("before_time", ""), _worker_number(q.get("before_worker", "0")))
        return web.json_response(ring_answer(ring, limit, request.query.get("user") or None, cursor, number))

    async def trace(request: web.Request) -> web.Response:
        record = ring.get(request.match_info["id"])
        return web.Response(status=404) if record is None else web.json_response(record)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/traces", traces)
    app.router.add_get("/traces/{id}", trace)
    app.router.add_get("/listener", occupancy)
    return app


async def serve_siblings(
    worker: Worker, ring: TraceRing, render: Callable[[], bytes], listener: Callable[[], Occupancy] = lambda: (0, 0)
) -> web.AppRunner:
    """Answer the siblings on `worker.socket` (a replaced worker's socket file is taken over); the caller cleans up."""
    with contextlib.suppress(FileNotFoundError):
        worker.socket.unlink()
    app = sibling_app(ring, render, worker.number, listener)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(worker.socket)).start()
    return runner
