"""What one request went through: stage timings and the facts each stage established.

The middleware creates a `Trace` per request; stages record into it; the summary log line (and the
refusal audit event) are written from it. It holds names, serials and decisions, never a token.
`note` adds to the flat facts of the summary line; `detail` adds what only the request's trace record
shows (the chain, the tickets' facts: `proxy.observability.traces`), so the log line stays short.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

_random = b""  # the OS's randomness, read 4 KiB at a time for the ids below
_taken = 0


def _forget_random() -> None:
    global _random, _taken
    _random, _taken = b"", 0


os.register_at_fork(after_in_child=_forget_random)  # a forked worker must not repeat its parent's ids


def trace_id() -> str:
    """16 hex digits of the OS's randomness, as `secrets.token_hex(8)`, without a system call per request
    (a `getrandom` for every 512 ids)."""
    global _random, _taken
    if _taken >= len(_random):
        _random, _taken = os.urandom(4096), 0
    _taken += 8
    return _random[_taken - 8 : _taken].hex()


@dataclass(slots=True)  # no instance dict: one per request, kept while a long-poll is held
class Trace:
    id: str = field(default_factory=trace_id)
    started: float = field(default_factory=time.perf_counter)
    facts: dict[str, Any] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> facts for the trace record
    wall: float = field(default_factory=time.time)  # when the request started, for the trace record

    def stage(self, name: str) -> _Stage:
        """`with trace.stage(name):` times the block into `ms[name]`, whether it ends or raises."""
        return _Stage(self.ms, name)

    def note(self, **facts: Any) -> None:
        self.facts.update(facts)

    def detail(self, stage: str, **facts: Any) -> None:
        """Facts of `stage` for the trace record only (not the summary line)."""
        self.details.setdefault(stage, {}).update(facts)

    def summary(self, **first: Any) -> dict[str, Any]:
        """The summary line's fields: `first` (the status), the request id, the facts, the stages' times."""
        total = round((time.perf_counter() - self.started) * 1000, 3)
        return {**first, "request_id": self.id, **self.facts, "ms": {**self.ms, "total": total}}


class _Stage:
    """A class, not `contextlib.contextmanager`: a request enters eight stages, and the generator-based
    context manager cost about 1.5 µs each (bench/run.py)."""

    __slots__ = ("_ms", "_name", "_start")

    def __init__(self, ms: dict[str, float], name: str) -> None:
        self._ms = ms
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._ms[self._name] = round((time.perf_counter() - self._start) * 1000, 3)
