"""The CRL replay floor kept across restarts (`client_certificates.crl_state`, `proxy.certs.floors`): the scope a
floor is kept under, the file's reading and writing, and a store that starts from it."""

from __future__ import annotations

import os
import subprocess
import sys

from proxy.lab.pki import Pki
from tests.unit.conftest import NOW

_SCOPE_OF_ISSUING_CRL = """
import sys
from datetime import datetime
from pathlib import Path
from proxy.certs.chain import TrustList
from proxy.certs.revocation import accept, parse_crls
from proxy.certs.sources import floor_scope
root, issuing, crl, at = sys.argv[1:]
trust = TrustList.load([Path(root)], [Path(issuing)])
data = Path(crl).read_bytes()
print(" ".join(floor_scope(accept(crl, c, trust, at=datetime.fromisoformat(at))).hex() for c in parse_crls(data, crl)))
"""


def _scope_in_a_process(pki: Pki, seed: str) -> str:
    argv = [str(pki.root_cert), str(pki.issuing_cert), str(pki.issuing_crl), NOW.isoformat()]
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", _SCOPE_OF_ISSUING_CRL, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_crl_floor_scope_is_the_same_in_every_process(pki: Pki) -> None:
    """The scope a floor is kept under is the same in a process started later (another hash seed): it hashed the
    repr of a frozenset of reasons, whose order follows the process's string hashing, so a floor read from the state
    file after a restart never matched the scope of the same CRL (four seeds gave four scopes)."""
    scopes = {_scope_in_a_process(pki, seed) for seed in ("1", "2", "3", "4")}
    assert len(scopes) == 1, scopes
