"""The text a worker's reload leaves for a replacement (`proxy.live.keep_reloaded`): the latest reading's, or none."""

from __future__ import annotations

import os
from pathlib import Path

from proxy.live import keep_reloaded, read_in_order


def test_the_text_read_later_stays_when_an_earlier_reading_ends_after_it(tmp_path: Path) -> None:
    """Two readings of the file in order; the later one kept first: the earlier one, ending after, leaves it."""
    config, kept = tmp_path / "gateway.toml", tmp_path / "reloaded.toml"
    config.write_bytes(b"first")
    first = read_in_order(config, kept)
    config.write_bytes(b"second")
    second = read_in_order(config, kept)
    assert (first[0], second[0]) == (b"first", b"second")
    assert first[1] < second[1]
    keep_reloaded(kept, *second)
    keep_reloaded(kept, *first)
    assert kept.read_bytes() == b"second"
    third = read_in_order(config, kept)
    keep_reloaded(kept, b"third", third[1])
    assert kept.read_bytes() == b"third"


def test_a_text_that_cannot_be_written_leaves_none_rather_than_an_older_one(tmp_path: Path) -> None:
    """The part file cannot be written (a directory in its place): the kept text of an earlier reload is emptied."""
    config, kept = tmp_path / "gateway.toml", tmp_path / "reloaded.toml"
    config.write_bytes(b"first")
    keep_reloaded(kept, *read_in_order(config, kept))
    (tmp_path / f".reloaded.toml.{os.getpid()}").mkdir()
    config.write_bytes(b"second")
    keep_reloaded(kept, *read_in_order(config, kept))
    assert kept.read_bytes() == b""
