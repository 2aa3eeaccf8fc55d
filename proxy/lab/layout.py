"""Where the lab keeps its files and which loopback ports it uses.

Every lab component (LDAP + KDC, PKI, the Exchange stand-in, the gateway's lab configuration) takes a
`LabLayout` and finds its files through it, so that one directory holds the whole realm and `lab down`
plus `rm -rf` of that directory leaves nothing behind. Nothing here touches `/etc`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REALM = "LAB.TEST"
DOMAIN = "lab.test"
PROXY_SERVICE = "HTTP/proxy.lab.test"  # the gateway's own principal: protocol transition + delegation
BACKEND_SERVICE = "HTTP/cas.lab.test"  # the Exchange stand-in; in the proxy's delegation allow-list
OTHER_SERVICE = "HTTP/other.lab.test"  # a real service that is *not* in the allow-list

# Lab users: name -> password. `dave` exists but is disabled (-allow_tix).
USERS = {"alice": "alice-Pa55", "bob": "bob-Pa55", "carol": "carol-Pa55"}
DISABLED_USERS = {"dave": "dave-Pa55"}


def default_root() -> Path:
    """The lab directory: $KCD_LAB_DIR, else `.lab/` in the checkout."""
    env = os.environ.get("KCD_LAB_DIR")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / ".lab"


@dataclass(frozen=True)
class LabLayout:
    root: Path
    ldap_port: int = 53389
    kdc_port: int = 58088
    backend_port: int = 8081
    gateway_port: int = 8443
    crl_port: int = 8082  # plain HTTP server publishing the lab CRLs

    @classmethod
    def default(cls) -> LabLayout:
        return cls(root=default_root())

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
