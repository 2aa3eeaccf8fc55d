"""Asking the KDC questions on the gateway's behalf, for readiness, `explain` and `doctor`.

Theory of operation. The gateway's keytab lets it get tickets to itself, and a ticket to itself can be
accepted with the same keytab; an accepted context tells what the KDC put in the ticket (flags,
authentication time). That gives, without any other party:

- `credentials`: the gateway's own credentials, from one AS exchange with the keytab (into an in-memory ccache of
  this probe's), or from the `source` it was given (`explain` and `doctor` give their `Delegator`'s, so that a run
  asks the KDC for them once), made on first use and kept: every later question of the probe asks with them. A
  refusal is kept too and raised again without asking the KDC again.
- `self_ticket`: with those, a service ticket to the gateway's own principal. It proves the KDC is reachable and
  accepts the keytab's key; the ticket's clear-text header (`proxy.kerberos.ticket`) carries the key version the
  KDC currently uses.
- `accept`: the same ticket accepted with the keytab; its authtime is the KDC's clock at the AS exchange,
  so comparing it with ours measures the clock skew (to a second).
- `evidence_ticket`: S4U2Self for a user, and the evidence ticket accepted with the keytab: its flags say
  whether it is forwardable, which S4U2Proxy requires (the account needs protocol transition, and the
  user must not be marked sensitive), and its PAC which account the KDC impersonated (or that it names none).

A probe without a `source` builds its own credentials and ccache and shares nothing with the `Delegator` that serves
requests. The admin listener's readiness check gives the serving `Delegator`'s `fresh_credentials`: an AS exchange of
the probe's own, into a ccache of its own, that offers no key the KDC refused before (the delegator remembers it for
the request path and every probe). Failures come back as the gateway's errors, with the fix (`proxy.kerberos.hints`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import gssapi
import gssapi.raw

from proxy.config import Kerberos
from proxy.errors import GatewayError
from proxy.identity.principal import UserPrincipal
from proxy.kerberos.acceptor import context_pac
from proxy.kerberos.ccache import read_tickets
from proxy.kerberos.hints import clock_skew, explain, is_clock_skew
from proxy.kerberos.keytab import RefusedBefore, missing_key
from proxy.kerberos.pac import PacFacts
from proxy.kerberos.password import user_name
from proxy.kerberos.profile import use_profile

TKT_FLG_FORWARDABLE = 0x40000000  # RFC 4120 TicketFlags bit 1, as MIT's krb5_flags hold it


@dataclass(frozen=True)
class TicketFacts:
    """What an accepted ticket says: who it is for, from whom, and what the KDC allowed."""

    client: str
    flags: int
    authtime: datetime
    pac: PacFacts | None = None  # the ticket's PAC (None: it carries none)
    pac_unreadable: str | None = None  # why the PAC could not be read

    @property
    def forwardable(self) -> bool:
        return bool(self.flags & TKT_FLG_FORWARDABLE)


class KerberosProbe:
    def __init__(self, settings: Kerberos, *, source: Callable[[], gssapi.Credentials] | None = None) -> None:
        """`source`: where the gateway's own credentials come from (a `Delegator.service_credentials`), instead of an
        AS exchange of the probe's own."""
        use_profile(settings.krb5_config)
        self.settings = settings
        self._source = source
        self._name = gssapi.Name(settings.principal, gssapi.NameType.kerberos_principal)
        self._creds: gssapi.Credentials | None = None
        self._refused: GatewayError | None = None  # why the AS exchange failed: not asked again

    def _acquire(self) -> gssapi.Credentials:
        keytab = str(self.settings.keytab)
        store: dict[bytes | str, bytes | str] = {
            "client_keytab": keytab,
            "keytab": keytab,
            "ccache": f"MEMORY:kcd-probe-{uuid.uuid4().hex}",
        }
        # krb5 alone: with no mechanism named, MIT acquires for each it has (krb5, IAKERB), and a refused key made one
        # AS exchange for each
        return gssapi.Credentials(name=self._name, usage="both", mechs=[gssapi.MechType.kerberos], store=store)

    @property
    def refused(self) -> GatewayError | None:
        """Why the gateway's own credentials could not be had (`credentials`), or None: not asked, or granted."""
        return self._refused

    def credentials(self) -> gssapi.Credentials:
        """The gateway's own credentials: the AS exchange with the keytab on first use (MIT makes it when the
        credentials are acquired), then these. A failure is explained (`step="service"`: the operator's) and kept."""
        if self._refused is not None:
            raise self._refused
        if self._creds is None:
            try:
                self._creds = self._source() if self._source is not None else self._acquire()
            except (gssapi.raw.GSSError, RefusedBefore) as e:
                principal = self.settings.principal
                self._refused = self._fail(e, principal, principal, step="service")
                raise self._refused from None
        return self._creds

    def _fail(
        self, error: gssapi.raw.GSSError | RefusedBefore, user: str, spn: str, step: str | None = None
    ) -> GatewayError:
        principal = self.settings.principal
        keytab = missing_key(self.settings.keytab, principal) if step == "service" else None
        return explain(error.gen_message(), user=user, spn=spn, proxy=principal, step=step, keytab=keytab)

    def self_ticket(self) -> bytes:
        """The gateway's credentials (`credentials`), then a ticket to ourselves: the raw krb5 AP-REQ token."""
        creds = self.credentials()
        try:
            ctx = gssapi.SecurityContext(name=self._name, creds=creds, usage="initiate", mech=gssapi.MechType.kerberos)
            token: bytes = ctx.step()
        except gssapi.raw.GSSError as e:
            raise self._fail(e, self.settings.principal, self.settings.principal, step="service") from None
        return token

    def accept(self, token: bytes) -> TicketFacts:
        """Accept a ticket to ourselves with the keytab, and read what the KDC put in it."""
        try:
            acceptor = gssapi.Credentials(usage="accept", store={"keytab": str(self.settings.keytab)})
            # the raw call: the high-level step() turned a refusal (clock skew) into a context never established,
            # whose flags then failed with "No context has been established" instead of the refusal's own words
            accepted = gssapi.raw.accept_sec_context(token, acceptor_creds=acceptor)
            ctx = accepted.context
            flags = int(gssapi.raw.krb5_get_tkt_flags(ctx))
            authtime = int(gssapi.raw.krb5_extract_authtime_from_sec_context(ctx))
        except gssapi.raw.GSSError as e:
            message = e.gen_message()
            if is_clock_skew(message):
                raise clock_skew(message, proxy=self.settings.principal, offset=self._offset()) from None
            raise self._fail(e, self.settings.principal, self.settings.principal) from None
        pac, unreadable = None, None
        try:
            pac = context_pac(ctx)
        except ValueError as e:
            unreadable = f"the PAC is malformed: {e}"
        when = datetime.fromtimestamp(authtime, UTC)
        return TicketFacts(str(gssapi.Name(base=accepted.initiator_name)), flags, when, pac, unreadable)

    def _offset(self) -> float | None:
        """This clock minus the KDC's, from the authtime of the tickets just issued to the gateway (the KDC's now)."""
        tickets = read_tickets(self._creds) if self._creds is not None else []
        return time.time() - max(t.authtime for t in tickets).timestamp() if tickets else None

    def evidence_ticket(self, user: UserPrincipal, *, spn: str | None = None) -> TicketFacts:
        """S4U2Self for `user` (its NT-ENTERPRISE name with identity.enterprise_names); the facts of the
        evidence ticket (forwardable or not). A refusal is explained as the gateway's would be.

        `spn`, the service the ticket is meant for in the end, only makes a refusal's message name it."""
        principal = user.principal
        service = self.credentials()
        try:
            creds = service.impersonate(user_name(user), usage="initiate", mechs=[gssapi.MechType.kerberos])
        except gssapi.raw.GSSError as e:
            raise self._fail(e, principal, spn or self.settings.principal, step="s4u2self") from None
        try:
            ctx = gssapi.SecurityContext(name=self._name, creds=creds, usage="initiate", mech=gssapi.MechType.kerberos)
            token: bytes = ctx.step()
        except gssapi.raw.GSSError as e:
            raise self._fail(e, principal, spn or self.settings.principal) from None
        return self.accept(token)
