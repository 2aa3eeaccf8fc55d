"""With workers, a user whose delegated tickets one worker drops is served from a ticket by no worker.

Two delegators on one `SharedTable` (the memory file the supervisor maps into every worker), their KDC exchange
replaced by a recorded answer as in test_delegator_keys.py; the same scene against the Samba DC, two real workers and
a held Ping ended by the directory, is test_ad_held_accounts.py's
`test_with_two_workers_a_held_upn_users_end_drops_the_tickets_of_every_worker`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import gssapi
import pytest

from proxy.auth import shared
from proxy.auth.shared import FORGOTTEN_SLOTS, SharedTable
from proxy.config import Kerberos
from proxy.errors import AccountRefused
from proxy.held_mapping import HeldMappings
from proxy.identity.mapping import Account
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.kerberos.delegate import Delegator, _Ticket
from tests.unit.test_mapping import account

ALICE, BOB = map_upn("alice@ad.test", realm_map={}), map_upn("bob@ad.test", realm_map={})
SPN, TARGET = "HTTP/cas.ad.test", "HTTP@cas.ad.test"


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Delegator, Delegator]:
    """Two workers' delegators sharing one table; every exchange succeeds (no KDC, no keytab read)."""

    def exchange(self: Delegator, user: UserPrincipal, gss_target: str) -> _Ticket:
        creds = cast(gssapi.Credentials, object())
        return _Ticket(creds=creds, expires=10_000.0, client=user.principal, evidence_client=user.principal)

    monkeypatch.setattr(Delegator, "_exchange_blocking", exchange)
    settings = Kerberos(principal="HTTP/proxy.ad.test@AD.TEST", keytab=tmp_path / "none.keytab", kdc_account="optional")
    table = SharedTable(max_keys=64)
    one, two = (Delegator(settings, clock=lambda: 0.0, shared=table) for _ in range(2))
    return one, two


def _cached(delegator: Delegator, user: UserPrincipal) -> bool:
    async def run() -> bool:
        return (await delegator.delegation(user, SPN, TARGET)).impersonation_cached

    return asyncio.run(run())


def test_a_user_one_worker_forgets_is_asked_of_the_kdc_again_by_every_worker(workers: tuple[Delegator, ...]) -> None:
    """Both workers hold alice's and bob's tickets; the first forgets alice (the directory ended her held Ping):
    the second's next request of alice is an exchange, not its cached ticket, while bob stays cached in both and
    the first does not drop its own fresh ticket again. Failed before: the second served alice from its cache."""
    one, two = workers
    for worker in (one, two):
        assert not _cached(worker, ALICE)
        assert not _cached(worker, BOB)
        assert _cached(worker, ALICE)
    one.forget(ALICE.principal, everywhere=True)
    assert not _cached(one, ALICE)
    assert not _cached(two, ALICE)  # dropped there too, before any ticket served her
    assert _cached(two, ALICE)  # asked afresh once, then cached again
    assert _cached(one, ALICE)
    assert [_cached(one, BOB), _cached(two, BOB)] == [True, True]
    assert (one.stats.exchanges, two.stats.exchanges) == (3, 3)


def test_a_worker_too_far_behind_the_log_drops_every_ticket(workers: tuple[Delegator, ...]) -> None:
    """More users forgotten by the first worker than the log keeps, while the second served nobody: the second
    cannot know whether alice was among them, so it drops every ticket it holds (never a user kept)."""
    one, two = workers
    assert not _cached(two, ALICE)
    for n in range(FORGOTTEN_SLOTS + 1):
        one.forget(f"user{n}@AD.TEST", everywhere=True)
    assert not _cached(two, ALICE)
    assert _cached(two, ALICE)


def test_the_shared_log_gives_each_worker_what_it_has_not_seen() -> None:
    """`forget_users` entries come back in order from any generation within the log; a name too long for a slot, or
    a reader more than FORGOTTEN_SLOTS behind, reads as everyone (None)."""
    table = SharedTable(max_keys=8)
    start = table.generation()
    table.forget_users([("alice@AD.TEST", None)])
    _, seen = table.forget_users([("carol\\@corp.example@AD.TEST", "carol@corp.example")])
    assert table.forgotten_since(start) == (
        seen,
        [("alice@AD.TEST", None), ("carol\\@corp.example@AD.TEST", "carol@corp.example")],
    )
    assert table.forgotten_since(seen) == (seen, [])
    table.forget_users([("x" * 2000 + "@AD.TEST", None)])
    assert table.forgotten_since(seen) == (seen + 1, None)
    for n in range(FORGOTTEN_SLOTS):
        table.forget_users([(f"user{n}@AD.TEST", None)])
    assert table.forgotten_since(seen)[1] is None  # FORGOTTEN_SLOTS + 1 behind
    assert table.forgotten_since(seen + 1)[1] == [(f"user{n}@AD.TEST", None) for n in range(FORGOTTEN_SLOTS)]


def test_a_refused_requests_forget_stays_in_its_worker(workers: tuple[Delegator, ...]) -> None:
    """A revoked certificate's refused request drops its user's tickets in its own worker only (`everywhere` off): a
    device can repeat such requests at will, and each entry in the log would cost every worker a look-up (a flood
    past FORGOTTEN_SLOTS would drop every user's tickets there). Held requests' ends are bounded by admissions."""
    one, two = workers
    for worker in (one, two):
        assert not _cached(worker, ALICE)
    generation = one._shared.generation() if one._shared is not None else None
    one.forget(ALICE.principal)
    assert one._shared is not None
    assert one._shared.generation() == generation
    assert _cached(two, ALICE)
    assert not _cached(one, ALICE)


def _forget_in_one_turn(delegator: Delegator, users: Sequence[tuple[str, str | None]]) -> None:
    """`forget(..., everywhere=True)` for each of `users` in one turn of an event loop, as a CRL change or the
    directory's sweep ends every held request it judges (proxy.held), then the loop's next turns."""

    async def run() -> None:
        for principal, enterprise in users:
            delegator.forget(principal, enterprise=enterprise, everywhere=True)
        await asyncio.sleep(0)

    asyncio.run(run())


def test_one_sweep_ending_more_held_requests_than_the_log_keeps_costs_other_users_nothing(
    workers: tuple[Delegator, ...],
) -> None:
    """A CRL change revoking 300 users' certificates, each with a held Ping, ends 300 requests in one turn, and one
    device's 300 held requests (its pool's connections over several routes, two names each under strong mapping) as
    many: the log gets a few packed entries, not one per request, so the second worker keeps bob's ticket (the KDC is
    not asked again for every user of every worker) and still drops the revoked ones. Failed before: every ended
    request was an entry of its own, the second worker was FORGOTTEN_SLOTS behind and dropped every ticket."""
    one, two = workers
    for worker in (one, two):
        assert not _cached(worker, BOB)
        assert not _cached(worker, ALICE)
    _forget_in_one_turn(one, [(f"user{n}@AD.TEST", None) for n in range(300)] + [(ALICE.principal, None)])
    _forget_in_one_turn(one, [(ALICE.principal, None)] * (FORGOTTEN_SLOTS + 1))
    assert _cached(two, BOB)
    assert not _cached(two, ALICE)  # still dropped in the second worker
    assert two.stats.exchanges == 3


def test_a_long_non_ascii_name_fits_its_entry_as_utf8(workers: tuple[Delegator, ...]) -> None:
    """A UPN of 300 non-ASCII characters (AD allows Unicode UPNs) forgotten: its entry holds it as UTF-8 and drops that
    user only. Failed before: JSON's \\u escapes took six bytes a character, the entry overflowed its slot, and every
    worker dropped every ticket."""
    one, two = workers
    assert not _cached(two, BOB)
    name = "é" * 300 + "@AD.TEST"
    _forget_in_one_turn(one, [(name, None)])
    assert _cached(two, BOB)
    assert one._shared is not None
    assert one._shared.forgotten_since(0) == (one._shared.generation(), [(name, None)])


class _DisablingDirectory:
    """A directory whose every account is disabled now; each look-up takes a turn of the event loop or more, as a
    search over the network does (the forgets of two users are not in one turn)."""

    base_dn = "DC=ad,DC=test"
    realm = "AD.TEST"

    def cached(self, name: str) -> Account | None:
        return None

    async def lookup(self, name: str, *, fresh: bool = False) -> Account | None:
        for _ in range(3):
            await asyncio.sleep(0)
        return account(user_account_control=0x202)  # ACCOUNTDISABLE


class _Held:
    """What a held request offers the sweep: its answer has not started (ended with a 403)."""

    answer_started = False

    def abort(self) -> None:
        raise AssertionError("the answer had not started")


def test_a_directory_sweep_ending_many_users_costs_other_users_nothing(workers: tuple[Delegator, ...]) -> None:
    """A mass disable in the directory: one sweep of `proxy.held_mapping` ends the held requests of 400 users, each
    after its own look-up (a turn of the loop or more apart), and drops each user's tickets everywhere: the log gets
    packed entries, so the second worker keeps bob's ticket and still drops alice's. Failed before: each user's end
    was written on the loop's next turn, an entry each, the second worker was past the log and dropped every ticket
    (a KDC storm: every user's next request an S4U2Self and an S4U2Proxy in every worker)."""
    one, two = workers
    for worker in (one, two):
        assert not _cached(worker, BOB)
        assert not _cached(worker, ALICE)
    names = [f"user{n}@AD.TEST" for n in range(400)] + [ALICE.principal]

    async def sweep() -> None:
        held = HeldMappings(cast(Any, _DisablingDirectory()), every=3600)

        async def request(name: str) -> None:
            def forget() -> None:
                one.forget(name, everywhere=True)

            with held.hold_account(cast(Any, _Held()), name, forget=forget):
                await asyncio.Event().wait()  # a held Ping: until the sweep ends it

        tasks = [asyncio.ensure_future(request(name)) for name in names]
        await asyncio.sleep(0)
        assert held.held == len(names)
        await held.sweep()
        await asyncio.gather(*tasks, return_exceptions=True)
        held.close()
        assert all(isinstance(task.exception(), AccountRefused) for task in tasks)
        await asyncio.sleep(0)  # the loop's next turn: whatever waits for one is written

    asyncio.run(sweep())
    assert one._shared is not None
    assert one._shared.generation() < FORGOTTEN_SLOTS // 4  # packed: a few entries, not one per user
    assert _cached(two, BOB)
    assert not _cached(two, ALICE)  # still dropped in the second worker
    assert two.stats.exchanges == 3


def test_a_long_sweep_writes_what_it_forgot_within_pack_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within `packing_forgotten` a write waits for the block's end, but no longer than PACK_FOR seconds after the
    first put off (the other workers would serve those users on meanwhile), and once however often it is put off;
    after the block a put-off is refused (a task started within it must not wait for a write that never comes)."""
    clock = [100.0]
    monkeypatch.setattr("proxy.auth.shared.time.monotonic", lambda: clock[0])
    writes: list[str] = []

    def write() -> None:
        writes.append("written")

    with shared.packing_forgotten():
        assert shared.put_off(write)
        assert shared.put_off(write)
        assert writes == []
        clock[0] += shared.PACK_FOR
        assert shared.put_off(write)
        assert writes == ["written"]  # the first waited PACK_FOR: written, with what came since
        assert shared.put_off(write)
    assert writes == ["written", "written"]  # the rest at the block's end
    assert not shared.put_off(write)
