"""What a ticket's PAC says, read from its bytes: which buffers it has, their sizes, the UPN and the SID.

Theory of operation. Active Directory puts a Privilege Attribute Certificate in every ticket it issues
(MS-PAC): a small header, `cBuffers` and `Version` (4 bytes each, little-endian), then one
PAC_INFO_BUFFER per buffer (`ulType`, `cbBufferSize`, 8-byte `Offset` from the PAC's start). The
buffers carry the logon information (group SIDs: what makes AD tickets big), the client's name and the
time of the ticket (client-info), the S4U2Proxy delegation record, the UPN and DNS domain
(UPN_DNS_INFO), signatures. UPN_DNS_INFO is simple enough to read without an NDR decoder: lengths and
offsets (relative to the buffer) of the UPN and the DNS domain name in UTF-16LE, a flags word, and with
the `S` flag (0x2, Samba 4.15 and Windows since the 2021 updates) the sAMAccountName and the account's
SID. The logon information (NDR) is not decoded here: its size is reported.

Where the bytes come from: GSSAPI gives an acceptor the PAC of the ticket it accepted, as the name
attribute `urn:mspac:` of the initiator (MIT's mspac authdata plugin, which also checks the server
signature; `proxy.lab.backend` and `proxy.kerberos.delegate` ask for it). Pure: bytes in, facts out;
a malformed PAC is a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.identity.sid import Sid

# MS-PAC 2.4 ulType values.
BUFFER_TYPES = {
    1: "logon-info",
    2: "credentials-info",
    6: "server-checksum",
    7: "privsvr-checksum",
    10: "client-info",
    11: "delegation-info",
    12: "upn-dns-info",
    13: "client-claims",
    14: "device-info",
    15: "device-claims",
    16: "ticket-checksum",
    17: "attributes-info",
    18: "requester-sid",
    19: "full-checksum",
}
_UPN_DNS_INFO = 12
_HAS_SAM_NAME_AND_SID = 0x2


@dataclass(frozen=True)
class PacFacts:
    """The PAC of one ticket: its size, its buffers (type name and size), and the identity it names."""

    size: int
    buffers: tuple[tuple[str, int], ...]
    upn: str | None = None
    dns_domain: str | None = None
    sam_name: str | None = None
    sid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "buffers": dict(self.buffers),
            "upn": self.upn,
            "dns_domain": self.dns_domain,
            "sam_name": self.sam_name,
            "sid": self.sid,
        }


def parse_pac(pac: bytes) -> PacFacts:
    """The facts of a PAC (the bytes of the `urn:mspac:` attribute, or AD-WIN2K-PAC's content)."""
    count = _u32(pac, 0)
    if count > 64 or 8 + 16 * count > len(pac):
        raise ValueError(f"not a PAC: {count} buffers in {len(pac)} bytes")
    buffers = []
    upn = dns = sam = sid = None
    for i in range(count):
        entry = 8 + 16 * i
        kind, size, offset = (
            _u32(pac, entry),
            _u32(pac, entry + 4),
            int.from_bytes(pac[entry + 8 : entry + 16], "little"),
        )
        if offset + size > len(pac):
            raise ValueError(f"PAC buffer {kind} runs past the PAC's end")
        buffers.append((BUFFER_TYPES.get(kind, f"type-{kind}"), size))
        if kind == _UPN_DNS_INFO:
            upn, dns, sam, sid = _upn_dns_info(pac[offset : offset + size])
    return PacFacts(len(pac), tuple(buffers), upn, dns, sam, sid)


def _upn_dns_info(info: bytes) -> tuple[str | None, str | None, str | None, str | None]:
    upn = _utf16(info, _u16(info, 0), _u16(info, 2))
    dns = _utf16(info, _u16(info, 4), _u16(info, 6))
    flags = _u32(info, 8)
    if not flags & _HAS_SAM_NAME_AND_SID or len(info) < 20:
        return upn, dns, None, None
    sam = _utf16(info, _u16(info, 12), _u16(info, 14))
    length, offset = _u16(info, 16), _u16(info, 18)
    return upn, dns, sam, format_sid(info[offset : offset + length])


def format_sid(raw: bytes) -> str:
    """A binary SID (MS-DTYP 2.4.2.2) as `S-1-5-21-...`, read by the codec the mapping stage uses."""
    try:
        return str(Sid.from_bytes(raw))
    except ValueError as e:
        raise ValueError(f"not a SID: {raw.hex()} ({e})") from None


def _u16(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise ValueError("PAC buffer truncated")
    return int.from_bytes(data[at : at + 2], "little")


def _u32(data: bytes, at: int) -> int:
    if at + 4 > len(data):
        raise ValueError("PAC truncated")
    return int.from_bytes(data[at : at + 4], "little")


def _utf16(data: bytes, length: int, offset: int) -> str | None:
    if not length:
        return None
    if offset + length > len(data):
        raise ValueError("PAC string runs past its buffer")
    return data[offset : offset + length].decode("utf-16-le")
