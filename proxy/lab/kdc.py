"""The lab's Kerberos realm: an MIT KDC that keeps its database in OpenLDAP, on loopback.

Theory of operation
-------------------
The gateway's whole point is constrained delegation: it impersonates a user to itself (S4U2Self,
protocol transition) and then asks the KDC for a ticket to a backend on that user's behalf
(S4U2Proxy). MIT krb5's default DB2 database cannot authorise the second step: it has nowhere to keep
a delegation allow-list, and the KDC answers "KDC can't fulfill requested option" for every target.
The LDAP database module (kldap) can: the allow-list is the `krbAllowedToDelegateTo` attribute of the
proxy principal's LDAP entry. So the lab realm is two daemons:

    slapd     ldap://127.0.0.1:<ldap_port>/   back_mdb, suffix dc=lab,dc=test, holds realm LAB.TEST
    krb5kdc   <bind_host>:<kdc_port> TCP+UDP  serves LAB.TEST, reads its principals from slapd

`ensure_realm` writes slapd.conf, krb5.conf and kdc.conf under the lab directory and, on first use,
provisions the realm: the LDAP base entry, the KDC's stashed LDAP password and the realm with its
master key (`kdb5_ldap_util`), users and services (`kadmin.local`), one keytab per service (exported
with `-norandkey`, so exporting never changes a key), and the proxy's delegation allow-list
(`ldapmodify`: kadmin cannot set it). A marker written last says the realm is complete; without it the
next call provisions again from scratch. Later calls only start the daemons, and when both run on the
ports recorded at their start the call returns at once.

Every tool and daemon gets `KRB5_CONFIG` and `KRB5_KDC_PROFILE` from the layout, and `LDAPNOINIT` so
that libldap skips /etc/ldap/ldap.conf: nothing in /etc is read but the system LDAP schemas, nothing
outside the lab directory is written. The lab trusts itself:
fixed passwords, the LDAP root DN doubling as the KDC's bind DN, keytabs readable by everyone. slapd
listens on 127.0.0.1 only; the KDC on the layout's `bind_host` (127.0.0.1 natively, the container's
network in docker compose, where clients find it as `kdc_host`). It is a test bench, not a template for
a production KDC.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.lab import readiness, tools
from proxy.lab.layout import (
    BACKEND_SERVICE,
    DISABLED_USERS,
    OTHER_SERVICE,
    PROXY_SERVICE,
    REALM,
    USERS,
    LabLayout,
    krb5_libdefaults,
    variable,
)

SUFFIX = "dc=lab,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"  # LDAP root DN; the KDC and kadmin.local bind as it too
ROOT_PASSWORD = "lab-ldap-secret"
MASTER_PASSWORD = "lab-master-secret"  # the realm's master key password; the key itself is stashed
CONTAINER_DN = f"cn=krbcontainer,{SUFFIX}"

_DB_MODULE = "lab_ldap"  # the [dbmodules] section that krb5.conf and kdc.conf agree on
_KERBEROS_SCHEMA = Path("/usr/share/doc/krb5-kdc-ldap/kerberos.schema.gz")
_SYSTEM_SCHEMAS = ("core", "cosine", "nis", "inetorgperson")  # in this order: each uses the ones before
_START_TIMEOUT = 10.0  # seconds for a daemon to answer, or to exit once told to
_COMMAND_TIMEOUT = 30.0


class RealmError(RuntimeError):
    """The lab realm could not be provisioned, started or stopped; the message says which step and why."""


def ensure_realm(layout: LabLayout) -> None:
    """Bring the lab realm up: provision it on first use, start whatever is not running, else do nothing."""
    if _recorded_ports(layout) == _ports(layout) and all(realm_status(layout).values()):
        return
    # Half a realm, or one on other ports: restart it whole, simpler than reasoning about the pieces.
    stop_realm(layout)
    try:
        _write_files(layout)
        fresh = not _provisioned(layout)
        if fresh:
            _forget_realm(layout)
        slapd, kdc = _daemons(layout)
        _start(slapd, layout)
        if fresh:
            _provision(layout)
            _marker(layout).write_text(f"{REALM} provisioned in {SUFFIX}\n")
        _start(kdc, layout)
        _state_file(layout).write_text(json.dumps(_ports(layout)) + "\n")
    except BaseException:
        stop_realm(layout)  # leave no daemon behind for a realm that did not come up
        raise


def stop_realm(layout: LabLayout) -> None:
    """Stop the KDC, then slapd, and wait until both are gone; a realm that is not running is fine."""
    for daemon in reversed(_daemons(layout)):
        _stop(daemon, layout)
    _state_file(layout).unlink(missing_ok=True)


def realm_status(layout: LabLayout) -> dict[str, bool]:
    """Which lab daemons run and accept connections on the layout's ports, e.g. {"slapd": True, "krb5kdc": True}.
    Cheap (a process and a connect): `lab serve kdc` watches with it every second; `realm_answers` asks them."""
    return {daemon.name: _pid(daemon, layout) is not None and _accepts(daemon) for daemon in _daemons(layout)}


def realm_answers(layout: LabLayout) -> dict[str, str | None]:
    """Each lab daemon's answer to a real question (`proxy.lab.readiness`): None if it answered as a ready one
    does, else what is wrong, naming its log; e.g. {"slapd": None, "krb5kdc": "... not running ..."}."""
    return {daemon.name: _answers(daemon, layout) for daemon in _daemons(layout)}


def principal_dn(principal: str) -> str:
    """The LDAP entry of a principal of the lab realm, where kldap keeps e.g. `krbAllowedToDelegateTo`."""
    return f"krbPrincipalName={principal}@{REALM},cn={REALM},{CONTAINER_DN}"


# --- Files -------------------------------------------------------------------------------------------


def _slapd_conf(layout: LabLayout) -> Path:
    return layout.ldap_dir / "slapd.conf"


def _ldap_data(layout: LabLayout) -> Path:
    return layout.ldap_dir / "data"


def _stash(layout: LabLayout) -> Path:
    return layout.kdc_dir / "stash"


def _service_password_file(layout: LabLayout) -> Path:
    """The LDAP password the KDC binds with, as `kdb5_ldap_util stashsrvpw` writes it."""
    return layout.kdc_dir / "ldap-service.keyfile"


def _marker(layout: LabLayout) -> Path:
    return layout.kdc_dir / "provisioned"


def _state_file(layout: LabLayout) -> Path:
    """The ports the running daemons were started on (their pids are in their own pid files)."""
    return layout.run_dir / "realm.json"


def _keytabs(layout: LabLayout) -> dict[str, Path]:
    return {
        PROXY_SERVICE: layout.proxy_keytab,
        BACKEND_SERVICE: layout.backend_keytab,
        OTHER_SERVICE: layout.other_keytab,
    }


def _ldap_url(layout: LabLayout) -> str:
    return f"ldap://127.0.0.1:{layout.ldap_port}/"


def _write_files(layout: LabLayout) -> None:
    for directory in (layout.ldap_dir, layout.kdc_dir, layout.keytab_dir, layout.run_dir):
        directory.mkdir(parents=True, exist_ok=True)
    schema = gzip.decompress(_KERBEROS_SCHEMA.read_bytes()).decode()
    _write_if_changed(layout.ldap_dir / "kerberos.schema", schema)
    _write_if_changed(_slapd_conf(layout), _slapd_conf_text(layout))
    _write_if_changed(layout.krb5_conf, _krb5_conf_text(layout))
    _write_if_changed(layout.kdc_conf, _kdc_conf_text(layout))


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an up-to-date file alone, so that a reader never sees it half-written."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _slapd_conf_text(layout: LabLayout) -> str:
    includes = [f"include /etc/ldap/schema/{name}.schema" for name in _SYSTEM_SCHEMAS]
    includes.append(f'include "{layout.ldap_dir / "kerberos.schema"}"')
    return "\n".join(
        [
            "# The lab realm's LDAP server (old-style configuration, read with slapd -f); written by proxy.lab.kdc.",
            *includes,
            f'pidfile "{layout.run_dir / "slapd.pid"}"',
            f'argsfile "{layout.run_dir / "slapd.args"}"',
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "",
            "# Keys are for the root DN only (the KDC binds as it, and ACLs do not apply to it).",
            "access to attrs=krbPrincipalKey,krbMKey,userPassword by * none",
            "access to * by * read",
            "",
            "database mdb",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOT_DN}"',
            f"rootpw {ROOT_PASSWORD}",
            f'directory "{_ldap_data(layout)}"',
            "index objectClass eq",
            "index krbPrincipalName eq,pres,sub",
            "",
        ]
    )


def _krb5_conf_text(layout: LabLayout) -> str:
    return f"""\
# The lab realm, for clients and for the KDC's database module; written by proxy.lab.kdc.
{krb5_libdefaults(REALM)}
[realms]
    {REALM} = {{
        kdc = {layout.kdc_host}:{layout.kdc_port}
    }}

[domain_realm]
    .lab.test = {REALM}
    lab.test = {REALM}

[dbmodules]
    {_DB_MODULE} = {{
        db_library = kldap
        ldap_servers = {_ldap_url(layout)}
        ldap_kerberos_container_dn = {CONTAINER_DN}
        ldap_kdc_dn = {ROOT_DN}
        ldap_kadmind_dn = {ROOT_DN}
        ldap_service_password_file = {_service_password_file(layout)}
    }}
"""


def _kdc_conf_text(layout: LabLayout) -> str:
    # kdc_listen rather than kdc_ports (its pre-1.15 name): it takes an address, so the KDC binds
    # the layout's bind_host (127.0.0.1 natively) instead of every interface.
    return f"""\
# The lab KDC's profile (KRB5_KDC_PROFILE); written by proxy.lab.kdc.
[kdcdefaults]
    kdc_listen = {layout.bind_host}:{layout.kdc_port}
    kdc_tcp_listen = {layout.bind_host}:{layout.kdc_port}

[realms]
    {REALM} = {{
        database_module = {_DB_MODULE}
        key_stash_file = {_stash(layout)}
    }}

[logging]
    kdc = FILE:{layout.kdc_log}
    admin_server = FILE:{layout.run_dir / "kadmin.log"}
    default = FILE:{layout.run_dir / "krb5.log"}

[plugins]
    # SPAKE would need a group configured, and says so in the log as an error at every start.
    kdcpreauth = {{
        disable = spake
    }}
"""


# --- Provisioning ------------------------------------------------------------------------------------


def _provisioned(layout: LabLayout) -> bool:
    """The marker is written last; the other files must still be there for it to count."""
    needed = [_marker(layout), _stash(layout), _ldap_data(layout) / "data.mdb", *_keytabs(layout).values()]
    return all(path.exists() for path in needed)


def _forget_realm(layout: LabLayout) -> None:
    """Remove what a previous, perhaps interrupted, provisioning left, so the next one starts clean."""
    shutil.rmtree(_ldap_data(layout), ignore_errors=True)
    _ldap_data(layout).mkdir()
    for path in (_marker(layout), _stash(layout), _service_password_file(layout), *_keytabs(layout).values()):
        path.unlink(missing_ok=True)


def _provision(layout: LabLayout) -> None:
    """Create realm, principals, keytabs and the delegation allow-list in a running, empty slapd."""
    base_entry = [f"dn: {SUFFIX}", "objectClass: dcObject", "objectClass: organization", "o: lab", "dc: lab"]
    _ldap(layout, "ldapadd", base_entry)
    # stashsrvpw asks for the password twice, on stdin.
    stashsrvpw = ["kdb5_ldap_util", "stashsrvpw", "-f", str(_service_password_file(layout)), ROOT_DN]
    _run(stashsrvpw, layout, stdin=f"{ROOT_PASSWORD}\n" * 2)
    _run(["kdb5_ldap_util", "create", "-subtrees", SUFFIX, "-r", REALM, "-s", "-P", MASTER_PASSWORD], layout)

    for user, password in USERS.items():
        _kadmin(layout, f"addprinc -pw {password} {user}")
    for user, password in DISABLED_USERS.items():
        _kadmin(layout, f"addprinc -allow_tix -pw {password} {user}")
    # ok_to_auth_as_delegate: without it the S4U2Self evidence ticket is not forwardable and S4U2Proxy fails.
    _kadmin(layout, f"addprinc -randkey +ok_to_auth_as_delegate {PROXY_SERVICE}")
    for service in (BACKEND_SERVICE, OTHER_SERVICE):
        _kadmin(layout, f"addprinc -randkey {service}")
    for service, keytab in _keytabs(layout).items():
        _kadmin(layout, f"ktadd -k {keytab} -norandkey {service}")
        keytab.chmod(0o600)  # a service's keys: its owner's alone (the containers all run as uid 10001)

    _ldap(
        layout,
        "ldapmodify",
        [
            f"dn: {principal_dn(PROXY_SERVICE)}",
            "changetype: modify",
            "replace: krbAllowedToDelegateTo",
            f"krbAllowedToDelegateTo: {BACKEND_SERVICE}@{REALM}",
        ],
    )


def _kadmin(layout: LabLayout, query: str) -> None:
    """One kadmin.local query. It exits 0 even when the query fails (MIT 1.20): its stderr is the verdict."""
    argv = ["kadmin.local", "-q", query]
    done = _run(argv, layout)
    problems = [line for line in done.stderr.splitlines() if line and not line.startswith("No policy specified")]
    if problems:
        hidden = tools.secrets(argv)  # addprinc -pw <password>
        raise RealmError(f"{tools.shown(argv)} failed: {tools.masked(' / '.join(problems), hidden)}")


def _ldap(layout: LabLayout, tool: str, ldif: list[str]) -> None:
    """ldapadd or ldapmodify one LDIF record, bound as the root DN."""
    argv = [tool, "-x", "-H", _ldap_url(layout), "-D", ROOT_DN, "-w", ROOT_PASSWORD]
    _run(argv, layout, stdin="\n".join(ldif) + "\n")


def _run(argv: Sequence[str], layout: LabLayout, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run a tool in the lab's Kerberos environment; a failure names the command and quotes its stderr, with every
    password of the command line masked (`proxy.lab.tools`)."""
    env = {**os.environ, **layout.env(), "LDAPNOINIT": "1"}  # libldap: ignore /etc/ldap/ldap.conf, ~/.ldaprc
    return tools.run(argv, RealmError, stdin=stdin, env=env, timeout=_COMMAND_TIMEOUT)


# --- Daemons -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Daemon:
    name: str  # the executable, as /proc/<pid>/cmdline shows it
    argv: tuple[str, ...]
    port: int
    pid_file: Path  # written by the daemon itself once it has forked into the background
    host: str = "127.0.0.1"  # where it answers on this machine


def _daemons(layout: LabLayout) -> tuple[_Daemon, _Daemon]:
    """slapd, then the KDC: the KDC reads its database from slapd, so it starts after it and stops before."""
    slapd_argv = ("slapd", "-f", str(_slapd_conf(layout)), "-h", _ldap_url(layout))
    kdc_pid_file = layout.run_dir / "krb5kdc.pid"
    return (
        _Daemon("slapd", slapd_argv, layout.ldap_port, layout.run_dir / "slapd.pid"),
        _Daemon("krb5kdc", ("krb5kdc", "-P", str(kdc_pid_file)), layout.kdc_port, kdc_pid_file, layout.local_host),
    )


def _ports(layout: LabLayout) -> dict[str, int]:
    return {"ldap_port": layout.ldap_port, "kdc_port": layout.kdc_port}


def _recorded_ports(layout: LabLayout) -> dict[str, int] | None:
    try:
        recorded: dict[str, int] = json.loads(_state_file(layout).read_text())
    except (OSError, ValueError):
        return None
    return recorded


def _start(daemon: _Daemon, layout: LabLayout) -> None:
    """Both daemons check their configuration, fork into the background and return; then wait for the port."""
    if _accepts(daemon):
        raise RealmError(
            f"{daemon.host}:{daemon.port} is taken by another process, so {daemon.name} cannot listen there; "
            f"stop it, or set {variable('ldap_port' if daemon.name == 'slapd' else 'kdc_port')} to a free port"
        )
    daemon.pid_file.unlink(missing_ok=True)
    log_offset = layout.kdc_log.stat().st_size if layout.kdc_log.exists() else 0
    try:
        _run(daemon.argv, layout)
    except RealmError as exc:
        raise RealmError(f"{exc}{_start_failure_reason(daemon, layout, log_offset)}") from exc
    last: list[str | None] = [None]

    def ready() -> bool:
        last[0] = _answers(daemon, layout)
        return last[0] is None

    if not _wait_until(ready):
        raise RealmError(f"{daemon.name} not ready within {_START_TIMEOUT:g} s: {last[0]}")


def _answers(daemon: _Daemon, layout: LabLayout) -> str | None:
    """None if the daemon runs and answers its protocol (an LDAP search, an AS-REQ); else why not, and its log."""
    problem: str | None
    if _pid(daemon, layout) is None:
        problem = f"{daemon.name} is not running (pid file {daemon.pid_file})"
    elif daemon.name == "slapd":
        problem = readiness.ldap_answers(f"ldap://{daemon.host}:{daemon.port}/", SUFFIX)
    else:
        problem = readiness.kdc_answers(daemon.host, daemon.port, REALM)
    return None if problem is None else f"{problem}; its log: {_log_of(daemon, layout)}"


def _log_of(daemon: _Daemon, layout: LabLayout) -> str:
    """Where a daemon's complaints go: the KDC has its own log; slapd tells syslog, and `lab serve kdc` puts
    `slaptest`'s verdict in its log when slapd fails to start."""
    if daemon.name == "krb5kdc":
        return str(layout.kdc_log)
    return f"{layout.run_dir / 'kdc.log'} (slapd itself logs to syslog; `slaptest -f {_slapd_conf(layout)}` checks it)"


def _start_failure_reason(daemon: _Daemon, layout: LabLayout, log_offset: int) -> str:
    """Neither daemon explains a failed start on stderr: slapd tells syslog (often absent), the KDC its log."""
    if daemon.name == "krb5kdc":
        try:
            with layout.kdc_log.open() as log:
                log.seek(log_offset)
                lines = log.read().splitlines()
        except OSError:
            lines = []
        reason = [line for line in lines if "(Error)" in line] or lines[-3:]
    else:
        check = subprocess.run(
            ["slaptest", "-f", str(_slapd_conf(layout))],
            capture_output=True,
            text=True,
            timeout=_COMMAND_TIMEOUT,
            check=False,
        )
        reason = (check.stderr or check.stdout).splitlines()
    return f" ({' / '.join(reason)})" if reason else ""


def _stop(daemon: _Daemon, layout: LabLayout) -> None:
    """SIGTERM, then SIGKILL if it lingers; wait on the process itself, not on its pid file."""
    pid = _pid(daemon, layout)
    if pid is not None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if _wait_until(lambda: not _is_lab_daemon(pid, daemon, layout)):
                break
        else:
            raise RealmError(f"{daemon.name} (pid {pid}) survived SIGKILL")
    daemon.pid_file.unlink(missing_ok=True)


def _pid(daemon: _Daemon, layout: LabLayout) -> int | None:
    """The pid in the daemon's pid file, if that process is alive and is this lab's daemon."""
    try:
        pid = int(daemon.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _is_lab_daemon(pid, daemon, layout) else None


def _is_lab_daemon(pid: int, daemon: _Daemon, layout: LabLayout) -> bool:
    """Guards against a stale pid file naming a reused pid. Nobody reaps orphans in some containers:
    a daemon that exited stays a zombie, whose command line is empty, so it counts as gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    lab_prefix = f"{layout.root}{os.sep}"
    return Path(argv[0]).name == daemon.name and any(arg.startswith(lab_prefix) for arg in argv)


def _accepts(daemon: _Daemon) -> bool:
    try:
        with socket.create_connection((daemon.host, daemon.port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_until(condition: Callable[[], bool], timeout: float = _START_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
