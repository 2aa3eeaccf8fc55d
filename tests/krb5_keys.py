"""The keys inside a Negotiate token, for tests that look for them where they must not be: MIT's `krb5_rd_req` with
the service's keytab opens the AP-REQ as the backend would, and the auth context then holds the ticket's session
key and the initiator's subkey. ctypes over libkrb5 (the gateway's own bindings are its business, not a test's)."""

from __future__ import annotations

import ctypes
import ctypes.util
from ctypes import POINTER, byref, c_char_p, c_int32, c_uint32, c_void_p
from dataclasses import dataclass
from pathlib import Path

_KRB5_OID_DER = bytes.fromhex("06092a864886f712010202")


class _Data(ctypes.Structure):
    _fields_ = (("magic", c_int32), ("length", c_uint32), ("data", c_void_p))


class _Keyblock(ctypes.Structure):
    _fields_ = (("magic", c_int32), ("enctype", c_int32), ("length", c_uint32), ("contents", c_void_p))


def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
    signatures: dict[str, list[type]] = {
        "krb5_init_context": [POINTER(c_void_p)],
        "krb5_free_context": [c_void_p],
        "krb5_kt_resolve": [c_void_p, c_char_p, POINTER(c_void_p)],
        "krb5_kt_close": [c_void_p, c_void_p],
        "krb5_auth_con_init": [c_void_p, POINTER(c_void_p)],
        "krb5_auth_con_setflags": [c_void_p, c_void_p, c_int32],
        "krb5_auth_con_free": [c_void_p, c_void_p],
        "krb5_rd_req": [c_void_p, POINTER(c_void_p), POINTER(_Data), c_void_p, c_void_p, c_void_p, c_void_p],
        "krb5_auth_con_getkey": [c_void_p, c_void_p, POINTER(POINTER(_Keyblock))],
        "krb5_auth_con_getrecvsubkey": [c_void_p, c_void_p, POINTER(POINTER(_Keyblock))],
        "krb5_free_keyblock": [c_void_p, POINTER(_Keyblock)],
    }
    for name, arguments in signatures.items():
        function = getattr(lib, name)
        function.argtypes = arguments
        function.restype = None if name.startswith("krb5_free") else c_int32
    return lib


@dataclass(frozen=True)
class TokenKeys:
    """What a krb5 AP-REQ hides: the AP-REQ's DER, the service ticket's session key and the authenticator's subkey."""

    ap_req: bytes
    session_key: bytes
    subkey: bytes


def ap_req_of(mech_token: bytes) -> bytes:
    """The DER AP-REQ inside a krb5 initial context token (RFC 4121 §4.1: framing, the OID, TOK_ID 01 00)."""
    start = mech_token.index(_KRB5_OID_DER + b"\x01\x00") + len(_KRB5_OID_DER) + 2
    return mech_token[start:]


def token_keys(mech_token: bytes, keytab: Path) -> TokenKeys:
    """Open the krb5 token `mech_token` with the service keys in `keytab` (no replay cache: the time check is off,
    so a token the backend accepted already opens again) and return its keys."""
    lib = _library()
    ap_req = ap_req_of(mech_token)
    context, kt, auth = c_void_p(), c_void_p(), c_void_p()
    assert lib.krb5_init_context(byref(context)) == 0
    try:
        assert lib.krb5_kt_resolve(context, f"FILE:{keytab}".encode(), byref(kt)) == 0
        assert lib.krb5_auth_con_init(context, byref(auth)) == 0
        assert lib.krb5_auth_con_setflags(context, auth, 0) == 0  # no KRB5_AUTH_CONTEXT_DO_TIME: no replay cache
        buffer = ctypes.create_string_buffer(ap_req, len(ap_req))
        data = _Data(0, len(ap_req), ctypes.cast(buffer, c_void_p))
        code = lib.krb5_rd_req(context, byref(auth), byref(data), None, kt, None, None)
        assert code == 0, f"krb5_rd_req: {code}"
        return TokenKeys(
            ap_req,
            _key(lib, context, auth, "krb5_auth_con_getkey"),
            _key(lib, context, auth, "krb5_auth_con_getrecvsubkey"),
        )
    finally:
        if auth:
            lib.krb5_auth_con_free(context, auth)
        if kt:
            lib.krb5_kt_close(context, kt)
        lib.krb5_free_context(context)


def _key(lib: ctypes.CDLL, context: c_void_p, auth: c_void_p, getter: str) -> bytes:
    block = POINTER(_Keyblock)()
    assert getattr(lib, getter)(context, auth, byref(block)) == 0, getter
    assert block, getter
    try:
        return ctypes.string_at(block.contents.contents, block.contents.length)
    finally:
        lib.krb5_free_keyblock(context, block)
