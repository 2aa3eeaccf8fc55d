"""Audit and secrets: every refusal is an audit event, and a full run's log holds no token, password or key."""

from __future__ import annotations

import base64
import http.server
import signal
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from proxy.kerberos.keytab import read_keytab
from proxy.lab.kdc import MASTER_PASSWORD, ROOT_PASSWORD
from proxy.lab.layout import DISABLED_USERS, USERS, LabLayout
from tests.integration.conftest import curl, free_port, lab_config, start_gateway
from tests.integration.recorder import raw_request

BASIC = base64.b64encode(b"alice@lab.test:alice-Pa55").decode()
COOKIE_SECRET = "cookie-s3cret-4f1e"
QUERY_SECRET = "query-s3cret-9b2d"


class _Capture(http.server.BaseHTTPRequestHandler):
    """An upstream that keeps every Authorization header it is sent and answers 200."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[str]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    _Capture.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Capture.seen
    server.shutdown()
    server.server_close()


def _pem_bodies(path: Path) -> list[str]:
    """The base64 lines of a PEM private key: none of them may appear anywhere."""
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]


def _malformed_requests() -> list[bytes]:
    """Requests aiohttp cannot parse, each carrying the client's Basic credentials and cookie where a parse
    error would quote them."""
    auth, cookie = f"Authorization: Basic {BASIC}", f"Cookie: session={COOKIE_SECRET}"
    return [
        f"GET /capture/x HTTP/1.1\r\nHost: x\r\n{auth}\x01\r\n{cookie}\r\n\r\n".encode(),
        f"GET /capture/x HTTP/1.1\r\nHost: x\r\n{cookie}\x00\r\n{auth}\r\n\r\n".encode(),
        f"GET /capture/x HTTP/1.1\r\nHost: x\r\n{auth}\r\n {cookie}\r\n\r\n".encode(),  # obs-fold
        f"GET /capture/x HTTP/1.1\r\n{auth}\r\nContent-Length: 1\r\nContent-Length: 2\r\n{cookie}\r\n\r\n".encode(),
        f"GET /capture/x HTTP/1.1\r\nHost: x\r\n{cookie}{'x' * 100_000}\r\n{auth}\r\n\r\n".encode(),
        f"GET /capture/x?{COOKIE_SECRET} HTTP/1.1 {BASIC}\r\n{auth}\r\n\r\n".encode(),
        f"GET /capture/\xff{BASIC} HTTP/1.1\r\n{auth}\r\n\r\n".encode("latin-1"),
        f"{auth}\r\n{cookie}\r\n\r\n".encode(),
    ]


def test_a_full_run_logs_every_refusal_and_no_secret(
    lab: LabLayout, tmp_path: Path, capture: tuple[str, list[str]]
) -> None:
    """Good and refused requests (TLS, revocation, identity, Kerberos), client credentials and cookies, malformed
    requests that carry both, a reload and a metrics scrape: each refusal is an audit event with stage, reason
    and fix; every line the process writes is JSON; and the log holds none of the tokens sent to the backend,
    the passwords, the client's credentials or any key."""
    upstream, tokens = capture
    admin_port = free_port()
    extra = f"""
[[routes]]
prefix = "/capture/"
upstream = "{upstream}"
spn = "HTTP/cas.lab.test"

[admin]
bind = "127.0.0.1:{admin_port}"
"""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    try:
        secrets = ("-H", f"Authorization: Basic {BASIC}", "-H", f"Cookie: session={COOKIE_SECRET}")
        for user in ("alice", "bob", "carol"):
            for path in (f"/capture/x?password={QUERY_SECRET}", "/owa/"):
                assert curl(lab, gw.url + path, user, *secrets).stdout.endswith("200")
        for user in ("revoked", "noupn", "ghost", "dave"):
            assert curl(lab, gw.url + "/capture/x", user, *secrets).stdout.endswith("403")
        for refused in ("expired", "untrusted", None):
            assert curl(lab, gw.url + "/capture/x", refused).returncode != 0
        for malformed in _malformed_requests():
            answer = raw_request(lab, gw.port, malformed)
            assert answer.status in (400, 431), (malformed[:60], answer.status_line)
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        assert curl(lab, gw.url + "/capture/y", "alice").stdout.endswith("200")
        with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=30) as r:
            assert b"kcd_requests_total" in r.read()
    finally:  # the gateway has written every line once it has exited
        assert gw.stop() == 0

    assert len(tokens) == 4
    assert all(t.startswith("Negotiate ") for t in tokens)  # never the client's Basic header
    audits = {e["event"]: e for e in gw.logs() if e.get("level") == "warning" and "stage" in e}
    for event, stage in [
        ("certificate_revoked", "revocation"),
        ("identity_rejected", "identity"),
        ("kerberos_refused", "kerberos"),
        ("tls_handshake_refused", "tls"),
    ]:
        assert audits[event]["stage"] == stage
        assert audits[event]["reason"]
        assert "fix" in audits[event]
    handshakes = {e["reason"] for e in gw.events("tls_handshake_refused")}
    assert {"certificate has expired", "peer did not return a certificate"} <= handshakes
    assert all(e["fix"] for e in gw.events("tls_handshake_refused"))

    log = gw.log_path.read_text()
    not_json = [line for line in log.splitlines() if not line.startswith("{")]
    assert not not_json, not_json[:5]  # every line of the process, aiohttp's and asyncio's included
    unparsed = [e for e in gw.events("request") if e.get("refusal") == "request_unparsed"]
    assert len(unparsed) >= len(_malformed_requests()) - 1  # each malformed request has its summary line
    forbidden = {
        "Negotiate ": "a Negotiate header",
        "YII": "the start of a base64 SPNEGO token",
        BASIC: "the client's Basic credentials",
        COOKIE_SECRET: "the client's cookie",
        QUERY_SECRET: "a secret in the query string",
        ROOT_PASSWORD: "the LDAP password",
        MASTER_PASSWORD: "the KDC master password",
    }
    for token in tokens:
        b64 = token.removeprefix("Negotiate ")
        forbidden[b64] = "a token sent to the backend"
        forbidden[b64[10:50]] = "a piece of a token sent to the backend"
    for password in (*USERS.values(), *DISABLED_USERS.values()):
        forbidden[password] = "a user's password"
    for keytab in (lab.proxy_keytab, lab.backend_keytab):
        for entry in read_keytab(keytab):
            forbidden[entry.key.hex()] = "a keytab key (hex)"
            forbidden[base64.b64encode(entry.key).decode()] = "a keytab key (base64)"
    for key in (lab.pki_dir / "server.key", lab.pki_dir / "users" / "alice.key"):
        for line in _pem_bodies(key):
            forbidden[line] = f"a line of {key.name}"
    leaked = [what for secret, what in forbidden.items() if secret in log]
    assert not leaked, leaked
