"""The gateway with a PKI it did not make: a stranger's openssl-CLI CA (stranger_pki.sh), and a configuration
written the way docs/ and config/example.toml describe it, with paths relative to the configuration file.

The lab's PKI is made by our own code (`proxy.lab.pki`), so tests that use only it cannot see a certificate or
CRL encoding that our code never writes: RSA keys, UTF8String subjects with non-ASCII names, a certificate file
with openssl's text dump before its PEM block, several subjectAltNames with the UPN among them, CRLs written by
`openssl ca -gencrl` in PEM and DER, a PEM file holding several CRLs, a delta CRL. The KDC and the Exchange
stand-in are the lab's (a second LDAP-backed realm would prove nothing more about certificates).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, Gateway, free_port, start_gateway
from tests.integration.recorder import get_resuming

SCRIPT = REPO / "tests" / "integration" / "stranger_pki.sh"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stranger's PKI, made once for this file; a test that changes it works on a copy."""
    directory = tmp_path_factory.mktemp("stranger-pki")
    done = subprocess.run([str(SCRIPT), str(directory)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return directory


def _config(
    lab: LabLayout, directory: Path, pki: Path, *, intermediates: str, crls: str, identity: str = "", refresh: int = 60
) -> str:
    """A gateway configuration as a stranger writes it from config/example.toml: PKI paths relative to the file."""
    rel = Path(os.path.relpath(pki, directory))
    return f"""[listener]
bind = "127.0.0.1:{free_port()}"
certificate = "{rel / "server-chain.pem"}"
private_key = "{rel / "server.key"}"

[client_certificates]
trust_anchors = ["{rel / "root" / "cert.pem"}"]
intermediates = [{intermediates.format(rel=rel)}]
crls = [{crls.format(rel=rel)}]
crl_refresh_seconds = {refresh}
revocation = "require"

[identity]
source = "san-upn"
{identity}
[kerberos]
principal = "HTTP/proxy.lab.test@LAB.TEST"
keytab = "{lab.proxy_keytab}"
krb5_config = "{lab.krb5_conf}"

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:{lab.backend_port}"
spn = "HTTP/cas.lab.test"
"""


ISSUING = '"{rel}/issuing/cert.pem"'
DER_AND_PEM_CRLS = '"{rel}/issuing/crl.der", "{rel}/root/crl.pem"'


@pytest.fixture(scope="module")
def stranger_gateway(lab: LabLayout, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway trusting only the stranger's root, with its issuing CA and its CRLs (the issuing CA's in DER)."""
    directory = tmp_path_factory.mktemp("stranger-gateway")
    gw = start_gateway(lab, directory, _config(lab, directory, pki, intermediates=ISSUING, crls=DER_AND_PEM_CRLS))
    yield gw
    assert gw.stop() == 0


REFUSED = "127.0.0.5"  # the source address of the devices refused in the handshake: their lines are told apart


def _curl(pki: Path, gw: Gateway, user: str | None, path: str = "/owa/", *args: str) -> tuple[str, int, str]:
    """curl with the stranger's root as its trust and a user's certificate file as openssl ca wrote it (none for
    `user` None): (body, status, stderr); status 0 when no HTTP answer came."""
    users = pki / "users"
    argv = ["curl", "-sS", "--max-time", "60", "--cacert", str(pki / "root" / "cert.pem"), *args]
    if user is not None:
        argv += ["--cert", str(users / f"{user}.pem"), "--key", str(users / f"{user.removesuffix('-chain')}.key")]
    argv += ["-w", "\n%{http_code}", gw.url + path]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=90, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return body, int(code or 0), done.stderr


def test_a_user_of_an_openssl_made_pki_is_delegated_as_the_upn(pki: Path, stranger_gateway: Gateway) -> None:
    """An RSA user certificate from `openssl ca` (UTF8String non-ASCII subject, the UPN otherName among an e-mail,
    a DNS name and a URI, text before the PEM block) reaches the real acceptor as its UPN's principal; the summary
    line keeps the subject's non-ASCII name."""
    stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, "alice")
    assert code == 200, (body, err)
    assert json.loads(body)["principal"] == "alice@LAB.TEST"
    line = stranger_gateway.wait_event("request", upn="alice@lab.test")
    assert line["status"] == 200
    assert "CN=alice Ünïcode" in line["cert_subject"]
    assert "CN=Stränger Issuing CA 1" in line["cert_issuer"]
    assert line["revocation"] == "good"
    assert line["revocation_source"].endswith("issuing/crl.der")


def test_a_der_crl_from_openssl_ca_revokes(pki: Path, stranger_gateway: Gateway) -> None:
    """bob, revoked with `openssl ca -revoke` and listed in a DER CRL from `-gencrl`, gets 403 naming the
    revocation; carol, on no CRL, is served."""
    body, code, _ = _curl(pki, stranger_gateway, "bob")
    assert code == 403
    assert "revoked" in body
    assert "keyCompromise" in body
    body, code, _ = _curl(pki, stranger_gateway, "carol")
    assert code == 200, body
    assert json.loads(body)["principal"] == "carol@LAB.TEST"


def test_a_pem_file_of_several_crls_is_read_whole(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """`crls` naming one PEM file with the root's and the issuing CA's CRLs (cat'ed): both are read, so bob is
    refused as revoked (not as 'no current CRL') and alice is served."""
    gw = start_gateway(lab, tmp_path, _config(lab, tmp_path, pki, intermediates=ISSUING, crls='"{rel}/crls.pem"'))
    try:
        assert len(gw.events("crl_loaded")) == 2
        body, code, _ = _curl(pki, gw, "bob")
        assert code == 403
        assert "was revoked" in body
        assert _curl(pki, gw, "alice")[1] == 200
    finally:
        assert gw.stop() == 0


def test_a_delta_crl_from_openssl_ca_is_honoured(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """A delta CRL (deltaCRLIndicator = base CRL 1) made by `openssl ca -gencrl` after carol's revocation, beside
    the complete CRL 1 that does not list her: carol is refused as revoked, alice is served."""
    ca = tmp_path / "pki"
    shutil.copytree(pki, ca)
    for step in (
        ["-revoke", "users/carol.pem", "-crl_reason", "keyCompromise"],
        ["-gencrl", "-crlexts", "delta_ext", "-out", "issuing/delta.pem"],
    ):
        argv = ["openssl", "ca", "-batch", "-config", "openssl.cnf", "-name", "issuing", *step]
        env = {**os.environ, "UPN": "unused", "NAME": "unused"}  # the config's user section reads them
        done = subprocess.run(argv, cwd=ca, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    crls = DER_AND_PEM_CRLS + ', "{rel}/issuing/delta.pem"'
    gw = start_gateway(lab, tmp_path / "gw", _config(lab, tmp_path / "gw", ca, intermediates=ISSUING, crls=crls))
    try:
        assert [e["delta"] for e in gw.events("crl_loaded")].count(True) == 1
        body, code, _ = _curl(ca, gw, "carol")
        assert code == 403, body
        assert "was revoked" in body
        assert _curl(ca, gw, "alice")[1] == 200
    finally:
        assert gw.stop() == 0


def test_an_intermediate_the_device_sends_is_never_used(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """Chains are built from the configured CAs only: with no intermediates configured, a device that sends its
    issuing CA along with its certificate is refused (TLS alert or 403), and nothing reaches the backend."""
    gw = start_gateway(lab, tmp_path, _config(lab, tmp_path, pki, intermediates="", crls=DER_AND_PEM_CRLS))
    try:
        gw.mark()
        body, code, _ = _curl(pki, gw, "alice-chain")
        assert code != 200, body
        if code:
            assert code == 403
            assert "not in the trust list" in body
        refusal = gw.wait_for(
            "request", lambda e: e.get("refused_stage") == "certificate", what="a refusal at the certificate stage"
        )
        assert "principal" not in refusal
    finally:
        assert gw.stop() == 0


def test_realm_map_maps_a_upn_suffix_to_the_realm(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """`identity.realm_map = { "corp.example" = "LAB.TEST" }`: a UPN alice@corp.example is delegated as
    alice@LAB.TEST (issue 3's realm mapping); issue 14: a suffix with a non-ASCII letter is served when realm_map
    names it (`bücher.example`, the certificate's `Bücher.example` compared with ASCII case ignored only)."""
    identity = 'realm_map = { "corp.example" = "LAB.TEST", "bücher.example" = "LAB.TEST" }\n'
    gw = start_gateway(
        lab, tmp_path, _config(lab, tmp_path, pki, intermediates=ISSUING, crls=DER_AND_PEM_CRLS, identity=identity)
    )
    try:
        body, code, err = _curl(pki, gw, "alice-corp")
        assert code == 200, (body, err)
        assert json.loads(body)["principal"] == "alice@LAB.TEST"
        line = gw.wait_event("request", upn="alice@corp.example")
        assert line["principal"] == "alice@LAB.TEST"
        body, code, err = _curl(pki, gw, "alice-idn")
        assert code == 200, (body, err)
        assert json.loads(body)["principal"] == "alice@LAB.TEST"
    finally:
        assert gw.stop() == 0


def test_a_non_ascii_upn_suffix_no_realm_map_names_is_refused(pki: Path, stranger_gateway: Gateway) -> None:
    """Issue 14: UPN suffixes are mapped with ASCII case only; alice@Bücher.example, whose suffix no realm_map
    names, is 403 at the identity stage (never `BÜCHER.EXAMPLE` built by Unicode upper-casing)."""
    stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, "alice-idn")
    assert code == 403, (body, err)
    assert "not ASCII" in body
    line = stranger_gateway.wait_event("request", refused_stage="identity")
    assert "principal" not in line


def test_restrictions_as_issue_5_writes_them_on_openssl_made_certificates(
    lab: LabLayout, pki: Path, tmp_path: Path
) -> None:
    """Issue 5's `[[client_certificates.restrictions]]` on certificates `openssl ca` made: a rule of issuer (as
    `openssl x509 -issuer -nameopt RFC2253` prints it, its UTF-8 escaped), subject glob and EKU OIDs admits alice; a
    rule naming AD CS's v1 template (the BMPString `User`, any case) and one naming the v2 template's OID (openssl's
    `ASN1:SEQUENCE`) admit carol's certificate from each template; carol's plain certificate matches none: 403 at
    the certificate stage naming the rule set and its rules, nothing delegated."""
    printed = subprocess.run(
        ["openssl", "x509", "-in", str(pki / "users" / "alice.pem"), "-noout", "-issuer", "-nameopt", "RFC2253"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    issuer = printed.removeprefix("issuer=")
    assert "\\C3\\A4" in issuer, issuer  # Stränger, escaped as RFC 4514 allows
    rules = f"""
[[client_certificates.restrictions]]
name = "stranger devices"
issuer = '{issuer}'
subject = "*CN=alice *"
eku = ["1.3.6.1.5.5.7.3.2", "1.3.6.1.5.5.7.3.4"]

[[client_certificates.restrictions]]
name = "template v1"
extension = {{ oid = "1.3.6.1.4.1.311.20.2", value = "user" }}

[[client_certificates.restrictions]]
name = "template v2"
extension = {{ oid = "1.3.6.1.4.1.311.21.7", value = "1.3.6.1.4.1.311.21.8.4242.1" }}
"""
    text = _config(lab, tmp_path, pki, intermediates=ISSUING, crls=DER_AND_PEM_CRLS)
    text = text.replace("\n[identity]", rules + "\n[identity]", 1)
    assert "template v2" in text
    gw = start_gateway(lab, tmp_path, text)
    try:
        admitted = {"alice": ("alice@LAB.TEST", "stranger devices")}
        admitted |= {f"template-{v}": ("carol@LAB.TEST", f"template {v}") for v in ("v1", "v2")}
        for user, (principal, rule) in admitted.items():
            gw.mark()
            body, code, err = _curl(pki, gw, user)
            assert code == 200, (user, body, err)
            assert json.loads(body)["principal"] == principal
            assert gw.wait_event("request", principal=principal, status=200)["restriction"] == rule
        gw.mark()
        body, code, err = _curl(pki, gw, "carol", "/owa/", "-D", "-")
        assert code == 403, (body, err)
        assert "x-kcd-refused-stage: certificate" in body.lower()
        assert "not admitted by client_certificates.restrictions" in body
        assert "(rules: stranger devices, template v1, template v2)" in body
        refusal = gw.wait_for("request", lambda e: e.get("refused_stage") == "certificate", what="carol's refusal")
        assert "principal" not in refusal
    finally:
        assert gw.stop() == 0


def test_a_resumed_tls_session_of_a_revoked_certificate_is_refused(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """Issue 4: revocation is decided per request, a resumed TLS session included. carol's session is resumed
    (no certificate sent again) after `openssl ca -revoke` and `-gencrl` rewrote the CRL file: refused within
    crl_refresh_seconds + 5 s, on a resumed session."""
    ca = tmp_path / "pki"
    shutil.copytree(pki, ca)
    crls = '"{rel}/issuing/crl.pem", "{rel}/root/crl.pem"'
    text = _config(lab, tmp_path / "gw", ca, intermediates=ISSUING, crls=crls, refresh=1)
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        context = ssl.create_default_context(cafile=str(ca / "root" / "cert.pem"))
        context.load_cert_chain(ca / "users" / "carol.pem", ca / "users" / "carol.key")
        status, _, session = get_resuming(context, gw.port)
        assert status == 200
        assert session is not None
        status, resumed, session = get_resuming(context, gw.port, session)
        assert (status, resumed) == (200, True)  # the gateway does resume sessions
        env = {**os.environ, "UPN": "unused", "NAME": "unused"}
        for step in (
            ["-revoke", "users/carol.pem", "-crl_reason", "keyCompromise"],
            ["-gencrl", "-crlexts", "crl_ext", "-out", "issuing/crl.new"],
        ):
            argv = ["openssl", "ca", "-batch", "-config", "openssl.cnf", "-name", "issuing", *step]
            done = subprocess.run(argv, cwd=ca, env=env, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
        (ca / "issuing" / "crl.new").replace(ca / "issuing" / "crl.pem")  # published whole, at once
        published = time.monotonic()
        while True:
            status, resumed, session = get_resuming(context, gw.port, session)
            assert resumed
            if status != 200:
                break
            assert time.monotonic() - published < 1 + 5, "a resumed session was still served after the interval"
            time.sleep(0.1)
        assert status == 403
    finally:
        assert gw.stop() == 0


def test_der_trust_anchor_and_intermediate_files_are_accepted(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """config/example.toml: a trust anchor file may be a PEM bundle or DER. With the stranger's root and issuing
    CA as DER files the gateway starts and delegates alice (it used to die at start-up with an uncaught
    NO_CERTIFICATE_OR_CRL_FOUND from the TLS layer)."""
    text = _config(lab, tmp_path, pki, intermediates='"{rel}/issuing/cert.der"', crls=DER_AND_PEM_CRLS)
    text = text.replace("root/cert.pem", "root/cert.der")
    assert "root/cert.der" in text
    gw = start_gateway(lab, tmp_path, text)
    try:
        body, code, err = _curl(pki, gw, "alice")
        assert code == 200, (body, err)
        assert json.loads(body)["principal"] == "alice@LAB.TEST"
        assert _curl(pki, gw, "bob")[1] == 403
    finally:
        assert gw.stop() == 0


def test_an_issuing_ca_as_the_only_trust_anchor(lab: LabLayout, pki: Path, tmp_path: Path) -> None:
    """Trusting one issuing CA of a larger PKI (its certificate as the trust anchor, no root): `explain` accepts
    alice's certificate with it as the anchor, and so does the running gateway's handshake (which used to refuse
    it, 'unable to get issuer certificate', as OpenSSL wants a self-signed root unless told otherwise)."""
    text = _config(lab, tmp_path, pki, intermediates="", crls=DER_AND_PEM_CRLS)
    text = text.replace("root/cert.pem", "issuing/cert.pem")
    gw = start_gateway(lab, tmp_path, text)
    try:
        body, code, err = _curl(pki, gw, "alice")
        assert code == 200, (body, err)
        assert json.loads(body)["principal"] == "alice@LAB.TEST"
        assert _curl(pki, gw, "bob")[1] == 403  # the issuing CA's CRL still applies
    finally:
        assert gw.stop() == 0


def test_a_certificate_with_two_upns_is_refused(pki: Path, stranger_gateway: Gateway) -> None:
    """A certificate naming two UPNs (carol's, then alice's) is refused with 403 at the identity stage; neither
    user is delegated."""
    stranger_gateway.mark()
    body, code, _ = _curl(pki, stranger_gateway, "twoupns")
    assert code == 403, body
    assert "2 UPNs" in body
    line = stranger_gateway.wait_event("request", refused_stage="identity")
    assert "principal" not in line


EXPLAIN_KEYS = {"accepted", "stage", "reason", "upn", "principal", "route", "spn"}  # issue #8's object


@pytest.mark.parametrize(
    ("cert", "args", "code", "stage", "reason"),
    [
        ("users/alice.pem", ("--path", "/Microsoft-Server-ActiveSync"), 0, None, None),
        ("users/bob.pem", (), 1, "revocation", "was revoked on"),
        ("users/twoupns.pem", (), 1, "identity", "2 UPNs"),
        ("users/alice.pem", ("--at", "2099-01-01T00:00:00Z"), 1, "certificate", "expired"),
        ("server.pem", (), 1, "certificate", ""),  # serverAuth only: no clientAuth EKU
        ("{lab}/users/alice.pem", (), 1, "certificate", ""),  # another CA (the lab's)
        ("users/nosigning.pem", (), 1, "certificate", "key usage lacks digitalSignature"),
        ("users/nsserver.pem", (), 1, "certificate", "Netscape certificate type does not include SSL client"),
        ("users/nslongserver.pem", (), 1, "certificate", "Netscape certificate type does not include SSL client"),
        ("users/rogue.pem", (), 1, "certificate", "signature does not verify"),  # the trusted CA's name, another key
    ],
    ids=[
        "accepted",
        "revoked",
        "two upns",
        "expired then",
        "no clientAuth",
        "untrusted",
        "key usage",
        "netscape type",
        "long netscape type",
        "signature",
    ],
)
def test_explain_json_on_openssl_made_certificates(
    lab: LabLayout,
    pki: Path,
    tmp_path: Path,
    cert: str,
    args: tuple[str, ...],
    code: int,
    stage: str | None,
    reason: str,
) -> None:
    """Issue 8: `kcd-proxy explain --config FILE --cert CERT.pem --json` on certificates `openssl ca` made: one JSON
    object with the issue's keys, `stage` where a request would stop (null when accepted), exit 0 or 1; "certificate"
    covers, as the issue lists, chain building, signatures, validity, key usage and EKU."""
    config = tmp_path / "gateway.toml"
    config.write_text(_config(lab, tmp_path, pki, intermediates=ISSUING, crls=DER_AND_PEM_CRLS))
    path = Path(cert.format(lab=lab.pki_dir)) if cert.startswith("{") else pki / cert
    command = Path(sys.executable).parent / "kcd-proxy"  # the command as installed, as an operator types it
    argv = [str(command), "explain", "--config", str(config), "--cert", str(path), "--json", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == code, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1, done.stdout  # one object, on one line
    answer = json.loads(done.stdout)
    assert set(answer) >= EXPLAIN_KEYS, answer
    assert (answer["accepted"], answer["stage"]) == (code == 0, stage)
    if code == 0:
        assert answer["reason"] is None
        assert (answer["upn"], answer["principal"]) == ("alice@lab.test", "alice@LAB.TEST")
        assert (answer["route"], answer["spn"]) == ("/", "HTTP/cas.lab.test")
    else:
        assert reason in answer["reason"], answer
        assert answer["reason"]


def test_explain_json_stops_at_revocation_without_a_current_crl_under_require(
    lab: LabLayout, pki: Path, tmp_path: Path
) -> None:
    """Issue 8: "revocation" is also the stage of a missing CRL under `revocation = "require"`: only the root's CRL
    configured, alice's issuing CA has none; `explain --json` exits 1 at stage "revocation" with the reason."""
    config = tmp_path / "gateway.toml"
    config.write_text(_config(lab, tmp_path, pki, intermediates=ISSUING, crls='"{rel}/root/crl.pem"'))
    command = Path(sys.executable).parent / "kcd-proxy"
    argv = [str(command), "explain", "--config", str(config), "--cert", str(pki / "users" / "alice.pem"), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert (answer["accepted"], answer["stage"]) == (False, "revocation"), answer
    assert answer["reason"], answer


@pytest.mark.parametrize(
    ("user", "curl_says", "reason_in_log"),
    [
        (None, "alert certificate required", "peer did not return a certificate"),
        ("expired", "alert certificate expired", "certificate has expired"),
        ("notyet", "alert bad certificate", "certificate is not yet valid"),  # OpenSSL's alert; the log names it
        ("rogue-chain", "alert decrypt error", "certificate signature failure"),
        ("serverauth", "alert unsupported certificate", "unsuitable certificate purpose"),
    ],
)
@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_openssl_made_certificates_issue_3_refuses_in_the_handshake(
    pki: Path, stranger_gateway: Gateway, user: str | None, curl_says: str, reason_in_log: str, tls: str
) -> None:
    """Issue 3's handshake refusals with certificates `openssl ca` and `openssl x509` made: none, expired, not yet
    valid, a rogue CA pair copying the trusted root's and issuing CA's names byte for byte (its leaf has no key
    identifier, so the names alone point at the trusted CA), serverAuth only: curl (TLS 1.3, and 1.2) receives the
    TLS alert naming it, the gateway logs why, and no request line follows. TLS 1.2 has no `certificate required`:
    OpenSSL sends `handshake failure` there (README)."""
    if tls == "1.2" and user is None:
        curl_says = "alert handshake failure"
    mark = stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, user, "/owa/", "--tls-max", tls, "-v", "--interface", REFUSED)
    assert code == 0, body
    alert = curl_says.removeprefix("alert ")  # curl's error names it, or (TLS 1.2) only -v's "TLS alert, <name>"
    assert f"alert {alert}" in err.lower() or f"tls alert, {alert}" in err.lower(), err
    stranger_gateway.wait_for(
        "tls_handshake_refused",
        lambda e: reason_in_log in e["reason"].lower() and e["peer"].startswith(f"{REFUSED}:"),
        what=reason_in_log,
    )
    # this device's: another test's 200 for alice (from 127.0.0.1) can be logged just after the mark
    assert not [e for e in stranger_gateway.events("request", after=mark) if e.get("client") == REFUSED]


@pytest.mark.parametrize(
    ("user", "in_fix"), [("nosigning", "key usage lacks digitalSignature"), ("nsserver", "Netscape certificate type")]
)
def test_a_usage_other_than_the_eku_ends_the_handshake_with_its_own_fix(
    pki: Path, stranger_gateway: Gateway, user: str, in_fix: str
) -> None:
    """`openssl ca` certificates with clientAuth that OpenSSL's client-purpose check still refuses: a key usage of
    keyEncipherment alone (the device's key may not sign, and a TLS client signs the handshake), and a Netscape
    certificate type of a server only. curl gets OpenSSL's `unsupported certificate` alert, and the log's fix names
    what fails, as `explain` does, not the clientAuth EKU the certificate has (OpenSSL gives one reason, "unsuitable
    certificate purpose", for all three; the fix told the administrator to add an EKU it already had)."""
    mark = stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, user, "/owa/", "--interface", REFUSED)
    assert code == 0, body
    assert "alert unsupported certificate" in err.lower(), err
    line = stranger_gateway.wait_for(
        "tls_handshake_refused",
        lambda e: e["peer"].startswith(f"{REFUSED}:") and e.get("certificate") == f"CN={user}",
        what=f"{user}'s refusal",
    )
    assert line["reason"] == "unsuitable certificate purpose", line
    assert in_fix in line["fix"], line
    assert "lacks the clientAuth" not in line["fix"], line
    assert not [e for e in stranger_gateway.events("request", after=mark) if e.get("client") == REFUSED]


def test_a_long_netscape_certificate_type_gets_the_handshakes_verdict(pki: Path, stranger_gateway: Gateway) -> None:
    """`openssl ca` certificates whose Netscape certificate type is a BIT STRING of 128 or 384 bytes (a long-form
    length): the SSL client one, which OpenSSL's handshake passes, is delegated as alice (it was refused with 403 at
    the certificate stage, "does not include SSL client": its first byte was read at a fixed offset, a length byte
    here); the server-only one gets the handshake's alert, and no request."""
    body, code, err = _curl(pki, stranger_gateway, "nslongclient")
    assert code == 200, (body, err)
    assert json.loads(body)["principal"] == "alice@LAB.TEST"
    mark = stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, "nslongserver", "/owa/", "--interface", REFUSED)
    assert code == 0, body
    assert "alert unsupported certificate" in err.lower(), err
    assert not [e for e in stranger_gateway.events("request", after=mark) if e.get("client") == REFUSED]


@pytest.mark.parametrize(
    ("user", "stage", "reason"),
    [
        ("noeku", "certificate", "extended key usage"),
        ("noupn", "identity", "no user principal name"),
    ],
)
def test_openssl_made_certificates_issue_3_refuses_with_403(
    pki: Path, stranger_gateway: Gateway, user: str, stage: str, reason: str
) -> None:
    """Issue 3's per-request refusals with `openssl ca` certificates: one with no EKU at all (OpenSSL's handshake
    takes it; the certificate stage does not) and one whose only names are an e-mail address and a DNS name (no
    UPN): 403 with a plain-text reason and the refusing stage, never delegated."""
    stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, user, "/owa/", "-D", "-")
    assert code == 403, (body, err)
    assert reason in body.lower()
    assert f"x-kcd-refused-stage: {stage}" in body.lower()
    assert "text/plain" in body.lower()
    line = stranger_gateway.wait_event("request", refused_stage=stage)
    assert line["status"] == 403
    assert "principal" not in line


def test_without_realm_map_the_upn_suffix_upper_cased_is_the_realm(pki: Path, stranger_gateway: Gateway) -> None:
    """Issue 3: `realm_map`'s default is the UPN suffix upper-cased. Without one, alice@corp.example is asked for
    as alice@CORP.EXAMPLE, a realm no KDC here serves: 403 at the kerberos stage naming the suffix, never
    alice@LAB.TEST."""
    stranger_gateway.mark()
    body, code, err = _curl(pki, stranger_gateway, "alice-corp")
    assert code == 403, (body, err)
    line = stranger_gateway.wait_event("request", upn="alice@corp.example")
    assert line["principal"] == "alice@CORP.EXAMPLE"
    assert line["refused_stage"] == "kerberos"
    assert "no Kerberos realm serves alice@CORP.EXAMPLE's UPN suffix" in body
