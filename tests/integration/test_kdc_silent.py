"""A KDC that accepts TCP and never answers, against a real gateway: a second real KDC of the lab realm, stopped.

The second KDC is the lab's `krb5kdc` binary with the lab's LDAP database, on ports of its own; SIGSTOP makes it a
KDC that accepts connections (the kernel completes them) and never answers, SIGCONT brings it back. MIT krb5 1.20
waits 10 s on such a KDC before asking the next one in krb5.conf, and about 25 s when it is the only one
(`proxy.kerberos.kdcs` has the why); the gateway probes the KDCs itself and tells MIT to ask those that answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.kerberos.kdcs import probe
from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, curl, dead_port, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT

PRINCIPAL = "HTTP/proxy.lab.test@LAB.TEST"


class SecondKdc:
    """A second krb5kdc for LAB.TEST (the lab's LDAP database), on its own port, stopped and resumed at will."""

    def __init__(self, lab: LabLayout, directory: Path) -> None:
        self.port = free_port()
        conf = lab.kdc_conf.read_text()
        listen = f"127.0.0.1:{lab.kdc_port}"
        assert listen in conf, conf
        conf = conf.replace(listen, f"127.0.0.1:{self.port}").replace(str(lab.run_dir), str(directory))
        kdc_conf = directory / "kdc2.conf"
        kdc_conf.write_text(conf)
        env = {**os.environ, **lab.env(), "KRB5_KDC_PROFILE": str(kdc_conf), "LDAPNOINIT": "1"}
        self.log = directory / "krb5kdc-2.out"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(["krb5kdc", "-n"], env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while not asyncio.run(probe(self.address, PRINCIPAL, 5)).answered:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the second KDC never answered"
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop_answering(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def answer_again(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _gateway(lab: LabLayout, directory: Path, kdcs: list[str]) -> Gateway:
    """A gateway whose krb5.conf lists `kdcs`, in that order, for LAB.TEST; kdc_timeout 8 s (below MIT's 10 s wait)."""
    krb5 = lab.krb5_conf.read_text().replace(
        f"kdc = 127.0.0.1:{lab.kdc_port}", "\n        ".join(f"kdc = {kdc}" for kdc in kdcs)
    )
    krb5_conf = directory / "krb5.conf"
    krb5_conf.write_text(krb5)
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf)
    text = text.replace("[kerberos]\n", "[kerberos]\nkdc_timeout = 8\n", 1)
    return start_gateway(lab, directory / "gateway", text)


def _status(lab: LabLayout, gw: Gateway, user: str) -> int:
    done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", user)
    return int(done.stdout.rsplit("\n", 1)[-1])


def test_a_silent_first_kdc_is_skipped_and_new_users_are_served_by_the_other(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """krb5.conf lists the second KDC first, the lab's after it. Once the first accepts and never answers: a cached
    user is served from the cache; the first new user waits in MIT (10 s on the silent KDC for S4U2Self, again for
    S4U2Proxy) and gets 503 at kdc_timeout, which makes the gateway probe and find the silent KDC (`kdc_silent`);
    the next new users are served by the other KDC (before, every new user got 503). When the first answers again
    it is MIT's first KDC again (`kdcs_answer`)."""
    gw = _gateway(lab, tmp_path, [second_kdc.address, f"127.0.0.1:{lab.kdc_port}"])
    try:
        assert gw.events("kdcs_answer")  # the first probe, before the gateway listened: both answer
        assert _status(lab, gw, "alice") == 200
        gw.mark()
        second_kdc.stop_answering()
        assert _status(lab, gw, "alice") == 200  # the cached service ticket: no KDC asked
        assert _status(lab, gw, "bob") == 503  # kdc_timeout, inside MIT's wait
        silent = gw.wait_event("kdc_silent", timeout=WAIT)
        assert [s["kdc"] for s in silent["silent"]] == [second_kdc.address]
        assert silent["asked"] == [f"127.0.0.1:{lab.kdc_port}"]
        assert _status(lab, gw, "carol") == 200
        assert _status(lab, gw, "alice") == 200
        gw.mark()
        second_kdc.answer_again()
        assert gw.wait_event("kdcs_answer", timeout=WAIT)["kdcs"] == [second_kdc.address, f"127.0.0.1:{lab.kdc_port}"]
        assert _status(lab, gw, "bob") == 200  # refused before, never cached: a new exchange
    finally:
        gw.stop()


def test_with_no_kdc_answering_new_users_are_refused_at_once_and_cached_users_served(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """krb5.conf lists only the second KDC. Stopped: a cached user is still served; the first new user gets 503 at
    kdc_timeout, and the probe it starts finds no KDC answering (`kdcs_silent`); the next new user's exchange is
    refused before any thread is given to MIT's wait (503, the refusal naming the gateway's probe, not kdc_timeout);
    once the KDC answers again (the gateway probes every few seconds meanwhile), new users are served."""
    gw = _gateway(lab, tmp_path, [second_kdc.address])
    try:
        assert gw.events("kdcs_answer")
        assert _status(lab, gw, "alice") == 200
        gw.mark()
        second_kdc.stop_answering()
        assert _status(lab, gw, "bob") == 503
        gw.wait_event("kdcs_silent", timeout=WAIT)
        gw.mark()
        assert _status(lab, gw, "alice") == 200
        assert _status(lab, gw, "carol") == 503
        logged = gw.logs()[gw.since :]
        assert [e for e in logged if "last probe" in json.dumps(e)], logged
        assert not [e for e in logged if "within 8 s" in json.dumps(e)], logged
        gw.mark()
        second_kdc.answer_again()
        gw.wait_event("kdcs_answer", timeout=WAIT)
        assert _status(lab, gw, "carol") == 200
    finally:
        gw.stop()


@pytest.mark.parametrize("directive", ["include", "includedir"])
def test_a_kdc_listed_in_an_included_file_is_asked_by_mit_as_before(
    lab: LabLayout, tmp_path: Path, directive: str
) -> None:
    """krb5.conf names the realm twice: its own section lists a KDC that refuses connections, and a file it
    includes (`include FILE` or `includedir DIR`, as sssd and distributions write them) lists the lab's KDC. MIT
    merges both and asks the second after the first refuses: new users are served. The watch read only the main
    file, found its one KDC refusing, and refused every new user with 503 at once (`kdcs_silent`)."""
    extra_dir = tmp_path / "krb5.conf.d"
    extra_dir.mkdir()
    extra = extra_dir / "lab-kdc.conf"
    extra.write_text(f"[realms]\n    LAB.TEST = {{\n        kdc = 127.0.0.1:{lab.kdc_port}\n    }}\n")
    krb5 = lab.krb5_conf.read_text().replace(f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = 127.0.0.1:{dead_port()}")
    krb5 += f"\n{directive} {extra if directive == 'include' else extra_dir}\n"
    krb5_conf = tmp_path / "krb5.conf"
    krb5_conf.write_text(krb5)
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf)
    gw = start_gateway(lab, tmp_path / "gateway", text)
    try:
        assert _status(lab, gw, "alice") == 200, gw.log_path.read_text()[-3000:]
        assert not gw.events("kdcs_silent")
        off = gw.events("kdc_watch_off")
        assert off, gw.log_path.read_text()[-3000:]
        assert directive in off[0]["reason"], off
    finally:
        gw.stop()


def test_a_realm_named_in_two_files_of_krb5_config_keeps_mit_asking_both(lab: LabLayout, tmp_path: Path) -> None:
    """KRB5_CONFIG lists two files (no `kerberos.krb5_config`), each naming LAB.TEST: the first a KDC that refuses
    connections, the second the lab's. MIT merges a realm's `kdc` lines across files and reaches the second: new
    users are served. The watch read the first file alone, found its KDC refusing and refused every new user
    (503); it now stays off (`kdc_watch_off`) and MIT's list stands."""
    first = tmp_path / "krb5.conf"
    first.write_text(
        lab.krb5_conf.read_text().replace(f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = 127.0.0.1:{dead_port()}")
    )
    second = tmp_path / "krb5-site.conf"
    second.write_text(f"[realms]\n    LAB.TEST = {{\n        kdc = 127.0.0.1:{lab.kdc_port}\n    }}\n")
    port = free_port()
    text = lab_config(lab, port=port).replace(f'krb5_config = "{lab.krb5_conf}"\n', "")
    assert "krb5_config" not in text
    (tmp_path / "gateway.toml").write_text(text)
    env = {**os.environ, **lab.env(), "KRB5_CONFIG": f"{first}:{second}"}
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(tmp_path / "gateway.toml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    gw = Gateway(f"https://127.0.0.1:{port}", port, proc, log_path, tmp_path / "gateway.toml")
    try:
        gw.wait_event("listening")
        assert _status(lab, gw, "alice") == 200, log_path.read_text()[-3000:]
        assert not gw.events("kdcs_silent")
        off = gw.events("kdc_watch_off")
        assert off, log_path.read_text()[-3000:]
        assert str(second) in off[0]["reason"], off
    finally:
        gw.stop()


def test_a_kdc_list_edited_in_krb5_conf_is_what_the_watch_asks(lab: LabLayout, tmp_path: Path) -> None:
    """krb5.conf lists one KDC for LAB.TEST, which refuses connections: new users get 503 at once (`kdcs_silent`).
    The operator replaces it in krb5.conf with the lab's KDC (a DC decommissioned, its successor named): MIT would
    reach it, and the watch, probing every few seconds while no KDC answers, now reads the edited list and finds it
    answering (`kdcs_answer`): new users are served without a restart. It probed the start's list for good, and
    refused every new user until the gateway was restarted (a reload kept it: [kerberos] had not changed)."""
    dead = f"127.0.0.1:{dead_port()}"
    gw = _gateway(lab, tmp_path, [dead])
    krb5_conf = tmp_path / "krb5.conf"
    try:
        gw.wait_event("kdcs_silent")
        assert _status(lab, gw, "alice") == 503
        gw.mark()
        edited = tmp_path / "krb5.conf.new"
        edited.write_text(krb5_conf.read_text().replace(f"kdc = {dead}", f"kdc = 127.0.0.1:{lab.kdc_port}"))
        edited.replace(krb5_conf)  # as an editor or a configuration tool writes it: whole, then renamed into place
        answered = gw.wait_event("kdcs_answer", timeout=WAIT)
        assert answered["kdcs"] == [f"127.0.0.1:{lab.kdc_port}"]
        assert _status(lab, gw, "alice") == 200, gw.log_path.read_text()[-3000:]
    finally:
        gw.stop()
