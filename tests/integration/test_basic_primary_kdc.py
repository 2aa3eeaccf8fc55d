"""Basic guesses against a krb5.conf that names a primary KDC, the lab's real KDC under a lockout policy.

MIT's client sends a password the KDC refused once more, to the realm's primary KDC (`primary_kdc`, or DNS's
`_kerberos-master`), when the refusal came from a KDC it does not take for the primary: a replica may not have the
new password yet. Each wrong Basic password was then two failures at the directory. Here krb5.conf names the lab's
KDC as `kdc` by address and as `primary_kdc` by name (`localhost`), as a replica and its primary would be named; the
KDC's log and its lockout count are the witnesses. Curl is the device.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from proxy.lab.kdclog import KdcLog
from proxy.lab.layout import REALM, LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually
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


BASIC = f"""
[authentication]
mode = "basic"
basic_failures_per_user = {GUESSES}
basic_failures_per_address = 100
basic_cache_seconds = 0
"""


def _user_locked_at_four(lab: LabLayout, prefix: str) -> tuple[str, str]:
    """A new user (name, password) under a policy of its own that locks the account at the fourth failure."""
    tag = uuid.uuid4().hex[:8]
    name, password = f"{prefix}{tag}", f"Primary-{tag}"
    _kadmin(lab, f"addpol -maxfailure 4 -failurecountinterval 30min -lockoutduration 30min {name}")
    _kadmin(lab, f"addprinc -pw {password} -policy {name} +requires_preauth {name}")
    return name, password


def _guesses_then_own(lab: LabLayout, gw: Gateway, name: str, password: str) -> tuple[list[int], int, int]:
    """GUESSES wrong passwords for `name` through `gw`, then its own: the guesses' statuses, the failed
    pre-authentications the KDC logged for them, and the own password's status."""
    kdc = KdcLog(lab.kdc_log)
    guesses = [_curl(lab, gw, f"{name}:guess-{i}") for i in range(GUESSES)]
    kdc.settled()
    log = kdc.path.read_bytes()[kdc.offset :].decode(errors="replace")
    failed = log.count(f"PREAUTH_FAILED: {name}@{REALM} for krbtgt/")
    return guesses, failed, _curl(lab, gw, f"{name}:{password}")


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
    name, password = _user_locked_at_four(lab, "pk")
    krb5_conf = _krb5_conf_with_a_primary(lab, tmp_path, layout)
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=BASIC, krb5_conf=krb5_conf))
    try:
        signed_in = _curl(lab, gw, f"{name}:{password}")  # the user's device, before the guesser
        guesses, failed, own = _guesses_then_own(lab, gw, name, password)
    finally:
        gw.stop()
    assert signed_in == 200
    assert guesses == [401] * GUESSES, guesses
    assert failed == GUESSES
    assert own == 200


def _overlay_names(gw: Gateway, value: str) -> bool:
    """Whether the gateway's own krb5 overlay file (in its TMPDIR, named for its pid) holds `value`; asks the
    gateway nothing."""
    files = Path(tempfile.gettempdir()).glob(f"kcd-proxy-krb5-{gw.proc.pid}-*.conf")
    return any(value in path.read_text() for path in files if not path.name.endswith(".new"))


def test_a_kdc_added_to_an_included_krb5_conf_is_one_failure_per_guess_without_a_reload(
    lab: LabLayout, tmp_path: Path
) -> None:
    """krb5.conf includes another file (so MIT reads it itself, two files) and names the KDC by address and its
    primary by name. Edited while the gateway runs to name the KDC by the host's name instead, the new name is used by
    MIT within a second, and the overlay names it a primary at the next Basic check (no reload): 3 wrong passwords are
    3 failed pre-authentications, the account unlocked, the user's own password served. Before, the overlay's
    primaries stayed those of the start, and every guess was sent again to the primary: the account locked. (An edit
    of an included file alone MIT does not see while a context is held: it looks at the including file's mtime.)"""
    name, password = _user_locked_at_four(lab, "pe")
    host = socket.gethostname()
    assert socket.gethostbyname(host) == "127.0.0.1", f"{host} must reach the lab's KDC on 127.0.0.1"
    included = tmp_path / "extra.conf"
    included.write_text("[libdefaults]\n    dns_lookup_realm = false\n")
    krb5_conf = _krb5_conf_with_a_primary(lab, tmp_path)
    krb5_conf.write_text(f"include {included}\n" + krb5_conf.read_text())
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=BASIC, krb5_conf=krb5_conf))
    try:
        assert _curl(lab, gw, f"{name}:{password}") == 200
        old = f"kdc = 127.0.0.1:{lab.kdc_port}"
        krb5_conf.write_text(krb5_conf.read_text().replace(old, f"kdc = {host}:{lab.kdc_port}"))
        new = f"primary_kdc = {host}:{lab.kdc_port}"
        eventually(
            lambda: _curl(lab, gw, f"{name}:{password}") == 200 and _overlay_names(gw, new),
            "the overlay names the edited krb5.conf's KDC a primary",
        )
        guesses, failed, own = _guesses_then_own(lab, gw, name, password)
    finally:
        gw.stop()
    assert guesses == [401] * GUESSES, guesses
    assert failed == GUESSES
    assert own == 200
