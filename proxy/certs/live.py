"""Revocation at run time: live CRLs, OCSP, and the requests a revocation must end.

Theory of operation. `LiveRevocation` is what the running gateway holds for the revocation stage. It
owns a `CrlStore` (files and URLs refreshed every `crl_refresh_seconds`, see `sources`) and, when
`ocsp` is not "off", an `OcspClient`. `check` runs on every request, not once per TLS connection, so a
certificate revoked while its device holds a keep-alive connection or a resumed session is refused on
its next request:
1. CRLs (unless `revocation = "off"`): a revoked leaf or CA in the chain is refused; a dictionary
   lookup in the current set.
2. OCSP for the leaf (`ocsp = "prefer"` or `"require"`): revoked is refused; good is the evidence;
   no answer (no responder named, unreachable, unverifiable, or the responder's "unknown") is refused
   under "require", and under "prefer" the CRL verdict stands. A delegated responder whose certificate lacks
   id-pkix-ocsp-nocheck is judged by the CRLs here (`_responder_status`), whatever `revocation` says: revoked,
   or no current CRL for it, and its answer is no answer.
3. Without an answer from either, `revocation = "require"` refuses and "best-effort" lets the request
   through with UNKNOWN evidence.

A request that reaches the backend is registered (`watch`) under its chain's certificates for as long
as it is in flight: an ActiveSync Ping can be held for most of an hour. When a refresh swaps in CRLs
that revoke one of them, its in-flight requests are ended: cancelled like a timeout, and answered 403
if the backend's answer had not started, or cut if it had (`proxy.held`, as the directory ends one).

A reload builds a new `LiveRevocation` for its new gateway, while requests held under the old one run on
(`proxy.live`). `hand_over` lets the new configuration judge them: at the swap, a held request whose chain the
new trust list no longer builds (a CA taken out of it) or whose certificate the new CRLs revoke is ended the same
way, and so is one that a later refresh of the new CRLs revokes, until the old stage is closed. A stage still
holding requests when its successor is replaced in turn is handed over again, to the newest configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.floors import FloorTable
from proxy.certs.kept import KeptCrls
from proxy.certs.ocsp import OcspClient
from proxy.certs.revocation import (
    NO_CURRENT_CRL_FIX,
    UNDETERMINED,
    CrlSet,
    RevocationEvidence,
    RevocationStatus,
    revoked_fix,
)
from proxy.certs.sources import FETCH_CHECK, CrlStatus, CrlStore, sources_from_config
from proxy.config import ClientCertificates
from proxy.device.request import DeviceRequest
from proxy.errors import CertificateRejected, CertificateRevoked
from proxy.held import NOT_HELD, HeldRequest


class _Watch(HeldRequest):
    """One request in flight under a chain, kept in its stage's `in_flight` set while it is held; how it is ended
    is `proxy.held`'s (a class, not `contextlib.contextmanager`: a held long-poll keeps it for its whole life)."""

    __slots__ = ("_in_flight", "verified")

    def __init__(
        self,
        request: DeviceRequest,
        verified: VerifiedCertificate,
        task: asyncio.Task[Any],
        in_flight: set[_Watch],
        forget: Callable[[], None] | None,
    ) -> None:
        super().__init__(request, task, forget)  # `forget`: the delegated tickets, as a revoked certificate's refusal
        self.verified = verified
        self._in_flight = in_flight

    def _hold(self) -> None:
        self._in_flight.add(self)

    def _let_go(self) -> None:
        self._in_flight.discard(self)

    def _facts(self) -> dict[str, object]:
        return {"cert_subject": self.verified.subject, "cert_serial": f"{self.verified.serial:x}"}


_CHECKING_OFF = RevocationEvidence(RevocationStatus.UNKNOWN, "", "revocation checking is off")


class LiveRevocation:
    """The revocation stage of a running gateway."""

    def __init__(
        self,
        config: ClientCertificates,
        trust: TrustList,
        *,
        floors: FloorTable | None = None,
        kept: KeptCrls | None = None,
    ) -> None:
        """`floors`: the CRL replay floors the store keeps to (`proxy.certs.sources`): the workers' shared table, a
        `crl_state` file's (`proxy.certs.floors`), or none; `kept`: a worker's, where it keeps the CRLs it takes for a
        replacement, which starts from them (`proxy.certs.kept`)."""
        self.policy = config.revocation
        self.ocsp_policy = config.ocsp
        self.crls = CrlStore(
            trust,
            sources_from_config(config.crls, config.crl_urls),
            refresh_seconds=config.crl_refresh_seconds,
            use_distribution_points=config.use_distribution_points,
            floors=floors,
            policy=config.revocation,
            kept=kept,
        )
        self.ocsp = None if config.ocsp == "off" else OcspClient(cache_seconds=config.crl_refresh_seconds)
        self._in_flight: set[_Watch] = set()
        self._checked: weakref.WeakKeyDictionary[asyncio.Task[Any], VerifiedCertificate] = weakref.WeakKeyDictionary()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        # (the stage a reload handed this one over to, its trust list, the listener on its CRLs)
        self._successor: tuple[LiveRevocation, TrustList, Callable[[CrlSet, CrlSet], None]] | None = None
        self._predecessors: set[LiveRevocation] = set()  # stages replaced by this one, still holding requests
        self.crls.on_change(self._recheck_in_flight)

    def load(self, *, now: datetime) -> list[str]:
        """Read the CRL files now (start-up and check-config); the problems, for the operator."""
        return self.crls.load_files(now=now)

    async def start(self) -> None:
        """Fetch every source once, then keep refreshing in the background (once; later calls wait for it).

        `check` calls it too, so a gateway built by a reload starts refreshing on its first request.
        """
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self.crls.refresh()
        self._task = asyncio.get_running_loop().create_task(self.crls.run(self._stop))

    async def close(self) -> None:
        self._leave_successor()
        self.crls.off_change(self._recheck_in_flight)  # the cycle through its store: CRLs freed once it is let go
        self._stop.set()
        for task in (self._started, self._task):  # a fetch in progress is not waited for
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.crls.close()
        if self.ocsp is not None:
            await self.ocsp.close()

    def status(self) -> list[CrlStatus]:
        """Each CRL's source, issuer, number, thisUpdate, nextUpdate, last fetch and last error."""
        return self.crls.status()

    async def check(self, verified: VerifiedCertificate, *, at: datetime) -> RevocationEvidence:
        """Evidence for the leaf, or CertificateRevoked. Remembers the chain for `watch` in this task."""
        if self._started is None or not self._started.done():
            await self.start()
        if (task := asyncio.current_task()) is not None:
            self._checked[task] = verified
        crl = _CHECKING_OFF
        if self.policy != "off":
            if self.crls.use_distribution_points:  # (no coroutine to make per request otherwise)
                await self.crls.learn(verified.chain)
            # Only a revocation raises here; what a missing CRL means is decided below, after OCSP.
            crl = self.crls.current.check(verified, at=at, policy="best-effort")
        if self.ocsp is not None and len(verified.chain) > 1:
            judge = functools.partial(self._responder_status, verified.chain)
            answer = await self.ocsp.status(verified.leaf, verified.chain[1], at=at, judge=judge)
            if answer.status is RevocationStatus.REVOKED:
                fix = revoked_fix(verified, answer.source)
                raise CertificateRevoked(f"certificate {answer.detail}", hint=fix, revocation="revoked")
            if answer.status is RevocationStatus.GOOD:
                return answer
            if self.ocsp_policy == "require":
                raise CertificateRevoked(
                    answer.detail,
                    hint='the OCSP responder must answer for every certificate under ocsp = "require"',
                    revocation="unknown",
                )
        if crl.status is RevocationStatus.UNKNOWN and self.policy == "require":
            raise self._undetermined(crl)
        return crl

    def _undetermined(self, crl: RevocationEvidence) -> CertificateRevoked:
        """The refusal under "require" of a certificate no current CRL speaks for: saying its status could not be
        determined (nothing was revoked), and naming the CRL URLs that could not be fetched, which may be why."""
        failed = self.crls.not_fetched()
        if not failed:
            return CertificateRevoked(f"{UNDETERMINED}: {crl.detail}", hint=NO_CURRENT_CRL_FIX, revocation="unknown")
        plural = "s" if len(failed) > 1 else ""
        errors = "; ".join(f"{name}: {error}" for name, error in failed.items())
        return CertificateRevoked(
            f"{UNDETERMINED}: {crl.detail} (CRL source{plural} not fetched: {', '.join(failed)})",
            hint=f"{NO_CURRENT_CRL_FIX}; the CRL URL{plural} could not be fetched ({errors}): {FETCH_CHECK}",
            revocation="unknown",
        )

    async def _responder_status(
        self, chain: tuple[x509.Certificate, ...], responder: x509.Certificate, at: datetime
    ) -> RevocationEvidence:
        """Is this delegated OCSP responder's certificate (issued by `chain`'s issuing CA, without
        id-pkix-ocsp-nocheck) revoked, per the CRLs held (its distribution point learned first, where followed)?"""
        path = (responder, *chain[1:])
        await self.crls.learn(path)
        return self.crls.current.lookup(responder, chain[1], at=at, anchor=chain[-1])

    def known(self, verified: VerifiedCertificate, *, at: datetime) -> RevocationEvidence | None:
        """`check`'s evidence when the CRL set in force answers it at once: the same checks, in the same order, on
        the set in force now (whose verdict per chain is remembered until one of its CRLs changes state), and the
        chain remembered for `watch` in this task as `check` does. None where `check` would have to await (not yet
        started, OCSP on, distribution points to learn) or would refuse: the caller then calls `check`, which
        decides (and raises) as always. Never an answer of an earlier set: nothing is remembered here."""
        started = self._started
        if started is None or not started.done() or self.ocsp is not None or self.crls.use_distribution_points:
            return None
        crl = _CHECKING_OFF
        if self.policy != "off":
            try:
                crl = self.crls.current.check(verified, at=at, policy="best-effort")
            except CertificateRevoked:
                return None
        if crl.status is RevocationStatus.UNKNOWN and self.policy == "require":
            return None
        if (task := asyncio.current_task()) is not None:
            self._checked[task] = verified
        return crl

    def watch(
        self, request: DeviceRequest, *, forget: Callable[[], None] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Keep this request in flight under the chain `check` saw for it; end it if that gets revoked, and then call
        `forget` (which drops the user's delegated tickets).

        Raises CertificateRevoked when a refresh revoked the chain meanwhile: while the request was held, and
        also before, between `check` and here (the identity and Kerberos stages can take seconds, and a refresh
        then ends no watch). The CRL set answers a chain it has judged from memory, so this costs a look-up.
        A request that presented no certificate (a password-only route) is not watched. After a reload handed this
        stage over (`hand_over`), the new configuration judges it here too: CertificateRejected when its trust
        list no longer builds the chain, CertificateRevoked when its CRLs list it.
        """
        task = asyncio.current_task()
        verified = self._checked.pop(task, None) if task is not None else None
        if task is None or verified is None:
            return NOT_HELD
        current = self.crls.current
        try:
            if self.policy != "off" and current.may_list(verified):
                current.check(verified, at=datetime.now(UTC), policy="best-effort")  # raises CertificateRevoked
            if self._successor is not None:  # a reload came between `check` and here: hand_over never saw it
                _judge(verified, *self._successor[:2])
        except (CertificateRejected, CertificateRevoked):
            if forget is not None:  # as if it had been held a moment longer
                forget()
            raise
        return _Watch(request, verified, task, self._in_flight, forget)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def hand_over(self, successor: LiveRevocation, trust: TrustList) -> None:
        """A reload replaced this stage by `successor` (trust list `trust`): the requests still held here are judged
        by the new configuration, now (its trust list and CRLs) and at each change of its CRLs until this stage
        closes."""
        if successor is self:
            return
        for older in list(self._predecessors):  # held across an earlier reload: judged by the newest configuration
            older.hand_over(successor, trust)
        now = datetime.now(UTC)
        judged: dict[x509.Certificate, CertificateRejected | None] = {}  # a device's held requests share a leaf
        for watch in list(self._in_flight):
            leaf = watch.verified.leaf
            if leaf not in judged:  # a chain built afresh costs about 0.3 ms: 4,000 held would stall the loop
                try:
                    verify_chain(leaf, trust, at=now)
                    judged[leaf] = None
                except CertificateRejected as e:
                    judged[leaf] = e
            refused = judged[leaf]
            if refused is not None:  # an error of its own per request: each is raised in its own task
                watch.end(_untrusted(refused))
        self._leave_successor()
        listener = functools.partial(_recheck, self._in_flight, successor.policy)
        successor.crls.on_change(listener)
        self._successor = (successor, trust, listener)
        successor._predecessors.add(self)
        listener(successor.crls.current, successor.crls.current)

    def _leave_successor(self) -> None:
        """No longer judged by the stage this one was handed over to (closed, or handed over again)."""
        if self._successor is not None:
            successor, _, listener = self._successor
            successor.crls.off_change(listener)
            successor._predecessors.discard(self)
            self._successor = None

    def _recheck_in_flight(self, old: CrlSet, new: CrlSet) -> None:
        _recheck(self._in_flight, self.policy, old, new)


def _untrusted(e: CertificateRejected) -> CertificateRejected:
    return CertificateRejected(f"the certificate is no longer trusted (reloaded): {e.reason}", hint=e.hint)


def _judge(verified: VerifiedCertificate, successor: LiveRevocation, trust: TrustList) -> None:
    """Refuse a chain the configuration a reload swapped in no longer trusts or whose CRLs revoke it."""
    try:
        verify_chain(verified.leaf, trust, at=datetime.now(UTC))
    except CertificateRejected as e:
        raise _untrusted(e) from None
    newer = successor.crls.current
    if successor.policy != "off" and newer.may_list(verified):
        newer.check(verified, at=datetime.now(UTC), policy="best-effort")  # raises CertificateRevoked


def _recheck(in_flight: set[_Watch], policy: str, _old: CrlSet, new: CrlSet) -> None:
    """End the requests in flight whose chain the CRL set `new` revokes."""
    if policy == "off" or not in_flight:
        return
    now = datetime.now(UTC)
    for watch in list(in_flight):
        if watch.ended is not None or not new.may_list(watch.verified):
            continue
        try:
            new.check(watch.verified, at=now, policy="best-effort")
        except CertificateRevoked as revoked:
            watch.end(revoked)
