"""Requests held at the backend, judged again by the directory while they are held.

Theory of operation. The mapping stage (`proxy.pipeline.map_certificate`) decides once per request, before it is
forwarded. An ActiveSync `Ping` is then held at the backend for up to its heartbeat (about an hour), and a device
keeps one held nearly all the time: without a second look, an account disabled, locked out or expired, or a strong
`altSecurityIdentities` entry removed, while its Ping is held would be served on until the Ping ends.

`HeldMappings.hold` registers each request the mapping stage admitted, for as long as it is in flight, under its
UPN, with its certificate and the `[identity]` settings it was decided under (a request keeps the configuration it
started with). Every `[directory] cache_seconds` (at least one second) one sweep looks each held UPN up again, one
name after the other (`Directory.lookup(fresh=True)`: one search each, whose answer the cache keeps; never a burst
that would keep live requests' look-ups waiting for the connection), and decides again as the mapping stage does:
the account's state, then `decide`. The sweep does not take the cache's answer: one kept from a look-up between two
sweeps (a device's first request) may predate a change made since, and the sweep after would then see the change
only a sweep later, up to twice `cache_seconds` after it; asked afresh, the first sweep after a change ends the
request, within `cache_seconds`. A refusal ends that UPN's held requests as a revocation ends one (`proxy.held`):
`403` with the refusal's reason if the backend's answer has not started, a cut connection if it has;
`held_request_ended` is logged with the reason and the fix. A weakly mapped certificate `strong-or-audit` served is
served on (the same decision as at the start). The directory unreachable ends nothing: a held request was admitted,
and an outage is not a verdict on the account; the UPN is looked at again at the next sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509

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
    """One request in flight that the mapping stage admitted, kept under its UPN while it is held; how it is ended
    is `proxy.held`'s (a class: a held long-poll keeps it for its whole life)."""

    __slots__ = ("_owner", "identity", "leaf", "upn")

    def __init__(
        self,
        owner: HeldMappings,
        request: DeviceRequest,
        task: asyncio.Task[Any],
        leaf: x509.Certificate,
        upn: str,
        identity: Identity,
    ) -> None:
        super().__init__(request, task)
        self._owner = owner
        self.leaf = leaf
        self.upn = upn
        self.identity = identity

    def _hold(self) -> None:
        self._owner._add(self)

    def _let_go(self) -> None:
        self._owner._remove(self)

    def _facts(self) -> dict[str, object]:
        return {"upn": self.upn, "cert_serial": format(self.leaf.serial_number, "x")}


class HeldMappings:
    """The held requests of one directory client, and the sweep that judges them again (module docstring)."""

    def __init__(self, directory: Directory, every: float) -> None:
        self._directory = directory
        self._every = max(every, 1.0)
        self._held: dict[str, set[_Held]] = {}  # the UPN, ASCII-lower-cased as the directory's cache key
        self._task: asyncio.Task[None] | None = None

    def hold(
        self, request: DeviceRequest, leaf: x509.Certificate, upn: str, identity: Identity
    ) -> contextlib.AbstractContextManager[None]:
        """Keep this request, admitted for `upn` under `identity`, judged while it is in flight."""
        task = asyncio.current_task()
        if task is None:
            return NOT_HELD
        if self._task is None or self._task.done():
            self._task = task.get_loop().create_task(self._run())
        return _Held(self, request, task, leaf, upn, identity)

    @property
    def held(self) -> int:
        return sum(len(held) for held in self._held.values())

    def _add(self, held: _Held) -> None:
        self._held.setdefault(ascii_lower(held.upn), set()).add(held)

    def _remove(self, held: _Held) -> None:
        key = ascii_lower(held.upn)
        same = self._held.get(key)
        if same is not None:
            same.discard(held)
            if not same:
                del self._held[key]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001  a sweep that failed must not end the sweeps: the next one retries
                log.warning("held_mapping_sweep_failed", error=f"{type(e).__name__}: {str(e)[:200]}")

    async def sweep(self, now: datetime | None = None) -> None:
        """Look each held UPN up again and end the held requests the directory's answer refuses."""
        for key in list(self._held):
            held = self._held.get(key)
            if not held:
                continue
            upn = next(iter(held)).upn
            try:
                account = await self._directory.lookup(upn, fresh=True)
            except DirectoryUnavailable:
                continue  # an outage is no verdict on the account: looked at again at the next sweep
            except MappingRefused as e:  # the name matches several accounts now
                for one in list(held):
                    one.end(e)
                continue
            at = now or datetime.now(UTC)
            for one in list(self._held.get(key, ())):
                try:
                    _judge(one, account, self._directory, at)
                except (MappingRefused, AccountRefused) as e:
                    one.end(e)

    def close(self) -> None:
        """Stop the sweep (the directory client is closing); the requests still held run on unjudged."""
        if self._task is not None:
            self._task.cancel()


def _judge(held: _Held, account: Account | None, directory: Directory, now: datetime) -> None:
    """The mapping stage's decision again, for a held request (raises as it would)."""
    mode = held.identity.mapping
    if account is None:
        no_account(held.upn, directory.base_dn, mode)  # refused in strong; still weak in strong-or-audit
        return
    account_state(account, now)
    backdating = timedelta(seconds=held.identity.certificate_backdating_compensation)
    decide(held.leaf, account, mode, directory.realm, backdating)
