"""What one request went through: stage timings and the facts each stage established.

The middleware creates a `Trace` per request; stages record into it; the summary log line (and the
refusal audit event) are written from it. It holds names, serials and decisions, never a token.
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

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = round((time.perf_counter() - start) * 1000, 3)

    def note(self, **facts: Any) -> None:
        self.facts.update(facts)

    def summary(self) -> dict[str, Any]:
        total = round((time.perf_counter() - self.started) * 1000, 3)
        return {"request_id": self.id, **self.facts, "ms": {**self.ms, "total": total}}
