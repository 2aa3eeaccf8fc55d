"""An independent reading of a Negotiate token for tests: pyasn1's DER decoder with the ASN.1 of RFC 4178 (SPNEGO)
and RFC 4120 (the krb5 AP-REQ), not the gateway's own encoder. `read_negotiate` returns what a token says; a
token that is not strict DER, or has bytes past its end, fails to decode."""

from __future__ import annotations

from dataclasses import dataclass

from pyasn1.codec.der import decoder
from pyasn1.type import char, namedtype, tag, univ

SPNEGO = "1.3.6.1.5.5.2"
KRB5 = "1.2.840.113554.1.2.2"
_KRB5_OID_DER = bytes.fromhex("06092a864886f712010202")


def _ctx(n: int, constructed: bool = True) -> tag.Tag:
    return tag.Tag(tag.tagClassContext, tag.tagFormatConstructed if constructed else tag.tagFormatSimple, n)


def _app(n: int) -> tag.Tag:
    return tag.Tag(tag.tagClassApplication, tag.tagFormatConstructed, n)


class MechTypeList(univ.SequenceOf):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    componentType = univ.ObjectIdentifier()


class NegTokenInit(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    componentType = namedtype.NamedTypes(
        namedtype.OptionalNamedType("mechTypes", MechTypeList().subtype(explicitTag=_ctx(0))),
        namedtype.OptionalNamedType("reqFlags", univ.BitString().subtype(explicitTag=_ctx(1))),
        namedtype.OptionalNamedType("mechToken", univ.OctetString().subtype(explicitTag=_ctx(2))),
        namedtype.OptionalNamedType("mechListMIC", univ.OctetString().subtype(explicitTag=_ctx(3))),
    )


class NegotiationToken(univ.Choice):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("negTokenInit", NegTokenInit().subtype(explicitTag=_ctx(0))),
    )


class InitialContextToken(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    """RFC 2743 §3.1 with SPNEGO's inner token: [APPLICATION 0] IMPLICIT SEQUENCE { thisMech, NegotiationToken }."""

    tagSet = univ.Sequence.tagSet.tagImplicitly(_app(0))
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("thisMech", univ.ObjectIdentifier()),
        namedtype.NamedType("innerContextToken", NegotiationToken()),
    )


class PrincipalName(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("name-type", univ.Integer().subtype(explicitTag=_ctx(0))),
        namedtype.NamedType(
            "name-string", univ.SequenceOf(componentType=char.GeneralString()).subtype(explicitTag=_ctx(1))
        ),
    )


class EncryptedData(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("etype", univ.Integer().subtype(explicitTag=_ctx(0))),
        namedtype.OptionalNamedType("kvno", univ.Integer().subtype(explicitTag=_ctx(1))),
        namedtype.NamedType("cipher", univ.OctetString().subtype(explicitTag=_ctx(2))),
    )


class Ticket(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    tagSet = univ.Sequence.tagSet.tagExplicitly(_app(1))
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("tkt-vno", univ.Integer().subtype(explicitTag=_ctx(0))),
        namedtype.NamedType("realm", char.GeneralString().subtype(explicitTag=_ctx(1))),
        namedtype.NamedType("sname", PrincipalName().subtype(explicitTag=_ctx(2))),
        namedtype.NamedType("enc-part", EncryptedData().subtype(explicitTag=_ctx(3))),
    )


class APReq(univ.Sequence):  # type: ignore[misc]  # pyasn1 has no type stubs: its bases are Any
    tagSet = univ.Sequence.tagSet.tagExplicitly(_app(14))
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("pvno", univ.Integer().subtype(explicitTag=_ctx(0))),
        namedtype.NamedType("msg-type", univ.Integer().subtype(explicitTag=_ctx(1))),
        namedtype.NamedType("ap-options", univ.BitString().subtype(explicitTag=_ctx(2))),
        namedtype.NamedType("ticket", Ticket().subtype(explicitTag=_ctx(3))),
        namedtype.NamedType("authenticator", EncryptedData().subtype(explicitTag=_ctx(4))),
    )


@dataclass(frozen=True)
class ApReq:
    """What a krb5 initial context token's AP-REQ says in the clear."""

    ap_options: str  # the BIT STRING as '0'/'1' characters, bit 0 first (RFC 4120 §5.5.1)
    realm: str
    sname: tuple[str, ...]
    ticket: bytes  # the ticket's encrypted part, as sent
    authenticator: bytes  # the authenticator's ciphertext, fresh per token


@dataclass(frozen=True)
class Negotiate:
    """What a SPNEGO initial token says: its fields present (by name), the mechanisms offered, the mechToken."""

    fields: tuple[str, ...]
    mech_types: tuple[str, ...]
    mech_token: bytes
    ap_req: ApReq


def _whole(data: bytes, spec: univ.Asn1Item) -> univ.Asn1Item:
    value, rest = decoder.decode(data, asn1Spec=spec)
    assert rest == b"", f"{len(rest)} bytes past the end of the {type(spec).__name__}"
    return value


def read_krb5(token: bytes) -> ApReq:
    """A krb5 initial context token (RFC 4121 §4.1): the framing, TOK_ID 01 00, then a DER AP-REQ."""
    assert token[0] == 0x60, "not [APPLICATION 0]"
    n = token[1] & 0x7F if token[1] & 0x80 else 0
    length = int.from_bytes(token[2 : 2 + n], "big") if n else token[1]
    body = token[2 + n :]
    assert len(body) == length, "the framing's length is not the token's"
    assert body.startswith(_KRB5_OID_DER + b"\x01\x00"), "not a krb5 AP-REQ token"
    ap = _whole(body[len(_KRB5_OID_DER) + 2 :], APReq())
    ticket = ap["ticket"]
    return ApReq(
        ap_options="".join(str(b) for b in ap["ap-options"]),
        realm=str(ticket["realm"]),
        sname=tuple(str(s) for s in ticket["sname"]["name-string"]),
        ticket=bytes(ticket["enc-part"]["cipher"]),
        authenticator=bytes(ap["authenticator"]["cipher"]),
    )


def read_negotiate(token: bytes) -> Negotiate:
    """A SPNEGO initial token with a NegTokenInit, and the krb5 token it carries."""
    outer = _whole(token, InitialContextToken())
    assert str(outer["thisMech"]) == SPNEGO, f"thisMech is {outer['thisMech']}"
    init = outer["innerContextToken"]["negTokenInit"]
    fields = tuple(name for name in ("mechTypes", "reqFlags", "mechToken", "mechListMIC") if init[name].isValue)
    mech_token = bytes(init["mechToken"])
    return Negotiate(fields, tuple(str(m) for m in init["mechTypes"]), mech_token, read_krb5(mech_token))
