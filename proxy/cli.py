"""Command line: `kcd-proxy run | check-config | explain | doctor | trace | lab`."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.ops import commands as ops_commands
from proxy.ops import trace_cli

# Each command imports what it uses, in its function: `--help` and the lab's commands do not pay for the gateway's
# modules (configuration, aiohttp, cryptography: start-up CPU), nor `run` for the lab's.
if TYPE_CHECKING:
    from proxy.lab.ad import AdRealm
    from proxy.lab.layout import LabLayout


def _run(args: argparse.Namespace) -> int:
    import signal

    from proxy import config as config_module
    from proxy import workers
    from proxy.addresses import bind_fix
    from proxy.errors import ConfigError
    from proxy.kerberos import default_ccache

    default_ccache.pin()  # before any thread: MIT's default ccache is never a file (proxy.kerberos.default_ccache)
    # A SIGHUP from here on (systemd's ExecReload just after a start) is a reload once the gateway serves, never the
    # signal's default end of the process, which systemd's Restart=on-failure does not restart (proxy.workers).
    signal.signal(signal.SIGHUP, workers.remember_reload)

    from proxy import app, descriptors
    from proxy import loop as event_loop
    from proxy.observability.logging import configure

    configure(args.log_level)
    _no_core_dumps()
    descriptors.raise_open_file_limit()  # the operator's hard limit: its workers inherit it
    from proxy.ops.check import loops

    try:
        cfg = config_module.load(Path(args.config))
    except ConfigError as e:
        return e.report()
    if problems := loops(cfg):  # a reload refuses them too; started with one, every device read the traces
        return ConfigError(problems).report()
    if problem := workers.worker_cpus_problem(cfg.listener.worker_cpus, os.sched_getaffinity(0)):
        return ConfigError([f"{problem} (in {cfg.path})"]).report()

    from proxy.auth.shared import SharedTable

    # several workers count a user's wrong passwords in one table, made before they fork (proxy.auth.shared)
    shared = SharedTable() if cfg.listener.workers > 1 else None

    def serve_one(worker: workers.Worker | None = None) -> int:
        from proxy.live import replacement_config, replacement_refused

        replacing = worker is not None and worker.replacement
        # Beside a sibling serving, a replacement serves that configuration whole or not at all (proxy.workers): a CRL
        # file it cannot read is refused as at a start (served without, it passed what the file revokes while its
        # siblings, keeping their last CRLs, refused it), and a file that does not check or build sends it to the text
        # its siblings' last reload took, never back to `cfg` (`proxy.live.replacement_refused`).
        beside = worker is not None and worker.beside
        reloaded = worker.reloaded if worker is not None else None  # where its siblings' reloads leave their text
        # With none beside it, the CRL files the start vetted may have gone bad since (`app.build`): not a reason to
        # stop the gateway, nor to serve `cfg` instead of a reloaded configuration naming them too (a CA it retired, a
        # `revocation` it tightened)
        vetted = cfg.client_certificates.crls if replacing and not beside else ()
        tried: list[config_module.Config] = []
        try:
            # a replacement for a worker that died serves what its siblings reloaded since the start, not `cfg`
            current = replacement_config(cfg, reloaded, beside=beside) if replacing else cfg
            while True:
                try:
                    event_loop.run(
                        app.serve(current, worker=worker, shared=shared, crls_vetted=vetted), cfg.listener.event_loop
                    )
                except ConfigError as e:
                    if current is cfg:
                        raise
                    # a file its siblings' reload refused as it built (a CRL file that does not parse, ...): not a
                    # reason to fail to start, which stops the whole gateway (proxy.workers), but to serve what they
                    # serve (beside them, never `cfg`: a ConfigError then)
                    tried.append(current)
                    current = replacement_refused(cfg, e.problems, reloaded, tried, beside=beside)
                    continue
                break
        except ConfigError as e:
            if worker is not None and beside:
                worker.refused(e.problems)  # named by the supervisor's worker_not_replaced, which tries again
            return e.report()
        return 0

    if cfg.listener.workers == 1:  # ends as a worker does, without the interpreter's teardown (proxy.workers)
        if cpus := workers.worker_cpus(cfg.listener.worker_cpus, os.sched_getaffinity(0)):
            workers.pin_or_say(cpus[0])  # a lone gateway is worker 1
        workers.end_process(serve_one())

    try:
        return workers.supervise(cfg.listener, serve_one, cfg.admin)
    except workers.PortInUse as e:
        fix = bind_fix(e.key, e.error)
        print(f"cannot serve: {e} (in {cfg.path})" + ("" if fix is None else f": {fix}"), file=sys.stderr)
        return 2


def _no_core_dumps() -> None:
    """A crash of the gateway writes no core file, soft and hard limit 0 (its workers inherit it): the process holds
    the keytab's keys, every cached user's tickets with their session keys and, after a Basic sign-in, the user's TGT;
    a core file (or systemd-coredump's copy, which honours the limit too) would put them all on disk."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _lab(args: argparse.Namespace) -> int:
    from proxy.lab import ad, ad_mapping, kdc, runner
    from proxy.lab.layout import LabLayout

    try:
        layout = LabLayout.from_env(os.environ, root=None if args.dir is None else Path(args.dir))
    except ValueError as e:
        print(f"kcd-proxy lab: {e}", file=sys.stderr)
        return 2
    if args.action in ("serve", "probe"):
        return _lab_part(layout, args.action, args.component)
    if args.ad and args.action == "handout":
        return _lab_handout(layout, args.into, ad=True)
    if args.ad:
        return _lab_ad(args.action, ad.AdRealm.at(layout.root / "ad"))
    if args.action == "init":
        runner.init(layout)
        print(f"lab files in {layout.root}")
    elif args.action == "handout":
        return _lab_handout(layout, args.into)
    elif args.action == "up":
        try:
            runner.up(layout)
        except (runner.LabError, kdc.RealmError) as e:
            print(f"kcd-proxy lab up: {e}", file=sys.stderr)
            return 1
        print(runner.describe(layout))
        if warning := runner.gateway_port_warning(layout):
            print(warning, file=sys.stderr)
    elif args.action == "down":
        realm = ad.AdRealm.at(layout.root / "ad")
        with ad.unused(realm) as free:  # held until the realm is stopped: a run starting meanwhile waits
            if not free:
                return _ad_in_use(realm)
            runner.down(layout)
            ad.down(realm)  # the AD realm too, if it runs: its namespace goes
            ad_mapping.forget_names(realm)
        print("lab stopped")
    elif args.action == "status":
        state = runner.status(layout)
        print(json.dumps(state, indent=2))
        return 0 if all(state.values()) else 1
    else:
        print(runner.describe(layout))
    return 0


def _lab_handout(layout: LabLayout, into: str | None, *, ad: bool = False) -> int:
    """`kcd-proxy lab handout [--ad] --into DIR`: each compose container's files, and only those (proxy.lab.handout);
    with --ad those of the profile `ad`, after issuing the AD users' certificates (proxy.lab.ad_compose)."""
    from proxy.lab import handout

    if into is None:
        print("kcd-proxy lab handout: --into DIR is required (DIR/<part> for each of the containers)", file=sys.stderr)
        return 2
    try:
        handout.hand_out(layout, Path(into), ad=ad)
    except OSError as e:
        first = "the dc" if ad else "the kdc"
        print(f"kcd-proxy lab handout: {e} (run `kcd-proxy lab init` and {first} first)", file=sys.stderr)
        return 1
    parts = handout.AD_PARTS if ad else handout.PARTS
    print(f"lab files handed out into {into}/{{{','.join(parts)}}}")
    return 0


def _ad_in_use(realm: AdRealm) -> int:
    """`lab down`'s refusal (its exit status) while a test run uses the AD realm (`ad.unused`)."""
    from proxy.lab import ad

    print(
        f"kcd-proxy lab down: the AD realm in {realm.root} is in use: {ad.users_lock(realm)} is held (a test run); "
        "nothing stopped",
        file=sys.stderr,
    )
    return 1


def _lab_ad(action: str, realm: AdRealm) -> int:
    """`kcd-proxy lab up|down|status|env --ad`: the Samba AD DC realm in its network namespace."""
    from proxy.lab import ad, ad_mapping

    try:
        if action == "up":
            ad.up_lab(realm)
            ad_mapping.ensure(realm)  # strong mapping: SID-extension certificates, mapped accounts
            configs = ad_mapping.lab_configs(realm)
            print(ad.describe(realm))
            strong, audit = configs["strong"], configs["strong-or-audit"]
            print(f'# [identity] mapping = "strong": {strong}; certificates in {ad_mapping.directory(realm)}/')
            print(f'# [identity] mapping = "strong-or-audit": {audit} (the audit step)')
            run = ad.run_line(realm, "FILE")
            print(f"# either in place of gateway.toml (the same ports): {run}")
        elif action == "down":
            with ad.unused(realm) as free:  # held until the realm is stopped: a run starting meanwhile waits
                if not free:
                    return _ad_in_use(realm)
                ad.down(realm)
                ad_mapping.forget_names(realm)
            print(f"AD realm stopped; namespace {realm.netns} removed")
        elif action == "status":
            state = ad.status(realm)
            print(json.dumps(state, indent=2))
            return 0 if all(state.values()) else 1
        elif action == "env":
            print(ad.describe(realm))
        else:
            print(f"kcd-proxy lab {action}: not for the AD realm (up, down, status, env)", file=sys.stderr)
            return 2
    except ad.AdRealmError as e:
        print(f"kcd-proxy lab --ad: {e}", file=sys.stderr)
        return 1
    return 0


def _lab_part(layout: LabLayout, action: str, component: str | None) -> int:
    """`lab serve <component>` in the foreground, or `lab probe <component>` as a health check."""
    from proxy.lab import serve

    allowed = serve.COMPONENTS if action == "serve" else serve.PROBES
    if component is None or component not in allowed:
        print(f"kcd-proxy lab {action}: name one of {', '.join(allowed)}", file=sys.stderr)
        return 2
    if action == "serve":
        from proxy.kerberos import default_ccache

        default_ccache.pin()  # before any thread (proxy.kerberos.default_ccache)
        return serve.serve(layout, component)
    problem = serve.probe(layout, component)
    print(f"{component}: {problem or 'ok'}")
    return 1 if problem else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kcd-proxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--config", required=True, help="TOML configuration file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="load and cross-check a configuration without serving")
    check.add_argument("file")
    check.set_defaults(func=ops_commands.check_config)
    ops_commands.add_commands(sub)
    trace_cli.add_command(sub)
    lab = sub.add_parser("lab", help="the self-contained lab: KDC + LDAP, PKI, Exchange stand-in")
    lab.add_argument("action", choices=["up", "down", "status", "env", "init", "serve", "probe", "handout"])
    lab.add_argument("component", nargs="?", help="serve/probe: kdc, backend, crl, dc (probe: also gateway)")
    lab.add_argument("--dir", help="lab directory (default: $KCD_LAB_DIR or .lab/ in the checkout)")
    lab.add_argument("--into", help="handout: where each compose container's files go (<into>/<part>)")
    lab.add_argument(
        "--ad",
        action="store_true",
        help="up/down/status/env: the Samba AD DC realm AD.TEST (in <dir>/ad, own netns); handout: profile ad's",
    )
    lab.set_defaults(func=_lab)
    return p


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell tool whose reader went away exits with


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except BrokenPipeError:  # `kcd-proxy trace | head`: the reader has all it wanted; nothing more to say
        # Python ignores SIGPIPE, so a write raises instead; the interpreter's last flush of stdout would raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
