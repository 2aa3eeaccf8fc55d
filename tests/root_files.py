"""A run of the suite leaves no file in the repository's root: what the root had is what it has after.

Why: a user's FILE credential cache once appeared in the root (the cwd of the tests and of the gateways they
start), under a name of garbage bytes: MIT read a ccache name from freed memory (tests/integration/
test_ccache_names.py). Whatever writes a file there by accident (a ccache, a core file, a relative path resolved
against the cwd) now fails the run, naming the file and saying whether it is a FILE ccache (MIT's magic,
0x05 0x01-0x04). Directories are left out: pytest's and the tools' caches come and go there.
"""

from __future__ import annotations

from pathlib import Path

CCACHE_MAGIC = (b"\x05\x01", b"\x05\x02", b"\x05\x03", b"\x05\x04")  # MIT FILE ccache format versions 1-4


def root_files(root: Path) -> set[str]:
    """The names of the regular files directly in `root` (not following links: a link is a file of its own)."""
    return {entry.name for entry in root.iterdir() if entry.is_symlink() or entry.is_file()}


def describe(root: Path, name: str) -> str:
    """One new file for the failure report: its name as bytes would show it, its size, and whether it is a ccache."""
    path = root / name
    try:
        with path.open("rb") as f:
            head = f.read(2)
        size = path.lstat().st_size
    except OSError as e:
        return f"{name!r} (unreadable: {e})"
    kind = "a FILE credential cache: tickets and session keys" if head in CCACHE_MAGIC else "a file"
    return f"{name!r}: {size} bytes, {kind}"


def new_files(root: Path, before: set[str]) -> list[str]:
    """Each file in `root` now that was not in `before`, described."""
    return [describe(root, name) for name in sorted(root_files(root) - before)]
