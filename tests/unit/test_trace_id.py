"""Request ids: random, 16 hex digits, never repeated, not even by a forked worker."""

from __future__ import annotations

import os
import re

from proxy.observability.trace import Trace, trace_id


def test_ids_are_sixteen_hex_digits_and_unique() -> None:
    """100,000 ids (many refills of the buffer): the format of secrets.token_hex(8), no repeat."""
    ids = [Trace().id for _ in range(50_000)] + [trace_id() for _ in range(50_000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_does_not_repeat_its_parents_ids() -> None:
    """After a fork (`[listener] workers`), parent and child each draw ids the other never does."""
    trace_id()  # the buffer holds unread randomness now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(trace_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {trace_id() for _ in range(100)}
    assert len(child) == 100
    assert not child & parent
