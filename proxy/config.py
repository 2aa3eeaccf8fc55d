"""Typed configuration: TOML in, frozen dataclasses out.

The file is read once, every key is checked and converted here, and nothing downstream parses strings
again. Every problem names its key and the file (`routes[1].upstream: ...`); all problems are
collected and reported together so an administrator fixes them in one pass. Relative paths are
relative to the configuration file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from proxy.errors import ConfigError

RevocationPolicy = Literal["require", "best-effort", "off"]
REVOCATION_POLICIES: tuple[RevocationPolicy, ...] = ("require", "best-effort", "off")
IDENTITY_SOURCES = ("san-upn",)


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    certificate: Path
    private_key: Path
    handshake_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    max_body_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClientCertificates:
    trust_anchors: tuple[Path, ...]
    intermediates: tuple[Path, ...]
    crls: tuple[Path, ...]
    revocation: RevocationPolicy


@dataclass(frozen=True)
class Identity:
    source: str = "san-upn"
    realm_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Kerberos:
    principal: str
    keytab: Path
    krb5_config: Path | None = None
    max_in_flight: int = 16  # blocking GSSAPI calls allowed at once (each talks to the KDC)
    kdc_timeout: float = 10.0


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str  # scheme://host[:port], no path
    spn: str  # e.g. HTTP/cas.lab.test
    preserve_host: bool = False
    connect_timeout: float = 10.0
    read_timeout: float | None = 300.0

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).hostname or ""

    @property
    def gss_target(self) -> str:
        """The SPN in GSSAPI host-based form: HTTP/cas.lab.test -> HTTP@cas.lab.test."""
        service, _, host = self.spn.partition("/")
        return f"{service}@{host}"


@dataclass(frozen=True)
class Config:
    path: Path
    listener: Listener
    client_certificates: ClientCertificates
    identity: Identity
    kerberos: Kerberos
    routes: tuple[Route, ...]

    def route_for(self, path: str) -> Route | None:
        """The longest prefix that matches the request path."""
        for route in self.routes:  # sorted longest first at load time
            if path.startswith(route.prefix):
                return route
        return None


T = TypeVar("T")


class _Reader:
    """Reads typed values out of the parsed TOML, collecting problems instead of stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message} (in {self.path})")

    def get(self, table: dict[str, Any], key: str, name: str, kind: type[T], default: T | None = None) -> T | None:
        if name not in table:
            if default is None:
                self.problem(key, "missing")
            return default
        value = table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
            return default
        return value

    def file(self, key: str, value: str | None, *, required: bool = True) -> Path:
        if value is None:
            return Path()
        p = Path(value)
        if not p.is_absolute():
            p = self.base / p
        if required and not p.is_file():
            self.problem(key, f"file not found: {p}")
        return p

    def files(self, table: dict[str, Any], key: str, name: str) -> tuple[Path, ...]:
        raw = table.get(name, [])
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            self.problem(key, "expected a list of file paths")
            return ()
        return tuple(self.file(f"{key}[{i}]", v) for i, v in enumerate(raw))

    def table(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, "expected a table")
            return {}
        return value

    def unknown(self, table: dict[str, Any], prefix: str, known: set[str]) -> None:
        for name in sorted(set(table) - known):
            self.problem(f"{prefix}.{name}" if prefix else name, "unknown key")


def _host_port(r: _Reader, key: str, value: str | None) -> tuple[str, int]:
    if value is None:
        return "", 0
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        r.problem(key, f"expected host:port, got {value!r}")
        return "", 0
    return host, int(port)


def _positive(r: _Reader, key: str, value: T | None, default: T) -> T:
    if value is None:
        return default
    if isinstance(value, int | float) and value <= 0:
        r.problem(key, f"must be positive, got {value!r}")
        return default
    return value


def _number(r: _Reader, t: dict[str, Any], prefix: str, name: str, kind: type[T], default: T) -> T:
    """A positive int or float under `prefix.name`, or its default."""
    key = f"{prefix}.{name}"
    return _positive(r, key, r.get(t, key, name, kind, default), default)


def _choice(r: _Reader, key: str, value: str | None, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        r.problem(key, f"expected one of {', '.join(choices)}; got {value!r}")
        return default
    return value


def _listener(r: _Reader, t: dict[str, Any]) -> Listener:
    r.unknown(
        t,
        "listener",
        {"bind", "certificate", "private_key", "handshake_timeout", "keepalive_timeout", "max_body_bytes"},
    )
    host, port = _host_port(r, "listener.bind", r.get(t, "listener.bind", "bind", str))
    return Listener(
        host=host,
        port=port,
        certificate=r.file("listener.certificate", r.get(t, "listener.certificate", "certificate", str)),
        private_key=r.file("listener.private_key", r.get(t, "listener.private_key", "private_key", str)),
        handshake_timeout=_number(r, t, "listener", "handshake_timeout", float, 10.0),
        keepalive_timeout=_number(r, t, "listener", "keepalive_timeout", float, 75.0),
        max_body_bytes=_number(r, t, "listener", "max_body_bytes", int, 64 * 1024 * 1024),
    )


def _client_certificates(r: _Reader, t: dict[str, Any]) -> ClientCertificates:
    k = "client_certificates"
    r.unknown(t, k, {"trust_anchors", "intermediates", "crls", "revocation"})
    anchors = r.files(t, f"{k}.trust_anchors", "trust_anchors")
    if not anchors:
        r.problem(f"{k}.trust_anchors", "at least one trust anchor is required")
    crls = r.files(t, f"{k}.crls", "crls")
    explicit = r.get(t, f"{k}.revocation", "revocation", str, "")
    # Without CRLs there is nothing to check: default to "off" (and say so at start-up), but an
    # explicit "require" with no CRLs would refuse every certificate, which is a configuration error.
    policy = _choice(r, f"{k}.revocation", explicit or None, REVOCATION_POLICIES, "require" if crls else "off")
    if policy == "require" and not crls:
        r.problem(f"{k}.revocation", '"require" needs at least one CRL in client_certificates.crls')
    return ClientCertificates(
        trust_anchors=anchors,
        intermediates=r.files(t, f"{k}.intermediates", "intermediates"),
        crls=crls,
        revocation=cast(RevocationPolicy, policy),
    )


def _identity(r: _Reader, t: dict[str, Any]) -> Identity:
    r.unknown(t, "identity", {"source", "realm_map"})
    source = _choice(r, "identity.source", r.get(t, "identity.source", "source", str, ""), IDENTITY_SOURCES, "")
    realm_map = r.get(t, "identity.realm_map", "realm_map", dict, {}) or {}
    clean: dict[str, str] = {}
    for suffix, realm in realm_map.items():
        if not isinstance(realm, str) or not realm or "@" in suffix:
            r.problem(f"identity.realm_map.{suffix}", f"expected a realm name, got {realm!r}")
            continue
        clean[suffix.lower()] = realm
    return Identity(source=source or "san-upn", realm_map=clean)


def _kerberos(r: _Reader, t: dict[str, Any]) -> Kerberos:
    r.unknown(t, "kerberos", {"principal", "keytab", "krb5_config", "max_in_flight", "kdc_timeout"})
    principal = r.get(t, "kerberos.principal", "principal", str) or ""
    if principal and "@" not in principal:
        r.problem("kerberos.principal", f"expected service/host@REALM, got {principal!r}")
    krb5 = r.get(t, "kerberos.krb5_config", "krb5_config", str, "")
    return Kerberos(
        principal=principal,
        keytab=r.file("kerberos.keytab", r.get(t, "kerberos.keytab", "keytab", str)),
        krb5_config=r.file("kerberos.krb5_config", krb5) if krb5 else None,
        max_in_flight=_number(r, t, "kerberos", "max_in_flight", int, 16),
        kdc_timeout=_number(r, t, "kerberos", "kdc_timeout", float, 10.0),
    )


def _route(r: _Reader, i: int, t: Any) -> Route | None:
    k = f"routes[{i}]"
    if not isinstance(t, dict):
        r.problem(k, "expected a table")
        return None
    r.unknown(t, k, {"prefix", "upstream", "spn", "preserve_host", "connect_timeout", "read_timeout"})
    prefix = r.get(t, f"{k}.prefix", "prefix", str) or "/"
    if not prefix.startswith("/"):
        r.problem(f"{k}.prefix", f"must start with '/', got {prefix!r}")
    upstream = (r.get(t, f"{k}.upstream", "upstream", str) or "").rstrip("/")
    parts = urlsplit(upstream)
    if upstream and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path):
        r.problem(f"{k}.upstream", f"expected http(s)://host[:port] with no path, got {upstream!r}")
    spn = r.get(t, f"{k}.spn", "spn", str, "") or f"HTTP/{parts.hostname or ''}"
    service, slash, host = spn.partition("/")
    if not slash or not service or not host or "@" in host:
        r.problem(f"{k}.spn", f"expected service/host (e.g. HTTP/cas.example.com), got {spn!r}")
    return Route(
        prefix=prefix,
        upstream=upstream,
        spn=spn,
        preserve_host=bool(r.get(t, f"{k}.preserve_host", "preserve_host", bool, False)),
        connect_timeout=_number(r, t, k, "connect_timeout", float, 10.0),
        read_timeout=_number(r, t, k, "read_timeout", float, 300.0),
    )


def parse(data: dict[str, Any], path: Path) -> Config:
    r = _Reader(path)
    r.unknown(data, "", {"listener", "client_certificates", "identity", "kerberos", "routes"})
    listener = _listener(r, r.table(data, "listener"))
    certs = _client_certificates(r, r.table(data, "client_certificates"))
    identity = _identity(r, r.table(data, "identity"))
    kerberos = _kerberos(r, r.table(data, "kerberos"))
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        r.problem("routes", "at least one [[routes]] table is required")
        raw_routes = []
    routes = [route for i, t in enumerate(raw_routes) if (route := _route(r, i, t)) is not None]
    seen: set[str] = set()
    for i, route in enumerate(routes):
        if route.prefix in seen:
            r.problem(f"routes[{i}].prefix", f"duplicate prefix {route.prefix!r}")
        seen.add(route.prefix)
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        path=path,
        listener=listener,
        client_certificates=certs,
        identity=identity,
        kerberos=kerberos,
        routes=tuple(sorted(routes, key=lambda rt: len(rt.prefix), reverse=True)),
    )


def load(path: Path) -> Config:
    path = path.resolve()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"configuration file not found: {path}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read {path}: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return parse(data, path)
