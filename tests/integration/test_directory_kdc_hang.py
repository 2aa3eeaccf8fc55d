"""The directory's Kerberos bind (`bind = "kerberos"`) while the only KDC accepts TCP and never answers, against a
real gateway: the lab realm's second `krb5kdc` (`test_kdc_silent.SecondKdc`) frozen with SIGSTOP, so MIT holds the
bind's ticket request about 25 s, long after the look-up gave up. The bind never reaches the directory server, so
the lab's LDAP stands in for one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.test_kdc_silent import SecondKdc

TIMEOUT = 1  # [directory] timeout: a look-up gives up on a server after twice that (connect with its bind, search)


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _gateway(lab: LabLayout, directory: Path, kdc: SecondKdc) -> Gateway:
    """The lab gateway with `mapping = "strong"`, a directory bound with Kerberos, and only `kdc` in krb5.conf."""
    directory.mkdir(parents=True, exist_ok=True)
    krb5_conf = directory / "krb5.conf"
    krb5_conf.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", kdc.address))
    table = (
        f'\n[directory]\nurls = ["ldap://127.0.0.1:{lab.ldap_port}"]\nbase_dn = "DC=lab,DC=test"\n'
        f'bind = "kerberos"\ncache_seconds = 0\ntimeout = {TIMEOUT}\n'
    )
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf, extra=table)
    text = text.replace("[identity]\n", '[identity]\nmapping = "strong"\n', 1)
    return start_gateway(lab, directory / "gateway", text)


def _status(lab: LabLayout, gw: Gateway, user: str) -> int:
    done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", user)
    return int(done.stdout.rsplit("\n", 1)[-1])


def test_a_gateway_stopped_while_the_directory_bind_waits_for_a_silent_kdc_exits_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """A look-up's bind waits in MIT for the frozen KDC: the request is 503 at the mapping stage within the
    directory's timeout, and the next look-up is refused at once rather than queued behind the held thread; SIGTERM
    then ends the gateway well before MIT gives up. The bind ran on a ThreadPoolExecutor, whose thread Python's exit
    joins: the stop waited for MIT (about 25 s)."""
    gw = _gateway(lab, tmp_path, second_kdc)
    try:
        second_kdc.stop_answering()
        gw.mark()
        assert _status(lab, gw, "alice") == 503
        assert gw.wait_event("directory_unavailable")["stage"] == "mapping"
        gw.mark()
        assert _status(lab, gw, "bob") == 503
        refused = gw.wait_event("directory_unavailable")
        # refused for want of the directory's one KDC thread, not after a wait of its own
        assert "holds the directory's one KDC thread" in refused["fix"], refused
        start = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - start < 10, "the stop waited for MIT"
    finally:
        second_kdc.answer_again()
        gw.stop()
