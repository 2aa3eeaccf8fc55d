"""The identity stage: names read from a certificate, and the Kerberos principal they map to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import Identity
from proxy.errors import IdentityRejected
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.identity.upn import (
    UPN_OID,
    certificate_name,
    common_name,
    email_from_certificate,
    upn_from_certificate,
    upn_other_name,
)
from proxy.lab.pki import Pki, make_pki
from tests.pem import load_cert

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LAB = {"lab.test": "LAB.TEST"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), now=NOW)


def with_san(*names: x509.GeneralName, cn: str = "crafted") -> x509.Certificate:
    """A self-signed certificate whose subjectAltName holds exactly `names` (no SAN at all if none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_upn_read_from_lab_certificate(pki: Pki) -> None:
    """The UPN otherName of a lab user certificate decodes to the user's UPN."""
    assert upn_from_certificate(load_cert(pki.user_cert("alice"))) == "alice@lab.test"


def test_certificate_without_upn(pki: Pki) -> None:
    """A certificate whose SAN holds only an rfc822Name has no UPN, but has an e-mail and a CN."""
    noupn = load_cert(pki.user_cert("noupn"))
    assert upn_from_certificate(noupn) is None
    assert email_from_certificate(noupn) == "heidi@lab.test"
    assert common_name(noupn) == "heidi"


def test_certificate_without_san() -> None:
    """No subjectAltName at all means no UPN and no e-mail, not an error."""
    bare = with_san(cn="bare")
    assert (upn_from_certificate(bare), email_from_certificate(bare), common_name(bare)) == (None, None, "bare")


def test_upn_that_is_not_a_utf8string_refused() -> None:
    """A UPN otherName holding an IA5String instead of a UTF8String is refused, not guessed at."""
    crafted = with_san(x509.OtherName(UPN_OID, b"\x16\x0ealice@lab.test"))
    with pytest.raises(IdentityRejected, match="not a DER UTF8String"):
        upn_from_certificate(crafted)


def test_upn_whose_bytes_are_not_utf8_refused() -> None:
    """A UTF8String UPN holding bytes that are not UTF-8 is an identity refusal, not a crash."""
    crafted = with_san(x509.OtherName(UPN_OID, b"\x0c\x0eal\xffce@lab.test"))
    with pytest.raises(IdentityRejected, match="not UTF-8"):
        upn_from_certificate(crafted)


def test_two_upns_refused() -> None:
    """A certificate naming two users is ambiguous and refused."""
    crafted = with_san(upn_other_name("alice@lab.test"), upn_other_name("bob@lab.test"))
    with pytest.raises(IdentityRejected, match="carries 2 UPNs"):
        upn_from_certificate(crafted)


def test_lab_upn_maps_to_principal() -> None:
    """alice@lab.test becomes alice@LAB.TEST, with the source recorded."""
    assert map_upn("alice@lab.test", realm_map=LAB) == UserPrincipal(
        upn="alice@lab.test", principal="alice@LAB.TEST", realm="LAB.TEST", source="san-upn"
    )


def test_other_realm_upn_unmapped_uses_upper_cased_suffix(pki: Pki) -> None:
    """A UPN suffix with no realm_map entry becomes its own upper-cased realm."""
    upn = upn_from_certificate(load_cert(pki.user_cert("other-realm")))
    assert upn == "alice@corp.example"
    assert map_upn(upn, realm_map=LAB).principal == "alice@CORP.EXAMPLE"


def test_other_realm_upn_mapped_case_insensitively() -> None:
    """realm_map matches the suffix whatever its case, and keeps the local part as is."""
    mapped = map_upn("Alice@CORP.example", realm_map={"Corp.Example": "LAB.TEST"}, source="san-email")
    assert (mapped.principal, mapped.realm, mapped.source) == ("Alice@LAB.TEST", "LAB.TEST", "san-email")


@pytest.mark.parametrize(
    ("upn", "why"),
    [
        ("krbtgt/LAB.TEST@lab.test", "contains '/'"),
        ("HTTP/cas.lab.test@lab.test", "contains '/'"),
        ("alice\\/admin@lab.test", "contains '\\'"),
        ("alice@lab.test@EVIL.TEST", "found 2"),
        ("alice", "found 0"),
        ("@lab.test", "empty user part"),
        ("alice@", "empty domain part"),
        ("alice@lab..test", "empty label"),
        ("alice @lab.test", "U+0020"),
        ("alice\x00@lab.test", "U+0000"),
        ("alice\n@lab.test", "U+000A"),
        ("al\u200bice@lab.test", "U+200B (ZERO WIDTH SPACE)"),
    ],
)
def test_crafted_upn_refused(upn: str, why: str) -> None:
    """A UPN that could change the principal's meaning (service names, realms, hidden characters) is refused."""
    with pytest.raises(IdentityRejected) as info:
        map_upn(upn, realm_map=LAB)
    assert info.value.reason.startswith(f"UPN {upn!r} is not usable: ")
    assert why in info.value.reason


@pytest.mark.parametrize("upn", ["alice@lab.te\u017ft", "alice@\u212aab.test", "alice@LAB.TE\u017fT"])
def test_only_ascii_case_is_mapped(upn: str) -> None:
    """Unicode case mapping would make these look-alike suffixes LAB.TEST; with ASCII case only they are
    non-ASCII suffixes no realm_map names, and are refused."""
    with pytest.raises(IdentityRejected, match="domain part is not ASCII"):
        map_upn(upn, realm_map=LAB)


def test_a_non_ascii_suffix_named_in_realm_map_is_served() -> None:
    """An administrator who really has a non-ASCII UPN suffix names it in realm_map; only its ASCII letters
    are compared without regard to case."""
    mapped = map_upn("jos\u00e9@B\u00fccher.example", realm_map={"b\u00fccher.example": "LAB.TEST"})
    assert mapped.principal == "jos\u00e9@LAB.TEST"
    with pytest.raises(IdentityRejected, match="not ASCII"):
        map_upn("jos\u00e9@B\u00dcCHER.example", realm_map={"b\u00fccher.example": "LAB.TEST"})


def test_an_empty_upn_is_refused_not_skipped_for_the_next_source() -> None:
    """A certificate whose UPN otherName is an empty UTF8String has a UPN, a malformed one: with
    source = ["san-upn", "san-email"] it is refused, never served as the e-mail address it also carries."""
    crafted = with_san(x509.OtherName(UPN_OID, b"\x0c\x00"), x509.RFC822Name("bob@lab.test"))
    with pytest.raises(IdentityRejected, match="empty"):
        upn_from_certificate(crafted)
    with pytest.raises(IdentityRejected, match="empty"):
        certificate_name(crafted, Identity(sources=("san-upn", "san-email")).sources)
