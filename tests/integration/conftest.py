"""Real parts for integration tests: the lab (slapd + MIT KDC, PKI, Exchange stand-in) and gateways.

The lab is brought up once per test session in a temporary directory, on ports of its own so a
`make lab` running beside the tests is not disturbed. Gateways run as real `kcd-proxy run` processes,
and clients are real ones (curl, aiohttp over TLS).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from proxy.config import Kerberos
from proxy.kerberos.delegate import Delegator
from proxy.lab import runner
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.ad_fixtures import (  # noqa: F401 -- the AD realm's fixtures, for every file
    ad_backend,
    ad_mapping_realm,
    ad_realm,
)
from tests.integration.jsonlog import WAIT, JsonLog

if TYPE_CHECKING:  # recorder imports this module
    from tests.integration.recorder import Recorder

REPO = Path(__file__).resolve().parents[2]


_GIVEN: collections.deque[int] = collections.deque(maxlen=64)  # free_port()'s last answers in this process


def free_port() -> int:
    """A loopback port free now, not one of the last 64 this process was given: the kernel can hand the same port
    to two binds in a row, and a test that asked for a listener's and an admin port got one port for both (a
    configuration error at start: "give the admin listener a port of its own")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.append(port)
            return port


_HELD: list[socket.socket] = []  # the sockets behind dead_port() and reserved_port(), held until the process ends


def dead_port() -> int:
    """A loopback port where nothing listens, for as long as the test process runs: bound here and never
    listened on, so connections are refused and no other process can take it (as one could a free_port())."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    port: int = held.getsockname()[1]
    return port


def reserved_port() -> int:
    """A loopback port kept for a server this test process starts later (the lab's OCSP responder, whose port the
    lab's certificates name, is started by test_revocation's fixture, minutes after the lab): bound here with
    SO_REUSEADDR and never listened on, for as long as the test process runs. The kernel gives no outgoing
    connection a port some socket is bound to, and a server that binds with SO_REUSEADDR (`openssl ocsp` does) can
    still take it. A free_port() was taken meanwhile as some connection's source port, under load: `openssl ocsp`
    failed with "Address already in use" (flake8)."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    port: int = held.getsockname()[1]
    return port


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = WAIT) -> None:
    """Until 127.0.0.1:`port` accepts connections; with `proc`, until `proc` itself holds the listening socket
    (a connect would also succeed against another process that took the port after `free_port`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        if proc is not None:
            if _listens(proc.pid, port):
                return
        else:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def accept_queue(port: int) -> int:
    """Connections to the listener on `port` that the kernel completed and the gateway has not accepted yet."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (/proc: its fds' socket inodes, and the
    kernel's table of TCP sockets in this network namespace)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            listening = fields[3] == "0A"  # TCP_LISTEN
            if listening and int(fields[1].rpartition(":")[2], 16) == port and fields[9] in inodes:
                return True
    return False


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabLayout]:
    """The lab on ports that were free when picked; a daemon that finds its port taken meanwhile (another test
    run on this machine) fails to start, and the lab is brought up again on new ports, in a new directory."""
    for attempt in range(3):
        layout = LabLayout(
            root=tmp_path_factory.mktemp("lab"),
            ldap_port=free_port(),
            kdc_port=free_port(),
            backend_port=free_port(),
            crl_port=free_port(),
            ocsp_port=reserved_port(),
            gateway_port=free_port(),
        )
        try:
            runner.up(layout)
            break
        except RuntimeError:
            runner.down(layout)
            if attempt == 2:
                raise
        except BaseException:  # anything else `up` raises: what it started is stopped all the same
            runner.down(layout)
            raise
    os.environ.update({"KRB5_CONFIG": str(layout.krb5_conf)})
    try:
        yield layout
    finally:
        runner.down(layout)


@pytest.fixture(autouse=True)
def _krb5_config_as_found() -> Iterator[None]:
    """Every test leaves the process's KRB5_CONFIG as it found it (the lab's, once the lab is up). A Delegator made
    in the test's process points KRB5_CONFIG at its overlay of the krb5.conf it was given, which is the gateway's
    behaviour (one Delegator per process); a test's krb5.conf naming its own relay or second KDC, gone at its end,
    then stayed MIT's for the next tests in this process that use the environment's ("Cannot contact any KDC")."""
    found = os.environ.get("KRB5_CONFIG")
    try:
        yield
    finally:
        if found is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = found


@pytest.fixture
def delegator(lab: LabLayout) -> Iterator[Delegator]:
    """The gateway's Delegator on the lab's keytab and krb5.conf, in the test's own process (closed after)."""
    settings = Kerberos(principal=f"{PROXY_SERVICE}@{REALM}", keytab=lab.proxy_keytab, krb5_config=lab.krb5_conf)
    delegator = Delegator(settings)
    try:
        yield delegator
    finally:
        delegator.close()


@dataclass
class Gateway(JsonLog):
    """A running `kcd-proxy run`; its log is read with `JsonLog` (`mark` before a request, then `wait_event`)."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    admin: str | None = None  # its `[admin] bind`, as started (`start_gateway` may have moved it to a free port)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_gateway(
    lab: LabLayout,
    directory: Path,
    config_text: str,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    launcher: tuple[str, ...] = (sys.executable,),
    listen_timeout: float = WAIT,
) -> Gateway:
    """`kcd-proxy run` with `config_text` (and `args`, such as `--log-level debug`; `env` added to the lab's;
    `launcher` the Python, or a script that runs it, given `-m proxy run ...`), once its log says it listens (and
    its admin listener too, if it has one), within `listen_timeout` seconds. Its ports were free when the test picked
    them, but another process (another test run on this machine) may have bound one since: then the gateway is started
    again with that port (the listener's or the admin listener's, `Gateway.admin`) moved to a new one, the
    configuration rewritten (a cheap retry). The kernel's "Address already in use" reaches the log as asyncio words it,
    in lower case, too."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "gateway.toml"
    log_path = directory / "gateway.log"
    for attempt in range(3):
        port = int(config_text.split('bind = "127.0.0.1:', 1)[1].split('"', 1)[0])
        config_path.write_text(config_text)
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                [*launcher, "-m", "proxy", "run", "--config", str(config_path), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, **lab.env(), **(env or {})},
            )
        admin = _admin_bind(config_text)
        gw = Gateway(f"https://127.0.0.1:{port}", port, proc, log_path, config_path, admin)
        if _listening(gw, admin, listen_timeout):
            return gw
        log = log_path.read_text(errors="replace")
        in_use = [line for line in log.splitlines() if "already in use" in line.lower()]
        if not in_use or attempt == 2:
            raise RuntimeError(log[-5000:])
        admin_port = admin.rpartition(":")[2] if admin is not None else None
        if admin_port is not None and any(f":{admin_port}" in line or f", {admin_port})" in line for line in in_use):
            taken = f'bind = "{admin}"'  # the admin listener's port: asyncio says ('127.0.0.1', PORT), others H:PORT
        else:
            taken = f'bind = "127.0.0.1:{port}"'
        config_text = config_text.replace(taken, f'bind = "127.0.0.1:{free_port()}"', 1)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def gateway_on_server(
    lab: LabLayout, directory: Path, server: str, config_text: str, *, listener: str = ""
) -> Iterator[Gateway]:
    """`start_gateway` with `listener.http_server = server` and `listener`'s lines added to `config_text`'s
    [listener] table, once its `listening` line names that server; stopped at the end."""
    text = config_text.replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\n{listener}', 1)
    gw = start_gateway(lab, directory, text)
    try:
        gw.wait_for("listening", lambda e: e.get("http_server") == server, what=server)
        yield gw
    finally:
        gw.stop()


def _listening(gw: Gateway, admin: str | None, timeout: float = WAIT) -> bool:
    """Whether the gateway logged `listening` on its port, and `admin_listening` on `admin` when it has an admin
    listener (its own lines, not merely: something answers there, which another process holding that port
    would too); False once it has exited."""
    deadline = time.monotonic() + timeout
    wanted = {("listening", f"127.0.0.1:{gw.port}")} | ({("admin_listening", admin)} if admin else set())
    while time.monotonic() < deadline:
        if wanted <= {(e.get("event"), e.get("bind")) for e in gw.logs()}:
            return True
        if gw.proc.poll() is not None:
            return False
        time.sleep(0.05)
    gw.proc.kill()
    gw.proc.wait()
    raise RuntimeError(f"the gateway did not listen on {wanted} in {timeout} s:\n{gw.log_path.read_text()[-3000:]}")


def _admin_bind(config_text: str) -> str | None:
    """The `[admin] bind` of a gateway configuration, if it has an admin listener."""
    if "\n[admin]\n" not in config_text:
        return None
    table = config_text.split("\n[admin]\n", 1)[1].split("\n[", 1)[0]
    if 'bind = "' not in table:
        return None  # a Unix socket only (`admin.socket`)
    return table.split('bind = "', 1)[1].split('"', 1)[0]


def lab_config(lab: LabLayout, *, port: int, extra: str = "", krb5_conf: Path | None = None) -> str:
    text = runner.gateway_config(lab, gateway_port=port) + extra
    if krb5_conf is not None:
        text = text.replace(f'krb5_config = "{lab.krb5_conf}"', f'krb5_config = "{krb5_conf}"')
    return text


@pytest.fixture(scope="session")
def other_backend(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second Exchange stand-in holding the key of another service: it rejects tickets for cas."""
    port = free_port()
    log = tmp_path_factory.mktemp("other-backend") / "backend.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.lab.backend",
                "--keytab",
                str(lab.other_keytab),
                "--bind",
                f"127.0.0.1:{port}",
                "--krb5-config",
                str(lab.krb5_conf),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_port(port, proc)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def failing_routes(lab: LabLayout, other_backend: str) -> str:
    """Routes that each fail one way: an SPN outside the delegation list, a dead upstream, a wrong key."""
    return f"""
[[routes]]
prefix = "/not-delegable/"
upstream = "http://127.0.0.1:{lab.backend_port}"
spn = "HTTP/other.lab.test"

[[routes]]
prefix = "/dead/"
upstream = "http://127.0.0.1:{dead_port()}"
spn = "HTTP/cas.lab.test"

[[routes]]
prefix = "/wrong-key/"
upstream = "{other_backend}"
spn = "HTTP/cas.lab.test"
"""


@pytest.fixture(scope="session")
def gateway(lab: LabLayout, other_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The gateway in front of the lab, with extra routes that exercise each failure."""
    extra = failing_routes(lab, other_backend)
    gw = start_gateway(lab, tmp_path_factory.mktemp("gateway"), lab_config(lab, port=free_port(), extra=extra))
    yield gw
    gw.stop()


def metric(admin: str, name: str) -> float:
    """The value of metric `name` (its samples summed) on the gateway's admin listener at URL `admin`."""
    with urllib.request.urlopen(admin + "/metrics", timeout=30) as r:  # noqa: S310  loopback
        text = r.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.split(" ")[0] == name)


@dataclass
class ServerScene:
    """A gateway on one device-side server (`gateway_on_server`) in front of a recording backend, with its admin
    listener: what the attack files' module fixtures yield, each adding its own probes."""

    gw: Gateway
    recorder: Recorder
    admin: str
    lab: LabLayout
    server: str

    def gauge(self, name: str) -> float:
        return metric(self.admin, name)


def s_client_resumed(lab: LabLayout, port: int, version: str, session: Path) -> tuple[bytes, bytes]:
    """alice's `openssl s_client` (`version`: `-tls1_2`, `-tls1_3`) asking EWS on `port` twice: a full handshake
    that saves its session to `session` (`-sess_out`), then a connection offering it (`-sess_in`); both stdouts."""
    users = lab.pki_dir / "users"
    argv = ["openssl", "s_client", version, "-ign_eof", "-connect", f"127.0.0.1:{port}"]
    argv += ["-CAfile", str(lab.pki_dir / "root.pem")]
    argv += ["-cert", str(users / "alice.pem"), "-key", str(users / "alice.key")]
    request = b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    first = subprocess.run([*argv, "-sess_out", str(session)], input=request, capture_output=True, timeout=60)
    second = subprocess.run([*argv, "-sess_in", str(session)], input=request, capture_output=True, timeout=60)
    return first.stdout, second.stdout


def client_context(lab: LabLayout, user: str | None) -> ssl.SSLContext:
    """A device's TLS context: the lab root as trust, and a lab user's certificate (or one at an absolute
    path, without its .pem suffix; the key beside it)."""
    ctx = ssl.create_default_context(cafile=str(lab.pki_dir / "root.pem"))
    if user is not None:
        base = Path(user) if Path(user).is_absolute() else lab.pki_dir / "users" / user
        ctx.load_cert_chain(f"{base}.pem", f"{base}.key")
    return ctx


def curl(lab: LabLayout, url: str, user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """curl as a device would run it: the lab root as its trust, and the user's certificate."""
    cmd = ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem")]
    if user is not None:
        users = lab.pki_dir / "users"
        cmd += ["--cert", str(users / f"{user}.pem"), "--key", str(users / f"{user}.key")]
    cmd += ["-w", "\n%{http_code}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
