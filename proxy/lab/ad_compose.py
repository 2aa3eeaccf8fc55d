"""The AD realm in containers: the compose lab's profile `ad` (docker-compose.yml, docs/containers.md).

Theory of operation
-------------------
The native AD lab (`proxy.lab.ad`) runs Samba's DC in a network namespace; here it runs in a container of its own,
`dc`, with the same code: `kcd-proxy lab serve dc` provisions realm `AD.TEST` into the container's volume (mounted
at `$KCD_LAB_DIR/ad`) on its first start (`ad._provision`: the users, the gateway account `svc-kcdproxy` with
protocol transition and classic constrained delegation to `HTTP/cas.ad.test`, the backend account, AES keytabs),
then writes beside the realm what its clients read (a krb5.conf naming the DC by its service name, the gateway's
`gateway.toml`), gives the keytabs to the lab's user (uid 10001, which the other containers run as), and becomes
`samba` in the foreground. A restart finds the marker and only starts samba.

The container's file systems hold no extended attributes of the `security.` namespace for a process without
CAP_SYS_ADMIN, where Samba keeps the sysvol's NT ACLs (`acl_xattr`): the DC stores every extended attribute in a tdb
instead (`xattr_tdb`, `CONTAINER_OPTIONS`), so it runs without that capability.

`kcd-proxy lab handout --ad --into DIR` (the one-shot `ad-handout`, uid 10001) then issues the AD users'
certificates from the `pki` service's CA (`pki/ad-users/`; ghost's names no account) and copies each AD container
its files alone (`AD_PARTS`, `proxy.lab.handout`): the gateway its configuration, krb5.conf, keytab, server key and
trust list; the backend its krb5.conf and keytab; the device the root certificate and the AD users' certificates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from proxy.lab import ad
from proxy.lab.layout import LabLayout

LAB_UID = 10001  # the other containers' user (deploy/gateway/Dockerfile): the keytabs are handed out as theirs
BACKEND_HOST = "ad-backend"  # docker-compose.yml's service names, which the containers resolve
DC_HOST = "dc"
# The DC in a container: every extended attribute in a tdb (no CAP_SYS_ADMIN for `security.NTACL`); of the DC's
# services the KDC and LDAP alone, what the gateway asks (the file server needs CAP_SETUID and CAP_SETGID; RPC, DNS,
# NetBIOS and the rest were served to the `ad` network for nobody, and to a device on an engine that routes between
# the file's networks: docs/containers.md; samba-tool opens the database itself, the containers find the DC by its
# service name); the NTP signing socket under the volume, not /var/lib/samba on the read-only root file system.
CONTAINER_OPTIONS: dict[str, str | Path] = {
    "vfs objects": "dfs_samba4 acl_xattr xattr_tdb",
    "server services": "kdc ldap",
}


def realm(layout: LabLayout) -> ad.AdRealm:
    """The compose lab's AD realm: under `$KCD_LAB_DIR/ad` (the dc's volume), with the `pki` service's PKI."""
    return ad.AdRealm.at(layout.root / "ad", pki_root=layout.pki_dir)


def files(layout: LabLayout, part: str) -> list[Path]:
    """The files the AD profile's `part` (gateway, backend, device) reads, as absolute paths under `layout.root`."""
    r = realm(layout)
    p = r.pki
    if part == "gateway":
        trust = [p.root_cert, p.issuing_cert, p.crls, p.server_chain, p.server_key]
        return [r.root / "gateway.toml", r.krb5_conf, r.gateway_keytab, *trust]
    if part == "backend":
        return [r.krb5_conf, r.backend_keytab]
    if part == "device":
        return [p.root_cert, *sorted(path for path in r.users_dir.iterdir() if path.is_file())]
    raise ValueError(f"no AD lab part named {part!r}; there are gateway, backend, device")


def gateway_toml(layout: LabLayout) -> str:
    """The ad-gateway service's configuration, `$KCD_LAB_DIR/ad/gateway.toml`: the native AD lab's, listening on the
    container network, the backend and the DC by their service names, the CRL floors in the gateway's state volume."""
    how = "the compose lab's dc (`kcd-proxy lab serve dc`); the ad-gateway service runs it"
    state = Path(layout.state_dir) / "crl-state.json" if layout.state_dir else None
    r = realm(layout)
    return ad.gateway_config(r, admin=True, bind_host="0.0.0.0", backend_host=BACKEND_HOST, how=how, crl_state=state)


def serve_dc(layout: LabLayout) -> int:  # noqa: RET503 (samba replaces this process)
    """`kcd-proxy lab serve dc`: the realm provisioned if it is not, its clients' files written, then samba in the
    foreground (this process becomes it: the container's init passes it SIGTERM)."""
    r = realm(layout)
    r.root.mkdir(parents=True, exist_ok=True)
    try:
        if not r.marker.exists():
            print(f"lab dc: provisioning {ad.REALM} in {r.samba_dir} (CPU-bound: a minute or more)", flush=True)
            ad._provision(r, {**CONTAINER_OPTIONS, "ntp signd socket directory": r.run_dir / "ntp_signd"}, host_ip=None)
            r.marker.write_text(f"{ad.REALM} provisioned in {r.samba_dir}\n")
    except ad.AdRealmError as e:
        print(f"lab dc: {e}", file=sys.stderr, flush=True)
        return 1
    for keytab in r.keytab_dir.glob("*.keytab"):
        os.chown(keytab, LAB_UID, LAB_UID)  # 0600, the lab user's: ad-handout copies them to the gateway and backend
    r.krb5_conf.write_text(ad.krb5_conf_text(r, kdc_host=DC_HOST))
    (r.root / "gateway.toml").write_text(gateway_toml(layout))
    for sub in ("ncalrpc", "winbindd"):
        (r.run_dir / sub).mkdir(parents=True, exist_ok=True)
    print(f"lab dc: realm {ad.REALM} provisioned; starting samba (KDC 88, LDAP 389)", flush=True)
    argv = ["samba", "--foreground", "--no-process-group", "--debug-stdout", "-s", str(r.smb_conf)]
    os.execvp(argv[0], argv)  # noqa: S606 (a fixed argv)
