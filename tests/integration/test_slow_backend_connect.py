"""A connection-bound route's token is made once the backend connection is open: on a ticket valid then.

The lab's MIT KDC issues 5-second tickets to a gateway principal of its own (`-maxlife "5 seconds"`), and the
backend is reached through a listener that keeps its accept queue full until the request's ticket has ended (its
S4U2Proxy in the KDC's log, then its life and a second): Linux drops the gateway's SYN meanwhile, and its connect
(SYN sent again after 1, 3, 7, 15 s) succeeds only after the ticket taken before it has expired. A relay then carries
the connection to the lab's backend.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from proxy.lab.kdclog import S4U2PROXY, KdcLog
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.conftest import curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT
from tests.integration.test_rotated_keys import gateway_principal

USER = "alice@LAB.TEST"
TICKET_LIFE = 5.0  # the gateway principal's maxlife: its TGT, the evidence and the service tickets end within it


def _delegated(kdc: KdcLog) -> int:
    """alice's S4U2Proxy requests in the KDC's log since `kdc` was made."""
    return sum(r.extension == S4U2PROXY and r.user == USER for r in kdc.requests())


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


def test_a_token_is_made_on_a_ticket_valid_once_a_slow_backend_connection_is_open(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The ticket taken before a connect that took longer than its life (5 s tickets, a backend that accepts only
    once that ticket has ended): the token used to be made on it once the connection was open, MIT refused it ("the
    service ticket has expired") and the device got 502 `kerberos_misconfigured`. Now the gateway makes the token on a
    ticket valid then, after a second exchange with the KDC: 200, the backend served alice."""
    opened, kdc = threading.Event(), KdcLog(lab.kdc_log)

    def until_the_ticket_ended(stop: threading.Event) -> None:
        """Until the request's service ticket has ended: its S4U2Proxy in the KDC's log, then its life and a second."""
        if not opened.wait(WAIT):
            return
        deadline = time.monotonic() + WAIT
        while not stop.is_set() and not _delegated(kdc) and time.monotonic() < deadline:
            stop.wait(0.05)
        stop.wait(TICKET_LIFE + 1)  # the backend being slow for that long: the condition under test

    with (
        gateway_principal(lab, tmp_path, f'-maxlife "{TICKET_LIFE:g} seconds"') as own,
        slow_to_accept(lab.backend_port, until_the_ticket_ended) as port,
    ):
        routes = f"""
[[routes]]
prefix = "/slow/"
upstream = "http://127.0.0.1:{port}"
spn = "HTTP/cas.lab.test"
backend_binding = "connection"
connect_timeout = 30
"""
        text = lab_config(lab, port=free_port(), extra=routes)
        text = text.replace(f'principal = "{PROXY_SERVICE}@{REALM}"', f'principal = "{own.principal}@{REALM}"', 1)
        text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{own.keytab}"', 1)
        gw = start_gateway(lab, tmp_path / "gateway", text)
        try:
            opened.set()
            start = time.monotonic()
            done = curl(lab, f"{gw.url}/slow/EWS/Exchange.asmx", "alice")
            took = time.monotonic() - start
            body, _, status = done.stdout.rpartition("\n")
            assert took > TICKET_LIFE, took  # the connect outlasted the ticket taken before it
            assert status == "200", (status, body, done.stderr)
            assert "alice@LAB.TEST" in body, body
            line = gw.wait_event("request")
            assert line["status"] == 200, line
            assert _delegated(kdc) == 2, kdc.requests()  # the ticket before the connect, one after it
        finally:
            gw.stop()
