"""HTTP Basic credentials, checked by the KDC, remembered briefly, and slowed down when wrong.

Theory of operation. `Authorization: Basic base64(user:password)` (RFC 7617) names a user the way a
device's mail account does: `alice`, `LAB\\alice` or `alice@lab.test`; `proxy.identity.principal.map_name`
turns that into a principal of a realm the configuration names (the default realm or a `realm_map`
value; any other realm is refused without asking anyone). The password is checked by the user's own AS
exchange with the KDC (`proxy.kerberos.password`), which leaves the gateway holding the user's TGT; the
backend then gets a Negotiate token from that TGT, or, on routes with `backend_auth = "basic"`, the
client's own Basic header, and on no other route.

A device polls (ActiveSync every few seconds to minutes), so a verified password is remembered for
`authentication.basic_cache_seconds` (default 60): the cache keeps, per principal, a salted scrypt hash
of the password (the salt is random per process; the password itself is never kept), the time it was
verified and the user's credentials. A request whose password hashes the same within that time is
served without the KDC. Any other password, or the same one after the time, is checked with the KDC
again, and a refusal drops the entry at once: a cached entry never outlives a failed re-verification.
The price is that a password changed or an account disabled in the directory keeps working from the
cache for at most that long.

Wrong passwords (and unknown users: both are the same 401, challenge again) are slowed down twice
over, per user (`basic_failures_per_user`, default 5) and per client address
(`basic_failures_per_address`, default 20): once a key reaches its limit, further attempts are refused
with 429 and `Retry-After` for 1 s, then 2, 4, ... up to 5 minutes, without asking the KDC. That keeps
a phone with a stale password from tripping the directory's own lockout policy (AD's), and a password
sprayer from trying many users. A key is forgotten 15 minutes after its last failure, a user's count
after a success. A disabled or locked account gets 403 and does not count (the KDC says so whatever
the password). The per-user throttle can keep a user out for a while when someone else guesses at the
password, as a directory's lockout would, but only for minutes; a password matching a fresh cache
entry is still served while its *address* is throttled, so a sprayer behind the same NAT does not
shut out devices that are already signed in.

Pure parts (`parse_basic`, `CredentialCache`, `Throttle`) take the time as a parameter; `BasicLogin`
is the I/O edge, running the KDC exchange in a thread, bounded in number (`kerberos.max_in_flight`)
and in time (`kerberos.kdc_timeout`). Neither passwords nor headers reach `repr` or the logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from proxy.config import Authentication, Identity, Kerberos, Route
from proxy.errors import AuthenticationRequired, GatewayError, IdentityRejected, KerberosRefused, TooManyAttempts
from proxy.identity.principal import UserPrincipal, map_name
from proxy.kerberos.hints import explain
from proxy.kerberos.password import UserTicket, login_blocking, token_blocking

T = TypeVar("T")

_SCRYPT = {"n": 2**10, "r": 8, "p": 1, "dklen": 32}  # 1 MiB and about 2 ms per hash
_THROTTLE_BASE = 1.0  # seconds of the first refusal once a key reaches its limit; doubles with each failure
_THROTTLE_CAP = 300.0
_THROTTLE_FORGET = 900.0  # seconds after its last failure when a key starts afresh


@dataclass(frozen=True)
class BasicCredentials:
    """What an `Authorization: Basic` header carries."""

    username: str
    password: bytes = field(repr=False)
    header: str = field(repr=False)  # the header value as sent, for routes with backend_auth = "basic"


def parse_basic(value: str | None) -> BasicCredentials | None:
    """The credentials of an Authorization header, or None: absent, another scheme, or malformed."""
    if value is None:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    raw_user, colon, password = decoded.partition(b":")
    if not colon or not raw_user:
        return None
    try:  # RFC 7617 leaves the charset open; devices send UTF-8 or, the older ones, Latin-1
        username = raw_user.decode("utf-8")
    except UnicodeDecodeError:
        username = raw_user.decode("latin-1")
    return BasicCredentials(username=username, password=password, header=value.strip())


@dataclass
class _Entry:
    digest: bytes = field(repr=False)
    expires: float
    ticket: UserTicket = field(repr=False)


class CredentialCache:
    """Verified passwords, as salted scrypt hashes, each trusted for `ttl` seconds; least recently used out first."""

    def __init__(self, ttl: float, *, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._salt = os.urandom(16)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def digest(self, principal: str, password: bytes) -> bytes:
        """The hash kept instead of the password (CPU-bound, about 2 ms: call it from a thread)."""
        return hashlib.scrypt(password, salt=self._salt + principal.encode(), **_SCRYPT)

    def get(self, principal: str, digest: bytes, now: float) -> UserTicket | None:
        entry = self._entries.get(principal)
        if entry is None or now >= entry.expires or not hmac.compare_digest(entry.digest, digest):
            return None
        self._entries.move_to_end(principal)
        return entry.ticket

    def put(self, principal: str, digest: bytes, ticket: UserTicket, now: float) -> None:
        if self._ttl <= 0:
            return
        self._entries[principal] = _Entry(digest, now + self._ttl, ticket)
        self._entries.move_to_end(principal)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def forget(self, principal: str) -> None:
        self._entries.pop(principal, None)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class Throttle:
    """Failed logins per key: after `limit` of them, refusals for 1, 2, 4 ... seconds (at most 5 minutes)."""

    def __init__(self, limit: int, *, max_keys: int = 100_000) -> None:
        self._limit = limit
        self._max = max_keys
        self._keys: OrderedDict[str, _Failures] = OrderedDict()

    def wait(self, key: str, now: float) -> float:
        """Seconds `key` must still wait before its next attempt is looked at (0: go ahead)."""
        state = self._keys.get(key)
        return 0.0 if state is None else max(0.0, state.blocked_until - now)

    def failed(self, key: str, now: float) -> None:
        state = self._keys.pop(key, None)
        if state is None or now - state.last > _THROTTLE_FORGET:
            state = _Failures()
        state.count += 1
        state.last = now
        if state.count >= self._limit:
            state.blocked_until = now + min(_THROTTLE_CAP, _THROTTLE_BASE * 2 ** min(state.count - self._limit, 20))
        self._keys[key] = state
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._keys.pop(key, None)


@dataclass(frozen=True)
class PasswordLogin:
    """Evidence of the password check: who, their own Kerberos credentials, and whether the KDC was asked."""

    user: UserPrincipal
    ticket: UserTicket = field(repr=False)
    header: str = field(repr=False)
    cached: bool


class BasicLogin:
    """Checks Basic credentials with the KDC, with the cache and throttles above; makes the backend's header."""

    def __init__(self, settings: Authentication, identity: Identity, kerberos: Kerberos) -> None:
        self.challenge = {"WWW-Authenticate": f'Basic realm="{settings.basic_realm}"'}
        self._identity = identity
        self._realms = {identity.default_realm, *identity.realm_map.values()}
        self._timeout = kerberos.kdc_timeout
        self._slots = asyncio.Semaphore(kerberos.max_in_flight)
        self._cache = CredentialCache(settings.basic_cache_seconds)
        self._users = Throttle(settings.basic_failures_per_user)
        self._addresses = Throttle(settings.basic_failures_per_address)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def required(self, reason: str) -> AuthenticationRequired:
        """A 401 that asks for Basic credentials."""
        return AuthenticationRequired(reason, challenge=self.challenge)

    async def login(self, credentials: BasicCredentials, client: str) -> PasswordLogin:
        """The user the credentials prove, from the cache or after asking the KDC."""
        user = self._user(credentials.username)
        digest = await asyncio.to_thread(self._cache.digest, user.principal, credentials.password)
        ticket = self._cache.get(user.principal, digest, time.monotonic())
        if ticket is not None:
            return PasswordLogin(user, ticket, credentials.header, cached=True)
        lock = self._locks.setdefault(user.principal, asyncio.Lock())
        async with lock:  # one KDC check per user at a time; the ones waiting may then find it cached
            ticket = self._cache.get(user.principal, digest, time.monotonic())
            if ticket is not None:
                return PasswordLogin(user, ticket, credentials.header, cached=True)
            self._refuse_if_throttled(user.principal.casefold(), client, time.monotonic())
            try:
                ticket = await self._kdc(login_blocking, user, credentials.password)
            except KerberosRefused:  # disabled, locked, expired: said whatever the password, so not a guess
                self._cache.forget(user.principal)
                raise
            except AuthenticationRequired as e:  # a wrong password, or no such user
                self._cache.forget(user.principal)
                self._users.failed(user.principal.casefold(), time.monotonic())
                self._addresses.failed(client, time.monotonic())
                raise AuthenticationRequired(e.reason, hint=e.hint, challenge=self.challenge) from None
            self._users.succeeded(user.principal.casefold())
            self._cache.put(user.principal, digest, ticket, time.monotonic())
            return PasswordLogin(user, ticket, credentials.header, cached=False)

    async def authorization(self, login: PasswordLogin, route: Route) -> str:
        """The backend's Authorization: the client's Basic header where the route says so, else Negotiate."""
        if route.backend_auth == "basic":
            return login.header
        token = await self._kdc(token_blocking, login.ticket, route.gss_target, route.spn)
        return "Negotiate " + base64.b64encode(token).decode("ascii")

    def _user(self, username: str) -> UserPrincipal:
        try:
            user = map_name(username, self._identity, source="basic")
        except IdentityRejected as e:
            raise AuthenticationRequired(
                "the user name or password is incorrect", hint=e.reason, challenge=self.challenge
            ) from None
        if user.realm not in self._realms:
            raise AuthenticationRequired(
                "the user name or password is incorrect",
                hint=f"{user.principal}: realm {user.realm} is not the default realm or in identity.realm_map",
                challenge=self.challenge,
            )
        return user

    def _refuse_if_throttled(self, user_key: str, client: str, now: float) -> None:
        wait = max(self._users.wait(user_key, now), self._addresses.wait(client, now))
        if wait > 0:
            raise TooManyAttempts(
                "too many failed sign-ins; wait and try again",
                hint=f"failed logins for {user_key} or from {client} are throttled for {wait:.0f} s more",
                challenge={"Retry-After": str(max(1, round(wait)))},
            )

    async def _kdc(self, call: Callable[..., T], *args: object) -> T:
        async with self._slots:
            try:
                return await asyncio.wait_for(asyncio.to_thread(call, *args), timeout=self._timeout)
            except TimeoutError:
                raise _unreachable(self._timeout) from None


def _unreachable(timeout: float) -> GatewayError:
    return explain(f"cannot contact any KDC within {timeout:g} s", user="-", spn="-", proxy="the gateway")
