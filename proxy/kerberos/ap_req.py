"""The krb5 initial context token of a Negotiate header, made by MIT's krb5 library on a held library context.

Theory of operation. For the first token of a security context on a cached service ticket, without mutual
authentication, MIT's krb5 GSS initiator (`gss_init_sec_context`, MIT 1.20's init_sec_context.c) creates a krb5
library context, looks the evidence ticket and then the service ticket up in the user's MEMORY ccache (each
look-up copies every entry of the cache to compare it), and calls `krb5_mk_req_extended` with:

- the AP option USE_SUBKEY alone (it is not a wire option: the AP-REQ's ap-options are all clear), so the
  authenticator carries a fresh random subkey of the session key's enctype;
- an auth context with DO_SEQUENCE only, so the authenticator carries a fresh random sequence number;
- the GSS checksum (type 0x8003, RFC 4121 §4.1.1): Lgth 16, Bnd 16 zero bytes (no channel bindings), and
  Flags: the context flags asked for, plus CONF, INTEG and TRANS, which MIT adds to every context;

then frames the AP-REQ as RFC 4121 §4.1 says (`[APPLICATION 0]`, the krb5 OID, TOK_ID 01 00, the AP-REQ) and
frees the library context (MIT 1.20 makes and frees a second one when it releases "no credential"; fixed
upstream since, in no release yet). `TicketTokens` makes the same call with the same inputs on the same ticket,
on the library context `proxy.kerberos.profile` holds for the life of the process: MIT's own code builds the
authenticator, its time (this host's clock, as MIT's per-token context has it for a cached ticket), subkey,
sequence number, encryption and DER. The service ticket is read once per exchange (`TicketTokens.read`, in the
exchange's thread, through a MEMORY ccache copy destroyed at once) and kept as MIT's `krb5_creds` until the
gateway lets the ticket go: `krb5_free_creds` (which zeroes the session key) runs when the `TicketTokens` is
collected, so the key never outlives the cache entry that holds it, and no token can be made on freed memory.

Why not python-gssapi: GSSAPI has no call that takes a library context or a ticket; every `gss_init_sec_context`
makes its own context (two in MIT 1.20) and does both ccache look-ups, about half of MIT's instructions per token
(docs/performance.md, "The token's remaining cost, attributed"). These are MIT's public krb5 calls (krb5.h), the
library python-gssapi already loads. Where libkrb5 is not there, or a ticket cannot be read this way, the
delegator keeps python-gssapi's path (the same token, slower).

Threads: a library context must not be used by two threads at once; tokens are made on the event loop thread and
a diagnostic may make one from another, so every use of the held context holds `_LOCK`. Every krb5 call's code is
checked: a failure raises `Krb5Error` with MIT's message, after everything allocated was freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
import weakref
from collections.abc import Iterable
from ctypes import POINTER, byref, c_char_p, c_int32, c_uint32, c_void_p
from typing import Final

import gssapi
import gssapi.raw

from proxy.kerberos.profile import held_context
from proxy.kerberos.spnego import KRB5_OID_DER

_TOK_ID_AP_REQ: Final = b"\x01\x00"  # RFC 4121 §4.1
_AP_OPTS_USE_SUBKEY: Final = 0x1
_DO_SEQUENCE: Final = 0x4  # KRB5_AUTH_CONTEXT_DO_SEQUENCE
_GSS_CHECKSUM: Final = 0x8003  # CKSUMTYPE_KG_CB: mk_req_extended puts the checksum data in as it is
_GC_CACHED: Final = 2  # KRB5_GC_CACHED: the ccache only, never the KDC
_PARSE_IGNORE_REALM: Final = 0x8  # KRB5_PRINCIPAL_PARSE_IGNORE_REALM: the name with the referral (empty) realm
# gss_init_sec_context's flags as MIT keeps them for a context it makes: what MIT supports without an AP-REP
# or a forwarded TGT, and what it adds (CONF | INTEG, TRANS).
_ALLOWED_FLAGS: Final = 4 | 8 | 16 | 32  # REPLAY, SEQUENCE, CONF, INTEG
_MIT_ADDS: Final = 16 | 32 | 256  # CONF, INTEG, TRANS


class Krb5Error(Exception):
    """A krb5 call failed; the message is MIT's."""


class _Data(ctypes.Structure):
    _fields_ = (("magic", c_int32), ("length", c_uint32), ("data", c_void_p))


class _Keyblock(ctypes.Structure):
    _fields_ = (("magic", c_int32), ("enctype", c_int32), ("length", c_uint32), ("contents", c_void_p))


class _Times(ctypes.Structure):
    _fields_ = (("authtime", c_int32), ("starttime", c_int32), ("endtime", c_int32), ("renew_till", c_int32))


class _Creds(ctypes.Structure):  # krb5_creds (krb5.h)
    _fields_ = (
        ("magic", c_int32),
        ("client", c_void_p),
        ("server", c_void_p),
        ("keyblock", _Keyblock),
        ("times", _Times),
        ("is_skey", c_uint32),
        ("ticket_flags", c_int32),
        ("addresses", c_void_p),
        ("ticket", _Data),
        ("second_ticket", _Data),
        ("authdata", c_void_p),
    )


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
    "krb5_get_credentials": [c_void_p, c_int32, c_void_p, POINTER(_Creds), POINTER(POINTER(_Creds))],
    "krb5_free_creds": [c_void_p, POINTER(_Creds)],
    "krb5_auth_con_init": [c_void_p, POINTER(c_void_p)],
    "krb5_auth_con_setflags": [c_void_p, c_void_p, c_int32],
    "krb5_auth_con_set_req_cksumtype": [c_void_p, c_void_p, c_int32],
    "krb5_auth_con_free": [c_void_p, c_void_p],
    "krb5_mk_req_extended": [c_void_p, POINTER(c_void_p), c_int32, POINTER(_Data), POINTER(_Creds), POINTER(_Data)],
    "krb5_free_data_contents": [c_void_p, POINTER(_Data)],
    "krb5_get_error_message": [c_void_p, c_int32],
    "krb5_free_error_message": [c_void_p, c_void_p],
}
# The held library context, one thread at a time. Reentrant: a collection inside `token` may run a finalizer.
_LOCK = threading.RLock()


def _load() -> ctypes.CDLL | None:
    """MIT's libkrb5 with the signatures above, or None (then python-gssapi makes every token)."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
        for name, arguments in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = arguments
            function.restype = c_int32
            if name.startswith("krb5_free"):
                function.restype = None
        library.krb5_get_error_message.restype = c_void_p  # const char *, freed with krb5_free_error_message
    except (OSError, AttributeError):  # no libkrb5, or not MIT's
        return None
    return library


_LIB: Final = _load()


def _check(code: int, context: c_void_p, what: str) -> None:
    """Raise Krb5Error with MIT's message for a non-zero code of `what`."""
    if code == 0:
        return
    assert _LIB is not None
    message = f"error {code}"
    text = _LIB.krb5_get_error_message(context, code)
    if text:
        message = ctypes.string_at(text).decode("utf-8", "replace")
        _LIB.krb5_free_error_message(context, text)
    raise Krb5Error(f"{what}: {message}")


def gss_checksum(flags: Iterable[gssapi.RequirementFlag]) -> bytes:
    """The authenticator's checksum data (RFC 4121 §4.1.1) MIT writes for these context flags and no channel
    bindings: Lgth 16, 16 zero bytes, the flags (MIT's additions included), little-endian."""
    asked = 0
    for flag in flags:
        asked |= int(flag)
    if asked & ~_ALLOWED_FLAGS:
        raise ValueError(
            f"context flags {asked:#x}: only replay, sequence, confidentiality and integrity are made here"
        )
    return (16).to_bytes(4, "little") + bytes(16) + (asked | _MIT_ADDS).to_bytes(4, "little")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


class TicketTokens:
    """One cached service ticket, held as MIT's `krb5_creds`: krb5 initial context tokens made on it."""

    def __init__(self, creds: ctypes._Pointer[_Creds], checksum: bytes) -> None:
        self._creds = creds
        self._checksum = ctypes.create_string_buffer(checksum, len(checksum))
        self._checksum_data = _Data(0, len(checksum), ctypes.cast(self._checksum, c_void_p))
        self._endtime = creds.contents.times.endtime & 0xFFFFFFFF  # krb5_timestamp: unsigned past 2038
        self.freed = weakref.finalize(self, _free_creds, creds)  # `freed.alive` until the ticket is let go

    @classmethod
    def read(
        cls, creds: gssapi.Credentials, target: gssapi.raw.Name, flags: Iterable[gssapi.RequirementFlag]
    ) -> TicketTokens:
        """The service ticket for `target` (a krb5 mechanism name) in the user's impersonated credential, after
        S4U2Proxy put it there. It is copied into a MEMORY ccache of a temporary library context (so the held
        context never adopts a ccache's KDC time offset: MIT's per-token context does not either), read with
        KRB5_GC_CACHED (never the KDC), and the copy destroyed. Raises Krb5Error or GSSError."""
        if _LIB is None or held_context() is None:
            raise Krb5Error("libkrb5 is not loaded")
        checksum = gss_checksum(flags)
        server_name = bytes(gssapi.raw.display_name(target).name)  # e.g. HTTP/cas.lab.test@LAB.TEST
        context = c_void_p()
        _check(_LIB.krb5_init_context(byref(context)), context, "krb5_init_context")
        try:
            return cls(_read(context, creds, server_name), checksum)
        finally:
            _LIB.krb5_free_context(context)

    def token(self) -> bytes:
        """A krb5 initial context token (RFC 4121 §4.1) with a fresh authenticator, as MIT's GSS initiator makes
        it (the module's docstring). Raises Krb5Error (an expired ticket: MIT's own refusal, before any work)."""
        assert _LIB is not None
        if time.time() > self._endtime:  # as gss_init_sec_context, without clock-skew forgiveness
            raise Krb5Error("the service ticket has expired")
        request = _Data()
        with _LOCK:
            context = held_context()
            if context is None:
                raise Krb5Error("no krb5 library context is held")
            auth = c_void_p()
            _check(_LIB.krb5_auth_con_init(context, byref(auth)), context, "krb5_auth_con_init")
            try:
                _check(_LIB.krb5_auth_con_setflags(context, auth, _DO_SEQUENCE), context, "krb5_auth_con_setflags")
                code = _LIB.krb5_auth_con_set_req_cksumtype(context, auth, _GSS_CHECKSUM)
                _check(code, context, "krb5_auth_con_set_req_cksumtype")
                code = _LIB.krb5_mk_req_extended(
                    context, byref(auth), _AP_OPTS_USE_SUBKEY, byref(self._checksum_data), self._creds, byref(request)
                )
                _check(code, context, "krb5_mk_req_extended")
                try:
                    ap_req = ctypes.string_at(request.data, request.length)
                finally:
                    _LIB.krb5_free_data_contents(context, byref(request))
            finally:
                _LIB.krb5_auth_con_free(context, auth)
        inner = KRB5_OID_DER + _TOK_ID_AP_REQ + ap_req
        return b"\x60" + _der_length(len(inner)) + inner


def _read(context: c_void_p, creds: gssapi.Credentials, server_name: bytes) -> ctypes._Pointer[_Creds]:
    """The service ticket from a MEMORY ccache copy of `creds` made and destroyed here (see `TicketTokens.read`)."""
    assert _LIB is not None
    cache = c_void_p()
    _check(_LIB.krb5_cc_new_unique(context, b"MEMORY", None, byref(cache)), context, "krb5_cc_new_unique")
    try:
        full = c_void_p()
        _check(_LIB.krb5_cc_get_full_name(context, cache, byref(full)), context, "krb5_cc_get_full_name")
        name = ctypes.string_at(full).decode()
        _LIB.krb5_free_string(context, full)
        gssapi.raw.store_cred_into(
            {"ccache": name}, creds, usage="initiate", mech=gssapi.MechType.kerberos, overwrite=True
        )
        wanted = _Creds()
        client, server = c_void_p(), c_void_p()
        try:
            _check(_LIB.krb5_cc_get_principal(context, cache, byref(client)), context, "krb5_cc_get_principal")
            # MIT asks S4U2Proxy for a host-based name in the referral realm and files the ticket under it
            code = _LIB.krb5_parse_name_flags(context, server_name, _PARSE_IGNORE_REALM, byref(server))
            _check(code, context, "krb5_parse_name_flags")
            wanted.client, wanted.server = client, server
            found = POINTER(_Creds)()
            code = _LIB.krb5_get_credentials(context, _GC_CACHED, cache, byref(wanted), byref(found))
            _check(code, context, "krb5_get_credentials")
        finally:
            _LIB.krb5_free_principal(context, client)
            _LIB.krb5_free_principal(context, server)
        return found
    finally:
        _LIB.krb5_cc_destroy(context, cache)  # MIT zeroes the copies' keys


def _free_creds(creds: ctypes._Pointer[_Creds]) -> None:
    """MIT's krb5_free_creds (it zeroes the session key); the context argument is not used for memory."""
    assert _LIB is not None
    with _LOCK:
        _LIB.krb5_free_creds(held_context(), creds)
