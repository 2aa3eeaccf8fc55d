"""Authentication modes, identity sources and certificate restrictions, end to end against the lab.

Each configuration runs as a real `kcd-proxy run` process; clients are curl, with and without a lab
user certificate and with and without `-u user:password`. The KDC's own log is the witness for what
reached the KDC (one line per AS_REQ / TGS_REQ).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ

from proxy.identity.upn import upn_other_name
from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway

ALICE = f"alice:{USERS['alice']}"
# basic_failure_window_seconds where a held user's next call must come within it: 0.2 s after the second failure
# when seen on a loaded machine, but a test or curl descheduled for 2 s ended a 2 s window before it
HOLD_WINDOW = 6
TEMPLATE_OID = "1.3.6.1.4.1.311.21.7"  # Microsoft certificate template (v2): SEQUENCE { template OID, major, minor }
TEMPLATE_ID = "1.3.6.1.4.1.311.21.8.4242.1"


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all (the TLS handshake failed)
    headers: dict[str, str]  # lower-case names
    body: str
    error: str

    def json(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.body)
        return data


def call(lab: LabLayout, gw: Gateway, path: str, *, cert: str | None = None, login: str | None = None) -> Answer:
    """curl as a device: the lab root as trust, optionally a user certificate and `-u user:password`. The gateway's
    log is marked first: `summary` then finds this request's line, never an older one for the same user."""
    gw.mark()
    cmd = ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem"), "-D", "/dev/stderr"]
    if cert is not None:
        cmd += ["--cert", str(_cert_path(lab, cert)), "--key", str(_cert_path(lab, cert).with_suffix(".key"))]
    if login is not None:
        cmd += ["-u", login]
    argv = [*cmd, "-w", "\n%{http_code}", gw.url + path]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    body, _, code = res.stdout.rpartition("\n")
    headers = {}
    for line in res.stderr.splitlines():
        name, colon, value = line.partition(":")
        if colon and " " not in name:
            headers[name.strip().lower()] = value.strip()
    return Answer(int(code or 0), headers, body, res.stderr)


def _cert_path(lab: LabLayout, cert: str) -> Path:
    path = Path(cert)
    return path if path.is_absolute() else lab.pki_dir / "users" / f"{cert}.pem"


def kdc_requests(lab: LabLayout, principal: str) -> list[str]:
    """The KDC's log lines for AS and TGS requests that name `principal` (as client or, escaped, enterprise)."""
    lines = lab.kdc_log.read_text(errors="replace").splitlines()
    return [line for line in lines if ("AS_REQ" in line or "TGS_REQ" in line) and principal in line]


def s4u_lines(lab: LabLayout, principal: str) -> list[str]:
    """The KDC's log lines saying it did S4U2Self (PROTOCOL-TRANSITION) or S4U2Proxy (CONSTRAINED-DELEGATION) for
    `principal` (MIT writes them on lines of their own, after the TGS_REQ's)."""
    marks = (f"PROTOCOL-TRANSITION s4u-client={principal}", f"CONSTRAINED-DELEGATION s4u-client={principal}")
    lines = lab.kdc_log.read_text(errors="replace").splitlines()
    return [line for line in lines if any(mark in line for mark in marks)]


def gateway_with(lab: LabLayout, directory: Path, *, identity: str = "", extra: str = "") -> Gateway:
    text = lab_config(lab, port=free_port(), extra=extra)
    if identity:
        text = text.replace('source = "san-upn"\n', identity + "\n", 1)
    return start_gateway(lab, directory, text)


def summary(gw: Gateway, **match: Any) -> dict[str, Any]:
    """The summary line matching `match` of the last `call` to `gw`."""
    return gw.wait_event("request", **match)


# -- a backend that takes Basic itself ------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_backend() -> Iterator[str]:
    """An upstream standing in for a Basic-only site: it answers with the Authorization header it got."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"authorization": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    port = free_port()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


# -- certificate-or-basic -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def either(lab: LabLayout, basic_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    extra = f"""
[[routes]]
prefix = "/basic/"
upstream = "{basic_backend}"
backend_auth = "basic"

[authentication]
mode = "certificate-or-basic"
basic_realm = "Lab Exchange"
basic_failures_per_user = 100
basic_failures_per_address = 1000
"""
    gw = gateway_with(lab, tmp_path_factory.mktemp("either"), extra=extra)
    yield gw
    gw.stop()


def test_curl_with_password_and_no_certificate_is_served_with_the_users_own_ticket(
    lab: LabLayout, either: Gateway
) -> None:
    """certificate-or-basic: `curl -u alice:...` without a certificate reaches the backend as alice via Negotiate,
    from her own ticket: the KDC's log shows no S4U2Self or S4U2Proxy for her meanwhile (issue 5: "no S4U")."""
    before = s4u_lines(lab, "alice@LAB.TEST")
    answer = call(lab, either, "/Microsoft-Server-ActiveSync?Cmd=Sync", login=ALICE)
    assert answer.status == 200, answer
    echo = answer.json()
    assert (echo["principal"], echo["auth_type"]) == ("alice@LAB.TEST", "Negotiate")
    event = summary(either, principal="alice@LAB.TEST", factors="password")
    assert event["status"] == 200
    assert "impersonation_cached" not in event  # no S4U on this path
    assert s4u_lines(lab, "alice@LAB.TEST") == before


def test_no_certificate_and_no_password_gets_the_basic_challenge(lab: LabLayout, either: Gateway) -> None:
    """Without a certificate the gateway answers 401 with WWW-Authenticate: Basic and the configured realm."""
    answer = call(lab, either, "/owa/")
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == 'Basic realm="Lab Exchange"'


@pytest.mark.parametrize(
    ("login", "status"),
    [("alice:not-her-password", 401), ("nobody:whatever", 401), ("dave:dave-Pa55", 403), ("dave:wrong", 403)],
    ids=["wrong-password", "unknown-user", "disabled-user", "disabled-user-wrong-password"],
)
def test_refused_logins(lab: LabLayout, either: Gateway, login: str, status: int) -> None:
    """Wrong password and unknown user: 401 with the challenge again (never 502); a disabled account: 403."""
    answer = call(lab, either, "/EWS/Exchange.asmx", login=login)
    assert answer.status == status, answer
    assert ("www-authenticate" in answer.headers) == (status == 401)


def test_certificate_user_is_still_delegated(lab: LabLayout, either: Gateway) -> None:
    """With a valid certificate, certificate-or-basic delegates as certificate mode does, asking for no password."""
    answer = call(lab, either, "/EWS/Exchange.asmx", cert="bob")
    assert answer.status == 200, answer
    assert answer.json()["principal"] == "bob@LAB.TEST"
    assert "impersonation_cached" in summary(either, principal="bob@LAB.TEST", factors="certificate")


def test_invalid_certificate_does_not_fall_back_to_the_password(lab: LabLayout, either: Gateway) -> None:
    """An expired certificate ends the handshake even when good Basic credentials come with it."""
    answer = call(lab, either, "/owa/", cert="expired", login=ALICE)
    assert answer.status == 0
    assert "expired" in answer.error


def test_basic_header_reaches_only_routes_that_ask_for_it(lab: LabLayout, either: Gateway) -> None:
    """backend_auth = "basic" forwards the client's Basic header as sent; other routes get Negotiate only."""
    answer = call(lab, either, "/basic/x", login=ALICE)
    assert answer.status == 200, answer
    assert answer.json()["authorization"] == "Basic " + base64.b64encode(ALICE.encode()).decode()
    answer = call(lab, either, "/owa/", login=ALICE)
    assert answer.json()["auth_type"] == "Negotiate"


def test_certificate_user_on_a_basic_route_is_asked_for_the_matching_password(lab: LabLayout, either: Gateway) -> None:
    """A Basic-only route needs the password even from a certificate user, and it must be the same user's."""
    assert call(lab, either, "/basic/x", cert="alice").status == 401
    assert call(lab, either, "/basic/x", cert="alice", login=f"bob:{USERS['bob']}").status == 403
    answer = call(lab, either, "/basic/x", cert="alice", login=ALICE)
    assert answer.status == 200, answer
    assert summary(either, principal="alice@LAB.TEST", factors="certificate+password")["route"] == "/basic/"


def test_verified_password_is_cached_and_kept_through_a_wrong_guess(lab: LabLayout, either: Gateway) -> None:
    """Steady polling with one password costs one AS exchange; a wrong password from someone else is checked
    with the KDC but does not drop the verified one (a guess is not a re-verification)."""
    login = f"carol:{USERS['carol']}"
    before = len(kdc_requests(lab, "carol@LAB.TEST"))
    assert call(lab, either, "/Microsoft-Server-ActiveSync", login=login).status == 200
    first = len(kdc_requests(lab, "carol@LAB.TEST"))
    assert first > before  # the AS exchange (and the TGS request for the backend)
    for _ in range(5):
        assert call(lab, either, "/Microsoft-Server-ActiveSync", login=login).status == 200
    assert len(kdc_requests(lab, "carol@LAB.TEST")) == first
    assert summary(either, principal="carol@LAB.TEST", basic_cached=True)["status"] == 200

    assert call(lab, either, "/Microsoft-Server-ActiveSync", login="carol:guess").status == 401
    after_failure = len(kdc_requests(lab, "carol@LAB.TEST"))
    assert after_failure > first  # the guess was checked with the KDC
    assert call(lab, either, "/Microsoft-Server-ActiveSync", login=login).status == 200
    assert len(kdc_requests(lab, "carol@LAB.TEST")) == after_failure  # still served from the cache


# -- basic ----------------------------------------------------------------------------------------------


def basic_gateway(
    lab: LabLayout, directory: Path, per_user: int = 5, per_address: int = 20, window: float = 1800
) -> Gateway:
    extra = f"""
[authentication]
mode = "basic"
basic_failures_per_user = {per_user}
basic_failures_per_address = {per_address}
basic_failure_window_seconds = {window}
"""
    return gateway_with(lab, directory, extra=extra)


def test_basic_mode_ignores_certificates(lab: LabLayout, tmp_path: Path) -> None:
    """basic: no certificate is asked for (a client's is not used), and a password is what gets in."""
    gw = basic_gateway(lab, tmp_path)
    try:
        assert call(lab, gw, "/owa/", cert="alice").status == 401
        answer = call(lab, gw, "/owa/", login="LAB\\bob:" + USERS["bob"])  # the down-level form devices send
        assert answer.status == 200, answer
        assert answer.json()["principal"] == "bob@LAB.TEST"
        assert "cert_subject" not in summary(gw, principal="bob@LAB.TEST")
    finally:
        gw.stop()


def test_basic_names_of_an_unconfigured_domain_never_reach_the_kdc(lab: LabLayout, tmp_path: Path) -> None:
    """EVIL\\bob and bob@evil.test with bob's own password: 401 saying the domain is not one the gateway signs in to
    (naming no domain: a password typed as a name may hold an '@'), an authentication_required line naming the
    domain shortened like the name and saying what is accepted, and the KDC's log shows no request for bob
    (EVIL\\bob was served as bob@LAB.TEST); the realm's own name and its NetBIOS name still sign in."""
    gw = basic_gateway(lab, tmp_path)
    try:
        before = len(kdc_requests(lab, "bob@LAB.TEST"))
        for name, shown in (("EVIL\\bob", "E…[4]\\b…[3]"), ("bob@evil.test", "b…[3]@e…[9]")):
            gw.mark()
            refused = call(lab, gw, "/owa/", login=f"{name}:{USERS['bob']}")
            assert refused.status == 401, refused
            assert "the domain of the user name is not one this gateway signs in to" in refused.body
            assert refused.headers["www-authenticate"].startswith("Basic ")
            event = gw.wait_event("authentication_required")
            assert "the domain of the user name" in event["reason"]
            assert f"Basic user {shown}: " in event["fix"]
            assert "identity.realm_map" in event["fix"]
        assert len(kdc_requests(lab, "bob@LAB.TEST")) == before
        for name in ("LAB.TEST\\bob", "lab\\bob"):
            answer = call(lab, gw, "/owa/", login=f"{name}:{USERS['bob']}")
            assert answer.status == 200, answer
            assert answer.json()["principal"] == "bob@LAB.TEST"
    finally:
        gw.stop()


def test_repeated_failures_for_a_user_are_refused_without_the_kdc(lab: LabLayout, tmp_path: Path) -> None:
    """After basic_failures_per_user failures the user gets 429 + Retry-After for the rest of
    basic_failure_window_seconds, even with the right password when the KDC never accepted it here (no device of
    bob's signed in); a disabled account's 403s are not guesses and do not count."""
    gw = basic_gateway(lab, tmp_path, per_user=2, per_address=3, window=HOLD_WINDOW)
    try:
        assert [call(lab, gw, "/owa/", login="dave:guess").status for _ in range(4)] == [403] * 4
        assert [call(lab, gw, "/owa/", login="bob:nope").status for _ in range(2)] == [401, 401]
        failed = time.monotonic()  # the second failure was counted before its answer: held until then + the window
        before = len(kdc_requests(lab, "bob@LAB.TEST"))
        refused = call(lab, gw, "/owa/", login=f"bob:{USERS['bob']}")
        assert refused.status == 429
        assert 1 <= int(refused.headers["retry-after"]) <= HOLD_WINDOW  # the window's rest
        assert len(kdc_requests(lab, "bob@LAB.TEST")) == before
        assert call(lab, gw, "/owa/", login=ALICE).status == 200  # other users are not affected
        time.sleep(max(0.0, failed + HOLD_WINDOW - time.monotonic()) + 0.1)  # the scenario: the window is over
        assert call(lab, gw, "/owa/", login=f"bob:{USERS['bob']}").status == 200
    finally:
        gw.stop()


def test_repeated_failures_from_an_address_are_refused(lab: LabLayout, tmp_path: Path) -> None:
    """Password spraying: failures for different users from one address reach basic_failures_per_address; the
    address then gets 429 with `Retry-After: 1` (the first step of 1, 2, 4 ... s)."""
    gw = basic_gateway(lab, tmp_path, per_user=10, per_address=3)
    try:
        assert call(lab, gw, "/owa/", login=ALICE).status == 200  # cached before the spraying starts
        assert [call(lab, gw, "/owa/", login=f"{u}:spray").status for u in ("bob", "carol", "ghost")] == [401] * 3
        refused = call(lab, gw, "/owa/", login=f"carol:{USERS['carol']}")
        assert refused.status == 429
        assert refused.headers["retry-after"] == "1"
        assert call(lab, gw, "/owa/", login=ALICE).status == 200  # a cached, verified password still works
    finally:
        gw.stop()


# -- certificate-and-basic ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def both(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = gateway_with(
        lab, tmp_path_factory.mktemp("both"), extra='\n[authentication]\nmode = "certificate-and-basic"\n'
    )
    yield gw
    gw.stop()


def test_certificate_and_password_of_the_same_user_are_served(lab: LabLayout, both: Gateway) -> None:
    """certificate-and-basic: alice's certificate and alice's password together get through."""
    answer = call(lab, both, "/EWS/Exchange.asmx", cert="alice", login=ALICE)
    assert answer.status == 200, answer
    assert answer.json()["principal"] == "alice@LAB.TEST"
    assert summary(both, principal="alice@LAB.TEST", factors="certificate+password")["status"] == 200


@pytest.mark.parametrize(
    ("cert", "login", "status"),
    [
        ("alice", f"bob:{USERS['bob']}", 403),  # two proofs, two different users
        ("alice", None, 403),  # no password
        (None, ALICE, 403),  # no certificate
        ("alice", "alice:wrong", 401),  # a wrong password is still a wrong password
        ("dave", "dave:dave-Pa55", 403),  # disabled
    ],
    ids=["identities-differ", "no-password", "no-certificate", "wrong-password", "disabled"],
)
def test_certificate_and_basic_refusals(
    lab: LabLayout, both: Gateway, cert: str | None, login: str | None, status: int
) -> None:
    """certificate-and-basic: a missing proof or a mismatch is 403; a missing password still names Basic."""
    answer = call(lab, both, "/owa/", cert=cert, login=login)
    assert answer.status == status, answer
    if login is None:
        assert answer.headers["www-authenticate"].startswith("Basic realm=")


# -- identity sources ------------------------------------------------------------------------------------


def test_first_present_identity_source_wins(lab: LabLayout, tmp_path: Path) -> None:
    """source = [san-upn, san-email]: the UPN where there is one, else the e-mail address."""
    gw = gateway_with(lab, tmp_path, identity='source = ["san-upn", "san-email"]')
    try:
        assert call(lab, gw, "/owa/", cert="alice").status == 200
        assert summary(gw, principal="alice@LAB.TEST")["identity_source"] == "san-upn"
        answer = call(lab, gw, "/owa/", cert="noupn")  # heidi@lab.test: the CA vouches, the KDC does not know her
        assert answer.status == 403
        assert "heidi@LAB.TEST" in answer.body
        assert summary(gw, upn="heidi@lab.test")["identity_source"] == "san-email"
    finally:
        gw.stop()


def test_email_and_common_name_sources(lab: LabLayout, tmp_path: Path) -> None:
    """san-email reads the rfc822Name; subject-cn reads CN=<name>, a user of the gateway's own realm."""
    email = gateway_with(lab, tmp_path / "email", identity='source = "san-email"')
    cn = gateway_with(lab, tmp_path / "cn", identity='source = "subject-cn"')
    try:
        assert call(lab, email, "/owa/", cert="bob").json()["principal"] == "bob@LAB.TEST"
        assert summary(email, principal="bob@LAB.TEST")["identity_source"] == "san-email"
        # other-realm's UPN and e-mail say alice@corp.example, its CN says alice
        assert call(lab, cn, "/owa/", cert="other-realm").json()["principal"] == "alice@LAB.TEST"
        assert summary(cn, principal="alice@LAB.TEST")["upn"] == "alice"
    finally:
        email.stop()
        cn.stop()


def test_enterprise_names_reach_the_kdc_as_such(lab: LabLayout, tmp_path: Path) -> None:
    """enterprise_names: S4U2Self and the AS exchange name alice@lab.test as NT-ENTERPRISE (MIT cannot resolve it)."""
    gw = gateway_with(
        lab,
        tmp_path,
        identity='source = "san-upn"\nenterprise_names = true',
        extra='\n[authentication]\nmode = "certificate-or-basic"\n',
    )
    try:
        enterprise = "alice\\@lab.test@LAB.TEST"  # how the KDC logs an NT-ENTERPRISE name in realm LAB.TEST
        before = len(kdc_requests(lab, enterprise))
        answer = call(lab, gw, "/owa/", cert="alice")
        assert answer.status == 403  # MIT has no UPN aliases: "no Kerberos account matches alice@LAB.TEST"
        assert "no Kerberos account" in answer.body
        assert len(kdc_requests(lab, enterprise)) > before
        before = len(kdc_requests(lab, enterprise))
        assert call(lab, gw, "/owa/", login="alice@lab.test:" + USERS["alice"]).status == 401
        assert len(kdc_requests(lab, enterprise)) > before
        assert call(lab, gw, "/owa/", login=ALICE).status == 200  # a bare user name is a plain principal
    finally:
        gw.stop()


# -- certificate restrictions ----------------------------------------------------------------------------


def templated_certificate(lab: LabLayout, directory: Path) -> Path:
    """A user certificate for bob from the lab's issuing CA, carrying a v2 certificate template extension."""
    ca_cert = x509.load_pem_x509_certificate((lab.pki_dir / "issuing.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((lab.pki_dir / "issuing.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    template = univ.Sequence()
    template.setComponentByPosition(0, univ.ObjectIdentifier(TEMPLATE_ID))
    template.setComponentByPosition(1, univ.Integer(100))
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob (managed device)")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([upn_other_name("bob@lab.test")]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(TEMPLATE_OID), der_encoder.encode(template)),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = directory / "templated.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def test_restrictions_admit_matching_certificates_and_refuse_the_rest(lab: LabLayout, tmp_path: Path) -> None:
    """A certificate must match one rule (issuer + subject + EKU, or a template extension), else 403 naming them."""
    extra = f"""
[[client_certificates.restrictions]]
name = "alice-from-issuing-ca"
issuer = "CN=Lab Issuing CA"
subject = "CN=alice"
eku = ["1.3.6.1.5.5.7.3.2"]

[[client_certificates.restrictions]]
name = "managed-device-template"
extension = {{ oid = "{TEMPLATE_OID}", value = "{TEMPLATE_ID}" }}
"""
    gw = gateway_with(lab, tmp_path, extra=extra)
    try:
        assert call(lab, gw, "/owa/", cert="alice").status == 200
        assert summary(gw, principal="alice@LAB.TEST")["restriction"] == "alice-from-issuing-ca"
        refused = call(lab, gw, "/owa/", cert="bob")
        assert refused.status == 403
        assert "client_certificates.restrictions" in refused.body
        assert "alice-from-issuing-ca, managed-device-template" in refused.body
        templated = call(lab, gw, "/owa/", cert=str(templated_certificate(lab, tmp_path)))
        assert templated.status == 200, templated
        assert templated.json()["principal"] == "bob@LAB.TEST"
        assert summary(gw, principal="bob@LAB.TEST", status=200)["restriction"] == "managed-device-template"
    finally:
        gw.stop()


# -- what the TLS handshake asks for, seen by openssl s_client ------------------------------------------


def _s_client_without_certificate(lab: LabLayout, gw: Gateway) -> tuple[bool, str]:
    """`openssl s_client` presenting no certificate, sending one GET: (whether the server's handshake carried a
    CertificateRequest, everything s_client printed)."""
    argv = ["openssl", "s_client", "-msg", "-ign_eof", "-CAfile", str(lab.pki_dir / "root.pem")]
    argv += ["-connect", f"127.0.0.1:{gw.port}"]
    request = "GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    done = subprocess.run(argv, input=request, capture_output=True, text=True, timeout=90, check=False)
    out = done.stdout + done.stderr
    return "CertificateRequest" in out, out


def test_the_handshake_asks_for_a_certificate_as_each_mode_says(
    lab: LabLayout, gateway: Gateway, either: Gateway, both: Gateway, tmp_path: Path
) -> None:
    """Issue 5, seen in the TLS handshake itself: `certificate` asks for a certificate and requires it (no
    certificate: an alert, no HTTP answer); `certificate-or-basic` and `certificate-and-basic` ask without
    requiring (the handshake completes, the request is answered `401` or `403`); `basic` sends no
    CertificateRequest at all, and its challenge names the default realm, `Basic realm="Exchange"`."""
    asked, out = _s_client_without_certificate(lab, gateway)
    assert asked, out
    assert "HTTP/1.1" not in out
    assert "certificate required" in out
    asked, out = _s_client_without_certificate(lab, either)
    assert asked, out
    assert "HTTP/1.1 401" in out
    assert 'WWW-Authenticate: Basic realm="Lab Exchange"' in out
    asked, out = _s_client_without_certificate(lab, both)
    assert asked, out
    assert "HTTP/1.1 403" in out
    gw = basic_gateway(lab, tmp_path)
    try:
        asked, out = _s_client_without_certificate(lab, gw)
        assert not asked, out
        assert "HTTP/1.1 401" in out
        assert 'WWW-Authenticate: Basic realm="Exchange"' in out
    finally:
        gw.stop()


ISSUE_5_CONFIG = """
[authentication]
mode = "certificate"        # "certificate" | "certificate-or-basic" | "certificate-and-basic" | "basic"
basic_realm = "Exchange"

[[client_certificates.restrictions]]   # optional; a certificate must match at least one rule when any exist
issuer = "{issuer}"           # and/or: subject (glob), eku (OIDs), extension = {{ oid = "...", value = "..." }}
"""


@pytest.mark.parametrize(("issuer", "status"), [("CN=Lab Issuing CA", 200), ("CN=Partner Issuing CA", 403)])
def test_issue_5s_restriction_as_written(lab: LabLayout, tmp_path: Path, issuer: str, status: int) -> None:
    """Issue 5's [authentication] and restriction blocks as written (a rule with an issuer and no name; identity
    keys as the issue writes them): alice, issued by Lab Issuing CA, is served when the rule names that issuer, and
    refused with 403 naming the rule set and its one rule (by its key) when it names another."""
    identity = 'source = "san-upn"          # "san-upn" | "san-email" | "subject-cn"\nenterprise_names = false'
    gw = gateway_with(lab, tmp_path, identity=identity, extra=ISSUE_5_CONFIG.format(issuer=issuer))
    try:
        answer = call(lab, gw, "/owa/", cert="alice")
        assert answer.status == status, answer
        if status == 403:
            assert "client_certificates.restrictions (rules: client_certificates.restrictions[0])" in answer.body
            assert summary(gw, status=403)["refused_stage"] == "certificate"  # `explain` names it "restrictions"
        else:
            assert summary(gw, principal="alice@LAB.TEST")["restriction"] == "client_certificates.restrictions[0]"
    finally:
        gw.stop()


@pytest.mark.parametrize(
    ("cert", "stage", "reason"),
    [("revoked", "revocation", "was revoked"), ("noupn", "identity", "no user principal name")],
)
def test_a_certificate_refused_after_the_handshake_does_not_fall_back_either(
    lab: LabLayout, either: Gateway, cert: str, stage: str, reason: str
) -> None:
    """certificate-or-basic: a certificate the handshake takes but a later stage refuses (revoked, no UPN) is 403
    from that stage even with alice's good password beside it; the password is never tried instead (issue 5: "an
    invalid certificate is still refused; it does not fall back")."""
    answer = call(lab, either, "/owa/", cert=cert, login=ALICE)
    assert answer.status == 403, answer
    assert reason in answer.body
    line = summary(either, status=403)
    assert line["refused_stage"] == stage
    assert "principal" not in line


def test_a_password_typed_as_the_user_name_is_shown_nowhere(lab: LabLayout, tmp_path: Path) -> None:
    """A password typed into the user-name field (the name alone, after a domain, as a UPN, too long to be a name, as
    a held user's; holding an `@` or a `\\`, so that part of it reads as a domain nobody configured) is in no log
    line, trace or metric: a name the KDC did not know is shown as its first character and length (`W…[11]`), which
    still matches a help-desk call, and so is a domain nobody configured; a name the KDC knows is shown whole."""
    admin_port = free_port()
    extra = f"""
[authentication]
mode = "basic"
basic_failures_per_user = 5

[admin]
bind = "127.0.0.1:{admin_port}"
"""
    gw = gateway_with(lab, tmp_path, extra=extra)
    secret = "Winter2026!"
    try:
        assert call(lab, gw, "/owa/", login=f"{secret}:{USERS['bob']}").status == 401
        event = gw.wait_for("authentication_required", lambda e: "W…[11]" in str(e.get("fix")), what="W…[11]")
        assert "KDC has no account" in event["fix"]
        for name in (f"LAB\\{secret}", f"{secret}@lab.test", secret + "x" * 1100, f"P@{secret}", f"{secret}\\x"):
            assert call(lab, gw, "/owa/", login=f"{name}:{USERS['bob']}").status == 401
        statuses = [call(lab, gw, "/owa/", login=f"{secret}:guess").status for _ in range(3)]
        assert statuses == [401, 401, 429]  # 3 of the 5 were the first three names: one principal
        assert call(lab, gw, "/owa/", login="bob:nope").status == 401  # a known user's name is the help desk's key
        event = gw.wait_for("authentication_required", lambda e: "bob@LAB.TEST" in str(e.get("fix")), what="bob")
        admin = f"http://{gw.admin}"
        shown = {
            "log": gw.log_path.read_text(),
            "traces": subprocess.run(
                ["curl", "-sS", f"{admin}/traces?limit=100"], capture_output=True, text=True, check=True
            ).stdout,
            "metrics": subprocess.run(["curl", "-sS", f"{admin}/metrics"], capture_output=True, text=True).stdout,
        }
        assert "authentication" in shown["traces"]
        for where, text in shown.items():
            assert "Winter2026" not in text, where
            assert "winter2026" not in text, where
    finally:
        gw.stop()


def _fix_names(shown: str, event: dict[str, Any]) -> bool:
    return shown in str(event.get("fix"))


def test_an_unknown_domain_typed_in_the_user_name_is_shortened_like_the_name(lab: LabLayout, tmp_path: Path) -> None:
    """A user name's domain is shown only when the gateway knows it (a configured realm, UPN suffix or NetBIOS name):
    a password typed as a name with an '@' or a '\\' in it (`P@ssw0rd`, `Summer\\2026`) leaves neither part in the
    log (`P…[1]@s…[6]`, `S…[6]\\2…[4]`: the fix of the 401 for a domain nobody configured; the reason names no
    domain); `nobody@lab.test` and `LAB\\nobody` reach the KDC, which knows no such user: `n…[6]@LAB.TEST`."""
    gw = gateway_with(lab, tmp_path, extra='[authentication]\nmode = "basic"\nbasic_failures_per_user = 50\n')
    try:
        for name, shown in (
            ("P@ssw0rd", "P…[1]@s…[6]"),
            ("Summer\\2026", "S…[6]\\2…[4]"),
            ("nobody@lab.test", "n…[6]@LAB.TEST"),
            ("LAB\\nobody", "n…[6]@LAB.TEST"),
        ):
            gw.mark()
            assert call(lab, gw, "/owa/", login=f"{name}:{USERS['bob']}").status == 401
            gw.wait_for("authentication_required", functools.partial(_fix_names, shown), what=shown)
        log = gw.log_path.read_text()
        assert "ssw0rd" not in log
        assert "Summer" not in log
    finally:
        gw.stop()
