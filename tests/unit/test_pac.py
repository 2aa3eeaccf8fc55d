"""Reading a PAC's buffers, UPN and SID from its bytes (MS-PAC), and refusing malformed ones."""

from __future__ import annotations

import struct

import pytest

from proxy.kerberos.pac import format_sid, parse_pac

SID = bytes([1, 5, 0, 0, 0, 0, 0, 5]) + struct.pack("<5I", 21, 2475063116, 2525469110, 3454126558, 1103)


def _upn_dns_info(upn: str, dns: str, sam: str | None) -> bytes:
    """A UPN_DNS_INFO buffer; with `sam`, the S flag and the SamName + SID extension."""
    u, d = upn.encode("utf-16-le"), dns.encode("utf-16-le")
    if sam is None:
        head = 12
        return struct.pack("<HHHHI", len(u), head, len(d), head + len(u), 0) + u + d
    s = sam.encode("utf-16-le")
    head = 20
    offsets = [head, head + len(u), head + len(u) + len(d), head + len(u) + len(d) + len(s)]
    fixed = struct.pack(
        "<HHHHIHHHH", len(u), offsets[0], len(d), offsets[1], 2, len(s), offsets[2], len(SID), offsets[3]
    )
    return fixed + u + d + s + SID


def _pac(*buffers: tuple[int, bytes]) -> bytes:
    out = struct.pack("<II", len(buffers), 0)
    offset = 8 + 16 * len(buffers)
    body = b""
    for kind, data in buffers:
        out += struct.pack("<IIQ", kind, len(data), offset + len(body))
        body += data + b"\0" * (-len(data) % 8)
    return out + body


def test_pac_buffers_upn_and_sid_are_read() -> None:
    """A PAC with logon info and an extended UPN_DNS_INFO gives its size, buffer names and sizes, UPN and SID."""
    pac = _pac((1, b"\0" * 432), (12, _upn_dns_info("alice@ad.test", "AD.TEST", "alice")), (6, b"\0" * 16))
    facts = parse_pac(pac)
    assert facts.size == len(pac)
    assert [name for name, _ in facts.buffers] == ["logon-info", "upn-dns-info", "server-checksum"]
    assert facts.buffers[0] == ("logon-info", 432)
    assert (facts.upn, facts.dns_domain, facts.sam_name) == ("alice@ad.test", "AD.TEST", "alice")
    assert facts.sid == "S-1-5-21-2475063116-2525469110-3454126558-1103"
    assert facts.to_json()["buffers"]["logon-info"] == 432


def test_pac_without_the_sid_extension_names_no_sid() -> None:
    """An older UPN_DNS_INFO (no S flag) gives the UPN and no SID; an unknown buffer type keeps its number."""
    facts = parse_pac(_pac((12, _upn_dns_info("bob@ad.test", "AD.TEST", None)), (99, b"x")))
    assert (facts.upn, facts.sid) == ("bob@ad.test", None)
    assert facts.buffers[1] == ("type-99", 1)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x01\0\0\0\0\0\0\0", struct.pack("<IIIIQ", 1, 0, 12, 400, 24) + b"\0" * 8, struct.pack("<II", 1000, 0)],
)
def test_malformed_pacs_are_refused(raw: bytes) -> None:
    """Truncated headers, buffers past the end and absurd counts are ValueErrors, not garbage."""
    with pytest.raises(ValueError, match="PAC"):
        parse_pac(raw)


def test_sid_format_and_refusal() -> None:
    """S-1-5-21-... from the binary form; a length that disagrees with the sub-authority count is refused."""
    assert format_sid(SID) == "S-1-5-21-2475063116-2525469110-3454126558-1103"
    with pytest.raises(ValueError, match="not a SID"):
        format_sid(SID[:-1])
