"""The hot path's shortcuts (issue #18) attacked from outside: what each remembers across requests or connections,
asked again after what it rested on has changed (review36, docs/hardening.md section 17).

- TLS sessions. OpenSSL verifies a client's chain in the full handshake only: a resumed session (a TLS 1.3 ticket, a
  TLS 1.2 session ID) carries the certificate of the handshake that made it, and nothing of TLS looks at it again.
  alice's session (Python's `SSLSocket.session`, real TLS to a running gateway) is resumed after her certificate
  was revoked (a CRL published and loaded) and after it expired: the resumed connection's request is refused by the
  certificate stages. With two workers, a session offered to the worker that did not make it is a full handshake.
- The per-connection fast path (`proxy.pipeline.again`): requests pipelined behind a held one on alice's connection,
  her certificate revoked while the first is held: all three refused.
- The held ticket and library context (`proxy.kerberos.ap_req`): ten users on a hundred keep-alive connections at
  once while every user's ticket is renewed about every second: every forwarded token, opened by MIT's acceptor
  with the backend's key, names the user of its connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from proxy.lab.kdclog import S4U2PROXY, KdcLog
from proxy.lab.layout import REALM, LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.recorder import Recorder
from tests.integration.test_connection_certificate import expiring_alice
from tests.integration.test_delegation_crowd import _crowd, new_users, session_keys, tls_context
from tests.integration.test_revocation import alice_reissued

REFRESH = 1  # crl_refresh_seconds
VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}


class _Device:
    """One device's TLS client context (Python ties a session to the context that made it), and a request per
    connection: the answer's status, its refused stage, and whether the session was resumed."""

    def __init__(self, lab: LabLayout, port: int, cert: str, version: ssl.TLSVersion) -> None:
        self.port = port
        self.ctx = client_context(lab, cert)
        self.ctx.minimum_version = self.ctx.maximum_version = version
        self.session: ssl.SSLSession | None = None

    def request(self, path: str = "/owa/", *, keep: bool = False) -> tuple[int | None, str | None, bool]:
        """One request on a new connection offering the last session (`keep`: the same one next time too)."""
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw,
            self.ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=self.session) as tls,
        ):
            resumed = bool(tls.session_reused)
            try:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
            except (ssl.SSLError, ConnectionError):  # the handshake's alert read with the first record (TLS 1.3)
                return None, None, resumed
            if tls.session is not None and not (keep and self.session is not None):
                self.session = tls.session
        if not answer:
            return None, None, resumed
        head = answer.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        status = int(head.split(" ", 2)[1])
        stage = next(
            (line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-kcd-refused")),
            None,
        )
        return status, stage, resumed


def _with_crl(lab: LabLayout, issuing: Path) -> str:
    """The lab's configuration with the issuing CA's CRL from `issuing` (refreshed every REFRESH s) and the root's."""
    text = lab_config(lab, port=free_port())
    lab_settings = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\n'
    assert lab_settings in text
    settings = f'crls = ["{issuing}", "{lab.pki_dir / "root.crl"}"]\ncrl_refresh_seconds = {REFRESH}\n'
    return text.replace(lab_settings, settings + 'revocation = "require"\n')


def _revocable_alice(lab: LabLayout, tmp_path: Path, name: str) -> tuple[Gateway, Callable[[], None]]:
    """A certificate of alice's own (`name`, on no CRL yet), a gateway reading the issuing CA's CRL from
    `tmp_path / "issuing.crl"` (`_with_crl`), and what publishes that CRL listing her (number 1001)."""
    cert, _ = alice_reissued(lab, tmp_path, name)
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    issuing = write_crl(tmp_path / "issuing.crl", issuing_ca, number=1000)

    def revoke() -> None:
        write_crl(tmp_path / "issuing.new", issuing_ca, revoked=[serial], number=1001).replace(issuing)

    return start_gateway(lab, tmp_path / "gw", _with_crl(lab, issuing)), revoke


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_a_session_resumed_after_its_certificate_was_revoked_is_refused(
    lab: LabLayout, tmp_path: Path, version: str
) -> None:
    """alice's session (a certificate of her own, on no CRL yet) is resumed after the issuing CA's CRL that lists it
    was published and the gateway loaded it: the resumed connection's request is refused at the revocation stage."""
    gw, revoke = _revocable_alice(lab, tmp_path, "alice-resumed")
    try:
        device = _Device(lab, gw.port, str(tmp_path / "alice-resumed"), VERSIONS[version])
        assert device.request() == (200, None, False)
        assert device.request()[::2] == (200, True)  # the session resumes
        gw.mark()
        revoke()
        gw.wait_event("crl_loaded", source=str(tmp_path / "issuing.crl"), crl_number=1001)
        assert device.request() == (403, "revocation", True)
    finally:
        gw.stop()


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_a_session_resumed_after_its_certificate_expired_is_refused(
    lab: LabLayout, tmp_path: Path, version: str
) -> None:
    """alice's certificate ends a few seconds after her session's full handshake; resumed after its notAfter, the
    connection's request is refused at the certificate stage (OpenSSL checks no validity on resumption)."""
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port()))
    try:
        life, deadline = 6.0, time.monotonic() + 300
        while True:
            leaf = expiring_alice(lab, tmp_path / "short", life)
            device = _Device(lab, gw.port, str(tmp_path / "short"), VERSIONS[version])
            first = device.request()
            if first[:2] == (200, None) and device.request()[::2] == (200, True):
                break
            assert datetime.now(UTC) > leaf.not_valid_after_utc, f"refused while valid: {first}"
            assert time.monotonic() < deadline
            life *= 2
        while datetime.now(UTC) <= leaf.not_valid_after_utc + timedelta(seconds=1):
            time.sleep(0.2)
        assert device.request() == (403, "certificate", True)
    finally:
        gw.stop()


USERS = 10
CONNECTIONS = 100  # 10 per user
REQUESTS = 5  # keep-alive requests per connection


def test_held_tokens_of_ten_users_on_a_hundred_connections_each_name_their_own_user(
    lab: LabLayout, tmp_path: Path
) -> None:
    """10 users, 100 keep-alive connections (10 each) sending 5 requests each all at once, with every user's ticket
    renewed in the background about every second (kerberos.ticket_recheck_seconds = 1: exchanges in the KDC threads
    read new held tickets while the event loop makes tokens on the others, and the replaced ones are freed): every
    request reaches the recording backend, and the ticket in each forwarded token, opened with HTTP/cas.lab.test's
    key by MIT's acceptor, is for the user of the connection it came on (client principal and PAC client-info)."""
    recorder = Recorder()
    text = lab_config(lab, port=free_port()).replace("[kerberos]\n", "[kerberos]\nticket_recheck_seconds = 1\n", 1)
    text += f'\n[[routes]]\nprefix = "/rec/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    assert "ticket_recheck_seconds = 1" in text
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        names = new_users(lab, [f"ht{uuid.uuid4().hex[:10]}" for _ in range(USERS)])
        contexts = {name: tls_context(lab, name, tmp_path) for name in names}
        for name in names:  # each user's first exchange: then the held tickets serve, renewed behind
            assert _crowd(gw, [(contexts[name], f"/rec/{name}/warm")])[0].startswith(b"HTTP/1.1 200 ")
        recorder.taken()
        kdc = KdcLog(lab.kdc_log)

        async def connection(name: str, n: int) -> list[bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=contexts[name])
            heads = []
            try:
                for i in range(REQUESTS):
                    await asyncio.sleep(0.08 * (1 + n % 7))  # the users' requests interleave, past the recheck
                    writer.write(f"GET /rec/{name}/{n}-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    await reader.readexactly(length)
                    heads.append(head.split(b"\r\n", 1)[0])
            finally:
                writer.close()
            return heads

        async def crowd() -> list[list[bytes]]:
            jobs = [connection(names[n % USERS], n) for n in range(CONNECTIONS)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 240)

        answers = asyncio.run(crowd())
        assert all(heads == [b"HTTP/1.1 200 OK"] * REQUESTS for heads in answers), answers
        taken = recorder.taken()
        assert len(taken) == CONNECTIONS * REQUESTS
        keys = session_keys(lab, taken)
        assert len(keys) == USERS
        everyone = [key for found in keys.values() for key in found]
        assert len(everyone) == len(set(everyone)), "two users' tokens on one service ticket"
        assert gw.events("delegation_failed") == []
        mine = {f"{name}@{REALM}" for name in names}
        renewed = Counter(r.user for r in kdc.settled() if r.extension == S4U2PROXY and r.user in mine)
        assert len(renewed) == USERS, renewed  # each user's ticket was replaced while the crowd ran
    finally:
        gw.stop()
        recorder.close()


def _answers(tls: ssl.SSLSocket, deadline: float) -> list[tuple[int, str | None]]:
    """Every answer on `tls` until the gateway ends the connection: (status, refused stage) each."""
    data = b""
    tls.settimeout(max(deadline - time.monotonic(), 1))
    while chunk := tls.recv(65536):
        data += chunk
    found = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        data = data[int(fields.get("content-length", "0")) :]
        found.append((int(lines[0].split()[1]), fields.get("x-kcd-refused-stage")))
    return found


def _one_answer(tls: ssl.SSLSocket) -> int:
    """The status of the next answer on `tls` (with a Content-Length), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        body += tls.recv(65536)
    return int(lines[0].split()[1])


def test_pipelined_requests_behind_a_held_one_are_judged_after_a_revocation(lab: LabLayout, tmp_path: Path) -> None:
    """On one keep-alive connection of alice's: a request the backend holds and two more pipelined behind it, in one
    write. Her certificate is revoked (a CRL published and loaded) while the first is held: the held one is ended
    with 403, and the two behind it, which the connection's memory of its first request would have served, are
    refused at the revocation stage too; none of them is answered 200."""
    gw, revoke = _revocable_alice(lab, tmp_path, "alice-piped")
    try:
        ctx = client_context(lab, str(tmp_path / "alice-piped"))
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=60) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _one_answer(tls) == 200  # the connection's first request: what the later ones are taken from
            # the first held at the backend: `100 Continue` comes once every stage said yes and it is forwarded
            tls.sendall(
                b"POST /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Lab-Hold-Seconds: 60\r\n"
                b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\n"
            )
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += tls.recv(1)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            plain = b"GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            tls.sendall(b"x" + plain + plain.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            revoke()
            answers = _answers(tls, time.monotonic() + 60)
        assert answers, "no answer"
        assert answers == [(403, "revocation")] * 3, answers
    finally:
        gw.stop()


@pytest.mark.parametrize("sessions", ["", "tls_session_cache = 0\n"], ids=["stateful", "stateless"])
def test_a_session_offered_to_the_other_worker_is_a_full_handshake(
    lab: LabLayout, tmp_path: Path, sessions: str
) -> None:
    """workers = 2 (each worker makes its own TLS context after the fork: its own session cache, its own ticket keys):
    alice's session, made by one worker, is offered again until a connection lands on the other worker. There the
    handshake is a full one (`tls_resumed` false on its summary line), served as alice; on the worker that made it,
    the session resumes. Stateful sessions (the default) and stateless tickets (tls_session_cache = 0) alike."""
    port = free_port()
    bind = f'bind = "127.0.0.1:{port}"\n'
    text = lab_config(lab, port=port).replace(bind, f"{bind}workers = 2\n{sessions}")
    assert "workers = 2" in text
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        deadline = time.monotonic() + 60
        while len({e["pid"] for e in gw.events("listening")}) < 2:
            assert time.monotonic() < deadline, "two workers did not listen"
            time.sleep(0.05)
        device = _Device(lab, gw.port, "alice", ssl.TLSVersion.TLSv1_3)
        gw.mark()
        assert device.request(keep=True) == (200, None, False)
        maker = gw.wait_event("request", upn="alice@lab.test")["pid"]
        seen: dict[bool, int] = {}  # resumed or not -> connections
        deadline = time.monotonic() + 120  # each lands on either worker by the kernel's hash of its address
        while time.monotonic() < deadline:
            gw.mark()
            status, _, resumed = device.request(keep=True)
            line = gw.wait_event("request", upn="alice@lab.test")
            assert status == 200, line
            assert resumed is line["tls_resumed"] is (line["pid"] == maker), line
            seen[resumed] = seen.get(resumed, 0) + 1
            if len(seen) == 2:
                break
        assert seen.get(False), f"no connection landed on the other worker: {seen}"
        assert seen.get(True), f"the session never resumed on the worker that made it: {seen}"
    finally:
        gw.stop()
