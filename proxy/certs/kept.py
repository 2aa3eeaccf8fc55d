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

A worker's file for a source says what it holds of it, nothing included: before its first read of the source it
writes what it holds then (the CRLs it started from, a sibling's or a renamed source's; or an empty file), and after
each read that changes that, what it holds. So a replacement refusing a source's older CRL beside siblings (served
without, it passed what their newer CRL revokes) first looks at them (`held_beside`): if each serving sibling's file
for that source is empty, none of them holds a CRL of it, and the refusal would keep the gateway a worker short for
nothing: it serves as they do. A file missing, unreadable or not empty counts as held: a witness that cannot be read
refuses, as before. An attacker on a plain-HTTP CRL URL cannot empty a sibling's file: a worker that took a CRL from
the source writes a file that holds it (and, from left33 on, keeps the CRLs of scopes a later answer left out in it
until their nextUpdate), and only a process that holds nothing of the source writes an empty one. A running worker whose
read of a source leaves it holding no CRL of it (a replay answered to it, the newer CRL to a sibling; or the answer
withheld from it: none, a 404, bytes that are no CRL) starts the source from these files too (`CrlStore._behind`).

A file holds one read of its source (`MAX_CRL_BYTES` at most; kept in PEM, a third more) and the CRLs the worker
carries beside it, each once such a read: together they can pass `MAX_CRL_BYTES`, and a replacement reading with that
bound skipped the file and started without its siblings' CRLs. It is read with the bound of what a worker may so hold,
`MAX_KEPT_BYTES`; a worker that would write more writes nothing, removes its file and logs `crl_not_kept` (a
replacement then refuses beside it, or serves without as a lone one would). So does a worker whose write fails (a
full disk), with the `error`: a replacement refusing a replay beside it, or a sibling withheld the source starting
without its CRLs, is then owed to the disk, and the line says so.
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
MAX_KEPT_BYTES = 2 * MAX_CRL_BYTES  # a source's answer at the limit kept in PEM (x1.36), and the CRLs carried beside it


@dataclass(frozen=True)
class KeptCrls:
    """Where this worker keeps the CRLs it takes, and whether it starts from its siblings' (a replacement)."""

    directory: Path  # `<supervisor's directory>/crls`
    number: int  # this worker's number (1..N)
    adopt: bool = False  # a replacement: each source starts from the newest of its siblings' files (`offered`)
    beside: tuple[int, ...] = ()  # a replacement: the numbers of its siblings serving as it was forked (`held_beside`)

    def keep(self, location: str, data: bytes) -> str | None:
        """What this worker holds of `location` (the bytes it gave, whose CRLs it took; b"": nothing), written whole (a
        part renamed over the file); past `MAX_KEPT_BYTES`, its file removed instead. A write that fails (a full disk)
        removes the file too: it might say less than this worker holds (`held_beside`). None once written, else why not
        (the caller logs it)."""
        part = self.directory / f".{_name(location)}.{os.getpid()}.{threading.get_ident()}.part"
        file = self.directory / f"{_name(location)}.{self.number}.crl"
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            if len(data) > MAX_KEPT_BYTES:
                file.unlink(missing_ok=True)
                return f"{len(data)} bytes, more than {MAX_KEPT_BYTES}"
            part.write_bytes(data)
            part.replace(file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                part.unlink()
            with contextlib.suppress(OSError):
                file.unlink()
            return f"{type(exc).__name__}: {exc.strerror or exc}"
        return None

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
                if data := read_bounded(path, MAX_KEPT_BYTES):  # empty: that worker holds nothing of it
                    yield data

    def held_beside(self, location: str) -> bool:
        """Whether a sibling serving beside this replacement (`beside`) may hold CRLs of `location`: its file for it is
        not empty, or cannot be told (missing, unreadable). False: each says it holds nothing (module docstring)."""
        for number in self.beside:
            try:
                if (self.directory / f"{_name(location)}.{number}.crl").stat().st_size > 0:
                    return True
            except OSError:
                return True
        return False


def _name(location: str) -> str:
    return hashlib.blake2b(location.encode(), digest_size=16, person=b"kept-crl").hexdigest()
