"""The running gateway's current configuration, and reloading it without a restart (SIGHUP).

Theory of operation. What a configuration builds is immutable: a `Gateway` (trust list, revocation,
routes, Kerberos, backend pools) and the listener's `SSLContext`. The running server holds them in one
`Live` object and reads them at two moments only: a request takes `live.gateway` once, when it starts
(`use`), and the TLS listener takes `live.ssl_context` once per connection, before its handshake. A
reload builds a complete new pair from the file first (load, the cross-checks of `check-config`, build,
TLS context, first fetch of the CRLs); only when all of that succeeded are both swapped in. So:

- a request that started before the swap finishes with the gateway it started with: in-flight requests
  and held long-polls are not disturbed, unless the new configuration refuses their certificate: a held request
  whose CA the new trust list no longer holds, or whom the new CRLs revoke, is ended as a revocation ends one
  (`LiveRevocation.hand_over`);
- a connection keeps the TLS session it negotiated, but each of its later requests is checked against
  the new trust list, CRLs and routes; new connections get the new server certificate and trust list;
- a configuration that does not load, fails a cross-check or cannot be built is refused: the reasons are
  logged (`reload_refused`) and the old one keeps serving.

The CRLs do too, as the floor of the new ones (`CrlStore.inherit`): for a source both configurations read, the new
store starts from the last good CRLs the old one held (those whose signer the new trust list still holds), so a
reload, like a refresh, never takes a CRL older than the one held (a replay) and keeps the last good one when the
source gives nothing usable; built afresh, a reload took last week's CRL and served a certificate revoked since. A
source the new configuration renames starts from the CRLs of the sources it no longer reads.
The per-user backend connections always carry over (each route's TLS context too, unless the route or its
CA bundle's bytes changed: `Pools.successor`), and the Delegator (the gateway's own credentials, its KDC watch)
and the Basic login cache when their settings are unchanged. The delegated tickets do not (issue #7): a reload
empties the ticket cache, so each user's next request asks the KDC again (one S4U2Self and one S4U2Proxy), and
an account disabled or taken off the delegation list since is refused from then on without a restart; requests
in flight keep the token they have. What the old gateway owned alone
(its CRL refresher, a replaced Delegator) is closed when its last request ends. The listener's and the
admin listener's addresses, the number of workers and the listener's other settings but its certificate, key and
`trusted_proxies` only change with a restart (`reload_needs_restart` names each one a reload left as it was).

A worker that replaces one that died (`[listener] workers`, `proxy.workers`) starts from the file too, as a reload
would read it (`replacement_config`): it was forked with the configuration the supervisor read at start, and so
served what every reload since had retired (a route, a CA taken off the trust list) beside siblings that had not.
Its restart-only keys stay as the gateway started with them, as its siblings' do.

With `[reload] watch = true`, the configuration file and every file it names are polled every
`watch_interval` seconds (size and modification time); a change triggers the same reload once the files have
stayed unchanged for one more look, so that a file written in place is not read half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import ssl
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from proxy import config as config_module
from proxy.auth.shared import SharedTable
from proxy.certs.kept import KeptCrls
from proxy.config import Config, IPNetwork
from proxy.descriptors import DescriptorBudget, reload_reserve_problem
from proxy.errors import ConfigError
from proxy.observability.metrics import Metrics
from proxy.observability.traces import TraceRing
from proxy.pipeline import Gateway

if TYPE_CHECKING:
    from proxy.tls.server import ServedCertificate

log = structlog.get_logger("proxy.reload")


@dataclass
class Live:
    gateway: Gateway
    ssl_context: ssl.SSLContext
    metrics: Metrics = field(default_factory=Metrics)
    traces: TraceRing = field(default_factory=TraceRing)  # recent requests, for the admin listener's /traces
    generation: int = 1
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The balancers whose PROXY headers are believed (`listener.trusted_proxies`, asked per connection): the last
    # configuration's that had the PROXY protocol on. Turning it off needs a restart, and until then the list
    # last in force stays, never the one read at start (which may name a balancer a reload took off).
    balancers: tuple[IPNetwork, ...] = ()
    served: ServedCertificate | None = None  # the listener's certificate `ssl_context` holds (`/readyz`)
    descriptors: DescriptorBudget | None = None  # the shares set at start (`proxy.descriptors`), which a reload keeps
    stopping: bool = False  # SIGTERM or SIGINT came: the gateway drains (`proxy.app.drain`), /readyz answers 503
    stopped_by: str | None = None  # that signal's name ("SIGINT"); None for a stop no signal asked for
    cut: str | None = None  # how the stop's drain ended when it cut what was in flight ("drain_timeout", ...)
    # With several workers, where a reload that succeeded leaves the text it took, for a replacement to serve if the
    # file does not load by then (`Worker.reloaded`, `replacement_config`)
    reloaded_to: Path | None = None
    _users: dict[int, int] = field(default_factory=dict, repr=False)  # id(gateway) -> requests using it
    _retired: dict[int, tuple[Gateway, Gateway]] = field(default_factory=dict, repr=False)  # id -> (old, new)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    _reloads: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)  # reloads under way (`begin_stop`)
    _reload_waiting: bool = field(default=False, repr=False)  # a SIGHUP's reload is still to begin (`reload_soon`)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def __post_init__(self) -> None:
        self.metrics.crls = lambda: self.gateway.revocation.status()
        self.metrics.held_unjudged = self._held_unjudged
        self.metrics.trace_export_errors = lambda: self.traces.export_errors

    def _held_unjudged(self) -> int:
        """The current directory's held users its sweep could not look up (`kcd_held_users_unjudged`)."""
        directory = self.gateway.directory
        return directory.held.unjudged if directory is not None else 0

    @classmethod
    def start(
        cls,
        config: Config,
        *,
        shared: SharedTable | None = None,
        crls_vetted: Collection[Path] = (),
        descriptors: DescriptorBudget | None = None,
        beside: bool = False,
        kept: KeptCrls | None = None,
    ) -> Live:
        """The gateway `config` describes, started; `descriptors`: the shares the start set (`proxy.descriptors`),
        which its reloads keep."""
        from proxy.app import build
        from proxy.tls.server import ServedCertificate, server_context

        backend = descriptors.backend if descriptors is not None else None
        gateway = build(
            config,
            shared=shared,
            serving=True,
            crls_vetted=crls_vetted,
            backend_connections=backend,
            beside=beside,
            kept=kept,
        )
        context = server_context(config)
        live = cls(gateway, context, balancers=config.listener.trusted_proxies, served=ServedCertificate.of(config))
        live.descriptors = descriptors  # a reload's kerberos.max_in_flight must fit its reserve
        return live

    @property
    def config(self) -> Config:
        return self.gateway.config

    def use(self) -> _Using:
        """The gateway a request runs with, from its start to its end, whatever reloads meanwhile."""
        return _Using(self)

    def reload_soon(self) -> None:
        """For a signal handler: reload in a task of its own; none once the gateway is stopping (`begin_stop`), and
        none more while one asked for before has not begun: that one reads the file when it begins, as it is after
        this signal too (`reload_coalesced`). A SIGHUP storm (a tool reloading once per file it changed) was a reload
        per signal, one after the other, each reading and vetting every CRL again: 20 SIGHUPs in a second to a gateway
        holding a 200,000-entry CRL took 206 s and 42.6 s of CPU. Now it is the reload under way and one more."""
        if self.stopping:
            log.info("reload_ignored", detail="the gateway is stopping; its next start reads the configuration")
            return
        if self._reload_waiting:
            log.info("reload_coalesced", detail="a reload asked for before has not begun: it reads the file then")
            return
        self._reload_waiting = True
        self._spawn(self.reload(), reloading=True)

    def begin_stop(self, signal: str | None = None) -> None:
        """SIGTERM or SIGINT (`signal`, its name) came (`proxy.app.serve`): /readyz answers 503 from now on, naming it,
        a SIGHUP reloads nothing, and a reload
        under way is cancelled, the gateway it was building closed. A reload's CRL fetch (up to
        `proxy.certs.sources.FETCH_TIMEOUT`) or KDC look-up held the stop past `listener.drain_timeout`, as
        `live.close` waited for it, for a configuration nothing would serve with."""
        self.stopping, self.stopped_by = True, signal
        for task in self._reloads:
            task.cancel()

    async def reload(self) -> bool:
        """Read the configuration file again and swap it in if it is sound; else log why and keep the old."""
        async with self._lock:
            self._reload_waiting = False  # a SIGHUP from now on comes after the file is read: a reload of its own
            old = self.gateway
            path = old.config.path
            try:
                text, read_at = read_in_order(path, self.reloaded_to)
                gateway, context, served = _prepare(path, text, old, self.descriptors)
            except ConfigError as e:
                return self._refused(path, e.problems)
            except (OSError, ssl.SSLError, ValueError) as e:
                return self._refused(path, [f"{type(e).__name__}: {e}"])
            try:
                await gateway.revocation.start()  # the new CRLs are fetched before the first request needs them
                if unreadable := _unreadable_crls(gateway):  # read in a thread by that fetch, not by `build`
                    await _close(gateway, keep=old)
                    return self._refused(path, unreadable)
                if gateway.delegator is not old.delegator:  # its watch's KDC list out of the overlay before the new's
                    old.delegator.stop_watch()  # (its requests still in flight are served on as they are)
                await gateway.delegator.watch_kdcs()  # a kept delegator's watch goes on; a new one's starts
            except BaseException:  # the gateway stops (`begin_stop`), the watch that asked is cancelled, or a bug:
                await _close(gateway, keep=old)  # what it started (its CRL refresher) ends with it
                raise
            self.gateway, self.ssl_context, self.served = gateway, context, served
            old.revocation.hand_over(gateway.revocation, gateway.trust)  # held requests: judged by the new trust
            dropped = len(old.delegator)  # a replaced delegator's go when the old gateway's last request ends
            gateway.delegator.clear()  # issue #7: delegated tickets do not outlive a reload (a kept delegator's)
            gateway.basic.forget_sign_ins()  # nor Basic's verified passwords and their TGTs (a kept BasicLogin's)
            if gateway.config.listener.proxy_protocol:
                self.balancers = gateway.config.listener.trusted_proxies
            self.generation += 1
            self.loaded_at = datetime.now(UTC)
            self.metrics.reloads.labels("ok").inc()
            config = gateway.config
            log.info(
                "reloaded",
                config=str(path),
                generation=self.generation,
                changed=_changed(old.config, config),
                routes=[r.prefix for r in config.routes],
                tickets_dropped=dropped,
            )
            for key in _needs_restart(old.config, config):
                log.warning("reload_needs_restart", key=key, detail="takes effect when the gateway restarts")
            self._retired[id(old)] = (old, gateway)
            self._close_if_retired(id(old))
            if self.reloaded_to is not None:
                keep_reloaded(self.reloaded_to, text, read_at)
            return True

    def _refused(self, path: Path, problems: list[str]) -> bool:
        self.metrics.reloads.labels("refused").inc()
        log.error("reload_refused", config=str(path), problems=problems, detail="the running configuration stays")
        return False

    def _close_if_retired(self, key: int) -> None:
        if key in self._retired and key not in self._users:
            old, new = self._retired.pop(key)
            self._spawn(_close(old, keep=new))

    def _spawn(self, coro: Any, *, reloading: bool = False) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if reloading:
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)

    async def close(self) -> None:
        """Stop everything: the current gateway, and retired ones still finishing requests."""
        for old, new in self._retired.values():
            await _close(old, keep=new)
        self._retired.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await _close(self.gateway, keep=None)

    async def watch(self) -> None:
        """Reload whenever the configuration file or a file it names changes, once it has stayed unchanged for
        one more look (until cancelled)."""
        seen = _fingerprint(self.config)
        while True:
            await asyncio.sleep(self.config.reload.watch_interval)
            now = _fingerprint(self.config)
            if now != seen:
                # A file written in place (not renamed over) may be seen half-written, and a prefix of a TOML file
                # can be a valid, weaker configuration: wait until the files stay as they are for one look (at
                # most SETTLE_LOOKS looks, so that a file rewritten all the time still gets reloaded).
                for _ in range(SETTLE_LOOKS):
                    await asyncio.sleep(self.config.reload.watch_interval)
                    later = _fingerprint(self.config)
                    if later == now:
                        break
                    now = later
                log.info("reload_watch", detail="a watched file changed")
                await self.reload()
                # What is loaded is the files as they were before the reload read them: one rewritten meanwhile is
                # reloaded at the next look. A file only the new configuration names counts as it is now. A
                # refused change is not retried until the files change again.
                seen = {f: now.get(f, stamp) for f, stamp in _fingerprint(self.config).items()}


class _Using:
    """`Live.use` for one request: a class, not `contextlib.contextmanager`, since a held long-poll keeps it for
    its whole life (a generator's frame and context manager were about 0.5 KiB of each)."""

    __slots__ = ("_gw", "_live")

    def __init__(self, live: Live) -> None:
        self._live = live
        self._gw: Gateway | None = None

    def __enter__(self) -> Gateway:
        gw = self._gw = self._live.gateway
        users = self._live._users
        key = id(gw)
        users[key] = users.get(key, 0) + 1
        return gw

    def __exit__(self, *exc: object) -> None:
        users = self._live._users
        key = id(self._gw)
        users[key] -= 1
        if not users[key]:
            del users[key]
            self._live._close_if_retired(key)


def _prepare(
    path: Path, text: bytes, old: Gateway, descriptors: DescriptorBudget | None = None
) -> tuple[Gateway, ssl.SSLContext, ServedCertificate]:
    """Everything the configuration file's `text` builds, or ConfigError with every problem found (a
    `kerberos.max_in_flight` the `descriptors` set at start cannot hold among them)."""
    from proxy.app import build
    from proxy.ops.check import check
    from proxy.tls.server import ServedCertificate, server_context

    config = config_module.load(path, text)
    problems = check(config, at=datetime.now(UTC), crls=False)
    if descriptors is not None and (reserve := reload_reserve_problem(config.kerberos.max_in_flight, descriptors)):
        problems = [*problems, reserve]
    if problems:
        raise ConfigError(problems)
    context, served = server_context(config), ServedCertificate.of(config)  # before the gateway: nothing to close
    backend = descriptors.backend if descriptors is not None else None
    gateway = build(config, shared=old.basic.shared, previous=old, serving=True, backend_connections=backend)
    return _carry_over(gateway, old), context, served


def _unreadable_crls(gateway: Gateway) -> list[str]:
    """`client_certificates.crls` files the new gateway's first CRL fetch could not read or found no CRL in, named as
    the start names them (`proxy.app.build`): a reload to them is refused."""
    unreadable = gateway.revocation.crls.unreadable()
    config = gateway.config
    return [
        f"client_certificates.crls[{i}]: {path}: {unreadable[str(path)]} (in {config.path})"
        for i, path in enumerate(config.client_certificates.crls)
        if str(path) in unreadable
    ]


def _carry_over(new: Gateway, old: Gateway) -> Gateway:
    """Keep the old gateway's per-user state (pools, caches) where the settings it came from are unchanged."""
    keep: dict[str, Any] = {"pools": old.pools.successor(new.config.routes, new.config.listener)}
    if new.config.kerberos == old.config.kerberos:
        keep["delegator"] = old.delegator
        new.delegator.close()
    if all(getattr(new.config, s) == getattr(old.config, s) for s in ("authentication", "identity", "kerberos")):
        keep["basic"] = old.basic
    else:  # rebuilt, but a held user stays held (and its own password still gets in)
        new.basic.take_over(old.basic)
    same = new.config.directory == old.config.directory and new.config.kerberos == old.config.kerberos
    if same and new.directory is not None and old.directory is not None:  # no [directory]: none, either side
        keep["directory"] = old.directory  # its account cache survives a reload that left it alone
    return dataclasses.replace(new, **keep)


async def _close(gw: Gateway, *, keep: Gateway | None) -> None:
    """Stop what `gw` owns and `keep` (its successor) did not take over."""
    if keep is None or not gw.pools.shares_users(keep.pools):
        await gw.pools.close()
    if keep is None or gw.revocation is not keep.revocation:
        await gw.revocation.close()
    if keep is None or gw.delegator is not keep.delegator:
        gw.delegator.close()
    if keep is None or gw.basic is not keep.basic:
        gw.basic.close()
    if gw.directory is not None and (keep is None or gw.directory is not keep.directory):
        gw.directory.close()


def _changed(old: Config, new: Config) -> list[str]:
    """The configuration's sections that differ (files whose content changed do not show here)."""
    return [f.name for f in dataclasses.fields(Config) if getattr(old, f.name) != getattr(new, f.name)]


# The listener's keys a reload applies: the server certificate and key and the TLS session cache (a new SSLContext
# for new connections), the balancers believed (read per connection) and client_body_timeout (the backend pools',
# made per configuration). Every other one is read when the process starts.
LISTENER_RELOADED = frozenset(
    {"certificate", "private_key", "tls_session_cache", "trusted_proxies", "client_body_timeout"}
)


def _needs_restart(old: Config, new: Config) -> list[str]:
    """The changed keys a reload leaves as they were: each gets a `reload_needs_restart` warning, so the log
    never says "reloaded" over a setting still running with its old value."""
    changed = []
    if (old.listener.host, old.listener.port) != (new.listener.host, new.listener.port):
        changed.append("listener.bind")
    for f in dataclasses.fields(old.listener):
        if f.name in LISTENER_RELOADED or f.name in ("host", "port"):
            continue
        if getattr(old.listener, f.name) != getattr(new.listener, f.name):
            changed.append(f"listener.{f.name}")
    if old.admin != new.admin:
        changed.append("admin")
    if old.reload.watch != new.reload.watch:  # the watch task starts with the process (its interval: at each look)
        changed.append("reload.watch")
    return changed


def replacement_config(started: Config, reloaded: Path | None = None, *, beside: bool = False) -> Config:
    """What a worker replacing a dead one serves: the file read and cross-checked again, as its siblings' reloads
    read it, with the keys a reload leaves for a restart (the listener's but LISTENER_RELOADED, `[admin]`,
    `reload.watch`) as the gateway started with them, and the balancers it believes too when the file turns
    `proxy_protocol` off (its siblings keep the ones last in force until the restart; the file's empty list made it
    close every connection it got). If the file does not load now (refused by its siblings' reloads too, or caught
    half edited since their last one), it serves what they serve: the text their last reload took (`reloaded`, kept by
    `Live.reload`), else `started`, and says so (`worker_configuration_refused`, `serves`); a SIGHUP once the file is
    fixed brings every worker to the same configuration. (Serving `started` there brought back what a reload since had
    retired: a route, a CA taken off the trust list, a `revocation` tightened.) `beside` (siblings serve,
    `proxy.workers`): a file that loads but fails the cross-checks (a trust anchor or the listener's certificate a
    reload added, caught half rewritten), with no reloaded text that passes them, is a ConfigError, not `started`
    served, which may be older than theirs (`replacement_refused`)."""
    config, problems, loaded = _replacement(started, None)
    if problems:
        return replacement_refused(started, problems, reloaded, beside=beside, loaded=loaded)
    assert config is not None
    return config


def _replacement(started: Config, text: bytes | None) -> tuple[Config | None, list[str], bool]:
    """`replacement_config`'s reading of the file (`text`: of the text read from it before), or its problems; and
    whether it loaded (a file that does not is no configuration its siblings may have taken)."""
    from proxy.ops.check import check

    try:
        config = config_module.load(started.path, text)
    except ConfigError as e:
        return None, e.problems, False
    except (OSError, ssl.SSLError, ValueError) as e:
        return None, [f"{type(e).__name__}: {e}"], False
    try:
        problems = check(config, at=datetime.now(UTC), crls=False)
    except ConfigError as e:
        problems = e.problems
    except (OSError, ssl.SSLError, ValueError) as e:
        problems = [f"{type(e).__name__}: {e}"]
    if problems:
        return None, problems, True
    kept = {f.name: getattr(started.listener, f.name) for f in dataclasses.fields(started.listener)}
    kept = {name: value for name, value in kept.items() if name not in LISTENER_RELOADED}
    if not config.listener.proxy_protocol:  # turned off, which waits for a restart: its siblings still believe the
        kept["trusted_proxies"] = started.listener.trusted_proxies  # balancers last in force (Live.balancers)
    listener = dataclasses.replace(config.listener, **kept)
    reload = dataclasses.replace(config.reload, watch=started.reload.watch)
    return dataclasses.replace(config, listener=listener, admin=started.admin, reload=reload), [], True


def replacement_refused(
    started: Config,
    problems: list[str],
    reloaded: Path | None = None,
    tried: Collection[Config] = (),
    *,
    beside: bool = False,
    loaded: bool = True,
) -> Config:
    """A replacement worker's file that does not load, or (`kcd-proxy run`) a configuration that does not build
    (`tried`: those that did not), as a reload would refuse it: logged, and what its siblings serve served instead:
    the text their last reload took (`reloaded`), if it loads, passes the cross-checks and is not among `tried`, else
    `started` (the supervisor, which stops the gateway when a worker fails to start, is never stopped by a file its
    siblings refused). Beside a sibling serving (`beside`, `proxy.workers`), `started` is served only for a file that
    did not load (`loaded`) with no reload's text kept: no reload has succeeded since the start, so the first workers
    serve `started`. Otherwise a ConfigError with `problems`, the replacement not started: it cannot tell a file its
    siblings' reload refused from one they took that went bad since, and `started` may be older than what they serve
    (routes, trust anchors, `revocation`)."""
    fallback = started
    try:
        text = reloaded.read_bytes() if reloaded is not None else None
    except OSError:  # none there: no reload has succeeded since the start
        text = None
    if text is not None:
        config, _, _ = _replacement(started, text)
        if config is not None and config not in tried:
            fallback = config
    if fallback is started and beside and (loaded or text is not None):
        raise ConfigError(problems)
    serves = "started" if fallback is started else "reloaded"
    log.error(
        "worker_configuration_refused",
        config=str(started.path),
        problems=problems,
        serves=serves,
        detail=f"this worker serves the configuration {_SERVES[serves]}; fix the file, then reload",
    )
    return fallback


_SERVES = {"started": "the gateway started with", "reloaded": "its siblings last reloaded"}


def read_in_order(path: Path, kept: Path | None) -> tuple[bytes, int]:
    """The configuration file's text for a reload, and when it was read (CLOCK_MONOTONIC, one clock for every process
    of the machine): beside siblings (`kept`, `Worker.reloaded`), read under their lock, so that the order of the
    moments is the order of the readings, which `keep_reloaded` goes by. Held for a read of at most MAX_CONFIG_BYTES."""
    if kept is None:
        return config_module.read(path), 0
    with _kept_lock(kept):
        return config_module.read(path), time.monotonic_ns()


def keep_reloaded(to: Path, text: bytes, read_at: int) -> None:
    """A worker's reload took `text`, read at `read_at` (`read_in_order`): kept at `to` for a replacement
    (`replacement_refused`), whole or not at all, unless a sibling's reload read the file later and kept what it read
    (`to`'s mtime is the moment its text was read). Two SIGHUPs in quick succession: a reload of the first text that
    ended after a sibling's of the second left the older text, and a replacement, the file then half edited, served it
    beside the sibling serving the newer one. A text that cannot be written (a full disk) leaves `to` empty rather than
    the previous reload's: a replacement beside a sibling then refuses (`worker_not_replaced`), as one whose file does
    not load with nothing kept does, instead of serving an older configuration than its siblings'."""
    part = to.with_name(f".{to.name}.{os.getpid()}")
    with _kept_lock(to):
        with contextlib.suppress(OSError):
            if to.stat().st_mtime_ns > read_at:
                return
        try:
            part.write_bytes(text)
            os.utime(part, ns=(read_at, read_at))
            part.replace(to)
        except OSError as e:
            log.warning(
                "reloaded_configuration_unkept",
                file=str(to),
                problem=str(e),
                detail="a worker replaced beside others while the file does not load refuses until it loads",
            )
            with contextlib.suppress(OSError):
                part.unlink()
            with contextlib.suppress(OSError), to.open("ab") as emptied:  # truncating takes no space
                emptied.truncate(0)
                os.utime(to, ns=(read_at, read_at))


@contextlib.contextmanager
def _kept_lock(kept: Path) -> Iterator[None]:
    """The siblings' lock over reading the file for a reload and keeping its text (`read_in_order`, `keep_reloaded`):
    an flock on a file beside `kept`. Best effort: without it (a full disk, a directory gone) the reload goes on."""
    fd = -1
    with contextlib.suppress(OSError):
        fd = os.open(kept.with_name(f".{kept.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released with the descriptor
        yield
    finally:
        if fd >= 0:
            os.close(fd)


SETTLE_LOOKS = 5  # looks at most for a changed file to stay unchanged before it is reloaded anyway


def watched_files(config: Config) -> list[Path]:
    """The configuration file and every file it names that a reload reads (the admin listener's need a restart)."""
    cc, listener, kerberos = config.client_certificates, config.listener, config.kerberos
    files: list[Path | None] = [config.path, listener.certificate, listener.private_key, kerberos.keytab]
    files += [*cc.trust_anchors, *cc.intermediates, *cc.crls, kerberos.krb5_config]
    files += [route.ca_bundle for route in config.routes]
    if config.directory is not None:
        files += [config.directory.ca_file, config.directory.password_file]
    return list(dict.fromkeys(f for f in files if f is not None))


def _fingerprint(config: Config) -> dict[Path, tuple[int, int] | None]:
    out: dict[Path, tuple[int, int] | None] = {}
    for path in watched_files(config):
        try:
            st = path.stat()
            out[path] = (st.st_mtime_ns, st.st_size)
        except OSError:
            out[path] = None
    return out
