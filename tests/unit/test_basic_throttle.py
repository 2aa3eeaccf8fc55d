"""Basic-auth throttles under concurrency, their cost when they refuse, user keys, and the refusal pace.

`BasicLogin` runs here with a stand-in for the KDC exchange (`login_blocking`) that records who was
asked and answers as the lab KDC does; `tests/integration/test_basic_hardening.py` does the same
against the real KDC and gateway.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any, cast

import pytest

from proxy.addresses import address_key
from proxy.auth import basic
from proxy.auth.basic import BasicLogin, CredentialCache, Pace, Throttle, _hashed, guess_key, parse_basic, user_key
from proxy.config import Authentication, Identity, Kerberos
from proxy.directory import Directory
from proxy.errors import AuthenticationRequired, DirectoryUnavailable, TooManyAttempts, UserUnknown
from proxy.identity.mapping import Account
from proxy.identity.principal import UserPrincipal
from proxy.identity.sid import Sid
from proxy.kerberos.password import UserTicket

PASSWORDS = {"alice@LAB.TEST": b"alice-Pa55", "bob@LAB.TEST": b"bob-Pa55", "strasse@LAB.TEST": b"pw"}


class FakeKdc:
    """Answers AS exchanges as the lab KDC would (case-sensitive names), counting them; `delay` per exchange."""

    def __init__(self, delay: float = 0.0) -> None:
        self.asked: list[str] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, user: UserPrincipal, password: bytes) -> UserTicket:
        with self._lock:
            self.asked.append(user.principal)
        if user.principal not in PASSWORDS:
            raise UserUnknown("the user name or password is incorrect", hint="not found in Kerberos database")
        time.sleep(self.delay)  # an existing account costs key derivation and more KDC work
        if PASSWORDS[user.principal] != password:
            raise AuthenticationRequired("the user name or password is incorrect", hint="preauthentication failed")
        creds: Any = object()
        return UserTicket(principal=user.principal, creds=creds)


@pytest.fixture
def kdc(monkeypatch: pytest.MonkeyPatch) -> FakeKdc:
    fake = FakeKdc()
    monkeypatch.setattr(basic, "login_blocking", fake)
    return fake


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every scrypt hash computed, by user key."""
    calls: list[str] = []
    real = CredentialCache.digest

    def counting(self: CredentialCache, key: str, password: bytes) -> bytes:
        calls.append(key)
        return real(self, key, password)

    monkeypatch.setattr(CredentialCache, "digest", counting)
    return calls


def login_service(per_user: int = 5, per_address: int = 20) -> BasicLogin:
    settings = Authentication(mode="basic", basic_failures_per_user=per_user, basic_failures_per_address=per_address)
    kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"), max_in_flight=16)
    return BasicLogin(settings, Identity(default_realm="LAB.TEST"), kerberos)


def creds(user: str, password: str) -> basic.BasicCredentials:
    parsed = parse_basic("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    assert parsed is not None
    return parsed


async def outcome(service: BasicLogin, user: str, password: str, client: str = "192.0.2.1") -> int | str:
    """The status a client would get, or the principal served."""
    try:
        return (await service.login(creds(user, password), client)).user.principal
    except (AuthenticationRequired, TooManyAttempts) as e:
        return e.status


def test_concurrent_wrong_passwords_from_one_address_count_before_the_kdc(kdc: FakeKdc, hashes: list[str]) -> None:
    """100 wrong passwords for 100 user names at once from one address: 20 reach the KDC (and are hashed),
    the other 80 get 429 without either."""

    async def run() -> list[int | str]:
        service = login_service(per_user=5, per_address=20)
        return await asyncio.gather(*(outcome(service, f"spray{i}", "guess") for i in range(100)))

    results = asyncio.run(run())
    assert sorted(set(results), key=str) == [401, 429]
    assert results.count(401) == 20
    assert len(kdc.asked) == 20
    assert len(hashes) == 20


def test_throttled_attempts_are_refused_before_any_hashing(kdc: FakeKdc, hashes: list[str]) -> None:
    """Once bob's failures reach the limit, further attempts (even with his password) are 429 and cost
    no scrypt hash and no KDC exchange."""

    async def run() -> list[int | str]:
        service = login_service(per_user=2)
        first = [await outcome(service, "bob", "nope") for _ in range(2)]
        hashed, asked = len(hashes), len(kdc.asked)
        later = [await outcome(service, "bob", p) for p in ("nope", "bob-Pa55", "again")]
        assert (len(hashes), len(kdc.asked)) == (hashed, asked)
        return first + later

    assert asyncio.run(run()) == [401, 401, 429, 429, 429]


def test_names_differing_in_case_are_one_user(kdc: FakeKdc) -> None:
    """ALICE and alice share the cache entry (served as the user the KDC verified) and the failure counter."""

    async def run() -> list[int | str]:
        service = login_service(per_user=2)
        served = [await outcome(service, "alice", "alice-Pa55"), await outcome(service, "ALICE", "alice-Pa55")]
        guesses = [await outcome(service, name, "guess") for name in ("Alice", "aLICE", "ALICE")]
        return served + guesses

    assert asyncio.run(run()) == ["alice@LAB.TEST", "alice@LAB.TEST", 401, 401, 429]
    assert kdc.asked == ["alice@LAB.TEST", "Alice@LAB.TEST", "aLICE@LAB.TEST"]
    assert user_key("ALICE@LAB.TEST") == user_key("alice@lab.test")


def test_a_unicode_fold_shares_the_counter_but_never_the_session(kdc: FakeKdc) -> None:
    """straße folds to strasse: one throttle key, but strasse's cached password is not served to straße (the
    directory keeps them apart), which the KDC is asked about and refuses."""

    async def run() -> list[int | str]:
        service = login_service()
        return [await outcome(service, "strasse", "pw"), await outcome(service, "straße", "pw")]

    assert asyncio.run(run()) == ["strasse@LAB.TEST", 401]
    assert kdc.asked == ["strasse@LAB.TEST", "straße@LAB.TEST"]
    assert user_key("straße@LAB.TEST") == user_key("strasse@LAB.TEST")


@pytest.mark.parametrize(
    "spelling",
    [
        "björn",
        "BJÖRN",
        "bjo\u0308rn",
        "\uff42\uff4a\uff4f\uff52\uff4e",
        "bjørn",
        "bjǫrṅ",
        "b\u0328\u0301j\u1ab2ǫ\u0308Ⓡn",
    ],
)
def test_the_spellings_active_directory_takes_for_one_name_are_one_throttle_key(spelling: str) -> None:
    """guess_key folds what AD's name comparison ignores (MS-ADTS 6.5: case, width, non-spacing marks, kana type;
    Samba's bug 14847 lists `björn`, `bjǫrṅ` and a name buried in combining marks as one Windows account): each is
    bjorn's throttle key, while bjoern, another account, keeps its own."""
    assert guess_key(f"{spelling}@AD.TEST") == guess_key("bjorn@AD.TEST")
    assert guess_key("bjoern@AD.TEST") != guess_key("bjorn@AD.TEST")


def test_guesses_under_spellings_of_one_name_share_its_hold_but_not_its_session(kdc: FakeKdc) -> None:
    """alice signs in; wrong passwords under a full-width `alice` and `álice` count against alice's hold (the next
    guess under `alice` is 429 without the KDC); alice's cached password is still served to alice, and to the
    full-width name neither from the cache nor as alice: the KDC is asked about that name."""

    async def run() -> list[int | str]:
        service = login_service(per_user=2)
        results = [await outcome(service, "alice", "alice-Pa55")]
        results += [await outcome(service, name, "guess") for name in ("\uff41lice", "\u00e1lice", "alice")]
        results += [await outcome(service, "alice", "alice-Pa55")]
        return results

    assert asyncio.run(run()) == ["alice@LAB.TEST", 401, 401, 429, "alice@LAB.TEST"]
    assert kdc.asked == ["alice@LAB.TEST", "\uff41lice@LAB.TEST", "\u00e1lice@LAB.TEST"]


def test_a_signed_in_device_is_served_while_a_guesser_is_throttled(kdc: FakeKdc) -> None:
    """A guess neither drops alice's cache entry nor locks out her device: it is served from the cache
    while the guesser (and, behind the same NAT, its address) gets 429."""

    async def run() -> list[int | str]:
        service = login_service(per_user=2, per_address=2)
        results = [await outcome(service, "alice", "alice-Pa55")]
        results += [await outcome(service, "alice", f"guess{i}") for i in range(3)]
        results += [await outcome(service, "alice", "alice-Pa55")]
        return results

    assert asyncio.run(run()) == ["alice@LAB.TEST", 401, 401, 429, "alice@LAB.TEST"]
    assert kdc.asked.count("alice@LAB.TEST") == 3  # the first login and two guesses; the device is cached


def test_known_and_unknown_users_are_refused_at_the_same_pace(kdc: FakeKdc) -> None:
    """Once a wrong password for an existing account took 0.3 s, an unknown user's refusal (which the KDC
    answers at once) and a throttled one are held at least as long: timing does not tell them apart."""
    kdc.delay = 0.3

    async def run() -> list[float]:
        service = login_service(per_user=1)
        took = []
        for user in ("alice", "nobody", "alice"):  # the second alice is throttled (per_user = 1)
            started = time.monotonic()
            await outcome(service, user, "guess")
            took.append(time.monotonic() - started)
        assert service.pace.floor >= 0.3
        return took

    known, unknown, throttled = asyncio.run(run())
    assert known >= 0.3
    assert unknown >= 0.3
    assert throttled >= 0.3


def test_throttle_counts_attempts_in_flight() -> None:
    """With limit 3 and one failure, two attempts may be in flight; the third waits until one ends."""
    throttle = Throttle(3)
    throttle.failed("10.0.0.1", now=0)
    throttle.begin("10.0.0.1", now=0)
    assert throttle.wait("10.0.0.1", now=0) == 0
    throttle.begin("10.0.0.1", now=0)
    assert throttle.wait("10.0.0.1", now=0) == 1
    throttle.end("10.0.0.1", now=0, failed=False)
    assert throttle.wait("10.0.0.1", now=0) == 0
    throttle.end("10.0.0.1", now=0, failed=True)  # the other one failed: two failures, one may go
    throttle.begin("10.0.0.1", now=0)
    assert throttle.wait("10.0.0.1", now=0) == 1


def test_a_guess_does_not_drop_the_cached_password() -> None:
    """forget(key, digest) drops the entry only when the KDC refused that very password."""
    cache = CredentialCache(60)
    user = UserPrincipal(upn="alice", principal="alice@LAB.TEST", realm="LAB.TEST", source="basic")
    creds_: Any = object()
    good = cache.digest("alice@lab.test", b"alice-Pa55")
    cache.put("alice@lab.test", good, user, UserTicket("alice@LAB.TEST", creds_), now=0)
    cache.forget("alice@lab.test", cache.digest("alice@lab.test", b"guess"))
    assert cache.fresh("alice@lab.test", now=1)
    cache.forget("alice@lab.test", good)
    assert not cache.fresh("alice@lab.test", now=1)


def test_pace_is_the_slowest_recent_check() -> None:
    """The pace starts at its seed and is the slowest of the last samples; old ones fall out."""
    pace = Pace(seed=0.05, samples=3)
    assert pace.floor == 0.05
    pace.observe(0.2)
    pace.observe(0.01)
    assert pace.floor == 0.2
    pace.observe(0.01)
    pace.observe(0.01)
    assert pace.floor == 0.01


class EnterpriseKdc:
    """Answers AS exchanges for NT-ENTERPRISE names as Active Directory does: the UPN finds the account, and the
    TGT's client is the account's own name. mallory's UPN is alice@corp.example; both passwords are the same."""

    def __init__(self) -> None:
        self.accounts = {"alice@corp.example": "mallory@AD.TEST", "alice@ad.test": "alice@AD.TEST"}
        self.asked: list[str | None] = []

    def __call__(self, user: UserPrincipal, password: bytes) -> UserTicket:
        self.asked.append(user.enterprise)
        assert user.enterprise is not None
        assert password == b"Same-Pa55"
        creds: Any = object()
        return UserTicket(principal=self.accounts[user.enterprise], creds=creds)


def test_two_upns_of_one_principal_never_share_a_password_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """enterprise_names with realm_map corp.example -> AD.TEST: mallory (alice@corp.example) and alice
    (alice@ad.test) both map to alice@AD.TEST, but are two names to the KDC and two accounts. With the same
    password, alice's sign-in is checked by the KDC and gets her own ticket, never mallory's cached one."""
    kdc = EnterpriseKdc()
    monkeypatch.setattr(basic, "login_blocking", kdc)
    identity = Identity(default_realm="AD.TEST", realm_map={"corp.example": "AD.TEST"}, enterprise_names=True)
    kerberos = Kerberos(principal="HTTP/proxy.ad.test@AD.TEST", keytab=Path("/nonexistent"))
    service = BasicLogin(Authentication(mode="basic"), identity, kerberos)

    async def run() -> list[tuple[str, str, bool]]:
        out = []
        for name in ("alice@corp.example", "alice@ad.test", "alice@corp.example", "alice@ad.test"):
            login = await service.login(creds(name, "Same-Pa55"), "192.0.2.1")
            out.append((login.user.upn, login.ticket.principal, login.cached))
        return out

    assert asyncio.run(run()) == [
        ("alice@corp.example", "mallory@AD.TEST", False),
        ("alice@ad.test", "alice@AD.TEST", False),
        ("alice@corp.example", "mallory@AD.TEST", True),
        ("alice@ad.test", "alice@AD.TEST", True),
    ]
    assert kdc.asked == ["alice@corp.example", "alice@ad.test"]


def test_a_password_users_backend_pool_is_the_kdcs_principal_for_them() -> None:
    """The Kerberos stage names a Basic user's backend pool by the principal the KDC gave their ticket, not the
    principal the identity stage built: mallory (alice@corp.example) and alice (alice@ad.test) build the same
    alice@AD.TEST, and one pool, on a connection-bound backend, would carry both users."""
    from types import SimpleNamespace

    from proxy.auth.basic import PasswordLogin
    from proxy.auth.modes import Authenticated
    from proxy.config import Route
    from proxy.identity.principal import map_upn
    from proxy.observability.trace import Trace
    from proxy.pipeline import backend_authorization

    user = map_upn("alice@corp.example", realm_map={"corp.example": "AD.TEST"})
    creds: Any = object()
    ticket = UserTicket(principal="mallory@AD.TEST", creds=creds)
    login = PasswordLogin(user, ticket, "Basic x", cached=True)

    async def authorization(login: PasswordLogin, route: Route) -> str:
        return "Negotiate token"

    gw: Any = SimpleNamespace(basic=SimpleNamespace(authorization=authorization))
    route = Route(prefix="/", upstream="http://b", spn="HTTP/b")
    auth = Authenticated(user, login, "password")
    header, principal = asyncio.run(backend_authorization(gw, auth, route, Trace()))
    assert (header, principal) == ("Negotiate token", "mallory@AD.TEST")


def test_address_key_counts_ipv6_by_its_64_and_ipv4_mapped_as_ipv4() -> None:
    """The per-address throttle's key: an IPv6 address's /64, an IPv4-mapped address as its IPv4 address, IPv4
    itself, and something that is no address (a Unix socket's peer) as given."""
    assert address_key("2001:db8:5:6::1") == address_key("2001:db8:5:6:ffff:1:2:3") == "2001:db8:5:6::/64"
    assert address_key("2001:db8:5:7::1") == "2001:db8:5:7::/64"
    assert address_key("::ffff:203.0.113.77") == address_key("203.0.113.77") == "203.0.113.77"
    assert address_key("") == ""
    assert address_key("unix") == "unix"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("EVIL\\alice", "E…[4]\\a…[5]"),
        ("PARTNER.TEST\\bob", "P…[12]\\b…[3]"),
        ("alice@evil.test", "a…[5]@e…[9]"),
        ("alice@lab", "a…[5]@l…[3]"),  # a NetBIOS name is a down-level domain, not a UPN suffix
        ("EVIL\\alice@lab.test", "E…[4]\\a…[14]"),
    ],
)
def test_a_name_of_an_unconfigured_domain_is_refused_before_the_kdc(
    kdc: FakeKdc, hashes: list[str], name: str, shown: str
) -> None:
    """Basic DOMAIN\\user or user@domain whose domain is no configured realm, realm_map key or the default realm's
    NetBIOS name: 401 saying so (naming no domain: it may be part of a password), the fix naming the user shortened,
    its domain too, and neither the KDC nor a hash is spent on it (EVIL\\alice used to be checked, and served, as
    alice@LAB.TEST; PARTNER\\bob's guesses counted against LAB's bob)."""
    service = login_service()
    with pytest.raises(AuthenticationRequired) as refused:
        asyncio.run(service.login(creds(name, PASSWORDS["alice@LAB.TEST"].decode()), "192.0.2.1"))
    assert refused.value.reason == "the domain of the user name is not one this gateway signs in to"
    assert refused.value.hint is not None
    assert f"Basic user {shown}: " in refused.value.hint
    assert "identity.realm_map" in refused.value.hint
    assert (kdc.asked, hashes) == ([], [])


@pytest.mark.parametrize(
    ("name", "principal"),
    [
        ("alice", "alice@LAB.TEST"),
        ("LAB\\alice", "alice@LAB.TEST"),  # the default realm's NetBIOS name: its first label, as AD names it
        ("lab\\alice", "alice@LAB.TEST"),
        ("LAB.TEST\\alice", "alice@LAB.TEST"),  # the realm itself
        ("alice@lab.test", "alice@LAB.TEST"),
        ("CORP\\bob", "bob@CORP.EXAMPLE.COM"),  # realm_map keys: a down-level domain or a UPN suffix
        ("bob@corp.example", "bob@CORP.EXAMPLE.COM"),
        ("CORP.EXAMPLE.COM\\bob", "bob@CORP.EXAMPLE.COM"),  # a realm_map realm by its own name (was bob@LAB.TEST)
        ("bob@corp.example.com", "bob@CORP.EXAMPLE.COM"),
    ],
)
def test_every_configured_domain_still_signs_in(monkeypatch: pytest.MonkeyPatch, name: str, principal: str) -> None:
    """The forms Basic accepted stay accepted, each as the realm its domain names."""
    asked: list[str] = []

    def kdc(user: UserPrincipal, password: bytes) -> UserTicket:
        asked.append(user.principal)
        ticket: Any = object()
        return UserTicket(principal=user.principal, creds=ticket)

    monkeypatch.setattr(basic, "login_blocking", kdc)
    identity = Identity(
        default_realm="LAB.TEST", realm_map={"corp": "CORP.EXAMPLE.COM", "corp.example": "CORP.EXAMPLE.COM"}
    )
    kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"))
    service = BasicLogin(Authentication(mode="basic"), identity, kerberos)
    login = asyncio.run(service.login(creds(name, "pw"), "192.0.2.1"))
    assert (login.user.principal, asked) == (principal, [principal])


@pytest.mark.parametrize("names", [("alice@lab.test", "LAB\\alice"), ("LAB\\alice", "alice@LAB.test")])
def test_enterprise_names_count_a_upn_and_its_down_level_name_as_one_user(kdc: FakeKdc, names: tuple[str, str]) -> None:
    """Under enterprise_names, `alice@lab.test` (asked as an NT-ENTERPRISE name) and `LAB\\alice` (the
    principal) name the same principal: guesses alternating between the two spellings share one failure
    counter, so a guesser gets `basic_failures_per_user` tries, not twice as many."""
    settings = Authentication(mode="basic", basic_failures_per_user=4, basic_failures_per_address=100)
    kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"))
    service = BasicLogin(settings, Identity(default_realm="LAB.TEST", enterprise_names=True), kerberos)

    async def run() -> list[int | str]:
        return [await outcome(service, names[i % 2], f"guess{i}") for i in range(6)]

    assert asyncio.run(run()) == [401, 401, 401, 401, 429, 429]
    assert len(kdc.asked) == 4


def test_a_held_user_is_held_for_the_whole_window_not_released_at_1_2_4_seconds() -> None:
    """The user throttle (hold): after `limit` failures no attempt goes on until `forget` seconds after the last
    one (the directory's lockout window), where the doubling throttle let one through after 1 s, 3 s, 7 s ..."""
    held, doubling = Throttle(2, forget=1800, hold=True), Throttle(2)
    for throttle in (held, doubling):
        throttle.failed("alice", now=0)
        throttle.failed("alice", now=0)
    assert doubling.wait("alice", now=1.5) == 0
    assert [held.wait("alice", now=t) for t in (1.5, 3.5, 7.5, 300, 1799)] == [1798.5, 1796.5, 1792.5, 1500, 1]
    assert held.wait("alice", now=1800.5) == 0


def test_a_flood_of_other_names_never_evicts_a_held_user() -> None:
    """The throttle keeps at most max_keys keys, least recently used out first, and a held user's key is not touched
    while held (each guess is refused before it counts): wrong passwords for that many other names (unknown users,
    from many /64s) evicted it and alice had a fresh allowance of guesses, towards the directory's lockout, long
    before basic_failure_window_seconds. Keys that are not held go first; the count stays bounded."""
    throttle = Throttle(2, forget=1800, hold=True, max_keys=3)
    throttle.failed("alice", now=0)
    throttle.failed("alice", now=0)
    for n in range(10):
        throttle.begin(f"nobody{n}", now=1 + n)
        throttle.end(f"nobody{n}", now=1 + n, failed=True)
    assert throttle.wait("alice", now=20) == 1780
    assert len(throttle._keys) <= 3
    full = Throttle(1, forget=1800, hold=True, max_keys=2)  # every key held: the new one is not taken in
    for name in ("bob", "carol", "dave"):
        full.failed(name, now=0)
    assert [full.wait(name, now=1) for name in ("bob", "carol", "dave")] == [1799, 1799, 0]
    assert len(full._keys) == 2


def test_a_throttle_full_of_held_names_refuses_a_new_name_rather_than_release_a_held_user() -> None:
    """A throttle of 3 keys (limit 2): alice held, then two other names held (unknown users, from many /64s), so that
    every key is held: a new name is refused (429, counted nowhere) and alice stays held; once the holds are past, a
    new name takes a place. The least recently counted held key went (hers), and her guesser had two more guesses
    towards the directory's lockout for every throttle's worth of held names (500,000 wrong passwords at the default
    100,000 keys and limit 5, within basic_failure_window_seconds), which the workers' shared table never allowed."""
    throttle = Throttle(2, forget=1800, hold=True, max_keys=3)
    for name in ("alice", "nobody1", "nobody2"):
        for _ in range(2):
            assert throttle.admit(name, now=0) == 0
            throttle.end(name, now=0, failed=True)
    assert throttle.admit("nobody3", now=1) > 0
    assert throttle.wait("alice", now=2) == 1798
    assert len(throttle._keys) == 3
    assert throttle.admit("nobody3", now=1801) == 0


def test_a_flood_of_names_failing_once_never_evicts_a_users_failures_below_the_hold() -> None:
    """A throttle of 3 keys: alice has four wrong passwords (limit 5, not yet held), then 10 other names fail once each
    (unknown users, from many /64s): her four are still counted and her next wrong password holds her. The least
    recently counted key went first, hers among them: a guesser had four more guesses per throttle's worth of names,
    towards the directory's lockout, before basic_failure_window_seconds. A name with fewer failures goes first."""
    throttle = Throttle(5, forget=1800, hold=True, max_keys=3)
    for _ in range(4):
        throttle.failed("alice", now=0)
    for n in range(10):
        throttle.begin(f"nobody{n}", now=1 + n)
        throttle.end(f"nobody{n}", now=1 + n, failed=True)
    throttle.failed("alice", now=20)
    assert throttle.wait("alice", now=20) == 1800
    assert len(throttle._keys) <= 3
    throttle.begin("carol", now=1900)  # every count is past the window now: a new key still takes a place
    assert _hashed("carol") in throttle._keys
    assert len(throttle._keys) <= 3


def test_a_users_attempts_in_flight_are_not_evicted_by_names_that_failed_fewer_times() -> None:
    """A throttle of 3 keys full of names that failed once; alice has her five attempts in flight (limit 5, none failed
    yet): new names failing once each take the other names' places, never hers, so her sixth attempt is still
    refused while the five are in flight. Ranked by failures alone (this branch's first fix), her key (none yet) went
    first, and each new name let five more of her guesses reach the KDC at once, past the in-flight cap; least
    recently counted (before), max_keys new names did."""
    throttle = Throttle(5, forget=1800, hold=True, max_keys=3)
    for n in range(3):
        throttle.failed(f"nobody{n}", now=0)
    assert [throttle.admit("alice", now=1) for _ in range(5)] == [0] * 5
    for n in range(3, 10):
        throttle.failed(f"nobody{n}", now=2)
    assert throttle.admit("alice", now=3) > 0
    assert len(throttle._keys) <= 3


def test_a_held_users_own_last_accepted_password_still_reaches_the_kdc(kdc: FakeKdc, hashes: list[str]) -> None:
    """With no cache (basic_cache_seconds = 0), a guesser holds alice after two wrong passwords: further guesses are
    429 without the KDC (and count against the guesser's address), while alice's own password, the one the KDC last
    accepted, still goes on to the KDC and is served; a held user the KDC never accepted gets 429 unhashed."""

    async def run() -> list[int | str]:
        settings = Authentication(mode="basic", basic_cache_seconds=0, basic_failures_per_user=2)
        kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"))
        service = BasicLogin(settings, Identity(default_realm="LAB.TEST"), kerberos)
        results = [await outcome(service, "alice", "alice-Pa55", "192.0.2.1")]
        results += [await outcome(service, "alice", f"guess{i}", "198.51.100.7") for i in range(4)]
        asked = len(kdc.asked)
        results += [await outcome(service, "alice", "alice-Pa55", "192.0.2.1")]
        assert len(kdc.asked) == asked + 1
        results += [await outcome(service, "bob", "nope", "198.51.100.7") for _ in range(2)]
        hashed = len(hashes)
        results += [await outcome(service, "bob", "bob-Pa55", "192.0.2.1")]
        assert len(hashes) == hashed
        return results

    assert asyncio.run(run()) == ["alice@LAB.TEST", 401, 401, 429, 429, "alice@LAB.TEST", 401, 401, 429]
    assert kdc.asked.count("alice@LAB.TEST") == 4  # the first login, two guesses, her own password again


class Clock:
    """`time.monotonic` for `proxy.auth.basic`, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize(("cache_seconds", "window"), [(3600, 1800), (1800, 1800), (60, 1800)])
def test_a_held_users_device_signed_in_from_the_cache_still_gets_in_when_its_entry_ends(
    kdc: FakeKdc, monkeypatch: pytest.MonkeyPatch, cache_seconds: float, window: float
) -> None:
    """alice's device signs in once and is then served from the cache; a guesser holds alice just before her entry
    ends. Her device's next request (the entry gone, the hold on) still goes on to the KDC and is served, whether
    basic_cache_seconds is longer than basic_failure_window_seconds, equal to it or shorter: the password the KDC
    accepted is known for the window after the device last used it, not after the KDC last saw it (it expired
    while the entry was valid, and the device was refused 429 for the hold)."""
    clock = Clock()
    monkeypatch.setattr(basic, "time", clock)

    async def run() -> list[int | str]:
        settings = Authentication(
            mode="basic",
            basic_cache_seconds=cache_seconds,
            basic_failures_per_user=2,
            basic_failure_window_seconds=window,
        )
        kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"))
        service = BasicLogin(settings, Identity(default_realm="LAB.TEST"), kerberos)
        results = [await outcome(service, "alice", "alice-Pa55", "192.0.2.1")]
        start = clock.now
        while clock.now + 60 < start + cache_seconds:  # the device polls every minute, served from the cache
            clock.now += 60
            results.append(await outcome(service, "alice", "alice-Pa55", "192.0.2.1"))
        results += [await outcome(service, "alice", f"guess{i}", "198.51.100.7") for i in range(3)]
        clock.now = start + cache_seconds + 1  # the entry has ended; the hold goes on for the window
        results.append(await outcome(service, "alice", "alice-Pa55", "192.0.2.1"))
        return results

    results = asyncio.run(run())
    assert results[-4:] == [401, 401, 429, "alice@LAB.TEST"], results[-4:]
    assert set(results[:-4]) == {"alice@LAB.TEST"}
    assert kdc.asked.count("alice@LAB.TEST") == 4  # the first sign-in, two guesses, her device again


def test_counting_a_new_key_costs_the_same_however_many_held_keys_fill_the_throttle() -> None:
    """A throttle full of held keys (every one refused) makes room for each new key in the same time whether it holds
    a hundred or ten thousand of them: the held keys are not walked past one by one (each new key cost a pass over
    the whole table, 100,000 keys in the gateway's throttles). CPU time of 300 new keys each way, compared."""

    def cost(size: int) -> float:
        throttle = Throttle(1, forget=1800, hold=True, max_keys=size)
        for n in range(size):
            throttle.failed(f"held{n}", now=0)
        start = time.process_time()
        for n in range(300):
            throttle.failed(f"new{n}", now=1)
        spent = time.process_time() - start
        assert len(throttle._keys) == size
        return spent

    small, large = min(cost(100) for _ in range(3)), min(cost(10_000) for _ in range(3))
    assert large < 10 * small + 0.01, (small, large)


def test_counting_a_new_address_costs_the_same_however_many_failure_counts_fill_the_address_throttle() -> None:
    """The address throttle (back-off, no hold) ranks its keys by failures for eviction, and an address waiting out
    each back-off (at most 5 minutes) climbs one failure at a time for as long as it likes: 400 addresses at 6 ... 405
    recent failures each made 400 ranks, every one looked at for each new address (about 0.2 µs a rank: 58 µs a new
    address with 300 ranks, 6.6 with one). Ranks stop at the limit (an address at its limit is at it), so the cost of
    2,000 new addresses is the same as in a throttle whose keys all failed once; CPU time, compared."""

    def cost(climbing: int) -> float:
        throttle, now = Throttle(5, max_keys=1000), 0.0
        for turn in range(climbing + 6):  # address n fails in the last n + 6 turns, each back-off waited out
            now += 301
            for n in range(climbing):
                if turn >= climbing - 1 - n:
                    assert throttle.admit(f"climb{n}", now) == 0
                    throttle.end(f"climb{n}", now, failed=True)
        now += 301
        for n in range(climbing):  # counted again past its back-off: no longer refused, ranked by its failures
            assert throttle.admit(f"climb{n}", now) == 0
            throttle.end(f"climb{n}", now, failed=False)
        for n in range(1000):
            throttle.failed(f"fill{n}", now)
        assert len(throttle._free) <= 6
        start = time.process_time()
        for n in range(2000):
            throttle.failed(f"new{n}", now)
        return time.process_time() - start

    flat, climbed = min(cost(0) for _ in range(3)), min(cost(400) for _ in range(3))
    assert climbed < 3 * flat + 0.01, (flat, climbed)


def test_a_held_users_old_password_from_several_devices_at_once_reaches_the_kdc_once(
    kdc: FakeKdc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice is held (two wrong passwords, limit 2) and then changes her password in the directory: five of her
    devices sending the old one at once, each let past the hold as the password the KDC last accepted, reach the
    KDC once; the KDC's refusal drops that password, and the ones that were waiting for alice's check get 429
    without the KDC (each would be one more wrong password towards the account's lockout)."""
    kdc.delay = 0.3  # the devices' requests all arrive while the first check is in the KDC

    async def run() -> list[int | str]:
        settings = Authentication(mode="basic", basic_cache_seconds=0, basic_failures_per_user=2)
        kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=Path("/nonexistent"))
        service = BasicLogin(settings, Identity(default_realm="LAB.TEST"), kerberos)
        assert await outcome(service, "alice", "alice-Pa55") == "alice@LAB.TEST"
        assert [await outcome(service, "alice", f"guess{i}", "198.51.100.7") for i in range(2)] == [401, 401]
        monkeypatch.setitem(PASSWORDS, "alice@LAB.TEST", b"alice-N3w")
        asked = len(kdc.asked)
        devices = [outcome(service, "alice", "alice-Pa55", f"192.0.2.{i}") for i in range(10, 15)]
        results = list(await asyncio.gather(*devices))
        assert len(kdc.asked) == asked + 1, kdc.asked[asked:]
        return results

    assert sorted(asyncio.run(run()), key=str) == [401, 429, 429, 429, 429]


def test_a_held_users_end_drops_the_cached_password_of_every_name_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """With enterprise_names, alice signs in as `alice@ad.test` (NT-ENTERPRISE) on one connection and `AD\\alice` on
    another: two cache keys, one account (the KDC names alice@AD.TEST in both tickets). The directory's sweep ends the
    first connection's held request and drops its login's password (`BasicLogin.forget`); the other form's must go
    too, or its next request is served from the cache for up to basic_cache_seconds without asking the KDC, which
    now refuses the disabled account. Failed before the fix: the second form was served from the cache."""
    kdc = EnterpriseKdc()

    def login_blocking(user: UserPrincipal, password: bytes) -> UserTicket:
        if user.enterprise is None:  # the down-level name: the principal itself
            creds_: Any = object()
            return UserTicket(principal=user.principal, creds=creds_)
        return kdc(user, password)

    monkeypatch.setattr(basic, "login_blocking", login_blocking)
    identity = Identity(default_realm="AD.TEST", enterprise_names=True)
    kerberos = Kerberos(principal="HTTP/proxy.ad.test@AD.TEST", keytab=Path("/nonexistent"))
    service = BasicLogin(Authentication(mode="basic"), identity, kerberos)

    async def run() -> bool:
        upn = await service.login(creds("alice@ad.test", "Same-Pa55"), "192.0.2.1")
        down_level = await service.login(creds("AD\\alice", "Same-Pa55"), "192.0.2.2")
        assert (upn.ticket.principal, down_level.ticket.principal) == ("alice@AD.TEST", "alice@AD.TEST")
        assert (await service.login(creds("AD\\alice", "Same-Pa55"), "192.0.2.2")).cached
        service.forget(upn)  # the sweep ended the held request of the NT-ENTERPRISE sign-in
        return (await service.login(creds("AD\\alice", "Same-Pa55"), "192.0.2.2")).cached

    assert asyncio.run(run()) is False  # the KDC is asked again (and would refuse the disabled account)


def test_a_sign_in_the_kdc_accepted_before_a_forget_is_not_cached_after_it(
    kdc: FakeKdc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's device signs in on a second connection while the directory's sweep ends her held request on the first
    (her account disabled): the KDC's acceptance of the second may predate the disable, and it arrives after the
    sweep dropped her password (`BasicLogin.forget`). That one request is served (it is the KDC's answer), but the
    password must not be cached again, or her device's next requests are served for up to basic_cache_seconds
    without asking the KDC, which now refuses her. Failed before the fix: the request after was served cached."""
    release = threading.Event()

    async def run() -> bool:
        loop = asyncio.get_running_loop()
        began = asyncio.Event()

        def held_kdc(user: UserPrincipal, password: bytes) -> UserTicket:
            ticket = kdc(user, password)
            if len(kdc.asked) == 2:  # the second sign-in: its answer waits until the sweep has forgotten her
                loop.call_soon_threadsafe(began.set)
                release.wait(30)
            return ticket

        monkeypatch.setattr(basic, "login_blocking", held_kdc)
        service = login_service()
        held = await service.login(creds("alice", "alice-Pa55"), "192.0.2.1")
        service._cache.forget(user_key("alice@LAB.TEST"))  # her entry expired: the next sign-in asks the KDC
        second = asyncio.ensure_future(service.login(creds("alice", "alice-Pa55"), "192.0.2.2"))
        await asyncio.wait_for(began.wait(), 30)
        service.forget(held)  # the sweep ended the held request: the account is disabled
        release.set()
        assert not (await second).cached
        return (await service.login(creds("alice", "alice-Pa55"), "192.0.2.2")).cached

    try:
        assert asyncio.run(run()) is False
    finally:
        release.set()


def test_a_spray_of_the_longest_user_names_costs_the_throttle_a_few_hundred_bytes_a_name(kdc: FakeKdc) -> None:
    """Every wrong guess at an unknown user is a key of the per-user throttle until 100,000 of them: with names of a
    thousand characters (the longest one signs in with is 1,024) each key cost about 1.3 kB, 130 MB at the bound,
    sent by anyone with enough addresses. The throttle keeps a fixed-size hash of the key now: 300 such names, wrong
    passwords from three addresses, leave less than 500 bytes a name allocated by proxy/auth/basic.py (traced)."""

    async def run() -> tuple[list[int | str], tracemalloc.Snapshot, tracemalloc.Snapshot, int]:
        service = login_service(per_user=5, per_address=1_000)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        results: list[int | str] = []
        for batch in range(3):
            names = (f"{batch:02d}{n:03d}".ljust(1_000, "x") for n in range(100))
            results += await asyncio.gather(*(outcome(service, name, "guess", f"198.51.100.{batch}") for name in names))
        gc.collect()  # what the requests left in reference cycles (their exceptions' frames)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        return results, before, after, len(service._users._keys)  # type: ignore[union-attr]

    results, before, after, keys = asyncio.run(run())
    assert set(results) == {401}
    assert keys == 300
    kept = [tracemalloc.Filter(inclusive=True, filename_pattern=basic.__file__)]
    grown = sum(stat.size_diff for stat in after.filter_traces(kept).compare_to(before.filter_traces(kept), "filename"))
    assert grown < 300 * 500, f"{grown / 300:.0f} bytes a name"


class _GatewayAccountDirectory:
    """A directory that knows the gateway's account (`gw`, UPN `kcd-gw@lab.test`), or answers nothing (`down`)."""

    timeout = 5.0

    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.asked: list[str] = []

    async def lookup(self, name: str, *, fresh: bool = False) -> Account | None:
        self.asked.append(name)
        if self.down:
            raise DirectoryUnavailable("no directory server answered")
        sid = Sid.parse("S-1-5-21-1-2-3-1109")
        return Account(dn="CN=gw,CN=Users,DC=lab,DC=test", sam_account_name="gw", upn="kcd-gw@lab.test", sid=sid)


@pytest.mark.parametrize("down", [False, True], ids=["directory", "directory-down"])
def test_the_gateway_accounts_upn_is_refused_before_the_kdc(kdc: FakeKdc, down: bool) -> None:
    """A Basic name that is the gateway account's UPN (`KCD-GW@lab.test`, its principal `gw@LAB.TEST`) is 401 without
    the KDC where the directory says so, and not counted as a guess; alice still signs in. A directory that does not
    answer leaves the name to the KDC (Basic does not stop for it), and is not asked again at once."""
    settings = Authentication(mode="basic", basic_failures_per_user=5, basic_failures_per_address=20)
    service = BasicLogin(
        settings, Identity(default_realm="LAB.TEST"), Kerberos(principal="gw@LAB.TEST", keytab=Path("/x"))
    )
    directory = _GatewayAccountDirectory(down=down)

    async def run(user: str, password: str) -> int | str:
        try:
            login = await service.login(creds(user, password), "192.0.2.1", directory=cast(Directory, directory))
        except (AuthenticationRequired, TooManyAttempts) as e:
            return e.status
        return login.user.principal

    assert asyncio.run(run("KCD-GW@lab.test", "guess")) == 401
    assert kdc.asked == (["KCD-GW@LAB.TEST"] if down else [])
    assert asyncio.run(run("alice", PASSWORDS["alice@LAB.TEST"].decode())) == "alice@LAB.TEST"
    assert directory.asked == ["gw@LAB.TEST"] * (1 if down else 2)


@pytest.mark.parametrize(("principal", "name"), [("gmsa-kcd$@LAB.TEST", "gmsa-kcd"), ("gw@LAB.TEST", "LAB\\gw$")])
def test_the_gateway_accounts_name_with_or_without_its_dollar_is_refused_before_the_kdc(
    kdc: FakeKdc, principal: str, name: str
) -> None:
    """A gateway running as a computer account or a gMSA (`gmsa-kcd$@LAB.TEST`): the Basic name `gmsa-kcd` is 401
    without the KDC. Active Directory looks a name up again with a `$` appended (Samba's KDC mapped `ws01@AD.TEST`
    to the computer `ws01$`, and counted NT_STATUS_WRONG_PASSWORD against it), so a guess without the `$` was a bad
    password against the gateway's account. The other way round (`gw$` for the user `gw`) is nobody's either."""
    settings = Authentication(mode="basic", basic_failures_per_user=5, basic_failures_per_address=20)
    service = BasicLogin(settings, Identity(default_realm="LAB.TEST"), Kerberos(principal=principal, keytab=Path("/x")))
    assert asyncio.run(outcome(service, name, "guess")) == 401
    assert kdc.asked == []
