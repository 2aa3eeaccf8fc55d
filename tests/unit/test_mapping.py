"""Strong certificate mapping, the pure core: SIDs, the SID extension, altSecurityIdentities, account state, decide."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import char, univ
from pyasn1_modules import rfc5280

from proxy.errors import AccountRefused, MappingRefused
from proxy.identity import altsecid
from proxy.identity.mapping import Account, account_state, decide, no_account, predates_account
from proxy.identity.sid import (
    OBJECTSID_OID,
    SID_EXTENSION_OID,
    Sid,
    certificate_sid,
    sid_extension,
    sid_from_extension_value,
)
from proxy.identity.upn import upn_other_name

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ALICE_SID = Sid.parse("S-1-5-21-1004336348-1177238915-682003330-1105")
ADMIN_SID = Sid.parse("S-1-5-21-1004336348-1177238915-682003330-500")
CA_NAME = x509.Name(
    [
        x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "test"),
        x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "ad"),
        x509.NameAttribute(NameOID.COMMON_NAME, "AD Test CA"),
    ]
)
CA_KEY = ec.generate_private_key(ec.SECP256R1())


def certificate(
    *,
    sid: Sid | None = None,
    serial: int = 0x123456,
    extensions: list[x509.ExtensionType] | None = None,
    urls: tuple[str, ...] = (),
) -> x509.Certificate:
    """A user certificate for alice@ad.test signed by the unit CA, with the SID extension when `sid` is given
    and `urls` as subjectAltName URIs."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(CA_NAME)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    upn_other_name("alice@ad.test"),
                    x509.RFC822Name("alice@ad.test"),
                    *(x509.UniformResourceIdentifier(url) for url in urls),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sid is not None:
        builder = builder.add_extension(sid_extension(sid), critical=False)
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(CA_KEY, hashes.SHA256())


CREATED = NOW - timedelta(days=30)  # alice's whenCreated: before every certificate() (notBefore NOW - 1 day)


def account(*alt: str, sid: Sid = ALICE_SID, created: datetime | None = CREATED, **state: int) -> Account:
    """Alice's account as the directory returns it, with `alt` as altSecurityIdentities and `state` fields,
    created at `created` (None: the directory gave no whenCreated)."""
    return Account(
        dn="CN=alice,CN=Users,DC=ad,DC=test",
        sam_account_name="alice",
        upn="alice@ad.test",
        sid=sid,
        alt_security_identities=alt,
        when_created=created,
        **state,
    )


# -- SIDs ------------------------------------------------------------------------------------------------------


def test_sid_binary_round_trip_matches_ms_dtyp() -> None:
    """S-1-5-21-x-y-z-RID is revision 1, count, 48-bit big-endian authority, little-endian sub-authorities."""
    binary = ALICE_SID.to_bytes()
    assert binary[:8] == bytes([1, 5, 0, 0, 0, 0, 0, 5])
    assert binary[8:12] == (21).to_bytes(4, "little")
    assert binary[-4:] == (1105).to_bytes(4, "little")
    assert Sid.from_bytes(binary) == ALICE_SID
    assert str(Sid.from_bytes(binary)) == "S-1-5-21-1004336348-1177238915-682003330-1105"
    assert ALICE_SID.rid == 1105


def test_sid_well_known_and_large_authority() -> None:
    """Well-known SIDs parse; an authority of 2^32 or more is written in hex, as MS-DTYP says."""
    assert str(Sid.parse("S-1-1-0")) == "S-1-1-0"
    assert Sid.parse("s-1-5-21-1-2-3-1105") == Sid.parse("S-1-5-21-1-2-3-1105")
    big = Sid(2**40, (7,))
    assert str(big) == "S-1-0x010000000000-7"
    assert Sid.parse(str(big)) == big
    assert Sid.from_bytes(big.to_bytes()) == big


@pytest.mark.parametrize(
    "text",
    ["S-2-5-21-1", "S-1-5", "S-1-5-", "S1-5-21", " S-1-5-21-1", "S-1-5-21-1 ", "S-1-5--1", "S-1-5-99999999999", "X"],
)
def test_sid_string_refused(text: str) -> None:
    """Other revisions, missing sub-authorities, spaces, empty parts and overflowing numbers are refused."""
    with pytest.raises(ValueError, match="SID"):
        Sid.parse(text)


def test_sid_sixteen_sub_authorities_refused() -> None:
    """A SID has at most 15 sub-authorities."""
    with pytest.raises(ValueError, match="SID"):
        Sid.parse("S-1-5" + "-1" * 16)


@pytest.mark.parametrize(
    "binary",
    [
        b"",
        bytes([2, 1, 0, 0, 0, 0, 0, 5, 1, 0, 0, 0]),  # revision 2
        bytes([1, 2, 0, 0, 0, 0, 0, 5, 1, 0, 0, 0]),  # says two sub-authorities, carries one
        bytes([1, 1, 0, 0, 0, 0, 0, 5, 1, 0, 0, 0, 0xFF]),  # a trailing byte
        bytes([1, 0, 0, 0, 0, 0, 0, 5]),  # no sub-authority
    ],
)
def test_binary_sid_refused(binary: bytes) -> None:
    """A binary SID with the wrong revision, length or count is refused, not read approximately."""
    with pytest.raises(ValueError, match=r"SID|sub-authorities"):
        Sid.from_bytes(binary)


# -- the SID extension ----------------------------------------------------------------------------------------


def test_sid_extension_encoding_is_what_ad_cs_writes() -> None:
    """The value is GeneralNames{ otherName{ 1.3.6.1.4.1.311.25.2.1, [0] OCTET STRING "S-1-..." } }, byte for byte."""
    sid = b"S-1-5-21-1004336348-1177238915-682003330-1105"
    octets = bytes([0x04, len(sid)]) + sid
    explicit = bytes([0xA0, len(octets)]) + octets
    oid = bytes.fromhex("060a2b060104018237190201")
    other = bytes([0xA0, len(oid) + len(explicit)]) + oid + explicit
    expected = bytes([0x30, len(other)]) + other
    assert sid_extension(ALICE_SID).value == expected
    assert sid_from_extension_value(expected) == ALICE_SID


def test_certificate_sid_read_and_absent() -> None:
    """A certificate with the extension yields its SID; one without yields None (not an error)."""
    assert certificate_sid(certificate(sid=ALICE_SID)) == ALICE_SID
    assert certificate_sid(certificate()) is None


def _names(type_id: str, value: bytes, *, count: int = 1) -> bytes:
    names = rfc5280.GeneralNames()
    for _ in range(count):
        name = names.componentType.clone()
        name["otherName"]["type-id"] = univ.ObjectIdentifier(type_id)
        name["otherName"]["value"] = value
        names.append(name)
    encoded: bytes = der_encoder.encode(names)
    return encoded


@pytest.mark.parametrize(
    ("der", "why"),
    [
        (b"\x04\x03abc", "not a GeneralNames"),
        (_names("1.3.6.1.4.1.311.20.2.3", der_encoder.encode(univ.OctetString(b"S-1-5-21-1"))), "has type"),
        (_names(OBJECTSID_OID, der_encoder.encode(char.UTF8String("S-1-5-21-1"))), "not an OCTET STRING"),
        (_names(OBJECTSID_OID, der_encoder.encode(univ.OctetString(b"S-1-5-21-1")), count=2), "exactly one"),
        (_names(OBJECTSID_OID, der_encoder.encode(univ.OctetString(b"S-1-5-21-1\x00"))), "not a SID"),
        (_names(OBJECTSID_OID, der_encoder.encode(univ.OctetString("S-1-5-21-\u0661".encode()))), "not ASCII"),
        (sid_extension(ALICE_SID).value + b"\x00", "trailing"),
    ],
)
def test_malformed_sid_extension_refused(der: bytes, why: str) -> None:
    """Another otherName type, another string type, two names, a NUL, non-ASCII digits, trailing bytes: refused."""
    with pytest.raises(ValueError, match=why):
        sid_from_extension_value(der)


# -- altSecurityIdentities ------------------------------------------------------------------------------------


def test_reversed_serial_as_windows_writes_it() -> None:
    """<SR> is the serial's bytes reversed: 12:34:56 -> 563412; a high bit's leading 00 is part of the bytes."""
    assert altsecid.reversed_serial(certificate(serial=0x123456)) == "563412"
    assert altsecid.reversed_serial(certificate(serial=0x8001)) == "018000"


@pytest.mark.parametrize(
    ("raw", "kind", "strong"),
    [
        ("X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>563412", "X509IssuerSerialNumber", True),
        ("X509:<SKI>00ff", "X509SKI", True),
        ("X509:<SHA1-PUKEY>" + "ab" * 20, "X509SHA1PublicKey", True),
        ("X509:<I>DC=test,DC=ad,CN=AD Test CA<S>CN=alice", "X509IssuerSubject", False),
        ("X509:<S>CN=alice", "X509SubjectOnly", False),
        ("X509:<RFC822>alice@ad.test", "X509RFC822", False),
        ("x509:<ski>00FF", "X509SKI", True),  # Windows compares the tags case-insensitively
        ("X509:<I>CN=CA<S>CN=alice<SR>563412", "unknown", False),  # issuer, subject and serial: not a form
        ("X509:<SKI>not-hex", "unknown", False),
        ("X509:<SKI>abc", "unknown", False),  # odd number of hex digits
        ("Kerberos:alice@AD.TEST", "unknown", False),
        ("", "unknown", False),
    ],
)
def test_alt_security_identity_kinds(raw: str, kind: str, strong: bool) -> None:
    """Each documented form parses to its kind; only the three strong kinds are strong; the rest is unknown."""
    entry = altsecid.parse(raw)
    assert (entry.kind, entry.strong) == (kind, strong)


def test_issuer_serial_matches_in_windows_and_rfc4514_order() -> None:
    """<I>issuer<SR>serial matches with the issuer in Windows order or RFC 4514 order, values case-insensitive."""
    cert = certificate(serial=0x123456)
    for issuer in ("DC=test,DC=ad,CN=AD Test CA", "CN=AD Test CA,DC=ad,DC=test", "dc=TEST, dc=AD, cn=ad test ca"):
        assert altsecid.matches(altsecid.parse(f"X509:<I>{issuer}<SR>563412"), cert), issuer


def test_issuer_serial_not_reversed_does_not_match() -> None:
    """The serial written big-endian (the way openssl prints it) does not match: Windows would not either."""
    cert = certificate(serial=0x123456)
    assert not altsecid.matches(altsecid.parse("X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>123456"), cert)


def test_issuer_serial_of_another_issuer_does_not_match() -> None:
    """The same serial from another CA is another certificate."""
    cert = certificate(serial=0x123456)
    assert not altsecid.matches(altsecid.parse("X509:<I>DC=test,DC=ad,CN=Other CA<SR>563412"), cert)


def test_ski_and_sha1_entries_match() -> None:
    """<SKI> matches the subject key identifier; <SHA1-PUKEY> the certificate's SHA-1 (or its key's)."""
    cert = certificate()
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    thumb = hashlib.sha1(cert.public_bytes(serialization.Encoding.DER), usedforsecurity=False).hexdigest()
    assert altsecid.matches(altsecid.parse(f"X509:<SKI>{ski.upper()}"), cert)
    assert altsecid.matches(altsecid.parse(f"X509:<SHA1-PUKEY>{thumb}"), cert)
    assert altsecid.matches(altsecid.parse(f"X509:<SHA1-PUKEY>{altsecid.sha1_public_key(cert)}"), cert)
    assert not altsecid.matches(altsecid.parse(f"X509:<SHA1-PUKEY>{'00' * 20}"), cert)


def test_weak_entries_never_match_strongly() -> None:
    """Subject, issuer+subject and RFC822 entries that do name the certificate still never count as strong."""
    cert = certificate()
    for raw in (
        "X509:<S>CN=alice",
        "X509:<I>DC=test,DC=ad,CN=AD Test CA<S>CN=alice",
        "X509:<RFC822>alice@ad.test",
    ):
        entry = altsecid.parse(raw)
        assert altsecid.weakly_matches(entry, cert), raw
        assert not altsecid.matches(entry, cert), raw


def test_issuer_serial_entry_written_for_a_certificate_matches_it() -> None:
    """The entry the fix text proposes is one that matches the certificate."""
    cert = certificate(serial=0xABCDEF0102)
    entry = altsecid.issuer_serial_entry(cert)
    assert entry == "X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>0201efcdab00"
    assert altsecid.matches(altsecid.parse(entry), cert)


# -- account state --------------------------------------------------------------------------------------------


def filetime(at: datetime) -> int:
    return int((at - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds() * 10_000_000)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"user_account_control": 0x202}, "disabled"),
        ({"user_account_control": 0x200, "lockout_time": filetime(NOW - timedelta(minutes=1))}, "locked out"),
        ({"user_account_control": 0x200, "computed_control": 0x10}, "locked out"),
        ({"user_account_control": 0x200, "account_expires": filetime(NOW - timedelta(seconds=1))}, "expired"),
        # before the year 1: a time long past (was an OverflowError, a 500), its hint the integer
        ({"user_account_control": 0x200, "account_expires": -(2**63)}, "expired"),
    ],
)
def test_account_state_refused(state: dict[str, Any], reason: str) -> None:
    """Disabled, locked out (lockoutTime or the computed bit) and expired accounts are refused with that reason."""
    with pytest.raises(AccountRefused, match=reason) as info:
        account_state(replace(account(), **state), NOW)
    assert info.value.status == 403
    assert info.value.hint


@pytest.mark.parametrize(
    "state",
    [
        {"user_account_control": 0x200},
        {"user_account_control": 0x200, "account_expires": 0x7FFFFFFFFFFFFFFF},
        {"user_account_control": 0x200, "account_expires": filetime(NOW + timedelta(days=1))},
        # past the year 9999, which a datetime cannot hold: a time not yet come (was an OverflowError, a 500)
        {"user_account_control": 0x200, "account_expires": 0x7FFFFFFFFFFFFFFE},
        {"user_account_control": 0x200, "account_expires": 3_000_000_000_000_000_000},
        # the lockout duration has passed: the directory computes "not locked" although lockoutTime is still set
        {"user_account_control": 0x200, "lockout_time": filetime(NOW - timedelta(hours=2)), "computed_control": 0},
    ],
)
def test_account_state_admitted(state: dict[str, Any]) -> None:
    """An enabled account that never expires, or expires later, or whose lockout has lapsed, passes."""
    account_state(replace(account(), **state), NOW)


# -- the decision ---------------------------------------------------------------------------------------------


def test_sid_extension_of_the_account_admits() -> None:
    """The certificate's SID equals the account's objectSid: admitted by the sid-extension rule."""
    mapping = decide(certificate(sid=ALICE_SID), account(), "strong")
    assert (mapping.rule, mapping.detail, mapping.weak) == ("sid-extension", str(ALICE_SID), False)


def test_sid_of_another_account_refused_in_both_modes() -> None:
    """Alice's UPN with the administrator's SID (ESC1): refused even in audit mode, even with a strong entry."""
    cert = certificate(sid=ADMIN_SID)
    entry = altsecid.issuer_serial_entry(cert)
    for mode in ("strong", "strong-or-audit"):
        with pytest.raises(MappingRefused, match="SID of another account") as info:
            decide(cert, account(entry), mode)
        assert str(ADMIN_SID) in (info.value.hint or "")


def test_strong_alt_security_identity_admits_without_sid() -> None:
    """No SID extension, but the account lists the certificate by issuer and reversed serial: admitted."""
    cert = certificate(serial=0x123456)
    mapping = decide(cert, account("X509:<S>CN=alice", altsecid.issuer_serial_entry(cert)), "strong")
    assert mapping.rule == "alt-security-identity"
    assert "<SR>563412" in mapping.detail


def test_no_sid_extension_refused_with_fix() -> None:
    """No SID extension and no entry: 403 'no SID extension', and the fix names the entry to add."""
    cert = certificate(serial=0x123456)
    with pytest.raises(MappingRefused, match="no SID extension") as info:
        decide(cert, account(), "strong")
    assert info.value.status == 403
    assert "altSecurityIdentities: X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>563412" in (info.value.hint or "")


def test_weak_mapping_only_refused_and_named() -> None:
    """Only a weak entry names the certificate: refused in strong mode, and the reason says which weak kind."""
    with pytest.raises(MappingRefused, match="X509SubjectOnly"):
        decide(certificate(), account("X509:<S>CN=alice"), "strong")


def test_strong_entry_for_another_certificate_refused() -> None:
    """An issuer+serial entry for another certificate of the same CA does not admit this one."""
    other = certificate(serial=0x999999)
    with pytest.raises(MappingRefused, match="no strong mapping"):
        decide(certificate(serial=0x123456), account(altsecid.issuer_serial_entry(other)), "strong")


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>123456", "in printed order"),
        ("X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>00123456", "in printed order"),
        ("X509:<I>CN=AD Root CA<SR>563412", "under another issuer"),
        ("X509:<I>CN=AD Root CA<SR>123456", "in printed order"),
    ],
)
def test_an_entry_nearly_naming_the_certificate_is_named_with_its_replacement(entry: str, said: str) -> None:
    """An issuer-and-serial entry with the serial unreversed, or another issuer: the reason names the slip, the fix the
    entry and the one that maps the certificate; an entry for another serial is no slip."""
    with pytest.raises(MappingRefused, match=said) as info:
        decide(certificate(serial=0x123456), account(entry), "strong")
    hint = info.value.hint or ""
    assert f"{entry} on CN=alice,CN=Users,DC=ad,DC=test: " in hint
    assert hint.count("replace it with altSecurityIdentities: X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>563412") == 1
    assert altsecid.serial_slip(altsecid.parse(entry), certificate(serial=0x654321)) is None


def test_a_base64_binary_sid_is_refused_naming_what_it_is_and_the_sid_to_write() -> None:
    """The SID extension holding the base64 of the binary objectSid (ldapsearch's form): refused as unreadable, the
    fix says it is that SID's base64 and names the account's SID string; a SID string is still read as before."""
    written = base64.b64encode(ALICE_SID.to_bytes()).decode()
    with pytest.raises(ValueError, match=f"base64 of the binary SID {ALICE_SID}"):
        Sid.parse(written)
    ext = x509.UnrecognizedExtension(SID_EXTENSION_OID, _sid_value_of(written.encode()))
    with pytest.raises(MappingRefused, match="SID extension cannot be read") as info:
        decide(certificate(extensions=[ext]), account(), "strong")
    assert f"its objectSid is {ALICE_SID}: that string is what the certificate must carry" in (info.value.hint or "")


def test_the_domains_sid_is_refused_as_no_accounts_naming_the_missing_rid() -> None:
    """The SID of alice's domain (her SID without its RID) in the extension: 403 SID of another account, the fix
    saying it is the domain's SID and naming hers; another account's SID keeps the ESC1 fix."""
    domain = Sid(ALICE_SID.authority, ALICE_SID.sub_authorities[:-1])
    with pytest.raises(MappingRefused, match="SID of another account") as info:
        decide(certificate(sid=domain), account(), "strong")
    assert "the SID of the account's domain, not of an account (no RID)" in (info.value.hint or "")
    assert f"its objectSid is {ALICE_SID}" in (info.value.hint or "")
    with pytest.raises(MappingRefused, match="SID of another account") as other:
        decide(certificate(sid=ADMIN_SID), account(), "strong")
    assert "ESC1" in (other.value.hint or "")


def _sid_value_of(text: bytes) -> bytes:
    """A SID extension value in AD CS's shape holding `text` as its OCTET STRING."""
    names = rfc5280.GeneralNames()
    name = names.componentType.clone()
    name["otherName"]["type-id"] = univ.ObjectIdentifier(OBJECTSID_OID)
    name["otherName"]["value"] = der_encoder.encode(univ.OctetString(text))
    names.append(name)
    encoded: bytes = der_encoder.encode(names)
    return encoded


def test_audit_mode_serves_weak_mapping_and_says_so() -> None:
    """strong-or-audit admits a weakly mapped certificate, marked weak, with the reason and the fix."""
    mapping = decide(certificate(), account("X509:<S>CN=alice"), "strong-or-audit")
    assert (mapping.rule, mapping.weak) == ("weak-audit", True)
    assert "X509SubjectOnly" in mapping.detail
    assert "altSecurityIdentities: X509:<I>" in mapping.detail


# -- strong-or-audit: a weakly mapped certificate older than its account (KB5014754 compatibility mode) -----------


def test_predates_account_compares_not_before_with_when_created_beyond_the_compensation() -> None:
    """Earlier than whenCreated by more than the compensation: how much; equal, later, or within it: None."""
    created = NOW
    assert predates_account(NOW - timedelta(seconds=601), created, timedelta(seconds=600)) == timedelta(seconds=601)
    assert predates_account(NOW - timedelta(seconds=1), created, timedelta(0)) == timedelta(seconds=1)
    assert predates_account(NOW - timedelta(seconds=600), created, timedelta(seconds=600)) is None
    assert predates_account(NOW, created, timedelta(0)) is None
    assert predates_account(NOW + timedelta(days=1), created, timedelta(0)) is None


def test_audit_refuses_a_weak_certificate_older_than_its_account() -> None:
    """strong-or-audit, weak mapping, notBefore a day before whenCreated and no compensation: refused, and the
    hint gives both times, the gap, the key to raise and the strong entry that would map the certificate."""
    cert = certificate()  # notBefore NOW - 1 day
    with pytest.raises(MappingRefused) as refused:
        decide(cert, account(created=NOW), "strong-or-audit")
    assert refused.value.reason == "the certificate was issued before its account was created and is only weakly mapped"
    hint = refused.value.hint or ""
    assert "86400 s (1 day, 0:00:00) before alice@ad.test (CN=alice,CN=Users,DC=ad,DC=test) was created" in hint
    assert f"whenCreated {NOW.isoformat()}" in hint
    assert "certificate_backdating_compensation (0 s (0:00:00))" in hint
    assert f"altSecurityIdentities: {altsecid.issuer_serial_entry(cert)}" in hint


def test_audit_serves_a_weak_certificate_older_than_its_account_within_the_compensation() -> None:
    """The same certificate with a compensation of a day and a second is served (weak, with the warning's detail)."""
    mapping = decide(certificate(), account(created=NOW), "strong-or-audit", "AD.TEST", timedelta(days=1, seconds=1))
    assert (mapping.rule, mapping.weak) == ("weak-audit", True)


def test_strong_mappings_and_strong_mode_ignore_the_account_creation_time() -> None:
    """A certificate a day older than its account is admitted by its SID or a strong altSecurityIdentities entry,
    in both modes; strong refuses a weak one for its mapping, not its age."""
    cert = certificate()
    for mode in ("strong", "strong-or-audit"):
        assert decide(certificate(sid=ALICE_SID), account(created=NOW), mode).rule == "sid-extension"
        entry = altsecid.issuer_serial_entry(cert)
        assert decide(cert, account(entry, created=NOW), mode).rule == "alt-security-identity"
        assert decide(cert, account(entry, created=None), mode).rule == "alt-security-identity"
    with pytest.raises(MappingRefused, match="not strongly mapped"):
        decide(cert, account(created=NOW), "strong")


def test_audit_refuses_a_weak_certificate_when_the_account_creation_time_is_unknown() -> None:
    """No whenCreated from the directory: nothing to compare a weak certificate with, so strong-or-audit refuses it
    and says which attribute the bind account must be able to read."""
    with pytest.raises(MappingRefused, match="creation time is unknown") as refused:
        decide(certificate(), account(created=None), "strong-or-audit")
    assert "no whenCreated" in (refused.value.hint or "")


def test_malformed_sid_extension_refused_by_decide() -> None:
    """A SID extension that does not parse is a refusal, in both modes, never 'no extension'."""
    bad = x509.UnrecognizedExtension(SID_EXTENSION_OID, b"\x30\x00")
    for mode in ("strong", "strong-or-audit"):
        with pytest.raises(MappingRefused) as refused:
            decide(certificate(extensions=[bad]), account(), mode)
        assert refused.value.reason == "the certificate's SID extension cannot be read"


def test_the_account_principal_is_what_the_kdc_is_asked_for() -> None:
    """The mapping names the account's own principal (sAMAccountName@REALM), whatever the UPN said."""
    mallory = Account(
        dn="CN=mallory,CN=Users,DC=ad,DC=test", sam_account_name="mallory", upn="alice@corp.example", sid=ALICE_SID
    )
    assert decide(certificate(sid=ALICE_SID), mallory, "strong", "AD.TEST").principal == "mallory@AD.TEST"


def test_reversed_serial_matches_with_or_without_the_sign_byte() -> None:
    """<SR>0201efcdab00 (CryptoAPI, sign byte last) and <SR>0201efcdab both name serial 0xABCDEF0102."""
    cert = certificate(serial=0xABCDEF0102)
    for serial in ("0201efcdab00", "0201EFCDAB", "02:01:ef:cd:ab:00"):
        assert altsecid.matches(altsecid.parse(f"X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>{serial}"), cert), serial
    assert not altsecid.matches(altsecid.parse("X509:<I>DC=test,DC=ad,CN=AD Test CA<SR>abcdef0102"), cert)


def test_no_account_is_refused_in_strong_and_weak_in_audit() -> None:
    """A name no account has: strong refuses it; strong-or-audit serves it as weak, impersonating by name."""
    with pytest.raises(MappingRefused, match="no account"):
        no_account("ghost@ad.test", "DC=ad,DC=test", "strong")
    mapping = no_account("ghost@ad.test", "DC=ad,DC=test", "strong-or-audit")
    assert (mapping.rule, mapping.weak, mapping.principal) == ("weak-audit", True, "")
    assert "principal" not in mapping.as_facts()


# -- the SID as a subjectAltName URL (tag:microsoft.com,2022-09-14:sid:<SID>) ---------------------------------


def sid_url(sid: Sid | str) -> str:
    return f"tag:microsoft.com,2022-09-14:sid:{sid}"


def test_the_sid_url_alone_maps_the_certificate() -> None:
    """A certificate whose SID is only in a subjectAltName URL is admitted by it, rule sid-url."""
    cert = certificate(urls=("https://intranet.ad.test/", sid_url(ALICE_SID)))
    assert certificate_sid(cert) == ALICE_SID
    mapping = decide(cert, account(), "strong", "AD.TEST")
    assert (mapping.rule, mapping.detail, mapping.principal) == ("sid-url", str(ALICE_SID), "alice@AD.TEST")


def test_a_sid_url_of_another_account_is_refused_in_both_modes() -> None:
    """alice's UPN with the administrator's SID as a URL: the same refusal as the extension's, audit or not."""
    for mode in ("strong", "strong-or-audit"):
        with pytest.raises(MappingRefused, match="SID of another account") as refused:
            decide(certificate(urls=(sid_url(ADMIN_SID),)), account(), mode)
        assert str(ADMIN_SID) in (refused.value.hint or "")


def test_the_extension_and_the_url_that_disagree_are_refused() -> None:
    """The SID extension names alice, the URL the administrator: refused whichever matches the account."""
    cert = certificate(sid=ALICE_SID, urls=(sid_url(ADMIN_SID),))
    with pytest.raises(MappingRefused, match="two different SIDs") as refused:
        decide(cert, account(), "strong-or-audit")
    hint = refused.value.hint or ""
    assert str(ALICE_SID) in hint
    assert str(ADMIN_SID) in hint


def test_the_extension_and_the_url_that_agree_are_the_extension() -> None:
    """Both forms naming alice's SID: admitted, rule sid-extension, the detail says both were read."""
    mapping = decide(certificate(sid=ALICE_SID, urls=(sid_url(ALICE_SID),)), account(), "strong")
    assert mapping.rule == "sid-extension"
    assert "subjectAltName URL" in mapping.detail


@pytest.mark.parametrize(
    "urls",
    [
        (sid_url("S-1-5-21-1-2-x"),),
        (sid_url(" S-1-5-21-1-2-3"),),
        (sid_url("S-1-5-21-1-2-3") + "?x",),
        (sid_url("S-2-5-21-1-2-3"),),
        (sid_url(ALICE_SID), sid_url(ALICE_SID)),
        ("TAG:Microsoft.com,2022-09-14:SID:S-1-5-21-1-2-",),
    ],
    ids=["not digits", "space", "query", "revision 2", "two URLs", "other case, bad SID"],
)
def test_malformed_sid_urls_are_refused(urls: tuple[str, ...]) -> None:
    """A SID URL that is not exactly one well-formed SID is refused as unreadable, never skipped; the reason and
    the fix name the subjectAltName URL, not a SID extension the certificate does not have."""
    with pytest.raises(MappingRefused) as refused:
        decide(certificate(urls=urls), account(), "strong-or-audit")
    assert refused.value.reason == "the certificate's subjectAltName SID URL cannot be read"
    assert "tag:microsoft.com,2022-09-14:sid:" in (refused.value.hint or "")
    assert "SID extension" not in (refused.value.hint or "")


def test_the_prefix_is_matched_without_regard_to_case() -> None:
    """Windows reads the tag URI case-insensitively: so does the gateway (a SID it ignored would go unchecked)."""
    assert certificate_sid(certificate(urls=(f"TAG:MICROSOFT.COM,2022-09-14:SID:{ALICE_SID}",))) == ALICE_SID


def test_a_sid_url_written_by_the_openssl_cli_is_read(tmp_path: Path) -> None:
    """`URI.1 = tag:microsoft.com,...` in an openssl CLI section (the inline form splits at its comma): the SID an
    outside CA tool writes is read."""
    key, pem, conf = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "req.cnf"
    conf.write_text(
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n[dn]\nCN = alice\n"
        "[ext]\nsubjectAltName = @alt\n"
        f"[alt]\notherName.1 = 1.3.6.1.4.1.311.20.2.3;UTF8:alice@ad.test\nURI.1 = {sid_url(ALICE_SID)}\n"
    )
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-keyout", str(key), "-out", str(pem), "-config", str(conf), "-days", "1"),
        ],
        check=True,
        capture_output=True,
    )
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    assert certificate_sid(cert) == ALICE_SID


_TRICKY_ISSUER = x509.Name(
    [
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "test")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "ad")]),
        x509.RelativeDistinguishedName(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Corp, Inc."),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Devices"),
            ]
        ),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, 'Corp "Issuing" CA')]),
    ]
)


@pytest.mark.parametrize(
    ("issuer", "matched"),
    [
        # CertNameToStr(CERT_X500_NAME_STR), as Windows writes it: values with `,` or `"` quoted, `""` inside,
        # the parts of a multi-valued RDN joined by ` + `
        ('DC=test, DC=ad, O="Corp, Inc." + OU=Devices, CN="Corp ""Issuing"" CA"', True),
        ('DC=test,DC=ad,O="Corp, Inc."+OU=Devices,CN="Corp ""Issuing"" CA"', True),
        ('CN="Corp ""Issuing"" CA", OU=Devices + O="Corp, Inc.", DC=ad, DC=test', True),
        ('DC=test; DC=ad; O="Corp, Inc." + OU=Devices; CN="Corp ""Issuing"" CA"', True),  # SEMICOLON_FLAG
        ('OID.0.9.2342.19200300.100.1.25=test, DC=ad, O="Corp, Inc." + OU=Devices, CN="Corp ""Issuing"" CA"', True),
        ('DC=test,DC=ad,O=Corp\\, Inc.+OU=Devices,CN=Corp \\"Issuing\\" CA', True),  # RFC 4514's escapes
        # another name: the multi-valued RDN without its second part, or the `+` inside the quoted value
        ('DC=test, DC=ad, O="Corp, Inc.", CN="Corp ""Issuing"" CA"', False),
        ('DC=test, DC=ad, O="Corp, Inc. + OU=Devices", CN="Corp ""Issuing"" CA"', False),
        ('DC=test, DC=ad, O="Corp, Inc." + OU=Devices, CN="Corp ""Issuing CA"', False),  # unbalanced quotes
    ],
)
def test_issuer_names_as_windows_writes_them_match(issuer: str, matched: bool) -> None:
    """An `<I>` issuer with a comma and quotes in its values and a multi-valued RDN matches as Windows'
    CertNameToStr writes it (quoted values, ` + `) and as RFC 4514 escapes it; a different name never does."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")]))
        .issuer_name(_TRICKY_ISSUER)
        .public_key(key.public_key())
        .serial_number(0x123456)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    entry = altsecid.parse(f"X509:<I>{issuer}<SR>563412")
    assert (entry.kind, altsecid.matches(entry, cert)) == ("X509IssuerSerialNumber", matched)
