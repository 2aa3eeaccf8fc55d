"""The CRL replay floor, and the file that keeps it across restarts (`client_certificates.crl_state`).

Theory of operation. A floor is, per scope (a CRL's issuer, the key that verified it and its partition:
`proxy.certs.sources.floor_scope`), the highest (CRL number, thisUpdate) the gateway took; a CRL below it is a replay
and is refused (`proxy.certs.sources`). The floors live in a `FloorTable`: the workers' shared memory
(`proxy.auth.shared.SharedTable`), or `LocalFloors` in a gateway of one process. Memory ends with the process: an
attacker who answers for a distribution point's plain-HTTP URL could replay last week's CRL (still before its
nextUpdate) to a gateway just restarted, and a certificate revoked since was served again until the next real CRL.

With `crl_state` set, `PersistedFloors` keeps the table's floors in that file too:
- read when the gateway is built (start, reload, a replacement worker), before its first CRL is taken: its floors
  raise the table's (they only ever rise). A missing file is a fresh floor (the first start); a file that cannot be
  read, is not a regular file (a link is never followed: O_NOFOLLOW), is writable by others or does not parse is a
  start-up error naming the key, never an empty floor: an empty floor is the hole the file closes, and the file is
  only ever replaced whole, so a damaged one was damaged by something else. The operator's way out is to remove it.
- written whenever this process raised a floor, before the new CRLs are swapped in, and once when a serving gateway
  is built: the whole table, into a new file (O_EXCL | O_NOFOLLOW, mode 0600) beside it that is fsync'ed and renamed
  over it, then the directory fsync'ed. Writers (the workers, a reload beside its predecessor) take an exclusive
  flock on a lock file beside it (`.<name>.lock`, 0600: no other user can hold it) and read the table inside it,
  raised first to the floors the file holds (another writer's with a table of its own: a second gateway on the same
  file, one a reload left running), so the last file written holds every floor raised before it.
- where it is written: a directory no other user may write or owns (not writable by group or others, the gateway's
  user's or root's), checked on the directory opened for each write; and a lock file no other user may open. In a
  directory others could write (a /tmp), they could plant the lock file and hold it, or the state file, or the
  temporary one: such a write is refused (at start, a configuration error). A writer waits `LOCK_WAIT_SECONDS` at most
  for the lock (a write takes milliseconds; a writer that stopped holding it would otherwise hold back the CRL refresh
  behind it, and every revocation with it), then the write fails as a full disk's does.
  A write that fails (a full disk) is logged (`crl_state_write_failed`) and tried again at the next rise; the CRL is
  taken all the same: refusing a newer CRL for want of a disk would un-revoke certificates, the opposite of the aim.
- what it holds: per scope, the issuer's name (for the operator), the CRL number and thisUpdate. No CRL, no key,
  nothing secret. `kcd-proxy check-config` and `explain` read it and never write it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from proxy.auth.shared import CRL_FLOORS

log = structlog.get_logger("proxy.crl")
FORMAT = 1  # the file's "format"; another one is refused, not guessed at
MAX_STATE_BYTES = 1024 * 1024  # CRL_FLOORS floors are about 50 KiB
KEY = "client_certificates.crl_state"
LOCK_WAIT_SECONDS = 5.0  # the longest a writer waits for another's lock (module docstring)
_LOCK_POLL_SECONDS = 0.01


class FloorTable(Protocol):
    """Where a gateway's floors are kept in memory: `LocalFloors`, or the workers' `SharedTable`."""

    def crl_floor(self, scope: bytes) -> tuple[int, float] | None:
        """The highest (CRL number, thisUpdate as POSIX time) taken for `scope`; None if none was."""

    def raise_crl_floor(self, scope: bytes, number: int, this_update: float) -> bool:
        """`scope`'s floor is at least (number, this_update) from now on; whether that raised it."""

    def crl_floors(self) -> dict[bytes, tuple[int, float]]:
        """Every floor held."""


class LocalFloors:
    """The floors of a gateway of one process: `SharedTable`'s rules (CRL_FLOORS scopes, the one with the oldest
    thisUpdate out first) in a dictionary."""

    def __init__(self) -> None:
        self._floors: dict[bytes, tuple[int, float]] = {}
        # The event loop raises floors as it takes CRLs, and `PersistedFloors.save` raises them to the file's from a
        # thread: a raise is a look then a write, and two at once lowered a floor one of them had just raised.
        self._lock = threading.Lock()

    def crl_floor(self, scope: bytes) -> tuple[int, float] | None:
        return self._floors.get(scope)

    def raise_crl_floor(self, scope: bytes, number: int, this_update: float) -> bool:
        with self._lock:
            held = self._floors.get(scope)
            if held is not None and (number, this_update) <= held:
                return False
            if held is None and len(self._floors) >= CRL_FLOORS:
                del self._floors[min(self._floors, key=lambda s: self._floors[s][1])]
            self._floors[scope] = (number, this_update)
            return True

    def crl_floors(self) -> dict[bytes, tuple[int, float]]:
        with self._lock:
            return dict(self._floors)


@dataclass(frozen=True)
class Floor:
    """One floor as the file keeps it."""

    scope: bytes
    number: int  # -1: the CRL had no number
    this_update: float  # POSIX time
    issuer: str | None = None  # RFC 4514, for the operator; None where this process never saw the CRL


class CrlStateError(ValueError):
    """The state file cannot be used: the message names the file and what to do."""


def read_state(path: Path) -> dict[bytes, Floor]:
    """The floors in the state file at `path`; none if there is no file yet; CrlStateError if it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CrlStateError(_unreadable(path, e)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CrlStateError(f"{path} is not a regular file; remove it (the gateway writes a new one)")
        if st.st_mode & 0o022:
            mode = stat.S_IMODE(st.st_mode)
            raise CrlStateError(
                f"{path} is writable by others (mode {mode:04o}): anyone could lower the floor; chmod 600"
            )
        if os.geteuid() != 0 and st.st_uid not in (os.geteuid(), 0):
            raise CrlStateError(f"{path} belongs to uid {st.st_uid}, not to this gateway's user ({os.geteuid()})")
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise CrlStateError(f"{path} holds more than {MAX_STATE_BYTES} bytes: it is no state file of this gateway")
    try:
        return _parse(json.loads(data.decode("utf-8")))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CrlStateError(
            f"{path} is damaged ({type(e).__name__}: {e}); it is only ever replaced whole, so something else wrote "
            "it. Remove it to start with no replay floor (docs/revocation.md)"
        ) from None


def _unreadable(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path} is a symbolic link: the state file is never read or written through one; remove the link"
    return f"{path}: {e.strerror}; the gateway's user must be able to read and replace it"


def _parse(document: Any) -> dict[bytes, Floor]:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"expected a JSON object with format {FORMAT}")
    floors: dict[bytes, Floor] = {}
    for i, entry in enumerate(document["floors"]):
        scope = bytes.fromhex(entry["scope"])
        number, issuer = entry["crl_number"], entry.get("issuer")
        this_update = datetime.fromisoformat(entry["this_update"])
        if len(scope) != 16 or this_update.tzinfo is None:
            raise ValueError(f"floors[{i}]: a scope is 32 hex digits, thisUpdate an ISO 8601 time with its offset")
        if not (number is None or (isinstance(number, int) and not isinstance(number, bool) and number >= 0)):
            raise ValueError(f"floors[{i}].crl_number: expected a CRL number or null, got {number!r}")
        if issuer is not None and not isinstance(issuer, str):
            raise ValueError(f"floors[{i}].issuer: expected a string")
        floors[scope] = Floor(scope, -1 if number is None else number, this_update.timestamp(), issuer)
    return floors


def _render(floors: list[Floor]) -> bytes:
    entries = [
        {
            "issuer": floor.issuer,
            "crl_number": floor.number if floor.number >= 0 else None,
            "this_update": datetime.fromtimestamp(floor.this_update, UTC).isoformat(),
            "scope": floor.scope.hex(),
        }
        for floor in sorted(floors, key=lambda f: (f.issuer or "", f.scope))
    ]
    return (json.dumps({"format": FORMAT, "floors": entries}, indent=1) + "\n").encode()


def write_state(path: Path, snapshot: Callable[[], list[Floor]]) -> int:
    """Replace the state file at `path` whole with `snapshot()`, taken under the directory's lock (module docstring);
    returns how many floors it holds. OSError if it cannot be written, CrlStateError if it must not be there."""
    with _locked_directory(path) as directory:
        floors = snapshot()
        partial = f".{path.name}.partial"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=directory)  # a process killed while writing (we hold the lock)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(partial, flags, 0o600, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(fd, 0o600)
                out.write(_render(floors))
                out.flush()
                os.fsync(fd)
            os.replace(partial, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=directory)
            raise
        os.fsync(directory)  # the rename itself on disk
        return len(floors)


@contextlib.contextmanager
def _locked_directory(path: Path) -> Iterator[int]:
    """The directory of `path` (an fd, for the writes relative to it and its fsync), held under an exclusive flock on
    `.<name>.lock` beside it: a file of the gateway's user, 0600, which no other user can open to hold the lock (the
    directory itself may be readable by others, and a lock they held would stall every write, and the CRL refreshes
    waiting for them). CrlStateError for a directory or a lock file another user could write or hold; TimeoutError
    (an OSError) for a lock held `LOCK_WAIT_SECONDS`."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _refuse_open_directory(path.parent, os.fstat(directory))
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        name = f".{path.name}.lock"
        lock = os.open(name, flags, 0o600, dir_fd=directory)
        try:
            _refuse_open_lock(path.parent / name, os.fstat(lock))
            _flock(lock, path.parent / name)
            yield directory
        finally:
            os.close(lock)  # the lock goes with it
    finally:
        os.close(directory)


def trusted_directory(path: Path) -> None:
    """CrlStateError if the directory of the state file at `path` is one another user may write or owns
    (`kcd-proxy check-config`; the writes check the directory they opened)."""
    _refuse_open_directory(path.parent, path.parent.stat())


def _refuse_open_directory(directory: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise CrlStateError(
            f"{directory} is writable by others (mode {mode:04o}): another user could plant the state file or its lock "
            f"there (and hold it, stalling the CRL refreshes); chmod 700 {directory}, owned by the gateway's user "
            "(systemd: StateDirectory=, StateDirectoryMode=0700)"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise CrlStateError(
            f"{directory} belongs to uid {st.st_uid}, not to this gateway's user ({os.geteuid()}) or root: its owner "
            "could replace the state file; make it the gateway's user's, mode 0700"
        )


def _refuse_open_lock(lock: Path, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
        raise CrlStateError(
            f"{lock} may be opened by others (mode {mode:04o}, uid {st.st_uid}): whoever holds it stalls the writes; "
            "remove it (the gateway makes its own, 0600)"
        )


def _flock(lock: int, name: Path) -> None:
    """An exclusive flock on `lock`, waited for `LOCK_WAIT_SECONDS` at most (TimeoutError)."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{name} is held by another process for {LOCK_WAIT_SECONDS:g} s (a writer stopped while writing?)",
                ) from None
            time.sleep(_LOCK_POLL_SECONDS)


class PersistedFloors:
    """A `FloorTable` whose floors the state file keeps as well (module docstring); `writes`: a serving gateway's,
    which writes the file (check-config's and explain's only read it)."""

    def __init__(self, table: FloorTable, path: Path, *, writes: bool) -> None:
        """Read the file at `path` into `table` (CrlStateError if it cannot be used)."""
        self.table, self.path, self.writes = table, path, writes
        recorded = read_state(path)
        self.issuers = {scope: floor.issuer for scope, floor in recorded.items() if floor.issuer is not None}
        for scope, floor in recorded.items():
            table.raise_crl_floor(scope, floor.number, floor.this_update)
        self._dirty = writes  # a serving gateway writes the file once at start: its floors, and proof it can
        self.failed: str | None = None  # why the last write failed; None: it did not

    def crl_floor(self, scope: bytes) -> tuple[int, float] | None:
        return self.table.crl_floor(scope)

    def raise_crl_floor(self, scope: bytes, number: int, this_update: float) -> bool:
        raised = self.table.raise_crl_floor(scope, number, this_update)
        self._dirty = self._dirty or raised
        return raised

    def crl_floors(self) -> dict[bytes, tuple[int, float]]:
        return self.table.crl_floors()

    @property
    def dirty(self) -> bool:
        """Whether this process raised a floor the file may not hold yet."""
        return self.writes and self._dirty

    def save(self) -> bool:
        """Write the file if this process raised a floor since it last did; False if the write failed (logged)."""
        if not self.dirty:
            return True
        self._dirty = False  # before the snapshot: a floor raised meanwhile makes it dirty again
        try:
            count = write_state(self.path, self._snapshot)
        except (OSError, CrlStateError) as e:
            self._dirty = True
            error = str(e) if isinstance(e, CrlStateError) else f"{type(e).__name__}: {e}"
        else:
            self.failed = None
            log.info("crl_state_written", path=str(self.path), floors=count)
            return True
        self.failed = f"{self.path} cannot be written: {error}"
        log.error(
            "crl_state_write_failed",
            path=str(self.path),
            error=error,
            fix=f"the directory of {KEY} must be writable by the gateway's user; it is tried again at the next new "
            "CRL (the CRLs are taken meanwhile, their floor in memory only)",
        )
        return False

    def _snapshot(self) -> list[Floor]:
        """The table's floors, first raised to those the file holds as written now (under the lock): another writer's
        that this table lacks or holds lower (a second gateway on the same file, or one a reload left running) are
        kept, never replaced by older ones (floors only rise); each with its issuer's name from this process or from
        the file."""
        recorded: dict[bytes, Floor] = {}
        with contextlib.suppress(CrlStateError):
            recorded = read_state(self.path)
        for scope, floor in recorded.items():
            if floor.issuer is not None:
                self.issuers.setdefault(scope, floor.issuer)
            self.table.raise_crl_floor(scope, floor.number, floor.this_update)
        return [Floor(scope, n, t, self.issuers.get(scope)) for scope, (n, t) in self.table.crl_floors().items()]
