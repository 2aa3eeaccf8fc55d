"""Structured logging: JSON lines on stdout, one summary line per request, never a secret.

Request context (request id, certificate, principal...) is bound with structlog's context variables
by the request middleware, so every event of a request carries it. A last processor blanks any field
whose name says it holds a secret: a safety net, not the plan (the plan is to never pass one).

Everything else the process writes goes through the same pipeline: the standard `logging` module's
records (aiohttp's server and client, asyncio's unhandled task exceptions, gssapi, `warnings`) and
uncaught exceptions of the main thread and of other threads become the same JSON lines, with the same
redaction. Their text is written by libraries that quote what a client sent: aiohttp's parse errors
quote the offending header line, `Authorization: Basic ...` and `Cookie: ...` included. So an
exception from a library is logged by its type and the first line of its message up to the first
quote (aiohttp's says what was wrong; the quoted bytes follow), our own by the whole traceback, and
every string a library wrote, and every traceback, is scrubbed of credential-shaped text (`scrub`) before it is
rendered.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from types import CodeType, TracebackType
from typing import Any, TextIO, TypeVar

import orjson
import structlog
from structlog._config import _CONFIG as _structlog_config  # see _configured_processors

F = TypeVar("F", bound=Callable[..., Any])
_PASS_THROUGH: set[CodeType] = set()  # code of functions marked with `pass_through`
_SECRET_WORDS = ("authorization", "password", "token", "secret", "keytab_key", "cookie", "private")


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str) -> bool:
    """Decided once per field name: the summary line has about thirty, and this ran for each of them on
    every request (two thirds of the line's cost: 52 µs a line before, 17 µs after)."""
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if _is_secret(key):
            event[key] = "[redacted]"
    return event


_pid = os.getpid()  # glibc makes getpid() a system call each time: read once, and again in a forked child


def _refresh_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _add_pid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Which process wrote the line: with `[listener] workers` > 1 several share one log."""
    event["pid"] = _pid
    return event


# Credential-shaped text in what a library wrote: a header line that carries one (in a repr too, where the
# value ends at a quote), and a scheme followed by a token.
_CREDENTIAL_HEADER = re.compile(
    r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie|x-[a-z0-9-]*token[a-z0-9-]*)(\s*[:=]\s*)[^\r\n'\"]*"
)
_CREDENTIAL_TOKEN = re.compile(r"(?i)\b(basic|negotiate|bearer|ntlm|digest)(\s+)[A-Za-z0-9+/=._~-]{6,}")


_QUOTED = re.compile(r"""b?['"]""")


def scrub(text: str) -> str:
    """`text` with header values that carry credentials and scheme tokens replaced by `[redacted]`."""
    text = _CREDENTIAL_HEADER.sub(r"\1\2[redacted]", text)
    return _CREDENTIAL_TOKEN.sub(r"\1\2[redacted]", text)


def _foreign_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A record's exception (a library's, or our own `log.exception`), rendered without what a client sent (see the
    module's docstring)."""
    info = event.pop("exc_info", None)
    if info is True:
        info = sys.exc_info()
    if isinstance(info, BaseException):
        info = (type(info), info, info.__traceback__)
    if isinstance(info, tuple) and info[0] is not None:
        kind, exc, tb = info
        event["error"] = kind.__name__
        if _is_ours(tb):  # scrubbed here: our own events skip `_scrub_strings`, and a message may quote a header
            event["traceback"] = scrub("".join(traceback.format_exception(kind, exc, tb)))
        else:
            event["error_detail"] = unquoted(str(getattr(exc, "message", "") or exc))
    return event


# aiohttp's messages that quote a name of its own, never the client's bytes: a singleton header it found missing
# or twice (its parser checks a fixed list of names), which the client is told as the own server tells it.
_NAMED_HEADER = re.compile(r"(Missing|Duplicate) '[A-Za-z-]+' header[a-z .]*")


def unquoted(message: str) -> str:
    """The first line of a library's error `message` up to its first quote: what was wrong, without the bytes a
    client sent that aiohttp's parse errors quote after it (`Invalid header value char:` then the header line,
    `Authorization: Basic ...` included). A first line without a space is no description but the client's bytes
    alone: aiohttp's InvalidURLError for a target it cannot parse is the target (`http://h:99999/?access_token=...`,
    `user:password@h:99999`), which no quote marks."""
    first = message.strip().split("\n", 1)[0]
    if _NAMED_HEADER.fullmatch(first):
        return first
    if not any(c.isspace() for c in first):
        return "(the client's bytes left out)"
    return _QUOTED.split(first, 1)[0].rstrip(" :") + (" (quoted bytes left out)" if _QUOTED.search(first) else "")


def logged_path(path: str) -> str:
    """A request's decoded path as the log and the trace keep it: an absolute-form target (`http://user:password@host/x`,
    a client taking the gateway for a proxy; refused) or an authority-form one (CONNECT's `user:password@host:443`)
    without the user information before its host's `@`, where a password sits. Decoded, that part may hold a `/` or
    an `@` of its own: everything up to the last `@` goes."""
    if path.startswith("/") or "@" not in path:
        return path
    scheme = path.partition("://")[0] + "://" if "://" in path else ""  # none in CONNECT's authority-form
    return f"{scheme}[redacted]@{path.rpartition('@')[2]}"


def pass_through(function: F) -> F:
    """Marks a function of ours that only hands a client's bytes to a library (the header budget in front of
    aiohttp's parser): an exception the library raises below it is still the library's, logged without the
    traceback that quotes those bytes."""
    _PASS_THROUGH.add(function.__code__)
    return function


def _is_ours(tb: TracebackType | None) -> bool:
    """Whether the exception was raised in this project's code (a bug of ours: the traceback helps)."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_globals.get("__name__", "").startswith("proxy.") and frame.f_code not in _PASS_THROUGH:
            return True
        tb = tb.tb_next
    return False


def _scrub_strings(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(value)
    return event


class SummaryLine:
    """The one line per request, written without structlog's processor chain: the hot path's log line.

    It is the line the chain would write (the request's context variables, the fields, `event`, `level`,
    `pid`, an ISO timestamp in UTC), with the same `_redact` over every field name, encoded once by orjson
    and written in one `write`. What orjson cannot encode as the chain would (a type it does not know, an
    integer past 64 bits, a string with a lone surrogate, or any non-ASCII text, which the chain writes as
    `\\u` escapes) goes through the chain instead, as does every line while the process's logging is
    not the configuration `configure` made (a test capturing logs, say). Before (structlog chain with
    the JSON renderer) and after are in docs/performance.md, "Where a keep-alive request's CPU goes"."""

    def __init__(self, out: TextIO, processors: list[Any], enabled: bool) -> None:
        self._out = out
        self._processors = processors
        self._as_configured = list(processors)  # capture_logs changes the configured list in place
        self._enabled = enabled
        self._chain = structlog.get_logger("proxy")

    def write(self, event: str, **fields: Any) -> None:
        self.write_fields(event, fields)

    def write_fields(self, event: str, fields: dict[str, Any]) -> None:
        """`write` with the fields in a dictionary of the caller's: a request's thirty fields are not copied
        into keyword arguments twice on the way."""
        processors = _configured_processors()
        if processors is not self._processors or processors != self._as_configured:
            self._chain.info(event, **fields)
            return
        if not self._enabled:
            return
        line = structlog.contextvars.get_contextvars()
        line.update(fields)
        line["event"] = event
        line["level"] = "info"
        line["pid"] = _pid
        line["timestamp"] = _timestamp(time.time())  # as structlog's TimeStamper writes it
        for key in _secret_keys(tuple(line)):
            line[key] = "[redacted]"
        try:
            encoded = orjson.dumps(line)
        except TypeError:  # orjson.JSONEncodeError: a value the chain renders its own way
            encoded = b""
        if not encoded or not encoded.isascii():
            self._chain.info(event, **fields)
            return
        self._out.write(encoded.decode("ascii") + "\n")
        # Flushed as structlog's WriteLogger flushes its lines: stdout redirected to a file or a pipe is
        # block-buffered, and the line would otherwise wait there (or leave cut in 8 KiB pieces, which
        # other workers' lines could split) until the buffer filled or the process ended.
        self._out.flush()


def _configured_processors() -> Any:
    """structlog's configured processor list (`structlog.get_config()["processors"]`, which builds a dict of the
    whole configuration on each call: a microsecond a line)."""
    return _structlog_config.default_processors


_second = (0, "1970-01-01T00:00:00")  # the last second a timestamp was written in, and its text


def _timestamp(now: float) -> str:
    """`datetime.fromtimestamp(now, UTC).isoformat()` with "Z" for "+00:00" (structlog's TimeStamper), the
    date and time of day formatted once per second (they were a tenth of the line's cost)."""
    global _second
    second = int(now // 1)
    micro = round((now - second) * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    if second != _second[0]:
        _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{micro:06d}Z" if micro else f"{_second[1]}Z"  # isoformat leaves out a zero fraction


@functools.lru_cache(maxsize=256)
def _secret_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The names among `keys` that mark a secret: summary lines come in a few shapes of about thirty names."""
    return tuple(key for key in keys if _is_secret(key))


_summary: SummaryLine | None = None


def summary_line(event: str, **fields: Any) -> None:
    """Write a request's summary line (`SummaryLine`); through the structlog chain before `configure`."""
    summary_fields(event, fields)


def summary_fields(event: str, fields: dict[str, Any]) -> None:
    """`summary_line` with the fields in a dictionary the caller gives up (the line is made from it, not a copy)."""
    if _summary is None:
        structlog.get_logger("proxy").info(event, **fields)
    else:
        _summary.write_fields(event, fields)


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """structlog's JSON lines on `stream` (stdout), and every other log record and uncaught exception too."""
    out = stream or sys.stdout
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_pid,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _foreign_exception,  # log.exception(...): the error and, when ours, the traceback (not `exc_info: true`)
        _redact,
        structlog.processors.JSONRenderer(),
    ]
    global _summary
    _summary = SummaryLine(out, processors, logging.getLevelName(level.upper()) <= logging.INFO)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # One write() per line (PrintLogger writes the newline separately when stdout is unbuffered, as with
        # PYTHONUNBUFFERED): with `[listener] workers` > 1, several processes append to one stdout.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(level, out)


_handler: logging.Handler | None = None


def _route_standard_logging(level: str, out: TextIO) -> None:
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                _add_pid,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _foreign_exception,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _redact,
                _scrub_strings,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    global _handler
    root = logging.getLogger()
    if _handler is not None:  # configured again (tests): one handler, the latest
        root.removeHandler(_handler)
    _handler = handler
    root.addHandler(handler)
    root.setLevel(logging.getLevelName(level.upper()))
    logging.captureWarnings(True)
    uncaught = logging.getLogger("proxy.uncaught")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        uncaught.critical("uncaught_exception", exc_info=(kind, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            uncaught.error("uncaught_thread_exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
