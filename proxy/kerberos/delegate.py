"""Impersonate (S4U2Self), then delegate (S4U2Proxy): a Negotiate token for a user who gave no password.

Theory of operation. The gateway holds a keytab for its own principal (`HTTP/proxy...`). With it, it
asks the KDC for a ticket *to itself* in the user's name (S4U2Self, "protocol transition"): that
*evidence ticket* proves nothing about the user to anyone else; it is forwardable only if the KDC lets
the gateway's account act for users without their credentials (`ok_to_auth_as_delegate`,
AD's "use any authentication protocol"). The gateway then presents the evidence ticket to ask for a
ticket to the backend's SPN (S4U2Proxy, "constrained delegation"), which the KDC grants only for SPNs
in the gateway's delegation list. The first GSSAPI token built on that service ticket goes into
`Authorization: Negotiate`.

What it trusts: the identity handed to it, which the certificate and identity stages established.
What it refuses: every KDC refusal becomes a gateway error with a fix (`proxy.kerberos.hints`).

The GSSAPI calls block (they talk to the KDC) and release the GIL, so they run in worker threads, at
most `max_in_flight` at once. A `SecurityContext` is built per request and never shared. The
impersonated credentials of a user are kept until shortly before they expire, so a returning user
costs one S4U2Proxy (or none, when the library finds the service ticket in its cache), not two
exchanges. Only this package imports `gssapi`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import gssapi
import gssapi.exceptions
import gssapi.raw

from proxy.config import Kerberos
from proxy.identity.principal import UserPrincipal
from proxy.kerberos.hints import explain

SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
# Impersonated credentials must name SPNEGO as well as krb5, or MIT's SPNEGO finds no mechanism to offer.
_MECHS = (gssapi.MechType.kerberos, SPNEGO)
_RENEW_MARGIN = 300  # seconds before expiry at which cached impersonated credentials are dropped


@dataclass(frozen=True)
class DelegatedToken:
    """Evidence of the Kerberos stage: a Negotiate token for `principal` at `spn`."""

    principal: str
    spn: str
    token: bytes
    impersonation_cached: bool  # whether S4U2Self was skipped thanks to the cache
    ms: float

    @property
    def authorization(self) -> str:
        return "Negotiate " + base64.b64encode(self.token).decode("ascii")


class Delegator:
    """Owns the gateway's service credentials and turns user principals into Negotiate tokens."""

    def __init__(self, settings: Kerberos, *, cache_size: int = 10_000) -> None:
        if settings.krb5_config is not None:
            # MIT krb5 reads its profile from the environment when a library context is created.
            os.environ["KRB5_CONFIG"] = str(settings.krb5_config)
        self._settings = settings
        self._ccache = f"MEMORY:kcd-proxy-{uuid.uuid4().hex}"
        self._service: gssapi.Credentials | None = None
        self._lock = threading.Lock()
        self._impersonated: OrderedDict[str, tuple[gssapi.Credentials, float]] = OrderedDict()
        self._cache_size = cache_size
        self._slots = asyncio.Semaphore(settings.max_in_flight)

    def _service_credentials(self) -> gssapi.Credentials:
        with self._lock:
            if self._service is None or self._remaining(self._service) < _RENEW_MARGIN:
                self._service = gssapi.Credentials(
                    name=gssapi.Name(self._settings.principal, gssapi.NameType.kerberos_principal),
                    usage="both",
                    store={
                        "client_keytab": str(self._settings.keytab),
                        "keytab": str(self._settings.keytab),
                        "ccache": self._ccache,
                    },
                )
            return self._service

    @staticmethod
    def _remaining(creds: gssapi.Credentials) -> float:
        try:
            lifetime = creds.lifetime
        except gssapi.exceptions.ExpiredCredentialsError:
            return 0.0
        return float("inf") if lifetime is None else float(lifetime)

    def impersonate(self, principal: str) -> tuple[gssapi.Credentials, bool]:
        """S4U2Self: the evidence ticket for `principal`, from the cache when still fresh."""
        now = time.monotonic()
        with self._lock:
            hit = self._impersonated.get(principal)
            if hit is not None and hit[1] > now:
                self._impersonated.move_to_end(principal)
                return hit[0], True
        user = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
        creds = self._service_credentials().impersonate(user, usage="initiate", mechs=_MECHS)
        expires = now + max(0.0, self._remaining(creds) - _RENEW_MARGIN)
        with self._lock:
            self._impersonated[principal] = (creds, expires)
            while len(self._impersonated) > self._cache_size:
                self._impersonated.popitem(last=False)
        return creds, False

    def delegate_blocking(self, user: UserPrincipal, spn: str, gss_target: str) -> DelegatedToken:
        """S4U2Self (or cache) then S4U2Proxy; returns the first SPNEGO token for `spn`."""
        start = time.perf_counter()
        try:
            creds, cached = self.impersonate(user.principal)
            context = gssapi.SecurityContext(
                name=gssapi.Name(gss_target, gssapi.NameType.hostbased_service),
                creds=creds,
                usage="initiate",
                mech=SPNEGO,
                flags=gssapi.RequirementFlag.out_of_sequence_detection,
            )
            token = context.step()
        except gssapi.raw.GSSError as e:
            with self._lock:
                self._impersonated.pop(user.principal, None)
            raise explain(e.gen_message(), user=user.principal, spn=spn, proxy=self._settings.principal) from None
        if not token:
            raise explain("no token produced", user=user.principal, spn=spn, proxy=self._settings.principal)
        ms = (time.perf_counter() - start) * 1000
        return DelegatedToken(user.principal, spn, token, cached, ms)

    async def delegate(self, user: UserPrincipal, spn: str, gss_target: str) -> DelegatedToken:
        """The same, off the event loop, bounded in concurrency and in time."""
        async with self._slots:
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(self.delegate_blocking, user, spn, gss_target),
                    timeout=self._settings.kdc_timeout,
                )
            except TimeoutError:
                raise explain(
                    f"cannot contact any KDC within {self._settings.kdc_timeout:g} s",
                    user=user.principal,
                    spn=spn,
                    proxy=self._settings.principal,
                ) from None
