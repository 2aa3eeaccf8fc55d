"""Fixtures shared by the unit tests."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from proxy.certs.chain import TrustList
from proxy.kerberos import profile
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


@contextlib.contextmanager
def logging_configured(level: str, stream: io.StringIO) -> Iterator[None]:
    """The process's logging configured onto `stream` at `level` (`proxy_logging.configure`), and everything that
    configures put back afterwards: structlog, the root logger's handler and level, warnings capture, the summary
    line's writer, and the excepthooks (pytest's own threading.excepthook among them, installed once per run: left
    replaced, a later test's thread dying of an exception was reported to the gateway's logger, not by pytest)."""
    saved = structlog.get_config()
    hooks = (sys.excepthook, threading.excepthook)
    root_level = logging.getLogger().level
    proxy_logging.configure(level, stream)
    try:
        yield
    finally:
        structlog.configure(**saved)
        sys.excepthook, threading.excepthook = hooks
        if proxy_logging._handler is not None:
            logging.getLogger().removeHandler(proxy_logging._handler)
            proxy_logging._handler = None
        logging.getLogger().setLevel(root_level)
        logging.captureWarnings(False)
        proxy_logging._summary = None


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """The process's logging configured onto a buffer, and put back afterwards."""
    stream = io.StringIO()
    with logging_configured("info", stream):
        yield stream


@pytest.fixture
def fresh_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """proxy.kerberos.profile as at a process's start: no copy made, no realm section, no KRB5_CONFIG. What
    `use_profile` then writes into KRB5_CONFIG is undone after the test (a delenv of a variable that is not set
    records nothing, and a child process of a later test inherited an overlay naming a krb5.conf MIT refuses)."""
    monkeypatch.setattr(profile, "_merged", profile._Merged())
    monkeypatch.setattr(profile, "_realms", {})
    monkeypatch.setattr(profile, "_set", [])
    monkeypatch.setattr(profile, "_bases", [])
    monkeypatch.setattr(profile, "_primaries_looked", [-math.inf])
    monkeypatch.setenv("KRB5_CONFIG", "")  # recorded, whether it was set or not: restored as it was
    monkeypatch.delenv("KRB5_CONFIG")
