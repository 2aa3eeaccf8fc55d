"""Held requests judged again (`proxy.held_mapping`): what a sweep ends and what it leaves held, with a directory
that answers as told (the lab test, tests/integration/test_ad_held_mapping.py, runs it against Samba)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any, cast

import pytest
import structlog

from proxy.config import Identity
from proxy.errors import AccountRefused, DirectoryUnavailable, GatewayError, MappingRefused
from proxy.held_mapping import HeldMappings
from proxy.identity.mapping import Account
from proxy.pipeline import directory_name
from tests.unit.test_mapping import ALICE_SID, NOW, account, certificate

ENTRY = "X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>563412"  # certificate()'s serial 0x123456, reversed


class _Request:
    """What a held request offers the sweep: whether its answer started, and how to cut it."""

    answer_started = False

    def abort(self) -> None:
        raise AssertionError("the answer had not started: a 403, not a cut connection")


class _Directory:
    """Answers `lookup` with `answer` (an account, None, or an error to raise)."""

    base_dn = "DC=ad,DC=test"
    realm = "AD.TEST"

    def __init__(self, answer: Account | GatewayError | None, cached: Account | None = None) -> None:
        self.answer = answer
        self.kept = cached  # what the cache holds when a request is held
        self.fresh: list[bool] = []  # per look-up: whether it asked past the cache

    def cached(self, name: str) -> Account | None:
        return self.kept

    async def lookup(self, name: str, *, fresh: bool = False) -> Account | None:
        self.fresh.append(fresh)
        if isinstance(self.answer, GatewayError):
            raise self.answer
        return self.answer


def _swept(answer: Account | GatewayError | None, mode: str = "strong") -> BaseException | None:
    """Hold one request of alice's (her certificate, strongly mapped by ENTRY when admitted), sweep once with the
    directory answering `answer`: the error the held request ended with, or None if it is still held."""

    async def run() -> BaseException | None:
        held = HeldMappings(cast(Any, _Directory(answer)), every=3600)
        identity = Identity(mapping=cast(Any, mode))
        forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def request() -> None:
            with held.hold(cast(Any, _Request()), certificate(), "alice@ad.test", identity):
                await forever

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        assert held.held == 1
        await held.sweep(NOW)
        await asyncio.sleep(0)
        held.close()
        if not task.done():
            task.cancel()
            return None
        return task.exception()

    return asyncio.run(run())


def test_still_mapped_is_still_held() -> None:
    """The account still lists the certificate: the held request goes on."""
    assert _swept(account(ENTRY)) is None


@pytest.mark.parametrize(
    ("answer", "error", "reason"),
    [
        (account(), MappingRefused, "not strongly mapped"),  # the entry removed
        (account(ENTRY, user_account_control=0x202), AccountRefused, "disabled"),
        (account(ENTRY, lockout_time=1), AccountRefused, "locked out"),
        (None, MappingRefused, "no account"),  # deleted
        (MappingRefused("the name matches several accounts in the directory"), MappingRefused, "several"),
    ],
)
def test_a_refusal_ends_the_held_request_with_it(
    answer: Account | GatewayError | None, error: type[GatewayError], reason: str
) -> None:
    """The entry removed, the account disabled, locked out, deleted, or the name now two accounts': ended, with
    the refusal the mapping stage would give a new request."""
    ended = _swept(answer)
    assert isinstance(ended, error), ended
    assert reason in ended.reason


def test_another_accounts_sid_ends_it() -> None:
    """The account was made again (another SID) and lists nothing: ended."""
    other = account(sid=ALICE_SID.__class__(5, (21, 1, 2, 3, 4242)))
    assert isinstance(_swept(other), MappingRefused)


def test_an_outage_ends_nothing() -> None:
    """The directory unreachable is no verdict on the account: the held request goes on."""
    assert _swept(DirectoryUnavailable("the directory cannot be reached; try again later")) is None


def test_audit_mode_keeps_serving_what_it_served() -> None:
    """strong-or-audit admitted it weakly (no entry): the sweep decides the same and leaves it held; a disabled
    account is ended in that mode too."""
    assert _swept(account(), mode="strong-or-audit") is None
    assert isinstance(_swept(account(user_account_control=0x202), mode="strong-or-audit"), AccountRefused)


def test_a_sweep_asks_past_the_cache() -> None:
    """Each sweep's look-up is a fresh one: an answer the cache kept from between two sweeps may predate the change
    the sweep is there to see (tests/integration/test_ad_held_mapping.py shows the delay it made)."""
    directory = _Directory(account(ENTRY))

    async def run() -> None:
        held = HeldMappings(cast(Any, directory), every=3600)
        forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def request() -> None:
            with held.hold(cast(Any, _Request()), certificate(), "alice@ad.test", Identity(mapping="strong")):
                await forever

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        await held.sweep(NOW)
        held.close()
        task.cancel()

    asyncio.run(run())
    assert directory.fresh == [True]


def _swept_account(
    *answers: Account | GatewayError | None, cached: Account | None = None
) -> tuple[BaseException | None, int]:
    """Hold one request admitted without the directory (a Basic sign-in, a certificate under mapping "upn"), sweep
    once per answer: the error it ended with (None if still held), and how often its user's state was dropped."""
    directory = _Directory(None, cached)
    forgotten = []

    async def run() -> BaseException | None:
        held = HeldMappings(cast(Any, directory), every=3600)
        forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def request() -> None:
            with held.hold_account(cast(Any, _Request()), "alice@AD.TEST", forget=lambda: forgotten.append(1)):
                await forever

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        for answer in answers:
            directory.answer = answer
            await held.sweep(NOW)
            await held.sweep(NOW)  # a second verdict changes nothing
            await asyncio.sleep(0)
        held.close()
        if not task.done():
            task.cancel()
            return None
        return task.exception()

    ended = asyncio.run(run())
    return ended, len(forgotten)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (account(user_account_control=0x202), "disabled"),
        (account(lockout_time=1), "locked out"),
        (account(account_expires=1), "expired"),
    ],
)
def test_an_account_admitted_without_the_directory_is_ended_by_its_state(state: Account, reason: str) -> None:
    """Basic and mapping "upn": the account disabled, locked out or expired while held ends the request, once, and
    drops what the gateway keeps of the user (its next request goes to the KDC)."""
    ended, forgotten = _swept_account(state)
    assert isinstance(ended, AccountRefused), ended
    assert reason in ended.reason
    assert forgotten == 1


def test_an_account_admitted_without_the_directory_is_judged_on_state_only() -> None:
    """No certificate mapping to decide again: an enabled account with no altSecurityIdentities stays held."""
    assert _swept_account(account()) == (None, 0)


def test_a_name_the_directory_never_found_stays_held_and_one_it_found_is_ended_when_gone() -> None:
    """Never found (outside base_dn, another realm's): the KDC admitted it, the directory has no verdict. Found by
    one sweep and gone at the next (deleted): ended. Found by the request's look-up (the cache) and gone: ended."""
    assert _swept_account(None) == (None, 0)
    ended, forgotten = _swept_account(account(), None)
    assert isinstance(ended, AccountRefused), ended
    assert "no longer exists" in ended.reason
    assert forgotten == 1
    ended, _ = _swept_account(None, cached=account())
    assert isinstance(ended, AccountRefused), ended


def test_an_outage_ends_no_request_admitted_without_the_directory() -> None:
    """The directory unreachable: no verdict, the request stays held (fail open, as for the strong modes)."""
    assert _swept_account(DirectoryUnavailable("the directory cannot be reached; try again later")) == (None, 0)


def test_audit_mode_ends_a_request_whose_account_was_deleted_while_held() -> None:
    """strong-or-audit serves a certificate whose name no account has (weakly); one whose account the mapping
    stage found and that is deleted while held is ended: nobody is left to serve."""

    async def run() -> BaseException | None:
        held = HeldMappings(cast(Any, _Directory(None, cached=account())), every=3600)
        forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def request() -> None:
            identity = Identity(mapping="strong-or-audit")
            with held.hold(cast(Any, _Request()), certificate(), "alice@ad.test", identity):
                await forever

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0)
        await held.sweep(NOW)
        await asyncio.sleep(0)
        held.close()
        if not task.done():
            task.cancel()
            return None
        return task.exception()

    assert isinstance(asyncio.run(run()), AccountRefused)


def test_a_signed_in_principal_is_looked_up_by_its_account_or_enterprise_upn() -> None:
    """A Basic sign-in's principal as the directory finds it: `alice@AD.TEST` as is (sAMAccountName in the domain's
    own name), an NT-ENTERPRISE principal by the UPN it carries."""
    assert directory_name("alice@AD.TEST") == "alice@AD.TEST"
    assert directory_name("carol\\@corp.example@AD.TEST") == "carol@corp.example"


def _held_as(principal: str, *, certified: str | None = None) -> list[str]:
    """The names `pipeline._held` registers with the directory (AD.TEST, `mapping = "upn"`) for a request signed in
    as the Basic `principal` (the KDC's name for it), or, with `certified`, for a certificate of that UPN
    (realm_map: corp.example is the MIT realm CORP.EXAMPLE) and no password."""
    from types import SimpleNamespace

    from proxy.auth.basic import PasswordLogin
    from proxy.auth.modes import Authenticated
    from proxy.identity.principal import map_upn
    from proxy.kerberos.password import UserTicket
    from proxy.pipeline import _held

    names: list[str] = []

    def hold_account(request: object, name: str, **_: object) -> None:
        names.append(name)

    held = SimpleNamespace(hold_account=hold_account)
    directory = SimpleNamespace(realm="AD.TEST", base_dn="DC=ad,DC=test", held=held)
    gw: Any = SimpleNamespace(directory=directory, config=SimpleNamespace(identity=Identity(mapping="upn")))
    realm_map = {"corp.example": "CORP.EXAMPLE", "ad.test": "AD.TEST"}
    if certified is not None:
        user = map_upn(certified, realm_map=realm_map)
        _held(gw, cast(Any, _Request()), cast(Any, object()), user, Authenticated(user, None, "certificate"))
    else:
        user = map_upn("alice@corp.example", realm_map=realm_map, source="basic")
        creds: Any = object()
        login = PasswordLogin(user, UserTicket(principal=principal, creds=creds), "Basic x", cached=False)
        _held(gw, cast(Any, _Request()), None, None, Authenticated(user, login, "password"))
    return names


def test_another_realms_user_is_not_judged_by_a_directory_account_of_the_same_name() -> None:
    """The directory's realm is AD.TEST; identity.realm_map sends corp.example to an MIT realm, CORP.EXAMPLE, whose
    KDC signs alice@CORP.EXAMPLE in. Looked up as `alice@CORP.EXAMPLE`, the directory finds whichever AD account has
    the UPN alice@corp.example (an alternate UPN suffix: another person, mallory in the lab), and judged alice's held
    request by mallory's state: mallory disabled, or locked out by anyone's wrong passwords at the DC, ended alice's
    Ping at every sweep and dropped her password. Another realm's user is the KDC's to judge (the documented
    "never found"), so nothing is held with the directory for it; AD.TEST's users still are. Failed before the fix
    (both other-realm requests were registered under alice@CORP.EXAMPLE / alice@corp.example)."""
    assert _held_as("alice@CORP.EXAMPLE") == []
    assert _held_as("", certified="alice@corp.example") == []
    assert _held_as("alice@AD.TEST") == ["alice@AD.TEST"]
    assert _held_as("carol\\@corp.example@AD.TEST") == ["carol@corp.example"]  # NT-ENTERPRISE, signed in by AD.TEST
    assert _held_as("", certified="alice@ad.test") == ["alice@ad.test"]


@contextlib.asynccontextmanager
async def _holding(held: HeldMappings, names: Iterable[str]) -> AsyncIterator[None]:
    """A request admitted without the directory held for each of `names` (until the block ends, when the sweep is
    stopped and the requests cancelled)."""
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def request(name: str) -> None:
        with held.hold_account(cast(Any, _Request()), name, forget=lambda: None):
            await forever

    tasks = [asyncio.ensure_future(request(name)) for name in names]
    await asyncio.sleep(0)
    try:
        yield
    finally:
        held.close()
        for task in tasks:
            task.cancel()


def test_a_sweep_that_finds_no_directory_shows_in_the_metrics() -> None:
    """Fail open is silent to the held request; it must not be to the operator: while no directory server answers the
    sweep, `kcd_held_users_unjudged` counts the held users it could not look up (their disabled accounts would be
    served on), and goes back to 0 once one answers. Failed before the fix: there was no such gauge (and nothing in
    /readyz or /metrics told a failing sweep from a working one)."""
    from proxy.observability.metrics import Metrics

    directory = _Directory(DirectoryUnavailable("the directory cannot be reached; try again later"))
    metrics = Metrics()

    async def run() -> list[bytes]:
        held = HeldMappings(cast(Any, directory), every=3600)
        metrics.held_unjudged = lambda: held.unjudged
        async with _holding(held, ("alice@AD.TEST", "bob@AD.TEST", "ALICE@ad.test")):
            rendered = [metrics.render()]
            await held.sweep(NOW)
            rendered.append(metrics.render())
            directory.answer = account()
            await held.sweep(NOW)
            rendered.append(metrics.render())
        return rendered

    before, down, back = asyncio.run(run())
    assert b"kcd_held_users_unjudged 0.0" in before
    assert b"kcd_held_users_unjudged 2.0" in down  # alice (two spellings, one user) and bob
    assert b"kcd_held_users_unjudged 0.0" in back


def test_a_sweep_stops_at_a_directory_that_does_not_answer_and_starts_with_whom_it_skipped() -> None:
    """A hung directory costs each look-up `[directory] timeout` (a connect nobody answers). A sweep went on through
    every held user regardless, one timeout each: with 1,000 held users and timeout 5 s, 83 minutes of sweeping
    against a dead server, a `directory_server_failed` line per user, and an account disabled during the outage was
    judged only when that sweep came round to it again, long after the directory was back (the documentation says
    the first sweep after the outage ends it). Now a sweep stops at the first look-up no server answers, counts every
    user it did not reach as unjudged, and the next sweep starts with them. Failed before the fix: three look-ups
    against the dead directory instead of one."""
    directory = _Directory(DirectoryUnavailable("the directory cannot be reached; try again later"))
    asked: list[str] = []
    lookup = directory.lookup

    async def counted(name: str, *, fresh: bool = False) -> Account | None:
        asked.append(name)
        return await lookup(name, fresh=fresh)

    directory.lookup = counted  # type: ignore[method-assign]

    async def run() -> tuple[int, int, int]:
        held = HeldMappings(cast(Any, directory), every=3600)
        async with _holding(held, [f"u{i}@AD.TEST" for i in range(3)]):
            await held.sweep(NOW)
            down = (len(asked), held.unjudged)
            directory.answer = account()
            await held.sweep(NOW)
        return down[0], down[1], held.unjudged

    assert asyncio.run(run()) == (1, 3, 0)
    assert sorted(asked[1:]) == ["u0@AD.TEST", "u1@AD.TEST", "u2@AD.TEST"]  # the sweep after: everyone, once


def test_one_name_no_server_answers_for_does_not_stop_every_later_sweep_before_the_others() -> None:
    """One held name's look-up fails at every server (a search the servers refuse for that name alone), the others'
    succeed. The sweep stops at it (it cannot tell that from an outage) and counts the rest unjudged; the next sweep
    must not start with that name again, or it stops there every time and no other held user is judged ever again (a
    disabled account's held Ping served for its whole hour). Failed before the fix: the second sweep stopped at the
    same name first, the others still unjudged."""
    directory = _Directory(account())
    lookup = directory.lookup

    async def refused_for_one(name: str, *, fresh: bool = False) -> Account | None:
        if name.startswith("poison"):
            raise DirectoryUnavailable("the directory cannot be reached; try again later")
        return await lookup(name, fresh=fresh)

    directory.lookup = refused_for_one  # type: ignore[method-assign]

    async def run() -> list[int]:
        held = HeldMappings(cast(Any, directory), every=3600)
        async with _holding(held, ("poison@AD.TEST", "u1@AD.TEST", "u2@AD.TEST")):
            unjudged = []
            for _ in range(2):
                await held.sweep(NOW)
                unjudged.append(held.unjudged)
        return unjudged

    assert asyncio.run(run()) == [3, 1]  # the second sweep judges everyone but the name it cannot look up


def test_one_user_the_sweep_cannot_judge_does_not_keep_it_from_the_others() -> None:
    """One held user whose judging raises an error nobody expected (an OverflowError from an accountExpires past the
    year 9999 was one: docs/strong-mapping.md) and another, disabled, held after them: the sweep logs the first and
    ends the second's request in the same sweep. Failed before the fix: the error ended the sweep at the first user,
    every sweep alike (the order is stable), and the disabled account's request stayed held."""
    directory = _Directory(replace(account(), user_account_control=0x202))  # disabled
    lookup = directory.lookup

    async def broken_for_one(name: str, *, fresh: bool = False) -> Account | None:
        if name.startswith("poison"):
            raise OverflowError("date value out of range")
        return await lookup(name, fresh=fresh)

    directory.lookup = broken_for_one  # type: ignore[method-assign]

    async def run() -> list[BaseException | None]:
        held = HeldMappings(cast(Any, directory), every=3600)

        async def request(name: str) -> None:
            with held.hold_account(cast(Any, _Request()), name, forget=lambda: None):
                await asyncio.get_running_loop().create_future()  # its own: cancelling one ends no other

        tasks = [asyncio.ensure_future(request(name)) for name in ("poison@AD.TEST", "u1@AD.TEST")]
        await asyncio.sleep(0)
        with structlog.testing.capture_logs() as logs:
            await held.sweep(NOW)
        await asyncio.wait([tasks[1]], timeout=5)  # ended by the sweep: done at once (the deadline is for a failure)
        held.close()
        assert [e["upn"] for e in logs if e["event"] == "held_mapping_sweep_failed"] == ["poison@AD.TEST"]
        ended = [task.exception() if task.done() else None for task in tasks]
        for task in tasks:
            task.cancel()
        return ended

    poison, disabled = asyncio.run(run())
    assert poison is None  # left held: no verdict on it
    assert isinstance(disabled, AccountRefused)
