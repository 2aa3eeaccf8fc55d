"""A reload that points `kerberos.krb5_config` at another file: MIT reads the new one from the first request after
`reloaded`, against a real gateway and two real KDCs of the lab realm (the lab's, and a second on its own port)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import curl, free_port, lab_config, start_gateway
from tests.integration.test_kdc_silent import SecondKdc


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _krb5_conf(lab: LabLayout, path: Path, kdc: str) -> Path:
    """The lab's krb5.conf with `kdc` as LAB.TEST's only KDC."""
    path.write_text(lab.krb5_conf.read_text().replace(f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = {kdc}"))
    return path


def _status(lab: LabLayout, url: str, user: str) -> int:
    done = curl(lab, f"{url}/EWS/Exchange.asmx", user)
    return int(done.stdout.rsplit("\n", 1)[-1])


def test_a_reload_to_another_krb5_conf_is_what_mit_reads_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """The gateway starts on a krb5.conf naming the second KDC alone, a reload points krb5_config at one naming the
    lab's KDC alone, and the second KDC is stopped: the first request after `reloaded` is served (its S4U exchanges
    reach the lab's KDC). MIT went on reading the first file's copy (the one-file overlay kept the krb5.conf it
    had copied at start), every new exchange asked the stopped KDC, and the user got 503."""
    first = _krb5_conf(lab, tmp_path / "krb5-first.conf", second_kdc.address)
    second = _krb5_conf(lab, tmp_path / "krb5-second.conf", f"127.0.0.1:{lab.kdc_port}")
    text = lab_config(lab, port=free_port(), krb5_conf=first)
    gw = start_gateway(lab, tmp_path / "gateway", text)
    try:
        assert _status(lab, gw.url, "alice") == 200, gw.log_path.read_text()[-3000:]
        gw.config_path.write_text(text.replace(f'krb5_config = "{first}"', f'krb5_config = "{second}"'))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        reloaded = gw.wait_event("reloaded")
        assert "kerberos" in reloaded["changed"]
        second_kdc.close()  # the first file's only KDC: gone
        assert _status(lab, gw.url, "bob") == 200, gw.log_path.read_text()[-3000:]
        assert _status(lab, gw.url, "alice") == 200  # the reload dropped her ticket: a new exchange, the new KDC
    finally:
        gw.stop()
