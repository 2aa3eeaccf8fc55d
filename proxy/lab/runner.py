"""`kcd-proxy lab up | down | status | env`: the whole lab, as background processes under one directory.

`up` is `init` (the files: the PKI if missing or near expiry, the CRL publishing directory and
`gateway.toml`, a gateway configuration for this lab; the checked-in `config/lab.toml` is the same for
the default lab directory), then it starts what is not running, each through the foreground entry point
a container runs (`SERVE`, see `proxy.lab.serve`): `kcd-proxy lab serve kdc` (provisions the
LDAP-backed realm if missing, then runs slapd and krb5kdc), `... serve backend` (the Exchange stand-in)
and `... serve crl` (the CRLs over HTTP). The layout reaches them as `KCD_LAB_*` variables. `down`
stops every process the lab started. Each has a pid file and a log under `run/`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from proxy.lab import kdc, pki
from proxy.lab.layout import USERS, LabLayout, variable

# The foreground entry points, as `kcd-proxy` arguments: `lab up` runs them in the background, and the
# compose services of the same names run them as their command (tests/integration/test_deploy.py checks).
SERVE: dict[str, tuple[str, ...]] = {name: ("lab", "serve", name) for name in ("kdc", "backend", "crl")}
_DAEMONS = tuple(SERVE)
# The layout's ports each part listens on; `make lab`'s gateway listens on the last two.
_PORTS: dict[str, tuple[str, ...]] = {
    "kdc": ("ldap_port", "kdc_port"),
    "backend": ("backend_port",),
    "crl": ("crl_port",),
}
_GATEWAY_PORTS = ("gateway_port", "admin_port")
PUBLISH_DIR = "crl-publish"  # under the lab directory: what the CRL server serves (`publish_dir`)


class LabError(RuntimeError):
    """`lab up` could not bring a part up; the message names the part and what to do (a port, a log)."""


def _taken(host: str, port: int) -> bool:
    """Whether another socket listens on host:port (a bind with SO_REUSEADDR fails only then, not for TIME_WAIT)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def taken_ports(layout: LabLayout, fields: tuple[str, ...]) -> list[str]:
    """Each of these layout ports another process listens on, as "127.0.0.1:8088 (KCD_LAB_KDC_PORT)"."""
    taken = []
    for field in fields:
        host = "127.0.0.1" if field == "ldap_port" else layout.bind_host  # slapd listens on loopback always
        port = getattr(layout, field)
        if _taken(host, port):
            taken.append(f"{host}:{port} ({variable(field)})")
    return taken


def _check_ports(layout: LabLayout) -> None:
    """Before anything starts: the ports of the parts not running yet are free. A taken one failed deep in a
    daemon's start (a traceback), or, held by another lab's part that answers, passed that part's probe."""
    running_daemons = kdc.realm_status(layout)  # this lab's own slapd and krb5kdc: `serve kdc` restarts them
    own = {"ldap_port": running_daemons["slapd"], "kdc_port": running_daemons["krb5kdc"]}
    fields = tuple(
        field
        for name, ports in _PORTS.items()
        if _pid_alive(layout, name) is None
        for field in ports
        if not own.get(field, False)
    )
    taken = taken_ports(layout, fields)
    if taken:
        gateway = taken_ports(layout, _GATEWAY_PORTS)  # named here too: `make lab`'s gateway would fail next
        also = f", and on {', '.join(gateway)}, where `make lab`'s gateway would" if gateway else ""
        raise LabError(
            f"another process listens on {', '.join(taken)}, where this lab's parts would listen{also} (another lab "
            "on the default ports?): set each variable named to a free port below 32768 (`ss -ltn` lists the ones "
            "taken), e.g. `KCD_LAB_KDC_PORT=18088 make lab`; KCD_LAB_DIR=<dir> keeps that lab's files apart too"
        )


def _pid_file(layout: LabLayout, name: str) -> Path:
    return layout.run_dir / f"{name}.pid"


def _pid_alive(layout: LabLayout, name: str) -> int | None:
    """The pid in the pid file of `lab serve <name>` if that process runs and is this lab's: its command line
    ends with `lab serve <name>` and its environment names this lab's directory. A pid file left behind names
    a number the system may have given to any program since, which is neither counted nor signalled. A zombie
    (exited, not yet reaped by its parent or by an init that reaps slowly) counts as gone: `os.kill(pid, 0)`
    alone would still find it."""
    try:
        pid = int(_pid_file(layout, name).read_text().strip())
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    ours = [a.decode(errors="replace") for a in argv if a][-len(SERVE[name]) :] == list(SERVE[name])
    here = f"KCD_LAB_DIR={layout.root}".encode() in environ
    return pid if state != "Z" and ours and here else None


def _reap(pid: int) -> None:
    """Collect the exit status of a process this one started (`lab up` in a test session), or it lingers
    as a zombie that `os.kill(pid, 0)` still finds; a process started by another `kcd-proxy` is not ours to reap."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_ready(layout: LabLayout, proc: subprocess.Popen[bytes], name: str, timeout: float, log: Path) -> None:
    """Until `lab probe <name>` would pass (a real request answered, not a TCP connect: `proxy.lab.serve.probe`);
    RuntimeError naming the part, what the last probe saw and the part's log, if it exits or the deadline passes."""
    from proxy.lab import serve  # serve imports this module

    deadline = time.monotonic() + timeout
    problem = serve.probe(layout, name)
    while problem is not None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        problem = serve.probe(layout, name)
    if problem is None:
        return
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    verdict = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready within {timeout:g} s"
    raise LabError(f"lab {name} {verdict}: {problem}\nits log {log}:\n{tail}")


def _spawn(layout: LabLayout, name: str, timeout: float = 15) -> None:
    """`kcd-proxy lab serve <name>` in the background, unless it runs; wait until it answers a real request."""
    pid_file = _pid_file(layout, name)
    if _pid_alive(layout, name):
        return
    log = layout.run_dir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *SERVE[name]],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **layout.env(), **layout.as_env()},
            start_new_session=True,
        )
    pid_file.write_text(f"{proc.pid}\n")
    _wait_ready(layout, proc, name, timeout, log)


def gateway_config(
    layout: LabLayout,
    *,
    gateway_port: int | None = None,
    admin: bool = False,
    behind_balancer: bool = False,
    basic: bool = False,
) -> str:
    """The gateway's TOML configuration for this lab, with absolute paths; `admin` adds the admin listener
    on loopback and the doctor's canary user, `behind_balancer` the PROXY protocol from `layout.balancer_subnet`,
    `basic` the `certificate-or-basic` mode (a certificate if the device has one, else Basic credentials). With a
    `layout.state_dir` (the compose lab's), the CRL replay floors are kept there across restarts (`crl_state`)."""
    p = layout.pki_dir
    authentication = '\n[authentication]\nmode = "certificate-or-basic"\n' if basic else ""
    balancer = f'proxy_protocol = true\ntrusted_proxies = ["{layout.balancer_subnet}"]\n' if behind_balancer else ""
    admin_section = f'\n[admin]\nbind = "127.0.0.1:{layout.admin_port}"\n' if admin else ""
    state = f'crl_state = "{Path(layout.state_dir) / "crl-state.json"}"\n' if layout.state_dir else ""
    if admin:  # what `make lab` serves, and `doctor --config` reads: its canary, as config/lab.toml's
        admin_section += '\n[doctor]\ncanary_user = "alice@lab.test"\n'
    return f"""# Generated by `kcd-proxy lab up` for the lab in {layout.root}
[listener]
bind = "{layout.bind_host}:{gateway_port or layout.gateway_port}"
{balancer}certificate = "{p / "server-chain.pem"}"
private_key = "{p / "server.key"}"

[client_certificates]
trust_anchors = ["{p / "root.pem"}"]
intermediates = ["{p / "issuing.pem"}"]
crls = ["{p / "crls.pem"}"]
revocation = "require"
{state}
[identity]
source = "san-upn"

[kerberos]
principal = "HTTP/proxy.lab.test@LAB.TEST"
keytab = "{layout.proxy_keytab}"
krb5_config = "{layout.krb5_conf}"

[[routes]]
prefix = "/"
upstream = "http://{layout.backend_host}:{layout.backend_port}"
spn = "HTTP/cas.lab.test"
{authentication}{admin_section}"""


def publish_dir(layout: LabLayout) -> Path:
    """What the CRL server serves: links to the DER CRLs, and nothing else (the PKI directory holds keys)."""
    publish = layout.root / PUBLISH_DIR
    publish.mkdir(parents=True, exist_ok=True)
    for name in ("issuing.crl", "root.crl"):
        link = publish / name
        if not link.is_symlink():
            link.symlink_to(layout.pki_dir / name)
    return publish


def init(layout: LabLayout) -> None:
    """The lab's files that need no daemon: PKI, CRL publishing directory, gateway.toml, gateway-balanced.toml
    (behind a balancer: the compose profile `scale`) and gateway-basic.toml (Basic sign-in where a device has no
    certificate); the compose `pki` step."""
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    crl_base_url = f"http://{layout.crl_host}:{layout.crl_port}"
    ocsp_url = f"http://{layout.crl_host}:{layout.ocsp_port}"
    pki.make_pki(layout.pki_dir, now=datetime.now(UTC), crl_base_url=crl_base_url, ocsp_url=ocsp_url)
    publish_dir(layout)
    (layout.root / "gateway.toml").write_text(gateway_config(layout, admin=True))
    (layout.root / "gateway-balanced.toml").write_text(gateway_config(layout, admin=True, behind_balancer=True))
    (layout.root / "gateway-basic.toml").write_text(gateway_config(layout, admin=True, basic=True))


def up(layout: LabLayout) -> None:
    _check_ports(layout)
    init(layout)
    _spawn(layout, "kdc", timeout=60)  # provisioning a fresh realm takes seconds
    _spawn(layout, "backend", timeout=30)
    _spawn(layout, "crl", timeout=30)


def down(layout: LabLayout) -> None:
    for name in _DAEMONS:
        pid = _pid_alive(layout, name)
        if pid is not None:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15  # `serve kdc` stops slapd and krb5kdc before it exits
            while _pid_alive(layout, name) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if _pid_alive(layout, name):
                os.killpg(pid, signal.SIGKILL)
        _pid_file(layout, name).unlink(missing_ok=True)
    kdc.stop_realm(layout)


def gateway_port_warning(layout: LabLayout) -> str | None:
    """What `lab up` says when the ports `make lab`'s gateway serves on are taken, or None; not an error: that
    may be this lab's own gateway, running while `lab up` is run again."""
    taken = taken_ports(layout, _GATEWAY_PORTS)
    if not taken:
        return None
    return (
        f"note: {', '.join(taken)} in use: unless that is this lab's gateway, `make lab`'s gateway cannot listen "
        "there; set the variable to a free port below 32768"
    )


def status(layout: LabLayout) -> dict[str, bool]:
    running = dict(kdc.realm_status(layout))
    for name in _DAEMONS:
        running[name] = _pid_alive(layout, name) is not None
    return running


def describe(layout: LabLayout) -> str:
    """How to reach the lab: environment, users, and a ready-to-paste curl command."""
    p = layout.pki_dir
    user = next(iter(USERS))
    moved = {k: v for k, v in layout.as_env().items() if v != LabLayout(root=layout.root).as_env()[k]}
    env = "\n".join(f"export {k}={v}" for k, v in {**layout.env(), **moved}.items())  # for a second terminal
    url = f"https://127.0.0.1:{layout.gateway_port}/Microsoft-Server-ActiveSync"
    basic = layout.root / "gateway-basic.toml"
    return f"""{env}
# realm LAB.TEST: KDC {layout.kdc_host}:{layout.kdc_port}, LDAP ldap://127.0.0.1:{layout.ldap_port}/
# backend (Exchange stand-in, Negotiate for HTTP/cas.lab.test): http://{layout.backend_host}:{layout.backend_port}/
# CRLs: http://{layout.crl_host}:{layout.crl_port}/issuing.crl
# users: {", ".join(f"{u} / {pw}" for u, pw in USERS.items())}; certificates and .p12 (password "lab") in {p}/users/
# gateway configuration: {layout.root / "gateway.toml"}
curl --cacert {p / "root.pem"} --cert {p / "users" / f"{user}.pem"} --key {p / "users" / f"{user}.key"} \\
  {url}
# a certificate the gateway refuses (revoked: 403 and the reason; expired.pem, untrusted.pem: a TLS alert):
curl --cacert {p / "root.pem"} --cert {p / "users" / "revoked.pem"} --key {p / "users" / "revoked.key"} \\
  {url}
# Basic sign-in instead of a certificate: serve {basic} instead of gateway.toml (in make lab's
# terminal: Ctrl-C, then .venv/bin/kcd-proxy run --config {basic}), then:
curl --cacert {p / "root.pem"} -u {user}:{USERS[user]} {url}"""
