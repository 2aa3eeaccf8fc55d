r"""Impersonate (S4U2Self), then delegate (S4U2Proxy): a Negotiate token for a user who gave no password.

Theory of operation. The gateway holds a keytab for its own principal (`HTTP/proxy...`). With it, it
asks the KDC for a ticket *to itself* in the user's name (S4U2Self, "protocol transition"): that
*evidence ticket* proves nothing about the user to anyone else; it is forwardable only if the KDC lets
the gateway's account act for users without their credentials (`ok_to_auth_as_delegate`,
AD's "use any authentication protocol"). The gateway then presents the evidence ticket to ask for a
ticket to the backend's SPN (S4U2Proxy, "constrained delegation"), which the KDC grants only for SPNs
in the gateway's delegation list. The first GSSAPI token built on that service ticket goes into
`Authorization: Negotiate`.

The ticket cache. A user's first request to an SPN costs exactly two KDC exchanges (one S4U2Self, one S4U2Proxy);
later requests cost none. MIT keeps the impersonated credentials of a user in a MEMORY credential cache of their
own, holding a copy of the gateway's TGT, the evidence ticket and the service tickets obtained with it. Right after
S4U2Proxy the service ticket is also read out of it once and held with the entry (`proxy.kerberos.ap_req`), and
each token is MIT's `krb5_mk_req_extended` on it: local work (15 µs of CPU in a loop, against 21 through MIT's GSS
initiator, which is kept for a ticket that cannot be read that way: docs/performance.md), so it is built on the
event loop, never in a thread. Entries are keyed by (the name the KDC is asked for, SPN) (`asked_name`: the
principal, or the NT-ENTERPRISE UPN, never the principal built from it, which two UPNs can share) and know when
their service ticket expires: from `RENEW_BEFORE` seconds before that (or from halfway through its life, for a
ticket that lives less), the next request starts a fresh exchange in the background and keeps using the old ticket
meanwhile; a ticket with less than `USABLE_FOR` seconds left (a quarter of its life, for one living less than
4 x `USABLE_FOR`: `usable_until`) is never used. Concurrent first requests of one key
share one exchange (single flight), so one user never has more than one exchange in flight. The cache is bounded
(least recently used evicted first); `forget(principal, enterprise=...)` drops a user (their certificate was
revoked, the directory ended their held request) and `clear()` drops everything (the configuration changed). With
several workers each has a cache of its own; when a held request ends, `forget(..., everywhere=True)` also writes
the user into the log the workers share (`proxy.auth.shared.SharedTable.forget_users`, the users of one turn of the
event loop together, those of one directory sweep together: `proxy.auth.shared.packing_forgotten`): every other
worker drops that user's tickets before it serves its next request from any ticket (`delegation` reads the log's
generation first, a read of shared memory), so an account the directory found disabled is served by none of them.

Which name. The cache and the log name the user as the KDC returned them, the client name of the
evidence ticket, not as the gateway asked: with `identity.enterprise_names` the gateway asks for the
NT-ENTERPRISE `carol@corp.example`, and Samba's KDC answers `carol\@corp.example@AD.TEST` (Windows may
canonicalise to the account's name). The name asked for (the NT-ENTERPRISE `carol@corp.example`, not the
principal `carol@CORP.EXAMPLE` the identity stage mapped, a name that exists nowhere) is only the index
that finds that entry (`_canonical`).

What it trusts: the identity handed to it, which the certificate and identity stages established.
What it refuses: every KDC refusal becomes a gateway error with a fix (`proxy.kerberos.hints`); a
refusal while renewing drops the user's entry, so a user disabled in the directory stops being
served when their ticket would have been renewed. And an evidence ticket whose PAC names another
account than the certificate (`proxy.kerberos.account`): the name the gateway asked for is not
always the certificate's account (`realm_map` against AD), so every request, from a fresh or a
cached ticket, is checked against the PAC read once per exchange; a mismatch is `AccountMismatch`, and so
is a ticket without any PAC unless `kerberos.kdc_account = "optional"` (then each such ticket is logged as
`kdc_account_unverified`). An evidence ticket the gateway cannot open (its key changed at the KDC and the keytab not
rewritten yet) is refused right after S4U2Self, as the operator's 502 (`kerberos_misconfigured`, naming the key
versions: the user did nothing wrong), and never cached: kept, it refused its user for its whole life, long after the
keytab was current.

The recheck. AD issues tickets for 10 hours, and a cached one serves its user that long whatever happens to the
account meanwhile: disabled, deleted, marked sensitive, put in Protected Users, renamed (as a ticket already issued
serves on at a Windows backend). Where `kerberos.ticket_recheck_seconds` is set (0, the default, keeps issue #18's
two exchanges per user per ticket lifetime), an entry is also renewed (in the background, as above) that long after
the exchange that made it, when that comes before `RENEW_BEFORE`; the KDC's refusal then drops it, and the next
request gets that refusal. With `[directory]`, the account's state is read again every `cache_seconds` without it.

The exchanges with the KDC block (and release the GIL): they run in `max_in_flight` threads of their own
(`proxy.kerberos.threads`), bounded in time by `kdc_timeout` (the wait for a thread included); an exchange that
finds every thread held by calls a silent KDC left unanswered, or as many exchanges waiting as there are threads,
is refused at once (503), and a stop never waits for a thread MIT holds. A security context is built per request
and never shared. Only this package imports `gssapi`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import hashlib
import itertools
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import gssapi
import gssapi.exceptions
import gssapi.raw
import structlog

from proxy.auth.shared import ForgottenUser, SharedTable, put_off
from proxy.config import Kerberos
from proxy.errors import (
    AccountMismatch,
    AccountReplaced,
    GatewayError,
    KdcNotAsked,
    KdcUnavailable,
    KerberosMisconfigured,
    KerberosRefused,
)
from proxy.identity.principal import UserPrincipal, ascii_lower
from proxy.kerberos.acceptor import context_pac
from proxy.kerberos.account import (
    KdcAccount,
    kdc_account,
    require_client,
    require_readable,
    require_stated,
    require_user_account,
)
from proxy.kerberos.ap_req import Krb5Error, TicketTokens
from proxy.kerberos.ccache import S4UFacts, attach, s4u_facts
from proxy.kerberos.hints import (
    clock_skew,
    explain,
    from_active_directory,
    is_clock_skew,
    no_descriptor_for_kdc,
    own_ticket_refused,
)
from proxy.kerberos.kdcs import KdcWatch, watch_for
from proxy.kerberos.keytab import (
    FileVersion,
    RefusedBefore,
    file_version,
    held_versions,
    missing_key,
    refusal_words,
)
from proxy.kerberos.pac import PacFacts
from proxy.kerberos.password import TOKEN_FLAGS, user_name
from proxy.kerberos.profile import hold_profile, refresh_profile, set_realm_section, use_profile
from proxy.kerberos.spnego import neg_token_init, neg_token_init_ap_req
from proxy.kerberos.threads import KdcThreads, NoThread, no_thread_error

log = structlog.get_logger("proxy.kerberos")

KRB5 = gssapi.MechType.kerberos
# Impersonate for krb5 only, and build tokens on the krb5 mechanism: the SPNEGO framing is ours
# (`proxy.kerberos.spnego`, the same bytes MIT's SPNEGO initiator makes around the same krb5 token, for a
# third less CPU per token). With mechs=(krb5, SPNEGO) MIT runs S4U2Self once per mechanism (KRB5_TRACE shows
# two PROTOCOL-TRANSITION requests).
_MECHS = (KRB5,)
RENEW_BEFORE = 300.0  # seconds before a service ticket expires when a background renewal starts
USABLE_FOR = 30.0  # a ticket with less left than this is not used: the request waits for a fresh one
TOKEN_LEFT = 2.0  # a token made later (`Delegation.valid`) needs a ticket with this much left: the clocks' rounding
_RETRY_AFTER = 30.0  # after a failed background renewal, the next one starts no sooner than this
# The KDC's words for "that key is wrong" to an AS exchange with the keytab: AD counts each as a bad password of the
# gateway's account, towards its lockout threshold (two per try, as seen against Samba AD).
Key = tuple[str, str]  # (the name asked for, `asked_name`, or the KDC's client name for it; SPN)
_ENTERPRISE_KEY = "\\enterprise:"


@dataclass(frozen=True)
class DelegatedToken:
    """Evidence of the Kerberos stage: a Negotiate token for `principal` at `spn`."""

    principal: str
    spn: str
    token: bytes = field(repr=False)
    impersonation_cached: bool  # True when the service ticket came from the cache: no KDC exchange
    ms: float
    facts: S4UFacts | None = None  # the evidence and service tickets the KDC issued (no keys): for traces
    account: KdcAccount | None = None  # the account the evidence ticket's PAC names, checked against the certificate

    @property
    def authorization(self) -> str:
        return "Negotiate " + base64.b64encode(self.token).decode("ascii")


@dataclass(frozen=True)
class Delegation:
    """Evidence of the Kerberos stage: a service ticket for `principal` at `spn` is at hand; `authorization()`
    builds a Negotiate token on it (local work, no KDC), only when a request is to carry one."""

    principal: str
    spn: str
    impersonation_cached: bool  # True when the service ticket came from the cache: no KDC exchange
    ms: float
    facts: S4UFacts | None
    make_token: Callable[[], bytes] = field(repr=False)
    account: KdcAccount = field(default_factory=lambda: KdcAccount("none"))  # whom the evidence ticket's PAC names
    # whether the service ticket is still good for a token now: a connection-bound route makes its token once the
    # backend connection is open, up to connect_timeout later, and asks again for a ticket that ended meanwhile
    valid: Callable[[], bool] = field(default=lambda: True, repr=False)

    def authorization(self) -> str:
        return "Negotiate " + base64.b64encode(self.make_token()).decode("ascii")


@dataclass
class _Ticket:
    """A cache entry: the user's impersonated credentials, whose own ccache holds the service ticket."""

    creds: gssapi.Credentials
    expires: float  # clock time when the service ticket expires
    renew_not_before: float = 0.0
    obtained: float = float("inf")  # clock time of the exchange that made it (the recheck counts from there)
    facts: S4UFacts | None = None  # what the exchange that made this entry got from the KDC
    client: str = ""  # the client name the KDC returned (the evidence ticket's), or the name asked for
    pac: PacFacts | None = None  # the evidence ticket's PAC (read, else the exchange failed): which account it names
    accounts: dict[tuple[str, str | None, str, str | None, str | None], KdcAccount] = field(
        default_factory=dict
    )  # names the PAC matched
    evidence_client: str | None = None  # the evidence ticket's client principal, as the KDC returned it
    tokens: TicketTokens | None = None  # the service ticket held for tokens (`proxy.kerberos.ap_req`), if read

    def account_for(self, user: UserPrincipal, settings: Kerberos) -> KdcAccount:
        """`kdc_account` for `user`, remembered per certificate name: a cached ticket's request pays a dict look-up."""
        key = (user.upn, user.account, user.principal, user.enterprise, user.account_sid)
        found = self.accounts.get(key)
        if found is None:
            found = kdc_account(  # a mismatch raises and is not remembered
                user,
                self.pac,
                client=self.evidence_client,
                policy=settings.kdc_account,
                proxy=settings.principal,
            )
            if len(self.accounts) >= 16:  # one principal's ticket: a handful of names at most, bounded anyway
                self.accounts.clear()
            self.accounts[key] = found
        return found

    def renew_at(self, recheck: float) -> float:
        """When a request starts this entry's background renewal: `renew_from` (`RENEW_BEFORE` seconds before its
        service ticket expires, not before it is half its life old: one living less, which a short maxlife at the KDC
        gives, was in its window from birth, and every request started another exchange), or `recheck` seconds
        (kerberos.ticket_recheck_seconds, 0: none) after the exchange that made it, if sooner."""
        renew_at = renew_from(self.obtained, self.expires)
        if recheck:
            renew_at = min(renew_at, self.obtained + recheck)
        return renew_at

    def __post_init__(self) -> None:
        if not self.client and self.facts is not None:
            ticket = self.facts.evidence or self.facts.service
            self.client = ticket.client if ticket is not None else ""


@dataclass
class CacheStats:
    """Counters for metrics and tests: hits, KDC exchanges (S4U2Self + S4U2Proxy pairs begun in a thread: not one
    refused before any KDC was asked), renewals, failures (refusals included)."""

    hits: int = 0
    exchanges: int = 0
    renewals: int = 0
    failures: int = 0


class Delegator:
    """Owns the gateway's service credentials and turns user principals into Negotiate tokens."""

    def __init__(
        self,
        settings: Kerberos,
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedTable | None = None,
    ) -> None:
        """`shared`: the workers' table, whose log of forgotten users every worker's delegator follows."""
        # MIT krb5 reads its profile from the environment when a library context is created.
        use_profile(settings.krb5_config)
        hold_profile()  # krb5.conf parsed once, not once per token (proxy.kerberos.profile)
        self._settings = settings
        self._clock = clock
        self._ccache = f"MEMORY:kcd-proxy-{uuid.uuid4().hex}"
        self._service: gssapi.Credentials | None = None
        self._service_renew_at = 0.0  # time.monotonic() from which `_service_credentials` acquires them again
        self._service_lock = threading.Lock()
        # (the keytab file as it was, the KDC's refusal of its keys): not offered again until the file changes
        self._refused_keytab: tuple[FileVersion | None, gssapi.raw.GSSError | RefusedBefore] | None = None
        self._own: tuple[gssapi.Name, gssapi.Credentials] | None = None  # for reading evidence tickets' PACs
        self._tickets: OrderedDict[Key, _Ticket] = OrderedDict()  # keyed by the KDC's client name
        self._canonical: dict[str, str] = {}  # the principal asked for -> the client name the KDC returned
        self._flights: dict[Key, asyncio.Task[_Ticket]] = {}
        self._targets: dict[str, gssapi.raw.Name] = {}  # HTTP@host -> its krb5 mechanism name (`_token`)
        self._spns: set[str] = set()  # every SPN asked for: forget() looks a principal up under each
        self._cache_size = cache_size
        self._shared = shared
        self._seen = shared.generation() if shared is not None else 0  # the shared log's entries acted on
        self._telling: dict[ForgottenUser, None] = {}  # users forgotten everywhere this turn, not yet in the log
        self._tell_soon = False  # the loop's next turn writes them (`forget`)
        # the exchanges' threads: bounded in number and in waiters, a stop never waits for MIT (proxy.kerberos.threads)
        self._kdc = KdcThreads(settings.max_in_flight, settings.kdc_timeout, "kdc")
        self.stats = CacheStats()
        # which of the realm's KDCs answer (proxy.kerberos.kdcs); started with the event loop (`watch_kdcs`)
        self.kdcs: KdcWatch | None = watch_for(
            settings.principal, settings.krb5_config, settings.kdc_timeout / 2, set_realm_section
        )

    def stop_watch(self) -> None:
        """Stop watching the realm's KDCs, the watch's section taken out of the overlay (a reload replaced this
        delegator: the new one's watch, if any, decides from now on)."""
        if self.kdcs is not None:
            self.kdcs.stop()

    async def watch_kdcs(self) -> None:
        """Probe the realm's KDCs once, then watch them (once per delegator; from the running event loop)."""
        if self.kdcs is not None:
            await self.kdcs.start()

    # -- the request path ------------------------------------------------------------------------------

    async def delegate(self, user: UserPrincipal, spn: str, gss_target: str) -> DelegatedToken:
        """A Negotiate token for `user` at `spn`: from the cached service ticket, or after one exchange."""
        start = time.perf_counter()
        delegation = await self.delegation(user, spn, gss_target)
        token = delegation.make_token()
        return DelegatedToken(
            delegation.principal, spn, token, delegation.impersonation_cached, _ms(start), delegation.facts
        )

    async def delegation(self, user: UserPrincipal, spn: str, gss_target: str) -> Delegation:
        """The service ticket for `user` at `spn` (cached, or after one exchange); tokens on it come later."""
        start = time.perf_counter()
        shared = self._shared
        if shared is not None and shared.generation() != self._seen:  # another worker forgot users meanwhile
            self._catch_up(shared)
        self._not_the_gateway(user)
        asked = (asked_name(user), spn)  # what single-flights an exchange: the name the KDC is asked for
        key = self._key(*asked)  # where its result is kept: the KDC's name for the user
        self._spns.add(spn)
        now = self._clock()
        ticket = self._tickets.get(key)
        cached = ticket is not None and now < usable_until(ticket.obtained, ticket.expires)
        if ticket is not None and cached:
            self._tickets.move_to_end(key)
            self.stats.hits += 1
            renew_at = ticket.renew_at(self._settings.ticket_recheck_seconds)
            if now >= max(renew_at, ticket.renew_not_before) and asked not in self._flights:
                ticket.renew_not_before = now + _RETRY_AFTER
                self.stats.renewals += 1
                self._flight(asked, user, spn, gss_target)
        else:
            ticket = await asyncio.shield(self._flights.get(asked) or self._flight(asked, user, spn, gss_target))
        client = ticket.client or user.principal
        try:
            account = ticket.account_for(user, self._settings)  # cached or not: is the KDC's account the certificate's?
        except AccountMismatch as e:
            if ticket.facts is not None:  # the trace shows the evidence ticket whose PAC named another account
                attach(e, dataclasses.replace(ticket.facts, failed_step="s4u2self"))
            if isinstance(e, AccountReplaced):  # a cached ticket may be the earlier account's: the KDC is asked again
                self.forget(user.principal, enterprise=user.enterprise)
            raise
        creds, tokens = ticket.creds, ticket.tokens

        def make_token() -> bytes:
            try:
                token = self._token(creds, gss_target, tokens)
            except (gssapi.raw.GSSError, Krb5Error) as e:
                self._drop(asked)
                raise self._explain(_message(e), client, spn) from None
            if not token:
                raise self._explain("no token produced", client, spn)
            return token

        expires = ticket.expires

        def valid() -> bool:
            return self._clock() < expires - TOKEN_LEFT

        return Delegation(client, spn, cached, _ms(start), ticket.facts, make_token, account, valid)

    def _key(self, principal: str, spn: str) -> Key:
        """The cache key of `principal` at `spn`: the client name the KDC returned for it, once known."""
        return (self._canonical.get(principal, principal), spn)

    def _token(self, creds: gssapi.Credentials, gss_target: str, tokens: TicketTokens | None = None) -> bytes:
        """The first SPNEGO token on the cached service ticket: local work, no KDC. A krb5 AP-REQ with a fresh
        authenticator (MIT's), in the NegTokenInit MIT's SPNEGO would put it in (`proxy.kerberos.spnego`). Made by
        MIT's `krb5_mk_req_extended` on the ticket held for it (`tokens`, `proxy.kerberos.ap_req`: no library
        context and no ccache look-up per token), else by MIT's GSS initiator (the same token, slower) on a
        target that is a krb5 mechanism name, made once per target: given a name of no mechanism, MIT imports it
        into krb5 and releases it again for every token, each time with a library context of its own."""
        refresh_profile()
        if tokens is not None:
            return neg_token_init_ap_req(tokens.ap_req())
        token = gssapi.raw.init_sec_context(self._target(gss_target), creds=creds, mech=KRB5, flags=TOKEN_FLAGS).token
        return neg_token_init(token) if token else b""

    def _tokens(self, creds: gssapi.Credentials, gss_target: str) -> TicketTokens | None:
        """The service ticket S4U2Proxy just put in `creds`, held for tokens; None (and python-gssapi makes them)
        where it cannot be read that way (no libkrb5, or MIT filed it under another name)."""
        try:
            return TicketTokens.read(creds, self._target(gss_target), TOKEN_FLAGS)
        except (gssapi.raw.GSSError, Krb5Error) as e:
            log.info("krb5_tokens_unavailable", reason=_message(e), spn=gss_target.replace("@", "/", 1))
            return None

    def _target(self, gss_target: str) -> gssapi.raw.Name:
        """`HTTP@host` as a krb5 mechanism name, made once: S4U2Proxy fetches the service ticket for it and every
        token names it, so both always look for the same principal."""
        target = self._targets.get(gss_target)
        if target is None:  # two threads may both make it: the same name, either kept
            name = gssapi.Name(gss_target, gssapi.NameType.hostbased_service)
            target = self._targets[gss_target] = gssapi.raw.canonicalize_name(name, KRB5)
        return target

    # -- exchanges with the KDC ------------------------------------------------------------------------

    def _flight(self, key: Key, user: UserPrincipal, spn: str, gss_target: str) -> asyncio.Task[_Ticket]:
        """Start the one exchange for `key`; its result replaces the entry unless `key` was forgotten."""
        task = asyncio.get_running_loop().create_task(self._exchange(user, spn, gss_target))
        self._flights[key] = task

        def landed(done: asyncio.Task[_Ticket]) -> None:
            error = None if done.cancelled() else done.exception()  # retrieved even if nobody waits
            if self._flights.get(key) is not done:
                return  # forgotten or cleared meanwhile: the result must not come back
            del self._flights[key]
            if done.cancelled():
                return
            if error is None:
                self._store(key, done.result())  # under the KDC's name for the user
            elif isinstance(error, KerberosRefused):
                self._drop(key)  # the KDC says no now: stop serving this user from an older ticket
            if error is not None:
                self.stats.failures += 1
                log.info("delegation_failed", principal=user.principal, spn=spn, error=str(error))

        task.add_done_callback(landed)
        return task

    async def _exchange(self, user: UserPrincipal, spn: str, gss_target: str) -> _Ticket:
        kdcs = self.kdcs
        if kdcs is not None and kdcs.none_answer:  # no thread is given to MIT's 25 s wait for a silent KDC
            silent = ", ".join(f"{p.address} ({p.detail})" for p in kdcs.last)
            refusal = self._explain(
                f"cannot contact any KDC: none of {kdcs.section.realm}'s answered the gateway's last probe: {silent}",
                user.principal,
                spn,
            )
            raise KdcNotAsked(refusal.reason, hint=refusal.hint)
        refresh_profile()
        try:
            return await self._exchange_in_thread(user, spn, gss_target)
        except KdcUnavailable as e:
            if type(e) is KdcUnavailable and not _descriptor_left():  # MIT opened no socket: this process is full
                raise no_descriptor_for_kdc(e.hint or e.reason) from None
            raise

    async def _exchange_in_thread(self, user: UserPrincipal, spn: str, gss_target: str) -> _Ticket:
        kdcs = self.kdcs
        try:  # an exchange counts once a thread is given to it: a call refused before the KDC is asked does not
            return await self._kdc.run(self._exchange_blocking, user, gss_target, started=self._count_exchange)
        except NoThread as e:  # every thread in a call and as many waiting, or held by calls MIT keeps
            realm = kdcs.section.realm if kdcs is not None else self._settings.principal.rpartition("@")[2]
            raise no_thread_error(e, self._kdc, realm, "the gateway's KDC exchanges") from None
        except TimeoutError:
            if kdcs is not None:
                kdcs.check_soon()  # which KDC went silent: MIT is told to ask the others
            raise self._explain(
                f"cannot contact any KDC within {self._settings.kdc_timeout:g} s", user.principal, spn
            ) from None
        except _StepFailed as e:
            raise self._step_error(e, user.principal, spn) from None
        except gssapi.raw.GSSError as e:
            raise self._explain(e.gen_message(), user.principal, spn) from None

    def _count_exchange(self) -> None:
        self.stats.exchanges += 1

    def _exchange_blocking(self, user: UserPrincipal, gss_target: str) -> _Ticket:
        """S4U2Self, then S4U2Proxy (the first token fetches the service ticket into the user's ccache).

        Each step is timed, and the tickets' facts are read from the credential (`proxy.kerberos.ccache`),
        also when S4U2Proxy fails: then the evidence ticket says whether it was forwardable. The gateway's
        own credentials come first, as a step of their own: their failure is the operator's, not the user's."""
        name = user_name(user)  # the principal, or the NT-ENTERPRISE UPN with identity.enterprise_names
        proxy, spn = self._settings.principal, gss_target.replace("@", "/", 1)
        held, before = self._service, time.perf_counter()
        try:
            service = self._service_credentials()  # the AS exchange with the keytab, when none is held
        except (gssapi.raw.GSSError, RefusedBefore) as e:
            keytab = missing_key(self._settings.keytab, proxy)  # what the file holds, if not the gateway's key
            message = e.gen_message()
            raise explain(message, user=user.principal, spn=spn, proxy=proxy, step="service", keytab=keytab) from None
        start = time.perf_counter()
        tgt_ms = None if service is held else (start - before) * 1000  # a TGT this exchange waited for: shown
        try:
            creds = service.impersonate(name, usage="initiate", mechs=_MECHS)  # S4U2Self
        except gssapi.raw.GSSError as e:
            failed = s4u_facts(
                None,
                proxy=proxy,
                spn=spn,
                s4u2self_ms=_ms(start),
                s4u2proxy_ms=None,
                failed_step="s4u2self",
                gateway_tgt_ms=tgt_ms,
            )
            raise _StepFailed(e, failed) from None
        middle = time.perf_counter()
        took = (middle - start) * 1000  # S4U2Self's time
        client = _client_name(creds)  # whom the KDC impersonated, as it wrote the evidence ticket's client
        try:
            pac, unreadable = self._evidence_pac(creds)  # local work, in neither step's time
        except KerberosMisconfigured as e:  # the trace shows the evidence ticket the gateway could not open
            attach(
                e,
                s4u_facts(
                    creds, proxy=proxy, spn=spn, s4u2self_ms=_ms(start), s4u2proxy_ms=None, failed_step="s4u2self"
                ),
            )
            raise
        self._require_stated(user, creds, proxy, spn, (pac, unreadable), client, took)
        after_pac = time.perf_counter()
        try:
            target = self._target(gss_target)
            result = gssapi.raw.init_sec_context(target, creds=creds, mech=KRB5, flags=TOKEN_FLAGS)  # S4U2Proxy
        except gssapi.raw.GSSError as e:
            failed = s4u_facts(
                creds,
                proxy=proxy,
                spn=spn,
                s4u2self_ms=took,
                s4u2proxy_ms=None,
                failed_step="s4u2proxy",
                evidence_pac=pac,
                gateway_tgt_ms=tgt_ms,
            )
            raise _StepFailed(e, failed) from None
        lifetime = float("inf") if result.lifetime is None else float(result.lifetime)
        after = _ms(after_pac)
        got = s4u_facts(
            creds, proxy=proxy, spn=spn, s4u2self_ms=took, s4u2proxy_ms=after, evidence_pac=pac, gateway_tgt_ms=tgt_ms
        )
        now = self._clock()
        return _Ticket(
            creds,
            now + lifetime,
            obtained=now,
            facts=got,
            pac=pac,
            evidence_client=client,
            tokens=self._tokens(creds, gss_target),
        )

    def delegate_blocking(self, user: UserPrincipal, spn: str, gss_target: str) -> DelegatedToken:
        """One fresh S4U2Self + S4U2Proxy, bypassing the cache (for diagnostics; blocks on the KDC)."""
        start = time.perf_counter()
        try:
            ticket = self._exchange_blocking(user, gss_target)
            account = ticket.account_for(user, self._settings)
            token = self._token(ticket.creds, gss_target, ticket.tokens)
        except _StepFailed as e:
            raise self._step_error(e, user.principal, spn) from None
        except (gssapi.raw.GSSError, Krb5Error) as e:
            raise self._explain(_message(e), user.principal, spn) from None
        return DelegatedToken(user.principal, spn, token, False, _ms(start), ticket.facts, account)

    def _not_the_gateway(self, user: UserPrincipal) -> None:
        """KerberosRefused (403) when `user` is the gateway's own account: S4U2Self to itself fails at the KDC (AD:
        "KDC has no support for padata type"), which was the operator's 502 and a `kerberos_misconfigured` line for
        any holder of a certificate naming the gateway's account. Compared as AD compares names (ASCII case)."""
        proxy = self._settings.principal
        if ascii_lower(user.principal) != ascii_lower(proxy):
            return
        raise KerberosRefused(
            f"the certificate names the gateway's own account {proxy}",
            hint=f"{user.upn} (identity source {user.source}) is the gateway's service account ({proxy}), which it "
            "does not impersonate; a certificate naming it was issued by a template that lets the requester choose "
            "the name, or for the service itself: revoke it and check the template",
        )

    def _require_stated(
        self,
        user: UserPrincipal,
        creds: gssapi.Credentials,
        proxy: str,
        spn: str,
        read: tuple[PacFacts | None, str | None],
        client: str | None,
        ms: float,
    ) -> None:
        """A ticket whose PAC could not be read (`read`: the PAC, or why not), naming no account, refused by
        kerberos.kdc_account whoever's certificate asked, or whose client principal is not the one asked for: refused
        here, before S4U2Proxy asks the KDC for anything more on it, and so never cached; under "optional" a ticket
        without a PAC is logged."""
        settings = self._settings
        pac, unreadable = read
        try:
            require_readable(user, unreadable)
            require_user_account(user, pac)
            require_stated(user.principal, pac, policy=settings.kdc_account, proxy=proxy)
            if pac is None or (pac.upn is None and pac.sam_name is None):
                require_client(user, client, proxy=proxy)
        except AccountMismatch as e:  # the trace shows the evidence ticket that named no account
            attach(e, s4u_facts(creds, proxy=proxy, spn=spn, s4u2self_ms=ms, s4u2proxy_ms=None, failed_step="s4u2self"))
            raise
        if pac is None and settings.kdc_account == "optional":
            _unverified(user, proxy)

    def _evidence_pac(self, creds: gssapi.Credentials) -> tuple[PacFacts | None, str | None]:
        """The evidence ticket's PAC: the ticket is to the gateway itself, so the gateway accepts it with its
        own key (an AP-REQ built from the user's ccache, no KDC; no replay cache) and reads `urn:mspac:`.
        (PAC, None); (None, None) when the ticket has none (MIT's KDC); (None, why) when it cannot be read."""
        try:
            if self._own is None:
                self._own = (
                    gssapi.Name(self._settings.principal, gssapi.NameType.kerberos_principal),
                    gssapi.Credentials(usage="accept", store={"keytab": str(self._settings.keytab), "rcache": "none:"}),
                )
            own, acceptor = self._own
            token = gssapi.raw.init_sec_context(own, creds=creds, mech=KRB5).token
            if not token:
                return None, "no AP-REQ could be built on the evidence ticket"
            accepted = gssapi.raw.accept_sec_context(token, acceptor_creds=acceptor)
            return context_pac(accepted.context), None
        except gssapi.raw.GSSError as e:
            message, proxy = e.gen_message(), self._settings.principal
            if is_clock_skew(message):  # every user's ticket alike: the operator's
                raise clock_skew(message, proxy=proxy, offset=_offset_from_kdc(creds, proxy)) from None
            # its own key, its own ticket: every user's alike, the keytab's (the operator's 502, not a user's 403)
            keytab = self._settings.keytab
            sealed = _evidence_kvno(creds, proxy)
            held = held_versions(keytab, proxy)
            raise own_ticket_refused(message, proxy=proxy, keytab=str(keytab), sealed=sealed, held=held) from None
        except ValueError as e:
            return None, f"the PAC is malformed: {e}"

    def service_credentials(self) -> gssapi.Credentials:
        """The gateway's own credentials, as the exchanges use them (`_service_credentials`): for `explain` and
        `doctor`, whose probe asks with them rather than with an AS exchange of its own (`proxy.kerberos.probe`)."""
        return self._service_credentials()

    def fresh_credentials(self) -> gssapi.Credentials:
        """The gateway's own credentials from an AS exchange of their own, into a ccache of their own: for `/readyz`'s
        probe (`proxy.admin.Readiness`), whose point is to ask the KDC now. The key the KDC refused, whether the request
        path or an earlier probe offered it, is refused from memory until the keytab changes (`_acquire_service`): the
        request path and every admin listener's probe offered it once each, bad passwords against the account in AD."""
        return self._acquire_service(f"MEMORY:kcd-probe-{uuid.uuid4().hex}")

    def _service_credentials(self) -> gssapi.Credentials:
        """The gateway's own credentials (its TGT, from the keytab), renewed when `renew_from` says (`RENEW_BEFORE`
        seconds before they expire, not before half their life: a TGT living less, a short maxlife on the gateway's
        principal or on krbtgt, was acquired again for every exchange, and every trace said it began with an AS
        exchange; MIT answered from the ccache until its own refresh time, half the TGT's life) by one thread at a
        time. While one renews, the others go on with the current ones if these are still usable, rather than wait:
        an AS exchange with a KDC that accepts and never answers holds its thread about 50 s in MIT
        (`proxy.kerberos.kdcs`), and every new user's exchange used to wait behind it."""
        current = self._service
        if current is not None and time.monotonic() < self._service_renew_at:
            return current
        if current is not None and _remaining(current) > USABLE_FOR:
            if not self._service_lock.acquire(blocking=False):
                return current  # another thread renews them
        else:
            self._service_lock.acquire()
        try:
            if self._service is None or time.monotonic() >= self._service_renew_at:
                self._service = self._acquire_service()
                now = time.monotonic()
                self._service_renew_at = renew_from(now, now + _remaining(self._service))
            return self._service
        finally:
            self._service_lock.release()

    def _acquire_service(self, ccache: str | None = None) -> gssapi.Credentials:
        """The AS exchange with the keytab (into `ccache`, else the delegator's own), unless the KDC refused these very
        keys before: a stale keytab (the account's password was reset) is then refused from memory, without the KDC,
        until the file changes. Tried per request, each try counted bad passwords against the gateway's account in AD
        (two a try, before `mechs` named krb5 alone), which locked it within a few requests, and the keytab exported
        again then met a locked account (tests/integration/test_ad_service_account.py). With workers, a refusal is
        kept in the workers' table too (`SharedTable.refused_key`): each worker offered the refused key once."""
        keytab = file_version(self._settings.keytab)
        refused = self._refused_keytab
        if refused is not None and refused[0] == keytab:
            raise refused[1].with_traceback(None)  # else each raise adds its frames to the one exception kept
        shared, path, version = self._shared, str(self._settings.keytab), _version_digest(keytab)
        principal = self._settings.principal  # a keytab holds keys of several: one refused says nothing of another's
        words = shared.refused_key(path, principal, version) if shared is not None else None
        if words is not None:  # another worker offered this very key, and the KDC refused it
            self._refused_keytab = (keytab, RefusedBefore(words))
            raise self._refused_keytab[1]
        try:
            creds = gssapi.Credentials(
                name=gssapi.Name(self._settings.principal, gssapi.NameType.kerberos_principal),
                usage="both",
                # krb5 alone: with no mechanism named MIT acquires for each it has (krb5, IAKERB), and a refused key
                # made two AS exchanges per acquisition, two bad passwords against the account in AD
                mechs=_MECHS,
                store={
                    "client_keytab": str(self._settings.keytab),
                    "keytab": str(self._settings.keytab),
                    "ccache": ccache or self._ccache,
                },
            )
        except gssapi.raw.GSSError as e:
            words = refusal_words(e.gen_message())
            if words is not None:
                self._refused_keytab = (keytab, e)
                if shared is not None:
                    shared.keep_refused_key(path, principal, version, words)
            raise
        self._refused_keytab = None
        return creds

    def _explain(self, message: str, principal: str, spn: str) -> GatewayError:
        return explain(message, user=principal, spn=spn, proxy=self._settings.principal)

    def _step_error(self, failure: _StepFailed, principal: str, spn: str) -> GatewayError:
        """The refusal of one step, explained with what is known (was the evidence ticket forwardable?)."""
        facts = failure.facts
        forwardable = None if facts.evidence is None else facts.evidence.forwardable
        error = explain(
            failure.message,
            user=principal,
            spn=spn,
            proxy=self._settings.principal,
            step=facts.failed_step,
            evidence_forwardable=forwardable,
            active_directory=from_active_directory(facts.evidence_pac),
        )
        attach(error, facts)
        return error

    # -- the cache -------------------------------------------------------------------------------------

    def _store(self, asked: Key, ticket: _Ticket) -> None:
        principal, spn = asked
        if ticket.client:
            if len(self._canonical) > 2 * self._cache_size:
                self._canonical.clear()  # bounded; an entry is learnt again from the next exchange
            self._canonical[principal] = ticket.client
        key = self._key(principal, spn)
        self._tickets[key] = ticket
        self._tickets.move_to_end(key)
        while len(self._tickets) > self._cache_size:
            self._tickets.popitem(last=False)  # releasing the credentials destroys their MEMORY ccache

    def _drop(self, asked: Key) -> None:
        self._tickets.pop(self._key(*asked), None)

    def forget(self, principal: str, *, enterprise: str | None = None, everywhere: bool = False) -> int:
        """Drop every cached ticket of `principal` (and ignore its exchanges in flight), and those asked for by
        its NT-ENTERPRISE name `enterprise` when given; returns how many (here). `everywhere`: with workers, every
        other worker's too (module docstring): for a held request's end, which each admitted request can cause once,
        not for a refused request's, which a device can repeat at will (each entry would cost every worker a
        look-up, and a flood of them more than the log keeps would drop every user's tickets there)."""
        dropped = self._forget_here(principal, enterprise)
        if everywhere and self._shared is not None:
            self._telling[(principal, enterprise)] = None
            if put_off(self._tell):  # a directory sweep: written with the other users it ends (`packing_forgotten`)
                return dropped
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): written at once
                self._tell()
            else:
                if not self._tell_soon:  # the loop's next turn writes what this one forgot, packed
                    self._tell_soon = True
                    loop.call_soon(self._tell)
        return dropped

    def _tell(self) -> None:
        """Write the users forgotten everywhere since the last call into the shared log, packed: a CRL change or a
        directory sweep ends every held request it judges in one turn, a few hundred of them one entry each would put
        every other worker past the log (`SharedTable.forget_users`). Their tickets here went at once (`forget`); the
        other workers read the log on their next request, a turn of this loop later at most."""
        users, self._telling, self._tell_soon = list(self._telling), {}, False
        if not users or self._shared is None:
            return
        before, after = self._shared.forget_users(users)
        if before == self._seen:  # no other worker's entry to act on first: these are done here
            self._seen = after

    def _forget_here(self, principal: str, enterprise: str | None, *, sibling: bool = False) -> int:
        dropped = 0
        names = [principal] + ([_ENTERPRISE_KEY + enterprise] if enterprise else [])
        for name, spn in itertools.product(names, self._spns):
            ticket = self._tickets.pop(self._key(name, spn), None)
            flight = self._flights.pop((name, spn), None)
            dropped += ticket is not None or flight is not None
        if dropped:
            if sibling:
                log.info("tickets_forgotten", principal=principal, tickets=dropped, by="another worker")
            else:
                log.info("tickets_forgotten", principal=principal, tickets=dropped)
        return dropped

    def _catch_up(self, shared: SharedTable) -> None:
        """Drop the tickets of the users other workers forgot since this delegator last looked (all of them if it
        is too far behind to know which)."""
        self._seen, users = shared.forgotten_since(self._seen)
        if users is None:
            if self._tickets or self._flights:
                log.info("tickets_forgotten", tickets=len(self._tickets), by="another worker", everyone=True)
            self._tickets.clear()
            self._flights.clear()
            return
        for principal, enterprise in users:
            self._forget_here(principal, enterprise, sibling=True)

    def clear(self) -> None:
        """Drop the whole cache, e.g. when the configuration is reloaded."""
        self._tickets.clear()
        self._flights.clear()
        self._canonical.clear()

    def __len__(self) -> int:
        return len(self._tickets)

    def ticket_expires(self, principal: str, spn: str) -> float | None:
        """When the cached service ticket of `principal` at `spn` expires (clock time), if there is one."""
        ticket = self._tickets.get(self._key(principal, spn))
        return None if ticket is None else ticket.expires

    def in_flight(self) -> int:
        """How many exchanges with the KDC are under way."""
        return len(self._flights)

    def close(self) -> None:
        """Drop the cache and stop the KDC threads (a call still talking to the KDC finishes on its own)."""
        self.clear()
        if self.kdcs is not None:
            self.kdcs.stop()
        self._kdc.close()


class _StepFailed(Exception):
    """A GSSAPI failure in S4U2Self or S4U2Proxy, with what the exchange had produced until then."""

    def __init__(self, error: gssapi.raw.GSSError, facts: S4UFacts) -> None:
        self.message = error.gen_message()
        super().__init__(self.message)
        self.facts = facts


def _unverified(user: UserPrincipal, proxy: str) -> None:
    """kdc_account = "optional" goes on with a ticket without a PAC: said once per KDC exchange, never silently."""
    log.warning(
        "kdc_account_unverified",
        principal=user.principal,
        upn=user.upn,
        reason="the evidence ticket carries no PAC: the KDC's account was not compared with the certificate's",
        fix=f"if {user.realm} is Active Directory, clear NO_AUTH_DATA_REQUIRED on {proxy} and set "
        'kerberos.kdc_account = "auto"; an MIT KDC before 1.20 (or with disable_pac) issues no PAC',
    )


def asked_name(user: UserPrincipal) -> str:
    """The name an exchange for `user` asks the KDC for, as the cache and the single flight know it: the
    principal, or with identity.enterprise_names the NT-ENTERPRISE UPN, marked so that it never equals a
    principal (a backslash: the identity stage refuses it in names, AD in sAMAccountNames). Two UPNs that
    map to one principal (`realm_map`: mallory's alice@corp.example and alice's alice@ad.test are both
    alice@AD.TEST) are two names to the KDC, often two accounts, and so two entries."""
    return _ENTERPRISE_KEY + user.enterprise if user.enterprise else user.principal


def renew_from(obtained: float, expires: float) -> float:
    """When a credential obtained at `obtained` that expires at `expires` (clock times) is renewed: `RENEW_BEFORE`
    seconds before it expires, but not before it is half its life old. One that lives less than `RENEW_BEFORE` (a
    short maxlife at the KDC) is in that window from birth; renewed at every use, it would buy nothing. The rule of
    the users' tickets (`_Ticket.renew_at`) and of the gateway's own TGT (`Delegator._service_credentials`)."""
    renew_at = expires - RENEW_BEFORE
    if obtained < expires:
        renew_at = max(renew_at, (obtained + expires) / 2)
    return renew_at


def usable_until(obtained: float, expires: float) -> float:
    """Until when a service ticket obtained at `obtained` that expires at `expires` (clock times) serves requests:
    `USABLE_FOR` seconds before it expires, or a quarter of its life before (at least `TOKEN_LEFT`) when that is less.
    A fixed 30 s margin left a ticket of a 30 s KDC policy unused from birth, and one of 30-60 s for part of its life:
    every request then waited for a fresh S4U2Self + S4U2Proxy, in the foreground, and the cache bought nothing.
    With a quarter, such a ticket serves its first three quarters, and its background renewal (`renew_from`: halfway)
    lands before then. A ticket obtained at an unknown time (`obtained` infinite) keeps `USABLE_FOR`."""
    life = expires - obtained
    margin = USABLE_FOR if not 0 < life < 4 * USABLE_FOR else max(life / 4, TOKEN_LEFT)
    return expires - margin


def _version_digest(version: FileVersion | None) -> bytes:
    """A keytab's file version (`file_version`) as the workers' table keeps it: 16 bytes."""
    return hashlib.blake2b(repr(version).encode(), digest_size=16).digest()


def _message(error: gssapi.raw.GSSError | Krb5Error) -> str:
    return error.gen_message() if isinstance(error, gssapi.raw.GSSError) else str(error)


def _client_name(creds: gssapi.Credentials) -> str | None:
    """The client principal of an impersonated credential: MIT names it after the S4U2Self reply's client."""
    try:
        return str(creds.name)
    except gssapi.raw.GSSError:
        return None


def _descriptor_left() -> bool:
    """Whether this process can open a descriptor now (a socket, opened and closed): MIT reports a KDC socket it could
    not open (EMFILE) as "Cannot contact any KDC", the words of a KDC outage."""
    try:
        socket.socket().close()
    except OSError as e:
        return e.errno not in (errno.EMFILE, errno.ENFILE)
    return True


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def _remaining(creds: gssapi.Credentials) -> float:
    try:
        lifetime = creds.lifetime
    except gssapi.exceptions.ExpiredCredentialsError:
        return 0.0
    return float("inf") if lifetime is None else float(lifetime)


def _evidence_kvno(creds: gssapi.Credentials, proxy: str) -> int | None:
    """The version of the gateway's key the KDC sealed the evidence ticket in (from its clear-text header)."""
    facts = s4u_facts(creds, proxy=proxy, spn="", s4u2self_ms=0.0, s4u2proxy_ms=None)
    return None if facts.evidence is None else facts.evidence.kvno


def _offset_from_kdc(creds: gssapi.Credentials, proxy: str) -> float | None:
    """This clock minus the KDC's, in seconds, from the evidence ticket just issued (its authtime is the KDC's now)."""
    facts = s4u_facts(creds, proxy=proxy, spn="", s4u2self_ms=0.0, s4u2proxy_ms=None)
    return None if facts.evidence is None else time.time() - facts.evidence.authtime.timestamp()
