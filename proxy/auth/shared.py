"""The Basic per-user and per-address throttles shared by the worker processes of one gateway.

Theory of operation. With `listener.workers = N` the kernel spreads a client's connections over N processes
(SO_REUSEPORT), and each used to count wrong passwords on its own: a guesser opening many connections had N times
`basic_failures_per_user` guesses at the KDC per window, enough to reach the directory's lockout threshold the
per-user hold is sized against (docs/throttles-and-limits.md). So the supervisor makes one `SharedTable` before it
forks: a memory file (`memfd_create`) mapped shared into every worker, a replacement worker included, so a held
user stays held when the worker that held it dies, and across reloads. Each worker reads and writes it through a
`SharedThrottle`, which keeps the in-process `Throttle`'s rules (a held user, attempts in flight).

The table is a fixed array: `SLOTS_PER_BUCKET` slots per bucket, each key with two buckets chosen by a keyed hash of
the user key (BLAKE2b with a random key the supervisor picks: nobody outside can aim names at one bucket). A slot keeps
the key's hash, its failures, the time of the last one, how long it is refused, its attempts in flight and when it
was last counted. Bounded like the in-process throttle (100,000 keys by default, 64 bytes each): a new key takes a
free slot of the emptier of its buckets, else, of the slots of either that are neither refused nor have attempts in
flight, the one with the fewest failures in the window, the least recently counted among equals (a flood of names
failing once cannot evict a user's failures short of her hold). A key whose every slot is held or busy is not taken
in, and that key is refused (429) rather than a held user's key released: a flood of other names never frees a held
user. Two buckets, not one, so that a sprayer's held names fill the table evenly: with one, the fullest buckets
refused users who never failed while most of the table was free (`tests/unit/test_shared_throttle.py`).

Check and count are one step (`admit`), under a POSIX record lock on the memory file (`lockf`), so two workers
cannot both see the last attempt free; the lock is the kernel's and goes with a process that dies holding it. An
attempt in flight in a worker that dies is never ended; its count lapses `stale_after` seconds after the key's last
admitted attempt (a check is bounded by the KDC timeout), so the user is not refused for ever.

The table also keeps, per user, the password the KDC last accepted (its salted scrypt digest, with one salt for every
worker, `CredentialCache.known`): what lets a held user's own device through, on whichever worker its connection
lands. The cache of fresh sign-ins and the refusal pace stay per worker (docs/throttles-and-limits.md).

The address throttle is shared too, in a table of its own (`SharedTable.addresses`: its slots and lock apart, so a
flood of addresses cannot take the users' places), through a `SharedThrottle` with a `backoff` instead of a hold: per
worker, an address spread over N workers had N x `basic_failures_per_address` guesses and N back-offs. A refused
address may be evicted for a new one (the in-process throttle's rule: an address's count is no directory's lockout).

And it keeps the log of users whose delegated tickets a worker dropped (`forget_users`: the directory ended a held
request of theirs, their certificate was revoked), so that every other worker drops its own before it serves
another request from them (`proxy.kerberos.delegate.Delegator`): a generation counter, which a worker reads on the
request path without the lock (a changed value sends it to `forgotten_since`, under the lock), and the last
`FORGOTTEN_SLOTS` entries, each holding as many users as fit (`_packed`). A worker further behind than that, or an
entry for a user whose names do not fit one, drops every ticket it holds: never a user kept. A worker writes the
users it forgets in one turn of its event loop together; a directory sweep, whose users are ended one look-up apart,
writes those it ends together within `packing_forgotten` (at the sweep's end, or `PACK_FOR` seconds after the first).

And the keytab key the KDC refused (`refused_key`): by the keytab's path and file version, so that a stale keytab
(the gateway's account password reset) is offered by one worker once, not by each: every offer is a bad password
against the gateway's account in AD (`proxy.kerberos.delegate.Delegator._acquire_service`).

And the CRL floors: per CRL issuer, signing key and scope (`proxy.certs.sources`), the highest (CRL number,
thisUpdate) a worker took, so that a worker replacing one that died, whose CRL store starts empty, refuses a CRL older
than one its siblings held (a replayed CRL would serve a certificate revoked since). `CRL_FLOORS` slots; when all are
taken, the one with the oldest thisUpdate goes. With `client_certificates.crl_state` they are kept in that file too
(`proxy.certs.floors`: read into the table as each worker is built, written whole by the worker that raised one).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

_SLOT = struct.Struct("<16sIIdddd")  # key hash, failures, in flight, last failure, refused until, busy until, used
SLOT_BYTES = 64  # _SLOT.size (56) rounded up
SLOTS_PER_BUCKET = 8
_EMPTY = bytes(16)
_RETRY = 1.0  # seconds: Retry-After of a key with every attempt in flight, or with no slot it may take
_KNOWN = struct.Struct("<16s32sd")  # key hash, the scrypt digest of the password the KDC last accepted, until when
FORGOTTEN_SLOTS = 256  # the users the log of forgotten tickets keeps (`forget_users`)
PACK_FOR = 1.0  # seconds: the longest `packing_forgotten` keeps a forgotten user from the log
_FORGOTTEN_BYTES = 1024  # one entry: its length, then its names as JSON
_GENERATION = struct.Struct("<Q")  # how many entries were ever written
_LENGTH = struct.Struct("<I")
_KEYTAB = b"refused-keytab"  # `refused_key`'s kind
_EVERYONE = 0xFFFFFFFF  # an entry's length when its names did not fit: every ticket goes

CRL_FLOORS = 256  # issuer x key x scope floors kept (`raise_crl_floor`)
_FLOOR = struct.Struct("<16s21sd")  # the scope's hash, its CRL number + 1 (big-endian: up to 20 octets), thisUpdate
# The highest CRL number a floor records: a longer one (past RFC 5280's 20 octets, which only a CA's own numbering
# makes) is recorded as this, so a replay below it is still refused, one between it and the CRL's own is not.
_FLOOR_MAX = 2 ** (8 * 21) - 2

ForgottenUser = tuple[str, str | None]  # (principal, NT-ENTERPRISE name): `Delegator.forget`'s arguments


@dataclass
class _Slot:
    key: bytes = _EMPTY  # the key's keyed hash; all zeros: a free slot
    count: int = 0  # failures
    in_flight: int = 0  # attempts admitted and not yet ended
    last: float = 0.0  # the last failure
    blocked_until: float = 0.0
    busy_until: float = 0.0  # in_flight counts until then (a dead worker's attempts lapse)
    used: float = 0.0  # last counted, for eviction


class SharedTable:
    """Shared memory for per-user throttle state, made once before the workers fork (module docstring)."""

    def __init__(self, max_keys: int = 100_000, max_known: int = 10_000, *, addresses: bool = True) -> None:
        """`addresses`: with a table of its own for the address throttle (`addresses`), as the command line makes it."""
        self.buckets = max(1, -(-max_keys // SLOTS_PER_BUCKET))
        self._known_buckets = max(1, -(-max_known // SLOTS_PER_BUCKET))
        self._known_at = self.buckets * SLOTS_PER_BUCKET * SLOT_BYTES  # the known passwords follow the slots
        self._log_at = self._known_at + self._known_buckets * SLOTS_PER_BUCKET * SLOT_BYTES  # forgotten tickets
        self._floors_at = self._log_at + SLOT_BYTES + FORGOTTEN_SLOTS * _FORGOTTEN_BYTES
        size = self._floors_at + CRL_FLOORS * SLOT_BYTES
        self._fd = os.memfd_create("kcd-proxy-basic-throttle", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)  # MAP_SHARED: forked workers see one memory
        # made before the workers fork, by a supervisor that never takes it: each worker's copy starts free
        self._threads = threading.Lock()
        self._secret = os.urandom(16)
        self.salt = os.urandom(16)  # the credential cache's, one for every worker: a digest means the same in each
        # The address throttle's counts: slots of their own (and a lock), so that a flood of addresses cannot take the
        # users' places, nor the users' the addresses'. Its other regions are left at their least.
        self.addresses = SharedTable(max_keys, 1, addresses=False) if addresses else None

    @property
    def capacity(self) -> int:
        return self.buckets * SLOTS_PER_BUCKET

    def digest(self, key: str, *, kind: bytes = b"") -> bytes:
        """The key's keyed hash; `kind` (b"account", b"forgotten": `CredentialCache`) a namespace of its own, where no
        user key's hash can equal it whatever its name."""
        return hashlib.blake2b(key.encode(), key=self._secret, digest_size=16, person=kind).digest()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access among processes (a record lock: per process, released if it dies) and among this process's
        threads (`_threads`): a record lock is the process's, so a thread (a CRL vetting thread's floor look-up, the
        floors' save) went in while the event loop's thread was inside, and its unlock as it left let every other
        worker in too."""
        with self._threads:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def read(self, index: int) -> _Slot:
        return _Slot(*_SLOT.unpack_from(self._map, index * SLOT_BYTES))

    def key(self, index: int) -> bytes:
        """The key hash of slot `index` alone (a look-up compares it with each slot of two buckets)."""
        at = index * SLOT_BYTES
        return self._map[at : at + len(_EMPTY)]

    def write(self, index: int, slot: _Slot) -> None:
        # the fields named, not dataclasses.astuple: it deep-copies each field, half of an admit's time (80 us)
        fields = (slot.key, slot.count, slot.in_flight, slot.last, slot.blocked_until, slot.busy_until, slot.used)
        _SLOT.pack_into(self._map, index * SLOT_BYTES, *fields)

    def clear(self, index: int) -> None:
        self._map[index * SLOT_BYTES : (index + 1) * SLOT_BYTES] = bytes(SLOT_BYTES)

    def buckets_of(self, digest: bytes) -> list[range]:
        """The key's two buckets (one, twice the same, in a table of one): each half of the keyed hash picks one."""
        first, second = (int.from_bytes(half, "little") % self.buckets for half in (digest[:8], digest[8:]))
        return [range(b * SLOTS_PER_BUCKET, (b + 1) * SLOTS_PER_BUCKET) for b in dict.fromkeys((first, second))]

    # The password the KDC last accepted for a user (`CredentialCache.known`), kept for the failure window: what lets
    # a held user's own device through, whichever worker its connection lands on. At most `max_known` users, the
    # one kept longest out first (as the in-process LRU of puts).

    def known(self, key: str, now: float, digest: bytes | None = None, *, kind: bytes = b"") -> bool:
        """Whether `key` has an accepted password until after `now` (with `digest`: this one). `kind`: `digest`'s."""
        return now < self.until(key, digest, kind=kind)

    def until(self, key: str, digest: bytes | None = None, *, kind: bytes = b"") -> float:
        """Until when `key` has an accepted password (with `digest`: this one); -inf if it has none."""
        hashed = self.digest(key, kind=kind)
        with self.locked():
            for offset in self._known_bucket(hashed):
                stored, accepted, until = _KNOWN.unpack_from(self._map, offset)
                if stored == hashed:
                    return float(until) if digest is None or hmac.compare_digest(accepted, digest) else -math.inf
        return -math.inf

    def keep_known(self, key: str, digest: bytes, until: float, *, kind: bytes = b"") -> None:
        hashed = self.digest(key, kind=kind)
        with self.locked():
            bucket = self._known_bucket(hashed)
            place = next((o for o in bucket if _KNOWN.unpack_from(self._map, o)[0] in (hashed, _EMPTY)), None)
            if place is None:
                place = min(bucket, key=lambda o: float(_KNOWN.unpack_from(self._map, o)[2]))
            _KNOWN.pack_into(self._map, place, hashed, digest, until)

    def forget_known(self, key: str, digest: bytes | None = None, *, kind: bytes = b"") -> None:
        """Drop `key`'s accepted password; with `digest`, only if it is that one (the KDC refused it)."""
        hashed = self.digest(key, kind=kind)
        with self.locked():
            for offset in self._known_bucket(hashed):
                stored, accepted, _ = _KNOWN.unpack_from(self._map, offset)
                if stored == hashed and (digest is None or hmac.compare_digest(accepted, digest)):
                    self._map[offset : offset + SLOT_BYTES] = bytes(SLOT_BYTES)

    # The gateway's keytab key the KDC refused (`proxy.kerberos.delegate.Delegator`), by the keytab's path and file
    # version: one worker's refusal keeps the others from offering the same key, each offer a bad password against
    # the gateway's account in AD. Kept among the known passwords, under a kind of its own, until the file changes.

    def refused_key(self, keytab: str, principal: str, version: bytes) -> int | None:
        """The KDC's words (`proxy.kerberos.keytab.refusal_words`) for `principal`'s key in the keytab at `keytab` in
        its file version `version` (16 bytes), when a worker offered it and it was refused; None if none was. By the
        principal too: a reload naming another principal of the same file offers that one's key (it was refused from
        memory, never offered, until the file changed)."""
        hashed = self.digest(_refused_name(keytab, principal), kind=_KEYTAB)
        with self.locked():
            for offset in self._known_bucket(hashed):
                stored, kept, _ = _KNOWN.unpack_from(self._map, offset)
                if stored == hashed and kept[:16] == version:
                    return int(kept[16])
        return None

    def keep_refused_key(self, keytab: str, principal: str, version: bytes, words: int) -> None:
        self.keep_known(_refused_name(keytab, principal), version + bytes([words]) + bytes(15), math.inf, kind=_KEYTAB)

    # The users whose delegated tickets a worker dropped, for the others to drop theirs (module docstring).

    def generation(self) -> int:
        """How many entries `forget_users` ever wrote: read without the lock (the request path compares it with the
        last it caught up with; a torn read can only differ from it, and sends the worker to `forgotten_since`)."""
        return int(_GENERATION.unpack_from(self._map, self._log_at)[0])

    def forget_users(self, users: list[ForgottenUser]) -> tuple[int, int]:
        """Tell every worker to drop these users' tickets, in as few entries as their names fit (`_packed`); returns
        the generation before and after them. More entries than the log keeps are written as one that drops every
        ticket, as a reader that far behind would."""
        entries = _packed(users)
        if len(entries) > FORGOTTEN_SLOTS:
            entries = [None]
        with self.locked():
            before = generation = self.generation()
            for payload in entries:
                offset = self._log_slot(generation)
                if payload is None:
                    _LENGTH.pack_into(self._map, offset, _EVERYONE)
                else:
                    _LENGTH.pack_into(self._map, offset, len(payload))
                    start = offset + _LENGTH.size
                    self._map[start : start + len(payload)] = payload
                generation += 1
            _GENERATION.pack_into(self._map, self._log_at, generation)  # after the entries: read under the lock
            return before, generation

    def forgotten_since(self, seen: int) -> tuple[int, list[ForgottenUser] | None]:
        """The generation now, and the users forgotten after generation `seen`; None: every user (`seen` is more
        than FORGOTTEN_SLOTS behind, or an entry did not fit its slot)."""
        with self.locked():
            generation = self.generation()
            if not 0 <= generation - seen <= FORGOTTEN_SLOTS:
                return generation, None
            users: list[ForgottenUser] = []
            for at in range(seen, generation):
                offset = self._log_slot(at)
                (length,) = _LENGTH.unpack_from(self._map, offset)
                if length == _EVERYONE:
                    return generation, None
                start = offset + _LENGTH.size
                entry = json.loads(self._map[start : start + length].decode("utf-8", "surrogatepass"))
                users += [(str(principal), None if e is None else str(e)) for principal, e in entry]
            return generation, users

    # The CRL floors (module docstring): `scope` is `proxy.certs.sources.floor_scope`'s hash of issuer, key and scope.

    def crl_floor(self, scope: bytes) -> tuple[int, float] | None:
        """The highest (CRL number, thisUpdate as POSIX time) a worker took for `scope`; None if none did (a CRL
        without a number counts as number -1)."""
        with self.locked():
            for offset in self._floor_slots():
                stored, number, this_update = _FLOOR.unpack_from(self._map, offset)
                if stored == scope:
                    return int.from_bytes(number, "big") - 1, float(this_update)
        return None

    def crl_floors(self) -> dict[bytes, tuple[int, float]]:
        """Every floor held (`proxy.certs.floors` writes them to `client_certificates.crl_state`)."""
        with self.locked():
            floors = {}
            for offset in self._floor_slots():
                stored, number, this_update = _FLOOR.unpack_from(self._map, offset)
                if stored != _EMPTY:
                    floors[bytes(stored)] = (int.from_bytes(number, "big") - 1, float(this_update))
            return floors

    def raise_crl_floor(self, scope: bytes, number: int, this_update: float) -> bool:
        """A worker took this CRL: `scope`'s floor is at least (number, this_update) from now on; whether that
        raised it."""
        with self.locked():
            held: dict[bytes, int] = {}  # scope -> its slot's offset
            oldest: tuple[float, int] | None = None  # (thisUpdate, offset) of the scope heard of longest ago
            for offset in self._floor_slots():
                stored, floor, at = _FLOOR.unpack_from(self._map, offset)
                if stored == scope and (min(number, _FLOOR_MAX), this_update) <= (int.from_bytes(floor, "big") - 1, at):
                    return False
                held.setdefault(stored, offset)
                if oldest is None or at < oldest[0]:
                    oldest = (float(at), offset)
            assert oldest is not None
            place = held.get(scope, held.get(_EMPTY, oldest[1]))  # its own slot, a free one, else the oldest
            stored_number = min(number, _FLOOR_MAX) + 1
            _FLOOR.pack_into(self._map, place, scope, stored_number.to_bytes(21, "big"), this_update)
            return True

    def _floor_slots(self) -> range:
        return range(self._floors_at, self._floors_at + CRL_FLOORS * SLOT_BYTES, SLOT_BYTES)

    def _log_slot(self, generation: int) -> int:
        return self._log_at + SLOT_BYTES + generation % FORGOTTEN_SLOTS * _FORGOTTEN_BYTES

    def _known_bucket(self, hashed: bytes) -> range:
        first = int.from_bytes(hashed[8:], "little") % self._known_buckets * SLOTS_PER_BUCKET
        start = self._known_at + first * SLOT_BYTES
        return range(start, start + SLOTS_PER_BUCKET * SLOT_BYTES, SLOT_BYTES)


class SharedThrottle:
    """`proxy.auth.basic.Throttle`, its state in a `SharedTable`: wrong passwords of a user (`hold`, the default) or
    from an address counted across every worker. `stale_after`: seconds after a key's last admitted attempt when
    attempts still counted in flight are taken to be a dead worker's. `backoff`: instead of a hold, how long a key is
    refused once it has `limit` + n failures (n = 0, 1, ...: `proxy.auth.basic.backoff`); a refused key may then be
    evicted for a new one, as the in-process throttle evicts one (an address's count is no directory's lockout)."""

    def __init__(
        self,
        table: SharedTable,
        limit: int,
        *,
        forget: float,
        stale_after: float,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        self._table = table
        self._limit = limit
        self._forget = forget
        self._stale = stale_after
        self._backoff = backoff

    def wait(self, key: str, now: float) -> float:
        """Seconds `key` must still wait before its next attempt may start (0: go ahead)."""
        with self._table.locked():
            index = self._find(self._table.digest(key))
            return 0.0 if index is None else self._wait(self._table.read(index), now)

    def admit(self, key: str, now: float, *, force: bool = False) -> float:
        """Check and count in one step: 0 and the attempt is in flight, or the seconds to wait (nothing counted).
        `force`: counted whatever the wait (a held user's own last accepted password)."""
        digest = self._table.digest(key)
        with self._table.locked():
            index = self._slot_of(digest, now)
            if index is None:
                return 0.0 if force else _RETRY
            slot = self._fresh(self._table.read(index), now)
            wait = 0.0 if force else self._wait(slot, now)
            if wait == 0:
                slot.in_flight = self._in_flight(slot, now) + 1
                slot.busy_until = now + self._stale
                slot.used = now
                self._table.write(index, slot)
            return wait

    def end(self, key: str, now: float, *, failed: bool) -> None:
        """The attempt `admit` counted is over; `failed`: it was a wrong password or an unknown user."""
        digest = self._table.digest(key)
        with self._table.locked():
            index = self._slot_of(digest, now, place=failed)
            if index is None:
                return
            slot = self._fresh(self._table.read(index), now)
            slot.in_flight = max(0, self._in_flight(slot, now) - 1)
            if failed:
                self._count(slot, now)
            elif slot.in_flight == 0 and slot.count == 0:
                self._table.clear(index)
                return
            self._table.write(index, slot)

    def failed(self, key: str, now: float) -> None:
        """A failure of `key` with no attempt in flight (a guess judged without the KDC)."""
        digest = self._table.digest(key)
        with self._table.locked():
            index = self._slot_of(digest, now)
            if index is None:
                return
            slot = self._fresh(self._table.read(index), now)
            self._count(slot, now)
            self._table.write(index, slot)

    def _count(self, slot: _Slot, now: float) -> None:
        slot.count += 1
        slot.last = slot.used = now
        if slot.count >= self._limit:
            over = slot.count - self._limit
            slot.blocked_until = now + (self._forget if self._backoff is None else self._backoff(over))

    def succeeded(self, key: str) -> None:
        with self._table.locked():
            index = self._find(self._table.digest(key))
            if index is not None:
                slot = self._table.read(index)
                slot.count, slot.blocked_until = 0, 0.0
                self._table.write(index, slot)

    def _wait(self, slot: _Slot, now: float) -> float:
        if slot.blocked_until > now:
            return slot.blocked_until - now
        count = slot.count if now - slot.last <= self._forget else 0
        return 0.0 if self._in_flight(slot, now) < max(1, self._limit - count) else _RETRY

    def _fresh(self, slot: _Slot, now: float) -> _Slot:
        """The slot with failures older than the forget time started afresh (as the in-process throttle does)."""
        if slot.count and now - slot.last > self._forget:
            slot.count, slot.blocked_until = 0, 0.0
        return slot

    @staticmethod
    def _in_flight(slot: _Slot, now: float) -> int:
        return slot.in_flight if slot.busy_until > now else 0

    def _find(self, digest: bytes) -> int | None:
        for bucket in self._table.buckets_of(digest):
            for index in bucket:
                if self._table.key(index) == digest:
                    return index
        return None

    def _slot_of(self, digest: bytes, now: float, *, place: bool = True) -> int | None:
        """The slot of `digest`, else (`place`) a new one for it; None if it has none and gets none."""
        index = self._find(digest)
        return self._place(digest, now) if index is None and place else index

    def _place(self, digest: bytes, now: float) -> int | None:
        """A slot for a new key: a free one in the emptier of its two buckets, else the least recently used of both
        that is neither refused nor busy. Two choices keep the buckets even: with one, a bucket filled with held
        names long before the table did (at 50 % held, 4 % of new keys found theirs full; now none below 70 %)."""
        buckets = self._table.buckets_of(digest)
        victim, most_free = None, 0
        for bucket in buckets:
            free = [index for index in bucket if self._table.key(index) == _EMPTY]
            if len(free) > most_free:
                victim, most_free = free[0], len(free)
        if victim is None:
            victim = self._evictable(buckets, now)
        if victim is None:
            return None
        self._table.write(victim, _Slot(key=digest, used=now))
        return victim

    def _evictable(self, buckets: list[range], now: float) -> int | None:
        """The slot of `buckets` with the fewest failures in the window, the least recently counted among equals, that
        is neither refused nor busy (None: every one is); with a `backoff` (no hold), else the least recently counted
        refused one that is not busy. Fewest failures first: least recently counted alone, a flood of names failing
        once each (unknown users, from many addresses) evicted a user's failures short of her hold, and her guesser
        had a fresh allowance towards the directory's lockout for every table's worth of names; now it takes as many
        failures of every name in the table as she has."""
        victim, lowest = None, (math.inf, math.inf)
        refused, refused_oldest = None, math.inf
        for index in (index for bucket in buckets for index in bucket):
            slot = self._table.read(index)
            if self._in_flight(slot, now) > 0:
                continue
            if slot.blocked_until <= now:
                rank = (slot.count if now - slot.last <= self._forget else 0, slot.used)
                if rank < lowest:
                    victim, lowest = index, rank
            elif slot.used < refused_oldest:
                refused, refused_oldest = index, slot.used
        return victim if victim is not None or self._backoff is None else refused


def _packed(users: list[ForgottenUser]) -> list[bytes | None]:
    """`users` (each once) as the payloads of log entries, each a JSON list within one entry; UTF-8, not JSON's \\u
    escapes (a non-ASCII name took six bytes a character). None: an entry for a user whose names alone do not fit,
    which drops every ticket. One entry per user would let one CRL change or one directory sweep that ends a few
    hundred held requests put every worker past the log, and every worker drop every user's tickets."""
    room = _FORGOTTEN_BYTES - _LENGTH.size - 2  # the list's brackets
    entries: list[bytes | None] = []
    batch: list[bytes] = []
    size = 0
    for user in dict.fromkeys(users):
        piece = json.dumps(list(user), ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        if batch and size + 1 + len(piece) <= room:
            batch.append(piece)
            size += 1 + len(piece)
            continue
        if batch:
            entries.append(b"[" + b",".join(batch) + b"]")
        batch, size = [piece], len(piece)
        if size > room:
            entries.append(None)
            batch, size = [], 0
    if batch:
        entries.append(b"[" + b",".join(batch) + b"]")
    return entries


class _Packing:
    """The writes to the log of forgotten tickets put off by `packing_forgotten` (each worker's `Delegator._tell`)."""

    def __init__(self) -> None:
        self.writes: dict[Callable[[], None], None] = {}
        self.since = 0.0  # when the first of them was put off (monotonic)
        self.open = True  # False once the block ended (a task started within it inherits it: it writes at once)

    def write(self) -> None:
        writes, self.writes = list(self.writes), {}
        for write in writes:
            write()


_PACKING: ContextVar[_Packing | None] = ContextVar("kcd_packing_forgotten", default=None)


@contextmanager
def packing_forgotten() -> Iterator[None]:
    """Within it (a task's code, to its awaits), the users forgotten everywhere are written into the shared log
    together: at its end, or once `PACK_FOR` seconds passed since the first was put off, whichever comes first.
    For a directory sweep, which ends each user's held requests after that user's own look-up: each write on the loop's
    next turn would make an entry per user, and a mass disable (a few hundred users) would put every other worker past
    the log, and every worker would drop every user's tickets (a KDC storm). `PACK_FOR` bounds how long the other
    workers may serve a user from a ticket this worker dropped."""
    packing = _Packing()
    token = _PACKING.set(packing)
    try:
        yield
    finally:
        _PACKING.reset(token)
        packing.open = False
        packing.write()


def put_off(write: Callable[[], None]) -> bool:
    """Within `packing_forgotten`, keep `write` (a log write, called once however often it is put off) for the
    block's end and return True (`write` now if the first write put off waited `PACK_FOR` seconds); outside, False."""
    packing = _PACKING.get()
    if packing is None or not packing.open:
        return False
    now = time.monotonic()
    if not packing.writes:
        packing.since = now
    packing.writes[write] = None
    if now - packing.since >= PACK_FOR:
        packing.write()
    return True


def _refused_name(keytab: str, principal: str) -> str:
    """`refused_key`'s name for a principal's key in a keytab: NUL, in no path, between them."""
    return f"{keytab}\0{principal}"
