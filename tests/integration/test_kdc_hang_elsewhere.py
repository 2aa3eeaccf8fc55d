"""The KDC calls besides Basic's during a KDC that accepts TCP and never answers: readiness probes, the Delegator's
exchanges, and a gateway stopped meanwhile.

The KDC is a second `krb5kdc` of the lab realm (`test_kdc_silent.SecondKdc`), the only one krb5.conf lists, frozen
with SIGSTOP: MIT's library then holds the calling thread about 25 s per call (`proxy.kerberos.kdcs`), long after
the gateway gave up at `kerberos.kdc_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from proxy.admin import READY_CACHE_SECONDS, Readiness
from proxy.config import load
from proxy.lab.layout import USERS, LabLayout
from proxy.live import Live
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.test_basic_kdc_threads import _basic
from tests.integration.test_kdc_silent import SecondKdc

KDC_TIMEOUT = 3  # kerberos.kdc_timeout here: far below MIT's own wait on a silent KDC (about 25 s)


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _config_text(lab: LabLayout, directory: Path, kdc: SecondKdc, extra: str = "", kerberos: str = "") -> str:
    """The lab gateway's configuration with only `kdc` in krb5.conf and kdc_timeout KDC_TIMEOUT."""
    directory.mkdir(parents=True, exist_ok=True)
    krb5_conf = directory / "krb5.conf"
    krb5_conf.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", kdc.address))
    assert kdc.address in krb5_conf.read_text()
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf, extra=extra)
    return text.replace("[kerberos]\n", f"[kerberos]\nkdc_timeout = {KDC_TIMEOUT}\n{kerberos}", 1)


def _status(lab: LabLayout, gw: Gateway, user: str) -> tuple[int, float]:
    """A request with `user`'s certificate: its status and how long its answer took."""
    start = time.monotonic()
    done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", user)
    return int(done.stdout.rsplit("\n", 1)[-1]), time.monotonic() - start


def test_new_users_past_every_kdc_thread_and_as_many_waiting_are_503_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """kerberos.max_in_flight = 1 and the only KDC frozen: alice, bob and carol (none cached) at once. One exchange
    takes the one thread, one waits for it, and the third is refused at once (503, the log naming the threads
    held), not queued: before, the Delegator's executor queued every exchange past its threads (bounded in
    count by nothing), each caller waiting kdc_timeout for a thread MIT held."""
    text = _config_text(lab, tmp_path, second_kdc, kerberos="max_in_flight = 1\n")
    gw = start_gateway(lab, tmp_path / "gateway", text)
    try:
        second_kdc.stop_answering()
        gw.mark()
        with ThreadPoolExecutor(max_workers=3) as senders:
            answers = list(senders.map(lambda user: _status(lab, gw, user), ["alice", "bob", "carol"]))
        assert [status for status, _ in answers] == [503, 503, 503], answers
        refused = gw.wait_events("kdc_unavailable", 3)
        fixes = sorted(e["fix"] for e in refused)
        assert sum("within" in fix for fix in fixes) == 2, fixes  # the thread's call and the one waiting for it
        [at_once] = [fix for fix in fixes if "within" not in fix]
        assert "all 1 threads for the gateway's KDC exchanges (kerberos.max_in_flight)" in at_once, at_once
        assert min(seconds for _, seconds in answers) < KDC_TIMEOUT, answers
    finally:
        second_kdc.answer_again()
        gw.stop()
