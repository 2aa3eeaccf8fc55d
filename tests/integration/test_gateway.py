"""The gateway end to end: real TLS, real certificates, a real KDC and a real Negotiate acceptor."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.kerberos.keytab import read_keytab
from proxy.lab.layout import USERS, LabLayout
from tests.integration._alerts import HANDSHAKE_REFUSALS
from tests.integration.conftest import Gateway, client_context, curl, dead_port, free_port, lab_config, start_gateway
from tests.unit.test_keytab import _record


def _split(out: str) -> tuple[str, int]:
    body, _, code = out.rpartition("\n")
    return body, int(code)


async def _request(
    lab: LabLayout, gw: Gateway, path: str, user: str = "alice", **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(kwargs.pop("method", "GET"), gw.url + path, ssl=client_context(lab, user), **kwargs) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def test_certificate_user_reaches_backend_as_themselves(lab: LabLayout, gateway: Gateway) -> None:
    """A good certificate is delegated: the backend's acceptor sees the UPN's principal via Negotiate."""
    res = curl(lab, gateway.url + "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice", "alice")
    body, code = _split(res.stdout)
    assert code == 200, res
    echo = json.loads(body)
    assert echo["principal"] == "alice@LAB.TEST"
    assert echo["auth_type"] == "Negotiate"
    assert echo["path"] == "/Microsoft-Server-ActiveSync"
    assert "Cmd=Sync" in echo["query"]


def test_mit_tickets_state_no_account_and_are_served_as_before(lab: LabLayout, gateway: Gateway) -> None:
    """MIT's KDC names no account in its tickets (no UPN_DNS_INFO): the KDC-account check compares nothing, the
    user is served, and the summary line says the account was not stated."""
    mark = gateway.mark()
    body, code = _split(curl(lab, gateway.url + "/owa/", "carol").stdout)
    assert code == 200, body
    assert json.loads(body)["principal"] == "carol@LAB.TEST"
    line = gateway.wait_event("request", upn="carol@lab.test")
    assert line["kdc_account"].startswith("not stated")
    assert not gateway.events("kdc_account_mismatch", after=mark)  # it would come before the summary line


def test_each_user_is_delegated_as_their_own_principal(lab: LabLayout, gateway: Gateway) -> None:
    """Different certificates on different connections become different principals at the backend."""
    for user in USERS:
        body, code = _split(curl(lab, gateway.url + "/EWS/Exchange.asmx", user).stdout)
        assert code == 200
        assert json.loads(body)["principal"] == f"{user}@LAB.TEST"


def test_request_body_reaches_backend_intact(lab: LabLayout, gateway: Gateway, tmp_path: Path) -> None:
    """A POSTed body arrives byte for byte (digest and length checked by the backend)."""
    payload = bytes(range(256)) * 4096 + b"tail"
    (tmp_path / "body.bin").write_bytes(payload)
    res = curl(
        lab,
        gateway.url + "/Microsoft-Server-ActiveSync?Cmd=SendMail",
        "bob",
        "--data-binary",
        f"@{tmp_path / 'body.bin'}",
        "-H",
        "Content-Type: application/vnd.ms-sync.wbxml",
    )
    body, code = _split(res.stdout)
    assert code == 200, res
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["body_length"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert echo["principal"] == "bob@LAB.TEST"


def test_backend_status_headers_and_body_come_back_unchanged(lab: LabLayout, gateway: Gateway) -> None:
    """Exchange's own status codes and headers pass through; Negotiate challenges do not."""
    status, headers, body = asyncio.run(
        _request(lab, gateway, "/Microsoft-Server-ActiveSync", headers={"X-Lab-Status": "449"})
    )
    assert status == 449
    assert json.loads(body)["principal"] == "alice@LAB.TEST"
    assert headers["X-Lab-Principal"] == "alice@LAB.TEST"
    assert "WWW-Authenticate" not in headers


def test_activesync_options_headers_pass_through(lab: LabLayout, gateway: Gateway) -> None:
    """OPTIONS on ActiveSync returns the backend's protocol version and command lists."""
    status, headers, _ = asyncio.run(_request(lab, gateway, "/Microsoft-Server-ActiveSync", method="OPTIONS"))
    assert status == 200
    assert "14.1" in headers["MS-ASProtocolVersions"]
    assert "Ping" in headers["MS-ASProtocolCommands"]


def test_client_identity_and_hop_headers_never_reach_backend(lab: LabLayout, gateway: Gateway) -> None:
    """Client Authorization, identity headers in any spelling and Connection-named headers are dropped."""
    sent = {
        "Authorization": "Basic bWFsbG9yeTpwdw==",
        "Proxy-Authorization": "Basic bWFsbG9yeTpwdw==",
        "X-Remote-User": "mallory",
        "x-forwarded-user": "mallory",
        "X_Remote_User": "mallory",
        "Remote-User": "mallory",
        "X-Forwarded-For": "203.0.113.66",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "mallory",
        "MS-ASProtocolVersion": "16.1",
    }
    status, _, body = asyncio.run(_request(lab, gateway, "/Microsoft-Server-ActiveSync", headers=sent))
    assert status == 200
    echo = json.loads(body)
    seen = {k.lower(): v for k, v in echo["headers"].items()}
    assert "mallory" not in json.dumps(echo["headers"])
    assert not {"proxy-authorization", "x-remote-user", "x-forwarded-user", "remote-user", "x-hop"} & set(seen)
    assert not any("_" in k for k in seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{gateway.port}"
    assert seen["ms-asprotocolversion"] == "16.1"
    assert echo["principal"] == "alice@LAB.TEST"


@pytest.mark.parametrize(("user", "reason_in_log", "curl_says"), HANDSHAKE_REFUSALS)
def test_bad_certificates_are_refused_in_the_handshake(
    lab: LabLayout, gateway: Gateway, user: str | None, reason_in_log: str, curl_says: str
) -> None:
    """No, expired, not-yet-valid, untrusted (copied CA name) or non-clientAuth certificates: a TLS alert."""
    gateway.mark()
    res = curl(lab, gateway.url + "/Microsoft-Server-ActiveSync", user)
    assert res.returncode != 0, res
    assert curl_says in res.stderr.lower()
    gateway.wait_for("tls_handshake_refused", lambda e: reason_in_log in e["reason"].lower(), what=reason_in_log)


@pytest.mark.parametrize(
    ("user", "status", "stage", "reason", "fix"),
    [
        ("revoked", 403, "revocation", "revoked", None),
        ("noupn", 403, "identity", "no user principal name", None),
        ("ghost", 403, "kerberos", "no Kerberos account matches ghost@LAB.TEST", "check the certificate's UPN"),
        ("dave", 403, "kerberos", "disabled or locked", "enable or unlock the account"),
    ],
)
def test_refusals_after_the_handshake_say_why(
    lab: LabLayout, gateway: Gateway, user: str, status: int, stage: str, reason: str, fix: str | None
) -> None:
    """Revoked, UPN-less, unknown or disabled users get a 403 with a reason, logged as an audit event; a KDC refusal
    (unknown or disabled user) also gets "a log line that says what to fix" (issue 3), the `kerberos_refused` fix."""
    gateway.mark()
    res = curl(lab, gateway.url + "/Microsoft-Server-ActiveSync", user, "-D", "-")
    body, code = _split(res.stdout)
    assert code == status
    assert reason in body
    assert f"x-kcd-refused-stage: {stage}" in body.lower()
    audit = gateway.wait_for("request", lambda e: e.get("refused_stage") == stage and reason in e.get("reason", ""))
    assert audit["status"] == status
    if fix is not None:
        assert fix in gateway.wait_event("kerberos_refused", principal=f"{user}@LAB.TEST")["fix"]


def test_delegation_outside_the_allow_list_is_refused_with_the_fix(lab: LabLayout, gateway: Gateway) -> None:
    """A route whose SPN is not in the proxy's delegation list: 403 to the client, the fix in the log."""
    gateway.mark()
    body, code = _split(curl(lab, gateway.url + "/not-delegable/x", "carol").stdout)
    assert code == 403
    assert "may not act for carol@LAB.TEST at HTTP/other.lab.test" in body
    event = gateway.wait_event("kerberos_refused", principal="carol@LAB.TEST")
    assert "add HTTP/other.lab.test to the delegation list" in event["fix"]


def test_backend_unreachable_is_502(lab: LabLayout, gateway: Gateway) -> None:
    """Nothing listening at the upstream: 502, never 401."""
    body, code = _split(curl(lab, gateway.url + "/dead/x", "alice").stdout)
    assert code == 502
    assert "cannot be reached" in body


def test_backend_rejecting_the_ticket_is_502_naming_the_spn(lab: LabLayout, gateway: Gateway) -> None:
    """A backend that cannot accept the delegated ticket: 502 to the device, the SPN in the log."""
    gateway.mark()
    body, code = _split(curl(lab, gateway.url + "/wrong-key/x", "alice").stdout)
    assert code == 502
    assert "refused the gateway's Kerberos ticket" in body
    event = gateway.wait_event("backend_rejected_ticket", principal="alice@LAB.TEST")
    assert "HTTP/cas.lab.test" in event["fix"]


def test_kdc_unreachable_is_503_with_retry_after(lab: LabLayout, tmp_path: Path) -> None:
    """With no KDC answering, the device is told to come back later."""
    dead = tmp_path / "krb5.conf"
    dead.write_text(lab.krb5_conf.read_text().replace(f":{lab.kdc_port}", f":{dead_port()}"))
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), krb5_conf=dead))
    try:
        res = curl(lab, gw.url + "/owa/", "alice", "-D", "-")
        body, code = _split(res.stdout)
        assert code == 503
        assert "retry-after:" in body.lower()
    finally:
        assert gw.stop() == 0


def test_a_refused_keytab_costs_one_as_exchange_for_all_requests(lab: LabLayout, tmp_path: Path) -> None:
    """A keytab whose keys the KDC no longer holds (same version, other bytes): the first request is 502 naming the
    keytab, after one AS exchange; the next is refused from memory without the KDC. Each AS exchange is a bad
    password against the gateway's account in AD (lockout): MIT, asked for credentials of every mechanism it has
    (krb5 and IAKERB), made two for one acquisition."""
    wrong = tmp_path / "wrong.keytab"
    records = (_record(e.principal, e.kvno, e.enctype, bytes(len(e.key))) for e in read_keytab(lab.proxy_keytab))
    wrong.write_bytes(b"\x05\x02" + b"".join(records))
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(wrong)))
    try:
        offset = lab.kdc_log.stat().st_size  # after the start's KDC probe (an AS-REQ too): the requests' alone
        for user in ("alice", "bob"):
            gw.mark()
            body, code = _split(curl(lab, gw.url + "/owa/", user).stdout)
            assert code == 502, body
            event = gw.wait_event("kerberos_misconfigured", principal=f"{user}@LAB.TEST")
            assert "export it again" in event["fix"]
        with lab.kdc_log.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        exchanges = [line for line in lines if "AS_REQ" in line and "HTTP/proxy.lab.test@LAB.TEST for krbtgt/" in line]
        assert len(exchanges) == 1, exchanges
    finally:
        assert gw.stop() == 0


def test_one_summary_line_per_request_and_no_secrets(lab: LabLayout, gateway: Gateway) -> None:
    """Each request logs one JSON summary with who, which cert, which SPN and stage timings; no token."""
    mark = gateway.mark()
    _body, code = _split(curl(lab, gateway.url + "/autodiscover/autodiscover.xml?probe=summary", "carol").stdout)
    assert code == 200
    line = gateway.wait_event("request", path="/autodiscover/autodiscover.xml", principal="carol@LAB.TEST")
    assert len(gateway.events("request", after=mark)) == 1  # one line for the one request
    assert len(line["request_id"]) >= 8
    assert line["status"] == 200
    assert line["upn"] == "carol@lab.test"
    assert line["cert_subject"] == "CN=carol"
    assert line["cert_issuer"] == "CN=Lab Issuing CA"
    assert line["cert_serial"]
    assert line["spn"] == "HTTP/cas.lab.test"
    assert line["route"] == "/"
    assert {"tls", "certificate", "revocation", "identity", "kerberos", "backend", "total"} <= set(line["ms"])
    text = gateway.log_path.read_text()
    assert "Negotiate " not in text
    assert "YII" not in text  # the start of every base64 SPNEGO/Kerberos token
    for password in USERS.values():
        assert password not in text


def test_sigterm_stops_the_gateway_cleanly(lab: LabLayout, tmp_path: Path) -> None:
    """SIGTERM ends `kcd-proxy run` with exit status 0 and a 'stopped' log line."""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    assert _split(curl(lab, gw.url + "/owa/", "alice").stdout)[1] == 200
    assert gw.stop() == 0
    assert gw.events("stopped")


def test_a_device_cannot_renegotiate_to_another_certificate(lab: LabLayout, gateway: Gateway) -> None:
    """TLS 1.2: a device that asks to renegotiate after its handshake (a chance to present another certificate
    on a connection the gateway already tied to the first one) gets an alert and loses the connection."""
    users = lab.pki_dir / "users"
    argv = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{gateway.port}"]
    argv += [
        "-CAfile",
        str(lab.pki_dir / "root.pem"),
        "-cert",
        str(users / "alice.pem"),
        "-key",
        str(users / "alice.key"),
    ]
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        seen: list[str] = []
        for line in proc.stdout:  # the handshake is done once the session is printed
            seen.append(line)
            if line.strip().startswith("Verify return code"):
                break
        assert proc.poll() is None, "".join(seen)
        proc.stdin.write("R\n")  # s_client's command: renegotiate
        proc.stdin.flush()
        try:
            rest = proc.communicate(timeout=30)[0]  # stdin stays open until the gateway ends the connection
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the connection survived a renegotiation request") from None
    assert "RENEGOTIATING" in rest, rest
    assert "no renegotiation" in rest, rest
