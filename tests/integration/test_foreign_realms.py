"""A UPN whose suffix is another realm than the one the gateway serves, against the lab's KDC.

The gateway's krb5.conf here also names a KDC for OTHER.REALM: a listener of the test's that counts connections,
standing for a foreign realm's KDC that MIT would find (in krb5.conf, or by DNS in a deployment that looks KDCs up).
The home KDC (LAB.TEST) shares no cross-realm key with OTHER.REALM, so nothing may make the gateway talk to that
KDC: S4U2Self for `alice@OTHER.REALM` asks LAB.TEST for `krbtgt/OTHER.REALM` (not found), and the NT-ENTERPRISE
`alice@other.realm` is looked up by LAB.TEST (not found; MIT's KDC makes no client referral). Either is the
user's 403, nothing cached, and alice of LAB.TEST is served after as herself.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.config import Kerberos
from proxy.errors import KerberosRefused
from proxy.identity.principal import map_upn
from proxy.kerberos.delegate import Delegator
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.loopback import stop_listening

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


class Listener:
    """A TCP listener on loopback that counts the connections it accepts and closes each at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        stop_listening(self.sock)


@pytest.fixture
def foreign_kdc() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def test_a_upn_of_another_realm_never_reaches_that_realms_kdc(
    lab: LabLayout, tmp_path: Path, foreign_kdc: Listener
) -> None:
    """alice@other.realm, as a principal and as an NT-ENTERPRISE name: the KDC refuses both (403), no connection
    reaches OTHER.REALM's KDC although krb5.conf names one, the cache keeps nothing, and alice@lab.test is served as
    alice@LAB.TEST right after."""
    conf = tmp_path / "krb5.conf"
    other = f"[realms]\n    OTHER.REALM = {{\n        kdc = 127.0.0.1:{foreign_kdc.port}\n    }}\n"
    conf.write_text(lab.krb5_conf.read_text().replace("[realms]\n", other, 1))
    assert f"127.0.0.1:{foreign_kdc.port}" in conf.read_text()
    settings = Kerberos(principal=f"{PROXY_SERVICE}@{REALM}", keytab=lab.proxy_keytab, krb5_config=conf)
    foreign = map_upn("alice@other.realm", realm_map={}, source="san-upn")
    assert foreign.principal == "alice@OTHER.REALM"

    async def run() -> None:
        delegator = Delegator(settings)
        try:
            with pytest.raises(KerberosRefused, match=r"no Kerberos realm serves alice@OTHER\.REALM.s UPN suffix"):
                await delegator.delegation(foreign, SPN, TARGET)
            with pytest.raises(KerberosRefused, match="no Kerberos account matches"):
                await delegator.delegation(replace(foreign, enterprise=foreign.upn), SPN, TARGET)
            assert len(delegator) == 0
            alice = await delegator.delegation(map_upn("alice@lab.test", realm_map={}), SPN, TARGET)
            assert alice.principal == f"alice@{REALM}"
        finally:
            delegator.close()

    asyncio.run(run())
    assert foreign_kdc.accepted == 0
