"""`kcd-proxy` with a probe of its native memory: where a held long-poll's memory goes outside Python.

Runs the gateway's own command line (`python -m bench.native run --config F`, as `python -m proxy`). On
SIGUSR1 it writes, to the JSON file named by `KCD_BENCH_SNAPSHOT`, what glibc's allocator and the kernel
say about the process: `mallinfo2()` (bytes in use and free in the main arena and the others, in mmap'd
blocks), the arenas of `malloc_info()` (one per thread that allocated: the KDC executor's threads make
their own), the threads, `/proc/self/smaps_rollup`, and Python's own allocator for objects of up to 512
bytes, whose arenas are mapped outside malloc (`sys._debugmallocstats`: bytes in its arenas, in blocks in
use, free in partly used pools). The bench takes one snapshot before the long-polls are held and one while
they are, and divides the difference by their number.

A bench tool, not a way to run the gateway.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2
_libc.open_memstream.restype = ctypes.c_void_p
_libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.free.argtypes = [ctypes.c_void_p]


def malloc_info() -> str:
    """glibc's `malloc_info(0, ...)` XML: one `<heap>` per arena."""
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = _libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    _libc.malloc_info(0, stream)
    _libc.fclose(stream)
    text = (buf.value or b"").decode()
    _libc.free(ctypes.cast(buf, ctypes.c_void_p))
    return text


def arenas(xml: str) -> list[dict[str, int]]:
    """Per arena: bytes the arena took from the system (`mem`), and bytes free in it (`free`: fast and rest)."""
    out = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', xml, re.S):
        free = sum(int(n) for n in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', heap))
        mem = re.search(r'<system type="current" size="(\d+)"', heap)
        out.append({"mem": int(mem.group(1)) if mem else 0, "free": free})
    return out


def obmalloc() -> dict[str, int]:
    """Python's small-object allocator, from `sys._debugmallocstats` (which writes to C's stderr)."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    figures = {}
    for key, pattern in (
        ("arena_bytes", r"# bytes lost to arena alignment\s*=\s*[\d,]+\nTotal\s*=\s*([\d,]+)"),
        ("in_blocks", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("free_in_pools", r"# bytes in available blocks\s*=\s*([\d,]+)"),
        ("unused_pools", r"unused pools \* \d+ bytes\s*=\s*([\d,]+)"),
    ):
        found = re.search(pattern, text, re.S)
        figures[key] = int(found.group(1).replace(",", "")) if found else -1
    return figures


def probe() -> dict[str, object]:
    info = _libc.mallinfo2()
    rollup = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        rollup[key] = int(value.split()[0]) * 1024
    xml = malloc_info()
    return {
        "mallinfo2": {name: getattr(info, name) for name in _MALLINFO2},
        "arenas": arenas(xml),
        "threads": threading.active_count(),
        "os_threads": sum(1 for _ in Path("/proc/self/task").iterdir()),
        "smaps_rollup": rollup,
        "python_blocks": sys.getallocatedblocks(),
        "obmalloc": obmalloc(),
    }


def snapshot(_signum: int, _frame: FrameType | None) -> None:
    out = Path(os.environ["KCD_BENCH_SNAPSHOT"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(probe()))
    tmp.replace(out)


def main() -> int:
    signal.signal(signal.SIGUSR1, snapshot)
    from proxy.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
