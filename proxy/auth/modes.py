"""Authentication modes: which proofs a request must bring, and what a client is told when one is missing.

Theory of operation. `authentication.mode` chooses, as Forefront TMG's listener did:

=======================  ======================  ==============================================================
mode                     TLS asks for a cert     a request is served when it brings
=======================  ======================  ==============================================================
certificate              required                a valid certificate (Basic headers are ignored and dropped)
certificate-or-basic     optional                a valid certificate, or else Basic credentials the KDC accepts
certificate-and-basic    optional                both, naming the same user
basic                    not asked for           Basic credentials the KDC accepts
=======================  ======================  ==============================================================

An invalid certificate never falls back to a password: OpenSSL ends the handshake, or the certificate
stage refuses it with 403, before this stage runs. Without Basic credentials where they could help,
the answer is 401 with `WWW-Authenticate: Basic realm="..."`; in certificate-and-basic a missing
proof is 403 (the mode's contract), still naming the Basic scheme so a client knows what to send, and a
certificate and a login for different users are 403. A route with `backend_auth = "basic"` needs the
password itself, so there even a certificate user of certificate-or-basic is asked for it (and it
must name the certificate's user). A request with several Authorization fields is 400 wherever a password is read:
the gateway would judge one, and whatever reads another (a balancer, a backend_auth = "basic" site) another user.

With a password, the backend gets a token from the user's own ticket (no S4U); with a certificate alone,
the Kerberos stage impersonates and delegates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.auth.basic import BasicLogin, PasswordLogin, parse_basic
from proxy.config import AuthMode, Route
from proxy.device.request import DeviceRequest
from proxy.errors import BadRequest, IdentityRejected, NoCertificate
from proxy.identity.principal import UserPrincipal, ascii_lower
from proxy.kerberos.delegate import asked_name

if TYPE_CHECKING:  # bonsai's import is start-up CPU: imported where a [directory] is configured
    from proxy.directory import Directory


@dataclass(frozen=True)
class Authenticated:
    """Evidence of the authentication stage: the user, and their password login when there was one."""

    user: UserPrincipal
    login: PasswordLogin | None
    factors: str  # "certificate", "password" or "certificate+password"


def wants_password(mode: AuthMode, certified: bool, route: Route | None) -> bool:
    """Whether this request must (also) bring Basic credentials."""
    if mode == "certificate":
        return False
    if mode == "certificate-or-basic":
        return not certified or (route is not None and route.backend_auth == "basic")
    return True


def by_certificate(mode: AuthMode, certified: UserPrincipal | None, route: Route | None) -> Authenticated | None:
    """`authenticate`'s answer where the certificate's user alone is enough (no password wanted), decided without
    awaiting anything; None where `authenticate` must decide."""
    if certified is None or wants_password(mode, True, route):
        return None
    return Authenticated(certified, None, "certificate")


async def authenticate(
    basic: BasicLogin,
    mode: AuthMode,
    request: DeviceRequest,
    certified: UserPrincipal | None,
    route: Route | None,
    directory: Directory | None = None,
) -> Authenticated:
    """Settle who the request is from under `mode`, given the certificate's user (None: no certificate); `directory`:
    the gateway's, where Basic finds its own account's UPN (`BasicLogin.login`)."""
    if certified is None and mode in ("certificate", "certificate-and-basic"):
        raise NoCertificate(
            "this gateway requires a client certificate; install the certificate issued to you and try again",
            challenge=basic.challenge if mode == "certificate-and-basic" else None,
        )
    alone = by_certificate(mode, certified, route)
    if alone is not None:
        return alone
    fields = request.headers.getall("Authorization", ())
    if len(fields) > 1:  # one is read; a balancer, a WAF or a backend_auth = "basic" site may read another
        raise BadRequest(
            "send one Authorization header, not several",
            hint=f"{len(fields)} Authorization header fields: a request carries one set of credentials",
        )
    credentials = parse_basic(fields[0] if fields else None)
    if credentials is None:
        if mode == "certificate-and-basic":
            raise IdentityRejected(
                "this gateway requires your password as well as your certificate", challenge=basic.challenge
            )
        raise basic.required("sign in with your user name and password")
    login = await basic.login(credentials, request.remote or "", directory=directory)
    if certified is None:
        return Authenticated(login.user, login, "password")
    if not _same_user(login, certified):
        named = certified.enterprise or certified.principal  # with enterprise names, the UPN AD is asked for
        upn = "; sign in with the certificate's UPN" if certified.enterprise else ""
        raise IdentityRejected(
            "the user name does not match the certificate",
            hint=f"certificate names {named}, the password is {login.ticket.principal}'s{upn}",
        )
    return Authenticated(certified, login, "certificate+password")


def _same_user(login: PasswordLogin, certified: UserPrincipal) -> bool:
    """Whether the password's user is the certificate's: the KDC verified the password for the principal the
    certificate's user is impersonated as, for the very name that user is asked for, or (enterprise names) for
    the certificate's UPN. With enterprise names AD names the password's ticket as asked
    (`carol\\@corp.example@AD.TEST`), never as the principal the identity stage built (`carol@AD.TEST`) or the
    account strong mapping proved (`alice@AD.TEST`); an NT-ENTERPRISE UPN is one account of the forest, the one the
    directory named for the certificate. The principal the identity stage built counts only when it is what the
    certificate's user is asked for: with an NT-ENTERPRISE UPN it is a name realm_map made, not the account AD
    finds (mallory's `alice@corp.example` is `alice@AD.TEST` to realm_map, and alice's password under `ADTEST\\alice`
    gets a ticket of that name). ASCII case only: Unicode folding equates look-alikes."""
    if certified.enterprise is None and ascii_lower(login.ticket.principal) == ascii_lower(certified.principal):
        return True
    if ascii_lower(asked_name(login.user)) == ascii_lower(asked_name(certified)):
        return True
    return login.user.enterprise is not None and ascii_lower(login.user.enterprise) == ascii_lower(certified.upn)
