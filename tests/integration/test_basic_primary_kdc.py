"""Basic guesses against a krb5.conf that names a primary KDC, the lab's real KDC under a lockout policy.

MIT's client sends a password the KDC refused once more, to the realm's primary KDC (`primary_kdc`, or DNS's
`_kerberos-master`), when the refusal came from a KDC it does not take for the primary: a replica may not have the
new password yet. Each wrong Basic password was then two failures at the directory. Here krb5.conf names the lab's
KDC as `kdc` by address and as `primary_kdc` by name (`localhost`), as a replica and its primary would be named; the
KDC's log and its lockout count are the witnesses. Curl is the device.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from proxy.lab.kdclog import KdcLog
from proxy.lab.layout import REALM, LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.integration.test_ticket_cache import _kadmin

GUESSES = 3  # basic_failures_per_user: below the policy's maxfailure (4), as docs/throttles-and-limits.md says to set


def _krb5_conf_with_a_primary(lab: LabLayout, directory: Path, layout: str = "one file") -> Path:
    """The lab's krb5.conf with the realm's KDC named again, by another name, as its primary KDC: in one file, or
    in a file that the one the gateway is given reads (`include`, `includedir`), as distributions ship krb5.conf."""
    kdc = f"kdc = 127.0.0.1:{lab.kdc_port}"
    text = lab.krb5_conf.read_text()
    assert kdc in text, text
    text = text.replace(kdc, f"{kdc}\n        primary_kdc = localhost:{lab.kdc_port}")
    path = directory / "krb5-primary.conf"
    if layout == "one file":
        path.write_text(text)
        return path
    included = directory / "krb5.conf.d"
    included.mkdir()
    (included / "lab-realm.conf").write_text(text)
    path.write_text(f"include {included / 'lab-realm.conf'}\n" if layout == "include" else f"includedir {included}\n")
    return path


def _curl(lab: LabLayout, gw: Gateway, login: str) -> int:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(lab.pki_dir / "root.pem"),
         "-u", login, "--max-time", "60", gw.url + "/owa/"],
        capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    return int(done.stdout or 0)


@pytest.mark.parametrize("layout", ["one file", "include", "includedir"])
def test_a_wrong_password_is_one_failure_at_the_kdc_when_krb5_conf_names_a_primary(
    lab: LabLayout, tmp_path: Path, layout: str
) -> None:
    """With `primary_kdc` in krb5.conf, each wrong Basic password is one failed pre-authentication at the KDC, and
    basic_failures_per_user = 3 guesses leave a user of a maxfailure-4 lockout policy unlocked: the user's own
    password, the one the KDC last accepted, passes the hold and is served by the KDC (no cache: basic_cache_seconds =
    0). MIT sent each refused password again to the primary, so the KDC counted every guess
    twice and the second guess locked the account (the third was 403, and so was the user's own password). Also where
    the realm's section is in a file krb5.conf includes: the overlay named no primaries there (it read krb5.conf's
    own text alone), and the guesses counted twice again."""
    tag = uuid.uuid4().hex[:8]
    name, password = f"pk{tag}", f"Primary-{tag}"
    _kadmin(lab, f"addpol -maxfailure 4 -failurecountinterval 30min -lockoutduration 30min pk{tag}")
    _kadmin(lab, f"addprinc -pw {password} -policy pk{tag} +requires_preauth {name}")
    extra = f"""
[authentication]
mode = "basic"
basic_failures_per_user = {GUESSES}
basic_failures_per_address = 100
basic_cache_seconds = 0
"""
    krb5_conf = _krb5_conf_with_a_primary(lab, tmp_path, layout)
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra, krb5_conf=krb5_conf))
    try:
        signed_in = _curl(lab, gw, f"{name}:{password}")  # the user's device, before the guesser
        kdc = KdcLog(lab.kdc_log)
        guesses = [_curl(lab, gw, f"{name}:guess-{i}") for i in range(GUESSES)]
        kdc.settled()
        log = kdc.path.read_bytes()[kdc.offset :].decode(errors="replace")
        failed = log.count(f"PREAUTH_FAILED: {name}@{REALM} for krbtgt/")
        own = _curl(lab, gw, f"{name}:{password}")
    finally:
        gw.stop()
    assert signed_in == 200
    assert guesses == [401] * GUESSES, guesses
    assert failed == GUESSES
    assert own == 200
