"""The gateway's delegated tokens accepted by a Negotiate acceptor that is not our code: Apache httpd with
mod_auth_gssapi, holding the backend's keytab.

The lab's Exchange stand-in accepts tokens with python-gssapi, the library that makes them: a token only our
own code would take (a framing, a mechanism, a header form) would pass every other test. Apache decides here,
and its access log's `%u` says whom it authenticated. Apache will not run its workers as root, so its files
live in a directory of their own that www-data can read (pytest's temporary directories are root's alone).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.lab.layout import USERS, LabLayout
from tests import leftovers
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually

APACHE = Path("/usr/sbin/apache2")
MODULES = Path("/usr/lib/apache2/modules")
_MISSING = [str(p) for p in (APACHE, MODULES / "mod_auth_gssapi.so") if not p.exists()]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"apache2 / libapache2-mod-auth-gssapi not installed: {', '.join(_MISSING)}"
)
BODY = "served by Apache after mod_auth_gssapi said yes\n"


@dataclass
class Apache:
    url: str
    port: int
    access_log: Path
    error_log: Path
    pid: int


def _conf(directory: Path, port: int) -> str:
    modules = ("mpm_event", "authn_core", "authz_core", "authz_user", "auth_gssapi")
    loads = "\n".join(f"LoadModule {m}_module {MODULES / f'mod_{m}.so'}" for m in modules)
    return f"""{loads}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
User www-data
Group www-data
PidFile {directory / "httpd.pid"}
ErrorLog {directory / "error.log"}
LogLevel info auth_gssapi:debug
LogFormat "%u|%m|%U|%>s" who
CustomLog {directory / "access.log"} who
DocumentRoot {directory / "htdocs"}
<Directory {directory / "htdocs"}>
    AuthType GSSAPI
    AuthName "kcd-proxy independent acceptor"
    GssapiCredStore keytab:{directory / "cas.keytab"}
    GssapiAllowedMech krb5
    GssapiBasicAuth Off
    Require valid-user
</Directory>
"""


def _answer(url: str) -> int | None:
    """The HTTP status at `url` (no credentials), or None while nothing answers HTTP there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a loopback http:// URL)
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="module")
def apache(lab: LabLayout) -> Iterator[Apache]:
    """Apache httpd on a free loopback port, mod_auth_gssapi guarding /owa/ with the backend's keytab; ready once
    it answers an unauthenticated request with 401 (a real answer, not a connect)."""
    directory = Path(tempfile.mkdtemp(prefix="kcd-apache-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        www = pwd.getpwnam("www-data")
        (directory / "htdocs" / "owa").mkdir(parents=True)
        (directory / "htdocs" / "owa" / "hello.txt").write_text(BODY)
        shutil.copy(lab.backend_keytab, directory / "cas.keytab")
        shutil.copy(lab.krb5_conf, directory / "krb5.conf")
        (directory / "rcache").mkdir()
        os.chown(directory / "rcache", www.pw_uid, www.pw_gid)
        for name in ("cas.keytab", "krb5.conf"):
            (directory / name).chmod(0o644)  # a test keytab of a throwaway realm
        port = free_port()
        (directory / "httpd.conf").write_text(_conf(directory, port))
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
            "KRB5_CONFIG": str(directory / "krb5.conf"),
            "KRB5RCACHEDIR": str(directory / "rcache"),
            **leftovers.of_this_run(),
        }
        with (directory / "stderr.log").open("wb") as err:
            proc = subprocess.Popen(
                [str(APACHE), "-f", str(directory / "httpd.conf"), "-DFOREGROUND"], env=env, stderr=err
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + WAIT
            while _answer(url + "/owa/hello.txt") != 401:
                if proc.poll() is not None or time.monotonic() > deadline:
                    logs = [
                        (directory / n).read_text(errors="replace")
                        for n in ("stderr.log", "error.log")
                        if (directory / n).exists()
                    ]
                    raise RuntimeError(f"Apache did not answer 401 on {url}: {logs}")
                time.sleep(0.1)
            yield Apache(url, port, directory / "access.log", directory / "error.log", proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway_to_apache(lab: LabLayout, apache: Apache, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    extra = f'\n[[routes]]\nprefix = "/owa/"\nupstream = "{apache.url}"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("gw-apache"), lab_config(lab, port=free_port(), extra=extra))
    yield gw
    gw.stop()


def _who(apache: Apache, path: str) -> list[tuple[str, str]]:
    """(user, status) of each request for `path` in Apache's access log."""
    lines = apache.access_log.read_text(errors="replace").splitlines() if apache.access_log.exists() else []
    return [(u, s) for u, _, p, s in (line.split("|") for line in lines if line.count("|") == 3) if p == path]


def test_apache_carries_this_runs_mark(apache: Apache) -> None:
    """Apache, started with an environment made for it, carries this run's mark (tests/leftovers.py): a run killed
    while it runs leaves it to the next run to stop, as it leaves its labs and gateways."""
    found = [left for left in leftovers._marked() if left.pid == apache.pid]
    assert [left.run.mark() for left in found] == [os.environ[leftovers.MARK]], f"Apache's mark: {found}"


def test_apache_refuses_a_request_without_a_token(apache: Apache) -> None:
    """The acceptor is real: without Negotiate, Apache answers 401 with a Negotiate challenge."""
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(apache.url + "/owa/hello.txt", timeout=10)  # noqa: S310 (loopback)
    assert answer.value.code == 401
    assert answer.value.headers["WWW-Authenticate"] == "Negotiate"


@pytest.mark.parametrize("user", ["alice", "carol"])
def test_apache_authenticates_the_delegated_user(
    lab: LabLayout, apache: Apache, gateway_to_apache: Gateway, user: str
) -> None:
    """Through the gateway, each certificate user's request is authenticated by mod_auth_gssapi as that user's
    principal (S4U2Self + S4U2Proxy), and Apache's answer comes back unchanged."""
    path = f"/owa/hello.txt?{user}"
    res = curl(lab, gateway_to_apache.url + path, user)
    body, _, code = res.stdout.rpartition("\n")
    assert code == "200", res
    assert body == BODY
    seen = eventually(
        lambda: [s for u, s in _who(apache, "/owa/hello.txt") if u == f"{user}@LAB.TEST"] or None,
        f"{user}@LAB.TEST in Apache's access log",
    )
    assert "200" in seen


def test_apache_authenticates_a_basic_user_by_their_own_ticket(lab: LabLayout, apache: Apache, tmp_path: Path) -> None:
    """certificate-or-basic, no certificate: `curl -u bob:...` is served with a Negotiate token from bob's own
    ticket (no S4U), and mod_auth_gssapi authenticates it as bob."""
    extra = f'\n[[routes]]\nprefix = "/owa/"\nupstream = "{apache.url}"\nspn = "HTTP/cas.lab.test"\n'
    extra += '\n[authentication]\nmode = "certificate-or-basic"\n'
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    try:
        res = curl(lab, gw.url + "/owa/hello.txt?basic", None, "-u", f"bob:{USERS['bob']}")
        body, _, code = res.stdout.rpartition("\n")
        assert code == "200", res
        assert body == BODY
        eventually(
            lambda: "200" in [s for u, s in _who(apache, "/owa/hello.txt") if u == "bob@LAB.TEST"] or None,
            "bob@LAB.TEST in Apache's access log",
        )
    finally:
        assert gw.stop() == 0
