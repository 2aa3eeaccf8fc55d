"""`kcd-proxy` with tracemalloc on: where a held long-poll's Python memory goes (bench/run.py, memory breakdown).

Runs the gateway's own command line (`python -m bench.traced run --config F`, as `python -m proxy`) with
`tracemalloc` tracing one frame per allocation. On SIGUSR1 it writes the live Python allocations, summed
by the file and by the line that made them, to the JSON file named by `KCD_BENCH_SNAPSHOT`
(`{file: bytes, "file:line": bytes}`). The bench
takes one snapshot before the long-polls are held and one while they are, and divides the difference by
their number. What tracemalloc cannot see (OpenSSL's per-connection objects, made with C's malloc; the
allocator's own overhead) is the process's RSS growth less that.

A bench tool, not a way to run the gateway: tracing makes every allocation slower.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def snapshot(_signum: int, _frame: FrameType | None) -> None:
    sizes: dict[str, int] = {}  # "file" and "file:line" -> bytes
    for stat in tracemalloc.take_snapshot().statistics("lineno"):
        frame = stat.traceback[0]
        sizes[frame.filename] = sizes.get(frame.filename, 0) + stat.size
        sizes[f"{frame.filename}:{frame.lineno}"] = stat.size
    out = Path(os.environ["KCD_BENCH_SNAPSHOT"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(sizes))
    tmp.replace(out)


def main() -> int:
    tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, snapshot)
    from proxy.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
