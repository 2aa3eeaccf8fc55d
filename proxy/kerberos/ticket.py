"""The clear-text part of a Kerberos ticket, read out of a krb5 GSSAPI token.

Theory of operation. The first token of a raw krb5 GSSAPI context (RFC 4121) is a GSS framing
(`[APPLICATION 0]`, the krb5 mechanism OID, token id 01 00) around a KRB_AP_REQ (RFC 4120 §5.5.1), which
carries the service ticket. The ticket's realm, service name, encryption type and key version are not
encrypted: they tell the service which of its keys to decrypt with. `doctor` compares that key version
(the KDC's current one for the service) with the keytab's. Nothing encrypted is touched and the token is
not kept. `ticket_fields` reads the same header of a bare Ticket, as a credential cache stores it
(`proxy.kerberos.ccache`). Pure: a few DER tag-length-value steps, no Kerberos library.
"""

from __future__ import annotations

from dataclasses import dataclass

_KRB5_OID = bytes.fromhex("06092a864886f712010202")


@dataclass(frozen=True)
class TicketHeader:
    realm: str
    sname: str  # "HTTP/proxy.lab.test"
    etype: int
    kvno: int | None  # absent when the service key has no version (rare)


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag byte, start of value, end of value) of the DER element at `pos`."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER element")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER value")
    return tag, pos, pos + length


def _fields(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """The context-tagged fields [n] of a SEQUENCE's content, as n -> (value start, value end)."""
    out = {}
    pos = start
    while pos < end:
        tag, vstart, vend = _tlv(data, pos)
        if tag & 0xE0 == 0xA0:
            out[tag & 0x1F] = (vstart, vend)
        pos = vend
    return out


def _expect(data: bytes, pos: int, tag: int, what: str) -> tuple[int, int]:
    found, start, end = _tlv(data, pos)
    if found != tag:
        raise ValueError(f"expected {what} (tag 0x{tag:02x}), found tag 0x{found:02x}")
    return start, end


def _integer(data: bytes, pos: int) -> int:
    start, end = _expect(data, pos, 0x02, "INTEGER")
    return int.from_bytes(data[start:end], "big", signed=True)


def _string(data: bytes, pos: int) -> str:
    _tag, start, end = _tlv(data, pos)
    return data[start:end].decode("utf-8", "replace")


def ticket_header(token: bytes) -> TicketHeader:
    """The realm, service, enctype and key version of the ticket in a raw krb5 initiator token."""
    try:
        return _ticket_header(token)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"a required field is missing ({exc})") from None


def _ticket_header(token: bytes) -> TicketHeader:
    start, _end = _expect(token, 0, 0x60, "GSS token [APPLICATION 0]")
    if token[start : start + len(_KRB5_OID)] != _KRB5_OID:
        raise ValueError("not a krb5 mechanism token (SPNEGO tokens are not read here)")
    pos = start + len(_KRB5_OID)
    if token[pos : pos + 2] != b"\x01\x00":
        raise ValueError("not a KRB_AP_REQ token")
    ap_start, _ = _expect(token, pos + 2, 0x6E, "AP-REQ [APPLICATION 14]")
    seq_start, seq_end = _expect(token, ap_start, 0x30, "SEQUENCE")
    ap = _fields(token, seq_start, seq_end)
    return _ticket(token, ap[3][0])


def ticket_fields(ticket: bytes) -> TicketHeader:
    """The same four fields of a bare Ticket (`[APPLICATION 1]`), as a credential cache stores it."""
    try:
        return _ticket(ticket, 0)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"a required field is missing ({exc})") from None


def _ticket(token: bytes, pos: int) -> TicketHeader:
    tkt_start, _ = _expect(token, pos, 0x61, "Ticket [APPLICATION 1]")
    tseq_start, tseq_end = _expect(token, tkt_start, 0x30, "SEQUENCE")
    ticket = _fields(token, tseq_start, tseq_end)
    realm = _string(token, ticket[1][0])
    name_start, name_end = _expect(token, ticket[2][0], 0x30, "PrincipalName")
    names_start, names_end = _expect(token, _fields(token, name_start, name_end)[1][0], 0x30, "SEQUENCE OF")
    components = []
    pos = names_start
    while pos < names_end:
        components.append(_string(token, pos))
        pos = _tlv(token, pos)[2]
    enc_start, enc_end = _expect(token, ticket[3][0], 0x30, "EncryptedData")
    enc = _fields(token, enc_start, enc_end)
    kvno = _integer(token, enc[1][0]) if 1 in enc else None
    return TicketHeader(realm=realm, sname="/".join(components), etype=_integer(token, enc[0][0]), kvno=kvno)
