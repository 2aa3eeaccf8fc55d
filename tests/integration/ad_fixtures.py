"""The AD realm for tests: one Samba AD DC per `make test` run, shared by every worker and test file.

`ad_realm` (session) is the realm (`proxy.lab.ad.AdRealm`; its docstring lists the API). It lives in
`.lab/test/ad/` of the checkout, so its provisioning is kept between runs (a later run restarts it in
seconds), and in a network namespace named after that directory, so another worktree's run or a
`make lab-ad` never meets it. xdist workers each have a session, and runs of one checkout at once share the realm:
each session holds `users.lock` shared while it uses the realm (taken, and the realm brought up, under the realm's
`.lock`); the last one out (the one that then takes `users.lock` exclusively, under `.lock`) stops the realm and
removes its namespace. samba carries the mark of the run that started it, which may end while another run uses the
realm: its environment names `users.lock` (`leftovers.SHARED_LOCK`), and a run starting stops it as a killed run's
leftover only while nobody holds that lock (tests/leftovers.py).

`ad_mapping_realm` (session) adds the strong-mapping accounts, certificates and the DC's name.
`ad_backend` (session) is an Exchange stand-in for `HTTP/cas.ad.test` inside the namespace;
`start_ad_gateway` runs `kcd-proxy run` in there; `ad_curl` is curl in there with an AD user's certificate.
Tests that use them carry `@pytest.mark.timeout(AD_TIMEOUT)`: the first pays for provisioning.
Every gateway started here (`_start`) waits up to AD_KDC_TIMEOUT for the KDC (`kerberos.kdc_timeout`), unless its
configuration names its own: Samba's KDC answers a pre-authenticated AS-REQ only after writing the account's logon
statistics to sam.ldb, and waits meanwhile for any write transaction another process holds there (a test's
`samba-tool`, `ldbmodify`; docs/hardening.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from proxy.lab import ad, ad_mapping
from tests import leftovers
from tests.integration.jsonlog import WAIT, JsonLog

REPO = Path(__file__).resolve().parents[2]
AD_TIMEOUT = 900  # provisioning takes 90-130 s on a busy machine, and a test may wait for it
# kerberos.kdc_timeout of the AD tests' gateways: a kinit waited as long as another process held a write transaction
# on sam.ldb (13.3 s of a 15 s hold; 0.05 s without), and under a load of 15 the gateway's own AS-REQ took 27.4 s.
AD_KDC_TIMEOUT = 60


def test_realm_root() -> Path:
    """Where the tests' AD realm lives: `$KCD_TEST_AD_DIR`, else `.lab/test/ad/` in the checkout
    (`kcd-proxy lab status --ad --dir .lab/test` addresses it)."""
    return Path(os.environ.get("KCD_TEST_AD_DIR") or REPO / ".lab" / "test" / "ad").resolve()


test_realm_root.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apply_lockout_policy(realm: ad.AdRealm, pso: str, precedence: int, threshold: int, account: str) -> None:
    """A fine-grained password policy (PSO) that locks `account` after `threshold` bad passwords within 30 minutes,
    for 30 minutes: made once under its name, then applied to the account (call it under `_locked`)."""
    if pso not in realm.samba_tool("domain", "passwordsettings", "pso", "list"):
        realm.samba_tool(
            "domain",
            "passwordsettings",
            "pso",
            "create",
            pso,
            str(precedence),
            f"--account-lockout-threshold={threshold}",
            "--account-lockout-duration=30",
            "--reset-account-lockout-after=30",
        )
    realm.samba_tool("domain", "passwordsettings", "pso", "apply", pso, account)


def users_lock(realm: ad.AdRealm) -> Path:
    """The lock each session using the realm holds shared (`ad_realm`), named in samba's environment; `kcd-proxy lab
    down` leaves the realm running while it is held (`proxy.lab.ad.unused`)."""
    return ad.users_lock(realm)


@pytest.fixture(scope="session")
def ad_realm() -> Iterator[ad.AdRealm]:
    """The Samba AD DC realm AD.TEST, up; shared by the workers of the runs of this checkout, stopped by the last
    one out."""
    if os.geteuid() != 0:
        pytest.skip("the AD realm needs root: it creates a network namespace and runs samba (make test runs as root)")
    realm = ad.AdRealm.at(test_realm_root())
    with _locked(realm.root):
        use = users_lock(realm).open("a")
        try:
            fcntl.flock(use, fcntl.LOCK_SH)  # waits while a starting run stops a dead run's samba (tests/leftovers.py)
            with mock.patch.dict(os.environ, {leftovers.SHARED_LOCK: str(users_lock(realm))}):
                ad.ensure(realm)  # samba, if started now, names the lock in its environment
        except BaseException:
            use.close()
            raise
    try:
        yield realm
    finally:
        with _locked(realm.root), use:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session (this run's or another run's) still uses the realm
            else:
                ad.down(realm)


@pytest.fixture(scope="session")
def ad_mapping_realm(ad_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the strong-mapping accounts and certificates and the DC's name in the namespace's hosts
    file (`proxy.lab.ad_mapping.ensure`), made under the realm's lock: the workers share the realm, and two
    making the same accounts and files at once collide. The name stays as long as the realm (`ad.down`, by the
    last worker out, removes it with the namespace), never only as long as one worker's module: with the tests
    of a module spread over workers (`--dist load`), another worker is still using it."""
    with _locked(ad_realm.root):
        ad_mapping.ensure(ad_realm)
    return ad_realm


@dataclass
class AdProcess(JsonLog):
    """A daemon running inside the realm's namespace (a gateway, a backend), with its log (`JsonLog`: `mark`
    before a request, then `wait_event`)."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(realm: ad.AdRealm, argv: list[str], port: int, log: Path, *, scheme: str) -> AdProcess:
    """Start a daemon in the namespace and wait until it says it listens on `port` and the port answers (its own
    line, not only a connect: both xdist workers pick ports in this namespace)."""
    if "--config" in argv:
        _wait_for_the_kdc(Path(argv[argv.index("--config") + 1]))
    proc = realm.popen(argv, log=log, env={"PYTHONPATH": str(REPO)})
    started = AdProcess(f"{scheme}://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + WAIT
    bind = f"127.0.0.1:{port}"
    while not (_says_listening(log, bind) and realm.port_answers(port, "127.0.0.1")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{argv} did not listen on {port} in {realm.netns}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"{argv} exited after listening on {port}:\n{log.read_text()[-3000:]}")
    return started


def _wait_for_the_kdc(config: Path) -> None:
    """Give the gateway configured in `config` `kdc_timeout = AD_KDC_TIMEOUT` unless it names its own: the tests
    judge what the gateway does with the KDC's answer, not how soon Samba gives it while a test writes to sam.ldb."""
    text = config.read_text()
    if "[kerberos]\n" in text and not any(line.startswith("kdc_timeout =") for line in text.splitlines()):
        config.write_text(text.replace("[kerberos]\n", f"[kerberos]\nkdc_timeout = {AD_KDC_TIMEOUT}\n", 1))


def _says_listening(log: Path, bind: str) -> bool:
    """Whether the daemon's log has its `listening` line for `bind` (the gateway's is JSON, the backend's is
    structlog's console form: the address is found in either)."""
    return any("listening" in line and bind in line for line in log.read_text(errors="replace").splitlines())


@pytest.fixture(scope="session")
def ad_backend(ad_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """The Exchange stand-in for HTTP/cas.ad.test, inside the namespace."""
    port = ad_realm.free_port()
    log = tmp_path_factory.mktemp("ad-backend") / "backend.log"
    backend = _start(ad_realm, ad.backend_argv(ad_realm, port), port, log, scheme="http")
    yield backend
    backend.stop()


def start_ad_gateway(
    realm: ad.AdRealm, directory: Path, backend: AdProcess, extra: str = "", *, workers: int = 1, **replace: str
) -> AdProcess:
    """`kcd-proxy run` inside the namespace with the realm's lab configuration, `extra` TOML appended and
    each `replace` key's line (e.g. principal=...) given a new value; `workers`: `listener.workers`."""
    directory.mkdir(parents=True, exist_ok=True)
    port = realm.free_port()
    text = ad.gateway_config(realm, port=port, backend_port=backend.port)
    if workers != 1:
        bind = next(line for line in text.splitlines() if line.startswith("bind = "))
        text = text.replace(bind + "\n", f"{bind}\nworkers = {workers}\n", 1)
    for key, value in replace.items():
        lines = text.splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        lines[index] = f"{key} = {value}"
        text = "\n".join(lines) + "\n"
    config = directory / "gateway.toml"
    config.write_text(text + extra)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    return _start(realm, argv, port, directory / "gateway.log", scheme="https")


def ad_curl(realm: ad.AdRealm, url: str, user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """curl inside the namespace, as a device: the lab root as its trust, and the AD user's certificate.
    The output ends with a line holding the HTTP status."""
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert)]
    if user is not None:
        cmd += ["--cert", str(realm.user_cert(user)), "--key", str(realm.user_key(user))]
    return realm.run([*cmd, "-w", "\n%{http_code}", *args, url], timeout=60)


def status_and_body(done: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body


def kdc_log_offset(realm: ad.AdRealm) -> int:
    """Where Samba's log ends now: `wait_kdc_reason` reads only what comes after it."""
    return realm.samba_log.stat().st_size if realm.samba_log.exists() else 0


def wait_kdc_reason(realm: ad.AdRealm, offset: int, *needles: str, timeout: float = WAIT) -> str:
    """The first line Samba's KDC logged after `offset` that holds every needle (e.g. `reason=...`)."""
    deadline = time.monotonic() + timeout
    while True:
        text = realm.samba_log.read_bytes()[offset:].decode(errors="replace")
        for line in text.splitlines():
            if all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"Samba logged no line with {needles} after offset {offset}:\n{text[-3000:]}")
        time.sleep(0.1)
