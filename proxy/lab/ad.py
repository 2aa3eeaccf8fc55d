"""The lab's Active Directory: a Samba AD DC realm `AD.TEST` in a network namespace of its own.

The realm's API, for tests and for other lab code (keep it small)
------------------------------------------------------------------
- A test gets the realm from the session fixture `ad_realm` (`tests/integration/ad_fixtures.py`,
  imported by `tests/integration/conftest.py`): an `AdRealm`, up and provisioned, shared by every test
  file of a `make test` run (each xdist worker registers itself; the last one out stops it). Tests
  `import pytest` and ask for `ad_realm` like any fixture; mark them `@pytest.mark.timeout(AD_TIMEOUT)`:
  the first one pays for provisioning (7 s idle, 90-130 s on a busy machine; later runs restart the
  kept state, `.lab/test/ad/`, in seconds). Beside it: `ad_backend` (the Exchange stand-in for
  `HTTP/cas.ad.test` in the namespace), `start_ad_gateway(realm, dir, backend, extra, key=value)` (a
  `kcd-proxy run` in there), `ad_curl(realm, url, user)` (a device), `kdc_log_offset` + `wait_kdc_reason`
  (what Samba's KDC logged for a request).
- `realm.dc_address` ("10.213.0.1") and `realm.dc_host` ("dc1.ad.test"): where the DC answers inside the
  namespace (KDC 88, LDAP 389, LDAPS 636, DNS 53). `realm.ldap_url` is `ldap://10.213.0.1`.
- `realm.base_dn` ("DC=ad,DC=test"), `realm.realm` ("AD.TEST"), `realm.dns_domain` ("ad.test").
- Admin credentials: `realm.admin` ("Administrator") and `realm.admin_password`; `realm.samba_tool(...)`
  runs `samba-tool` on the realm's database (no network, no password needed: it opens sam.ldb directly),
  `realm.ldbmodify(ldif)` applies LDIF the same way, `realm.ldbsearch(filter, attrs)` reads.
- The gateway's keytab and principal: `realm.gateway_keytab`, `realm.gateway_principal`
  ("svc-kcdproxy@AD.TEST", the account's own name: AD issues no TGT to a bare SPN). The backend's:
  `realm.backend_keytab` for `HTTP/cas.ad.test`. `realm.krb5_conf` points at the DC.
- A command inside the namespace: `realm.run([...])` (a `subprocess.run` through `ip netns exec`),
  `realm.popen([...])` for a daemon, `realm.netns_argv([...])` for the argv itself. Everything that talks to
  the DC (the gateway, the Exchange stand-in, curl, kinit, `kcd-proxy doctor`) runs in there: the DC
  listens nowhere else.
- The PKI: `realm.pki` is the lab PKI (`proxy.lab.pki`) kept under the realm's directory; the AD users'
  certificates are in `realm.user_cert(name)` / `realm.user_key(name)`. `issue_user_certificate(realm.pki,
  directory, name, upn, extensions=[...])` issues one more from the same issuing CA, with any extra
  extensions (a SID extension, say), and returns its (certificate, key) paths.

Theory of operation
-------------------
Samba binds 53/88/389/445/464/636 on the interfaces it is given, so the DC runs in a network namespace
that the lab creates: `lo`, and a veth pair with both ends inside (this kernel has no `dummy` links),
the DC on one end. The namespace's name, the veth names and the state directory derive from the lab
directory (a short hash), so two labs (two worktrees, CI in a fresh clone) never collide; the addresses,
10.213.0.1 and .2, exist only inside each namespace. Nothing listens outside it.

`ensure(realm)` provisions on first use (`samba-tool domain provision --use-rfc2307`, Samba's internal
DNS), then makes the accounts with `samba-tool` (and `ldbmodify` where it has no verb), then exports AES
keytabs, then issues the users' certificates from the lab PKI; a marker written last says the realm is
complete. Later calls only start `samba` in the namespace (a few seconds) and return at once when it runs.
`down(realm)` stops samba and every process started in the namespace, then deletes the namespace.

Accounts (`ACCOUNTS`, `USERS`): the gateway `svc-kcdproxy` (SPN `HTTP/proxy.ad.test`, protocol
transition, delegation to `HTTP/cas.ad.test`), a second gateway `svc-kcdnopt` (same delegation, no
protocol transition), the backend `svc-cas` (`HTTP/cas.ad.test`) and `svc-other` (`HTTP/other.ad.test`,
in nobody's list). Users alice and bob (`@ad.test`), carol whose UPN is `carol@corp.example` (a
`uPNSuffixes` suffix), the disabled dave, erin marked sensitive ("cannot be delegated"), and pat in
Protected Users. Service accounts get `msDS-SupportedEncryptionTypes: 24` (AES) before their keytabs
are exported: without it Samba, like Windows, exports RC4 keys only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.lab import layout, tools
from proxy.lab import pki as lab_pki

REALM = "AD.TEST"
DNS_DOMAIN = "ad.test"
NETBIOS_DOMAIN = "ADTEST"
BASE_DN = "DC=ad,DC=test"
DC_NAME = "dc1"
DC_ADDRESS = "10.213.0.1"  # inside the namespace only (the project's own range for its namespaces)
PEER_ADDRESS = "10.213.0.2"  # the veth's other end
PREFIX_LEN = 30
ADMIN = "Administrator"
ADMIN_PASSWORD = "Lab-Adm1n-Pa55"
OTHER_SUFFIX = "corp.example"  # a UPN suffix of the forest that is not the realm

GATEWAY_ACCOUNT = "svc-kcdproxy"
GATEWAY_SPN = "HTTP/proxy.ad.test"
NO_PT_ACCOUNT = "svc-kcdnopt"  # delegation list, but no protocol transition
NO_PT_SPN = "HTTP/proxy2.ad.test"
BACKEND_ACCOUNT = "svc-cas"
BACKEND_SPN = "HTTP/cas.ad.test"
OTHER_ACCOUNT = "svc-other"
OTHER_SPN = "HTTP/other.ad.test"
SERVICE_PASSWORD = "Svc-Lab-Pa55-{account}"  # fixed: a re-export gives the same keys


@dataclass(frozen=True)
class Account:
    """A service account: its SPN, whether it may use protocol transition, what it may delegate to."""

    name: str
    spn: str
    protocol_transition: bool = False
    delegate_to: tuple[str, ...] = ()


ACCOUNTS = (
    Account(GATEWAY_ACCOUNT, GATEWAY_SPN, protocol_transition=True, delegate_to=(BACKEND_SPN,)),
    Account(NO_PT_ACCOUNT, NO_PT_SPN, delegate_to=(BACKEND_SPN,)),
    Account(BACKEND_ACCOUNT, BACKEND_SPN),
    Account(OTHER_ACCOUNT, OTHER_SPN),
)


@dataclass(frozen=True)
class User:
    """A user account and what is special about it."""

    name: str  # sAMAccountName, also the certificate's name in the PKI
    upn: str
    password: str
    disabled: bool = False
    sensitive: bool = False  # UF_NOT_DELEGATED: "account is sensitive and cannot be delegated"
    protected: bool = False  # a member of Protected Users


USERS = (
    User("alice", "alice@ad.test", "Alice-Ad-Pa55"),
    User("bob", "bob@ad.test", "Bob-Ad-Pa55"),
    User("carol", f"carol@{OTHER_SUFFIX}", "Carol-Ad-Pa55"),
    User("dave", "dave@ad.test", "Dave-Ad-Pa55", disabled=True),
    User("erin", "erin@ad.test", "Erin-Ad-Pa55", sensitive=True),
    User("pat", "pat@ad.test", "Pat-Ad-Pa55", protected=True),
)
# Certificates for names the directory does not have.
EXTRA_CERTIFICATES = {"ghost": "ghost@ad.test"}

_START_TIMEOUT = 120.0  # samba on a busy machine: port 88 answers after 1 s idle, much later under load
_COMMAND_TIMEOUT = 600.0  # provisioning is CPU-bound: 7 s idle, 90-130 s when the machine is busy


class AdRealmError(RuntimeError):
    """The AD realm could not be provisioned, started or stopped; the message names the step."""


@dataclass(frozen=True)
class AdRealm:
    """Where one AD realm lives: its directory, and the namespace and names derived from it."""

    root: Path
    pki_root: Path | None = None  # the lab PKI's directory, when it is not the realm's own `pki/` (compose: /lab/pki)

    @classmethod
    def at(cls, root: Path, pki_root: Path | None = None) -> AdRealm:
        return cls(root=root.resolve(), pki_root=None if pki_root is None else pki_root.resolve())

    # -- names derived from the directory ---------------------------------------------------------

    @property
    def tag(self) -> str:
        """A short hash of the directory: what makes this realm's global names unique."""
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:8]

    @property
    def netns(self) -> str:
        return f"kcd-ad-{self.tag}"

    @property
    def veth(self) -> tuple[str, str]:
        """The veth pair (interface names are at most 15 characters): the DC's end, then the other."""
        return f"kad{self.tag}a", f"kad{self.tag}b"

    # -- the realm's facts --------------------------------------------------------------------------

    realm: str = REALM
    dns_domain: str = DNS_DOMAIN
    base_dn: str = BASE_DN
    dc_address: str = DC_ADDRESS
    admin: str = ADMIN
    admin_password: str = ADMIN_PASSWORD
    gateway_principal: str = f"{GATEWAY_ACCOUNT}@{REALM}"

    @property
    def dc_host(self) -> str:
        return f"{DC_NAME}.{DNS_DOMAIN}"

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.dc_address}"

    # -- files ----------------------------------------------------------------------------------------

    @property
    def samba_dir(self) -> Path:
        """samba-tool's --targetdir: smb.conf, the database (private/sam.ldb), state, caches."""
        return self.root / "samba"

    @property
    def smb_conf(self) -> Path:
        return self.samba_dir / "etc" / "smb.conf"

    @property
    def sam_ldb(self) -> Path:
        return self.samba_dir / "private" / "sam.ldb"

    @property
    def run_dir(self) -> Path:
        """pid files, sockets and logs of the realm's daemons."""
        return self.root / "run"

    @property
    def samba_log(self) -> Path:
        return self.run_dir / "samba.log"

    @property
    def kdc_log(self) -> Path:
        """Samba's log, where its KDC writes one line per refusal with the reason, e.g.
        `TGS-REQ ERR_POLICY ... reason=Principal may not act as client` (`log level = 1 kerberos:3`)."""
        return self.run_dir / "samba.log"

    @property
    def krb5_conf(self) -> Path:
        return self.root / "krb5.conf"

    @property
    def keytab_dir(self) -> Path:
        return self.root / "keytabs"

    def keytab(self, account: str) -> Path:
        return self.keytab_dir / f"{account}.keytab"

    @property
    def gateway_keytab(self) -> Path:
        return self.keytab(GATEWAY_ACCOUNT)

    @property
    def backend_keytab(self) -> Path:
        return self.keytab(BACKEND_ACCOUNT)

    @property
    def pki_dir(self) -> Path:
        return self.pki_root or self.root / "pki"

    @property
    def pki(self) -> lab_pki.Pki:
        return lab_pki.Pki.at(self.pki_dir)

    @property
    def users_dir(self) -> Path:
        """The AD users' certificates and keys: `<name>.pem`, `<name>.key`."""
        return self.pki_dir / "ad-users"

    def user_cert(self, name: str) -> Path:
        return self.users_dir / f"{name}.pem"

    def user_key(self, name: str) -> Path:
        return self.users_dir / f"{name}.key"

    @property
    def marker(self) -> Path:
        return self.root / "provisioned"

    def env(self) -> dict[str, str]:
        """Environment for Kerberos tools and libraries that should use this realm."""
        return {"KRB5_CONFIG": str(self.krb5_conf)}

    # -- running things -------------------------------------------------------------------------------

    def netns_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 120, check: bool = False, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`argv` inside the namespace, with this realm's krb5.conf; output captured as text."""
        return subprocess.run(
            self.netns_argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=stdin,
            env={**os.environ, **self.env()},
        )

    def popen(self, argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A daemon inside the namespace, its output appended to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(
                self.netns_argv(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env(), **(env or {})},
                start_new_session=True,
            )

    def samba_tool(self, *args: str) -> str:
        """`samba-tool <args> --configfile=<smb.conf>` on the realm's database; its stdout."""
        return _run(["samba-tool", *args, f"--configfile={self.smb_conf}"]).stdout

    def ldbmodify(self, ldif: str) -> None:
        """Apply LDIF to the realm's database (ldbmodify on sam.ldb)."""
        _run(["ldbmodify", "-H", str(self.sam_ldb), f"--configfile={self.smb_conf}"], stdin=ldif)

    def ldbsearch(self, expression: str, *attributes: str, base: str | None = None) -> str:
        argv = ["ldbsearch", "-H", str(self.sam_ldb), f"--configfile={self.smb_conf}"]
        if base is not None:
            argv += ["-b", base]
        return _run([*argv, expression, *attributes]).stdout

    def port_answers(self, port: int, host: str | None = None) -> bool:
        """Whether something accepts TCP connections on `host:port` inside the namespace."""
        address = (host or self.dc_address, port)
        probe = f"import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex({address!r}))"
        try:
            return self.run(["python3", "-c", probe], timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def free_port(self) -> int:
        """A TCP port nobody uses inside the namespace (for a gateway or a backend started there)."""
        code = "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
        return int(self.run(["python3", "-c", code], check=True, timeout=30).stdout.strip())


def default_root() -> Path:
    """`.lab/ad/` beside the MIT lab (`$KCD_LAB_DIR/ad` when that is set)."""
    return layout.default_root() / "ad"


# -- the namespace ---------------------------------------------------------------------------------------


def namespace_exists(realm: AdRealm) -> bool:
    return Path("/run/netns", realm.netns).exists()


def ensure_namespace(realm: AdRealm) -> None:
    if not namespace_exists(realm):
        _run(["ip", "netns", "add", realm.netns])
    dc_end, other_end = realm.veth
    ns = ["ip", "-n", realm.netns]
    links = _run([*ns, "-o", "link", "show"]).stdout
    if f" {dc_end}@" not in links:
        _run([*ns, "link", "add", dc_end, "type", "veth", "peer", "name", other_end])
        _run([*ns, "addr", "add", f"{DC_ADDRESS}/{PREFIX_LEN}", "dev", dc_end])
        _run([*ns, "addr", "add", f"{PEER_ADDRESS}/{PREFIX_LEN}", "dev", other_end])
    for link in ("lo", dc_end, other_end):
        _run([*ns, "link", "set", link, "up"])


def _delete_namespace(realm: AdRealm) -> None:
    if namespace_exists(realm):
        _run(["ip", "netns", "delete", realm.netns])


def namespace_pids(realm: AdRealm) -> list[int]:
    """Every process whose network namespace is this realm's (samba, and whatever the lab started in it)."""
    if not namespace_exists(realm):
        return []
    done = subprocess.run(["ip", "netns", "pids", realm.netns], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


# -- files -----------------------------------------------------------------------------------------------


def krb5_conf_text(realm: AdRealm, kdc_host: str = DC_ADDRESS) -> str:
    """A krb5.conf for clients of the DC at `kdc_host` (the namespace's address; compose: the service's name): its
    KDC, no DNS, AES."""
    return f"""# Written by kcd-proxy's lab for the AD realm in {realm.root}
{layout.krb5_libdefaults(REALM)}
[realms]
    {REALM} = {{
        kdc = {kdc_host}:88
        admin_server = {kdc_host}
    }}

[domain_realm]
    .{DNS_DOMAIN} = {REALM}
    {DNS_DOMAIN} = {REALM}
"""


# -- provisioning ----------------------------------------------------------------------------------------


def _namespace_options(realm: AdRealm) -> dict[str, str | Path]:
    """smb.conf options of the DC in the realm's network namespace: it listens on the namespace's links alone."""
    return {"interfaces": f"lo {realm.veth[0]}", "bind interfaces only": "yes"}


def _provision(realm: AdRealm, where: dict[str, str | Path], *, host_ip: str | None = DC_ADDRESS) -> None:
    """A fresh domain in `realm.samba_dir` with the smb.conf options `where` (interfaces, file server modules),
    then its accounts and keytabs."""
    shutil.rmtree(realm.samba_dir, ignore_errors=True)
    shutil.rmtree(realm.keytab_dir, ignore_errors=True)
    realm.samba_dir.mkdir(parents=True)
    realm.run_dir.mkdir(parents=True, exist_ok=True)
    run = realm.run_dir
    options: dict[str, str | Path] = {
        **where,
        "pid directory": run,
        "ncalrpc dir": run / "ncalrpc",
        "winbindd socket directory": run / "winbindd",
        "log file": realm.samba_log,
        "log level": "1 kerberos:3 auth_audit:3",
        "max log size": "10000",  # KiB; samba keeps one old log beside it
        "disable netbios": "yes",
        "dns forwarder": "none",
    }
    _run(
        [
            "samba-tool",
            "domain",
            "provision",
            f"--targetdir={realm.samba_dir}",
            f"--realm={REALM}",
            f"--domain={NETBIOS_DOMAIN}",
            f"--host-name={DC_NAME}",
            *([f"--host-ip={host_ip}"] if host_ip else []),
            "--server-role=dc",
            "--dns-backend=SAMBA_INTERNAL",
            "--use-rfc2307",
            f"--adminpass={ADMIN_PASSWORD}",
            *(f"--option={key}={value}" for key, value in options.items()),
        ]
    )
    realm.samba_tool("domain", "passwordsettings", "set", "--max-pwd-age=0")
    _make_accounts(realm)


def _make_accounts(realm: AdRealm) -> None:
    partitions = f"CN=Partitions,CN=Configuration,{BASE_DN}"
    realm.ldbmodify(f"dn: {partitions}\nchangetype: modify\nadd: uPNSuffixes\nuPNSuffixes: {OTHER_SUFFIX}\n")
    for user in USERS:
        realm.samba_tool("user", "create", user.name, user.password)
        if user.upn != f"{user.name}@{DNS_DOMAIN}":
            realm.ldbmodify(_replace(_user_dn(user.name), "userPrincipalName", user.upn))
        if user.disabled:
            realm.samba_tool("user", "disable", user.name)
        if user.sensitive:
            realm.samba_tool("user", "sensitive", user.name, "on")
        if user.protected:
            realm.samba_tool("group", "addmembers", "Protected Users", user.name)
    realm.keytab_dir.mkdir(parents=True, exist_ok=True)
    for account in ACCOUNTS:
        realm.samba_tool("user", "create", account.name, SERVICE_PASSWORD.format(account=account.name))
        realm.samba_tool("spn", "add", account.spn, account.name)
        if account.protocol_transition:
            realm.samba_tool("delegation", "for-any-protocol", account.name, "on")
        for target in account.delegate_to:
            realm.samba_tool("delegation", "add-service", account.name, target)
        # AES keys, or the keytab (and every ticket for the account) is RC4; samba-tool has no verb for it
        realm.ldbmodify(_replace(_user_dn(account.name), "msDS-SupportedEncryptionTypes", "24"))
        keytab = realm.keytab(account.name)
        keytab.unlink(missing_ok=True)
        for principal in (f"{account.name}@{REALM}", f"{account.spn}@{REALM}"):
            realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={principal}")
        keytab.chmod(0o600)  # a service account's keys: root's alone (the lab's processes run as root)


def _user_dn(name: str) -> str:
    return f"CN={name},CN=Users,{BASE_DN}"


def _replace(dn: str, attribute: str, value: str) -> str:
    return f"dn: {dn}\nchangetype: modify\nreplace: {attribute}\n{attribute}: {value}\n"


# -- certificates ----------------------------------------------------------------------------------------


def issue_user_certificate(
    pki: lab_pki.Pki,
    directory: Path,
    name: str,
    upn: str,
    *,
    extensions: Sequence[x509.ExtensionType] = (),
    urls: tuple[str, ...] = (),
    now: datetime | None = None,
) -> tuple[Path, Path]:
    """A client certificate from the lab's issuing CA for `upn` (UPN and e-mail SANs, clientAuth), with
    any `extensions` added (non-critical) and `urls` as more SANs; written as `<directory>/<name>.pem` and `.key`."""
    when = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    spec = lab_pki.UserSpec(upn=upn, email=upn, urls=urls)
    cert = lab_pki.issue_user(pki, spec, key, now=when, extensions=extensions)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    lab_pki.write_pem(cert_path, [cert])
    lab_pki.write_key(key_path, key)
    return cert_path, key_path


def _make_certificates(realm: AdRealm) -> None:
    """The lab PKI (CRLs published nowhere: the gateway reads the file) and one certificate per AD user."""
    lab_pki.make_pki(realm.pki_dir, now=datetime.now(UTC))
    issue_user_certificates(realm)


def issue_user_certificates(realm: AdRealm) -> None:
    """One certificate per AD user (and `EXTRA_CERTIFICATES`) from the PKI in `realm.pki_dir`, as it is, into
    `realm.users_dir`: those missing or older than the issuing CA."""
    names = {user.name: user.upn for user in USERS} | EXTRA_CERTIFICATES
    issued_by = realm.pki.issuing_cert.stat().st_mtime
    for name, upn in names.items():
        cert = realm.user_cert(name)
        if not cert.exists() or cert.stat().st_mtime < issued_by:  # none yet, or from a CA made afresh since
            issue_user_certificate(realm.pki, realm.users_dir, name, upn)


# -- samba -----------------------------------------------------------------------------------------------


def _samba_pid(realm: AdRealm) -> int | None:
    try:
        pid = int((realm.run_dir / "samba.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def running(realm: AdRealm) -> bool:
    """Whether samba runs in the realm's namespace and its KDC answers."""
    return namespace_exists(realm) and _samba_pid(realm) is not None and realm.port_answers(88)


def _start_samba(realm: AdRealm) -> None:
    realm.run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("ncalrpc", "winbindd"):
        (realm.run_dir / sub).mkdir(exist_ok=True)
    offset = realm.samba_log.stat().st_size if realm.samba_log.exists() else 0
    _run(realm.netns_argv(["samba", "-s", str(realm.smb_conf), "-D"]))
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if _samba_pid(realm) is not None and realm.port_answers(88) and realm.port_answers(389):
            return
        time.sleep(0.5)
    tail = realm.samba_log.read_bytes()[offset:][-3000:].decode(errors="replace") if realm.samba_log.exists() else ""
    raise AdRealmError(f"samba did not answer on {DC_ADDRESS}:88 and :389 within {_START_TIMEOUT:g} s:\n{tail}")


def ensure(realm: AdRealm, *, wait: float = _START_TIMEOUT) -> AdRealm:
    """The realm up: namespace, provisioning on first use, samba started; at once if it already runs. A samba that
    runs but whose KDC does not accept yet is waited for (`_samba_answers`), never stopped: on a loaded machine port
    88 took more than the probe's 2 s, and everything in the namespace was stopped, under another run using it."""
    realm.root.mkdir(parents=True, exist_ok=True)
    realm.krb5_conf.write_text(krb5_conf_text(realm))
    if realm.marker.exists() and _samba_answers(realm, wait):
        _make_certificates(realm)  # cheap when current; renews a PKI near expiry
        return realm
    stop_processes(realm)
    ensure_namespace(realm)
    try:
        if not realm.marker.exists():
            _provision(realm, _namespace_options(realm))
            realm.marker.write_text(f"{REALM} provisioned in {realm.samba_dir}\n")
        _make_certificates(realm)
        _start_samba(realm)
    except BaseException:
        down(realm)
        raise
    return realm


def _samba_answers(realm: AdRealm, wait: float) -> bool:
    """True once the realm's samba answers on port 88; False when no samba runs there (`ensure` starts one).
    AdRealmError when it runs and has not answered within `wait` seconds: it is left running, as another test run or
    a `lab up` may be using it (`in_use` cannot tell: the caller holds the users lock too)."""
    deadline = time.monotonic() + wait
    while namespace_exists(realm) and (pid := _samba_pid(realm)) is not None:
        if realm.port_answers(88):
            return True
        if time.monotonic() >= deadline:
            raise AdRealmError(
                f"samba (pid {pid}) runs in namespace {realm.netns} but its KDC did not accept on {DC_ADDRESS}:88 "
                f"within {wait:g} s; left running, as another run may be using it (see {realm.samba_log}): once "
                f"none does, `kcd-proxy lab down --ad --dir {realm.root.parent}` stops it"
            )
        time.sleep(0.5)
    return False


def stop_processes(realm: AdRealm) -> None:
    """SIGTERM every process in the namespace, then SIGKILL what is left after 10 s."""
    pids = namespace_pids(realm)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (left := namespace_pids(realm)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    for pid in namespace_pids(realm):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (realm.run_dir / "samba.pid").unlink(missing_ok=True)


def users_lock(realm: AdRealm) -> Path:
    """The lock whoever uses the realm holds shared meanwhile (the test suite's sessions: tests/integration/
    ad_fixtures.py); `lab down` leaves the realm running while anyone holds it."""
    return realm.root / "users.lock"


@contextlib.contextmanager
def unused(realm: AdRealm) -> Iterator[bool]:
    """Whether nobody holds the realm's users lock (`users_lock`: a test run using it, which `lab down` must not stop
    under it); if so the lock is held exclusively until the block ends, so that a run starting meanwhile waits for the
    stop to end (then starts the realm afresh) rather than take a realm about to be stopped under it. The directory is
    made if it is not there (a namespace outliving `rm -rf .lab`, a first run starting meanwhile): unlocked, a run
    creating it during the stop took its lock and had its realm stopped under it."""
    realm.root.mkdir(parents=True, exist_ok=True)
    with users_lock(realm).open("ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def down(realm: AdRealm) -> None:
    """Stop samba and everything else in the namespace, then delete the namespace and the files that `ip netns
    exec` reads for it (/etc/netns/<namespace>/, e.g. the DC's name in `hosts`). The state stays."""
    stop_processes(realm)
    _delete_namespace(realm)
    shutil.rmtree(Path("/etc/netns", realm.netns), ignore_errors=True)


def status(realm: AdRealm) -> dict[str, bool]:
    return {"ad-namespace": namespace_exists(realm), "ad-samba": running(realm)}


def _run(argv: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A tool of the realm's; a failure names the command and quotes its output, with every password of the command
    line (`samba-tool user create NAME PASSWORD`, `--newpassword=`, `--adminpass=`) masked (`proxy.lab.tools`)."""
    return tools.run(argv, AdRealmError, stdin=stdin, timeout=_COMMAND_TIMEOUT)


# -- the lab around the realm: the Exchange stand-in and the gateway's configuration -------------------------

LAB_BACKEND_PORT = 8081  # inside the namespace: nothing else listens there
LAB_GATEWAY_PORT = 8443
LAB_ADMIN_PORT = 9443  # the admin listener of `lab up --ad`'s gateway.toml (traces, metrics), as the MIT lab's


def run_line(realm: AdRealm, config: Path | str) -> str:
    """`kcd-proxy run` inside the realm's namespace, as printed for a shell to paste: kcd-proxy by the full path of
    this installation's script, as a fresh shell (no virtualenv activated) finds no bare `kcd-proxy`; `python -m
    proxy` by its full path where no script is beside the interpreter."""
    script = Path(sys.executable).parent / "kcd-proxy"
    command = shlex.quote(str(script)) if script.exists() else f"{shlex.quote(sys.executable)} -m proxy"
    return f"ip netns exec {realm.netns} {command} run --config {config}"


def gateway_config(
    realm: AdRealm,
    *,
    port: int = LAB_GATEWAY_PORT,
    backend_port: int = LAB_BACKEND_PORT,
    admin: bool = False,
    name: str = "gateway.toml",
    bind_host: str = "127.0.0.1",
    backend_host: str = "127.0.0.1",
    how: str | None = None,
    crl_state: Path | None = None,
) -> str:
    """The gateway's TOML configuration for this realm (absolute paths); it runs inside the namespace. `admin` adds
    the admin listener on LAB_ADMIN_PORT (`kcd-proxy trace`, /metrics), as the MIT lab's gateway.toml has; `name` is
    the file it is written to beside the realm, which its run line names. The compose lab's (`proxy.lab.ad_compose`)
    listens on `bind_host`, reaches the backend at `backend_host`, keeps its CRL replay floors in `crl_state` and says
    `how` it is generated and run."""
    state = f'crl_state = "{crl_state}"\n' if crl_state else ""
    p = realm.pki
    run = f"Run it inside the realm's namespace: {run_line(realm, realm.root / name)}"
    return f"""# Generated by {how or f"`kcd-proxy lab up --ad` for the AD realm in {realm.root}.{chr(10)}# {run}"}
[listener]
bind = "{bind_host}:{port}"
certificate = "{p.server_chain}"
private_key = "{p.server_key}"

[client_certificates]
trust_anchors = ["{p.root_cert}"]
intermediates = ["{p.issuing_cert}"]
crls = ["{p.crls}"]
revocation = "require"
{state}
[identity]
source = "san-upn"

[kerberos]
# The account's own name: AD answers an AS-REQ for the bare SPN (HTTP/proxy.ad.test) "client not found".
principal = "{realm.gateway_principal}"
keytab = "{realm.gateway_keytab}"
krb5_config = "{realm.krb5_conf}"
# Active Directory: every evidence ticket's PAC names the account; one that names none is refused.
kdc_account = "require"

[[routes]]
prefix = "/"
upstream = "http://{backend_host}:{backend_port}"
spn = "{BACKEND_SPN}"

[doctor]
canary_user = "alice@{DNS_DOMAIN}"
""" + (f'\n[admin]\nbind = "127.0.0.1:{LAB_ADMIN_PORT}"\n' if admin else "")


def backend_argv(realm: AdRealm, port: int) -> list[str]:
    """The Exchange stand-in for `HTTP/cas.ad.test` on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "proxy.lab.backend",
        "--keytab",
        str(realm.backend_keytab),
        "--bind",
        f"127.0.0.1:{port}",
        "--krb5-config",
        str(realm.krb5_conf),
    ]


def up_lab(realm: AdRealm) -> None:
    """`kcd-proxy lab up --ad`: the realm, the Exchange stand-in in its namespace, and gateway.toml."""
    ensure(realm)
    (realm.root / "gateway.toml").write_text(gateway_config(realm, admin=True))
    (realm.root / "netns").write_text(realm.netns + "\n")
    pid_file = realm.run_dir / "backend.pid"
    if backend_pid(realm) is None:
        proc = realm.popen(backend_argv(realm, LAB_BACKEND_PORT), log=realm.run_dir / "backend.log")
        pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 60
        while not realm.port_answers(LAB_BACKEND_PORT, "127.0.0.1"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (realm.run_dir / "backend.log").read_text(errors="replace")[-2000:]
                raise AdRealmError(f"the Exchange stand-in did not start in {realm.netns}:\n{log}")
            time.sleep(0.2)


def backend_pid(realm: AdRealm) -> int | None:
    """The pid in `backend.pid` if that process runs and is this realm's Exchange stand-in (its command line is
    `backend_argv`'s, with this realm's krb5.conf); a pid file left behind names a number the system may have given
    to any program since (another test's gateway), which is neither taken for the backend nor signalled."""
    try:
        pid = int((realm.run_dir / "backend.pid").read_text().strip())
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except (OSError, ValueError):
        return None
    ours = "proxy.lab.backend" in argv and str(realm.krb5_conf) in argv
    return pid if ours else None


def describe(realm: AdRealm) -> str:
    """How to reach the AD lab: the namespace, the accounts, and a curl that works from inside it."""
    users = ", ".join(f"{u.name} ({u.upn})" for u in USERS)
    ns = f"ip netns exec {realm.netns}"
    cert, key = realm.user_cert("alice"), realm.user_key("alice")
    return f"""# realm {REALM}: Samba AD DC {realm.dc_host} at {DC_ADDRESS} (KDC 88, LDAP 389), netns {realm.netns}
# base DN {BASE_DN}; admin {ADMIN} / {ADMIN_PASSWORD}; samba-tool ... --configfile={realm.smb_conf}
# gateway account {realm.gateway_principal} (SPN {GATEWAY_SPN}), keytab {realm.gateway_keytab}
# backend (Exchange stand-in, Negotiate for {BACKEND_SPN}): http://127.0.0.1:{LAB_BACKEND_PORT}/ inside the namespace
# users: {users}; certificates in {realm.users_dir}/
export KRB5_CONFIG={realm.krb5_conf}
# the gateway (make lab-ad runs it): {run_line(realm, realm.root / "gateway.toml")}
{ns} curl --cacert {realm.pki.root_cert} --cert {cert} --key {key} \\
  https://127.0.0.1:{LAB_GATEWAY_PORT}/Microsoft-Server-ActiveSync"""
