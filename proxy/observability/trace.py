"""What one request went through: stage timings and the facts each stage established.

The middleware creates a `Trace` per request; stages record into it; the summary log line (and the
refusal audit event) are written from it. It holds names, serials and decisions, never a token.
`note` adds to the flat facts of the summary line; `detail` adds what only the request's trace record
shows (the chain, the tickets' facts: `proxy.observability.traces`), so the log line stays short.
"""

from __future__ import annotations

import os
import time
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


class Trace:
    """One request's trace. Its facts, stage times and details are noted flat (name, value, name, value, ... in
    the order noted) and made into the dictionaries `facts`, `ms` and `details` when first read, which is once
    the request has ended (the summary line, metrics, the trace record): a long-poll is held for half an hour
    with its trace, and three flat lists keep what four dictionaries kept in about half the memory (a request's
    twenty-odd facts grew their dictionary's table to 64 slots). Once read, a dictionary is the trace's: later
    notes go into it. The dictionaries are what `dict.update` in the order noted makes, so every field keeps
    its place (a fact noted twice keeps its first place and its last value)."""

    __slots__ = ("_detailed", "_details", "_facts", "_ms", "_noted", "_timed", "_values", "id", "started", "wall")

    def __init__(self) -> None:
        self.id = trace_id()
        self.started = time.perf_counter()
        self.wall = time.time()  # when the request started, for the trace record
        self._noted: list[str] = []  # the facts' names, in the order noted; until `facts` is read
        self._values: list[Any] = []  # and their values
        self._timed: list[Any] = []  # stage times: name, ms, ...; until `ms` is read
        self._detailed: list[Any] = []  # details: stage, name, value, ...; until `details` is read
        self._facts: dict[str, Any] | None = None
        self._ms: dict[str, float] | None = None
        self._details: dict[str, dict[str, Any]] | None = None

    @property
    def facts(self) -> dict[str, Any]:
        """The summary line's facts, by name, in the order noted."""
        facts = self._facts
        if facts is None:
            facts = self._facts = dict(zip(self._noted, self._values, strict=True))
            self._noted = self._values = _READ
        return facts

    @facts.setter
    def facts(self, value: dict[str, Any]) -> None:
        self._facts, self._noted, self._values = value, _READ, _READ

    @property
    def ms(self) -> dict[str, float]:
        """Each stage's time in milliseconds, in the order the stages ended."""
        ms = self._ms
        if ms is None:
            timed = iter(self._timed)
            ms = self._ms = dict(zip(timed, timed, strict=True))
            self._timed = _READ
        return ms

    @ms.setter
    def ms(self, value: dict[str, float]) -> None:
        self._ms, self._timed = value, _READ

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        """Stage -> facts for the trace record only, in the order noted."""
        details = self._details
        if details is None:
            details = self._details = {}
            detailed = iter(self._detailed)
            for stage, name, value in zip(detailed, detailed, detailed, strict=True):
                details.setdefault(stage, {})[name] = value
            self._detailed = _READ
        return details

    @details.setter
    def details(self, value: dict[str, dict[str, Any]]) -> None:
        self._details, self._detailed = value, _READ

    def stage(self, name: str) -> _Stage:
        """`with trace.stage(name):` times the block into `ms[name]`, whether it ends or raises."""
        return _Stage(self, name)

    def note(self, **facts: Any) -> None:
        if self._facts is not None:
            self._facts.update(facts)
            return
        self._noted.extend(facts)
        self._values.extend(facts.values())

    def note_all(self, names: tuple[str, ...], values: tuple[Any, ...]) -> None:
        """`note` of the facts `names` with `values`, in that order, as one call of `note` per fact would note them
        (a connection's facts, made into these two tuples once: `proxy.pipeline`)."""
        if self._facts is not None:
            self._facts.update(zip(names, values, strict=True))
            return
        self._noted.extend(names)
        self._values.extend(values)

    def detail(self, stage: str, **facts: Any) -> None:
        """Facts of `stage` for the trace record only (not the summary line)."""
        if self._details is not None:
            self._details.setdefault(stage, {}).update(facts)
            return
        detailed = self._detailed
        for name, value in facts.items():
            detailed.append(stage)
            detailed.append(name)
            detailed.append(value)

    def timed(self, name: str, ms: float) -> None:
        """`ms[name] = ms`."""
        if self._ms is not None:
            self._ms[name] = ms
        else:
            self._timed.append(name)
            self._timed.append(ms)

    def summary(self, **first: Any) -> dict[str, Any]:
        """The summary line's fields: `first` (the status), the request id, the facts, the stages' times."""
        # Milliseconds to the microsecond as `round(seconds * 1e6) / 1e3` here and at every stage's time, not
        # `round(seconds * 1000, 3)`: round's decimal rounding to 3 places costs about 2,400 instructions a call, and a
        # request makes ten (docs/performance.md, "Instructions per request, counted").
        total = round((time.perf_counter() - self.started) * 1e6) / 1e3
        return {**first, "request_id": self.id, **self.facts, "ms": {**self.ms, "total": total}}


_READ: list[Any] = []  # what a flat list is once its dictionary is made (never appended to: the dictionary is)


class _Stage:
    """A class, not `contextlib.contextmanager`: a request enters eight stages, and the generator-based
    context manager cost about 1.5 µs each (bench/run.py)."""

    __slots__ = ("_name", "_start", "_trace")

    def __init__(self, trace: Trace, name: str) -> None:
        self._trace = trace
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._trace.timed(self._name, round((time.perf_counter() - self._start) * 1e6) / 1e3)
