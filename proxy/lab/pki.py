"""The lab PKI: a root, an issuing CA, the gateway's server certificate, users, and bad certificates.

Theory of operation: everything is made with `cryptography` (no openssl CLI), from EC P-256 keys, as a
small enterprise PKI would look:

    Lab Root CA (root.pem)                      rogue/root.pem     "CN=Lab Root CA", another key
      └─ Lab Issuing CA (issuing.pem, pathlen 0)  └─ rogue/issuing.pem "CN=Lab Issuing CA", another key
           ├─ server.pem  proxy.lab.test               └─ users/untrusted.pem (claims alice@lab.test)
           └─ users/<name>.pem  UPN <name>@lab.test

Each user certificate has a UPN otherName and an rfc822Name in its subjectAltName, clientAuth EKU and
a critical digitalSignature key usage; the variants each break exactly one thing (`USER_CERTIFICATES`).
CRLs: `crls.pem` holds the root's CRL and the issuing CA's CRL (both current: thisUpdate now-1h,
nextUpdate now+7d); `issuing.crl` and `root.crl` are the same CRLs in DER, to publish over HTTP at the
URLs the certificates name in their CRL distribution points (leaves: issuing.crl; the issuing CA:
root.crl). Publish only the .crl files: the directory also holds every private key.
`issuing-revoked.json` beside the CA is the issuing CA's record of what it revoked and its CRL number;
`revoke()` adds to it and reissues the CRLs.

OCSP: leaves name `ocsp_url` in their authorityInfoAccess. `ocsp.pem` is the issuing CA's delegated
responder (id-kp-OCSPSigning, id-pkix-ocsp-nocheck), and `index.txt` is the issuing CA's database in
`openssl ca` format, rewritten with every CRL, for `openssl ocsp -index` (`ocsp_responder_argv`):
every certificate the issuing CA issued is listed, valid or revoked; anything else is "unknown".

`make_pki` is idempotent: files that are still good for at least a day at `now` are kept (CRLs that
are due are reissued from the record); otherwise everything is made afresh.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from proxy.certs.revocation import load_crls
from proxy.identity.upn import upn_other_name

P12_PASSWORD = b"lab"
CRL_BASE_URL = "http://127.0.0.1:8082"  # LabLayout.crl_port
OCSP_URL = "http://127.0.0.1:8083"  # LabLayout.ocsp_port
OCSP_NAME = "Lab OCSP Responder"
ROOT_NAME = "Lab Root CA"
ISSUING_NAME = "Lab Issuing CA"
SERVER_NAMES = ("proxy.lab.test", "localhost")
CRL_LIFETIME = timedelta(days=7)
_MARGIN = timedelta(days=1)  # files good for less than this are remade
_HOUR = timedelta(hours=1)

Validity = Literal["valid", "expired", "notyet"]


@dataclass(frozen=True)
class UserSpec:
    """One lab user certificate: what it claims, and the one thing it gets wrong (if any)."""

    upn: str | None
    email: str
    eku: Literal["clientAuth", "serverAuth"] = "clientAuth"
    validity: Validity = "valid"
    rogue: bool = False  # issued by the rogue CA that copies the trusted CAs' names
    revoked: bool = False  # listed in the issuing CA's CRL
    urls: tuple[str, ...] = ()  # subjectAltName URIs (e.g. the SID URL tag:microsoft.com,2022-09-14:sid:...)


def _user(
    name: str,
    domain: str = "lab.test",
    *,
    eku: Literal["clientAuth", "serverAuth"] = "clientAuth",
    validity: Validity = "valid",
    rogue: bool = False,
    revoked: bool = False,
) -> UserSpec:
    address = f"{name}@{domain}"
    return UserSpec(upn=address, email=address, eku=eku, validity=validity, rogue=rogue, revoked=revoked)


USER_CERTIFICATES: dict[str, UserSpec] = {
    "alice": _user("alice"),
    "bob": _user("bob"),
    "carol": _user("carol"),
    "dave": _user("dave"),  # the KDC knows dave but has disabled him
    "revoked": _user("erin", revoked=True),
    "expired": _user("frank", validity="expired"),
    "notyet": _user("grace", validity="notyet"),
    "untrusted": _user("alice", rogue=True),  # a forged alice: right names, wrong keys
    "noupn": UserSpec(upn=None, email="heidi@lab.test"),
    "noclientauth": _user("ivan", eku="serverAuth"),
    "ghost": _user("ghost"),  # a user the KDC does not know
    "other-realm": _user("alice", domain="corp.example"),
    # Second devices of real users, for tests that revoke a certificate while it is in use: revocations
    # last as long as the lab, so each such test needs a certificate of its own.
    "alice-phone": _user("alice"),
    "bob-phone": _user("bob"),
}


@dataclass(frozen=True)
class Pki:
    """Where the lab PKI's files are (all under `directory`; `Pki.at` derives them)."""

    directory: Path
    root_cert: Path
    root_key: Path
    root_crl: Path  # DER, published at <crl_base_url>/root.crl
    issuing_cert: Path
    issuing_key: Path
    issuing_crl: Path  # DER, published at <crl_base_url>/issuing.crl
    revocation_record: Path  # JSON: the issuing CA's CRL number and revoked serials
    crls: Path  # PEM: the root's CRL, then the issuing CA's
    ocsp_cert: Path  # the issuing CA's delegated OCSP responder
    ocsp_key: Path
    ocsp_index: Path  # the issuing CA's database in `openssl ca` format, for `openssl ocsp -index`
    server_cert: Path
    server_key: Path
    server_chain: Path  # server certificate, then the issuing CA
    rogue_root_cert: Path
    rogue_root_key: Path
    rogue_issuing_cert: Path
    rogue_issuing_key: Path
    users: tuple[str, ...]

    @classmethod
    def at(cls, directory: Path) -> Pki:
        def path(name: str) -> Path:
            return directory / name

        return cls(
            directory=directory,
            root_cert=path("root.pem"),
            root_key=path("root.key"),
            root_crl=path("root.crl"),
            issuing_cert=path("issuing.pem"),
            issuing_key=path("issuing.key"),
            issuing_crl=path("issuing.crl"),
            revocation_record=path("issuing-revoked.json"),
            crls=path("crls.pem"),
            ocsp_cert=path("ocsp.pem"),
            ocsp_key=path("ocsp.key"),
            ocsp_index=path("index.txt"),
            server_cert=path("server.pem"),
            server_key=path("server.key"),
            server_chain=path("server-chain.pem"),
            rogue_root_cert=path("rogue/root.pem"),
            rogue_root_key=path("rogue/root.key"),
            rogue_issuing_cert=path("rogue/issuing.pem"),
            rogue_issuing_key=path("rogue/issuing.key"),
            users=tuple(USER_CERTIFICATES),
        )

    def user_cert(self, name: str) -> Path:
        return self._user(name, ".pem")

    def user_key(self, name: str) -> Path:
        return self._user(name, ".key")

    def user_p12(self, name: str) -> Path:
        """PKCS#12 with key, certificate and chain; password `P12_PASSWORD`."""
        return self._user(name, ".p12")

    def _user(self, name: str, suffix: str) -> Path:
        if name not in self.users:
            raise KeyError(f"no lab user certificate named {name!r}; there are {', '.join(self.users)}")
        return self.directory / "users" / f"{name}{suffix}"


def make_pki(directory: Path, *, now: datetime, crl_base_url: str = CRL_BASE_URL, ocsp_url: str = OCSP_URL) -> Pki:
    """Make (or keep, if still good for a day at `now` and naming these URLs) the lab PKI in `directory`."""
    pki = Pki.at(directory)
    if _certificates_current(pki, now) and _urls_current(pki, f"{crl_base_url}/issuing.crl", ocsp_url):
        if not _crls_current(pki, now):
            _write_crls(pki, now=now)
        return pki
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "users").mkdir(exist_ok=True)
    (directory / "rogue").mkdir(exist_ok=True)

    root_key, root = _make_ca(ROOT_NAME, None, now=now, crl_url=None)
    issuing_key, issuing = _make_ca(ISSUING_NAME, (root_key, root), now=now, crl_url=f"{crl_base_url}/root.crl")
    rogue_root_key, rogue_root = _make_ca(ROOT_NAME, None, now=now, crl_url=None)
    rogue_key, rogue = _make_ca(ISSUING_NAME, (rogue_root_key, rogue_root), now=now, crl_url=None)
    for cert_path, key_path, key, cert in (
        (pki.root_cert, pki.root_key, root_key, root),
        (pki.issuing_cert, pki.issuing_key, issuing_key, issuing),
        (pki.rogue_root_cert, pki.rogue_root_key, rogue_root_key, rogue_root),
        (pki.rogue_issuing_cert, pki.rogue_issuing_key, rogue_key, rogue),
    ):
        _write_pem(cert_path, [cert])
        _write_key(key_path, key)

    issuing_crl_url = f"{crl_base_url}/issuing.crl"
    ocsp_key = ec.generate_private_key(ec.SECP256R1())
    responder = _issue_leaf(
        OCSP_NAME,
        ocsp_key,
        (issuing_key, issuing),
        [x509.DNSName("ocsp.lab.test")],
        ExtendedKeyUsageOID.OCSP_SIGNING,
        not_before=now - _HOUR,
        not_after=now + timedelta(days=365),
        crl_url=None,
        ocsp_url=None,
    )
    _write_pem(pki.ocsp_cert, [responder])
    _write_key(pki.ocsp_key, ocsp_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    server_sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    server = _issue_leaf(
        SERVER_NAMES[0],
        server_key,
        (issuing_key, issuing),
        server_sans,
        ExtendedKeyUsageOID.SERVER_AUTH,
        not_before=now - _HOUR,
        not_after=now + timedelta(days=365),
        crl_url=issuing_crl_url,
        ocsp_url=ocsp_url,
    )
    _write_pem(pki.server_cert, [server])
    _write_pem(pki.server_chain, [server, issuing])
    _write_key(pki.server_key, server_key)

    revoked: list[dict[str, str]] = []
    for name, spec in USER_CERTIFICATES.items():
        ca, chain = (
            ((rogue_key, rogue), [rogue, rogue_root]) if spec.rogue else ((issuing_key, issuing), [issuing, root])
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_user(spec, key, ca, now=now, crl_url=issuing_crl_url, ocsp_url=ocsp_url)
        _write_pem(pki.user_cert(name), [cert])
        _write_key(pki.user_key(name), key)
        p12 = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, chain, _p12_encryption())
        _write_private(pki.user_p12(name), p12)  # its password is "lab": as good as the key in clear
        if spec.revoked:
            revoked.append(_revocation_entry(cert, now - 2 * _HOUR, x509.ReasonFlags.key_compromise))
    _write_record(pki, {"crl_number": 1, "revoked": revoked})
    _write_crls(pki, now=now)
    return pki


def revoke(
    pki: Pki, cert_path: Path, *, now: datetime, reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise
) -> None:
    """Revoke the certificate at `cert_path` (issued by the lab's issuing CA) and reissue the CRLs."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    issuing = x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes())
    try:
        cert.verify_directly_issued_by(issuing)
    except Exception as exc:
        raise ValueError(f"{cert_path} was not issued by the lab's issuing CA") from exc
    record = json.loads(pki.revocation_record.read_text())
    if not any(int(entry["serial"], 16) == cert.serial_number for entry in record["revoked"]):
        # Dated like the CRL's thisUpdate, so a CRL never lists a revocation later than its own issue.
        record["revoked"].append(_revocation_entry(cert, now - _HOUR, reason))
    record["crl_number"] += 1
    _write_record(pki, record)
    _write_crls(pki, now=now)


# --- certificates ---------------------------------------------------------------------------------


def _make_ca(
    name: str, parent: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None, *, now: datetime, crl_url: str | None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key, issuer_name = (key, _name(name)) if parent is None else (parent[0], parent[1].subject)
    lifetime = timedelta(days=3650 if parent is None else 1825)
    builder = (
        _builder(_name(name), issuer_name, key, signer_key, now - timedelta(days=365), now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if parent is None else 0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
    )
    if crl_url:
        builder = builder.add_extension(_distribution_point(crl_url), critical=False)
    return key, builder.sign(signer_key, hashes.SHA256())


def _issue_user(
    spec: UserSpec,
    key: ec.EllipticCurvePrivateKey,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    *,
    now: datetime,
    crl_url: str,
    ocsp_url: str | None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    sans: list[x509.GeneralName] = [upn_other_name(spec.upn)] if spec.upn else []
    sans.append(x509.RFC822Name(spec.email))
    sans += [x509.UniformResourceIdentifier(url) for url in spec.urls]
    not_before, not_after = {
        "valid": (now - _HOUR, now + timedelta(days=365)),
        "expired": (now - timedelta(days=90), now - _MARGIN),
        "notyet": (now + timedelta(days=30), now + timedelta(days=395)),
    }[spec.validity]
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if spec.eku == "clientAuth" else ExtendedKeyUsageOID.SERVER_AUTH
    cn = spec.email.partition("@")[0]
    return _issue_leaf(
        cn,
        key,
        ca,
        sans,
        eku,
        not_before=not_before,
        not_after=not_after,
        crl_url=crl_url,
        ocsp_url=ocsp_url,
        extensions=extensions,
    )


def issue_user(
    pki: Pki,
    spec: UserSpec,
    key: ec.EllipticCurvePrivateKey,
    *,
    now: datetime,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """One more user certificate from this PKI's issuing CA (the AD realm's users; tests that need a
    certificate of their own), naming the CRL and OCSP URLs the PKI was made with, plus `extensions`."""
    issuing = x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes())
    issuing_key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), None)
    if not isinstance(issuing_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.issuing_key} is not the EC key the lab PKI makes")
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    crl_url, ocsp_url = _urls_of(server)
    return _issue_user(
        spec, key, (issuing_key, issuing), now=now, crl_url=crl_url, ocsp_url=ocsp_url, extensions=extensions
    )


def _urls_of(cert: x509.Certificate) -> tuple[str, str | None]:
    """The CRL distribution point and OCSP URL a certificate of this PKI names."""
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    crl_url = str(points[0].full_name[0].value) if points[0].full_name else ""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return crl_url, None
    ocsp = [str(d.access_location.value) for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP]
    return crl_url, ocsp[0] if ocsp else None


def _issue_leaf(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    sans: Sequence[x509.GeneralName],
    eku: x509.ObjectIdentifier,
    *,
    not_before: datetime,
    not_after: datetime,
    crl_url: str | None,
    ocsp_url: str | None,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    ca_key, ca_cert = ca
    builder = (
        _builder(_name(cn), ca_cert.subject, key, ca_key, not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(_distribution_point(crl_url), critical=False)
    else:  # the OCSP responder: nobody checks its own status (RFC 6960 4.2.2.2.1)
        builder = builder.add_extension(x509.OCSPNoCheck(), critical=False)
    if ocsp_url:
        ocsp = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))
        builder = builder.add_extension(x509.AuthorityInformationAccess([ocsp]), critical=False)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _distribution_point(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None, crl_issuer=None
            )
        ]
    )


def _p12_encryption() -> serialization.KeySerializationEncryption:
    # SHA1 + 3DES rather than cryptography's AES default: that is what older iOS and Android releases
    # (still common on managed phones) can import. The password is the lab's published "lab" anyway.
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)  # OpenSSL's default PKCS12 iteration count
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())  # noqa: S303 -- see above: compatibility, not protection
        .build(P12_PASSWORD)
    )


# --- CRLs -----------------------------------------------------------------------------------------


def _revocation_entry(cert: x509.Certificate, when: datetime, reason: x509.ReasonFlags) -> dict[str, str]:
    return {
        "serial": f"{cert.serial_number:x}",
        "subject": cert.subject.rfc4514_string(),
        "revoked_at": when.isoformat(),
        "reason": reason.name,
    }


def _write_crls(pki: Pki, *, now: datetime) -> None:
    record = json.loads(pki.revocation_record.read_text())
    number = int(record["crl_number"])
    root_crl = _sign_crl(pki.root_cert, pki.root_key, [], number, now=now)
    issuing_crl = _sign_crl(pki.issuing_cert, pki.issuing_key, record["revoked"], number, now=now)
    pem = serialization.Encoding.PEM
    # Replaced, never rewritten in place: the CRL server (and a gateway re-reading crls.pem) may read
    # them at any moment, and must see the old file or the new one, not half of one.
    _replace(pki.crls, root_crl.public_bytes(pem) + issuing_crl.public_bytes(pem))
    _replace(pki.root_crl, root_crl.public_bytes(serialization.Encoding.DER))
    _replace(pki.issuing_crl, issuing_crl.public_bytes(serialization.Encoding.DER))
    _replace(pki.ocsp_index, _index(pki, record["revoked"]).encode())
    # Several certificates share a subject (a user's second device): openssl must not insist on unique ones.
    pki.ocsp_index.with_name(pki.ocsp_index.name + ".attr").write_text("unique_subject = no\n")


def _index(pki: Pki, revoked: Iterable[dict[str, str]]) -> str:
    """The issuing CA's database as `openssl ca` keeps it (index.txt): one line per certificate it issued.

    Columns, tab-separated: V (valid) or R (revoked), expiry, revocation time[,reason], serial in hex,
    file name ("unknown"), subject. `openssl ocsp -index` answers from it, and reloads it when it changes.
    """
    issuing = x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes())
    revocations = {int(entry["serial"], 16): entry for entry in revoked}
    paths = [pki.server_cert, pki.ocsp_cert, *(pki.user_cert(name) for name in pki.users)]
    lines = []
    for path in paths:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if cert.issuer != issuing.subject:
            continue
        try:
            cert.verify_directly_issued_by(issuing)
        except Exception:  # noqa: BLE001, S112 -- the rogue CA's certificates are not the issuing CA's
            continue
        serial = f"{cert.serial_number:X}"
        serial = serial if len(serial) % 2 == 0 else f"0{serial}"
        subject = "/" + "/".join(reversed(cert.subject.rfc4514_string().split(",")))
        expiry = _openssl_time(cert.not_valid_after_utc)
        entry = revocations.get(cert.serial_number)
        if entry is None:
            lines.append(f"V\t{expiry}\t\t{serial}\tunknown\t{subject}")
        else:
            when = _openssl_time(datetime.fromisoformat(entry["revoked_at"]))
            reason = x509.ReasonFlags[entry["reason"]].value.replace("cACompromise", "CACompromise")
            lines.append(f"R\t{expiry}\t{when},{reason}\t{serial}\tunknown\t{subject}")
    return "".join(line + "\n" for line in lines)


def _openssl_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%y%m%d%H%M%SZ")


def ocsp_responder_argv(pki: Pki, port: int) -> list[str]:
    """`openssl ocsp` as the issuing CA's responder on `port`, answering from `index.txt`.

    openssl 3.0's responder takes a port only, no address: it listens on every interface. It answers one
    connection at a time, so wait for "waiting for OCSP client connections" in its output rather than
    probing its port. It rereads index.txt when that changes, after the next request it answers.
    """
    return [
        "openssl",
        "ocsp",
        "-index",
        str(pki.ocsp_index),
        "-port",
        str(port),
        "-CA",
        str(pki.issuing_cert),
        "-rsigner",
        str(pki.ocsp_cert),
        "-rkey",
        str(pki.ocsp_key),
        "-ignore_err",
        "-timeout",  # it serves one connection at a time: one that sends nothing must not wedge it for good
        "3",
    ]


def _sign_crl(
    cert_path: Path, key_path: Path, revoked: Iterable[dict[str, str]], number: int, *, now: datetime
) -> x509.CertificateRevocationList:
    ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{key_path}: expected the EC key the lab writes")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - _HOUR)
        .next_update(now + CRL_LIFETIME)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["serial"], 16))
            .revocation_date(datetime.fromisoformat(entry["revoked_at"]))
            .add_extension(x509.CRLReason(x509.ReasonFlags[entry["reason"]]), critical=False)
            .build()
        )
    return builder.sign(key, hashes.SHA256())


# --- files ----------------------------------------------------------------------------------------


def write_pem(path: Path, certs: Iterable[x509.Certificate]) -> None:
    """Certificates as PEM, one after the other."""
    _write_pem(path, certs)


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A private key as unencrypted PKCS#8 PEM, readable by its owner only."""
    _write_key(path, key)


def _write_pem(path: Path, certs: Iterable[x509.Certificate]) -> None:
    path.write_bytes(b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs))


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(path, data)


def _write_private(path: Path, data: bytes) -> None:
    """`data` in `path`, readable by its owner only (a file there before gets that mode too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_record(pki: Pki, record: dict[str, object]) -> None:
    pki.revocation_record.write_text(json.dumps(record, indent=2) + "\n")


def _certificates_current(pki: Pki, now: datetime) -> bool:
    """Every file is there, every certificate is good for a day, and the variants are still broken."""
    keys = [pki.root_key, pki.issuing_key, pki.server_key, pki.rogue_root_key, pki.rogue_issuing_key, pki.ocsp_key]
    keys += [pki.user_key(name) for name in pki.users]
    p12s = [pki.user_p12(name) for name in pki.users]
    try:
        json.loads(pki.revocation_record.read_text())
        if not all(path.is_file() for path in [*keys, *p12s, pki.server_chain]):
            return False
        plain = [pki.root_cert, pki.issuing_cert, pki.server_cert, pki.rogue_root_cert, pki.rogue_issuing_cert]
        plain.append(pki.ocsp_cert)
        validity: dict[Path, Validity] = dict.fromkeys(plain, "valid")
        validity.update({pki.user_cert(name): spec.validity for name, spec in USER_CERTIFICATES.items()})
        for path, expected in validity.items():
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            good = {"valid": start <= now and end >= now + _MARGIN, "expired": end < now, "notyet": start > now}
            if not good[expected]:
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def _urls_current(pki: Pki, crl_url: str, ocsp_url: str) -> bool:
    """Do the user certificates name these CRL and OCSP URLs (a lab moved to other ports remakes its PKI)?"""
    cert = x509.load_pem_x509_certificate(pki.user_cert("alice").read_bytes())
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return False
    named = {n.value for p in points for n in p.full_name or ()} | {a.access_location.value for a in access}
    return {crl_url, ocsp_url} <= named


def _crls_current(pki: Pki, now: datetime) -> bool:
    try:
        crls = load_crls(pki.crls)
    except (OSError, ValueError):
        return False
    current = all(
        crl.last_update_utc <= now and crl.next_update_utc is not None and crl.next_update_utc >= now + _MARGIN
        for crl in crls
    )
    files = (pki.issuing_crl, pki.root_crl, pki.ocsp_index)
    return current and len(crls) == 2 and all(f.is_file() for f in files)
