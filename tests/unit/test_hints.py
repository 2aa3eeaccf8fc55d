"""KDC failure messages become errors that say what to fix."""

from __future__ import annotations

import pytest

from proxy.errors import GatewayError, KdcUnavailable, KerberosMisconfigured, KerberosRefused
from proxy.kerberos.hints import explain


@pytest.mark.parametrize(
    ("message", "kind", "status", "in_reason", "in_hint"),
    [
        (
            "Unspecified GSS failure.  Minor code may provide more information, KDC can't fulfill requested option",
            KerberosRefused,
            403,
            "may not act for alice@LAB.TEST at HTTP/cas.lab.test",
            "add HTTP/cas.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST",
        ),
        ("Client not found in Kerberos database", KerberosRefused, 403, "no Kerberos account", "realm_map"),
        ("Client's credentials have been revoked", KerberosRefused, 403, "disabled or locked", "CLIENT_REVOKED"),
        ("Cannot contact any KDC for realm 'LAB.TEST'", KdcUnavailable, 503, "unreachable", "KDC is up"),
        ("Server not found in Kerberos database", KerberosMisconfigured, 502, "incomplete", "register the SPN"),
        ("Clock skew too great", KerberosMisconfigured, 502, "clock", "NTP"),
        ("something nobody has seen", KerberosMisconfigured, 502, "could not obtain", "something nobody has seen"),
    ],
)
def test_kdc_messages_map_to_errors_with_fixes(
    message: str, kind: type[GatewayError], status: int, in_reason: str, in_hint: str
) -> None:
    """Each known KDC refusal gets its class, status, a client reason and an administrator's fix."""
    err = explain(message, user="alice@LAB.TEST", spn="HTTP/cas.lab.test", proxy="HTTP/proxy.lab.test@LAB.TEST")
    assert type(err) is kind
    assert err.status == status
    assert in_reason in err.reason
    assert err.hint is not None
    assert in_hint in err.hint


def test_kdc_unavailable_tells_the_client_when_to_retry() -> None:
    """An unreachable KDC is a 503 with Retry-After, never a 401."""
    err = explain("Cannot contact any KDC", user="a@B", spn="HTTP/x", proxy="HTTP/p@B")
    assert err.status == 503
    assert "Retry-After" in err.headers


BADOPTION = "Unspecified GSS failure.  Minor code may provide more information, KDC can't fulfill requested option"


def _explain(message: str, *, step: str | None = None, evidence_forwardable: bool | None = None) -> GatewayError:
    proxy = "HTTP/proxy.lab.test@LAB.TEST"
    spn = "HTTP/cas.lab.test"
    return explain(
        message, user="eve@LAB.TEST", spn=spn, proxy=proxy, step=step, evidence_forwardable=evidence_forwardable
    )


def test_badoption_after_a_not_forwardable_evidence_ticket_names_protocol_transition_or_a_sensitive_user() -> None:
    """S4U2Proxy refused and the evidence ticket was not forwardable: that cause alone, with its fix."""
    err = _explain(BADOPTION, step="s4u2proxy", evidence_forwardable=False)
    assert type(err) is KerberosRefused
    assert err.reason == "the gateway may not act for eve@LAB.TEST: its evidence ticket is not forwardable"
    assert err.hint is not None
    assert err.hint.startswith("evidence ticket not forwardable: the service account HTTP/proxy.lab.test@LAB.TEST")
    assert "lacks protocol transition, or eve@LAB.TEST is marked sensitive" in err.hint
    assert "delegation list" not in err.hint


def test_badoption_after_a_forwardable_evidence_ticket_names_the_delegation_list_only() -> None:
    """S4U2Proxy refused although the evidence ticket was forwardable: the SPN is not allowed."""
    err = _explain(BADOPTION, step="s4u2proxy", evidence_forwardable=True)
    assert err.reason == "the gateway may not act for eve@LAB.TEST at HTTP/cas.lab.test"
    assert err.hint is not None
    assert "add HTTP/cas.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST" in err.hint
    assert "sensitive" not in err.hint


@pytest.mark.parametrize(
    ("message", "kind", "in_hint"),
    [
        ("KDC policy rejects request", KerberosRefused, "KDC_ERR_POLICY"),
        ("KDC has no support for encryption type", KerberosMisconfigured, "KDC_ERR_ETYPE_NOSUPP"),
        ("Decrypt integrity check failed", KerberosMisconfigured, "stale"),
        ("Ticket expired", KerberosMisconfigured, "clock"),
    ],
)
def test_more_kdc_refusals_have_a_cause_and_a_fix(message: str, kind: type[GatewayError], in_hint: str) -> None:
    """Policy, enctype, integrity and expiry failures each name their cause and what to change."""
    err = _explain(message)
    assert type(err) is kind
    assert err.hint is not None
    assert in_hint in err.hint
    assert err.hint.endswith(f"[{message}]")
