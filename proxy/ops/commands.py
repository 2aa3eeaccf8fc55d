"""The operator's commands on the command line: `check-config`, `explain`, `doctor`.

Exit codes: `check-config` 0 sound, 1 problems (one line each). `explain` 0 accepted, 1 refused, 2 usage or
configuration error. `doctor` 0 when every check passed (or was skipped), 1 otherwise, 2 configuration
error. Logs go to stderr at error level, so stdout holds only the answer (one JSON object with `--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError
from proxy.files import read_bounded
from proxy.printable import printable

MAX_CERTIFICATE_BYTES = 1024 * 1024  # `explain --cert`: a certificate is a few KiB (/dev/zero never ends)


def _quiet_logs() -> None:
    from proxy.observability.logging import configure

    configure("error", sys.stderr)


async def _close(gw: Any) -> None:
    """Stop what a built gateway started (CRL refresh, KDC threads)."""
    await gw.revocation.close()
    gw.delegator.close()


def check_config(args: argparse.Namespace) -> int:
    from proxy import app
    from proxy import config as config_module
    from proxy.descriptors import judged_limit, start_problem
    from proxy.ops.check import check, warnings
    from proxy.workers import worker_cpus_problem

    _quiet_logs()
    try:
        cfg = config_module.load(Path(args.file))
        problems = check(cfg, at=datetime.now(UTC))
        if problem := start_problem(cfg.kerberos.max_in_flight):  # what `run` under these limits refuses at start
            command = f"kcd-proxy check-config {cfg.path}"
            problems.append(f"{problem}; {judged_limit(command)} (in {cfg.path})")
        if problem := worker_cpus_problem(cfg.listener.worker_cpus, os.sched_getaffinity(0)):  # `run` refuses it too
            problems.append(f"{problem} (in {cfg.path})")
        if not problems:
            asyncio.run(_close(app.build(cfg)))
    except ConfigError as e:
        problems = e.problems
    for problem in problems:
        print(problem)
    if problems:
        return 1
    for warning in warnings(cfg):  # on stderr: stdout stays the problems or the one ok line
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{cfg.path}: ok ({len(cfg.routes)} route(s))")
    return 0


def _time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        example = "2026-01-01T00:00:00Z"
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as {example}, got {value!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def explain(args: argparse.Namespace) -> int:
    from proxy import app
    from proxy import config as config_module
    from proxy.ops.explain import Explanation, explain, load_leaf

    _quiet_logs()
    try:
        leaf = load_leaf(read_bounded(Path(args.cert), MAX_CERTIFICATE_BYTES))
    except (OSError, ValueError) as e:
        print(f"kcd-proxy explain: cannot read a certificate from {args.cert}: {e}", file=sys.stderr)
        return 2
    try:
        gw = app.build(config_module.load(Path(args.config)))
    except ConfigError as e:
        return e.report()

    async def run() -> Explanation:
        try:
            return await explain(
                gw, leaf, path=args.path, at=args.at or datetime.now(UTC), kdc=args.kdc, host=args.host
            )
        finally:
            await _close(gw)

    result = asyncio.run(run())
    print(json.dumps(result.to_json()) if args.json else _printable_lines(result.render()))
    return 0 if result.accepted else 1


def doctor(args: argparse.Namespace) -> int:
    from proxy import config as config_module
    from proxy.ops import doctor

    _quiet_logs()
    try:
        cfg = config_module.load(Path(args.config))
    except ConfigError as e:
        return e.report()
    checks = doctor.run(cfg, user=args.user)
    print(_printable_lines(doctor.render(checks)))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _printable_lines(text: str) -> str:
    """A report for the terminal: its lines kept, a control character within one (from a certificate's names, a
    KDC's or a backend's message) shown as an escape (`proxy.printable.printable`)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def add_commands(sub: Any) -> None:
    """Add `explain` and `doctor` to the `kcd-proxy` command line (`sub`: its subparsers)."""
    p = sub.add_parser("explain", help="run a certificate through the gateway's stages, without a client")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--cert", required=True, help="the client certificate, PEM or DER")
    p.add_argument("--path", default="/", help="request path that picks the route (default /)")
    p.add_argument("--host", help="request Host, for routes bound to a host name")
    p.add_argument("--at", type=_time, help="validation time, ISO 8601 (default: now)")
    p.add_argument("--kdc", action="store_true", help="also run S4U2Self and S4U2Proxy against the KDC")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=explain)
    d = sub.add_parser("doctor", help="preflight: KDC, clock, keytab, delegation and backends, with fixes")
    d.add_argument("--config", required=True, help="TOML configuration file")
    d.add_argument("--user", help="canary UPN to delegate for (default: [doctor] canary_user)")
    d.set_defaults(func=doctor)
