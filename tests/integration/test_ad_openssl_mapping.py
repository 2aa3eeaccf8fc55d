"""Strong mapping attacked from outside: certificates minted by the openssl CLI, the real Samba AD DC.

The independent harness does not use the lab's PKI code; it writes `openssl x509 -req -extfile` files. So do
these tests: each certificate is signed by the lab's issuing CA with the openssl CLI and an extension file,
in the exact DER shape AD CS writes the SID extension and in the careless and hostile variants a CA could
write, and goes through a real `strong` gateway inside the realm's namespace with curl as the device.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

from proxy.identity import altsecid
from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _start, status_and_body
from tests.integration.test_ad_mapping import served_as, start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

_COMMON = """\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""


def _sid_section(value: str, name: str = "sid") -> str:
    """An openssl ASN1 generator section for the SID extension's value: GeneralNames holding one otherName
    of type 1.3.6.1.4.1.311.25.2.1 whose [0] EXPLICIT value is `value` (e.g. `OCTETSTRING:S-1-5-...`)."""
    return (
        f"[{name}]\nname = IMPLICIT:0,SEQUENCE:{name}_other\n[{name}_other]\n"
        f"type = OID:1.3.6.1.4.1.311.25.2.1\nvalue = EXPLICIT:0,{value}\n"
    )


def sid_extension_text(value: str, *, critical: bool = False) -> tuple[str, str]:
    """The extension line and its section for a SID extension holding `value`."""
    line = f"1.3.6.1.4.1.311.25.2 = {'critical, ' if critical else ''}ASN1:SEQUENCE:sid\n"
    return line, _sid_section(value)


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    return ad_mapping_realm


@pytest.fixture(scope="module")
def strong(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    gw = start_gateway(realm, tmp_path_factory.mktemp("openssl-strong"), ad_backend, "strong")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for this module's keys, CSRs and certificates (one EC key shared by all of them)."""
    where = tmp_path_factory.mktemp("openssl-minted")
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(where / "device.key"), "-out", str(where / "device.csr"), "-subj", "/CN=device"]
    subprocess.run(argv, check=True, capture_output=True)
    return where


def mint(realm: ad.AdRealm, where: Path, label: str, extensions: str, sections: str = "", serial: str = "") -> Path:
    """`openssl x509 -req` from the lab's issuing CA with `extensions` (extfile lines) and `sections`."""
    extfile = where / f"{label}.ext"
    extfile.write_text(_COMMON + extensions + sections)
    cert = where / f"{label}.pem"
    argv = ["openssl", "x509", "-req", "-in", str(where / "device.csr"), "-CA", str(realm.pki.issuing_cert)]
    argv += ["-CAkey", str(realm.pki.issuing_key), "-days", "5", "-extfile", str(extfile), "-out", str(cert)]
    argv += ["-set_serial", serial] if serial else ["-CAcreateserial", "-CAserial", str(where / "serial.srl")]
    subprocess.run(argv, check=True, capture_output=True)
    return cert


def upn_line(upn: str) -> str:
    return f"subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:{upn}\n"


def curl(realm: ad.AdRealm, gw: AdProcess, cert: Path, key: Path) -> tuple[int, str]:
    gw.mark()
    argv = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert)]
    argv += ["--key", str(key), "-w", "\n%{http_code}", f"{gw.url}/Microsoft-Server-ActiveSync"]
    return status_and_body(realm.run(argv, timeout=60))


def alice_sid(realm: ad.AdRealm) -> str:
    return str(ad_mapping.object_sid(realm, "alice"))


def test_the_sid_extension_in_ad_cs_shape_is_admitted(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """The SID extension as AD CS writes it, minted by openssl's ASN1 generator: served as alice, rule sid-extension."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    cert = mint(realm, minted, "exact", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"
    assert strong.wait_event("request", upn="alice@ad.test")["mapping"] == "sid-extension"


@pytest.mark.parametrize(
    ("label", "value", "why"),
    [
        ("utf8", "UTF8:{sid}", "not an OCTET STRING"),
        ("binary", "FORMAT:HEX,OCTETSTRING:010500000000000515000000", "not a SID string"),
        ("trailing", "OCTETSTRING:{sid}-", "not a SID string"),
        ("spaces", "OCTETSTRING:{spaced}", "not a SID string"),
        ("wrong-tag", "IA5STRING:{sid}", "not an OCTET STRING"),
    ],
)
def test_a_careless_sid_extension_is_refused_naming_it(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, label: str, value: str, why: str
) -> None:
    """A SID extension whose value is not the OCTET STRING of one SID string: 403 at mapping, the log names why."""
    sid = alice_sid(realm)
    line, section = sid_extension_text(value.format(sid=sid, spaced=sid.replace("-21-", "-21- ")))
    cert = mint(realm, minted, label, upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "the certificate's SID extension cannot be read" in body
    event = strong.wait_event("mapping_refused")
    assert why in event["fix"]


@pytest.mark.parametrize("sid", ["S-1-5-32-544", "S-1-1-0", "S-1-5-18"])
def test_a_well_known_sid_is_another_accounts(realm: ad.AdRealm, strong: AdProcess, minted: Path, sid: str) -> None:
    """A SID extension with a well-known SID (Administrators, Everyone, SYSTEM) on alice's UPN: 403, SID of another
    account, nothing forwarded."""
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    cert = mint(realm, minted, f"wk{sid.replace('-', '')}", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body


def test_a_lower_case_sid_is_the_same_sid(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """`s-1-5-21-...`: ConvertStringSidToSid takes it, so the gateway does: served as alice."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm).lower()}")
    cert = mint(realm, minted, "lower", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"


def test_two_sid_extensions_are_refused_not_a_5xx(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """Two SID extensions (alice's, then bob's), which OpenSSL 3.0's handshake lets through: 403 at the certificate
    stage naming the extension twice (RFC 5280 4.2), never a 500; nothing forwarded."""
    bob = str(ad_mapping.object_sid(realm, "bob"))
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    # openssl's extension file keeps one value per OID; the second extension is spliced in by re-signing with the
    # same CA key through the openssl CLI (see _with_second_extension)
    cert = mint(realm, minted, "dup-base", upn_line("alice@ad.test") + line, section)
    dup = _with_second_extension(realm, minted, cert, _sid_section(f"OCTETSTRING:{bob}", "sid"), "dup")
    status, body = curl(realm, strong, dup, minted / "device.key")
    assert status == 403, body
    assert "certificate carries the extension 1.3.6.1.4.1.311.25.2 twice" in body
    event = strong.wait_event("certificate_rejected")
    assert "RFC 5280" in event["fix"]
    assert not strong.events("request_failed", strong.since)


def _with_second_extension(realm: ad.AdRealm, where: Path, cert: Path, section: str, label: str) -> Path:
    """`cert` with a second SID extension (value from `section`) appended to its extensions, signed again by the
    lab's issuing CA: the TBS is rebuilt with pyasn1 and signed with `openssl dgst -sign`."""
    from pyasn1.codec.der import decoder, encoder
    from pyasn1.type import univ
    from pyasn1_modules import rfc5280

    gen = where / f"{label}.genconf"
    gen.write_text("asn1 = SEQUENCE:sid\n" + section)
    value = where / f"{label}.der"
    subprocess.run(["openssl", "asn1parse", "-genconf", str(gen), "-out", str(value)], check=True, capture_output=True)
    der = subprocess.run(["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True)
    parsed, _ = decoder.decode(der.stdout, asn1Spec=rfc5280.Certificate())
    tbs = parsed["tbsCertificate"]
    extension = rfc5280.Extension()
    extension["extnID"] = univ.ObjectIdentifier("1.3.6.1.4.1.311.25.2")
    extension["critical"] = False
    extension["extnValue"] = value.read_bytes()
    tbs["extensions"].append(extension)
    tbs_path = where / f"{label}.tbs"
    tbs_path.write_bytes(encoder.encode(tbs))
    signed = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(realm.pki.issuing_key), str(tbs_path)],
        check=True,
        capture_output=True,
    )
    parsed["signature"] = univ.BitString.fromOctetString(signed.stdout)
    out = where / f"{label}.pem"
    pem = subprocess.run(
        ["openssl", "x509", "-inform", "DER"], input=encoder.encode(parsed), check=True, capture_output=True
    )
    out.write_bytes(pem.stdout)
    return out


# -- the subjectAltName SID URL, as a CA's extension file writes it -----------------------------------------------


def url_lines(upn: str, *urls: str) -> tuple[str, str]:
    """subjectAltName in a section (the one-line form splits a URL at its comma): the UPN and `urls`."""
    alt = f"[alt]\notherName.1 = 1.3.6.1.4.1.311.20.2.3;UTF8:{upn}\n"
    alt += "".join(f"URI.{i} = {url}\n" for i, url in enumerate(urls, 1))
    return "subjectAltName = @alt\n", alt


def test_the_sid_url_in_odd_case_is_read(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """`TAG:Microsoft.COM,2022-09-14:SID:<alice's SID>` alone: the prefix is matched without regard to case, rule
    sid-url, served as alice."""
    line, alt = url_lines("alice@ad.test", f"TAG:Microsoft.COM,2022-09-14:SID:{alice_sid(realm)}")
    cert = mint(realm, minted, "url-case", line, alt)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"
    assert strong.wait_event("request", upn="alice@ad.test")["mapping"] == "sid-url"


@pytest.mark.parametrize(
    ("label", "url"),
    [
        ("url-space", "tag:microsoft.com,2022-09-14:sid: {sid}"),
        ("url-query", "tag:microsoft.com,2022-09-14:sid:{sid}?x=1"),
        ("url-two-sids", "tag:microsoft.com,2022-09-14:sid:{sid}-{sid}"),
    ],
)
def test_a_malformed_sid_url_is_refused_naming_the_url(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, label: str, url: str
) -> None:
    """A SID URL with a space, a query or two SIDs run together: 403 'SID URL cannot be read', whatever else."""
    line, alt = url_lines("alice@ad.test", url.format(sid=alice_sid(realm)))
    cert = mint(realm, minted, label, line, alt)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "the certificate's subjectAltName SID URL cannot be read" in body


def test_the_extension_and_the_url_disagreeing_is_refused(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """alice's SID extension and a SID URL of bob's in the same certificate: 403 'two different SIDs', both named."""
    bob = str(ad_mapping.object_sid(realm, "bob"))
    ext, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    line, alt = url_lines("alice@ad.test", f"tag:microsoft.com,2022-09-14:sid:{bob}")
    cert = mint(realm, minted, "ext-url-disagree", line + ext, alt + section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "the certificate names two different SIDs" in body
    fix = strong.wait_event("mapping_refused")["fix"]
    assert alice_sid(realm) in fix
    assert bob in fix


# -- the UPN as AD reads it ---------------------------------------------------------------------------------------


def test_a_upn_in_another_case_maps_to_the_account(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """`ALICE@AD.TEST` with alice's SID: AD compares UPNs without case; the gateway impersonates alice's account."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    cert = mint(realm, minted, "upn-case", upn_line("ALICE@AD.TEST") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == "alice@AD.TEST"


def test_a_upn_suffix_realm_map_does_not_name_is_the_accounts(
    realm: ad.AdRealm, strong: AdProcess, minted: Path
) -> None:
    """carol@corp.example (a uPNSuffixes suffix AD accepts, no realm_map entry) with carol's SID: strong mapping
    impersonates the account, carol@AD.TEST, not a principal of a realm CORP.EXAMPLE nobody serves."""
    sid = str(ad_mapping.object_sid(realm, "carol"))
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    cert = mint(realm, minted, "carol-suffix", upn_line(f"carol@{ad.OTHER_SUFFIX}") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == "carol@AD.TEST"


@pytest.mark.parametrize(
    ("label", "san", "reason"),
    [
        ("no-upn", "subjectAltName = email:alice@ad.test\n", "no user principal name"),
        ("empty-upn", "subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:\n", "certificate UPN is empty"),
        ("two-upns", "subjectAltName = @alt\n", "certificate carries 2 UPNs; expected one"),
    ],
)
def test_a_certificate_without_exactly_one_upn_is_refused_even_with_the_sid(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, label: str, san: str, reason: str
) -> None:
    """alice's SID extension but no UPN, an empty one, or two (alice's and bob's): 403 at identity, saying which."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    alt = "[alt]\notherName.1 = 1.3.6.1.4.1.311.20.2.3;UTF8:alice@ad.test\n"
    alt += "otherName.2 = 1.3.6.1.4.1.311.20.2.3;UTF8:bob@ad.test\n"
    cert = mint(realm, minted, label, san + line, section + alt)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert reason.lower() in body.lower()


def mint_ca(realm: ad.AdRealm, where: Path, label: str, extensions: str, start: datetime, sections: str = "") -> Path:
    """`openssl ca` from the lab's issuing CA with notBefore `start` (`-startdate`, which `openssl x509` lacks in
    OpenSSL 3.0) and `extensions`: how a CA that backdates, or whose clock runs fast, issues."""
    ca = where / "ca"
    (ca / "new").mkdir(parents=True, exist_ok=True)
    (ca / "index.txt").touch()
    if not (ca / "serial").exists():
        (ca / "serial").write_text("5001\n")
    config = ca / "ca.cnf"
    config.write_text(
        f"[ca]\ndefault_ca = lab\n[lab]\ndatabase = {ca / 'index.txt'}\nnew_certs_dir = {ca / 'new'}\n"
        f"certificate = {realm.pki.issuing_cert}\nprivate_key = {realm.pki.issuing_key}\nserial = {ca / 'serial'}\n"
        "default_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n"
    )
    extfile = where / f"{label}.ext"
    extfile.write_text(_COMMON + extensions + sections)
    cert = where / f"{label}.pem"
    stamp = "%Y%m%d%H%M%SZ"
    argv = ["openssl", "ca", "-batch", "-notext", "-config", str(config), "-in", str(where / "device.csr")]
    argv += ["-startdate", start.strftime(stamp), "-enddate", (start + timedelta(days=5)).strftime(stamp)]
    argv += ["-extfile", str(extfile), "-out", str(cert)]
    subprocess.run(argv, check=True, capture_output=True)
    return cert


def test_a_certificate_not_yet_valid_is_refused(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """notBefore a day ahead (a CA whose clock runs fast), with alice's SID: refused in the handshake, the log says
    the certificate is not yet valid and to check the clocks; never served, never a 5xx."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    start = datetime.now(UTC) + timedelta(days=1)
    cert = mint_ca(realm, minted, "future", upn_line("alice@ad.test") + line, start, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 0, body  # no HTTP answer: the handshake failed
    event = strong.wait_event("tls_handshake_refused", reason="certificate is not yet valid")
    assert "clocks" in event["fix"]


def test_a_critical_sid_extension_is_refused_in_the_handshake(
    realm: ad.AdRealm, strong: AdProcess, minted: Path
) -> None:
    """alice's SID extension marked critical (AD CS writes it non-critical): OpenSSL refuses an unhandled critical
    extension in the handshake, and the log says so with the fix; never served."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}", critical=True)
    cert = mint(realm, minted, "critical", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 0, body
    event = strong.wait_event("tls_handshake_refused", reason="unhandled critical extension")
    assert "non-critical" in event["fix"]


# -- altSecurityIdentities as administrators write them -----------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(realm: ad.AdRealm) -> Iterator[str]:
    """An account of this module's own (a unique name: the realm is shared by the run's workers), deleted after."""
    name = f"os{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", name, f"Os-{secrets.token_hex(8)}-Pa55")
    try:
        yield name
    finally:
        realm.samba_tool("user", "delete", name)


@pytest.fixture(scope="module")
def uncached(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """A `strong` gateway that asks the directory on every request (cache_seconds = 0): each test rewrites the
    account's altSecurityIdentities and the next request must see it."""
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    gw = start_gateway(realm, tmp_path_factory.mktemp("openssl-uncached"), ad_backend, "strong", directory_text=table)
    yield gw
    gw.stop()


def set_alt_security_identities(realm: ad.AdRealm, name: str, *values: str) -> None:
    lines = [f"dn: CN={name},CN=Users,{realm.base_dn}", "changetype: modify", "replace: altSecurityIdentities"]
    realm.ldbmodify("\n".join([*lines, *(f"altSecurityIdentities: {v}" for v in values)]) + "\n")


ISSUER = "CN=Lab Issuing CA"  # the lab's issuing CA, as Windows writes its name (one RDN: either order)


def _thumbprint(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return hashlib.sha1(loaded.public_bytes(serialization.Encoding.DER), usedforsecurity=False).hexdigest()


def _ski(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return loaded.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


@pytest.mark.parametrize(
    ("label", "serial", "entries", "status", "said"),
    [
        ("sr-reversed", "0x0A0B0C", ["X509:<I>{issuer}<SR>0c0b0a"], 200, "<SR>0c0b0a"),
        ("sr-openssl-order", "0x0A0B0D", ["X509:<I>{issuer}<SR>0a0b0d"], 403, "no altSecurityIdentities entry"),
        ("sr-sign-byte", "0xABCDEF0102", ["X509:<I>{issuer}<SR>0201efcdab00"], 200, "0201efcdab00"),
        ("sr-upper-no-sign", "0xABCDEF0103", ["X509:<I>{issuer}<SR>0301EFCDAB"], 200, "0301EFCDAB"),
        ("ski-upper", "0x0A0B10", ["X509:<SKI>{SKI}"], 200, "<SKI>"),
        ("sha1-upper", "0x0A0B11", ["X509:<SHA1-PUKEY>{SHA1}"], 200, "<SHA1-PUKEY>"),
        ("issuer-subject", "0x0A0B12", ["X509:<I>{issuer}<S>CN=device"], 403, "(X509IssuerSubject)"),
        ("subject-only", "0x0A0B13", ["X509:<S>CN=device"], 403, "(X509SubjectOnly)"),
        ("rfc822", "0x0A0B14", ["X509:<RFC822>{upn}"], 403, "(X509RFC822)"),
        ("weak-and-strong", "0x0A0B15", ["X509:<S>CN=device", "X509:<I>{issuer}<SR>150b0a"], 200, "<SR>150b0a"),
        ("serial-and-subject", "0x0A0B16", ["X509:<I>{issuer}<S>CN=device<SR>160b0a"], 403, "no strong mapping"),
    ],
)
def test_alt_security_identities_as_administrators_write_them(
    realm: ad.AdRealm,
    uncached: AdProcess,
    minted: Path,
    fresh: str,
    label: str,
    serial: str,
    entries: list[str],
    status: int,
    said: str,
) -> None:
    """Each entry form on an account, and a certificate of its UPN without a SID (openssl x509 -set_serial): the
    strong forms map it (reversed serial, with or without the sign byte, hex in either case), the serial in
    openssl's order does not, the weak forms are 403 naming the kind, `<I>..<S>..<SR>..` is no entry at all."""
    upn = f"{fresh}@{ad.DNS_DOMAIN}"
    extra = f"subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:{upn}, email:{upn}\n"
    extra += "subjectKeyIdentifier = hash\n"
    cert = mint(realm, minted, f"alt-{label}", extra, serial=serial)
    values = [e.format(issuer=ISSUER, upn=upn, SKI=_ski(cert).upper(), SHA1=_thumbprint(cert).upper()) for e in entries]
    set_alt_security_identities(realm, fresh, *values)
    got, body = curl(realm, uncached, cert, minted / "device.key")
    assert got == status, body
    line = uncached.wait_event("request", upn=upn)
    if status == 200:
        assert served_as(body) == f"{fresh}@{ad.REALM}"
        assert line["mapping"] == "alt-security-identity"
        assert said in line["mapping_detail"]
    else:
        assert said in uncached.wait_event("mapping_refused")["reason"]


def test_a_upn_changed_after_issuance_still_maps_by_the_account_name(
    realm: ad.AdRealm, uncached: AdProcess, minted: Path, fresh: str
) -> None:
    """The account's UPN renamed after its certificate (with its SID) was issued: the certificate's UPN is now no
    account's, and as AD does for a UPN in the domain's own name the gateway finds the account by its
    sAMAccountName; the SID proves it: served as that account."""
    sid = str(ad_mapping.object_sid(realm, fresh))
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    upn = f"{fresh}@{ad.DNS_DOMAIN}"
    cert = mint(realm, minted, "renamed", upn_line(upn) + line, section)
    ldif = f"dn: CN={fresh},CN=Users,{realm.base_dn}\nchangetype: modify\nreplace: userPrincipalName\n"
    realm.ldbmodify(ldif + f"userPrincipalName: renamed-{fresh}@{ad.DNS_DOMAIN}\n")
    try:
        status, body = curl(realm, uncached, cert, minted / "device.key")
        assert status == 200, body
        assert served_as(body) == f"{fresh}@{ad.REALM}"
    finally:
        realm.ldbmodify(ldif + f"userPrincipalName: {upn}\n")


def test_one_entry_on_two_accounts_serves_the_account_the_upn_names(
    realm: ad.AdRealm, uncached: AdProcess, minted: Path, fresh: str
) -> None:
    """The same `<I>..<SR>..` entry on two accounts (an administrator's slip): the certificate of the first's UPN is
    served as the first, never as the second; the look-up is by the UPN, the entry only proves it."""
    other = f"os{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", other, f"Os-{secrets.token_hex(8)}-Pa55")
    try:
        upn = f"{fresh}@{ad.DNS_DOMAIN}"
        cert = mint(realm, minted, "two-accounts", upn_line(upn), serial="0x0A0B20")
        for name in (fresh, other):
            set_alt_security_identities(realm, name, f"X509:<I>{ISSUER}<SR>200b0a")
        status, body = curl(realm, uncached, cert, minted / "device.key")
        assert status == 200, body
        assert served_as(body) == f"{fresh}@{ad.REALM}"
    finally:
        realm.samba_tool("user", "delete", other)


# -- a certificate older than its account (strong-or-audit), minted with openssl ca -startdate --------------------


@pytest.fixture(scope="module")
def audit(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """`strong-or-audit` with the lab's compensation (3600 s), asking the directory on every request."""
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    where = tmp_path_factory.mktemp("openssl-audit")
    gw = start_gateway(realm, where, ad_backend, "strong-or-audit", directory_text=table)
    yield gw
    gw.stop()


@pytest.fixture
def newcomer(realm: ad.AdRealm) -> Iterator[str]:
    """An account of the test's own, never given an altSecurityIdentities entry, deleted after. Not `fresh`: the
    module's tests leave their entries on it, and `<SHA1-PUKEY>` of the key every certificate here shares (the key
    entries test's last) maps this test's certificates strongly, which no notBefore is compared for: 200 for the
    two-hours case whenever that test ran before (reversed order, or `--dist load` giving both to one worker)."""
    name = f"on{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", name, f"On-{secrets.token_hex(8)}-Pa55")
    try:
        yield name
    finally:
        realm.samba_tool("user", "delete", name)


@pytest.mark.parametrize(("label", "earlier", "status"), [("two-hours", 7200, 403), ("half-hour", 1800, 200)])
def test_a_weak_certificate_older_than_its_account(
    realm: ad.AdRealm, audit: AdProcess, minted: Path, newcomer: str, label: str, earlier: int, status: int
) -> None:
    """notBefore before the account's whenCreated by more than the compensation (3600 s): 403 at mapping, the fix
    gives both times; by less: served as weakly mapped, with the warning."""
    out = realm.ldbsearch(f"(sAMAccountName={newcomer})", "whenCreated", "altSecurityIdentities")
    assert "altSecurityIdentities" not in out, out  # only weakly mapped: by its UPN
    found = re.search(r"^whenCreated: (\d{14})\.0Z$", out, re.MULTILINE)
    assert found is not None, out
    created = datetime.strptime(found.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    upn = f"{newcomer}@{ad.DNS_DOMAIN}"
    cert = mint_ca(realm, minted, f"older-{label}", upn_line(upn), created - timedelta(seconds=earlier))
    got, body = curl(realm, audit, cert, minted / "device.key")
    assert got == status, body
    if status == 403:
        event = audit.wait_event("mapping_refused")
        assert "issued before its account was created" in event["reason"]
        assert f"{earlier} s" in event["fix"]
    else:
        assert audit.wait_event("weak_certificate_mapping", upn=upn)


def test_a_sensitive_account_proven_by_its_sid_is_still_not_delegated(
    realm: ad.AdRealm, strong: AdProcess, minted: Path
) -> None:
    """erin ('sensitive and cannot be delegated') with her own SID: the mapping admits her, the KDC's evidence ticket
    is not forwardable, 403 at kerberos naming the flag; strong mapping never delegates what the KDC would not."""
    sid = str(ad_mapping.object_sid(realm, "erin"))
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    cert = mint(realm, minted, "erin-sid", upn_line("erin@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "its evidence ticket is not forwardable" in body
    assert "marked sensitive" in strong.wait_event("kerberos_refused", principal="erin@AD.TEST")["fix"]


def test_a_deleted_accounts_sid_is_another_accounts(realm: ad.AdRealm, strong: AdProcess, minted: Path) -> None:
    """The SID of an account since deleted, on alice's UPN: 403 'SID of another account' (AD never reuses a SID)."""
    gone = f"og{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", gone, f"Os-{secrets.token_hex(8)}-Pa55")
    sid = str(ad_mapping.object_sid(realm, gone))
    realm.samba_tool("user", "delete", gone)
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    cert = mint(realm, minted, "deleted-sid", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body
    assert sid in strong.wait_event("mapping_refused")["fix"]


# An issuing CA whose name has what CertNameToStr quotes (a comma, quotes) and a multi-valued RDN
_TRICKY_CA_SUBJECT = '/DC=test/DC=ad/O=Corp, Inc.+OU=Devices/CN=Corp "Issuing" CA'
_TRICKY_CA_WINDOWS = 'DC=test, DC=ad, O="Corp, Inc." + OU=Devices, CN="Corp ""Issuing"" CA"'
_CA_EXTENSIONS = """\
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@pytest.fixture(scope="module")
def tricky_ca(realm: ad.AdRealm, minted: Path) -> tuple[Path, Path]:
    """An intermediate under the lab's root, made with the openssl CLI, named `_TRICKY_CA_SUBJECT`."""
    key, csr, cert, ext = (minted / f"tricky-ca.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(key), "-out", str(csr), "-multivalue-rdn", "-subj", _TRICKY_CA_SUBJECT]
    subprocess.run(argv, check=True, capture_output=True)
    ext.write_text(_CA_EXTENSIONS)
    argv = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(realm.pki.root_cert)]
    argv += ["-CAkey", str(realm.pki.root_key), "-days", "5", "-set_serial", "0x7A11", "-extfile", str(ext)]
    subprocess.run([*argv, "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tricky_gateway(
    realm: ad.AdRealm, ad_backend: AdProcess, tricky_ca: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """A `strong` gateway that also trusts the tricky CA (revocation off: that CA publishes no CRL, and mapping
    is what is tested), asking the directory on every request."""
    where = tmp_path_factory.mktemp("tricky-gateway")
    port = realm.free_port()
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    text = ad_mapping.gateway_config(realm, "strong", port=port, backend_port=ad_backend.port, directory_text=table)
    text = re.sub(
        r'intermediates = \["([^"]+)"\]\ncrls = \[[^\]]*\]\nrevocation = "require"\n',
        rf'intermediates = ["\1", "{tricky_ca[0]}"]\nrevocation = "off"\n',
        text,
    )
    assert str(tricky_ca[0]) in text
    (where / "gateway.toml").write_text(text)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(where / "gateway.toml")]
    gw = _start(realm, argv, port, where / "gateway.log", scheme="https")
    yield gw
    gw.stop()


@pytest.mark.parametrize(
    ("label", "serial", "issuer", "status"),
    [
        ("windows", "0x7A0101", _TRICKY_CA_WINDOWS, 200),
        ("windows-reversed", "0x7A0102", 'CN="Corp ""Issuing"" CA", OU=Devices + O="Corp, Inc.", DC=ad, DC=test', 200),
        ("rfc4514", "0x7A0103", 'CN=Corp \\"Issuing\\" CA,O=Corp\\, Inc.+OU=Devices,DC=ad,DC=test', 200),
        ("without-ou", "0x7A0104", 'DC=test, DC=ad, O="Corp, Inc.", CN="Corp ""Issuing"" CA"', 403),
    ],
)
def test_an_issuer_name_with_quotes_and_a_multi_valued_rdn_as_windows_writes_it(
    realm: ad.AdRealm,
    tricky_gateway: AdProcess,
    tricky_ca: tuple[Path, Path],
    minted: Path,
    fresh: str,
    label: str,
    serial: str,
    issuer: str,
    status: int,
) -> None:
    """`<I>..<SR>..` for a CA named `O=Corp, Inc.+OU=Devices, CN=Corp "Issuing" CA`: written as Windows writes it
    (values quoted, ` + `; in either order) or with RFC 4514's escapes it maps the certificate (was 403 "no
    altSecurityIdentities entry names this certificate"); the name without the RDN's second part does not."""
    upn = f"{fresh}@{ad.DNS_DOMAIN}"
    extfile = minted / f"tricky-{label}.ext"
    extfile.write_text(_COMMON + upn_line(upn))
    cert = minted / f"tricky-{label}.pem"
    argv = ["openssl", "x509", "-req", "-in", str(minted / "device.csr"), "-CA", str(tricky_ca[0])]
    argv += ["-CAkey", str(tricky_ca[1]), "-days", "5", "-set_serial", serial, "-extfile", str(extfile)]
    subprocess.run([*argv, "-out", str(cert)], check=True, capture_output=True)
    reversed_serial = bytes.fromhex(serial[2:])[::-1].hex()
    set_alt_security_identities(realm, fresh, f"X509:<I>{issuer}<SR>{reversed_serial}")
    got, body = curl(realm, tricky_gateway, cert, minted / "device.key")
    assert got == status, body
    if status == 200:
        assert served_as(body) == f"{fresh}@{ad.REALM}"
        assert tricky_gateway.wait_event("request", upn=upn)["mapping"] == "alt-security-identity"
    else:
        assert "no altSecurityIdentities entry names" in tricky_gateway.wait_event("mapping_refused")["reason"]


@pytest.mark.parametrize(("rid", "what"), [(512, "Domain Admins"), (502, "krbtgt"), (500, "Administrator")])
def test_a_sid_of_a_group_or_of_krbtgt_on_alices_upn_is_another_accounts(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, rid: int, what: str
) -> None:
    """alice's UPN with the SID of the domain's Domain Admins group, of krbtgt or of Administrator (the domain's
    own SID, another RID): 403 "SID of another account", never served."""
    domain = alice_sid(realm).rsplit("-", 1)[0]
    line, section = sid_extension_text(f"OCTETSTRING:{domain}-{rid}")
    cert = mint(realm, minted, f"rid{rid}", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, (what, body)
    assert "SID of another account" in body
    assert f"{domain}-{rid}" in strong.wait_event("mapping_refused")["fix"]


def _two_other_names(first: str, second: str) -> str:
    return (
        "[sid]\nfirst = IMPLICIT:0,SEQUENCE:one\nsecond = IMPLICIT:0,SEQUENCE:two\n"
        f"[one]\ntype = OID:1.3.6.1.4.1.311.25.2.1\nvalue = EXPLICIT:0,OCTETSTRING:{first}\n"
        f"[two]\ntype = OID:1.3.6.1.4.1.311.25.2.1\nvalue = EXPLICIT:0,OCTETSTRING:{second}\n"
    )


@pytest.mark.parametrize("shape", ["wrong-oid", "two-sids", "two-equal-sids", "trailing-bytes", "inner-trailing"])
def test_a_sid_extension_of_another_shape_is_refused(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, shape: str
) -> None:
    """The SID extension with the otherName's type another OID (the UPN's), two otherNames (bob's SID after alice's,
    or alice's twice), or bytes after the GeneralNames or after the inner OCTET STRING: 403 at mapping, "the
    certificate's SID extension cannot be read" (never alice's SID read from the first name and served)."""
    sid, bob = alice_sid(realm), str(ad_mapping.object_sid(realm, "bob"))
    line = "1.3.6.1.4.1.311.25.2 = ASN1:SEQUENCE:sid\n"
    if shape == "wrong-oid":
        section = _sid_section(f"OCTETSTRING:{sid}").replace("OID:1.3.6.1.4.1.311.25.2.1", "OID:1.3.6.1.4.1.311.20.2.3")
    elif shape in ("two-sids", "two-equal-sids"):
        section = _two_other_names(sid, bob if shape == "two-sids" else sid)
    else:
        inner = der_encoder.encode(univ.OctetString(sid.encode())) + (b"\x00\x00" if shape == "inner-trailing" else b"")
        other = bytes([0x06, 10]) + bytes.fromhex("2b0601040182371902 01".replace(" ", ""))
        other += b"\xa0" + _length(len(inner)) + inner
        names = b"\xa0" + _length(len(other)) + other
        value = b"\x30" + _length(len(names)) + names + (b"\x00\x00" if shape == "trailing-bytes" else b"")
        line, section = f"1.3.6.1.4.1.311.25.2 = DER:{value.hex()}\n", ""
    cert = mint(realm, minted, f"shape-{shape}", upn_line("alice@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, (shape, body)
    assert "the certificate's SID extension cannot be read" in body


def _length(n: int) -> bytes:
    """A DER length (short form below 128, else one or two length bytes)."""
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


@pytest.mark.parametrize("local", ["al*", "*", "a*)(samaccountname=alice", "al\\2a", "ålice", "alice*"])
def test_a_upn_with_filter_characters_never_finds_alice(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, local: str
) -> None:
    """A UPN written to widen the directory's LDAP filter (`*`, `)(`, an escape written out, non-ASCII), with
    alice's SID: were the filter to match alice, her SID would admit it. 403 "no account", never served as alice."""
    line, section = sid_extension_text(f"OCTETSTRING:{alice_sid(realm)}")
    label = "filter-" + hashlib.sha1(local.encode(), usedforsecurity=False).hexdigest()[:8]
    cert = mint(realm, minted, label, upn_line(f"{local}@ad.test") + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 403, (local, body)
    assert "no account in the directory has this name" in body  # the mapping stage asked, escaped: none matched


def _spki_sha1(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = loaded.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki, usedforsecurity=False).hexdigest()


def test_key_entries_name_one_key_and_an_ski_entry_needs_the_extension(
    realm: ad.AdRealm, uncached: AdProcess, minted: Path, fresh: str, tmp_path: Path
) -> None:
    """A certificate without a subjectKeyIdentifier extension: an `<SKI>` entry holding the SHA-1 of its key (what
    CryptoAPI computes as a key identifier when the extension is absent) does not map it here (403); a
    `<SHA1-PUKEY>` entry of another key does not either (403); its own key's `<SHA1-PUKEY>` does (200)."""
    upn = f"{fresh}@{ad.DNS_DOMAIN}"
    cert = mint(realm, minted, "no-ski", upn_line(upn) + "subjectKeyIdentifier = none\n", serial="0x0A0C01")
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        loaded.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    other_key = tmp_path / "other.key"
    other_csr = tmp_path / "other.csr"
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*argv, "-keyout", str(other_key), "-out", str(other_csr), "-subj", "/CN=other"], check=True)
    other = tmp_path / "other.pem"
    argv = ["openssl", "x509", "-req", "-in", str(other_csr), "-CA", str(realm.pki.issuing_cert), "-CAkey"]
    argv += [str(realm.pki.issuing_key), "-days", "5", "-set_serial", "0x0A0C02", "-out", str(other)]
    subprocess.run(argv, check=True, capture_output=True)
    for entry, expected in (
        (f"X509:<SKI>{_spki_sha1(cert)}", 403),
        (f"X509:<SHA1-PUKEY>{_spki_sha1(other)}", 403),
        (f"X509:<SHA1-PUKEY>{_thumbprint(other)}", 403),
        (f"X509:<SHA1-PUKEY>{_spki_sha1(cert)}", 200),
    ):
        set_alt_security_identities(realm, fresh, entry)
        status, body = curl(realm, uncached, cert, minted / "device.key")
        assert status == expected, (entry, body)


@pytest.mark.parametrize(
    ("label", "serial", "entry", "said", "fix"),
    [
        (
            "printed-order",
            "0x8E4311A2B3",
            "X509:<I>CN=Lab Issuing CA<SR>8E4311A2B3",
            "an entry has this serial in printed order",
            "in the order openssl and certutil print it",
        ),
        (
            "root-as-issuer",
            "0x8E4311A2B4",
            "X509:<I>CN=Lab Root CA<SR>b4a211438e00",
            "an entry has this serial under another issuer",
            "is not the certificate's issuer CN=Lab Issuing CA",
        ),
    ],
)
def test_an_issuer_serial_entry_an_administrator_slipped_on_is_named(
    realm: ad.AdRealm,
    uncached: AdProcess,
    minted: Path,
    fresh: str,
    label: str,
    serial: str,
    entry: str,
    said: str,
    fix: str,
) -> None:
    """An `<I>..<SR>..` entry written with the serial as openssl prints it (Windows reverses the bytes), or naming the
    root CA instead of the issuing one: 403, the reason says which slip, the fix names the entry and its replacement."""
    upn = f"{fresh}@{ad.DNS_DOMAIN}"
    cert = mint(realm, minted, f"slip-{label}", upn_line(upn), serial=serial)
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    set_alt_security_identities(realm, fresh, entry)
    status, body = curl(realm, uncached, cert, minted / "device.key")
    assert status == 403, body
    assert said in body
    refused = uncached.wait_event("mapping_refused")
    assert entry in refused["fix"]
    assert fix in refused["fix"]
    assert f"replace it with altSecurityIdentities: {altsecid.issuer_serial_entry(loaded)}" in refused["fix"]
