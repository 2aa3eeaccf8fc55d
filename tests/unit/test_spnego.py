"""The NegTokenInit the gateway wraps around its krb5 token (`proxy.kerberos.spnego`), read back by pyasn1's DER
decoder with RFC 4178's ASN.1 (`tests.negotiate_asn1`), not by the encoder's own code."""

from __future__ import annotations

import pytest

from proxy.kerberos.spnego import (
    KRB5_AP_REQ,
    KRB5_OID_DER,
    initial_context_token,
    neg_token_init,
    neg_token_init_ap_req,
)
from tests.negotiate_asn1 import KRB5, read_negotiate


def _length(n: int) -> bytes:
    return (
        bytes((n,))
        if n < 0x80
        else bytes((0x80 | ((n.bit_length() + 7) // 8),)) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    )


def _krb5_token(ap_req_padding: int) -> bytes:
    """A krb5 initial context token whose AP-REQ is a minimal, well-formed one (a dummy ticket and authenticator),
    its authenticator cipher `ap_req_padding` bytes long: the sizes cross every DER length form."""

    def tlv(tag: int, value: bytes) -> bytes:
        return bytes((tag,)) + _length(len(value)) + value

    def integer(n: int) -> bytes:
        return tlv(0x02, bytes((n,)))

    def general(s: str) -> bytes:
        return tlv(0x1B, s.encode())

    def enc(cipher: bytes) -> bytes:
        return tlv(0x30, tlv(0xA0, integer(18)) + tlv(0xA2, tlv(0x04, cipher)))

    sname = tlv(0x30, tlv(0xA0, integer(3)) + tlv(0xA1, tlv(0x30, general("HTTP") + general("cas.lab.test"))))
    ticket = tlv(
        0x61,
        tlv(
            0x30, tlv(0xA0, integer(5)) + tlv(0xA1, general("LAB.TEST")) + tlv(0xA2, sname) + tlv(0xA3, enc(b"t" * 40))
        ),
    )
    ap_req = tlv(
        0x6E,
        tlv(
            0x30,
            tlv(0xA0, integer(5))
            + tlv(0xA1, integer(14))
            + tlv(0xA2, tlv(0x03, b"\x00\x00\x00\x00\x00"))
            + tlv(0xA3, ticket)
            + tlv(0xA4, enc(b"a" * ap_req_padding)),
        ),
    )
    return tlv(0x60, KRB5_OID_DER + b"\x01\x00" + ap_req)


@pytest.mark.parametrize("padding", [1, 30, 200, 1000, 70_000])
def test_the_negtokeninit_offers_krb5_alone_with_the_krb5_token_as_its_mech_token(padding: int) -> None:
    """Whatever the token's size (short, one-, two- and three-byte DER lengths): strict DER, the SPNEGO OID,
    mechTypes [krb5] and the krb5 token unchanged as mechToken; no reqFlags, no mechListMIC, nothing after."""
    krb5 = _krb5_token(padding)
    read = read_negotiate(neg_token_init(krb5))
    assert read.fields == ("mechTypes", "mechToken")
    assert read.mech_types == (KRB5,)
    assert read.mech_token == krb5
    assert read.ap_req.sname == ("HTTP", "cas.lab.test")
    assert len(read.ap_req.authenticator) == padding


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"\x60",
        neg_token_init(_krb5_token(10)),  # already SPNEGO: never wrapped twice
        _krb5_token(10).replace(b"\x01\x00", b"\x02\x00", 1),  # an AP-REP token, not an initial one
        _krb5_token(10).replace(KRB5_OID_DER, bytes.fromhex("06092a864882f712010202"), 1),  # Microsoft's krb5 OID
    ],
)
def test_anything_but_a_krb5_initial_token_is_refused(token: bytes) -> None:
    """Only a krb5 initial context token is wrapped: anything else is an error, not a header sent to a backend."""
    with pytest.raises(ValueError, match="not a krb5 initial context token"):
        neg_token_init(token)


@pytest.mark.parametrize("length", [1, 100, 105, 106, 127, 128, 200, 245, 246, 255, 256, 1_200, 65_519, 65_520, 70_000])
def test_the_ap_reqs_token_made_in_one_piece_is_the_two_framings_byte_for_byte(length: int) -> None:
    """`neg_token_init_ap_req` (the framing remembered per length) gives the bytes `neg_token_init` gives around the
    krb5 initial context token, for AP-REQ lengths on each side of every DER length's change of form: the first
    AP-REQ of a length makes the framing, two others of that length are framed from the one remembered."""
    for ap_req in (bytes(range(256)) * (length // 256) + bytes(length % 256), b"\xff" * length, b"\xff" * length):
        krb5_token = initial_context_token(KRB5_OID_DER + KRB5_AP_REQ + ap_req)
        assert neg_token_init_ap_req(ap_req) == neg_token_init(krb5_token)


def test_an_empty_ap_req_is_never_framed() -> None:
    """An empty AP-REQ is a programming error (ValueError), not a token of framing alone."""
    with pytest.raises(ValueError, match="empty AP-REQ"):
        neg_token_init_ap_req(b"")
