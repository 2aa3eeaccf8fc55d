"""Trace records, the bounded ring and its export, the page's sequence diagram and `kcd-proxy trace`'s admin URL."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.config import Traces
from proxy.kerberos.ccache import S4UFacts, TicketFacts
from proxy.observability.trace import Trace
from proxy.observability.tracepage import messages, render_index, render_trace, sequence_svg
from proxy.observability.traces import STAGES, TraceRing, build_record, describe, render_text
from proxy.ops.trace_cli import DEFAULT_ADMIN, admin_url
from tests.unit.test_config import FILES, GOOD

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def write(tmp_path: Path, text: str, *, mkdir: str | None = None) -> Path:
    """A gateway configuration `text` in tmp_path, with the files it names (and directory `mkdir`)."""
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    if mkdir:
        (tmp_path / mkdir).mkdir(exist_ok=True)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def _ticket(client: str, server: str, *, forwardable: bool = True) -> TicketFacts:
    sname, _, realm = server.partition("@")
    return TicketFacts(
        client=client,
        server=server,
        flags=0x40090000 if forwardable else 0x00090000,
        session_enctype=18,
        authtime=NOW,
        starttime=NOW,
        endtime=NOW + timedelta(hours=10),
        renew_till=None,
        realm=realm,
        sname=sname,
        ticket_enctype=18,
        kvno=2,
    )


EVIDENCE = _ticket("alice@LAB.TEST", "HTTP/proxy.lab.test@LAB.TEST")
SERVICE = _ticket("alice@LAB.TEST", "HTTP/cas.lab.test@LAB.TEST")


def _trace(*, cached: bool, facts: S4UFacts | None = None, kerberos_ms: float = 5.0) -> Trace:
    """A certificate request's trace as the pipeline leaves it."""
    t = Trace()
    t.note(method="GET", path="/owa/", client="127.0.0.1", tls_version="TLSv1.3", tls_cipher="X", tls_resumed=False)
    t.note(cert_subject="CN=alice", cert_issuer="CN=Lab Issuing CA", cert_serial="1f", restriction=None)
    t.note(revocation="good", revocation_source="crls.pem")
    t.note(upn="alice@lab.test", principal="alice@LAB.TEST", identity_source="san-upn", factors="certificate")
    t.note(route="/", spn="HTTP/cas.lab.test", upstream="http://127.0.0.1:8081", backend_status=200, backend_ms=2.0)
    for stage, ms in (("tls", 0.1), ("certificate", 0.2), ("revocation", 0.1), ("identity", 0.05)):
        t.ms[stage] = ms
    t.ms["authentication"] = 0.01
    t.ms["kerberos"] = kerberos_ms
    t.ms["backend"] = 3.0
    facts = facts or S4UFacts(EVIDENCE, SERVICE, s4u2self_ms=2.0, s4u2proxy_ms=1.5)
    t.detail("kerberos", facts=facts, cached=cached)
    t.detail("backend", reused=cached)
    return t


def test_a_record_has_the_seven_stages_in_order_with_ticket_facts() -> None:
    """tls ... backend, the authentication step folded into identity, S4U stages with forwardable and cached."""
    record = build_record(_trace(cached=False), 200, 9.0)
    assert [s["name"] for s in record["stages"]] == [s for s in STAGES if s != "mapping"]  # mapping = "upn"
    assert (record["upn"], record["principal"], record["status"]) == ("alice@lab.test", "alice@LAB.TEST", 200)
    stages = {s["name"]: s for s in record["stages"]}
    assert stages["identity"]["ms"] == 0.06  # 0.05 identity + 0.01 authentication
    s4u2self = stages["s4u2self"]
    assert (s4u2self["cached"], s4u2self["forwardable"], s4u2self["client"]) == (False, True, "alice@LAB.TEST")
    assert stages["s4u2self"]["server"] == "HTTP/proxy.lab.test@LAB.TEST"
    assert stages["s4u2proxy"]["server"] == "HTTP/cas.lab.test@LAB.TEST"
    assert stages["s4u2proxy"]["forwardable"] is True
    assert (stages["s4u2self"]["ms"], stages["s4u2proxy"]["ms"]) == (2.0, 1.5)  # the exchanges' own times
    assert stages["backend"]["reused"] is False
    json.dumps(record)  # JSON all the way down


def test_a_cache_hit_costs_s4u2self_nothing_and_says_cached() -> None:
    """From the cache: both S4U stages cached, S4U2Self 0 ms, S4U2Proxy the token's time."""
    stages = {s["name"]: s for s in build_record(_trace(cached=True, kerberos_ms=0.3), 200, 4.0)["stages"]}
    assert (stages["s4u2self"]["cached"], stages["s4u2proxy"]["cached"]) == (True, True)
    assert (stages["s4u2self"]["ms"], stages["s4u2proxy"]["ms"]) == (0.0, 0.3)


def test_an_exchange_that_fetched_the_gateways_tgt_shows_the_as_exchange_first() -> None:
    """The gateway's own AS exchange, when this request's exchange made one: its time in S4U2Self's (it came first),
    `gateway_tgt_ms`, the line's words, and an AS-REQ arrow to the KDC before S4U2Self's in the page's diagram."""
    facts = S4UFacts(EVIDENCE, SERVICE, s4u2self_ms=2.0, s4u2proxy_ms=1.5, gateway_tgt_ms=1.25)
    record = build_record(_trace(cached=False, facts=facts, kerberos_ms=6.0), 200, 10.0)
    stages = {s["name"]: s for s in record["stages"]}
    assert (stages["s4u2self"]["ms"], stages["s4u2self"]["gateway_tgt_ms"], stages["s4u2proxy"]["ms"]) == (
        3.25,
        1.25,
        1.5,
    )
    assert "after the gateway's own TGT (an AS exchange with its keytab, 1.25 ms)" in render_text([record])
    arrows = [(m.step, m.source, m.target, m.label) for m in messages(record) if "kdc" in (m.source, m.target)]
    assert arrows[0] == ("s4u2self", "gateway", "kdc", "AS-REQ (the gateway's own TGT, from its keytab)")
    assert arrows[1][:3] == ("s4u2self", "kdc", "gateway")
    assert arrows[2][3].startswith("S4U2Self (TGS-REQ")
    cached = build_record(_trace(cached=True, facts=facts, kerberos_ms=0.3), 200, 4.0)
    assert "gateway_tgt_ms" not in {s["name"]: s for s in cached["stages"]}["s4u2self"]
    assert not [m for m in messages(cached) if m.label.startswith("AS-REQ")]


def test_a_refused_s4u2proxy_ends_the_stages_with_reason_fix_and_the_evidence_ticket() -> None:
    """The refusal lands on the step that failed; S4U2Self before it shows the not-forwardable evidence."""
    evidence = _ticket("eve@LAB.TEST", "HTTP/proxy.lab.test@LAB.TEST", forwardable=False)
    t = _trace(cached=False, facts=S4UFacts(evidence, None, 2.0, None, failed_step="s4u2proxy"))
    del t.ms["backend"]
    t.note(refused_stage="kerberos", reason="not forwardable", refusal="kerberos_refused")
    t.detail("refused", fix="evidence ticket not forwardable: ...")
    record = build_record(t, 403, 6.0)
    assert [s["name"] for s in record["stages"]][-2:] == ["s4u2self", "s4u2proxy"]
    last = record["stages"][-1]
    assert (last["refused"], last["reason"], last["facts"]) == (True, "not forwardable", "not issued")
    assert record["stages"][-2]["forwardable"] is False
    assert record["refused"] == {
        "stage": "s4u2proxy",
        "reason": "not forwardable",
        "fix": "evidence ticket not forwardable: ...",
        "event": "kerberos_refused",
    }
    assert "fix: evidence ticket not forwardable" in render_text([record])


def test_the_ring_keeps_the_last_n_newest_first_and_filters_by_user(tmp_path: Path) -> None:
    """Bounded: the oldest falls out; a user filter matches UPN or principal; export is one JSON line each."""
    ring = TraceRing()
    export = tmp_path / "traces.jsonl"
    ids = []
    for i in range(5):
        t = _trace(cached=i > 0)
        if i == 4:
            t.note(upn="bob@lab.test", principal="bob@LAB.TEST")
        ids.append(t.id)
        ring.record(t, 200, Traces(keep=3, export=export))
    assert len(ring) == 3
    assert [r["id"] for r in ring.recent(10)] == ids[:1:-1]
    assert [r["id"] for r in ring.recent(1)] == [ids[4]]
    assert [r["id"] for r in ring.recent(10, "ALICE@lab.test")] == [ids[3], ids[2]]
    assert [r["id"] for r in ring.recent(10, "bob@LAB.TEST")] == [ids[4]]
    assert ring.get(ids[0]) is None
    lines = export.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ids
    ring.close()


def test_the_diagram_has_four_lifelines_and_the_s4u_arrows_marked_when_cached() -> None:
    """Device, gateway, KDC, backend; S4U2Self and S4U2Proxy there and back, dashed grey 'cache hit' when cached."""
    svg = sequence_svg(build_record(_trace(cached=True), 200, 4.0))
    assert re.findall(r'class="lifeline" data-actor="(\w+)"', svg) == ["device", "gateway", "kdc", "backend"]
    s4u = re.findall(r'data-step="(s4u2\w+)" data-from="(\w+)" data-to="(\w+)" data-cached="(\w+)"', svg)
    assert s4u == [
        ("s4u2self", "gateway", "kdc", "true"),
        ("s4u2self", "kdc", "gateway", "true"),
        ("s4u2proxy", "gateway", "kdc", "true"),
        ("s4u2proxy", "kdc", "gateway", "true"),
    ]
    assert svg.count("cache hit</text>") == 2
    fresh = sequence_svg(build_record(_trace(cached=False), 200, 4.0))
    assert "cache hit" not in fresh
    assert "evidence ticket, forwardable" in fresh


def test_a_refused_request_stops_the_diagram_at_the_refusing_step() -> None:
    """After a KDC refusal no backend arrow is drawn; the refusal goes back to the device in red."""
    t = _trace(cached=False, facts=S4UFacts(EVIDENCE, None, 2.0, None, failed_step="s4u2proxy"))
    del t.ms["backend"]
    t.note(refused_stage="kerberos", reason="no", refusal="kerberos_refused")
    steps = [(m.step, m.source, m.target, m.refused) for m in messages(build_record(t, 403, 5.0))]
    assert ("backend", "gateway", "backend", False) not in steps
    assert steps[-2:] == [("s4u2proxy", "kdc", "gateway", True), ("response", "gateway", "device", True)]


def test_the_trace_page_shows_each_tickets_authtime_and_flags_in_hex() -> None:
    """docs/delegation-flow.md reads two facts off each ticket: its authtime (the gateway's own TGT's, copied by the
    KDC: the user never authenticated) and its flags in hex (0x40090000); the trace page shows both, for the evidence
    ticket and the service ticket (it showed neither: a learner following the doc on the page found no authtime)."""
    tgt = NOW - timedelta(minutes=13)  # the gateway's AS exchange, before this user's request
    evidence = dataclasses.replace(EVIDENCE, authtime=tgt)
    service = dataclasses.replace(SERVICE, authtime=tgt)
    page = render_trace(build_record(_trace(cached=False, facts=S4UFacts(evidence, service, 2.0, 1.5)), 200, 9.0))
    facts = [
        dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", dl))
        for dl in re.findall(r'<dl class="facts">(.*?)</dl>', page)
    ]
    assert len(facts) == 2  # S4U2Self's and S4U2Proxy's
    for ticket in facts:
        assert ticket["authtime"] == "2026-05-01T11:47:00Z"
        assert ticket["start"] == "2026-05-01T12:00:00Z"
        assert ticket["flags"] == "forwardable, transited-policy-checked, enc-pa-rep (0x40090000)"


def test_the_list_page_counts_one_request_in_the_singular() -> None:
    """The lab's first page after the README's one curl says "1 request held", not "1 requests held"."""
    record = build_record(_trace(cached=False), 200, 9.0)
    assert '<p class="muted">1 request held (the last 200 are kept)' in render_index(
        [record], user=None, held=1, keep=200
    )
    assert "2 requests held" in render_index([record, record], user=None, held=2, keep=200)


def test_pages_escape_what_requests_carry() -> None:
    """A path or user name with markup shows as text on the list and the trace page."""
    t = _trace(cached=True)
    t.note(path="/<script>alert(1)</script>", upn='x"><img src=x>@lab.test')
    record = build_record(t, 200, 1.0)
    for page in (render_trace(record), render_index([record], user="<b>", held=1, keep=200)):
        assert "<script>alert" not in page
        assert "<img src=x>" not in page
        assert "&lt;script&gt;" in page


def test_traces_config_keeps_200_by_default_and_names_bad_keys(tmp_path: Path) -> None:
    """[traces] keep and export: defaults, a relative export path, and errors naming key and file."""
    from proxy import config
    from proxy.errors import ConfigError

    assert config.load(write(tmp_path, GOOD)).traces == Traces(keep=200, export=None)
    cfg = config.load(write(tmp_path, GOOD + '\n[traces]\nkeep = 5\nexport = "out/traces.jsonl"\n', mkdir="out"))
    assert cfg.traces == Traces(keep=5, export=tmp_path / "out" / "traces.jsonl")
    with pytest.raises(ConfigError) as e:
        config.load(write(tmp_path, GOOD + '\n[traces]\nkeep = 0\nexport = "nowhere/t.jsonl"\ncolour = 1\n'))
    problems = "\n".join(e.value.problems)
    assert "traces.keep: must be positive" in problems
    assert "traces.export: directory not found" in problems
    assert "traces.colour: unknown key" in problems
    assert str(tmp_path / "gateway.toml") in problems


def test_trace_command_finds_the_admin_listener(tmp_path: Path) -> None:
    """--admin wins; else --config's [admin] bind; else the documented default."""
    ns = argparse.Namespace
    assert admin_url(ns(admin="http://127.0.0.1:1234/", config=None)) == "http://127.0.0.1:1234"
    path = write(tmp_path, GOOD + '\n[admin]\nbind = "127.0.0.1:9555"\n')
    assert admin_url(ns(admin=None, config=str(path))) == "http://127.0.0.1:9555"
    assert admin_url(ns(admin=None, config=None)) == DEFAULT_ADMIN


def test_trace_command_writes_an_ipv6_admin_bind_in_brackets(tmp_path: Path) -> None:
    """An IPv6 `[admin] bind` is asked at `http://[::1]:port` (the one `proxy.addresses.host_port`)."""
    path = write(tmp_path, GOOD + '\n[admin]\nbind = "[::1]:9555"\n')
    assert admin_url(argparse.Namespace(admin=None, config=str(path))) == "http://[::1]:9555"


def test_a_basic_sign_in_has_one_kerberos_stage_and_its_identity_from_the_password() -> None:
    """Without a certificate: identity comes from Basic (rule "basic"), Kerberos is the user's own ticket, no S4U."""
    t = Trace()
    t.note(method="GET", path="/owa/", upn="alice@lab.test", principal="alice@LAB.TEST", factors="basic")
    t.note(basic_user="alice@lab.test", basic_cached=True)
    t.ms.update({"tls": 0.1, "authentication": 0.2, "kerberos": 0.3, "backend": 1.0})
    t.detail("kerberos", own_ticket=True)
    stages = build_record(t, 200, 2.0)["stages"]
    assert [s["name"] for s in stages] == ["tls", "identity", "kerberos", "backend"]
    assert (stages[1]["rule"], stages[1]["basic_cached"]) == ("basic", True)
    assert "s4u" not in json.dumps(stages)


def test_the_mapping_stage_shows_between_identity_and_kerberos() -> None:
    """With strong mapping the record has a mapping stage after identity: account, SID, rule; refusals land there."""
    t = _trace(cached=False)
    t.ms = {k: v for k, v in t.ms.items() if k in ("tls", "certificate", "revocation", "identity")}
    t.ms["mapping"] = 0.4
    t.note(account_dn="CN=alice,CN=Users,DC=ad,DC=test", account_sid="S-1-5-21-1-2-3-1105")
    t.note(mapping="sid-extension", mapping_mode="strong", mapping_detail="S-1-5-21-1-2-3-1105", mapping_weak=False)
    t.ms["authentication"], t.ms["kerberos"], t.ms["backend"] = 0.01, 1.0, 3.0
    record = build_record(t, 200, 9.0)
    assert [s["name"] for s in record["stages"]] == list(STAGES)
    mapping = next(s for s in record["stages"] if s["name"] == "mapping")
    assert (mapping["rule"], mapping["sid"], mapping["weak"]) == ("sid-extension", "S-1-5-21-1-2-3-1105", False)
    words = "SID extension is the objectSid of account CN=alice,CN=Users,DC=ad,DC=test (S-1-5-21-1-2-3-1105)"
    assert words in render_text([record])  # explain's words (proxy.identity.mapping.describe), not a second wording

    refused = Trace()
    refused.ms.update({"tls": 0.1, "certificate": 0.2, "revocation": 0.1, "identity": 0.05, "mapping": 0.3})
    refused.note(upn="alice@ad.test", account_dn="CN=alice,CN=Users,DC=ad,DC=test", account_sid="S-1-5-21-1-2-3-1105")
    refused.note(
        refused_stage="mapping", reason="the certificate belongs to another account", refusal="mapping_refused"
    )
    refused.detail("refused", fix="revoke it")
    record = build_record(refused, 403, 1.0)
    assert record["refused"]["stage"] == "mapping"
    assert next(s for s in record["stages"] if s["name"] == "mapping")["refused"] is True


def _refused_early(stage: str, reason: str) -> dict[str, object]:
    """The record of a request refused at `stage`, before that stage established any fact."""
    t = Trace()
    t.note(method="GET", path="/owa/", client="127.0.0.1", tls_version="TLSv1.3", tls_cipher="X", tls_resumed=False)
    t.note(cert_subject="CN=heidi", cert_issuer="CN=Lab Issuing CA", cert_serial="1f", restriction=None)
    if stage == "identity":
        t.note(revocation="good", revocation_source="crls.pem")
    for name in ("tls", "certificate", "revocation", "identity")[: 3 if stage == "revocation" else 4]:
        t.ms[name] = 0.1
    t.note(refused_stage=stage, reason=reason, refusal=f"{stage}_refused")
    return build_record(t, 403, 1.0)


@pytest.mark.parametrize("stage", ["revocation", "identity"])
def test_a_stage_refused_before_its_facts_prints_no_none(stage: str) -> None:
    """`kcd-proxy trace` of a revoked certificate or one without a UPN said `— None from no source` and
    `— None: None -> None` after the reason: a stage refused before it knew anything prints its reason alone."""
    text = render_text([_refused_early(stage, "the reason")])
    line = next(line for line in text.splitlines() if line.lstrip().startswith(stage))
    assert line.endswith("REFUSED: the reason"), text
    assert "None" not in text, text


def test_the_export_file_is_created_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Traces carry users' names, addresses and paths: the export is created 0600 even under umask 000 (a launcher
    other than the shipped unit); it was the umask's 0666/0644."""
    export = tmp_path / "traces.jsonl"
    ring = TraceRing()
    old = os.umask(0)
    try:
        ring.record(_trace(cached=False), 200, Traces(keep=3, export=export))
    finally:
        os.umask(old)
        ring.close()
    assert stat.S_IMODE(export.stat().st_mode) == 0o600
    assert json.loads(export.read_text())["status"] == 200


def test_s4u2proxys_time_is_the_kdc_exchange_measured_not_the_stages_rest() -> None:
    """A first request's S4U2Proxy time is the exchange's own (`S4UFacts.s4u2proxy_ms`), not the Kerberos stage less
    S4U2Self (which counted the hand-off to a KDC thread and the evidence ticket's PAC as S4U2Proxy's: here a stage of
    40 ms whose exchanges took 2 + 1.5 ms said S4U2Proxy took 38 ms). A request that joined another's exchange and
    waited less than it took keeps the two steps within its own stage's time."""
    stages = {s["name"]: s for s in build_record(_trace(cached=False, kerberos_ms=40.0), 200, 45.0)["stages"]}
    assert (stages["s4u2self"]["ms"], stages["s4u2proxy"]["ms"]) == (2.0, 1.5)
    joined = {s["name"]: s for s in build_record(_trace(cached=False, kerberos_ms=2.5), 200, 6.0)["stages"]}
    assert (joined["s4u2self"]["ms"], joined["s4u2proxy"]["ms"]) == (2.0, 0.5)
    for record in (stages, joined):
        assert record["s4u2self"]["ms"] + record["s4u2proxy"]["ms"] <= (40.0 if record is stages else 2.5)


def test_a_ticket_asked_for_again_after_a_slow_connect_is_a_second_pair_of_s4u_steps_in_record_and_diagram() -> None:
    """A connection-bound route's ticket asked for again once a slow backend connection was open (detail stage
    `kerberos_again`, its time counted in `ms.kerberos`): the record shows the first exchange on the stage's time less
    the second's, then the second with `again: true`; the diagram draws both pairs of S4U arrows, first then second,
    before the backend request (it keyed the steps by name, and the second pair hid the first)."""
    t = _trace(cached=True, kerberos_ms=4.3)
    t.detail("kerberos_again", facts=S4UFacts(EVIDENCE, SERVICE, s4u2self_ms=2.0, s4u2proxy_ms=1.5), cached=False)
    t.detail("kerberos_again", ms=4.0)
    record = build_record(t, 200, 12.0)
    steps = [(s["name"], s["ms"], s["cached"], s.get("again", False)) for s in record["stages"] if "s4u" in s["name"]]
    assert steps == [
        ("s4u2self", 0.0, True, False),
        ("s4u2proxy", 0.3, True, False),
        ("s4u2self", 2.0, False, True),
        ("s4u2proxy", 1.5, False, True),
    ]
    arrows = [(m.step, m.source, m.cached) for m in messages(record) if m.step.startswith(("s4u", "backend"))]
    assert arrows == [
        ("s4u2self", "gateway", True),
        ("s4u2self", "kdc", True),
        ("s4u2proxy", "gateway", True),
        ("s4u2proxy", "kdc", True),
        ("s4u2self", "gateway", False),
        ("s4u2self", "kdc", False),
        ("s4u2proxy", "gateway", False),
        ("s4u2proxy", "kdc", False),
        ("backend", "gateway", False),
        ("backend", "backend", False),
    ]
    assert sequence_svg(record).count(">again: S4U2") == 2
    described = [describe(s) for s in record["stages"] if "s4u" in s["name"]]
    again = [d.startswith("again, once the backend connection was open: ") for d in described]
    assert again == [False, False, True, True]
