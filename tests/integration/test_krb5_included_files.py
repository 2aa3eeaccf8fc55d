"""A KDC moved in a file krb5.conf `include`s, while the gateway runs: what MIT's profile sees, and the operator's
command that makes it see the edit.

MIT keeps krb5.conf parsed while a library context is open (the gateway holds one: `proxy.kerberos.profile`) and
rereads it when the file's modification time changes, checked at most once a second; an included file is parsed into
the including file's tree and has no time of its own. So an edit of the included file alone is not seen until
krb5.conf itself changes: `touch krb5.conf` (or a restart). The lab's real KDC and Basic sign-ins (each one an AS
exchange, nothing cached) are the witnesses; curl is the device.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from proxy.lab.layout import LabLayout
from tests.integration.conftest import dead_port, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_basic_primary_kdc import _curl
from tests.integration.test_ticket_cache import _kadmin

BASIC = """
[authentication]
mode = "basic"
basic_failures_per_user = 100
basic_failures_per_address = 100
basic_cache_seconds = 0
"""
UNSEEN_FOR = 3.0  # seconds an edit of the included file alone stays unseen here (MIT looks once a second)


def test_a_kdc_moved_in_an_included_file_is_seen_once_krb5_conf_is_touched(lab: LabLayout, tmp_path: Path) -> None:
    """krb5.conf is one `include` line, the lab's krb5.conf the included file. The KDC moved there (to a port nobody
    answers on): Basic sign-ins still reach the old KDC (200) for UNSEEN_FOR seconds, MIT not looking at the included
    file; `touch krb5.conf` and a sign-in fails at once (the moved KDC, 503); moved back and touched, 200 again."""
    tag = uuid.uuid4().hex[:8]
    name, password = f"inc{tag}", f"Included-{tag}"
    _kadmin(lab, f"addprinc -pw {password} {name}")
    included = tmp_path / "krb5.conf.d" / "lab.conf"
    included.parent.mkdir()
    text = lab.krb5_conf.read_text()
    kdc, moved = f"kdc = 127.0.0.1:{lab.kdc_port}", f"kdc = 127.0.0.1:{dead_port()}"
    assert kdc in text, text
    included.write_text(text)
    krb5_conf = tmp_path / "krb5.conf"
    krb5_conf.write_text(f"include {included}\n")
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=BASIC, krb5_conf=krb5_conf))
    try:
        assert _curl(lab, gw, f"{name}:{password}") == 200
        included.write_text(text.replace(kdc, moved))
        edited = time.monotonic()
        while time.monotonic() - edited < UNSEEN_FOR:  # several of MIT's once-a-second looks
            assert _curl(lab, gw, f"{name}:{password}") == 200, "MIT saw the included file's edit by itself"
        os.utime(krb5_conf)  # the operator's command: touch krb5.conf
        eventually(lambda: _curl(lab, gw, f"{name}:{password}") == 503, "the moved KDC used once touched", WAIT)
        included.write_text(text)
        os.utime(krb5_conf)
        eventually(lambda: _curl(lab, gw, f"{name}:{password}") == 200, "the KDC back once touched", WAIT)
    finally:
        assert gw.stop() == 0
