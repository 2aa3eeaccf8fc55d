"""A connection-bound route's token is made once the backend connection is open: on a ticket valid then.

The lab's MIT KDC issues 5-second tickets to a gateway principal of its own (`-maxlife "5 seconds"`), and the
backend is reached through a listener that keeps its accept queue full until the request's ticket has ended (its
S4U2Proxy in the KDC's log, then its life and a second): Linux drops the gateway's SYN meanwhile, and its connect
(SYN sent again after 1, 3, 7, 15 s) succeeds only after the ticket taken before it has expired. A relay then carries
the connection to the lab's backend.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from proxy.lab.kdclog import S4U2PROXY, KdcLog
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_rotated_keys import gateway_principal
from tests.integration.test_ticket_cache import _certificate_for, _kadmin

USER = "alice@LAB.TEST"
TICKET_LIFE = 5.0  # the gateway principal's maxlife: its TGT, the evidence and the service tickets end within it


def _delegated(kdc: KdcLog, user: str = USER) -> int:
    """`user`'s S4U2Proxy requests in the KDC's log since `kdc` was made."""
    return sum(r.extension == S4U2PROXY and r.user == user for r in kdc.requests())


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy `source` to `sink` until `source` ends, then end `sink`'s sending side."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def slow_to_accept(backend_port: int, hold: Callable[[threading.Event], None]) -> Iterator[int]:
    """A port whose accept queue is full (a connection of its own waits in it, never accepted) until `hold` returns
    (given an event set when the test ends): a connect to it gets no SYN-ACK meanwhile and retries. Then every
    connection it accepts is relayed to `backend_port`. Yields the port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # one connection fills the queue
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()
    sockets = [listener, filler]

    def serve() -> None:
        hold(stop)
        listener.accept()[0].close()  # the filler: the queue has room for the gateway's next SYN
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                device_side, _ = listener.accept()
            except TimeoutError:
                continue
            backend = socket.create_connection(("127.0.0.1", backend_port))
            sockets.extend((device_side, backend))
            for a, b in ((device_side, backend), (backend, device_side)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield port
    finally:
        stop.set()
        server.join(WAIT)
        for s in sockets:
            s.close()


@contextlib.contextmanager
def slow_gateway(
    lab: LabLayout, tmp_path: Path, user: str, meanwhile: Callable[[], None]
) -> Iterator[tuple[Gateway, str]]:
    """A gateway with 5-second tickets and a connection-bound route `/slow/` to a backend that accepts only once the
    request's ticket has ended: `user`'s S4U2Proxy in the KDC's log, then `meanwhile()`, then the ticket's life and a
    second. Yields the gateway and its admin listener's URL (the traces)."""
    opened, kdc = threading.Event(), KdcLog(lab.kdc_log)

    def until_the_ticket_ended(stop: threading.Event) -> None:
        """Until the request's service ticket has ended: its S4U2Proxy in the KDC's log, then its life and a second."""
        if not opened.wait(WAIT):
            return
        deadline = time.monotonic() + WAIT
        while not stop.is_set() and not _delegated(kdc, user) and time.monotonic() < deadline:
            stop.wait(0.05)
        meanwhile()
        stop.wait(TICKET_LIFE + 1)  # the backend being slow for that long: the condition under test

    with (
        gateway_principal(lab, tmp_path, f'-maxlife "{TICKET_LIFE:g} seconds"') as own,
        slow_to_accept(lab.backend_port, until_the_ticket_ended) as port,
    ):
        admin_port = free_port()
        extra = f"""
[admin]
bind = "127.0.0.1:{admin_port}"

[[routes]]
prefix = "/slow/"
upstream = "http://127.0.0.1:{port}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"
connect_timeout = 30
"""
        text = lab_config(lab, port=free_port(), extra=extra)
        text = text.replace(f'principal = "{PROXY_SERVICE}@{REALM}"', f'principal = "{own.principal}@{REALM}"', 1)
        text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{own.keytab}"', 1)
        gw = start_gateway(lab, tmp_path / "gateway", text)
        try:
            opened.set()
            yield gw, f"http://{gw.admin}"
        finally:
            gw.stop()


def _slow_request(lab: LabLayout, gw: Gateway, cert: Path, key: Path) -> tuple[str, str, float]:
    """curl to the slow route presenting `cert`: the status, the body and the seconds it took."""
    cmd = ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem"), "--cert", str(cert)]
    cmd += ["--key", str(key), "-w", "\n%{http_code}", f"{gw.url}/slow/EWS/Exchange.asmx"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    body, _, status = done.stdout.rpartition("\n")
    return status, body + done.stderr, time.monotonic() - start


def _trace_of(admin: str, upn: str) -> dict[str, Any]:
    """The gateway's one trace record of `upn` (recorded once the answer has gone out: polled)."""

    def found() -> dict[str, Any] | None:
        url = f"{admin}/traces?limit=10&user={upn}"
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310  a loopback test URL
            records: list[dict[str, Any]] = json.loads(r.read())
        return records[0] if records else None

    return eventually(found, f"the trace of {upn}")


def _kerberos_steps(record: dict[str, Any]) -> list[tuple[str, bool]]:
    """The trace's KDC steps in order: (name, whether it is the exchange made again once the connection was open)."""
    return [(s["name"], bool(s.get("again"))) for s in record["stages"] if s["name"] in ("s4u2self", "s4u2proxy")]


def test_a_token_is_made_on_a_ticket_valid_once_a_slow_backend_connection_is_open(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The ticket taken before a connect that took longer than its life (5 s tickets, a backend that accepts only
    once that ticket has ended): the token used to be made on it once the connection was open, MIT refused it ("the
    service ticket has expired") and the device got 502 `kerberos_misconfigured`. Now the gateway makes the token on a
    ticket valid then, after a second exchange with the KDC: 200, the backend served alice. That second exchange is
    seen as the first is: the summary line says it happened (`delegated_again`, not cached), the Kerberos stage's
    time holds it and the backend's does not, and the trace shows its S4U2Self and S4U2Proxy (it showed the first
    exchange's alone, and the summary the first lookup's `impersonation_cached`)."""
    kdc = KdcLog(lab.kdc_log)
    users = lab.pki_dir / "users"
    with slow_gateway(lab, tmp_path, USER, lambda: None) as (gw, admin):
        status, body, took = _slow_request(lab, gw, users / "alice.pem", users / "alice.key")
        assert took > TICKET_LIFE, took  # the connect outlasted the ticket taken before it
        assert status == "200", (status, body)
        assert "alice@LAB.TEST" in body, body
        line = gw.wait_event("request")
        assert line["status"] == 200, line
        assert _delegated(kdc) == 2, kdc.requests()  # the ticket before the connect, one after it
        assert (line.get("delegated_again"), line["impersonation_cached"]) == (True, False), line
        steps = _kerberos_steps(_trace_of(admin, "alice@lab.test"))
        assert steps == [("s4u2self", False), ("s4u2proxy", False), ("s4u2self", True), ("s4u2proxy", True)], steps


def test_a_user_disabled_during_a_slow_backend_connect_is_refused_at_kerberos(lab: LabLayout, tmp_path: Path) -> None:
    """A user disabled in the KDC (`-allow_tix`) after the request's first exchange and before the slow backend
    connection opened: the second exchange is refused, and the device gets the Kerberos stage's 403 with the KDC's
    reason, as a request refused at its first exchange does; the summary line and the trace say the Kerberos stage
    refused it, on the step the KDC refused in the second exchange (the trace had only the first's, served)."""
    name = f"sd{uuid.uuid4().hex[:10]}"
    _kadmin(lab, f"addprinc -randkey {name}")
    cert, key = _certificate_for(lab, name, tmp_path)
    principal = f"{name}@{REALM}"
    with slow_gateway(lab, tmp_path, principal, lambda: _kadmin(lab, f"modprinc -allow_tix {name}")) as (gw, admin):
        status, body, _ = _slow_request(lab, gw, cert, key)
        assert status == "403", (status, body)
        assert "disabled" in body, body
        line = gw.wait_event("request")
        assert (line["status"], line["refused_stage"], line["refusal"]) == (403, "kerberos", "kerberos_refused"), line
        assert line.get("delegated_again") is True, line
        record = _trace_of(admin, f"{name}@lab.test")
        assert record["refused"]["stage"] == "s4u2self", record["refused"]
        refused = [s for s in record["stages"] if s.get("refused")]
        assert [(s["name"], bool(s.get("again"))) for s in refused] == [("s4u2self", True)], record["stages"]
