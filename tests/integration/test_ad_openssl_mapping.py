"""Strong mapping attacked from outside: certificates minted by the openssl CLI, the real Samba AD DC.

The independent harness does not use the lab's PKI code; it writes `openssl x509 -req -extfile` files. So do
these tests: each certificate is signed by the lab's issuing CA with the openssl CLI and an extension file,
in the exact DER shape AD CS writes the SID extension and in the careless and hostile variants a CA could
write, and goes through a real `strong` gateway inside the realm's namespace with curl as the device.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, status_and_body
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
