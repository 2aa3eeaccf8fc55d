"""A reload that points `kerberos.krb5_config` at another file: MIT reads the new one from the first request after
`reloaded`, against a real gateway and two real KDCs of the lab realm (the lab's, and a second on its own port)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import curl, dead_port, free_port, lab_config, metric, start_gateway
from tests.integration.jsonlog import eventually
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


@pytest.mark.parametrize("held", [False, True], ids=["idle", "a-request-held-across-the-reload"])
def test_a_reload_ends_the_replaced_watchs_kdc_list(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc, held: bool
) -> None:
    """The gateway starts on a krb5.conf listing a KDC that refuses connections and the second KDC: the watch tells
    MIT to ask the second alone (`kdc_silent`). A reload names a krb5.conf the watch cannot follow (the lab's KDC in
    an included file: `kdc_watch_off`), and the second KDC is stopped: a new user is served by the lab's KDC. The
    replaced watch's section (the second KDC alone, final) stayed in the overlay, MIT asked only the stopped KDC, and
    every new user got 503 until a restart; with a request of the old configuration still in flight (`held`), the
    replaced watch also went on probing and writing its section until that request ended."""
    first = tmp_path / "krb5-first.conf"
    first.write_text(
        lab.krb5_conf.read_text().replace(
            f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = 127.0.0.1:{dead_port()}\n        kdc = {second_kdc.address}"
        )
    )
    extra = tmp_path / "lab-kdc.conf"
    extra.write_text(f"[realms]\n    LAB.TEST = {{\n        kdc = 127.0.0.1:{lab.kdc_port}\n    }}\n")
    second = _krb5_conf(lab, tmp_path / "krb5-second.conf", f"127.0.0.1:{dead_port()}")
    second.write_text(second.read_text() + f"\ninclude {extra}\n")
    admin = free_port()
    text = lab_config(lab, port=free_port(), krb5_conf=first, extra=f'\n[admin]\nbind = "127.0.0.1:{admin}"\n')
    gw = start_gateway(lab, tmp_path / "gateway", text)
    holding: subprocess.Popen[bytes] | None = None
    try:
        gw.wait_event("kdc_silent")
        assert _status(lab, gw.url, "alice") == 200, gw.log_path.read_text()[-3000:]
        if held:  # alice's Ping, held at the backend: the old gateway (and its delegator) is not retired meanwhile
            holding = _held_ping(lab, gw.url)
            eventually(lambda: metric(f"http://127.0.0.1:{admin}", "kcd_requests_in_flight") >= 1, "the Ping held")
        gw.config_path.write_text(text.replace(f'krb5_config = "{first}"', f'krb5_config = "{second}"'))
        gw.mark()
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        assert gw.events("kdc_watch_off", after=gw.since), gw.log_path.read_text()[-3000:]
        second_kdc.close()  # the only KDC the first watch's section lets MIT ask
        assert _status(lab, gw.url, "bob") == 200, gw.log_path.read_text()[-3000:]
        assert holding is None or holding.poll() is None  # still held: the old gateway was not retired
    finally:
        gw.stop()
        if holding is not None:
            holding.kill()
            holding.wait()


def _held_ping(lab: LabLayout, url: str) -> subprocess.Popen[bytes]:
    """alice's ActiveSync Ping, which the lab backend holds for a minute (ended by the test)."""
    users = lab.pki_dir / "users"
    tls = [
        "--cacert",
        str(lab.pki_dir / "root.pem"),
        "--cert",
        str(users / "alice.pem"),
        "--key",
        str(users / "alice.key"),
    ]
    return subprocess.Popen(
        [
            "curl",
            "-sS",
            *tls,
            "-H",
            "X-Lab-Hold-Seconds: 60",
            "-o",
            "/dev/null",
            f"{url}/Microsoft-Server-ActiveSync?Cmd=Ping",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_reloads_that_take_krb5_config_out_read_the_environments_krb5_conf_with_one_overlay(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """The gateway starts with krb5_config naming the second KDC alone (KRB5_CONFIG in its environment: the lab's
    krb5.conf, the lab's KDC), then is reloaded five times, the key taken out and put back in turn, ending without
    it; the second KDC is stopped: a new exchange is served (the environment's file, the lab's KDC). After every
    reload the gateway holds at most two overlay files (the one in force and the one before: never a stack). The
    gateway went on reading its copy of the file no longer configured, so every new exchange asked the stopped KDC
    (503) until a restart."""
    first = _krb5_conf(lab, tmp_path / "krb5-first.conf", second_kdc.address)
    with_key = lab_config(lab, port=free_port(), krb5_conf=first)
    without_key = with_key.replace(f'krb5_config = "{first}"\n', "")
    assert without_key != with_key
    gw = start_gateway(lab, tmp_path / "gateway", with_key)
    mine = f"kcd-proxy-krb5-{gw.proc.pid}-"
    try:
        assert _status(lab, gw.url, "alice") == 200, gw.log_path.read_text()[-3000:]
        for text in (without_key, with_key, without_key, with_key, without_key):
            gw.config_path.write_text(text)
            gw.mark()
            gw.proc.send_signal(signal.SIGHUP)
            assert "kerberos" in gw.wait_event("reloaded")["changed"]
            overlays = [p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(mine)]
            assert 1 <= len(overlays) <= 2, overlays
        second_kdc.close()  # the configured file's only KDC: gone; the environment's names the lab's
        assert _status(lab, gw.url, "bob") == 200, gw.log_path.read_text()[-3000:]
    finally:
        gw.stop()
