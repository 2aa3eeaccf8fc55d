"""Which krb5 configuration the gateway's Kerberos calls read, and keeping it parsed between them.

`use_profile` points MIT krb5 at the configured krb5.conf (`kerberos.krb5_config`, else the environment's
KRB5_CONFIG, else /etc/krb5.conf) behind a one-line file of the gateway's own, `forwardable = true`. The
gateway's ticket to itself (from its keytab) must be forwardable: S4U2Self gives a forwardable evidence ticket
only to a service whose TGT is, and S4U2Proxy needs one. MIT's default is false, and a krb5.conf written
for MIT without that line (nothing else in it is wrong) made every user's delegation fail. KRB5_CONFIG takes a
colon-separated list of files, all read, the first file's value winning for a relation set in several.

Keeping the configuration parsed:

Why this exists: MIT's `gss_init_sec_context` creates a krb5 library context for each call and frees it
afterwards. The profile library shares a parsed krb5.conf among the contexts open at a time, and forgets it
when the last of them closes, so with no context open in between, every Negotiate token began by opening,
reading and parsing krb5.conf again: about a third of a token's cost (perf under `make bench`). One
context held open for the life of the process keeps the parsed file shared; the profile library still
checks the file's modification time (a context made afterwards at once, one already open at most once a second) and
rereads it when it differs from the one read: a file the gateway replaces gets a later one (`_later_than`).

python-gssapi has no call for a krb5 context and this is the only one needed, so it is one C call through ctypes
(`proxy.kerberos.libkrb5`) rather than another Kerberos binding. Without libkrb5 to load, tokens work as before, only
slower.

One file, not two: every library context MIT opens (four per Negotiate token) checks each file KRB5_CONFIG
names, an `access()` and a `stat()` each, and every look-up walks each file's tree. So where
`kerberos.krb5_config` names one readable file, the overlay file holds the overlay's line followed by that
file's text, and KRB5_CONFIG names the overlay file alone. The values are the same: MIT merges a section
named twice in one file, and the first value of a relation wins, as the first file's does across files.
A token costs 23% less (48 -> 37 µs of CPU, docs/performance.md, "The krb5 profile in one file"). The copy
follows krb5.conf: `refresh_profile` (called before Kerberos work, at most one `stat()` a second) writes it
again when krb5.conf changes, and MIT rereads it as it would have reread krb5.conf. The KDC watch's realm
sections (`set_realm_section`) come first in that file, and krb5.conf's own sections of those realms are left
out of the copy: MIT honours their final mark (`}*`) across files only. The environment's KRB5_CONFIG (which
may be a list), or a file that is not plain text (a `module` directive) or includes others, keeps the two-file
list.

A reload: the configuration built again calls `use_profile` again. A profile other than the one in force (another
`kerberos.krb5_config`, or the same file changed) is written to a new overlay file, which KRB5_CONFIG names from
then on, and `hold_profile` holds a fresh context for it and frees the one before. So the first KDC exchange after
`reloaded` reads the new file, and the held context has its settings (MIT reads some of them, such as the clock skew,
once, when a context is made). Rewritten in place, a file is looked at again by a context already open at most once
a second (MIT's per-file stat), and an overlay path that stayed the same kept the held context of the start; the
one-file overlay even kept copying the krb5.conf of the start. The file before stays, as it was, for a call begun on
it (MIT would skip a file gone from under an open context); older ones are removed.

A reload that takes `kerberos.krb5_config` out goes back to what the environment named: each call remembers it beside
the value it set (`_set`), and a KRB5_CONFIG still as set is replaced, not built upon (the file no longer configured
was read on until a restart, and in one-file mode the KDC watch then found no krb5.conf to follow).

Overlays never stack (`overlay2:overlay1:krb5.conf`) in a gateway: each call replaces a KRB5_CONFIG it set (`_set`),
else takes the overlay in force (`_overlay`) off its front, or, in one-file mode, goes back to the file it copied.
The process that set KRB5_CONFIG is the one that knows its overlay, in a reload as at the start, and a worker (a
replacement too) is forked, not executed: it inherits `_set` and `_overlay` with the environment, and puts its own
overlay in place of its supervisor's. Only a process given the environment without the module's state (a test
that resets `_set` and `_overlay`, a program the gateway would execute: it executes none) would stack.
`test_reloads_and_a_forked_worker_never_stack_overlays` (tests/unit/test_krb5_profile.py) pins it.

One writer, no lock: the overlay is written by `use_profile` (a delegator, a probe or the directory client being
built), `refresh_profile` (`_Merged.refresh`, before a KDC exchange is handed to its thread and before a token is
made) and `set_realm_section` (the KDC watch), and all of them run on the event loop's thread: a gateway never calls
them from the threads that talk to the KDC (`proxy.kerberos.threads`), which only read the file, through MIT. So two
writes never interleave, and a reader sees the old file or the new one whole, since `_write` renames a new file over
it. `test_the_krb5_overlay_is_written_from_the_event_loop_only` (tests/integration/test_ticket_cache.py) pins it: it
fails as soon as a write comes from a KDC thread. A caller that writes from another thread needs a lock here first.

The files' life: `kcd-proxy-krb5-<pid>-*.conf` in the temporary directory (TMPDIR), mode 0600. A process removes
its own at exit (`remove_overlay`; a worker from its own exit). One killed outright (SIGKILL, the OOM killer)
cannot; the next gateway to start removes such files (`remove_stale_overlays`): named for a process that is gone,
and locked by none, as each process holds a shared lock on each of its files while it runs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import math
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path

import structlog

from proxy.kerberos import krb5conf, libkrb5

log = structlog.get_logger("proxy.kerberos")

_held: dict[str | None, ctypes.c_void_p] = {}  # KRB5_CONFIG -> the context kept open for it
# A held context, one thread at a time (`proxy.kerberos.ap_req` makes tokens on it). Reentrant: a collection inside a
# token's calls may run a held ticket's finalizer, which frees it on that context.
HELD_LOCK = threading.RLock()
_DEFAULT_PROFILE = "/etc/krb5.conf"  # MIT's, when KRB5_CONFIG is not set
_OVERLAY = "[libdefaults]\n    forwardable = true\n"
_overlay: list[str] = []  # [the overlay file in force in this process]: its own, or inherited over a fork
_realms: dict[str, str] = {}  # realm -> its [realms] section in the overlay (`proxy.kerberos.kdcs`: answering KDCs)
_bases: list[str] = []  # with two files: the krb5.conf file(s) KRB5_CONFIG names after the overlay (`_primaries`)
_written: dict[int, list[str]] = {}  # pid -> the overlay files that process wrote (newest last), only it removes
_set: list[str] = []  # [KRB5_CONFIG as `use_profile` last set it, what the environment named before it did]
_texts: dict[str, str] = {}  # overlay file -> the text this process last wrote there
_locks: dict[str, int] = {}  # overlay file -> a descriptor holding a shared lock on it while ours (`_remove_stale`)
# an overlay file's name, or that of `_write`'s copy of one
_OVERLAY_NAME = re.compile(r"kcd-proxy-krb5-(\d+)-[^/]*\.conf(?:\.[^/]*\.new)?")
_KEPT = 2  # overlay files a process keeps: the one in force, and the one before it (module docstring, "A reload")


def use_profile(krb5_config: Path | None) -> str:
    """Set KRB5_CONFIG for this process: the gateway's overlay, then `krb5_config` (or what the environment's
    KRB5_CONFIG named, also after a call for a `krb5_config` since taken out, or MIT's default), in one file where
    krb5.conf is one plain file (the module's docstring), else as a list of two. Returns the value set. A profile
    other than the one in force is written to a new overlay file (module docstring, "A reload"). Without a writable
    temporary directory the overlay is left out, and krb5.conf alone decides (the log says so)."""
    previous = os.environ.get("KRB5_CONFIG") or _DEFAULT_PROFILE
    configured = str(krb5_config) if krb5_config is not None else None  # the environment's may be a list
    if _set and previous == _set[0]:  # KRB5_CONFIG is as this process (or its forker) set it
        previous = _set[1]  # what the environment named: the file(s) to read without kerberos.krb5_config
    elif _overlay and previous.startswith(_overlay[0] + ":"):
        previous = previous[len(_overlay[0]) + 1 :]
    elif _overlay and previous == _overlay[0] and _merged:
        previous = _merged.base  # the file an earlier call copied: the environment's, without the overlay
        configured = configured or previous
    base = configured or previous
    one_file = _merged.start(configured or "")
    _bases[:] = [] if one_file else [path for path in base.split(":") if path]
    overlay = _overlay_file(_overlay_text())
    value = base
    if overlay:
        value = overlay if one_file else f"{overlay}:{base}"
    os.environ["KRB5_CONFIG"] = value
    _set[:] = [value, previous]
    return value


def refresh_profile() -> None:
    """Write the one-file profile again if krb5.conf changed since; with two files, the overlay again if the KDCs MIT
    reads in krb5.conf changed since (`_primaries`). Looked at once a second at most."""
    _merged.refresh()
    if not _merged and _bases:
        _refresh_primaries()


_primaries_looked: list[float] = [-math.inf]  # with two files: when `_refresh_primaries` last looked


def _refresh_primaries() -> None:
    """With two files MIT reads krb5.conf itself, and rereads it when it changes (an included file too): a KDC added
    there is used at once, so it is named a primary at once too, or a refusal from it went once more to the KDCs
    named primaries at the start (two failures per wrong password until a reload). Once a second: MIT's parser over
    the files (tens of µs), and the overlay written again only where its text differs."""
    now = time.monotonic()
    if now - _primaries_looked[0] < 1.0:
        return
    _primaries_looked[0] = now
    path = _own_overlay()
    if path is None:
        return
    text = _overlay_text()
    if _texts.get(path) != text:
        with contextlib.suppress(OSError):  # the last one stands; looked at again in a second
            _write(path, text)


class _Merged:
    """The overlay file as the overlay's line followed by krb5.conf's text, kept in step with krb5.conf."""

    def __init__(self) -> None:
        self.base = ""  # the krb5.conf copied; "" while the overlay file holds the overlay alone
        self.text = ""  # its text when copied
        self._seen: tuple[int, int, int] | None = None  # krb5.conf's (inode, size, mtime) when copied
        self._looked = 0.0

    def __bool__(self) -> bool:
        return bool(self.base)

    def start(self, base: str) -> bool:
        """Copy `base` into the one file from now on; False (the overlay file holds the overlay alone) where `base`
        is not one plain readable file."""
        self.base, self.text, self._seen = "", "", None
        if not base or ":" in base:
            return False
        text = self._read(base)
        if text is None:
            return False
        self.base, self.text = base, text
        self._looked = time.monotonic()
        return True

    def refresh(self) -> None:
        if not self.base:
            return
        now = time.monotonic()
        if now - self._looked < 1.0:
            return
        self._looked = now
        if self._stat(self.base) == self._seen:
            return
        seen = self._seen
        text = self._read(self.base)  # None (unreadable now): the last copy stays, as MIT keeps a file it cannot reread
        path = _own_overlay()
        if text is None or path is None:
            return
        previous, self.text = self.text, text
        try:
            _write(path, _overlay_text())  # in place: MIT rereads it when it looks again (at most once a second)
        except OSError:
            self.text, self._seen = previous, seen

    def _stat(self, base: str) -> tuple[int, int, int] | None:
        try:
            st = Path(base).stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self, base: str) -> str | None:
        """`base`'s text if the one file can take it (MIT reads it, and it names no other file), else None (said in
        the log where that matters). `_seen` is the file as read, also when refused: an edit is said once."""
        seen = self._stat(base)
        try:
            text = Path(base).read_bytes().decode("utf-8")  # its line ends as written: MIT ends lines at \n only
        except (OSError, UnicodeDecodeError):
            return None
        try:
            lines = krb5conf.read(text)
        except krb5conf.ProfileSyntaxError as e:
            kept = "the last copy" if self.text else "krb5.conf in KRB5_CONFIG's list (MIT reads it itself)"
            log.warning("krb5_conf_not_copied", file=base, reason=str(e), kept=kept)
            self._seen = seen  # once per edit, not once a second
            return None
        directives = [line.raw.strip() for line in lines if line.kind is krb5conf.Kind.DIRECTIVE]
        if directives:
            # a module makes the profile; an included file would join the one file's tree, where the overlay's
            # final mark (`}*`, proxy.kerberos.kdcs) no longer keeps its realm's KDCs out: the list stays
            if self.text:  # an edit of a file copied so far: MIT goes on reading the last copy until a restart
                log.warning(
                    "krb5_conf_not_copied",
                    file=base,
                    reason=f"it now reads other files ({', '.join(directives)}), which the one file cannot take",
                    kept="the last copy; restart the gateway to have MIT read krb5.conf itself",
                )
                self._seen = seen  # once per edit, not once a second
            return None
        self._seen = seen
        return text


_merged = _Merged()


def _overlay_text() -> str:
    """The overlay file's text: the overlay's line, the realms' sections the KDC watch set (`set_realm_section`),
    every KDC of krb5.conf named a primary KDC of its realm (`_primaries`), and in one-file mode krb5.conf's text
    without the watched realms' sections. Across files the sections' final mark (`}*`) keeps krb5.conf's KDCs of the
    realm out; inside one file MIT would add them, so they are left out."""
    text = _OVERLAY + ("\n[realms]\n" + "".join(_realms.values()) if _realms else "")
    text += _primaries([_merged.text] if _merged else [_text_of(path) for path in _bases], _bases)
    if _merged:
        text += "\n" + _without_realms(_merged.text, set(_realms))
    return text


def _primaries(texts: list[str], files: list[str] | None = None) -> str:
    """A `[realms]` section naming every `kdc` of each realm in krb5.conf's `texts` as a `primary_kdc` of that realm
    too ("" where none names a KDC).

    Why: MIT sends a password the KDC refused once more, to the realm's primary KDC (`primary_kdc`, or DNS's
    `_kerberos-master` records), whenever the refusal came from a KDC that is not one of those (a replica may not have
    a new password yet: `krb5_get_init_creds_password`, trace "Retrying AS request with primary KDC"). Each wrong
    Basic password was then two failures at the directory, and the gateway's `basic_failures_per_user` guesses twice
    that many towards its lockout. Named a primary, every KDC's refusal is final: one AS exchange per password. The
    values merge with krb5.conf's own `primary_kdc` lines, in one file or across two, so this needs nothing taken
    out of krb5.conf. The price: a password changed at the primary is refused by a replica until it has it (Active
    Directory's domain controllers ask their PDC emulator themselves). A realm whose KDCs come from DNS alone is left
    to MIT (docs/throttles-and-limits.md).

    With two files, the KDCs are read from krb5.conf's `files` by MIT's own profile parser (`libkrb5.realm_kdcs`),
    which follows `include` and `includedir` as MIT's KDC look-up does: read from the files' text alone, a realm
    whose section is in an included file (as distributions ship krb5.conf) had no primaries named, and every wrong
    password was two failures again. One-file mode copies a file that includes none; without libkrb5, the texts."""
    kdcs: dict[str, dict[str, None]] = {}
    from_mit = libkrb5.realm_kdcs(":".join(files)) if files else None
    for realm, values in (from_mit or {}).items():
        kdcs.setdefault(realm, {}).update(dict.fromkeys(values))
    for text in texts if from_mit is None else []:
        try:
            lines = krb5conf.read(text)
        except krb5conf.ProfileSyntaxError:
            continue  # MIT reads the file itself, or refuses it: nothing to add
        for line in lines:
            if (
                line.kind is krb5conf.Kind.RELATION
                and len(line.path) == 2
                and line.path[0] == "realms"
                and line.name == "kdc"
            ):
                kdcs.setdefault(line.path[1], {})[line.value] = None
    sections = []
    for realm, named in kdcs.items():
        body = "".join(f"        {krb5conf.relation('primary_kdc', kdc)}\n" for kdc in named)
        sections.append(f"    {realm} = {{\n{body}    }}\n")
    return "\n[realms]\n" + "".join(sections) if sections else ""


def _text_of(path: str) -> str:
    """A krb5.conf file's text, "" where it cannot be read as text."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _without_realms(text: str, realms: set[str]) -> str:
    """krb5.conf's `text` without the `[realms]` sections of `realms` (each of them, however many times named), every
    other line as written. `text` is one MIT reads (`_Merged._read` has checked)."""
    if not realms:
        return text
    return "".join(
        line.raw
        for line in krb5conf.read(text)
        if not (line.path[:1] == ("realms",) and line.path[1:2] and line.path[1] in realms)
    )


def _write(path: str, text: str) -> None:
    """Replace `path`'s content at once: a library context opened meanwhile reads the old file or the new."""
    directory, name = os.path.split(path)
    fd, staging = _created(directory, f"{name}.", ".new", text)  # 0600, a name nobody made
    try:
        _later_than(fd, path)
        Path(staging).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(staging).unlink()
        os.close(fd)
        raise
    _texts[path] = text
    _hold_lock(path, fd)


def _later_than(fd: int, path: str) -> None:
    """Give the file open as `fd` a modification time after that of the file `path` names (if any). MIT rereads a
    profile file only when its modification time (seconds and nanoseconds) differs from the one it read, and the
    kernel stamps a new file with a clock that moves in ticks of a few ms: a file replaced within the tick MIT read it
    in kept its time, and every context made afterwards the old text, for as long as a context held it parsed (the
    held one: for good). Times set here only ever grow; a file system keeping no fraction of a second gets a second."""
    try:
        before = Path(path).stat().st_mtime_ns
    except OSError:
        return
    for step in (1_000, 1_000_000_000):
        if os.fstat(fd).st_mtime_ns > before:
            return
        os.utime(fd, ns=(before + step, before + step))


def _created(directory: str | None, prefix: str, suffix: str, text: str) -> tuple[int, str]:
    """A new file holding `text`, and a descriptor holding a shared lock on it (taken before anything is written:
    `_remove_stale` never takes a file of a live process for a dead one's); OSError if it cannot be written."""
    fd, path = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            Path(path).unlink()
        raise
    return fd, path


def _hold_lock(path: str, fd: int) -> None:
    """Keep `fd` (locking `path`'s file) open for as long as `path` is this process's; the earlier one's is let go."""
    earlier = _locks.pop(path, None)
    _locks[path] = fd
    if earlier is not None:
        os.close(earlier)


def _own_overlay() -> str | None:
    """The overlay file in force, if this process wrote it (one inherited over a fork is its writer's)."""
    if _overlay and _overlay[0] in _written.get(os.getpid(), ()):
        return _overlay[0]
    return None


def _overlay_file(text: str) -> str | None:
    """An overlay file of this process's own holding `text`: the one in force if it holds that already, else a new
    one (module docstring, "A reload"), which is then in force; None if none can be written (logged)."""
    current = _own_overlay()
    if current is not None and _texts.get(current) == text:
        return current
    pid = os.getpid()
    try:
        fd, path = _created(None, f"kcd-proxy-krb5-{pid}-", ".conf", text)
    except OSError as e:
        if current is not None:  # rewritten in place, as MIT may miss for a second rather than not at all
            with contextlib.suppress(OSError):
                _write(current, text)
                return current
        log.warning("krb5_overlay_not_written", reason=str(e), fix="set forwardable = true in krb5.conf")
        return None
    _texts[path] = text
    _hold_lock(path, fd)
    if pid not in _written:
        atexit.register(remove_overlay)
    mine = _written.setdefault(pid, [])
    mine.append(path)
    _overlay[:] = [path]
    for old in mine[:-_KEPT]:  # the one before stays for a KDC call begun on it (MIT rereads a file once a second)
        mine.remove(old)
        _remove(old)
    return path


def _remove(path: str) -> None:
    _texts.pop(path, None)
    with contextlib.suppress(OSError):
        Path(path).unlink()
    fd = _locks.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_stale_overlays() -> None:
    """Remove the overlay files gateways killed outright left in the temporary directory (a gateway's start)."""
    _remove_stale(tempfile.gettempdir())


def _remove_stale(directory: str) -> None:
    """Remove the overlay files (and half-written copies) that gateways killed outright left in `directory`: this
    user's regular files, named for a process that is gone, that no process holds locked. A gateway holds a shared
    lock on each of its files for as long as it runs (also in another PID namespace, where its PID means nothing
    here); a PID in use again by another process keeps a dead gateway's file, which the next start after it removes."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        named = _OVERLAY_NAME.fullmatch(entry.name)
        if named is None or _alive(int(named.group(1))):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live process holds it
                Path(entry.path).unlink()
                removed.append(entry.name)
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("krb5_overlays_removed", directory=directory, files=removed, reason="their gateways are gone")


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (ours or another user's). A name's PID beyond a C int (anyone may name a file so
    in /tmp) is no process's."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def set_realm_section(realm: str, section: str | None) -> None:
    """Put `realm`'s section (`proxy.kerberos.kdcs.overlay_section`) in the overlay, or take it out (None: krb5.conf's
    own stands). The file is replaced whole (a new file renamed over it, with a later modification time): a library
    context made afterwards reads it at once, one already open within a second."""
    if section is None:
        if _realms.pop(realm, None) is None:
            return
    else:
        if _realms.get(realm) == section:
            return
        _realms[realm] = section
    path = _own_overlay()
    if path is None:  # no overlay of this process's own to write (none could be written, or it is inherited)
        return
    _write(path, _overlay_text())  # in one-file mode, with krb5.conf's text less the realm's own section


def remove_overlay() -> None:
    """Remove the overlay files this process wrote, if any: at exit, and from a forked worker's own exit
    (`os._exit` runs no atexit handler). A file inherited over a fork is its writer's to remove. A process killed
    outright removes nothing: the next gateway to start does (`_remove_stale`)."""
    for path in _written.pop(os.getpid(), []):
        _remove(path)


def hold_profile() -> bool:
    """Open one krb5 context for the current KRB5_CONFIG, once per process and value; True if one is held. The
    context held for an earlier value is freed once the new one is open (a reload's new file: module docstring)."""
    config = os.environ.get("KRB5_CONFIG")
    if config in _held:
        return True
    library = libkrb5.LIB
    if library is None:
        log.info("krb5_profile_not_held", reason=libkrb5.NOT_LOADED)
        return False
    context = ctypes.c_void_p()
    code = library.krb5_init_context(ctypes.byref(context))
    if code != 0:
        log.info("krb5_profile_not_held", reason=f"krb5_init_context returned {code}")
        return False
    with HELD_LOCK:  # no token is being made on the context freed
        for earlier in list(_held):
            library.krb5_free_context(_held.pop(earlier))
        _held[config] = context  # kept until KRB5_CONFIG names another file, as the file it keeps parsed
    return True


def held_context() -> ctypes.c_void_p | None:
    """The krb5 library context held for the current KRB5_CONFIG (`hold_profile`), else any held one, else None:
    `proxy.kerberos.ap_req` makes Negotiate tokens on it (one thread at a time: under HELD_LOCK)."""
    return _held.get(os.environ.get("KRB5_CONFIG")) or next(iter(_held.values()), None)
