"""A request's trace keeps its facts, stage times and details flat until they are read (a held long-poll keeps its
trace for half an hour), and the dictionaries read back are the ones noting into dictionaries made."""

from __future__ import annotations

import gc
from typing import Any

from proxy.observability.trace import Trace

# What a request held on a long-poll route has noted by the time the backend holds it (the bench's summary line)
NOTES: list[dict[str, Any]] = [
    {"method": "GET", "path": "/hold/ping", "client": "127.0.0.1"},
    {"tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384", "tls_resumed": False},
    {"cert_subject": "CN=bench0000", "cert_issuer": "CN=Lab Issuing CA", "cert_serial": "58", "cert_cached": True},
    {"revocation": "good", "revocation_source": "crl"},
    {"mapping": "upn"},
    {"factors": "certificate", "upn": "bench0000@lab.test", "principal": "bench0000@LAB.TEST"},
    {"route": "/hold/", "spn": "HTTP/cas.lab.test", "upstream": "http://127.0.0.1:1", "backend_auth": "negotiate"},
    {"impersonation_cached": True, "delegation_cached": True},
]
STAGES = ("tls", "certificate", "revocation", "identity", "authentication", "kerberos")


def _noted() -> Trace:
    trace = Trace()
    for facts in NOTES:
        trace.note(**facts)
    for stage in STAGES:
        with trace.stage(stage):
            pass
    trace.detail("certificate", verified="chain", chain=["CN=bench0000", "CN=Lab Issuing CA"])
    trace.detail("revocation", source="crl", crl_number=3)
    trace.detail("kerberos", evidence="bench0000@LAB.TEST", service="HTTP/cas.lab.test")
    return trace


def test_a_noted_trace_keeps_no_dictionary_until_read() -> None:
    """While a request is served (and a long-poll held) its trace holds no dictionary: facts, times and details
    are lists of names and values (a dictionary of twenty-odd facts grows a 64-slot table)."""
    trace = _noted()
    dicts = [o for o in gc.get_referents(trace) if isinstance(o, dict)]
    assert dicts == []
    assert trace.facts["route"] == "/hold/"  # read: now a dictionary, the trace's from here on
    assert [o for o in gc.get_referents(trace) if isinstance(o, dict)] == [trace.facts]


def test_the_dictionaries_read_are_those_noting_into_dictionaries_made() -> None:
    """Every fact in the order first noted with its last value (as `dict.update`), the stages in the order they
    ended, the details by stage; notes after a read go into the dictionary read; the summary line's fields keep
    their order (status, request id, the facts, the times with the total last)."""
    trace = _noted()
    trace.note(route="/other/", backend_status=200)  # noted twice: first place, last value
    trace.detail("certificate", chain_cached=True)
    expected: dict[str, Any] = {}
    for facts in NOTES:
        expected.update(facts)
    expected.update(route="/other/", backend_status=200)
    assert list(trace.facts.items()) == list(expected.items())
    assert list(trace.ms) == list(STAGES)
    assert trace.details == {
        "certificate": {"verified": "chain", "chain": ["CN=bench0000", "CN=Lab Issuing CA"], "chain_cached": True},
        "revocation": {"source": "crl", "crl_number": 3},
        "kerberos": {"evidence": "bench0000@LAB.TEST", "service": "HTTP/cas.lab.test"},
    }
    assert list(trace.details) == ["certificate", "revocation", "kerberos"]
    trace.note(backend_ms=1.5)
    trace.detail("backend", reused=False)
    with trace.stage("backend"):
        pass
    assert list(trace.facts)[-1] == "backend_ms"
    assert trace.details["backend"] == {"reused": False}
    line = trace.summary(status=200)
    assert list(line) == ["status", "request_id", *expected, "backend_ms", "ms"]
    assert list(line["ms"]) == [*STAGES, "backend", "total"]


def test_a_trace_read_before_any_note_is_empty_and_takes_notes() -> None:
    """A trace read before anything was noted (a request refused at once) gives empty dictionaries that take later
    notes; dictionaries set whole replace what was noted."""
    trace = Trace()
    assert trace.facts == {}
    assert trace.ms == {}
    assert trace.details == {}
    trace.note(method="GET")
    trace.detail("refused", fix="none")
    assert trace.facts == {"method": "GET"}
    assert trace.details == {"refused": {"fix": "none"}}
    noted = Trace()
    noted.note(a=1)
    with noted.stage("tls"):
        pass
    noted.ms = {"certificate": 1.0}
    noted.facts = {"b": 2}
    assert noted.ms == {"certificate": 1.0}
    assert noted.facts == {"b": 2}
