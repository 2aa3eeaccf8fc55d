"""The AD realm's certificates and accounts for strong certificate mapping (`[identity] mapping`).

`ensure(realm)` runs after `proxy.lab.ad.ensure` (the realm up) and makes, idempotently, the DC's name
known inside the namespace (`ensure_names`: a Kerberos bind to LDAP needs `ldap://dc1.ad.test`, not the
address), then:

Accounts, besides the realm's own users (`proxy.lab.ad.USERS`):
- `frank`: his certificate has no SID extension; his account lists it in `altSecurityIdentities` by issuer
  and reversed serial (`X509:<I>...<SR>...`, strong), next to a weak subject-only entry for it;
- `grace`: her certificate has no SID extension; her account lists it only weakly (`X509:<I>...<S>...`);
- `heidi`: locked out (`lockoutTime` written as now on every `ensure`, so the lockout never lapses
  between test runs);
- `ivan`: expired (`accountExpires` in 2020);
- `mallory`: whose UPN is `alice@corp.example` (a `uPNSuffixes` suffix): with `realm_map` sending
  corp.example to AD.TEST, a gateway that impersonates by UPN would ask the KDC for `alice@AD.TEST`,
  which is alice's account, not mallory's.

Certificates, in `<realm pki>/mapping/` (`cert(realm, name)` and `key(realm, name)`), from the lab PKI:
- `<user>-sid` for alice, bob, carol, dave, heidi, ivan: the SID extension with the account's own
  `objectSid`, as AD CS writes it since KB5014754;
- `alice-bob-sid`: alice's UPN with bob's SID (what an ESC1 template or Certifried hands an attacker);
- `frank-altsec`: no SID extension, strongly mapped by the account's `altSecurityIdentities`;
- `grace-weak`: no SID extension, only weakly mapped;
- `mallory-sid`: mallory's own certificate (UPN `alice@corp.example`, mallory's SID): rightly issued, and
  it must be served as mallory;
- `alice-sid-url`: no SID extension, alice's SID as the subjectAltName URL `tag:microsoft.com,2022-09-14:sid:..`;
  `alice-bob-sid-url`: the same with bob's SID; `alice-sid-bob-url`: alice's SID extension and bob's SID URL.
The realm's plain certificates (`realm.user_cert("alice")`) carry no SID extension and no mapping at all.

A certificate is issued again when it is missing or older than the issuing CA, and frank's entry is
rewritten from his current certificate on every `ensure`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from proxy.identity import altsecid
from proxy.identity.sid import SID_URL_PREFIX, Sid, sid_extension
from proxy.lab import ad


@dataclass(frozen=True)
class MappingUser:
    name: str
    password: str


MAPPING_USERS = (
    MappingUser("frank", "Frank-Ad-Pa55"),
    MappingUser("grace", "Grace-Ad-Pa55"),
    MappingUser("heidi", "Heidi-Ad-Pa55"),
    MappingUser("ivan", "Ivan-Ad-Pa55"),
    MappingUser("mallory", "Mallory-Ad-Pa55"),
)
MALLORY_UPN = f"alice@{ad.OTHER_SUFFIX}"
SID_CERTIFICATES = ("alice", "bob", "carol", "dave", "heidi", "ivan")
EXPIRED_AT = datetime(2020, 1, 1, tzinfo=UTC)
LAB_BACKDATING_SECONDS = 3600  # the lab PKI's notBefore is an hour before issuance (proxy.lab.pki._HOUR)


def directory(realm: ad.AdRealm) -> Path:
    return realm.pki_dir / "mapping"


def cert(realm: ad.AdRealm, name: str) -> Path:
    return directory(realm) / f"{name}.pem"


def key(realm: ad.AdRealm, name: str) -> Path:
    return directory(realm) / f"{name}.key"


def upn(realm: ad.AdRealm, name: str) -> str:
    """A user's UPN as the realm gave it (carol's suffix is corp.example)."""
    known = {u.name: u.upn for u in ad.USERS} | {"mallory": MALLORY_UPN}
    return known.get(name, f"{name}@{realm.dns_domain}")


def object_sid(realm: ad.AdRealm, name: str) -> Sid:
    """The account's objectSid, as ldbsearch on the realm's database prints it."""
    out = realm.ldbsearch(f"(sAMAccountName={name})", "objectSid")
    found = re.search(r"^objectSid: (S-1-[0-9-]+)$", out, re.MULTILINE)
    if found is None:
        raise ad.AdRealmError(f"no objectSid for {name} in {realm.sam_ldb}: {out[-500:]}")
    return Sid.parse(found.group(1))


def _exists(realm: ad.AdRealm, name: str) -> bool:
    return f"sAMAccountName: {name}" in realm.ldbsearch(f"(sAMAccountName={name})", "sAMAccountName")


def _filetime(when: datetime) -> int:
    return int((when - datetime(1601, 1, 1, tzinfo=UTC)).total_seconds()) * 10_000_000


def _replace(realm: ad.AdRealm, name: str, attribute: str, *values: str) -> None:
    lines = [f"dn: CN={name},CN=Users,{realm.base_dn}", "changetype: modify", f"replace: {attribute}"]
    lines += [f"{attribute}: {value}" for value in values]
    realm.ldbmodify("\n".join(lines) + "\n")


def _issue(
    realm: ad.AdRealm, name: str, user_upn: str, extensions: list[x509.ExtensionType], urls: tuple[str, ...] = ()
) -> x509.Certificate:
    path = cert(realm, name)
    if not path.exists() or path.stat().st_mtime < realm.pki.issuing_cert.stat().st_mtime:
        ad.issue_user_certificate(realm.pki, directory(realm), name, user_upn, extensions=extensions, urls=urls)
    return x509.load_pem_x509_certificate(path.read_bytes())


def hosts_file(realm: ad.AdRealm) -> Path:
    """`ip netns exec` mounts /etc/netns/<namespace>/hosts over /etc/hosts for what it runs."""
    return Path("/etc/netns", realm.netns, "hosts")


def ensure_names(realm: ad.AdRealm) -> None:
    """Give the DC its name inside the namespace: a SASL GSSAPI bind asks for a ticket to ldap/<host in the
    URL>, and the DC's SPN is ldap/dc1.ad.test, not ldap/10.213.0.1. The file is named after the namespace,
    so no other namespace (and not the host) sees it."""
    text = f"127.0.0.1 localhost\n::1 localhost\n{realm.dc_address} {realm.dc_host} {realm.dc_host.split('.')[0]}\n"
    path = hosts_file(realm)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def forget_names(realm: ad.AdRealm) -> None:
    """Remove the namespace's hosts file (with the namespace: `lab down --ad`)."""
    hosts_file(realm).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        hosts_file(realm).parent.rmdir()


def ensure(realm: ad.AdRealm) -> None:
    """The accounts and certificates above, in a realm that `proxy.lab.ad.ensure` brought up."""
    ensure_names(realm)
    for user in MAPPING_USERS:
        if not _exists(realm, user.name):
            realm.samba_tool("user", "create", user.name, user.password)
    _replace(realm, "mallory", "userPrincipalName", MALLORY_UPN)
    sids = {name: object_sid(realm, name) for name in (*SID_CERTIFICATES, "bob", "mallory")}
    for name in SID_CERTIFICATES:
        _issue(realm, f"{name}-sid", upn(realm, name), [sid_extension(sids[name])])
    _issue(realm, "alice-bob-sid", upn(realm, "alice"), [sid_extension(sids["bob"])])
    _issue(realm, "mallory-sid", MALLORY_UPN, [sid_extension(sids["mallory"])])
    _issue(realm, "alice-sid-url", upn(realm, "alice"), [], (SID_URL_PREFIX + str(sids["alice"]),))
    _issue(realm, "alice-bob-sid-url", upn(realm, "alice"), [], (SID_URL_PREFIX + str(sids["bob"]),))
    bob_url = (SID_URL_PREFIX + str(sids["bob"]),)
    _issue(realm, "alice-sid-bob-url", upn(realm, "alice"), [sid_extension(sids["alice"])], bob_url)
    frank = _issue(realm, "frank-altsec", upn(realm, "frank"), [])
    weak_frank = f"X509:<S>{_windows_order(frank.subject)}"
    _replace(realm, "frank", "altSecurityIdentities", altsecid.issuer_serial_entry(frank), weak_frank)
    grace = _issue(realm, "grace-weak", upn(realm, "grace"), [])
    weak_grace = f"X509:<I>{_windows_order(grace.issuer)}<S>{_windows_order(grace.subject)}"
    _replace(realm, "grace", "altSecurityIdentities", weak_grace)
    _replace(realm, "heidi", "lockoutTime", str(_filetime(datetime.now(UTC))))
    _replace(realm, "ivan", "accountExpires", str(_filetime(EXPIRED_AT)))


def _windows_order(name: x509.Name) -> str:
    """A name as Windows writes it in altSecurityIdentities: most significant RDN first."""
    return ",".join(rdn.rfc4514_string() for rdn in name.rdns)


def directory_table(realm: ad.AdRealm, *, urls: tuple[str, ...] | None = None, cache_seconds: float = 300) -> str:
    """The `[directory]` table for this realm: the DC by name, a Kerberos bind with the gateway's keytab."""
    listed = ", ".join(f'"{url}"' for url in (urls or (f"ldap://{realm.dc_host}",)))
    return f"""
[directory]
urls = [{listed}]
base_dn = "{realm.base_dn}"
bind = "kerberos"
cache_seconds = {cache_seconds:g}
"""


def gateway_config(
    realm: ad.AdRealm,
    mode: str,
    *,
    port: int = ad.LAB_GATEWAY_PORT,
    backend_port: int = ad.LAB_BACKEND_PORT,
    directory_text: str | None = None,
    admin: bool = False,
    name: str = "gateway.toml",
) -> str:
    """The AD lab's gateway configuration with `[identity] mapping = mode` and the realm's directory; `admin` and
    `name` as for `ad.gateway_config` (what `lab up --ad` writes: `lab_configs`)."""
    text = ad.gateway_config(realm, port=port, backend_port=backend_port, admin=admin, name=name)
    # The lab CA backdates notBefore by an hour (proxy.lab.pki) and issues right after making the accounts:
    # strong-or-audit would refuse every weakly mapped lab certificate as older than its account without this.
    mapping = f'mapping = "{mode}"\ncertificate_backdating_compensation = {LAB_BACKDATING_SECONDS}\n'
    text = text.replace('[identity]\nsource = "san-upn"\n', f'[identity]\nsource = "san-upn"\n{mapping}')
    return text + (directory_text if directory_text is not None else directory_table(realm))


# What `lab up --ad` writes beside gateway.toml: one file per strong mode, the migration's two steps (the README's
# "Strong certificate mapping"): the audit, then enforcement. Each serves on gateway.toml's ports, traces included.
LAB_CONFIGS = {"strong": "gateway-strong.toml", "strong-or-audit": "gateway-strong-or-audit.toml"}


def lab_configs(realm: ad.AdRealm) -> dict[str, Path]:
    """Write the strong-mapping configurations `lab up --ad` leaves beside the realm; their paths by mode."""
    written = {}
    for mode, name in LAB_CONFIGS.items():
        path = realm.root / name
        path.write_text(gateway_config(realm, mode, admin=True, name=name))
        written[mode] = path
    return written
