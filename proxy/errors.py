"""The gateway's error tree: each refusal is data.

A stage either returns its evidence or raises one of these. Each class carries the HTTP status of the
local reply, the stage that refused and the log event, as class attributes; an instance carries the
`reason` the client may see, an optional `hint` for the administrator (the log line, never the
client) and optional `challenge` headers that depend on the request (`WWW-Authenticate`,
`Retry-After`). One middleware (`proxy.app`) turns them into responses; no stage writes a response itself.
"""

from __future__ import annotations

import sys
from typing import ClassVar, Literal


class GatewayError(Exception):
    status: ClassVar[int] = 500
    stage: ClassVar[str] = "gateway"
    event: ClassVar[str] = "gateway_error"
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, reason: str, *, hint: str | None = None, challenge: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.challenge = challenge or {}


class BadRequest(GatewayError):
    status = 400
    stage = "request"
    event = "request_refused"


class TransferCodingNotImplemented(BadRequest):
    """A request body in a transfer coding other than chunked (gzip, deflate): the gateway does not decode it, and
    forwarding the bytes without the coding would change the body (RFC 9112 6.1: 501)."""

    status = 501


class ExpectationFailed(BadRequest):
    """An `Expect` member other than `100-continue` (RFC 9110 10.1.1 allows 417, as Apache answers): the gateway
    meets no other expectation and passes none on, so forwarding the request without it (nginx's way) would serve
    a request the device and any server in front of the gateway may read otherwise."""

    status = 417


class VersionNotSupported(BadRequest):
    """A request line of another major version than 1 (`HTTP/2.0`, which llhttp reads): its framing and its rules
    (Host among them) are not HTTP/1.x's, and the gateway would forward it as an HTTP/1.1 request (RFC 9110 15.6.6:
    505)."""

    status = 505


class DeviceUnnamed(GatewayError):
    """Behind a balancer, a connection whose PROXY header names no device (v1 `UNKNOWN`, v2 `UNSPEC`): every such
    device would be the balancer's address for the throttles, the caps, the log and X-Forwarded-For."""

    status = 400
    stage = "proxy_protocol"
    event = "no_device_address"


# What the gateway forwards: every method llhttp reads (both device servers parse with it; it answers 400 to any other,
# TRACK among them) but TRACE and CONNECT (`proxy.app._NOT_FORWARDED`). WebDAV's and its extensions' are among them:
# OWA and EWS use PROPFIND, MOVE and the like. A 405's `Allow` names them (RFC 9110 15.5.6); a backend answers its own
# 405 for one it lacks. tests/unit/test_device_server.py checks the list against llhttp's.
FORWARDED_METHODS = (
    *("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"),
    *("COPY", "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK"),  # WebDAV (RFC 4918, 5323)
    *("BIND", "REBIND", "UNBIND", "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "MKCALENDAR"),  # its extensions
    *("M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "LINK", "UNLINK", "SOURCE", "QUERY"),
)


class MethodNotAllowed(GatewayError):
    """TRACE and CONNECT (TRACK never parses): a gateway echoes nothing back (TRACE would show the device the gateway's
    own headers) and tunnels nothing. `Allow` names what it forwards (`FORWARDED_METHODS`)."""

    status = 405
    stage = "request"
    event = "request_refused"
    headers: ClassVar[dict[str, str]] = {"Allow": ", ".join(FORWARDED_METHODS)}


class NoCertificate(GatewayError):
    status = 403
    stage = "certificate"
    event = "certificate_missing"


class CertificateRejected(GatewayError):
    """Chain building, signatures, validity period, key usage and EKU."""

    status = 403
    stage = "certificate"
    event = "certificate_rejected"


class CertificateRevoked(GatewayError):
    """Revoked, or no current revocation information where it is required. One event name for both (an interface);
    `revocation` tells them apart in the log and the summary line: "revoked" (a CRL or OCSP answer says so) or
    "unknown" (no current CRL, or no OCSP answer, where one is required: nothing was revoked)."""

    status = 403
    stage = "revocation"
    event = "certificate_revoked"

    def __init__(self, reason: str, *, hint: str | None = None, revocation: Literal["revoked", "unknown"]) -> None:
        super().__init__(reason, hint=hint)
        self.revocation = revocation


class IdentityRejected(GatewayError):
    status = 403
    stage = "identity"
    event = "identity_rejected"


class NoRoute(GatewayError):
    status = 404
    stage = "route"
    event = "no_route"


class KerberosRefused(GatewayError):
    """The KDC answered and said no: unknown or disabled user, delegation not allowed."""

    status = 403
    stage = "kerberos"
    event = "kerberos_refused"


class AccountRevoked(KerberosRefused):
    """The KDC refused the user's account (KDC_ERR_CLIENT_REVOKED): disabled, locked out or expired, one code for all
    three (Samba's and Windows' KDCs; which one is only in the error's e-data, which GSSAPI does not show). `user`:
    the principal refused, so that a configured directory can name the state (`proxy.pipeline.account_named`)."""

    def __init__(self, reason: str, *, hint: str | None = None, user: str = "") -> None:
        super().__init__(reason, hint=hint)
        self.user = user


class NotForwardable(KerberosRefused):
    """S4U2Proxy refused on an evidence ticket without the forwardable flag: the gateway's account lacks protocol
    transition, or the user may not be delegated. Which one the KDC does not say; `user` and `message` (the library's)
    let a configured directory name it from the user's account (`proxy.pipeline.forwarding_named`)."""

    def __init__(self, reason: str, *, hint: str | None = None, user: str = "", message: str = "") -> None:
        super().__init__(reason, hint=hint)
        self.user = user
        self.message = message


class AccountMismatch(GatewayError):
    """The KDC impersonated another account than the certificate names (the evidence ticket's PAC says which):
    never forwarded (`proxy.kerberos.account`)."""

    status = 403
    stage = "kerberos"
    event = "kdc_account_mismatch"


class AccountReplaced(AccountMismatch):
    """The account the KDC impersonated has the directory account's name but another SID than the one the mapping
    stage decided on: deleted and made again since the look-up (which the directory cache may have kept), or a
    KDC and a directory server not yet in step. Handled apart: the directory's entry and the user's tickets are
    dropped, so the next request is decided on what both say now (`proxy.kerberos.account`)."""

    event = "kdc_account_replaced"


class KdcUnavailable(GatewayError):
    status = 503
    stage = "kerberos"
    event = "kdc_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "30"}


class KdcNotAsked(KdcUnavailable):
    """The same refusal, made before any KDC was asked (every thread for KDC calls held by unanswered calls, or no
    KDC answered the gateway's last probe): a refusal in the metrics, never a request that went to the KDC."""


class KerberosOverloaded(GatewayError):
    """The gateway itself ran out of something in a KDC call (a file descriptor, memory): its own overload, neither
    the KDC's refusal nor a wrong keytab, and gone once load falls; 503 with Retry-After as the other overloads."""

    status = 503
    stage = "kerberos"
    event = "kerberos_resources_exhausted"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "30"}


class BackendUnavailable(GatewayError):
    status = 502
    stage = "backend"
    event = "backend_unavailable"


class BackendBusy(GatewayError):
    """Every backend connection the worker's file descriptors allow is open and busy (`proxy.descriptors`): refused
    before a connection is tried, so that accept(), the admin listener, the KDC and CRL fetches keep theirs."""

    status = 503
    stage = "backend"
    event = "backend_connections_exhausted"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "30"}


class BackendRejectedTicket(GatewayError):
    status = 502
    stage = "backend"
    event = "backend_rejected_ticket"


class BackendTimeout(GatewayError):
    """The upstream did not connect, or sent nothing for the route's read timeout, before its answer began."""

    status = 504
    stage = "backend"
    event = "backend_timeout"


class ClientBodyTimeout(GatewayError):
    """The device stopped sending its request body for longer than `listener.client_body_timeout`."""

    status = 408
    stage = "request"
    event = "client_body_timeout"


class AuthenticationRequired(GatewayError):
    """No Basic credentials, or wrong ones: 401 with `WWW-Authenticate: Basic realm=...` (the challenge)."""

    status = 401
    stage = "authentication"
    event = "authentication_required"


class UserUnknown(AuthenticationRequired):
    """The KDC does not know the user: to the client the same 401 as a wrong password. The gateway uses the
    difference only to answer both alike (`proxy.auth.basic.Pace`), never to say which it was."""


class TooManyAttempts(GatewayError):
    """Too many failed logins for this user or from this address: refused without asking the KDC."""

    status = 429
    stage = "authentication"
    event = "authentication_throttled"


class ConfigError(Exception):
    """A configuration problem, naming the key and the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def report(self) -> int:
        """For the commands: each problem on stderr, and the exit status that says the configuration is bad."""
        for problem in self.problems:
            print(f"configuration error: {problem}", file=sys.stderr)
        return 2


class KerberosMisconfigured(GatewayError):
    """The gateway's own Kerberos set-up is wrong (keytab, SPN, clock): nothing the client can fix."""

    status = 502
    stage = "kerberos"
    event = "kerberos_misconfigured"


class MappingRefused(GatewayError):
    """`identity.mapping = "strong"`: the certificate names an account but is not tied to it (identity.mapping)."""

    status = 403
    stage = "mapping"
    event = "mapping_refused"


class AccountRefused(GatewayError):
    """The directory says the account is disabled, locked out or expired: refused before any KDC request."""

    status = 403
    stage = "mapping"
    event = "account_refused"


class DirectoryUnavailable(GatewayError):
    """No directory server answered the look-up: never an admission, always 503 with Retry-After."""

    status = 503
    stage = "mapping"
    event = "directory_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "30"}
