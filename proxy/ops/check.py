"""`kcd-proxy check-config`: everything the configuration names, loaded and cross-checked, without serving.

`proxy.config` has checked each key on its own (types, ranges, files present). This adds what needs the
files' contents: the server certificate parses, matches its private key and is within its validity; the
trust anchors and intermediates parse, are CA certificates, and each intermediate is issued by a configured
CA; the CRLs parse and verify against the configured CAs and are current; the keytab is a keytab and holds
the gateway's principal; no route points back at the gateway or at its admin listener. Every problem is one
line naming the key and the file, like the configuration's own (`key: message (in FILE)`). Time is a parameter.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import pwd
import ssl
import tomllib
from collections.abc import Callable, Generator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from proxy.certs.chain import TrustList, format_time, is_ca, load_certificates, unusable_ca
from proxy.certs.floors import CrlStateError, read_state, trusted_directory
from proxy.certs.revocation import CrlSet, load_crls
from proxy.certs.sources import CrlStore, sources_from_config
from proxy.config import Config, small_letters_only
from proxy.kerberos.keytab import account_advice, case_advice, read_keytab
from proxy.printable import printable
from proxy.tls.server import load_ca_file, swapped


def check(config: Config, *, at: datetime, crls: bool = True) -> list[str]:
    """Every problem found, as `key: message (in FILE)`; empty when the configuration is sound.

    `crls=False` leaves the CRLs out (a reload does: a CRL that is stale or unusable is logged and
    skipped, as at start-up, rather than blocking a new server certificate or route).
    """
    where = f" (in {config.path})"
    return [f"{key}: {message}{where}" for key, message in _problems(config, at, crls)]


def loops(config: Config) -> list[str]:
    """`check`'s problems with routes that point back at the gateway's own listener or at its admin listener (every
    device would read the traces of every user through the gateway): what `kcd-proxy run` refuses at its start, as a
    reload refuses it with the rest of `check`."""
    where = f" (in {config.path})"
    return [f"{key}: {message}{where}" for key, message in _routes(config)]


def warnings(config: Config) -> list[str]:
    """What is sound but worth knowing, as `key: message (in FILE)`: check-config prints these and still says ok.

    A `listener.trusted_proxies` block wider than /16 or /48 is named (`_wide_balancers`). Behind a balancer
    (`listener.proxy_protocol`) there are usually several gateways, and each counts a user's wrong
    Basic passwords on its own (the workers of one gateway share a table; gateways share nothing): the directory's
    lockout threshold must be sized against the limit times the number of gateways (docs/throttles-and-limits.md)."""
    where = f" (in {config.path})"
    found = [
        f"{key}: {message}{where}"
        for key, message in (
            *_wide_balancers(config),
            *_subnets_without_prefix(config),
            *_admin_ca_shared(config),
            *_unmatched_issuers(config),
            *_unusable_cas(config),
            *_small_letter_realms(config),
        )
    ]
    auth = config.authentication
    if not config.listener.proxy_protocol or auth.mode == "certificate":
        return found
    limit, window = auth.basic_failures_per_user, auth.basic_failure_window_seconds
    return [
        f"authentication.basic_failures_per_user: behind a balancer (listener.proxy_protocol) each gateway counts a "
        f"user's wrong passwords on its own: N gateways let N x {limit} of them reach the directory within "
        f"basic_failure_window_seconds ({window:g}); keep N x {limit} below the domain's account lockout threshold "
        f"(docs/throttles-and-limits.md, 'Several gateways and several workers'){where}",
        *found,
    ]


def _small_letter_realms(config: Config) -> Iterator[tuple[str, str]]:
    """A realm written in small letters (`lab.test`): MIT allows one, so it may be meant, but Active Directory's realm
    is always its domain's DNS name in capitals, and a realm in small letters where the KDC's is in capitals makes every
    request of its users a refusal ("no Kerberos realm serves ..."). `proxy.config` refuses one that is a realm it
    knows in another case; this names the rest."""
    own = config.kerberos.principal.rpartition("@")[2]
    realms = [("kerberos.principal", own)]
    realms += [(f"identity.realm_map.{suffix}", realm) for suffix, realm in config.identity.realm_map.items()]
    if config.identity.default_realm != own:  # the gateway's own realm unless set
        realms.append(("identity.default_realm", config.identity.default_realm))
    ad = ", and [directory] makes this realm Active Directory" if config.directory is not None else ""
    for key, realm in realms:
        if small_letters_only(realm):
            yield (
                key,
                f"the realm {realm!r} is in small letters: Kerberos realm names are case-sensitive, and Active "
                f"Directory's is its domain in capitals ({realm.upper()!r}){ad}; keep it only if your KDC's realm "
                "is written in small letters (MIT allows it: its krb5.conf [realms] and kdc.conf name it so)",
            )


WIDEST_BALANCERS = {4: 16, 6: 48}  # IP version -> the shortest `listener.trusted_proxies` prefix taken without a word


def _wide_balancers(config: Config) -> Iterator[tuple[str, str]]:
    """A `listener.trusted_proxies` block wider than a /16 (IPv4) or a /48 (IPv6): every address in it may write any
    client address into a PROXY header, which the address throttles, the logs and X-Forwarded-For then take for the
    device's. Balancers sit at a few known addresses; /0 is `proxy.config`'s refusal."""
    for i, block in enumerate(config.listener.trusted_proxies):
        widest = WIDEST_BALANCERS[block.version]
        if 0 < block.prefixlen < widest:
            yield (
                f"listener.trusted_proxies[{i}]",
                f"{block} is wider than a /{widest}: every address in it ({block.num_addresses:,}) may write any "
                "client address into a PROXY header, and the gateway takes it for the device's (its throttles, "
                "logs and X-Forwarded-For); list the balancers' own addresses or subnet (docs/deploying.md)",
            )


def _subnets_without_prefix(config: Config) -> Iterator[tuple[str, str]]:
    """A `listener.trusted_proxies` entry written without a prefix whose address is a subnet's network address (an IPv4
    address ending in .0, an IPv6 one whose last 64 bits are zero): "10.0.1.0" for the balancers' 10.0.1.0/28 is
    the one address 10.0.1.0, which no balancer has, so every connection from them is refused (`untrusted_peer`)."""
    raw = _raw(config.path).get("listener", {}).get("trusted_proxies", [])
    for i, entry in enumerate(raw if isinstance(raw, list) else []):
        if not isinstance(entry, str) or "/" in entry:
            continue
        address = ipaddress.ip_address(entry)  # proxy.config parsed it already
        host_bits = 8 if address.version == 4 else 64
        if int(address) & ((1 << host_bits) - 1) == 0:
            yield (
                f"listener.trusted_proxies[{i}]",
                f"{entry} has no prefix, so it is that one address ({entry}/{address.max_prefixlen}), a subnet's "
                "network address that no balancer has: every connection from the balancers would be refused "
                f"(untrusted_peer); write the subnet with its prefix (e.g. {entry}/28), or each balancer's own address",
            )


def _admin_ca_shared(config: Config) -> Iterator[tuple[str, str]]:
    """`admin.client_ca` holds a CA of the device trust list and `admin.allowed_clients` names a subject: every
    device certificate that CA issued with that subject (a template that lets the requester choose it, or an issuing
    mistake) reads the admin listener. Its files' own problems are `check`'s, not repeated here."""
    admin, cc = config.admin, config.client_certificates
    if admin is None or admin.client_ca is None or not any("=" in entry for entry in admin.allowed_clients):
        return
    try:
        device = {
            (cert.subject, _spki(cert.public_key()))
            for path in (*cc.trust_anchors, *cc.intermediates)
            for cert in load_certificates(path)
        }
        operators = load_certificates(admin.client_ca)
    except (OSError, ValueError):
        return
    shared = [cert.subject.rfc4514_string() for cert in operators if (cert.subject, _spki(cert.public_key())) in device]
    if shared:
        yield (
            "admin.client_ca",
            f"{admin.client_ca} holds a CA the devices' certificates come from ({'; '.join(shared)}): any device "
            "certificate it issues with a subject admin.allowed_clients names reads the admin listener (traces, "
            "metrics); give operators a CA of their own (its CRLs in admin.crls), or list SHA-256 fingerprints only "
            "(docs/deploying.md, "
            "'The admin listener's client certificates')",
        )


def _unmatched_issuers(config: Config) -> Iterator[tuple[str, str]]:
    """A restriction whose `issuer` is the subject of none of the configured CAs admits no certificate: a chain is
    built from `trust_anchors` and `intermediates` alone, and the rule compares its issuer with the leaf's issuer
    and its chain's CAs (`proxy.certs.restrictions`), case-insensitively. Its files' own problems are `check`'s."""
    cc = config.client_certificates
    if not any(rule.issuer for rule in cc.restrictions):
        return
    try:
        cas = [
            printable(cert.subject.rfc4514_string())  # as a rule's issuer is written: as the log shows it
            for path in (*cc.trust_anchors, *cc.intermediates)
            for cert in load_certificates(path)
        ]
    except (OSError, ValueError):
        return
    known = {name.casefold() for name in cas}
    for i, rule in enumerate(cc.restrictions):
        if rule.issuer is not None and rule.issuer.casefold() not in known:
            yield (
                f"client_certificates.restrictions[{i}].issuer",
                f"'{rule.issuer}' is none of the configured CAs ({'; '.join(cas)}): rule '{rule.name}' admits no "
                "certificate, and without another rule every device is refused with 403; name the CA that issues "
                "the devices' certificates, or one above it, as `kcd-proxy explain --cert` shows the chain",
            )


def _unusable_cas(config: Config) -> Iterator[tuple[str, str]]:
    """A configured CA whose key, or whose own signature, the certificate stage's verifier refuses (`unusable_ca`):
    OpenSSL's handshake takes its devices, then every one of them gets 403. A warning: a CA on the list may have no
    devices yet. Its files' own problems are `check`'s."""
    cc = config.client_certificates
    for name, paths in (("trust_anchors", cc.trust_anchors), ("intermediates", cc.intermediates)):
        for i, path in enumerate(paths):
            try:
                certs = load_certificates(path)
            except (OSError, ValueError):
                continue
            for why in filter(None, (unusable_ca(cert, anchor=name == "trust_anchors") for cert in certs)):
                yield (
                    f"client_certificates.{name}[{i}]",
                    f"{path}: {why}, which the gateway does not accept: every certificate it issues is refused (403) "
                    "at the certificate stage; reissue the CA with an RSA or ECDSA key, signed with RSA (PKCS#1 v1.5, "
                    "or PSS with a salt of the hash's length) or ECDSA, with SHA-256, SHA-384 or SHA-512",
                )


def _problems(config: Config, at: datetime, crls: bool) -> Iterator[tuple[str, str]]:
    listener = config.listener
    yield from _server_certificate("listener", listener.certificate, listener.private_key, at)
    trust = yield from _trust_list(config, at)
    if trust is not None and crls:
        yield from _crls(config, trust, at)
    yield from _keytab(config)
    yield from _routes(config)
    if config.client_certificates.crl_state is not None:
        yield from (
            ("client_certificates.crl_state", problem) for problem in crl_state(config.client_certificates.crl_state)
        )
    if config.directory is not None and config.directory.ca_file is not None:
        yield from _directory_ca(config.directory.ca_file, at)
    admin = config.admin
    if admin is not None and admin.certificate is not None and admin.private_key is not None:
        yield from _server_certificate("admin", admin.certificate, admin.private_key, at)
    if admin is not None and admin.client_ca is not None:
        found = list(_certificates("admin.client_ca", admin.client_ca, at))
        yield from found
        if admin.crls and not found and crls:
            yield from _admin_crls(admin.client_ca, admin.crls, at)


def crl_state(path: Path) -> Iterator[str]:
    """`client_certificates.crl_state`: its directory (whose existence the configuration checked) is one this user may
    write and search (the gateway replaces the file there: run check-config as the gateway's user) and no other user
    may write (`proxy.certs.floors.trusted_directory`), and the file, if there is one yet, is one the gateway will read
    (`proxy.certs.floors.read_state`)."""
    directory = path.parent
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a uid without a name (a container's)
            user = f"uid {os.geteuid()}"
        yield (
            f"{directory} is not writable by {user}: the gateway writes {path.name} there (a new file renamed over "
            "it); make it the gateway's (systemd: StateDirectory=kcd-proxy), and run check-config as the gateway's user"
        )
        return
    try:
        trusted_directory(path)
        read_state(path)
    except CrlStateError as e:
        yield str(e)


def _admin_crls(client_ca: Path, files: tuple[Path, ...], at: datetime) -> Iterator[tuple[str, str]]:
    """`[admin] crls` files parse, are signed by a CA of `admin.client_ca` and are current (as the devices')."""
    store = CrlStore(TrustList(anchors=tuple(load_certificates(client_ca))), sources_from_config(files, ()))
    for problem in store.load_files(now=at):
        yield "admin.crls", problem


def _server_certificate(table: str, cert_path: Path, key_path: Path, at: datetime) -> Iterator[tuple[str, str]]:
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        yield f"{table}.certificate", swapped(table, cert_path) or f"{cert_path}: not a PEM certificate chain ({e})"
        return
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        yield f"{table}.private_key", f"{key_path}: the key is encrypted; give an unencrypted PEM key"
        return
    except (OSError, ValueError) as e:
        yield f"{table}.private_key", f"{key_path}: not a PEM private key ({e})"
        return
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        yield (
            f"{table}.private_key",
            f"{key_path} does not match the certificate '{leaf.subject.rfc4514_string()}' in {cert_path}",
        )
        return
    if leaf.not_valid_after_utc < at:
        yield f"{table}.certificate", f"{cert_path}: expired on {format_time(leaf.not_valid_after_utc)}"
    elif leaf.not_valid_before_utc > at:
        yield f"{table}.certificate", f"{cert_path}: not valid before {format_time(leaf.not_valid_before_utc)}"
    for cert, issuer in itertools.pairwise(chain):
        if not _issued_by(cert, issuer):
            yield (
                f"{table}.certificate",
                f"{cert_path}: '{issuer.subject.rfc4514_string()}' did not issue "
                f"'{cert.subject.rfc4514_string()}': put the leaf first, then its issuers in order",
            )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        yield f"{table}.certificate", f"OpenSSL refuses {cert_path} with {key_path}: {e}"


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _certificates(key: str, path: Path, at: datetime) -> Iterator[tuple[str, str]]:
    """A CA file: it parses, and each certificate in it is a CA within its validity."""
    try:
        certs = load_certificates(path)
    except (OSError, ValueError) as e:
        yield key, str(e)
        return
    try:  # as the listeners' TLS contexts load it: OpenSSL reads every PEM block, not only
        load_ca_file(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), path)  # the certificates cryptography picks out
    except ValueError as e:
        yield key, str(e)
    for cert in certs:
        name = cert.subject.rfc4514_string()
        if not is_ca(cert):
            yield key, f"{path}: '{name}' is not a CA certificate (basicConstraints cA is not set)"
        if cert.not_valid_after_utc < at:
            yield key, f"{path}: '{name}' expired on {format_time(cert.not_valid_after_utc)}"


def _directory_ca(path: Path, at: datetime) -> Iterator[tuple[str, str]]:
    """`directory.ca_file`'s certificates are within their validity (that it is PEM certificates, the configuration
    checked: `proxy.config._ca_bundle`)."""
    try:
        certs = load_certificates(path)
    except ValueError as e:  # replaced since the configuration read it
        yield "directory.ca_file", str(e)
        return
    for cert in certs:
        if cert.not_valid_after_utc < at:
            name = cert.subject.rfc4514_string()
            yield "directory.ca_file", f"{path}: '{name}' expired on {format_time(cert.not_valid_after_utc)}"


def _trust_list(config: Config, at: datetime) -> Generator[tuple[str, str], None, TrustList | None]:
    """Problems with the anchors and intermediates; returns the trust list when it could be loaded."""
    cc = config.client_certificates
    broken = False
    for name, paths in (("trust_anchors", cc.trust_anchors), ("intermediates", cc.intermediates)):
        for i, path in enumerate(paths):
            found = list(_certificates(f"client_certificates.{name}[{i}]", path, at))
            broken = broken or bool(found)
            yield from found
    if broken:
        return None
    trust = TrustList.load(cc.trust_anchors, cc.intermediates)
    for i, path in enumerate(cc.intermediates):
        for cert in load_certificates(path):
            issuers = [ca for ca in trust.named(cert.issuer) if ca != cert and _issued_by(cert, ca)]
            if not issuers:
                yield (
                    f"client_certificates.intermediates[{i}]",
                    f"{path}: '{cert.subject.rfc4514_string()}' is not issued by any configured trust anchor "
                    f"or intermediate (its issuer is '{cert.issuer.rfc4514_string()}')",
                )
    return trust


def _crls(config: Config, trust: TrustList, at: datetime) -> Iterator[tuple[str, str]]:
    """Each CRL file parses, is issued by a configured CA (else: what to do with it), is signed by it and is current
    at `at`."""
    raw = _raw(config.path).get("client_certificates", {}).get("crls", [])
    raw = [raw] if isinstance(raw, str) else raw
    index = {(config.path.parent / entry).resolve(): i for i, entry in enumerate(raw) if isinstance(entry, str)}
    for path in config.client_certificates.crls:  # files; URLs are fetched at run time
        key = f"client_certificates.crls[{index.get(path.resolve(), 0)}]"
        try:
            crls = load_crls(path)
        except OSError as e:  # over MAX_CRL_BYTES: the gateway refuses it at start and reload alike
            yield key, f"{path}: {e.strerror or e}"
            continue
        except ValueError as e:
            yield key, str(e)
            continue
        strangers = [crl for crl in crls if not trust.named(crl.issuer)]
        for crl in strangers:  # the gateway skips it (crl_rejected); the operator is told what to do with it
            yield (
                key,
                f"{path}: CRL issuer '{printable(crl.issuer.rfc4514_string())}' is not in the trust list: take it out "
                "of client_certificates.crls, or add its CA to client_certificates.trust_anchors or intermediates",
            )
        known = [(str(path), crl) for crl in crls if crl not in strangers]
        _, problems = CrlSet.build(known, trust, at=at)
        for problem in problems:
            yield key, problem


def _keytab(config: Config) -> Iterator[tuple[str, str]]:
    kerberos = config.kerberos
    try:
        entries = read_keytab(kerberos.keytab)
    except OSError as e:
        yield "kerberos.keytab", f"{kerberos.keytab}: cannot be read ({e.strerror})"
        return
    except ValueError as e:
        yield "kerberos.keytab", f"{kerberos.keytab}: {e}"
        return
    held = sorted({e.principal for e in entries})
    if kerberos.principal not in held:
        holds = ", ".join(held) if held else "no keys at all"
        fix = case_advice(kerberos.principal, held) or (
            "export the gateway's key into it (kadmin ktadd, ktpass, msktutil)"
            + account_advice(kerberos.principal, held)
        )
        yield "kerberos.keytab", f"{kerberos.keytab} holds no key for {kerberos.principal} (it holds: {holds}); {fix}"


def _routes(config: Config) -> Iterator[tuple[str, str]]:
    """Routes to the gateway's own listener (a loop) or to its admin listener (every device would read the
    traces and metrics), by the bind's own host, a loopback name, or any name for a wildcard bind."""
    own = [(config.listener.host, config.listener.port, "the gateway's own listener: requests would loop")]
    if config.admin is not None and config.admin.bound:
        own.append((config.admin.host, config.admin.port, "the admin listener: every device would read its traces"))
    order = _file_order(config.path)
    for route in config.routes:
        i = order.get(route.prefix, 0)
        parts = urlsplit(route.upstream)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        for host, bound_port, what in own:
            if port == bound_port and _reaches(parts.hostname or "", host):
                yield f"routes[{i}].upstream", f"{route.upstream} is {what}"


def _reaches(name: str, bind_host: str) -> bool:
    """Whether an upstream host `name` is (at the same port) the listener bound to `bind_host`: the same host, a
    loopback name for a loopback bind, and a loopback or unspecified address for a wildcard bind (its other
    addresses are not known here)."""
    name, bind_host = name.lower().strip("[]"), bind_host.lower().strip("[]")
    if name == bind_host:
        return True
    loopback = name == "localhost" or _is_ip(name, lambda a: a.is_loopback)
    if _is_ip(bind_host, lambda a: a.is_unspecified):
        return loopback or _is_ip(name, lambda a: a.is_unspecified)
    return loopback and (bind_host == "localhost" or _is_ip(bind_host, lambda a: a.is_loopback))


def _is_ip(text: str, test: Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]) -> bool:
    try:
        return test(ipaddress.ip_address(text))
    except ValueError:
        return False


def _raw(path: Path) -> dict[str, Any]:
    """The file as TOML, to name keys by their place in it (the configuration sorts and splits lists); empty if it no
    longer reads as TOML: a configuration a replacement worker serves from the text its siblings' last reload took,
    the file caught half edited since (`proxy.live.replacement_refused`), is checked all the same."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # tomllib.TOMLDecodeError, UnicodeDecodeError
        return {}


def _file_order(path: Path) -> dict[str, int]:
    """Route prefix -> its index in the file (the configuration keeps routes sorted longest first)."""
    raw = _raw(path).get("routes", [])
    return {t.get("prefix", "/"): i for i, t in enumerate(raw) if isinstance(t, dict)}
