"""MIT's libkrb5 through ctypes: loaded once, with the prototype of every call the gateway makes.

Two modules call libkrb5 directly, for what python-gssapi has no call for: `proxy.kerberos.profile` holds a library
context open (krb5.conf kept parsed between tokens) and reads the realms' KDCs with MIT's own profile parser, includes
followed (`realm_kdcs`), and `proxy.kerberos.ap_req` makes Negotiate tokens on a held service ticket. Both use
`LIB`, loaded here once, the library python-gssapi already has in the process. Every
function they call is declared below with its arguments and result (krb5.h), so a wrong argument raises
`ctypes.ArgumentError` rather than reaching C, and a pointer result is not cut to a C int.

`LIB` is None where libkrb5 cannot be loaded, or is not MIT's (a declared function is missing): then no context is
held (`krb5_profile_not_held`) and python-gssapi makes every token (`krb5_tokens_unavailable`), slower, the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from ctypes import POINTER, c_char_p, c_int32, c_uint32, c_void_p
from typing import Final


class Krb5Error(Exception):
    """A krb5 call failed; the message is MIT's."""


class Data(ctypes.Structure):  # krb5_data
    _fields_ = (("magic", c_int32), ("length", c_uint32), ("data", c_void_p))


class Keyblock(ctypes.Structure):  # krb5_keyblock
    _fields_ = (("magic", c_int32), ("enctype", c_int32), ("length", c_uint32), ("contents", c_void_p))


class Times(ctypes.Structure):  # krb5_ticket_times
    _fields_ = (("authtime", c_int32), ("starttime", c_int32), ("endtime", c_int32), ("renew_till", c_int32))


class Creds(ctypes.Structure):  # krb5_creds
    _fields_ = (
        ("magic", c_int32),
        ("client", c_void_p),
        ("server", c_void_p),
        ("keyblock", Keyblock),
        ("times", Times),
        ("is_skey", c_uint32),
        ("ticket_flags", c_int32),
        ("addresses", c_void_p),
        ("ticket", Data),
        ("second_ticket", Data),
        ("authdata", c_void_p),
    )


# name -> argument types; the result is a krb5_error_code, but for the krb5_free_* calls (void) and those in _RESULTS
_SIGNATURES: Final = {
    "krb5_init_context": [POINTER(c_void_p)],
    "krb5_free_context": [c_void_p],
    "krb5_cc_new_unique": [c_void_p, c_char_p, c_char_p, POINTER(c_void_p)],
    "krb5_cc_get_full_name": [c_void_p, c_void_p, POINTER(c_void_p)],
    "krb5_cc_get_principal": [c_void_p, c_void_p, POINTER(c_void_p)],
    "krb5_cc_destroy": [c_void_p, c_void_p],
    "krb5_parse_name_flags": [c_void_p, c_char_p, c_int32, POINTER(c_void_p)],
    "krb5_free_principal": [c_void_p, c_void_p],
    "krb5_free_string": [c_void_p, c_void_p],
    "krb5_get_credentials": [c_void_p, c_int32, c_void_p, POINTER(Creds), POINTER(POINTER(Creds))],
    "krb5_free_creds": [c_void_p, POINTER(Creds)],
    "krb5_auth_con_init": [c_void_p, POINTER(c_void_p)],
    "krb5_auth_con_setflags": [c_void_p, c_void_p, c_int32],
    "krb5_auth_con_set_req_cksumtype": [c_void_p, c_void_p, c_int32],
    "krb5_auth_con_free": [c_void_p, c_void_p],
    "krb5_mk_req_extended": [c_void_p, POINTER(c_void_p), c_int32, POINTER(Data), POINTER(Creds), POINTER(Data)],
    "krb5_free_data_contents": [c_void_p, POINTER(Data)],
    "krb5_get_error_message": [c_void_p, c_int32],
    "krb5_free_error_message": [c_void_p, c_void_p],
    "profile_init_path": [c_char_p, POINTER(c_void_p)],
    "profile_get_subsection_names": [c_void_p, POINTER(c_char_p), POINTER(POINTER(c_char_p))],
    "profile_get_values": [c_void_p, POINTER(c_char_p), POINTER(POINTER(c_char_p))],
    "profile_free_list": [POINTER(c_char_p)],
    "profile_release": [c_void_p],
}
_RESULTS: Final = {
    "krb5_get_error_message": c_void_p,  # const char *, freed with krb5_free_error_message
    "profile_free_list": None,  # void
    "profile_release": None,  # void
}


def _load() -> tuple[ctypes.CDLL | None, str]:
    """MIT's libkrb5 with the prototypes above, or None and why not (no libkrb5, or not MIT's)."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
        for name, arguments in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = arguments
            function.restype = _RESULTS.get(name, None if name.startswith("krb5_free") else c_int32)
    except (OSError, AttributeError) as e:
        return None, str(e)
    return library, ""


LIB, NOT_LOADED = _load()  # NOT_LOADED: why LIB is None, for the log ("" when loaded)


def check(code: int, context: c_void_p, what: str) -> None:
    """Raise Krb5Error with MIT's message for a non-zero code of `what`, called on `context`."""
    if code == 0:
        return
    assert LIB is not None
    message = f"error {code}"
    text = LIB.krb5_get_error_message(context, code)
    if text:
        message = ctypes.string_at(text).decode("utf-8", "replace")
        LIB.krb5_free_error_message(context, text)
    raise Krb5Error(f"{what}: {message}")


def realm_kdcs(files: str) -> dict[str, list[str]] | None:
    """Each realm's `kdc` values in the krb5.conf `files` (a KRB5_CONFIG-style colon-separated list), as MIT's profile
    library reads them: `include`, `includedir` and `module` followed, sections named twice merged, final marks kept.
    None where libkrb5 is not loaded or MIT reads none of the files."""
    if LIB is None:
        return None
    handle = c_void_p()
    if LIB.profile_init_path(files.encode(), ctypes.byref(handle)) != 0:
        return None
    try:
        return {realm: _profile_list(handle, "profile_get_values", ("realms", realm, "kdc"))
                for realm in _profile_list(handle, "profile_get_subsection_names", ("realms",))}  # fmt: skip
    finally:
        LIB.profile_release(handle)


def _profile_list(handle: c_void_p, call: str, path: tuple[str, ...]) -> list[str]:
    """The names or values the profile call `call` answers at `path`; [] where there are none."""
    assert LIB is not None
    names = (c_char_p * (len(path) + 1))(*[name.encode() for name in path], None)
    found = POINTER(c_char_p)()
    if getattr(LIB, call)(handle, names, ctypes.byref(found)) != 0:
        return []  # PROF_NO_SECTION, PROF_NO_RELATION: nothing there
    values: list[str] = []
    while (value := found[len(values)]) is not None:
        values.append(value.decode("utf-8", "replace"))
    LIB.profile_free_list(found)
    return values
