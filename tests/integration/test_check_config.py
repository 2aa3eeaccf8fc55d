"""`kcd-proxy check-config`: a catalogue of broken configurations, each reported as one line naming key and file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy import config as config_module
from proxy.certs.chain import MAX_CA_FILE_BYTES, load_certificates
from proxy.certs.revocation import MAX_CRL_BYTES
from proxy.errors import ConfigError
from proxy.lab import runner
from proxy.lab.layout import LabLayout
from proxy.ops.check import check
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import REPO, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT


def _problems(path: Path) -> list[str]:
    """What check-config reports, in process: the configuration's own problems, then the cross-checks."""
    try:
        return check(config_module.load(path), at=datetime.now(UTC))
    except ConfigError as e:
        return e.problems


def _cli(path: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy", "check-config", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


def _replace(old: str, new: str) -> Callable[[LabLayout, str, Path], str]:
    return lambda lab, text, tmp: text.replace(old.format(lab=lab), new.format(lab=lab, tmp=tmp))


def _append(extra: str) -> Callable[[LabLayout, str, Path], str]:
    return lambda lab, text, tmp: text + extra.format(lab=lab, tmp=tmp)


DIRECTORY = '\n[directory]\nurls = ["ldaps://dc.lab.test"]\nbase_dn = "DC=lab,DC=test"\nca_file = "{ca}"\n'


def _directory_ca_der(lab: LabLayout, text: str, tmp: Path) -> str:
    """A [directory] whose ca_file is the lab's root in DER (OpenLDAP's GnuTLS loads no certificate from it)."""
    der = tmp / "root.der"
    der.write_bytes(load_certificates(lab.pki_dir / "root.pem")[0].public_bytes(serialization.Encoding.DER))
    return text + DIRECTORY.format(ca=der)


def _oversized_directory_ca(lab: LabLayout, text: str, tmp: Path) -> str:
    """A [directory] whose ca_file is the lab's root, then zeros past MAX_CA_FILE_BYTES (sparse: no disk)."""
    big = tmp / "big-ca.pem"
    big.write_bytes((lab.pki_dir / "root.pem").read_bytes())
    with big.open("r+b") as f:
        f.truncate(MAX_CA_FILE_BYTES + 1)
    return text + DIRECTORY.format(ca=big)


def _oversized_crl(lab: LabLayout, text: str, tmp: Path) -> str:
    """The lab's CRLs, then zeros past MAX_CRL_BYTES (sparse: no disk)."""
    big = tmp / "big.crl"
    big.write_bytes((lab.pki_dir / "crls.pem").read_bytes())
    with big.open("r+b") as f:
        f.truncate(MAX_CRL_BYTES + 1)
    return text.replace(str(lab.pki_dir / "crls.pem"), str(big))


def _stale_crl(lab: LabLayout, text: str, tmp: Path) -> str:
    now = datetime.now(UTC)
    ca = load_ca(lab.pki_dir, "issuing")
    crl = write_crl(tmp / "stale.pem", ca, this_update=now - timedelta(days=9), next_update=now - timedelta(days=2))
    return text.replace(str(lab.pki_dir / "crls.pem"), str(crl))


def _forged_crl(lab: LabLayout, text: str, tmp: Path) -> str:
    crl = write_crl(tmp / "forged.pem", load_ca(lab.pki_dir / "rogue", "issuing"))  # the trusted name, another key
    return text.replace(str(lab.pki_dir / "crls.pem"), str(crl))


def _other_ca_crl(lab: LabLayout, text: str, tmp: Path) -> str:
    """The lab's CRLs, then a CRL of a CA the gateway does not trust (another PKI's, made with the openssl CLI)."""
    key, cert, crl = tmp / "other-ca.key", tmp / "other-ca.pem", tmp / "other-ca.crl"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "5"]
    argv += ["-subj", "/CN=Other PKI CA", "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key)]
    subprocess.run([*argv, "-out", str(cert)], check=True, capture_output=True)
    write_crl(crl, (load_certificates(cert)[0], serialization.load_pem_private_key(key.read_bytes(), None)))  # type: ignore[arg-type]
    return text.replace(f'crls = ["{lab.pki_dir}/crls.pem"]', f'crls = ["{lab.pki_dir}/crls.pem", "{crl}"]')


def _swapped(lab: LabLayout, text: str, tmp: Path) -> str:
    """`listener.certificate` and `listener.private_key` each given the other's file."""
    chain, key = f'"{lab.pki_dir}/server-chain.pem"', f'"{lab.pki_dir}/server.key"'
    return text.replace(chain, "CHAIN").replace(key, chain).replace("CHAIN", key)


def _gateway_port(text: str) -> str:
    return text.split('bind = "127.0.0.1:', 1)[1].split('"', 1)[0]


def _admin_route(lab: LabLayout, text: str, tmp: Path) -> str:
    """A route whose upstream is the admin listener: every device would read the traces (who, from where)."""
    port = free_port()
    return (
        text
        + f'\n[admin]\nbind = "127.0.0.1:{port}"\n\n[[routes]]\nprefix = "/ops/"\nupstream = "http://localhost:{port}"\n'
    )


def _wildcard_loop(lab: LabLayout, text: str, tmp: Path) -> str:
    """The listener on every address (the usual production bind) and a route to 127.0.0.1 on its port."""
    port = _gateway_port(text)
    text = text.replace(f'bind = "127.0.0.1:{port}"', f'bind = "0.0.0.0:{port}"')
    return text.replace(f'upstream = "http://127.0.0.1:{lab.backend_port}"', f'upstream = "http://127.0.0.1:{port}"')


def _crl_state(content: bytes | None, directory: str = "state") -> Callable[[LabLayout, str, Path], str]:
    """`client_certificates.crl_state` in `tmp/directory` (made if `content` is not None, the file holding it)."""

    def edit(lab: LabLayout, text: str, tmp: Path) -> str:
        state = tmp / directory / "crl-state.json"
        if content is not None:
            state.parent.mkdir(mode=0o700)
            state.write_bytes(content)
            state.chmod(0o600)
        return text.replace('revocation = "require"\n', f'revocation = "require"\ncrl_state = "{state}"\n', 1)

    return edit


def _identity(line: str) -> Callable[[LabLayout, str, Path], str]:
    """`line` added to the lab's [identity] table."""
    return _replace('source = "san-upn"\n', f'source = "san-upn"\n{line}\n')


LONG = "x" * 300  # a file name over NAME_MAX (255 bytes): the system refuses it (ENAMETOOLONG)
CATALOGUE = [
    ("missing file", _replace('certificate = "{lab.pki_dir}/server-chain.pem"', 'certificate = "{tmp}/nope.pem"'),
     "listener.certificate", "file not found"),
    ("name too long", _replace('certificate = "{lab.pki_dir}/server-chain.pem"', f'certificate = "{{tmp}}/{LONG}"'),
     "listener.certificate", "File name too long"),
    ("CA bundle name too long",
     _append(f'\n[[routes]]\nprefix = "/ews/"\nupstream = "https://cas.lab.test"\nca_bundle = "{LONG}"\n'),
     "routes[1].ca_bundle", "File name too long"),
    ("unknown key", _replace("[listener]\n", '[listener]\ncolour = "blue"\n'), "listener.colour", "unknown key"),
    ("a route's key above its header", _replace("[[routes]]\n", 'prefix = "/owa/"\n[[routes]]\n'), "kerberos.prefix",
     "unknown key (a key of [[routes]]: written above its [[routes]] header?)"),
    ("bad upstream", _append('\n[[routes]]\nprefix = "/ews/"\nupstream = "ftp://cas/x"\n'),
     "routes[1].upstream", "expected http(s)://host[:port]"),
    ("certificate and key swapped", _swapped, "listener.certificate",
     "holds a private key and no certificate: listener.certificate and listener.private_key swapped?"),
    ("key of another certificate", _replace("{lab.pki_dir}/server.key", "{lab.pki_dir}/users/alice.key"),
     "listener.private_key", "does not match the certificate 'CN=proxy.lab.test'"),
    ("anchor that is no certificate", _replace('trust_anchors = ["{lab.pki_dir}/root.pem"]',
                                                'trust_anchors = ["{lab.pki_dir}/crls.pem"]'),
     "client_certificates.trust_anchors[0]", "not a PEM or DER certificate"),
    ("leaf as an anchor", _replace('trust_anchors = ["{lab.pki_dir}/root.pem"]',
                                    'trust_anchors = ["{lab.pki_dir}/root.pem", "{lab.pki_dir}/users/bob.pem"]'),
     "client_certificates.trust_anchors[1]", "'CN=bob' is not a CA certificate"),
    ("intermediate from another PKI", _replace('"{lab.pki_dir}/issuing.pem"]',
                                                '"{lab.pki_dir}/issuing.pem", "{lab.pki_dir}/rogue/issuing.pem"]'),
     "client_certificates.intermediates[1]", "is not issued by any configured trust anchor"),
    ("CRL file that holds no CRL", _replace('crls = ["{lab.pki_dir}/crls.pem"]', 'crls = ["{lab.pki_dir}/root.pem"]'),
     "client_certificates.crls[0]", "without a 'BEGIN X509 CRL' block"),
    ("CRL signed with another key", _forged_crl, "client_certificates.crls[0]", "signature does not verify"),
    ("CRL file over the size limit", _oversized_crl, "client_certificates.crls[0]", "more than 67108864 bytes"),
    ("stale CRL", _stale_crl, "client_certificates.crls[0]", "is stale"),
    ("CRL of another CA", _other_ca_crl, "client_certificates.crls[1]",
     "CRL issuer 'CN=Other PKI CA' is not in the trust list: take it out of client_certificates.crls, or add its CA "
     "to client_certificates.trust_anchors or intermediates"),
    ("only the intermediate as the anchor", _replace(
        'trust_anchors = ["{lab.pki_dir}/root.pem"]\nintermediates = ["{lab.pki_dir}/issuing.pem"]',
        'trust_anchors = ["{lab.pki_dir}/issuing.pem"]'), "client_certificates.crls[0]",
     "CRL issuer 'CN=Lab Root CA' is not in the trust list: take it out of client_certificates.crls, or add its CA"),
    ("keytab without the principal", _replace("{lab.proxy_keytab}", "{lab.backend_keytab}"),
     "kerberos.keytab", "holds no key for HTTP/proxy.lab.test@LAB.TEST (it holds: HTTP/cas.lab.test@LAB.TEST)"),
    ("principal's realm in lower case", _replace('principal = "HTTP/proxy.lab.test@LAB.TEST"',
                                                 'principal = "HTTP/proxy.lab.test@lab.test"'),
     "kerberos.keytab", 'compares names with their case, and the keytab spells it HTTP/proxy.lab.test@LAB.TEST: '
     'set kerberos.principal = "HTTP/proxy.lab.test@LAB.TEST"'),
    ("keytab that is no keytab", _replace("{lab.proxy_keytab}", "{lab.pki_dir}/root.pem"),
     "kerberos.keytab", "not a keytab"),
    ("admin off loopback without TLS", _append('\n[admin]\nbind = "0.0.0.0:9443"\n'), "admin.bind", "is not loopback"),
    ("route back to the gateway", lambda lab, text, tmp: text.replace(
        f'upstream = "http://127.0.0.1:{lab.backend_port}"', f'upstream = "http://127.0.0.1:{_gateway_port(text)}"'),
     "routes[0].upstream", "the gateway's own listener"),
    ("route to the admin listener", _admin_route, "routes[1].upstream", "the admin listener"),
    ("CRL state in a directory not made", _crl_state(None), "client_certificates.crl_state", "directory not found"),
    ("damaged CRL state file", _crl_state(b"{"), "client_certificates.crl_state", "crl-state.json is damaged"),
    ("directory CA file in DER", _directory_ca_der, "directory.ca_file", "not a PEM bundle of certificates"),
    ("directory CA file over the size limit", _oversized_directory_ca, "directory.ca_file",
     f"more than {MAX_CA_FILE_BYTES} bytes"),
    ("directory CA file that holds no certificate", _append(DIRECTORY.replace("{ca}", "{lab.pki_dir}/crls.pem")),
     "directory.ca_file", "not a PEM bundle of certificates"),
    ("route back to a gateway bound on every address", _wildcard_loop, "routes[0].upstream",
     "the gateway's own listener"),
    ("a realm_map realm in another case than the gateway's", _identity('realm_map = {{ "corp.example" = "lab.test" }}'),
     "identity.realm_map.corp.example", "'lab.test' is kerberos.principal's realm 'LAB.TEST' in another case: Kerberos "
     "realm names are case-sensitive"),
    ("a default realm in another case than the gateway's", _identity('default_realm = "lab.test"'),
     "identity.default_realm", "'lab.test' is kerberos.principal's realm 'LAB.TEST' in another case"),
    ("realm_map written the wrong way round", _identity('realm_map = {{ "LAB.TEST" = "corp.example" }}'),
     "identity.realm_map.LAB.TEST", 'written the wrong way round? { "LAB.TEST" = "corp.example" } maps users whose '
     'UPN ends in @lab.test to the realm \'corp.example\'; a key is a UPN suffix (case ignored: write it in lower '
     'case), its value the realm: { "corp.example" = "LAB.TEST" }'),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "key", "message"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_each_broken_configuration_is_one_line_naming_key_and_file(
    lab: LabLayout, tmp_path: Path, edit: Callable[[LabLayout, str, Path], str], key: str, message: str
) -> None:
    """One problem in an otherwise sound lab configuration gives exactly one line: its key, why, the file."""
    path = tmp_path / "gateway.toml"
    path.write_text(edit(lab, lab_config(lab, port=free_port()), tmp_path))
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ")
    assert message in problems[0]
    assert problems[0].endswith(f"(in {path})")


def test_the_lab_configuration_is_sound(lab: LabLayout, tmp_path: Path) -> None:
    """The lab's own configuration: exit 0 and an ok line naming the file."""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port()))
    res = _cli(path)
    assert res.returncode == 0, res
    assert res.stdout.strip() == f"{path}: ok (1 route(s))"


def test_a_directory_ca_file_of_pem_certificates_is_sound(lab: LabLayout, tmp_path: Path) -> None:
    """`directory.ca_file` naming the lab's root in PEM: no problem (DER or no certificate are, in CATALOGUE)."""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port()) + DIRECTORY.format(ca=lab.pki_dir / "root.pem"))
    assert _problems(path) == []


def _run(lab: LabLayout, config: Path) -> subprocess.CompletedProcess[str]:
    """`kcd-proxy run` with `config`, to its end (a refused configuration ends it at once)."""
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    env = {**os.environ, **lab.env()}
    return subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, cwd=REPO, env=env, check=False)


def test_a_der_directory_ca_file_is_refused_when_the_gateway_starts(lab: LabLayout, tmp_path: Path) -> None:
    """`directory.ca_file` in DER: `run` refuses (exit 2) naming the key and the file; it started, and every ldaps://
    look-up then failed as the directory being unavailable (OpenLDAP's TLS loads no certificate from DER)."""
    config = tmp_path / "gateway.toml"
    config.write_text(_directory_ca_der(lab, lab_config(lab, port=free_port()), tmp_path))
    started = _run(lab, config)
    assert started.returncode == 2, started
    assert f"directory.ca_file: {tmp_path / 'root.der'}: not a PEM bundle of certificates" in started.stderr


def test_a_certificate_and_key_swapped_are_named_as_such_when_the_gateway_starts(
    lab: LabLayout, tmp_path: Path
) -> None:
    """`listener.certificate` and `listener.private_key` swapped: `run` refuses (exit 2) saying so; it said only
    "OpenSSL refuses KEY with listener.private_key CHAIN: [SSL] PEM lib (_ssl.c:3905)"."""
    config = tmp_path / "gateway.toml"
    config.write_text(_swapped(lab, lab_config(lab, port=free_port()), tmp_path))
    started = _run(lab, config)
    assert started.returncode == 2, started
    wanted = "holds a private key and no certificate: listener.certificate and listener.private_key swapped?"
    assert f"listener.certificate: {lab.pki_dir / 'server.key'}: {wanted}" in started.stderr, started.stderr


def test_the_labs_configuration_behind_a_balancer_is_sound_without_a_warning(lab: LabLayout, tmp_path: Path) -> None:
    """`gateway-balanced.toml` as `lab up` writes it (natively: HAProxy on 127.0.0.1): exit 0, the ok line, and no
    warning. It trusted PROXY headers from all of 127.0.0.0/8, which check-config rightly warned of on the lab's own
    file (a device bound to 127.0.0.3, as the balancer tests' is, could name any address going around the balancer)."""
    path = tmp_path / "gateway-balanced.toml"
    path.write_text(runner.gateway_config(lab, gateway_port=free_port(), admin=True, behind_balancer=True))
    res = _cli(path)
    assert res.returncode == 0, res
    assert res.stdout.strip() == f"{path}: ok (1 route(s))"
    assert res.stderr == "", res.stderr


def _behind_a_balancer(
    lab: LabLayout, tmp_path: Path, blocks: str, *, extra: str = ""
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """check-config on the lab's configuration with `proxy_protocol` on and `trusted_proxies = [blocks]` (and
    `extra`): the file and the command's result, which must be exit 0 and the ok line alone on stdout."""
    port = free_port()
    bind = f'bind = "127.0.0.1:{port}"\n'
    path = tmp_path / "gateway.toml"
    text = lab_config(lab, port=port, extra=extra)
    path.write_text(text.replace(bind, f"{bind}proxy_protocol = true\ntrusted_proxies = [{blocks}]\n"))
    res = _cli(path)
    assert res.returncode == 0, res
    assert res.stdout.strip() == f"{path}: ok (1 route(s))"
    return path, res


@pytest.mark.parametrize("mode", ["basic", "certificate-or-basic", "certificate"])
def test_basic_behind_a_balancer_is_ok_with_a_warning_to_size_the_limit_per_gateway(
    lab: LabLayout, tmp_path: Path, mode: str
) -> None:
    """Basic sign-ins behind a balancer (proxy_protocol): exit 0, the ok line alone on stdout, and on stderr a warning
    naming basic_failures_per_user, the limit and the gateways' multiple of it; certificate mode, no warning."""
    extra = f'\n[authentication]\nmode = "{mode}"\nbasic_failures_per_user = 3\n'
    path, res = _behind_a_balancer(lab, tmp_path, '"10.0.1.0/24"', extra=extra)
    if mode == "certificate":
        assert "basic_failures_per_user" not in res.stderr, res.stderr
        return
    warning = next(line for line in res.stderr.splitlines() if line.startswith("warning: "))
    assert warning.startswith("warning: authentication.basic_failures_per_user: behind a balancer"), warning
    assert "N x 3" in warning, warning
    assert warning.endswith(f"(in {path})"), warning


@pytest.mark.parametrize(
    ("blocks", "wide"),
    [
        ('"10.0.1.0/24", "10.0.0.0/8"', "10.0.0.0/8"),
        ('"192.0.2.10/32", "2001:db8::/32"', "2001:db8::/32"),
        ('"10.1.0.0/16", "2001:db8:1::/48", "10.0.1.7/32"', None),
    ],
)
def test_a_wide_trusted_proxies_block_is_ok_with_a_warning(
    lab: LabLayout, tmp_path: Path, blocks: str, wide: str | None
) -> None:
    """A `listener.trusted_proxies` block wider than /16 (IPv4) or /48 (IPv6): exit 0, the ok line, and on stderr a
    warning naming the key's entry and the block, saying every address in it may write any client address into a
    PROXY header; /16, /48 and narrower: no such warning. Failed before: only /0 was refused, a /8 passed silently."""
    path, res = _behind_a_balancer(lab, tmp_path, blocks)
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: listener.trusted_proxies")]
    if wide is None:
        assert warned == [], res.stderr
        return
    (warning,) = warned
    assert warning.startswith("warning: listener.trusted_proxies[1]: "), warning
    assert wide in warning, warning
    assert "any client address" in warning, warning
    assert warning.endswith(f"(in {path})"), warning


@pytest.mark.parametrize(
    ("blocks", "written"),
    [
        ('"10.0.1.0"', "10.0.1.0"),
        ('"10.0.1.7", "2001:db8:1::"', "2001:db8:1::"),
        ('"10.0.1.7", "10.0.1.0/28", "10.0.1.0/32", "2001:db8:1::5"', None),
    ],
)
def test_a_balancers_subnet_written_without_its_prefix_is_ok_with_a_warning(
    lab: LabLayout, tmp_path: Path, blocks: str, written: str | None
) -> None:
    """A `listener.trusted_proxies` entry written as a subnet's network address without its prefix ("10.0.1.0" for
    the balancers' 10.0.1.0/28) is that one address, which no balancer has: every connection from the balancers would
    be refused (`untrusted_peer`). check-config says ok and warns naming the entry and the prefix to add; a balancer's
    own address, a block with its prefix and an explicit /32 get no such warning. It said ok silently."""
    path, res = _behind_a_balancer(lab, tmp_path, blocks)
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: listener.trusted_proxies")]
    if written is None:
        assert warned == [], res.stderr
        return
    (warning,) = warned
    index = blocks.split(", ").index(f'"{written}"')
    assert warning.startswith(f"warning: listener.trusted_proxies[{index}]: {written} has no prefix"), warning
    assert "write the subnet with its prefix" in warning, warning
    assert warning.endswith(f"(in {path})"), warning


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('realm_map = { "corp.example" = "lab.test" }', "identity.realm_map.corp.example"),
        ('default_realm = "Lab.Test"', "identity.default_realm"),
        ('realm_map = { "corp.example" = "LAB.TEST" }\ndefault_realm = "LAB.TEST"', None),
    ],
)
def test_a_realm_in_another_case_than_the_gateways_is_a_problem_naming_the_key(
    lab: LabLayout, tmp_path: Path, line: str, key: str | None
) -> None:
    """A realm in `identity.realm_map` or `identity.default_realm` that is the gateway's own (kerberos.principal's) in
    another case: Kerberos realm names are compared with their case, and krb5.conf has no such realm, so every user
    mapped to it was 503 "unreachable; try again shortly" and check-config said ok silently. Now exit 1 with one line
    naming the key and the realm to write; the realm in capitals is ok with no word of realms."""
    path = tmp_path / "gateway.toml"
    text = lab_config(lab, port=free_port())
    path.write_text(text.replace('source = "san-upn"\n', f'source = "san-upn"\n{line}\n', 1))
    res = _cli(path)
    if key is None:
        assert res.returncode == 0, res
        assert "realm" not in res.stderr, res.stderr
        return
    assert res.returncode == 1, res
    (problem,) = res.stdout.splitlines()
    assert problem.startswith(f"{key}: "), problem
    assert "is kerberos.principal's realm 'LAB.TEST' in another case" in problem, problem
    assert "(Active Directory's: 'LAB.TEST')" in problem, problem
    assert problem.endswith(f"(in {path})"), problem


def test_an_admin_ca_that_is_a_device_trust_anchor_is_ok_with_a_warning(lab: LabLayout, tmp_path: Path) -> None:
    """`admin.client_ca` holding a CA of the device trust list, with a subject on `admin.allowed_clients`: any
    device certificate under it with that subject reads the admin listener. check-config says ok and warns naming
    admin.client_ca and the shared CA; with an operators' CA of its own (openssl CLI), or fingerprints only, no
    warning."""
    admin = tmp_path / "admin-ca.pem"
    admin.write_bytes((lab.pki_dir / "root.pem").read_bytes() + (lab.pki_dir / "issuing.pem").read_bytes())
    key, own = tmp_path / "ops-ca.key", tmp_path / "ops-ca.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "5"]
    argv += ["-subj", "/CN=Operators CA", "-addext", "basicConstraints=critical,CA:TRUE", "-keyout", str(key)]
    subprocess.run([*argv, "-out", str(own)], check=True, capture_output=True)
    fingerprint = "ab" * 32

    def warned(ca: Path, allowed: str) -> list[str]:
        extra = f"""
[admin]
bind = "127.0.0.1:{free_port()}"
certificate = "{lab.pki_dir / "server-chain.pem"}"
private_key = "{lab.pki_dir / "server.key"}"
client_ca = "{ca}"
allowed_clients = [{allowed}]
"""
        path = tmp_path / "gateway.toml"
        path.write_text(lab_config(lab, port=free_port(), extra=extra))
        res = _cli(path)
        assert res.returncode == 0, res
        assert res.stdout.strip() == f"{path}: ok (1 route(s))"
        return [line for line in res.stderr.splitlines() if line.startswith("warning: admin.")]

    (warning,) = warned(admin, '"CN=ops"')
    assert warning.startswith("warning: admin.client_ca: "), warning
    assert "any device certificate" in warning, warning
    assert "admin.allowed_clients" in warning, warning
    assert "CN=Lab Root CA" in warning, warning
    assert warned(own, '"CN=ops"') == []
    assert warned(admin, f'"{fingerprint}"') == []


def test_a_restriction_whose_issuer_is_no_configured_ca_is_ok_with_a_warning(lab: LabLayout, tmp_path: Path) -> None:
    """A `[[client_certificates.restrictions]]` rule whose `issuer` is none of the configured CAs can admit no
    certificate (chains are built from those CAs alone): check-config says ok and warns naming the rule's key, its
    issuer and the configured CAs; a rule naming the lab's issuing CA (in another case) or its root is not named.
    Failed before: config/example.toml's rule (issuer "CN=Corp Issuing CA,...") copied beside a PKI of one's own
    passed check-config and doctor silently, and every device was refused with 403."""
    extra = """
[[client_certificates.restrictions]]
name = "managed devices"
issuer = "CN=Corp Issuing CA,DC=corp,DC=example"

[[client_certificates.restrictions]]
name = "lab devices"
issuer = "CN=lab issuing ca"

[[client_certificates.restrictions]]
issuer = "CN=Lab Root CA"
"""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port(), extra=extra))
    res = _cli(path)
    assert res.returncode == 0, res
    assert res.stdout.strip() == f"{path}: ok (1 route(s))"
    warned = [line for line in res.stderr.splitlines() if line.startswith("warning: client_certificates.restrictions")]
    (warning,) = warned
    assert warning.startswith("warning: client_certificates.restrictions[0].issuer: "), warning
    assert "'CN=Corp Issuing CA,DC=corp,DC=example'" in warning, warning
    assert "managed devices" in warning, warning
    assert "admits no certificate" in warning, warning
    assert "CN=Lab Issuing CA" in warning, warning
    assert warning.endswith(f"(in {path})"), warning


def test_admin_crls_must_be_signed_by_an_admin_client_ca(lab: LabLayout, tmp_path: Path) -> None:
    """`[admin] crls` are checked as the devices' are, against `admin.client_ca`: the issuing CA's CRL under an
    admin CA of the root alone is a problem naming admin.crls; `crls` without `client_ca` is a configuration error."""
    crl = write_crl(tmp_path / "issuing.crl", load_ca(lab.pki_dir, "issuing"))
    admin = f"""
[admin]
bind = "127.0.0.1:{free_port()}"
certificate = "{lab.pki_dir / "server-chain.pem"}"
private_key = "{lab.pki_dir / "server.key"}"
client_ca = "{lab.pki_dir / "root.pem"}"
allowed_clients = ["{"ab" * 32}"]
crls = ["{crl}"]
"""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port(), extra=admin))
    assert [p for p in _problems(path) if p.startswith("admin.crls: ")], _problems(path)
    path.write_text(lab_config(lab, port=free_port(), extra=admin.replace(str(lab.pki_dir / "root.pem"), "")))
    assert any(p.startswith("admin.crls: ") and "admin.client_ca" in p for p in _problems(path)), _problems(path)


def test_the_command_exits_1_with_one_line_per_problem(lab: LabLayout, tmp_path: Path) -> None:
    """Several problems at once: exit 1 and every one of them on stdout, one per line, nothing else."""
    text = lab_config(lab, port=free_port())
    text = text.replace(str(lab.pki_dir / "server.key"), str(lab.pki_dir / "users" / "alice.key"))
    text = text.replace(str(lab.proxy_keytab), str(lab.backend_keytab))
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    res = _cli(path)
    assert res.returncode == 1, res
    lines = res.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["listener.private_key", "kerberos.keytab"]
    assert all(line.endswith(f"(in {path})") for line in lines)


def test_a_configuration_that_is_not_toml_exits_1_naming_the_file(tmp_path: Path) -> None:
    """Broken TOML is reported by the loader: exit 1, the file and where it breaks."""
    path = tmp_path / "gateway.toml"
    path.write_text("[listener\n")
    res = _cli(path)
    assert res.returncode == 1
    assert res.stdout.startswith(f"{path}: not valid TOML")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(config_module.MAX_CONFIG_BYTES + 1)  # sparse: costs no disk


def _deep(path: Path) -> None:
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_fifo, "not a regular file"),
        (_sparse, f"more than {1024 * 1024} bytes"),
        (_deep, "nested too deeply"),
    ],
    ids=["fifo", "huge", "deep"],
)
def test_a_hostile_configuration_file_is_one_line_not_a_hang_or_a_traceback(
    tmp_path: Path, make: Callable[[Path], None], problem: str
) -> None:
    """A configuration that is a FIFO nobody writes to (check-config waited for good), larger than any real one
    (read whole into memory: /dev/zero never ends), or nested 5,000 arrays deep (tomllib's RecursionError came
    out as a 200 KB traceback): exit 1 and one line naming the file and why."""
    path = tmp_path / "gateway.toml"
    make(path)
    res = _cli(path)
    assert res.returncode == 1, res
    assert res.stdout.startswith(f"cannot read {path}: ") or res.stdout.startswith(f"{path}: "), res.stdout
    assert problem in res.stdout, res.stdout
    assert len(res.stdout.splitlines()) == 1
    assert "Traceback" not in res.stdout + res.stderr


def test_a_crl_path_naming_a_device_or_a_fifo_says_so(lab: LabLayout, tmp_path: Path) -> None:
    """`client_certificates.crls` naming /dev/zero or a FIFO is refused by name and why (it said "file not found")."""
    fifo = tmp_path / "crl.fifo"
    os.mkfifo(fifo)
    for where in (Path("/dev/zero"), fifo):
        path = tmp_path / "gateway.toml"
        path.write_text(lab_config(lab, port=free_port()).replace(str(lab.pki_dir / "crls.pem"), str(where)))
        assert _problems(path) == [f"client_certificates.crls[0]: not a regular file: {where} (in {path})"]


def test_a_route_upstream_with_a_password_is_refused_by_check_config_run_and_a_reload(
    lab: LabLayout, tmp_path: Path
) -> None:
    """`upstream = "http://svc:Hunter2pw@host"`: a backend takes Negotiate (or the client's Basic), never a URL's
    password, which was accepted and then shown in every trace and summary line. check-config, `run` and a SIGHUP
    reload refuse it naming `routes[1].upstream`, and the password is in none of their output or the log."""
    port = free_port()
    route = '\n[[routes]]\nprefix = "/pw/"\nupstream = "{upstream}"\nspn = "HTTP/cas.lab.test"\n'
    bad = lab_config(lab, port=port, extra=route.format(upstream=f"http://svc:Hunter2pw@127.0.0.1:{lab.backend_port}"))
    config = tmp_path / "bad.toml"
    config.write_text(bad)
    checked = _cli(config)
    assert checked.returncode != 0
    assert "routes[1].upstream" in checked.stdout + checked.stderr
    started = _run(lab, config)
    assert started.returncode == 2, started
    assert "routes[1].upstream" in started.stderr
    gw = start_gateway(
        lab, tmp_path / "gw", lab_config(lab, port=port, extra=route.format(upstream="http://127.0.0.1:1"))
    )
    try:
        gw.mark()
        gw.config_path.write_text(bad.replace(f"127.0.0.1:{port}", f"127.0.0.1:{gw.port}"))
        gw.proc.send_signal(signal.SIGHUP)
        refused = gw.wait_event("reload_refused")
        assert "routes[1].upstream" in str(refused)
    finally:
        gw.stop()
    for shown in (checked.stdout + checked.stderr, started.stdout + started.stderr, gw.log_path.read_text()):
        assert "Hunter2pw" not in shown


def test_a_realm_in_small_letters_is_a_warning_naming_the_key(lab: LabLayout, tmp_path: Path) -> None:
    """`realm_map = { "corp.example" = "corp.example" }` (a realm no other key names): exit 0, the ok line, and one
    warning on stderr naming the key, that realm names are case-sensitive, AD's in capitals, MIT's may be small."""
    path = tmp_path / "gateway.toml"
    edit = _identity('realm_map = {{ "corp.example" = "corp.example" }}')
    path.write_text(edit(lab, lab_config(lab, port=free_port()), tmp_path))
    res = _cli(path)
    assert (res.returncode, res.stdout.strip()) == (0, f"{path}: ok (1 route(s))"), res
    assert res.stderr == (
        "warning: identity.realm_map.corp.example: the realm 'corp.example' is in small letters: Kerberos realm names "
        "are case-sensitive, and Active Directory's is its domain in capitals ('CORP.EXAMPLE'); keep it only if your "
        "KDC's realm is written in small letters (MIT allows it: its krb5.conf [realms] and kdc.conf name it so) "
        f"(in {path})\n"
    ), res.stderr


def test_a_realm_in_another_case_than_the_gateways_is_refused_when_the_gateway_starts(
    lab: LabLayout, tmp_path: Path
) -> None:
    """`realm_map = { "corp.example" = "lab.test" }` beside the KDC's LAB.TEST: `run` refuses (exit 2) naming the key;
    it started, and every request of those users was refused at kerberos ("no Kerberos realm serves ...")."""
    config = tmp_path / "gateway.toml"
    edit = _identity('realm_map = {{ "corp.example" = "lab.test" }}')
    config.write_text(edit(lab, lab_config(lab, port=free_port()), tmp_path))
    started = _run(lab, config)
    assert started.returncode == 2, started
    assert "identity.realm_map.corp.example: 'lab.test' is kerberos.principal's realm 'LAB.TEST'" in started.stderr
