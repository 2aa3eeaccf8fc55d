"""What one request went through: stage timings and the facts each stage established.

The middleware creates a `Trace` per request; stages record into it; the summary log line (and the
refusal audit event) are written from it. It holds names, serials and decisions, never a token.
`note` adds to the flat facts of the summary line; `detail` adds what only the request's trace record
shows (the chain, the tickets' facts: `proxy.observability.traces`), so the log line stays short.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trace:
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started: float = field(default_factory=time.perf_counter)
    facts: dict[str, Any] = field(default_factory=dict)
    ms: dict[str, float] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> facts for the trace record
    wall: float = field(default_factory=time.time)  # when the request started, for the trace record

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - start) * 1000, 3)

    def note(self, **facts: Any) -> None:
        self.facts.update(facts)

    def detail(self, stage: str, **facts: Any) -> None:
        """Facts of `stage` for the trace record only (not the summary line)."""
        self.details.setdefault(stage, {}).update(facts)

    def summary(self) -> dict[str, Any]:
        total = round((time.perf_counter() - self.started) * 1000, 3)
        return {"request_id": self.id, **self.facts, "ms": {**self.ms, "total": total}}
