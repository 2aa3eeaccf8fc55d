"""`kcd-proxy explain` and `doctor` given hostile files where a certificate, a configuration or a keytab should be: a
directory, a FIFO, 100 MB, DER with bytes after the certificate, a PEM bundle of 10,000 certificates. Each run ends
(no hang: the FIFO has no writer) with a clear error naming the file and what is wrong with it, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, free_port, lab_config

_BIG = 100 * 1024 * 1024


def _hostile(kind: str, where: Path, good: bytes) -> Path:
    """A file of `kind` at `where`; `good` is what the file should hold (a certificate in PEM, a keytab)."""
    if kind == "directory":
        where.mkdir()
    elif kind == "fifo":
        os.mkfifo(where)
    elif kind == "100 MB":
        with where.open("wb") as f:
            f.write(good)
            f.truncate(_BIG)  # sparse: a valid start, then zeros
    elif kind == "DER and garbage":
        der = x509.load_pem_x509_certificate(good).public_bytes(Encoding.DER)
        where.write_bytes(der + b"\x00garbage" * 10)
    elif kind == "10,000 certificates":
        where.write_bytes(good * 10_000)
    return where


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command, bounded: a run that waits on a FIFO fails the test here instead of hanging it."""
    return subprocess.run([sys.executable, "-m", "proxy", *argv], capture_output=True, text=True, cwd=REPO, timeout=120)


KINDS = ("directory", "fifo", "100 MB", "DER and garbage", "10,000 certificates")
# what the error says about each kind of file (the path is named before it)
SAYS = {
    "directory": "a directory, not a file",
    "fifo": "not a regular file",
    "100 MB": "more than",
    "DER and garbage": "80 bytes after the end of the DER certificate",
    "10,000 certificates": "more than",
}


@pytest.mark.parametrize("kind", KINDS)
def test_explain_refuses_a_hostile_certificate_file_clearly(lab: LabLayout, tmp_path: Path, kind: str) -> None:
    """`explain --cert FILE`: exit 2, one line naming the file and what is wrong ("Is a directory: 3" named a file
    descriptor; DER with bytes after it was "ParseError { kind: ExtraData }"), no traceback."""
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=free_port()))
    cert = _hostile(kind, tmp_path / "cert.pem", (lab.pki_dir / "users" / "alice.pem").read_bytes())
    done = _run("explain", "--config", str(config), "--cert", str(cert))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"kcd-proxy explain: cannot read a certificate from {cert}: "), done.stderr
    assert SAYS[kind] in done.stderr, done.stderr
    assert not done.stderr.rstrip().endswith(": 3")


@pytest.mark.parametrize("key", ["trust_anchors", "intermediates"])
@pytest.mark.parametrize("kind", ["100 MB", "DER and garbage"])
def test_a_hostile_ca_file_is_named_by_its_own_key(lab: LabLayout, tmp_path: Path, kind: str, key: str) -> None:
    """A CA file of the configuration that is 100 MB (a certificate, then zeros) or DER with bytes after it: explain
    stops with a configuration error naming that key and file (a bad intermediates file was reported as
    `client_certificates.trust_anchors`; 100 MB were read whole and accepted); exit 2, no traceback."""
    good = lab.pki_dir / ("root.pem" if key == "trust_anchors" else "issuing.pem")
    text = lab_config(lab, port=free_port())
    assert str(good) in text
    hostile = _hostile(kind, tmp_path / "ca.pem", good.read_bytes())
    config = tmp_path / "gateway.toml"
    config.write_text(text.replace(f'"{good}"', f'"{hostile}"'))
    done = _run("explain", "--config", str(config), "--cert", str(lab.pki_dir / "users" / "alice.pem"))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert f"client_certificates.{key}[0]: {hostile}: " in done.stderr, done.stderr
    assert SAYS[kind] in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["directory", "fifo", "100 MB"])
def test_doctor_refuses_a_hostile_configuration_file_clearly(lab: LabLayout, tmp_path: Path, kind: str) -> None:
    """`doctor --config FILE` where FILE is a directory, a FIFO or 100 MB: exit 2 naming the file and what it is."""
    config = _hostile(kind, tmp_path / "gateway.toml", lab_config(lab, port=free_port()).encode())
    done = _run("doctor", "--config", str(config))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert f"cannot read {config}: " in done.stderr, done.stderr
    assert SAYS[kind] in done.stderr, done.stderr
    assert not done.stderr.rstrip().endswith(": 3")


@pytest.mark.parametrize("kind", ["directory", "fifo", "100 MB"])
def test_doctor_with_a_hostile_keytab_ends_with_a_clear_verdict(lab: LabLayout, tmp_path: Path, kind: str) -> None:
    """kerberos.keytab a directory or a FIFO: a configuration error naming the key (exit 2); 100 MB of zeros: the kdc
    check fails saying the file is not a keytab (it said "check kerberos.principal, kerberos.keytab and krb5.conf"),
    and what needs the gateway's credentials is not run (exit 1); no traceback, no hang."""
    keytab = _hostile(kind, tmp_path / "proxy.keytab", b"")
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=free_port()).replace(str(lab.proxy_keytab), str(keytab)))
    done = _run("doctor", "--config", str(config), "--user", "alice@lab.test")
    assert "Traceback" not in done.stderr
    if kind == "100 MB":
        assert done.returncode == 1, done
        assert done.stdout.splitlines()[0].startswith("FAIL  kdc"), done.stdout
        assert "kerberos.keytab is not a keytab MIT can read" in done.stdout
        assert "FAIL  s4u2self" not in done.stdout
    else:
        assert done.returncode == 2, done
        assert f"kerberos.keytab: not a regular file: {keytab}" in done.stderr, done.stderr
