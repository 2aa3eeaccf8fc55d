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
one `open` made afresh (`O_EXCL | O_NOFOLLOW`), never through a link raced in after the old one was removed. Each
directory down to it is opened from the one above without following a link, and the file is written relative to
that descriptor: a directory swapped for a link once it was checked (a race) is not written through either.

A re-run leaves each volume holding what the lab hands out now, no more: a user deleted since (a device kept the revoked
user's key), a file a part no longer reads (a gateway kept an old keytab) is removed. Each volume lists what the handout
wrote into it (`MANIFEST`, one relative path a line); a re-run records the union of that list and the new files before
it writes, writes, removes what the old list has and the new one lacks, then records the new list. Only files on that
list are removed, never a directory with something in it, nothing a container made itself (the backend's replay cache).
The list is read as untrusted (the backend can write it): an entry that is absolute, has a `..`, a NUL byte or a name
longer than a file name may be, or leads through a link is skipped (one that no file can have stopped the handout before
the parts after the backend's: the devices kept a deleted user's key), and every step down to the file is opened with
`O_NOFOLLOW` from the volume itself, so a removal never leaves the volume. A volume filled before there was a list holds
none: its first re-run removes nothing (`docker-compose down -v` empties the volumes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from proxy.lab import pki, runner
from proxy.lab.layout import LabLayout

PARTS = ("gateway", "backend", "crl", "device")
AD_PARTS = ("gateway", "backend", "device")  # `--ad`: the profile ad's containers (proxy.lab.ad_compose.files)
GATEWAY_CONFIGS = ("gateway.toml", "gateway-balanced.toml", "gateway-basic.toml")  # what `lab init` writes
MANIFEST = ".handout"  # in each volume: the files the handout wrote there (module docstring)
NAME_MAX = 255  # bytes of one file name (Linux, every file system the volumes are on)


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


def hand_out(layout: LabLayout, into: Path, *, ad: bool = False) -> None:
    """Copy each part's files into `into/<part>/` (links as links), and remove those an earlier run wrote there that
    the lab no longer hands out; the backend also gets an empty `run/`. `ad`: the profile ad's parts, after the AD
    users' certificates are issued from the lab's CA (`proxy.lab.ad_compose`)."""
    if ad:
        from proxy.lab import ad as ad_lab
        from proxy.lab import ad_compose

        ad_lab.issue_user_certificates(ad_compose.realm(layout))
    for part in AD_PARTS if ad else PARTS:
        volume = into / part
        sources = ad_compose.files(layout, part) if ad else files(layout, part)
        now = [source.relative_to(layout.root) for source in sources]
        before = _listed(volume)
        _record(volume, [*before, *now])  # first: a run cut short leaves nothing it wrote off the list
        for source, relative in zip(sources, now, strict=True):
            _copy(source, volume, relative)
        for stale in dict.fromkeys(before).keys() - set(now):
            _remove(volume, stale)
        _record(volume, now)
    os.close(_directory(into / "backend", layout.run_dir.relative_to(layout.root)))


def _listed(volume: Path) -> list[Path]:
    """The files an earlier run recorded in `volume`, those that are safe to name: relative, without `..` or `.`."""
    try:
        fd = os.open(volume / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # none yet (a first run, a volume filled before there was a list), or a link: no list
        return []
    with os.fdopen(fd, "rb") as manifest:
        if not stat.S_ISREG(os.fstat(manifest.fileno()).st_mode):
            return []
        text = manifest.read(1 << 20).decode("utf-8", errors="replace")
    listed = []
    for line in text.splitlines():
        path, names = PurePosixPath(line), line.split("/")
        if (
            line
            and not path.is_absolute()
            and not {"..", "."} & set(names)
            and path.name != MANIFEST
            and "\0" not in line  # no file has it (os.open raised ValueError, and the parts after went without)
            and all(len(os.fsencode(name)) <= NAME_MAX for name in names)  # nor a longer name (ENAMETOOLONG)
        ):
            listed.append(Path(path))
    return listed


def _record(volume: Path, relative: list[Path]) -> None:
    """Write the list of files the handout wrote into `volume` (replaced whole, never through a link)."""
    text = "".join(f"{path.as_posix()}\n" for path in sorted(dict.fromkeys(relative)))
    directory = _directory(volume, Path())
    try:
        _write(directory, MANIFEST, lambda out: out.write(text.encode()), 0o644)
    finally:
        os.close(directory)


def _remove(volume: Path, relative: Path) -> None:
    """Remove `volume / relative` if it is a file or a link (the link itself), walking down from the volume without
    following a link; then its directories that are left empty, up to the volume. Anything else is left alone."""
    with _directories(volume, relative.parent) as fds:
        if fds is None:
            return
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            os.unlink(relative.name, dir_fd=fds[-1])
        names = relative.parent.parts
        for depth in range(len(names), 0, -1):  # the deepest first; rmdir fails on one that holds anything
            try:
                os.rmdir(names[depth - 1], dir_fd=fds[depth - 1])
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EBUSY):
                    break
                raise


@contextlib.contextmanager
def _directories(volume: Path, relative: PurePosixPath | Path) -> Iterator[list[int] | None]:
    """File descriptors of `volume` and of each directory down to `volume / relative`, each opened without following
    a link (`O_NOFOLLOW`); None when one of them is missing or is not a directory."""
    fds: list[int] = []
    try:
        try:
            fds.append(os.open(volume, os.O_RDONLY | os.O_DIRECTORY))
            for name in relative.parts:
                fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
        except OSError:
            yield None
        else:
            yield fds
    finally:
        for fd in fds:
            os.close(fd)


def _directory(volume: Path, relative: Path) -> int:
    """A descriptor of `volume / relative` (the caller closes it), each directory on the way made where missing, and
    one made in place of a link or a file found there (`volume` itself, a mount point, is taken as it is). Each step
    is opened from the one above without following a link, and the files are then written relative to the
    descriptor: a link a container swaps in for a directory once it was checked is never written through."""
    volume.mkdir(parents=True, exist_ok=True)
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in relative.parts:
            below = _step(fd, name)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def _step(parent: int, name: str) -> int:
    """The directory `name` in `parent`, opened without following a link: made where missing, made in place of a
    link or a file found there."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=parent)  # a link or a file where a directory of the part's belongs
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=parent)
    return os.open(name, flags, dir_fd=parent)


def _copy(source: Path, volume: Path, relative: Path) -> None:
    directory = _directory(volume, relative.parent)
    try:
        if source.is_symlink():  # the CRL server's published links point into pki/, which it gets too
            partial = _partial(directory, relative.name)
            os.symlink(source.readlink(), partial, dir_fd=directory)
            os.replace(partial, relative.name, src_dir_fd=directory, dst_dir_fd=directory)
            return
        held = source.stat()

        def fill(out: BinaryIO) -> None:
            with source.open("rb") as data:
                shutil.copyfileobj(data, out)
            os.utime(out.fileno(), ns=(held.st_atime_ns, held.st_mtime_ns))

        _write(directory, relative.name, fill, stat.S_IMODE(held.st_mode))  # the mode too: a key stays its owner's
    finally:
        os.close(directory)


def _partial(directory: int, name: str) -> str:
    partial = f".{name}.partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial, dir_fd=directory)
    return partial


def _write(directory: int, name: str, fill: Callable[[BinaryIO], object], mode: int) -> None:
    """`name` in `directory` replaced whole: written beside it into a file this `open` made (`O_EXCL | O_NOFOLLOW`),
    then renamed, all relative to the directory's descriptor."""
    partial = _partial(directory, name)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=directory)
    with os.fdopen(fd, "wb") as out:
        fill(out)
        os.fchmod(out.fileno(), mode)
    os.replace(partial, name, src_dir_fd=directory, dst_dir_fd=directory)
