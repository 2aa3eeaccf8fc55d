"""The request flow, in one place.

    TLS handshake -> certificate -> revocation -> identity -> route -> impersonate + delegate -> backend

Each stage returns its evidence (a verified certificate, a revocation status, a user principal, a
delegated token) or raises a `proxy.errors.GatewayError`, which the middleware in `proxy.app` turns
into the local reply. Nothing reaches a backend before every stage has said yes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from cryptography import x509

from proxy.backend.forward import Pools, forward
from proxy.certs.chain import TrustList, verify_chain
from proxy.certs.revocation import CrlSet
from proxy.config import Config
from proxy.errors import IdentityRejected, NoRoute
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.identity.upn import upn_from_certificate
from proxy.kerberos.delegate import Delegator
from proxy.observability.trace import Trace
from proxy.tls.peer import peer_certificate, tls_facts


@dataclass(frozen=True)
class Gateway:
    """Everything a request needs, built from one configuration."""

    config: Config
    trust: TrustList
    crls: CrlSet
    delegator: Delegator
    pools: Pools


def identify(leaf: x509.Certificate, config: Config) -> UserPrincipal:
    upn = upn_from_certificate(leaf)
    if upn is None:
        raise IdentityRejected(
            "the certificate carries no user principal name (SubjectAltName otherName UPN); "
            "ask for a certificate issued for your account"
        )
    return map_upn(upn, realm_map=config.identity.realm_map, source=config.identity.source)


async def handle(gw: Gateway, request: web.Request, trace: Trace) -> web.StreamResponse:
    now = datetime.now(UTC)
    with trace.stage("tls"):
        trace.note(**tls_facts(request))
        leaf = peer_certificate(request)
    with trace.stage("certificate"):
        trace.note(cert_subject=leaf.subject.rfc4514_string(), cert_issuer=leaf.issuer.rfc4514_string())
        trace.note(cert_serial=format(leaf.serial_number, "x"))
        verified = verify_chain(leaf, gw.trust, at=now)
    with trace.stage("revocation"):
        revocation = gw.crls.check(verified, at=now, policy=gw.config.client_certificates.revocation)
        trace.note(revocation=revocation.status.value, revocation_source=revocation.source)
    with trace.stage("identity"):
        user = identify(verified.leaf, gw.config)
        trace.note(upn=user.upn, principal=user.principal)
    route = gw.config.route_for(request.path)
    if route is None:
        raise NoRoute("nothing is published at this path")
    trace.note(route=route.prefix, spn=route.spn, upstream=route.upstream)
    with trace.stage("kerberos"):
        delegated = await gw.delegator.delegate(user, route.spn, route.gss_target)
        trace.note(impersonation_cached=delegated.impersonation_cached)
    with trace.stage("backend"):
        response, result = await forward(
            request, route, session=gw.pools.session(user.principal), authorization=delegated.authorization
        )
    trace.note(backend_status=result.status, backend_ms=round(result.ms, 3))
    return response
