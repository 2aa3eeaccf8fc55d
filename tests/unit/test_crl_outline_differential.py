"""`accept_der`'s own DER walk (`_outline`, `_screened`) against cryptography's parser: for hand-built variants of a
CRL its CA signed (trailing bytes, two CertificateLists, non-minimal, indefinite and overlong lengths, a BIT STRING with
unused bits, differing signature algorithms, an outer SEQUENCE that covers less than the data, PEM with two blocks and
text between), a CRL is either refused or read with exactly the entries the CA signed, and `accept_der` answers as
plain cryptography with `is_signature_valid` does: a signature the screen verified is not checked again."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from proxy.certs.chain import TrustList
from proxy.certs.der import inside, whole
from proxy.certs.revocation import Crl, CrlUnusable, accept_der, crl_ders
from tests.pem import der_tlv
from tests.unit.test_crl_signature_screen import NAME, NOW, self_signed_ca

SIGNED, OTHER = (3, 4, 200), (9,)  # the serials of the CRL under test, and of a second CRL the CA signed
Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
ALGORITHMS = {  # AlgorithmIdentifier DER: sha256WithRSAEncryption, sha384WithRSAEncryption, ecdsa-with-SHA256, Ed25519
    "rsa": bytes.fromhex("300d06092a864886f70d01010b0500"),
    "rsa-384": bytes.fromhex("300d06092a864886f70d01010c0500"),
    "ec": bytes.fromhex("300a06082a8648ce3d040302"),
    "ed25519": bytes.fromhex("300506032b6570"),
}


def _key(kind: str) -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _sign(key: Key, tbs: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(tbs)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(tbs, ec.ECDSA(hashes.SHA256()))


def _utc(when: datetime) -> bytes:
    return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())


def _tbs(
    algorithm: bytes, serials: tuple[int, ...], length: Callable[[bytes], bytes] = lambda c: der_tlv(0x30, c)
) -> bytes:
    """A current tbsCertList under the CA's name listing `serials`; `length` frames its content (DER by default)."""
    entries = b"".join(
        der_tlv(0x30, der_tlv(0x02, bytes([0, s]) if s > 127 else bytes([s])) + _utc(NOW)) for s in serials
    )
    times = _utc(NOW - timedelta(hours=1)) + _utc(NOW + timedelta(days=1))
    return length(der_tlv(0x02, b"\x01") + algorithm + NAME.public_bytes() + times + der_tlv(0x30, entries))


def _signed(key: Key, tbs: bytes, algorithm: bytes, unused_bits: int = 0) -> bytes:
    """A CertificateList of `tbs`, signed by `key` over exactly those bytes, with `algorithm` as signatureAlgorithm."""
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, bytes([unused_bits]) + _sign(key, tbs)))


def _variants(kind: str, key: Key) -> dict[str, bytes]:
    """Hand-built DER of CRLs whose signed bytes the CA's key signed, in each shape the two parsers might read apart."""
    algorithm = ALGORITHMS[kind]
    good = _signed(key, _tbs(algorithm, SIGNED), algorithm)
    other = _signed(key, _tbs(algorithm, OTHER), algorithm)
    tbs, outer_algorithm, signature = (good[at:end] for _, at, end in inside(good, whole(good)))
    body = tbs + outer_algorithm + signature
    variants = {
        "as-signed": good,
        "trailing-zeros": good + b"\x00\x00",
        "trailing-garbage": good + b"\x30\x03\x02\x01\x05",
        "two-crls": good + other,
        "two-crls-other-first": other + good,
        "a-crl-inside-as-fourth-element": der_tlv(0x30, body + other),
        "outer-covers-tbs-and-algorithm-only": der_tlv(0x30, tbs + outer_algorithm) + signature,
        "outer-covers-tbs-only": der_tlv(0x30, tbs) + outer_algorithm + signature,
        "outer-non-minimal-length": b"\x30\x84" + len(body).to_bytes(4, "big") + body,
        "outer-indefinite-length": b"\x30\x80" + body + b"\x00\x00",
        "outer-length-past-the-end": b"\x30\x82" + (len(body) + 7).to_bytes(2, "big") + body,
        "outer-length-short": b"\x30\x82" + (len(body) - 1).to_bytes(2, "big") + body,
        "outer-set-tag": b"\x31" + good[1:],
        "signed-tbs-non-minimal-length": _signed(
            key, _tbs(algorithm, SIGNED, lambda c: b"\x30\x83" + len(c).to_bytes(3, "big") + c), algorithm
        ),
        "signed-tbs-indefinite-length": _signed(
            key, _tbs(algorithm, SIGNED, lambda c: b"\x30\x80" + c + b"\x00\x00"), algorithm
        ),
        "signed-tbs-with-trailing-element": _signed(
            key, _tbs(algorithm, SIGNED, lambda c: der_tlv(0x30, c + other)), algorithm
        ),
        "signature-unused-bits": _signed(key, _tbs(algorithm, SIGNED), algorithm, unused_bits=1),
        "signature-unused-bits-8": _signed(key, _tbs(algorithm, SIGNED), algorithm, unused_bits=8),
    }
    for name, alternative in ALGORITHMS.items():
        if alternative != algorithm:
            variants[f"outer-algorithm-{name}"] = der_tlv(0x30, tbs + alternative + signature)
            variants[f"inner-algorithm-{name}"] = _signed(key, _tbs(alternative, SIGNED), algorithm)
    return variants


def _by_cryptography(der: bytes, key: Key) -> tuple[int, ...] | None:
    """The serials plain cryptography reads from `der` with its signature checked by `is_signature_valid`, or None."""
    try:
        crl = x509.load_der_x509_crl(der)
        if not crl.is_signature_valid(key.public_key()):
            return None
        return tuple(sorted(revoked.serial_number for revoked in crl))
    except ValueError:
        return None


def _by_accept_der(der: bytes, trust: TrustList) -> tuple[int, ...] | None:
    try:
        crl = accept_der("differential", der, trust, at=NOW)
    except (ValueError, CrlUnusable):
        return None
    return tuple(sorted(serial for _, serial in crl.entries))


@pytest.mark.parametrize("kind", ["rsa", "ec", "ed25519"])
def test_accept_der_reads_only_what_cryptography_reads_as_signed(kind: str) -> None:
    """Every hand-built variant of a CRL its CA signed (RSA, ECDSA, Ed25519) is refused by `accept_der` or read with
    exactly the serials the CA signed, and `accept_der` accepts exactly those plain cryptography reads with a valid
    signature, with the same serials; the CRL as signed is accepted by both."""
    key = _key(kind)
    trust = TrustList(anchors=(self_signed_ca(key),))
    answers = {
        name: (_by_accept_der(der, trust), _by_cryptography(der, key)) for name, der in _variants(kind, key).items()
    }
    assert answers["as-signed"] == (SIGNED, SIGNED)
    for name, (ours, theirs) in answers.items():
        assert ours in (None, SIGNED), name
        assert ours == theirs, name


@pytest.mark.parametrize(
    "between", [b"", b"text between\n", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]
)
def test_a_pem_of_two_crls_is_read_as_two_each_with_its_own_entries(between: bytes) -> None:
    """A PEM with two CRL blocks (nothing, text, or another PEM block between them) gives the two DERs as signed, each
    accepted with its own serials: nothing of one is read as the other's."""
    key = _key("ec")
    trust = TrustList(anchors=(self_signed_ca(key),))
    algorithm = ALGORITHMS["ec"]
    ders = [_signed(key, _tbs(algorithm, serials), algorithm) for serials in (SIGNED, OTHER)]

    def pem(der: bytes) -> bytes:
        return b"-----BEGIN X509 CRL-----\n" + base64.encodebytes(der) + b"-----END X509 CRL-----\n"

    assert crl_ders(pem(ders[0]) + between + pem(ders[1]), "differential") == ders
    assert [_by_accept_der(der, trust) for der in ders] == [SIGNED, OTHER]


CRL_NUMBER_7 = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("551d14")) + der_tlv(0x04, der_tlv(0x02, b"\x07")))


@pytest.mark.parametrize(
    "extensions",
    [
        [x509.CRLNumber(7)],
        [x509.CRLNumber(12), x509.DeltaCRLIndicator(10)],
        [
            x509.CRLNumber(2**100),
            x509.IssuingDistributionPoint(
                full_name=[x509.UniformResourceIdentifier("http://crl.example/users.crl")],
                relative_name=None,
                only_contains_user_certs=True,
                only_contains_ca_certs=False,
                only_some_reasons=frozenset({x509.ReasonFlags.key_compromise}),
                indirect_crl=False,
                only_contains_attribute_certs=False,
            ),
        ],
        [],
    ],
    ids=["number", "delta", "partition", "none"],
)
def test_the_crl_before_reading_is_the_crl_read_less_its_entries(
    extensions: list[x509.ExtensionType],
) -> None:
    """What `accept_der` hands `before_reading` (the CRL as its outline shows it, with its extensions) has the CRL
    number, delta base, thisUpdate, issuer, signer and partition the CRL read whole has, and no entries: an older CRL
    refused on it is refused as the one read would be."""
    key = _key("ec")
    trust = TrustList(anchors=(self_signed_ca(key),))
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=NAME, last_update=NOW - timedelta(hours=1), next_update=NOW + timedelta(days=1)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=isinstance(extension, x509.DeltaCRLIndicator))
    for serial in SIGNED:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=2)).build()
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    seen: list[Crl] = []
    crl = accept_der("outline", der, trust, at=NOW, before_reading=seen.append)
    (before,) = seen
    facts = ("number", "delta_base", "this_update", "next_update", "issuer", "signer_key", "partition", "source")
    assert {name: getattr(before, name) for name in facts} == {name: getattr(crl, name) for name in facts}
    assert (len(before.entries), len(crl.entries)) == (0, len(SIGNED))


def test_a_crl_refused_before_its_entries_are_read_has_none_read() -> None:
    """A CRL its CA signed whose one entry cryptography cannot read (its serial an OCTET STRING), refused by
    `before_reading` (as older than the one held), is refused for that reason: its entries were never read."""
    key = _key("ec")
    trust = TrustList(anchors=(self_signed_ca(key),))
    algorithm = ALGORITHMS["ec"]
    entry = der_tlv(0x30, der_tlv(0x04, b"\x05") + _utc(NOW - timedelta(hours=2)))
    times = _utc(NOW - timedelta(hours=1)) + _utc(NOW + timedelta(days=1))
    content = der_tlv(0x02, b"\x01") + algorithm + NAME.public_bytes() + times + der_tlv(0x30, entry)
    der = _signed(key, der_tlv(0x30, content + der_tlv(0xA0, der_tlv(0x30, CRL_NUMBER_7))), algorithm)
    with pytest.raises(ValueError, match="not a PEM or DER CRL"):  # read whole, it is refused as unreadable
        accept_der("outline", der, trust, at=NOW)

    def older(crl: Crl) -> None:
        raise CrlUnusable(f"{crl.label} is older than the one held")

    with pytest.raises(CrlUnusable, match="CRL #7 of 'CN=Screen CA' is older than the one held"):
        accept_der("outline", der, trust, at=NOW, before_reading=older)
