"""Reading a file the configuration names, bounded: a regular file, at most so many bytes.

A path in the configuration is checked when the configuration is read, but the file is read again later (a
reload, every CRL refresh), and by then it may be anything: a FIFO (a plain read waits for a writer that never
comes, and with it every later refresh), a device (`/dev/zero` never ends) or a file that grows while it is read.
`read_bounded` opens without waiting (O_NONBLOCK: a FIFO opens at once), refuses what is not a regular file, and
reads at most `limit` bytes and one more to tell a file that is too large.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NoReturn


def read_bounded(path: Path | str, limit: int) -> bytes:
    """The bytes of the regular file at `path`; OSError if it is not one, or holds more than `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        _refused(fd)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"more than {limit} bytes")
    return data


def _refused(fd: int) -> NoReturn:
    """Close `fd` and say what it is instead of a regular file (checked before `fdopen`, whose refusal of a directory
    names the descriptor: "Is a directory: 3")."""
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISDIR(mode):
        raise OSError(errno.EISDIR, "a directory, not a file")
    raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device?)")
