"""Hand-minted certificates against the running gateway: the names a hostile or careless CA can write.

Each certificate is made with the openssl CLI from the lab's issuing CA (so the chain is good and only the
names are crafted) and presented by curl. The gateway reads `source = ["san-upn", "san-email"]`: a UPN, when
the certificate has one, is the only name it may use. Nothing may reach the backend as a user the
certificate does not name exactly: each refusal is 403 at the identity stage, and the backend sees nobody.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import write_crl
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.pem import load_cert, load_key

UPN = "otherName:1.3.6.1.4.1.311.20.2.3"


@pytest.fixture(scope="module")
def partner(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A partner CA under the lab's root, made with the openssl CLI, whose nameConstraints permit e-mail
    addresses of partner.test only; its (empty, current) CRL beside it. Returns the path without suffix."""
    base = tmp_path_factory.mktemp("partner") / "partner"
    ext = base.with_suffix(".cnf")
    ext.write_text(
        "[v3]\nbasicConstraints = critical, CA:TRUE, pathlen:0\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "nameConstraints = critical, permitted;email:partner.test, permitted;email:.partner.test\n"
    )
    run = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*run, "-keyout", f"{base}.key", "-subj", "/CN=Partner CA", "-out", f"{base}.csr"], check=True)
    sign = ["openssl", "x509", "-req", "-in", f"{base}.csr", "-CA", str(lab.pki_dir / "root.pem"), "-days", "2"]
    sign += ["-CAkey", str(lab.pki_dir / "root.key"), "-set_serial", f"0x{secrets.token_hex(8)}"]
    subprocess.run([*sign, "-extfile", str(ext), "-extensions", "v3", "-out", f"{base}.pem"], check=True)
    write_crl(Path(f"{base}.crl.pem"), (load_cert(Path(f"{base}.pem")), load_key(Path(f"{base}.key"))))
    return base


def partner_gateway(lab: LabLayout, partner: Path, directory: Path, identity: str) -> Gateway:
    """The lab's gateway with `identity` as its `[identity]` source lines, trusting the partner CA and its CRL too."""
    text = lab_config(lab, port=free_port()).replace('source = "san-upn"', identity, 1)
    issuing, crls = f'"{lab.pki_dir / "issuing.pem"}"', f'"{lab.pki_dir / "crls.pem"}"'
    text = text.replace(f"intermediates = [{issuing}]", f'intermediates = [{issuing}, "{partner}.pem"]', 1)
    text = text.replace(f"crls = [{crls}]", f'crls = [{crls}, "{partner}.crl.pem"]', 1)
    return start_gateway(lab, directory, text)


@pytest.fixture(scope="module")
def gw(lab: LabLayout, partner: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The lab's gateway reading the UPN, then the e-mail address when there is no UPN; trusting the partner CA
    too, whose users' UPN suffix partner.test is mapped to LAB.TEST."""
    identity = 'source = ["san-upn", "san-email"]\nrealm_map = { "lab.test" = "LAB.TEST", "partner.test" = "LAB.TEST" }'
    gateway = partner_gateway(lab, partner, tmp_path_factory.mktemp("identity-attacks"), identity)
    yield gateway
    gateway.stop()


def mint(
    lab: LabLayout, directory: Path, san: str, cn: str = "crafted", ca: Path | None = None, subject: str = ""
) -> Path:
    """A client certificate from the lab's issuing CA (or the CA at `ca`, without suffix) with `san` as its
    subjectAltName (openssl CLI syntax) and the subject `/CN=<cn>` (or `subject`, openssl -subj syntax: a
    literal backslash is written twice); returns the path without suffix (`.pem` and `.key` beside it)."""
    base = directory / secrets.token_hex(4)
    ext = directory / f"{base.name}.cnf"
    ext.write_text(
        "[v3]\nbasicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n"
        f"extendedKeyUsage = clientAuth\nsubjectAltName = {san}\n"
    )
    run = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*run, "-keyout", f"{base}.key", "-subj", subject or f"/CN={cn}", "-out", f"{base}.csr"], check=True)
    issuer = ca or lab.pki_dir / "issuing"
    sign = ["openssl", "x509", "-req", "-in", f"{base}.csr", "-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key"]
    sign += ["-set_serial", f"0x{secrets.token_hex(8)}", "-days", "1"]
    subprocess.run([*sign, "-extfile", str(ext), "-extensions", "v3", "-out", f"{base}.pem"], check=True)
    return base


def curl_as(lab: LabLayout, gw: Gateway, cert: Path) -> tuple[int, str]:
    argv = ["curl", "-sS", "--max-time", "60", "--cacert", str(lab.pki_dir / "root.pem")]
    argv += ["--cert", f"{cert}.pem", "--key", f"{cert}.key", "-w", "\n%{http_code}", f"{gw.url}/owa/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body


def request_line(gw: Gateway, cert: Path) -> dict[str, Any]:
    """The summary line of the request made with `cert` (by its serial), polled for: an earlier test's line may
    still land after `mark`."""
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", f"{cert}.pem"], capture_output=True, text=True)
    serial = format(int(out.stdout.strip().partition("=")[2], 16), "x")
    return gw.wait_for("request", lambda e: e.get("cert_serial") == serial, what=f"cert_serial {serial}")


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (f"{UPN};UTF8:,email:bob@lab.test", "certificate UPN is empty"),  # never bob, by his e-mail
        (f"{UPN};UTF8:alice@lab.test,{UPN};UTF8:bob@lab.test", "carries 2 UPNs"),
        (f"{UPN};IA5:alice@lab.test,email:bob@lab.test", "not a DER UTF8String"),
        (f"{UPN};UTF8:alice@evil.test@lab.test", "expected exactly one '@'"),
        (f"{UPN};UTF8:krbtgt/LAB.TEST@lab.test", "separates or escapes Kerberos name components"),
        (f"{UPN};UTF8:alice@lab.test.", "empty label"),
    ],
)
def test_a_crafted_upn_is_refused_at_the_identity_stage(
    lab: LabLayout, gw: Gateway, tmp_path: Path, san: str, reason: str
) -> None:
    """A certificate whose UPN is empty, doubled, of the wrong type, or not a plain user name is 403 at the
    identity stage with the reason, and no request reaches the backend (the summary line has no backend time)."""
    cert = mint(lab, tmp_path, san)
    gw.mark()
    status, body = curl_as(lab, gw, cert)
    assert status == 403, body
    assert reason in body
    line = request_line(gw, cert)
    assert (line["status"], line["refused_stage"]) == (403, "identity"), line
    assert "backend" not in line["ms"]
    assert not line.get("principal"), line


def test_an_e_mail_address_is_used_only_without_a_upn(lab: LabLayout, gw: Gateway, tmp_path: Path) -> None:
    """The control: a certificate with only an e-mail address is served as that address's user."""
    status, body = curl_as(lab, gw, mint(lab, tmp_path, "email:bob@lab.test"))
    assert status == 200, body
    assert '"principal": "bob@LAB.TEST"' in body


def test_a_partner_ca_cannot_name_a_user_outside_its_name_constraints(
    lab: LabLayout, gw: Gateway, partner: Path, tmp_path: Path
) -> None:
    """The partner CA may name e-mail addresses of partner.test only. Its certificate with the UPN alice@lab.test
    validates (RFC 5280 leaves a UPN unconstrained by e-mail subtrees) but is 403 at the identity stage, never
    alice; its own user's UPN bob@partner.test is served (realm_map sends partner.test to LAB.TEST)."""
    gw.mark()
    cert = mint(lab, tmp_path, f"{UPN};UTF8:alice@lab.test", ca=partner)
    status, body = curl_as(lab, gw, cert)
    assert status == 403, body
    assert "the UPN alice@lab.test is outside the name constraints of CA 'CN=Partner CA'" in body
    assert request_line(gw, cert)["refused_stage"] == "identity"
    status, body = curl_as(lab, gw, mint(lab, tmp_path, f"{UPN};UTF8:bob@partner.test", ca=partner))
    assert status == 200, body
    assert '"principal": "bob@LAB.TEST"' in body


# -- ambiguous names, and names that are not plain for their source --------------------------------------------


@pytest.fixture(scope="module")
def names_gw(lab: LabLayout, partner: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The lab's gateway reading the e-mail address, then the subject's common name (a certificate without an
    rfc822Name is read by its CN); realm_map names lab.test, default realm LAB.TEST; the partner CA trusted too."""
    identity = 'source = ["san-email", "subject-cn"]\nrealm_map = { "lab.test" = "LAB.TEST" }'
    gateway = partner_gateway(lab, partner, tmp_path_factory.mktemp("identity-names"), identity)
    yield gateway
    gateway.stop()


def refused_at_identity(gw: Gateway, cert: Path, status: int, body: str, reason: str) -> None:
    """403 at the identity stage with `reason`; `cert`'s request never reached the Kerberos or backend stages."""
    assert status == 403, body
    assert reason in body
    line = request_line(gw, cert)
    assert (line["status"], line["refused_stage"]) == (403, "identity"), line
    assert not {"kerberos", "backend"} & set(line["ms"]), line
    assert not line.get("principal"), line


DEVICE = "DNS:device.lab.test"  # a subjectAltName that names no user: the chain verifier wants one


@pytest.mark.parametrize(
    ("subject", "san", "reason"),
    [
        ("/CN=EVIL\\\\alice", DEVICE, "common name 'EVIL\\\\alice' is not a plain user name"),  # was alice
        ("/CN=bob/CN=alice", DEVICE, "certificate subject carries 2 common names; expected one"),  # was alice (last)
        ("/CN=alice@lab.test", DEVICE, "common name 'alice@lab.test' is not a plain user name"),  # was alice's UPN
        ("/CN=crafted", "email:bob@lab.test,email:alice@lab.test", "certificate carries 2 e-mail addresses"),  # bob
        ("/CN=crafted", "email:alice", "e-mail address 'alice' is not usable"),  # was alice, in the default realm
        ("/CN=crafted", "email:alice@evil.test", "domain 'evil.test' is not mapped to a realm"),  # was EVIL.TEST
    ],
)
def test_an_ambiguous_or_unplain_name_is_refused_for_its_source(
    lab: LabLayout, names_gw: Gateway, tmp_path: Path, subject: str, san: str, reason: str
) -> None:
    """A CN naming a domain (EVIL\\alice), two CNs, a CN with '@', two e-mail addresses, an address without '@' or
    in a domain no realm is configured for: 403 at the identity stage, never served as any user."""
    cert = mint(lab, tmp_path, san, subject=subject)
    names_gw.mark()
    status, body = curl_as(lab, names_gw, cert)
    refused_at_identity(names_gw, cert, status, body, reason)


def test_a_plain_common_name_and_a_configured_address_are_served(
    lab: LabLayout, names_gw: Gateway, tmp_path: Path
) -> None:
    """The controls: CN=alice alone is alice of the default realm; one address in lab.test is that user."""
    status, body = curl_as(lab, names_gw, mint(lab, tmp_path, DEVICE, subject="/CN=alice"))
    assert status == 200, body
    assert '"principal": "alice@LAB.TEST"' in body
    status, body = curl_as(lab, names_gw, mint(lab, tmp_path, "email:bob@lab.test", subject="/CN=alice"))
    assert status == 200, body
    assert '"principal": "bob@LAB.TEST"' in body


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (f"{UPN};UTF8:alice", "UPN 'alice' is not usable: expected exactly one '@', found 0"),  # was alice
        (f"{UPN};UTF8:LAB\\\\alice", "UPN 'LAB\\\\alice' is not usable"),  # was alice, by the domain LAB
    ],
)
def test_a_upn_without_its_suffix_is_refused(
    lab: LabLayout, gw: Gateway, tmp_path: Path, san: str, reason: str
) -> None:
    """A UPN is user@suffix: a bare name or a down-level DOMAIN\\user in the UPN otherName is 403 at identity,
    never a user of the default realm."""
    cert = mint(lab, tmp_path, san)
    gw.mark()
    status, body = curl_as(lab, gw, cert)
    refused_at_identity(gw, cert, status, body, reason)


def test_a_partner_ca_cannot_name_a_user_of_the_default_realm_by_common_name(
    lab: LabLayout, names_gw: Gateway, partner: Path, tmp_path: Path
) -> None:
    """The partner CA may name e-mail addresses of partner.test only. With subject-cn its CN=alice would be alice of
    the default realm: the CN is held to the CA's constraints as the address alice@lab.test (the default realm's
    domain), so it is 403 at identity; the lab CA's own CN=alice is served (the control)."""
    names_gw.mark()
    cert = mint(lab, tmp_path, DEVICE, subject="/CN=alice", ca=partner)
    status, body = curl_as(lab, names_gw, cert)
    why = "the common name alice (as alice@lab.test) is outside the name constraints of CA 'CN=Partner CA'"
    refused_at_identity(names_gw, cert, status, body, why)


@pytest.mark.parametrize(
    "local",
    ["\u00e9lise", "a" * 3000, "alice.", "ALICE", "*", "ali*", "alice)(krbPrincipalName=*"],
    ids=["non-ASCII", "3000 characters", "trailing dot", "upper case", "wildcard", "prefix", "filter"],
)
def test_a_upn_no_account_has_is_refused_as_that_user_and_costs_nobody_else(
    lab: LabLayout, gw: Gateway, tmp_path: Path, local: str
) -> None:
    """A plain UPN that names no account (non-ASCII, 3000 characters, a trailing dot, alice's name in upper case:
    MIT compares principal names exactly; LDAP filter syntax, which the KDC's LDAP back end escapes, so `*` or
    `ali*` matches no principal): 403 at the kerberos stage, never 502 or 503, nothing forwarded; and the KDC is not
    taken for gone: bob is served right after."""
    cert = mint(lab, tmp_path, f"{UPN};UTF8:{local}@lab.test")
    gw.mark()
    status, body = curl_as(lab, gw, cert)
    assert status == 403, body
    line = request_line(gw, cert)
    assert (line["status"], line["refused_stage"]) == (403, "kerberos"), line
    assert "backend" not in line["ms"]
    bob = mint(lab, tmp_path, f"{UPN};UTF8:bob@lab.test")
    status, body = curl_as(lab, gw, bob)
    assert status == 200, body
