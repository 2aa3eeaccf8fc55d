"""Typed configuration: TOML in, frozen dataclasses out.

The file is read once, every key is checked and converted here, and nothing downstream parses strings
again. Every problem names its key and the file (`routes[1].upstream: ...`); all problems are
collected and reported together so an administrator fixes them in one pass. Relative paths are
relative to the configuration file.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit

from cryptography import x509

from proxy.addresses import host_port
from proxy.certs.chain import MAX_CA_FILE_BYTES
from proxy.certs.revocation import RevocationPolicy
from proxy.errors import BadRequest, ConfigError
from proxy.files import read_bounded
from proxy.identity.principal import ascii_lower
from proxy.printable import printable
from proxy.target import origin_form

REVOCATION_POLICIES: tuple[RevocationPolicy, ...] = get_args(RevocationPolicy)
OcspPolicy = Literal["off", "prefer", "require"]
OCSP_POLICIES: tuple[OcspPolicy, ...] = get_args(OcspPolicy)
IdentitySource = Literal["san-upn", "san-email", "subject-cn"]
IDENTITY_SOURCES: tuple[IdentitySource, ...] = get_args(IdentitySource)
MAX_CONFIG_BYTES = 1024 * 1024  # a configuration is a few KiB; more is a mistake (or /dev/zero)
MAX_BACKDATING_SECONDS = 1_576_800_000  # 50 years of 365 days: longer than any certificate lives
AuthMode = Literal["certificate", "certificate-or-basic", "certificate-and-basic", "basic"]
AUTH_MODES: tuple[AuthMode, ...] = get_args(AuthMode)
BackendAuth = Literal["negotiate", "basic"]
BACKEND_AUTHS: tuple[BackendAuth, ...] = get_args(BackendAuth)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# "request": a fresh Negotiate token on every request. "connection": only on the first request of each backend
# connection (IIS with authPersistNonNTLM, Exchange's default, binds that identity to the connection).
BackendBinding = Literal["request", "connection"]
BACKEND_BINDINGS: tuple[BackendBinding, ...] = get_args(BackendBinding)
MappingMode = Literal["upn", "strong", "strong-or-audit"]
MAPPING_MODES: tuple[MappingMode, ...] = get_args(MappingMode)
DirectoryBind = Literal["kerberos", "simple"]
DIRECTORY_BINDS: tuple[DirectoryBind, ...] = get_args(DirectoryBind)
# The event loop each worker runs (proxy.loop): asyncio's own, or uvloop's (libuv) when it is installed.
EventLoop = Literal["asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoop, ...] = get_args(EventLoop)
HttpServer = Literal["own", "aiohttp"]
HTTP_SERVERS: tuple[HttpServer, ...] = get_args(HttpServer)
# An evidence ticket whose PAC names no account (proxy.kerberos.account): "auto" serves MIT's PAC naming nobody
# and refuses a ticket without any PAC; "require" wants the account named (AD); "optional" serves both.
KdcAccountPolicy = Literal["auto", "require", "optional"]
# listener.worker_cpus: "auto", or the CPU numbers the workers are pinned to in turn (proxy.workers.worker_cpus)
WorkerCpus = Literal["auto"] | tuple[int, ...]
KDC_ACCOUNT_POLICIES: tuple[KdcAccountPolicy, ...] = get_args(KdcAccountPolicy)


# One 64 KiB Kerberos token (87 KiB of base64 in `Authorization: Negotiate`) plus ordinary headers and cookies.
DEFAULT_MAX_HEADER_BYTES = 128 * 1024
MAX_FIELD_BYTES = 96 * 1024  # one header field (aiohttp's max_field_size): the same token with room to spare
MIN_HEADER_BYTES = 8 * 1024  # below this ordinary browsers and devices are refused
DEFAULT_MAX_CONNECTIONS = 10_000
MAX_WORKERS = 1024  # listener.workers: more than any machine has cores; a typo's count was forked until none was left
# TLS sessions a worker keeps for resumption (proxy.tls.server.server_context): about 7 KiB each (the session and
# the client's certificate and chain), 14 MiB in all
DEFAULT_TLS_SESSION_CACHE = 2048
# listener.drain_timeout: a stopped gateway's requests in flight finish within it; below the 30 s after which the
# shipped systemd unit (TimeoutStopSec) and Kubernetes (terminationGracePeriodSeconds) kill the process
DEFAULT_DRAIN_TIMEOUT = 20.0


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    certificate: Path
    private_key: Path
    handshake_timeout: float = 10.0
    keepalive_timeout: float = 75.0  # idle before a request's headers are complete (new or kept-alive connection)
    client_body_timeout: float = 60.0  # idle between two reads of a request body the device is sending
    client_send_timeout: float = 60.0  # idle while the device does not take the answer's bytes
    max_body_bytes: int = 64 * 1024 * 1024
    workers: int = 1  # processes serving the port (SO_REUSEPORT when more than one); see proxy.workers
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # a request's whole header block (431 beyond); proxy.tls.limits
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open client connections per worker; more wait in the backlog
    max_connections_per_address: int = 0  # open connections per client address and worker; more are reset (0: off)
    proxy_protocol: bool = False  # connections open with a PROXY header (v1/v2) from a balancer; see below
    trusted_proxies: tuple[IPNetwork, ...] = ()  # balancers (CIDR) whose PROXY headers are believed
    event_loop: EventLoop = "uvloop"  # libuv's loop, or "asyncio"'s own (proxy.loop; docs/performance.md says why)
    http_server: HttpServer = "own"  # what parses the device's requests: proxy.device.server, or aiohttp's web server
    # TLS sessions kept per worker for resumption, the tickets naming them (0: stateless tickets, OpenSSL's default)
    tls_session_cache: int = DEFAULT_TLS_SESSION_CACHE
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT  # at SIGTERM: how long requests in flight may take to finish
    # the CPU each worker is pinned to, worker n on the n-th (wrapping): "auto" (the CPUs the gateway may use, in
    # order) or a list of CPU numbers; None: not pinned (proxy.workers, `worker_cpus`; docs/performance.md says why)
    worker_cpus: WorkerCpus | None = None


@dataclass(frozen=True)
class ClientCertificates:
    trust_anchors: tuple[Path, ...]
    intermediates: tuple[Path, ...]
    crls: tuple[Path, ...]
    revocation: RevocationPolicy
    restrictions: tuple[Restriction, ...] = ()  # a certificate must match one of them, when there are any
    crl_urls: tuple[str, ...] = ()  # the http(s) entries of `crls` (files are in `crls`)
    crl_refresh_seconds: float = 60.0  # how often CRL files are re-read and URLs re-fetched
    use_distribution_points: bool = False  # also fetch the CRL distribution points certificates name
    ocsp: OcspPolicy = "off"  # ask the responder a certificate names (AIA): "off" | "prefer" | "require"
    max_chain_depth: int = 4  # CA certificates between a client's certificate and its anchor (OpenSSL's verify depth)
    max_chain_bytes: int = 10240  # the largest Certificate message (the client's chain) the handshake reads
    crl_state: Path | None = None  # the CRL replay floors kept across restarts (proxy.certs.floors); None: memory only


@dataclass(frozen=True)
class Restriction:
    """One `[[client_certificates.restrictions]]` rule: a certificate matches when every criterion set holds."""

    name: str
    issuer: str | None = None  # RFC 4514 as the log's cert_issuer shows it (`as_logged_name`); or of a CA of the chain
    subject: str | None = None  # a glob over the subject in RFC 4514 form, e.g. "CN=*,OU=Devices,*"
    eku: tuple[str, ...] = ()  # extended key usage OIDs that must all be present
    extension_oid: str | None = None  # an extension that must be present ...
    extension_value: str | None = None  # ... with this value (see proxy.certs.restrictions), if set


@dataclass(frozen=True)
class Identity:
    sources: tuple[IdentitySource, ...] = ("san-upn",)  # the first name present in the certificate wins
    realm_map: dict[str, str] = field(default_factory=dict)
    enterprise_names: bool = False  # send the UPN to the KDC as an NT-ENTERPRISE name
    default_realm: str = ""  # for names without a domain (subject-cn, Basic "user"); default: the gateway's
    mapping: MappingMode = "upn"  # "strong": the certificate must belong to the account (proxy.identity.mapping)
    # strong-or-audit: how many seconds a weakly mapped certificate's notBefore may precede its account's
    # whenCreated (AD's CertificateBackdatingCompensation; default 0, as AD's when the value is not set)
    certificate_backdating_compensation: float = 0.0


@dataclass(frozen=True)
class Directory:
    """`[directory]`: where the mapping stage looks accounts up (proxy.directory)."""

    urls: tuple[str, ...]  # ldap:// or ldaps://, tried in order
    base_dn: str
    bind: DirectoryBind = "kerberos"  # SASL GSSAPI with [kerberos] keytab and principal
    bind_dn: str | None = None  # bind = "simple" only
    password_file: Path | None = field(default=None, repr=False)  # bind = "simple" only; ldaps:// only
    cache_seconds: float = 300.0  # an account looked up is trusted this long (0: every request asks)
    timeout: float = 5.0  # seconds per directory server before the next one is tried
    ca_file: Path | None = None  # ldaps://: the CAs trusted for the directory's certificate (None: the system's)


@dataclass(frozen=True)
class Authentication:
    """How a client proves who it is: certificate, Basic credentials checked with the KDC, or both."""

    mode: AuthMode = "certificate"
    basic_realm: str = "Exchange"
    basic_cache_seconds: float = 60.0  # verified credentials are trusted this long without the KDC (0: never)
    basic_failures_per_user: int = 5  # failed logins before a user is refused for a while (429)
    basic_failures_per_address: int = 20  # the same, per client address
    # A user's wrong passwords count until this long after the last one; at basic_failures_per_user of them, only
    # the password the KDC last accepted reaches the KDC until then. Set it to the directory's lockout observation
    # window ("Reset account lockout counter after") or more, so the gateway never forgets before AD does.
    basic_failure_window_seconds: float = 1800.0

    @property
    def client_certificate(self) -> Literal["required", "optional", "none"]:
        """What the TLS handshake asks of the client."""
        return "required" if self.mode == "certificate" else "none" if self.mode == "basic" else "optional"


@dataclass(frozen=True)
class Kerberos:
    principal: str
    keytab: Path
    krb5_config: Path | None = None
    max_in_flight: int = 16  # blocking GSSAPI calls allowed at once (each talks to the KDC)
    kdc_timeout: float = 10.0
    kdc_account: KdcAccountPolicy = "auto"  # an evidence ticket naming no account: proxy.kerberos.account
    # When positive, a user's cached ticket is renewed (S4U2Self + S4U2Proxy again, in the background) this long
    # after the exchange that made it, so an account disabled, deleted or restricted in the directory stops being
    # served within it, not at the ticket's end (10 hours in AD). 0 (the default): a ticket serves its life, two
    # KDC exchanges per user per ticket lifetime (issue #18), as Windows' own ticket caches do: proxy.kerberos.delegate.
    ticket_recheck_seconds: float = 0.0


# What a route's `context_headers` may send to the backend about the caller.
CONTEXT_SOURCES = ("upn", "principal", "cert_serial", "cert_sha256", "cert_subject", "cert_issuer")
# Headers the gateway writes itself or that end at each hop: a context header may not take their name.
_RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }
)
_TOKEN_CHARS = frozenset("!#$%&'*+-.^`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# ActiveSync Ping heartbeats reach 3540 s and EWS streaming subscriptions 30 min: the default read timeout
# (seconds without a byte from the upstream) lets both through.
DEFAULT_READ_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str  # scheme://host[:port], no path
    spn: str  # e.g. HTTP/cas.lab.test
    host: str | None = None  # only requests for this host name (Host header, port ignored); None: any
    preserve_host: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = DEFAULT_READ_TIMEOUT
    ca_bundle: Path | None = None  # https upstreams: the only CAs trusted for it (None: the system's)
    server_name: str | None = None  # https upstreams: SNI and the name verified, instead of the upstream host
    context_headers: tuple[tuple[str, str], ...] = ()  # (header name, one of CONTEXT_SOURCES)
    backend_auth: BackendAuth = "negotiate"  # "basic": forward the client's verified Basic header itself
    case_sensitive: bool = False  # prefix compared as written; by default without regard to case, as IIS does
    backend_binding: BackendBinding = "request"  # "connection": a token only on a backend connection's first request

    @cached_property
    def _folded_prefix(self) -> str:
        return self.prefix.lower()

    def matches(self, path: str) -> bool:
        """Whether `path` (decoded and normalised: `proxy.target`) is under this route's prefix. A prefix is whole
        path segments: `/ews` takes `/ews` and `/ews/...`, never `/ewsfoo` (an IIS virtual directory is a segment)."""
        prefix = self.prefix
        head = path[: len(prefix)]
        if not (head == prefix if self.case_sensitive else head.lower() == self._folded_prefix):
            return False
        return prefix[-1] == "/" or len(path) == len(prefix) or path[len(prefix)] == "/"

    @property
    def upstream_host(self) -> str:
        return urlsplit(self.upstream).hostname or ""

    @property
    def https(self) -> bool:
        return self.upstream.startswith("https://")

    @cached_property
    def facts(self) -> tuple[str, str, str, str]:
        """What the summary line says of the route a request took: `route`, `spn`, `upstream`, `backend_auth`."""
        return (self.prefix, self.spn, self.upstream, self.backend_auth)

    @cached_property
    def gss_target(self) -> str:
        """The SPN in GSSAPI host-based form: HTTP/cas.lab.test -> HTTP@cas.lab.test."""
        service, _, host = self.spn.partition("/")
        return f"{service}@{host}"


@dataclass(frozen=True)
class Admin:
    """The admin listener (health, readiness, metrics): plain HTTP on loopback, TLS + client allow-list elsewhere."""

    host: str
    port: int
    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = None  # the CAs (root, intermediates) of admin client certificates: PEM bundle, or one DER
    allowed_clients: tuple[str, ...] = ()  # subjects (RFC 4514) or SHA-256 fingerprints (hex)
    socket: Path | None = None  # also (or only, without a bind: port 0) on this Unix socket, mode 0600
    crls: tuple[Path, ...] = ()  # CRLs of client_ca's CAs (files; `crl_urls` the http(s) ones), for operators'
    crl_urls: tuple[str, ...] = ()  # certificates outside the device trust list; refreshed as the devices' are

    @property
    def tls(self) -> bool:
        return self.certificate is not None

    @property
    def bound(self) -> bool:
        """Whether the admin listener has a TCP address (`admin.bind`), not only a Unix socket."""
        return self.port != 0


@dataclass(frozen=True)
class Reload:
    watch: bool = False  # reload when the configuration or a file it names changes (besides SIGHUP)
    watch_interval: float = 2.0


@dataclass(frozen=True)
class Doctor:
    canary_user: str | None = None  # a UPN `kcd-proxy doctor` delegates for when --user is not given
    backend_header_limit: int = 16384  # bytes per request header the backends accept (http.sys default)


@dataclass(frozen=True)
class Traces:
    """Per-request traces (`proxy.observability.traces`): how many the admin listener keeps, and an export."""

    keep: int = 200  # the most recent requests kept in memory for /traces and the admin page
    export: Path | None = None  # also append every request's trace to this file, one JSON object a line


@dataclass(frozen=True)
class Config:
    path: Path
    listener: Listener
    client_certificates: ClientCertificates
    identity: Identity
    kerberos: Kerberos
    routes: tuple[Route, ...]
    admin: Admin | None = None  # off unless [admin] bind is set
    reload: Reload = field(default_factory=Reload)
    doctor: Doctor = field(default_factory=Doctor)
    authentication: Authentication = field(default_factory=Authentication)
    traces: Traces = field(default_factory=Traces)
    directory: Directory | None = None  # required by identity.mapping "strong" and "strong-or-audit"

    def route_for(self, path: str, host: str | None = None) -> Route | None:
        """The route of a request: the longest prefix among routes for any host or for the request's
        `host` (the Host header; port and case ignored); at equal length a route naming the host wins."""
        name = host_name(host) if host else None
        for route in self.routes:  # sorted at load time: longest prefix first, then host-specific first
            if route.matches(path) and route.host in (None, name):
                return route
        return None


def host_name(host: str) -> str:
    """The host name of a Host header value: `Mail.Example.com:443` -> `mail.example.com`, `[::1]:8443` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


T = TypeVar("T")


class _Reader:
    """Reads typed values out of the parsed TOML, collecting problems instead of stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.headers: dict[str, set[str]] = {}  # each table's header as written (`[kerberos]`, `[[routes]]`): its keys
        self._unknown: list[tuple[int, str, str]] = []  # (index in problems, key, its table's header): see `finish`

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
        if isinstance(value, float) and not math.isfinite(value):  # TOML's nan and inf; `nan <= 0` is false
            self.problem(key, f"expected a finite number, got {value!r}")
            return default
        return value

    def file(self, key: str, value: str | None, *, required: bool = True) -> Path:
        if value is None:
            return Path()
        p = Path(value)
        if not p.is_absolute():
            p = self.base / p
        if not required:
            return p
        try:
            if not p.is_file():  # a FIFO or a device (/dev/zero) is no file to read either
                self.problem(key, f"not a regular file: {p}" if p.exists() else f"file not found: {p}")
            else:
                os.close(os.open(p, os.O_RDONLY))  # read later (a keytab by GSSAPI, per request): fail at the start
        except PermissionError as e:
            self.problem(
                key,
                f"{p}: not readable by {_this_user()} ({e.strerror}); give the gateway's user read access (its group, "
                "mode 0640), or pass it as a systemd credential (LoadCredential=, deploy/systemd/kcd-proxy.service); "
                "run check-config as that user",
            )
        except OSError as e:  # is_file() says False only for a missing file; a name too long raises
            self.problem(key, f"{e.strerror}: {p}")
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
        header = _header(prefix)
        self.headers.setdefault(header, set()).update(known)
        for name in sorted(set(table) - known):
            near = difflib.get_close_matches(name, sorted(known), n=1)  # a misspelt key's likely meaning
            hint = f"; did you mean {near[0]}?" if near else ""
            self._unknown.append((len(self.problems), name, header))
            self.problem(f"{prefix}.{name}" if prefix else name, f"unknown key{hint}")

    def finish(self) -> None:
        """Name the table an unknown key belongs to where it is a key of another table: TOML puts a key in the
        table whose header comes before it, so one written above its own header (`prefix` just before
        `[[routes]]`, `bind` before `[listener]`) lands in the table above, or in no table at all."""
        for index, name, header in self._unknown:
            owners = [other for other, keys in self.headers.items() if other != header and other and name in keys]
            if not owners:
                continue
            key = self.problems[index].partition(": ")[0]
            above = len(owners) == 1 and (not header or owners[0].startswith("[["))  # the header below it, likely
            where = f"written above its {owners[0]} header?" if above else "written under the wrong header?"
            self.problems[index] = f"{key}: unknown key (a key of {' or '.join(owners)}: {where}) (in {self.path})"


def _header(prefix: str) -> str:
    """The header of the table at `prefix` as a TOML file writes it: `kerberos` is `[kerberos]`, `routes[2]` is
    `[[routes]]` (an array of tables); the top level (no header) is ""."""
    if not prefix:
        return ""
    bare = re.sub(r"\[\d+\]", "", prefix)
    return f"[[{bare}]]" if prefix.endswith("]") else f"[{bare}]"


def _this_user() -> str:
    """The name of the user this process runs as, or its uid where it has no name (a container's)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _host_port(r: _Reader, key: str, value: str | None) -> tuple[str, int]:
    if value is None:
        return "", 0
    if "://" in value:  # a URL's scheme (and a path) where the address is meant
        address = value.partition("://")[2].partition("/")[0]
        r.problem(key, f"expected host:port, got {value!r}: an address, not a URL (write {address!r})")
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


def _workers(r: _Reader, t: dict[str, Any]) -> int:
    """`listener.workers`: a process count up to MAX_WORKERS (the supervisor forks that many at start)."""
    workers = _number(r, t, "listener", "workers", int, 1)
    if workers > MAX_WORKERS:
        r.problem("listener.workers", f"at most {MAX_WORKERS} (one or two a core), got {workers}")
        return 1
    return workers


def _number(r: _Reader, t: dict[str, Any], prefix: str, name: str, kind: type[T], default: T) -> T:
    """A positive int or float under `prefix.name`, or its default."""
    key = f"{prefix}.{name}"
    return _positive(r, key, r.get(t, key, name, kind, default), default)


N = TypeVar("N", int, float)

# Keys whose 0 turns something off: what 0 means there, and what a positive value counts (`_off_or_positive`).
_ZERO_MEANS = {
    "listener.max_connections_per_address": ("off", "open connections per client address"),  # 0 by default: CGNAT
    "listener.tls_session_cache": ("stateless session tickets", "TLS sessions per worker"),
    "kerberos.ticket_recheck_seconds": ("a cached ticket serves its whole life", "seconds"),
    "listener.drain_timeout": ("requests in flight are cut at once", "seconds"),
}


def _off_or_positive(r: _Reader, t: dict[str, Any], key: str, default: N) -> N:
    """`key` (one of `_ZERO_MEANS`): 0 or a positive number of default's type; the default when absent, not a number
    (said so by `get`) or negative (said so here, with what 0 means)."""
    value = r.get(t, key, key.rpartition(".")[2], type(default), default)
    if value is None:
        return default
    if value < 0:
        zero, unit = _ZERO_MEANS[key]
        r.problem(key, f"0 ({zero}) or a positive number of {unit}, got {value}")
        return default
    return value


def _choice(r: _Reader, key: str, value: str | None, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        r.problem(key, f"expected one of {', '.join(choices)}; got {value!r}")
        return default
    return value


def _named_choice(r: _Reader, t: dict[str, Any], prefix: str, name: str, choices: tuple[str, ...], default: str) -> str:
    """One of `choices` under `prefix.name`, or `default` when it is absent or empty."""
    key = f"{prefix}.{name}"
    return _choice(r, key, r.get(t, key, name, str, "") or None, choices, default)


def _listener(r: _Reader, t: dict[str, Any]) -> Listener:
    r.unknown(
        t,
        "listener",
        {
            *("bind", "certificate", "private_key", "handshake_timeout", "keepalive_timeout", "max_body_bytes"),
            *("client_body_timeout", "client_send_timeout", "workers", "max_header_bytes", "max_connections"),
            *("proxy_protocol", "trusted_proxies", "event_loop", "http_server", "max_connections_per_address"),
            *("tls_session_cache", "drain_timeout", "worker_cpus"),
        },
    )
    proxy_protocol, trusted_proxies = _proxy_protocol(r, t)
    host, port = _host_port(r, "listener.bind", r.get(t, "listener.bind", "bind", str))
    return Listener(
        host=host,
        port=port,
        certificate=r.file("listener.certificate", r.get(t, "listener.certificate", "certificate", str)),
        private_key=r.file("listener.private_key", r.get(t, "listener.private_key", "private_key", str)),
        handshake_timeout=_number(r, t, "listener", "handshake_timeout", float, 10.0),
        keepalive_timeout=_number(r, t, "listener", "keepalive_timeout", float, 75.0),
        client_body_timeout=_number(r, t, "listener", "client_body_timeout", float, 60.0),
        client_send_timeout=_number(r, t, "listener", "client_send_timeout", float, 60.0),
        max_body_bytes=_number(r, t, "listener", "max_body_bytes", int, 64 * 1024 * 1024),
        workers=_workers(r, t),
        max_header_bytes=_max_header_bytes(r, t),
        max_connections=_number(r, t, "listener", "max_connections", int, DEFAULT_MAX_CONNECTIONS),
        max_connections_per_address=_off_or_positive(r, t, "listener.max_connections_per_address", 0),
        proxy_protocol=proxy_protocol,
        trusted_proxies=trusted_proxies,
        event_loop=_event_loop(r, t),
        http_server=cast(HttpServer, _named_choice(r, t, "listener", "http_server", HTTP_SERVERS, "own")),
        tls_session_cache=_off_or_positive(r, t, "listener.tls_session_cache", DEFAULT_TLS_SESSION_CACHE),
        drain_timeout=_off_or_positive(r, t, "listener.drain_timeout", DEFAULT_DRAIN_TIMEOUT),
        worker_cpus=_worker_cpus(r, t),
    )


def _worker_cpus(r: _Reader, t: dict[str, Any]) -> WorkerCpus | None:
    """`listener.worker_cpus`: "auto" or a list of distinct CPU numbers; absent, None (the workers are not pinned).
    Whether this machine has those CPUs is `proxy.workers.worker_cpus_problem`'s to say, at start and in check-config
    (a replacement worker reading the file is pinned already: it may run on one CPU only)."""
    key, value = "listener.worker_cpus", t.get("worker_cpus")
    if value is None or value == "auto":
        return value
    fix = 'expected "auto" or a list of CPU numbers such as [0, 1] (leave it out for no pinning)'
    if not isinstance(value, list) or not value:
        r.problem(key, f"{fix}, got {value!r}")
        return None
    if not all(isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in value):
        r.problem(key, f"{fix}; CPU numbers count from 0, got {value!r}")
        return None
    if len(set(value)) < len(value):
        twice = sorted({cpu for cpu in value if value.count(cpu) > 1})
        r.problem(key, f"CPU {', '.join(map(str, twice))} listed twice: a CPU for each worker, each listed once")
        return None
    return tuple(value)


def _event_loop(r: _Reader, t: dict[str, Any]) -> EventLoop:
    """`listener.event_loop`: one of EVENT_LOOPS, and "uvloop" only where the uvloop package imports."""
    chosen = cast(EventLoop, _named_choice(r, t, "listener", "event_loop", EVENT_LOOPS, "uvloop"))
    if chosen == "uvloop":
        from proxy.loop import uvloop_missing

        missing = uvloop_missing()
        if missing is not None:
            r.problem("listener.event_loop", f'"uvloop" is not usable here ({missing}); install it or use "asyncio"')
    return chosen


def _max_header_bytes(r: _Reader, t: dict[str, Any]) -> int:
    value = _number(r, t, "listener", "max_header_bytes", int, DEFAULT_MAX_HEADER_BYTES)
    if value < MIN_HEADER_BYTES:
        r.problem("listener.max_header_bytes", f"at least {MIN_HEADER_BYTES} bytes, got {value}")
        return DEFAULT_MAX_HEADER_BYTES
    return value


def _proxy_protocol(r: _Reader, t: dict[str, Any]) -> tuple[bool, tuple[IPNetwork, ...]]:
    """`listener.proxy_protocol` and the balancers it is accepted from (proxy.tls.proxy_protocol)."""
    enabled = bool(r.get(t, "listener.proxy_protocol", "proxy_protocol", bool, False))
    raw = t.get("trusted_proxies", [])
    if not isinstance(raw, list):
        r.problem("listener.trusted_proxies", f'expected a list of CIDR blocks like ["10.0.0.0/24"], got {raw!r}')
        raw = []
    networks: list[IPNetwork] = []
    for i, entry in enumerate(raw):
        try:
            networks.append(ipaddress.ip_network(str(entry) if isinstance(entry, str) else "-", strict=True))
        except ValueError as e:
            r.problem(f"listener.trusted_proxies[{i}]", f"expected a CIDR block such as 10.0.0.0/24: {e}")
            continue
        if networks[-1].prefixlen == 0:
            r.problem(
                f"listener.trusted_proxies[{i}]",
                f"{entry} trusts every address: any client could claim any device's address; name the balancers",
            )
    if enabled and not raw:
        r.problem(
            "listener.trusted_proxies",
            "proxy_protocol = true needs the balancers' addresses (CIDR); without them no connection is accepted",
        )
    if raw and not enabled:
        r.problem("listener.trusted_proxies", "only meaningful with listener.proxy_protocol = true")
    return enabled, tuple(networks)


def _client_certificates(r: _Reader, t: dict[str, Any]) -> ClientCertificates:
    k = "client_certificates"
    r.unknown(
        t,
        k,
        {
            "trust_anchors",
            "intermediates",
            "crls",
            "crl_refresh_seconds",
            "use_distribution_points",
            "revocation",
            "ocsp",
            "restrictions",
            "max_chain_depth",
            "max_chain_bytes",
            "crl_state",
        },
    )
    anchors = r.files(t, f"{k}.trust_anchors", "trust_anchors")
    if not anchors:
        r.problem(f"{k}.trust_anchors", "at least one trust anchor is required")
    crls, crl_urls = _crl_locations(r, t, f"{k}.crls")
    use_dps = bool(r.get(t, f"{k}.use_distribution_points", "use_distribution_points", bool, False))
    explicit = r.get(t, f"{k}.revocation", "revocation", str, "")
    # Without CRLs there is nothing to check: default to "off" (and say so at start-up), but an
    # explicit "require" with no CRLs would refuse every certificate, which is a configuration error.
    has_crls = bool(crls or crl_urls or use_dps)
    policy = _choice(r, f"{k}.revocation", explicit or None, REVOCATION_POLICIES, "require" if has_crls else "off")
    if policy == "require" and not has_crls:
        r.problem(
            f"{k}.revocation",
            '"require" needs at least one CRL in client_certificates.crls, or use_distribution_points = true',
        )
    ocsp = _named_choice(r, t, k, "ocsp", OCSP_POLICIES, "off")
    return ClientCertificates(
        trust_anchors=anchors,
        intermediates=r.files(t, f"{k}.intermediates", "intermediates"),
        crls=crls,
        revocation=cast(RevocationPolicy, policy),
        restrictions=_restrictions(r, t.get("restrictions", [])),
        crl_urls=crl_urls,
        crl_refresh_seconds=_number(r, t, k, "crl_refresh_seconds", float, 60.0),
        use_distribution_points=use_dps,
        ocsp=cast(OcspPolicy, ocsp),
        max_chain_depth=_number(r, t, k, "max_chain_depth", int, 4),
        max_chain_bytes=_number(r, t, k, "max_chain_bytes", int, 10240),
        crl_state=_crl_state(r, t),
    )


def _crl_state(r: _Reader, t: dict[str, Any]) -> Path | None:
    """`client_certificates.crl_state`: a file in a directory that exists (check-config also checks it is writable,
    and the file, if there is one, usable: `proxy.ops.check`)."""
    key = "client_certificates.crl_state"
    value = r.get(t, key, "crl_state", str, "")
    if not value:
        return None
    path = r.file(key, value, required=False)
    if not _is_dir(path.parent):
        r.problem(key, f"directory not found: {path.parent} (the state directory, writable by the gateway's user)")
    elif _is_dir(path):
        r.problem(key, f"{path} is a directory; name a file in it, such as {path / 'crl-state.json'}")
    return path


def _crl_locations(r: _Reader, t: dict[str, Any], key: str) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """`crls`: files (which must exist) and http(s) URLs, told apart by their scheme."""
    raw = t.get("crls", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        r.problem(key, "expected a list of CRL files and http(s) URLs")
        return (), ()
    # here, not at the top: proxy.certs.sources imports aiohttp, start-up CPU for every command loading a configuration
    from proxy.certs.sources import shown_location

    files: list[Path] = []
    urls: list[str] = []
    for i, value in enumerate(raw):
        scheme = urlsplit(value).scheme.lower() if "://" in value else ""
        if scheme in ("http", "https"):
            if not urlsplit(value).hostname:
                r.problem(f"{key}[{i}]", f"expected http(s)://host/path, got {shown_location(value)!r}")
            urls.append(value)
        elif scheme:
            r.problem(f"{key}[{i}]", f"only files and http(s) URLs are supported, got {shown_location(value)!r}")
        else:
            files.append(r.file(f"{key}[{i}]", value))
    return tuple(files), tuple(urls)


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


# An escape `proxy.printable` writes for an invisible character (`\x1b`, `\u202e`, `\U000e0041`), or an RFC 4514
# escape (a backslash and what follows it), which stays: in an RFC 4514 name a backslash as text is itself escaped.
_LOGGED_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)", re.DOTALL)


def as_logged_name(text: str) -> str:
    """An RFC 4514 name written as the log shows one (`proxy.printable`'s escapes for its invisible characters), in
    the form the log shows (cryptography's `rfc4514_string`, then `printable`), or ValueError if it is none."""

    def unescaped(found: re.Match[str]) -> str:
        if len(found[1]) == 1:
            return found[0]
        char = chr(int(found[1][1:], 16))
        return char if printable(char) != char else found[0]  # only what printable escapes

    return printable(x509.Name.from_rfc4514_string(_LOGGED_ESCAPE.sub(unescaped, text)).rfc4514_string())


def _oid(r: _Reader, key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not _OID.fullmatch(value):
        r.problem(key, f"expected an OID in dotted form (e.g. 1.3.6.1.5.5.7.3.2), got {value!r}")
        return None
    return value


def _restrictions(r: _Reader, raw: Any) -> tuple[Restriction, ...]:
    k = "client_certificates.restrictions"
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        r.problem(k, "expected [[client_certificates.restrictions]] tables")
        return ()
    rules: list[Restriction] = []
    for i, t in enumerate(raw):
        key = f"{k}[{i}]"
        r.unknown(t, key, {"name", "issuer", "subject", "eku", "extension"})
        issuer = r.get(t, f"{key}.issuer", "issuer", str, "") or None
        if issuer is not None and (shown := printable(issuer)) != issuer:
            r.problem(
                f"{key}.issuer",
                "holds invisible characters, which no issuer as matched holds: the issuer matches as the log's "
                "cert_issuer shows it, such characters as escapes; copy cert_issuer's value from the log line, quotes "
                f"included, or write the escapes as TOML then reads them: issuer = {json.dumps(shown)}",
            )
        elif issuer is not None:
            try:
                issuer = as_logged_name(issuer)
            except ValueError as e:
                r.problem(f"{key}.issuer", f"not an RFC 4514 name ({e}): {issuer!r}")
        eku = r.get(t, f"{key}.eku", "eku", list, []) or []
        oids = tuple(oid for j, v in enumerate(eku) if (oid := _oid(r, f"{key}.eku[{j}]", v)) is not None)
        extension = r.get(t, f"{key}.extension", "extension", dict, {}) or {}
        r.unknown(extension, f"{key}.extension", {"oid", "value"})
        ext_oid = _oid(r, f"{key}.extension.oid", extension.get("oid")) if extension else None
        ext_value = r.get(extension, f"{key}.extension.value", "value", str, "") or None
        subject = r.get(t, f"{key}.subject", "subject", str, "") or None
        if subject is not None and (shown := printable(subject)) != subject:
            r.problem(
                f"{key}.subject",
                "holds invisible characters, which no subject as matched holds: the glob matches the subject as the "
                "log's cert_subject shows it, such characters as escapes; copy cert_subject's value from the log "
                f"line, quotes included, or write the escapes as TOML then reads them: subject = {json.dumps(shown)}",
            )
        rule = Restriction(
            name=r.get(t, f"{key}.name", "name", str, "") or key,
            issuer=issuer,
            subject=subject,
            eku=oids,
            extension_oid=ext_oid,
            extension_value=ext_value,
        )
        if not (rule.issuer or rule.subject or rule.eku or rule.extension_oid or t.get("eku") or extension):
            r.problem(key, "sets no criterion: give issuer, subject, eku or extension")
        rules.append(rule)
    return tuple(rules)


def _identity_sources(r: _Reader, raw: Any) -> tuple[IdentitySource, ...]:
    values = [raw] if isinstance(raw, str) else raw
    choices = ", ".join(IDENTITY_SOURCES)
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        r.problem("identity.source", f"expected one of {choices}, or a list of them; got {raw!r}")
        return ("san-upn",)
    for i, value in enumerate(values):
        _choice(r, "identity.source" if values is not raw else f"identity.source[{i}]", value, IDENTITY_SOURCES, "")
    if len(set(values)) != len(values):
        r.problem("identity.source", f"lists a source twice: {values!r}")
    return tuple(cast(IdentitySource, v) for v in values if v in IDENTITY_SOURCES) or ("san-upn",)


def _capitals_only(name: str) -> bool:
    """Whether `name` has ASCII capitals and no ASCII small letters (`LAB.TEST`, a realm as Kerberos writes one)."""
    return small_letters_only(name.swapcase())


def small_letters_only(name: str) -> bool:
    """Whether `name` has ASCII small letters and no ASCII capitals (`corp.example`, a domain as DNS writes one)."""
    return any("a" <= c <= "z" for c in name) and not any("A" <= c <= "Z" for c in name)


def _realms_in_one_case(
    r: _Reader, written: dict[str, Any], identity: Identity, kerberos: Kerberos, directory: Directory | None
) -> None:
    """A realm of `identity` that is a realm named elsewhere (kerberos.principal's, [directory]'s) in another case:
    realm names are case-sensitive, and the KDC serving one serves no other, so no user mapped there is ever served
    (`lab.test` beside LAB.TEST: each request refused as "no Kerberos realm serves ...")."""
    known = {kerberos.principal.rpartition("@")[2]: "kerberos.principal's realm"}
    if directory is not None:
        domain = ".".join(
            p.split("=", 1)[1] for p in directory.base_dn.split(",") if p.strip().upper().startswith("DC=")
        )
        known.setdefault(domain.upper(), "[directory]'s realm (from base_dn)")
    mine = [(f"identity.realm_map.{suffix}", realm) for suffix, realm in written.items() if isinstance(realm, str)]
    mine += [("identity.default_realm", identity.default_realm)] if identity.default_realm else []
    for key, realm in mine:
        for other, where in known.items():
            if other and other != realm and ascii_lower(other) == ascii_lower(realm):
                r.problem(
                    key,
                    f"{realm!r} is {where} {other!r} in another case: Kerberos realm names are case-sensitive and "
                    f"one KDC serves one of them, so no user mapped here would be served; write the KDC's realm in "
                    f"both (Active Directory's: {realm.upper()!r})",
                )


def _realm(r: _Reader, key: str, value: str) -> str:
    if value and (not value.isprintable() or any(c in value for c in "@/\\ ")):
        r.problem(key, f"expected a Kerberos realm name (e.g. CORP.EXAMPLE.COM), got {value!r}")
    return value


def _authentication(r: _Reader, t: dict[str, Any]) -> Authentication:
    k = "authentication"
    keys = (
        "mode",
        "basic_realm",
        "basic_cache_seconds",
        "basic_failures_per_user",
        "basic_failures_per_address",
        "basic_failure_window_seconds",
    )
    r.unknown(t, k, set(keys))
    mode = _named_choice(r, t, k, "mode", AUTH_MODES, "certificate")
    realm = r.get(t, f"{k}.basic_realm", "basic_realm", str, "") or "Exchange"
    if not realm.isprintable() or '"' in realm or "\\" in realm:
        r.problem(f"{k}.basic_realm", f"must be printable text without quotes or backslashes, got {realm!r}")
    cache = r.get(t, f"{k}.basic_cache_seconds", "basic_cache_seconds", float, 60.0)
    if cache is None or cache < 0:
        r.problem(f"{k}.basic_cache_seconds", f"must be 0 (no cache) or more, got {cache!r}")
        cache = 0.0
    return Authentication(
        mode=cast(AuthMode, mode),
        basic_realm=realm,
        basic_cache_seconds=cache,
        basic_failures_per_user=_number(r, t, k, "basic_failures_per_user", int, 5),
        basic_failures_per_address=_number(r, t, k, "basic_failures_per_address", int, 20),
        basic_failure_window_seconds=_number(r, t, k, "basic_failure_window_seconds", float, 1800.0),
    )


def _identity(r: _Reader, t: dict[str, Any]) -> Identity:
    keys = {
        "source",
        "realm_map",
        "enterprise_names",
        "default_realm",
        "mapping",
        "certificate_backdating_compensation",
    }
    r.unknown(t, "identity", keys)
    mapping = r.get(t, "identity.mapping", "mapping", str, "") or None
    backdating_key = "identity.certificate_backdating_compensation"
    backdating = r.get(t, backdating_key, "certificate_backdating_compensation", float, 0.0)
    if backdating is None or not 0 <= backdating <= MAX_BACKDATING_SECONDS:
        r.problem(backdating_key, f"must be seconds from 0 to {MAX_BACKDATING_SECONDS} (50 years), got {backdating!r}")
        backdating = 0.0
    sources = _identity_sources(r, t.get("source", "san-upn"))
    realm_map = r.get(t, "identity.realm_map", "realm_map", dict, {}) or {}
    clean: dict[str, str] = {}
    written_as: dict[str, str] = {}  # a folded key -> the key as written that put it in `clean`
    for suffix, realm in realm_map.items():
        if "*" in suffix:  # a certificate's or DNS's wildcard: matched as written, it matched no UPN
            example = json.dumps(suffix.lstrip("*.") or "corp.example")
            r.problem(
                f"identity.realm_map.{suffix}",
                f"a key is one UPN suffix, matched whole (no wildcards): write each one, such as {example}",
            )
            continue
        if not suffix or "@" in suffix or suffix != suffix.strip() or not suffix.isprintable():  # no UPN matches it
            meant = suffix.strip().lstrip("@")
            r.problem(
                f"identity.realm_map.{suffix}",
                "a key is a UPN suffix such as corp.example, with no '@', no space at either end and nothing "
                f"invisible: write {json.dumps(meant if meant.isprintable() else 'corp.example')} (got "
                f"{json.dumps(suffix)})",
            )
            continue
        if not isinstance(realm, str) or not realm:
            r.problem(f"identity.realm_map.{suffix}", f"expected a realm name, got {realm!r}")
            continue
        if _capitals_only(suffix) and small_letters_only(realm):  # { "LAB.TEST" = "corp.example" }
            r.problem(
                f"identity.realm_map.{suffix}",
                f"written the wrong way round? {{ {json.dumps(suffix)} = {json.dumps(realm)} }} maps users whose UPN "
                f"ends in @{ascii_lower(suffix)} to the realm {realm!r}; a key is a UPN suffix (case ignored: write it "
                f"in lower case), its value the realm: {{ {json.dumps(realm)} = {json.dumps(suffix)} }}",
            )
            continue
        folded = ascii_lower(suffix)  # ASCII case only (principal)
        if folded in clean and clean[folded] != realm:  # one suffix to two realms: the last written won, unsaid
            r.problem(
                f"identity.realm_map.{suffix}",
                f"the same UPN suffix as identity.realm_map.{written_as[folded]} (keys match without regard to case), "
                f"mapped to another realm ({realm!r}, not {clean[folded]!r}): keep the one meant",
            )
            continue
        # the realm of every principal built with it: a '/', '@', '\\' or space there is no realm the KDC serves
        clean[folded], written_as[folded] = _realm(r, f"identity.realm_map.{suffix}", realm), suffix
    return Identity(
        sources=sources,
        realm_map=clean,
        enterprise_names=bool(r.get(t, "identity.enterprise_names", "enterprise_names", bool, False)),
        default_realm=_realm(
            r, "identity.default_realm", r.get(t, "identity.default_realm", "default_realm", str, "") or ""
        ),
        mapping=cast(MappingMode, _choice(r, "identity.mapping", mapping, MAPPING_MODES, "upn")),
        certificate_backdating_compensation=backdating,
    )


_DN_PART = re.compile(r"[A-Za-z][A-Za-z0-9-]*=.+")


def _directory(r: _Reader, t: dict[str, Any]) -> Directory | None:
    k = "directory"
    r.unknown(t, k, {"urls", "base_dn", "bind", "bind_dn", "password_file", "cache_seconds", "timeout", "ca_file"})
    if not t:
        return None
    raw_urls = t.get("urls")
    if isinstance(raw_urls, str):
        raw_urls = [raw_urls]
    urls: list[str] = []
    if not isinstance(raw_urls, list) or not raw_urls or not all(isinstance(u, str) for u in raw_urls):
        r.problem(f"{k}.urls", 'expected a list of ldap:// or ldaps:// URLs, e.g. ["ldap://dc1.corp.example.com"]')
    else:
        for i, url in enumerate(raw_urls):
            parts = urlsplit(url)
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/"):
                r.problem(f"{k}.urls[{i}]", f"expected ldap://host[:port] or ldaps://host[:port], got {url!r}")
            urls.append(url.rstrip("/"))
    base_dn = r.get(t, f"{k}.base_dn", "base_dn", str) or ""
    if base_dn and not all(_DN_PART.fullmatch(part.strip()) for part in base_dn.split(",")):
        r.problem(f"{k}.base_dn", f"expected a distinguished name such as DC=corp,DC=example,DC=com, got {base_dn!r}")
    elif base_dn and not any(part.strip().upper().startswith("DC=") for part in base_dn.split(",")):
        r.problem(f"{k}.base_dn", f"needs the domain's DC= components (the realm comes from them): {base_dn!r}")
    bind = _named_choice(r, t, k, "bind", DIRECTORY_BINDS, "kerberos")
    bind_dn = r.get(t, f"{k}.bind_dn", "bind_dn", str, "") or None
    password = r.get(t, f"{k}.password_file", "password_file", str, "") or None
    if bind == "simple":
        if bind_dn is None:
            r.problem(f"{k}.bind_dn", 'bind = "simple" needs the account to bind as (bind_dn)')
        if password is None:
            r.problem(f"{k}.password_file", 'bind = "simple" needs a file holding the password (password_file)')
        for i, url in enumerate(urls):
            if not url.startswith("ldaps://"):
                r.problem(
                    f"{k}.urls[{i}]",
                    f'bind = "simple" sends a password: only ldaps:// URLs, got {url!r} (or use bind = "kerberos")',
                )
    else:
        for name, given in (("bind_dn", bind_dn), ("password_file", password)):
            if given is not None:
                r.problem(f"{k}.{name}", 'only with bind = "simple" (bind = "kerberos" uses [kerberos] keytab)')
    cache = r.get(t, f"{k}.cache_seconds", "cache_seconds", float, 300.0)
    if cache is None or cache < 0:
        r.problem(f"{k}.cache_seconds", f"must be 0 (no cache) or more, got {cache!r}")
        cache = 0.0
    ca_file = r.get(t, f"{k}.ca_file", "ca_file", str, "") or None
    return Directory(
        urls=tuple(urls),
        base_dn=base_dn,
        bind=cast(DirectoryBind, bind),
        bind_dn=bind_dn if bind == "simple" else None,
        password_file=r.file(f"{k}.password_file", password) if password and bind == "simple" else None,
        cache_seconds=cache,
        timeout=_number(r, t, k, "timeout", float, 5.0),
        ca_file=_ca_bundle(r, f"{k}.ca_file", ca_file),  # OpenLDAP's TLS (GnuTLS) reads PEM, and trusts none from DER
    )


def _kerberos(r: _Reader, t: dict[str, Any]) -> Kerberos:
    keys = {
        "principal",
        "keytab",
        "krb5_config",
        "max_in_flight",
        "kdc_timeout",
        "kdc_account",
        "ticket_recheck_seconds",
    }
    r.unknown(t, "kerberos", keys)
    principal = r.get(t, "kerberos.principal", "principal", str) or ""
    if principal and "@" not in principal:
        r.problem(
            "kerberos.principal",
            f"{principal!r} has no realm: write it as {principal}@REALM, the realm in capitals (Active Directory: the "
            "service account's name, e.g. svc-kcdproxy@CORP.EXAMPLE.COM; MIT: the gateway's service principal, "
            "e.g. HTTP/kcd-gw.corp.example.com@CORP.EXAMPLE.COM)",
        )
    krb5 = r.get(t, "kerberos.krb5_config", "krb5_config", str, "")
    kdc_account = _named_choice(r, t, "kerberos", "kdc_account", KDC_ACCOUNT_POLICIES, "auto")
    keytab = r.get(t, "kerberos.keytab", "keytab", str)
    if keytab is not None and (kind := re.match(r"(?:WR)?FILE:", keytab)):  # KRB5_KTNAME's form, krb5.conf's too
        r.problem("kerberos.keytab", f"{keytab!r} is a keytab name, not a path: write the path without {kind[0]!r}")
        keytab = None
    return Kerberos(
        principal=principal,
        keytab=r.file("kerberos.keytab", keytab),
        krb5_config=r.file("kerberos.krb5_config", krb5) if krb5 else None,
        max_in_flight=_number(r, t, "kerberos", "max_in_flight", int, 16),
        kdc_timeout=_number(r, t, "kerberos", "kdc_timeout", float, 10.0),
        kdc_account=cast(KdcAccountPolicy, kdc_account),
        ticket_recheck_seconds=_off_or_positive(r, t, "kerberos.ticket_recheck_seconds", 0.0),
    )


_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
_ROUTE_KEYS = {
    *("prefix", "host", "upstream", "spn", "preserve_host", "connect_timeout", "read_timeout"),
    *("ca_bundle", "server_name", "context_headers"),
    *("backend_auth", "case_sensitive", "backend_binding"),
}


def _hostname(r: _Reader, key: str, value: str | None) -> str | None:
    """A DNS name or an IP address, lower-cased; None when not given."""
    if not value:
        return None
    name = value.lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _HOSTNAME.fullmatch(name):
            r.problem(key, f"expected a host name without scheme or port, got {value!r}")
    return name


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, say: not a file we can read
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _ca_bundle(r: _Reader, key: str, value: str | None) -> Path | None:
    """A PEM file of CA certificates (the only ones trusted for an https upstream, or for `directory.ca_file` the
    directory's ldaps:// servers): refused at start, reload and check-config alike when it holds none. OpenLDAP's
    TLS library loads no certificate from a DER file or another PEM block, says so on its debug channel alone, and
    every ldaps:// look-up then failed as the directory being unavailable (left21)."""
    if not value:
        return None
    path = r.file(key, value)
    if _is_file(path):  # else `file` said why
        try:
            x509.load_pem_x509_certificates(read_bounded(path, MAX_CA_FILE_BYTES))
        except OSError as e:  # more than MAX_CA_FILE_BYTES (it was read whole), or gone since
            r.problem(key, f"{path}: {e.strerror or e}")
        except ValueError as e:
            r.problem(key, f"{path}: not a PEM bundle of certificates ({e})")
    return path


def _context_headers(r: _Reader, key: str, table: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    """`{ "X-KCD-UPN" = "upn", ... }`: header names and what they carry, checked and kept in file order."""
    pairs: list[tuple[str, str]] = []
    for name, source in (table or {}).items():
        k = f"{key}.{name}"
        if not name or not set(name) <= _TOKEN_CHARS or "_" in name:
            r.problem(k, "expected a header name of letters, digits and '-'")
        elif name.lower() in _RESERVED_HEADERS:
            r.problem(k, f"{name} is the gateway's own header or a hop-by-hop one; choose another name")
        elif any(n.lower() == name.lower() for n, _ in pairs):
            r.problem(k, "duplicate header name (names are case-insensitive)")
        if source not in CONTEXT_SOURCES:
            r.problem(k, f"expected one of {', '.join(CONTEXT_SOURCES)}; got {source!r}")
        pairs.append((name, str(source)))
    return tuple(pairs)


def _route(r: _Reader, i: int, t: Any) -> Route | None:
    k = f"routes[{i}]"
    if not isinstance(t, dict):
        r.problem(k, "expected a table")
        return None
    r.unknown(t, k, _ROUTE_KEYS)
    prefix = r.get(t, f"{k}.prefix", "prefix", str) or "/"
    if not prefix.startswith("/"):
        r.problem(f"{k}.prefix", f"must start with '/', got {prefix!r}")
    else:
        try:
            normal = origin_form(prefix).path  # requests are matched in that form (proxy.target)
        except BadRequest as e:
            r.problem(f"{k}.prefix", f"{prefix!r}: {e.hint}")
        else:
            if normal != prefix:
                r.problem(f"{k}.prefix", f"write it as the backend reads it (decoded, no dot-segments): {normal!r}")
    upstream = (r.get(t, f"{k}.upstream", "upstream", str) or "").rstrip("/")
    parts = urlsplit(upstream)
    _, at, netloc = parts.netloc.rpartition("@")
    shown = f"{parts.scheme}://…@{netloc}" if at else upstream  # problems are logged (a reload's): no password in them
    if at:
        r.problem(
            f"{k}.upstream",
            f"a user name or password in the URL ({shown}) is never sent: the gateway signs in to the backend with "
            "Negotiate (or the client's Basic); write http(s)://host[:port]",
        )
    elif upstream and (
        parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query or parts.fragment
    ):
        r.problem(f"{k}.upstream", f"expected http(s)://host[:port] with no path or query, got {upstream!r}")
    spn = r.get(t, f"{k}.spn", "spn", str, "") or f"HTTP/{parts.hostname or ''}"
    service, slash, host = spn.partition("/")
    if not slash or not service or not host or "@" in host:
        r.problem(f"{k}.spn", f"expected service/host (e.g. HTTP/cas.example.com), got {spn!r}")
    ca_bundle = _ca_bundle(r, f"{k}.ca_bundle", r.get(t, f"{k}.ca_bundle", "ca_bundle", str, ""))
    server_name = _hostname(r, f"{k}.server_name", r.get(t, f"{k}.server_name", "server_name", str, ""))
    for name, given in (("ca_bundle", ca_bundle), ("server_name", server_name)):
        if given is not None and parts.scheme != "https":
            r.problem(f"{k}.{name}", f"only for https upstreams; {shown!r} is not one")
    return Route(
        prefix=prefix,
        upstream=upstream,
        spn=spn,
        host=_hostname(r, f"{k}.host", r.get(t, f"{k}.host", "host", str, "")),
        preserve_host=bool(r.get(t, f"{k}.preserve_host", "preserve_host", bool, False)),
        connect_timeout=_number(r, t, k, "connect_timeout", float, 10.0),
        read_timeout=_number(r, t, k, "read_timeout", float, DEFAULT_READ_TIMEOUT),
        ca_bundle=ca_bundle,
        server_name=server_name,
        context_headers=_context_headers(
            r, f"{k}.context_headers", r.get(t, f"{k}.context_headers", "context_headers", dict, {})
        ),
        backend_auth=cast(
            BackendAuth,
            _named_choice(r, t, k, "backend_auth", BACKEND_AUTHS, "negotiate"),
        ),
        case_sensitive=bool(r.get(t, f"{k}.case_sensitive", "case_sensitive", bool, False)),
        backend_binding=cast(
            BackendBinding,
            _named_choice(r, t, k, "backend_binding", BACKEND_BINDINGS, "request"),
        ),
    )


def is_loopback(host: str, resolve: Callable[..., list[Any]] | None = None) -> bool:
    """Whether every address `host` stands for is a loopback address. A name is resolved and its addresses
    checked: `localhost.attacker.example` starts like `localhost` and is anywhere; a name that does not
    resolve is not loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {str(info[4][0]) for info in (resolve or socket.getaddrinfo)(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.partition("%")[0]).is_loopback for a in addresses)


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})  # the names of "every address"


def _overlap(one: str, other: str) -> bool:
    """Whether listening sockets at the hosts `one` and `other` (on one port) take each other's connections: the
    same host, a wildcard on either side (`[::]` takes IPv4 too, unless v6only), or two loopback names. Two
    sockets with SO_REUSEPORT (several workers) then share the port silently instead of failing to bind."""
    one, other = one.lower(), other.lower()
    if one == other or one in WILDCARD_HOSTS or other in WILDCARD_HOSTS:
        return True
    return is_loopback(one) and is_loopback(other)


def _admin(r: _Reader, t: dict[str, Any]) -> Admin | None:
    known = {"bind", "certificate", "private_key", "client_ca", "allowed_clients", "socket", "crls"}
    r.unknown(t, "admin", known)
    if not t:
        return None
    unix = _admin_socket(r, t)
    bind = r.get(t, "admin.bind", "bind", str, "" if "socket" in t else None)  # required unless there is a socket
    host, port = _host_port(r, "admin.bind", bind or None)

    def optional(name: str) -> Path | None:
        value = r.get(t, f"admin.{name}", name, str, "")
        return r.file(f"admin.{name}", value) if value else None

    allowed = r.get(t, "admin.allowed_clients", "allowed_clients", list, []) or []
    for i, entry in enumerate(allowed):
        if not _admin_client(entry):
            r.problem(
                f"admin.allowed_clients[{i}]", f"expected a subject (RFC 4514) or a SHA-256 fingerprint: {entry!r}"
            )
    admin = Admin(
        host=host,
        port=port,
        certificate=optional("certificate"),
        private_key=optional("private_key"),
        client_ca=optional("client_ca"),
        allowed_clients=tuple(str(a) for a in allowed),
        socket=unix,
        crls=(crls := _crl_locations(r, t, "admin.crls"))[0],
        crl_urls=crls[1],
    )
    if (admin.crls or admin.crl_urls) and admin.client_ca is None:
        r.problem("admin.crls", "CRLs of admin client certificates need admin.client_ca (and admin.allowed_clients)")
    if (admin.certificate is None) != (admin.private_key is None):
        r.problem("admin.private_key", "admin.certificate and admin.private_key go together")
    if (admin.client_ca is None) != (not admin.allowed_clients):
        r.problem("admin.allowed_clients", "admin.client_ca and a non-empty admin.allowed_clients go together")
    if admin.client_ca is not None and not admin.tls:
        r.problem("admin.client_ca", "client certificates need TLS: set admin.certificate and admin.private_key")
    if host and (not admin.tls or admin.client_ca is None) and not is_loopback(host):
        r.problem(
            "admin.bind",
            f"{host} is not loopback: the admin listener then needs TLS and a client allow-list "
            "(admin.certificate, admin.private_key, admin.client_ca, admin.allowed_clients)",
        )
    return admin


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path is 108, with its NUL)


def _admin_socket(r: _Reader, t: dict[str, Any]) -> Path | None:
    """`admin.socket`: a path for a Unix socket, in an existing directory, where nothing but a socket is."""
    if "socket" not in t:
        return None
    value = r.get(t, "admin.socket", "socket", str)
    if value is None:
        return None
    if not value:
        r.problem("admin.socket", "expected a path for the admin listener's Unix socket, got ''")
        return None
    path = r.file("admin.socket", value, required=False)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        r.problem("admin.socket", f"a Unix socket's path is at most {UNIX_PATH_MAX} bytes: {path}")
    elif not path.parent.is_dir():
        r.problem("admin.socket", f"its directory does not exist: {path.parent}")
    elif path.exists() and not path.is_socket():
        r.problem("admin.socket", f"a file that is not a socket is there: {path}")
    return path


def _admin_client(entry: Any) -> bool:
    if not isinstance(entry, str):
        return False
    if "=" not in entry:
        return bool(re.fullmatch(r"[0-9a-fA-F]{64}", entry.replace(":", "")))
    try:
        x509.Name.from_rfc4514_string(entry)
    except ValueError:
        return False
    return True


def _reload(r: _Reader, t: dict[str, Any]) -> Reload:
    r.unknown(t, "reload", {"watch", "watch_interval"})
    return Reload(
        watch=bool(r.get(t, "reload.watch", "watch", bool, False)),
        watch_interval=_number(r, t, "reload", "watch_interval", float, 2.0),
    )


def _doctor(r: _Reader, t: dict[str, Any]) -> Doctor:
    r.unknown(t, "doctor", {"canary_user", "backend_header_limit"})
    canary = r.get(t, "doctor.canary_user", "canary_user", str, "")
    if canary and canary.count("@") != 1:
        r.problem("doctor.canary_user", f"expected a UPN (user@domain), got {canary!r}")
    return Doctor(
        canary_user=canary or None,
        backend_header_limit=_number(r, t, "doctor", "backend_header_limit", int, 16384),
    )


MAX_TRACES_KEPT = 100_000  # a trace is a few KiB when rendered: keep the ring's memory bounded


def _traces(r: _Reader, t: dict[str, Any]) -> Traces:
    r.unknown(t, "traces", {"keep", "export"})
    keep = _number(r, t, "traces", "keep", int, 200)
    if keep > MAX_TRACES_KEPT:
        r.problem("traces.keep", f"at most {MAX_TRACES_KEPT}, got {keep}")
        keep = 200
    export = r.get(t, "traces.export", "export", str, "")
    path = r.file("traces.export", export, required=False) if export else None
    if path is not None and not _is_dir(path.parent):
        r.problem("traces.export", f"directory not found: {path.parent}")
    return Traces(keep=keep, export=path)


def parse(data: dict[str, Any], path: Path) -> Config:
    r = _Reader(path)
    r.headers["[[routes]]"] = set(_ROUTE_KEYS)  # known even where no [[routes]] table is read
    r.unknown(
        data,
        "",
        {
            "listener",
            "client_certificates",
            "identity",
            "kerberos",
            "routes",
            "admin",
            "reload",
            "doctor",
            "authentication",
            "traces",
            "directory",
        },
    )
    listener = _listener(r, r.table(data, "listener"))
    certs = _client_certificates(r, r.table(data, "client_certificates"))
    identity = _identity(r, r.table(data, "identity"))
    kerberos = _kerberos(r, r.table(data, "kerberos"))
    admin = _admin(r, r.table(data, "admin"))
    if admin is not None and admin.bound and _overlap(listener.host, admin.host) and listener.port == admin.port:
        r.problem(
            "admin.bind",
            f"{host_port(admin.host, admin.port)} takes connections meant for listener.bind "
            f"({host_port(listener.host, listener.port)}): give the admin listener a port of its own",
        )
    reload = _reload(r, r.table(data, "reload"))
    doctor = _doctor(r, r.table(data, "doctor"))
    authentication = _authentication(r, r.table(data, "authentication"))
    traces = _traces(r, r.table(data, "traces"))
    directory = _directory(r, r.table(data, "directory"))
    if identity.mapping != "upn" and directory is None:
        r.problem("identity.mapping", f'"{identity.mapping}" looks accounts up: it needs a [directory] table')
    if kerberos.kdc_account == "optional" and directory is not None:
        r.problem(
            "kerberos.kdc_account",
            '"optional" serves evidence tickets without a PAC unchecked, but [directory] makes the realm Active '
            'Directory, whose tickets carry one (unless the gateway account has NO_AUTH_DATA_REQUIRED): use "auto" '
            'or "require"',
        )
    table = data.get("identity")
    written = table.get("realm_map") if isinstance(table, dict) else None  # its keys as written, for the problems
    _realms_in_one_case(r, written if isinstance(written, dict) else {}, identity, kerberos, directory)
    if not identity.default_realm:  # names without a domain belong to the gateway's own realm
        identity = replace(identity, default_realm=kerberos.principal.rpartition("@")[2])
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        r.problem("routes", "at least one [[routes]] table is required")
        raw_routes = []
    routes = [route for i, t in enumerate(raw_routes) if (route := _route(r, i, t)) is not None]
    seen: set[tuple[str | None, str]] = set()
    for i, route in enumerate(routes):
        same = (route.host, route.prefix if route.case_sensitive else route.prefix.lower())
        if same in seen:
            where = f" for host {route.host}" if route.host else ""
            r.problem(f"routes[{i}].prefix", f"duplicate prefix {route.prefix!r}{where} (prefixes ignore case)")
        seen.add(same)
        if route.backend_auth == "basic" and authentication.mode == "certificate":
            r.problem(f"routes[{i}].backend_auth", '"basic" needs an authentication.mode that takes Basic credentials')
        if route.backend_auth == "basic" and route.backend_binding == "connection":
            r.problem(
                f"routes[{i}].backend_binding",
                '"connection" is for Negotiate: with backend_auth = "basic" every request carries its credentials',
            )
    r.finish()
    if r.problems:
        raise ConfigError(r.problems)
    return Config(
        path=path,
        listener=listener,
        client_certificates=certs,
        identity=identity,
        kerberos=kerberos,
        routes=tuple(sorted(routes, key=lambda rt: (-len(rt.prefix), rt.host is None))),
        admin=admin,
        reload=reload,
        doctor=doctor,
        authentication=authentication,
        traces=traces,
        directory=directory,
    )


def read(path: Path) -> bytes:
    """The configuration file's bytes, as `load` reads them (a reload keeps those it took: `proxy.live`)."""
    try:
        return read_bounded(path.absolute(), MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError([f"configuration file not found: {path.absolute()}"]) from None
    except OSError as e:
        raise ConfigError([f"cannot read {path.absolute()}: {e}"]) from None


def load(path: Path, text: bytes | None = None) -> Config:
    """The configuration in the file `path`, or in `text` read from it before (its relative names are `path`'s)."""
    # Absolute, but by the name given, links kept: a reload reads that name again. A Kubernetes ConfigMap's file
    # is a link through `..data` to a timestamped directory that each update replaces and deletes; the resolved
    # name was the deleted file at the next reload.
    path = path.absolute()
    raw = read(path) if text is None else text
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"cannot read {path}: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables by recursion
        raise ConfigError([f"{path}: not valid TOML: arrays or tables nested too deeply"]) from None
    return parse(data, path)
