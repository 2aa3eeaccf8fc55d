"""A KDC call that fails for want of the gateway's own descriptors: its overload (503), not its Kerberos set-up.

Against the lab's MIT KDC. The gateway test lowers a running gateway's open-file limit (`prlimit --pid`) so that
exactly one descriptor number is free: the device's connection takes it, and the first KDC call after it (the
gateway's own AS exchange, which reads the keytab) fails with EMFILE. The in-process tests fill the test process's
descriptors (under a lowered soft limit) just before a delegation: once before the gateway's TGT is held (MIT:
"Too many open files", reading the keytab), once after (MIT: "Cannot contact any KDC", no socket to the KDC).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.config import Kerberos
from proxy.errors import KerberosOverloaded
from proxy.kerberos.delegate import Delegator
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.conftest import curl, free_port, lab_config, start_gateway
from tests.integration.test_ticket_cache import _user_of_its_own

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """This process at its open-file limit (a soft limit of 256, every number under it taken); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    taken: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                taken.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("tgt_held", [False, True])
def test_a_kdc_call_without_a_descriptor_is_the_gateways_overload(lab: LabLayout, tgt_held: bool) -> None:
    """No descriptor left when a new user's exchange starts: 503 with Retry-After and a fix naming the open-file
    limit. Before the gateway's TGT is held the keytab could not be read and the refusal blamed the keytab and
    krb5.conf (502 `kerberos_misconfigured`); with it held, no socket to the KDC and MIT's words blamed the KDC."""
    settings = Kerberos(principal=f"{PROXY_SERVICE}@{REALM}", keytab=lab.proxy_keytab, krb5_config=lab.krb5_conf)
    earlier, user = _user_of_its_own(lab), _user_of_its_own(lab)

    async def run() -> KerberosOverloaded:
        d = Delegator(settings)
        try:
            if tgt_held:
                await d.delegation(earlier, SPN, TARGET)
            with no_descriptor_left(), pytest.raises(KerberosOverloaded) as refused:
                await d.delegation(user, SPN, TARGET)
            assert not (await d.delegation(user, SPN, TARGET)).impersonation_cached  # nothing of it was kept
            return refused.value
        finally:
            d.close()

    refused = asyncio.run(run())
    assert (refused.status, refused.event) == (503, "kerberos_resources_exhausted")
    assert refused.headers == {"Retry-After": "30"}
    assert refused.hint is not None
    assert "EMFILE" in refused.hint
    assert "keytab" not in refused.hint


def _first_free_descriptor(pid: int) -> int:
    """The lowest descriptor number process `pid` has not open."""
    taken = {int(entry.name) for entry in Path(f"/proc/{pid}/fd").iterdir()}
    return next(n for n in range(len(taken) + 1) if n not in taken)


def test_a_device_accepted_at_the_open_file_limit_gets_503_not_a_kerberos_misconfiguration(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A fresh gateway left with one free descriptor number (`prlimit --pid`): the device's connection takes it,
    the gateway's first AS exchange cannot open its keytab (EMFILE). The device gets 503 with Retry-After and the
    log `kerberos_resources_exhausted` with the open-file fix (it was 502 and `kerberos_misconfigured`, "check
    kerberos.principal, kerberos.keytab and krb5.conf"); with the limit back, the next request is served."""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    pid = gw.proc.pid
    limits = subprocess.run(
        ["prlimit", "--pid", str(pid), "--nofile", "--raw", "--noheadings", "--output", "SOFT,HARD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    try:
        gw.mark()
        lowered = _first_free_descriptor(pid) + 1
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={lowered}:{limits[1]}"], check=True)
        refused = curl(lab, f"{gw.url}/owa/", "alice", "-D", "-")
        subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={limits[0]}:{limits[1]}"], check=True)
        assert refused.stdout.endswith("\n503"), refused
        assert "retry-after: 30" in refused.stdout.lower(), refused.stdout
        line = gw.wait_event("kerberos_resources_exhausted")
        assert "EMFILE" in line["fix"], line
        assert not gw.events("kerberos_misconfigured")
        served = curl(lab, f"{gw.url}/owa/", "alice")
        assert served.stdout.endswith("\n200"), served
    finally:
        gw.stop()
