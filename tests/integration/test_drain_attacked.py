"""newcomer7's drain at SIGTERM attacked by hostile or careless devices (review42), against the real gateway, KDC and
backend: an upload that never ends and a held Ping cut at drain_timeout (the stop's bound, and the log naming what was
cut), a pipelined second request behind one answered `Connection: close`, a 100-continue upload begun on a connection
whose handshake ended as the stop came, a TLS handshake half done at SIGTERM, two workers, SIGINT and
`drain_timeout = 0`. Nothing may be forwarded twice or as another user, and the stop ends within drain_timeout and a
small bound.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually, whole_json_lines
from tests.integration.test_drain import SERVERS, _gateway, _in_flight, _not_ready, _send

# How far past drain_timeout a drain may end: a poll's 50 ms and a loaded machine's late timers, not a second timeout
LATE = 1.5


class Trickle:
    """alice's POST of a 100 MB body, 100 bytes every 0.2 s (within client_body_timeout), in a thread: an upload that
    would outlast any drain."""

    def __init__(self, lab: LabLayout, port: int) -> None:
        self.ended = threading.Event()
        self.cut: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(lab, port), daemon=True)
        self._thread.start()

    def _run(self, lab: LabLayout, port: int) -> None:
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=60)
            with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
                tls.sendall(
                    b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nContent-Length: 100000000\r\n\r\n"
                )
                while not self._stop.is_set():
                    tls.sendall(b"x" * 100)
                    self._stop.wait(0.2)
        except OSError as e:
            self.cut.append(e)
        finally:
            self.ended.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """Each device-side server (`listener.http_server`)."""
    return str(request.param)


@pytest.fixture
def trickles() -> Iterator[list[Trickle]]:
    """Uploads a test starts, stopped at its end whatever became of them."""
    started: list[Trickle] = []
    yield started
    for trickle in started:
        trickle.close()


def _answered_as_alice_closing(tls: ssl.SSLSocket) -> None:
    """The answer read on `tls`: 200, the backend saw alice, and `Connection: close` (the drain's last answer)."""
    response = http.client.HTTPResponse(tls)
    response.begin()
    echo = json.loads(response.read())
    assert (response.status, echo["principal"]) == (200, "alice@LAB.TEST")
    assert response.will_close


def test_what_outlasts_the_drain_is_cut_at_drain_timeout_and_logged_as_cut_by_the_stop(
    lab: LabLayout, tmp_path: Path, server: str, trickles: list[Trickle]
) -> None:
    """An upload that never ends (100 bytes every 0.2 s) and a held Ping when the gateway gets SIGTERM
    (drain_timeout 3 s): the drain ends at drain_timeout, not later, and the log says what it cut: `drained` counts
    the two requests (`cut`), and each one's summary line says `cut: drain_timeout`, not only 499 (the status of a
    device that hung up). Before, aiohttp's server waited drain_timeout twice (its shutdown waits for the handler,
    then again for it once cancelled: 40 s at the default 20, past systemd's 30 s), and both servers logged the two
    as 499 alone, as if the devices had gone."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 3\nclient_body_timeout = 30\n")
    try:
        trickles.append(Trickle(lab, gw.port))
        ping = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60")
        _in_flight(admin, 2)
        gw.mark()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=60) == 0
        (drained,) = gw.events("drained", gw.since)
        assert drained["outcome"] == "drain_timeout"
        assert drained["seconds"] < 3 + LATE, drained
        assert drained["cut"] == 2, drained
        lines = gw.events("request", gw.since)
        assert sorted(line["path"] for line in lines) == ["/EWS/Exchange.asmx", "/Microsoft-Server-ActiveSync"]
        assert [(line["status"], line.get("cut")) for line in lines] == [(499, "drain_timeout")] * 2, lines
        assert ping.result()[0] is None  # no answer came
        assert trickles[0].ended.wait(30)
    finally:
        gw.stop()


def test_a_request_cut_by_a_second_signal_is_logged_as_such(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """A held Ping, SIGTERM (drain_timeout 60 s), then SIGINT (Ctrl-C again): the Ping's summary line says
    `cut: second_signal` and `drained` counts it."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 60\n")
    try:
        ping = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=120")
        _in_flight(admin)
        gw.mark()
        gw.proc.send_signal(signal.SIGTERM)
        eventually(lambda: _not_ready(admin), "/readyz 503")
        gw.proc.send_signal(signal.SIGINT)
        assert gw.proc.wait(timeout=60) == 0
        assert ping.result()[0] is None
        (drained,) = gw.events("drained", gw.since)
        assert (drained["outcome"], drained["cut"]) == ("second_signal", 1)
        assert [(e["status"], e.get("cut")) for e in gw.events("request", gw.since)] == [(499, "second_signal")]
    finally:
        gw.stop()


def test_a_pipelined_request_behind_one_answered_during_the_drain_is_never_forwarded(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Two requests sent at once on one connection, the first held 2 s by the backend, when SIGTERM comes: the first
    is answered 200 as alice with `Connection: close`, the connection then ends, and the second is neither answered
    nor forwarded (one `request` line, the backend saw one request): a device sends it again elsewhere, and nothing
    reaches the backend twice."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            tls.sendall(
                b"GET /EWS/Exchange.asmx?hold=2 HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n"
                b"POST /EWS/Exchange.asmx?second=1 HTTP/1.1\r\nHost: proxy.lab.test\r\nContent-Length: 2\r\n\r\nhi"
            )
            _in_flight(admin)
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            _answered_as_alice_closing(tls)
            rest = b""
            try:
                while chunk := tls.recv(4096):
                    rest += chunk
            except OSError:
                pass
            assert rest == b""
        assert gw.proc.wait(timeout=60) == 0
        assert [e["path"] for e in gw.events("request", gw.since)] == ["/EWS/Exchange.asmx"]
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
    finally:
        gw.stop()


@pytest.mark.parametrize("server", SERVERS)
def test_a_first_request_sent_just_after_sigterm_is_answered(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """A connection whose handshake ended before SIGTERM sends its first request just after it (in the grace for a
    first request, `UNUSED_GRACE`), as one the kernel had queued for a worker that drains does once that worker
    accepts it (`test_workers_leaving`): answered 200 as alice with `Connection: close` on both device-side servers,
    and the gateway exits 0 (drain `finished`). Before, aiohttp's shutdown closed it at once, before its request
    came: `RemoteDisconnected`."""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            gw.wait_event("stopping")
            tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n")
            _answered_as_alice_closing(tls)
        assert gw.proc.wait(timeout=60) == 0
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
    finally:
        gw.stop()


def test_a_100_continue_upload_begun_just_after_sigterm_is_answered(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A connection whose handshake ended before SIGTERM sends its head with `Expect: 100-continue` just after it (in
    the grace for a first request, `UNUSED_GRACE`, on either device-side server): it gets `100 Continue`, sends its
    body, and is answered 200 as alice with `Connection: close`; the gateway then exits 0 (drain `finished`). (A first
    request without `Expect`: `test_a_first_request_sent_just_after_sigterm_is_answered`.)"""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            gw.wait_event("stopping")
            body = b"y" * 5000
            tls.sendall(
                b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nExpect: 100-continue\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            interim = b""
            while b"\r\n\r\n" not in interim:
                chunk = tls.recv(1)
                assert chunk, interim
                interim += chunk
            assert interim.startswith(b"HTTP/1.1 100"), interim
            tls.sendall(body)
            _answered_as_alice_closing(tls)
        assert gw.proc.wait(timeout=60) == 0
        assert [e["status"] for e in gw.events("request", gw.since)] == [200]
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
    finally:
        gw.stop()


def test_an_upload_half_sent_at_sigterm_is_answered(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """A request whose head and half its body came before SIGTERM sends the rest after it: answered 200 as alice with
    `Connection: close`, the gateway then exits 0 (drain `finished`) well before drain_timeout. Before, on aiohttp's
    server, its shutdown dropped the rest of the body (`receiving_body`): the request waited until cut at
    drain_timeout (499)."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            body = b"z" * 6000
            tls.sendall(
                b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:3000]
            )
            _in_flight(admin)
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            gw.wait_event("stopping")
            tls.sendall(body[3000:])
            _answered_as_alice_closing(tls)
        assert gw.proc.wait(timeout=60) == 0
        assert [e["status"] for e in gw.events("request", gw.since)] == [200]
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
    finally:
        gw.stop()


def test_an_upload_stalled_at_sigterm_is_cut_by_a_second_sigterm(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """A request whose body stalls half sent (drain_timeout 30 s) holds the stop, as a request in flight does, until a
    second SIGTERM: then the gateway exits 0 at once, `drained` says `second_signal` and the request is cut (499)."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            tls.sendall(
                b"POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nContent-Length: 6000\r\n\r\n"
                + b"z" * 3000
            )
            _in_flight(admin)
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            gw.wait_event("stopping")
            assert gw.proc.poll() is None
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(timeout=20) == 0
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["second_signal"]
        assert [e["status"] for e in gw.events("request", gw.since)] == [499]
    finally:
        gw.stop()


def test_an_idle_keepalive_starting_a_request_in_aiohttps_first_request_grace_is_answered_and_closed(
    lab: LabLayout, tmp_path: Path
) -> None:
    """On aiohttp's server, a connection that was answered once before SIGTERM (an idle keep-alive) sends its next
    request while the stop waits for another connection's first request (`UNUSED_GRACE`): answered 200 as alice with
    `Connection: close`, and the connection then closed, never left open for a third request; the gateway exits 0
    (drain `finished`). (The own server closes an idle keep-alive at once: `drain`.)"""
    gw, _ = _gateway(lab, tmp_path, "aiohttp", listener="drain_timeout = 30\n")
    try:
        idle = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        waiting = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        ctx = client_context(lab, "alice")
        with (
            ctx.wrap_socket(idle, server_hostname="proxy.lab.test") as a,
            ctx.wrap_socket(waiting, server_hostname="proxy.lab.test"),
        ):
            gw.mark()
            get = b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n"
            a.sendall(get)
            first = http.client.HTTPResponse(a)
            first.begin()
            first.read()
            assert (first.status, first.will_close) == (200, False)
            gw.proc.send_signal(signal.SIGTERM)
            gw.wait_event("stopping")
            a.sendall(get)
            second = http.client.HTTPResponse(a)
            second.begin()
            echo = json.loads(second.read())
            assert (second.status, echo["principal"], second.will_close) == (200, "alice@LAB.TEST", True)
            assert a.recv(1) == b""  # closed after it
        assert gw.proc.wait(timeout=60) == 0
        assert [e["status"] for e in gw.events("request", gw.since)] == [200, 200]
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
    finally:
        gw.stop()


def test_a_tls_handshake_half_done_at_sigterm_does_not_hold_the_stop(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A device that sent its ClientHello and then nothing more (handshake_timeout 60 s, drain_timeout 30 s) when the
    gateway gets SIGTERM: the stop waits a moment for it, then exits 0 well before drain_timeout (drain `finished`),
    with no request line."""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\nhandshake_timeout = 60\n")
    try:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=60) as raw:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            half = client_context(lab, "alice").wrap_bio(incoming, outgoing, server_hostname="proxy.lab.test")
            with pytest.raises(ssl.SSLWantReadError):
                half.do_handshake()
            raw.sendall(outgoing.read())  # the ClientHello; the rest never comes
            raw.recv(1)  # the gateway's ServerHello has come: it holds the handshake
            gw.mark()
            stopped_at = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(timeout=60) == 0
            assert time.monotonic() - stopped_at < 20
        assert [e["outcome"] for e in gw.events("drained", gw.since)] == ["finished"]
        assert gw.events("request", gw.since) == []
    finally:
        gw.stop()


def test_drain_timeout_0_cuts_a_held_request_at_once(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """`drain_timeout = 0` (requests in flight cut at once): a held Ping is cut, logged `cut: drain_timeout`, and the
    gateway exits 0 without waiting for the backend's 60 s."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 0\n")
    try:
        ping = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60")
        _in_flight(admin)
        gw.mark()
        stopped_at = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=60) == 0
        assert time.monotonic() - stopped_at < 20
        assert ping.result()[0] is None
        (drained,) = gw.events("drained", gw.since)
        assert (drained["outcome"], drained["cut"]) == ("drain_timeout", 1)
        assert drained["seconds"] < LATE
        assert [e.get("cut") for e in gw.events("request", gw.since)] == ["drain_timeout"]
    finally:
        gw.stop()


def _in_flight_all(admin: str, count: int) -> None:
    """Wait until the workers together hold `count` requests (`kcd_requests_in_flight`, one sample per worker)."""

    def held() -> bool:
        with urllib.request.urlopen(admin + "/metrics", timeout=30) as r:  # noqa: S310  loopback
            lines = r.read().decode().splitlines()
        samples = [line for line in lines if line.startswith(("kcd_requests_in_flight ", "kcd_requests_in_flight{"))]
        return sum(float(line.rpartition(" ")[2]) for line in samples) >= count

    eventually(held, f"{count} request(s) in flight")


def test_two_workers_each_drain_and_the_supervisor_waits_for_the_last(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Two workers, six requests held 60 s and then six held 10 s (the kernel spreads the connections over the
    workers), SIGTERM to the supervisor (drain_timeout 15 s): each worker logs `drained`, together counting the six
    60 s requests as cut, the 10 s ones are answered 200, the 60 s ones cut, and the supervisor exits 0 after both
    workers stopped, within drain_timeout and a small bound."""
    admin = f"127.0.0.1:{free_port()}"
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\n')
    text = text.replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\nworkers = 2\ndrain_timeout = 15\n', 1)
    gw = start_gateway(lab, tmp_path, text)
    try:
        gw.wait_events("listening", 2)
        long = [_send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60") for _ in range(6)]
        _in_flight_all(f"http://{gw.admin}", 6)
        short = [_send(lab, gw.port, "/EWS/Exchange.asmx?hold=10") for _ in range(6)]
        _in_flight_all(f"http://{gw.admin}", 12)
        gw.mark()
        stopped_at = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=90) == 0
        took = time.monotonic() - stopped_at
        assert took < 15 + 10, took
        drained = gw.events("drained", gw.since)
        assert len(drained) == 2  # one per worker (which one holds what is the kernel's choice)
        assert "drain_timeout" in {e["outcome"] for e in drained}
        assert sum(e["cut"] for e in drained) == 6
        assert [h.result()[0] for h in short] == [200] * 6
        assert [h.result()[0] for h in long] == [None] * 6
        last_drained = max(e["timestamp"] for e in drained)
        (stopped,) = gw.events("supervisor_stopped", gw.since)
        assert stopped["timestamp"] >= last_drained
    finally:
        gw.stop()


def test_a_sigterm_while_the_gateway_starts_ends_it_without_listening(lab: LabLayout, tmp_path: Path) -> None:
    """SIGTERM while the gateway starts, fetching a CRL from a server that accepts and never answers (drain_timeout
    4 s): it exits 0 within drain_timeout, its start-up cancelled, and never listens. Before, the start went on to the
    fetch's 10 s timeout (`FETCH_TIMEOUT`), then opened its listener (a balancer's check could see it up) and only
    then stopped: 10.9 s for a stop asked for before anything was served."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/issuing.crl"
        text = lab_config(lab, port=free_port()).replace("crls = [", f'crls = ["{url}", ', 1)
        text = text.replace("[listener]\n", "[listener]\ndrain_timeout = 4\n", 1)
        config = tmp_path / "gateway.toml"
        config.write_text(text)
        log = tmp_path / "gateway.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **lab.env()},
            )
        try:
            silent.settimeout(60)
            fetch, _ = silent.accept()  # the start is fetching the CRL
            with fetch:
                stopped_at = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
                took = time.monotonic() - stopped_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = [e.get("event") for e in whole_json_lines(log)]
    assert "listening" not in events, events
    assert events[-3:] == ["stopping", "drained", "stopped"], events
    assert took < 4, took


@contextlib.contextmanager
def _downloading(lab: LabLayout, gw: Gateway, size: int) -> Iterator[tuple[ssl.SSLSocket, bytes]]:
    """alice's device asking for a `size`-byte answer on a connection of its own with a 16 KiB receive buffer, once
    its head is read: 200 with that Content-Length. Yields the connection and the body bytes read with the head."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(f"GET /EWS/Exchange.asmx?lab_body_bytes={size} HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(4096)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        assert f"content-length: {size}".encode() in head.lower(), head
        yield tls, body


def test_a_download_to_a_device_that_stopped_reading_is_cut_at_drain_timeout(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A 200 MB answer streamed to alice's device, which read its head and then stopped reading, when the gateway gets
    SIGTERM (drain_timeout 3 s): the drain ends at drain_timeout, `drained` counts the download as cut, its summary
    line says `cut: drain_timeout`, and the device, reading again, gets the end of the connection well short of the
    body (not a body cut short that looks whole: the answer's Content-Length says what was missed)."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 3\n")
    try:
        size = 200_000_000
        with _downloading(lab, gw, size) as (tls, body):
            _in_flight(admin)
            gw.mark()
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(timeout=60) == 0
            received = len(body)
            try:
                while chunk := tls.recv(65536):
                    received += len(chunk)
            except OSError:
                pass
            assert received < size
        (drained,) = gw.events("drained", gw.since)
        assert drained["outcome"] == "drain_timeout"
        assert drained["seconds"] < 3 + LATE, drained
        assert drained["cut"] == 1, drained
        assert [(e["path"], e.get("cut")) for e in gw.events("request", gw.since)] == [
            ("/EWS/Exchange.asmx", "drain_timeout")
        ]
    finally:
        gw.stop()


def test_an_answer_a_slow_device_is_still_reading_at_sigterm_reaches_it_whole(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """alice's device downloads 8 MB, reading 16 KiB at a time with a pause: the gateway's handler ends (its summary
    line written) while megabytes are still buffered for the device, and SIGTERM comes then (drain_timeout 30 s). The
    device reads on, at its pace, and gets the whole body (Content-Length bytes) before the connection ends."""
    gw, _admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        size = 8_000_000
        with _downloading(lab, gw, size) as (tls, body):
            received, signalled = len(body), False
            gw.mark()
            try:
                while received < size:
                    chunk = tls.recv(16384)
                    if not chunk:
                        break
                    received += len(chunk)
                    time.sleep(0.01)
                    if not signalled and gw.events("request", gw.since):
                        gw.proc.send_signal(signal.SIGTERM)
                        signalled = True
            except OSError:
                pass
            assert signalled, "the summary line came only after the last byte was read"
            assert received == size, f"{received} of {size} bytes"
        assert gw.proc.wait(timeout=60) == 0
    finally:
        gw.stop()
