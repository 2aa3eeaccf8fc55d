"""The summary line's timestamp, formatted once per second, and its reading of structlog's configuration."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import structlog
import structlog.testing

from proxy.observability.logging import _configured_processors, _timestamp


def chains(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")


def test_exact_times_are_written_as_the_chain_writes_them() -> None:
    """Whole seconds (no fraction: isoformat leaves it out), and fractions a float holds exactly."""
    for second in (0, 1, 59, 1_733_356_800, 1_796_428_799, 4_102_444_799):
        for fraction in (0.0, 0.5, 0.25, 0.125, 0.0625, 0.9375):
            now = second + fraction
            assert _timestamp(now) == chains(now), now


def test_any_time_is_within_a_microsecond_of_the_chains() -> None:
    """Random times across the years, in and out of order: the same shape, the same instant to a microsecond
    (the per-second text is never reused for another second)."""
    rng = random.Random(18)
    for _ in range(20_000):
        now = rng.choice([rng.uniform(0, 4_102_444_800), 1_796_428_799 + rng.random() * 2])
        ours, theirs = _timestamp(now), chains(now)
        assert ours.endswith("Z")
        parsed = datetime.fromisoformat(ours.replace("Z", "+00:00"))
        assert abs(parsed - datetime.fromisoformat(theirs.replace("Z", "+00:00"))) <= timedelta(microseconds=1)
        assert len(ours) in (20, 27)


def test_the_processors_read_are_structlogs_configured_ones() -> None:
    """The fast path reads structlog's configuration without `get_config`: the same list, also after a change
    (a test's capture_logs), so a line is never written past a configuration it should go through."""
    assert _configured_processors() is structlog.get_config()["processors"]
    with structlog.testing.capture_logs():  # it changes the list in place
        assert _configured_processors() is structlog.get_config()["processors"]
        assert any(isinstance(p, structlog.testing.LogCapture) for p in _configured_processors())
    assert _configured_processors() is structlog.get_config()["processors"]
