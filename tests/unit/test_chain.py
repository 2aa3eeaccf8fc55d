"""The certificate stage: chain building from the trust list only, and the reasons it gives."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from proxy.certs.chain import MAX_CHAIN_DEPTH, TrustList, verify_chain
from proxy.errors import CertificateRejected
from proxy.identity.upn import upn_from_certificate, upn_other_name
from proxy.lab.pki import Pki
from tests.pem import load_cert, load_key
from tests.unit.conftest import NOW

_SHA256 = hashes.SHA256()
Digest = hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def issue(
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    cn: str,
    *extensions: tuple[x509.ExtensionType, bool],
    not_after: datetime = NOW + timedelta(days=30),
    key: CertificateIssuerPrivateKeyTypes | None = None,
    digest: Digest | None = _SHA256,
    rsa_padding: padding.PSS | None = None,
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """A certificate for `cn` with exactly the given extensions and `key` (a new P-256 key by default), signed by
    `issuer_key` with `digest` (None for an Ed25519 issuer), with `rsa_padding` for an RSA issuer's PSS."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=10))
        .not_valid_after(not_after)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(issuer_key, digest, rsa_padding=rsa_padding), key


CLIENT_AUTH = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
UPN_SAN = (x509.SubjectAlternativeName([upn_other_name("alice@lab.test")]), False)
CA = (x509.BasicConstraints(ca=True, path_length=None), True)
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")


def rejected(leaf: x509.Certificate, trust: TrustList, at: datetime = NOW) -> str:
    with pytest.raises(CertificateRejected) as info:
        verify_chain(leaf, trust, at=at)
    return info.value.reason


def test_good_chain_is_evidence(pki: Pki, trust: TrustList) -> None:
    """A lab user's certificate verifies to the root, and the evidence names it exactly."""
    leaf = load_cert(pki.user_cert("alice"))
    verified = verify_chain(leaf, trust, at=NOW)
    assert verified.leaf == leaf
    assert verified.chain == (leaf, load_cert(pki.issuing_cert), load_cert(pki.root_cert))
    assert (verified.subject, verified.issuer) == ("CN=alice", "CN=Lab Issuing CA")
    assert verified.serial == leaf.serial_number
    assert verified.fingerprint_sha256 == hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_trust_list_loads_pem_bundles_and_der(pki: Pki, tmp_path: Path) -> None:
    """TrustList.load reads a DER anchor and a multi-certificate PEM bundle."""
    der = tmp_path / "root.cer"
    der.write_bytes(load_cert(pki.root_cert).public_bytes(serialization.Encoding.DER))
    trust = TrustList.load([der], [pki.server_chain])
    assert trust.anchors == (load_cert(pki.root_cert),)
    assert trust.intermediates == (load_cert(pki.server_cert), load_cert(pki.issuing_cert))


def test_expired_certificate_refused(pki: Pki, trust: TrustList) -> None:
    """An expired certificate is refused with its expiry date."""
    assert rejected(load_cert(pki.user_cert("expired")), trust) == "certificate expired on 2025-05-31T12:00:00Z"


def test_not_yet_valid_certificate_refused(pki: Pki, trust: TrustList) -> None:
    """A certificate whose validity has not begun is refused with its start date."""
    assert rejected(load_cert(pki.user_cert("notyet")), trust) == "certificate not valid before 2025-07-01T12:00:00Z"


def test_rogue_ca_copying_trusted_names_refused(pki: Pki, trust: TrustList) -> None:
    """A certificate from a rogue CA named exactly like the trusted one fails on the signature."""
    reason = rejected(load_cert(pki.user_cert("untrusted")), trust)
    assert reason == (
        "signature does not verify against the trusted 'CN=Lab Issuing CA' (a certificate copying a trusted CA's name?)"
    )


def test_issuer_missing_from_trust_list_refused(pki: Pki) -> None:
    """Without the issuing CA configured, the chain cannot be built: the client cannot supply it."""
    only_root = TrustList.load([pki.root_cert])
    assert (
        rejected(load_cert(pki.user_cert("alice")), only_root) == "issuer 'CN=Lab Issuing CA' is not in the trust list"
    )


def test_server_auth_only_certificate_refused(pki: Pki, trust: TrustList) -> None:
    """A certificate issued for serverAuth only is not a client certificate."""
    reason = rejected(load_cert(pki.user_cert("noclientauth")), trust)
    assert reason == "certificate lacks the clientAuth extended key usage (it has: serverAuth)"


def test_certificate_without_eku_refused(pki: Pki, trust: TrustList) -> None:
    """A leaf with no EKU at all (valid for any purpose under RFC 5280) is refused all the same."""
    leaf, _ = issue(load_cert(pki.issuing_cert), load_key(pki.issuing_key), "alice", UPN_SAN)
    assert rejected(leaf, trust) == "certificate has no extended key usage; the gateway requires clientAuth"


def test_stock_client_verifier_accepts_leaf_without_eku(pki: Pki, trust: TrustList) -> None:
    """Canary: cryptography's own client verifier passes a leaf without EKU, hence our own check."""
    issuing_key = load_key(pki.issuing_key)
    aki = (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuing_key.public_key()), False)
    leaf, _ = issue(load_cert(pki.issuing_cert), issuing_key, "alice", UPN_SAN, aki)
    verifier = PolicyBuilder().store(Store(list(trust.anchors))).time(NOW).build_client_verifier()
    assert verifier.verify(leaf, list(trust.intermediates)).chain[0] == leaf


def test_key_usage_without_digital_signature_refused(pki: Pki, trust: TrustList) -> None:
    """A leaf whose keyUsage exists but lacks digitalSignature cannot sign the TLS handshake."""
    encipher_only = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
    leaf, _ = issue(
        load_cert(pki.issuing_cert), load_key(pki.issuing_key), "alice", CLIENT_AUTH, UPN_SAN, (encipher_only, True)
    )
    assert rejected(leaf, trust) == "certificate key usage lacks digitalSignature"


NETSCAPE_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")


def netscape_cert_type(bits: int) -> tuple[x509.ExtensionType, bool]:
    """A Netscape certificate type extension (a one-byte BIT STRING: 0x80 SSL client, 0x40 SSL server, ...), as
    `openssl x509 -extfile` writes `nsCertType`."""
    return x509.UnrecognizedExtension(NETSCAPE_CERT_TYPE, bytes([0x03, 0x02, 0x00, bits])), False


@pytest.mark.parametrize(("bits", "refused"), [(0x40, True), (0x20, True), (0x80, False), (0xC0, False)])
def test_a_netscape_certificate_type_without_ssl_client_is_refused(
    pki: Pki, trust: TrustList, bits: int, refused: bool
) -> None:
    """A leaf with clientAuth and digitalSignature whose Netscape certificate type names no SSL client (`nsCertType =
    server`, or S/MIME): OpenSSL's handshake refuses it ("unsuitable certificate purpose"), so `explain` must too (it
    said accepted); with SSL client among the types, served."""
    leaf, _ = issue(
        load_cert(pki.issuing_cert), load_key(pki.issuing_key), "alice", CLIENT_AUTH, UPN_SAN, netscape_cert_type(bits)
    )
    if refused:
        assert rejected(leaf, trust) == "certificate's Netscape certificate type does not include SSL client"
    else:
        assert verify_chain(leaf, trust, at=NOW).leaf == leaf


# Netscape certificate types as a CA may write them, and as a forger may: each value, the extension's DER (`extnValue`)
_NETSCAPE_VALUES = {
    "SSL client, 128-byte BIT STRING (long-form length)": "038181" + "0080" + "00" * 127,
    "SSL client, 256-byte BIT STRING (two length bytes)": "03820101" + "0080" + "00" * 255,
    "SSL client, 64 KiB BIT STRING": "0383010001" + "0080" + "00" * 65535,
    "server, 384-byte BIT STRING (a length byte of 0x80)": "03820180" + "0040" + "00" * 382,
    "SSL client, 8 unused bits (invalid)": "03020880",
    "SSL client, indefinite length (invalid)": "038000800000",
    "SSL client, constructed BIT STRING (BER)": "230403020080",
    "SSL client, 7 unused bits": "03020780",
    "empty BIT STRING": "030100",
    "an OCTET STRING": "04020080",
    "no value at all": "",
}


@needs_openssl
@pytest.mark.parametrize("value", list(_NETSCAPE_VALUES))
def test_a_malformed_netscape_certificate_type_gets_openssls_verdict(
    pki: Pki, trust: TrustList, tmp_path: Path, value: str
) -> None:
    """A Netscape certificate type however it is encoded (a long BIT STRING, lying unused bits, BER forms, not a BIT
    STRING at all) is accepted or refused as OpenSSL's client-purpose check (`openssl verify -purpose sslclient`, the
    handshake's check) does. The first content byte was read at a fixed offset (the fourth): a BIT STRING of 128 bytes
    or more has a long-form length, so an SSL client one was refused where every handshake passes it, and a server one
    was served where every handshake refuses it; 8 unused bits (OpenSSL: an invalid extension) were served."""
    leaf, _ = issue(
        load_cert(pki.issuing_cert),
        load_key(pki.issuing_key),
        "alice",
        CLIENT_AUTH,
        UPN_SAN,
        (x509.UnrecognizedExtension(NETSCAPE_CERT_TYPE, bytes.fromhex(_NETSCAPE_VALUES[value])), False),
    )
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(Path(pki.root_cert).read_bytes() + Path(pki.issuing_cert).read_bytes())
    openssl_accepts = (
        subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                "sslclient",
                "-attime",
                str(int(NOW.timestamp())),
                "-CAfile",
                "ca.pem",
                "leaf.pem",
            ],
            cwd=tmp_path,
            capture_output=True,
        ).returncode
        == 0
    )
    if openssl_accepts:
        assert verify_chain(leaf, trust, at=NOW).leaf == leaf
    else:
        assert "Netscape certificate type" in rejected(leaf, trust)


def test_end_entity_cannot_act_as_ca(pki: Pki) -> None:
    """Even if configured as an intermediate, a certificate without cA=TRUE cannot issue certificates."""
    trust = TrustList.load([pki.root_cert], [pki.issuing_cert, pki.user_cert("alice")])
    leaf, _ = issue(load_cert(pki.user_cert("alice")), load_key(pki.user_key("alice")), "mallory", CLIENT_AUTH, UPN_SAN)
    reason = rejected(leaf, trust)
    assert reason.startswith("certificate chain does not validate:")
    assert "basicConstraints.cA must be asserted" in reason


def test_enterprise_ca_profile_accepted(pki: Pki) -> None:
    """An intermediate with non-critical basicConstraints and no keyUsage, AKI or SKI still issues."""
    loose_ca, loose_key = issue(load_cert(pki.root_cert), load_key(pki.root_key), "Loose CA", (CA[0], False))
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(loose_ca,))
    leaf, _ = issue(loose_ca, loose_key, "alice", CLIENT_AUTH, UPN_SAN)
    assert verify_chain(leaf, trust, at=NOW).chain[1] == loose_ca


def test_ca_key_usage_without_key_cert_sign_refused(pki: Pki) -> None:
    """A CA whose keyUsage is present but lacks keyCertSign cannot issue certificates."""
    no_cert_sign = x509.KeyUsage(True, False, False, False, False, False, True, False, False)  # digitalSig, cRLSign
    weak_ca, weak_key = issue(load_cert(pki.root_cert), load_key(pki.root_key), "Weak CA", CA, (no_cert_sign, True))
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(weak_ca,))
    leaf, _ = issue(weak_ca, weak_key, "alice", CLIENT_AUTH, UPN_SAN)
    assert "CA key usage lacks keyCertSign" in rejected(leaf, trust)


def test_expired_issuing_ca_named_in_reason(pki: Pki) -> None:
    """When an intermediate has expired, the reason names that CA and its expiry date."""
    old_ca, old_key = issue(
        load_cert(pki.root_cert), load_key(pki.root_key), "Old Issuing CA", CA, not_after=NOW - timedelta(days=2)
    )
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(old_ca,))
    leaf, _ = issue(old_ca, old_key, "alice", CLIENT_AUTH, UPN_SAN)
    expiry = (NOW - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rejected(leaf, trust) == f"issuing CA 'CN=Old Issuing CA' expired on {expiry}"


def test_chain_depth_is_bounded(pki: Pki) -> None:
    """MAX_CHAIN_DEPTH intermediates are accepted; one more is refused, however well formed."""
    issuer = load_cert(pki.root_cert)
    key: CertificateIssuerPrivateKeyTypes = load_key(pki.root_key)
    cas: list[tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]] = []
    for depth in range(MAX_CHAIN_DEPTH + 1):
        issuer, key = issue(issuer, key, f"Deep CA {depth}", CA)
        cas.append((issuer, key))
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=tuple(ca for ca, _ in cas))
    deepest_allowed, _ = issue(*cas[MAX_CHAIN_DEPTH - 1], "alice", CLIENT_AUTH, UPN_SAN)
    too_deep, _ = issue(*cas[MAX_CHAIN_DEPTH], "alice", CLIENT_AUTH, UPN_SAN)
    assert len(verify_chain(deepest_allowed, trust, at=NOW).chain) == MAX_CHAIN_DEPTH + 2
    assert rejected(too_deep, trust).startswith("certificate chain does not validate:")


def test_naive_time_refused(pki: Pki, trust: TrustList) -> None:
    """The validation time must carry a timezone: a naive datetime is a programming error."""
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW.replace(tzinfo=None))


UPN_EXTFILE = "subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@lab.test\nextendedKeyUsage = clientAuth\n"


def openssl(directory: Path, command: str) -> None:
    subprocess.run(["openssl", *shlex.split(command)], cwd=directory, check=True, capture_output=True)


@needs_openssl
def test_openssl_cli_certificates_pass(tmp_path: Path) -> None:
    """A CA from `openssl req -x509` defaults and a leaf from `openssl x509 -req` pass chain and UPN stages."""
    (tmp_path / "ext.cnf").write_text(UPN_EXTFILE)
    openssl(tmp_path, "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -subj '/CN=Other Team CA'")
    openssl(tmp_path, "req -new -newkey rsa:2048 -nodes -keyout alice.key -out alice.csr -subj /CN=alice")
    openssl(
        tmp_path, "x509 -req -in alice.csr -CA ca.pem -CAkey ca.key -CAcreateserial -extfile ext.cnf -out alice.pem"
    )
    leaf = load_cert(tmp_path / "alice.pem")
    ca = load_cert(tmp_path / "ca.pem")
    with pytest.raises(x509.ExtensionNotFound):  # openssl's default CA has no keyUsage: the web-PKI profile refuses it
        ca.extensions.get_extension_for_class(x509.KeyUsage)

    verified = verify_chain(leaf, TrustList(anchors=(ca,)), at=leaf.not_valid_before_utc + timedelta(minutes=1))
    assert verified.chain == (leaf, ca)
    assert upn_from_certificate(leaf) == "alice@lab.test"


@needs_openssl
def test_openssl_cli_intermediate_passes(tmp_path: Path) -> None:
    """An openssl-made intermediate with non-critical basicConstraints and an issuer+serial AKI still links."""
    (tmp_path / "ext.cnf").write_text(UPN_EXTFILE)
    (tmp_path / "int.cnf").write_text("basicConstraints = CA:TRUE\nauthorityKeyIdentifier = keyid,issuer:always\n")
    openssl(
        tmp_path,
        "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -subj /CN=Root",
    )
    openssl(
        tmp_path,
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout i.key -out i.csr -subj /CN=Issuing",
    )
    openssl(tmp_path, "x509 -req -in i.csr -CA ca.pem -CAkey ca.key -CAcreateserial -extfile int.cnf -out i.pem")
    openssl(
        tmp_path, "req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout a.key -out a.csr -subj /CN=alice"
    )
    openssl(tmp_path, "x509 -req -in a.csr -CA i.pem -CAkey i.key -CAcreateserial -extfile ext.cnf -out a.pem")
    leaf, issuing = load_cert(tmp_path / "a.pem"), load_cert(tmp_path / "i.pem")
    assert not issuing.extensions.get_extension_for_class(x509.BasicConstraints).critical
    assert issuing.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.authority_cert_issuer

    trust = TrustList.load([tmp_path / "ca.pem"], [tmp_path / "i.pem"])
    verified = verify_chain(leaf, trust, at=leaf.not_valid_before_utc + timedelta(minutes=1))
    assert verified.chain == (leaf, issuing, load_cert(tmp_path / "ca.pem"))


def refusal_hint(leaf: x509.Certificate, trust: TrustList, at: datetime = NOW) -> str:
    with pytest.raises(CertificateRejected) as info:
        verify_chain(leaf, trust, at=at)
    assert info.value.hint is not None
    return info.value.hint


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("expired", "issue the user a new one"),
        ("noclientauth", "reissue it from a template with Client Authentication"),
        ("untrusted", "a forged certificate, or one from another CA of the same name"),
    ],
)
def test_a_refused_certificate_names_its_fix(pki: Pki, trust: TrustList, name: str, fix: str) -> None:
    """The certificate stage's hint (explain's and the log's `fix`) says what to do, after naming the certificate
    (it named the certificate only: `explain --at` a year on printed "fix: subject 'CN=alice', issuer ...")."""
    hint = refusal_hint(load_cert(pki.user_cert(name)), trust)
    assert hint.startswith("subject 'CN=")
    assert fix in hint


def test_an_issuer_missing_from_the_trust_list_names_the_keys_to_set(pki: Pki) -> None:
    """An issuer that is not configured: the hint names the keys that configure it."""
    hint = refusal_hint(load_cert(pki.user_cert("alice")), TrustList.load([pki.root_cert]))
    assert "client_certificates.trust_anchors or intermediates" in hint


def test_an_expired_issuing_ca_names_the_ca_fix(pki: Pki) -> None:
    """An expired issuing CA is the PKI's to renew, not one user's certificate to reissue."""
    old_ca, old_key = issue(
        load_cert(pki.root_cert), load_key(pki.root_key), "Old Issuing CA", CA, not_after=NOW - timedelta(days=2)
    )
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(old_ca,))
    leaf, _ = issue(old_ca, old_key, "alice", CLIENT_AUTH, UPN_SAN)
    hint = refusal_hint(leaf, trust)
    assert "renew that CA" in hint
    assert "issue the user a new one" not in hint


def test_a_signature_algorithm_the_verifier_refuses_is_named_with_its_certificate(pki: Pki) -> None:
    """A leaf signed with ECDSA and SHA-224 is refused naming that certificate and the algorithm, not with the
    verifier's debug dump (`AlgorithmIdentifier { oid: DefinedByMarker(PhantomData<...`)."""
    issuing, issuing_key = load_cert(pki.issuing_cert), load_key(pki.issuing_key)
    leaf, _ = issue(issuing, issuing_key, "sha224", CLIENT_AUTH, UPN_SAN, digest=hashes.SHA224())
    trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
    reason = rejected(leaf, trust)
    assert "certificate 'CN=sha224' is signed with ecdsa-with-SHA224, which the gateway does not accept" in reason
    assert "PhantomData" not in reason


@pytest.fixture(scope="module")
def rsa_root() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed RSA root as the verifier's profile wants a CA (keyUsage, key identifier), to sign with PSS."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA Root")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=10))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


_PSS_HASHES: dict[str, Digest] = {
    "sha224": hashes.SHA224(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


@pytest.mark.parametrize("salt", ["digest", "max", "20"])
@pytest.mark.parametrize("mgf", _PSS_HASHES)
@pytest.mark.parametrize("digest", _PSS_HASHES)
def test_rsa_pss_is_served_where_the_verifier_takes_it_else_named(
    rsa_root: tuple[x509.Certificate, rsa.RSAPrivateKey], digest: str, mgf: str, salt: str
) -> None:
    """A leaf signed with RSA-PSS of each hash, MGF1 hash and salt (the hash's length, the longest the key allows as
    the openssl CLI signs by default, 20 bytes) is served exactly where cryptography's own verifier takes the
    signature, and otherwise refused naming the parameters (the reason was the verifier's debug dump)."""
    root, root_key = rsa_root
    mgf1 = padding.MGF1(_PSS_HASHES[mgf])
    pss = {
        "digest": padding.PSS(mgf1, padding.PSS.DIGEST_LENGTH),
        "max": padding.PSS(mgf1, padding.PSS.MAX_LENGTH),
        "20": padding.PSS(mgf1, 20),
    }[salt]
    aki = (x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False)
    leaf, _ = issue(root, root_key, "alice", CLIENT_AUTH, UPN_SAN, aki, digest=_PSS_HASHES[digest], rsa_padding=pss)
    stock = PolicyBuilder().store(Store([root])).time(NOW).build_client_verifier()
    try:
        stock.verify(leaf, [])
    except VerificationError:
        reason = rejected(leaf, TrustList(anchors=(root,), intermediates=()))
        assert "certificate 'CN=alice' is signed with RSA-PSS (" in reason, reason
        assert "PhantomData" not in reason
    else:
        assert verify_chain(leaf, TrustList(anchors=(root,), intermediates=()), at=NOW).leaf == leaf
    if (digest, mgf, salt) == ("sha256", "sha256", "max"):
        assert "RSA-PSS (SHA-256, MGF1 with SHA-256, a salt of 222 bytes)" in reason


def test_a_ca_key_the_verifier_refuses_is_named_with_its_ca(pki: Pki) -> None:
    """An intermediate with an Ed25519 key (OpenSSL's handshake takes it) is refused naming that CA and its key, not
    the leaf's signature: the CA is what to reissue."""
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    ca, ca_key = issue(root, root_key, "Edwards CA", CA, key=ed25519.Ed25519PrivateKey.generate())
    leaf, _ = issue(ca, ca_key, "alice", CLIENT_AUTH, UPN_SAN, digest=None)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(ca,))
    assert "CA 'CN=Edwards CA' has an Ed25519 key, which the gateway does not accept" in rejected(leaf, trust)


def test_a_critical_policy_extension_the_verifier_does_not_process_is_named_with_its_ca(pki: Pki) -> None:
    """A CA with a critical policyConstraints (RFC 5280 makes it critical always) is refused, as the verifier does
    no policy processing, and the reason names that CA and the extension, not only the verifier's OID."""
    constraints = (x509.PolicyConstraints(require_explicit_policy=0, inhibit_policy_mapping=None), True)
    policy_ca, policy_key = issue(load_cert(pki.root_cert), load_key(pki.root_key), "Policy CA", CA, constraints)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(policy_ca,))
    leaf, _ = issue(policy_ca, policy_key, "alice", CLIENT_AUTH, UPN_SAN)
    reason = rejected(leaf, trust)
    assert "CA 'CN=Policy CA' marks policyConstraints (2.5.29.36) critical, which the gateway does not" in reason


@pytest.mark.parametrize(
    ("usages", "has"),
    [
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], "anyExtendedKeyUsage"),
        ([ExtendedKeyUsageOID.SERVER_AUTH], "serverAuth"),
    ],
)
def test_a_ca_whose_extended_key_usage_lacks_client_auth_is_refused_naming_it(
    pki: Pki, usages: list[x509.ObjectIdentifier], has: str
) -> None:
    """A CA's extended key usage without clientAuth ends OpenSSL's handshake (anyExtendedKeyUsage included), so the
    certificate stage refuses it too (cryptography's default took anyExtendedKeyUsage), naming the CA."""
    eku = (x509.ExtendedKeyUsage(usages), False)
    eku_ca, eku_key = issue(load_cert(pki.root_cert), load_key(pki.root_key), "EKU CA", CA, eku)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(eku_ca,))
    leaf, _ = issue(eku_ca, eku_key, "alice", CLIENT_AUTH, UPN_SAN)
    reason = rejected(leaf, trust)
    assert f"CA 'CN=EKU CA' has an extended key usage without clientAuth (it has: {has})" in reason


def test_a_ca_whose_extended_key_usage_has_client_auth_issues(pki: Pki) -> None:
    """A CA whose extended key usage includes clientAuth still issues client certificates."""
    eku = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), False)
    eku_ca, eku_key = issue(load_cert(pki.root_cert), load_key(pki.root_key), "EKU CA", CA, eku)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(eku_ca,))
    leaf, _ = issue(eku_ca, eku_key, "alice", CLIENT_AUTH, UPN_SAN)
    assert verify_chain(leaf, trust, at=NOW).chain[1] == eku_ca


def test_a_leaf_key_the_handshake_refuses_is_refused_naming_its_size(pki: Pki) -> None:
    """A user certificate with a 1024-bit RSA key, which OpenSSL's handshake refuses ("EE certificate key too weak"),
    is refused by the certificate stage too, naming the key; 2048 bits pass."""
    issuing = load_cert(pki.issuing_cert)
    trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
    for bits, refused in ((1024, True), (2048, False)):
        key = rsa.generate_private_key(65537, bits)
        leaf, _ = issue(issuing, load_key(pki.issuing_key), f"rsa{bits}", CLIENT_AUTH, UPN_SAN, key=key)
        if refused:
            assert "certificate has a 1024-bit RSA key" in rejected(leaf, trust)
        else:
            assert verify_chain(leaf, trust, at=NOW).leaf == leaf
