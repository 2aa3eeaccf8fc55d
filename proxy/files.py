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


def read_bounded(path: Path | str, limit: int) -> bytes:
    """The bytes of the regular file at `path`; OSError if it is not one, or holds more than `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device?)")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"more than {limit} bytes")
    return data
