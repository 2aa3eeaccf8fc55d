"""Fixtures shared by the unit tests."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from proxy.observability import logging as proxy_logging


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """The process's logging configured onto a buffer, and put back afterwards."""
    saved = structlog.get_config()
    hooks = (sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    proxy_logging.configure("info", stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved)
        sys.excepthook, threading.excepthook = hooks
        if proxy_logging._handler is not None:
            logging.getLogger().removeHandler(proxy_logging._handler)
            proxy_logging._handler = None
        logging.captureWarnings(False)
        proxy_logging._summary = None
