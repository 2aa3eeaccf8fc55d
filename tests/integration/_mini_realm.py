"""A throwaway MIT Kerberos realm for tests that need real tokens but not delegation.

Theory of operation: everything lives in one temporary directory. `start_mini_realm` writes a
`krb5.conf` and a `kdc.conf` there, creates a DB2 database with `kdb5_util create -s`, adds users with
passwords and services with random keys through `kadmin.local`, exports each service's keys into a
keytab of its own with `ktadd`, and runs `krb5kdc -n` in the foreground as a child process on a free
loopback port (TCP and UDP; the clients are told to use TCP). Every tool gets its configuration through
`KRB5_CONFIG` / `KRB5_KDC_PROFILE` in an explicit environment, so `/etc/krb5.conf` is never read.

What it cannot do: the DB2 back end refuses S4U2Proxy (constrained delegation), see LAB-NOTES.md.
That is the LDAP-backed lab KDC's job (`proxy.lab.kdc`); this realm only issues ordinary service
tickets, which is all a Negotiate acceptor needs to be tested against.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.lab.layout import krb5_libdefaults

REALM = "LAB.TEST"
MASTER_PASSWORD = "mini-realm-master"
_READY_TIMEOUT = 60.0  # krb5kdc starts in well under a second, on a loaded machine in several


class MiniRealmError(RuntimeError):
    """The realm could not be built or its KDC did not come up."""


@dataclass
class MiniRealm:
    """A running realm: where its files are and how to stop its KDC."""

    root: Path
    realm: str
    kdc_port: int
    krb5_conf: Path
    kdc_conf: Path
    kdc_log: Path
    users: Mapping[str, str] = field(repr=False)
    keytabs: Mapping[str, Path]  # service principal (without realm) -> keytab holding only its keys
    _kdc: subprocess.Popen[bytes] = field(repr=False)

    def env(self) -> dict[str, str]:
        """Variables that point Kerberos libraries and tools at this realm and nothing else."""
        return _realm_env(self.root, self.krb5_conf, self.kdc_conf)

    def kadmin(self, query: str) -> str:
        """Run one `kadmin.local` query against the realm's database; returns its output."""
        return _kadmin(self.root, self.krb5_conf, self.kdc_conf, query)

    def stop(self) -> None:
        """Stop the KDC (SIGTERM, then SIGKILL); the files stay for the caller's temp dir to remove."""
        if self._kdc.poll() is None:
            self._kdc.terminate()
            try:
                self._kdc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._kdc.kill()
                self._kdc.wait(timeout=5)


def _realm_env(root: Path, krb5_conf: Path, kdc_conf: Path) -> dict[str, str]:
    return {
        "KRB5_CONFIG": str(krb5_conf),
        "KRB5_KDC_PROFILE": str(kdc_conf),
        "KRB5CCNAME": f"FILE:{root / 'ccache'}",
        "KRB5RCACHEDIR": str(root / "rcache"),
    }


def _run(argv: list[str], env: Mapping[str, str], *, stdin: str | None = None) -> str:
    result = subprocess.run(
        argv,
        input=stdin,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise MiniRealmError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _kadmin(root: Path, krb5_conf: Path, kdc_conf: Path, query: str) -> str:
    # kadmin.local exits 0 even when its query fails (the complaint goes to stderr only), so
    # start_mini_realm checks the result with listprincs rather than trusting the exit status.
    return _run(["kadmin.local", "-r", REALM, "-q", query], _realm_env(root, krb5_conf, kdc_conf))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the KDC start retries if it was taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_configs(root: Path, port: int) -> tuple[Path, Path, Path]:
    krb5_conf = root / "krb5.conf"
    kdc_conf = root / "kdc.conf"
    kdc_log = root / "kdc.log"
    krb5_conf.write_text(
        f"""{krb5_libdefaults(REALM, f"default_ccache_name = FILE:{root / 'ccache'}")}
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}

[domain_realm]
    .lab.test = {REALM}
    lab.test = {REALM}
"""
    )
    kdc_conf.write_text(
        f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}

[realms]
    {REALM} = {{
        database_name = {root / "db" / "principal"}
        key_stash_file = {root / "db" / "stash"}
        acl_file = {root / "db" / "kadm5.acl"}
        max_life = 10h
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{kdc_log}
"""
    )
    return krb5_conf, kdc_conf, kdc_log


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until krb5kdc has logged `commencing operation` (its sockets are bound) and the port answers: a connect
    alone would also succeed against another process that took the port meanwhile."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise MiniRealmError(f"krb5kdc exited with {proc.returncode}: {text[-2000:]}")
        if log.exists() and "commencing operation" in log.read_text(errors="replace"):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                pass
        time.sleep(0.02)
    raise MiniRealmError(f"krb5kdc did not listen on 127.0.0.1:{port} within {_READY_TIMEOUT} s")


def start_mini_realm(
    root: Path,
    *,
    users: Mapping[str, str],
    services: Iterable[str] = ("HTTP/cas.lab.test",),
    attempts: int = 3,
) -> MiniRealm:
    """Build a realm in `root` (an empty directory), start its KDC and return it; call `stop()` after.

    `users` maps user names to passwords; each of `services` gets random keys and a keytab
    `root/keytabs/<service with / replaced by _>.keytab`.
    """
    (root / "db").mkdir(parents=True)
    (root / "rcache").mkdir()
    (root / "keytabs").mkdir()
    port = free_port()
    krb5_conf, kdc_conf, kdc_log = _write_configs(root, port)
    env = _realm_env(root, krb5_conf, kdc_conf)
    (root / "db" / "kadm5.acl").write_text("")

    _run(["kdb5_util", "create", "-s", "-r", REALM, "-P", MASTER_PASSWORD], env)
    for user, password in users.items():
        _kadmin(root, krb5_conf, kdc_conf, f"addprinc -pw {password} {user}")
    keytabs: dict[str, Path] = {}
    for service in services:
        keytab = root / "keytabs" / (service.replace("/", "_") + ".keytab")
        _kadmin(root, krb5_conf, kdc_conf, f"addprinc -randkey {service}")
        _kadmin(root, krb5_conf, kdc_conf, f"ktadd -k {keytab} {service}")
        if not keytab.exists():
            raise MiniRealmError(f"ktadd wrote no keytab for {service}")
        keytabs[service] = keytab
    listed = _kadmin(root, krb5_conf, kdc_conf, "listprincs")
    missing = [p for p in [*users, *keytabs] if f"{p}@{REALM}" not in listed.split()]
    if missing:
        raise MiniRealmError(f"principals missing after kadmin.local: {missing}")

    for attempt in range(attempts):
        proc = subprocess.Popen(
            ["krb5kdc", "-n", "-r", REALM],
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_listening(proc, port, kdc_log)
        except MiniRealmError:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            if attempt + 1 == attempts:
                raise
            # The port was probably taken between free_port() and the bind: move to another one.
            port = free_port()
            krb5_conf, kdc_conf, kdc_log = _write_configs(root, port)
            continue
        return MiniRealm(
            root=root,
            realm=REALM,
            kdc_port=port,
            krb5_conf=krb5_conf,
            kdc_conf=kdc_conf,
            kdc_log=kdc_log,
            users=dict(users),
            keytabs=keytabs,
            _kdc=proc,
        )
    raise MiniRealmError("unreachable")  # pragma: no cover
