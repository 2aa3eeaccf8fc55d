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
