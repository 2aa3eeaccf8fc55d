"""The keytab reader and the ticket header reader: pure parsing of Kerberos file and wire formats."""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.kerberos.keytab import kvnos, missing_key, parse_keytab
from proxy.kerberos.ticket import ticket_header

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _counted(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _record(principal: str, kvno: int, enctype: int, key: bytes, *, kvno32: bool = True) -> bytes:
    name, realm = principal.rsplit("@", 1)
    parts = name.split("/")
    body = struct.pack(">H", len(parts)) + _counted(realm.encode()) + b"".join(_counted(p.encode()) for p in parts)
    body += struct.pack(">IIB", 1, int(WHEN.timestamp()), kvno & 0xFF) + struct.pack(">H", enctype) + _counted(key)
    if kvno32:
        body += struct.pack(">I", kvno)
    return struct.pack(">i", len(body)) + body


def test_entries_principals_key_versions_and_enctypes_are_read() -> None:
    """Each record gives its principal, key version, enctype and timestamp; the key stays out of repr."""
    data = (
        b"\x05\x02"
        + _record("HTTP/proxy.lab.test@LAB.TEST", 3, 18, b"k" * 32)
        + _record("alice@LAB.TEST", 1, 17, b"x" * 16)
    )
    entries = parse_keytab(data)
    assert [(e.principal, e.kvno, e.enctype_name, e.timestamp) for e in entries] == [
        ("HTTP/proxy.lab.test@LAB.TEST", 3, "aes256-cts-hmac-sha1-96", WHEN),
        ("alice@LAB.TEST", 1, "aes128-cts-hmac-sha1-96", WHEN),
    ]
    assert "kkkk" not in repr(entries)
    assert kvnos(entries, "HTTP/proxy.lab.test@LAB.TEST") == {3}
    assert kvnos(entries, "HTTP/other.lab.test@LAB.TEST") == set()


def test_a_32_bit_key_version_supersedes_the_8_bit_one() -> None:
    """Key versions above 255 live in the trailing 32-bit field; without it the 8-bit one counts."""
    assert parse_keytab(b"\x05\x02" + _record("a@R", 300, 18, b"k"))[0].kvno == 300
    assert parse_keytab(b"\x05\x02" + _record("a@R", 7, 18, b"k", kvno32=False))[0].kvno == 7


def test_holes_left_by_removed_entries_are_skipped() -> None:
    """A negative record length marks a hole; the records after it are still read."""
    data = b"\x05\x02" + struct.pack(">i", -12) + b"\0" * 12 + _record("a@R", 2, 18, b"k")
    assert [e.principal for e in parse_keytab(data)] == ["a@R"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a keytab"),
        (b"-----BEGIN CERTIFICATE-----", "not a keytab"),
        (b"\x05\x01", "not a keytab"),
        (b"\x05\x02" + _record("a@R", 2, 18, b"k")[:-6], "truncated"),
    ],
)
def test_what_is_not_a_version_2_keytab_is_refused(data: bytes, message: str) -> None:
    """Other files, version 1 keytabs and truncated records raise ValueError saying why."""
    with pytest.raises(ValueError, match=message):
        parse_keytab(data)


@pytest.mark.parametrize(
    "token",
    [b"", b"\x60\x03\x06\x01\x00", bytes.fromhex("600d06092a864886f71201020201000000"), b"\x60\x82\xff\xff"],
)
def test_tokens_that_are_not_krb5_ap_requests_are_refused(token: bytes) -> None:
    """Empty, truncated, non-krb5 or malformed tokens raise ValueError, never IndexError or KeyError."""
    with pytest.raises(ValueError):  # noqa: PT011  the message varies with where the token breaks
        ticket_header(token)


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _ap_req(kvno: int | None) -> bytes:
    """A krb5 GSS token around an AP-REQ whose ticket is for HTTP/proxy.lab.test@LAB.TEST."""
    sname = _der(
        0x30,
        _der(0xA0, _der(0x02, b"\x02")) + _der(0xA1, _der(0x30, _der(0x1B, b"HTTP") + _der(0x1B, b"proxy.lab.test"))),
    )
    enc = _der(0xA0, _der(0x02, b"\x12")) + (_der(0xA1, _der(0x02, bytes([kvno]))) if kvno is not None else b"")
    enc += _der(0xA2, _der(0x04, b"\x00" * 300))  # long enough for a two-byte length
    ticket = _der(
        0x61,
        _der(
            0x30,
            _der(0xA0, _der(0x02, b"\x05"))
            + _der(0xA1, _der(0x1B, b"LAB.TEST"))
            + _der(0xA2, sname)
            + _der(0xA3, _der(0x30, enc)),
        ),
    )
    ap_req = _der(
        0x6E, _der(0x30, _der(0xA0, _der(0x02, b"\x05")) + _der(0xA1, _der(0x02, b"\x0e")) + _der(0xA3, ticket))
    )
    return _der(0x60, bytes.fromhex("06092a864886f712010202") + b"\x01\x00" + ap_req)


def test_the_ticket_header_names_service_realm_enctype_and_key_version() -> None:
    """The clear-text part of the ticket in an AP-REQ token: what `doctor` compares with the keytab."""
    header = ticket_header(_ap_req(4))
    assert (header.realm, header.sname, header.etype, header.kvno) == ("LAB.TEST", "HTTP/proxy.lab.test", 18, 4)
    assert ticket_header(_ap_req(None)).kvno is None


def test_missing_key_names_what_the_keytab_holds_instead(tmp_path: Path) -> None:
    """No key for the principal: the file's own principals are named, a case-only difference gives the spelling to
    use, an AD account name beside an SPN principal gives AD's advice, and a keytab holding the key says nothing."""
    path = tmp_path / "k.keytab"
    path.write_bytes(b"\x05\x02" + _record("svc-kcdproxy@AD.TEST", 2, 18, b"k" * 32))
    what, fix = missing_key(path, "HTTP/gw.ad.test@AD.TEST") or ("", "")
    assert what == f"{path} holds keys for svc-kcdproxy@AD.TEST only, none for HTTP/gw.ad.test@AD.TEST"
    assert "another account's keytab" in fix
    assert "set kerberos.principal to the service account's name (svc-kcdproxy@AD.TEST)" in fix
    assert missing_key(path, "svc-kcdproxy@AD.TEST") is None
    what, fix = missing_key(path, "SVC-kcdproxy@AD.TEST") or ("", "")
    assert fix.endswith('set kerberos.principal = "svc-kcdproxy@AD.TEST"')
    path.write_bytes(b"\x05\x02")
    assert missing_key(path, "svc-kcdproxy@AD.TEST") == (
        f"{path} holds no keys at all",
        "export svc-kcdproxy@AD.TEST's key into it (kadmin ktadd, ktpass, msktutil)",
    )
    assert missing_key(tmp_path / "absent.keytab", "svc-kcdproxy@AD.TEST") is None
