"""`kcd-proxy explain`: what the gateway would do with a certificate, stage by stage, without a client.

The verdict comes from the gateway's own stage functions (`proxy.pipeline`): `certificate_user` (chain
built from the configured CAs only, restrictions, revocation under the configured policy and CRLs,
identity, and the directory account when `identity.mapping` asks for one), the route for `path`, and
with `kdc` the Delegator's S4U2Self + S4U2Proxy for the route's SPN, so a certificate stops here exactly
where a request would. Around that verdict, explain shows the evidence: each certificate of the chain,
the revocation decision and its source, the restriction rule that admitted it, the principal, the
directory account and the rule that tied the certificate to it, the route and SPN, and (with `kdc`)
whether the evidence ticket is forwardable (`proxy.kerberos.probe`; not forwardable, S4U2Proxy is still asked, as
the gateway asks it, and the KDC refuses or, with resource-based delegation, grants it). A refusal carries the stage,
the reason a client would see and the administrator's fix. The validation time is a parameter (`--at`).
"""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509

from proxy.certs.chain import VerifiedCertificate, format_time, parse_certificates, verify_chain
from proxy.config import Route
from proxy.errors import BadRequest, CertificateRejected, GatewayError, NoRoute, NotForwardable
from proxy.identity.mapping import describe as describe_mapping
from proxy.identity.principal import UserPrincipal
from proxy.observability.trace import Trace
from proxy.pipeline import Gateway, certificate_user, forwarding_named
from proxy.target import origin_form


@dataclass
class Step:
    stage: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None


@dataclass
class Explanation:
    at: datetime
    path: str
    steps: list[Step] = field(default_factory=list)
    upn: str | None = None
    principal: str | None = None
    route: str | None = None
    spn: str | None = None
    stage: str | None = None  # where it was refused
    refused: GatewayError | None = None

    @property
    def accepted(self) -> bool:
        return self.refused is None

    def refuse(self, stage: str, error: GatewayError) -> Explanation:
        self.stage, self.refused = stage, error
        self.steps.append(Step(stage, False, error.reason, fix=error.hint))
        return self

    def to_json(self) -> dict[str, Any]:
        refused = self.refused
        return {
            "accepted": self.accepted,
            "stage": self.stage,
            "reason": refused.reason if refused else None,
            "fix": refused.hint if refused else None,
            "upn": self.upn,
            "principal": self.principal,
            "route": self.route,
            "spn": self.spn,
            "path": self.path,
            "at": self.at.isoformat(),
            "steps": [
                {"stage": s.stage, "ok": s.ok, "summary": s.summary, "details": s.details, "fix": s.fix}
                for s in self.steps
            ],
        }

    def render(self) -> str:
        lines = [f"explaining at {format_time(self.at)} for path {self.path}"]
        for step in self.steps:
            lines.append(f"{step.stage:<12} {'ok' if step.ok else 'REFUSED':<8} {step.summary}")
            lines.extend(f"{'':<22}{detail}" for detail in step.details)
            if step.fix:
                lines.append(f"{'':<22}fix: {step.fix}")
        lines.append("accepted" if self.refused is None else f"refused at {self.stage}: {self.refused.reason}")
        return "\n".join(lines)


def load_leaf(data: bytes) -> x509.Certificate:
    """The first certificate of a PEM file (a chain is fine), or a DER certificate (and nothing after it)."""
    return parse_certificates(data)[0]


async def explain(
    gw: Gateway, leaf: x509.Certificate, *, path: str, at: datetime, kdc: bool, host: str | None = None
) -> Explanation:
    """Run `leaf` through the gateway's stages at time `at`; the explanation stops where a request would."""
    out = Explanation(at=at, path=path)
    trace = Trace()
    try:
        user = await certificate_user(gw, leaf, trace, at)
    except GatewayError as e:
        return _certificate_steps(out, gw, leaf, trace, at).refuse(_stage(e, gw, leaf, at), e)
    _certificate_steps(out, gw, leaf, trace, at)
    try:
        route = gw.config.route_for(origin_form(path).path, host)  # read as the gateway reads a request's path
    except BadRequest as e:
        return out.refuse("route", e)
    if route is None:
        return out.refuse("route", NoRoute(f"nothing is published at {path}", hint="add a [[routes]] with its prefix"))
    out.route, out.spn = route.prefix, route.spn
    out.steps.append(
        Step("route", True, f"{path} -> prefix {route.prefix!r} -> {route.upstream}", [f"SPN {route.spn}"])
    )
    if not kdc:
        out.steps.append(Step("kerberos", True, "not asked (with --kdc: S4U2Self and S4U2Proxy at the KDC)"))
        return out
    try:
        await _kerberos(out, gw, user, route)
    except NotForwardable as e:  # the directory, where there is one, names which of the two causes it is
        return out.refuse("kerberos", await forwarding_named(gw, e))
    except GatewayError as e:
        return out.refuse("kerberos", e)
    return out


def _stage(error: GatewayError, gw: Gateway, leaf: x509.Certificate, at: datetime) -> str:
    """The stage a refusal belongs to; a certificate whose chain is sound was refused by a restriction."""
    if isinstance(error, CertificateRejected):
        with contextlib.suppress(GatewayError):
            verify_chain(leaf, gw.trust, at=at)
            return "restrictions"
    return error.stage


def _certificate_steps(
    out: Explanation, gw: Gateway, leaf: x509.Certificate, trace: Trace, at: datetime
) -> Explanation:
    """The evidence of the stages `certificate_user` passed, from what it noted in its trace."""
    facts = trace.facts
    if "certificate" not in trace.ms or "restriction" not in facts:
        return out  # refused at the chain or a restriction: the refusal says why
    verified = verify_chain(leaf, gw.trust, at=at)
    out.steps.append(Step("certificate", True, _certificate_line(verified), _chain_lines(verified)))
    rule = facts.get("restriction")
    out.steps.append(Step("restrictions", True, f"admitted by rule {rule!r}" if rule else "none configured"))
    if "revocation" in facts:
        source = facts.get("revocation_source")
        out.steps.append(
            Step(
                "revocation",
                True,
                f"{facts['revocation']} under revocation = {gw.config.client_certificates.revocation!r}",
                [f"source: {source}"] if source else [],
            )
        )
    if "principal" in facts and "identity" in trace.ms:
        out.upn, out.principal = facts["upn"], facts["principal"]
        summary = f"{facts['upn']} ({facts['identity_source']}) -> Kerberos principal {facts['principal']}"
        out.steps.append(Step("identity", True, summary))
    if "mapping" in facts:
        out.steps.append(_mapping_step(facts))
    return out


def _mapping_step(facts: dict[str, Any]) -> Step:
    """The mapping stage's decision: which account, which rule (or, in audit mode, why it is weak)."""
    rule = facts["mapping"]
    summary = describe_mapping(rule, facts.get("account_dn"), facts.get("account_sid"))
    details = [f"mapping = {facts['mapping_mode']!r}, rule {rule}", facts["mapping_detail"]]
    return Step("mapping", True, summary, details)


def _certificate_line(v: VerifiedCertificate) -> str:
    return f"'{v.subject}', serial 0x{v.serial:x}, valid until {format_time(v.leaf.not_valid_after_utc)}"


def _chain_lines(verified: VerifiedCertificate) -> list[str]:
    lines = []
    for i, cert in enumerate(verified.chain):
        role = "leaf" if i == 0 else "trust anchor" if i == len(verified.chain) - 1 else "intermediate"
        lines.append(
            f"{role}: '{cert.subject.rfc4514_string()}' serial 0x{cert.serial_number:x}, "
            f"{format_time(cert.not_valid_before_utc)} to {format_time(cert.not_valid_after_utc)}"
        )
    return lines


async def _kerberos(out: Explanation, gw: Gateway, user: UserPrincipal, route: Route) -> None:
    from proxy.kerberos.probe import KerberosProbe

    proxy = gw.config.kerberos.principal
    probe = KerberosProbe(gw.config.kerberos, source=gw.delegator.service_credentials)  # one AS exchange in all
    facts = probe.evidence_ticket(user, spn=route.spn)
    # Not forwardable: S4U2Proxy is still asked, as the gateway asks it. The KDC decides: classic constrained
    # delegation refuses it (the refusal then says why, in the KDC error explainer's words), Windows' resource-based
    # delegation grants it (MS-SFU 3.2.5.2.2).
    flag = "forwardable" if facts.forwardable else "NOT forwardable: S4U2Proxy is the KDC's to refuse or grant"
    out.steps.append(
        Step(
            "kerberos",
            True,
            f"S4U2Self: the KDC issued {proxy} an evidence ticket for {facts.client} ({flag})",
            [
                f"authtime {format_time(facts.authtime)}, the gateway's own TGT's: {facts.client} did not authenticate "
                "(protocol transition), the KDC copies the time from the TGT S4U2Self was asked with",
                f"ticket flags 0x{facts.flags:08x}",
            ],
        )
    )
    delegated = await gw.delegator.delegate(user, route.spn, route.gss_target)
    header = "Authorization: Negotiate " + base64.b64encode(delegated.token).decode("ascii")
    out.steps.append(
        Step(
            "kerberos",
            True,
            f"S4U2Proxy: the KDC issued a service ticket for {delegated.principal} to {route.spn}",
            [f"Authorization: Negotiate header of {len(header)} bytes"],
        )
    )
