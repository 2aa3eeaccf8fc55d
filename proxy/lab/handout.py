"""What each container of the compose lab may read: the lab directory handed out part by part.

The lab directory holds every secret of the realm: the CAs' private keys (`pki/root.key`, `pki/issuing.key`),
the KDC's master key stash and LDAP bind password (`kdc/`), the LDAP database with every principal's keys
(`ldap/data`) and all three services' keytabs. The compose lab keeps it in one volume, `lab`, that only its
writers mount: `pki` (it makes the CAs) and `kdc` (the realm), and `handout`, which runs this.

`kcd-proxy lab handout --into DIR` copies, for each other part (`PARTS`), the files it reads and nothing else
into `DIR/<part>/`, at the same paths relative to the lab directory: each container mounts its own volume at
`KCD_LAB_DIR`, so the paths in `gateway.toml` hold unchanged. The gateway gets its configurations, krb5.conf,
its own keytab, its server certificate and key, and the trust list with the CRLs; the backend its keytab and a
`run/` for its replay cache; the CRL server the two CRLs; the device the users' certificates and keys and the
root certificate. A device, a gateway or the CRL server that is compromised then holds no CA key, no KDC
secret and no other service's keytab. Each file keeps its mode (keys and keytabs 0600) and is replaced whole
(written beside, then renamed), so a re-run never leaves one half-written.

A volume may hold what its container planted there (the backend's is writable: its replay cache), and a re-run
writes into it again: no link found there is followed. A link where a directory of the part's should be is
replaced by a directory (it led the backend's keytab into the device's volume), and a file is written only into
one `open` made afresh (`O_EXCL | O_NOFOLLOW`), never through a link raced in after the old one was removed.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from proxy.lab import pki, runner
from proxy.lab.layout import LabLayout

PARTS = ("gateway", "backend", "crl", "device")
GATEWAY_CONFIGS = ("gateway.toml", "gateway-balanced.toml", "gateway-basic.toml")  # what `lab init` writes


def files(layout: LabLayout, part: str) -> list[Path]:
    """The lab files `part` reads, as absolute paths under `layout.root` (the users' files: those there now)."""
    p = pki.Pki.at(layout.pki_dir)
    if part == "gateway":
        configs = [layout.root / name for name in GATEWAY_CONFIGS]
        trust = [p.root_cert, p.issuing_cert, p.crls, p.server_chain, p.server_key]
        return [*configs, layout.krb5_conf, layout.proxy_keytab, *trust]
    if part == "backend":
        return [layout.krb5_conf, layout.backend_keytab]
    if part == "crl":
        publish = layout.root / runner.PUBLISH_DIR
        return [p.issuing_crl, p.root_crl, *(publish / crl.name for crl in (p.issuing_crl, p.root_crl))]
    if part == "device":
        return [p.root_cert, *sorted(path for path in (layout.pki_dir / "users").iterdir() if path.is_file())]
    raise ValueError(f"no lab part named {part!r}; there are {', '.join(PARTS)}")


def hand_out(layout: LabLayout, into: Path) -> None:
    """Copy each part's files into `into/<part>/` (links as links); the backend also gets an empty `run/`."""
    for part in PARTS:
        for source in files(layout, part):
            _copy(source, into / part, source.relative_to(layout.root))
    _directory(into / "backend", layout.run_dir.relative_to(layout.root))


def _directory(volume: Path, relative: Path) -> Path:
    """`volume / relative`, each directory on the way made where missing, and one made in place of a link or a file
    found there (`volume` itself, a mount point, is taken as it is)."""
    volume.mkdir(parents=True, exist_ok=True)
    path = volume
    for name in relative.parts:
        path = path / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        path.mkdir(exist_ok=True)
    return path


def _copy(source: Path, volume: Path, relative: Path) -> None:
    target = _directory(volume, relative.parent) / relative.name
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    if source.is_symlink():  # the CRL server's published links point into pki/, which it gets too
        partial.symlink_to(source.readlink())
    else:
        held = source.stat()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, source.open("rb") as data:
            shutil.copyfileobj(data, out)
            os.fchmod(out.fileno(), stat.S_IMODE(held.st_mode))  # the mode too: a key stays its owner's alone
            os.utime(out.fileno(), ns=(held.st_atime_ns, held.st_mtime_ns))
    partial.replace(target)
