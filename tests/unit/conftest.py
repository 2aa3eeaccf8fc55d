"""Fixtures shared by the unit tests."""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from proxy.observability import logging as proxy_logging


@pytest.fixture(autouse=True)
def _krb5_config_put_back() -> Iterator[None]:
    """KRB5_CONFIG as it was before each test. `proxy.kerberos.profile.use_profile` (a Delegator, a Directory, the
    profile tests) sets it for the whole process, and `monkeypatch.delenv("KRB5_CONFIG", raising=False)` puts
    nothing back when it was not set: test_krb5conf's krb5.conf that MIT refuses stayed named there, and a later
    test's child process (test_default_ccache's, which inherits the environment) failed krb5_init_context."""
    before = os.environ.get("KRB5_CONFIG")
    yield
    if before is None:
        os.environ.pop("KRB5_CONFIG", None)
    else:
        os.environ["KRB5_CONFIG"] = before


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
