"""The lab's stand-in for Exchange: an HTTP server that really accepts Kerberos through Negotiate.

Theory of operation
-------------------
Every request except ``GET /healthz`` must carry ``Authorization: Negotiate <base64 token>``. The token goes
to MIT Kerberos through python-gssapi, acting as an acceptor (``gss_accept_sec_context``) whose only
secret is the backend's keytab: the library decrypts the service ticket, checks the authenticator, the
clock skew and the replay cache, and names the client. Nothing here parses Kerberos. Raw krb5 tokens and
SPNEGO-wrapped ones are both accepted; the context must complete in one step (Kerberos does; a multi-round
SPNEGO exchange is refused). The keytab decides which service the backend is (the lab gives it only the
keys of ``HTTP/cas.lab.test``); with ``service`` set, a ticket for any other principal is refused even if
the keytab holds its keys too. When the acceptor produces an output token (mutual authentication: the
AP-REP), it goes back as ``WWW-Authenticate: Negotiate <token>`` on the success response, as IIS does.

What it trusts: the keytab, and through it the KDC that issued the ticket. What it refuses, with 401,
a bare ``WWW-Authenticate: Negotiate`` challenge and a one-line text reason: no Authorization header,
another scheme, bad base64, and every token the acceptor rejects (wrong key, expired, replayed, for
another service); the reason quotes the GSS minor message ("Request is a replay").

Connection-bound mode emulates IIS with ``authPersistNonNTLM``: the first identity accepted on a TCP
connection sticks to it, and later requests on that connection are served as that identity without their
Authorization header being looked at, whatever it holds or lacks. That is the behaviour that makes a
gateway with a backend pool shared among users serve one user as another (LAB-NOTES.md); the gateway's
isolation tests need it. Per-connection state is keyed by the connection's asyncio transport and dropped
once that transport is closed. Without the mode every request authenticates afresh.

With ``--tls-cert`` and ``--tls-key`` it serves https, as Exchange does (the gateway's tests of https
upstreams use the lab's server certificate).

What it answers: a JSON echo of what it saw (principal, method, path, query, body digest, headers without
Authorization and only whether one came, the connection's number and whether the identity was reused, and
the ticket's PAC when it has one: its size, buffers, UPN and the client's SID, `proxy.kerberos.pac`), the
principal also in ``X-Lab-Principal``. Exchange's sites are recognised and named in the echo (``site``):
ActiveSync, EWS, OWA, Autodiscover; every other path is served too, as a generic Negotiate site
(``site: generic``), so the gateway can route any path here and status pass-through is tested with the hooks
below rather than with 404s. ``OPTIONS /Microsoft-Server-ActiveSync`` advertises protocol versions and commands.

Test hooks (request header, or query parameter), applied after authentication on any path:

=======================  ==================  ============================================================
header                   query parameter     effect
=======================  ==================  ============================================================
``X-Lab-Hold-Seconds``   ``hold``            read the body, then hold the answer this long (an ActiveSync
                                             ``Ping``); 0 to 3600 s, larger values are capped at 3600
``X-Lab-Hold-Until``     ``hold_until``      end that hold early once a request names this key in
                                             ``X-Lab-Release`` (a test's "held until I say so")
``X-Lab-Release``        ``lab_release``     end the holds waiting on this key, and those that come later
                                             (the last 256 keys released are kept for them)
``X-Lab-Status``         ``lab_status``      answer with this status (200 to 599), e.g. 449 or 503
``X-Lab-Header``         ``lab_header``      add ``Name: value`` to the response (repeatable)
``X-Lab-Body-Bytes``     ``lab_body_bytes``  answer with ``body_pattern(N)`` instead of the echo
=======================  ==================  ============================================================

A header wins over the query parameter of the same hook. A malformed hook value is answered with 400.
A hold ends early when the client hangs up; 204 and 304 are sent without a body.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import collections
import contextlib
import hashlib
import itertools
import os
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

import gssapi
import gssapi.raw
import structlog
from aiohttp import web
from gssapi.raw.misc import GSSError
from multidict import MultiMapping

from proxy.kerberos.acceptor import initiator_pac
from proxy.kerberos.pac import PacFacts

SERVICE: Final = "HTTP/cas.lab.test"  # the lab's Exchange service, whose keys the backend's keytab holds

ACTIVESYNC_PATH: Final = "/microsoft-server-activesync"
ACTIVESYNC_PROTOCOL_VERSIONS: Final = "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
ACTIVESYNC_PROTOCOL_COMMANDS: Final = ",".join(
    (
        "Sync",
        "SendMail",
        "SmartForward",
        "SmartReply",
        "GetAttachment",
        "GetHierarchy",
        "CreateCollection",
        "DeleteCollection",
        "MoveCollection",
        "FolderSync",
        "FolderCreate",
        "FolderDelete",
        "FolderUpdate",
        "MoveItems",
        "GetItemEstimate",
        "MeetingResponse",
        "Search",
        "Settings",
        "Ping",
        "ItemOperations",
        "Provision",
        "ResolveRecipients",
        "ValidateCert",
        "Find",
    )
)

MAX_HOLD_SECONDS: Final = 3600.0
_MAX_KEY: Final = 64  # characters of an `X-Lab-Hold-Until` / `X-Lab-Release` key
MAX_RELEASED: Final = 256  # released keys kept for holds to come (the oldest dropped first)
MAX_BODY_BYTES: Final = 1 << 30
# AD puts group data in the ticket's PAC, so Negotiate headers reach tens of KB; Exchange sites raise IIS's
# header limits for the same reason. aiohttp's default field limit (8190 bytes) would refuse them. 96 KiB
# takes a 64 KiB token (AD's largest MaxTokenSize) in base64, as the gateway's own listener does.
MAX_HEADER_FIELD_BYTES: Final = 96 * 1024

_SPNEGO_OID_DER: Final = bytes.fromhex("06062b0601050502")  # 1.3.6.1.5.5.2
_KRB5_OID_DER: Final = bytes.fromhex("06092a864886f712010202")  # 1.2.840.113554.1.2.2
_CHUNK: Final = 65536
_BODYLESS_STATUSES: Final = frozenset({204, 304})
_PATTERN_BLOCK: Final = bytes(range(256)) * (_CHUNK // 256)

log = structlog.get_logger("kcd.lab.backend")


# -- errors: a stage raises, the middleware answers ------------------------------------------------------


class Refusal(Exception):
    """A request the backend answers itself: `status`, extra headers and a one-line text `reason`."""

    status: ClassVar[int] = 400
    headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=self.reason + "\n", headers=self.headers)


class NotAuthenticated(Refusal):
    """No usable Negotiate token: 401 with a bare challenge, as IIS sends."""

    status = 401
    headers: ClassVar[Mapping[str, str]] = {"WWW-Authenticate": "Negotiate"}


class BadHook(Refusal):
    """A test hook's value is malformed."""

    status = 400


# -- the acceptor ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedToken:
    """Evidence from one completed acceptor step."""

    principal: str  # the client, e.g. alice@LAB.TEST
    service: str  # the ticket's server principal, e.g. HTTP/cas.lab.test@LAB.TEST
    wire_mech: str  # what the client sent: "spnego", "krb5" or "unknown"
    mutual_token: bytes | None  # for WWW-Authenticate on the success response
    delegated_credentials: bool  # the client forwarded a TGT along (it should not need to)
    pac: PacFacts | None = None  # the ticket's PAC (Active Directory's), when it carries one


def gss_reason(exc: GSSError) -> str:
    """The minor (mechanism) message of a GSS error, with the major one where the minor says nothing."""
    major = "; ".join(exc.get_all_statuses(exc.maj_code, True))
    minor = "; ".join(exc.get_all_statuses(exc.min_code, False)) if exc.min_code else ""
    if not minor or minor in {"Success", "Unknown error"}:
        return major
    return minor


def wire_mech(token: bytes) -> str:
    """Which mechanism an initial context token names (RFC 2743 section 3.1 framing)."""
    if token[:1] != b"\x60" or len(token) < 2:
        return "unknown"
    # Skip the [APPLICATION 0] tag and its DER length; the mechanism OID follows.
    length_octets = token[1] & 0x7F if token[1] & 0x80 else 0
    oid_start = 2 + length_octets
    if token.startswith(_SPNEGO_OID_DER, oid_start):
        return "spnego"
    if token.startswith(_KRB5_OID_DER, oid_start):
        return "krb5"
    return "unknown"


def is_service(ticket_server: str, wanted: str) -> bool:
    """Whether a ticket's server principal is `wanted`; the realm is compared only if `wanted` names one."""
    if "@" in wanted:
        return ticket_server == wanted
    return ticket_server.rpartition("@")[0] == wanted


class Acceptor:
    """Service credentials from a keytab, and one `gss_accept_sec_context` per token."""

    def __init__(self, keytab: Path, *, service: str | None = None, rcache: Path | None = None) -> None:
        store: dict[bytes | str, bytes | str] = {"keytab": str(keytab)}
        if rcache is not None:
            store["rcache"] = f"file2:{rcache}"
        # No name: accept whatever the keytab has keys for, then check the ticket's service if asked. MIT
        # opens the keytab here, so a missing or empty one fails now (GSSError), not at the first request.
        self._creds = gssapi.Credentials(usage="accept", store=store)
        self.service = service

    def accept(self, token: bytes) -> AcceptedToken:
        """Accept one initial token. Blocks on the keytab and replay cache: call it from a thread."""
        # Not gssapi.SecurityContext.step(): when a failure carries an error token (a KRB-ERROR, e.g. for a
        # replay), the high-level step *returns* that token as if it were output and defers the exception
        # to the context's next method call. The raw call raises at once.
        try:
            result = gssapi.raw.accept_sec_context(token, acceptor_creds=self._creds)
        except GSSError as exc:
            raise NotAuthenticated(f"Negotiate token rejected: {gss_reason(exc)}") from exc
        if result.more_steps:
            raise NotAuthenticated(
                "Negotiate token rejected: it needs another round trip; this backend only accepts single-step Kerberos"
            )
        found = gssapi.raw.inquire_context(
            result.context,
            initiator_name=True,
            target_name=True,
            lifetime=False,
            mech=False,
            flags=False,
            locally_init=False,
            complete=False,
        )
        service = str(gssapi.Name(base=found.target_name))
        if self.service is not None and not is_service(service, self.service):
            raise NotAuthenticated(
                f"Negotiate token rejected: the ticket is for {service}, this backend is {self.service}"
            )
        return AcceptedToken(
            principal=str(gssapi.Name(base=result.initiator_name)),
            service=service,
            wire_mech=wire_mech(token),
            mutual_token=result.token or None,
            delegated_credentials=result.delegated_creds is not None,
            pac=ticket_pac(found.initiator_name),
        )


def ticket_pac(initiator: gssapi.raw.Name | None) -> PacFacts | None:
    """The PAC of the accepted ticket, to echo (`proxy.kerberos.acceptor`); None for a malformed one too."""
    try:
        return initiator_pac(initiator)
    except ValueError:
        return None


def negotiate_token(authorization: str | None) -> bytes:
    """The token of an `Authorization: Negotiate <base64>` header value."""
    if authorization is None:
        raise NotAuthenticated("no Authorization header: Negotiate authentication required")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "negotiate":
        raise NotAuthenticated(f"Authorization scheme {scheme!r} is not accepted: Negotiate authentication required")
    credentials = credentials.strip()
    if not credentials:
        raise NotAuthenticated("Authorization: Negotiate carries no token")
    try:
        return base64.b64decode(credentials, validate=True)
    except binascii.Error as exc:
        raise NotAuthenticated(f"Authorization: Negotiate token is not valid base64 ({exc})") from exc


# -- connections -----------------------------------------------------------------------------------------


@dataclass(eq=False)
class Connection:
    """What the backend remembers about one TCP connection."""

    number: int
    requests: int = 0
    bound_principal: str | None = None  # connection-bound mode: the first identity accepted here


class ConnectionTable:
    """Per-connection state, keyed by the connection's asyncio transport (one per TCP connection).

    Entries of closed connections are dropped whenever the table is consulted. Not a weak map: a closed
    selector transport sits in a reference cycle with its own read callback, so it only disappears when the
    cyclic garbage collector runs, which made weakly keyed state outlive its connection for seconds.
    """

    def __init__(self) -> None:
        self._by_transport: dict[asyncio.BaseTransport, Connection] = {}
        self._numbers = itertools.count(1)

    def _forget_closed(self) -> None:
        for transport in [t for t in self._by_transport if t.is_closing()]:
            del self._by_transport[transport]

    def __len__(self) -> int:
        """How many open connections the backend remembers."""
        self._forget_closed()
        return len(self._by_transport)

    def for_request(self, request: web.Request) -> Connection:
        """The state of the connection `request` came on, created on its first request."""
        self._forget_closed()
        transport = request.transport
        if transport is None:  # the client has already gone: nothing to remember
            return Connection(number=0, requests=1)
        connection = self._by_transport.get(transport)
        if connection is None:
            connection = Connection(number=next(self._numbers))
            self._by_transport[transport] = connection
        connection.requests += 1
        return connection


@dataclass(frozen=True)
class Identity:
    """Who a request is served as, and why."""

    principal: str
    reused: bool  # connection-bound mode: served as the connection's first identity, token not looked at
    accepted: AcceptedToken | None  # None when reused


# -- test hooks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabHooks:
    """What the test hooks of one request ask for."""

    hold_seconds: float = 0.0
    hold_until: str | None = None  # the key of `X-Lab-Release` that ends the hold early
    release: str | None = None
    status: int = 200
    extra_headers: tuple[tuple[str, str], ...] = ()
    body_bytes: int | None = None

    @classmethod
    def from_request(cls, headers: MultiMapping[str], query: MultiMapping[str]) -> LabHooks:
        """Parse the hooks from request headers and query parameters (a header wins); raises BadHook."""

        def one(header: str, param: str) -> tuple[str, str] | None:
            if header in headers:
                return header, headers[header]
            if param in query:
                return param, query[param]
            return None

        hold = 0.0
        if (raw := one("X-Lab-Hold-Seconds", "hold")) is not None:
            try:
                hold = float(raw[1])
            except ValueError:
                raise BadHook(f"{raw[0]} must be a number of seconds, not {raw[1]!r}") from None
            if not 0 <= hold < float("inf"):
                raise BadHook(f"{raw[0]} must be between 0 and {MAX_HOLD_SECONDS:.0f}, not {raw[1]!r}")
            hold = min(hold, MAX_HOLD_SECONDS)
        keys: list[str | None] = []
        for header, param in (("X-Lab-Hold-Until", "hold_until"), ("X-Lab-Release", "lab_release")):
            if (raw := one(header, param)) is not None and not 0 < len(raw[1]) <= _MAX_KEY:
                raise BadHook(f"{raw[0]} must be a key of 1 to {_MAX_KEY} characters, not {raw[1]!r}")
            keys.append(None if raw is None else raw[1])

        status = 200
        if (raw := one("X-Lab-Status", "lab_status")) is not None:
            if not raw[1].strip().isdigit() or not 200 <= int(raw[1]) <= 599:
                raise BadHook(f"{raw[0]} must be a status from 200 to 599, not {raw[1]!r}")
            status = int(raw[1])

        extra: list[tuple[str, str]] = []
        for value in [*headers.getall("X-Lab-Header", []), *query.getall("lab_header", [])]:
            name, sep, field_value = value.partition(":")
            name = name.strip()
            if not sep or not name or any(c in name for c in " \t\r\n") or "\r" in value or "\n" in value:
                raise BadHook(f"X-Lab-Header/lab_header must be 'Name: value', not {value!r}")
            if name.lower() in {"content-length", "transfer-encoding"}:
                raise BadHook(f"X-Lab-Header cannot set {name}: the server frames the body itself")
            extra.append((name, field_value.strip()))

        body_bytes = None
        if (raw := one("X-Lab-Body-Bytes", "lab_body_bytes")) is not None:
            if not raw[1].strip().isdigit() or int(raw[1]) > MAX_BODY_BYTES:
                raise BadHook(f"{raw[0]} must be a byte count from 0 to {MAX_BODY_BYTES}, not {raw[1]!r}")
            body_bytes = int(raw[1])

        return cls(
            hold_seconds=hold,
            hold_until=keys[0],
            release=keys[1],
            status=status,
            extra_headers=tuple(extra),
            body_bytes=body_bytes,
        )


def _pattern_chunks(n: int) -> Iterator[bytes]:
    while n > 0:
        chunk = _PATTERN_BLOCK[: min(n, _CHUNK)]
        n -= len(chunk)
        yield chunk


def body_pattern(n: int) -> bytes:
    """The body `X-Lab-Body-Bytes: n` asks for: bytes 0..255 repeated, cut at n."""
    return b"".join(_pattern_chunks(n))


# -- the request flow ------------------------------------------------------------------------------------


def exchange_site(path: str) -> str:
    """Which Exchange site a path belongs to (IIS matches paths case-insensitively)."""
    lowered = path.lower()
    if lowered == ACTIVESYNC_PATH or lowered.startswith(ACTIVESYNC_PATH + "/"):
        return "activesync"
    if lowered.startswith("/ews/"):
        return "ews"
    if lowered == "/owa" or lowered.startswith("/owa/"):
        return "owa"
    if lowered.startswith("/autodiscover/"):
        return "autodiscover"
    return "generic"


@dataclass(frozen=True)
class BodyDigest:
    length: int
    sha256: str


async def read_body(request: web.Request) -> BodyDigest:
    """Read the request body to its end, keeping only its length and digest."""
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        digest.update(chunk)
        length += len(chunk)
    return BodyDigest(length=length, sha256=digest.hexdigest())


async def hold(request: web.Request, seconds: float, released: asyncio.Event | None = None) -> None:
    """Hold the answer like an ActiveSync Ping heartbeat; stop early if the client hangs up, or once `released`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0 and not (released is not None and released.is_set()):
        transport = request.transport
        if transport is None or transport.is_closing():
            return  # nobody is waiting any more; the answer goes nowhere
        if released is None:
            await asyncio.sleep(min(remaining, 1.0))
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await released.wait()


def echo(
    request: web.Request, identity: Identity, body: BodyDigest, connection: Connection, site: str
) -> dict[str, object]:
    """The JSON body of a success: what the backend saw and who it served."""
    raw_headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in request.raw_headers
        if name.lower() != b"authorization"
    ]
    headers: dict[str, str] = {}
    for name, value in raw_headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    accepted = identity.accepted
    return {
        "principal": identity.principal,
        "auth_type": "Negotiate",
        "wire_mech": accepted.wire_mech if accepted else None,
        "delegated_credentials": accepted.delegated_credentials if accepted else None,
        "pac": accepted.pac.to_json() if accepted and accepted.pac else None,
        "site": site,
        "method": request.method,
        "path": request.path,
        "raw_path": request.rel_url.raw_path,
        "query": request.query_string,
        "http_version": f"{request.version.major}.{request.version.minor}",
        "body_sha256": body.sha256,
        "body_length": body.length,
        "headers": headers,
        "raw_headers": raw_headers,
        "connection_number": connection.number,
        "connection_request_index": connection.requests,
        "connection_identity_reused": identity.reused,
        "authorization_sent": "Authorization" in request.headers,  # whether one came, never what it held
    }


def response_headers(identity: Identity, connection: Connection, site: str, method: str) -> list[tuple[str, str]]:
    """Headers of every authenticated answer: who was served, mutual authentication, ActiveSync's OPTIONS."""
    headers = [
        ("X-Lab-Principal", identity.principal),
        ("X-Lab-Connection-Number", str(connection.number)),
        ("X-Lab-Identity-Reused", "true" if identity.reused else "false"),
    ]
    if identity.accepted is not None and identity.accepted.mutual_token:
        token = base64.b64encode(identity.accepted.mutual_token).decode("ascii")
        headers.append(("WWW-Authenticate", f"Negotiate {token}"))
    if site == "activesync" and method == "OPTIONS":
        headers += [
            ("Allow", "OPTIONS,POST"),
            ("MS-Server-ActiveSync", "15.1"),
            ("MS-ASProtocolVersions", ACTIVESYNC_PROTOCOL_VERSIONS),
            ("MS-ASProtocolCommands", ACTIVESYNC_PROTOCOL_COMMANDS),
        ]
    return headers


async def send_pattern(
    request: web.Request, status: int, size: int, headers: list[tuple[str, str]]
) -> web.StreamResponse:
    """Stream `body_pattern(size)` as the answer, 64 KiB at a time."""
    response = web.StreamResponse(status=status)
    response.headers.extend(headers)
    response.content_type = "application/octet-stream"
    response.content_length = size
    await response.prepare(request)
    for chunk in _pattern_chunks(size if request.method != "HEAD" else 0):
        await response.write(chunk)
    await response.write_eof()
    return response


class Backend:
    """The backend's state and its one request handler."""

    def __init__(self, acceptor: Acceptor, *, connection_bound: bool) -> None:
        self.acceptor = acceptor
        self.connection_bound = connection_bound
        self.connections = ConnectionTable()
        self.releases: dict[str, asyncio.Event] = {}  # `X-Lab-Release` keys, set or awaited by a hold
        self._holding: collections.Counter[str] = collections.Counter()  # holds awaiting each key

    def release(self, key: str) -> None:
        """End the holds on `key` and those that come later; at most `MAX_RELEASED` released keys no hold awaits are
        kept, the oldest released dropped first (each kept for good, a client grew the backend's memory at will)."""
        event = self.releases.pop(key, None) or asyncio.Event()
        event.set()
        self.releases[key] = event  # the newest released last
        kept = [k for k, e in self.releases.items() if e.is_set() and not self._holding[k]]
        for old in kept[: len(kept) - MAX_RELEASED]:
            del self.releases[old]

    async def hold(self, request: web.Request, hooks: LabHooks) -> None:
        """`hold`, until its key is released if it names one; a key nobody released is not kept once its holds end."""
        key = hooks.hold_until
        if key is None:
            await hold(request, hooks.hold_seconds)
            return
        released = self.releases.setdefault(key, asyncio.Event())
        self._holding[key] += 1
        try:
            await hold(request, hooks.hold_seconds, released)
        finally:
            self._holding[key] -= 1
            if not self._holding[key]:
                del self._holding[key]
                if not released.is_set():
                    self.releases.pop(key, None)

    async def authenticate(self, request: web.Request, connection: Connection) -> Identity:
        if self.connection_bound and connection.bound_principal is not None:
            return Identity(principal=connection.bound_principal, reused=True, accepted=None)
        token = negotiate_token(request.headers.get("Authorization"))
        accepted = await asyncio.to_thread(self.acceptor.accept, token)
        if self.connection_bound:
            connection.bound_principal = accepted.principal
        return Identity(principal=accepted.principal, reused=False, accepted=accepted)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The whole flow: connection, identity, hooks, body, hold, answer."""
        connection = self.connections.for_request(request)
        identity = await self.authenticate(request, connection)
        hooks = LabHooks.from_request(request.headers, request.query)
        body = await read_body(request)
        if hooks.release is not None:
            self.release(hooks.release)
        await self.hold(request, hooks)

        site = exchange_site(request.path)
        headers = [*response_headers(identity, connection, site, request.method), *hooks.extra_headers]
        response: web.StreamResponse
        if hooks.status in _BODYLESS_STATUSES:
            response = web.Response(status=hooks.status)
        elif hooks.body_bytes is not None:
            return await send_pattern(request, hooks.status, hooks.body_bytes, headers)
        else:
            response = web.json_response(echo(request, identity, body, connection, site), status=hooks.status)
        response.headers.extend(headers)
        return response


BACKEND_KEY: Final = web.AppKey("kcd_lab_backend", Backend)


@web.middleware
async def _answer_and_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn refusals into their responses, and log one line per request."""
    started = time.perf_counter()
    reason = None
    try:
        response = await handler(request)
    except Refusal as refusal:
        response = refusal.response()
        reason = refusal.reason
    log.info(
        "request",
        method=request.method,
        path=request.path,
        status=response.status,
        principal=response.headers.get("X-Lab-Principal"),
        connection=response.headers.get("X-Lab-Connection-Number"),
        reused=response.headers.get("X-Lab-Identity-Reused"),
        reason=reason,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return response


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(
    keytab: Path,
    *,
    connection_bound: bool = False,
    service: str | None = None,
    rcache: Path | None = None,
    max_field_bytes: int = MAX_HEADER_FIELD_BYTES,
) -> web.Application:
    """The backend as an aiohttp application. Raises GSSError at once if the keytab is unusable.

    `service` (e.g. "HTTP/cas.lab.test", or with "@REALM") refuses tickets for any other principal; by
    default every principal the keytab holds keys for is accepted.

    `rcache` is a file for the replay cache; by default MIT's (under $KRB5RCACHEDIR, else /var/tmp).
    `max_field_bytes` refuses (400) a request with a longer header field: 16384 is IIS's default (http.sys
    MaxFieldLength), which a Negotiate header carrying a large PAC exceeds.

    Set KRB5_CONFIG before calling if the lab's krb5.conf is wanted.
    """
    backend = Backend(Acceptor(keytab, service=service, rcache=rcache), connection_bound=connection_bound)
    app = web.Application(
        middlewares=[_answer_and_log],
        handler_args={"max_field_size": max_field_bytes},
    )
    app[BACKEND_KEY] = backend
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    return app


# -- command line ----------------------------------------------------------------------------------------


def _bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {value!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.lab.backend",
        description="The lab's Exchange stand-in: a real Negotiate (Kerberos) acceptor with a JSON echo.",
    )
    parser.add_argument("--keytab", type=Path, required=True, help="keytab with the service's keys")
    parser.add_argument("--bind", type=_bind, default=("127.0.0.1", 8081), help="HOST:PORT (default 127.0.0.1:8081)")
    parser.add_argument(
        "--connection-bound",
        action="store_true",
        help="emulate IIS authPersistNonNTLM: a connection keeps its first identity",
    )
    parser.add_argument("--krb5-config", type=Path, help="krb5.conf to use (sets KRB5_CONFIG)")
    parser.add_argument(
        "--service",
        help=f"refuse tickets for any principal but this one, e.g. {SERVICE} (default: any in the keytab)",
    )
    parser.add_argument("--rcache", type=Path, help="replay cache file (default: MIT's, under $KRB5RCACHEDIR)")
    parser.add_argument(
        "--max-field-bytes",
        type=int,
        default=MAX_HEADER_FIELD_BYTES,
        help=f"400 for a longer header field (default {MAX_HEADER_FIELD_BYTES}; IIS's http.sys default is 16384)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve https with this PEM certificate (chain) ...")
    parser.add_argument("--tls-key", type=Path, help="... and this PEM private key")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the backend until SIGINT or SIGTERM; 0 on a clean stop, 2 if the keytab is unusable."""
    args = _parse_args(argv)
    if args.krb5_config is not None:
        os.environ["KRB5_CONFIG"] = str(args.krb5_config)  # before any GSSAPI call reads the profile
    try:
        app = make_app(
            args.keytab,
            connection_bound=args.connection_bound,
            service=args.service,
            rcache=args.rcache,
            max_field_bytes=args.max_field_bytes,
        )
    except GSSError as exc:
        print(f"lab backend: cannot accept with keytab {args.keytab}: {gss_reason(exc)}", file=sys.stderr)
        return 2
    host, port = args.bind
    tls = None
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    log.info(
        "listening",
        bind=f"{host}:{port}",
        https=tls is not None,
        keytab=str(args.keytab),
        service=args.service or "any in the keytab",
        connection_bound=args.connection_bound,
    )
    web.run_app(app, host=host, port=port, access_log=None, print=None, ssl_context=tls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
