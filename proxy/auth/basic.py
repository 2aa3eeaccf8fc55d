"""HTTP Basic credentials, checked by the KDC, remembered briefly, and slowed down when wrong.

Theory of operation. `Authorization: Basic base64(user:password)` (RFC 7617) names a user the way a
device's mail account does: `alice`, `LAB\\alice` or `alice@lab.test`; `proxy.identity.principal.map_name`
turns that into a principal of a realm the configuration names (the default realm or a `realm_map`
value). A name whose domain the configuration does not name (`domain_realm`: `EVIL\\alice`, `alice@evil.test`)
is refused (401) without asking anyone, hashing anything or counting against a throttle, and so is a name longer than
any directory holds (`MAX_USER_NAME`), and the gateway's own account (`kerberos.principal`, however spelt: its wrong
passwords would count towards locking out the account every delegation needs). The password is
checked by the user's own AS exchange with the KDC (`proxy.kerberos.password`), which leaves the gateway
holding the user's TGT; the backend then gets a Negotiate token from that TGT, or, on routes with
`backend_auth = "basic"`, the client's own Basic header, and on no other route. The credentials are read as UTF-8,
or as Latin-1 (as windows-1252) where they are not valid UTF-8 (older devices), and the password goes to the KDC as
UTF-8 either way.

A device polls (ActiveSync every few seconds to minutes), so a verified password is remembered for
`authentication.basic_cache_seconds` (default 60): the cache keeps, per user, a salted scrypt hash of
the password (the salt is random per process; the password itself is never kept), the time it was
verified, who the KDC said the user is and the user's credentials. A request whose password hashes the
same within that time is served without the KDC, as that user. Any other password, or the same one
after the time, is checked with the KDC again; a failed re-verification of the cached password drops
the entry, a wrong *other* password does not (a guess says nothing about the password the KDC accepted).
The price is that a password changed or an account disabled in the directory keeps working from the
cache for at most that long (a disabled or locked account drops the entry as soon as the KDC says so; a reload
drops every entry, as it drops every cached ticket). An entry ends sooner where the user's TGT does (MIT's maxlife,
AD's logon hours): served on, its requests failed at the backend token for the rest of the time.

User keys follow the directory: Active Directory compares user names without regard to case, so
`ALICE`, `Alice` and `alice` are one user to the cache, the throttle and the per-user lock (a
case-sensitive KDC such as MIT's only gets stricter throttling from that). The key folds case the
Unicode way, which merges more than the directory does (`straße` and `strasse`): harmless for a
throttle, so a cache hit is further served only to a name equal to the verified one up to ASCII case,
and as the user the KDC verified, never the spelling of the request. The throttle counts the principal a
name maps to, folded further (`guess_key`): AD also ignores width, accents and kana type, so a full-width `alice`
and `álice` are alice's account there, and each guess under them one more towards its lockout; they share alice's
count and hold. With `identity.enterprise_names` the UPN `alice@lab.test` (asked as an NT-ENTERPRISE name, a
cache key of its own) and `LAB\\alice` share one count. A UPN whose local part is not the account name
(`a.smith@lab.test` for `LAB\\asmith`) is the same user only by the directory's word, and is counted apart.

Wrong passwords (and unknown users: both are the same 401, challenge again) are slowed down twice
over, per user (`basic_failures_per_user`, default 5) and per client address
(`basic_failures_per_address`, default 20). An attempt counts against both *before* it is hashed or
sent to the KDC: at most `limit - failures` attempts of one key are in flight at once, so 100 wrong
passwords sent at once from one address cannot all reach the KDC. Once an address reaches its limit,
further attempts are refused with 429 and `Retry-After` for 1 s, then 2, 4, ... up to 5 minutes,
without asking the KDC and without hashing anything; it is forgotten 15 minutes after its last failure.
A user who reaches the limit is *held*: 429 until `basic_failure_window_seconds` (30 minutes) after
the last failure, because the directory counts those failures too (Active Directory locks the account
at its threshold and forgets only after its observation window without a bad password; the 1, 2, 4 ...
releases carried a guesser past a threshold of 5 within 4 s, seen against Samba AD). Held, at most
`basic_failures_per_user` guesses reach the KDC per window, so a threshold above that is never reached
through the gateway; the one password that still goes on is the one the KDC last accepted for that
user (its hash is kept for the window after the device last used it, whether the KDC accepted it or the
cache served it, never to serve anyone from it): the user's own device. A
user's count is forgotten after a success, as AD resets its own. Each throttle keeps at most 100,000 keys; a
flood of other names pushes out keys that are not refused first, never a held user's. A disabled or
locked account gets 403 and does not count (the KDC says so whatever the password). With several workers the
users' and the addresses' counts live in tables they share (`proxy.auth.shared`), so a guesser's connections spread
over the workers meet one limit each. An IPv6 client is
counted by its /64 (`address_key`): one device or home is given a whole /64 and picks addresses in it
at will, so a sprayer stepping through its own prefix would otherwise get a fresh allowance per address.

The throttles hold back guesses, not users who are signed in: a password matching a fresh cache entry
is served while its user or its address is throttled, so someone guessing at alice's password, or a
sprayer behind the same NAT, does not shut out alice's devices. Telling that device from the guesser
takes one hash, so a throttled attempt is hashed only when its user has a fresh cache entry; otherwise
it is refused before any hashing.

Why our own throttle: a rate-limit library (`limits`) counts requests in a window, while this one counts attempts
before they are hashed or sent to the KDC (and takes back those that end well), holds a user for the directory's
observation window, lets through the one password the KDC last accepted, and evicts keys that are not refused first.

Known and unknown users answer alike. The KDC answers "no such user" at once, while for an existing
account the client library derives a key from the password (PBKDF2, about 8 ms here) and the KDC does
more work; the difference (1 against 10 ms in the lab) would list the directory's users. A refused
sign-in (401 or 429) is therefore answered no sooner than the slowest of the last 32 password checks of
existing accounts took (`Pace`): both answers leave at the same moment, and the wait costs no CPU.

Pure parts (`parse_basic`, `CredentialCache`, `Throttle`) take the time as a parameter; `BasicLogin`
is the I/O edge, running the KDC exchanges in threads of its own (`proxy.kerberos.threads`), bounded in number
(`kerberos.max_in_flight`) and in time (`kerberos.kdc_timeout`): a KDC that accepts and never answers holds each
thread for MIT's own wait (about 25 s), and asyncio's default executor, which CRL reads and vetting and the password
hashes here use, must not fill up with them. Password checks and the backend's tokens have a set of threads each:
logins anyone can send (any name, any password) cannot take the threads a signed-in user's token needs. A check or
token that finds no thread to wait for (every one held by a call the KDC has not answered and its caller gave up
on, at `kdc_timeout` or when its device hung up, or as many waiting already) is 503 at once with Retry-After, naming
the realm whose KDC does not answer and what ended those waits. Neither passwords nor headers reach `repr` or the logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import math
import os
import time
import unicodedata
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from proxy.addresses import address_key
from proxy.auth.shared import SharedTable, SharedThrottle
from proxy.config import Authentication, Identity, Kerberos, Route
from proxy.errors import (
    AuthenticationRequired,
    GatewayError,
    IdentityRejected,
    KerberosRefused,
    TooManyAttempts,
    UserUnknown,
)
from proxy.identity.principal import (
    UserPrincipal,
    ascii_lower,
    configured_domains,
    domain_realm,
    map_name,
    shown_name,
)
from proxy.kerberos.delegate import asked_name
from proxy.kerberos.hints import explain
from proxy.kerberos.password import INCORRECT, UserTicket, login_blocking, token_blocking
from proxy.kerberos.profile import refresh_profile
from proxy.kerberos.threads import KdcThreads, NoThread, Outcome, no_thread_error

if TYPE_CHECKING:  # bonsai's import is start-up CPU: imported where a [directory] is configured
    from proxy.directory import Directory

T = TypeVar("T")
log = structlog.get_logger("proxy.auth")

_SCRYPT = {"n": 2**10, "r": 8, "p": 1, "dklen": 32}  # 1 MiB and about 2 ms per hash
_THROTTLE_BASE = 1.0  # seconds of the first refusal once a key reaches its limit; doubles with each failure
_THROTTLE_CAP = 300.0
_OWN_RETRY = 30.0  # seconds a failed look-up of the gateway's own account is not asked again
_THROTTLE_FORGET = 900.0  # seconds after its last failure when a key starts afresh
_PACE_SEED = 0.05  # seconds: the refusal pace before any password check of an existing account was timed
_PACE_SAMPLES = 32
# The longest user name tried: AD keeps a userPrincipalName to 1,024 characters (its schema's rangeUpper), and a
# down-level DOMAIN\user is far shorter. A longer one is nobody's: not sent to the KDC, logged or kept as a key.
MAX_USER_NAME = 1024
# Seconds before its TGT ends when a sign-in stops being served from the cache: time for the request's token (a
# service ticket asked with that TGT) and its way to the backend.
_TICKET_MARGIN = 10.0


def user_key(principal: str) -> str:
    """The key of a user for the cache and the lock: names compared without regard to case (as Active Directory
    does), so `ALICE@LAB.TEST` and `alice@LAB.TEST` are one user."""
    return principal.casefold()


# Letters Windows' comparison takes for their base letter that Unicode does not decompose (a stroke, a bar, no dot).
_BASE_LETTERS = str.maketrans("øđłħŧıƀƶǥɨʉ", "odlhtibzgiu")
_KATAKANA = range(0x30A1, 0x30F7)  # to hiragana, 0x60 below: Windows' NORM_IGNOREKANATYPE


def guess_key(principal: str) -> str:
    """The key of a user for the throttle and the hold: every spelling Active Directory takes for the same account
    is one key. AD compares names ignoring case, width, non-spacing marks and kana type (MS-ADTS 6.5: `alice` in full
    width, `álice`, `a` with a combining acute and `alice` are one sAMAccountName), so a guess under each spelling
    counts towards the one account's lockout, and must count towards its one hold. Folded here: case, compatibility
    forms (NFKD: full and half width, circled letters, ligatures), combining marks, a few letters with a stroke,
    katakana as hiragana. It merges more than AD may (`straße` and `strasse`), which only makes the throttle stricter;
    the cache never serves by it."""
    decomposed = unicodedata.normalize("NFKD", principal.casefold())
    bare = "".join(
        chr(ord(char) - 0x60) if ord(char) in _KATAKANA else char
        for char in decomposed
        if not unicodedata.combining(char)
    )
    return bare.translate(_BASE_LETTERS).casefold()


def _account_key(principal: str) -> str:
    """`guess_key` without the `$` that may end the name: Active Directory looks a name it does not find up again with
    a `$` appended (Samba's KDC took `ws01@AD.TEST` for the computer `ws01$`), so `gmsa-kcd` and `gmsa-kcd$` name one
    account when it is a computer's or a gMSA's; for a user's it only refuses a name that is nobody's."""
    name, at, realm = guess_key(principal).rpartition("@")
    return f"{name.rstrip('$')}@{realm}" if at else realm.rstrip("$")


@dataclass(frozen=True)
class BasicCredentials:
    """What an `Authorization: Basic` header carries."""

    username: str
    password: bytes = field(repr=False)
    header: str = field(repr=False)  # the header value as sent, for routes with backend_auth = "basic"


def parse_basic(value: str | None) -> BasicCredentials | None:
    """The credentials of an Authorization header, or None: absent, another scheme, malformed, no user name, or a
    password that is empty or holds a NUL."""
    if value is None:
        return None
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    raw_user, colon, raw_password = decoded.partition(b":")
    if not colon or not raw_user or not raw_password or b"\x00" in raw_password:
        # Kerberos reads a password up to its first NUL ("secret\0junk" would pass as "secret"), and an empty one
        # is no proof (GSSAPI refuses it as an invalid argument, which read as a misconfiguration): neither is tried.
        return None
    # RFC 7617 leaves the charset open without `charset="UTF-8"`; devices send UTF-8 or, the older ones, Latin-1 (as
    # windows-1252: `_WINDOWS_1252`). The
    # KDC derives the user's key from the password's UTF-8 (AD from its UTF-16 as UTF-8), so a Latin-1 password goes
    # to it as UTF-8: as sent, `Pässwort` was a wrong password, counted towards the hold and the directory's lockout.
    return BasicCredentials(username=_text(raw_user), password=_text(raw_password).encode(), header=value.strip())


# windows-1252, byte by byte: what older Windows devices send, and what browsers mean by Latin-1 (the WHATWG Encoding
# Standard's `iso-8859-1` label): Latin-1 but for 0x80-0x9f (`€`, `„`, `™`...), whose five bytes it leaves undefined
# staying Latin-1's (as WHATWG's windows-1252 decodes them). Latin-1 read those as C1 control characters nobody types.
_WINDOWS_1252 = [bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in range(256)]


def _text(raw: bytes) -> str:
    """A part of Basic credentials as text: UTF-8 where it is valid UTF-8, else windows-1252 (every byte a character:
    `_WINDOWS_1252`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(_WINDOWS_1252[b] for b in raw)


# The shared table's namespaces (`SharedTable.digest`) of an account, the principal the KDC named whatever name form
# it was asked by: the account known (served by any worker), and when a worker last forgot it (`forget_account`).
_ACCOUNT = b"account"
_FORGOTTEN = b"forgotten"


@dataclass
class _Entry:
    digest: bytes = field(repr=False)
    expires: float
    user: UserPrincipal  # who the KDC verified (not the spelling of a later request)
    ticket: UserTicket = field(repr=False)


class CredentialCache:
    """Verified passwords, as salted scrypt hashes, each trusted for `ttl` seconds; least recently used out first.

    Keys are `user_key`s: one entry per user however a request spells the name. With `known_for`, the password the
    KDC last accepted for a user is also known (`known`) until that long after it was last used: accepted by the
    KDC or served from the entry. Counted from the KDC's acceptance alone, it ended while a longer-lived entry still
    served the device, and the device was then refused for the rest of a hold. With `shared` (workers) as well, an
    entry is served only while the table still knows its password and its account (the principal the KDC named):
    one worker's `forget` ends every worker's entry of that key, its `forget_account` every worker's entry of that
    account under any name form, including forms that worker never saw."""

    def __init__(
        self, ttl: float, *, max_entries: int = 10_000, known_for: float = 0.0, shared: SharedTable | None = None
    ) -> None:
        """`shared`: the workers' table, which keeps the passwords the KDC last accepted (`known`) for every worker."""
        self._ttl = ttl
        self._known_for = known_for
        self._max = max_entries
        self._shared = shared
        self._salt = os.urandom(16) if shared is None else shared.salt
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._known: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (digest, until)
        self._forgotten: OrderedDict[str, float] = OrderedDict()  # key -> when (monotonic) `forget` last dropped it
        self._cleared = -math.inf  # when (monotonic) `clear` last dropped every entry

    def digest(self, key: str, password: bytes) -> bytes:
        """The hash kept instead of the password (CPU-bound, about 2 ms: call it from a thread)."""
        return hashlib.scrypt(password, salt=self._salt + key.encode(), **_SCRYPT)

    def fresh(self, key: str, now: float) -> bool:
        """Whether `key` has an entry still within its time (no hashing needed to know)."""
        entry = self._entries.get(key)
        return entry is not None and now < entry.expires

    def get(self, key: str, digest: bytes, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires or not hmac.compare_digest(entry.digest, digest):
            return None
        if self._shared is not None and self._known_for > 0:
            account = ascii_lower(entry.ticket.principal)
            if not self._shared.known(key, now, digest) or not self._shared.known(account, now, kind=_ACCOUNT):
                # another worker forgot it or its account (a held request of the user ended by the directory, under
                # this name form or another; the KDC refused it): served by no worker until the KDC accepts it again
                del self._entries[key]
                return None
            self._shared.keep_known(account, digest, now + self._known_for, kind=_ACCOUNT)
        self._entries.move_to_end(key)
        if self._known_for > 0:
            self._know(key, entry.digest, now)
        return entry

    def known(self, key: str, now: float, digest: bytes | None = None) -> bool:
        """Whether `key` has a password the KDC accepted within the failure window (with `digest`: this one).
        Never a reason to serve anyone: only to let that password through a held user's throttle to the KDC."""
        if self._shared is not None:
            return self._shared.known(key, now, digest)
        known = self._known.get(key)
        if known is None or now >= known[1]:
            return False
        return digest is None or hmac.compare_digest(known[0], digest)

    def put(
        self,
        key: str,
        digest: bytes,
        user: UserPrincipal,
        ticket: UserTicket,
        now: float,
        *,
        asked: float | None = None,
    ) -> None:
        """The KDC accepted `digest`'s password for `user` just now. `asked`: when the sign-in began (monotonic); one
        that began before the user's entry was last dropped (`forget`: the directory ended a held request, the
        account disabled; with workers, `forget_account` in any of them) is not kept, as the KDC's acceptance may
        predate the change."""
        account = ascii_lower(ticket.principal)
        if self._known_for > 0:
            self._know(key, digest, now)
        if asked is not None and (
            max(self._forgotten.get(key, -math.inf), self._cleared) >= asked
            or (self._shared is not None and self._shared.until(account, kind=_FORGOTTEN) >= asked)  # any worker's
        ):
            return
        if self._known_for > 0 and self._shared is not None:  # the account signed in again: served by every worker
            self._shared.keep_known(account, digest, now + self._known_for, kind=_ACCOUNT)
        ttl = min(self._ttl, ticket.lifetime - _TICKET_MARGIN)  # never served on a TGT that has ended
        if ttl <= 0:
            return
        self._entries[key] = _Entry(digest, now + ttl, user, ticket)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def keep_known_of(self, old: CredentialCache) -> None:
        """Go on with `old`'s accepted passwords (and the salt they were hashed with), not its sign-ins: a reload."""
        if self._shared is None and old._shared is None:
            self._salt, self._known = old._salt, old._known

    def _know(self, key: str, digest: bytes, now: float) -> None:
        if self._shared is not None:
            self._shared.keep_known(key, digest, now + self._known_for)
            return
        self._known[key] = (digest, now + self._known_for)
        self._known.move_to_end(key)
        while len(self._known) > self._max:
            self._known.popitem(last=False)

    def forget(self, key: str, digest: bytes | None = None) -> None:
        """Drop the entry of `key`; with `digest`, only if it is that password's (the KDC refused it)."""
        if digest is None:
            self._forgotten[key] = time.monotonic()
            self._forgotten.move_to_end(key)
            while len(self._forgotten) > self._max:
                self._forgotten.popitem(last=False)
        entry = self._entries.get(key)
        if entry is not None and (digest is None or hmac.compare_digest(entry.digest, digest)):
            del self._entries[key]
        if self._shared is not None:
            self._shared.forget_known(key, digest)
        known = self._known.get(key)
        if known is not None and (digest is None or hmac.compare_digest(known[0], digest)):
            del self._known[key]

    def clear(self) -> None:
        """Drop every entry (a reload: every user's next request is a KDC check); a sign-in begun before is not kept.
        The passwords the KDC last accepted stay known: a held user's own device still gets through its hold."""
        self._entries.clear()
        self._cleared = time.monotonic()

    def forget_account(self, principal: str) -> None:
        """Drop every entry whose sign-in the KDC gave `principal` (up to ASCII case), whatever name it was asked."""
        account = ascii_lower(principal)
        for key in [k for k, entry in self._entries.items() if ascii_lower(entry.ticket.principal) == account]:
            self.forget(key)
        if self._shared is not None:  # the other workers' entries, under name forms this one never saw
            self._shared.forget_known(account, kind=_ACCOUNT)
            # and their sign-ins begun before now, whose KDC answer may predate the change (`put`'s `asked`); the time
            # kept where an accepted password's end would be (the first out of a full bucket: then such a racing
            # sign-in is cached, as before)
            self._shared.keep_known(account, bytes(32), time.monotonic(), kind=_FORGOTTEN)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0
    in_flight: int = 0  # attempts admitted and not yet answered by the KDC
    queued: int | None = None  # the rank under which it waits in `Throttle._free` (None: it does not): failures and
    # attempts in flight, each a failure it may be, at most the limit


class Throttle:
    """Failed logins per key: after `limit` of them, refusals for 1, 2, 4 ... seconds (at most 5 minutes);
    with `hold`, refusals until `forget` seconds after the last failure, when the key starts afresh.

    Attempts in flight count too: a key with `failures` recent failures may have at most
    `limit - failures` attempts (at least one) in flight at once, so concurrent attempts cannot all get
    past the check before the first of them fails.

    `hold` is for users, whose failures the directory counts too: Active Directory locks an account at its
    threshold of bad passwords and forgets them only after its observation window without one, so the 1, 2, 4 ...
    releases would carry a guesser's passwords past any threshold (5 + 5 in 31 s); held, at most `limit` of them
    reach the KDC until `forget` (at least the directory's window) has passed.

    A key is kept as its 16-byte BLAKE2b hash (`_hashed`), never as sent: a guess at an unknown user is a key, and a
    user name may be 1,024 characters long, so the throttle's 100,000 keys held 130 MB (1.3 kB each) where they now
    hold 27 MB (docs/hardening.md, "What an attacker can make the gateway keep")."""

    def __init__(
        self, limit: int, *, forget: float = _THROTTLE_FORGET, hold: bool = False, max_keys: int = 100_000
    ) -> None:
        self._limit = limit
        self._forget = forget
        self._hold = hold
        self._max = max_keys
        self._keys: dict[bytes, _Failures] = {}  # every key counted, by its hash
        # Eviction's queues, every key in one: keys not refused, one queue per rank (failures and attempts in flight),
        # each least recently counted first, and keys refused, in the order they were last counted (`_evict`)
        self._free: dict[int, OrderedDict[bytes, None]] = {}
        self._refused: OrderedDict[bytes, None] = OrderedDict()

    def retuned(self, like: Throttle) -> Throttle:
        """This throttle, its counts kept, with the limit and forget time of `like` (a reload's)."""
        self._limit, self._forget = like._limit, like._forget
        return self

    def wait(self, key: str, now: float) -> float:
        """Seconds `key` must still wait before its next attempt may start (0: go ahead)."""
        return self._wait(_hashed(key), now)

    def _wait(self, key: bytes, now: float) -> float:
        state = self._keys.get(key)
        if state is None:
            return 0.0
        if state.blocked_until > now:
            return state.blocked_until - now
        count = state.count if now - state.last <= self._forget else 0
        return 0.0 if state.in_flight < max(1, self._limit - count) else _THROTTLE_BASE

    def admit(self, key: str, now: float, *, force: bool = False) -> float:
        """Check and count in one step: 0 and the attempt is in flight (until `end`), or the seconds to wait (nothing
        counted). `force`: counted whatever the wait (a held user's own last accepted password)."""
        hashed = _hashed(key)
        wait = 0.0 if force else self._wait(hashed, now)
        if wait == 0 and not self._begin(hashed, now) and not force:
            return _THROTTLE_BASE  # no place for a new key: every other one is held (`_evict`)
        return wait

    def begin(self, key: str, now: float) -> None:
        """An attempt of `key` is admitted: it counts as in flight until `end`."""
        self._begin(_hashed(key), now)

    def _begin(self, key: bytes, now: float) -> bool:
        """Count an attempt of `key` in flight; False if it is a new key with no place (nothing counted)."""
        state = self._state(key, now)
        if state is None:
            return False
        state.in_flight += 1
        self._queue(key, refused=state.blocked_until > now)  # ranked with its attempts in flight
        return True

    def end(self, key: str, now: float, *, failed: bool) -> None:
        """The attempt `begin` admitted is over; `failed`: it was a wrong password or an unknown user."""
        hashed = _hashed(key)
        state = self._keys.get(hashed)
        if state is not None:
            state.in_flight = max(0, state.in_flight - 1)
        if failed:
            self._failed(hashed, now)
        elif state is not None and state.in_flight == 0 and state.count == 0:
            self._drop(hashed)
        elif state is not None:
            self._queue(hashed, refused=state.blocked_until > now)

    def failed(self, key: str, now: float) -> None:
        self._failed(_hashed(key), now)

    def _failed(self, key: bytes, now: float) -> None:
        state = self._state(key, now)
        if state is None:  # a new key with no place: counted nowhere, as the workers' shared table does
            return
        state.count += 1
        state.last = now
        if state.count >= self._limit and self._hold:
            state.blocked_until = now + self._forget
        elif state.count >= self._limit:
            state.blocked_until = now + backoff(state.count - self._limit)
        self._queue(key, refused=state.blocked_until > now)

    def succeeded(self, key: str) -> None:
        hashed = _hashed(key)
        state = self._keys.get(hashed)
        if state is not None:
            state.count, state.blocked_until = 0, 0.0
            self._queue(hashed, refused=False)

    def _state(self, key: bytes, now: float) -> _Failures | None:
        """The state of `key`, made the most recent; failures older than the forget time start afresh. None: `key` is
        new and the throttle full of held users (`_evict`), so it is not taken in."""
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Failures()
        elif state.count and now - state.last > self._forget:
            state.count, state.blocked_until = 0, 0.0
        self._queue(key, refused=state.blocked_until > now)
        if not self._evict(key, now):
            self._drop(key)
            return None
        return state

    def _queue(self, key: bytes, *, refused: bool) -> None:
        """`key` to the end of its eviction queue: the refused keys' while it is refused, else its rank's (failures
        and attempts in flight)."""
        state = self._keys[key]
        self._unqueue(key, state)
        if refused:
            self._refused[key] = None
        else:  # ranks stop at the limit: past it an address climbs one rank per back-off waited out (`_fewest`)
            state.queued = min(state.count + state.in_flight, self._limit)
            self._free.setdefault(state.queued, OrderedDict())[key] = None

    def _unqueue(self, key: bytes, state: _Failures) -> None:
        self._refused.pop(key, None)
        if state.queued is not None:
            queue = self._free[state.queued]
            del queue[key]
            if not queue:
                del self._free[state.queued]
            state.queued = None

    def _evict(self, keep: bytes, now: float) -> bool:
        """Down to `max_keys`: keys that are not refused first, least recently counted first, then (without `hold`)
        refused keys in the order they were counted, never `keep` (the key being counted); False when a held user
        would have to go (`keep`, then new, is not taken in). A held user's key is not touched while held,
        and a flood of other names (each guess at an unknown user a key) would otherwise evict it and give its
        guesser a fresh allowance (towards the directory's lockout) before the window ends. A refused key whose time
        has passed since is old news at the front of its queue: it goes before the others. Of the keys not refused,
        those with the fewest failures go first (`_fewest`). Each step looks at the front of a queue only (the whole
        table was walked past for each new key when every key was refused). With `hold`, a throttle full of held
        users takes no new key: the least recently counted held one went, and a flood of held names (unknown users,
        `limit` wrong passwords each) gave a held user's guesser a fresh allowance towards the directory's lockout
        for every `max_keys` of them; the workers' shared table refuses such a key too (`proxy.auth.shared`)."""
        while len(self._keys) > self._max:
            lapsed = self._first(self._refused, keep)
            if lapsed is None or self._keys[lapsed].blocked_until > now:
                lapsed = None
            victim = lapsed or self._fewest(keep, now) or (None if self._hold else self._first(self._refused, keep))
            if victim is None:
                return not self._hold
            self._drop(victim)
        return True

    def _fewest(self, keep: bytes, now: float) -> bytes | None:
        """The key not refused to evict: one with nothing in flight whose failures are all past the window, else the
        least recently counted of those with the fewest failures and attempts in flight (each attempt in flight a
        failure it may be). Least recently counted alone, a flood of names failing once each (unknown users, from many
        /64s) evicted a user's failures short of her hold, and her guesser had a fresh allowance towards the
        directory's lockout for every `max_keys` names; now it takes as many failures of each of them. By failures
        alone, a user's attempts in flight, none failed yet, went first, and the in-flight cap with them. A rank is at
        most `limit` (a user's key is held there), so this looks at `limit` + 1 queues at most: the address throttle's
        keys not refused, each waiting out its back-off, climbed one rank per failure for as long as their sender
        liked, and every rank was looked at for each new key (400 ranks: 20 times the cost of a new address)."""
        fewest = None
        for rank in sorted(self._free):
            front = self._first(self._free[rank], keep)
            if front is None:
                continue
            state = self._keys[front]
            if rank == 0 or (state.in_flight == 0 and now - state.last > self._forget):
                return front
            fewest = fewest or front
        return fewest

    @staticmethod
    def _first(queue: OrderedDict[bytes, None], keep: bytes) -> bytes | None:
        """The front of `queue`, unless it is `keep` (then it is also its end, being the most recent: alone there)."""
        front = next(iter(queue), None)
        return None if front == keep else front

    def _drop(self, key: bytes) -> None:
        self._unqueue(key, self._keys.pop(key))


def backoff(over: int) -> float:
    """Seconds a key (not held) is refused once it has its limit + `over` failures: 1, 2, 4 ... at most 5 minutes."""
    return min(_THROTTLE_CAP, _THROTTLE_BASE * 2.0 ** min(over, 20))


def _hashed(key: str) -> bytes:
    """What a `Throttle` keeps of `key`: 16 bytes however long the name (a collision takes 2**64 guesses of names)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Pace:
    """How long a password check of an existing account takes: the slowest of the last few.

    A refused sign-in is answered no sooner than that after it arrived, so "no such user" (the KDC
    answers at once) and "wrong password" (key derivation and more KDC work) cannot be told apart by
    their timing. Only checks of existing accounts are timed, so a flood of unknown names cannot
    lower the pace."""

    def __init__(self, seed: float = _PACE_SEED, samples: int = _PACE_SAMPLES) -> None:
        self._recent: deque[float] = deque([seed], maxlen=samples)

    def observe(self, seconds: float) -> None:
        self._recent.append(seconds)

    @property
    def floor(self) -> float:
        return max(self._recent)


@dataclass(frozen=True)
class PasswordLogin:
    """Evidence of the password check: who, their own Kerberos credentials, and whether the KDC was asked."""

    user: UserPrincipal
    ticket: UserTicket = field(repr=False)
    header: str = field(repr=False)
    cached: bool


class BasicLogin:
    """Checks Basic credentials with the KDC, with the cache and throttles above; makes the backend's header."""

    def __init__(
        self, settings: Authentication, identity: Identity, kerberos: Kerberos, *, shared: SharedTable | None = None
    ) -> None:
        """`shared`: the workers' table (`proxy.auth.shared`), where the per-user counts live with several workers."""
        self.challenge = {"WWW-Authenticate": f'Basic realm="{settings.basic_realm}"'}
        self._identity = identity
        self._realms = {identity.default_realm, *identity.realm_map.values()}
        self._principal = kerberos.principal
        self._own = _account_key(kerberos.principal)  # the gateway's own account: nobody's Basic sign-in (`_user`)
        self._own_upn: tuple[str, str] | None = None  # its UPN and DN, as the directory last named them
        self._own_learnt = False
        self._own_lookup: asyncio.Future[None] | None = None
        self._own_retry = -math.inf  # when (time.monotonic) a failed look-up of it may be asked again
        self._checks = KdcThreads(kerberos.max_in_flight, kerberos.kdc_timeout, "basic-kdc")  # password checks
        self._tokens = KdcThreads(kerberos.max_in_flight, kerberos.kdc_timeout, "basic-token")  # backend tokens
        self._window = settings.basic_failure_window_seconds
        self._cache = CredentialCache(settings.basic_cache_seconds, known_for=self._window, shared=shared)
        self.shared = shared
        limit = settings.basic_failures_per_user
        self._users: Throttle | SharedThrottle = (
            Throttle(limit, forget=self._window, hold=True)
            if shared is None
            else SharedThrottle(shared, limit, forget=self._window, stale_after=_stale_after(limit, kerberos))
        )
        per_address = settings.basic_failures_per_address
        self._addresses: Throttle | SharedThrottle = (
            Throttle(per_address)
            if shared is None or shared.addresses is None
            else SharedThrottle(
                shared.addresses,
                per_address,
                forget=_THROTTLE_FORGET,
                stale_after=_stale_after(per_address, kerberos),
                backoff=backoff,
            )
        )
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.pace = Pace()

    def required(self, reason: str) -> AuthenticationRequired:
        """A 401 that asks for Basic credentials."""
        return AuthenticationRequired(reason, challenge=self.challenge)

    async def login(
        self, credentials: BasicCredentials, client: str, *, directory: Directory | None = None
    ) -> PasswordLogin:
        """The user the credentials prove, from the cache or after asking the KDC; `directory` (the gateway's, passed
        per call: a BasicLogin a reload keeps outlives the directory of the gateway it was made with) is where the
        gateway's own account's UPN is found (`_not_the_gateways_upn`).

        A refusal (401, 429) is answered at the pace of a check of an existing account (`Pace`)."""
        started = time.monotonic()
        try:
            return await self._login(credentials, client, started, directory)
        except (AuthenticationRequired, TooManyAttempts):
            await asyncio.sleep(max(0.0, started + self.pace.floor - time.monotonic()))
            raise

    async def _login(
        self, credentials: BasicCredentials, client: str, started: float, directory: Directory | None
    ) -> PasswordLogin:
        user = self._user(credentials.username)
        key = user_key(asked_name(user))  # the name the KDC is asked about: two UPNs may share a principal
        digest = None
        if self._cache.fresh(key, started):  # the signed-in device, or a guess at its password: one hash decides
            digest = await self._digest(key, credentials.password)
            entry = self._cached(key, digest, user)
            if entry is not None:
                return PasswordLogin(entry.user, entry.ticket, credentials.header, cached=True)
        guesses = guess_key(user.principal)  # `alice@lab.test` (NT-ENTERPRISE), `LAB\\alice`, `álice`: one count
        known = False
        if self._users.wait(guesses, started) > 0 and self._cache.known(key, started):
            digest = await self._known_or_refused(key, guesses, client, credentials.password, digest)
            known = True
        async with self._attempt(guesses, client, known=known) as attempt:  # 429 here, before any hashing
            if digest is None:
                digest = await self._digest(key, credentials.password)
            async with self._lock(key):  # one KDC check per user at a time; the ones waiting may find it cached
                entry = self._cached(key, digest, user)
                if entry is not None:
                    return PasswordLogin(entry.user, entry.ticket, credentials.header, cached=True)
                if known and not self._cache.known(key, time.monotonic(), digest):  # the check waited for refused it
                    raise self._held(key, guesses)
                # a name the KDC takes for the gateway's account: refused, not counted (a held or throttled name costs
                # no directory search: it never gets here)
                await self._not_the_gateways_upn(user, directory)
                refresh_profile()  # krb5.conf edited since: its KDCs named primaries before MIT sends this password
                try:
                    ticket = await _kdc(
                        self._checks, user.realm, login_blocking, user, credentials.password, outcome=attempt
                    )
                except KerberosRefused:  # disabled, locked, expired: said whatever the password, so not a guess
                    self._cache.forget(key)
                    raise
                except AuthenticationRequired as e:  # a wrong password, or no such user
                    attempt.failed = True
                    if not isinstance(e, UserUnknown):
                        self.pace.observe(time.monotonic() - started)
                    self._cache.forget(key, digest)  # only if the KDC refused the very password it had accepted
                    raise AuthenticationRequired(e.reason, hint=e.hint, challenge=self.challenge) from None
                self.pace.observe(time.monotonic() - started)
                self._users.succeeded(guesses)
                self._cache.put(key, digest, user, ticket, time.monotonic(), asked=started)
                return PasswordLogin(user, ticket, credentials.header, cached=False)

    async def authorization(self, login: PasswordLogin, route: Route) -> str:
        """The backend's Authorization: the client's Basic header where the route says so, else Negotiate."""
        if route.backend_auth == "basic":
            return login.header
        token = await _kdc(self._tokens, login.user.realm, token_blocking, login.ticket, route.gss_target, route.spn)
        return "Negotiate " + base64.b64encode(token).decode("ascii")

    def forget(self, login: PasswordLogin) -> None:
        """Drop the verified password of `login`'s user (its directory account may no longer sign in,
        `proxy.held_mapping`): the user's next request is a KDC check, which refuses a disabled account. Every name
        form the KDC signed that account in by goes (`alice@ad.test` as NT-ENTERPRISE and `AD\\alice` are two keys,
        one account), not only the ended request's."""
        self._cache.forget(user_key(asked_name(login.user)))
        self._cache.forget_account(login.ticket.principal)

    def forget_sign_ins(self) -> None:
        """Drop every verified password (a reload drops every cached ticket, these users' own TGTs too): each user's
        next request asks the KDC, which refuses an account disabled since."""
        self._cache.clear()

    def _user(self, username: str) -> UserPrincipal:
        """The principal a Basic user name names; 401 for a name of a domain nobody configured (before anything is
        hashed or asked: `EVIL\\alice` is not alice of the default realm), a name that is not plain, or one longer than
        any directory's (`MAX_USER_NAME`)."""
        if len(username) > MAX_USER_NAME:
            raise AuthenticationRequired(
                f"the user name is longer than {MAX_USER_NAME} characters",
                hint=f"a Basic user name of {len(username)} characters, starting {username[:1]!r}",
                challenge=self.challenge,
            )
        down_level = "\\" in username
        domain = username.rpartition("\\")[0] if down_level else username.rpartition("@")[2] if "@" in username else ""
        if domain and domain_realm(domain, self._identity, down_level=down_level) is None:
            raise AuthenticationRequired(
                "the domain of the user name is not one this gateway signs in to",
                hint=f"Basic user {shown_name(username, self._identity)}: {configured_domains(self._identity)}",
                challenge=self.challenge,
            )
        try:
            user = map_name(username, self._identity, source="basic")
        except IdentityRejected as e:
            _, usable, problem = e.reason.partition(" is not usable: ")  # the reason names the name: not a log's
            shown = shown_name(username, self._identity)
            raise AuthenticationRequired(
                INCORRECT,
                hint=f"Basic user {shown} is not usable: {problem if usable else 'not a plain name'}",
                challenge=self.challenge,
            ) from None
        if user.realm not in self._realms:
            raise AuthenticationRequired(
                INCORRECT,
                hint=f"{shown_name(user.principal)}: realm {user.realm} is not the default realm or in "
                "identity.realm_map",
                challenge=self.challenge,
            )
        if _account_key(user.principal) == self._own:
            raise AuthenticationRequired(
                INCORRECT,
                hint=f"Basic user {username!r} names the gateway's own account (kerberos.principal), which signs in "
                "with its keytab only: not sent to the KDC, where each wrong password would count towards locking out "
                "the account every delegation needs",
                challenge=self.challenge,
            )
        return user

    async def _not_the_gateways_upn(self, user: UserPrincipal, directory: Directory | None) -> None:
        """401, as for `kerberos.principal` itself (`_user`), for a name that is the gateway's own account by its UPN
        (`kcd-gw@corp.example` for `svc-kcdproxy`), which only the directory knows: the KDC resolves it (as an
        NT-ENTERPRISE name, or a UPN of the realm's suffix) to the gateway's account and counts the wrong password
        against it. Asked only for a sign-in the throttles let through to the KDC (not for a cached one, nor a held
        name's guesses). The UPN is the directory's last answer on the gateway's account (`_gateways_upn`): a
        directory that hangs or fails holds no sign-in past one [directory] timeout, and the UPN it last named stays
        refused meanwhile; one that never answered leaves the name to the KDC, as without a [directory]."""
        if directory is None:
            return
        own = await self._gateways_upn(directory)
        if own is None or guess_key(user.enterprise or user.principal) != guess_key(own[0]):
            return
        upn, dn = own
        raise AuthenticationRequired(
            INCORRECT,
            hint=f"Basic user {upn!r} is the UPN of the gateway's own account (kerberos.principal, {dn}), "
            "which signs in with its keytab only: not sent to the KDC, where each wrong password would count towards "
            "locking out the account every delegation needs",
            challenge=self.challenge,
        )

    async def _gateways_upn(self, directory: Directory) -> tuple[str, str] | None:
        """The gateway's account's (UPN, DN) as the directory last named them, None before it named one.

        Theory of operation. One look-up at a time (`_learn_own`; the directory's cache answers it at once while its
        entry is fresh). The sign-in that starts it waits for it up to the directory's `timeout`, and so does every
        sign-in while nothing was ever learnt; a sign-in that finds one in flight takes the last answer. A look-up
        that fails is not asked again for `_OWN_RETRY` seconds. So a directory that hangs costs one sign-in one
        timeout per `_OWN_RETRY`, not each sign-in a look-up of its own (two timeouts per server, the user's KDC turn
        held meanwhile), and the UPN it last named is still refused."""
        lookup, started = self._own_lookup, False
        if (lookup is None or lookup.done()) and time.monotonic() >= self._own_retry:
            lookup = self._own_lookup = asyncio.ensure_future(self._learn_own(directory))
            started = True
        if lookup is not None and not lookup.done() and (started or not self._own_learnt):
            with contextlib.suppress(TimeoutError):  # not 3.11's wait_for: a sign-in cancelled (its client gone) as
                async with asyncio.timeout(directory.timeout):  # the look-up ends went on (docs/hardening.md)
                    await asyncio.shield(lookup)
        return self._own_upn

    async def _learn_own(self, directory: Directory) -> None:
        """Ask the directory for the gateway's account; keep its UPN, or the time to ask again after a failure."""
        try:
            own = await directory.lookup(self._principal)
        except GatewayError:  # unreachable, or the name several accounts': the last answer stands
            self._own_retry = time.monotonic() + _OWN_RETRY
            return
        upn = (own.upn, own.dn) if own is not None and own.upn else None
        if upn != self._own_upn or not self._own_learnt:  # once, and again when it changes: not each sign-in's
            log.info("gateway_upn_learnt", upn=upn[0] if upn else None, dn=upn[1] if upn else None)
        self._own_upn = upn
        self._own_learnt = True

    def _cached(self, key: str, digest: bytes, user: UserPrincipal) -> _Entry | None:
        """The fresh entry `digest` matches, served only to a name equal to the verified one up to ASCII case:
        the key folds case the Unicode way (`straße` and `strasse` share a throttle), which would equate
        names the directory keeps apart."""
        entry = self._cache.get(key, digest, time.monotonic())
        if entry is None or ascii_lower(asked_name(entry.user)) != ascii_lower(asked_name(user)):
            return None
        return entry

    async def _known_or_refused(
        self, key: str, guesses: str, client: str, password: bytes, digest: bytes | None
    ) -> bytes:
        """The digest of a held user's password when it is the one the KDC last accepted (the user's own device goes
        on to the KDC); 429 otherwise, counted against the address: a guess, judged without the KDC."""
        address = address_key(client)
        if digest is not None or self._addresses.wait(address, time.monotonic()) == 0:  # held: no hashing
            digest = digest or await self._digest(key, password)
            if self._cache.known(key, time.monotonic(), digest):
                return digest
            self._addresses.failed(address, time.monotonic())
        raise self._held(key, guesses)

    def _held(self, key: str, guesses: str) -> TooManyAttempts:
        """The 429 of a held user whose password is not the one the KDC last accepted (or no longer is: a device
        let past the hold with it, waiting for another check of the user that the KDC refused, never reaches it)."""
        wait = self._users.wait(guesses, time.monotonic())
        return TooManyAttempts(
            "too many failed sign-ins; wait and try again",
            hint=f"{shown_name(key)} is held after basic_failures_per_user wrong passwords, so that the directory's "
            f"lockout threshold is not reached, for {wait:.0f} s more (basic_failure_window_seconds); only the "
            "password the KDC last accepted goes on to it",
            challenge={"Retry-After": str(max(1, round(wait)))},
        )

    async def _digest(self, key: str, password: bytes) -> bytes:
        return await asyncio.to_thread(self._cache.digest, key, password)

    @asynccontextmanager
    async def _attempt(self, key: str, client: str, *, known: bool = False) -> AsyncIterator[_Attempt]:
        """Admit an attempt that may reach the KDC, counting it against the user and the address until it
        ends; refuse it (429) when either key has no attempt left (`known`: the user's own last accepted
        password, which passes a held user). Nothing is awaited between the check and the count, so
        concurrent attempts see each other."""
        now = time.monotonic()
        client = address_key(client)
        # Each key's check and count are one step: with workers, their tables are shared (proxy.auth.shared)
        wait = self._addresses.admit(client, now)
        if wait > 0:  # refused by the address; the user's wait only lengthens Retry-After
            wait = max(wait, 0.0 if known else self._users.wait(key, now))
        else:
            wait = self._users.admit(key, now, force=known)
            if wait > 0:  # refused by the user: the address's attempt never started
                self._addresses.end(client, now, failed=False)
        if wait > 0:
            raise TooManyAttempts(
                "too many failed sign-ins; wait and try again",
                hint=f"failed logins for {shown_name(key)} or from {client} are throttled for {wait:.0f} s more",
                challenge={"Retry-After": str(max(1, round(wait)))},
            )
        attempt = _Attempt()

        def end(failed: bool) -> None:
            now = time.monotonic()
            self._users.end(key, now, failed=failed)
            self._addresses.end(client, now, failed=failed)

        try:
            yield attempt
        finally:
            if attempt.running:  # its password check goes on in MIT, whose answer the KDC counts: so does this
                attempt.end = end
            else:
                end(attempt.failed)

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def take_over(self, old: BasicLogin) -> None:
        """After a reload that rebuilt Basic (its settings changed): the users' and addresses' counts and the passwords
        the KDC last accepted go on here, under the new limits. Started afresh, a reload gave every guesser a new
        allowance of `basic_failures_per_user` guesses towards the directory's lockout. With workers they are in
        their shared table already."""
        if isinstance(self._users, Throttle) and isinstance(old._users, Throttle):
            self._users = old._users.retuned(self._users)
        if isinstance(self._addresses, Throttle) and isinstance(old._addresses, Throttle):
            self._addresses = old._addresses.retuned(self._addresses)
        self._cache.keep_known_of(old._cache)

    def close(self) -> None:
        """Start no more KDC calls (the gateway is closing); one still inside MIT finishes on its own."""
        self._checks.close()
        self._tokens.close()


@dataclass
class _Attempt:
    """One attempt that may reach the KDC; an `Outcome` of its password check (`KdcThreads.run`): a check its
    caller stopped waiting for (kdc_timeout, or the device hung up) still reaches the KDC, which counts a wrong
    password towards the account's lockout, so the attempt counts as in flight until the check returns, and as
    failed if it failed. Ended at once, anyone could send an account any number of wrong passwords by hanging up."""

    failed: bool = False  # set when the KDC said wrong password or no such user
    running: bool = False  # its check runs on in its thread, its caller gone
    end: Callable[[bool], None] | None = None  # how the attempt ends once that check returns (whether it failed)

    def abandoned(self) -> None:
        self.running = True

    def returned(self, future: Future[Any]) -> None:
        self.running = False
        error = None if future.cancelled() else future.exception()
        self.failed = self.failed or isinstance(error, AuthenticationRequired)
        if self.end is not None:
            end, self.end = self.end, None
            end(self.failed)


async def _kdc(
    threads: KdcThreads, realm: str, call: Callable[..., T], *args: object, outcome: Outcome | None = None
) -> T:
    """`call(*args)` in one of `threads`: 503 at kdc_timeout, or at once when no thread is to be had."""
    try:
        return await threads.run(call, *args, outcome=outcome)
    except TimeoutError:
        raise _unreachable(threads.timeout) from None
    except NoThread as e:
        raise no_thread_error(e, threads, realm, "Basic's KDC calls") from None


def _stale_after(limit: int, kerberos: Kerberos) -> float:
    """When a user's attempts still counted in flight are taken to be those of a worker that died: the longest a
    worker's attempts of one user take, one KDC check at a time (`BasicLogin._lock`), and a margin."""
    return limit * kerberos.kdc_timeout + 30.0


def _unreachable(timeout: float) -> GatewayError:
    return explain(f"cannot contact any KDC within {timeout:g} s", user="-", spn="-", proxy="the gateway")
