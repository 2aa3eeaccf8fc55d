"""Where the lab keeps its files, which ports it uses and where its daemons listen.

Every lab component (LDAP + KDC, PKI, the Exchange stand-in, the gateway's lab configuration) takes a
`LabLayout` and finds its files through it, so that one directory holds the whole realm and `lab down`
plus `rm -rf` of that directory leaves nothing behind. Nothing here touches `/etc`.

Natively the lab listens on 127.0.0.1 and its parts reach each other there. In containers
(`docker-compose.yml`) each daemon listens on its container's network (`bind_host = 0.0.0.0`) and the
others reach it by service name (`kdc_host = kdc`...). A layout travels to another process, or a
container, as `KCD_LAB_*` environment variables: `as_env()` writes them and `from_env()` reads them, so
`kcd-proxy lab serve kdc` started by `lab up` and the same command in a compose service see one layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

REALM = "LAB.TEST"
PROXY_SERVICE = "HTTP/proxy.lab.test"  # the gateway's own principal: protocol transition + delegation
BACKEND_SERVICE = "HTTP/cas.lab.test"  # the Exchange stand-in; in the proxy's delegation allow-list
OTHER_SERVICE = "HTTP/other.lab.test"  # a real service that is *not* in the allow-list

# Lab users: name -> password. `dave` exists but is disabled (-allow_tix).
USERS = {"alice": "alice-Pa55", "bob": "bob-Pa55", "carol": "carol-Pa55"}
DISABLED_USERS = {"dave": "dave-Pa55"}


def krb5_libdefaults(realm: str, *more: str) -> str:
    """The `[libdefaults]` of every krb5.conf a lab writes (the MIT realm, the AD realm, the tests' mini realm), then
    `more` relations: no DNS look-ups for KDCs, realms or host names (each krb5.conf names its KDC and domains),
    forwardable tickets (S4U2Proxy needs a forwardable evidence ticket), and TCP to the KDC (udp_preference_limit)."""
    relations = [
        f"default_realm = {realm}",
        "dns_lookup_kdc = false",
        "dns_lookup_realm = false",
        "dns_canonicalize_hostname = false",
        "rdns = false",
        "forwardable = true",
        "udp_preference_limit = 1",
        *more,
    ]
    return "[libdefaults]\n" + "".join(f"    {relation}\n" for relation in relations)


def variable(field: str) -> str:
    """The environment variable that sets a layout field: `kdc_port` is KCD_LAB_KDC_PORT."""
    return f"KCD_LAB_{field.upper()}"


def default_root() -> Path:
    """The lab directory: $KCD_LAB_DIR, else `.lab/` in the checkout."""
    env = os.environ.get("KCD_LAB_DIR")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / ".lab"


@dataclass(frozen=True)
class LabLayout:
    root: Path
    # Below Linux's ephemeral range (32768-60999): a port in it can be any outgoing connection's own end when the
    # daemon binds (a busy machine, or a readiness probe connecting to itself), and krb5kdc then fails to start.
    ldap_port: int = 8389
    kdc_port: int = 8088
    backend_port: int = 8081
    gateway_port: int = 8443
    crl_port: int = 8082  # plain HTTP server publishing the lab CRLs
    ocsp_port: int = 8083  # the issuing CA's OCSP responder (`openssl ocsp`), named in the certificates
    bind_host: str = "127.0.0.1"  # where the KDC, backend, CRL server and lab gateway listen (slapd: loopback always)
    kdc_host: str = "127.0.0.1"  # how clients reach the KDC (krb5.conf)
    backend_host: str = "127.0.0.1"  # how the gateway reaches the backend (gateway.toml)
    crl_host: str = "127.0.0.1"  # the host in the certificates' CRL distribution points
    admin_port: int = 9443  # the lab gateway's admin listener (/readyz: the containers' health check), on loopback
    # whose PROXY headers gateway-balanced.toml believes: natively HAProxy on 127.0.0.1 alone, not all of 127.0.0.0/8
    # (any loopback address could then name any device; check-config warns of it). Compose: the balancer's network
    balancer_subnet: str = "127.0.0.1/32"
    # the lab gateway's own writable directory, for its CRL replay floors (client_certificates.crl_state); ""
    # (natively): none, the floors in memory only. Compose: a named volume of each gateway's, the image's 0700 directory
    state_dir: str = ""

    @classmethod
    def default(cls) -> LabLayout:
        return cls.from_env(os.environ)

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, root: Path | None = None) -> LabLayout:
        """The layout that `KCD_LAB_DIR` and `KCD_LAB_<FIELD>` (e.g. KCD_LAB_KDC_PORT) describe; defaults elsewhere."""
        values: dict[str, str | int] = {}
        for f in fields(cls):
            raw = env.get(variable(f.name))
            if f.name == "root" or raw is None:
                continue
            if f.type == "int":
                if not raw.isdigit() or not 0 < int(raw) < 65536:
                    raise ValueError(f"{variable(f.name)}: expected a port number, got {raw!r}")
                values[f.name] = int(raw)
            else:
                values[f.name] = raw
        if root is None:
            root = Path(env["KCD_LAB_DIR"]) if env.get("KCD_LAB_DIR") else default_root()
        return cls(root=root.resolve(), **values)  # type: ignore[arg-type]

    def as_env(self) -> dict[str, str]:
        """This layout as `KCD_LAB_*` variables, for `from_env` in another process or a container."""
        env = {variable(f.name): str(getattr(self, f.name)) for f in fields(self) if f.name != "root"}
        return {"KCD_LAB_DIR": str(self.root), **env}

    @property
    def local_host(self) -> str:
        """Where a daemon bound to `bind_host` answers on its own machine: a wildcard bind answers on loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.bind_host, self.bind_host)

    @property
    def krb5_conf(self) -> Path:
        return self.root / "krb5.conf"

    @property
    def kdc_dir(self) -> Path:
        return self.root / "kdc"

    @property
    def kdc_conf(self) -> Path:
        """The KDC profile (`KRB5_KDC_PROFILE`): listening address, database module, stash, logging."""
        return self.kdc_dir / "kdc.conf"

    @property
    def ldap_dir(self) -> Path:
        return self.root / "ldap"

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def keytab_dir(self) -> Path:
        return self.root / "keytabs"

    @property
    def run_dir(self) -> Path:
        """pid files and logs of the lab's daemons."""
        return self.root / "run"

    @property
    def kdc_log(self) -> Path:
        """The KDC's log: one line per AS/TGS request, e.g. `PROTOCOL-TRANSITION` and `CONSTRAINED-DELEGATION`."""
        return self.run_dir / "krb5kdc.log"

    @property
    def proxy_keytab(self) -> Path:
        return self.keytab_dir / "proxy.keytab"

    @property
    def backend_keytab(self) -> Path:
        return self.keytab_dir / "cas.keytab"

    @property
    def other_keytab(self) -> Path:
        return self.keytab_dir / "other.keytab"

    def env(self) -> dict[str, str]:
        """Environment for Kerberos tools and libraries that should use the lab realm."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KCD_LAB_DIR": str(self.root),
        }
