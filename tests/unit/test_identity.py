"""The identity stage: names read from a certificate, and the Kerberos principal they map to."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import Identity
from proxy.errors import IdentityRejected
from proxy.identity.principal import UserPrincipal, map_certificate_name, map_upn, shown_name
from proxy.identity.upn import (
    UPN_OID,
    certificate_name,
    common_name,
    email_from_certificate,
    upn_from_certificate,
    upn_other_name,
)
from proxy.lab.pki import Pki
from proxy.pipeline import identify
from tests.pem import load_cert
from tests.unit.conftest import NOW

LAB = {"lab.test": "LAB.TEST"}


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


# -- one value per source, and a plain name for it ------------------------------------------------------------


def with_subject(*cns: str, san: tuple[x509.GeneralName, ...] = (x509.DNSName("device.lab.test"),)) -> x509.Certificate:
    """A self-signed certificate whose subject has the common names `cns` (one RDN each) and the SAN `san`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    )
    return builder.sign(key, hashes.SHA256())


IDENTITY = Identity(realm_map={"lab.test": "LAB.TEST", "Partner.Test": "LAB.TEST"}, default_realm="LAB.TEST")


def test_two_common_names_are_refused_not_read_last() -> None:
    """CN=bob, CN=alice: which is the user depends on the reader (most take the last); refused."""
    with pytest.raises(IdentityRejected, match="2 common names; expected one"):
        common_name(with_subject("bob", "alice"))
    assert common_name(with_subject("alice")) == "alice"


def test_two_e_mail_addresses_are_refused_not_read_first() -> None:
    """Two rfc822Names: refused, never the first."""
    cert = with_san(x509.RFC822Name("bob@lab.test"), x509.RFC822Name("alice@lab.test"))
    with pytest.raises(IdentityRejected, match="2 e-mail addresses; expected one"):
        email_from_certificate(cert)


def test_ambiguity_counts_only_for_the_source_in_use() -> None:
    """A UPN certificate with two CNs and two addresses is read by its UPN under [san-upn, san-email, subject-cn]."""
    cert = with_subject(
        "bob", "alice", san=(upn_other_name("carol@lab.test"), x509.RFC822Name("a@lab.test"), x509.RFC822Name("b@x"))
    )
    assert certificate_name(cert, ("san-upn", "san-email", "subject-cn")) == ("carol@lab.test", "san-upn")


@pytest.mark.parametrize(
    ("name", "source", "why"),
    [
        ("EVIL\\alice", "subject-cn", "contains '\\' (a DOMAIN\\user name)"),
        ("LAB\\alice", "subject-cn", "contains '\\'"),
        ("alice@lab.test", "subject-cn", "contains '@'"),
        ("alice", "san-upn", "UPN 'alice' is not usable: expected exactly one '@', found 0"),
        ("LAB\\alice", "san-upn", "expected exactly one '@', found 0"),
        ("alice", "san-email", "e-mail address 'alice' is not usable"),
        ("alice@evil.test", "san-email", "its domain 'evil.test' is not mapped to a realm"),
        ("EVIL\\alice@lab.test", "san-email", "separates or escapes Kerberos name components"),
        ("alice\x00@lab.test", "san-upn", "U+0000"),
        ("alice\x00", "subject-cn", "U+0000"),
        ("alice@evil.test@lab.test", "san-email", "expected exactly one '@', found 2"),
    ],
)
def test_a_name_that_is_not_plain_for_its_source_is_refused(name: str, source: str, why: str) -> None:
    """Per source: a CN is a bare account name; a UPN and an address need their '@'; an address's domain must be
    configured; backslashes and control characters are never a name."""
    with pytest.raises(IdentityRejected) as refused:
        map_certificate_name(name, source, IDENTITY)
    assert why in refused.value.reason


@pytest.mark.parametrize(
    ("name", "source", "principal"),
    [
        ("alice", "subject-cn", "alice@LAB.TEST"),
        ("alice@lab.test", "san-upn", "alice@LAB.TEST"),
        ("carol@corp.example", "san-upn", "carol@CORP.EXAMPLE"),  # a UPN suffix maps as AD's convention says
        ("bob@LAB.TEST", "san-email", "bob@LAB.TEST"),  # the default realm's own name
        ("dave@partner.test", "san-email", "dave@LAB.TEST"),  # a realm_map key, in any ASCII case
    ],
)
def test_a_plain_name_maps_for_its_source(name: str, source: str, principal: str) -> None:
    """The controls: one plain name of each source maps to its principal."""
    assert map_certificate_name(name, source, IDENTITY).principal == principal


def test_a_certificate_without_the_configured_name_has_a_fix(pki: Pki) -> None:
    """The lab's noupn certificate under `source = "san-upn"`: the device's reason was right, but the log's
    `fix` (and the trace's) was null; it names identity.source and what the certificate would need."""
    with pytest.raises(IdentityRejected) as info:
        identify(load_cert(pki.user_cert("noupn")), Identity(default_realm="LAB.TEST"))
    assert info.value.hint is not None
    assert "identity.source" in info.value.hint, info.value.hint


@pytest.mark.parametrize(
    ("name", "shown"),
    [("Winter2026!", "W…[11]"), ("LAB\\bob", "LAB\\b…[3]"), ("bob@evil.test", "b…[3]@evil.test"), ("", "…[0]")],
)
def test_a_name_nobody_vouched_for_is_shown_as_its_first_character_and_length(name: str, shown: str) -> None:
    """`shown_name` keeps a password typed as a user name out of logs: first character, length, the domain as typed."""
    assert shown_name(name) == shown


@pytest.mark.parametrize("identity", [None, Identity(default_realm="LAB.TEST")], ids=["as-typed", "configured"])
def test_a_name_nobody_vouched_for_is_shown_with_its_invisible_characters_escaped(identity: Identity | None) -> None:
    """`shown_name` writes an invisible first character (U+202E, ESC) of a name's local part and of its domain, known
    or not, as an escape: a Basic user name is anyone's to write, and the log shows it."""
    assert shown_name("\u202eexe.txt@\x1b[31mevil.test", identity) == (
        "\\u202e…[8]@\\x1b[31mevil.test" if identity is None else "\\u202e…[8]@\\x1b…[14]"
    )
    assert shown_name("\u2028LAB\\\u200bbob", identity).isprintable()


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("P@ssw0rd", "P…[1]@s…[6]"),
        ("Summer\\2026", "S…[6]\\2…[4]"),
        ("bob@lab.test", "b…[3]@lab.test"),
        ("bob@LAB.TEST", "b…[3]@LAB.TEST"),
        ("LAB\\bob", "LAB\\b…[3]"),
        ("bob@corp.example", "b…[3]@corp.example"),
        ("bob@evil.test", "b…[3]@e…[9]"),
        ("P@Winter2026!", "P…[1]@W…[11]"),
        ("Winter2026!\\x", "W…[11]\\x…[1]"),
    ],
)
def test_a_domain_the_gateway_does_not_know_is_shortened_like_the_name(name: str, shown: str) -> None:
    """`shown_name` with the configuration shows a domain it knows (the default realm, its NetBIOS name, a realm_map
    suffix) as typed, and any other (a password typed with an '@' in it) as its first character and length."""
    identity = Identity(default_realm="LAB.TEST", realm_map={"corp.example": "LAB.TEST"})
    assert shown_name(name, identity) == shown
