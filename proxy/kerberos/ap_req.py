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
sequence number, encryption and DER (`TicketTokens.ap_req`; `proxy.kerberos.spnego` adds the two framings around
it). The service ticket is read once per exchange (`TicketTokens.read`, in the
exchange's thread, through a MEMORY ccache copy destroyed at once) and kept as MIT's `krb5_creds` until the
gateway lets the ticket go: `krb5_free_creds` (which zeroes the session key) runs when the `TicketTokens` is
collected, so the key never outlives the cache entry that holds it, and no token can be made on freed memory.

Why not python-gssapi: GSSAPI has no call that takes a library context or a ticket; every `gss_init_sec_context`
makes its own context (two in MIT 1.20) and does both ccache look-ups, about half of MIT's instructions per token
(docs/performance.md, "The token's remaining cost, attributed"). These are MIT's public krb5 calls (krb5.h), the
library python-gssapi already loads (`proxy.kerberos.libkrb5`: loaded once, every prototype declared). Where
libkrb5 is not there, or a ticket cannot be read this way, the delegator keeps python-gssapi's path (the same
token, slower).

Threads: a library context must not be used by two threads at once; tokens are made on the event loop thread and
a diagnostic may make one from another, so every use of the held context holds `proxy.kerberos.profile.HELD_LOCK`.
Every krb5 call's code is checked: a failure raises `Krb5Error` with MIT's message, after everything allocated was
freed.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Iterable
from ctypes import POINTER, byref, c_void_p
from typing import Final

import gssapi
import gssapi.raw

from proxy.kerberos import libkrb5
from proxy.kerberos.libkrb5 import Creds, Data, check
from proxy.kerberos.libkrb5 import Krb5Error as Krb5Error  # the delegator's to catch
from proxy.kerberos.profile import HELD_LOCK, held_context

_AP_OPTS_USE_SUBKEY: Final = 0x1
_DO_SEQUENCE: Final = 0x4  # KRB5_AUTH_CONTEXT_DO_SEQUENCE
_GSS_CHECKSUM: Final = 0x8003  # CKSUMTYPE_KG_CB: mk_req_extended puts the checksum data in as it is
_GC_CACHED: Final = 2  # KRB5_GC_CACHED: the ccache only, never the KDC
_PARSE_IGNORE_REALM: Final = 0x8  # KRB5_PRINCIPAL_PARSE_IGNORE_REALM: the name with the referral (empty) realm
# gss_init_sec_context's flags as MIT keeps them for a context it makes: what MIT supports without an AP-REP
# or a forwarded TGT, and what it adds (CONF | INTEG, TRANS).
_ALLOWED_FLAGS: Final = 4 | 8 | 16 | 32  # REPLAY, SEQUENCE, CONF, INTEG
_MIT_ADDS: Final = 16 | 32 | 256  # CONF, INTEG, TRANS


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


# `TicketTokens.ap_req`'s scratch, used under HELD_LOCK only (one token at a time in the process): the auth context's
# handle and the AP-REQ MIT returns, with the `byref`s MIT is given, made once rather than for every token.
_AUTH = c_void_p()
_AUTH_REF = byref(_AUTH)
_REQUEST = Data()
_REQUEST_REF = byref(_REQUEST)


class TicketTokens:
    """One cached service ticket, held as MIT's `krb5_creds`: the AP-REQs of krb5 initial context tokens made on it."""

    def __init__(self, creds: ctypes._Pointer[Creds], checksum: bytes) -> None:
        self._creds = creds
        self._checksum = ctypes.create_string_buffer(checksum, len(checksum))
        self._checksum_data = Data(0, len(checksum), ctypes.cast(self._checksum, c_void_p))
        self._checksum_ref = byref(self._checksum_data)
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
        library = libkrb5.LIB
        if library is None or held_context() is None:
            raise Krb5Error("libkrb5 is not loaded")
        checksum = gss_checksum(flags)
        server_name = bytes(gssapi.raw.display_name(target).name)  # e.g. HTTP/cas.lab.test@LAB.TEST
        context = c_void_p()
        check(library.krb5_init_context(byref(context)), context, "krb5_init_context")
        try:
            return cls(_read(context, creds, server_name), checksum)
        finally:
            library.krb5_free_context(context)

    def ap_req(self) -> bytes:
        """A KRB_AP_REQ with a fresh authenticator, as MIT's GSS initiator makes it for a krb5 initial context token
        (the module's docstring; `proxy.kerberos.spnego.neg_token_init_ap_req` frames it). Raises Krb5Error (an
        expired ticket: MIT's own refusal, before any work)."""
        library = libkrb5.LIB
        assert library is not None
        if time.time() > self._endtime:  # as gss_init_sec_context, without clock-skew forgiveness
            raise Krb5Error("the service ticket has expired")
        with HELD_LOCK:
            context = held_context()
            if context is None:
                raise Krb5Error("no krb5 library context is held")
            # `if code:` before `check`: a call less per step of every token
            code = library.krb5_auth_con_init(context, _AUTH_REF)
            if code:
                check(code, context, "krb5_auth_con_init")
            try:
                code = library.krb5_auth_con_setflags(context, _AUTH, _DO_SEQUENCE)
                if code:
                    check(code, context, "krb5_auth_con_setflags")
                code = library.krb5_auth_con_set_req_cksumtype(context, _AUTH, _GSS_CHECKSUM)
                if code:
                    check(code, context, "krb5_auth_con_set_req_cksumtype")
                code = library.krb5_mk_req_extended(
                    context, _AUTH_REF, _AP_OPTS_USE_SUBKEY, self._checksum_ref, self._creds, _REQUEST_REF
                )
                if code:
                    check(code, context, "krb5_mk_req_extended")
                try:
                    return ctypes.string_at(_REQUEST.data, _REQUEST.length)
                finally:
                    library.krb5_free_data_contents(context, _REQUEST_REF)
            finally:
                library.krb5_auth_con_free(context, _AUTH)
                _AUTH.value = None


def _read(context: c_void_p, creds: gssapi.Credentials, server_name: bytes) -> ctypes._Pointer[Creds]:
    """The service ticket from a MEMORY ccache copy of `creds` made and destroyed here (see `TicketTokens.read`)."""
    library = libkrb5.LIB
    assert library is not None
    cache = c_void_p()
    check(library.krb5_cc_new_unique(context, b"MEMORY", None, byref(cache)), context, "krb5_cc_new_unique")
    try:
        full = c_void_p()
        check(library.krb5_cc_get_full_name(context, cache, byref(full)), context, "krb5_cc_get_full_name")
        name = ctypes.string_at(full)
        library.krb5_free_string(context, full)
        # bytes, never str: python-gssapi (1.12) hands MIT pointers into bytes it encodes a str key or value into
        # and frees before MIT reads them (with the GIL released): another thread's allocations then made MIT
        # store this user's credential into the default ccache or a FILE ccache named by garbage in the working
        # directory (tests/integration/test_ccache_names.py). The dict's own bytes live through the call.
        gssapi.raw.store_cred_into(
            {b"ccache": name}, creds, usage="initiate", mech=gssapi.MechType.kerberos, overwrite=True
        )
        wanted = Creds()
        client, server = c_void_p(), c_void_p()
        try:
            check(library.krb5_cc_get_principal(context, cache, byref(client)), context, "krb5_cc_get_principal")
            # MIT asks S4U2Proxy for a host-based name in the referral realm and files the ticket under it
            code = library.krb5_parse_name_flags(context, server_name, _PARSE_IGNORE_REALM, byref(server))
            check(code, context, "krb5_parse_name_flags")
            wanted.client, wanted.server = client, server
            found = POINTER(Creds)()
            code = library.krb5_get_credentials(context, _GC_CACHED, cache, byref(wanted), byref(found))
            check(code, context, "krb5_get_credentials")
        finally:
            library.krb5_free_principal(context, client)
            library.krb5_free_principal(context, server)
        return found
    finally:
        library.krb5_cc_destroy(context, cache)  # MIT zeroes the copies' keys


def _free_creds(creds: ctypes._Pointer[Creds]) -> None:
    """MIT's krb5_free_creds (it zeroes the session key); the context argument is not used for memory."""
    library = libkrb5.LIB
    assert library is not None
    with HELD_LOCK:
        library.krb5_free_creds(held_context(), creds)
