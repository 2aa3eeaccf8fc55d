"""`doctor`'s `delegation` check against the Samba DC for a gateway account allowed only by resource-based
constrained delegation: the backend's account lists it in `msDS-AllowedToActOnBehalfOfOtherIdentity` (`samba-tool
delegation add-principal`), and the gateway's own Delegation tab is empty. The directory says it is allowed; only
the KDC can say whether it honours that (Windows Server 2012 and later do, Samba 4.17 does not), so without a canary
the check says it cannot tell and how to find out, and with one it judges by the KDC's answer. Classic constrained
delegation (svc-kcdproxy) is judged as before.

The accounts are this file's own, made once in the realm's kept state: svc-kcdrbcd (the gateway, no delegation
settings, AES keys, its keytab) and svc-rbcdcas (HTTP/rbcd.ad.test, allowing svc-kcdrbcd).
"""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.identity.sid import Sid
from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _locked

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

GATEWAY = "svc-kcdrbcd"
GATEWAY_SPN = "HTTP/proxy-rbcd.ad.test"
BACKEND = "svc-rbcdcas"
BACKEND_SPN = "HTTP/rbcd.ad.test"
INHERIT_ONLY_BACKEND = "svc-rbcdinh"
INHERIT_ONLY_SPN = "HTTP/rbcd-inherit.ad.test"


def _exists(realm: ad.AdRealm, name: str) -> bool:
    return f"sAMAccountName: {name}" in realm.ldbsearch(f"(sAMAccountName={name})", "sAMAccountName")


def _resource_based_accounts(realm: ad.AdRealm) -> None:
    """svc-kcdrbcd and svc-rbcdcas as the module docstring says, made once under the realm's lock."""
    with _locked(realm.root):
        if not _exists(realm, BACKEND):
            realm.samba_tool("user", "create", BACKEND, ad.SERVICE_PASSWORD.format(account=BACKEND))
            realm.samba_tool("spn", "add", BACKEND_SPN, BACKEND)
        if not _exists(realm, GATEWAY):
            realm.samba_tool("user", "create", GATEWAY, ad.SERVICE_PASSWORD.format(account=GATEWAY))
            realm.samba_tool("spn", "add", GATEWAY_SPN, GATEWAY)
            dn = f"CN={GATEWAY},CN=Users,{realm.base_dn}"
            realm.ldbmodify(ad._replace(dn, "msDS-SupportedEncryptionTypes", "24"))
        if GATEWAY not in realm.samba_tool("delegation", "show", BACKEND):
            realm.samba_tool("delegation", "add-principal", BACKEND, GATEWAY)
        keytab = realm.keytab(GATEWAY)
        if not keytab.exists():
            realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={GATEWAY}@{ad.REALM}")
            keytab.chmod(0o644)


def _config(realm: ad.AdRealm, backend: AdProcess, path: Path, *, account: str, spn: str) -> Path:
    """The AD lab's gateway configuration with its directory, one route to `spn`, signing in as `account`, and no
    canary user of its own (doctor's checks that need one run with --user only)."""
    text = ad_mapping.gateway_config(realm, "upn", backend_port=backend.port)
    text = re.sub(r'\ncanary_user = "[^"]*"\n', "\n", text)
    assert "canary_user" not in text
    text = text.replace(f'spn = "{ad.BACKEND_SPN}"', f'spn = "{spn}"')
    if account != ad.GATEWAY_ACCOUNT:
        text = text.replace(f'"{realm.gateway_principal}"', f'"{account}@{ad.REALM}"')
        text = text.replace(str(realm.gateway_keytab), str(realm.keytab(account)))
    path.write_text(text)
    return path


def _doctor(realm: ad.AdRealm, config: Path, *args: str, check: str = "delegation") -> dict[str, str]:
    """doctor's lines by check name, each with its fix line (if any) after it; `check` among them."""
    done: subprocess.CompletedProcess[str] = realm.run(
        [sys.executable, "-m", "proxy", "doctor", "--config", str(config), *args], timeout=180
    )
    lines: dict[str, str] = {}
    name = ""
    for line in done.stdout.splitlines():
        found = re.match(r"(PASS|WARN|FAIL|SKIP)\s+(\S+(?: \S+)?)\s\s", line)
        if found:
            name = found.group(2).strip()
            lines[name] = line
        elif name and line.strip().startswith("fix: "):
            lines[name] += "\n" + line.strip()
    assert check in lines, done.stdout + done.stderr
    return lines


def test_a_gateway_allowed_by_the_backend_alone_is_not_failed_without_a_canary(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-kcdrbcd, whose Delegation tab is empty, allowed by svc-rbcdcas's msDS-AllowedToActOnBehalfOfOtherIdentity:
    without --user, `delegation` is no failure: it names the backend's account and attribute and says that only
    S4U2Proxy tells whether the KDC honours it, run with --user (before: FAIL, 'Use any authentication protocol'
    not chosen and msDS-AllowedToDelegateTo lists nothing)."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    config = _config(realm, ad_backend, tmp_path / "rbcd.toml", account=GATEWAY, spn=BACKEND_SPN)
    line = _doctor(realm, config)["delegation"]
    assert line.startswith("SKIP"), line
    assert f"CN={BACKEND},CN=Users,DC=ad,DC=test" in line, line
    assert "msDS-AllowedToActOnBehalfOfOtherIdentity" in line, line
    assert "run with --user" in line, line


def test_a_gateway_allowed_by_the_backend_alone_is_judged_by_the_kdcs_answer(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """With a canary, the KDC decides: Samba 4.17's ignores resource-based delegation and refuses S4U2Proxy to
    HTTP/rbcd.ad.test, so `delegation` fails saying the backend's account allows the gateway but this KDC does not
    honour it, with classic delegation's commands as the way that works here."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    config = _config(realm, ad_backend, tmp_path / "rbcd.toml", account=GATEWAY, spn=BACKEND_SPN)
    lines = _doctor(realm, config, "--user", "alice@ad.test")
    assert lines[f"s4u2proxy {BACKEND_SPN}"].startswith("FAIL"), lines
    line = lines["delegation"]
    assert line.startswith("FAIL"), line
    assert "does not honour resource-based delegation" in line, line
    assert f"samba-tool delegation add-service {GATEWAY} {BACKEND_SPN}" in line, line
    assert f"samba-tool delegation for-any-protocol {GATEWAY} on" in line, line


def test_classic_constrained_delegation_is_judged_as_before(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-kcdproxy (protocol transition, HTTP/cas.ad.test in msDS-AllowedToDelegateTo) passes, with or without a
    canary; svc-kcdrbcd for HTTP/cas.ad.test (which nobody's resource-based delegation allows it) fails with both
    missing pieces named."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    classic = _config(realm, ad_backend, tmp_path / "classic.toml", account=ad.GATEWAY_ACCOUNT, spn=ad.BACKEND_SPN)
    assert _doctor(realm, classic)["delegation"].startswith("PASS")
    assert _doctor(realm, classic, "--user", "alice@ad.test")["delegation"].startswith("PASS")
    bare = _config(realm, ad_backend, tmp_path / "bare.toml", account=GATEWAY, spn=ad.BACKEND_SPN)
    line = _doctor(realm, bare)["delegation"]
    assert line.startswith("FAIL"), line
    assert "'Use any authentication protocol' is not chosen" in line, line
    assert f"msDS-AllowedToDelegateTo lists nothing, not {ad.BACKEND_SPN}" in line, line


def _inherit_only_descriptor(trustee: Sid) -> bytes:
    """A self-relative security descriptor ([MS-DTYP] 2.4.6) owned by BUILTIN\\Administrators whose DACL's one entry
    allows `trustee` full control with CONTAINER_INHERIT_ACE | INHERIT_ONLY_ACE: for the objects below, not this one."""
    owner = Sid(5, (32, 544)).to_bytes()
    body = struct.pack("<I", 0x000F01FF) + trustee.to_bytes()
    ace = struct.pack("<BBH", 0, 0x02 | 0x08, 4 + len(body)) + body  # ACCESS_ALLOWED_ACE_TYPE
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(ace), 1, 0) + ace
    header = struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 20 + len(owner))  # SE_SELF_RELATIVE | SE_DACL_PRESENT
    return header + owner + acl


def _inherit_only_backend(realm: ad.AdRealm) -> None:
    """svc-rbcdinh (HTTP/rbcd-inherit.ad.test), its msDS-AllowedToActOnBehalfOfOtherIdentity naming svc-kcdrbcd in
    an inherit-only entry (`_inherit_only_descriptor`), made once under the realm's lock."""
    with _locked(realm.root):
        if _exists(realm, INHERIT_ONLY_BACKEND):
            return
        password = ad.SERVICE_PASSWORD.format(account=INHERIT_ONLY_BACKEND)
        realm.samba_tool("user", "create", INHERIT_ONLY_BACKEND, password)
        realm.samba_tool("spn", "add", INHERIT_ONLY_SPN, INHERIT_ONLY_BACKEND)
        found = re.search(r"^objectSid: (S-\S+)$", realm.ldbsearch(f"(sAMAccountName={GATEWAY})", "objectSid"), re.M)
        assert found is not None
        value = base64.b64encode(_inherit_only_descriptor(Sid.parse(found.group(1)))).decode()
        attribute = "msDS-AllowedToActOnBehalfOfOtherIdentity"
        dn = f"CN={INHERIT_ONLY_BACKEND},CN=Users,{realm.base_dn}"
        realm.ldbmodify(f"dn: {dn}\nchangetype: modify\nreplace: {attribute}\n{attribute}:: {value}\n")


def test_an_inherit_only_entry_allows_nobody(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-rbcdinh's msDS-AllowedToActOnBehalfOfOtherIdentity names svc-kcdrbcd only in an inherit-only entry, which the
    access check skips for the account itself: `delegation` fails with classic delegation's missing pieces named, and
    does not say the backend allows the gateway (before: SKIP, 'svc-rbcdinh's msDS-AllowedToActOnBehalfOfOtherIdentity
    allows svc-kcdrbcd')."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    _inherit_only_backend(realm)
    config = _config(realm, ad_backend, tmp_path / "inherit.toml", account=GATEWAY, spn=INHERIT_ONLY_SPN)
    line = _doctor(realm, config)["delegation"]
    assert line.startswith("FAIL"), line
    assert "allows" not in line, line
    assert f"msDS-AllowedToDelegateTo lists nothing, not {INHERIT_ONLY_SPN}" in line, line


# The KDC's access check on msDS-AllowedToActOnBehalfOfOtherIdentity (Samba 4.19's samba_kdc_check_s4u2proxy_rbcd, as
# Windows'): the gateway's token holds Everyone and Authenticated Users beside its own SID and groups, the right asked
# is CONTROL_ACCESS alone, and the entries are read in order. Three backends whose descriptors say so, made once.
ACCESS_CHECKED = {
    "svc-rbcdall": "HTTP/rbcd-everyone.ad.test",  # allows Everyone (S-1-1-0): the gateway too
    "svc-rbcdread": "HTTP/rbcd-read.ad.test",  # allows the gateway to read the account, not CONTROL_ACCESS: no one
    "svc-rbcdau": "HTTP/rbcd-au.ad.test",  # denies Authenticated Users (S-1-5-11), then allows the gateway: no one
}


def _acl_descriptor(*aces: tuple[int, int, Sid]) -> bytes:
    """A self-relative security descriptor owned by BUILTIN\\Administrators whose DACL holds `aces` in order, each
    (type: 0 allow, 1 deny; access mask; trustee)."""
    owner = Sid(5, (32, 544)).to_bytes()
    body = b""
    for kind, mask, trustee in aces:
        ace = struct.pack("<I", mask) + trustee.to_bytes()
        body += struct.pack("<BBH", kind, 0, 4 + len(ace)) + ace
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    return struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 20 + len(owner)) + owner + acl


def _backend_ldif(realm: ad.AdRealm, name: str, spn: str, descriptor: bytes) -> str:
    """An LDIF add of account `name` with `spn`, its msDS-AllowedToActOnBehalfOfOtherIdentity `descriptor`."""
    value = base64.b64encode(descriptor).decode()
    return (
        f"dn: CN={name},CN=Users,{realm.base_dn}\nchangetype: add\nobjectClass: user\nsAMAccountName: {name}\n"
        f"servicePrincipalName: {spn}\nmsDS-AllowedToActOnBehalfOfOtherIdentity:: {value}\n"
    )


def _access_checked_backends(realm: ad.AdRealm) -> None:
    """The three accounts of ACCESS_CHECKED with their SPNs and descriptors, made once (one ldbmodify) under the
    realm's lock."""
    with _locked(realm.root):
        if _exists(realm, "svc-rbcdau"):
            return
        found = re.search(r"^objectSid: (S-\S+)$", realm.ldbsearch(f"(sAMAccountName={GATEWAY})", "objectSid"), re.M)
        assert found is not None
        gateway, full, read = Sid.parse(found.group(1)), 0x000F01FF, 0x00020014  # read: READ_CONTROL, list, read prop
        descriptors = {
            "svc-rbcdall": _acl_descriptor((0, full, Sid(1, (0,)))),
            "svc-rbcdread": _acl_descriptor((0, read, gateway)),
            "svc-rbcdau": _acl_descriptor((1, full, Sid(5, (11,))), (0, full, gateway)),
        }
        realm.ldbmodify(
            "\n".join(_backend_ldif(realm, name, ACCESS_CHECKED[name], raw) for name, raw in descriptors.items())
        )


def test_resource_based_delegation_is_read_as_the_kdcs_access_check_reads_it(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """One route per ACCESS_CHECKED backend, svc-kcdrbcd without a Delegation tab: `delegation` says svc-rbcdall's
    entry for Everyone allows the gateway, and that svc-rbcdread's (no CONTROL_ACCESS) and svc-rbcdau's (Authenticated
    Users denied first) do not (before: Everyone not seen, the mask and the gateway's well-known groups ignored: the
    first not allowed, the other two allowing)."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    _access_checked_backends(realm)
    everyone, read, denied = ACCESS_CHECKED.values()
    config = _config(realm, ad_backend, tmp_path / "checked.toml", account=GATEWAY, spn=everyone)
    upstream = f"http://127.0.0.1:{ad_backend.port}"
    extra = "".join(
        f'\n[[routes]]\nprefix = "/{i}/"\nupstream = "{upstream}"\nspn = "{spn}"\n'
        for i, spn in ((1, read), (2, denied))
    )
    config.write_text(config.read_text() + extra)
    line = _doctor(realm, config)["delegation"]
    assert line.startswith("FAIL"), line
    assert "CN=svc-rbcdall,CN=Users,DC=ad,DC=test's msDS-AllowedToActOnBehalfOfOtherIdentity allows" in line, line
    assert f"for {everyone} (resource-based delegation), not {read}, {denied}" in line, line


def test_a_base_dn_the_directory_does_not_hold_fails_the_directory_check(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """[directory] base_dn naming an OU the domain does not have (a typo): `directory` fails naming base_dn and the
    server that answered without it (before: PASS, the server bound us; the directory answers a base search for a
    missing entry with no entry, which the check took as a read of it, and the gateway then refuses every strongly
    mapped user as unknown)."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    config = _config(realm, ad_backend, tmp_path / "typo.toml", account=GATEWAY, spn=BACKEND_SPN)
    missing = f"OU=Staf,{realm.base_dn}"
    text = config.read_text()
    assert f'base_dn = "{realm.base_dn}"' in text
    config.write_text(text.replace(f'base_dn = "{realm.base_dn}"', f'base_dn = "{missing}"'))
    line = _doctor(realm, config, check="directory")["directory"]
    assert line.startswith("FAIL"), line
    assert f"no entry {missing}" in line, line
    assert "base_dn" in line, line


NULL_DACL_BACKEND = "svc-rbcdnull"
NULL_DACL_SPN = "HTTP/rbcd-null.ad.test"


def test_a_null_dacl_is_read_as_allowing_every_account(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-rbcdnull's msDS-AllowedToActOnBehalfOfOtherIdentity is a descriptor whose DACL is present but NULL, which
    the KDC's access check reads as granting everyone (Samba's and Windows' "a NULL dacl allows access"): `delegation`
    says the backend allows svc-kcdrbcd (before: FAIL, the descriptor read as allowing nobody, every account of the
    domain in fact allowed to act for any user towards it), and `delegation-open` warns of it, naming the fix (before
    left25: no warning)."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    with _locked(realm.root):
        if not _exists(realm, NULL_DACL_BACKEND):
            owner = Sid(5, (32, 544)).to_bytes()
            null_dacl = struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 0) + owner  # SE_DACL_PRESENT, no list
            realm.ldbmodify(_backend_ldif(realm, NULL_DACL_BACKEND, NULL_DACL_SPN, null_dacl))
    config = _config(realm, ad_backend, tmp_path / "null.toml", account=GATEWAY, spn=NULL_DACL_SPN)
    lines = _doctor(realm, config)
    dn = f"CN={NULL_DACL_BACKEND},CN=Users,{realm.base_dn}"
    assert f"{dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows" in lines["delegation"], lines
    warned = lines.get("delegation-open", "")
    assert warned.startswith("WARN"), lines
    assert f"{dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity lets every account of the domain act" in warned, warned
    assert f"fix: allow the gateway's account only: Set-ADUser -Identity '{dn}' " in warned, warned


HISTORY_GATEWAY = "svc-kcdhist"
HISTORY_BACKEND = "svc-rbcdhist"
HISTORY_SPN = "HTTP/rbcd-history.ad.test"
OLD_SID = Sid(5, (21, 1111, 2222, 3333, 1234))  # the gateway account's SID in a domain it was migrated from


def test_a_sid_the_gateway_holds_through_sid_history_is_read_as_its_own(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """svc-kcdhist carries OLD_SID in its sIDHistory (a migrated account: its tickets' PAC carries it as an extra SID
    of its token) and svc-rbcdhist's msDS-AllowedToActOnBehalfOfOtherIdentity allows OLD_SID: `delegation` says the
    backend allows the gateway (before: FAIL, only objectSid and tokenGroups read, and Samba's tokenGroups leaves the
    account's own SID history out)."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    with _locked(realm.root):
        if not _exists(realm, HISTORY_BACKEND):
            realm.samba_tool("user", "create", HISTORY_GATEWAY, ad.SERVICE_PASSWORD.format(account=HISTORY_GATEWAY))
            gateway_dn = f"CN={HISTORY_GATEWAY},CN=Users,{realm.base_dn}"
            realm.ldbmodify(
                f"dn: {gateway_dn}\nchangetype: modify\nreplace: msDS-SupportedEncryptionTypes\n"
                f"msDS-SupportedEncryptionTypes: 24\n-\nadd: sIDHistory\nsIDHistory: {OLD_SID}\n"
            )
            keytab = realm.keytab(HISTORY_GATEWAY)
            realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={HISTORY_GATEWAY}@{ad.REALM}")
            keytab.chmod(0o644)
            allows = _acl_descriptor((0, 0x100, OLD_SID))  # CONTROL_ACCESS for the old SID alone
            realm.ldbmodify(_backend_ldif(realm, HISTORY_BACKEND, HISTORY_SPN, allows))
    config = _config(realm, ad_backend, tmp_path / "history.toml", account=HISTORY_GATEWAY, spn=HISTORY_SPN)
    line = _doctor(realm, config)["delegation"]
    dn = f"CN={HISTORY_BACKEND},CN=Users,{realm.base_dn}"
    assert f"{dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows" in line, line


# What the KDC's access check holds in the gateway's token beyond its SID and groups (review51): S-1-18-1, which the
# PAC of a ticket the gateway got with its key carries (read from the real KDC below), is in every token; Network
# (S-1-5-2) only in some KDCs' (Samba 4.19 and later add it); a conditional (callback) entry is decided by claims where
# the KDC evaluates conditions. Three backends whose descriptors say so, made once for the module.
TOKEN_BACKENDS = {
    "svc-rbcdasid": "HTTP/rbcd-asserted.ad.test",  # denies S-1-18-1, then allows the gateway: no one
    "svc-rbcdnet": "HTTP/rbcd-network.ad.test",  # allows Network: the gateway on some KDCs only
    "svc-rbcdcond": "HTTP/rbcd-conditional.ad.test",  # allows the gateway if Member_of{its own SID}: a condition
}
ASSERTED_IDENTITY, NETWORK = Sid(18, (1,)), Sid(5, (2,))


def _conditional_ace(trustee: Sid) -> bytes:
    """An ACCESS_ALLOWED_CALLBACK_ACE ([MS-DTYP] 2.4.4.6) granting CONTROL_ACCESS to `trustee` if
    `Member_of {SID(trustee)}` ([MS-DTYP] 2.4.4.17: "artx", a composite of one SID token, the Member_of operator)."""
    sid = trustee.to_bytes()
    token = b"\x51" + struct.pack("<I", len(sid)) + sid
    condition = b"artx" + b"\x50" + struct.pack("<I", len(token)) + token + b"\x89"
    condition = condition.ljust((len(condition) + 3) // 4 * 4, b"\0")
    body = struct.pack("<I", 0x100) + sid + condition
    return struct.pack("<BBH", 9, 0, 4 + len(body)) + body


@pytest.fixture(scope="module")
def token_backends(ad_mapping_realm: ad.AdRealm) -> dict[str, str]:
    """TOKEN_BACKENDS' accounts with their SPNs and descriptors (one ldbmodify, once, under the realm's lock); the
    gateway's (svc-kcdrbcd) objectSid by name."""
    realm = ad_mapping_realm
    _resource_based_accounts(realm)
    found = re.search(r"^objectSid: (S-\S+)$", realm.ldbsearch(f"(sAMAccountName={GATEWAY})", "objectSid"), re.M)
    assert found is not None
    gateway = Sid.parse(found.group(1))
    with _locked(realm.root):
        if not _exists(realm, "svc-rbcdcond"):
            owner = Sid(5, (32, 544)).to_bytes()
            ace = _conditional_ace(gateway)
            acl = struct.pack("<BBHHH", 2, 0, 8 + len(ace), 1, 0) + ace
            conditional = struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 20 + len(owner)) + owner + acl
            descriptors = {
                "svc-rbcdasid": _acl_descriptor((1, 0x100, ASSERTED_IDENTITY), (0, 0x100, gateway)),
                "svc-rbcdnet": _acl_descriptor((0, 0x100, NETWORK)),
                "svc-rbcdcond": conditional,
            }
            realm.ldbmodify(
                "\n".join(_backend_ldif(realm, name, TOKEN_BACKENDS[name], raw) for name, raw in descriptors.items())
            )
    return {"gateway": str(gateway)}


_PAC_SIDS = """
import sys, uuid, gssapi
principal, keytab = sys.argv[1], sys.argv[2]
name = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
store = {"client_keytab": keytab, "keytab": keytab, "ccache": f"MEMORY:{uuid.uuid4().hex}"}
creds = gssapi.Credentials(name=name, usage="both", mechs=[gssapi.MechType.kerberos], store=store)
token = gssapi.SecurityContext(name=name, creds=creds, usage="initiate", mech=gssapi.MechType.kerberos).step()
acceptor = gssapi.Credentials(usage="accept", store={"keytab": keytab})
accepted = gssapi.raw.accept_sec_context(token, acceptor_creds=acceptor)
sys.stdout.write(bytes(gssapi.raw.get_name_attribute(accepted.initiator_name, b"urn:mspac:").values[0]).hex())
"""


def test_the_kdc_puts_the_asserted_identity_sid_in_the_gateways_pac_and_doctor_reads_it_so(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, token_backends: dict[str, str], tmp_path: Path
) -> None:
    """The PAC of a ticket svc-kcdrbcd gets with its keytab (AS exchange, then a ticket to itself, read with its key)
    carries S-1-18-1 and not Network or Claims Valid (Samba 4.17); so svc-rbcdasid, denying S-1-18-1 before allowing
    the gateway, allows no one on a KDC that honours it, and `delegation` fails as for nothing allowed (before: SKIP,
    'svc-rbcdasid's msDS-AllowedToActOnBehalfOfOtherIdentity allows svc-kcdrbcd')."""
    realm = ad_mapping_realm
    done = realm.run([sys.executable, "-c", _PAC_SIDS, f"{GATEWAY}@{ad.REALM}", str(realm.keytab(GATEWAY))], check=True)
    pac = bytes.fromhex(done.stdout)
    assert ASSERTED_IDENTITY.to_bytes() in pac  # an ExtraSids entry (NDR: the SID's bytes as written)
    assert NETWORK.to_bytes() not in pac
    assert Sid(5, (21, 0, 0, 0, 497)).to_bytes() not in pac
    assert Sid.parse(token_backends["gateway"]).to_bytes() in pac  # the account's own SID, in UPN_DNS_INFO
    spn = TOKEN_BACKENDS["svc-rbcdasid"]
    config = _config(realm, ad_backend, tmp_path / "asserted.toml", account=GATEWAY, spn=spn)
    line = _doctor(realm, config)["delegation"]
    assert line.startswith("FAIL"), line
    assert "allows" not in line, line
    assert f"msDS-AllowedToDelegateTo lists nothing, not {spn}" in line, line


def test_entries_only_some_kdcs_read_are_a_warning_and_the_kdc_decides(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, token_backends: dict[str, str], tmp_path: Path
) -> None:
    """svc-rbcdnet allows Network and svc-rbcdcond allows the gateway under a condition (Samba 4.17 stores the
    callback entry as written): without a canary `delegation` warns that doctor cannot tell, naming each entry
    (before: FAIL, read as allowing no one, where Samba 4.19's token holds Network and Windows evaluates the
    condition); with one, Samba 4.17's KDC refuses S4U2Proxy to both, and the failure names the entry or a KDC
    without resource-based delegation."""
    realm = ad_mapping_realm
    network, conditional = TOKEN_BACKENDS["svc-rbcdnet"], TOKEN_BACKENDS["svc-rbcdcond"]
    stored = realm.ldbsearch("(sAMAccountName=svc-rbcdcond)", "msDS-AllowedToActOnBehalfOfOtherIdentity")
    assert "msDS-AllowedToActOnBehalfOfOtherIdentity" in stored, stored
    config = _config(realm, ad_backend, tmp_path / "unsure.toml", account=GATEWAY, spn=network)
    upstream = f"http://127.0.0.1:{ad_backend.port}"
    config.write_text(
        config.read_text() + f'\n[[routes]]\nprefix = "/c/"\nupstream = "{upstream}"\nspn = "{conditional}"\n'
    )
    lines = _doctor(realm, config)
    line = lines["delegation"]
    assert line.startswith("WARN"), line
    assert f"CN=svc-rbcdnet,CN=Users,{realm.base_dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows" in line, line
    assert f"its entry allowing {NETWORK} names Network" in line, line
    assert f"its entry allowing {token_backends['gateway']} is conditional" in line, line
    assert "run with --user UPN" in line, line
    assert lines.get("delegation-open", "").startswith("WARN"), lines  # Network: every account, on some KDCs
    judged = _doctor(realm, config, "--user", "alice@ad.test")
    assert judged[f"s4u2proxy {network}"].startswith("FAIL"), judged
    assert judged[f"s4u2proxy {conditional}"].startswith("FAIL"), judged
    line = judged["delegation"]
    assert line.startswith("FAIL"), line
    assert "the entry named above refused it, or it does not honour resource-based delegation" in line, line
