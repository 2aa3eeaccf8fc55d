"""A gateway stopped with SIGTERM drains: what an operator of a pool behind a balancer expects of a stop (a rolling
restart, `systemctl stop`, a pod deleted), against the real gateway, KDC and backend.

At SIGTERM the device listener closes (a balancer's next connection there is refused and sent to another gateway:
`option redispatch`), `/readyz` answers 503 naming the stop, kept-alive connections between requests close, and a
request in flight is answered (its connection then closes) for up to `listener.drain_timeout` seconds; what is still
in flight then is cut. Before, every connection was cut at once, a request in flight included: the device saw its
connection end without an answer, and the gateway logged it as the device's own hang-up (499).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, metric, start_gateway
from tests.integration.jsonlog import WAIT, eventually

SERVERS = ["own", "aiohttp"]


@dataclass
class Held:
    """A request alice's device sent on a connection of its own, answered (or cut) in a thread."""

    thread: threading.Thread
    status: list[int] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def result(self) -> tuple[int | None, BaseException | None]:
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the request neither ended nor was cut"
        return (self.status[0] if self.status else None), (self.error[0] if self.error else None)


def _send(lab: LabLayout, port: int, path: str) -> Held:
    """alice's request for `path`, on a new connection, in a thread of its own."""

    def run() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=90) as raw:
                ctx = client_context(lab, "alice")
                with ctx.wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
                    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n".encode())
                    response = http.client.HTTPResponse(tls)
                    response.begin()
                    held.body.append(response.read())
                    held.status.append(response.status)
        except (OSError, http.client.HTTPException) as e:
            held.error.append(e)

    held = Held(threading.Thread(target=run, daemon=True))
    held.thread.start()
    return held


def _gateway(lab: LabLayout, directory: Path, server: str, listener: str = "") -> tuple[Gateway, str]:
    """A gateway on device-side server `server` with `listener`'s lines and an admin listener; its admin URL."""
    admin = f"127.0.0.1:{free_port()}"
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\n')
    text = text.replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\n{listener}', 1)
    gw = start_gateway(lab, directory, text)
    return gw, f"http://{gw.admin}"  # moved if its port was taken meanwhile (`start_gateway`)


def _in_flight(admin: str, count: int = 1) -> None:
    """Wait until the gateway holds `count` requests (`kcd_requests_in_flight`)."""
    eventually(lambda: metric(admin, "kcd_requests_in_flight") >= count, f"{count} request(s) in flight")


def _readyz(admin: str) -> tuple[int, dict[str, object]] | None:
    """/readyz's status and body, or None when nothing answers there."""
    try:
        with urllib.request.urlopen(admin + "/readyz", timeout=30) as r:  # noqa: S310  loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None


def _not_ready(admin: str) -> tuple[int, dict[str, object]] | None:
    """/readyz's answer once it is 503, else None."""
    answer = _readyz(admin)
    return answer if answer is not None and answer[0] == 503 else None


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """Each device-side server (`listener.http_server`)."""
    return str(request.param)


def test_a_request_in_flight_at_sigterm_is_answered_before_the_gateway_exits(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A request the backend holds for 3 s when the gateway gets SIGTERM (the default drain_timeout) is answered 200
    as alice, and the gateway exits 0 after it. Before, the own server cut it at once: the device got no answer."""
    gw, admin = _gateway(lab, tmp_path, server)
    try:
        held = _send(lab, gw.port, "/EWS/Exchange.asmx?hold=3")
        _in_flight(admin)
        gw.mark()
        gw.proc.send_signal(signal.SIGTERM)
        status, error = held.result()
        assert (status, error) == (200, None)
        assert json.loads(held.body[0])["principal"] == "alice@LAB.TEST"
        assert gw.proc.wait(timeout=60) == 0
        assert [e.get("status") for e in gw.events("request", gw.since)] == [200]
        assert [e["outcome"] for e in gw.events("drained")] == ["finished"]
    finally:
        gw.stop()


def test_while_draining_readyz_says_stopping_new_connections_are_refused_and_the_rest_is_cut_at_drain_timeout(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """SIGTERM while a Ping is held (the backend holds it 60 s, past `drain_timeout = 4`): /readyz answers 503 with a
    `stopping` key (a balancer checking it takes the gateway out), a new connection to the device port is refused
    (a balancer sends it elsewhere), and at drain_timeout the held request is cut and the gateway exits 0, not
    before (it waited for it) and not after its 60 s."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 4\n")
    try:
        held = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60")
        _in_flight(admin)
        stopped_at = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        _, body = eventually(lambda: _not_ready(admin), "/readyz 503")
        assert "drain_timeout" in str(body["stopping"]), body
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gw.port), timeout=30).close()
        assert gw.proc.wait(timeout=60) == 0
        took = time.monotonic() - stopped_at
        assert 3.5 <= took < 40, took
        assert held.result()[0] is None  # cut: no answer came
        assert _readyz(admin) is None  # the admin listener closed with the gateway
        assert [e["outcome"] for e in gw.events("drained")] == ["drain_timeout"]
    finally:
        gw.stop()


def test_a_kept_alive_connection_between_requests_is_closed_at_once_and_the_stop_does_not_wait(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A device's kept-alive connection, idle after its answer, when the gateway gets SIGTERM (drain_timeout 30 s):
    the gateway closes it (the device reads the end of the connection, not a cut mid-answer) and exits 0 well within
    drain_timeout, waiting for nothing."""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n")
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            assert response.status == 200
            assert not response.will_close  # kept alive
            stopped_at = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(timeout=60) == 0
            assert time.monotonic() - stopped_at < 20
            try:
                rest = tls.recv(100)
            except OSError:
                rest = b""
            assert rest == b""
    finally:
        gw.stop()


def test_a_second_sigterm_during_the_drain_cuts_what_it_still_waits_for(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """SIGTERM while a Ping is held (drain_timeout 60 s), then, once /readyz says the gateway is stopping, a second
    SIGTERM (an operator's Ctrl-C again, or a service manager in a hurry): the held request is cut and the gateway
    exits 0 at once, its `drained` line saying why, not after the 60 s."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 60\n")
    try:
        held = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=120")
        _in_flight(admin)
        gw.proc.send_signal(signal.SIGTERM)
        eventually(lambda: _not_ready(admin), "/readyz 503")
        again = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=60) == 0
        assert time.monotonic() - again < 30
        assert held.result()[0] is None
        assert [e["outcome"] for e in gw.events("drained")] == ["second_signal"]
    finally:
        gw.stop()


def test_a_request_head_still_coming_in_at_sigterm_does_not_hold_the_stop(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A device that sent half a request head and then nothing (a slow client, slowloris) when the gateway gets
    SIGTERM (drain_timeout 30 s, keepalive_timeout 60 s): the gateway waits a moment for the rest, then closes it
    and exits 0 well before drain_timeout, its drain `finished`; a head nobody completes holds no stop."""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 30\nkeepalive_timeout = 60\n")
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\nX-Slow: ")
            gw.mark()
            stopped_at = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.proc.wait(timeout=60) == 0
            assert time.monotonic() - stopped_at < 20
        assert [e["outcome"] for e in gw.events("drained")] == ["finished"]
    finally:
        gw.stop()


def test_a_sighup_during_the_drain_does_not_hold_the_stop_past_drain_timeout(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """SIGTERM while a Ping is held (drain_timeout 4 s), then, while the gateway drains, its configuration names a CRL
    URL whose server never answers and a SIGHUP comes (logrotate's postrotate, an operator's reload racing a stop):
    the reload is not begun (`reload_ignored`), and the gateway exits 0 once drain_timeout has passed. Before, the
    reload fetched the new CRL, and the stop waited for it: the gateway exited at the fetch's 10 s timeout, past its
    drain_timeout and towards the service manager's SIGKILL."""
    gw, admin = _gateway(lab, tmp_path, server, listener="drain_timeout = 4\n")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never answers
        try:
            held = _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60")
            _in_flight(admin)
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/issuing.crl"
            text = gw.config_path.read_text()
            gw.config_path.write_text(text.replace("crls = [", f'crls = ["{url}", ', 1))
            gw.mark()
            stopped_at = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            eventually(lambda: _not_ready(admin), "/readyz 503")
            gw.proc.send_signal(signal.SIGHUP)
            assert gw.proc.wait(timeout=60) == 0
            took = time.monotonic() - stopped_at
            assert 3.5 <= took < 8.5, took
            assert len(gw.events("reload_ignored", gw.since)) == 1
            assert held.result()[0] is None
            assert gw.events("reloaded", gw.since) == []
            assert [e["outcome"] for e in gw.events("drained")] == ["drain_timeout"]
        finally:
            gw.stop()


def test_a_reload_under_way_at_sigterm_is_cancelled_and_does_not_hold_the_stop(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """A SIGHUP whose reload is fetching a CRL from a server that never answers (the fetch seen connecting), then
    SIGTERM with nothing in flight (drain_timeout 4 s): the reload is cancelled and the gateway exits 0 at once, no
    `reloaded` line. Before, the stop waited for the reload's fetch to time out (10 s) and then closed the gateway it
    had just swapped in."""
    gw, _ = _gateway(lab, tmp_path, server, listener="drain_timeout = 4\n")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        try:
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/issuing.crl"
            text = gw.config_path.read_text()
            gw.config_path.write_text(text.replace("crls = [", f'crls = ["{url}", ', 1))
            gw.mark()
            gw.proc.send_signal(signal.SIGHUP)
            silent.settimeout(60)
            fetch, _ = silent.accept()  # the reload is fetching the new CRL
            with fetch:
                stopped_at = time.monotonic()
                gw.proc.send_signal(signal.SIGTERM)
                assert gw.proc.wait(timeout=60) == 0
                took = time.monotonic() - stopped_at
            assert took < 4, took
            assert gw.events("reloaded", gw.since) == []
            assert [e["outcome"] for e in gw.events("drained")] == ["finished"]
        finally:
            gw.stop()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_readyz_and_the_log_name_the_signal_that_stops_the_gateway(
    lab: LabLayout, tmp_path: Path, stop: signal.Signals
) -> None:
    """SIGINT (Ctrl-C where the gateway runs in a terminal) or SIGTERM while a Ping is held: /readyz's `stopping` text
    and the `stopping` line name the signal that came, not the other (every stop was called SIGTERM); the same signal
    again cuts the drain."""
    gw, admin = _gateway(lab, tmp_path, "own", listener="drain_timeout = 60\n")
    try:
        _send(lab, gw.port, "/Microsoft-Server-ActiveSync?Cmd=Ping&hold=60")
        _in_flight(admin)
        gw.proc.send_signal(stop)
        _, body = eventually(lambda: _not_ready(admin), "/readyz 503")
        other = signal.SIGINT if stop is signal.SIGTERM else signal.SIGTERM
        text = str(body["stopping"])
        assert f"({stop.name})" in text, text
        assert other.name not in text, text
        assert gw.wait_event("stopping")["signal"] == stop.name
        gw.proc.send_signal(stop)  # again: what the drain waits for is cut
        assert gw.proc.wait(timeout=60) == 0
        assert [e["outcome"] for e in gw.events("drained")] == ["second_signal"]
    finally:
        gw.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_signal_after_stopped_does_not_end_the_gateway_by_it(
    lab: LabLayout, tmp_path: Path, sig: signal.Signals, loop: str
) -> None:
    """review61: SIGTERM, then, from the moment `stopped` is written until the process is gone, the signal again and
    again (a process manager repeating SIGTERM, Ctrl-C held down, a reload sent as it ends). Once its handlers were
    removed they had their default back: the process ended by the signal (-15, -2 with KeyboardInterrupt tracebacks,
    -1), some before `stopped` was written, its krb5.conf overlay left. Now `stopped` is written once they are ignored:
    the process ends 0, `stopped` its last line, its overlay removed."""
    text = lab_config(lab, port=free_port()).replace("[listener]\n", f'[listener]\nevent_loop = "{loop}"\n', 1)
    gw = start_gateway(lab, tmp_path / "gw", text)
    pid = gw.proc.pid
    overlays = Path(os.environ.get("TMPDIR", "/tmp")).glob
    assert list(overlays(f"kcd-proxy-krb5-{pid}-*.conf")), "the witness: the gateway wrote its overlay"
    sent = 0
    gw.proc.send_signal(signal.SIGTERM)
    with gw.log_path.open("rb") as log, contextlib.suppress(ProcessLookupError):
        seen, deadline = b"", time.monotonic() + WAIT
        while b'"event": "stopped"' not in seen and gw.proc.poll() is None:  # read as it is written
            assert time.monotonic() < deadline, seen[-2000:]
            seen += log.read()
        while gw.proc.poll() is None:  # as fast as it can, 0.2 ms apart
            os.kill(pid, sig)
            sent += 1
            time.sleep(0.0002)
    text = gw.log_path.read_text()
    assert (gw.proc.wait(), "Traceback" in text) == (0, False), (sent, text[-3000:])
    assert gw.logs()[-1]["event"] == "stopped", gw.logs()[-3:]
    assert not list(overlays(f"kcd-proxy-krb5-{pid}-*.conf"))
