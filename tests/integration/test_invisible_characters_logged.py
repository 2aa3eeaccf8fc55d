"""What an anonymous client writes reaches the log escaped: the subject of a certificate refused in the TLS handshake
(an issuer nobody configured), named in `tls_handshake_refused`, and a Basic user name nobody vouched for, shown in
a refusal's fix. Like a CRL issuer's name (left17's `proxy.printable`), their invisible characters are escapes."""

from __future__ import annotations

import base64
import http.client
import json
import re
import signal
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.identity.upn import upn_other_name
from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki, _issue_leaf, _make_ca, _sign_crl, _urls_of, write_key, write_pem
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.pem import self_signed

INVISIBLE = "\u202eexe.txt\x1b[31m\u200b\u2028"  # a right-to-left override, ESC, a zero-width space, a line separator


def _stranger(directory: Path) -> Path:
    """A self-signed client certificate (and its key beside it) whose subject and issuer hold `INVISIBLE`."""
    cert, key = self_signed("mallory" + INVISIBLE)
    (directory / "mallory.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "mallory.key").write_bytes(private)
    return directory / "mallory"


def _present(device: ssl.SSLContext, port: int) -> None:
    """A request on a connection whose handshake presents `device`'s certificate."""
    with device.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="proxy.lab.test"
    ) as tls:
        tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n")
        tls.recv(100)


def test_a_refused_certificates_subject_is_logged_with_its_invisible_characters_escaped(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A client presenting a self-signed certificate whose subject holds U+202E, ESC, a zero-width space and U+2028
    is refused in the handshake (unknown CA), and `tls_handshake_refused` names the certificate with those characters
    as escapes (`\\u202e`, `\\x1b`, ...), none of them raw. Before, the subject was logged as the client wrote it: a
    log viewer showed the rest of the line reversed, a terminal took the ESC sequence."""
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port()))
    try:
        gw.mark()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the alert, at the handshake or the first read
            _present(client_context(lab, str(_stranger(tmp_path))), gw.port)
        line = gw.wait_event("tls_handshake_refused")
        shown = line["certificate"]
        assert shown == "CN=mallory\\u202eexe.txt\\x1b[31m\\u200b\\u2028", shown
        assert all(c.isprintable() for c in line["fix"])
    finally:
        gw.stop()


def test_a_basic_user_name_nobody_vouched_for_is_logged_with_its_invisible_characters_escaped(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A Basic sign-in (no certificate: `mode = "basic"`) whose user name begins with U+202E and whose domain, one
    nobody configured, with ESC: 401, and `authentication_required`'s fix shows the name's first characters and
    lengths (`shown_name`) as escapes (`\\u202e…[8]@\\x1b…[14]`). Before, the first character of each was logged
    as sent: anyone who can connect chose it."""
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port(), extra=BASIC))
    try:
        gw.mark()
        login = base64.b64encode("\u202eexe.txt@\x1b[31mevil.test:Winter2026".encode()).decode()
        assert _basic(lab, gw.port, login) == 401
        line = gw.wait_event("authentication_required")
        assert line["fix"].startswith("Basic user \\u202e…[8]@\\x1b…[14]: "), line
        assert line["fix"].isprintable(), line
    finally:
        gw.stop()


BASIC = '\n[authentication]\nmode = "basic"\n'


def _status(device: ssl.SSLContext, port: int, head: bytes) -> int:
    """The status of the request `head`, sent on a connection of its own whose handshake `device` makes."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    with device.wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(head)
        answer = http.client.HTTPResponse(tls)
        answer.begin()
        answer.read()
        return answer.status


def _basic(lab: LabLayout, port: int, login: str) -> int:
    """The status of a GET with `Authorization: Basic login`, on a connection without a client certificate."""
    head = f"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\nAuthorization: Basic {login}\r\n\r\n"
    return _status(client_context(lab, None), port, head.encode())


@pytest.mark.parametrize("server", ["own", "aiohttp"])
def test_a_request_path_is_logged_with_its_invisible_characters_escaped(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A request for `/owa/%E2%80%AE%1B` (percent-encoded U+202E and ESC), sent by a client without a certificate or
    credentials to either device-side server: 400, and the summary line's `path` shows them as escapes
    (`/owa/\\u202e\\x1b`). Before, the path was logged decoded as sent: anyone who can connect wrote them raw."""
    text = lab_config(lab, port=free_port(), extra=BASIC)
    gw = start_gateway(lab, tmp_path / "gw", text.replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\n', 1))
    try:
        gw.mark()
        head = b"GET /owa/%E2%80%AE%1B HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n"
        assert _status(client_context(lab, None), gw.port, head) == 400
        line = gw.wait_event("request")
        assert line["path"] == "/owa/\\u202e\\x1b", line
    finally:
        gw.stop()


def test_a_served_certificates_subject_is_logged_with_its_invisible_characters_escaped(
    lab: LabLayout, tmp_path: Path
) -> None:
    """alice's certificate from the lab's issuing CA whose common name holds U+202E and ESC (a template that lets the
    enrollee supply the subject): served 200 as alice, and the summary line's `cert_subject` shows them as escapes.
    Before, the subject was logged as the certificate spelled it."""
    device = _alice_invisible(lab, tmp_path)
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port()))
    try:
        gw.mark()
        assert _status(device, gw.port, b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n") == 200
        line = gw.wait_event("request")
        assert line["cert_subject"] == "CN=alice\\u202eexe.txt\\x1b[31m\\u200b\\u2028", line
        assert line["principal"] == "alice@LAB.TEST"
    finally:
        gw.stop()


def _alice_invisible(lab: LabLayout, tmp_path: Path) -> ssl.SSLContext:
    """A device presenting alice's certificate from the lab's issuing CA whose common name is "alice" + INVISIBLE."""
    pki = Pki.at(lab.pki_dir)
    ca_key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = _issue_leaf(
        "alice" + INVISIBLE,
        key,
        (ca_key, ca),
        [upn_other_name("alice@lab.test")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        crl_url=_urls_of(x509.load_pem_x509_certificate(pki.server_cert.read_bytes()))[0],
        ocsp_url=None,
    )
    write_pem(tmp_path / "alice-invisible.pem", [cert])
    write_key(tmp_path / "alice-invisible.key", key)
    return client_context(lab, str(tmp_path / "alice-invisible"))


GET = b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n"


def _as_logged(gw: Gateway, key: str) -> str:
    """The JSON string of `key` in the last `request` line of the gateway's log, as the file spells it, quotes and
    escapes included: what an administrator copies from the log."""
    line = [text for text in gw.log_path.read_text().splitlines() if json.loads(text).get("event") == "request"][-1]
    found = re.search(f'"{key}": *', line)
    assert found is not None, line
    _, end = json.JSONDecoder().raw_decode(line, found.end())
    return line[found.end() : end]


def _with_rule(text: str, key: str, value: str) -> str:
    """`text` with one restriction rule, `devices`, whose `key` (subject, issuer) is `value` (a TOML string, quotes
    included)."""
    return text + f'\n[[client_certificates.restrictions]]\nname = "devices"\n{key} = {value}\n'


def _copied_from_the_log_admits(
    lab: LabLayout, gw: Gateway, device: ssl.SSLContext, key: str, logged: str, raw: str
) -> None:
    """The scene of both tests below, on `gw` serving `device` (200): the log line's `cert_<key>` is `logged` (a JSON
    string), written as the rule's `key` and reloaded: the device admitted by the rule, bob refused (403); then `raw`
    (a TOML string holding the characters themselves) as the rule's `key`: the reload refused, naming the key and the
    escapes to write."""
    text = gw.config_path.read_text()
    gw.mark()
    assert _status(device, gw.port, GET) == 200
    gw.wait_event("request")
    copied = _as_logged(gw, f"cert_{key}")
    assert copied == logged, copied
    gw.config_path.write_text(_with_rule(text, key, copied))
    gw.mark()
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_event("reloaded")
    gw.mark()
    assert _status(device, gw.port, GET) == 200
    assert gw.wait_event("request")["restriction"] == "devices"
    assert _status(client_context(lab, "bob"), gw.port, GET) == 403
    gw.config_path.write_text(_with_rule(text, key, raw))
    gw.mark()
    gw.proc.send_signal(signal.SIGHUP)
    problems = " ".join(gw.wait_event("reload_refused")["problems"])
    assert f"client_certificates.restrictions[0].{key}" in problems, problems
    assert "\\u202e" in problems, problems


def test_a_subject_copied_from_the_log_into_a_restriction_admits_that_certificate(
    lab: LabLayout, tmp_path: Path
) -> None:
    """An administrator copies `cert_subject` from the log line of alice's certificate whose subject holds U+202E and
    ESC (escaped there: `CN=alice\\u202e...`) into a `[[client_certificates.restrictions]]` subject, quotes included,
    and reloads: that certificate is admitted by the rule (200, `restriction` "devices"), bob's is not (403). The glob
    matches the subject as the log shows it. Before, it matched the raw subject, which the escaped text never
    matches: the certificate copied from the log was refused. A glob that holds such a character itself (the TOML
    escape `\\u202e` unescaped) matches nothing now: the reload is refused, naming the key and the fix."""
    device = _alice_invisible(lab, tmp_path)
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port()))
    try:
        logged = '"CN=alice\\\\u202eexe.txt\\\\x1b[31m\\\\u200b\\\\u2028"'
        _copied_from_the_log_admits(lab, gw, device, "subject", logged, '"CN=alice\\u202e*"')  # TOML: the character
    finally:
        gw.stop()


def _alice_from_an_invisible_ca(lab: LabLayout, tmp_path: Path, text: str) -> tuple[ssl.SSLContext, str]:
    """A device presenting alice's certificate from an issuing CA under the lab's root whose common name is
    "Devices CA" + INVISIBLE, and `text` (the lab's configuration) with that CA among the intermediates and its CRL
    (listing nobody) among the CRLs."""
    pki = Pki.at(lab.pki_dir)
    root_key = serialization.load_pem_private_key(pki.root_key.read_bytes(), None)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    root = x509.load_pem_x509_certificate(pki.root_cert.read_bytes())
    now = datetime.now(UTC)
    ca_key, ca = _make_ca("Devices CA" + INVISIBLE, (root_key, root), now=now, crl_url=None)
    write_pem(tmp_path / "devices-ca.pem", [ca])
    write_key(tmp_path / "devices-ca.key", ca_key)
    crl = _sign_crl(tmp_path / "devices-ca.pem", tmp_path / "devices-ca.key", [], 1, now=now)
    (tmp_path / "devices-ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue_leaf(
        "alice",
        key,
        (ca_key, ca),
        [upn_other_name("alice@lab.test")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
        crl_url=None,
        ocsp_url=None,
    )
    write_pem(tmp_path / "alice-devices.pem", [cert])
    write_key(tmp_path / "alice-devices.key", key)
    lab_cas = f'intermediates = ["{pki.issuing_cert}"]\ncrls = ["{pki.crls}"]'
    assert lab_cas in text
    cas = f'intermediates = ["{pki.issuing_cert}", "{tmp_path / "devices-ca.pem"}"]\n'
    cas += f'crls = ["{pki.crls}", "{tmp_path / "devices-ca.crl"}"]'
    return client_context(lab, str(tmp_path / "alice-devices")), text.replace(lab_cas, cas)


def test_an_issuer_copied_from_the_log_into_a_restriction_admits_that_certificate(
    lab: LabLayout, tmp_path: Path
) -> None:
    """An administrator copies `cert_issuer` from the log line of alice's certificate from an issuing CA whose name
    holds U+202E and ESC (escaped there: `CN=Devices CA\\u202e...`) into a `[[client_certificates.restrictions]]`
    issuer, quotes included, and reloads: that certificate is admitted by the rule (200, `restriction` "devices"),
    bob's from the lab's issuing CA is not (403). The issuer matches as the log shows it, as the subject glob does.
    Before, the escaped text was refused as "not an RFC 4514 name" (the reload refused), and only the raw character
    matched. An issuer that holds such a character itself (the TOML escape `\\u202e` unescaped) is refused now,
    naming the key and the value to write."""
    device, text = _alice_from_an_invisible_ca(lab, tmp_path, lab_config(lab, port=free_port()))
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        logged = '"CN=Devices CA\\\\u202eexe.txt\\\\x1b[31m\\\\u200b\\\\u2028"'
        raw = json.loads(logged).encode().decode("unicode_escape")  # TOML: the characters themselves
        _copied_from_the_log_admits(lab, gw, device, "issuer", logged, json.dumps(raw))
    finally:
        gw.stop()
