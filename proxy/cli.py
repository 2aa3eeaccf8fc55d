"""Command line: `kcd-proxy run | check-config | lab`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from proxy import config as config_module
from proxy.errors import ConfigError


def _run(args: argparse.Namespace) -> int:
    from proxy import app
    from proxy.observability.logging import configure

    configure(args.log_level)
    try:
        cfg = config_module.load(Path(args.config))
        asyncio.run(app.serve(cfg))
    except ConfigError as e:
        for problem in e.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from proxy import app
    from proxy.observability.logging import configure

    configure("error", sys.stderr)
    try:
        cfg = config_module.load(Path(args.file))
        app.build(cfg)
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        return 1
    print(f"{cfg.path}: ok ({len(cfg.routes)} route(s))")
    return 0


def _lab(args: argparse.Namespace) -> int:
    from proxy.lab import runner
    from proxy.lab.layout import LabLayout

    layout = LabLayout.default() if args.dir is None else LabLayout(root=Path(args.dir).resolve())
    if args.action == "up":
        runner.up(layout)
        print(runner.describe(layout))
    elif args.action == "down":
        runner.down(layout)
        print("lab stopped")
    elif args.action == "status":
        state = runner.status(layout)
        print(json.dumps(state, indent=2))
        return 0 if all(state.values()) else 1
    else:
        print(runner.describe(layout))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kcd-proxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="load and cross-check a configuration without serving")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    lab = sub.add_parser("lab", help="the self-contained lab: KDC + LDAP, PKI, Exchange stand-in")
    lab.add_argument("action", choices=["up", "down", "status", "env"])
    lab.add_argument("--dir", help="lab directory (default: $KCD_LAB_DIR or .lab/ in the checkout)")
    lab.set_defaults(func=_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
