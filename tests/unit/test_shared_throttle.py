"""The workers' shared Basic per-user throttle (`proxy.auth.shared`): one count across processes, bounded, a held
user never evicted, a dead worker's attempts lapsing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from proxy.auth.basic import Throttle, backoff
from proxy.auth.shared import SharedTable, SharedThrottle


def _throttle(table: SharedTable, limit: int = 3) -> SharedThrottle:
    return SharedThrottle(table, limit, forget=1800, stale_after=60)


def _fail(throttle: SharedThrottle | Throttle, key: str, now: float) -> None:
    assert throttle.admit(key, now) == 0
    throttle.end(key, now, failed=True)


def test_failures_in_a_forked_process_count_in_the_parent() -> None:
    """Two wrong passwords counted in a child process (a worker) and one here hold the user for the window (limit 3)."""
    table = SharedTable(max_keys=64)
    throttle = _throttle(table)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _fail(throttle, "alice@lab.test", 100.0)
            _fail(throttle, "alice@lab.test", 101.0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert throttle.wait("alice@lab.test", 102.0) == 0
    _fail(throttle, "alice@lab.test", 102.0)
    assert throttle.wait("alice@lab.test", 103.0) == 1799.0
    assert throttle.admit("alice@lab.test", 103.0) > 0
    assert throttle.wait("alice@lab.test", 102.0 + 1800.5) == 0


def test_admit_counts_attempts_in_flight_as_the_in_process_throttle_does() -> None:
    """With one failure of three, two attempts may be in flight; the third waits; a success clears the count. The
    in-process throttle answers the same sequence the same way."""
    for throttle in (_throttle(SharedTable(max_keys=64)), Throttle(3, forget=1800, hold=True)):
        _fail(throttle, "bob", 10.0)
        assert [throttle.admit("bob", 11.0) for _ in range(3)] == [0, 0, 1.0]
        throttle.end("bob", 12.0, failed=False)
        throttle.succeeded("bob")
        throttle.end("bob", 12.0, failed=False)
        assert throttle.wait("bob", 12.0) == 0


def test_a_dead_workers_attempts_in_flight_lapse() -> None:
    """Attempts admitted and never ended (their worker died) stop counting stale_after seconds after the last one."""
    throttle = _throttle(SharedTable(max_keys=64), limit=2)
    assert [throttle.admit("carol", 0.0) for _ in range(3)] == [0, 0, 1.0]
    assert throttle.wait("carol", 59.0) == 1.0
    assert throttle.wait("carol", 60.5) == 0


def test_a_flood_of_other_names_never_evicts_a_held_user() -> None:
    """A table of 16 keys: a held user, then 10,000 other names' failures; the user is still held, and the table
    never holds more than its slots."""
    table = SharedTable(max_keys=16)
    throttle = _throttle(table, limit=2)
    for _ in range(2):
        _fail(throttle, "held", 0.0)
    for i in range(10_000):
        _fail(throttle, f"flood-{i}", 1.0 + i / 10_000)
    assert throttle.wait("held", 5.0) > 1700
    assert table.capacity == 16


def test_a_flood_of_names_failing_once_never_evicts_a_users_failures_below_the_hold() -> None:
    """A table of 16 keys: alice has four wrong passwords (limit 5, not yet held), then 10,000 other names fail once
    each (unknown users, from many /64s): her four are still counted, and her next wrong password holds her. The least
    recently counted slot went first, hers among them: the flood gave her guesser four more guesses per table's worth
    of names, towards the directory's lockout (a locked-out alice) before basic_failure_window_seconds."""
    table = SharedTable(max_keys=16)
    throttle = _throttle(table, limit=5)
    for _ in range(4):
        _fail(throttle, "alice", 0.0)
    for i in range(10_000):
        _fail(throttle, f"flood-{i}", 1.0 + i / 10_000)
    _fail(throttle, "alice", 2.0)
    assert throttle.wait("alice", 2.0) > 1700


def test_a_flood_evicts_the_names_with_fewest_failures_first() -> None:
    """Eviction takes the slot with the fewest failures in the window, the least recently counted among equals: a user
    who never failed still gets a slot in a table full of names that failed, and failures older than the window count
    as none."""
    table = SharedTable(max_keys=8)  # one bucket of 8
    throttle = _throttle(table, limit=5)
    for i in range(4):
        for _ in range(3):
            _fail(throttle, f"thrice-{i}", 0.0)
    for i in range(4):
        _fail(throttle, f"once-{i}", 1.0)
    for i in range(4):  # each new name takes the place of a name that failed once, never a name that failed thrice
        _fail(throttle, f"new-{i}", 2.0)
    _fail(throttle, "thrice-0", 3.0)
    _fail(throttle, "thrice-0", 3.0)
    assert throttle.wait("thrice-0", 3.0) > 1700
    assert throttle.admit("carol", 1900.0) == 0  # every count is past the window now: carol takes a slot
    throttle.end("carol", 1900.0, failed=False)


def test_a_bucket_of_held_users_refuses_a_new_key_instead_of_releasing_one() -> None:
    """When every slot a new key could take is held, the new key is refused (429), and the held keys stay held."""
    table = SharedTable(max_keys=8)  # one bucket
    throttle = _throttle(table, limit=1)
    for i in range(8):
        _fail(throttle, f"held-{i}", 0.0)
    assert throttle.admit("newcomer", 1.0) == 1.0
    assert all(throttle.wait(f"held-{i}", 2.0) > 1700 for i in range(8))


def test_held_names_filling_most_of_the_table_leave_room_for_users_who_never_failed() -> None:
    """A table of 8,000 keys, 5,600 of them (70 %) held names (a sprayer's unknown users, each held after its wrong
    passwords): of 2,000 users who never failed, fewer than 1 % are refused for want of a slot. With one bucket per
    key about one in five was (a bucket fills long before the table: 0.5 % of users at 30 % held, 4 % at 50 %)."""
    table = SharedTable(max_keys=8000)
    throttle = _throttle(table, limit=1)
    for i in range(5600):
        throttle.admit(f"held-{i}", 0.0)
        throttle.end(f"held-{i}", 0.0, failed=True)
    refused = 0
    for n in range(2000):
        if throttle.admit(f"user-{n}", 1.0) > 0:
            refused += 1
        else:
            throttle.end(f"user-{n}", 1.0, failed=False)
    assert refused < 20, f"{refused} of 2000 users who never failed refused"


def test_the_accepted_password_kept_in_one_process_is_known_in_another() -> None:
    """A child process (a worker) keeps alice's accepted digest; here it is known, only that digest and only until its
    time; a refusal of that very digest forgets it, one of another digest does not."""
    table = SharedTable(max_keys=64, max_known=64)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            table.keep_known("alice", b"a" * 32, until=100.0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.known("alice", 50.0, b"a" * 32)
    assert table.known("alice", 50.0)
    assert not table.known("alice", 50.0, b"b" * 32)
    assert not table.known("alice", 100.0, b"a" * 32)
    table.forget_known("alice", b"b" * 32)
    assert table.known("alice", 50.0, b"a" * 32)
    table.forget_known("alice", b"a" * 32)
    assert not table.known("alice", 50.0)


def test_known_passwords_are_bounded_and_the_one_kept_longest_goes_first() -> None:
    """One bucket of 8: a ninth user's accepted password takes the place of the one that expires first."""
    table = SharedTable(max_keys=8, max_known=8)
    for i in range(9):
        table.keep_known(f"user-{i}", bytes([i]) * 32, until=1000.0 + i)
    assert not table.known("user-0", 0.0)
    assert all(table.known(f"user-{i}", 0.0, bytes([i]) * 32) for i in range(1, 9))


def test_a_refused_keytab_key_is_kept_by_path_principal_and_file_version() -> None:
    """`SharedTable.refused_key`: the KDC's words for a keytab's refused key, kept by its path, principal and file
    version (what every worker's `Delegator` reads before an AS exchange); another version, another path or another
    principal of the same file is not refused, and a refusal of the next version replaces the last."""
    table = SharedTable(max_keys=64, max_known=16)
    old, new = bytes(range(16)), bytes(range(1, 17))
    path, gateway = "/etc/kcd/gateway.keytab", "HTTP/proxy.lab.test@LAB.TEST"
    assert table.refused_key(path, gateway, old) is None
    table.keep_refused_key(path, gateway, old, 1)
    assert table.refused_key(path, gateway, old) == 1
    assert table.refused_key(path, gateway, new) is None  # the file written again: offered again
    assert table.refused_key("/etc/kcd/other.keytab", gateway, old) is None
    assert table.refused_key(path, "proxy$@LAB.TEST", old) is None  # a reload naming another principal of the file
    table.keep_refused_key(path, gateway, new, 0)
    assert (table.refused_key(path, gateway, new), table.refused_key(path, gateway, old)) == (0, None)


def _address_throttle(table: SharedTable, limit: int = 3) -> SharedThrottle:
    return SharedThrottle(table, limit, forget=900, stale_after=60, backoff=backoff)


def test_an_address_backs_off_as_the_in_process_throttle_does() -> None:
    """With `backoff` (the address throttle), a key past its limit is refused 1, 2, 4 ... seconds after each failure,
    the same waits as the in-process throttle's, not held for the window; a failure judged without the KDC
    (`failed`) counts too."""
    shared, local = _address_throttle(SharedTable(max_keys=64)), Throttle(3, forget=900)
    for throttle in (shared, local):
        for now in (0.0, 0.0, 10.0):
            _fail(throttle, "10.0.0.1", now)
        assert throttle.wait("10.0.0.1", 10.0) == 1.0
        _fail(throttle, "10.0.0.1", 11.0)
        assert throttle.wait("10.0.0.1", 11.0) == 2.0
        throttle.failed("10.0.0.1", 13.0)
        assert throttle.wait("10.0.0.1", 13.0) == 4.0
        assert throttle.wait("10.0.0.1", 17.0) == 0


def test_a_refused_address_makes_room_for_a_new_one_when_every_slot_is_refused() -> None:
    """A table full of refused addresses takes a new address in (the least recently counted refused one goes), where
    the users' table refuses the new key: an address's count is no directory's lockout, and a sprayer with many
    addresses would otherwise shut every new address out."""
    table = SharedTable(max_keys=8)  # one bucket of 8
    throttle = _address_throttle(table, limit=1)
    for i in range(8):
        _fail(throttle, f"10.0.0.{i}", i / 10)  # each refused for a second
    assert all(throttle.wait(f"10.0.0.{i}", 0.8) > 0 for i in range(8))
    assert throttle.admit("10.0.1.1", 0.8) == 0
    assert throttle.wait("10.0.0.0", 0.8) == 0  # the least recently counted went
    assert all(throttle.wait(f"10.0.0.{i}", 0.8) > 0 for i in range(1, 8))


def test_the_command_lines_table_has_one_of_its_own_for_addresses() -> None:
    """The address throttle's slots are apart from the users' (a flood of either cannot take the other's places)."""
    table = SharedTable(max_keys=64)
    assert table.addresses is not None
    assert table.addresses.capacity == table.capacity
    assert table.addresses.addresses is None
    _fail(_address_throttle(table.addresses), "10.0.0.1", 0.0)
    assert _throttle(table).wait("10.0.0.1", 0.0) == 0


# Another process's attempt at the table's lock: exit 0 if it got it, 1 if someone holds it.
_TRY_LOCK = """
import fcntl, sys
try:
    fcntl.lockf(int(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
"""


def test_a_thread_leaving_the_table_keeps_it_locked_while_another_thread_is_inside() -> None:
    """The table's lock is a record lock, which a process holds, not a thread: a CRL vetting thread's floor look-up
    (`crl_floor`, the early floor check) that left the table while the event loop's thread was inside it unlocked it
    for every other worker, which could then write the same slots at once. Now the second thread waits for the first
    to leave, and another process cannot take the lock meanwhile."""
    table = SharedTable(max_keys=64)
    fd = table._fd
    with table.locked():  # the event loop's thread, inside the table
        looking = threading.Thread(target=table.crl_floor, args=(bytes(16),))
        looking.start()
        looking.join(timeout=1.0)  # before: in and out at once, unlocking the process's lock as it left
        argv = [sys.executable, "-c", _TRY_LOCK, str(fd)]
        other = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=60, check=False)
        assert other.returncode == 1, f"another process took the lock while a thread was inside: {other.stderr}"
    looking.join(timeout=60)
    assert not looking.is_alive()
