"""Reading a keytab file: which principals it holds keys for, at which key version, of which type.

Theory of operation. A keytab is MIT's file format (also written by Windows' ktpass and by msktutil): two
bytes of version (0x05 0x02), then records, each a signed 32-bit big-endian length and that many bytes; a
negative length marks a hole left by a deleted entry. A record is a principal (component count, realm and
components as 16-bit-length-prefixed strings, name type), a timestamp, an 8-bit key version, the key
(16-bit enctype, then the key bytes, length-prefixed) and, when the record has room for it, a 32-bit key
version that supersedes the 8-bit one (key versions above 255).

`check-config` uses this to say whether the keytab holds the gateway's principal and `doctor` to compare
its key version with the KDC's; `missing_key` says, when MIT found no key for the principal, what the file holds
instead (another account's keytab, or the principal spelt in another case), for `doctor`, `explain` and the log.
Pure but for `read_keytab` and `missing_key`, which read the file: bytes in, entries out; the key bytes are kept out of
`repr` and are never printed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from proxy.kerberos.ccache import ENCTYPES


@dataclass(frozen=True)
class KeytabEntry:
    principal: str  # "HTTP/proxy.lab.test@LAB.TEST"
    kvno: int
    enctype: int
    timestamp: datetime
    key: bytes = field(repr=False)

    @property
    def enctype_name(self) -> str:
        return ENCTYPES.get(self.enctype, f"enctype {self.enctype}")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def counted(self) -> bytes:
        return self.take(self.u16())


def parse_keytab(data: bytes) -> list[KeytabEntry]:
    """The entries of a version 2 keytab; ValueError if it is not one."""
    if data[:2] != b"\x05\x02":
        version = data[:2].hex() or "empty"
        raise ValueError(f"not a keytab (version 0502 expected, got {version})")
    entries = []
    pos = 2
    while pos + 4 <= len(data):
        (size,) = struct.unpack(">i", data[pos : pos + 4])
        pos += 4
        if size == 0:
            break
        if size < 0:  # a hole left by a removed entry
            pos += -size
            continue
        record = data[pos : pos + size]
        if len(record) < size:
            raise ValueError(f"truncated record at byte {pos}")
        pos += size
        entries.append(_entry(_Reader(record)))
    return entries


def _entry(r: _Reader) -> KeytabEntry:
    count = r.u16()
    realm = r.counted().decode("utf-8")
    components = [r.counted().decode("utf-8") for _ in range(count)]
    r.u32()  # name type
    timestamp = datetime.fromtimestamp(r.u32(), UTC)
    kvno = r.u8()
    enctype = r.u16()
    key = r.counted()
    if len(r.data) - r.pos >= 4:
        kvno32 = r.u32()
        kvno = kvno32 or kvno
    return KeytabEntry("/".join(components) + "@" + realm, kvno, enctype, timestamp, key)


def read_keytab(path: Path) -> list[KeytabEntry]:
    return parse_keytab(path.read_bytes())


def kvnos(entries: list[KeytabEntry], principal: str) -> set[int]:
    """The key versions the keytab holds for `principal` (case-sensitive, as Kerberos compares names)."""
    return {e.kvno for e in entries if e.principal == principal}


def held_versions(path: Path, principal: str) -> set[int] | None:
    """The key versions the keytab at `path` holds for `principal`; None when the file cannot be read."""
    try:
        return kvnos(read_keytab(path), principal)
    except (OSError, ValueError):
        return None


def missing_key(path: Path, principal: str) -> tuple[str, str] | None:
    """(what is wrong, the fix) when the keytab at `path` holds no key for `principal`; None when it holds one or
    cannot be read (the caller's message says that). MIT's "No key table entry found" alone does not say whether the
    file is another account's keytab or the principal is spelt otherwise: the names it holds do."""
    try:
        held = sorted({e.principal for e in read_keytab(path)})
    except (OSError, ValueError):
        return None
    if principal in held:
        return None
    if not held:
        return f"{path} holds no keys at all", f"export {principal}'s key into it (kadmin ktadd, ktpass, msktutil)"
    what = f"{path} holds keys for {', '.join(held)} only, none for {principal}"
    if (respelt := case_advice(principal, held)) is not None:
        return what, respelt
    return what, (
        "it is another account's keytab (kerberos.keytab names the wrong file), or kerberos.principal is not the name "
        f"it was exported for: point kerberos.keytab at {principal}'s keytab, or export {principal}'s key into this "
        "one (kadmin ktadd, ktpass, msktutil)" + account_advice(principal, held)
    )


def case_advice(principal: str, held: list[str]) -> str | None:
    """The fix when the keytab holds `principal` spelt in another case (`svc-kcdproxy@ad.test` for the keytab's
    `svc-kcdproxy@AD.TEST`: a realm in lower case), else None."""
    same = [p for p in held if p.lower() == principal.lower()]
    if not same:
        return None
    return (
        f"Kerberos compares names with their case, and the keytab spells it {same[0]}: "
        f'set kerberos.principal = "{same[0]}"'
    )


def account_advice(principal: str, held: list[str]) -> str:
    """When the principal is an SPN and the keytab holds an account's name (what Active Directory's tools export),
    say so: AD gives a ticket to an account's name or UPN, never to a bare SPN."""
    realm = principal.rpartition("@")[2]
    accounts = [p for p in held if "/" not in p.rpartition("@")[0] and p.rpartition("@")[2] == realm]
    if "/" not in principal.rpartition("@")[0] or not accounts:
        return ""
    return (
        f"; or, in Active Directory, set kerberos.principal to the service account's name ({accounts[0]}): "
        f"AD issues no ticket to the bare SPN {principal} unless it is also the account's UPN"
    )


# A key the KDC refused, in the words of MIT's messages (AD's and MIT's KDCs alike): preauthentication failed, or an
# AS reply that the keytab's key cannot open.
_KEY_REFUSED = ("preauthentication failed", "integrity check failed", "password incorrect")


def refusal_words(message: str) -> int | None:
    """Which of the KDC's refusals of the keytab's key a GSSAPI error's message says (its number), or None."""
    lowered = message.lower()
    return next((number for number, words in enumerate(_KEY_REFUSED) if words in lowered), None)


class RefusedBefore(Exception):
    """The KDC refused this keytab's key (in the words numbered `words`, `refusal_words`) when another worker of the
    gateway offered it (`proxy.auth.shared.SharedTable.refused_key`): not offered again until the file changes.
    `gen_message` gives the message a GSSError would, in the KDC's words, for the hints to explain."""

    def __init__(self, words: int) -> None:
        self.message = (
            f"{_KEY_REFUSED[words % len(_KEY_REFUSED)].capitalize()} (when another worker of this gateway offered this "
            "keytab's key; not offered again until the file changes)"
        )
        super().__init__(self.message)

    def gen_message(self) -> str:
        return self.message


FileVersion = tuple[int, int, int, bytes]


def file_version(path: Path) -> FileVersion | None:
    """(inode, size, mtime in ns, a digest of the content) of a file, or None when it cannot be read: what tells a file
    written again. The content too: a keytab written again in place keeps its inode, and its size whenever it holds the
    same principals and enctypes, and `cp -p`, `rsync -t` or `install -p` set its mtime to the source's (a refused key
    was kept refused after the fix). A keytab is a few hundred bytes; this is read before an AS exchange only."""
    try:
        status = path.stat()
        content = path.read_bytes()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns, hashlib.blake2b(content, digest_size=16).digest()
