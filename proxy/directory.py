"""The directory: accounts looked up in Active Directory over LDAP, for the mapping stage.

Theory of operation. `[identity] mapping = "strong"` needs, per user, the account's `objectSid`,
`altSecurityIdentities` and state (`userAccountControl`, `lockoutTime`, `accountExpires`,
`msDS-User-Account-Control-Computed`) and creation time (`whenCreated`, which `strong-or-audit` compares
with a weakly mapped certificate's notBefore). `Directory.account(name)` finds the one account whose
`userPrincipalName` is the certificate's UPN (or, for a UPN in the domain's own DNS name or a bare name,
whose `sAMAccountName` is its user part, the implicit UPN AD also accepts) under `[directory] base_dn`.

- Binding: `bind = "kerberos"` is SASL GSSAPI with the gateway's own keytab and principal (`[kerberos]`),
  so no password exists anywhere; `bind = "simple"` binds as `bind_dn` with the password in
  `password_file`, over ldaps:// only (the configuration refuses anything else).
- Servers: `urls` are tried in order for each look-up; a server that does not answer within `timeout`
  is skipped. When none answers the result is `DirectoryUnavailable` (503 with Retry-After): a look-up that
  failed is never an admission, and never cached.
- A server that failed is remembered for `FAILED_SERVER_SECONDS`: look-ups try it after the others (still
  tried, so a lone server that answers again serves the next look-up), and look-ups that were waiting for its
  connection when it failed give up on it at once instead of each waiting out `timeout` in turn. A look-up
  waits for a server's connection at most `timeout`. A hung server therefore costs a burst of look-ups one
  `timeout`, not one each.
- Cache: an account found (or found missing) is kept `cache_seconds`; concurrent look-ups for one name share
  one LDAP search (single flight), so a burst of requests from one device costs one round trip.

Library: bonsai (python-bonsai, maintained, on PyPI with Linux wheels). It wraps OpenLDAP's libldap and
Cyrus SASL, so SASL GSSAPI is the same code `ldapsearch -Y GSSAPI` runs, and it has a native asyncio
connection: searches wait on the socket in the event loop instead of a thread. ldap3 (pure Python) has no
asyncio and no release since 2021; python-ldap is synchronous; msldap is asyncio but an offensive-security
toolkit with its own Kerberos stack rather than the system's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import bonsai
import bonsai.active_directory
import structlog

from proxy.config import Directory as DirectorySettings
from proxy.config import Kerberos
from proxy.errors import (
    DirectoryUnavailable,
    GatewayError,
    KdcNotAsked,
    KdcUnavailable,
    KerberosMisconfigured,
    KerberosOverloaded,
    MappingRefused,
)
from proxy.held_mapping import HeldMappings
from proxy.identity.mapping import Account, unknown_account
from proxy.identity.principal import ascii_lower
from proxy.identity.sid import Sid
from proxy.kerberos.client import ldap_ticket
from proxy.kerberos.hints import ProtectedUsers
from proxy.kerberos.profile import use_profile
from proxy.kerberos.threads import KdcThreads, NoThread

log = structlog.get_logger("kcd-proxy.directory")

CCACHE = "MEMORY:kcd-proxy-directory"  # the directory bind's credential cache (proxy.kerberos.client)
_GENERALIZED_TIME = re.compile(r"(\d{14})(?:[.,]\d+)?Z")  # UTC only: AD writes whenCreated in UTC
CACHE_SIZE = 50_000  # accounts kept at most (a few hundred bytes each)
NO_BASE = "check [directory] base_dn: the DN of the domain, or of an OU in it, readable with the bind"
FAILED_SERVER_SECONDS = 30.0  # a server that failed is tried after the others for this long
ATTRIBUTES = [
    "sAMAccountName",
    "userPrincipalName",
    "objectSid",
    "altSecurityIdentities",
    "userAccountControl",
    "lockoutTime",
    "accountExpires",
    "msDS-User-Account-Control-Computed",
    "whenCreated",
]


# binary attributes: SIDs, and a security descriptor ([MS-DTYP] 2.4.6; resource-based delegation's allow-list)
RAW_ATTRIBUTES = ["objectSid", "sIDHistory", "tokenGroups", "msDS-AllowedToActOnBehalfOfOtherIdentity"]
PROTECTED_USERS_RID = 525  # the domain's Protected Users group: <domain SID>-525 ([MS-DTYP] 2.4.2.4)
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: membership through nested groups ([MS-ADTS])
# The KDC's access check for resource-based delegation (Samba 4.19's samba_kdc_check_s4u2proxy_rbcd, as Windows'): the
# service's token holds, beside its SID and groups, Everyone and Authenticated Users (S-1-1-0, S-1-5-11: a DACL entry
# for either names every account), and the right it asks is CONTROL_ACCESS alone (an entry without it decides nothing).
# The token is built from the PAC of the service's own ticket, which also carries S-1-18-1 ("authentication authority
# asserted identity") for an account that signed in with its key, as the gateway does with its keytab (seen in the
# PAC Samba 4.17 issues the gateway; Windows Server 2012 and later add it too).
EVERYONE = Sid(1, (0,))
ASSERTED_IDENTITY = Sid(18, (1,))
WELL_KNOWN_TOKEN = frozenset({EVERYONE, Sid(5, (11,)), ASSERTED_IDENTITY})
# SIDs that some KDCs' access checks hold in the service's token and others do not, with whose: an entry naming one
# decides on some KDCs only, so doctor cannot tell what the one the gateway meets decides (`ResourceBased.verdict`).
UNSURE_TOKEN = {
    Sid(5, (2,)): "Network, which Samba's access check adds to the token and Windows' KDC may not",
    Sid(5, (15,)): "This Organization, which Windows adds to its forest's accounts' tokens and Samba does not",
    Sid(5, (21, 0, 0, 0, 497)): "Claims Valid, which a KDC issuing claims puts in the PAC (Windows Server 2012 and "
    "later with claims on; Samba 4.17's PAC has none)",
    Sid(5, (21, 0, 0, 0, 496)): "Compounded Authentication, which Samba's access check adds to the token and Windows "
    "with compound authentication (a device's FAST armour)",
}
CONTROL_ACCESS = 0x100  # ADS_RIGHT_DS_CONTROL_ACCESS ([MS-ADTS] 5.1.3.2)


class _GaveUp(Exception):
    """A look-up passed a server by without asking it (its connection busy, or failed just now): the next URL. `slow`:
    what passed it by was a limit on a wait (no turn in time, or another look-up's attempt ended by one)."""

    def __init__(self, error: str, *, slow: bool) -> None:
        super().__init__(error)
        self.slow = slow


class _Waited(Exception):
    """A server's attempt ended by one of the gateway's own limits, which `ended_by` names as an operator would set it
    (`2 x directory.timeout (10 s)`, `kerberos.kdc_timeout (10 s)`); `error` says what was left unanswered."""

    def __init__(self, ended_by: str, error: str) -> None:
        super().__init__(error)
        self.ended_by = ended_by
        self.error = error


# what makes one directory server's attempt fail, the next one tried (the bind's Kerberos failures included)
_SERVER_FAILED = (
    TimeoutError,
    _Waited,
    bonsai.LDAPError,
    OSError,
    KerberosMisconfigured,
    KerberosOverloaded,
    KdcUnavailable,
)


@dataclass(frozen=True)
class _GivenUp:
    """The bind's last ticket request its caller stopped waiting for: for `url`, asked at `asked` (the directory's
    clock), the wait ended by `ended_by`. It holds the directory's one KDC thread until the KDC answers."""

    url: str
    asked: float
    ended_by: str


@dataclass(frozen=True)
class LockoutPolicy:
    """An account lockout policy as the directory keeps it (`doctor`): the domain's (`lockoutThreshold`,
    `lockOutObservationWindow` on the domain object) or a fine-grained one's (a PSO's `msDS-LockoutThreshold`,
    `msDS-LockoutObservationWindow`), read where `source` names."""

    source: str  # the DN it was read from
    threshold: int | None  # bad passwords within the window that lock the account; 0: never; None: not readable
    window_seconds: float = 0.0  # "Reset account lockout counter after": the count is forgotten this long after


_HUNDRED_NS = 10_000_000  # AD writes intervals as negative counts of 100 ns


@dataclass(frozen=True)
class DelegationSettings:
    """An account's Delegation tab as the directory keeps it (`doctor`): `userAccountControl` (its
    TRUSTED_TO_AUTH_FOR_DELEGATION and TRUSTED_FOR_DELEGATION bits) and `msDS-AllowedToDelegateTo`; and the SIDs a
    backend's resource-based delegation may name it by (its `objectSid`, its `sIDHistory`, which its tickets' PAC
    carries as extra SIDs of its token, and `tokenGroups`: its groups, nested ones included; Samba's leaves the
    account's own SID history out)."""

    dn: str
    user_account_control: int
    allowed_to_delegate_to: tuple[str, ...]
    sids: frozenset[Sid] = frozenset()


@dataclass(frozen=True)
class Ace:
    """An entry of a DACL that may decide whether an account acts for others: allow (True) or deny, its SID, and
    whether it is a conditional (callback) entry, whose condition (claims, device groups) a KDC that evaluates
    conditions decides by what doctor cannot see."""

    allow: bool
    sid: Sid
    conditional: bool = False


@dataclass(frozen=True)
class Verdict:
    """What a backend's resource-based delegation says of an account: `allows` True or False as every KDC that
    honours it decides, or None when that depends on the KDC (`doubt` says which entry, and why)."""

    allows: bool | None
    doubt: str = ""


@dataclass(frozen=True)
class ResourceBased:
    """The account holding an SPN, and what its `msDS-AllowedToActOnBehalfOfOtherIdentity` (resource-based
    constrained delegation: the services that may act for users towards it) says about acting for others: the access
    control entries of the security descriptor's DACL that decide it, in order (`acting_for_others`; `doctor`).
    `dn` None: no account holds the SPN; `entries` empty: the attribute is not set (or not readable with the
    gateway's bind)."""

    spn: str
    dn: str | None
    entries: tuple[Ace, ...] = ()

    def verdict(self, sids: frozenset[Sid]) -> Verdict:
        """Whether an account known by `sids` (its own, its groups') may act for users towards this one, as the KDC's
        access check decides it: the first entry naming one of its token's SIDs (`sids` and WELL_KNOWN_TOKEN) says
        (an allow before a deny grants, as [MS-DTYP] 2.5.3.2 walks the DACL; AD's canonical order puts denies first).
        An entry before it that names a SID only some KDCs put in the token (UNSURE_TOKEN), or a conditional one
        naming a SID of the token, and that would say otherwise, makes the verdict the KDC's: None, with the doubt."""
        token = sids | WELL_KNOWN_TOKEN
        doubts: list[Ace] = []
        decided = False
        for entry in self.entries:
            if entry.sid in token and not entry.conditional:
                decided = entry.allow
                break
            if entry.sid in token or entry.sid in UNSURE_TOKEN:
                doubts.append(entry)
        doubt = next((entry for entry in doubts if entry.allow != decided), None)
        if doubt is None:
            return Verdict(decided)
        verb = "allowing" if doubt.allow else "denying"
        why = (
            "is conditional (a callback entry: Windows Server 2012 and later decide it by claims and device groups, "
            "Samba's access check skips it until its claims support)"
            if doubt.conditional
            else f"names {UNSURE_TOKEN[doubt.sid]}"
        )
        return Verdict(None, f"its entry {verb} {doubt.sid} {why}, where the entries after it decide otherwise")


@dataclass(frozen=True)
class BindCheck:
    """What `doctor` reports about the directory: the server that answered and who it says we are."""

    url: str
    whoami: str
    ms: float


class Directory:
    """Account look-ups with a per-account cache and single flight (see the module docstring)."""

    def __init__(
        self,
        settings: DirectorySettings,
        kerberos: Kerberos,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        use_profile(kerberos.krb5_config)  # SASL GSSAPI reads the krb5 profile from the environment
        # The directory's service ticket is for ldap/<host as written in the URL>: libldap must not replace
        # the name by what reverse DNS says (read by libldap from the environment when it initialises).
        os.environ.setdefault("LDAPSASL_NOCANON", "on")
        # The bind's tickets (proxy.kerberos.client) live in a memory cache that SASL GSSAPI finds as the
        # default one; the rest of the gateway names its caches explicitly and never uses the default.
        os.environ["KRB5CCNAME"] = CCACHE
        self._settings = settings
        self._kerberos = kerberos
        self._clock = clock
        self._realm = _domain(settings.base_dn).upper()  # read on every request of a strong mapping: once here
        self._cache: dict[str, tuple[float, Account | None]] = {}
        self._flights: dict[str, asyncio.Future[Account | None]] = {}
        self._connections: dict[str, Any] = {}  # url -> an open, bound connection, reused by later look-ups
        self._locks: dict[str, asyncio.Lock] = {}  # url -> its connection's turn (see _search_at)
        self._failed: dict[str, float] = {}  # url -> when (self._clock) it last failed; gone once it answers
        self._waited: dict[str, str] = {}  # url -> what its last failure said, when a limit on a wait ended it
        # The bind's KDC exchanges (bind = "kerberos") in a thread of their own (proxy.kerberos.threads): a KDC that
        # accepts and never answers holds it for MIT's own timeout (about 25 s) after the look-up gave up. asyncio's
        # default executor, shared with CRL vetting and Basic's hashing, must not fill up with such threads; a bind
        # finding the thread held by such a call is refused at once, not queued behind it; and a stop does not
        # wait for MIT (a daemon thread: Python's exit joins a ThreadPoolExecutor's threads).
        self._kdc = KdcThreads(1, kerberos.kdc_timeout, "directory-kdc")
        self._given_up: _GivenUp | None = None  # the ticket request that thread may still be in (its refusals say so)
        self.held = HeldMappings(self, settings.cache_seconds)  # requests held at the backend, judged again
        self.searches = 0  # LDAP searches made (tests and metrics: the cache and single flight keep this low)
        self.binds = 0  # connections opened and bound (a kept connection makes this 1 per server)

    def _client(self, url: str) -> bonsai.LDAPClient:
        client = bonsai.LDAPClient(url)
        client.set_server_chase_referrals(False)
        client.set_raw_attributes(RAW_ATTRIBUTES)  # binary, never decoded as text
        if self._settings.ca_file is not None:
            client.set_ca_cert(str(self._settings.ca_file))
            client.set_cert_policy("demand")
        if self._settings.bind == "simple":
            password = (self._settings.password_file.read_text() if self._settings.password_file else "").strip()
            client.set_credentials("SIMPLE", user=self._settings.bind_dn, password=password)
        else:
            client.set_credentials("GSSAPI")  # the default cache, which _connection filled from the keytab
        return client

    async def account(self, name: str) -> Account:
        """The account `name` (a UPN, or a bare sAMAccountName) names; MappingRefused if none or several."""
        found = await self.lookup(name)
        if found is None:
            raise unknown_account(name, self._settings.base_dn)
        return found

    async def lookup(self, name: str, *, fresh: bool = False) -> Account | None:
        """The account `name` names, or None; MappingRefused if several; DirectoryUnavailable if no server answers.
        `fresh`: ask the directory (or join a search in flight) whatever the cache holds, and keep its answer (the
        held requests' sweep: a cached answer may be older than the change the sweep is there to see)."""
        return await self._kept(ascii_lower(name), functools.partial(self.search, name), fresh=fresh)

    async def sid_owner(self, sid: Sid, name: str) -> Account | None:
        """The object whose objectSid is `sid` if it is not the account `name` names (by the rules of `lookup`),
        searched in the whole domain of base_dn, not only under base_dn (a SID is the domain's); None when no
        other object has it. For a certificate whose name no account under base_dn has but whose SID extension
        names someone: the certificate is then that someone's. Cached and shared as `lookup`'s answers are."""
        key = f"\0{sid}\0{ascii_lower(name)}"  # never a name's key: a name has no NUL (proxy.identity.principal)
        base_dn = self._settings.base_dn
        # a foreignSecurityPrincipal stands for a trusted domain's account here: its SID is that account's own
        other = f"(&(objectSid={_escape_bytes(sid.to_bytes())})(!(objectClass=foreignSecurityPrincipal))"
        sid_filter = f"{other}(!{_names(name, base_dn)}))"
        search = functools.partial(self._find, sid_filter, f"objectSid {sid}", kind="SID", root=_domain_dn(base_dn))
        return await self._kept(key, search, fresh=False)

    async def _kept(self, key: str, search: Callable[[], Awaitable[Account | None]], *, fresh: bool) -> Account | None:
        """The cache's answer for `key`, else `search`'s (one search in flight per key), which the cache keeps."""
        now = self._clock()
        cached = None if fresh else self._cache.get(key)
        if cached is not None and now < cached[0]:
            found = cached[1]
        else:
            flight = self._flights.get(key)
            if flight is None:
                flight = self._flights[key] = asyncio.ensure_future(self._search_and_keep(key, search))
                flight.add_done_callback(lambda _: self._flights.pop(key, None))
            found = await asyncio.shield(flight)
        return found

    @property
    def base_dn(self) -> str:
        return self._settings.base_dn

    @property
    def timeout(self) -> float:
        """Seconds per directory server before the next one is tried ([directory] timeout)."""
        return self._settings.timeout

    @property
    def cache_seconds(self) -> float:
        """How long an answer is kept: a change on the DC reaches the gateway within that."""
        return self._settings.cache_seconds

    @property
    def realm(self) -> str:
        """The Kerberos realm of the directory's domain: base_dn's DC components (DC=corp,DC=com: CORP.COM)."""
        return self._realm

    def cached(self, name: str) -> Account | None:
        """The account `name` names, if a look-up found it and the cache still holds it (no directory request)."""
        entry = self._cache.get(ascii_lower(name))
        return entry[1] if entry is not None else None

    def forget(self, name: str) -> None:
        """Drop what the cache holds for `name`: the KDC impersonated another account of that name since
        (`proxy.errors.AccountReplaced`). A look-up in flight is left to finish; its answer is the newer one."""
        self._cache.pop(ascii_lower(name), None)

    async def _search_and_keep(self, key: str, search: Callable[[], Awaitable[Account | None]]) -> Account | None:
        found = await search()
        if self._settings.cache_seconds > 0:
            now = self._clock()
            self._cache[key] = (now + self._settings.cache_seconds, found)
            if len(self._cache) > CACHE_SIZE:  # names come from verified certificates, but keep memory bounded
                for stale in [k for k, (until, _) in self._cache.items() if until <= now]:
                    del self._cache[stale]
                while len(self._cache) > CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]  # the oldest look-up
        return found

    async def search(self, name: str) -> Account | None:
        """One look-up, no cache: each URL in order until one answers."""
        return await self._find(_filter(name, self._settings.base_dn), repr(name))

    async def _find(self, filter_exp: str, what: str, *, kind: str = "name", root: str | None = None) -> Account | None:
        """The one account `filter_exp` finds under `root` (base_dn), or None; MappingRefused if several (`what`
        names what was looked for, a `kind`); DirectoryUnavailable if no server answers. Each URL in order until one
        answers."""
        problems: list[str] = []
        slow = True  # every server's attempt ended by a limit on a wait: the KDC or the directory slow to answer
        for url in self._in_turn():
            try:
                entries = await self._search_at(url, filter_exp, root=root)
            except _GaveUp as e:
                problems.append(f"{url}: {e}")
                slow = slow and e.slow  # no turn in time, or another look-up's attempt ended by a limit
                continue
            except _Waited as e:
                self._failed[url], self._waited[url] = self._clock(), e.error  # it names the limit
                problems.append(f"{url}: {e.error}")
                log.warning("directory_server_failed", url=url, error=_describe(e), ended_by=e.ended_by)
                continue
            except _SERVER_FAILED as e:
                self._failed[url] = self._clock()
                self._waited.pop(url, None)
                problems.append(f"{url}: {_describe(e)}")
                log.warning("directory_server_failed", url=url, error=_describe(e))
                slow = False
                continue
            self._failed.pop(url, None)
            self.searches += 1
            if len(entries) > 1:
                dns = ", ".join(str(entry.dn) for entry in entries)
                rule = "a UPN must name one account" if kind == "name" else "a SID names one object"
                raise MappingRefused(
                    f"the {kind} matches several accounts in the directory", hint=f"{what} matches {dns}; {rule}"
                )
            return _account(entries[0]) if entries else None
        if not slow:
            raise DirectoryUnavailable(
                "the directory cannot be reached; try again later",
                hint="no directory server answered: " + "; ".join(problems),
            )
        retry = DirectoryUnavailable.headers["Retry-After"]
        raise DirectoryUnavailable(
            f"the directory cannot be reached: it did not answer in time; try again in {retry} s",
            hint="no directory server answered in time: " + "; ".join(problems) + "; the KDC or the directory is slow "
            f"to answer (a DC under load, or a write held on its database): devices are told to retry after {retry} s "
            "(Retry-After); if it lasts, check the DC, and raise the limit named only if the DC answers, just slowly",
        )

    async def _connection(self, url: str, bound: str) -> Any:
        """The open connection to `url`, or a new one (connect and bind: a KDC exchange with bind = "kerberos");
        `bound` names the caller's limit on all of it (`_tickets`)."""
        conn = self._connections.get(url)
        if conn is None or conn.closed:
            await self._tickets(url, bound)
            conn = await self._client(url).connect(is_async=True, timeout=self._settings.timeout)
            self._connections[url] = conn
            self.binds += 1
        return conn

    async def _tickets(self, url: str, bound: str) -> None:
        """bind = "kerberos": a TGT and the ldap/<host> ticket in CCACHE before SASL GSSAPI looks (in the
        directory's own KDC thread: it may talk to the KDC, which may hang). `_Waited` naming `kerberos.kdc_timeout`
        when that ends the wait; a wait the caller's `bound` ends (`2 x directory.timeout (10 s)`) is remembered, so
        that the refusals made while the request still holds the thread (`_Waited`, at once) name the limit that
        ended it, not one that did not."""
        if self._settings.bind != "kerberos":
            return
        host = urlsplit(url).hostname or ""
        asked = self._clock()
        try:
            await self._kdc.run(ldap_ticket, self._kerberos, CCACHE, host)
        except NoThread as e:
            raise self._still_asking(e) from None
        except TimeoutError:  # the thread's own limit (its wait for the thread included): kdc_timeout
            ended_by = f"kerberos.kdc_timeout ({self._kdc.timeout:g} s)"
            self._given_up = _GivenUp(url, asked, ended_by)
            raise _Waited(
                ended_by,
                f"no ticket for the directory bind within {ended_by}: the KDC of {self._realm} did not answer the "
                "gateway's own ticket request (its TGT, then ldap/" + host + ")",
            ) from None
        except asyncio.CancelledError:  # the caller's bound (or a stop) ended the wait; the call runs on in its thread
            self._given_up = _GivenUp(url, asked, bound)
            raise

    def _still_asking(self, e: NoThread) -> Exception:
        """The refusal of a bind that finds the directory's one KDC thread held (`_tickets`): by a ticket request
        given up on (`_given_up`, still unanswered: the KDC slow), or, rarely, one still waited for."""
        given = self._given_up
        if e.abandoned < e.held or given is None:  # not kerberos.max_in_flight's threads: the directory has one
            return KdcNotAsked(
                "the authentication service is busy; try again shortly",
                hint=f"the KDC of {self._realm} answers slowly: the directory's one KDC thread is in a bind's ticket "
                f"request and {self._kdc.waiting} more binds wait for it",
            )
        age = self._clock() - given.asked
        return _Waited(
            given.ended_by,
            f"the KDC of {self._realm} has not yet answered the directory bind's ticket request for {given.url} made "
            f"{age:.1f} s ago and given up at {given.ended_by}: it holds the directory's one KDC thread until the KDC "
            "answers (or MIT gives up, about 25 s), and no other bind is asked meanwhile",
        )

    def _in_turn(self) -> list[str]:
        """The URLs in the order to try them: as configured, those that failed in the last
        FAILED_SERVER_SECONDS after the others (a stable sort keeps their own order)."""
        now = self._clock()
        lately = {url for url, at in self._failed.items() if now - at < FAILED_SERVER_SECONDS}
        return sorted(self._settings.urls, key=lambda url: url in lately)

    async def _search_at(
        self,
        url: str,
        filter_exp: str,
        base: str | None = None,
        attributes: list[str] = ATTRIBUTES,
        *,
        root: str | None = None,
    ) -> list[Any]:
        # One operation at a time per connection: bonsai's asyncio connection waits for a result by
        # registering the socket with the event loop, and a second operation's registration replaces the
        # first's, which then never completes. Look-ups of different names queue here (a few ms each), for
        # `timeout` at most, and not at all behind an operation that failed meanwhile: a hung server must not
        # cost each queued look-up a timeout of its own, one after the other.
        lock = self._locks.setdefault(url, asyncio.Lock())
        asked = self._clock()
        try:
            async with asyncio.timeout(self._settings.timeout):
                await lock.acquire()
        except TimeoutError:
            waited = f"directory.timeout ({self._settings.timeout:g} s)"
            raise _GaveUp(f"busy: no turn on its connection within {waited}", slow=True) from None
        try:
            if self._failed.get(url, -math.inf) > asked:
                ended = self._waited.get(url)  # the same outage tells each device the same: slow, or not
                because = f": {ended}" if ended else ""
                raise _GaveUp(f"failed for another look-up while this one waited for it{because}", slow=bool(ended))
            return await self._search_locked(url, filter_exp, base, attributes, root)
        finally:
            lock.release()

    async def _search_locked(
        self, url: str, filter_exp: str, base: str | None, attributes: list[str], root: str | None = None
    ) -> list[Any]:
        """`filter_exp` under `root` (default base_dn; a subtree), or the entry `base` itself when given."""
        timeout = self._settings.timeout
        scope = bonsai.LDAPSearchScope.SUBTREE if base is None else bonsai.LDAPSearchScope.BASE
        bound = f"2 x directory.timeout ({timeout * 2:g} s)"
        for attempt in (1, 2):  # a kept connection the server has since closed fails once; a new one is tried
            reused = url in self._connections
            began = self._clock()
            step, bounded = "connect and bind", asyncio.timeout(timeout * 2)
            try:
                async with bounded:  # connect (and bind), then search, each within timeout
                    conn = await self._connection(url, bound)
                    step = "search"
                    result = await conn.search(
                        base or root or self._settings.base_dn, scope, filter_exp, attributes, timeout=timeout
                    )
            except TimeoutError:  # the bound just above, or bonsai's on one step: a new connection would wait as long
                self._drop(url)
                raise _own_limit(timeout, step, bounded) or _Waited(
                    bound, self._bound_ended(url, began, timeout * 2)
                ) from None
            except (bonsai.LDAPError, OSError) as e:
                self._drop(url)
                # A server that answered nothing in time is not retried: a new connection would wait as long
                if attempt == 2 or not reused or isinstance(e, bonsai.TimeoutError):
                    raise
                continue
            return [entry for entry in result if isinstance(entry, bonsai.LDAPEntry)]  # referrals are not accounts
        raise AssertionError("unreachable")

    def _bound_ended(self, url: str, began: float, seconds: float, steps: str = "connect and bind, then search") -> str:
        """What a server's attempt begun at `began` was waiting for when its bound (`seconds`) ended it."""
        given = self._given_up
        times = round(seconds / self._settings.timeout)
        ended = f"no answer in time: {seconds:g} s ({times} x directory.timeout: {steps}) ended the wait"
        if given is not None and given.url == url and given.asked >= began:
            return (
                f"{ended} for the bind's ticket request to the KDC of {self._realm}; kerberos.kdc_timeout "
                f"({self._kdc.timeout:g} s) did not end it"
            )
        return ended

    async def lockout_policy(self, account_dn: str | None = None) -> LockoutPolicy:
        """The lockout policy that applies to the account at `account_dn` (its resultant PSO, when it has one), or
        the domain's (`doctor`); its threshold None when we may not read it (AD lets only administrators read a
        PSO's settings by default). DirectoryUnavailable if no server answers."""
        domain = _domain_dn(self._settings.base_dn)
        source, attributes = domain, ["lockoutThreshold", "lockOutObservationWindow"]
        if account_dn is not None:
            entry = await self._read(account_dn, ["msDS-ResultantPSO"])
            pso = None if entry is None else _first(entry, "msDS-ResultantPSO")
            if pso is not None:
                source, attributes = str(pso), ["msDS-LockoutThreshold", "msDS-LockoutObservationWindow"]
        entry = await self._read(source, attributes)
        if entry is None or _first(entry, attributes[0]) is None:
            return LockoutPolicy(source, None)
        return LockoutPolicy(source, _int(entry, attributes[0]), abs(_int(entry, attributes[1])) / _HUNDRED_NS)

    async def delegation_settings(self, name: str) -> DelegationSettings | None:
        """The delegation settings of the user account `name` names (the gateway's own: `doctor`), no cache; None
        when no such account is under base_dn (a gMSA, another container). DirectoryUnavailable if no server
        answers."""
        attributes = ["userAccountControl", "msDS-AllowedToDelegateTo", "objectSid", "sIDHistory"]
        entries = await self._search_first(_filter(name, self._settings.base_dn), attributes)
        if len(entries) != 1:
            return None
        entry = entries[0]
        listed = tuple(
            str(v.decode() if isinstance(v, bytes) else v) for v in entry.get("msDS-AllowedToDelegateTo", [])
        )
        sids = frozenset(_sids(entry, "objectSid"))
        if sids:  # tokenGroups is computed: read from the entry itself (a base search) only
            groups = await self._read(str(entry.dn), ["tokenGroups"])
            sids |= frozenset(_sids(groups, "tokenGroups")) if groups is not None else frozenset()
            sids |= frozenset(_sids(entry, "sIDHistory"))
        return DelegationSettings(str(entry.dn), _int(entry, "userAccountControl"), listed, sids)

    async def resource_based(self, spn: str) -> ResourceBased:
        """The account holding `spn` in the domain of base_dn (a user or a computer) and whom its
        `msDS-AllowedToActOnBehalfOfOtherIdentity` allows (`doctor`), no cache. DirectoryUnavailable if no server
        answers; MappingRefused if several accounts hold the SPN (a duplicate SPN, which the KDC refuses too)."""
        attributes = ["msDS-AllowedToActOnBehalfOfOtherIdentity"]
        spn_filter = f"(servicePrincipalName={_escape(spn)})"
        entries = await self._search_first(spn_filter, attributes, root=_domain_dn(self.base_dn))
        if not entries:
            return ResourceBased(spn, None)
        if len(entries) > 1:
            dns = ", ".join(str(entry.dn) for entry in entries)
            raise MappingRefused(f"the SPN {spn} is registered on several accounts", hint=f"{spn}: {dns}")
        entry = entries[0]
        raw = _first(entry, attributes[0])
        if not isinstance(raw, bytes):
            return ResourceBased(spn, str(entry.dn))
        try:
            aces = acting_for_others(raw)
        except (ValueError, IndexError, struct.error) as e:
            raise MappingRefused(
                f"{attributes[0]} of {entry.dn} cannot be read", hint=f"not a security descriptor: {e}"
            ) from None
        return ResourceBased(spn, str(entry.dn), aces)

    async def protected_users(self, dn: str, sid: Sid) -> ProtectedUsers:
        """Whether the account at `dn` (whose objectSid is `sid`) is in Protected Users (`ProtectedUsers`): its
        `tokenGroups` (the SIDs of every group it is in, nested ones included) against <domain SID>-525; then, for a
        member, whether the group lists it itself and which of its own groups are in the group, at any depth
        (LDAP_MATCHING_RULE_IN_CHAIN; Samba 4.17 answers both). No cache: asked only for an evidence ticket that is
        not forwardable. DirectoryUnavailable if no server answers."""
        group_sid = Sid(sid.authority, (*sid.sub_authorities[:-1], PROTECTED_USERS_RID))
        entry = await self._read(dn, ["tokenGroups", "memberOf"])
        tokens = set(_sids(entry, "tokenGroups")) if entry is not None else set()
        if entry is None or not tokens:  # every account is in Domain Users at least: none read means not readable
            return ProtectedUsers(None)
        if group_sid not in tokens:
            return ProtectedUsers(False)
        found = await self._find_entries(f"(objectSid={_escape_bytes(group_sid.to_bytes())})")
        if len(found) != 1:
            return ProtectedUsers(True)
        group = (str(found[0].dn), str(_first(found[0], "sAMAccountName", "")))
        listed = {ascii_lower(str(value)) for value in entry.get("memberOf", [])}
        nested = f"(&(objectClass=group)(member={_escape(dn)})(memberOf:{IN_CHAIN}:={_escape(group[0])}))"
        through = sorted((str(g.dn), str(_first(g, "sAMAccountName", ""))) for g in await self._find_entries(nested))
        return ProtectedUsers(True, group, ascii_lower(group[0]) in listed, tuple(through))

    async def _find_entries(self, filter_exp: str) -> list[Any]:
        """The entries `filter_exp` finds in the domain of base_dn, each with its sAMAccountName."""
        return await self._search_first(filter_exp, ["sAMAccountName"], root=_domain_dn(self.base_dn))

    async def _search_first(self, filter_exp: str, attributes: list[str], *, root: str | None = None) -> list[Any]:
        """`_search_at` on each server in turn, the first that answers's entries (doctor's and the hints' look-ups,
        no cache, no server marked failed); DirectoryUnavailable naming each server's problem if none answers."""
        problems: list[str] = []
        for url in self._in_turn():
            try:
                return await self._search_at(url, filter_exp, attributes=attributes, root=root)
            except _GaveUp as e:
                problems.append(f"{url}: {e}")
            except _SERVER_FAILED as e:
                problems.append(f"{url}: {_describe(e)}")
        raise DirectoryUnavailable("the directory cannot be reached", hint="; ".join(problems))

    async def _read(self, dn: str, attributes: list[str]) -> Any | None:
        """The entry at `dn` with `attributes` (those we may read), from the first server that answers; None when
        it does not exist for us."""
        problems: list[str] = []
        for url in self._settings.urls:
            try:
                entries = await self._search_at(url, "(objectClass=*)", base=dn, attributes=attributes)
            except (bonsai.NoSuchObjectError, bonsai.InsufficientAccess):
                return None
            except _GaveUp as e:  # its connection busy past `timeout`, or failed meanwhile: the next URL
                problems.append(f"{url}: {e}")
                continue
            except _SERVER_FAILED as e:
                problems.append(f"{url}: {_describe(e)}")
                continue
            return entries[0] if entries else None
        raise DirectoryUnavailable("the directory cannot be reached", hint="; ".join(problems))

    def _drop(self, url: str) -> None:
        conn = self._connections.pop(url, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        """Stop judging held requests; close the kept connections; drop KDC exchanges not yet begun."""
        self.held.close()
        self._kdc.close()
        for url in list(self._connections):
            self._drop(url)

    async def check(self) -> BindCheck:
        """Bind to the first server that answers and read `base_dn` (`doctor`); who we are, when it says.

        Samba answers the "Who am I?" extended operation (RFC 4532) with "not supported"; then the identity
        shown is the one we bound as, and the read of the base entry proves the bind is good for searching. A server
        without that entry (base_dn misspelt, or not readable with the bind) is a problem of its own: every account
        look-up under it would find nobody."""
        problems: list[str] = []
        timeout = self._settings.timeout
        bound_as = self._settings.bind_dn if self._settings.bind == "simple" else self._kerberos.principal
        for url in self._settings.urls:
            start = time.perf_counter()
            try:
                began = self._clock()
                step, bounded = "bind", asyncio.timeout(timeout * 3)
                async with bounded:
                    await self._tickets(url, f"3 x directory.timeout ({timeout * 3:g} s)")
                    conn = await self._client(url).connect(is_async=True, timeout=timeout)
                    step = "read or Who am I?"
                    try:
                        base = await conn.search(self._settings.base_dn, bonsai.LDAPSearchScope.BASE, attrlist=["1.1"])
                        if not base:  # bonsai answers a search for a missing base (noSuchObject) with no entry
                            problems.append(f"{url}: bound, but has no entry {self._settings.base_dn} ({NO_BASE})")
                            continue
                        try:
                            who = str(await conn.whoami(timeout=timeout))
                        except bonsai.LDAPError:
                            who = f"{bound_as} (the server does not answer Who am I?)"
                    finally:
                        conn.close()
            except TimeoutError:
                own = _own_limit(timeout, step, bounded)
                ended = own.error if own else self._bound_ended(url, began, timeout * 3, "bind, read, Who am I?")
                problems.append(f"{url}: {ended}")
                continue
            except _SERVER_FAILED as e:
                problems.append(f"{url}: {_describe(e)}")
                continue
            return BindCheck(url, who, (time.perf_counter() - start) * 1000)
        raise DirectoryUnavailable("no directory server answered", hint="; ".join(problems))


def _filter(name: str, base_dn: str) -> str:
    """The LDAP filter for the account `name` names: by UPN, or by sAMAccountName for the domain's own names."""
    return f"(&(objectCategory=person)(objectClass=user){_names(name, base_dn)})"


def _names(name: str, base_dn: str) -> str:
    """The filter an object `name` names matches: its UPN, or its sAMAccountName for the domain's own names."""
    local, at, suffix = name.partition("@")
    upn = f"(userPrincipalName={_escape(name)})" if at else ""
    domain = _domain(base_dn)
    sam = f"(sAMAccountName={_escape(local)})" if not at or ascii_lower(suffix) == ascii_lower(domain) else ""
    return f"(|{upn}{sam})"


def _escape(value: str) -> str:
    """An assertion value for an LDAP filter (RFC 4515): `*`, `(`, `)`, `\\` and NUL as `\\xx`. Our own
    because bonsai's `escape_filter_exp` writes NUL as `\\0`, which is not RFC 4515."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\\0" else c for c in value)


def _escape_bytes(value: bytes) -> str:
    """A binary assertion value for an LDAP filter (RFC 4515): every byte as `\\xx`."""
    return "".join(f"\\{b:02x}" for b in value)


def _domain_dn(base_dn: str) -> str:
    """The DN of the domain a base DN is in: its DC components (`OU=Staff,DC=corp,DC=com`: `DC=corp,DC=com`)."""
    return ",".join(f"DC={label}" for label in _domain(base_dn).split("."))


def _domain(base_dn: str) -> str:
    """The DNS domain of a base DN: its DC components, in order."""
    return ".".join(part.split("=", 1)[1] for part in base_dn.split(",") if part.strip().upper().startswith("DC="))


def _first(entry: Any, attr: str, default: Any = None) -> Any:
    values = entry.get(attr)
    return values[0] if values else default


def acting_for_others(raw: bytes) -> tuple[Ace, ...]:
    """The entries of a `msDS-AllowedToActOnBehalfOfOtherIdentity` security descriptor (`raw`) that decide whether an
    account may act for users, in the DACL's order: each access-allowed or access-denied entry, plain or conditional
    (ACCESS_ALLOWED_CALLBACK, ACCESS_DENIED_CALLBACK: `Ace.conditional`), whose access mask holds CONTROL_ACCESS, with
    its SID. An entry without that right decides nothing for the KDC; one marked INHERIT_ONLY_ACE applies only to
    objects below the account, and the access check skips it ([MS-DTYP] 2.5.3.2); object entries decide nothing for an
    access check that names no object type, as the KDC's does.
    A NULL DACL (SE_DACL_PRESENT with no list) grants every access to everyone, as the access check reads it (Samba's
    "a NULL dacl allows access", Windows' too): one entry allowing Everyone; a descriptor without SE_DACL_PRESENT, or
    an empty list, allows nobody. ValueError, IndexError or struct.error (bonsai's) when `raw` is not a security
    descriptor."""
    entries: list[Ace] = []
    descriptor = bonsai.active_directory.SecurityDescriptor.from_binary(raw)
    dacl = descriptor.dacl
    if dacl is None and descriptor.control["dacl_present"]:
        return (Ace(True, EVERYONE),)
    for ace in dacl.aces if dacl is not None else []:
        kind = ace.type.name
        if bonsai.active_directory.ACEFlag.INHERIT_ONLY in ace.flags or ace.trustee_sid is None:
            continue
        if kind in _DECIDING and ace.mask & CONTROL_ACCESS:
            allow, conditional = _DECIDING[kind]
            entries.append(Ace(allow, Sid.parse(str(ace.trustee_sid)), conditional))
    return tuple(entries)


# the DACL entries the KDC's access check reads for the account itself: (allow, conditional) by bonsai's type name
_DECIDING = {
    "ACCESS_ALLOWED": (True, False),
    "ACCESS_DENIED": (False, False),
    "ACCESS_ALLOWED_CALLBACK": (True, True),
    "ACCESS_DENIED_CALLBACK": (False, True),
}


def _sids(entry: Any, attr: str) -> list[Sid]:
    """A binary SID attribute's values (objectSid, tokenGroups); a value that is not a SID is left out (these serve
    `doctor`'s explanations, never an admission)."""
    found = []
    for value in entry.get(attr, []):
        with contextlib.suppress(ValueError):
            found.append(Sid.from_bytes(bytes(value)))
    return found


def _int(entry: Any, attr: str) -> int:
    """An integer attribute (userAccountControl, a FILETIME); one that is not a number is the directory's error,
    not a state to guess at: MappingRefused (a 403 naming it), never a ValueError out of the mapping stage."""
    value = _first(entry, attr, 0)
    try:
        return int(value.decode() if isinstance(value, bytes) else value)
    except ValueError:
        raise MappingRefused(
            f"the account's {attr} cannot be read", hint=f"{entry.dn} returned {attr} {value!r}"
        ) from None


def _account(entry: Any) -> Account:
    """An LDAP entry to the facts the mapping stage needs (objectSid binary, the rest as AD writes them)."""
    raw_sid = _first(entry, "objectSid")
    if not isinstance(raw_sid, bytes):
        raise MappingRefused("the account has no objectSid", hint=f"{entry.dn} returned no binary objectSid")
    try:
        sid = Sid.from_bytes(raw_sid)
    except ValueError as e:
        raise MappingRefused(
            "the account's objectSid cannot be read", hint=f"{entry.dn} returned objectSid: {e}"
        ) from None
    computed = entry.get("msDS-User-Account-Control-Computed")
    # bytes that are not UTF-8 read as U+FFFD (such an entry names no certificate), not a 500 on a UnicodeDecodeError
    alt = tuple(
        v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in entry.get("altSecurityIdentities", [])
    )
    return Account(
        dn=str(entry.dn),
        sam_account_name=str(_first(entry, "sAMAccountName", "")),
        upn=_first(entry, "userPrincipalName"),
        sid=sid,
        alt_security_identities=alt,
        user_account_control=_int(entry, "userAccountControl"),
        lockout_time=_int(entry, "lockoutTime"),
        account_expires=_int(entry, "accountExpires"),
        computed_control=_int(entry, "msDS-User-Account-Control-Computed") if computed else None,
        when_created=_generalized_time(entry, "whenCreated"),
    )


def _generalized_time(entry: Any, attr: str) -> datetime | None:
    """An LDAP GeneralizedTime attribute (AD writes `20261205043959.0Z`) as a UTC datetime; None when absent.
    A value that does not parse is the directory's error, not a time to guess at: MappingRefused."""
    value = _first(entry, attr)
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    found = _GENERALIZED_TIME.fullmatch(text)
    refused = MappingRefused(f"the account's {attr} cannot be read", hint=f"{entry.dn} returned {attr} {text!r}")
    if found is None:
        raise refused
    try:
        return datetime.strptime(found.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:  # a 13th month, a 61st second
        raise refused from None


def _own_limit(timeout: float, step: str, bounded: asyncio.Timeout) -> _Waited | None:
    """A TimeoutError that `bounded` (the caller's bound on the whole attempt) did not raise: bonsai's own limit on
    one operation, `directory.timeout`, ended `step` (its asyncio connection waits with `asyncio.wait_for`, whose
    TimeoutError is the builtin one); None when the bound did. Named as the bound, it said "10 s (2 x ...)" after 5."""
    if bounded.expired():
        return None
    limit = f"directory.timeout ({timeout:g} s)"
    return _Waited(limit, f"no answer in time: {limit} ended the wait for the {step}")


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "no answer in time"
    if isinstance(e, _Waited):  # `directory_server_failed`'s error: as before for the look-up's own bound
        return "no answer in time" if e.error.startswith("no answer in time") else e.error
    if isinstance(e, GatewayError):
        return f"{e.reason}: {e.hint}"
    with contextlib.suppress(Exception):
        return f"{type(e).__name__}: {e}"
    return type(e).__name__
