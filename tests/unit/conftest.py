"""Fixtures shared by the unit tests."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from proxy.certs.chain import TrustList
from proxy.lab.pki import Pki, make_pki
from proxy.observability import logging as proxy_logging

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)  # the certificate tests' clock: the lab PKI is made at it


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The lab's PKI (root, issuing CA, users, CRLs) made at NOW, one for each test module."""
    return make_pki(tmp_path_factory.mktemp("pki"), now=NOW)


@pytest.fixture(scope="module")
def trust(pki: Pki) -> TrustList:
    """The trust list of that PKI: its root as the anchor, its issuing CA as the intermediate."""
    return TrustList.load([pki.root_cert], [pki.issuing_cert])


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
