"""Waiting for what a daemon under test does, as a loaded machine lets it: polled, with a generous deadline.

A gateway writes a request's summary line (and its trace, and its metrics) when the request is done, which for a
forwarded answer is after the client has it. So right after curl returns, the line may not be there yet, and a
gateway that several tests share (module or session scope) already holds older lines for the same user: reading
"the latest matching line" can return an older test's. `JsonLog` reads a daemon's JSON log the way that avoids it
(docs/testing.md says what is left):

- `mark()` before a request: `wait_event`, `wait_for` and `wait_events` then read only lines written after it;
- lines are read whole (a line the daemon is still writing waits for the next poll);
- every wait polls until `WAIT` seconds have passed; only a failing test waits that long.

`eventually` is the same wait for anything else (a file, a metric, an admin page, a process's state).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

WAIT = 60.0  # seconds: a 2-core machine running several suites at once can stall a process for many seconds
POLL = 0.05

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """The first value `probe` returns that is neither None nor False, polled for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout} s still waiting for {what}")
        time.sleep(POLL)


def whole_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (a log, a trace export), oldest first: whole lines only, as a line
    the writer has not finished would not parse; lines that are not JSON objects (a traceback) are skipped."""
    text = path.read_text(errors="replace")
    whole = text[: text.rfind("\n") + 1]
    return [dict(json.loads(line)) for line in whole.splitlines() if line.startswith("{")]


class JsonLog:
    """The JSON-lines log of a daemon (`log_path`), read from the line `mark` remembered on."""

    log_path: Path
    since: int = 0  # the index (among whole JSON lines) from which the waits read; `mark` moves it

    def logs(self) -> list[dict[str, Any]]:
        """Every whole JSON line of the log, oldest first (a line still being written is left for later)."""
        return whole_json_lines(self.log_path)

    def events(self, name: str, after: int = 0) -> list[dict[str, Any]]:
        """The `name` events among the log's lines from line `after` on (see `mark`)."""
        return [e for e in self.logs()[after:] if e.get("event") == name]

    def mark(self) -> int:
        """From now on the waits see only lines written after this call (a request about to be sent); returns
        that position, for `events(name, after=...)`."""
        self.since = len(self.logs())
        return self.since

    def wait_events(
        self, name: str, count: int = 1, timeout: float = WAIT, accept: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        """The `name` events since `mark` that `accept` takes, once there are at least `count` of them."""

        def found() -> list[dict[str, Any]] | None:
            events = [e for e in self.events(name, self.since) if accept is None or accept(e)]
            return events if len(events) >= count else None

        try:
            return eventually(found, f"{count} {name} event(s)", timeout)
        except AssertionError:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"fewer than {count} {name} events since line {self.since} in:\n{tail}") from None

    def wait_for(
        self, name: str, accept: Callable[[dict[str, Any]], bool], timeout: float = WAIT, what: str = ""
    ) -> dict[str, Any]:
        """The latest `name` event since `mark` that `accept` takes, polled for."""
        try:
            return self.wait_events(name, 1, timeout, accept)[-1]
        except AssertionError:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"no {name} event matching {what} since line {self.since} in:\n{tail}") from None

    def wait_event(self, name: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        """The latest `name` event since `mark` whose fields equal `match`, polled for."""
        return self.wait_for(name, lambda e: all(e.get(k) == v for k, v in match.items()), timeout, str(match))
