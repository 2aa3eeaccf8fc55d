"""The CRLs the workers of one gateway keep for a replacement (`[listener] workers`, `proxy.workers`).

Theory of operation. A worker that dies is replaced by a fresh process, whose CRL store starts empty. What its sources
give it then may be older than what its siblings hold: a plain-HTTP distribution point answering an older genuine CRL
(anyone on its path can replay one), a stale mirror, a file put back. Refused below the workers' replay floor
(`proxy.certs.sources`), the replacement was not started for as long as that lasted (one worker short); served without,
it passed what its siblings' CRL revokes. A URL that did not answer at its first fetch gave the same split.

So each worker keeps, for each source whose CRLs it took, the bytes it took (`keep`), in the supervisor's private
directory: `crls/<source>.<worker number>.crl`, <source> a hash of the source's location (a URL's password is never
written), one file per worker so that no two processes write one file (a replacement writes over the one of the worker
it replaces). A replacement, before it first reads a source, reads its siblings' files for it (`offered`) and starts
from the newest that it vets itself as any read (`CrlStore` does: signed by a CA of its own trust list, current, not
below the replay floor): a file is evidence only of what its signature proves, never trusted for being there. What
the source then gives is taken if it is no older, and refused as a replay if it is, as in a sibling's refresh.

The files are the CRLs as the source gave them: one DER CRL as it came, a PEM file's CRL blocks as openssl writes
them (text a sender put around or inside them is not written: `sources._write_kept`), followed by the CRLs the worker
still holds for scopes the source's answer left out (`CrlStore._carry`, until their nextUpdate), so a worker keeps at
most one copy of each source's CRLs: written only when its CRLs change, in a thread. They are offered
in the order they were written (`offered`): a source may give CRLs of another issuer or scope in place of those it
gave, and the last a worker took is what a sibling holds. A reload that renames a source keeps the CRLs it carries
over under the new name (`CrlStore.inherit`): a replacement reads the reloaded configuration. Best effort: a file that
cannot be written or read leaves the replacement where it was without it (refused beside a sibling serving, or serving
without as the revocation mode says, `proxy.app`). The supervisor removes the directory with the rest when it stops;
a worker outliving a supervisor killed outright removes it (`proxy.workers._worker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from proxy.certs.revocation import MAX_CRL_BYTES
from proxy.files import read_bounded

DIRECTORY = "crls"  # in the supervisor's private directory


@dataclass(frozen=True)
class KeptCrls:
    """Where this worker keeps the CRLs it takes, and whether it starts from its siblings' (a replacement)."""

    directory: Path  # `<supervisor's directory>/crls`
    number: int  # this worker's number (1..N)
    adopt: bool = False  # a replacement: each source starts from the newest of its siblings' files (`offered`)

    def keep(self, location: str, data: bytes) -> None:
        """The bytes `location` gave, whose CRLs this worker took, written whole (a part renamed over the file)."""
        part = self.directory / f".{_name(location)}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            part.write_bytes(data)
            part.replace(self.directory / f"{_name(location)}.{self.number}.crl")
        except OSError:
            with contextlib.suppress(OSError):
                part.unlink()

    def offered(self, location: str) -> Iterator[bytes]:
        """What the workers of this gateway (this number's predecessors too) took from `location`, one file at a time,
        the one written last last (the source's latest answer a worker took: a source may give the CRLs of another
        issuer or scope in place of those it gave, and a sibling then holds those, not the dead worker's); unread files
        skipped. Unvetted: the caller vets each as a read of the source."""
        written = []
        for path in self.directory.glob(f"{_name(location)}.*.crl"):
            with contextlib.suppress(OSError):
                written.append((path.stat().st_mtime_ns, path))
        for _, path in sorted(written):
            with contextlib.suppress(OSError):
                yield read_bounded(path, MAX_CRL_BYTES)


def _name(location: str) -> str:
    return hashlib.blake2b(location.encode(), digest_size=16, person=b"kept-crl").hexdigest()
