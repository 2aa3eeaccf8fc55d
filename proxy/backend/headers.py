"""Header rewriting between the device and the backend. Pure functions, no I/O.

Towards the backend, the gateway is the only source of identity: the client's own `Authorization`,
`Proxy-Authorization` and anything that looks like an identity header (a known name or prefix, a name whose
last word is one of `IDENTITY_LAST_WORDS` or that has the word `authenticated`, an `X-` name with a word of
`IDENTITY_WORDS`) are dropped, whatever their case and whether they spell `-` as `_` (a backend behind a CGI
or WSGI layer sees `X_Remote_User` and `X-Remote-User` as the same variable). Names with any character other than
a letter, a digit or `-` are dropped altogether, as nginx does by default (`ignore_invalid_headers`): `_`, and the
other token characters (`X.Forwarded.For`, `Remote~User`) that a layer in front of an application may fold to `_` or
`-` (PHP turns `.` into `_`), where no list of identity names would see them. Hop-by-hop headers, and those the
client names in `Connection`, end at the gateway. `X-Forwarded-For`, `-Proto` and `-Host` are the gateway's own,
never the client's.

A `Content-Length` goes on as its number (`010` as `10`): the device's parser read it in decimal, and a backend
that takes a leading zero as octal would end the body elsewhere.

`Expect` ends at the gateway too: the gateway answers `100 Continue` itself once it has decided to
forward, and the backend gets the body straight away (any other expectation was refused, 417, before
any stage: `proxy.app`).

Context headers (a route's `context_headers`, e.g. `X-KCD-UPN: alice@lab.test`) tell the backend who
the gateway established the caller to be. A client-sent header of the same name, in any case or
underscore spelling, never reaches the backend; only the gateway's value does.

Towards the device, hop-by-hop headers and the backend's `WWW-Authenticate` headers are dropped: the
device authenticated with its certificate; a Negotiate challenge, continuation or mutual-authentication
token (the AP-REP IIS sends on success) belongs to the gateway's Kerberos exchange, not to the device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from multidict import CIMultiDict, MultiMapping

from proxy.identity.principal import UserPrincipal

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

# Exact names (normalised: lower case, '_' read as '-') that claim an identity or carry credentials.
IDENTITY = frozenset(
    {
        "authorization",
        "forwarded",
        "remote-user",
        "auth-user",
        "x-auth-user",
        "x-user",
        "x-username",
        "x-user-name",
        "x-upn",
        "x-email",
        "x-real-ip",
        # what backends and their frameworks read as the client's address
        "true-client-ip",
        "x-originating-ip",
        "client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "x-proxyuser-ip",
        # an identity token (Exchange hybrid), and URL or method rewrites a framework would obey
        "x-commonaccesstoken",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    }
)
# Prefixes of the same kind: proxies and servers use many spellings of these.
IDENTITY_PREFIXES = (
    "x-remote-",
    "x-forwarded-",
    "x-authenticated-",
    "x-auth-",
    "x-ssl-",
    "x-client-",
    "ssl-client-",
    "x-ms-client-",
    "x-kcd-",
    "x-original-",
    "x-iisnode-",
    "x-ms-exchange-organization-",  # Exchange trusts these as set by its own transport, never by a client
    # the signed statement of who the user is that a front end hands its backend: Azure App Service's tokens
    # (`X-MS-TOKEN-AAD-ID-TOKEN`), AWS ALB's OIDC claims and token (`X-Amzn-Oidc-Data`, `-Accesstoken`)
    "x-ms-token-",
    "x-amzn-oidc-",
)


# The last word of a name that says who the user is, in whatever spelling a product chose (`X-Webauth-User`,
# `X-Proxy-User`, `X-Amzn-Oidc-Identity`, `X-User-Identity`, `...-Authenticated-User-Email`): no list of exact names
# keeps up with them. No standard request header ends in one of these (`User-Agent` ends in "agent").
IDENTITY_LAST_WORDS = frozenset(
    {"user", "username", "userid", "uid", "upn", "principal", "identity", "email", "login", "account"}
    | {"userinfo", "groups", "roles", "sid", "claims"}  # what the user is, beside who (`X-Webauth-Groups`)
    | {"assertion"}  # a signed statement of both (`X-Goog-Iap-Jwt-Assertion`, `Cf-Access-Jwt-Assertion`)
)
# Words that, anywhere in an `X-` name, say the header describes the caller (`X-User-Id`, `X-User-Sid`,
# `X-Consumer-Id`, an API gateway's): no such name is Exchange's except its mailbox headers (below).
IDENTITY_WORDS = frozenset({"user", "consumer"})
# Tokens a front end hands its backend as the caller's credential (`X-Id-Token`, `X-Access-Token`, an OIDC
# proxy's). Not every `...-Token`: a web application's own `X-CSRF-Token` passes.
IDENTITY_TOKENS = frozenset({"x-id-token", "x-access-token", "x-auth-request-access-token"})
# Exchange's own client headers that name a mailbox, not who the caller is: Exchange authorizes them against the
# Kerberos identity the gateway delegated (Outlook's MAPI/HTTP and Autodiscover `X-User-Identity`, OWA's explicit
# logon to a shared mailbox). They pass, as `X-AnchorMailbox` does.
EXCHANGE_MAILBOX_HEADERS = frozenset({"x-user-identity", "x-owa-explicitlogonuser"})


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


def is_identity_header(name: str) -> bool:
    n = _normal(name)
    if n in IDENTITY or n.startswith(IDENTITY_PREFIXES):
        return True
    if n in EXCHANGE_MAILBOX_HEADERS:
        return False
    words = n.split("-")
    if words[-1] in IDENTITY_LAST_WORDS or "authenticated" in words or n in IDENTITY_TOKENS:
        return True
    return words[0] == "x" and not IDENTITY_WORDS.isdisjoint(words[1:])


def _connection_tokens(headers: MultiMapping[str]) -> set[str]:
    values = headers.getall("Connection", ())
    if not values:
        return set()
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


# What each header name is, decided once per name (a dozen string operations per header and request,
# a few per cent of a request: bench/run.py): its lower-case form, or None when it never passes. Names
# come from devices and backends, so at most REMEMBERED_NAMES of each are kept; past that a name is
# decided afresh every time.
REMEMBERED_NAMES = 4096
_TO_BACKEND: dict[str, str | None] = {}
_TO_CLIENT: dict[str, str | None] = {}


# The names that go to a backend at all: letters, digits and `-` (a `_`, `.` or other token character is dropped).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9-]+")


def _towards_backend(name: str) -> str | None:
    """`name` in lower case, or None if it never goes to a backend (hop-by-hop, identity, a character other than a
    letter, a digit or `-`)."""
    known = _TO_BACKEND.get(name, "")
    if known != "":
        return known
    n = name.lower()
    verdict = None if n in HOP_BY_HOP or not _PLAIN_NAME.fullmatch(name) or is_identity_header(name) else n
    if len(_TO_BACKEND) < REMEMBERED_NAMES:
        _TO_BACKEND[name] = verdict
    return verdict


def _towards_client(name: str) -> str | None:
    """`name` in lower case, or None if it never goes to the device (hop-by-hop, a challenge, the length)."""
    known = _TO_CLIENT.get(name, "")
    if known != "":
        return known
    n = name.lower()
    verdict = None if n in HOP_BY_HOP or n == "www-authenticate" or n == "content-length" else n
    if len(_TO_CLIENT) < REMEMBERED_NAMES:
        _TO_CLIENT[name] = verdict
    return verdict


def to_backend(
    client: MultiMapping[str],
    *,
    client_ip: str,
    client_host: str,
    upstream_host: str | None,
    authorization: str,
    extra: Iterable[tuple[str, str]] = (),
) -> CIMultiDict[str]:
    """The headers a backend request carries. `upstream_host` None keeps the client's Host; `extra` (the
    route's context headers) replaces whatever the client sent under those names."""
    extra = tuple(extra)
    named = _connection_tokens(client) | {_normal(name) for name, _ in extra}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client.items():
        n = _towards_backend(name)
        if n is None or n in named:
            continue
        if n == "host" and upstream_host is not None:
            continue
        if n == "content-length" and value.isascii() and value.isdigit():
            value = str(int(value))  # `010` is 10 to the device's parser, 8 to a reader that takes a leading 0 as octal
        out.add(name, value)
    if upstream_host is not None:
        out["Host"] = upstream_host
    out["Authorization"] = authorization
    out["X-Forwarded-For"] = client_ip
    out["X-Forwarded-Proto"] = "https"
    if client_host:
        out["X-Forwarded-Host"] = client_host
    for name, value in extra:
        out[name] = value
    return out


def context_headers(
    wanted: Iterable[tuple[str, str]], *, user: UserPrincipal, leaf: x509.Certificate | None
) -> tuple[tuple[str, str], ...]:
    """The route's context headers with this caller's values; certificate facts only when there is one.

    Values go out as printable ASCII: anything else (a non-ASCII UPN or subject) is percent-encoded UTF-8.
    """
    wanted = tuple(wanted)
    if not wanted:  # the common case: nothing to compute on the request path
        return ()
    facts = {"upn": user.upn, "principal": user.principal}
    if leaf is not None:
        facts |= {
            "cert_serial": format(leaf.serial_number, "x"),
            "cert_sha256": leaf.fingerprint(hashes.SHA256()).hex(),
            "cert_subject": leaf.subject.rfc4514_string(),
            "cert_issuer": leaf.issuer.rfc4514_string(),
        }
    return tuple((name, _printable(facts[source])) for name, source in wanted if source in facts)


def _printable(value: str) -> str:
    return "".join(c if " " <= c <= "~" else quote(c, safe="") for c in value)


def to_client(backend: MultiMapping[str]) -> CIMultiDict[str]:
    """The headers the device sees from a backend response."""
    named = _connection_tokens(backend)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in backend.items():
        n = _towards_client(name)
        if n is None or n in named:
            continue
        out.add(name, value)
    return out
