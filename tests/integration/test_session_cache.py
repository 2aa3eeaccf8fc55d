"""The listener's TLS sessions: kept in the gateway's cache, named by the ticket, bounded by
`listener.tls_session_cache` (`proxy.tls.server._session_tickets`).

A stateless ticket seals the whole session (the client's certificate included) in the ticket, and OpenSSL 3.0 makes
each one by encoding, decoding and encoding the session again; a stateful one only names a session the gateway keeps.
These tests pin what a device sees and what a hostile one can make the gateway hold: resumption by ticket (TLS 1.3)
and by session ID (TLS 1.2), a flood of full handshakes that cannot grow the cache past its bound, a session whose
connection was reset forgotten, an unknown or another gateway's ticket answered with a full handshake, and 0 keeping
OpenSSL's stateless tickets. Real TLS on loopback: the gate (`TlsGate`) with the context the gateway makes from the
lab's configuration, and a Python client or `openssl s_client` presenting alice's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import config as config_module
from proxy.lab.layout import LabLayout
from proxy.tls import server as tls_server
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, s_client_resumed


def _context(lab: LabLayout, tmp_path: Path, listener: str = "") -> ssl.SSLContext:
    """The listener's context as the gateway makes it from the lab's configuration, with `listener` keys added."""
    text = lab_config(lab, port=free_port()).replace("[listener]\n", f"[listener]\n{listener}", 1)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return tls_server.server_context(config_module.load(path))


class _Peer(asyncio.Protocol):
    """A server that takes the TLS records (as the gateway's own does): answers each read with the DER of the
    certificate of the connection's TLS session, then closes (with close_notify)."""

    takes_tls_records = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tls_server.socket_transport(transport)

    def data_received(self, data: bytes) -> None:
        der = self.transport.get_extra_info("ssl_object").getpeercert(True)
        self.transport.write(der or b"none")
        self.transport.close()


class _Listener:
    """`TlsGate` in front of `_Peer` on a loopback port, on a loop of its own thread."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            self.loop.create_server(lambda: tls_server.TlsGate(_Peer(), ctx, 10), "127.0.0.1", 0)
        )
        self.port: int = self.server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def sessions(self) -> int:
        return int(self.ctx.session_stats()["number"])

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.server.close()
        self.loop.close()


class _Device:
    """A device's TLS client (one context, so that its sessions can be offered again: Python ties a session to the
    context that made it)."""

    def __init__(self, lab: LabLayout, user: str, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> None:
        self.lab = lab
        self.ctx = client_context(lab, user)
        self.ctx.minimum_version = self.ctx.maximum_version = version

    def become(self, user: str) -> None:
        """Present `user`'s certificate from now on (the sessions already made stay offerable)."""
        users = self.lab.pki_dir / "users"
        self.ctx.load_cert_chain(users / f"{user}.pem", users / f"{user}.key")

    def connect(self, port: int, session: ssl.SSLSession | None = None) -> tuple[bytes, bool, ssl.SSLSession]:
        """One connection (resuming `session` if given): the certificate the server's session carries, whether the
        session was resumed, and the session to offer next."""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            self.ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"who")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            assert tls.session is not None
            return answer, bool(tls.session_reused), tls.session

    def connect_and_reset(self, port: int) -> ssl.SSLSession:
        """A full handshake, the ticket read, then a reset (SO_LINGER 0) before any request: no close_notify either
        way."""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            self.ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.settimeout(0.1)
            deadline = time.monotonic() + 30
            while tls.session is None or not tls.session.has_ticket:  # the ticket comes after the handshake
                assert time.monotonic() < deadline, "no session ticket came"
                with contextlib.suppress(TimeoutError):
                    assert tls.recv(1) == b"", "the gate answered before a request"
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return tls.session


def _der(lab: LabLayout, user: str) -> bytes:
    cert = x509.load_pem_x509_certificates((lab.pki_dir / "users" / f"{user}.pem").read_bytes())[0]
    return cert.public_bytes(Encoding.DER)


def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_session_is_kept_by_the_gateway_and_resumed_by_its_ticket(lab: LabLayout, tmp_path: Path) -> None:
    """By default a full TLS 1.3 handshake leaves its session in the listener's cache (a stateless ticket leaves
    none), and the device resumes with the ticket naming it: the resumed connection carries alice's certificate."""
    gate, device = _Listener(_context(lab, tmp_path)), _Device(lab, "alice")
    try:
        first, resumed, session = device.connect(gate.port)
        assert (first, resumed) == (_der(lab, "alice"), False)
        assert gate.sessions() == 1
        second, resumed, _ = device.connect(gate.port, session)
        assert (second, resumed) == (_der(lab, "alice"), True)
        assert gate.ctx.session_stats()["hits"] == 1
    finally:
        gate.close()


def test_a_flood_of_full_handshakes_keeps_at_most_tls_session_cache_sessions(lab: LabLayout, tmp_path: Path) -> None:
    """tls_session_cache = 4: a client making ten full handshakes (a flood that would each cost the gateway a
    session) leaves at most four sessions in the cache (OpenSSL 3.0 keeps three once it is full); the oldest are
    dropped (their device gets a full handshake, served as itself), the newest still resumes."""
    gate, device = _Listener(_context(lab, tmp_path, "tls_session_cache = 4\n")), _Device(lab, "alice")
    try:
        sessions = [device.connect(gate.port)[2] for _ in range(10)]
        stats = gate.ctx.session_stats()
        assert 3 <= stats["number"] <= 4, stats
        assert stats["cache_full"] >= 6, stats
        assert device.connect(gate.port, sessions[0])[:2] == (_der(lab, "alice"), False)
        assert device.connect(gate.port, sessions[-1])[:2] == (_der(lab, "alice"), True)
        assert gate.sessions() <= 4
    finally:
        gate.close()


def test_a_session_whose_connection_was_reset_is_forgotten(lab: LabLayout, tmp_path: Path) -> None:
    """OpenSSL drops from the cache the session of a connection that ended without the gateway's close_notify: a
    device that reset its connection gets a full handshake next time (served as alice); with a stateless ticket
    it would have resumed."""
    gate, device = _Listener(_context(lab, tmp_path)), _Device(lab, "alice")
    try:
        session = device.connect_and_reset(gate.port)
        _until(lambda: gate.sessions() == 0, "the reset connection's session stayed in the cache")
        assert device.connect(gate.port, session)[:2] == (_der(lab, "alice"), False)
    finally:
        gate.close()


def test_another_gateways_ticket_is_a_full_handshake_as_the_certificate_says(lab: LabLayout, tmp_path: Path) -> None:
    """A ticket the listener did not issue (another worker's, a gateway's before a reload, or one copied from
    alice's device by bob) names no session here: the handshake is a full one, and the connection carries the
    certificate bob presents, never the ticket's alice."""
    device = _Device(lab, "alice")
    other = _Listener(_context(lab, tmp_path))
    try:
        alices = device.connect(other.port)[2]
    finally:
        other.close()
    gate = _Listener(_context(lab, tmp_path))
    device.become("bob")
    try:
        assert device.connect(gate.port, alices)[:2] == (_der(lab, "bob"), False)
        assert gate.ctx.session_stats()["misses"] == 1
    finally:
        gate.close()


def test_tls_session_cache_0_sends_stateless_tickets(lab: LabLayout, tmp_path: Path) -> None:
    """tls_session_cache = 0 keeps OpenSSL's stateless tickets: no session in the cache, and the device resumes."""
    gate, device = _Listener(_context(lab, tmp_path, "tls_session_cache = 0\n")), _Device(lab, "alice")
    try:
        session = device.connect(gate.port)[2]
        assert gate.sessions() == 0
        assert device.connect(gate.port, session)[:2] == (_der(lab, "alice"), True)
    finally:
        gate.close()


def test_a_tls_1_2_device_resumes_by_session_id(lab: LabLayout, gateway: Gateway, tmp_path: Path) -> None:
    """A TLS 1.2 device (no ticket now: the session ID names the cached session) resumes its next connection with
    `openssl s_client -sess_in` and is served as alice again."""
    first, second = s_client_resumed(lab, gateway.port, "-tls1_2", tmp_path / "alice-tls12.session")
    assert b"x-lab-principal: alice@lab.test" in first.lower(), first
    assert b"Reused, TLSv1.2" in second, second
    assert b"x-lab-principal: alice@lab.test" in second.lower(), second
