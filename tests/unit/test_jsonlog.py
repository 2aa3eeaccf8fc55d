"""The integration tests' log reader (tests/integration/jsonlog.py): what a test waits for is its own request's."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.jsonlog import JsonLog, eventually, whole_json_lines


@dataclass
class Log(JsonLog):
    log_path: Path


def _append(path: Path, **fields: object) -> None:
    with path.open("a") as f:
        f.write(json.dumps(fields) + "\n")


def test_a_line_from_before_the_mark_never_answers(tmp_path: Path) -> None:
    """An older request's line for the same user (the CI failure: a refused one, without "mapping") is not
    returned after `mark`, however well it matches; the wait returns the new request's line once it comes."""
    log = Log(tmp_path / "gateway.log")
    _append(log.log_path, event="request", upn="alice@ad.test", status=403)
    log.mark()
    with pytest.raises(AssertionError, match="no request event"):
        log.wait_event("request", timeout=0.3, upn="alice@ad.test")
    new = {"event": "request", "upn": "alice@ad.test", "mapping": "sid"}
    later = threading.Timer(0.2, _append, (log.log_path,), new)
    later.start()
    try:
        assert log.wait_event("request", timeout=30, upn="alice@ad.test")["mapping"] == "sid"
    finally:
        later.join()


def test_a_line_still_being_written_is_left_for_the_next_read(tmp_path: Path) -> None:
    """A line the daemon has not finished (no newline yet) is neither parsed (it would not be JSON) nor counted
    by `mark`: once finished it is read, and it counts as written after the mark."""
    path = tmp_path / "gateway.log"
    path.write_text('{"event": "listening"}\n{"event": "request", "upn": "al')
    log = Log(path)
    assert [e["event"] for e in log.logs()] == ["listening"]
    assert log.mark() == 1
    with path.open("a") as f:
        f.write('ice@lab.test"}\n')
    assert log.wait_event("request", timeout=5)["upn"] == "alice@lab.test"


def test_wait_events_counts_only_lines_since_the_mark(tmp_path: Path) -> None:
    """`wait_events(name, n)` waits for n lines written after the mark; older ones do not make up the number."""
    log = Log(tmp_path / "gateway.log")
    for _ in range(3):
        _append(log.log_path, event="request", status=200)
    log.mark()
    _append(log.log_path, event="request", status=200)
    with pytest.raises(AssertionError, match="fewer than 2 request events"):
        log.wait_events("request", 2, timeout=0.3)
    _append(log.log_path, event="request", status=401)
    assert [e["status"] for e in log.wait_events("request", 2, timeout=5)] == [200, 401]
    assert len(log.events("request")) == 5  # `events` without `after` still reads the whole log


def test_lines_that_are_not_json_objects_are_skipped(tmp_path: Path) -> None:
    """A traceback or a library's plain line in the log is not a JSON object: skipped, not an error."""
    path = tmp_path / "export.jsonl"
    path.write_text('Traceback (most recent call last):\n{"id": "a"}\n  File "x"\n{"id": "b"}\n')
    assert [r["id"] for r in whole_json_lines(path)] == ["a", "b"]


def test_eventually_returns_the_first_value_and_says_what_it_waited_for() -> None:
    """`eventually` returns the probe's first value that is not None/False (a 0 counts), and on time out names
    what it waited for."""
    answers = iter([None, False, 0])
    assert eventually(lambda: next(answers), "a zero", timeout=5) == 0
    with pytest.raises(AssertionError, match="still waiting for the impossible"):
        eventually(lambda: None, "the impossible", timeout=0.2)
