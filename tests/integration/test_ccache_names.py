"""No user's ticket on disk: every ccache name the gateway hands MIT is still the name it meant when MIT reads it.

The leak this pins: `proxy.kerberos.ap_req` copied a user's impersonated credential (the gateway's TGT copy, the
evidence ticket, the service ticket, their session keys) into a MEMORY ccache with python-gssapi's raw
`store_cred_into({"ccache": name}, ...)`, `name` a str. python-gssapi 1.12's `c_create_key_value_set` encodes a str
key or value into a temporary bytes object and keeps only a `const char *` into it; the temporary is freed when
that function returns, before `gss_store_cred_into` runs with the GIL released. Another thread (the event loop)
allocating meanwhile reuses the memory, and MIT reads whatever is there: a key that no longer says "ccache" (MIT
then stores into the default ccache, `FILE:/tmp/krb5cc_<uid>`), or a value that is no longer the MEMORY name (MIT
takes a name without a `TYPE:` prefix for a FILE ccache relative to the working directory). Both were seen: a
FILE ccache under a 6-byte binary name in a test run's working directory, and a 3 KB `/tmp/krb5cc_0` holding
alice@LAB.TEST's impersonated credential.

The stress here makes that reuse likely: threads copy the credential as the gateway's exchange threads do, while
another thread allocates bytes objects of the freed temporaries' sizes, filled with a printable name.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import gssapi
import pytest

from proxy.kerberos.ap_req import Krb5Error, TicketTokens
from proxy.kerberos.delegate import Delegator
from proxy.kerberos.password import TOKEN_FLAGS
from tests.integration.test_ap_req import ALICE, SPN, TARGET

_THREADS = 4
_READS = 150  # per thread: without the fix, the first leak came within a few dozen reads on an idle machine
_DEADLINE = 120.0  # seconds for all the reads, on a loaded machine


def _churn(stop: threading.Event) -> None:
    """Allocate and free bytes objects of 6 to 40 bytes (the sizes of "ccache" and of MEMORY names) with a
    printable content, as fast as the GIL allows, until `stop`: what a busy event loop does to freed memory."""
    i = 0
    keep: list[bytes] = []
    while not stop.is_set():
        keep = [(b"kcdleak%033d" % (i + n))[: 6 + n % 35] for n in range(64)]
        i += 1
    del keep


def _holds_a_credential(ccache: str) -> bool:
    try:
        gssapi.Credentials(usage="initiate", store={"ccache": ccache})
    except gssapi.raw.GSSError:
        return False
    return True


def test_copying_a_users_credential_under_allocation_churn_writes_no_file(
    delegator: Delegator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads read the service ticket out of alice's impersonated credential (`TicketTokens.read`, as every
    exchange does) while another thread churns memory: every read finds the ticket (the copy went to the MEMORY
    cache it was meant for), none went to the default ccache, and no file appears in the working directory (a FILE
    ccache under a garbage name). Failed before the fix: 1 to 7 of 600 reads found no ticket, the copy in the
    default ccache."""
    asyncio.run(delegator.delegation(ALICE, SPN, TARGET))
    (ticket,) = delegator._tickets.values()
    target = delegator._target(TARGET)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # where a copy would go if MIT lost the "ccache" key: not /tmp/krb5cc_0 (set before this test's threads start)
    monkeypatch.setenv("KRB5CCNAME", "MEMORY:kcd-test-default")
    failures: list[str] = []
    done = threading.Event()
    deadline = time.monotonic() + _DEADLINE

    def reads() -> None:
        for _ in range(_READS):
            if time.monotonic() > deadline:
                failures.append("deadline")
                return
            try:
                TicketTokens.read(ticket.creds, target, TOKEN_FLAGS)
            except (Krb5Error, gssapi.raw.GSSError) as e:
                failures.append(str(e))

    threads = [threading.Thread(target=reads) for _ in range(_THREADS)]
    churn = threading.Thread(target=_churn, args=(done,))
    churn.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    churn.join()
    written = sorted(p.name for p in cwd.iterdir())
    assert written == [], f"files written in the working directory: {written!r}"
    assert not _holds_a_credential("MEMORY:kcd-test-default"), "the default ccache (KRB5CCNAME) received a copy"
    assert failures == [], f"{len(failures)} of {_THREADS * _READS} reads failed, e.g. {failures[:3]}"
