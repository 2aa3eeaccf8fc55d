"""`kcd-proxy doctor`: a preflight of the Kerberos path, each check with pass or fail and, on failure, the fix.

Theory of operation. The checks follow a request's dependencies, from the gateway's own footing to the
backends:

1. `kdc`: an AS exchange with the keytab and a ticket to the gateway itself (`proxy.kerberos.probe`):
   the KDC answers and accepts the keytab's key.
2. `keytab`: the key version the KDC used for that ticket (read from its clear-text header) is one the
   keytab holds; a password or key reset on the account makes it stale. When `kdc` failed, the file alone: a
   keytab without the principal's key names the principals it holds (another account's keytab, or the
   principal spelt in another case); `kdc`'s fix says so already when that is why the gateway got no credentials,
   and the check is then not run, else it fails.
3. `clock`: the ticket's authentication time is the KDC's clock; ours must be within `MAX_SKEW` of it
   (Kerberos refuses at 5 minutes, and backends check authenticators against their own clocks).
4. `s4u2self`: S4U2Self for a canary user gives an evidence ticket, and it is forwardable (or, not forwardable,
   the KDC granted every S4U2Proxy on it all the same: Windows' resource-based delegation, `settle_evidence`).
   The canary is impersonated as the gateway would impersonate it: with `identity.mapping` "strong" or
   "strong-or-audit", the account the directory maps its UPN to (`sAMAccountName@REALM`, the line says so), else
   the principal built from the UPN (`realm_map`, `enterprise_names`).
   `kdc-account`: the evidence ticket's PAC judged as a request's would be (`proxy.kerberos.account`): the
   canary's account, MIT's PAC naming nobody, or no PAC at all (refused unless `kerberos.kdc_account =
   "optional"`, which this check fails: nothing then says which account the KDC impersonated).
5. `s4u2proxy <SPN>`: for each route's SPN, the gateway's own S4U2Self + S4U2Proxy.
6. `negotiate <route>`: the upstream answers an unauthenticated request with 401 and
   `WWW-Authenticate: Negotiate`; `ticket <route>`: it accepts the delegated ticket (no 401 with it). An https
   upstream is reached as the gateway reaches it: its `ca_bundle`, and `server_name` as the SNI and the name its
   certificate must carry.
7. `header-size <route>`: the `Authorization: Negotiate` header fits the backends' header limit.
8. With a `[directory]`: `directory` binds (SASL GSSAPI with the keytab, or simple over ldaps) and asks the
   server who it thinks we are; `delegation` reads the gateway's own account as its Delegation tab shows it
   (`delegation_check`: 'Use any authentication protocol', TRUSTED_TO_AUTH_FOR_DELEGATION, and each route's SPN in
   `msDS-AllowedToDelegateTo`), so an account missing both is told both at once, where the KDC refuses one step at
   a time. A route's SPN it does not cover may be covered by the backend's account: resource-based delegation,
   read from the `msDS-AllowedToActOnBehalfOfOtherIdentity` of the account holding the SPN (its DACL walked as the
   KDC's access check walks it, against the gateway's SID, groups, Everyone, Authenticated Users and S-1-18-1, for
   CONTROL_ACCESS: `proxy.directory.ResourceBased.verdict`). The KDC alone decides whether it honours that, so such
   an SPN is judged by the canary's S4U2Proxy for it (`run` asks the check again with those answers), and without a
   canary the check is a skip that says so, or a warning where an entry decides only on some KDCs (a SID only some
   put in the token, a conditional entry: doctor cannot tell, docs/ad-lab.md); it also passes where the KDC granted
   every S4U2Proxy anyway (an allow-list it could not read: `settle_delegation`); `directory-lookup` finds the canary
   user's account, reads its SID and state, and says how many strong `altSecurityIdentities` entries it has.
9. With a `[directory]` and a Basic mode: `basic-lockout` compares the Basic throttle with the domain's account
   lockout policy, and `basic-lockout <UPN>` with the canary's fine-grained one (its resultant PSO), where it has
   one: the guesses the gateway lets reach the DC while the DC still counts them must stay below the lockout
   threshold (docs/throttles-and-limits.md). A user is held after `basic_failures_per_user` wrong passwords
   until `basic_failure_window_seconds` after the last one, counted once for all of `listener.workers` (they
   share the count); a window shorter than the DC's observation window releases the user while the DC still
   counts, so the guesses add up with every window until the account locks. Several gateways behind a balancer
   each count on their own: `check-config` warns, and the docs size the limit for them.

Checks that need a canary user are skipped without one (`--user`, or `[doctor] canary_user`). A failure is told
once: when the gateway cannot get its own credentials (the AS exchange with the keytab: `kdc` fails with the fix),
the checks that need them (s4u2self, kdc-account, s4u2proxy, ticket) are not run and say so, where each repeated
`kdc`'s failure. The run makes one AS exchange: the probe's credentials are the Delegator's too. The clock is
a parameter; the evaluations are pure functions of what the probes returned.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.client
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from proxy.backend.forward import upstream_tls
from proxy.config import Authentication, Config, Kerberos, Route
from proxy.errors import AccountMismatch, GatewayError
from proxy.identity.principal import UserPrincipal, map_name
from proxy.kerberos.account import kdc_account
from proxy.kerberos.hints import (
    ProtectedUsers,
    from_active_directory,
    not_forwardable,
    not_forwardable_named,
    protected_users_in_question,
)
from proxy.kerberos.keytab import kvnos, missing_key, read_keytab
from proxy.kerberos.pac import PacFacts

if TYPE_CHECKING:
    from proxy.directory import DelegationSettings, Directory, LockoutPolicy, ResourceBased
    from proxy.identity.mapping import Account
    from proxy.kerberos.delegate import Delegator

MAX_SKEW = 60.0  # seconds; Kerberos's own limit is 300 (clockskew), a healthy NTP setup is far below both
Status = Literal["pass", "warn", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def render(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():<5} {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<6}{'':<{width}}  fix: {c.fix}")
    counts = {s: sum(1 for c in checks if c.status == s) for s in ("pass", "warn", "fail", "skip")}
    warned = f", {counts['warn']} warned" if counts["warn"] else ""
    lines.append(
        f"{len(checks)} checks: {counts['pass']} passed{warned}, {counts['fail']} failed, {counts['skip']} skipped"
    )
    return "\n".join(lines)


# --- evaluations (pure) -----------------------------------------------------------------------------


def clock_check(kdc_time: datetime, before: float, after: float) -> Check:
    """The KDC stamped `kdc_time` on a ticket obtained between our clock readings `before` and `after`."""
    skew = kdc_time.timestamp() - (before + after) / 2
    margin = (after - before) / 2 + 1  # Kerberos times are whole seconds
    if abs(skew) <= MAX_SKEW + margin:
        return Check("clock", "pass", f"within {abs(skew):.0f} s of the KDC's clock (±{margin:.0f} s)")
    side = "behind" if skew > 0 else "ahead of"
    return Check(
        "clock",
        "fail",
        f"this host is {abs(skew):.0f} s {side} the KDC",
        "synchronise this host's clock with the domain's time source (NTP, chrony); Kerberos refuses at 300 s",
    )


def keytab_check(principal: str, held: set[int], kdc_kvno: int | None) -> Check:
    if not held:
        return Check(
            "keytab",
            "fail",
            f"the keytab holds no key for {principal}",
            "export the gateway's key into the keytab (kadmin ktadd -norandkey, ktpass, msktutil)",
        )
    versions = ", ".join(str(v) for v in sorted(held))
    if kdc_kvno is None or kdc_kvno in held:
        at_kdc = "unversioned" if kdc_kvno is None else f"version {kdc_kvno}"
        return Check("keytab", "pass", f"the KDC's key for {principal} is {at_kdc}; the keytab holds {versions}")
    return Check(
        "keytab",
        "fail",
        f"the KDC uses key version {kdc_kvno} for {principal}; the keytab holds only {versions}",
        "the account's key changed (password reset?): export the keytab again (ktadd / ktpass / msktutil --update)",
    )


def unreachable_fix(route: Route, error: str) -> str:
    """The fix for a backend that gave no answer: a certificate refused is the route's TLS settings, not a backend
    that is down."""
    if not error.startswith("SSLCertVerificationError"):
        return "start the backend, or fix the route's upstream"
    name = route.server_name or urlsplit(route.upstream).hostname
    return (
        f"the backend's certificate is not accepted for {name}: the route's ca_bundle must hold the CA that issued it "
        f"(without ca_bundle, the system's CAs), and its server_name a name the certificate carries (without "
        f"server_name, the upstream's host); the gateway checks both, as this check does"
    )


def negotiate_check(route: Route, url: str, status: int | None, challenge: str, error: str = "") -> Check:
    name = f"negotiate {route.prefix}"
    if status is None:
        return Check(name, "fail", f"{url}: {error}", unreachable_fix(route, error))
    schemes = [part.strip().split(" ")[0].lower() for part in challenge.split(",") if part.strip()]
    if status == 401 and "negotiate" in schemes:
        return Check(name, "pass", f"{url} answers 401 with WWW-Authenticate: Negotiate")
    if status == 401:
        return Check(
            name,
            "fail",
            f"{url} answers 401 but offers {challenge or 'no scheme'}",
            "enable Windows Authentication with the Negotiate provider (Kerberos) on the backend site",
        )
    return Check(
        name,
        "fail",
        f"{url} answers {status} without authentication",
        "require Windows Authentication (Negotiate) on the backend site, or publish the protected path as the route",
    )


def ticket_check(route: Route, url: str, status: int | None, error: str = "") -> Check:
    name = f"ticket {route.prefix}"
    if status is None:
        return Check(name, "fail", f"{url}: {error}", unreachable_fix(route, error))
    if status == 401:
        return Check(
            name,
            "fail",
            f"{url} refused the delegated ticket for {route.spn} (401)",
            f"register {route.spn} on the backend's account and give the backend a current keytab for it",
        )
    return Check(name, "pass", f"{url} accepted the delegated ticket for {route.spn} ({status})")


def kdc_account_check(
    user: UserPrincipal, pac: PacFacts | None, unreadable: str | None, settings: Kerberos, *, client: str | None
) -> Check:
    """What the canary's evidence ticket's PAC (and client principal, `client`) says about the account the KDC
    impersonated, judged as a request's would be (`proxy.kerberos.account`, under kerberos.kdc_account)."""
    name, principal = "kdc-account", user.principal
    try:
        account = kdc_account(
            user, pac, unreadable, client=client, policy=settings.kdc_account, proxy=settings.principal
        )
    except AccountMismatch as e:
        return Check(name, "fail", e.reason, e.hint)
    if account.name:
        return Check(name, "pass", f"the evidence ticket's PAC for {principal} names the certificate's: {account}")
    if account.pac:
        # its client principal was compared with the one asked for (`kdc_account`): a mismatch fails above
        return Check(name, "pass", f"the evidence ticket's PAC for {principal} names no account (an MIT KDC's)")
    return Check(
        name,
        "fail",
        f'the evidence ticket for {principal} carries no PAC: kerberos.kdc_account = "optional" serves it '
        "without knowing which account the KDC impersonated",
        f"against Active Directory clear NO_AUTH_DATA_REQUIRED (userAccountControl 0x2000000) on {settings.principal} "
        'and set kerberos.kdc_account = "auto"; an MIT KDC before 1.20 (or with disable_pac) issues no PAC',
    )


def lockout_check(name: str, policy: LockoutPolicy, auth: Authentication) -> Check:
    """The Basic throttle against the lockout policy `policy` (`proxy.directory.LockoutPolicy`): how many wrong
    passwords reach the DC while it still counts them, and whether that reaches its threshold. A gateway's workers
    share one count (`proxy.auth.shared`), so their number does not multiply it."""
    assert policy.threshold is not None  # a policy we may not read is never judged
    where = f"{policy.source} locks after {policy.threshold} bad passwords within {policy.window_seconds:g} s"
    if policy.threshold == 0:
        return Check(name, "pass", f"{policy.source} has no lockout threshold: the DC never locks an account")
    per_user, window = auth.basic_failures_per_user, auth.basic_failure_window_seconds
    problems, fixes = [], []
    if window < policy.window_seconds:
        problems.append(
            f"basic_failure_window_seconds ({window:g}) is shorter: a held user is released while the DC still counts,"
            f" and each window lets {per_user} more guesses through until the account locks"
        )
        fixes.append(f"set authentication.basic_failure_window_seconds to {policy.window_seconds:g} or more")
    if per_user >= policy.threshold:
        problems.append(
            f"{per_user} guesses (basic_failures_per_user) reach the DC within its window, and {policy.threshold} lock"
        )
        fixes.append(
            f"set authentication.basic_failures_per_user to {policy.threshold - 1} or less (below the threshold,"
            " with room for the user's own typing)"
        )
    if problems:
        return Check(name, "fail", f"{where}; " + "; ".join(problems), "; ".join(fixes))
    return Check(
        name,
        "pass",
        f"{where}; the gateway lets at most {per_user} through while the DC counts (window {window:g} s; one count"
        " for all its workers, one per gateway behind a balancer)",
    )


# userAccountControl ([MS-ADTS] 2.2.16): the Delegation tab's two "trust" choices
UF_TRUSTED_FOR_DELEGATION = 0x80000  # "Trust this user for delegation to any service (Kerberos only)": unconstrained
UF_TRUSTED_TO_AUTH_FOR_DELEGATION = 0x1000000  # "Use any authentication protocol": protocol transition


def delegation_check(
    proxy: str,
    settings: DelegationSettings | None,
    spns: list[str],
    backends: Mapping[str, ResourceBased] | None = None,
    granted: Mapping[str, bool] | None = None,
) -> Check:
    """`delegation`: the gateway's own account as its Delegation tab shows it, against what the routes need:
    'Trust this user for delegation to specified services only' with 'Use any authentication protocol'
    (TRUSTED_TO_AUTH_FOR_DELEGATION) and each SPN listed in msDS-AllowedToDelegateTo (AD compares SPNs without case);
    or, SPN by SPN, the backend's account allowing the gateway by resource-based delegation (`backends`: its
    msDS-AllowedToActOnBehalfOfOtherIdentity, which needs no protocol transition, MS-SFU 3.2.5.2.2). Only the KDC
    says whether it honours that (Windows Server 2012 and later do, Samba before 4.19 does not): `granted`, the
    S4U2Proxy outcome per SPN where a canary user was tried; without it such a set-up is a skip that says how to
    tell, never a failure."""
    if settings is None:
        return Check(
            "delegation",
            "skip",
            f"no user account {proxy} under [directory] base_dn to read (a group managed service account, or one "
            "outside base_dn): see s4u2self and s4u2proxy",
        )
    account = proxy.rpartition("@")[0] or proxy
    uac = settings.user_account_control
    transition = bool(uac & UF_TRUSTED_TO_AUTH_FOR_DELEGATION)
    listed = {spn.lower() for spn in settings.allowed_to_delegate_to}
    missing = [spn for spn in spns if spn.lower() not in listed]
    shown = ", ".join(settings.allowed_to_delegate_to) or "nothing"
    where = f"{proxy} ({settings.dn})"
    if transition and not missing:
        return Check(
            "delegation",
            "pass",
            f"{where}: 'Use any authentication protocol' (TRUSTED_TO_AUTH_FOR_DELEGATION); msDS-AllowedToDelegateTo "
            f"lists every route's SPN ({shown})",
        )
    by_backend = {
        spn: (backend, backend.verdict(settings.sids))
        for spn, backend in (backends or {}).items()
        if spn in spns and not (transition and spn not in missing)
    }
    resource = {spn: backend for spn, (backend, verdict) in by_backend.items() if verdict.allows}
    undecided = {spn: (backend, v.doubt) for spn, (backend, v) in by_backend.items() if v.allows is None}
    covered = {*resource, *undecided}
    uncovered = [spn for spn in spns if not (transition and spn not in missing) and spn not in covered]
    if not uncovered:  # every route's SPN by classic delegation or by its backend's account (or perhaps so)
        return _resource_based(proxy, where, resource, undecided, granted or {})
    problems, fixes = [], []
    if not transition:
        unconstrained = (
            ", and 'Trust this user for delegation to any service (Kerberos only)' is chosen (TRUSTED_FOR_DELEGATION:"
            " unconstrained delegation, with no protocol transition)"
            if uac & UF_TRUSTED_FOR_DELEGATION
            else ""
        )
        problems.append(
            f"'Use any authentication protocol' is not chosen (TRUSTED_TO_AUTH_FOR_DELEGATION is clear in "
            f"userAccountControl){unconstrained}: its evidence tickets are not forwardable"
        )
        off = " -TrustedForDelegation $false" if uac & UF_TRUSTED_FOR_DELEGATION else ""
        fixes += [
            f"Set-ADAccountControl {account}{off} -TrustedToAuthForDelegation $true",
            f"samba-tool delegation for-any-protocol {account} on",
        ]
    unlisted = [spn for spn in uncovered if spn in missing]
    if unlisted:
        problems.append(f"msDS-AllowedToDelegateTo lists {shown}, not {', '.join(unlisted)}")
        for spn in unlisted:
            fixes += [
                f"Set-ADUser {account} -Add @{{'msDS-AllowedToDelegateTo'='{spn}'}}",
                f"samba-tool delegation add-service {account} {spn}",
            ]
    if resource:
        problems.append(f"{_allowed_by(resource, proxy)} (resource-based delegation), not {', '.join(uncovered)}")
    if undecided:
        problems.append(_undecided_by(undecided, proxy))
    fix = (
        f"on {account}'s Delegation tab choose 'Trust this user for delegation to specified services only' and 'Use "
        f"any authentication protocol', with the routes' SPNs in its list: {'; '.join(fixes)}"
    )
    return Check("delegation", "fail", f"{where}: " + "; ".join(problems), fix)


def open_backends_check(proxy: str, backends: Mapping[str, ResourceBased]) -> list[Check]:
    """`delegation-open`, a WARN per backend whose msDS-AllowedToActOnBehalfOfOtherIdentity lets any account of the
    domain act for any user towards it (a NULL DACL, or an entry allowing Everyone, Authenticated Users or S-1-18-1:
    what an account with no SID of its own would be granted, `ResourceBased.verdict`), or may, on some KDCs (an entry
    allowing a SID only some put in every account's token, or a conditional one): the gateway works, but so would any
    other account's S4U2Proxy to that SPN (review47). Nothing when no backend is so open."""
    account = proxy.rpartition("@")[0] or proxy
    checks = []
    for spn, backend in backends.items():
        verdict = backend.verdict(frozenset())
        if backend.dn is None or verdict.allows is False:
            continue
        how = (
            "lets every account of the domain act for any user towards "
            f"{spn} (a NULL DACL, or an entry allowing Everyone, Authenticated Users or S-1-18-1)"
            if verdict.allows
            else f"may let every account of the domain act for any user towards {spn}, on some KDCs: {verdict.doubt}"
        )
        checks.append(
            Check(
                "delegation-open",
                "warn",
                f"{backend.dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity {how}, not {account} alone",
                f"allow the gateway's account only: Set-ADUser -Identity '{backend.dn}' "
                f"-PrincipalsAllowedToDelegateToAccount {account} (Set-ADComputer for a computer account), which "
                "writes a descriptor with that one entry",
            )
        )
    return checks


def _allowed_by(resource: Mapping[str, ResourceBased], proxy: str) -> str:
    """Which backends' accounts allow the gateway by resource-based delegation, for which SPN."""
    return "; ".join(
        f"{backend.dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows {proxy} for {spn}"
        for spn, backend in resource.items()
    )


def _undecided_by(undecided: Mapping[str, tuple[ResourceBased, str]], proxy: str) -> str:
    """Which backends' accounts may allow the gateway, on some KDCs only, for which SPN, and why doctor cannot tell."""
    return "; ".join(
        f"whether {backend.dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows {proxy} for {spn} depends on the "
        f"KDC: {doubt}"
        for spn, (backend, doubt) in undecided.items()
    )


def _resource_based(
    proxy: str,
    where: str,
    resource: Mapping[str, ResourceBased],
    undecided: Mapping[str, tuple[ResourceBased, str]],
    granted: Mapping[str, bool],
) -> Check:
    """`delegation` where every route's SPN the gateway's own account does not cover has a backend account that allows
    the gateway (`resource`), or may, depending on the KDC (`undecided`, with the doubt): judged by the KDC's
    S4U2Proxy answers (`granted`) where a canary was tried; an undecided one without an answer is a WARN."""
    account = proxy.rpartition("@")[0] or proxy
    said = [_allowed_by(resource, proxy) + " (resource-based delegation)"] if resource else []
    said += [_undecided_by(undecided, proxy)] if undecided else []
    allowed = f"{where}: " + "; ".join(said)
    refused = [spn for spn in [*resource, *undecided] if granted.get(spn) is False]
    if refused:
        fixes = [f"samba-tool delegation add-service {account} {spn}" for spn in refused]
        fixes += [f"Set-ADUser {account} -Add @{{'msDS-AllowedToDelegateTo'='{spn}'}}" for spn in refused]
        why = (
            "it does not honour resource-based delegation (Samba before 4.19, a domain controller before Windows "
            "Server 2012; see s4u2proxy)"
        )
        if any(spn in undecided for spn in refused):
            why = f"the entry named above refused it, or {why}"
        return Check(
            "delegation",
            "fail",
            f"{allowed}, yet the KDC refused S4U2Proxy to {', '.join(refused)}: {why}",
            f"use classic constrained delegation on {account} instead: 'Use any authentication protocol' and the SPNs "
            f"in its list: Set-ADAccountControl {account} -TrustedToAuthForDelegation $true; samba-tool delegation "
            f"for-any-protocol {account} on; " + "; ".join(fixes),
        )
    if all(granted.get(spn) for spn in [*resource, *undecided]):
        return Check("delegation", "pass", f"{allowed}, and the KDC granted S4U2Proxy to each")
    if undecided:
        backend = next(iter(undecided.values()))[0]
        return Check(
            "delegation",
            "warn",
            f"{allowed}: doctor cannot tell what the gateway's KDC decides; only S4U2Proxy shows it, run with --user "
            "UPN",
            f"allow the gateway's account by plain entries only: Set-ADUser -Identity '{backend.dn}' "
            f"-PrincipalsAllowedToDelegateToAccount {account} (Set-ADComputer for a computer account), or use "
            f"classic constrained delegation on {account}",
        )
    return Check(
        "delegation",
        "skip",
        f"{allowed}, which needs no protocol transition; whether the KDC honours it only S4U2Proxy shows (Windows "
        "Server 2012 and later do, Samba before 4.19 does not): cannot tell without a canary, run with --user UPN",
    )


def settle_delegation(checks: list[Check]) -> list[Check]:
    """A failed `delegation` check is no failure where the KDC granted every S4U2Proxy all the same: the backends'
    accounts allow the gateway (resource-based delegation, which Windows honours and the check does not read)."""
    proxies = [c for c in checks if c.name.startswith("s4u2proxy ")]
    if not proxies or any(c.status != "pass" for c in proxies):
        return checks
    return [
        replace(
            c,
            status="pass",
            fix=None,
            detail=c.detail + "; yet the KDC granted every S4U2Proxy (resource-based "
            "delegation on the backends' accounts?)",
        )
        if c.name == "delegation" and c.status == "fail"
        else c
        for c in checks
    ]


def header_check(route: Route, header_bytes: int, limit: int, user: str) -> Check:
    name = f"header-size {route.prefix}"
    detail = f"Authorization header of {header_bytes} bytes for {user}; the backends accept {limit}"
    if header_bytes <= limit:
        return Check(name, "pass", detail + " (users in many groups carry bigger tickets)")
    return Check(
        name,
        "fail",
        detail,
        "raise the backend's header limits (http.sys MaxFieldLength and MaxRequestBytes, e.g. 65534), "
        "then set doctor.backend_header_limit to the new value",
    )


# --- the run ----------------------------------------------------------------------------------------


def run(config: Config, *, user: str | None, clock: Callable[[], float] = time.time) -> list[Check]:
    upn = user or config.doctor.canary_user
    directory_checks: list[Check] = []
    mapped: Mapped | None = None
    judge: Judge | None = None
    if config.directory is not None:
        directory_checks, mapped, judge = asyncio.run(_directory_checks(config, upn, clock))
    if config.identity.mapping == "upn":
        mapped = None  # the gateway impersonates the name built from the UPN; the directory is only looked at
    kerberos = settle_evidence(list(_checks(config, upn, clock, mapped)))
    if judge is not None:  # the KDC's answers decide what the directory alone cannot (resource-based delegation)
        granted = {
            c.name.removeprefix("s4u2proxy "): c.status == "pass"
            for c in kerberos
            if c.name.startswith("s4u2proxy ") and c.status != "skip"
        }
        directory_checks = [judge(granted) if c.name == "delegation" else c for c in directory_checks]
    return settle_delegation([*kerberos, *directory_checks])


_NOT_FORWARDABLE = "is not forwardable: classic constrained delegation will refuse S4U2Proxy"
_NO_CREDENTIALS = "not run: needs the gateway's own credentials (see kdc)"


def not_forwardable_check(
    principal: str, whose: str, proxy: str, mapped: Mapped | None = None, pac: PacFacts | None = None
) -> Check:
    """The `s4u2self` check for an evidence ticket without the forwardable flag, with the KDC error explainer's fix:
    the one cause the directory shows where it found the account (`mapped`), else both, in AD's commands where the
    evidence ticket's `pac` shows an AD KDC."""
    _, fix = not_forwardable(user=principal, proxy=proxy, active_directory=from_active_directory(pac))
    if mapped is not None and mapped.dn:
        uac = mapped.user_account_control
        fix = not_forwardable_named(
            user=principal,
            proxy=proxy,
            dn=mapped.dn,
            sam=mapped.sam_account_name,
            user_account_control=uac,
            gateway_control=mapped.gateway_control,
            protected=mapped.protected,
        )
    return Check("s4u2self", "fail", f"the evidence ticket for {principal}{whose} {_NOT_FORWARDABLE}", fix)


def settle_evidence(checks: list[Check]) -> list[Check]:
    """A non-forwardable evidence ticket is no failure where the KDC granted every S4U2Proxy asked on it: Windows does
    under resource-based delegation (the backend's account allows the gateway's), which needs no protocol transition
    (MS-SFU 3.2.5.2.2). The `s4u2self` check then passes and says why; else it stays as it was."""
    proxies = [c for c in checks if c.name.startswith("s4u2proxy ")]
    if not proxies or any(c.status != "pass" for c in proxies):
        return checks
    settled = []
    for c in checks:
        if c.name == "s4u2self" and c.status == "fail" and _NOT_FORWARDABLE in c.detail:
            before = c.detail.split(" is not forwardable", 1)[0]
            c = Check(
                c.name,
                "pass",
                f"{before} is not forwardable, and the KDC granted S4U2Proxy on it all the same: resource-based "
                "delegation (the backend's account allows the gateway's), which needs no protocol transition",
            )
        settled.append(c)
    return settled


@dataclass(frozen=True)
class Mapped:
    """The canary's account as the directory found it: whom a strong-mapping gateway impersonates."""

    sam_account_name: str
    realm: str
    dn: str = ""
    user_account_control: int = 0  # its NOT_DELEGATED bit says why an evidence ticket is not forwardable
    gateway_control: int | None = None  # the gateway account's userAccountControl (protocol transition), if found
    protected: ProtectedUsers | None = None  # its Protected Users membership, where that is the cause in question


Judge = Callable[[Mapping[str, bool]], Check]  # `delegation`, judged again with the KDC's S4U2Proxy answers


async def _directory_checks(
    config: Config, upn: str | None, clock: Callable[[], float]
) -> tuple[list[Check], Mapped | None, Judge | None]:
    """The directory bind, then the canary user's account as the mapping stage would read it (and that account), and
    the `delegation` check's judge, which `run` asks again once S4U2Proxy was tried."""
    judged: list[Judge] = []
    checks, mapped = await _directory_lookups(config, upn, clock, judged)
    return checks, mapped, judged[0] if judged else None


async def _directory_lookups(
    config: Config, upn: str | None, clock: Callable[[], float], judged: list[Judge]
) -> tuple[list[Check], Mapped | None]:
    """`_directory_checks`, the judge of `delegation` appended to `judged` where the gateway's account was read."""
    from proxy.directory import Directory
    from proxy.identity import altsecid
    from proxy.identity.mapping import account_state

    assert config.directory is not None
    directory = Directory(config.directory, config.kerberos)
    try:
        bound = await directory.check()
    except GatewayError as e:
        fix = (
            'check [directory] urls and that the server answers from here; with bind = "kerberos" the gateway\'s '
            'keytab must get a ticket for ldap/<host in the URL> (see kdc), with bind = "simple" check '
            "bind_dn and password_file"
        )
        return [Check("directory", "fail", e.hint or e.reason, fix), Check("directory-lookup", "skip", "no bind")], None
    checks = [Check("directory", "pass", f"{bound.url} bound us as {bound.whoami!r} in {bound.ms:.0f} ms")]
    spns = list(dict.fromkeys(r.spn for r in config.routes if r.backend_auth == "negotiate"))
    try:
        settings = await directory.delegation_settings(config.kerberos.principal)
        backends = await _resource_based_backends(directory, settings, spns)
    except GatewayError as e:
        detail = f"the delegation settings could not be read (the gateway's account, the backends'): {e.reason}"
        checks.append(Check("delegation", "skip", detail))
    else:
        judged.append(functools.partial(delegation_check, config.kerberos.principal, settings, spns, backends))
        checks.append(judged[0]({}))
        checks += open_backends_check(config.kerberos.principal, backends)
    basic = config.authentication.mode != "certificate"
    if basic:
        checks.append(await _lockout(config, directory, "basic-lockout", None))
    if upn is None:
        return [*checks, Check("directory-lookup", "skip", "no canary user: run with --user UPN")], None
    try:
        account = await directory.account(upn)
    except GatewayError as e:
        return [*checks, Check("directory-lookup", "fail", e.reason, e.hint)], None
    if basic:
        checks.append(await _lockout(config, directory, f"basic-lockout {upn}", account.dn))
    try:
        gateway = await directory.lookup(config.kerberos.principal)  # its protocol transition, for s4u2self's fix
    except GatewayError:
        gateway = None
    gateway_control = gateway.user_account_control if gateway is not None else None
    protected = await _protected(directory, account, gateway_control)
    mapped = Mapped(
        account.sam_account_name, directory.realm, account.dn, account.user_account_control, gateway_control, protected
    )
    strong = sum(1 for raw in account.alt_security_identities if altsecid.parse(raw).strong)
    created = account.when_created.isoformat() if account.when_created else "unknown (no whenCreated)"
    entries = "entry" if strong == 1 else "entries"
    detail = f"{upn} is {account.dn}, {account.sid}, created {created}; {strong} strong altSecurityIdentities {entries}"
    try:
        account_state(account, datetime.fromtimestamp(clock(), UTC))
    except GatewayError as e:
        return [*checks, Check("directory-lookup", "fail", f"{detail}; {e.reason}", e.hint)], mapped
    return [*checks, Check("directory-lookup", "pass", detail)], mapped


async def _resource_based_backends(
    directory: Directory, settings: DelegationSettings | None, spns: list[str]
) -> dict[str, ResourceBased]:
    """For each route's SPN the gateway's own Delegation tab does not cover, the backend account holding it and whom
    its resource-based delegation allows (`delegation_check`)."""
    if settings is None:
        return {}
    transition = settings.user_account_control & UF_TRUSTED_TO_AUTH_FOR_DELEGATION
    listed = {spn.lower() for spn in settings.allowed_to_delegate_to}
    return {spn: await directory.resource_based(spn) for spn in spns if not (transition and spn.lower() in listed)}


async def _named(config: Config, principal: str) -> Mapped | None:
    """The account of an impersonated `principal` and the gateway's, as `proxy.pipeline.forwarding_named` looks them
    up to name the one cause of an evidence ticket that is not forwardable; None where the directory has no answer."""
    from proxy.directory import Directory
    from proxy.pipeline import directory_name

    assert config.directory is not None
    directory = Directory(config.directory, config.kerberos)
    try:
        account = await directory.lookup(directory_name(principal))
        gateway = await directory.lookup(config.kerberos.principal) if account is not None else None
        control = gateway.user_account_control if gateway is not None else None
        protected = await _protected(directory, account, control) if account is not None else None
    except GatewayError:
        return None  # unreachable, or the name several accounts': both causes, as the gateway names them
    finally:
        directory.close()
    if account is None:
        return None
    uac = account.user_account_control
    return Mapped(account.sam_account_name, directory.realm, account.dn, uac, control, protected)


async def _protected(directory: Directory, account: Account, gateway_control: int | None) -> ProtectedUsers | None:
    """The account's Protected Users membership where the hint will suspect it (`protected_users_in_question`);
    None elsewhere, or where the directory did not answer."""
    if not protected_users_in_question(account.user_account_control, gateway_control):
        return None
    try:
        return await directory.protected_users(account.dn, account.sid)
    except GatewayError:
        return None


async def _lockout(config: Config, directory: Directory, name: str, account_dn: str | None) -> Check:
    """`basic-lockout`: the domain's policy (account_dn None), or the one that applies to that account."""
    try:
        policy = await directory.lockout_policy(account_dn)
    except GatewayError as e:
        return Check(name, "fail", e.hint or e.reason, "check [directory] urls (see directory)")
    if account_dn is not None and policy.source.upper().startswith("DC="):
        return Check(
            name,
            "pass",
            f"{account_dn} shows no fine-grained password policy (msDS-ResultantPSO): the domain's applies, unless the"
            " gateway's account may not read that attribute (then ask an administrator which PSO applies)",
        )
    if policy.threshold is None:
        return Check(
            name,
            "skip",
            f"the lockout policy {policy.source} cannot be read with the gateway's bind",
            f"let {config.kerberos.principal} read it (Read on that object; AD lets only administrators read a"
            " PSO), or compare authentication.basic_failures_per_user and basic_failure_window_seconds with it by"
            " hand (docs/throttles-and-limits.md)",
        )
    return lockout_check(name, policy, config.authentication)


def _checks(config: Config, upn: str | None, clock: Callable[[], float], mapped: Mapped | None) -> Iterator[Check]:
    from proxy.kerberos.delegate import Delegator

    delegator = Delegator(config.kerberos)
    try:
        yield from _kerberos_checks(config, upn, clock, mapped, delegator)
    finally:
        delegator.close()


def _kerberos_checks(
    config: Config, upn: str | None, clock: Callable[[], float], mapped: Mapped | None, delegator: Delegator
) -> Iterator[Check]:
    from proxy.kerberos.probe import KerberosProbe
    from proxy.kerberos.ticket import ticket_header

    settings = config.kerberos
    probe = KerberosProbe(settings, source=delegator.service_credentials)  # the run's one AS exchange, shared
    before = clock()
    own: GatewayError | None = None  # the gateway's own credentials refused: what needs them is not run
    try:
        probe.credentials()
        token = probe.self_ticket()
    except GatewayError as e:
        own = e if probe.refused is not None else None
        yield Check("kdc", "fail", e.reason, e.hint)
        token = None
    after = clock()
    if token is not None:
        yield Check("kdc", "pass", f"the KDC issued {settings.principal} a ticket with the keytab's key")
        try:
            held = kvnos(read_keytab(settings.keytab), settings.principal)
        except (OSError, ValueError) as e:
            held = set()
            yield Check("keytab", "fail", f"{settings.keytab}: {e}", "check kerberos.keytab")
        else:
            yield keytab_check(settings.principal, held, ticket_header(token).kvno)
        try:
            yield clock_check(probe.accept(token).authtime, before, after)
        except GatewayError as e:
            yield Check("clock", "fail", f"cannot read the KDC's time: {e.reason}", e.hint)
    else:
        missing = missing_key(settings.keytab, settings.principal)  # the file alone says that much
        if missing is None:
            yield Check("keytab", "skip", "needs a ticket from the KDC (see kdc)")
        elif own is not None:  # kdc's fix already says it (proxy.kerberos.hints): the failure is told once
            yield Check("keytab", "skip", f"not run: kdc failed on this keytab: {missing[0]}")
        else:
            yield Check("keytab", "fail", *missing)
        yield Check("clock", "skip", "needs a ticket from the KDC (see kdc)")

    routes = [r for r in config.routes if r.backend_auth == "negotiate"]  # "basic" routes need no delegation
    if upn is None or own is not None:
        # without a canary, or without the gateway's own credentials, S4U is not tried: kdc said why, once
        why = "no canary user: run with --user UPN, or set [doctor] canary_user" if upn is None else _NO_CREDENTIALS
        yield Check("s4u2self", "skip", why)
        if upn is not None:
            yield Check("kdc-account", "skip", why)
        yield from (Check(f"s4u2proxy {spn}", "skip", why) for spn in dict.fromkeys(r.spn for r in routes))
        for route in routes:
            yield _negotiate(route)
            if upn is not None:
                yield Check(f"ticket {route.prefix}", "skip", why)
        return
    whose = ""  # what the canary's principal is, when it is not the name built from the UPN
    try:
        user = map_name(upn, config.identity, source="doctor")  # enterprise_names and realm_map as the gateway
        if mapped is not None:  # strong mapping: the directory's account, as the gateway's mapping stage finds it
            principal = f"{mapped.sam_account_name}@{mapped.realm}"
            proven = {"principal": principal, "realm": mapped.realm, "account": mapped.sam_account_name}
            user = replace(user, enterprise=None, **proven)
            whose = f" (the directory's account for {upn})"
        elif config.identity.mapping != "upn":
            whose = f" (from the UPN: the directory found no account for {upn}, see directory-lookup)"
        evidence = probe.evidence_ticket(user, spn=routes[0].spn if routes else None)
    except GatewayError as e:
        yield Check("s4u2self", "fail", e.reason + whose, e.hint)
        yield Check("kdc-account", "skip", "no evidence ticket (see s4u2self)")
    else:
        if evidence.forwardable:
            yield Check("s4u2self", "pass", f"the evidence ticket for {user.principal}{whose} is forwardable")
        else:
            named = mapped
            if named is None and config.directory is not None:  # mapping "upn": the gateway's `forwarding_named`
                named = asyncio.run(_named(config, user.principal))
            yield not_forwardable_check(user.principal, whose, settings.principal, named, evidence.pac)
        yield kdc_account_check(user, evidence.pac, evidence.pac_unreadable, settings, client=evidence.client)
    headers: dict[str, str] = {}
    for spn, target in dict.fromkeys((r.spn, r.gss_target) for r in routes):
        try:
            token = delegator.delegate_blocking(user, spn, target).token
        except GatewayError as e:
            yield Check(f"s4u2proxy {spn}", "fail", e.reason, e.hint)
            continue
        headers[spn] = "Negotiate " + base64.b64encode(token).decode("ascii")
        yield Check(f"s4u2proxy {spn}", "pass", f"the KDC issued a service ticket for {user.principal} to {spn}")
    for route in routes:
        yield _negotiate(route)
        authorization = headers.get(route.spn)
        if authorization is None:
            yield Check(f"ticket {route.prefix}", "skip", f"no ticket for {route.spn} (see s4u2proxy)")
            continue
        url = route.upstream + route.prefix
        status, _, error = _get(route, url, {"Authorization": authorization})
        yield ticket_check(route, url, status, error)
        size = len("Authorization: ") + len(authorization)
        yield header_check(route, size, config.doctor.backend_header_limit, user.principal)


def _negotiate(route: Route) -> Check:
    url = route.upstream + route.prefix
    status, challenge, error = _get(route, url, {})
    return negotiate_check(route, url, status, challenge, error)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """http.client's HTTPS connection with the route's `server_name` (when set) as the SNI and the name the
    certificate is checked against, instead of the URL's host (`proxy.backend.client.Upstream` does the same)."""

    def __init__(
        self, host: str, port: int | None, timeout: float, context: ssl.SSLContext, server_name: str | None
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls, self._server_name = context, server_name or host

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._server_name)


def _get(route: Route, url: str, headers: dict[str, str], timeout: float = 5.0) -> tuple[int | None, str, str]:
    """GET `url`: (status, WWW-Authenticate values joined, error); the status is None when it failed."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        context = upstream_tls(route)  # the route's CA bundle and server_name, as the gateway uses them
        conn = _NamedHTTPSConnection(parts.hostname or "", parts.port, timeout, context, route.server_name)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, ", ".join(response.headers.get_all("WWW-Authenticate") or []), ""
    except (OSError, http.client.HTTPException) as e:
        return None, "", f"{type(e).__name__}: {e}"
    finally:
        conn.close()
