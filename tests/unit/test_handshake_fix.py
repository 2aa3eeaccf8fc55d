"""The fix a refused handshake's log line gives (proxy.tls.server.handshake_fix), for OpenSSL's reasons."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.lab.pki import Pki
from proxy.tls.openssl import RefusedCertificate
from proxy.tls.server import handshake_fix, peer_text
from tests.pem import load_cert, load_key
from tests.unit.test_chain import CLIENT_AUTH, UPN_SAN, issue, netscape_cert_type


@pytest.mark.parametrize(
    ("reason", "in_fix"),
    [
        ("unable to get local issuer certificate", "trust_anchors or intermediates"),
        ("unable to get issuer certificate", "add that issuer to client_certificates.intermediates"),
        ("certificate has expired", "issue the user a new one"),
        ("peer did not return a certificate", "install the user's certificate"),
        ("unhandled critical extension", "1.3.6.1.4.1.311.25.2"),
        ("invalid CA certificate", "basicConstraints lacks cA=TRUE"),
        ("path length constraint exceeded", "pathlen"),
        ("permitted subtree violation", "nameConstraints"),
        ("excluded subtree violation", "nameConstraints"),
        ("unsupported name constraint type", "e-mail or DNS name constraints"),
        ("CA signature digest algorithm too weak", "SHA-256"),
        ("EE certificate key too weak", "2048-bit"),
        ("self-signed certificate", "not issued by our PKI"),
    ],
)
def test_each_known_reason_has_its_fix(reason: str, in_fix: str) -> None:
    """OpenSSL's verify reasons each get the administrator's fix, including a chain whose top CA is trusted but
    whose own issuer is missing (no fix was logged for it)."""
    fix = handshake_fix(reason)
    assert fix is not None
    assert in_fix in fix


@pytest.mark.parametrize(
    ("reason", "in_fix"),
    [
        ("certificate has expired", "renew that CA"),
        ("certificate is not yet valid", "clocks of the gateway and of that CA"),
        ("unsuitable certificate purpose", "applies a CA's extended key usage"),
        ("unhandled critical extension", "reissue that CA"),
        ("certificate signature failure", "forged or corrupted CA certificate"),
    ],
)
def test_a_reason_about_a_ca_gets_the_cas_fix(reason: str, in_fix: str) -> None:
    """OpenSSL's reason about a certificate above the device's (depth > 0) gets that CA's fix, naming it and its
    depth; the same reason about the device's own certificate (depth 0) keeps the user's fix."""
    fix = handshake_fix(reason, RefusedCertificate(1, b"not DER"))
    assert fix is not None
    assert in_fix in fix
    assert "(depth 1)" in fix
    assert handshake_fix(reason, RefusedCertificate(0, b"")) == handshake_fix(reason)


def _key_usage(*, signs: bool = False, agrees: bool = False) -> tuple[x509.ExtensionType, bool]:
    usage = x509.KeyUsage(signs, False, True, False, agrees, False, False, False, False)
    return usage, True


@pytest.mark.parametrize(
    ("extensions", "in_fix"),
    [
        ((CLIENT_AUTH, _key_usage()), "key usage lacks digitalSignature"),  # keyEncipherment alone
        ((_key_usage(),), "key usage lacks digitalSignature"),  # no EKU: any purpose, the key usage fails
        (((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False), _key_usage()), "clientAuth"),
        (((x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False), _key_usage(signs=True)), "clientAuth"),
        ((CLIENT_AUTH,), "clientAuth"),  # no key usage, no Netscape type: the EKU is all there is to blame
        ((CLIENT_AUTH, _key_usage(signs=True), netscape_cert_type(0x40)), "Netscape certificate type"),  # server
    ],
    ids=[
        "clientAuth, keyEncipherment",
        "no EKU, keyEncipherment",
        "serverAuth, keyEncipherment",
        "serverAuth",
        "no KU",
        "nsCertType server",
    ],
)
def test_an_unsuitable_purpose_of_the_devices_certificate_names_the_usage_that_fails(
    pki: Pki, extensions: tuple[tuple[x509.ExtensionType, bool], ...], in_fix: str
) -> None:
    """OpenSSL's one reason, "unsuitable certificate purpose", for the device's own certificate: a key usage that
    neither signs nor agrees keys, under a clientAuth EKU (or none), is that key usage's fix, a Netscape certificate
    type without SSL client that type's; an EKU without clientAuth stays the EKU's. Both said the certificate lacked
    the clientAuth it had."""
    leaf, _ = issue(load_cert(pki.issuing_cert), load_key(pki.issuing_key), "device", UPN_SAN, *extensions)
    fix = handshake_fix(
        "unsuitable certificate purpose", RefusedCertificate(0, leaf.public_bytes(serialization.Encoding.DER))
    )
    assert fix is not None
    assert in_fix in fix
    assert handshake_fix("unsuitable certificate purpose", RefusedCertificate(0, b"not DER")) == handshake_fix(
        "unsuitable certificate purpose"
    )


def test_an_unknown_reason_has_no_fix() -> None:
    """A reason nobody mapped gets no made-up fix."""
    assert handshake_fix("something else entirely") is None


def test_peer_addresses_in_the_log_say_where_the_port_begins() -> None:
    """An IPv6 peer is `[::1]:36874` in the log (it was `::1:36874`: address and port could not be told apart); an
    IPv4 one stays `127.0.0.1:443`; what is not an address pair is written as it comes."""
    assert peer_text(("::1", 36874, 0, 0)) == "[::1]:36874"
    assert peer_text(("2001:db8::7", 443)) == "[2001:db8::7]:443"
    assert peer_text(("127.0.0.1", 443)) == "127.0.0.1:443"
    assert peer_text(None) == "None"
