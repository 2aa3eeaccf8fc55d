"""Certificate restrictions: issuer, subject glob, EKU and extension rules over verified lab certificates."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import char, univ

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.restrictions import admit, extension_readings, matches
from proxy.config import Restriction
from proxy.errors import CertificateRejected
from proxy.lab.pki import Pki
from tests.unit.conftest import NOW

CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"


def verified(pki: Pki, user: str) -> VerifiedCertificate:
    leaf = x509.load_pem_x509_certificate(Path(pki.user_cert(user)).read_bytes())
    return verify_chain(leaf, TrustList.load([pki.root_cert], [pki.issuing_cert]), at=NOW)


@pytest.mark.parametrize(
    ("rule", "alice", "bob"),
    [
        (Restriction("issuer", issuer="CN=Lab Issuing CA"), True, True),
        (Restriction("root", issuer="cn=lab root ca"), True, True),  # any CA of the chain, any case
        (Restriction("other-issuer", issuer="CN=Other CA"), False, False),
        (Restriction("subject", subject="CN=alice"), True, False),
        (Restriction("glob", subject="CN=[ab]*"), True, True),
        (Restriction("eku", eku=(CLIENT_AUTH,)), True, True),
        (Restriction("eku-missing", eku=(CLIENT_AUTH, "1.3.6.1.4.1.311.20.2.2")), False, False),
        (Restriction("both", issuer="CN=Lab Issuing CA", subject="CN=bob"), False, True),
        (Restriction("ext", extension_oid="2.5.29.17"), True, True),  # subjectAltName present
        (Restriction("ext-missing", extension_oid="1.3.6.1.4.1.311.21.7"), False, False),  # no template
    ],
    ids=lambda v: v.name if isinstance(v, Restriction) else None,
)
def test_each_criterion(pki: Pki, rule: Restriction, alice: bool, bob: bool) -> None:
    """Each criterion alone, and together (all must hold), against alice's and bob's lab certificates."""
    assert (matches(verified(pki, "alice"), rule), matches(verified(pki, "bob"), rule)) == (alice, bob)


def test_no_rules_admit_everything_and_the_first_matching_rule_is_named(pki: Pki) -> None:
    """Without rules every verified certificate is admitted; with rules, the evidence names the rule."""
    assert admit(verified(pki, "bob"), ()).rule is None
    rules = (Restriction("alice-only", subject="CN=alice"), Restriction("anyone", eku=(CLIENT_AUTH,)))
    assert admit(verified(pki, "alice"), rules).rule == "alice-only"
    assert admit(verified(pki, "bob"), rules).rule == "anyone"


def test_refusal_names_the_rule_set_and_its_rules(pki: Pki) -> None:
    """A certificate matching no rule: 403 naming client_certificates.restrictions and each rule."""
    rules = (Restriction("alice-only", subject="CN=alice"), Restriction("carol-only", subject="CN=carol"))
    with pytest.raises(
        CertificateRejected, match=r"client_certificates\.restrictions \(rules: alice-only, carol-only\)"
    ):
        admit(verified(pki, "bob"), rules)


def test_extension_values_read_as_hex_text_or_oid() -> None:
    """A template v2 SEQUENCE reads as its OID, a v1 BMPString as its text; any value also as its hex."""
    template = univ.Sequence()
    template.setComponentByPosition(0, univ.ObjectIdentifier("1.3.6.1.4.1.311.21.8.1.2"))
    template.setComponentByPosition(1, univ.Integer(100))
    v2 = der_encoder.encode(template)
    assert extension_readings(v2) == {v2.hex(), "1.3.6.1.4.1.311.21.8.1.2"}
    v1 = der_encoder.encode(char.BMPString("User"))
    assert extension_readings(v1) == {v1.hex(), "User"}
    assert extension_readings(b"\xff\x00junk") == {b"\xff\x00junk".hex()}
