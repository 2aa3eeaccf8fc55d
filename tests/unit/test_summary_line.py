"""The request's summary line written without the structlog chain: the same JSON, the same redaction."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from proxy.observability import logging as proxy_logging
from tests.unit.conftest import logging_configured

SECRET = "c2VjcmV0LXBhc3N3b3Jk"
REPO = Path(__file__).resolve().parents[2]


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


FIELDS: dict[str, Any] = {
    "status": 200,
    "method": "GET",
    "path": "/EWS/Exchange.asmx",
    "upn": "alice@lab.test",
    "revocation": "good",
    "restriction": None,
    "tls_resumed": False,
    "ms": {"tls": 0.03, "backend": 1.2, "total": 1.5},
    "factors": ("certificate",),
}


def test_the_line_is_the_chains_line(out: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Field for field (the time aside), the fast line is what the structlog chain writes for the same call,
    and the chain was not used to write it."""
    structlog.contextvars.bind_contextvars(request_id="abc123")
    assert proxy_logging._summary is not None
    monkeypatch.setattr(proxy_logging._summary, "_chain", None)  # the fast path must not need it
    try:
        proxy_logging.summary_line("request", **FIELDS)
        structlog.get_logger("proxy").info("request", **FIELDS)
    finally:
        structlog.contextvars.clear_contextvars()
    fast, chain = _lines(out)
    assert fast.pop("timestamp")[:16] == chain.pop("timestamp")[:16]
    assert fast == chain
    assert fast["request_id"] == "abc123"
    assert fast["event"] == "request"


@pytest.mark.parametrize("name", ["authorization", "backend_token", "cookie", "basic_password", "private_key"])
def test_a_secret_named_field_is_redacted(out: io.StringIO, name: str) -> None:
    """A field whose name marks a secret is blanked, as the chain's last processor does, context ones too."""
    structlog.contextvars.bind_contextvars(session_cookie=SECRET)
    try:
        proxy_logging.summary_line("request", **{name: f"Negotiate {SECRET}"}, status=200)
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = _lines(out)
    assert line[name] == "[redacted]"
    assert line["session_cookie"] == "[redacted]"
    assert SECRET not in out.getvalue()


@pytest.mark.parametrize(
    "value",
    [
        "alice@lab.te\u017ft",  # non-ASCII: the chain writes \\u escapes, and so does the line
        "\ud800",  # a lone surrogate orjson refuses
        2**70,  # an integer past 64 bits
        object(),  # a type orjson does not know
    ],
)
def test_what_orjson_would_write_otherwise_goes_through_the_chain(out: io.StringIO, value: object) -> None:
    """Values orjson cannot write as the chain does make the line go through the chain: still one JSON line,
    ASCII only, and redacted."""
    proxy_logging.summary_line("request", upn=value, authorization=SECRET, status=403)
    text = out.getvalue()
    assert text.isascii()
    (line,) = _lines(out)
    assert line["authorization"] == "[redacted]"
    assert line["status"] == 403
    assert SECRET not in text


def test_above_info_no_line_is_written() -> None:
    """At log level warning the summary line, an info line, is not written (as the chain's filter does)."""
    stream = io.StringIO()
    with logging_configured("warning", stream):
        proxy_logging.summary_line("request", status=200)
    assert stream.getvalue() == ""


def test_captured_logs_still_see_the_line(out: io.StringIO) -> None:
    """When structlog is configured otherwise (capture_logs in a test), the line goes through that configuration."""
    with structlog.testing.capture_logs() as logs:
        proxy_logging.summary_line("request", status=204)
    assert logs == [{"event": "request", "status": 204, "log_level": "info"}]
    assert out.getvalue() == ""


def test_the_line_leaves_the_process_at_once_when_stdout_is_a_file(tmp_path: Path) -> None:
    """With stdout redirected to a file (block-buffered, no PYTHONUNBUFFERED, as under `> gateway.log` or a
    service manager's pipe), the summary line is in the file while the process still runs, not at its exit."""
    script = "import sys\nfrom proxy.observability.logging import configure, summary_line\n"
    script += "configure('info')\nsummary_line('request', upn='alice@lab.test')\nsys.stdin.read()\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(REPO)}
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=out, env=env)
    try:
        deadline = time.monotonic() + 30
        while '"upn":"alice@lab.test"' not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the summary line stayed in the process's buffer"
            time.sleep(0.05)
    finally:
        proc.communicate(b"", timeout=30)
