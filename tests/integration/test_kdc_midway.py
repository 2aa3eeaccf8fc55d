"""The KDC gone between S4U2Self and S4U2Proxy (a restart, a failover), against the lab's KDC.

The gateway reaches the KDC through a TCP relay of the test's (its krb5.conf names the relay): the relay passes a
set number of connections on, then resets every new one until told otherwise. MIT talks to the KDC over TCP here
(`udp_preference_limit = 1`), one connection per request, so "one more connection" lets S4U2Self through and stops
S4U2Proxy, as a KDC restarting at that moment would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Kerberos
from proxy.errors import GatewayError, KdcUnavailable
from proxy.identity.principal import UserPrincipal
from proxy.kerberos.delegate import Delegator
from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.loopback import stop_listening
from tests.integration.test_delegation_crowd import new_users

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


class Relay:
    """A TCP relay to the KDC: passes `allow` more connections on (all while it is None), resets the others."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.allow: int | None = None
        self.reset = 0  # connections reset so far
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.allow is not None and self.allow <= 0:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a gone KDC
                conn.close()
                self.reset += 1
                continue
            if self.allow is not None:
                self.allow -= 1
            threading.Thread(target=self._pipe, args=(conn,), daemon=True).start()

    def _pipe(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target) as upstream:
            back = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
            back.start()
            _copy(conn, upstream)
            back.join()

    def close(self) -> None:
        stop_listening(self.sock)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(lab: LabLayout) -> Iterator[Relay]:
    found = Relay(("127.0.0.1", lab.kdc_port))
    yield found
    found.close()


def test_a_kdc_gone_between_s4u2self_and_s4u2proxy_leaves_nothing_behind(
    lab: LabLayout, relay: Relay, tmp_path: Path
) -> None:
    """The KDC answers S4U2Self, then is gone for S4U2Proxy: the request is 503 (the KDC is unreachable: never the
    user's 403 nor the operator's 502), nothing of the half-done exchange is cached, and once the KDC is back the
    user's next request makes a whole exchange of its own and is served as that user."""
    conf = tmp_path / "krb5.conf"
    conf.write_text(
        lab.krb5_conf.read_text().replace(f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = 127.0.0.1:{relay.port}")
    )
    assert f"127.0.0.1:{relay.port}" in conf.read_text()
    first, user = (
        UserPrincipal(upn=f"{n}@lab.test", principal=f"{n}@{REALM}", realm=REALM, source="test")
        for n in new_users(lab, [f"mw{uuid.uuid4().hex[:10]}" for _ in range(2)])
    )
    settings = Kerberos(principal=f"{PROXY_SERVICE}@{REALM}", keytab=lab.proxy_keytab, krb5_config=conf)

    async def run() -> None:
        delegator = Delegator(settings)
        try:
            await delegator.delegation(first, SPN, TARGET)  # the gateway's TGT: the next exchange is two requests
            relay.allow = 1  # S4U2Self's connection, then none
            with pytest.raises(GatewayError) as gone:
                await delegator.delegation(user, SPN, TARGET)
            # the hint carries MIT's own message: what a wrong classification was classified from (seen once under load)
            assert isinstance(gone.value, KdcUnavailable), (type(gone.value).__name__, gone.value.hint, relay.reset)
            assert gone.value.status == 503
            assert relay.reset >= 1
            assert (len(delegator), delegator.in_flight()) == (1, 0)  # the first user's entry only
            relay.allow = None  # the KDC is back
            served = await delegator.delegation(user, SPN, TARGET)
            assert (served.principal, served.impersonation_cached) == (user.principal, False)
        finally:
            delegator.close()

    kdc = KdcLog(lab.kdc_log)
    asyncio.run(run())
    asked = [r.extension for r in kdc.settled() if r.user == user.principal]
    assert asked == [S4U2SELF, S4U2SELF, S4U2PROXY], asked  # the lost S4U2Proxy never reached the KDC
