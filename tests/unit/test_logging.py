"""Every line the process writes is one JSON object of the same pipeline, and holds no credential."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from proxy.observability import logging as proxy_logging

SECRET = "c2VjcmV0LXBhc3N3b3Jk"


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_aiohttp_parse_error_is_json_without_the_header_it_quotes(out: io.StringIO) -> None:
    """aiohttp's parse error quotes the bad header line; the log line names the error, not the line."""
    line = f"Authorization: Basic {SECRET}\x01"
    try:
        raise BadHttpMessage(f"Invalid header value char:\n\n    {line.encode()!r}\n    ^")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "192.0.2.1")
    (record,) = _lines(out)
    assert record["event"] == "Error handling request from 192.0.2.1"
    assert record["logger"] == "aiohttp.server"
    assert record["level"] == "error"
    assert record["error"] == "BadHttpMessage"
    assert record["error_detail"] == "Invalid header value char"
    assert SECRET not in out.getvalue()


def test_a_quoted_value_on_the_first_line_is_left_out(out: io.StringIO) -> None:
    """aiohttp's LineTooLong quotes the start of the field on its first line: the detail stops before it."""
    try:
        raise LineTooLong(f"session={SECRET}".encode()[:100], 98304)
    except LineTooLong:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    (record,) = _lines(out)
    assert record["error_detail"] == "Got more than 98304 bytes when reading (quoted bytes left out)"
    assert SECRET not in out.getvalue()


def test_library_text_is_scrubbed_of_credentials(out: io.StringIO) -> None:
    """A library that writes a header or a token into its message: the value is redacted."""
    log = logging.getLogger("some.library")
    log.warning("sent Authorization: Negotiate %s and Cookie: session=%s", SECRET, SECRET)
    log.warning("b'Proxy-Authorization: Basic %s' then bearer %s", SECRET, SECRET)
    assert SECRET not in out.getvalue()
    assert len(_lines(out)) == 2


def test_warnings_and_uncaught_exceptions_become_json_lines(out: io.StringIO) -> None:
    """`warnings`, an uncaught exception and one in a thread: JSON lines, their text scrubbed."""
    warnings.warn(f"deprecated Authorization: Basic {SECRET}", UserWarning, stacklevel=1)
    try:
        raise RuntimeError(f"Cookie: s={SECRET}")
    except RuntimeError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    thread = threading.Thread(target=lambda: 1 / 0)
    thread.start()
    thread.join()
    records = _lines(out)
    assert [r["logger"] for r in records] == ["py.warnings", "proxy.uncaught", "proxy.uncaught"]
    assert records[1]["error"] == "RuntimeError"
    assert records[2]["error"] == "ZeroDivisionError"
    assert SECRET not in out.getvalue()


def test_our_own_bugs_keep_their_traceback(out: io.StringIO) -> None:
    """An exception raised in the gateway's own code is logged with its traceback (scrubbed)."""
    try:
        proxy_logging.scrub(None)  # type: ignore[arg-type]
    except TypeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    (record,) = _lines(out)
    assert "proxy/observability/logging.py" in str(record["traceback"])


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        (f"Authorization: Basic {SECRET}", "Authorization: [redacted]"),
        (f"authorization= Negotiate {SECRET}", "authorization= [redacted]"),
        (f"b'Cookie: a={SECRET}; b=1'", "b'Cookie: [redacted]'"),
        (f"X-Auth-Token: {SECRET}", "X-Auth-Token: [redacted]"),
        (f"scheme Negotiate {SECRET}", "scheme Negotiate [redacted]"),
        ("nothing to hide here", "nothing to hide here"),
    ],
)
def test_scrub(text: str, kept: str) -> None:
    """Header values and scheme tokens are replaced; other text is left alone."""
    assert proxy_logging.scrub(text) == kept


def test_a_structlog_exception_says_what_failed(out: io.StringIO) -> None:
    """`log.exception(...)` through structlog (the gateway's `request_failed`, a 500) carries the error's type and our
    traceback, not only `exc_info: true`."""
    try:
        proxy_logging.scrub(None)  # type: ignore[arg-type]
    except TypeError:
        structlog.get_logger("proxy").exception("request_failed", request_id="r1")
    (record,) = _lines(out)
    assert record["event"] == "request_failed"
    assert record["error"] == "TypeError"
    assert "proxy/observability/logging.py" in str(record["traceback"])
    assert "exc_info" not in record


def test_our_own_traceback_through_structlog_is_scrubbed(out: io.StringIO) -> None:
    """`log.exception(...)` of our own code (the gateway's `request_failed`, a 500) whose exception quotes a header it
    was handed keeps its traceback, the credential in it redacted: the structlog chain scrubs it as the standard one
    does (the header value a bug of ours puts in a message is the client's)."""

    ours: dict[str, Any] = {"__name__": "proxy.example"}  # a function of a gateway module, as `_is_ours` sees it
    exec("def parse(value):\n    raise ValueError(f'cannot read {value!r}')", ours)  # noqa: S102
    try:
        ours["parse"](f"Authorization: Basic {SECRET}")
    except ValueError:
        structlog.get_logger("proxy").exception("request_failed", request_id="r1")
    (record,) = _lines(out)
    assert "in parse" in str(record["traceback"])
    assert SECRET not in out.getvalue()


@pytest.mark.parametrize(
    ("message", "told"),
    [
        ("Missing 'Host' header in request.", "Missing 'Host' header in request."),
        ("Duplicate 'Host' header found.", "Duplicate 'Host' header found."),
        (f"Invalid header value char:\n\n  b'Cookie: s={SECRET}\\x01'\n  ^", "Invalid header value char"),
        (f"Bad status line 'GET /?{SECRET} HTTP/1.1 x'", "Bad status line (quoted bytes left out)"),
        (f"Duplicate 'X-{SECRET}' header found. 'x'", "Duplicate (quoted bytes left out)"),
    ],
)
def test_unquoted_keeps_what_was_wrong_and_drops_what_the_client_sent(message: str, told: str) -> None:
    """A parse error's message as a device and the log get it: aiohttp's own header names kept, a client's bytes cut."""
    assert proxy_logging.unquoted(message) == told


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/owa/a@b:c", "/owa/a@b:c"),  # origin-form: a path, whatever it holds
        ("*", "*"),
        ("http://cas.lab.test/owa/", "http://cas.lab.test/owa/"),
        (f"http://alice:{SECRET}@cas.lab.test/owa/", "http://[redacted]@cas.lab.test/owa/"),
        (f"https://alice:{SECRET}/x@y@cas.lab.test/owa/", "https://[redacted]@cas.lab.test/owa/"),  # decoded '/', '@'
        (f"alice:{SECRET}@cas.lab.test:443", "[redacted]@cas.lab.test:443"),  # CONNECT's authority-form
    ],
)
def test_logged_path_keeps_no_user_information_of_an_absolute_form_target(path: str, logged: str) -> None:
    """The summary line's path: an absolute-form target's user information (a password) left out, every path kept."""
    assert proxy_logging.logged_path(path) == logged


@pytest.mark.parametrize(
    "message",
    [f"http://h:99999/?access_token={SECRET}", f"alice:{SECRET}@h:99999", f"/owa/{SECRET}\x7f"],
)
def test_unquoted_leaves_out_a_message_that_is_the_clients_bytes_alone(message: str) -> None:
    """aiohttp's InvalidURLError for a target it cannot parse is the target, unquoted: left out whole."""
    assert proxy_logging.unquoted(message) == "(the client's bytes left out)"
