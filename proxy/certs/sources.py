"""Where CRLs come from: files and http(s) URLs, re-read on a timer and swapped in whole.

Theory of operation. A `CrlStore` holds one state per source: a configured file or URL, or a URL
learned from a CRL distribution point of a certificate the gateway has verified (only with
`use_distribution_points`; only http and https; at most `MAX_LEARNED` of them). Every
`refresh_seconds` each source is read again, files from disk and URLs with a plain GET (no
If-Modified-Since: a server's one-second Last-Modified can hide a CRL reissued within the same second).
What was read is parsed and vetted (`revocation.accept`) before it may replace anything:
- bytes that do not parse, a CRL that does not verify, or one older than the CRL it would replace
  (a replayed CRL) leave the source's last good CRLs in place and set its last error;
- a failed fetch does the same; the last good CRL then serves until its nextUpdate, after which the
  revocation stage treats it as no CRL at all;
- a read taken whose CRLs leave out a scope (below) the source held (another trusted CA's genuine CRL, or another
  partition of its issuer's, answered in place of the CA's own) does no more harm than a failed fetch: the CRLs of the
  scopes it left out stay beside it until their nextUpdate (`_carry`, logged), then go (`_release`, logged). A CA
  renewed with a new key whose CRL comes in place of the old key's is such a read; the old key's CRL kept meanwhile
  speaks only for the old key's certificates.
After each round the accepted CRLs of all sources are indexed into a new `CrlSet`, which replaces
`current` in one assignment: a request sees the old set or the new one, never half of each; a round that kept the
very CRLs `current` holds keeps `current` itself (bytes read as last time are not even parsed). Listeners
registered with `on_change` (the in-flight registry) run when the set changed.

Every source's state (its CRLs' issuer, number, thisUpdate and nextUpdate; last fetch, last success,
last error) is logged when it changes and returned by `status()` for metrics. A source is named there, in /readyz, in
the traces and in refusals' fixes by its `name`: a URL that signs in to its server (`http://user:password@host/...`)
with `[redacted]` for the password, which only the fetch uses (/metrics is scraped into a store many more people read
than the configuration).

The replay floor. A refresh refuses a CRL older than the one its source holds, and a reload's store starts from the
CRLs the running one holds (`inherit`); a store that starts empty has nothing to compare with. With workers, the
stores of one gateway share floors (`floors`, the workers' `SharedTable`): each CRL a store takes raises the floor of
its scope, and one below it (a lower CRL number, or the same number with an earlier thisUpdate) is refused as a
replay, in a worker that replaced one that died as in any other. Such a replacement does not start empty: each
worker keeps what it took (`kept`, `proxy.certs.kept`), and a replacement starts each source from the newest kept CRL
it vets (`_newest_kept`), so an older answer is refused against it rather than leaving the source with nothing. A
scope is the CRL's issuer name, the key that verified its signature (the SubjectPublicKeyInfo, not the CA
certificate: a CA certificate renewed with the same key goes on with the same CRL numbers, RFC 5280 5.2.3, and its
floor stays; a new key starts a scope of its own, as a CA rebuilt under the same name starts its numbers again) and
the partition (delta or complete, distribution point, reasons). The AKI of a CRL only names that key; the key is what
was checked. In memory only, a restart starts with no floor; with `client_certificates.crl_state` the floors are
kept in that file too (`proxy.certs.floors`), written before a round's new CRLs are swapped in, so a restarted gateway
refuses a replay as a running one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import structlog
import yarl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.certs.chain import TrustList
from proxy.certs.floors import KEY, FloorTable, PersistedFloors
from proxy.certs.kept import MAX_KEPT_BYTES, KeptCrls
from proxy.certs.revocation import (
    MAX_CRL_BYTES,
    Crl,
    CrlSet,
    CrlUnusable,
    accept_der,
    crl_ders,
    crl_pem,
    shown_error,
    signer_certificates,
)
from proxy.files import read_bounded
from proxy.printable import printable

log = structlog.get_logger("proxy.crl")
MAX_LEARNED = 64  # distribution point URLs learned from certificates
FETCH_TIMEOUT = 10.0


@dataclass(frozen=True)
class CrlSource:
    """A file path or an http(s) URL to read CRLs from."""

    location: str
    learned: bool = False  # named by a certificate's CRL distribution point, not by the configuration

    @property
    def is_url(self) -> bool:
        return self.location.startswith(("http://", "https://"))

    @property
    def name(self) -> str:
        """The source as logs, `/metrics`, `/readyz`, traces and refusals name it (`shown_location`)."""
        return shown_location(self.location)

    def scrubbed(self, text: str) -> str:
        """`text` (an error a fetch raised, which may quote the URL) without the URL's password or query values, as
        configured and as aiohttp quotes them (yarl normalises percent-escapes: a token's `%2b` is `%2B` there)."""
        if not self.is_url:
            return text
        locations = [self.location]
        with contextlib.suppress(ValueError):  # as aiohttp's errors quote it: yarl's spelling (`%2b` as `%2B`)
            locations.append(str(yarl.URL(self.location)))
        for location in locations:
            text = text.replace(location, self.name)
        spellings = [urlsplit(location) for location in locations]
        values = [value for parts in spellings for _, _, value in _fields(parts.query)]
        passwords = [parts.password or "" for parts in spellings]
        queries = [parts.query for parts in spellings]
        secrets = [*passwords, *queries, *values, *(unquote(value) for value in values)]
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= MIN_SCRUBBED:  # a short value ("2") is no token, and would be replaced everywhere
                text = text.replace(secret, REDACTED)
        return text


REDACTED = "[redacted]"
MIN_SCRUBBED = 4  # characters of a password or query value that `CrlSource.scrubbed` looks for in an error's text


def shown_location(location: str) -> str:
    """A CRL or OCSP location as it may be shown: a URL's password (`user:password@host`) and every value of its
    query (`?sv=[redacted]&sig=[redacted]`: a signed URL's token is its credential; the names say what kind of URL it
    is) as `[redacted]`, a fragment dropped; the same for a URL of another scheme, which the configuration refuses.
    Invisible characters are escapes (`printable`): a certificate's distribution point or responder URL may hold
    controls, and the name reaches a device's refusal."""
    if "://" not in location:
        return printable(location)
    parts = urlsplit(location)
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:{REDACTED}@{host}" if at and ":" in userinfo else parts.netloc
    fields = (name + (f"={REDACTED}" if equals else "") for name, equals, _ in _fields(parts.query))
    query = "&".join(fields)
    return printable(f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else ""))


def _fields(query: str) -> list[tuple[str, str, str]]:
    """A query's `name=value` fields, each as (name, "=" or "", value)."""
    return [field.partition("=") for field in query.split("&") if field]


@dataclass
class _State:
    source: CrlSource
    crls: tuple[Crl, ...] = ()  # the last good CRLs of this source
    raw: bytes | None = None  # the last bytes read, good or not
    last_fetch: datetime | None = None
    last_success: datetime | None = None
    last_error: str | None = None
    unreadable: bool = False  # a file source whose last read failed, or gave bytes that are no CRL (`unreadable`)
    below_floor: bool = False  # its last read gave a CRL older than a replay floor (`CrlBelowFloor`, `behind_floors`)
    offered_kept: bool = False  # its siblings' kept CRLs looked at (a replacement's, before its first read: `kept`)
    kept: bool = False  # its worker's kept file says what it holds (`_unkept`; False: not yet written by this process)
    carried: tuple[Crl, ...] = ()  # of `crls`, those of scopes its last reads left out, to their nextUpdate (`_carry`)


@dataclass
class CrlStore:
    """The gateway's live CRLs: `current` is what the revocation stage reads on every request."""

    trust: TrustList
    sources: Sequence[CrlSource]
    refresh_seconds: float = 60.0
    use_distribution_points: bool = False
    timeout: float = FETCH_TIMEOUT
    current: CrlSet = field(default_factory=CrlSet)
    _states: dict[str, _State] = field(default_factory=dict, repr=False)
    _listeners: list[Callable[[CrlSet, CrlSet], None]] = field(default_factory=list, repr=False)
    _learning: dict[str, asyncio.Task[None]] = field(default_factory=dict, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)
    floors: FloorTable | None = field(default=None, repr=False)  # the replay floors (module docstring)
    policy: str | None = None  # the revocation mode these CRLs serve, for what a failed fetch means (None: not said)
    kept: KeptCrls | None = field(default=None, repr=False)  # a worker's: what it took, kept for a replacement

    def __post_init__(self) -> None:
        for source in self.sources:
            self._states.setdefault(source.location, _State(source))
        if self.use_distribution_points:
            for url in distribution_point_urls(self.trust.intermediates):
                self._states.setdefault(url, _State(CrlSource(url, learned=True)))

    def on_change(self, listener: Callable[[CrlSet, CrlSet], None]) -> None:
        """Call `listener(old, new)` whenever a refresh changes the CRL set."""
        self._listeners.append(listener)

    def off_change(self, listener: Callable[[CrlSet, CrlSet], None]) -> None:
        """No longer call `listener` (registered with `on_change`)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def inherit(self, old: CrlStore) -> None:
        """Start from `old`'s last good CRLs (a reload, before this store reads anything): for each source both
        read (and, with distribution points, the ones `old` learned), the CRLs whose signer's key this trust list
        still holds a certificate of. They are what a replayed CRL is refused below and what stays when the source
        gives nothing usable, as in a refresh: a store built afresh took any CRL still within its nextUpdate, last
        week's included. A source `old` did not read (a file moved, a URL pointed at a mirror) starts from the CRLs
        of the sources `old` read and this store does not (a renamed source's floor; its first good read replaces
        them), and its worker keeps them under the new name before that read (`_fetch`): a replacement reads the
        reloaded configuration and looks for its siblings' CRLs under that name only (`proxy.certs.kept`)."""
        if self.use_distribution_points:
            learned = [s.source for s in old._states.values() if s.source.learned and s.crls]
            for source in learned[:MAX_LEARNED]:
                self._states.setdefault(source.location, _State(source))
        gone = tuple(crl for location, s in old._states.items() if location not in self._states for crl in s.crls)
        for location, state in self._states.items():
            before = old._states.get(location)
            if state.crls:
                continue
            held = gone if before is None else before.crls
            # a certificate of its signer's key, not that one certificate: a CA's renewed on the same key still signs
            state.crls = tuple(crl for crl in held if signer_certificates(crl.signer_key, crl.issuer, self.trust))
            state.last_success = before.last_success if before is not None and state.crls else None
            state.kept = before is not None and before.kept  # a renamed source's files are of the old name (`_fetch`)

    # --- reading -----------------------------------------------------------------------------------

    def load_files(self, *, now: datetime) -> list[str]:
        """Read the file sources now (at start-up, before the event loop runs); return the problems."""
        for state in self._states.values():
            if not state.source.is_url:
                if self._adopting(state):
                    self._adopt(state, *_newest_kept(self.kept, state.source, self.trust, now, self.floors))
                if held := self._unkept(state):
                    _write_kept(*held)
                try:
                    data = _read_file(state.source.location)
                except OSError as exc:
                    self._failed(state, now, exc)
                    continue
                self._take(state, data, now)
        self.save_floors()
        self._swap(now)
        return [f"{s.source.name}: {s.last_error}" for s in self._states.values() if s.last_error]

    async def refresh(self, *, now: datetime | None = None) -> CrlSet:
        """Read every source once, then swap in the new set (returned)."""
        now = now or datetime.now(UTC)
        await asyncio.gather(*(self._fetch(state, now) for state in list(self._states.values())))
        await self._save_floors_in_thread()
        return await self._swap_in_thread(now)

    async def learn(self, chain: Sequence[x509.Certificate]) -> None:
        """Fetch, once, the CRL distribution points this verified chain names that are not known yet."""
        if not self.use_distribution_points:
            return
        new = [url for url in distribution_point_urls(chain[:-1]) if url not in self._states]
        waiting = [self._learning[url] for url in distribution_point_urls(chain[:-1]) if url in self._learning]
        for url in new:
            if sum(s.source.learned for s in self._states.values()) >= MAX_LEARNED:
                shown = shown_location(url)
                log.warning("crl_distribution_point_ignored", source=shown, reason=f"already {MAX_LEARNED} learned")
                break
            state = self._states[url] = _State(CrlSource(url, learned=True))
            task = asyncio.get_running_loop().create_task(self._learn(state))
            self._learning[url] = task
            task.add_done_callback(functools.partial(self._learned, url))
            waiting.append(task)
        if waiting:
            await asyncio.gather(*waiting)

    def _learned(self, url: str, _task: asyncio.Task[None]) -> None:
        self._learning.pop(url, None)

    async def _learn(self, state: _State) -> None:
        now = datetime.now(UTC)
        await self._fetch(state, now)
        await self._save_floors_in_thread()
        await self._swap_in_thread(now)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every `refresh_seconds` until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_seconds):  # not 3.11's wait_for: it can swallow a cancel
                    await stop.wait()
                return
            try:
                await self.refresh()
            except Exception:  # a bug in one round must not end revocation refreshes for good
                log.exception("crl_refresh_error")

    async def close(self) -> None:
        for task in list(self._learning.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self, state: _State, now: datetime) -> None:
        if self._adopting(state):
            kept = await asyncio.to_thread(_newest_kept, self.kept, state.source, self.trust, now, self.floors)
            self._adopt(state, *kept)
        if held := self._unkept(state):  # before the read, which may take FETCH_TIMEOUT: a renamed source's CRLs
            await asyncio.to_thread(_write_kept, *held)
        try:
            if state.source.is_url:
                data = await self._get(state.source.location)
            else:
                data = await asyncio.to_thread(_read_file, state.source.location)
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._failed(state, now, exc)
            data, changed = b"", False  # holding nothing, it looks at its siblings' CRLs below (`_behind`)
        else:
            if self._unchanged(state, data, now):
                changed = self._release(state, now)
            else:  # read, checked and indexed in a thread: see _vet
                vetted = await asyncio.to_thread(_vet, state, data, self.trust, now, self.floors)
                changed = self._keep(state, vetted, now)
        if self.kept is None:
            return
        if changed:
            await asyncio.to_thread(_write_kept, self.kept, state.source.location, data, state.carried)
        elif self._behind(state):
            kept = await asyncio.to_thread(_newest_kept, self.kept, state.source, self.trust, now, self.floors)
            if self._adopt(state, *kept):
                await asyncio.to_thread(_write_kept, self.kept, state.source.location, state.raw or b"")

    def unreadable(self) -> dict[str, str]:
        """The file sources whose last read failed or brought no CRL (not a PEM or DER CRL), each with why: a reload
        refuses a configuration naming one (`proxy.live`), as the start does (`proxy.app.build`). A CRL that parses
        and is then refused (a signature, an older number) is not among them: that is logged and the source kept."""
        return {
            location: state.last_error or ""
            for location, state in self._states.items()
            if state.unreadable and not state.source.is_url
        }

    def behind_floors(self, *, urls: bool = False) -> dict[str, str]:
        """The file sources (and the URLs: `urls`) holding no CRL because what they gave is older than a replay floor,
        by name (`CrlSource.name`: a URL's password never), each with why: a worker of this gateway (or, with
        `crl_state`, an earlier run) held a newer CRL for that issuer, key and scope. A replacement worker beside
        siblings serving refuses them (`proxy.app`): served without, it passed what the newer CRL revokes while they,
        keeping it, refused it. Not those of which each sibling serving beside it holds nothing either (their kept files
        say so: `KeptCrls.held_beside`): refused, it kept the gateway a worker short and protected nothing."""
        return {
            state.source.name: state.last_error or ""
            for state in self._states.values()
            if state.below_floor
            and not state.crls
            and (urls or not state.source.is_url)
            and (self.kept is None or self.kept.held_beside(state.source.location))
        }

    def _failed(self, state: _State, now: datetime, exc: Exception) -> None:
        state.last_fetch, state.unreadable = now, True
        error = state.source.scrubbed(f"fetch failed: {type(exc).__name__}: {exc}".rstrip(": "))  # no password
        state.last_error = shown_error(error)  # then cut short: aiohttp's errors may quote kilobytes the server sent
        fix = fetch_failed_fix(self.policy, holding=bool(state.crls), refresh_seconds=self.refresh_seconds)
        log.warning("crl_fetch_failed", source=state.source.name, error=state.last_error, fix=fix, **_held(state))

    def not_fetched(self) -> dict[str, str]:
        """The URL sources (configured or learned) whose last fetch failed and that hold no CRL, by name
        (`CrlSource.name`), each with its error: what a refusal for want of a current CRL may be owed to."""
        return {
            state.source.name: state.last_error or ""
            for state in self._states.values()
            if state.source.is_url and not state.crls and (state.last_error or "").startswith("fetch failed")
        }

    async def _get(self, url: str) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            data = await body_within(response, MAX_CRL_BYTES)
            if data is None:
                raise ValueError(f"more than {MAX_CRL_BYTES} bytes")
            return data

    def _take(self, state: _State, data: bytes, now: datetime) -> None:
        """Vet what a source returned; keep its last good CRLs unless all of it is good and not older."""
        if self._unchanged(state, data, now):
            changed = self._release(state, now)
        else:
            changed = self._keep(state, _vet(state, data, self.trust, now, self.floors), now)
        if self.kept is None:
            return
        if changed:
            _write_kept(self.kept, state.source.location, data, state.carried)
        elif self._behind(state):
            kept = _newest_kept(self.kept, state.source, self.trust, now, self.floors)
            if self._adopt(state, *kept):
                _write_kept(self.kept, state.source.location, state.raw or b"")

    def _unkept(self, state: _State) -> tuple[KeptCrls, str, bytes, Sequence[Crl]] | None:
        """What this worker's kept file for `state`'s source is to say before the process first reads it, if it has not
        said it yet (`_write_kept`'s arguments; `proxy.certs.kept`): the CRLs it holds, a sibling's it started from (as
        that sibling's file holds them), a renamed source's (`inherit`: a replacement reads the reloaded configuration
        and looks under the new name only), or none (an empty file: a replacement beside this worker need not refuse
        an older CRL of that source for its sake, `KeptCrls.held_beside`)."""
        if self.kept is None or state.kept:
            return None
        state.kept = True
        return self.kept, state.source.location, state.raw or b"", () if state.raw else state.crls

    def _adopting(self, state: _State) -> bool:
        """Whether `state`'s source is to start from its siblings' kept CRLs first (`proxy.certs.kept`): in a
        replacement worker, once, before the source's first read."""
        if self.kept is None or not self.kept.adopt or state.offered_kept:
            return False
        state.offered_kept = True
        return True

    def _behind(self, state: _State) -> bool:
        """Whether `state`'s source holds no CRL after a read that gave it none: refused below a replay floor, failed
        (no answer, a 404) or refused otherwise (bytes that are no CRL). A worker then starts it from its siblings' kept
        CRLs (`_adopt`), as a replacement does before its first read. Served without, it passed what their CRL revokes:
        anyone on a plain-HTTP path can replay an older answer, or withhold the answer, to one worker and not another
        (each such refresh reads the siblings' files for it: empty ones while none holds a CRL of it)."""
        return not state.crls

    def _adopt(self, state: _State, kept: list[Crl], data: bytes) -> bool:
        """Start `state` from the CRLs a sibling kept (`_newest_kept`, read from `data`), checked again against what it
        holds now and the floors, as `_keep` checks a read: a source then giving an older CRL is refused as a replay
        beside them, and one giving the same bytes is not read again (`_unchanged`). Whether it did."""
        try:
            _refuse_rollback(kept, state.crls)
            if self.floors is not None:
                _refuse_below_floor(kept, self.floors)
        except CrlUnusable:
            return False
        if not kept:
            return False
        state.crls, state.raw = tuple(kept), data
        for crl in kept:
            self._raise_floor(crl)
            log.info("crl_taken_from_siblings", **_describe(crl))
        return True

    def _unchanged(self, state: _State, data: bytes, now: datetime) -> bool:
        """Whether `data` are the bytes last read and taken (then nothing needs checking again)."""
        state.last_fetch = now
        if data == state.raw and state.last_error is None:
            state.last_success = now
            return True
        state.raw = data
        return False

    def _keep(self, state: _State, vetted: list[Crl] | ValueError | CrlUnusable, now: datetime) -> bool:
        """Take what `_vet` accepted (True), or log why not and keep the last good CRLs."""
        if isinstance(vetted, list):  # vetted against what was held when its thread started: another fetch of this
            try:  # source (a chain's first sight beside a refresh) may have kept a newer CRL since
                _refuse_rollback(vetted, state.crls)
                if self.floors is not None:
                    _refuse_below_floor(vetted, self.floors)
            except CrlUnusable as exc:
                vetted = exc
        if not isinstance(vetted, list):
            state.unreadable = not isinstance(vetted, CrlUnusable)  # a ValueError: the bytes are no CRL
            state.below_floor = isinstance(vetted, CrlBelowFloor)
            state.last_error = printable(state.source.scrubbed(str(vetted)))  # a name the CRL's sender chose
            log.warning("crl_rejected", source=state.source.name, problem=state.last_error, **_held(state))
            return False
        self._release(state, now)
        carried = self._carry(state, vetted, now)
        state.crls, state.last_success, state.last_error, state.unreadable = (*vetted, *carried), now, None, False
        state.below_floor = False
        for crl in vetted:
            self._raise_floor(crl)
            log.info("crl_loaded", **_describe(crl))
        return True

    def _carry(self, state: _State, read: Sequence[Crl], now: datetime) -> tuple[Crl, ...]:
        """The CRLs `state` holds of the scopes (issuer, key, partition) that `read` leaves out, those not past their
        nextUpdate, to hold beside it as a failed fetch holds them: a source giving another trusted CA's genuine CRL,
        or another partition of its issuer's, in place of the one it gave (anyone on a plain-HTTP path can answer one)
        no longer makes that scope's certificates unknown at once. A CA renewed with a new key (a new scope) whose CRL
        comes in place of the old key's keeps the old key's CRL until its nextUpdate: it speaks only for the old key's
        certificates. A scope left out is logged once (`crl_scope_dropped`); let go at its nextUpdate (`_release`)."""
        scopes = {_scope(crl) for crl in read}
        left_out = [crl for crl in state.crls if _scope(crl) not in scopes]
        carried = tuple(crl for crl in left_out if now <= crl.next_update)
        before = {id(crl) for crl in state.carried}
        if dropped := [crl for crl in left_out if id(crl) not in before]:
            log.warning(
                "crl_scope_dropped",
                source=state.source.name,
                dropped=", ".join(
                    f"{crl.label} (kept until its nextUpdate {_iso(crl.next_update)})"
                    if now <= crl.next_update
                    else f"{crl.label} (past its nextUpdate {_iso(crl.next_update)}: not kept)"
                    for crl in dropped
                ),
                fix=scope_dropped_fix(state.source.name, self.policy),
            )
        state.carried = carried
        return carried

    def _release(self, state: _State, now: datetime) -> bool:
        """Let go of the carried CRLs (`_carry`) past their nextUpdate (logged: their certificates have no CRL from
        this source now); whether any was."""
        stale = {id(crl): crl for crl in state.carried if now > crl.next_update}
        if not stale:
            return False
        state.carried = tuple(crl for crl in state.carried if id(crl) not in stale)
        state.crls = tuple(crl for crl in state.crls if id(crl) not in stale)
        released = ", ".join(crl.label for crl in stale.values())
        without = WITHOUT_CRL.get(self.policy or "", "no CRL of it is in force")
        fix = f"{state.source.name} still leaves it out: make it serve the CA's own CRL again; meanwhile {without}"
        log.warning("crl_scope_released", source=state.source.name, released=released, fix=fix)
        return True

    def _raise_floor(self, crl: Crl) -> None:
        if self.floors is None:
            return
        scope = floor_scope(crl)
        if isinstance(self.floors, PersistedFloors):
            self.floors.issuers[scope] = crl.issuer.rfc4514_string()
        self.floors.raise_crl_floor(scope, crl.number, crl.this_update.timestamp())

    def raise_floors(self) -> None:
        """Raise the floors to the CRLs held (a reload's, after `inherit`: a table the old store did not keep, such
        as the one of a `crl_state` the reload adds, starts from them)."""
        for crl in self._held():
            self._raise_floor(crl)

    def save_floors(self) -> None:
        """The floors into `crl_state` (`proxy.certs.floors`) if this store raised one, before its CRLs are used."""
        if isinstance(self.floors, PersistedFloors):
            self.floors.save()

    async def _save_floors_in_thread(self) -> None:
        """`save_floors` off the event loop (a write and two fsyncs), and only when there is something to write."""
        if isinstance(self.floors, PersistedFloors) and self.floors.dirty:
            await asyncio.to_thread(self.floors.save)

    def _swap(self, now: datetime) -> CrlSet:
        return self._install(*CrlSet.of(self._held(), self.trust, at=now, previous=self.current))

    async def _swap_in_thread(self, now: datetime) -> CrlSet:
        """`_swap`, indexing in a thread (see `_vet`); indexed again if a source took new CRLs meanwhile."""
        while True:
            held = self._held()
            indexed = await asyncio.to_thread(CrlSet.of, held, self.trust, at=now, previous=self.current)
            if [id(crl) for crl in self._held()] == [id(crl) for crl in held]:
                return self._install(*indexed)

    def _held(self) -> list[Crl]:
        return [crl for state in self._states.values() for crl in state.crls]

    def _install(self, new: CrlSet, problems: list[str]) -> CrlSet:
        old = self.current
        for problem in problems:
            log.warning("crl_not_used", problem=problem)
        self.current = new
        if {id(c) for c in old.crls} != {id(c) for c in new.crls}:
            for listener in self._listeners:
                listener(old, new)
        return new

    # --- reporting ---------------------------------------------------------------------------------

    def status(self, *, now: datetime | None = None) -> list[CrlStatus]:
        """One row per CRL held, or per source holding none: for logs, `/metrics` and `/readyz`."""
        now = now or datetime.now(UTC)
        rows: list[CrlStatus] = []
        for state in self._states.values():
            common = CrlStatus(
                state.source.name, state.source.learned, state.last_fetch, state.last_success, state.last_error
            )
            if not state.crls:
                rows.append(common)
            rows.extend(
                dataclasses.replace(
                    common,
                    issuer=crl.issuer.rfc4514_string(),
                    crl_number=crl.number if crl.number >= 0 else None,
                    delta=crl.delta_base is not None,
                    this_update=crl.this_update,
                    next_update=crl.next_update,
                    current=crl.current(now),
                    signer_key=crl.signer_key,
                )
                for crl in state.crls
            )
        return rows


@dataclass(frozen=True)
class CrlStatus:
    """What a CRL source holds and how its last fetch went."""

    source: str
    learned: bool
    last_fetch: datetime | None
    last_success: datetime | None
    last_error: str | None
    issuer: str | None = None  # None: the source holds no good CRL
    crl_number: int | None = None
    delta: bool = False
    this_update: datetime | None = None
    next_update: datetime | None = None
    current: bool = False
    signer_key: bytes = field(default=b"", repr=False)  # with `issuer`, the CA the CRL speaks for (`floor_scope`)


def sources_from_config(files: Iterable[Path], urls: Iterable[str]) -> list[CrlSource]:
    return [CrlSource(str(p)) for p in files] + [CrlSource(u) for u in urls]


def distribution_point_urls(certs: Iterable[x509.Certificate]) -> list[str]:
    """The http(s) URLs in the certificates' CRL distribution points (ldap:// and others are skipped)."""
    urls: list[str] = []
    for cert in certs:
        try:
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            continue
        for point in points:
            for name in point.full_name or ():
                url = name.value if isinstance(name, x509.UniformResourceIdentifier) else ""
                if url.startswith(("http://", "https://")) and url not in urls:
                    urls.append(url)
    return urls


def _vet(
    state: _State, data: bytes, trust: TrustList, now: datetime, floors: FloorTable | None
) -> list[Crl] | ValueError | CrlUnusable:
    """The CRLs in what a source returned, each checked (`accept_der`: the signature before the entries are read) and
    none older than the one it replaces nor below its replay floor; or why not. Run in a thread by a refresh: reading a
    CRL's entries and checking it takes CPU in proportion to its size (200,000 entries, 6 MiB: about 2.2 s here), which
    on the event loop stalled every request each time it changed. An older CRL is refused on its outline, before its
    entries are read (`before_reading`): a genuine one replayed at each refresh cost a whole read each time. `_keep`
    checks again on the event loop, against what is held then: this look (the floors read from this thread) can only
    be earlier, and floors only rise, so it refuses nothing that check would take."""
    where = state.source.name  # each CRL's `source`: what a refusal's fix and the traces name

    def not_older(crl: Crl) -> None:
        _refuse_rollback([crl], state.crls)
        if floors is not None:
            _refuse_below_floor([crl], floors)

    try:
        crls = [accept_der(where, der, trust, at=now, before_reading=not_older) for der in crl_ders(data, where)]
        _refuse_rollback(crls, state.crls)
    except (ValueError, CrlUnusable) as exc:
        return exc
    return crls


def _newest_kept(
    kept: KeptCrls | None, source: CrlSource, trust: TrustList, now: datetime, floors: FloorTable | None
) -> tuple[list[Crl], bytes]:
    """The newest of the CRLs the workers of this gateway kept for `source` (`proxy.certs.kept`) that pass what a read
    of the source would (`_vet`: signed by a CA of `trust`, none below its floor), with the bytes they were read from;
    ([], b"") if none does. The files come in the order they were written, each taken if no older than the CRLs of its
    scope taken before it, as a refresh takes a read: of two of another scope, the one a worker took last. Each file is
    only what its signature proves: one older, forged, cut short or of another CA's is passed over as a read would be.
    Bytes seen already (two workers keep the same CRL) are not read twice."""
    best, seen = _State(source), set()
    for data in kept.offered(source.location) if kept is not None else ():
        if (digest := hashlib.blake2b(data, digest_size=16).digest()) in seen:
            continue
        seen.add(digest)
        vetted = _vet(best, data, trust, now, floors)  # older than the best so far: refused (`_refuse_rollback`)
        if isinstance(vetted, list) and vetted:
            best.crls, best.raw = tuple(vetted), data
    return list(best.crls), best.raw or b""


def _write_kept(kept: KeptCrls, location: str, data: bytes, carried: Sequence[Crl] = ()) -> None:
    """What `location` gave, whose CRLs this worker took, kept (`proxy.certs.kept`): one DER CRL as it came, a PEM file
    as its CRL blocks alone as openssl writes them (the very bytes of a file openssl wrote: a replacement that the
    source then gives them does not read them again). Text around or inside a PEM file's blocks, up to MAX_CRL_BYTES
    of a plain-HTTP path's choosing and fresh at each refresh, is not written: each worker wrote it, on a tmpfs into
    memory. The CRLs this worker carries for scopes the source left out (`CrlStore._carry`) follow in the same PEM
    bundle: a replacement starts from what its siblings hold. No `data` (b""): `carried` alone, the CRLs it holds that
    the source did not give this process (`CrlStore._unkept`); none at all, an empty file."""
    ders = (crl_ders(data, location) if data else []) + [
        crl.crl.public_bytes(serialization.Encoding.DER) for crl in carried
    ]
    if (error := kept.keep(location, data if ders == [data] else b"".join(crl_pem(der) for der in ders))) is not None:
        log.warning(
            "crl_not_kept",
            source=shown_location(location),
            limit=MAX_KEPT_BYTES,
            error=error,
            detail="the CRLs this worker holds of this source are not in its kept file (more than a replacement reads "
            "of one, or the file could not be written: a full disk?): one replacing a worker, or a worker the source "
            "gives no CRL, starts without them (beside other workers, a replacement is not started if the source then "
            "gives an older CRL)",
        )


def _scope(crl: Crl) -> tuple[object, ...]:
    """What makes two CRLs alternatives, the newer replacing the older: their issuer, the key that verified them and
    their partition (module docstring; `floor_scope` is its digest)."""
    return (crl.issuer, crl.signer_key, crl.partition)


def _refuse_rollback(new: Sequence[Crl], held: Sequence[Crl]) -> None:
    for crl in new:
        for old in held:
            if _scope(old) == _scope(crl) and (crl.number, crl.this_update) < (old.number, old.this_update):
                raise CrlUnusable(f"{crl.label} is older than the {old.label} already held (replayed?)")


def floor_scope(crl: Crl) -> bytes:
    """The scope a CRL's replay floor is kept under (module docstring): its issuer, the key that verified it, its
    partition. The same in every process, so that a floor read back from `client_certificates.crl_state` after a
    restart names the same scope: the partition's sets are written sorted (the repr of a frozenset follows the
    process's string hashing, which differs from one start to the next)."""
    names, reasons = sorted(repr(name) for name in crl.idp_names), sorted(reason.value for reason in crl.reasons)
    partition = json.dumps([crl.scope, names, reasons, crl.indirect, crl.delta_base is not None])  # `Crl.partition`
    material = b"\0".join((crl.issuer.public_bytes(), crl.signer_key, partition.encode()))
    return hashlib.blake2b(material, digest_size=16, person=b"crl-floor").digest()


class CrlBelowFloor(CrlUnusable):
    """A CRL older than its replay floor: one a worker of this gateway, or an earlier run (`crl_state`), took."""


def _refuse_below_floor(new: Sequence[Crl], floors: FloorTable) -> None:
    for crl in new:
        floor = floors.crl_floor(floor_scope(crl))
        if floor is not None and (crl.number, crl.this_update.timestamp()) < floor:
            number, this_update = floor
            seen = datetime.fromtimestamp(this_update, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if isinstance(floors, PersistedFloors):
                raise CrlBelowFloor(
                    f"{crl.label} is older than the one this gateway took (CRL number {number}, thisUpdate {seen}, "
                    f"kept in {KEY} {floors.path} across restarts; replayed? A CA that numbered a CRL too high by "
                    "mistake: docs/revocation.md)"
                )
            raise CrlBelowFloor(
                f"{crl.label} is older than the one a worker of this gateway took (CRL number {number}, thisUpdate "
                f"{seen}; replayed?)"
            )


async def body_within(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """An HTTP answer's whole body, read to its end (`content.read(n)` returns what has arrived so far: an answer of
    more than one TCP segment was cut short), or None once it passes `limit` bytes (nothing more read). A CRL
    distribution point's and an OCSP responder's (`proxy.certs.ocsp`)."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


def _read_file(location: str) -> bytes:
    return read_bounded(location, MAX_CRL_BYTES)


def _describe(crl: Crl) -> dict[str, object]:
    return {
        "source": crl.source,
        "issuer": crl.issuer.rfc4514_string(),
        "crl_number": crl.number if crl.number >= 0 else None,
        "delta": crl.delta_base is not None,
        "this_update": _iso(crl.this_update),
        "next_update": _iso(crl.next_update),
    }


FETCH_CHECK = (
    "check the URL (a typo?), the network between this host and it (DNS, routes, a firewall, an HTTP proxy) "
    "and that the CA's server publishes the CRL there"
)


WITHOUT_CRL = {  # what a revocation mode does for the devices of a CA whose CRL a source no longer holds
    "require": (
        'under revocation = "require", every device of a CA this CRL speaks for is refused (403 at revocation, its '
        "status could not be determined) unless another source holds a current CRL of that CA"
    ),
    "best-effort": (
        'under revocation = "best-effort", devices of a CA this CRL speaks for are served with their revocation '
        "status unknown: a certificate it revokes is not refused"
    ),
}


def fetch_failed_fix(policy: str | None, *, holding: bool, refresh_seconds: float) -> str:
    """What `crl_fetch_failed` tells the administrator to check, and what the revocation mode `policy` does until
    a fetch succeeds (a source still holding its last good CRL keeps it in force until its nextUpdate)."""
    check = FETCH_CHECK
    if holding:
        meanwhile = "meanwhile its last good CRL stays in force until its nextUpdate"
    elif policy in WITHOUT_CRL:
        meanwhile = f"meanwhile, {WITHOUT_CRL[policy]}"
    else:
        meanwhile = "meanwhile no CRL of it is in force"
    return f"{check}; {meanwhile}; fetched again every {refresh_seconds:g} s"


def scope_dropped_fix(name: str, policy: str | None) -> str:
    """What `crl_scope_dropped` tells the administrator: a source gave CRLs that leave out one it gave before."""
    after = WITHOUT_CRL.get(policy or "", "no CRL of it is in force")
    return (
        f"check that {name} still serves the CA's own CRL (anyone on a plain-HTTP path can answer another CA's genuine "
        "CRL, or another partition of it, in its place); a CA renewed with a new key whose new CRL comes from there "
        "now needs nothing. Meanwhile the CRL left out stays in force until its nextUpdate, as after a failed fetch; "
        f"after that, {after}"
    )


def _held(state: _State) -> dict[str, object]:
    """What a failed source keeps serving with."""
    if not state.crls:
        return {"holding": "nothing"}
    return {"holding": ", ".join(f"{c.label} (nextUpdate {_iso(c.next_update)})" for c in state.crls)}


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when else None
