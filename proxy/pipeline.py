"""The request flow, in one place.

    TLS handshake -> certificate -> restrictions -> revocation -> identity -> mapping -> authentication
        -> route -> impersonate + delegate (or, after a password, the user's own ticket) -> backend

`authentication.mode` decides which of a certificate and Basic credentials a request needs
(`proxy.auth.modes`); without a certificate the certificate stages are skipped, never failed open.
With `identity.mapping` "strong" or "strong-or-audit" the mapping stage (`proxy.identity.mapping`) asks the
directory whether the certificate belongs to the account its UPN names, and whether that account may sign
in at all, before the KDC is asked for anything.

Each stage returns its evidence (a verified certificate, a revocation status, a user principal, a
delegated token) or raises a `proxy.errors.GatewayError`, which the middleware in `proxy.app` turns
into the local reply. Nothing reaches a backend before every stage has said yes.

A keep-alive connection's later requests take what the TLS and certificate stages made of its certificate from
its first request, where nothing that outcome rests on has changed (`again`, its theory of operation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING

import structlog
from cryptography import x509

from proxy.auth.basic import BasicLogin, PasswordLogin
from proxy.auth.modes import Authenticated, authenticate, by_certificate
from proxy.backend import headers
from proxy.backend.forward import Authorization, Handover, Pools, forward_device
from proxy.certs.chain import TrustList, VerifiedCertificate
from proxy.certs.live import LiveRevocation
from proxy.certs.memo import ChainFacts, Presented, PresentedCertificates, VerifiedChains
from proxy.certs.restrictions import Admission, admit
from proxy.certs.revocation import CrlSet, RevocationEvidence
from proxy.config import Config, Identity, Route
from proxy.device.request import DeviceRequest
from proxy.errors import (
    AccountRefused,
    AccountReplaced,
    AccountRevoked,
    CertificateRevoked,
    GatewayError,
    IdentityRejected,
    NoRoute,
    NotForwardable,
)
from proxy.held import NOT_HELD
from proxy.identity.constraints import require_within
from proxy.identity.mapping import (
    Mapping,
    account_state,
    decide,
    no_account,
    reread_note,
    sid_of_another,
    stated_sid,
)
from proxy.identity.principal import UserPrincipal, ascii_lower, map_certificate_name
from proxy.identity.upn import SOURCE_NAMES, certificate_name
from proxy.kerberos.ccache import facts_of
from proxy.kerberos.delegate import Delegation, Delegator
from proxy.kerberos.hints import not_forwardable_named, protected_users_in_question
from proxy.observability.trace import Trace
from proxy.printable import printable
from proxy.target import checked_host, origin_form
from proxy.tls.peer import presented_der, tls_facts

if TYPE_CHECKING:  # bonsai's import is start-up CPU: imported where a [directory] is configured
    from proxy.directory import Directory

log = structlog.get_logger("proxy")


@dataclass(frozen=True)
class Gateway:
    """Everything a request needs, built from one configuration."""

    config: Config
    trust: TrustList
    revocation: LiveRevocation  # live CRLs and OCSP; ends in-flight requests of revoked certificates
    delegator: Delegator
    pools: Pools
    basic: BasicLogin
    directory: Directory | None = None  # identity.mapping "strong" / "strong-or-audit"

    @cached_property
    def chains(self) -> VerifiedChains:
        """Validated chains by certificate, for this trust list (bench: the costliest stage otherwise)."""
        return VerifiedChains(self.trust)

    @cached_property
    def presented(self) -> PresentedCertificates:
        """Each TLS connection's certificate as the certificate stages read it, checked on every request
        (`PresentedCertificates`): a keep-alive request neither parses it nor looks its chain up again."""
        return PresentedCertificates(self.chains)

    @cached_property
    def certified(self) -> CertifiedChains:
        """What the certificate stages made of each chain, for a connection's later requests (`again`)."""
        return CertifiedChains()

    @cached_property
    def identify(self) -> ChainFacts[UserPrincipal]:
        """`identify` under this configuration, remembered per verified chain (refusals are not remembered).

        Decoding the names of a certificate (pyasn1 for the UPN) cost about 9 µs a request; what it
        yields depends only on the certificate and the configuration, and each `Gateway` has one of those."""
        identity = self.config.identity
        return ChainFacts(lambda verified: identify(verified.leaf, identity, cas=verified.chain[1:]))

    @cached_property
    def admission(self) -> ChainFacts[Admission]:
        """The restriction that admits a verified chain under this configuration (`admit`), remembered per chain."""
        rules = self.config.client_certificates.restrictions
        return ChainFacts(lambda verified: admit(verified, rules))

    @property
    def crls(self) -> CrlSet:
        """The CRLs in force now (the live set is swapped whole on every refresh)."""
        return self.revocation.crls.current


TLS_FACTS = ("tls_version", "tls_cipher", "tls_resumed")  # `tls_facts`'s names, in its order
_TLS_SEEN: dict[tuple[object, ...], tuple[object, ...]] = {}  # a handful: the listener's versions x ciphers x resumed


class Certified:
    """What the certificate stages made of one verified chain under one configuration: the revocation evidence
    they found, the user, and the facts they noted (after the TLS facts), in the order they noted them."""

    __slots__ = ("evidence", "names", "user", "values", "verified")

    def __init__(
        self, verified: VerifiedCertificate, evidence: RevocationEvidence, user: UserPrincipal, restriction: str | None
    ) -> None:
        self.verified = verified
        self.evidence = evidence
        self.user = user
        self.names = _CERTIFIED_FACTS
        self.values = (
            *(verified.subject, verified.issuer, verified.serial_hex, restriction),
            *(evidence.status.value, evidence.source, user.upn, user.principal, user.source),
        )


_CERTIFIED_FACTS = (
    *("cert_subject", "cert_issuer", "cert_serial", "restriction"),
    *("revocation", "revocation_source", "upn", "principal", "identity_source"),
)


class CertifiedChains:
    """The certificate stages' last outcome for each verified chain (`Certified`), by the chain object's identity
    (held, so that the identity stays its own), at most `size`, the oldest out first. One per `Gateway`."""

    def __init__(self, *, size: int = 10_000) -> None:
        self._size = size
        self._known: dict[int, Certified] = {}

    def get(self, verified: VerifiedCertificate) -> Certified | None:
        known = self._known.get(id(verified))
        return known if known is not None and known.verified is verified else None

    def keep(self, certified: Certified) -> None:
        known = self._known
        if len(known) >= self._size and id(certified.verified) not in known:
            del known[next(iter(known))]
        known[id(certified.verified)] = certified


_AUTHENTICATED = ("factors", "upn", "principal")  # the authentication stage's facts, in the order noted
_ROUTED = ("route", "spn", "upstream", "backend_auth")  # `Route.facts`'s names


def identify(leaf: x509.Certificate, identity: Identity, *, cas: Sequence[x509.Certificate] = ()) -> UserPrincipal:
    """The user the certificate names, under `identity`; a name with '@' (a UPN, or used as one) must also lie
    within the e-mail and DNS name constraints of the chain's CAs `cas` (`proxy.identity.constraints`), and a
    common name too, as the address it becomes in the default realm (`alice` of LAB.TEST: alice@lab.test)."""
    found = certificate_name(leaf, identity.sources)
    if found is None:
        wanted = " or ".join(SOURCE_NAMES[source] for source in identity.sources)
        configured = ", ".join(identity.sources)
        raise IdentityRejected(
            f"the certificate carries no {wanted}; ask for a certificate issued for your account",
            hint=f"identity.source is {configured}: have the CA issue certificates carrying that name, or add a "
            "source these certificates carry (san-upn, san-email, subject-cn; the first one present is used)",
        )
    name, source = found
    user = map_certificate_name(name, source, identity)
    if "@" in name:
        require_within(name, cas)
    else:  # a common name: the user of the default realm it names, held to the CA's constraints as an address
        address = f"{name}@{ascii_lower(user.realm)}"
        require_within(address, cas, shown=f"common name {name} (as {address})")
    return user


def forget_tickets(gw: Gateway, leaf: x509.Certificate) -> None:
    """A refused certificate's user loses their cached delegated tickets: none outlives the certificate."""
    with contextlib.suppress(GatewayError):
        forget_user(gw, identify(leaf, gw.config.identity))


def forget_user(gw: Gateway, user: UserPrincipal, *, everywhere: bool = False) -> None:
    """Drop `user`'s cached delegated tickets: the next request asks the KDC again (which refuses a disabled user).
    `everywhere`: in every worker (a held request's end: `Delegator.forget`)."""
    gw.delegator.forget(user.principal, enterprise=user.enterprise, everywhere=everywhere)
    directory = gw.directory
    account = directory.cached(user.upn) if directory is not None else None
    if directory is not None and account is not None:  # strong mapping impersonated sAMAccountName@REALM
        gw.delegator.forget(f"{account.sam_account_name}@{directory.realm}", everywhere=everywhere)


async def certificate_user(gw: Gateway, leaf: x509.Certificate, trace: Trace, now: datetime) -> UserPrincipal:
    """The certificate stages: chain, restrictions, revocation, identity, then (strong mapping) the mapping stage,
    for `explain` (`proxy.ops.explain`): a certificate of no connection."""
    certified = await certificate_stages(gw, leaf, trace, now)
    return await mapped_user(gw, certified.verified, certified.user, trace, now)


async def certificate_stages(
    gw: Gateway, leaf: x509.Certificate, trace: Trace, now: datetime, *, presented: Presented | None = None
) -> Certified:
    """Chain, restrictions, revocation and identity; what they made of the chain is kept for `again`."""
    with trace.stage("certificate"):
        try:
            if presented is not None:
                verified = gw.presented.verify(presented, at=now)
            else:
                verified = gw.chains.verify(leaf, at=now)
        except Exception:  # the refusal's log line names the certificate
            subject, issuer = leaf.subject.rfc4514_string(), leaf.issuer.rfc4514_string()
            trace.note(cert_subject=printable(subject), cert_issuer=printable(issuer))
            trace.note(cert_serial=format(leaf.serial_number, "x"))
            raise
        # the names as the chain memo rendered them once, not on every request
        trace.note(cert_subject=verified.subject, cert_issuer=verified.issuer, cert_serial=verified.serial_hex)
        trace.detail("certificate", verified=verified)  # the chain, rendered only if the trace is read
        restriction = gw.admission(verified).rule
        trace.note(restriction=restriction)
    with trace.stage("revocation"):
        try:
            revocation = await gw.revocation.check(verified, at=now)
        except CertificateRevoked:
            forget_tickets(gw, verified.leaf)
            raise
        trace.note(revocation=revocation.status.value, revocation_source=revocation.source)
        trace.detail("revocation", evidence=revocation, at=now)
    with trace.stage("identity"):
        user = gw.identify(verified)
        trace.note(upn=user.upn, principal=user.principal, identity_source=user.source)
    certified = Certified(verified, revocation, user, restriction)
    if presented is not None:
        gw.certified.keep(certified)
    return certified


def again(gw: Gateway, presented: Presented, trace: Trace, now: datetime, start: float) -> Certified | None:
    """The certificate stages of a connection's later request, decided as its first request decided them, if
    nothing they rest on has changed; None (nothing noted) when anything has, and the stages run in full.

    Theory of operation. A keep-alive connection's requests present the same certificate, and under one
    configuration (one `Gateway`: a reload makes a new one, with none of this) the chain, the restriction and the
    identity depend on nothing else; the TLS facts (version, cipher, resumption) are the handshake's, which no
    renegotiation can change (`proxy.tls.server` refuses it). So each request checks only what can change, each
    by a test that cannot be stale: its connection's peer certificate is read and its DER bytes compared
    (`PresentedCertificates.read`), the request's time against the chain's earliest notAfter, and revocation is
    asked of the CRL set in force now (`LiveRevocation.known`: the set's own verdict for the chain, which a
    refresh replaces with the set), the request going on only if the answer is the very evidence the full stages
    found (a new set, a CRL becoming or ceasing to be current, OCSP or a revocation: the full stages decide,
    and refuse, as always). What it skips: parsing, the memos' look-ups, the stages' coroutine and their notes one
    by one; the summary line, the trace and the stage times are the ones the full stages give. The mapping
    stage (strong mapping) runs on every request after this, as its directory verdicts are its own."""
    read = time.perf_counter()
    verified, until, tls = presented.verified, presented.until, presented.tls
    if verified is None or until is None or tls is None or now > until:
        return None
    known = gw.certified.get(verified)
    if known is None:
        return None
    checked = time.perf_counter()
    if gw.revocation.known(verified, at=now) is not known.evidence:
        return None
    revoked = time.perf_counter()
    trace.note_all(TLS_FACTS, tls)
    trace.note_all(known.names, known.values)
    trace.detail("certificate", verified=verified)
    trace.detail("revocation", evidence=known.evidence, at=now)
    trace.timed("tls", round((read - start) * 1e6) / 1e3)  # the connection's certificate read and compared
    trace.timed("certificate", round((checked - read) * 1e6) / 1e3)  # its chain's notAfter; what the stages made of it
    trace.timed("revocation", round((revoked - checked) * 1e6) / 1e3)
    trace.timed("identity", round((time.perf_counter() - revoked) * 1e6) / 1e3)
    return known


async def mapped_user(
    gw: Gateway, verified: VerifiedCertificate, user: UserPrincipal, trace: Trace, now: datetime
) -> UserPrincipal:
    """With mapping "strong" / "strong-or-audit" the mapping stage, on every request: the user the directory proves
    the certificate belongs to; else `user` (a `[directory]` under "upn" judges held requests only)."""
    if gw.directory is None or gw.config.identity.mapping == "upn":
        return user
    with trace.stage("mapping"):
        mapping = await map_certificate(gw.directory, verified.leaf, user, gw.config.identity, trace, now)
    if mapping.principal:  # impersonate the account the certificate belongs to, not a name built from its UPN
        proven = {"principal": mapping.principal, "realm": gw.directory.realm, "account": mapping.account_name}
        proven["account_sid"] = mapping.account_sid  # the KDC's account must have it (proxy.kerberos.account)
        user = dataclasses.replace(user, enterprise=None, **proven)
    if mapping.weak:
        log.warning(
            "weak_certificate_mapping",
            upn=user.upn,
            account=mapping.account_dn,
            cert_serial=verified.serial_hex,
            detail=mapping.detail,
        )
    return user


async def map_certificate(
    directory: Directory, leaf: x509.Certificate, user: UserPrincipal, identity: Identity, trace: Trace, now: datetime
) -> Mapping:
    """The mapping stage: the account the UPN names, its state, and whether the certificate is tied to it."""
    mode = identity.mapping
    account = await directory.lookup(user.upn)
    reread = reread_note(directory.cache_seconds)  # a refusal mended on the DC: when the gateway will see it
    if account is None:
        # strong-or-audit serves a name no account has as weakly mapped, unless the certificate says it is another's:
        # a SID is the domain's, wherever its object is (AD CS writes the requester's; ESC1 lets them write the UPN)
        found = stated_sid(leaf) if mode == "strong-or-audit" else None
        owner = await directory.sid_owner(found.sid, user.upn) if found is not None else None
        if found is not None and owner is not None:
            raise sid_of_another(found, owner, user.upn, directory.base_dn)
        sid = found.sid if found is not None else None
        mapping = no_account(user.upn, directory.base_dn, mode, sid, reread)  # refused in strong; weak in audit
        trace.note(**mapping.as_facts())
        return mapping
    trace.note(account_dn=account.dn, account_sid=str(account.sid))
    account_state(account, now, reread)  # disabled, locked out, expired: refused before any KDC request
    backdating = timedelta(seconds=identity.certificate_backdating_compensation)
    mapping = decide(leaf, account, mode, directory.realm, backdating, reread)
    trace.note(**mapping.as_facts())
    trace.detail("mapping", mapping=mapping)
    return mapping


async def backend_authorization(
    gw: Gateway, auth: Authenticated, route: Route, trace: Trace
) -> tuple[Authorization, str]:
    """A certificate alone: impersonate and delegate. After a password: the user's own ticket (or Basic header).

    Returns the header and the principal it speaks for: after a delegation, the client name the KDC returned
    (with enterprise names not the name the identity stage mapped; the log and the backend pool use it).
    On a `backend_binding = "connection"` route the delegated token is built later, by the backend stage,
    and only for a backend connection that has not carried one yet (`proxy.backend.forward`)."""
    if auth.login is not None:
        trace.detail("kerberos", own_ticket=True)
        # the principal the KDC gave the password's ticket: with enterprise names two UPNs may map to one
        # principal the identity stage built, and a backend pool keyed by it would carry both users
        try:
            return await gw.basic.authorization(auth.login, route), auth.login.ticket.principal
        except AccountRevoked as e:
            raise await account_named(gw, e, datetime.now(UTC)) from None
    delegation = await delegated(gw, auth.user, route, trace)
    if route.backend_binding == "connection":
        return OnceConnected(gw, auth.user, route, delegation, trace), delegation.principal
    return Handover(delegation.authorization()), delegation.principal  # `forward_device` takes it once


async def delegated(gw: Gateway, user: UserPrincipal, route: Route, trace: Trace, *, again: bool = False) -> Delegation:
    """The user's delegated ticket for the route's SPN (the delegator's cache, else S4U2Self and S4U2Proxy), and what
    the request's summary line and trace say of it; a refusal as the Kerberos stage gives it.

    Theory of operation. The Kerberos stage calls this once; a connection-bound route's backend stage calls it
    again when the ticket ended while the backend connection was being opened (`OnceConnected`, `again`). Both go
    through the same steps: `impersonation_cached` and `kdc_account` on the summary line (the last exchange's),
    the tickets' facts in the trace (the second exchange's under the detail stage `kerberos_again`, shown as a second
    S4U2Self and S4U2Proxy), and on a refusal the KDC's "disabled, locked or expired" named by the directory
    (`account_named`, the 403 at `kerberos`), the directory's entry dropped for an account made again since its
    look-up, and which step the KDC refused in the trace."""
    detail = "kerberos_again" if again else "kerberos"
    if again:
        trace.note(delegated_again=True)
    try:
        delegation = await gw.delegator.delegation(user, route.spn, route.gss_target)
    except GatewayError as e:
        trace.detail(detail, facts=facts_of(e))  # which step the KDC refused, and the evidence ticket
        if isinstance(e, AccountReplaced) and gw.directory is not None:  # the account was made again since the
            gw.directory.forget(user.upn)  # look-up: the next request is decided on a fresh one
        if isinstance(e, AccountRevoked):
            raise await account_named(gw, e, datetime.now(UTC)) from None
        if isinstance(e, NotForwardable):
            raise await forwarding_named(gw, e) from None
        raise
    trace.note(impersonation_cached=delegation.impersonation_cached, kdc_account=str(delegation.account))
    if delegation.principal != user.principal:
        trace.note(principal=delegation.principal, requested_principal=user.principal)
    trace.detail(detail, facts=delegation.facts, cached=delegation.impersonation_cached)  # tickets' facts
    return delegation


class OnceConnected:
    """The token of a connection-bound route, made once the backend connection is open (`proxy.backend.forward`):
    up to `connect_timeout` after the ticket was taken from the cache, long enough for a short-lived ticket to end
    (MIT then refuses to make a token on it, and the device got 502). A ticket that ended meanwhile is asked for
    again by `delegated`, as the Kerberos stage asked for it (cached, or one more exchange with the KDC), and the
    token is made on that one. `again_ms`: that second look-up's time, counted in the Kerberos stage's, not the
    backend's (`handle`)."""

    __slots__ = ("_delegation", "_gw", "_route", "_trace", "_user", "again_ms")

    def __init__(self, gw: Gateway, user: UserPrincipal, route: Route, delegation: Delegation, trace: Trace) -> None:
        self._gw, self._user, self._route, self._delegation, self._trace = gw, user, route, delegation, trace
        self.again_ms = 0.0

    async def __call__(self) -> str:
        current = self._delegation
        if not current.valid():
            trace, start = self._trace, time.perf_counter()
            try:
                current = await delegated(self._gw, self._user, self._route, trace, again=True)
            finally:
                self.again_ms = round((time.perf_counter() - start) * 1000, 3)
                trace.detail("kerberos_again", ms=self.again_ms)
                trace.timed("kerberos", round(trace.ms.get("kerberos", 0.0) + self.again_ms, 3))
        return current.authorization()


async def account_named(gw: Gateway, refused: AccountRevoked, now: datetime) -> AccountRevoked:
    """The KDC's "disabled, locked or expired" (one code for the three) as the one state the directory names, where
    a [directory] is configured and has the account (its cache, else one search: `cache_seconds` per user at most);
    else the KDC's refusal as it is. Either way the user's 403 at `kerberos`."""
    if gw.directory is None or not refused.user:
        return refused
    try:
        account = await gw.directory.lookup(directory_name(refused.user))
        if account is not None:
            account_state(account, now)
    except AccountRefused as state:  # "the account has expired": named with the principal, the KDC's words kept
        reason = state.reason.replace("the account", f"the account {refused.user}", 1)
        return AccountRevoked(reason, hint=f"{state.hint}; the KDC: {refused.hint}", user=refused.user)
    except GatewayError:
        return refused  # the directory unreachable, or the name several accounts': the KDC's word alone
    return refused


async def forwarding_named(gw: Gateway, refused: NotForwardable) -> NotForwardable:
    """The KDC's "evidence ticket not forwardable" (two causes, one answer) with the one cause the directory shows,
    where a [directory] is configured and has the user's account (its cache, else one search): the user marked
    'Account is sensitive and cannot be delegated', or else the gateway's account without protocol transition; else
    the refusal as it is, naming both. Either way the user's 403 at `kerberos`."""
    if gw.directory is None or not refused.user:
        return refused
    proxy = gw.config.kerberos.principal
    try:
        account = await gw.directory.lookup(directory_name(refused.user))
        gateway = await gw.directory.lookup(proxy) if account is not None else None  # a user account (not a gMSA)
    except GatewayError:
        return refused  # the directory unreachable, or the name several accounts': both causes, as the KDC left it
    if account is None:
        return refused
    control = gateway.user_account_control if gateway is not None else None
    protected = None  # Protected Users, where it is the cause left: a member itself, or through which group
    if protected_users_in_question(account.user_account_control, control):
        with contextlib.suppress(GatewayError):
            protected = await gw.directory.protected_users(account.dn, account.sid)
    hint = not_forwardable_named(
        user=refused.user,
        proxy=proxy,
        dn=account.dn,
        sam=account.sam_account_name,
        user_account_control=account.user_account_control,
        gateway_control=control,
        protected=protected,
    )
    message = f" [{refused.message}]" if refused.message else ""
    return NotForwardable(refused.reason, hint=hint + message, user=refused.user, message=refused.message)


def _presented(gw: Gateway, request: DeviceRequest) -> Presented | None:
    """The certificate the request's connection presents, as the connection's earlier requests read it if its
    bytes are the same (`PresentedCertificates`); None without one."""
    peer = presented_der(request)
    return gw.presented.read(*peer) if peer is not None else None


async def _certificate(
    gw: Gateway, request: DeviceRequest, trace: Trace, now: datetime
) -> tuple[Presented | None, Certified | None]:
    """The TLS stage and the certificate stages: the certificate the connection presents (None without one), and
    what the stages made of it: as the connection's first request decided it if nothing it rests on has changed
    (`again`), else decided in full."""
    start = time.perf_counter()
    presented = _presented(gw, request)
    known = again(gw, presented, trace, now, start) if presented is not None else None  # a keep-alive request
    if known is None:  # the connection's first request, or something the stages rest on changed: all of them
        facts = tls_facts(request)
        trace.note(**facts)
        if presented is not None and facts:
            values = tuple(facts[name] for name in TLS_FACTS)
            presented.tls = _TLS_SEEN.setdefault(values, values)  # one tuple for all connections alike
        trace.timed("tls", round((time.perf_counter() - start) * 1e6) / 1e3)
        if presented is not None:
            known = await certificate_stages(gw, presented.leaf, trace, now, presented=presented)
    return presented, known


def _held(
    gw: Gateway,
    request: DeviceRequest,
    leaf: x509.Certificate | None,
    certified: UserPrincipal | None,
    auth: Authenticated,
) -> contextlib.AbstractContextManager[None]:
    """A request is judged again by the directory while it is held, wherever one is configured (`proxy.held_mapping`):
    under a strong mode the mapping stage's decision on its certificate; after a Basic sign-in, or for a certificate
    under `mapping = "upn"`, its account's state."""
    directory = gw.directory
    if directory is None:
        return NOT_HELD
    login = auth.login
    if leaf is not None and certified is not None and gw.config.identity.mapping != "upn":  # with a password too
        forget = functools.partial(_forget_all, gw, certified, login)
        return directory.held.hold(request, leaf, certified.upn, gw.config.identity, forget=forget)
    if login is not None:  # the account the KDC signed in; the Basic entry is dropped if it is ended
        if not _in_realm(login.ticket.principal, directory.realm):
            return NOT_HELD  # another realm's account: the directory's account of that name is someone else
        name = directory_name(login.ticket.principal)
        forget = functools.partial(_forget_all, gw, None, login)
        return directory.held.hold_account(request, name, basic_user=login.ticket.principal, forget=forget)
    if leaf is None or certified is None or not _in_realm(certified.principal, directory.realm):
        return NOT_HELD
    # mapping "upn": the KDC's account has the certificate's UPN (proxy.kerberos.account)
    return directory.held.hold_account(request, certified.upn, forget=functools.partial(_forget_all, gw, certified))


def _in_realm(principal: str, realm: str) -> bool:
    """Whether the directory's realm signed `principal` in. A principal of another realm (`identity.realm_map` to an
    MIT realm) is never the directory's account: looked up by its name, the directory would answer with whichever of
    its accounts has that UPN (an alternate suffix: another person), whose state would end this user's requests."""
    return ascii_lower(principal.rpartition("@")[2]) == ascii_lower(realm)


def _forget_all(gw: Gateway, certified: UserPrincipal | None, login: PasswordLogin | None = None) -> None:
    """What the gateway keeps that would serve the user's next request without the KDC: the delegated tickets of the
    certificate's user, the verified password of a Basic sign-in."""
    if certified is not None:
        forget_user(gw, certified, everywhere=True)
    if login is not None:
        gw.basic.forget(login)


def directory_name(principal: str) -> str:
    """The name to look a signed-in principal up by: an NT-ENTERPRISE principal's UPN (`carol\\@corp.example@AD.TEST`
    is carol@corp.example), else the principal itself (`alice@AD.TEST`: the directory finds its sAMAccountName)."""
    local = principal.rpartition("@")[0]
    return local.replace("\\@", "@") if "\\@" in local else principal


async def handle(gw: Gateway, request: DeviceRequest, trace: Trace) -> None:
    now = datetime.now(UTC)
    target = origin_form(request.raw_path)  # before any stage: the path the backend will act on
    checked_host(request.headers.get("Host"))  # sent on as X-Forwarded-Host: a host, or 400
    if target.forward != request.rel_raw_path:
        trace.note(backend_path=target.path)
    route = gw.config.route_for(target.path, request.host)
    presented, known = await _certificate(gw, request, trace, now)
    leaf = presented.leaf if presented is not None else None
    certified = await mapped_user(gw, known.verified, known.user, trace, now) if known is not None else None
    with trace.stage("authentication"):
        mode = gw.config.authentication.mode
        auth = by_certificate(mode, certified, route)  # a certificate alone: nothing to await
        if auth is None:
            try:
                auth = await authenticate(gw.basic, mode, request, certified, route, gw.directory)
            except AccountRevoked as e:
                raise await account_named(gw, e, now) from None
        user = auth.user
        trace.note_all(_AUTHENTICATED, (auth.factors, user.upn, user.principal))
        if auth.login is not None:
            trace.note(basic_user=auth.login.user.upn, basic_cached=auth.login.cached)
    if route is None:
        raise NoRoute("nothing is published at this path")
    trace.note_all(_ROUTED, route.facts)
    with trace.stage("kerberos"):
        authorization, principal = await backend_authorization(gw, auth, route, trace)
    # ended if the certificate is revoked meanwhile (and its user's tickets dropped), or (with a [directory]) if the
    # directory refuses it meanwhile
    forget = None if certified is None else functools.partial(forget_user, gw, certified, everywhere=True)
    try:
        with (
            trace.stage("backend"),
            gw.revocation.watch(request, forget=forget),
            _held(gw, request, leaf, certified, auth),
        ):
            context = headers.context_headers(route.context_headers, user=user, leaf=leaf)
            del leaf, presented  # not kept by a held request (the connection's reading is the connection's)
            result = await forward_device(request, route, gw.pools, principal, authorization, context, target)
    finally:
        if isinstance(authorization, OnceConnected) and authorization.again_ms:  # timed as the Kerberos stage's
            trace.timed("backend", round(max(trace.ms["backend"] - authorization.again_ms, 0.0), 3))
    trace.note(backend_status=result.status, backend_ms=round(result.ms * 1e3) / 1e3)
    if route.backend_binding == "connection":
        trace.note(backend_auth_sent=result.token_sent)  # False: the connection already carries the user's identity
    trace.detail("backend", reused=result.reused, token_sent=result.token_sent)
