"""Many users' held requests against a gateway whose file descriptors are few (`prlimit`): what is left for the rest.

Each request a device holds open (an ActiveSync `Ping`) costs the gateway two descriptors, its device connection and
its backend connection, and every user's pool keeps up to 32 backend connections per upstream. The gateway runs under
`prlimit --nofile=LIMIT` in front of the lab's Exchange stand-in (a real Negotiate acceptor, holding each answer as a
`Ping` does), with a CRL URL refreshed every second and its admin listener; devices of many users of their own (lab
principals and certificates made here) hold requests. What the gateway holds is read from outside: /proc, its log,
its admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.descriptors import OVER_CAP
from proxy.lab.layout import LabLayout
from proxy.tls.limits import HEADER_WAITS, HEALTH_CHECKS
from tests.integration.conftest import (
    Gateway,
    accept_queue,
    client_context,
    free_port,
    lab_config,
    metric,
    start_gateway,
)
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_keepalive_reclaim import LOCAL, Stream, exchange, v2_header
from tests.integration.test_revocation import crl_url
from tests.integration.test_ticket_cache import _certificate_for

pytestmark = pytest.mark.slow(seconds=90)

LIMIT = 512  # the gateway's RLIMIT_NOFILE, soft and hard
USERS = 100
HELD = 5  # requests each user holds at once, each on a device connection of its own
SHARE = (LIMIT - min(256, LIMIT // 4) - OVER_CAP) // 2  # device, and backend, connections (throttles-and-limits.md)


@dataclass
class Users:
    names: list[str]
    bases: dict[str, Path]  # name -> the certificate's path without .pem (its key beside it)


@pytest.fixture(scope="module")
def users(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Users:
    """USERS lab principals of this module's own, each with a certificate; made in one kadmin.local."""
    tag = uuid.uuid4().hex[:6]
    names = [f"fd{tag}{i:03d}" for i in range(USERS)]
    script = "".join(f"addprinc -randkey {name}\n" for name in names)
    done = subprocess.run(
        ["kadmin.local"], input=script, capture_output=True, text=True, env={**os.environ, **lab.env()}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "error" not in done.stderr.lower(), done.stderr[-2000:]
    directory = tmp_path_factory.mktemp("fd-users")
    bases = {}
    for name in names:
        cert, _ = _certificate_for(lab, name, directory)
        bases[name] = cert.with_suffix("")
    return Users(names, bases)


@dataclass
class Scene:
    gw: Gateway
    admin: str
    lab: LabLayout

    def descriptors(self) -> int:
        """The gateway process's open file descriptors."""
        return len(list(Path(f"/proc/{self.gw.proc.pid}/fd").iterdir()))

    def scrape(self, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.admin + "/metrics", timeout=timeout) as r:  # noqa: S310  loopback
            return str(r.read().decode())


@pytest.fixture
def scene(lab: LabLayout, tmp_path: Path) -> Iterator[Scene]:
    """A gateway of its own under `prlimit --nofile=LIMIT`, with a CRL URL refreshed every second and an admin
    listener."""
    admin = free_port()
    crls = f'crls = ["{lab.pki_dir / "crls.pem"}", "{crl_url(lab, "issuing.crl")}"]\ncrl_refresh_seconds = 1\n'
    text = lab_config(lab, port=free_port()).replace('crls = ["' + str(lab.pki_dir / "crls.pem") + '"]\n', crls, 1)
    assert "crl_refresh_seconds = 1" in text
    text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    # The gateway takes SHARE handshakes at once, on a loaded machine with little CPU for them: its own slowness, not
    # the devices', would pass the default 10 s handshake_timeout (tls_handshake_abandoned, and the device, whose TLS
    # 1.3 side was done and its request sent, reads EPIPE). These tests bound their waits by WAIT; so does its timeout.
    text = text.replace("[listener]\n", f"[listener]\nhandshake_timeout = {WAIT:g}\n", 1)
    assert f"handshake_timeout = {WAIT:g}" in text
    gw = start_gateway(lab, tmp_path / "gw", text, launcher=("prlimit", f"--nofile={LIMIT}:{LIMIT}", sys.executable))
    try:
        yield Scene(gw, f"http://127.0.0.1:{admin}", lab)
    finally:
        gw.stop()


async def _device(port: int, ctx: ssl.SSLContext, hold: float, stop: asyncio.Event) -> bytes:
    """One device: a TLS connection (it may wait in the gateway's listen backlog), then a Ping the backend holds
    `hold` seconds; the gateway's answer, or b"" when `stop` is set first (the device then leaves)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    writer.write(
        b"POST /Microsoft-Server-ActiveSync?Cmd=Ping&hold=%g HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\nContent-Length: 0\r\n\r\n" % hold
    )
    answer = asyncio.ensure_future(reader.read())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({answer, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    writer.transport.abort()
    if answer.done():
        return answer.result()
    answer.cancel()
    return b""


def _devices(scene: Scene, users: Users, hold: float, stop: asyncio.Event) -> list[asyncio.Future[bytes]]:
    """HELD devices of each user, all at once (a user's one after the other: they reach the gateway together)."""
    contexts = {name: client_context(scene.lab, str(base)) for name, base in users.bases.items()}
    return [
        asyncio.ensure_future(_device(scene.gw.port, contexts[name], hold, stop))
        for name in users.names
        for _ in range(HELD)
    ]


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics page (0 when absent)."""
    inside = ",".join(f'{key}="{value}"' for key, value in labels.items())
    wanted = f"{name}{{{inside}}}" if labels else name
    return sum(float(line.rpartition(" ")[2]) for line in metrics.splitlines() if line.split(" ")[0] == wanted)


def test_many_users_holding_requests_leave_descriptors_for_accept_the_admin_and_crl_fetches(
    scene: Scene, users: Users
) -> None:
    """USERS users x HELD held requests, each two descriptors (device and backend connection), twice what the
    gateway has: it holds as many as its descriptors allow and leaves the rest waiting in the listen backlog. Its
    accept() never fails, the admin listener answers, CRL fetches go on, and no held request is refused.

    Before, every descriptor went (to device connections first): accept() failed (`accept_failed`), the admin
    listener reset the scrape, the CRL fetches failed, and the KDC calls too, so users not yet cached got 502
    (`kerberos_misconfigured`, "Too many open files")."""
    gw = scene.gw
    assert scene.descriptors() < 64  # what a gateway opens for itself at start
    mark = gw.mark()
    url = crl_url(scene.lab, "issuing.crl")

    async def attack() -> tuple[list[bytes], int, str]:
        stop = asyncio.Event()
        devices = _devices(scene, users, 3600, stop)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        # the gateway has taken all it will: its log says it stopped accepting, for lack of slots or of descriptors
        while not (gw.events("connection_limit_reached", after=mark) or gw.events("accept_failed", after=mark)):
            assert loop.time() < deadline, f"{scene.descriptors()} descriptors open"
            await asyncio.sleep(0.1)
        try:
            metrics = await asyncio.to_thread(scene.scrape)
            while _sample(metrics, "kcd_backend_connections") < SHARE:  # every device accepted has its Ping held
                assert loop.time() < deadline, f"{scene.descriptors()} descriptors open"
                await asyncio.sleep(0.2)
                metrics = await asyncio.to_thread(scene.scrape)
            full = time.time()
            while _sample(metrics, "kcd_crl_last_success_timestamp_seconds", source=url) <= full + 1:
                assert not gw.events("crl_fetch_failed", after=mark), gw.events("crl_fetch_failed", after=mark)
                assert loop.time() < deadline, "no CRL fetched while the requests are held"
                await asyncio.sleep(0.2)
                metrics = await asyncio.to_thread(scene.scrape)
        except OSError as e:  # the admin listener's accept() failed: it reset the scrape
            metrics = f"{type(e).__name__}: {e}"
        descriptors = scene.descriptors()
        stop.set()
        answers = await asyncio.gather(*devices, return_exceptions=True)
        return [a for a in answers if isinstance(a, bytes)], descriptors, metrics

    answers, descriptors, metrics = asyncio.run(attack())
    assert not gw.events("accept_failed", after=mark)
    assert "kcd_backend_connections" in metrics, metrics
    assert not [a for a in answers if a], "held requests were answered (refused) before the devices left"
    assert {int(e["status"]) for e in gw.events("request", after=mark)} <= {499}  # the devices left
    assert _sample(metrics, "kcd_listener_connection_limit") == SHARE
    assert _sample(metrics, "kcd_backend_connections") == _sample(metrics, "kcd_backend_connection_limit") == SHARE
    assert descriptors <= LIMIT - 64, descriptors  # held: SHARE device and SHARE backend connections, and the gateway's
    # the devices gone, the gateway gives its descriptors back
    eventually(lambda: scene.descriptors() < 64, "the gateway's descriptors back to what it holds at start")
    # and its start said what its open-file limit holds, and what would hold listener.max_connections
    low = gw.events("descriptor_limit_low")[0]
    assert (low["limit"], low["device_connections"], low["backend_connections"]) == (LIMIT, SHARE, SHARE)
    assert "raise it to 20306" in low["fix"]  # 10,000 device and backend connections, 50 past the cap, the reserve


def test_idle_backend_connections_of_many_users_make_room_for_new_ones(scene: Scene, users: Users) -> None:
    """USERS users x HELD requests at once, each held a second at the backend and answered: each user's pool keeps
    its connections for the next requests, more of them than the worker's backend connections may be, so the idle
    ones of the least recently used users are closed for new ones. Every request is served; the backend connections
    stay within their limit, counted in `kcd_backend_connections_reclaimed_total`.

    Before, the idle connections stayed (32 per user and upstream, up to 1,000 users, for 30 s), and once they and the
    device connections held every descriptor a backend connect() failed: 502 for the request."""
    gw = scene.gw
    mark = gw.mark()

    async def run() -> list[bytes | BaseException]:
        return await asyncio.gather(*_devices(scene, users, 1, asyncio.Event()), return_exceptions=True)

    answers = asyncio.run(run())
    assert not gw.events("tls_handshake_abandoned", after=mark), gw.events("tls_handshake_abandoned", after=mark)[:3]
    assert all(isinstance(a, bytes) and a.startswith(b"HTTP/1.1 200 ") for a in answers), {
        a[:12] if isinstance(a, bytes) else repr(a) for a in answers
    }
    assert not gw.events("accept_failed", after=mark)
    metrics = scene.scrape()
    assert _sample(metrics, "kcd_backend_connections_reclaimed_total") > 0
    assert _sample(metrics, "kcd_backend_connections") <= _sample(metrics, "kcd_backend_connection_limit") == SHARE
    assert scene.descriptors() <= LIMIT - 64


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(lab: LabLayout, tmp_path: Path) -> None:
    """Started with a shell's kind of limit (soft 512, hard 4,096), the gateway raises its soft limit to the hard one
    and shares that out: the start shares out 4,096, the 50 connections a worker holds past its cap counted (they were
    not), and the process's own soft limit is 4,096 (a soft 512 would have given its devices 167 connections)."""
    gw = start_gateway(
        lab,
        tmp_path / "gw",
        lab_config(lab, port=free_port()),
        launcher=("prlimit", "--nofile=512:4096", sys.executable),
    )
    try:
        budget = gw.events("descriptor_limit_low")[0]  # 4,096 does not hold the default max_connections either
        assert (budget["limit"], budget["device_connections"]) == (4096, (4096 - 256 - OVER_CAP) // 2)
        assert budget["reserved"] + budget["device_connections"] + OVER_CAP + budget["backend_connections"] == 4096
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
        assert re.search(r"^Max open files\s+4096\s+4096\s", limits, re.M), limits
    finally:
        gw.stop()


def _with_max_in_flight(text: str, max_in_flight: int) -> str:
    assert "[kerberos]\n" in text
    return text.replace("[kerberos]\n", f"[kerberos]\nmax_in_flight = {max_in_flight}\n", 1)


def test_the_reserve_grows_with_kerberos_max_in_flight(lab: LabLayout, tmp_path: Path) -> None:
    """kerberos.max_in_flight = 64 runs 194 KDC threads (three pools of 64, the readiness and directory probes'), each
    holding up to two sockets while a KDC is silent: the start keeps 388 descriptors for them besides the rest of the
    reserve (156), where the fixed 256 was sized for 16 and came up short past about 55 threads."""
    text = _with_max_in_flight(lab_config(lab, port=free_port()), 64)
    gw = start_gateway(lab, tmp_path / "gw", text, launcher=("prlimit", "--nofile=20000:20000", sys.executable))
    try:
        budget = (gw.events("descriptor_budget") or gw.events("descriptor_limit_low"))[0]
        assert budget["reserved"] == 156 + 2 * (3 * 64 + 2), budget
        assert budget["device_connections"] == (20000 - budget["reserved"] - OVER_CAP) // 2, budget
    finally:
        gw.stop()


def test_a_reload_raising_max_in_flight_past_the_reserve_is_refused_naming_a_restart(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The descriptor shares are set once, at start: 16 in flight keeps a reserve of 256. A SIGHUP raising
    kerberos.max_in_flight to 32 would run 98 KDC threads on that reserve (which has room for 50): the reload is
    refused naming the key, the reserve and "restart to apply", and the running configuration stays. Lowering it to 8
    needs no more than the reserve holds: reloaded."""
    text = lab_config(lab, port=free_port())
    gw = start_gateway(lab, tmp_path / "gw", text, launcher=("prlimit", "--nofile=20000:20000", sys.executable))
    try:
        assert (gw.events("descriptor_budget") or gw.events("descriptor_limit_low"))[0]["reserved"] == 256
        gw.mark()
        gw.config_path.write_text(_with_max_in_flight(text, 32))
        gw.proc.send_signal(signal.SIGHUP)
        refused = " ".join(gw.wait_event("reload_refused")["problems"])
        assert "kerberos.max_in_flight = 32" in refused, refused
        assert "reserve of 256" in refused, refused
        assert "restart to apply" in refused, refused
        gw.mark()
        gw.config_path.write_text(_with_max_in_flight(text, 8))
        gw.proc.send_signal(signal.SIGHUP)
        assert gw.wait_event("reloaded")["generation"] == 2
    finally:
        gw.stop()


def test_a_max_in_flight_the_open_file_limit_cannot_hold_is_refused_at_start(lab: LabLayout, tmp_path: Path) -> None:
    """Under an open-file limit of 1,024, kerberos.max_in_flight = 64 would let the KDC threads take 388 descriptors,
    more than the quarter of the limit the reserve may be: the start is refused (exit 2), naming the key, the
    descriptors it needs and the limit that would hold it, rather than serving until a silent KDC runs the process out
    of descriptors for accept(), CRL fetches and KDC calls alike."""
    directory = tmp_path / "gw"
    directory.mkdir()
    config = directory / "gateway.toml"
    config.write_text(_with_max_in_flight(lab_config(lab, port=free_port()), 64))
    done = subprocess.run(
        ["prlimit", "--nofile=1024:1024", sys.executable, "-m", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, **lab.env()},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "kerberos.max_in_flight" in out, out[-3000:]
    assert "2176" in out, out[-3000:]  # the limit whose quarter holds the whole reserve, 544


def test_check_config_refuses_the_max_in_flight_run_refuses_under_the_same_limit(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Issue 8: check-config "loads and cross-checks everything without serving", exit 1 and one line per problem
    naming the key and the file. Under the open-file limit that makes `run` exit 2 for kerberos.max_in_flight = 64
    (1,024, above), check-config run under that limit exits 1 with run's own line, saying it judged this process's
    limit, not the service's, and how to run it under the service's (a shell's hard limit below the unit's
    LimitNOFILE= refused what the service would start with, without a word of which limit); with a limit that holds
    it, ok. It said ok, and the operator's next `run` (or systemctl restart) failed."""
    config = tmp_path / "gateway.toml"
    config.write_text(_with_max_in_flight(lab_config(lab, port=free_port()), 64))

    def under(limit: str, command: str, option: str) -> subprocess.CompletedProcess[str]:
        argv = ["prlimit", f"--nofile={limit}", sys.executable, "-m", "proxy", command, *option.split(), str(config)]
        env = {**os.environ, **lab.env()}
        return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, env=env, check=False)

    checked = under("1024:1024", "check-config", "")
    started = under("1024:1024", "run", "--config")
    assert (checked.returncode, started.returncode) == (1, 2), checked.stdout + checked.stderr
    (line,) = checked.stdout.splitlines()
    assert line.startswith("kerberos.max_in_flight = 64 runs 194 KDC threads"), line
    assert line.endswith(f"(in {config})"), line
    problem, _, judged = line.partition("; judged under ")
    assert f"{problem} (in {config})" in started.stderr, started.stderr[-3000:]
    assert judged.startswith("this process's open-file limit (1024, ulimit -Hn here), not the service's"), line
    assert f"prlimit --nofile=N:N kcd-proxy check-config {config} (as root)" in judged, line
    assert "LimitNOFILE= (65536 in deploy/systemd/kcd-proxy.service)" in judged, line
    held = under("1024:4096", "check-config", "")  # run raises its soft limit to the hard one: so does the check
    assert held.returncode == 0, held.stdout + held.stderr
    assert held.stdout.strip() == f"{config}: ok (1 route(s))"


ADDRESSES = ("127.0.0.1", "127.0.0.2", "::1")  # what the listener's name resolves to: one listening socket each


def _gateway_on_a_name(lab: LabLayout, directory: Path, listener: str, extra: str = "") -> Gateway:
    """A gateway whose `listener.bind` is a name resolving to ADDRESSES (an /etc/hosts of its own, bind-mounted in a
    mount namespace of its own: nothing of the machine's changes), so that it listens on three sockets; `listener`'s
    lines added. Started once its log says it listens."""
    directory.mkdir(parents=True, exist_ok=True)
    hosts = directory / "hosts"
    names = "".join(f"{address} kcdmulti.test\n" for address in ADDRESSES)
    hosts.write_text(Path("/etc/hosts").read_text() + names)
    port = free_port()
    text = lab_config(lab, port=port, extra=extra).replace(
        f'bind = "127.0.0.1:{port}"', f'bind = "kcdmulti.test:{port}"', 1
    )
    assert "kcdmulti.test" in text
    text = text.replace("[listener]\n", f"[listener]\n{listener}", 1)
    config_path = directory / "gateway.toml"
    config_path.write_text(text)
    log_path = directory / "gateway.log"
    script = f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"'
    run = (sys.executable, "-m", "proxy", "run", "--config", str(config_path))
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", script, *run],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, **lab.env()},
        )
    gw = Gateway(f"https://127.0.0.1:{port}", port, proc, log_path, config_path)
    try:
        gw.wait_for("listening", lambda e: e.get("bind") == f"kcdmulti.test:{port}", what="three sockets")
    except BaseException:
        gw.stop()
        raise
    return gw


async def _busy_device(lab: LabLayout, address: str, port: int, user: str, source: str) -> Stream:
    """A device behind the balancer (`source` in a PROXY v2 header) on the listening socket of `address`, served once
    and then busy: its next request's head half sent."""
    raw = socket.create_connection((address, port), timeout=30)
    raw.sendall(v2_header(source, 40000))
    raw.setblocking(False)
    context = client_context(lab, user)
    stream = await asyncio.open_connection(sock=raw, ssl=context, server_hostname="127.0.0.1")
    assert (await exchange(stream, "/EWS/first"))[0] == 200
    stream[1].write(b"GET /EWS/slow HTTP/1.1\r\nHost: 127")
    await stream[1].drain()
    return stream


def test_the_descriptors_past_the_cap_are_counted_for_every_listening_socket(lab: LabLayout, tmp_path: Path) -> None:
    """A gateway behind a balancer listening on three sockets (`bind` a name with three addresses), at its cap of 3
    (a busy device on each socket): HEALTH_CHECKS checks stalled in TLS, then connections that send nothing, 15 on one
    socket, then three more on each. Each socket's accept loop takes one past HEADER_WAITS (each checks the count
    before it awaits accept()): 18 wait. The budget the start logged keeps descriptors past the cap for them, two per
    wait (an idle keep-alive closed for each still closing) and the checks: it kept 50, for one socket, where these
    need 52."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.0/8", "::1/128"]\nmax_connections = 3\n'
    gw = _gateway_on_a_name(lab, tmp_path / "gw", listener + "handshake_timeout = 60\n")
    raws: list[socket.socket] = []
    try:
        budget = (gw.events("descriptor_budget") or gw.events("descriptor_limit_low"))[0]
        past_cap = budget["limit"] - budget["reserved"] - budget["device_connections"] - budget["backend_connections"]

        async def run() -> None:
            users = ("alice", "bob", "carol")
            busy = [
                await _busy_device(lab, address, gw.port, user, f"203.0.113.{n}")
                for n, (address, user) in enumerate(zip(ADDRESSES, users, strict=True), 1)
            ]

            def opened(address: str, count: int, header: bytes = b"") -> None:
                for _ in range(count):
                    raws.append(socket.create_connection((address, gw.port), timeout=30))
                    if header:
                        raws[-1].sendall(header)

            opened("127.0.0.1", HEALTH_CHECKS, LOCAL)
            opened("127.0.0.1", HEADER_WAITS - 1)
            await asyncio.to_thread(eventually, lambda: accept_queue(gw.port) == 0, "the gateway accepted them")
            for address in ADDRESSES:
                opened(address, 3)
            waits = HEADER_WAITS + len(ADDRESSES) - 1
            left = len(raws) - HEALTH_CHECKS - waits  # what no accept loop may take: in the listen backlog
            await asyncio.to_thread(eventually, lambda: accept_queue(gw.port) == left, f"{waits} waits accepted")
            assert past_cap >= 2 * waits + HEALTH_CHECKS, (past_cap, waits, budget)
            for _, writer in busy:
                writer.close()

        asyncio.run(run())
    finally:
        for raw in raws:
            raw.close()
        gw.stop()


def test_devices_on_one_of_several_listening_addresses_get_every_slot(lab: LabLayout, tmp_path: Path) -> None:
    """Listening on three addresses at `max_connections = 3`, three devices on one of them, each holding a request,
    are all served: an accept loop waiting on an address with no traffic holds no slot; a fourth device waits."""
    gw = _gateway_on_a_name(lab, tmp_path / "gw", "max_connections = 3\nkeepalive_timeout = 120\n")
    try:

        async def busy(user: str) -> Stream:
            """A device on 127.0.0.1, served once, then busy: its next request's head half sent."""
            stream = await asyncio.open_connection("127.0.0.1", gw.port, ssl=client_context(lab, user))
            assert (await exchange(stream, "/EWS/first"))[0] == 200
            stream[1].write(b"GET /EWS/slow HTTP/1.1\r\nHost: 127")
            await stream[1].drain()
            return stream

        async def run() -> None:
            held: list[Stream] = []
            fourth = None
            try:
                for user in ("alice", "bob", "carol"):
                    try:
                        held.append(await asyncio.wait_for(busy(user), 30))
                    except TimeoutError:
                        raise AssertionError(f"device {len(held) + 1} of 3 ({user}) not served within 30 s") from None
                gw.mark()
                fourth = socket.create_connection(("127.0.0.2", gw.port), timeout=30)
                line = await asyncio.to_thread(gw.wait_event, "connection_limit_reached")
                assert (line["open"], line["limit"]) == (3, 3), line
            finally:
                if fourth is not None:
                    fourth.close()
                for _, writer in held:
                    writer.close()

        asyncio.run(run())
    finally:
        gw.stop()


async def _churn(address: str, port: int, n: int, header: bytes) -> None:
    """One of the churn's clients: connect (after `header`), then by `n`: close at once, reset after half a TLS hello,
    or send nothing and reset a moment later."""
    try:
        reader, writer = await asyncio.open_connection(address, port)
    except OSError:
        return
    raw = writer.get_extra_info("socket")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if header:
        writer.write(header)
    if n % 3 == 1:
        writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
    await writer.drain()
    if n % 3 == 2:
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(0.05 * (n % 7)):
                await reader.read(1)
    writer.close()


@pytest.mark.parametrize("balanced", [False, True], ids=["direct", "balanced"])
def test_a_churn_of_connections_at_the_cap_on_three_addresses_gives_every_slot_back(
    lab: LabLayout, tmp_path: Path, balanced: bool
) -> None:
    """Listening on three addresses at `max_connections = 3`, 600 connections (behind a balancer: a device's header,
    half a header, a LOCAL one or none) closed at once, reset mid-handshake or sent nothing, 30 at a time over the three
    addresses, then 9 that never send (closed by the gateway): the gauge never passes the cap, is back to 0, and a
    device is then served at once."""
    admin = f"127.0.0.1:{free_port()}"
    listener = "max_connections = 3\nhandshake_timeout = 2\n"
    if balanced:
        listener += 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.0/8", "::1/128"]\n'
    gw = _gateway_on_a_name(lab, tmp_path / "gw", listener, extra=f'\n[admin]\nbind = "{admin}"\n')
    url = f"http://{admin}"
    try:
        headers = [v2_header("203.0.113.7", 40000), v2_header("203.0.113.8", 40001)[:9], LOCAL, b""]

        async def run() -> None:
            seen: list[float] = []
            for start in range(0, 600, 30):
                await asyncio.gather(
                    *(
                        _churn(ADDRESSES[n % 3], gw.port, n, headers[n % 4] if balanced else b"")
                        for n in range(start, start + 30)
                    )
                )
                seen.append(await asyncio.to_thread(metric, url, "kcd_listener_connections"))
            silent = [
                await asyncio.open_connection(ADDRESSES[n % 3], gw.port) for n in range(9)
            ]  # connect and never send: closed by the gateway (handshake_timeout)
            for reader, _ in silent:
                try:
                    assert await asyncio.wait_for(reader.read(), 30) == b""
                except TimeoutError:
                    open_now = await asyncio.to_thread(metric, url, "kcd_listener_connections")
                    raise AssertionError(f"a silent connection not closed in 30 s, {open_now:g} slots held") from None
            for _, writer in silent:
                writer.close()
            assert max(seen) <= 3, seen
            reached = gw.events("connection_limit_reached")
            assert reached, "the churn never reached the cap"
            assert all(line["open"] == line["limit"] == 3 for line in reached), reached
            await asyncio.to_thread(
                eventually, lambda: metric(url, "kcd_listener_connections") == 0, "every slot given back"
            )
            raw = socket.create_connection(("127.0.0.2", gw.port), timeout=30)
            if balanced:
                raw.sendall(v2_header("203.0.113.9", 40002))
            raw.setblocking(False)
            connect = asyncio.open_connection(sock=raw, ssl=client_context(lab, "alice"), server_hostname="127.0.0.1")
            try:
                stream = await asyncio.wait_for(connect, 10)
            except TimeoutError:
                raise AssertionError("a device after the churn not served within 10 s") from None
            assert (await asyncio.wait_for(exchange(stream, "/EWS/after"), 10))[0] == 200
            stream[1].close()

        asyncio.run(run())
    finally:
        gw.stop()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time `pid` has used, in seconds (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_failing_for_want_of_descriptors_takes_no_slot_nor_the_cpu(lab: LabLayout, tmp_path: Path) -> None:
    """A running gateway whose open-file limit is lowered to what it holds (as `prlimit --pid`): devices that come make
    accept() fail (`accept_failed`), no slot is taken and the loop does not spin; the limit raised, they are served."""
    admin = f"127.0.0.1:{free_port()}"
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\n')
    gw = start_gateway(lab, tmp_path / "gw", text)
    url = f"http://{gw.admin}"
    pid = gw.proc.pid
    raws: list[socket.socket] = []
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        held = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
        gw.mark()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (held, hard))  # as `prlimit --pid` does
        raws = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(3)]
        gw.wait_event("accept_failed")
        before = _cpu_seconds(pid)
        started = time.monotonic()
        eventually(lambda: len(gw.events("accept_failed", gw.since)) >= 3, "accept() failed again")
        spent, elapsed = _cpu_seconds(pid) - before, time.monotonic() - started
        assert spent < 0.5 * elapsed + 0.1, (spent, elapsed)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert metric(url, "kcd_listener_connections") == 0
        for raw in raws:
            raw.close()

        async def served() -> int:
            stream = await asyncio.open_connection("127.0.0.1", gw.port, ssl=client_context(lab, "alice"))
            status = (await exchange(stream, "/EWS/after"))[0]
            stream[1].close()
            return status

        assert asyncio.run(asyncio.wait_for(served(), 10)) == 200
    finally:
        for raw in raws:
            raw.close()
        gw.stop()
