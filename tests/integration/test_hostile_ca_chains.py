"""CA chains a careless or hostile administrator makes (hostile_ca_pki.sh, the openssl CLI only), presented by curl
to a running gateway over the lab's KDC.

OpenSSL refuses most of them in the handshake. Its reason ("certificate has expired", "unsuitable certificate
purpose") does not say which certificate of the chain it is about, and the fix differs: a user's expired certificate
wants a new certificate for that user, an expired issuing CA a renewed CA for everyone. So the log's
`tls_handshake_refused` names the certificate OpenSSL's verification failed on (`certificate`, `depth`: 0 is the
device's own) and gives the fix for that one. The rest pass the handshake and are refused with 403: a CA revoked by
its root's CRL, a signature algorithm the certificate stage does not accept, a directoryName name constraint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ, useful
from pyasn1_modules import rfc5280

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, Gateway, free_port, gateway_on_server, lab_config, start_gateway

SCRIPT = REPO / "tests" / "integration" / "hostile_ca_pki.sh"
CAS = (  # the intermediates every gateway here is configured with
    *("good", "expired", "eku_server", "not_ca", "nc_upn", "nc_dirname", "revoked", "pathlen0", "deep", "oldint"),
    *("ed25519", "policy", "eku_any", "rsa", "pss_sub"),
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hostile CA chains, made once for this file."""
    directory = tmp_path_factory.mktemp("hostile-ca-pki")
    done = subprocess.run([str(SCRIPT), str(directory)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return directory


def _config(lab: LabLayout, pki: Path) -> str:
    """The lab's gateway trusting the hostile root, every intermediate configured, the root's and the good and
    revoked CAs' CRLs loaded, under `revocation = "require"`."""
    text = lab_config(lab, port=free_port())
    anchor = f'trust_anchors = ["{pki / "root" / "cert.pem"}", "{pki / "oldroot" / "cert.pem"}"]'
    text = text.replace(f'trust_anchors = ["{lab.pki_dir / "root.pem"}"]', anchor)
    intermediates = ", ".join(f'"{pki / ca / "cert.pem"}"' for ca in CAS)
    text = text.replace(f'intermediates = ["{lab.pki_dir / "issuing.pem"}"]', f"intermediates = [{intermediates}]")
    return text.replace(f'crls = ["{lab.pki_dir / "crls.pem"}"]', f'crls = ["{pki / "crls.pem"}"]')


@pytest.fixture(scope="module")
def gw(lab: LabLayout, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway of `_config` (the device side is the gateway's own server)."""
    gateway = start_gateway(lab, tmp_path_factory.mktemp("hostile-ca-gateway"), _config(lab, pki))
    yield gateway
    assert gateway.stop() == 0


def _curl(lab: LabLayout, gw: Gateway, user: Path) -> tuple[int, str, str]:
    """curl as the user certificate in directory `user`: (status, body, stderr); status 0 without an HTTP answer."""
    argv = ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem"), "-v"]
    argv += ["--cert", str(user / "cert.pem"), "--key", str(user / "key.pem"), "-w", "\n%{http_code}", gw.url + "/owa/"]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=90, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body, done.stderr


def _subject(cert: Path) -> str:
    """The certificate's subject as the gateway writes it (RFC 4514; these subjects are one CN)."""
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", str(cert)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().removeprefix("subject=")


@pytest.mark.parametrize(
    ("user", "alert", "reason", "about", "depth", "in_fix"),
    [
        ("expired/alice", "certificate expired", "certificate has expired", "expired", 1, "renew that CA"),
        (
            "eku_server/alice",
            "unsupported certificate",
            "unsuitable certificate purpose",
            "eku_server",
            1,
            "applies a CA's extended key usage to every certificate below it",
        ),
        ("oldint/alice", "certificate expired", "certificate has expired", "oldroot", 2, "renew that CA"),
        (
            "eku_any/alice",
            "unsupported certificate",
            "unsuitable certificate purpose",
            "eku_any",
            1,
            "applies a CA's extended key usage to every certificate below it",
        ),
        ("not_ca/alice", "unknown ca", "invalid ca certificate", "not_ca", 1, "may not sign certificates"),
        ("deep/alice", "unknown ca", "path length constraint exceeded", "pathlen0", 2, "pathlen"),
        ("nc_upn/alice", "certificate unknown", "unsupported name constraint type", "nc_upn/alice", 0, "UPN"),
        (
            "good/alice_expired",
            "certificate expired",
            "certificate has expired",
            "good/alice_expired",
            0,
            "issue the user a new one",
        ),
    ],
)
def test_a_handshake_refusal_names_the_certificate_it_is_about_and_its_fix(
    lab: LabLayout, pki: Path, gw: Gateway, user: str, alert: str, reason: str, about: str, depth: int, in_fix: str
) -> None:
    """OpenSSL refuses these chains in the handshake (curl gets its alert, no request is served); the log's
    `tls_handshake_refused` names the certificate the refusal is about and its depth, and the fix is that
    certificate's: a renewed CA for an expired issuing CA or trust anchor (was "issue the user a new one"), the CA's
    extended key usage for one without clientAuth (was "the certificate lacks clientAuth", about alice's, which has
    it), and a fix at all for CA:FALSE, an exceeded pathlen and a UPN name constraint (there was none)."""
    mark = gw.mark()
    status, body, err = _curl(lab, gw, pki / user)
    assert status == 0, body
    assert f"alert {alert}" in err.lower() or f"tls alert, {alert}" in err.lower(), err
    line = gw.wait_for("tls_handshake_refused", lambda e: reason in e["reason"].lower(), what=reason)
    assert line["depth"] == depth, line
    assert line["certificate"] == _subject(pki / about / "cert.pem"), line
    assert in_fix in (line["fix"] or ""), line
    assert not gw.events("request", after=mark)


def test_aiohttps_device_side_names_the_expired_ca_too(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """With `listener.http_server = "aiohttp"` the handshake is asyncio's TLS protocol, not the gateway's own: its
    refusal of a chain through an expired CA names that CA and the CA's fix all the same."""
    with gateway_on_server(lab, tmp_path, "aiohttp", _config(lab, pki)) as gw:
        status, body, _ = _curl(lab, gw, pki / "expired" / "alice")
        assert status == 0, body
        line = gw.wait_for("tls_handshake_refused", lambda e: "expired" in e["reason"], what="expired")
        assert (line["certificate"], line["depth"]) == ("CN=Hostile expired CA", 1), line
        assert "renew that CA" in line["fix"], line


@pytest.mark.parametrize(
    "user",
    [
        "alice",
        "alice_ed25519",
        "alice_ed448",
        "alice_p521",
        "alice_critical_eku",
        "alice_no_subject",
        "alice_bare",
        "alice_outlives",
    ],
)
def test_what_the_good_ca_may_issue_is_served(lab: LabLayout, pki: Path, gw: Gateway, user: str) -> None:
    """The good intermediate's certificates the gateway serves as alice@LAB.TEST (docs/refusals.md, "Served"): the
    control; device keys of Ed25519, Ed448 and P-521 (the CA's signature is what the chain needs); a critical EKU
    with clientAuth and smartcardLogon; an empty subject with a critical SAN; no basicConstraints nor keyUsage, with
    an unknown non-critical extension; a certificate whose notAfter is past its CA's (served while the CA is valid)."""
    gw.mark()
    status, body, err = _curl(lab, gw, pki / "good" / user)
    assert status == 200, (body, err)
    assert '"principal": "alice@LAB.TEST"' in body
    line = gw.wait_event("request", status=200)
    assert line["revocation"] == "good"


@pytest.mark.parametrize(
    ("user", "stage", "reason"),
    [
        ("revoked/alice", "revocation", "issuing CA 'CN=Hostile revoked CA' serial 0x"),
        ("good/alice_sha224", "certificate", "certificate 'CN=alice_sha224' is signed with ecdsa-with-SHA224"),
        ("ed25519/alice", "certificate", "CA 'CN=Hostile ed25519 CA' has an Ed25519 key"),
        (
            "rsa/alice_pss",
            "certificate",
            "certificate 'CN=alice_pss' is signed with RSA-PSS (SHA-256, MGF1 with SHA-256, a salt of 222 bytes), "
            "which the gateway does not accept",
        ),
        (
            "pss_sub/alice",
            "certificate",
            "certificate 'CN=Hostile pss_sub CA' is signed with RSA-PSS (SHA-256, MGF1 with SHA-256, a salt of 222 "
            "bytes), which the gateway does not accept",
        ),
        ("nc_dirname/alice", "certificate", "directoryName"),
        (
            "policy/alice",
            "certificate",
            "CA 'CN=Hostile policy CA' marks policyConstraints (2.5.29.36) critical, which the gateway does not "
            "process",
        ),
    ],
)
def test_chains_the_handshake_takes_are_refused_with_403_naming_why(
    lab: LabLayout, pki: Path, gw: Gateway, user: str, stage: str, reason: str
) -> None:
    """OpenSSL's handshake takes these chains and the later stages refuse them, with 403, the refusing stage and a
    reason naming what to fix: an issuing CA its root's CRL revokes (`openssl ca -revoke`), a certificate signed with
    SHA-224 and an issuing CA with an Ed25519 key (the certificate stage's verifier accepts neither: the reason was
    the verifier's debug dump, `AlgorithmIdentifier { oid: DefinedByMarker(PhantomData<...`, naming no certificate),
    a CA's directoryName name constraint (a form the verifier cannot check, docs/refusals.md), a CA's critical
    policyConstraints (the reason named the extension's OID only, not the certificate), a certificate signed with
    RSA-PSS as the openssl CLI signs by default (the salt as long as the key allows, where the verifier takes only the
    hash's length: the reason was the verifier's debug dump). Never delegated."""
    gw.mark()
    status, body, err = _curl(lab, gw, pki / user)
    assert status == 403, (body, err)
    assert reason in body, body
    assert "PhantomData" not in body
    line = gw.wait_for("request", lambda e: e.get("refused_stage") == stage, what=stage)
    assert line["status"] == 403
    assert "principal" not in line


def test_rsa_pss_with_a_salt_of_the_hashs_length_is_served(lab: LabLayout, pki: Path, gw: Gateway) -> None:
    """RSA-PSS as the certificate stage's verifier takes it (`-sigopt rsa_pss_saltlen:digest`: SHA-256, MGF1 with
    SHA-256, a 32-byte salt), from an RSA issuing CA: served as alice@LAB.TEST, its CRL consulted."""
    gw.mark()
    status, body, err = _curl(lab, gw, pki / "rsa" / "alice_pss_digest")
    assert status == 200, (body, err)
    assert '"principal": "alice@LAB.TEST"' in body
    assert gw.wait_event("request", status=200)["revocation"] == "good"


def test_check_config_warns_of_a_ca_below_which_no_certificate_passes(
    lab: LabLayout, pki: Path, tmp_path: Path
) -> None:
    """check-config stays ok but warns, naming the key and the CA, of a configured CA whose key (Ed25519) or whose own
    signature (RSA-PSS at openssl's default salt) the certificate stage refuses: every device certificate below it
    gets 403. It said nothing of either."""
    cas = ("good", "rsa", "ed25519", "pss_sub")
    text = lab_config(lab, port=free_port())
    text = text.replace(f'["{lab.pki_dir / "root.pem"}"]', f'["{pki / "root" / "cert.pem"}"]')
    intermediates = ", ".join(f'"{pki / ca / "cert.pem"}"' for ca in cas)
    text = text.replace(f'["{lab.pki_dir / "issuing.pem"}"]', f"[{intermediates}]")
    crls = ", ".join(f'"{pki / ca / "crl.pem"}"' for ca in ("root", "good", "rsa"))
    text = text.replace(f'["{lab.pki_dir / "crls.pem"}"]', f"[{crls}]")
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: client_certificates.")]
    assert len(warnings) == 2, warnings
    ed25519, pss = (f"warning: client_certificates.intermediates[{cas.index(ca)}]: " for ca in ("ed25519", "pss_sub"))
    assert warnings[0].startswith(ed25519), warnings
    assert "CA 'CN=Hostile ed25519 CA' has an Ed25519 key, which the gateway does not accept" in warnings[0]
    assert warnings[1].startswith(pss), warnings
    assert (
        "'CN=Hostile pss_sub CA' is signed with RSA-PSS (SHA-256, MGF1 with SHA-256, a salt of 222 bytes)"
        in (warnings[1])
    )
    assert all("every certificate it issues is refused (403)" in line for line in warnings), warnings


@pytest.mark.parametrize(
    ("crls", "user", "status", "said"),
    [
        (("renewed_new",), "alice", 403, "no current CRL for issuer 'CN=Hostile renewed CA'"),
        (("renewed_new",), "bob", 403, "no current CRL for issuer 'CN=Hostile renewed CA'"),
        (("renewed_old", "renewed_new"), "alice", 403, "was revoked on"),
        (("renewed_old", "renewed_new"), "bob", 200, '"principal": "alice@LAB.TEST"'),  # every UPN here is alice's
    ],
)
def test_after_a_ca_key_renewal_only_a_crl_of_the_certificates_own_key_vouches_for_it(
    lab: LabLayout, pki: Path, tmp_path: Path, crls: tuple[str, ...], user: str, status: int, said: str
) -> None:
    """A CA renewed with a new key (the same name, two CA certificates, both configured) publishes one CRL per key,
    each listing what that key signed, as AD CS does. A certificate of the old key is vouched for only by the old
    key's CRL: with the new key's CRL alone, alice's certificate, revoked on the old key's CRL, was served (200: "not
    on CRL #1 of 'CN=Hostile renewed CA'", the new key's) under `revocation = "require"`, and bob's too; now both get
    403 naming no current CRL. With both keys' CRLs, alice is refused as revoked and bob served."""
    text = _config(lab, pki)
    intermediates = ", ".join(f'"{pki / ca / "cert.pem"}"' for ca in ("renewed_old", "renewed_new"))
    text = text.replace("intermediates = [", f"intermediates = [{intermediates}, ", 1)
    files = ", ".join(f'"{pki / ca / "crl.pem"}"' for ca in ("root", *crls))
    text = text.replace(f'crls = ["{pki / "crls.pem"}"]', f"crls = [{files}]", 1)
    gw = start_gateway(lab, tmp_path, text)
    try:
        got, body, err = _curl(lab, gw, pki / "renewed_old" / user)
        assert got == status, (body, err)
        assert said in body, body
    finally:
        gw.stop()


def test_a_delta_crl_of_another_key_does_not_lift_the_base_crls_revocation(
    lab: LabLayout, pki: Path, tmp_path: Path
) -> None:
    """RFC 5280 5.2.4: a delta CRL updates only the complete CRLs signed with its own key. The renewed CA's new key
    signed a delta CRL (made with `openssl ca -gencrl`, a deltaCRLIndicator of 1) over the old key's CRL #1, with a
    removeFromCRL entry for alice: her certificate, revoked on the old key's CRL for keyCompromise, was served (200)
    under `revocation = "require"`. Now the delta extends no CRL of the old key, and alice gets 403 as revoked."""
    text = _config(lab, pki)
    intermediates = ", ".join(f'"{pki / ca / "cert.pem"}"' for ca in ("renewed_old", "renewed_new"))
    text = text.replace("intermediates = [", f"intermediates = [{intermediates}, ", 1)
    files = ", ".join(
        f'"{pki / path}"' for path in ("root/crl.pem", "renewed_old/crl.pem", "renewed_new/delta_lifting.pem")
    )
    text = text.replace(f'crls = ["{pki / "crls.pem"}"]', f"crls = [{files}]", 1)
    gw = start_gateway(lab, tmp_path, text)
    try:
        got, body, err = _curl(lab, gw, pki / "renewed_old" / "alice")
        assert got == 403, (body, err)
        assert "was revoked on" in body, body
        assert "reason keyCompromise" in body, body
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("signer", "status", "said"),
    [
        ("partner_crl_signer", 403, "no current CRL for issuer 'CN=Hostile good CA' of its own trust anchor"),
        ("root_crl_signer", 200, '"principal": "alice@LAB.TEST"'),
    ],
)
def test_a_crl_signer_under_another_trust_anchor_does_not_vouch(
    lab: LabLayout, pki: Path, tmp_path: Path, signer: str, status: int, said: str
) -> None:
    """RFC 5280 6.3.3 (f): a CRL's signer must have a path to the trust anchor of the certificate it speaks for. A
    partner's root, configured as a second anchor for its own users, certifies a cRLSign-only key under the good CA's
    name (and the administrator loads the partner's bundle and CRL): with the good CA's own CRL missing, that CRL
    (listing nothing) said alice was good, and she was served (200) under `revocation = "require"`; now 403 naming
    no current CRL of her own trust anchor. The same CRL-only key under her own root still vouches."""
    text = _config(lab, pki)
    anchors = f'"{pki / "oldroot" / "cert.pem"}"'
    text = text.replace(anchors, f'{anchors}, "{pki / "partner" / "cert.pem"}"', 1)
    text = text.replace("intermediates = [", f'intermediates = ["{pki / signer / "cert.pem"}", ', 1)
    crls = f'crls = ["{pki / "root" / "crl.pem"}", "{pki / signer / "crl.pem"}"]'
    gw = start_gateway(lab, tmp_path, text.replace(f'crls = ["{pki / "crls.pem"}"]', crls, 1))
    try:
        got, body, err = _curl(lab, gw, pki / "good" / "alice")
        assert got == status, (body, err)
        assert said in body, body
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("crl", "problem"),
    [
        ("crl_critical_unknown", "CRL has an unsupported critical extension 1.3.6.1.4.1.99999.7"),
        ("crl_future", "is not valid yet: its thisUpdate is"),
        ("crl_cas_only", None),
    ],
)
def test_a_crl_that_cannot_speak_for_the_certificate_leaves_it_unknown(
    lab: LabLayout, pki: Path, tmp_path: Path, crl: str, problem: str | None
) -> None:
    """The good CA's only CRL, made by `openssl ca -gencrl`, is one that cannot vouch for alice: with an unknown
    critical extension or a thisUpdate a day ahead it is refused (`crl_rejected` says why), with an
    issuingDistributionPoint of CA certificates only it is taken but speaks for no user certificate. Either way,
    under `revocation = "require"`, alice gets 403 at revocation naming no current CRL, never "good"."""
    text = _config(lab, pki)
    crls = f'crls = ["{pki / "root" / "crl.pem"}", "{pki / "good" / f"{crl}.pem"}"]'
    gw = start_gateway(lab, tmp_path, text.replace(f'crls = ["{pki / "crls.pem"}"]', crls, 1))
    try:
        if problem is not None:
            gw.wait_for("crl_rejected", lambda e: problem in e["problem"], what=problem)
        status, body, err = _curl(lab, gw, pki / "good" / "alice")
        assert status == 403, (body, err)
        assert "no current CRL for issuer 'CN=Hostile good CA'" in body
        line = gw.wait_event("request", refused_stage="revocation")
        assert line["status"] == 403
    finally:
        gw.stop()


@pytest.mark.parametrize("ca", ["eku_server", "eku_any"])
def test_explain_refuses_a_ca_whose_extended_key_usage_lacks_client_auth_as_the_handshake_does(
    lab: LabLayout, pki: Path, tmp_path: Path, ca: str
) -> None:
    """`explain` says where a request would stop. A CA whose extended key usage lacks clientAuth ends the handshake
    (OpenSSL applies a CA's EKU to the certificates below it, and reads anyExtendedKeyUsage on a CA as no
    clientAuth); `explain --json` refuses it at the certificate stage too, naming that CA: it accepted the
    anyExtendedKeyUsage CA's user (exit 0, while the device got a TLS alert), and for serverAuth said only "Neither
    EKU nor anyEKU could be found", about no certificate."""
    config = tmp_path / "gateway.toml"
    config.write_text(_config(lab, pki))
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "explain",
        "--config",
        str(config),
        "--cert",
        str(pki / ca / "alice" / "cert.pem"),
    ]
    done = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert (answer["accepted"], answer["stage"]) == (False, "certificate"), answer
    assert f"CA 'CN=Hostile {ca} CA' has an extended key usage without clientAuth" in answer["reason"], answer


def test_explain_refuses_a_key_the_handshake_refuses(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """A user certificate with a 1024-bit RSA key ends OpenSSL's handshake ("EE certificate key too weak", its
    security level 2); `explain --json` refuses it at the certificate stage too, naming the key (it accepted it)."""
    config = tmp_path / "gateway.toml"
    config.write_text(_config(lab, pki))
    cert = pki / "good" / "alice_rsa1024" / "cert.pem"
    argv = [sys.executable, "-m", "proxy", "explain", "--config", str(config), "--cert", str(cert), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert (answer["accepted"], answer["stage"]) == (False, "certificate"), answer
    assert "certificate has a 1024-bit RSA key" in answer["reason"], answer


def test_a_validity_in_generalized_time_before_2050_is_refused(lab: LabLayout, pki: Path, gw: Gateway) -> None:
    """RFC 5280 4.1.2.5: validity dates through 2049 MUST be UTCTime. alice's certificate re-encoded with its
    notBefore as a GeneralizedTime (a DER edit, signed again with the good CA's key: openssl cannot write one) passes
    OpenSSL's handshake, which reads either, and is refused at the certificate stage, whose verifier holds to the
    RFC (docs/refusals.md): 403 naming it, never delegated."""
    cert, _ = der_decoder.decode(
        x509.load_pem_x509_certificate((pki / "good" / "alice" / "cert.pem").read_bytes()).public_bytes(
            serialization.Encoding.DER
        ),
        asn1Spec=rfc5280.Certificate(),
    )
    tbs = cert["tbsCertificate"]
    when = rfc5280.Time()
    when["generalTime"] = useful.GeneralizedTime("20" + str(tbs["validity"]["notBefore"].getComponent()))
    tbs["validity"]["notBefore"] = when
    key = serialization.load_pem_private_key((pki / "good" / "key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert["signature"] = univ.BitString.fromOctetString(key.sign(der_encoder.encode(tbs), ec.ECDSA(hashes.SHA256())))
    user = pki / "good" / "alice_generalized_time"
    user.mkdir(exist_ok=True)
    (user / "cert.pem").write_bytes(
        x509.load_der_x509_certificate(der_encoder.encode(cert)).public_bytes(serialization.Encoding.PEM)
    )
    (user / "key.pem").write_bytes((pki / "good" / "alice" / "key.pem").read_bytes())
    gw.mark()
    status, body, err = _curl(lab, gw, user)
    assert status == 403, (body, err)
    assert "validity dates between 1950 and 2049 must be UtcTime" in body
    line = gw.wait_event("request", refused_stage="certificate")
    assert "principal" not in line


def test_a_renewed_cas_new_key_with_no_current_crl_leaves_the_gateway_unready_beside_a_failing_url(
    lab: LabLayout, pki: Path, tmp_path: Path
) -> None:
    """A CA renewed with a new key, under "require": the old key's CRL from a file, the new key's from a URL that
    fails. carol's certificate of the new key has no current CRL and is refused: /readyz must be 503, the URL named
    without "held from another source". It was 200: `crl_problems` took the CA as holding a current CRL by its name
    alone, the old key's CRL standing in for the new key's, which the revocation stage never does."""
    text = _config(lab, pki)
    text = text.replace(f', "{pki / "oldroot" / "cert.pem"}"]', "]", 1)
    intermediates = ", ".join(f'"{pki / ca / "cert.pem"}"' for ca in ("renewed_old", "renewed_new"))
    text = text.replace(", ".join(f'"{pki / ca / "cert.pem"}"' for ca in CAS), intermediates, 1)
    url = f"http://127.0.0.1:{free_port()}/renewed_new.crl"
    files = ", ".join(f'"{pki / ca / "crl.pem"}"' for ca in ("root", "renewed_old"))
    text = text.replace(f'crls = ["{pki / "crls.pem"}"]', f'crls = [{files}, "{url}"]', 1)
    admin = f"127.0.0.1:{free_port()}"
    gw = start_gateway(lab, tmp_path, text + f'\n[admin]\nbind = "{admin}"\n')
    try:
        gw.wait_event("crl_fetch_failed", source=url)
        got, body, err = _curl(lab, gw, pki / "renewed_new" / "carol")
        assert got == 403, (body, err)
        assert "no current CRL for issuer 'CN=Hostile renewed CA'" in body, body
        assert _curl(lab, gw, pki / "renewed_old" / "bob")[0] == 200
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=30) as answer:
                status, ready = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            status, ready = e.code, json.loads(e.read())
        assert (status, ready["ready"]) == (503, False), ready
        (problem,) = ready["crls"]
        assert problem.startswith(f"{url}: no usable CRL (fetch failed"), problem
        assert not problem.endswith("held from another source"), problem
    finally:
        gw.stop()
