"""A password checked by the KDC, and a Negotiate token from the user's own ticket.

Theory of operation. A device without a certificate sends its user's password (HTTP Basic). The
gateway never judges a password itself: it asks the KDC for the user's ticket-granting ticket with it,
an AS exchange as `kinit` makes (`gss_acquire_cred_with_password`), so the directory's account policy
(disabled, locked out, password expired) applies as it would at a desktop. The TGT lands in a MEMORY
credential cache of its own, released with the credentials object. A Negotiate token for a backend is
then the user's own: the first one fetches a service ticket with that TGT (a plain TGS exchange: no
S4U, no delegation rights needed on the gateway's account), later ones are built from the cached
ticket without asking the KDC.

The credentials are acquired for SPNEGO (1.3.6.1.5.5.2) alone, which makes one AS exchange and offers
krb5 inside: the backend's token is SPNEGO. With krb5 alone MIT's SPNEGO finds no mechanism to offer, and
with krb5 *and* SPNEGO MIT tries the password once per mechanism: two AS exchanges, so Active Directory
counted every wrong password twice towards its lockout threshold (seen against Samba AD: a threshold of 5
locked the account after the second guess, and AD's usual 10 after the gateway's own limit of 5 guesses). MIT also
sends a refused password once more to the realm's primary KDC when a replica refused it; the gateway's krb5 overlay
names every listed KDC a primary, so that one refusal is final (`proxy.kerberos.profile._primaries`).

What it refuses, as the KDC answers: a wrong password and an unknown user are the same 401 to the
client (user names cannot be probed), disabled or locked accounts and expired passwords 403, an
unreachable KDC 503 (`proxy.kerberos.hints`). The calls block on the KDC: run them in a thread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import gssapi
import gssapi.raw

from proxy.errors import AuthenticationRequired, GatewayError, KerberosRefused, UserUnknown
from proxy.identity.principal import UserPrincipal, shown_name
from proxy.kerberos.hints import explain

SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
ENTERPRISE = gssapi.OID.from_int_seq("1.2.840.113554.1.2.2.6")  # GSS_KRB5_NT_ENTERPRISE_NAME
_MECHS = [SPNEGO]  # one AS exchange per password check: AD counts each one against its lockout threshold
# What a backend's first token asks of its context: a Basic user's (here), a delegated one's (proxy.kerberos.delegate)
TOKEN_FLAGS = [gssapi.RequirementFlag.out_of_sequence_detection]
# Minor messages (MIT; Heimdal and AD say the same in other words) meaning "these credentials are wrong".
_WRONG = (
    "decrypt integrity check failed",  # MIT, when the KDC does not require pre-authentication
    "preauthentication failed",
    "password incorrect",
)
_UNKNOWN = "not found in kerberos database"  # an unknown user: to the client the same answer as a wrong password
# What every refused sign-in says to the client (a wrong password, an unknown user, a name refused before the KDC
# was asked, `proxy.auth.basic`): one sentence, so that the answer never tells which it was.
INCORRECT = "the user name or password is incorrect"


@dataclass(frozen=True)
class UserTicket:
    """Evidence of a password check: the user's own credentials (a TGT) and the name the KDC gave them."""

    principal: str
    creds: gssapi.Credentials = field(repr=False)
    lifetime: float = math.inf  # seconds the TGT had left when the KDC gave it (its maxlife, AD's logon hours)


def user_name(user: UserPrincipal) -> gssapi.Name:
    """The name the KDC is asked about: the NT-ENTERPRISE UPN (identity.enterprise_names), else the principal."""
    if user.enterprise:
        return gssapi.Name(user.enterprise, ENTERPRISE)
    return gssapi.Name(user.principal, gssapi.NameType.kerberos_principal)


def login_blocking(user: UserPrincipal, password: bytes) -> UserTicket:
    """The AS exchange with `password`; blocks on the KDC."""
    try:
        result = gssapi.raw.acquire_cred_with_password(user_name(user), password, usage="initiate", mechs=_MECHS)
        creds = gssapi.Credentials(base=result.creds)
        lifetime = result.lifetime  # None: indefinite
        return UserTicket(str(creds.name), creds, math.inf if lifetime is None else float(lifetime))
    except gssapi.raw.GSSError as e:
        raise refusal(e.gen_message(), user.principal) from None


def token_blocking(ticket: UserTicket, gss_target: str, spn: str) -> bytes:
    """The first SPNEGO token for `gss_target` (HTTP@host) on the user's own ticket; may ask the KDC once."""
    target = gssapi.Name(gss_target, gssapi.NameType.hostbased_service)
    try:
        context = gssapi.raw.init_sec_context(target, creds=ticket.creds, mech=SPNEGO, flags=TOKEN_FLAGS)
        token: bytes | None = context.token
    except gssapi.raw.GSSError as e:
        raise explain(e.gen_message(), user=ticket.principal, spn=spn, proxy="the gateway") from None
    if not token:
        raise explain("no token produced", user=ticket.principal, spn=spn, proxy="the gateway")
    return token


_QUOTED = re.compile(r"'([^']*)'")


def refusal(message: str, principal: str) -> GatewayError:
    """What the KDC's answer to an AS exchange means for the client. Pure."""
    lowered = message.lower()
    if _UNKNOWN in lowered:
        # perhaps a password typed into the name field: shown as `shown_name`, here and in the KDC's message
        # (MIT: "Client 'Winter2026!@LAB.TEST' not found in Kerberos database"), wherever it quotes a name
        quoted = _QUOTED.sub(lambda name: f"'{shown_name(name[1])}'", message)
        hint = (
            f"the KDC has no account {shown_name(principal)}: a mistyped user name, or a domain or UPN suffix that "
            f"identity.realm_map or enterprise_names does not map to the account's realm [{quoted}]"
        )
        return UserUnknown(INCORRECT, hint=hint)
    if any(needle in lowered for needle in _WRONG):
        hint = (
            f"the KDC refused the password of {principal}: a wrong password (the user's to type again; after "
            f"authentication.basic_failures_per_user of them the user is held with 429) [{message}]"
        )
        return AuthenticationRequired(INCORRECT, hint=hint)
    if "password has expired" in lowered:
        return KerberosRefused(
            f"the password of {principal} has expired; change it, then sign in again", hint=f"[{message}]"
        )
    return explain(message, user=principal, spn="krbtgt (password check)", proxy="the gateway")
