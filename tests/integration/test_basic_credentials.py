"""Basic credentials as devices (and attackers) send them, against a real gateway and the lab's real KDC.

Requests are written with `http.client` so that a test chooses every byte of the `Authorization` field (its
charset, how many there are); the KDC's own log is the witness for what reached it, and the gateway's summary lines
say who was served.
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.lab.layout import REALM, LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.test_ticket_cache import _kadmin

BASIC = """
[authentication]
mode = "basic"
basic_failures_per_user = 100
basic_failures_per_address = 1000
"""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    @property
    def principal(self) -> str:
        """Who the lab backend was told it serves."""
        return str(json.loads(self.body)["principal"])


def send(lab: LabLayout, gw: Gateway, *authorizations: str) -> Answer:
    """One request on a connection of its own, with exactly these `Authorization` fields (none, one or several)."""
    gw.mark()
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, None), timeout=60)
    try:
        conn.putrequest("GET", "/owa/")
        for value in authorizations:
            conn.putheader("Authorization", value)
        conn.endheaders()
        response = conn.getresponse()
        return Answer(response.status, response.read())
    finally:
        conn.close()


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode("ascii")


def kdc_lines(lab: LabLayout, needle: str) -> list[str]:
    """The KDC's log lines for AS and TGS requests that contain `needle`."""
    lines = lab.kdc_log.read_text(errors="replace").splitlines()
    return [line for line in lines if ("AS_REQ" in line or "TGS_REQ" in line) and needle in line]


def new_user(lab: LabLayout, password: str) -> str:
    """A principal of its own with `password`, so no other test's sign-ins or failures touch it; its name."""
    name = f"bc{uuid.uuid4().hex[:10]}"
    _kadmin(lab, f"addprinc -pw {password} {name}")
    return name


@pytest.fixture(scope="module")
def gw(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(lab, tmp_path_factory.mktemp("basic"), lab_config(lab, port=free_port(), extra=BASIC))
    yield gateway
    gateway.stop()


def test_a_device_sending_latin1_signs_in_with_a_non_ascii_password(lab: LabLayout, gw: Gateway) -> None:
    """A device that encodes `user:password` in Latin-1 (RFC 7617 names no charset without `charset="UTF-8"`; older
    devices send Latin-1) signs in with a password holding ä and ö, and the same password sent in UTF-8 is the same
    sign-in (served from its cache entry). The KDC derives the key from the password's UTF-8 (AD too): the Latin-1
    bytes were a wrong password, 401 and a failure counted towards the user's hold and the directory's lockout."""
    password = f"Pässwörd-{uuid.uuid4().hex[:6]}"
    name = new_user(lab, password)
    latin = send(lab, gw, basic(f"{name}:{password}".encode("latin-1")))
    assert latin.status == 200, latin
    assert latin.principal == f"{name}@{REALM}"
    assert gw.wait_event("request", principal=f"{name}@{REALM}")["basic_cached"] is False
    gw.mark()  # the second request's summary line, not the first's (written after the answer)
    utf8 = send(lab, gw, basic(f"{name}:{password}".encode()))
    assert utf8.status == 200, utf8
    assert gw.wait_event("request", principal=f"{name}@{REALM}")["basic_cached"] is True


def test_a_reload_drops_the_verified_passwords_so_a_disabled_user_is_refused(lab: LabLayout, tmp_path: Path) -> None:
    """A reload drops every cached ticket, a Basic sign-in's too: a user signed in from the cache (the TGT the KDC
    gave for the password), disabled in the KDC, and a SIGHUP that changes nothing: the next request asks the KDC
    again and is refused (403). The sign-ins outlived a reload that left [authentication], [identity] and
    [kerberos] alone (served 200 from the cache for up to basic_cache_seconds), and only such a reload."""
    password = f"Reload-{uuid.uuid4().hex[:8]}"
    name = new_user(lab, password)
    text = lab_config(lab, port=free_port(), extra=BASIC)
    gateway = start_gateway(lab, tmp_path, text)
    try:
        assert send(lab, gateway, basic(f"{name}:{password}".encode())).status == 200
        gateway.wait_event("request", principal=f"{name}@{REALM}")
        gateway.mark()  # the second request's summary line, not the first's (written after the answer)
        assert send(lab, gateway, basic(f"{name}:{password}".encode())).status == 200
        assert gateway.wait_event("request", principal=f"{name}@{REALM}")["basic_cached"] is True
        _kadmin(lab, f"modprinc -allow_tix {name}")
        gateway.mark()
        gateway.proc.send_signal(signal.SIGHUP)
        assert gateway.wait_event("reloaded")["changed"] == []
        refused = send(lab, gateway, basic(f"{name}:{password}".encode()))
        assert refused.status == 403, refused
        assert gateway.wait_event("kerberos_refused")["reason"].startswith(f"the account {name}@{REALM} is disabled")
    finally:
        gateway.stop()


@pytest.mark.parametrize("order", ["good-first", "wrong-first"])
def test_two_authorization_fields_are_a_bad_request(lab: LabLayout, gw: Gateway, order: str) -> None:
    """A request with two Authorization fields (one a user's right password, one another user's guess) is 400 naming
    the header, whichever comes first, and neither reaches the KDC: the gateway read the first one only, and a
    balancer, a WAF or a backend_auth = "basic" site reading the last would have judged another user."""
    password = f"Two-{uuid.uuid4().hex[:8]}"
    name, other = new_user(lab, password), new_user(lab, password)
    fields = [basic(f"{name}:{password}".encode()), basic(f"{other}:guess".encode())]
    answer = send(lab, gw, *(fields if order == "good-first" else fields[::-1]))
    assert answer.status == 400, answer
    assert b"one Authorization header" in answer.body
    assert "Authorization" in gw.wait_event("request_refused", stage="request")["fix"]
    assert kdc_lines(lab, name) == []
    assert kdc_lines(lab, other) == []
    assert send(lab, gw, fields[0]).principal == f"{name}@{REALM}"  # one field: signed in


def test_a_user_name_longer_than_any_directorys_never_reaches_the_kdc_or_the_log(lab: LabLayout, gw: Gateway) -> None:
    """A user name of 2,000 characters (AD keeps userPrincipalName to 1,024) is 401 at once, saying so: it reached
    the KDC, was logged whole (twice a line) and kept whole as a throttle key (100,000 of them up to the 96 KiB a
    header field may hold: gigabytes)."""
    name = "u" + uuid.uuid4().hex[:8] * 250
    answer = send(lab, gw, basic(f"{name}:whatever".encode()))
    assert answer.status == 401, answer
    assert b"1024 characters" in answer.body
    assert gw.wait_event("authentication_required")["stage"] == "authentication"
    assert kdc_lines(lab, name[:100]) == []
    assert name[:1025] not in gw.log_path.read_text()


def test_a_sign_in_is_not_served_from_the_cache_past_its_tickets_end(lab: LabLayout, tmp_path: Path) -> None:
    """A user whose TGT lives 16 s (MIT's maxlife; AD ends a TGT early too, at the end of the user's logon hours)
    polls every half second for 19 s with basic_cache_seconds = 60: every request is 200, the first ones from the
    cache. The cache entry outlived its TGT, and each request after the ticket's end was 502
    `kerberos_misconfigured` ("a ticket of the gateway has expired: check the gateway's clock") until the entry's
    60 s were up."""
    password = f"Short-{uuid.uuid4().hex[:8]}"
    name = f"bc{uuid.uuid4().hex[:10]}"
    _kadmin(lab, f'addprinc -pw {password} -maxlife "16 seconds" {name}')
    extra = BASIC + "basic_cache_seconds = 60\n"
    gateway = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    try:
        since = gateway.mark()
        signed_in = time.monotonic()
        statuses = []
        while time.monotonic() < signed_in + 19:  # past the ticket's end, one request after the other
            statuses.append(send(lab, gateway, basic(f"{name}:{password}".encode())).status)
            time.sleep(0.5)  # a device's polling interval, not a wait for the gateway
        assert set(statuses) == {200}, statuses
        assert gateway.events("kerberos_misconfigured") == []
        cached = [e["basic_cached"] for e in gateway.events("request", after=since) if e.get("status") == 200]
        assert cached[0] is False
        assert True in cached  # while the ticket lives, the cache serves
        assert cached.count(False) >= 2  # after it, the KDC is asked again (and the new ticket served from the cache)
    finally:
        gateway.stop()


@pytest.mark.parametrize(
    ("case", "user", "password"),
    [
        ("a NUL in the name", b"{name}\x00x", b"{password}"),
        ("a control character in the name", b"{name}\x01", b"{password}"),
        ("a tab after the name", b"{name}\t", b"{password}"),
        ("a space before the name", b" {name}", b"{password}"),
        ("the name as a service principal", b"{name}/admin", b"{password}"),
        ("two @", b"{name}@x@lab.test", b"{password}"),
        ("DOMAIN\\ and @ at once", b"LAB\\{name}@lab.test", b"{password}"),
        ("an empty DOMAIN\\", b"\\{name}", b"{password}"),
        ("a name that is not UTF-8", b"{name}\xff\xfe", b"{password}"),
        ("a password of 60,000 characters", b"{name}", b"{password}" + b"x" * 60_000),
    ],
)
def test_a_malformed_basic_name_is_401_and_never_another_principal_at_the_kdc(
    lab: LabLayout, gw: Gateway, case: str, user: bytes, password: bytes
) -> None:
    """Names a device or attacker may send with a user's right password, each a plain 401 challenge (never a 500 or
    a 502), none served as the user (the KDC never gave a ticket to the user cut at the NUL, the space or the slash,
    and the 60,000-character password is simply wrong), and the password nowhere in the gateway's log."""
    secret = f"Mal-{uuid.uuid4().hex[:10]}"
    name = f"bc{uuid.uuid4().hex[:10]}"
    _kadmin(lab, f"addprinc -pw {secret} +requires_preauth {name}")  # a ticket ISSUEd only for the right password
    raw_user = user.replace(b"{name}", name.encode())
    raw = raw_user + b":" + password.replace(b"{password}", secret.encode())
    answer = send(lab, gw, basic(raw))
    assert answer.status == 401, (case, answer)
    assert answer.body.startswith(b"the user name or password is incorrect"), (case, answer)
    assert gw.wait_event("authentication_required")["stage"] == "authentication"
    assert [line for line in kdc_lines(lab, f"{name}@{REALM}") if "ISSUE" in line] == [], case
    assert secret not in gw.log_path.read_text()
