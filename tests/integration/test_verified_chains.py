"""Client chains OpenSSL verified, remembered per listener context (`proxy.tls.openssl.remember_verified_chains`).

A device that reconnects presents the same certificates every time; OpenSSL's verification of them depends only on
those bytes, the trust store, the verification settings and the time, so the listener accepts the same bytes again
while every certificate of the verified chain is valid, without verifying them again. These tests attack what must
not change: a certificate that expired since it was remembered, a copy with a forged signature, a chain that failed,
another context's trust list (a reload), the bound. Real TLS in process: the listener's context as the gateway makes
it from the lab's configuration (server side) and a Python client presenting the lab's certificates, the records
carried between them in memory.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import config as config_module
from proxy.lab.layout import LabLayout
from proxy.tls import openssl
from proxy.tls import server as tls_server
from tests.integration.conftest import free_port, lab_config


def _context(lab: LabLayout, tmp_path: Path, text: str | None = None) -> ssl.SSLContext:
    """The listener's context as the gateway makes it from the lab's configuration (or from `text`)."""
    path = tmp_path / f"gateway-{time.monotonic_ns()}.toml"
    path.write_text(text if text is not None else lab_config(lab, port=free_port()))
    return tls_server.server_context(config_module.load(path))


def _chains(ctx: ssl.SSLContext) -> openssl.VerifiedChains:
    chains = getattr(ctx, "verified_chains", None)
    assert isinstance(chains, openssl.VerifiedChains), "the listener's context remembers no verified chains"
    return chains


def _device(cert: Path, key: Path, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(cert, key)
    return ctx


def _user(lab: LabLayout, user: str) -> ssl.SSLContext:
    users = lab.pki_dir / "users"
    return _device(users / f"{user}.pem", users / f"{user}.key")


def _handshake(server: ssl.SSLContext, device: ssl.SSLContext) -> bytes:
    """One full handshake; the certificate (DER) the server's side of the connection carries. Raises the server's
    ssl.SSLError when it refuses."""
    s_in, s_out, d_in, d_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = server.wrap_bio(s_in, s_out, server_side=True)
    theirs = device.wrap_bio(d_in, d_out, server_side=False)
    done = False
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            theirs.do_handshake()
        s_in.write(d_out.read())
        try:
            ours.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        d_in.write(s_out.read())
        if done:
            der = ours.getpeercert(True)
            assert der is not None
            return der
    raise AssertionError("the handshake did not end")


def _der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def _short_lived(lab: LabLayout, tmp_path: Path, seconds: float) -> tuple[Path, Path, datetime.datetime]:
    """A copy of alice's certificate (its names and extensions) on a key of its own, issued by the lab's issuing CA,
    valid from a minute ago for `seconds` more."""
    alice = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "alice.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((lab.pki_dir / "issuing.pem").read_bytes())
    issuing_key = serialization.load_pem_private_key((lab.pki_dir / "issuing.key").read_bytes(), None)
    assert isinstance(issuing_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    until = now + datetime.timedelta(seconds=seconds)
    builder = (
        x509.CertificateBuilder()
        .subject_name(alice.subject)
        .issuer_name(issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(until)
    )
    for extension in alice.extensions:
        if extension.oid != x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER:
            builder = builder.add_extension(extension.value, extension.critical)
    cert = builder.sign(issuing_key, hashes.SHA256())
    cert_path, key_path = tmp_path / "brief.pem", tmp_path / "brief.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, until


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_chain_verified_once_is_accepted_again_from_memory(
    lab: LabLayout, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    """alice's first full handshake verifies her chain and remembers it, for the span in which her certificate, the
    issuing CA's and the root's are all valid (a second inside each end); her next full handshakes (TLS 1.3 and 1.2)
    are accepted from memory, each connection carrying her certificate."""
    server = _context(lab, tmp_path)
    users = lab.pki_dir / "users"
    device = _device(users / "alice.pem", users / "alice.key", version)
    alice = _der(users / "alice.pem")
    assert _handshake(server, device) == alice
    assert (len(_chains(server).spans), _chains(server).hits) == (1, 0)
    assert [_handshake(server, device) for _ in range(3)] == [alice] * 3
    assert (len(_chains(server).spans), _chains(server).hits) == (1, 3)
    chain = [x509.load_pem_x509_certificate(p.read_bytes()) for p in (users / "alice.pem", lab.pki_dir / "issuing.pem")]
    chain.append(x509.load_pem_x509_certificate((lab.pki_dir / "root.pem").read_bytes()))
    span = (
        max(c.not_valid_before_utc.timestamp() for c in chain) + 1,
        min(c.not_valid_after_utc.timestamp() for c in chain) - 1,
    )
    assert list(_chains(server).spans.values()) == [span], "not the span of every certificate of the chain"


def test_a_remembered_certificate_is_refused_once_it_has_expired(lab: LabLayout, tmp_path: Path) -> None:
    """A certificate remembered while valid is verified again once its notAfter has passed: the handshake is refused
    with OpenSSL's "certificate has expired", as it would have been without the memory."""
    cert, key, until = _short_lived(lab, tmp_path, seconds=6)
    server, device = _context(lab, tmp_path), _device(cert, key)
    _handshake(server, device)
    _handshake(server, device)
    assert _chains(server).hits == 1, "the short-lived certificate was not remembered while valid"
    deadline = time.monotonic() + 60
    while time.time() <= until.timestamp() + 1:
        assert time.monotonic() < deadline, "the certificate did not expire"
        time.sleep(0.1)
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        _handshake(server, device)
    assert refused.value.verify_message == "certificate has expired"
    assert _chains(server).hits == 1


def test_a_copy_with_a_forged_signature_is_refused_after_the_genuine_one(lab: LabLayout, tmp_path: Path) -> None:
    """alice's certificate with one byte of its signature changed (the same names, key and serial; alice's key to
    sign the handshake) is refused with "certificate signature failure" after the genuine one was remembered: the
    memory is of exact bytes, not of names or keys."""
    users = lab.pki_dir / "users"
    server = _context(lab, tmp_path)
    _handshake(server, _user(lab, "alice"))
    forged = bytearray(_der(users / "alice.pem"))
    forged[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    forged_path = tmp_path / "forged.pem"
    forged_path.write_bytes(x509.load_der_x509_certificate(bytes(forged)).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        _handshake(server, _device(forged_path, users / "alice.key"))
    assert refused.value.verify_message == "certificate signature failure"
    assert (len(_chains(server).spans), _chains(server).hits) == (1, 0)


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("untrusted", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("notyet", "certificate is not yet valid"),
    ],
)
def test_a_chain_that_failed_is_not_remembered(lab: LabLayout, tmp_path: Path, user: str, reason: str) -> None:
    """A chain OpenSSL refused (a forged alice from the rogue CA, an expired or not yet valid certificate) is refused
    each time with OpenSSL's reason, and nothing is remembered."""
    server = _context(lab, tmp_path)
    for _ in range(2):
        with pytest.raises(ssl.SSLCertVerificationError) as refused:
            _handshake(server, _user(lab, user))
        assert refused.value.verify_message == reason
    assert (len(_chains(server).spans), _chains(server).hits) == (0, 0)


def test_a_context_with_another_trust_list_does_not_know_what_the_old_one_remembered(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A reload makes a new context: one whose trust list holds the rogue CAs only refuses alice's chain ("unable
    to get local issuer certificate") although the context before it had remembered that chain."""
    before = _context(lab, tmp_path)
    _handshake(before, _user(lab, "alice"))
    assert len(_chains(before).spans) == 1
    rogue = lab.pki_dir / "rogue"
    text = (
        lab_config(lab, port=free_port())
        .replace(str(lab.pki_dir / "root.pem"), str(rogue / "root.pem"))
        .replace(str(lab.pki_dir / "issuing.pem"), str(rogue / "issuing.pem"))
    )
    after = _context(lab, tmp_path, text)
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        _handshake(after, _user(lab, "alice"))
    assert refused.value.verify_message == "unable to get local issuer certificate"
    assert _chains(after).spans == {}


def test_the_certificates_a_device_sends_besides_its_own_are_part_of_what_is_remembered(
    lab: LabLayout, tmp_path: Path
) -> None:
    """alice alone, then alice with the issuing CA's certificate sent along: two chains remembered, the second
    verified by OpenSSL rather than accepted as the first (what a device sends is all of the key)."""
    users = lab.pki_dir / "users"
    server = _context(lab, tmp_path)
    _handshake(server, _user(lab, "alice"))
    bundle = tmp_path / "alice-and-issuing.pem"
    bundle.write_bytes((users / "alice.pem").read_bytes() + (lab.pki_dir / "issuing.pem").read_bytes())
    assert _handshake(server, _device(bundle, users / "alice.key")) == _der(users / "alice.pem")
    assert (len(_chains(server).spans), _chains(server).hits) == (2, 0)


def test_the_memory_is_bounded_and_forgets_the_oldest_chain(lab: LabLayout, tmp_path: Path) -> None:
    """With room for two chains, alice's, bob's and carol's handshakes leave two remembered; alice's (the oldest)
    is verified again, and served as alice."""
    server = _context(lab, tmp_path)
    chains = openssl.remember_verified_chains(server, 2)
    assert isinstance(chains, openssl.VerifiedChains)
    for user in ("alice", "bob", "carol"):
        _handshake(server, _user(lab, user))
    assert len(chains.spans) == 2
    assert _handshake(server, _user(lab, "alice")) == _der(lab.pki_dir / "users" / "alice.pem")
    assert (len(chains.spans), chains.hits) == (2, 0)
    _handshake(server, _user(lab, "carol"))
    assert chains.hits == 1
