"""A worker whose gateway ends on CancelledError (`proxy.workers._worker`): real forks, a stand-in `serve_one`, in a
process of its own."""

from __future__ import annotations

import subprocess
import sys

from tests.integration.conftest import free_port

_DRIVER = """
import asyncio, sys
from pathlib import Path
from proxy import workers
from proxy.config import Listener


def serve_one(worker):
    raise asyncio.CancelledError()


listener = Listener(host="127.0.0.1", port=int(sys.argv[1]), certificate=Path(), private_key=Path(), workers=2)
sys.exit(workers.supervise(listener, serve_one))
"""


def test_a_worker_ending_on_cancelled_error_says_so() -> None:
    """CancelledError is a BaseException: a worker's gateway ending on it (a reload cancelling its start-up did) left
    with code 1 and no line, and the supervisor stopped every worker pointing at "the worker's lines above"."""
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(free_port())], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1
    assert "worker_failed_to_start" in done.stdout + done.stderr
    assert "worker_crashed" in done.stdout + done.stderr, done.stdout + done.stderr
