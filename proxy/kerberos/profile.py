"""Keep MIT krb5's parsed configuration in memory between GSSAPI calls.

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

import ctypes
import ctypes.util
import os

import structlog

log = structlog.get_logger("proxy.kerberos")

_held: dict[str | None, ctypes.c_void_p] = {}  # KRB5_CONFIG -> the context kept open for it


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
