"""`kcd-proxy trace`: recent requests' traces in the terminal, read from a running gateway's admin listener.

Theory of operation. The gateway keeps its recent traces in memory and serves them on the admin listener
(`GET /traces?limit=N&user=UPN`, newest first; `proxy.observability.traces`). This command asks that
endpoint and prints the records oldest first, a heading line per request and one line per stage (TLS,
certificate, revocation, identity, S4U2Self, S4U2Proxy, backend), with the fix under a refused stage.
`--follow` keeps asking every `--interval` seconds and prints each request it has not shown yet, until
interrupted; `--user` shows one user's requests; `--json` prints each record as one JSON line.

Where the admin listener is: `--admin URL`, else the `[admin] bind` of `--config FILE` (its `[admin] socket` when
it has no bind: `unix:/path`, which `--admin` takes too), else `http://127.0.0.1:9443` (the documented default
bind). An https admin listener with a client allow-list
needs `--cert`/`--key` (and `--cacert` for its server certificate). Exit codes: 0 printed (or interrupted
while following), 1 the admin listener did not answer, 2 usage or configuration error.

Whatever answers on the admin port is read with bounds, as `proxy.files.read_bounded` reads a file: at most
`RECORD_BYTES` per record asked for (and `ANSWER_BYTES` in all), within `ANSWER_SECONDS`. A program that took the
port while the gateway was down, or a broken listener, ends the command with an error saying where it stopped;
it cannot make it read (and hold) an answer without end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from proxy.addresses import host_port
from proxy.errors import ConfigError
from proxy.printable import printable

DEFAULT_ADMIN = "http://127.0.0.1:9443"
_FOLLOW_WINDOW = 200  # records asked for on each poll while following (the gateway keeps 200 by default)
RECORD_BYTES = 64 * 1024  # one record's JSON at most: a few KiB, a 8 KiB path escaped character by character ~50
ANSWER_BYTES = 256 * 1024 * 1024  # whatever --limit asks
ANSWER_SECONDS = 30.0  # to read one answer whole (each wait for bytes is bounded by the socket's 10 s)


class AdminUnreachable(Exception):
    pass


def add_command(sub: Any) -> None:
    """Add `trace` to the `kcd-proxy` command line (`sub`: its subparsers)."""
    p = sub.add_parser("trace", help="print recent requests' traces from the gateway's admin listener")
    p.add_argument("--admin", help=f"the admin listener's URL (default: --config's [admin] bind, else {DEFAULT_ADMIN})")
    p.add_argument("--config", help="the gateway's TOML configuration, for its [admin] bind")
    p.add_argument("--user", help="only this user's requests (UPN or principal)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new requests until interrupted")
    p.add_argument(
        "--limit",
        type=_positive,
        default=10,
        help="how many recent requests to print first (10; the gateway answers 1,000 at most)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls with --follow (1)")
    p.add_argument("--json", action="store_true", help="one JSON object per request and line")
    p.add_argument("--cacert", help="CA bundle for an https admin listener's certificate")
    p.add_argument("--cert", help="client certificate (PEM) for an admin listener with an allow-list")
    p.add_argument("--key", help="its private key (PEM)")
    p.set_defaults(func=run)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def admin_url(args: argparse.Namespace) -> str:
    """The admin listener to ask: --admin, else the configuration's [admin] bind, else the default."""
    if args.admin:
        return str(args.admin).rstrip("/")
    if args.config:
        from proxy import config as config_module  # here: every command's parser imports this module (start-up CPU)

        cfg = config_module.load(Path(args.config))
        if cfg.admin is None:
            raise ConfigError([f"admin: the configuration has no [admin] bind: traces are not served (in {cfg.path})"])
        if not cfg.admin.bound and cfg.admin.socket is not None:
            return f"unix:{cfg.admin.socket}"
        host = "127.0.0.1" if cfg.admin.host in ("0.0.0.0", "::") else cfg.admin.host  # a wildcard: ask it here
        return f"{'https' if cfg.admin.tls else 'http'}://{host_port(host, cfg.admin.port)}"
    return DEFAULT_ADMIN


def fetch(
    base: str, *, limit: int, user: str | None, context: ssl.SSLContext | None, seconds: float = ANSWER_SECONDS
) -> list[dict[str, Any]]:
    """`GET /traces` of the admin listener at `base`: records, newest first; its answer read within `seconds`."""
    query = {"limit": str(limit), **({"user": user} if user else {})}
    url = f"{base}/traces?{urllib.parse.urlencode(query)}"
    bound = _Bound(min(ANSWER_BYTES, RECORD_BYTES * (limit + 1)), limit, seconds)
    try:
        if base.startswith("unix:"):
            records = json.loads(_get_unix(base.removeprefix("unix:"), url.removeprefix(base), bound))
        else:
            with urllib.request.urlopen(url, timeout=10, context=context) as answer:  # noqa: S310  operator-given URL
                records = json.loads(bound.read(answer))
    except urllib.error.HTTPError as e:
        body = printable(e.read(1000).decode(errors="replace").strip())  # whatever answered on that port wrote it
        raise AdminUnreachable(f"{url}: HTTP {e.code} {body}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise AdminUnreachable(f"{url}: {getattr(e, 'reason', e)}") from None
    if not isinstance(records, list):
        raise AdminUnreachable(f"{url}: expected a JSON list of traces")
    return [r for r in records if isinstance(r, dict)]


class _Bound:
    """How much of an answer is read, and for how long."""

    def __init__(self, size: int, limit: int, seconds: float) -> None:
        self.size = size
        self.limit = limit
        self.seconds = seconds

    def read(self, answer: http.client.HTTPResponse) -> bytes:
        """The answer's body; `ValueError` once it holds more than `size` bytes or takes more than `seconds`."""
        deadline = time.monotonic() + self.seconds
        body = bytearray()
        while chunk := answer.read1(64 * 1024):  # what one receive brought: a trickle is seen at its deadline
            body += chunk
            if len(body) > self.size:
                raise ValueError(
                    f"the answer is over {self.size} bytes, more than {self.limit} trace(s) (--limit) can be:"
                    " is this the gateway's admin listener?"
                )
            if time.monotonic() > deadline:
                raise ValueError(f"the answer did not end within {self.seconds:g} s ({len(body)} bytes read)")
        return bytes(body)


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (`[admin] socket`): the standard library has no such handler."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _get_unix(path: str, target: str, bound: _Bound) -> bytes:
    """`GET target` on the admin listener's Unix socket at `path`: the body of a 200, else `AdminUnreachable`."""
    connection = _UnixConnection(path)
    try:
        connection.request("GET", target)
        answer = connection.getresponse()
        body = bound.read(answer)
    finally:
        connection.close()
    if answer.status != 200:
        words = printable(body[:1000].decode(errors="replace").strip())
        raise AdminUnreachable(f"unix:{path}{target}: HTTP {answer.status} {words}")
    return body


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.cacert or args.cert):
        return None
    context = ssl.create_default_context(cafile=args.cacert)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    return context


def _show(records: list[dict[str, Any]], as_json: bool) -> None:
    if not records:
        return
    if as_json:
        for record in records:
            print(json.dumps(record, separators=(",", ":")), flush=True)
    else:
        from proxy.observability.traces import render_text  # here: the gateway's modules are start-up CPU

        print(render_text(records), flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        base = admin_url(args)
        context = _context(args)
    except ConfigError as e:
        return e.report()
    except (OSError, ssl.SSLError) as e:
        print(f"kcd-proxy trace: {e}", file=sys.stderr)
        return 2
    try:
        first = fetch(base, limit=args.limit, user=args.user, context=context)
    except AdminUnreachable as e:
        print(f"kcd-proxy trace: the admin listener did not answer: {e}", file=sys.stderr)
        return 1
    _show(list(reversed(first)), args.json)
    if not args.follow:
        return 0
    seen: deque[str] = deque((r["id"] for r in first), maxlen=10 * _FOLLOW_WINDOW)
    try:
        while True:
            time.sleep(args.interval)
            try:
                records = fetch(base, limit=_FOLLOW_WINDOW, user=args.user, context=context)
            except AdminUnreachable as e:
                print(f"kcd-proxy trace: {e} (retrying)", file=sys.stderr, flush=True)
                continue
            new = [r for r in reversed(records) if r.get("id") not in seen]
            seen.extend(r["id"] for r in new)
            _show(new, args.json)
    except KeyboardInterrupt:
        return 0
