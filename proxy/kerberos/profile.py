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
checks the file's modification time (at most once a second) and rereads it when it changes.

python-gssapi has no call for a krb5 context and this is the only one needed, so it is two C calls through
ctypes rather than another Kerberos binding. Without libkrb5 to load, tokens work as before, only slower.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger("proxy.kerberos")

_held: dict[str | None, ctypes.c_void_p] = {}  # KRB5_CONFIG -> the context kept open for it
_DEFAULT_PROFILE = "/etc/krb5.conf"  # MIT's, when KRB5_CONFIG is not set
_OVERLAY = "[libdefaults]\n    forwardable = true\n"
_overlay: list[str] = []  # the overlay file in force in this process, written once (or inherited over a fork)
_realms: dict[str, str] = {}  # realm -> its [realms] section in the overlay (`proxy.kerberos.kdcs`: answering KDCs)
_written: dict[int, str] = {}  # pid -> the overlay file that process wrote, which only it removes


def use_profile(krb5_config: Path | None) -> str:
    """Set KRB5_CONFIG for this process: the gateway's overlay, then `krb5_config` (or what KRB5_CONFIG named
    before, or MIT's default). Returns the value set. Without a writable temporary directory the overlay is
    left out, and krb5.conf alone decides (the log says so)."""
    previous = os.environ.get("KRB5_CONFIG") or _DEFAULT_PROFILE
    if _overlay and previous.startswith(_overlay[0] + ":"):
        previous = previous[len(_overlay[0]) + 1 :]
    base = str(krb5_config) if krb5_config is not None else previous
    overlay = _overlay_file()
    value = f"{overlay}:{base}" if overlay else base
    os.environ["KRB5_CONFIG"] = value
    return value


def _overlay_file() -> str | None:
    if not _overlay:
        try:
            fd, path = tempfile.mkstemp(prefix=f"kcd-proxy-krb5-{os.getpid()}-", suffix=".conf")
            with os.fdopen(fd, "w") as out:
                out.write(_OVERLAY)
        except OSError as e:
            log.warning("krb5_overlay_not_written", reason=str(e), fix="set forwardable = true in krb5.conf")
            return None
        _written[os.getpid()] = path
        atexit.register(remove_overlay)
        _overlay.append(path)
    return _overlay[0]


def set_realm_section(realm: str, section: str | None) -> None:
    """Put `realm`'s section (`proxy.kerberos.kdcs.overlay_section`) in the overlay, or take it out (None: krb5.conf's
    own stands). The file is replaced whole (a new file renamed over it): MIT rereads it when its modification time
    changes, at most once a second."""
    if section is None:
        if _realms.pop(realm, None) is None:
            return
    else:
        if _realms.get(realm) == section:
            return
        _realms[realm] = section
    path = _overlay[0] if _overlay and _written.get(os.getpid()) == _overlay[0] else None
    if path is None:  # no overlay of this process's own to write (none could be written, or it is inherited)
        return
    text = _OVERLAY + ("\n[realms]\n" + "".join(_realms.values()) if _realms else "")
    fd, temporary = tempfile.mkstemp(prefix=Path(path).name, dir=Path(path).parent)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    Path(temporary).replace(path)


def remove_overlay() -> None:
    """Remove the overlay file this process wrote, if any: at exit, and from a forked worker's own exit
    (`os._exit` runs no atexit handler). A file inherited over a fork is its writer's to remove."""
    path = _written.pop(os.getpid(), None)
    if path is not None:
        with contextlib.suppress(OSError):
            Path(path).unlink()


def hold_profile() -> bool:
    """Open one krb5 context for the current KRB5_CONFIG, once per process and file; True if one is held."""
    config = os.environ.get("KRB5_CONFIG")
    if config in _held:
        return True
    name = ctypes.util.find_library("krb5") or "libkrb5.so.3"
    try:
        library = ctypes.CDLL(name)
    except OSError as e:
        log.info("krb5_profile_not_held", reason=str(e))
        return False
    context = ctypes.c_void_p()
    code = library.krb5_init_context(ctypes.byref(context))
    if code != 0:
        log.info("krb5_profile_not_held", reason=f"krb5_init_context returned {code}")
        return False
    _held[config] = context  # never freed: it lives as long as the process, as the files it keeps parsed
    return True
