"""The pure parts of operating the gateway: doctor's verdicts and the metrics fed from request traces."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.certs.sources import CrlStatus
from proxy.config import Authentication, Route
from proxy.directory import Ace, DelegationSettings, LockoutPolicy, ResourceBased
from proxy.identity.sid import Sid
from proxy.kerberos.ccache import S4UFacts
from proxy.observability.metrics import LONG_POLL_AFTER, Metrics
from proxy.observability.trace import Trace
from proxy.ops import doctor

ROUTE = Route(prefix="/owa/", upstream="http://127.0.0.1:8081", spn="HTTP/cas.lab.test")
T0 = 1_800_000_000.0


def test_clock_within_a_minute_of_the_kdc_passes_and_beyond_fails_with_the_fix() -> None:
    """The KDC's authtime against our clock readings around the exchange: skew measured to a second."""
    assert doctor.clock_check(datetime.fromtimestamp(T0 + 2, UTC), T0, T0 + 0.1).status == "pass"
    behind = doctor.clock_check(datetime.fromtimestamp(T0 + 400, UTC), T0, T0 + 0.1)
    assert behind.status == "fail"
    assert "400 s behind the KDC" in behind.detail
    assert behind.fix is not None
    assert "NTP" in behind.fix
    assert "ahead of the KDC" in doctor.clock_check(datetime.fromtimestamp(T0 - 90, UTC), T0, T0).detail


def test_keytab_versions_are_compared_with_the_kdcs() -> None:
    """The key version the KDC uses must be in the keytab; none held for the principal is a failure too."""
    assert doctor.keytab_check("P@R", {2, 3}, 3).status == "pass"
    stale = doctor.keytab_check("P@R", {2}, 3)
    assert (stale.status, stale.detail) == ("fail", "the KDC uses key version 3 for P@R; the keytab holds only 2")
    assert doctor.keytab_check("P@R", set(), 3).detail == "the keytab holds no key for P@R"


def test_a_non_forwardable_evidence_ticket_passes_when_every_s4u2proxy_was_granted() -> None:
    """Windows grants S4U2Proxy on a non-forwardable evidence ticket under resource-based delegation (MS-SFU
    3.2.5.2.2; neither lab KDC has it, so this is the pure verdict): doctor said "S4U2Proxy will be refused" and
    failed, beside passing s4u2proxy checks. Now s4u2self passes, saying why; a refused S4U2Proxy keeps the fail."""
    refused = doctor.not_forwardable_check("alice@AD.TEST", "", "svc@AD.TEST")
    assert refused.status == "fail"
    granted = doctor.Check("s4u2proxy HTTP/mail.ad.test", "pass", "the KDC issued a service ticket")
    denied = doctor.Check("s4u2proxy HTTP/other.ad.test", "fail", "the gateway may not act for alice@AD.TEST")
    (verdict,) = doctor.settle_evidence([refused, granted])[:1]
    assert verdict.status == "pass"
    assert "not forwardable" in verdict.detail
    assert "resource-based" in verdict.detail
    assert doctor.settle_evidence([refused, granted, denied])[0] == refused
    assert doctor.settle_evidence([refused])[0] == refused  # no S4U2Proxy asked: nothing granted it


def test_a_backend_must_answer_401_negotiate_to_an_unauthenticated_request() -> None:
    """401 with Negotiate passes; 200, 401 with another scheme, or no answer fail with a fix."""
    url = "http://127.0.0.1:8081/owa/"
    assert doctor.negotiate_check(ROUTE, url, 401, "Negotiate").status == "pass"
    assert doctor.negotiate_check(ROUTE, url, 401, 'Basic realm="x", Negotiate').status == "pass"
    ntlm = doctor.negotiate_check(ROUTE, url, 401, "NTLM")
    assert ntlm.status == "fail"
    assert "offers NTLM" in ntlm.detail
    assert "answers 200 without authentication" in doctor.negotiate_check(ROUTE, url, 200, "").detail
    assert doctor.negotiate_check(ROUTE, url, None, "", "ConnectionRefusedError").status == "fail"


def test_a_delegated_header_larger_than_the_backends_limit_fails() -> None:
    """The Authorization header against doctor.backend_header_limit; the fix names http.sys's settings."""
    assert doctor.header_check(ROUTE, 1200, 16384, "alice@LAB.TEST").status == "pass"
    big = doctor.header_check(ROUTE, 20000, 16384, "alice@LAB.TEST")
    assert big.status == "fail"
    assert big.fix is not None
    assert "MaxFieldLength" in big.fix


def test_the_basic_throttle_is_held_against_the_lockout_threshold_and_window() -> None:
    """basic-lockout: a throttle that lets fewer guesses through than the threshold, for at least the DC's window,
    passes (the workers share one count: their number does not multiply it); as many as the threshold fails naming
    basic_failures_per_user and the largest value that passes; a window shorter than the DC's fails naming
    basic_failure_window_seconds; a domain without a threshold passes whatever the throttle."""
    policy = LockoutPolicy("DC=corp,DC=example", threshold=10, window_seconds=1800)
    auth = Authentication(mode="basic", basic_failures_per_user=5, basic_failure_window_seconds=1800)
    passed = doctor.lockout_check("basic-lockout", policy, auth)
    assert passed.status == "pass"
    assert "at most 5 through" in passed.detail
    at = doctor.lockout_check("basic-lockout", LockoutPolicy("DC=corp", 5, 1800), auth)
    assert at.status == "fail"
    assert "5 guesses" in at.detail
    assert at.fix is not None
    assert "basic_failures_per_user to 4 or less" in at.fix
    short = Authentication(mode="basic", basic_failures_per_user=3, basic_failure_window_seconds=600)
    released = doctor.lockout_check("basic-lockout", policy, short)
    assert released.status == "fail"
    assert released.fix == "set authentication.basic_failure_window_seconds to 1800 or more"
    assert "released while the DC still counts" in released.detail
    never = doctor.lockout_check("basic-lockout", LockoutPolicy("DC=corp", 0, 0), short)
    assert never.status == "pass"
    assert "never locks" in never.detail


def test_doctor_output_has_one_line_per_check_and_the_fix_under_a_failure() -> None:
    """PASS/FAIL/SKIP then the check's name and detail; a failure's fix on the line below; a count last."""
    checks = [
        doctor.Check("kdc", "pass", "ok"),
        doctor.Check("clock", "fail", "off", "sync"),
        doctor.Check("x", "skip", "-"),
    ]
    lines = doctor.render(checks).splitlines()
    assert lines[0].startswith("PASS  kdc")
    assert lines[1].startswith("FAIL  clock")
    assert lines[2].strip() == "fix: sync"
    assert lines[-1] == "3 checks: 1 passed, 1 failed, 1 skipped"


def _scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _trace(**facts: object) -> Trace:
    trace = Trace()
    trace.note(**facts)
    trace.ms.update({"certificate": 1.0, "kerberos": 4.0})
    return trace


def test_metrics_count_requests_refusals_kdc_requests_and_cache_hits_from_traces() -> None:
    """A request's route, status, refusal and ticket cache result become counters when it ends."""
    m = Metrics()
    for trace, status in [
        (_trace(route="/owa/", impersonation_cached=False), 200),
        (_trace(route="/owa/", impersonation_cached=True), 200),
        (_trace(refused_stage="revocation", refusal="certificate_revoked"), 403),
        (_trace(route="/owa/", refused_stage="kerberos", refusal="kerberos_refused"), 403),
    ]:
        m.begin(trace)
        m.observe(trace, status)
    m.handshake_refused("certificate has expired")
    got = _scrape(m)
    assert got[("kcd_requests_total", (("route", "/owa/"), ("status", "200")))] == 2
    assert got[("kcd_requests_total", (("route", ""), ("status", "403")))] == 1
    assert got[("kcd_refusals_total", (("reason", "certificate_revoked"), ("stage", "revocation")))] == 1
    assert got[("kcd_refusals_total", (("reason", "certificate has expired"), ("stage", "tls")))] == 1
    assert got[("kcd_kdc_requests_total", (("outcome", "ok"),))] == 1
    assert got[("kcd_kdc_requests_total", (("outcome", "kerberos_refused"),))] == 1
    assert got[("kcd_kdc_request_seconds_count", ())] == 1
    assert got[("kcd_kdc_request_seconds_sum", ())] == 0.004
    assert got[("kcd_ticket_cache_total", (("result", "hit"),))] == 1
    assert got[("kcd_ticket_cache_total", (("result", "miss"),))] == 1
    assert got[("kcd_requests_in_flight", ())] == 0


def test_kdc_exchanges_are_timed_each_in_a_series_of_their_own_beside_the_old_one() -> None:
    """A request whose Kerberos stage went to the KDC: S4U2Self and S4U2Proxy (and the gateway's own AS exchange when
    the stage fetched its TGT first) each in `kcd_kdc_exchange_seconds{exchange}`, so an operator sees which is slow;
    `kcd_kdc_request_seconds` (the whole stage, no label) keeps its one series for existing dashboards; a cached
    ticket and a refusal add nothing to either."""
    m = Metrics()
    first = S4UFacts(None, None, s4u2self_ms=3.0, s4u2proxy_ms=40.0, gateway_tgt_ms=2.0)
    later = S4UFacts(None, None, s4u2self_ms=5.0, s4u2proxy_ms=1.0)
    for facts, cached, refusal in [
        (first, False, None),
        (later, False, None),
        (later, True, None),
        (first, False, "x"),
    ]:
        trace = _trace(route="/owa/", impersonation_cached=cached)
        if refusal is not None:
            trace = _trace(route="/owa/", refused_stage="kerberos", refusal="kerberos_refused")
        trace.detail("kerberos", facts=facts, cached=cached)
        m.begin(trace)
        m.observe(trace, 200 if refusal is None else 403)
    got = _scrape(m)
    assert got[("kcd_kdc_exchange_seconds_count", (("exchange", "s4u2self"),))] == 2
    assert got[("kcd_kdc_exchange_seconds_sum", (("exchange", "s4u2self"),))] == pytest.approx(0.008)
    assert got[("kcd_kdc_exchange_seconds_count", (("exchange", "s4u2proxy"),))] == 2
    assert got[("kcd_kdc_exchange_seconds_sum", (("exchange", "s4u2proxy"),))] == pytest.approx(0.041)
    assert got[("kcd_kdc_exchange_seconds_bucket", (("exchange", "s4u2proxy"), ("le", "0.025")))] == 1
    assert got[("kcd_kdc_exchange_seconds_count", (("exchange", "as"),))] == 1
    assert got[("kcd_kdc_exchange_seconds_sum", (("exchange", "as"),))] == pytest.approx(0.002)
    assert got[("kcd_kdc_request_seconds_count", ())] == 2
    assert {labels for name, labels in got if name == "kcd_kdc_request_seconds_count"} == {()}


def test_requests_in_flight_longer_than_the_threshold_count_as_held_long_polls() -> None:
    """In-flight requests are counted at scrape time; those older than LONG_POLL_AFTER are held."""
    now = [100.0]
    m = Metrics(clock=lambda: now[0])
    old, new = Trace(), Trace()
    m.begin(old)
    now[0] += LONG_POLL_AFTER + 1
    m.begin(new)
    got = _scrape(m)
    assert (got[("kcd_requests_in_flight", ())], got[("kcd_long_polls_held", ())]) == (2, 1)
    m.observe(old, 200)
    assert _scrape(m)[("kcd_long_polls_held", ())] == 0


def test_crl_ages_come_from_the_stores_status_list() -> None:
    """Each CRL's age and time to nextUpdate, labelled by source and issuer, read when scraped."""
    m = Metrics()
    now = datetime.now(UTC)
    row = CrlStatus(
        source=str(Path("crls.pem")),
        learned=False,
        last_fetch=now,
        last_success=now,
        last_error=None,
        issuer="CN=CA",
        this_update=now - timedelta(hours=1),
        next_update=now + timedelta(days=1),
        current=True,
    )
    m.crls = lambda: [row]
    got = _scrape(m)
    labels = (("issuer", "CN=CA"), ("source", "crls.pem"))
    assert 3590 < got[("kcd_crl_age_seconds", labels)] < 3700
    assert 86000 < got[("kcd_crl_next_update_seconds", labels)] <= 86400


def test_metrics_count_mapping_rules_and_refusals() -> None:
    """Each mapping decision counts under its rule (weak-audit: what strong would refuse); refusals by event."""
    m = Metrics()
    for trace, status in [
        (_trace(route="/", mapping="sid-extension"), 200),
        (_trace(route="/", mapping="weak-audit"), 200),
        (_trace(route="/", mapping="weak-audit"), 200),
        (_trace(refused_stage="mapping", refusal="mapping_refused"), 403),
    ]:
        m.begin(trace)
        m.observe(trace, status)
    got = _scrape(m)
    assert got[("kcd_certificate_mappings_total", (("rule", "sid-extension"),))] == 1
    assert got[("kcd_certificate_mappings_total", (("rule", "weak-audit"),))] == 2
    assert got[("kcd_refusals_total", (("reason", "mapping_refused"), ("stage", "mapping")))] == 1


def test_the_delegation_check_reads_the_gateway_accounts_delegation_tab() -> None:
    """`delegation`: protocol transition and every route's SPN (any case) pass; each missing piece is named with its
    commands, unconstrained delegation called so; no account to read is a skip, never a pass."""
    dn = "CN=svc-gw,CN=Users,DC=corp,DC=test"
    good = DelegationSettings(dn, 0x200 | doctor.UF_TRUSTED_TO_AUTH_FOR_DELEGATION, ("http/CAS.corp.test",))
    assert doctor.delegation_check("svc-gw@CORP.TEST", good, ["HTTP/cas.corp.test"]).status == "pass"
    bare = DelegationSettings(dn, 0x200 | doctor.UF_TRUSTED_FOR_DELEGATION, ())
    failed = doctor.delegation_check("svc-gw@CORP.TEST", bare, ["HTTP/cas.corp.test"])
    assert failed.status == "fail"
    assert "'Trust this user for delegation to any service (Kerberos only)' is chosen" in failed.detail
    assert "msDS-AllowedToDelegateTo lists nothing, not HTTP/cas.corp.test" in failed.detail
    assert failed.fix is not None
    assert "Set-ADAccountControl svc-gw -TrustedForDelegation $false -TrustedToAuthForDelegation $true" in failed.fix
    assert "samba-tool delegation add-service svc-gw HTTP/cas.corp.test" in failed.fix
    assert doctor.delegation_check("svc-gw@CORP.TEST", None, ["HTTP/cas.corp.test"]).status == "skip"


def test_a_failed_delegation_check_passes_where_the_kdc_granted_every_s4u2proxy() -> None:
    """Resource-based delegation needs neither setting the check reads: every S4U2Proxy granted, its failure is a pass
    that says so; one S4U2Proxy refused, it stays failed."""
    failed = doctor.Check("delegation", "fail", "svc-gw@CORP.TEST: msDS-AllowedToDelegateTo lists nothing", "fix")
    granted = doctor.Check("s4u2proxy HTTP/cas.corp.test", "pass", "issued")
    settled = doctor.settle_delegation([granted, failed])
    assert (settled[1].status, settled[1].fix) == ("pass", None)
    assert "resource-based delegation" in settled[1].detail
    refused = doctor.Check("s4u2proxy HTTP/cas.corp.test", "fail", "refused", "fix")
    assert doctor.settle_delegation([refused, failed])[1] == failed


_GATEWAY_SID = Sid.parse("S-1-5-21-1-2-3-1109")
_GROUP_SID = Sid.parse("S-1-5-21-1-2-3-1200")


def _bare_gateway(*sids: Sid) -> DelegationSettings:
    """A gateway account with an empty Delegation tab, known by `sids` (its own, its groups')."""
    return DelegationSettings("CN=svc-gw,CN=Users,DC=corp,DC=test", 0x200, (), frozenset(sids))


def test_resource_based_delegation_alone_is_no_failure_and_the_kdcs_answer_decides() -> None:
    """A gateway allowed only by the backend's msDS-AllowedToActOnBehalfOfOtherIdentity: without S4U2Proxy tried, a
    skip naming the backend's account and --user; granted, a pass; refused, a failure saying the KDC does not honour
    it, with classic delegation's commands."""
    spn = "HTTP/cas.corp.test"
    backend = {spn: ResourceBased(spn, "CN=cas,CN=Computers,DC=corp,DC=test", (Ace(True, _GATEWAY_SID),))}
    untried = doctor.delegation_check("svc-gw@CORP.TEST", _bare_gateway(_GATEWAY_SID), [spn], backend)
    assert untried.status == "skip", untried
    assert "CN=cas,CN=Computers,DC=corp,DC=test's msDS-AllowedToActOnBehalfOfOtherIdentity allows" in untried.detail
    assert "run with --user UPN" in untried.detail
    granted = doctor.delegation_check("svc-gw@CORP.TEST", _bare_gateway(_GATEWAY_SID), [spn], backend, {spn: True})
    assert granted.status == "pass", granted
    refused = doctor.delegation_check("svc-gw@CORP.TEST", _bare_gateway(_GATEWAY_SID), [spn], backend, {spn: False})
    assert refused.status == "fail", refused
    assert "does not honour resource-based delegation" in refused.detail
    assert refused.fix is not None
    assert f"samba-tool delegation add-service svc-gw {spn}" in refused.fix


def test_resource_based_delegation_counts_the_gateways_groups_and_a_deny_wins() -> None:
    """The backend may allow a group the gateway is in (its tokenGroups); a deny entry naming the gateway or one of
    its groups takes the allow away, and an account nobody allows fails as before, naming what allows what."""
    spn, other = "HTTP/cas.corp.test", "HTTP/owa.corp.test"
    by_group = {spn: ResourceBased(spn, "CN=cas,DC=corp,DC=test", (Ace(True, _GROUP_SID),))}
    gateway = _bare_gateway(_GATEWAY_SID, _GROUP_SID)
    assert doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], by_group).status == "skip"
    denied = {spn: ResourceBased(spn, "CN=cas,DC=corp,DC=test", (Ace(False, _GATEWAY_SID), Ace(True, _GROUP_SID)))}
    assert doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], denied).status == "fail"
    partly = doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn, other], {**by_group})
    assert partly.status == "fail", partly
    assert f"msDS-AllowedToDelegateTo lists nothing, not {other}" in partly.detail
    assert f"allows svc-gw@CORP.TEST for {spn} (resource-based delegation), not {other}" in partly.detail
    assert doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], {spn: ResourceBased(spn, None)}).status == "fail"


def test_a_backend_any_account_may_delegate_to_is_a_warning_naming_the_fix() -> None:
    """A backend whose descriptor allows Everyone (a NULL DACL reads so) or Authenticated Users is a WARN of its own,
    naming the account and the command that allows the gateway alone; one allowing the gateway (or nobody) is none;
    render counts the warning."""
    spn, dn = "HTTP/cas.corp.test", "CN=cas,CN=Computers,DC=corp,DC=test"
    everyone, users = Sid(1, (0,)), Sid(5, (11,))
    for entries in [(Ace(True, everyone),), (Ace(False, _GATEWAY_SID), Ace(True, users))]:
        [line] = doctor.open_backends_check("svc-gw@CORP.TEST", {spn: ResourceBased(spn, dn, entries)})
        assert (line.name, line.status) == ("delegation-open", "warn"), line
        assert f"{dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity lets every account of the domain" in line.detail
        assert line.fix is not None
        assert f"Set-ADUser -Identity '{dn}' -PrincipalsAllowedToDelegateToAccount svc-gw " in line.fix
        assert doctor.render([line]).splitlines()[-1] == "1 checks: 0 passed, 1 warned, 0 failed, 0 skipped"
    for entries in [(Ace(True, _GATEWAY_SID),), (Ace(False, everyone), Ace(True, everyone)), ()]:
        assert doctor.open_backends_check("svc-gw@CORP.TEST", {spn: ResourceBased(spn, dn, entries)}) == []
    assert doctor.open_backends_check("svc-gw@CORP.TEST", {spn: ResourceBased(spn, None)}) == []


def test_a_backend_whose_verdict_depends_on_the_kdc_is_a_warning_and_the_kdcs_answer_decides() -> None:
    """A backend allowing the gateway only by an entry some KDCs read and others do not (Network, S-1-5-2): without
    S4U2Proxy tried, `delegation` warns that doctor cannot tell, naming the entry, and how to find out (before: FAIL,
    as if nothing allowed it); granted, a pass; refused, a failure naming the entry or a KDC without resource-based
    delegation; `delegation-open` warns that every account may be allowed, on some KDCs."""
    spn, dn = "HTTP/cas.corp.test", "CN=cas,CN=Computers,DC=corp,DC=test"
    backend = {spn: ResourceBased(spn, dn, (Ace(True, Sid(5, (2,))),))}
    gateway = _bare_gateway(_GATEWAY_SID)
    untried = doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], backend)
    assert untried.status == "warn", untried
    assert f"whether {dn}'s msDS-AllowedToActOnBehalfOfOtherIdentity allows svc-gw@CORP.TEST for {spn} depends on " in (
        untried.detail
    )
    assert "its entry allowing S-1-5-2 names Network" in untried.detail
    assert "run with --user UPN" in untried.detail
    assert untried.fix is not None
    assert "-PrincipalsAllowedToDelegateToAccount svc-gw" in untried.fix
    assert doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], backend, {spn: True}).status == "pass"
    refused = doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn], backend, {spn: False})
    assert refused.status == "fail", refused
    assert "the entry named above refused it, or it does not honour resource-based delegation" in refused.detail
    [line] = doctor.open_backends_check("svc-gw@CORP.TEST", backend)
    assert line.status == "warn", line
    assert f"may let every account of the domain act for any user towards {spn}, on some KDCs" in line.detail
    other = "HTTP/owa.corp.test"
    partly = doctor.delegation_check("svc-gw@CORP.TEST", gateway, [spn, other], backend)
    assert partly.status == "fail", partly
    assert f"msDS-AllowedToDelegateTo lists nothing, not {other}" in partly.detail
    assert "depends on the KDC: its entry allowing S-1-5-2" in partly.detail
