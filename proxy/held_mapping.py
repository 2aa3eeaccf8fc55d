"""Requests held at the backend, judged again by the directory while they are held: in every authentication mode,
wherever a `[directory]` is configured.

Theory of operation. A request is admitted once, before it is forwarded: by the mapping stage
(`proxy.pipeline.map_certificate`) under a strong mode, otherwise by the KDC alone (a Basic sign-in's AS exchange, a
certificate's S4U2Self under `mapping = "upn"`). An ActiveSync `Ping` is then held at the backend for up to its
heartbeat (about an hour), and a device keeps one held nearly all the time: without a second look, an account
disabled, locked out, expired or deleted, or a strong `altSecurityIdentities` entry removed, while its Ping is held
would be served on until the Ping ends.

`HeldMappings.hold` registers each request the mapping stage admitted, for as long as it is in flight, under its
UPN, with its certificate and the `[identity]` settings it was decided under (a request keeps the configuration it
started with); `hold_account` registers one the directory did not decide (Basic: under the principal the KDC signed
in; `mapping = "upn"`: under the certificate's UPN, which the KDC's account has, `proxy.kerberos.account`). Every
`[directory] cache_seconds` (at least one second) one sweep looks each held name up again, one name after the other
(`Directory.lookup(fresh=True)`: one search each, whose answer the cache keeps; never a burst that would keep live
requests' look-ups waiting for the connection), and decides again: the account's state (disabled, locked out,
expired), then, for a strong mode's certificate, `decide`. The sweep does not take the cache's answer: one kept
from a look-up between two sweeps (a device's first request) may predate a change made since, and the sweep after
would then see the change only a sweep later, up to twice `cache_seconds` after it; asked afresh, the first sweep
after a change ends the request, within `cache_seconds`. A refusal ends that name's held requests as a revocation
ends one (`proxy.held`): `403` with the refusal's reason if the backend's answer has not started, a cut connection
if it has; `held_request_ended` is logged with the reason and the fix; and what the gateway keeps of the user (the
delegated tickets, a verified Basic password) is dropped, so the user's next request is decided afresh by the KDC
(which, under `"upn"` and Basic, is the only one asked on the way in).

What a sweep leaves held: a weakly mapped certificate `strong-or-audit` served (the same decision as at the start);
a name the directory has never found (an account outside `base_dn`, another realm's: the KDC admitted it, the
directory has no verdict), while one it did find (the mapping stage's look-up, an earlier sweep) and finds no more
was deleted and is ended; and everything while the directory is unreachable (fail open): a held request was
admitted, an outage is no verdict on the account, and ending every held Ping at once would only make every device
come back at once (under `"upn"` and Basic the directory is not asked on the way in, so they would be served
again); the name is looked at again at the next sweep, and counted meanwhile in `/metrics`'
`kcd_held_users_unjudged`, so that a sweep that keeps failing shows. A sweep stops at the first look-up no server
answers: each of the names after it would wait out `[directory] timeout` against a hung server too (1,000 held
users at 5 s: 83 minutes, computed), and the accounts changed during the outage would be judged only when such a
sweep came round to them, long after the directory answered again. Those names count as unjudged, and the next sweep
starts with them, so the first sweep that reaches a server judges every held name; the name it stopped at comes last
in the next sweep, so that one name no server answers for (a search refused for it alone) cannot stop every sweep
before anyone else is judged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509

from proxy.auth.shared import packing_forgotten
from proxy.config import Identity
from proxy.device.request import DeviceRequest
from proxy.errors import AccountRefused, DirectoryUnavailable, MappingRefused
from proxy.held import NOT_HELD, HeldRequest
from proxy.identity.mapping import Account, account_state, decide, no_account
from proxy.identity.principal import ascii_lower

if TYPE_CHECKING:
    from proxy.directory import Directory

log = structlog.get_logger("proxy.mapping")


class _Held(HeldRequest):
    """One request in flight kept under the name the directory is asked about while it is held; how it is ended is
    `proxy.held`'s (a class: a held long-poll keeps it for its whole life). With `leaf` (a strong mode's
    certificate) the mapping stage's whole decision is made again; without (a Basic sign-in, a certificate under
    `mapping = "upn"`) only the account's state."""

    __slots__ = ("_owner", "basic_user", "identity", "leaf", "upn")

    def __init__(
        self,
        owner: HeldMappings,
        request: DeviceRequest,
        task: asyncio.Task[Any],
        upn: str,
        *,
        leaf: x509.Certificate | None = None,
        identity: Identity | None = None,
        basic_user: str | None = None,
        forget: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(request, task, forget)  # `forget`: delegated tickets, a verified password
        self._owner = owner
        self.upn = upn
        self.leaf = leaf
        self.identity = identity
        self.basic_user = basic_user

    def _hold(self) -> None:
        self._owner._add(self)

    def _let_go(self) -> None:
        self._owner._remove(self)

    def _facts(self) -> dict[str, object]:
        if self.basic_user is not None:
            return {"basic_user": self.basic_user, "upn": self.upn}
        facts: dict[str, object] = {"upn": self.upn}
        if self.leaf is not None:
            facts["cert_serial"] = format(self.leaf.serial_number, "x")
        return facts


class HeldMappings:
    """The held requests of one directory client, and the sweep that judges them again (module docstring)."""

    def __init__(self, directory: Directory, every: float) -> None:
        self._directory = directory
        self._every = max(every, 1.0)
        self._held: dict[str, set[_Held]] = {}  # the UPN, ASCII-lower-cased as the directory's cache key
        self._found: set[str] = set()  # held names the directory has found an account for (a look-up or a sweep)
        self._unjudged: set[str] = set()  # held names whose last sweep found no directory server (fail open)
        self._stopped_at: str | None = None  # the name whose look-up stopped the last sweep: the next one asks it last
        self._task: asyncio.Task[None] | None = None

    def hold(
        self,
        request: DeviceRequest,
        leaf: x509.Certificate,
        upn: str,
        identity: Identity,
        *,
        forget: Callable[[], None] | None = None,
    ) -> contextlib.AbstractContextManager[None]:
        """Keep this request, admitted for `upn` under `identity` (a strong mode), judged while it is in flight."""
        return self._held_request(request, upn, leaf=leaf, identity=identity, forget=forget)

    def hold_account(
        self, request: DeviceRequest, name: str, *, basic_user: str | None = None, forget: Callable[[], None]
    ) -> contextlib.AbstractContextManager[None]:
        """Keep this request, admitted without the directory (Basic: `basic_user`; a certificate under
        `mapping = "upn"`), ended while it is in flight if the account `name` names may no longer sign in."""
        return self._held_request(request, name, basic_user=basic_user, forget=forget)

    def _held_request(self, request: DeviceRequest, name: str, **kept: Any) -> contextlib.AbstractContextManager[None]:
        task = asyncio.current_task()
        if task is None:
            return NOT_HELD
        if self._task is None or self._task.done():
            self._task = task.get_loop().create_task(self._run())
        return _Held(self, request, task, name, **kept)

    @property
    def held(self) -> int:
        return sum(len(held) for held in self._held.values())

    @property
    def unjudged(self) -> int:
        """Held names the last sweep could not look up, no directory server answering (`kcd_held_users_unjudged`):
        their requests are served on unjudged (fail open) until a sweep reaches a server."""
        return len(self._unjudged)

    def _add(self, held: _Held) -> None:
        key = ascii_lower(held.upn)
        self._held.setdefault(key, set()).add(held)
        if self._directory.cached(held.upn) is not None:  # the mapping stage (or a request between sweeps) found it
            self._found.add(key)

    def _remove(self, held: _Held) -> None:
        key = ascii_lower(held.upn)
        same = self._held.get(key)
        if same is not None:
            same.discard(held)
            if not same:
                del self._held[key]
                self._found.discard(key)
                self._unjudged.discard(key)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001  a sweep that failed must not end the sweeps: the next one retries
                log.warning("held_mapping_sweep_failed", error=f"{type(e).__name__}: {str(e)[:200]}")

    async def sweep(self, now: datetime | None = None) -> None:
        """Look each held UPN up again and end the held requests the directory's answer refuses. The names the last
        sweep could not look up first; at a look-up no server answers, the sweep stops (module docstring)."""
        # stable: unjudged first, but the name the last sweep stopped at last (a name whose own look-up fails at every
        # server would otherwise stop every sweep before anyone else is judged)
        stopped, self._stopped_at = self._stopped_at, None
        order = sorted(self._held, key=lambda key: (key == stopped, key not in self._unjudged))
        with packing_forgotten():  # the users it ends dropped everywhere together: a mass disable is a few log entries
            await self._sweep(order, now)

    async def _sweep(self, order: list[str], now: datetime | None) -> None:
        for at_key, key in enumerate(order):
            held = self._held.get(key)
            if not held:
                continue
            upn = next(iter(held)).upn
            try:
                account = await self._directory.lookup(upn, fresh=True)
            except DirectoryUnavailable:  # an outage is no verdict on the account: looked at again at the next sweep
                self._unjudged.update(k for k in order[at_key:] if k in self._held)
                self._stopped_at = key
                return  # the names after it would each wait out the directory's timeout as well
            except MappingRefused as e:  # the name matches several accounts now
                self._unjudged.discard(key)
                for one in list(held):
                    one.end(e)
                continue
            except Exception as e:  # noqa: BLE001  one user nobody can judge must not keep the sweep from the others
                self._failed(upn, e)
                continue
            self._unjudged.discard(key)
            found_before = key in self._found
            if account is not None and key in self._held:
                self._found.add(key)
            at = now or datetime.now(UTC)
            for one in list(self._held.get(key, ())):
                try:
                    _judge(one, account, self._directory, at, found_before=found_before)
                except (MappingRefused, AccountRefused) as e:
                    one.end(e)
                except Exception as e:  # noqa: BLE001  as above: this user's request stays held, the sweep goes on
                    self._failed(upn, e)
                    break

    @staticmethod
    def _failed(upn: str, e: Exception) -> None:
        """A held user the sweep could not judge (an error nobody expected): logged, left held, the next user judged.
        Before, the error ended the sweep at that user, every sweep alike (the order is stable): nobody after them
        was judged while their request was held."""
        log.warning("held_mapping_sweep_failed", upn=upn, error=f"{type(e).__name__}: {str(e)[:200]}")

    def close(self) -> None:
        """Stop the sweep (the directory client is closing); the requests still held run on unjudged."""
        if self._task is not None:
            self._task.cancel()


def _judge(held: _Held, account: Account | None, directory: Directory, now: datetime, *, found_before: bool) -> None:
    """The mapping stage's decision again, for a held request (raises as it would); for a request admitted without
    the directory, the account's state. `found_before`: the directory found this name's account earlier."""
    if account is None:
        if held.leaf is not None and held.identity is not None:
            no_account(held.upn, directory.base_dn, held.identity.mapping)  # strong refuses; strong-or-audit: weak
        if not found_before:
            return  # never found: a name outside base_dn (another domain's, another realm's), the KDC's to judge
        raise AccountRefused(  # found while held, gone now: whatever admitted it, nobody is left to serve
            "the account no longer exists in the directory",
            hint=f"{held.upn} was found under {directory.base_dn} while this request was held and is gone now "
            "(deleted or renamed); a device of a new account of that name signs in afresh",
        )
    account_state(account, now)
    if held.leaf is None or held.identity is None:
        return  # admitted without a certificate mapping: the account's state is all there is to judge
    backdating = timedelta(seconds=held.identity.certificate_backdating_compensation)
    decide(held.leaf, account, held.identity.mapping, directory.realm, backdating)
