"""An attacker's audit: known, greppable secrets sent through every authentication mode and refusal, and everything
the gateway emits searched for them.

The secrets: Basic passwords (right, wrong, expired, held, of a disabled or unknown user, non-ASCII, with `:`, very
long), the device's own `Authorization` (Basic, Bearer, a bogus Negotiate), `Proxy-Authorization`, cookies, `X-*`
identity and token headers, a query string; the Negotiate tokens the gateway sends (their base64, the raw SPNEGO and
AP-REQ bytes, the service ticket's session key and the authenticator's subkey, opened with the service's keytab), the
keytabs' keys (`klist -kK`) and the TLS private keys (PEM lines and the private numbers). The outputs: the process's
stdout and stderr at `--log-level debug` (summary lines included), the trace export file, every admin page (`/metrics`,
`/readyz`, `/healthz`, `/traces` and each trace as JSON and as HTML), `kcd-proxy trace` (text and `--json`),
`explain --json --kdc`, `doctor`, `check-config`, every answer a device got (status line, headers, body), the
requests the backends got, the process's environment and command line, and the files it wrote (its temporary
directory, the krb5 overlay, a FILE credential cache if anything used one), and its core size limit. Three runs: the
own device-side server, aiohttp's, and the own one in two workers; a hostile backend beside the recording ones; and
two more runs whose only KDC is silent or down. docs/hardening.md, section 9, has the table of what was found.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.lab.kdc import MASTER_PASSWORD, ROOT_PASSWORD
from proxy.lab.layout import DISABLED_USERS, USERS, LabLayout
from tests.integration.conftest import REPO, Gateway, dead_port, free_port, lab_config, start_gateway
from tests.integration.loopback import stop_listening
from tests.integration.recorder import Recorder, raw_request
from tests.integration.test_audit import BASIC as AUDIT_BASIC
from tests.integration.test_audit import _malformed_requests
from tests.integration.test_ticket_cache import _kadmin
from tests.krb5_keys import token_keys
from tests.negotiate_asn1 import read_negotiate

# Accounts of this module's own, each with a password that is a secret of its own kind.
ACCOUNTS = {
    "sx-colon": "c0lon:s3cret:Qx7",
    "sx-utf8": "pässwörd-s3cret-Ωж-Zk4",
    "sx-long": "long-s3cret-" + "Yq8wErT5" * 40,
    "sx-expired": "exp1red-s3cret-Hr5",
    "sx-held": "h3ld-own-s3cret-Fv2",
    "sx-latin1": "lätin-s3cret-Öq5",  # also sent as Latin-1 (an older device), which goes to the KDC as UTF-8
}
WRONG = "wr0ng-s3cret-Jm2"
GUESSES = [f"gu3ss-s3cret-N{i}q" for i in range(4)]
UNKNOWN = ("nobody-sx", "unkn0wn-s3cret-Wb9")
BEARER = "bearer-s3cret-Tq1"
BOGUS_NEGOTIATE = "Ym9ndXMtbmVnby1zM2NyZXQtUHoz"  # base64 of "bogus-nego-s3cret-Pz3"
PROXY_AUTH = base64.b64encode(b"proxyuser:proxy-s3cret-Vc4").decode()
COOKIES = "session=cookie-s3cret-4f1e; other=cookie2-s3cret-Lk8"
IDENTITY_HEADERS = {
    "X-Remote-User": "xremote-s3cret-Gh6",
    "X-Forwarded-User": "xfwduser-s3cret-Ab1",
    "X-Auth-Token": "xauthtoken-s3cret-Dd3",
    "X-Access-Token": "xaccess-s3cret-Ee4",
    "X-KCD-UPN": "xkcdupn-s3cret-Ff5",
}
QUERY = "query-s3cret-9b2d"
BACKEND_COOKIE = "backend-cookie-s3cret-Rt6"
BACKEND_TOKEN = base64.b64encode(b"backend-mutual-s3cret-token-Uy7").decode()
# What a hostile or broken backend answers, by path: a mutual-authentication token and a cookie with a 200, the
# same in a 401, and heads the gateway cannot parse that carry them.
HOSTILE_ANSWERS = {
    "/hostile/ok": f"HTTP/1.1 200 OK\r\nWWW-Authenticate: Negotiate {BACKEND_TOKEN}\r\n"
    f"Set-Cookie: s={BACKEND_COOKIE}; HttpOnly\r\nContent-Length: 2\r\n\r\nok",
    "/hostile/401": f"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate {BACKEND_TOKEN}\r\n"
    f"Set-Cookie: s={BACKEND_COOKIE}\r\nContent-Length: 0\r\n\r\n",
    "/hostile/ctl": f"HTTP/1.1 200 OK\r\nSet-Cookie: s={BACKEND_COOKIE}\x01\r\nContent-Length: 0\r\n\r\n",
    "/hostile/fold": f"HTTP/1.1 200 OK\r\nX-A: b\r\n WWW-Authenticate: Negotiate {BACKEND_TOKEN}\r\n\r\n",
    "/hostile/status": f"HTTP/1.1 2x0 {BACKEND_COOKIE}\r\nContent-Length: 0\r\n\r\n",
    "/hostile/reason": f"HTTP/1.1 200 {BACKEND_COOKIE}\x01\r\nContent-Length: 0\r\n\r\n",
}


class HostileBackend:
    """An upstream that answers each request with `HOSTILE_ANSWERS[path]` and closes."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                    head += chunk
                path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else ""
                conn.sendall(HOSTILE_ANSWERS.get(path.split("?")[0], "HTTP/1.1 404 x\r\n\r\n").encode("latin-1"))

    def close(self) -> None:
        stop_listening(self._sock)


def _basic(user: str, password: str, charset: str = "utf-8") -> str:
    return base64.b64encode(f"{user}:{password}".encode(charset)).decode()


def _device_headers(authorization: str, *, cookie: bool = True) -> list[str]:
    """curl's -H arguments for a device that sends its own credentials and identity claims along (and its cookies,
    which go on to the backend: OWA's session is a cookie; the lab backend's echo shows them)."""
    headers = [f"Authorization: {authorization}", f"Proxy-Authorization: Basic {PROXY_AUTH}"]
    headers += [f"Cookie: {COOKIES}"] if cookie else []
    headers += [f"{name}: {value}" for name, value in IDENTITY_HEADERS.items()]
    return [arg for header in headers for arg in ("-H", header)]


@pytest.fixture(scope="module")
def accounts(lab: LabLayout) -> dict[str, str]:
    """The module's accounts in the lab realm, `sx-expired`'s password expired."""
    for name, password in ACCOUNTS.items():
        _kadmin(lab, f'addprinc -pw "{password}" {name}')
        _kadmin(lab, f'cpw -pw "{password}" {name}')  # the lab is the session's: a second module run finds it
    _kadmin(lab, 'modprinc -pwexpire "2000-01-01 00:00:00 UTC" sx-expired')
    return ACCOUNTS


@dataclass
class Scene:
    """One gateway run: what went in, and what came out."""

    gw: Gateway
    recorder: Recorder
    admin: str
    tmpdir: Path
    default_ccache: Path
    limits: str = ""  # /proc/<pid>/limits of the running gateway
    answers: list[str] = field(default_factory=list)
    outputs: dict[str, bytes] = field(default_factory=dict)


def _curl(lab: LabLayout, scene: Scene, path: str, user: str | None, *args: str) -> str:
    """A device's request (curl, `-i`): its whole answer, status line and headers included, kept for the scan."""
    cmd = ["curl", "-sS", "-i", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem")]
    if user is not None:
        users = lab.pki_dir / "users"
        cmd += ["--cert", str(users / f"{user}.pem"), "--key", str(users / f"{user}.key")]
    done = subprocess.run([*cmd, *args, scene.gw.url + path], capture_output=True, timeout=90, check=False)
    answer = done.stdout.decode("latin-1") + done.stderr.decode("latin-1")
    scene.answers.append(answer)
    return answer


def _status(answer: str) -> int:
    """The last HTTP status in a curl `-i` answer (after any 100 Continue), 0 if the handshake failed."""
    codes = [line.split(" ")[1] for line in answer.splitlines() if line.startswith("HTTP/")]
    return int(codes[-1]) if codes else 0


def _cli(lab: LabLayout, *argv: str) -> bytes:
    """A `kcd-proxy` command's stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        capture_output=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **lab.env()},
        check=False,
    )
    return done.stdout + b"\n" + done.stderr


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310  loopback
        body: bytes = r.read()
        return body


def _configuration(
    lab: LabLayout, recorder: Recorder, hostile: HostileBackend, admin_port: int, export: Path, server: str
) -> str:
    text = lab_config(
        lab,
        port=free_port(),
        extra=f"""
[[routes]]
prefix = "/hostile/"
upstream = "{hostile.url}"
spn = "HTTP/cas.lab.test"

[[routes]]
prefix = "/capture/"
upstream = "{recorder.url}"
spn = "HTTP/cas.lab.test"
context_headers = {{ "X-KCD-UPN" = "upn" }}

[[routes]]
prefix = "/bound/"
upstream = "{recorder.url}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"

[[routes]]
prefix = "/basic-route/"
upstream = "{recorder.url}"
spn = "HTTP/cas.lab.test"
backend_auth = "basic"

[authentication]
mode = "certificate-or-basic"
basic_failures_per_user = 2
basic_failures_per_address = 1000

[admin]
bind = "127.0.0.1:{admin_port}"

[doctor]
canary_user = "alice@lab.test"

[traces]
export = "{export}"
""",
    )
    server, _, workers = server.partition("-workers-")  # "own-workers-2": the own server in two worker processes
    listener = f'http_server = "{server}"\n' + (f"workers = {workers}\n" if workers else "")
    return text.replace("[listener]\n", f"[listener]\n{listener}", 1)


def _run_scene(lab: LabLayout, scene: Scene) -> None:
    """Every path, each request carrying the device's secrets."""
    bearer, bogus = _device_headers(f"Bearer {BEARER}"), _device_headers(f"Negotiate {BOGUS_NEGOTIATE}")
    query = f"?password={QUERY}&token={QUERY}"
    # certificates: served on each kind of route, the device's own Authorization of each kind dropped
    for path in (f"/capture/a{query}", "/bound/b", "/bound/b"):
        assert _status(_curl(lab, scene, path, "alice", *bearer)) == 200
    echoed = _curl(lab, scene, "/owa/", "alice", *_device_headers(f"Bearer {BEARER}", cookie=False))
    assert _status(echoed) == 200
    assert "X-Lab-Principal: alice@LAB.TEST" in echoed, echoed[-500:]  # the real acceptor's word
    assert _status(_curl(lab, scene, "/capture/c", "bob", *bogus)) == 200
    assert _status(_curl(lab, scene, "/capture/d", "carol", *_device_headers(f"Basic {_basic('carol', WRONG)}"))) == 200
    # certificates refused: revoked, no UPN, unknown to the KDC, disabled, wrong EKU; the handshake's refusals
    for user in ("revoked", "noupn", "ghost", "dave"):
        assert _status(_curl(lab, scene, "/capture/e", user, *bearer)) == 403, user
    for user in ("expired", "untrusted", "noclientauth"):
        assert _status(_curl(lab, scene, "/capture/f", user, *bearer)) in (0, 403), user
    # Basic sign-in: right passwords (alice's, and the accounts' of every kind), on a Negotiate and a Basic route
    for user, password in [("alice", USERS["alice"]), *((u, p) for u, p in ACCOUNTS.items() if u != "sx-expired")]:
        for path in (f"/capture/g{query}", "/basic-route/h"):
            answer = _curl(lab, scene, path, None, *_device_headers(f"Basic {_basic(user, password)}"))
            assert _status(answer) == 200, (user, answer[-300:])
    latin1 = _device_headers(f"Basic {_basic('sx-latin1', ACCOUNTS['sx-latin1'], 'latin-1')}")
    for path in (f"/capture/g{query}", "/basic-route/h"):
        assert _status(_curl(lab, scene, path, None, *latin1)) == 200
    # refused passwords: wrong, expired, a disabled account's right one, an unknown user, a held user's guesses
    refused = [("alice", WRONG), ("sx-expired", ACCOUNTS["sx-expired"]), ("dave", DISABLED_USERS["dave"]), UNKNOWN]
    refused += [("sx-held", guess) for guess in GUESSES]
    statuses = [
        _status(_curl(lab, scene, "/capture/i", None, *_device_headers(f"Basic {_basic(user, password)}")))
        for user, password in refused
    ]
    assert statuses[:4] == [401, 403, 403, 401], statuses
    assert 429 in statuses[4:], statuses  # held
    # no credentials, or only another scheme's: the challenge; a certificate of another user than the password's on a
    # Basic route
    assert _status(_curl(lab, scene, "/capture/j", None, "-H", f"Cookie: {COOKIES}")) == 401
    assert _status(_curl(lab, scene, "/capture/j", None, *bearer)) == 401
    assert _status(_curl(lab, scene, "/capture/j", None, *bogus)) == 401
    answer = _curl(lab, scene, "/basic-route/k", "bob", *_device_headers(f"Basic {_basic('alice', USERS['alice'])}"))
    assert _status(answer) == 403
    # a hostile backend's tokens and cookies: its mutual-authentication token never reaches the device
    for path in HOSTILE_ANSWERS:
        answer = _curl(lab, scene, path, "alice", "-H", f"Cookie: {COOKIES}")
        assert _status(answer) in (200, 502), (path, answer[-300:])
        assert BACKEND_TOKEN not in answer, path
    for malformed in _malformed_requests():
        raw = raw_request(lab, scene.gw.port, malformed)
        scene.answers.append(raw.head + "\r\n\r\n" + raw.body.decode("latin-1"))
    # a reload, then a sign-in after it
    scene.gw.mark()
    scene.gw.proc.send_signal(signal.SIGHUP)
    scene.gw.wait_event("reloaded")
    answer = _curl(lab, scene, "/capture/l", None, *_device_headers(f"Basic {_basic('bob', USERS['bob'])}"))
    assert _status(answer) == 200
    scene.gw.wait_event("request", path="/capture/l")  # the last request's line, trace and metrics are written


def _collect(lab: LabLayout, scene: Scene) -> None:
    """Everything the running gateway shows: admin pages, commands, its process's environment."""
    admin, out = scene.admin, scene.outputs
    for page in ("/metrics", "/readyz", "/healthz", "/traces?limit=1000", "/"):
        out[f"GET {page}"] = _get(admin + page)
    ids = [record["id"] for record in json.loads(out["GET /traces?limit=1000"])]
    assert len(ids) > 20, len(ids)
    for trace_id in ids:
        out[f"GET /traces/{trace_id}"] = _get(f"{admin}/traces/{trace_id}")
        out[f"GET /trace/{trace_id}"] = _get(f"{admin}/trace/{trace_id}")
    port = int(admin.rsplit(":", 1)[1])
    for malformed in _malformed_requests()[:4]:  # the admin listener is aiohttp's server too
        out[f"admin's answer to {malformed[:40]!r}"] = _plain_request(port, malformed)
    config = str(scene.gw.config_path)
    out["kcd-proxy trace"] = _cli(lab, "trace", "--config", config, "--limit", "500")
    out["kcd-proxy trace --json"] = _cli(lab, "trace", "--config", config, "--limit", "500", "--json")
    alice = str(lab.pki_dir / "users" / "alice.pem")
    out["explain --json --kdc"] = _cli(lab, "explain", "--config", config, "--cert", alice, "--kdc", "--json")
    out["explain"] = _cli(lab, "explain", "--config", config, "--cert", alice, "--kdc")
    out["doctor"] = _cli(lab, "doctor", "--config", config)
    out["check-config"] = _cli(lab, "check-config", config)
    pid = scene.gw.proc.pid
    out["/proc/environ"] = Path(f"/proc/{pid}/environ").read_bytes()
    out["/proc/cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
    scene.limits = Path(f"/proc/{pid}/limits").read_text()


def _plain_request(port: int, request: bytes) -> bytes:
    """`request` sent byte for byte over plain TCP; the answer, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def _secrets(lab: LabLayout, scene: Scene) -> dict[str, str]:
    """Every secret the run put in play, by what it is: the needles of the scan."""
    found: dict[str, str] = {
        WRONG: "a wrong password",
        UNKNOWN[1]: "an unknown user's password",
        BEARER: "the device's Bearer token",
        BOGUS_NEGOTIATE: "the device's bogus Negotiate token",
        "bogus-nego-s3cret-Pz3": "the device's bogus Negotiate token, decoded",
        PROXY_AUTH: "the device's Proxy-Authorization",
        "proxy-s3cret-Vc4": "the device's Proxy-Authorization password",
        "cookie-s3cret-4f1e": "a cookie",
        "cookie2-s3cret-Lk8": "a cookie",
        QUERY: "a secret in the query string",
        ROOT_PASSWORD: "the LDAP password",
        MASTER_PASSWORD: "the KDC master password",
        "Negotiate YII": "a Negotiate header",
        AUDIT_BASIC: "the Basic credentials of the malformed requests",
        BACKEND_TOKEN: "a backend's mutual-authentication token",
        "backend-mutual-s3cret": "a backend's mutual-authentication token, decoded",
    }
    found.update({value: f"the device's {name}" for name, value in IDENTITY_HEADERS.items()})
    for guess in GUESSES:
        found[guess] = "a held user's guess"
    for user, password in [*USERS.items(), *DISABLED_USERS.items(), *ACCOUNTS.items()]:
        found[password] = f"{user}'s password"
        found[password[:16]] = f"the start of {user}'s password"
        found[_basic(user, password)] = f"{user}'s Basic credentials"
        found[password.encode().hex()] = f"{user}'s password (hex)"
    latin1 = ACCOUNTS["sx-latin1"]
    found[_basic("sx-latin1", latin1, "latin-1")] = "sx-latin1's Basic credentials, as Latin-1"
    found[latin1.encode("latin-1").hex()] = "sx-latin1's password as Latin-1 (hex)"
    for user, password in [("alice", WRONG), UNKNOWN, ("carol", WRONG), *(("sx-held", g) for g in GUESSES)]:
        found[_basic(user, password)] = "refused Basic credentials"
    for keytab in (lab.proxy_keytab, lab.backend_keytab, lab.other_keytab):
        listing = subprocess.run(["klist", "-kK", str(keytab)], capture_output=True, text=True, check=True).stdout
        for line in listing.splitlines():
            if "(0x" in line:
                key = bytes.fromhex(line.rsplit("(0x", 1)[1].rstrip(")"))
                found.update(_key_forms(key, f"a key of {keytab.name}"))
    for path in (lab.pki_dir / "server.key", lab.pki_dir / "users" / "alice.key"):
        found.update(_private_key_forms(path))
    tokens = [
        value.removeprefix("Negotiate ")
        for recorded in scene.recorder.requests
        for value in recorded.headers("Authorization")
        if value.startswith("Negotiate ")
    ]
    assert len(tokens) >= 10, len(tokens)
    for b64 in tokens:
        found[b64] = "a Negotiate token sent to the backend"
        found[b64[20:60]] = "a piece of a Negotiate token"
        raw = base64.b64decode(b64)
        found[raw.hex()[40:120]] = "a Negotiate token (hex)"
        mech_token = read_negotiate(raw).mech_token
        keys = token_keys(mech_token, lab.backend_keytab)
        found[keys.ap_req.hex()[40:120]] = "an AP-REQ (hex)"
        found[base64.b64encode(keys.ap_req).decode()[20:60]] = "an AP-REQ (base64)"
        found.update(_key_forms(keys.session_key, "a service ticket's session key"))
        found.update(_key_forms(keys.subkey, "an authenticator's subkey"))
    return found


def _raw_secrets(scene: Scene) -> dict[bytes, str]:
    """Byte strings that must not appear in binary outputs: the tokens' raw SPNEGO bytes."""
    found: dict[bytes, str] = {}
    for recorded in scene.recorder.requests:
        for value in recorded.headers("Authorization"):
            if value.startswith("Negotiate "):
                found[base64.b64decode(value.removeprefix("Negotiate "))[20:60]] = "a Negotiate token (raw bytes)"
    return found


def _key_forms(key: bytes, what: str) -> dict[str, str]:
    return {
        key.hex(): f"{what} (hex)",
        key.hex().upper(): f"{what} (HEX)",
        base64.b64encode(key).decode(): f"{what} (base64)",
    }


def _private_key_forms(path: Path) -> dict[str, str]:
    """A PEM private key's base64 lines and its private numbers (decimal and hex)."""
    found = {line: f"a line of {path.name}" for line in path.read_text().splitlines() if line and "-----" not in line}
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    numbers: list[int] = []
    if isinstance(key, rsa.RSAPrivateKey):
        private = key.private_numbers()
        numbers = [private.d, private.p, private.q]
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = [key.private_numbers().private_value]
    for number in numbers:
        found[str(number)[:40]] = f"{path.name}'s private number"
        found[f"{number:x}"[:40]] = f"{path.name}'s private number (hex)"
    return found


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["own", "aiohttp", "own-workers-2"])
def scene(
    request: pytest.FixtureRequest, lab: LabLayout, accounts: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Scene:
    """A gateway at `--log-level debug` on one device-side server (or two workers: their shared throttle, their
    sibling sockets), run through every path, then stopped; its temporary directory and default credential cache its
    own, to see what it writes there."""
    server: str = request.param
    directory = tmp_path_factory.mktemp(f"secrets-{server}")
    tmpdir = directory / "tmp"
    tmpdir.mkdir()
    default_ccache = directory / "default-ccache"
    recorder = Recorder()
    admin_port = free_port()
    hostile = HostileBackend()
    text = _configuration(lab, recorder, hostile, admin_port, directory / "traces.jsonl", server)
    env = {"TMPDIR": str(tmpdir), "KRB5CCNAME": f"FILE:{default_ccache}"}
    gw = start_gateway(lab, directory / "gw", text, args=("--log-level", "debug"), env=env)
    scene = Scene(gw, recorder, f"http://{gw.admin}", tmpdir, default_ccache)
    try:
        _run_scene(lab, scene)
        _collect(lab, scene)
        scene.outputs["files while running"] = b"\n".join(f"{k}\n".encode() + v for k, v in _files(tmpdir).items())
    finally:
        assert gw.stop() == 0
        recorder.close()
        hostile.close()
    scene.outputs["the gateway's stdout and stderr"] = gw.log_path.read_bytes()
    scene.outputs["the trace export"] = (directory / "traces.jsonl").read_bytes()
    scene.outputs["the device's answers"] = "\n".join(scene.answers).encode("utf-8", "surrogateescape")
    scene.outputs["files left"] = b"\n".join(f"{k}\n".encode() + v for k, v in _files(tmpdir).items())
    return scene


# A scheme and a token (token68 with a digit, `+`, `/` or `=` in it: not a word such as "continuation")
_SCHEME_TOKEN = re.compile(r"(?i)\b(basic|bearer|negotiate|ntlm)\s+(?=[A-Za-z._~-]*[0-9+/=])[A-Za-z0-9+/._~-]{12,}=*")


def test_no_output_holds_a_secret(lab: LabLayout, scene: Scene) -> None:
    """No secret the run put in play (passwords, the device's credentials and identity headers, cookies, tokens,
    session keys, keytab keys, TLS private keys) appears in anything the gateway emitted, on either server."""
    needles = _secrets(lab, scene)
    raw = _raw_secrets(scene)
    leaks: set[tuple[str, str, str]] = set()
    for where, data in scene.outputs.items():
        if where != "the device's answers":  # a backend's own cookie goes to the device as the backend set it
            needles[BACKEND_COOKIE] = "a backend's cookie"
        for text in (data.decode("latin-1"), data.decode("utf-8", "replace")):
            for secret, what in needles.items():
                if (at := text.find(secret)) >= 0:
                    leaks.add((where, what, text[max(0, at - 200) : at + 80]))  # the context says who wrote it
            for found in _SCHEME_TOKEN.finditer(text):  # any credential of any scheme, known to this test or not
                leaks.add((where, "a scheme and its token", text[max(0, found.start() - 200) : found.end() + 20]))
        needles.pop(BACKEND_COOKIE, None)
        leaks |= {(where, what, "") for secret, what in raw.items() if secret in data}
    assert not leaks, sorted(leaks)


def test_the_backend_gets_no_client_credential_or_identity_header(scene: Scene) -> None:
    """Towards the backend the gateway is the only source of identity: a Negotiate token of its own on Negotiate
    routes, the verified client's own Basic header on the Basic route only, never a client's Proxy-Authorization,
    Bearer or bogus Negotiate token, or `X-*` identity header (the route's context header is the gateway's value)."""
    assert scene.recorder.requests
    for recorded in scene.recorder.requests:
        head = recorded.head.decode("latin-1")
        assert not [value for value in (BEARER, BOGUS_NEGOTIATE, PROXY_AUTH) if value in head], recorded.request_line
        assert not [value for value in IDENTITY_HEADERS.values() if value in head], recorded.request_line
        authorization = recorded.headers("Authorization")
        if recorded.path.startswith("/basic-route/"):
            assert [a[:6] for a in authorization] == ["Basic "], recorded.request_line
        else:  # `doctor` asks each upstream without a token
            assert [a[:13] for a in authorization] in ([], ["Negotiate YII"]), recorded.request_line
        assert not recorded.headers("Proxy-Authorization")


def test_a_crash_leaves_no_core_file(scene: Scene) -> None:
    """The gateway holds keytab keys, session keys and users' tickets: its core file size limit is 0, soft and hard,
    so a crash writes none (nor does systemd-coredump keep one: it honours the limit)."""
    (line,) = [line for line in scene.limits.splitlines() if line.startswith("Max core file size")]
    assert line.split()[4:6] == ["0", "0"], line


def test_no_credential_cache_or_secret_file_is_written(scene: Scene) -> None:
    """Tickets stay in memory: nothing uses the default (FILE) credential cache, and what the gateway leaves in its
    temporary directory after it stopped is nothing at all (the krb5 overlay is removed with the process)."""
    assert not scene.default_ccache.exists()
    assert not list(scene.tmpdir.iterdir()), list(scene.tmpdir.iterdir())


@dataclass
class KdcTrouble:
    """A gateway whose only KDC does not answer (`silent`: it accepts and says nothing) or is not there (`dead`)."""

    gw: Gateway
    answers: list[str] = field(default_factory=list)


@pytest.fixture(scope="module", params=["silent", "dead"])
def kdc_trouble(request: pytest.FixtureRequest, lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> KdcTrouble:
    """Certificate and Basic sign-ins at once, with the device's secrets, while the KDC is slow or down: 503s (a
    silent KDC: at kdc_timeout, then at once once the gateway's probe found it silent); the gateway stopped, its
    output kept."""
    directory = tmp_path_factory.mktemp(f"secrets-kdc-{request.param}")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the kernel's backlog; nothing ever reads them
        port = silent.getsockname()[1] if request.param == "silent" else dead_port()
        krb5 = directory / "krb5.conf"
        krb5.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", f"127.0.0.1:{port}"))
        text = lab_config(lab, port=free_port(), krb5_conf=krb5, extra=_TROUBLE)
        text = text.replace("[kerberos]\n", "[kerberos]\nkdc_timeout = 2\n", 1)
        gw = start_gateway(lab, directory / "gw", text, args=("--log-level", "debug"))
        scene = KdcTrouble(gw)
        try:

            def sign_in(user: str, password: str, path: str) -> None:
                scene.answers.append(
                    _curl_to(lab, gw.url + path, None, *_device_headers(f"Basic {_basic(user, password)}"))
                )

            threads = [
                threading.Thread(target=sign_in, args=(user, password, f"/capture/{user}"))
                for user, password in [("alice", USERS["alice"]), ("bob", WRONG), *ACCOUNTS.items()]
            ]
            for thread in threads:
                thread.start()
            scene.answers.append(_curl_to(lab, gw.url + "/owa/", "carol", *_device_headers(f"Bearer {BEARER}")))
            for thread in threads:
                thread.join()
        finally:
            assert gw.stop() == 0
    return scene


_TROUBLE = """
[authentication]
mode = "certificate-or-basic"
"""


def _curl_to(lab: LabLayout, url: str, user: str | None, *args: str) -> str:
    """`_curl` without a scene: the whole answer, status line and headers included."""
    cmd = ["curl", "-sS", "-i", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem")]
    if user is not None:
        users = lab.pki_dir / "users"
        cmd += ["--cert", str(users / f"{user}.pem"), "--key", str(users / f"{user}.key")]
    done = subprocess.run([*cmd, *args, url], capture_output=True, timeout=90, check=False)
    return done.stdout.decode("latin-1") + done.stderr.decode("latin-1")


def test_a_kdc_slow_or_down_leaks_no_secret(lab: LabLayout, kdc_trouble: KdcTrouble) -> None:
    """With the KDC silent or down (503), neither the answers nor the debug log hold a password, the device's
    credentials, a cookie or an identity header."""
    statuses = [_status(answer) for answer in kdc_trouble.answers]
    assert len(statuses) == 3 + len(ACCOUNTS), statuses  # alice, bob, the accounts; carol by certificate
    assert set(statuses) == {503}, statuses
    needles = {password: f"{user}'s password" for user, password in [*USERS.items(), *ACCOUNTS.items()]}
    needles.update({WRONG: "a wrong password", BEARER: "the Bearer token", "cookie-s3cret-4f1e": "a cookie"})
    needles.update({value: name for name, value in IDENTITY_HEADERS.items()})
    needles.update({_basic(user, password): f"{user}'s Basic credentials" for user, password in ACCOUNTS.items()})
    outputs = {"log": kdc_trouble.gw.log_path.read_text(errors="replace"), "answers": "\n".join(kdc_trouble.answers)}
    leaks = [(where, what) for where, text in outputs.items() for secret, what in needles.items() if secret in text]
    assert not leaks, leaks
