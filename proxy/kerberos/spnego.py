"""The SPNEGO NegTokenInit around a krb5 initial context token: the bytes of `Authorization: Negotiate`.

Theory of operation. An HTTP Negotiate header carries a SPNEGO initial token (RFC 4559, RFC 4178 §4.2): the
GSS framing of RFC 2743 §3.1 (`[APPLICATION 0]` and the SPNEGO OID 1.3.6.1.5.5.2) around a NegTokenInit whose
mechTypes list the mechanisms the initiator offers, most preferred first, and whose mechToken is the first
token of the first of them (the "optimistic" token). The gateway offers krb5 alone (1.2.840.113554.1.2.2) and
its mechToken is the krb5 AP-REQ token (RFC 4121 §4.1) built by MIT on the cached service ticket: exactly the
token MIT's own SPNEGO initiator sends for a krb5 credential, byte for byte in the framing (no reqFlags, no
mechListMIC; `tests/integration/test_negotiate_token.py` compares the two). docs/negotiate-token.md says
what MIT, Apache and Windows/IIS acceptors do with it.

Why not MIT's SPNEGO mechanism: for one token it made the mechanism glue import the target name into krb5 and
release it again, each with a krb5 library context of its own (a profile check, allocations), on top of the
krb5 token itself; with the target name canonicalised for krb5 once (`gss_canonicalize_name`) and the krb5
mechanism asked directly, a token costs 24 instead of 35 µs of CPU here (docs/performance.md, "The
Negotiate token on the default route"). Why not pyasn1: the structure is fixed, four nested lengths around
one OCTET STRING; an ASN.1 encoder per request would cost more than it saves. Pure: no I/O, no Kerberos library.
"""

from __future__ import annotations

import functools
from typing import Final

SPNEGO_OID_DER: Final = bytes.fromhex("06062b0601050502")  # 1.3.6.1.5.5.2
KRB5_OID_DER: Final = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2
_MECH_TYPES: Final = b"\xa0\x0d\x30\x0b" + KRB5_OID_DER  # [0] MechTypeList: SEQUENCE OF MechType, krb5 only
KRB5_AP_REQ: Final = b"\x01\x00"  # RFC 4121 §4.1: TOK_ID of an initial context token carrying a KRB_AP_REQ


def _length(n: int) -> bytes:
    """A DER length: short form under 128, else the long form's count byte and big-endian octets."""
    if n < 0x80:
        return bytes((n,))
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def initial_context_token(inner: bytes) -> bytes:
    """RFC 2743 §3.1's framing around `inner` (a mechanism's OID, then its token): `[APPLICATION 0]` and its length;
    the SPNEGO token's and the krb5 token's around an AP-REQ (`neg_token_init_ap_req`)."""
    return b"\x60" + _length(len(inner)) + inner


def _krb5_initial(token: bytes) -> bool:
    """Whether `token` is a krb5 initial context token: `[APPLICATION 0]`, the krb5 OID, TOK_ID 01 00."""
    if len(token) < 2 or token[0] != 0x60:
        return False
    start = 2 + (token[1] & 0x7F if token[1] & 0x80 else 0)
    return token.startswith(KRB5_OID_DER + KRB5_AP_REQ, start)


def neg_token_init(krb5_token: bytes) -> bytes:
    """The SPNEGO initial token offering krb5 only, with `krb5_token` (a krb5 initial context token) as its
    optimistic mechToken. Anything else is a programming error (ValueError), never wrapped and sent."""
    if not _krb5_initial(krb5_token):
        raise ValueError("not a krb5 initial context token (RFC 4121 §4.1): nothing to wrap in a NegTokenInit")
    mech_token = b"\x04" + _length(len(krb5_token)) + krb5_token  # OCTET STRING
    fields = _MECH_TYPES + b"\xa2" + _length(len(mech_token)) + mech_token  # mechTypes [0], mechToken [2]
    sequence = b"\x30" + _length(len(fields)) + fields  # NegTokenInit ::= SEQUENCE
    choice = b"\xa0" + _length(len(sequence)) + sequence  # NegotiationToken: negTokenInit [0]
    return initial_context_token(SPNEGO_OID_DER + choice)  # InitialContextToken ::= [APPLICATION 0] IMPLICIT SEQUENCE


def neg_token_init_ap_req(ap_req: bytes) -> bytes:
    """`neg_token_init` of the krb5 initial context token around `ap_req` (RFC 4121 §4.1: `[APPLICATION 0]`, the krb5
    OID, TOK_ID 01 00, the AP-REQ), in one concatenation: the AP-REQ is the last field of both framings, so every
    byte before it depends on its length alone (`_framing`, made once per length; an AP-REQ's length changes only
    with its ticket's)."""
    if not ap_req:
        raise ValueError("an empty AP-REQ: nothing to wrap in a NegTokenInit")
    return _framing(len(ap_req)) + ap_req


@functools.lru_cache(maxsize=256)
def _framing(length: int) -> bytes:
    """The bytes of `neg_token_init_ap_req`'s token before an AP-REQ of `length` bytes."""
    token = neg_token_init(initial_context_token(KRB5_OID_DER + KRB5_AP_REQ + bytes(length)))
    return token[: len(token) - length]
