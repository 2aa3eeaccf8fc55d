"""`kcd-proxy` with its held objects counted: which Python objects a held long-poll keeps, and who made them.

Runs the gateway's own command line (`python -m bench.objects run --config F`, as `python -m proxy`) with
`tracemalloc` keeping `KCD_BENCH_FRAMES` frames per allocation (default 8). The first SIGUSR1 takes the
baseline (before the long-polls are held); each later one writes, to the JSON file named by
`KCD_BENCH_SNAPSHOT`, what grew since it:

- `by_traceback`: bytes and blocks of the live allocations grown since the baseline, grouped by their whole
  traceback (innermost frame first), largest first;
- `by_type`: live objects the collector tracks, counted by type, and their `sys.getsizeof` bytes (the
  object itself, not what it points to), as differences from the baseline;
- `largest`: the largest lists, dicts, sets and bytearrays alive, and the types of what refers to them;
- `coroutines`: the suspended coroutines' code (`cr_code` of each live coroutine), counted, with the size of
  their frames: each held request is a chain of awaits, and each suspended one keeps its frame and locals.

`bench.traced` is the cheap view (one frame, by file and line, what `make bench` prints); this one is for
attributing a change before it is made. A bench tool, not a way to run the gateway.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from types import CoroutineType, FrameType
from typing import Any

_baseline: dict[str, Any] = {}


def _types() -> tuple[Counter[str], Counter[str]]:
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        count[name] += 1
        size[name] += sys.getsizeof(obj)
    return count, size


def _coroutines() -> Counter[str]:
    frames: Counter[str] = Counter()
    for obj in gc.get_objects():
        if isinstance(obj, CoroutineType) and obj.cr_frame is not None:
            code = obj.cr_code
            frames[f"{code.co_filename.rpartition('/')[2]}:{code.co_qualname}"] += 1
    return frames


def _largest(kinds: tuple[type, ...] = (list, dict, set, bytearray), top: int = 12) -> list[dict[str, Any]]:
    """The largest containers alive, with who refers to them: a container that grows with the held requests."""
    found = sorted((o for o in gc.get_objects() if type(o) in kinds), key=sys.getsizeof, reverse=True)[:top]
    out = []
    for obj in found:
        referrers = [type(r).__qualname__ for r in gc.get_referrers(obj) if r is not found]
        out.append(
            {"type": type(obj).__qualname__, "bytes": sys.getsizeof(obj), "len": len(obj), "referrers": referrers[:5]}
        )
    return out


def _grouped(snap: tracemalloc.Snapshot) -> dict[tuple[str, ...], tuple[int, int]]:
    """Live allocations by whole traceback (innermost frame first): bytes and blocks."""
    return {
        tuple(f"{frame.filename}:{frame.lineno}" for frame in reversed(stat.traceback)): (stat.size, stat.count)
        for stat in snap.statistics("traceback")
    }


def snapshot(_signum: int, _frame: FrameType | None) -> None:
    # The objects are counted while the same probe objects are alive in both snapshots (the baseline's grouped
    # allocations, not a tracemalloc snapshot: its lists of traces would count as held objects).
    gc.collect()
    if not _baseline:
        _baseline["grouped"] = _grouped(tracemalloc.take_snapshot())
        _baseline["count"], _baseline["size"] = _types()
        _baseline["coroutines"] = _coroutines()
        out: dict[str, Any] = {"baseline": True}
    else:
        count, size = _types()
        coroutines = _coroutines()
        largest = _largest()
        grouped = _grouped(tracemalloc.take_snapshot())
        before = _baseline["grouped"]
        grown = []
        for frames in set(grouped) | set(before):
            size_now, blocks_now = grouped.get(frames, (0, 0))
            size_then, blocks_then = before.get(frames, (0, 0))
            if size_now != size_then:
                grown.append({"bytes": size_now - size_then, "blocks": blocks_now - blocks_then, "frames": frames})
        grown.sort(key=lambda g: -g["bytes"])
        out = {
            "by_traceback": grown[:400],
            "by_type": {
                name: {"count": count[name] - _baseline["count"][name], "bytes": size[name] - _baseline["size"][name]}
                for name in set(count) | set(_baseline["count"])
                if count[name] != _baseline["count"][name]
            },
            "largest": largest,
            "coroutines": {
                name: coroutines[name] - _baseline["coroutines"][name]
                for name in set(coroutines) | set(_baseline["coroutines"])
                if coroutines[name] != _baseline["coroutines"][name]
            },
        }
    path = Path(os.environ["KCD_BENCH_SNAPSHOT"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)


def main() -> int:
    tracemalloc.start(int(os.environ.get("KCD_BENCH_FRAMES", "8")))
    signal.signal(signal.SIGUSR1, snapshot)
    from proxy.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
