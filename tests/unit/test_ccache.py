"""Ticket facts read from an exported MIT credential: names, flags, enctypes, times; never a key or a ticket."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from proxy.kerberos.ccache import S4UFacts, attach, facts_of, parse_export, pick
from proxy.kerberos.ticket import ticket_fields

KRB5_OID = bytes.fromhex("2a864886f712010202")
SPNEGO_OID = bytes.fromhex("2b0601050502")
SESSION_KEY = base64.b64encode(b"K" * 32).decode()  # what must never come out
START = 1795323688  # 2026-11-22T05:01:28Z


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + content


def _ticket(service: str, host: str, realm: str = "LAB.TEST", etype: int = 18, kvno: int = 3) -> bytes:
    """A Ticket ([APPLICATION 1]) for service/host@realm, its enc-part a placeholder."""
    names = _der(0x1B, service.encode()) + _der(0x1B, host.encode())
    sname = _der(0x30, _der(0xA0, _der(0x02, b"\x02")) + _der(0xA1, _der(0x30, names)))
    enc = _der(0xA0, _der(0x02, bytes([etype]))) + _der(0xA1, _der(0x02, bytes([kvno]))) + _der(0xA2, _der(0x04, b"x"))
    body = (
        _der(0xA0, _der(0x02, b"\x05"))
        + _der(0xA1, _der(0x1B, realm.encode()))
        + _der(0xA2, sname)
        + _der(0xA3, _der(0x30, enc))
    )
    return _der(0x61, _der(0x30, body))


def _cred(client: str, server: str, flags: int, ticket: bytes = b"", enctype: int = 18) -> list[object]:
    key = [enctype, SESSION_KEY] if ticket else [0, ""]
    times = [START, START, START + 86400, 0] if ticket else [0, 0, 0, 0]
    return [client, server, key, *times, False, flags, None, base64.b64encode(ticket).decode(), "", None]


def _export(creds: list[list[object]]) -> bytes:
    """gss_export_cred's framing as MIT writes it for an impersonated SPNEGO credential."""
    ccache = ["alice@LAB.TEST", *creds]
    body = json.dumps(["K5C1", [1, ["alice@LAB.TEST", None, None], "HTTP/proxy.lab.test@LAB.TEST", False, ccache]])
    inner = len(KRB5_OID).to_bytes(4, "big") + KRB5_OID + len(body).to_bytes(4, "big") + body.encode()
    return len(SPNEGO_OID).to_bytes(4, "big") + SPNEGO_OID + len(inner).to_bytes(4, "big") + inner


EXPORT = _export(
    [
        _cred("HTTP/proxy.lab.test@LAB.TEST", "krb5_ccache_conf_data/refresh_time@X-CACHECONF:", 0),
        _cred("HTTP/proxy.lab.test@LAB.TEST", "krbtgt/LAB.TEST@LAB.TEST", 0x40410000, _ticket("krbtgt", "LAB.TEST")),
        _cred("alice@LAB.TEST", "HTTP/proxy.lab.test@LAB.TEST", 0x40090000, _ticket("HTTP", "proxy.lab.test")),
        _cred("alice@LAB.TEST", "HTTP/cas.lab.test@", 0x40090000, _ticket("HTTP", "cas.lab.test", etype=17, kvno=7)),
    ]
)


def test_a_bare_ticket_header_names_realm_service_enctype_and_kvno() -> None:
    """The clear-text header of a Ticket as a credential cache stores it (no GSS token around it)."""
    header = ticket_fields(_ticket("HTTP", "cas.lab.test", etype=17, kvno=7))
    assert (header.realm, header.sname, header.etype, header.kvno) == ("LAB.TEST", "HTTP/cas.lab.test", 17, 7)


def test_export_gives_each_ticket_and_skips_configuration_entries() -> None:
    """Three tickets (the gateway's TGT, evidence, service) out of four entries; times and flags as issued."""
    tickets = parse_export(EXPORT)
    assert [t.server for t in tickets] == [
        "krbtgt/LAB.TEST@LAB.TEST",
        "HTTP/proxy.lab.test@LAB.TEST",
        "HTTP/cas.lab.test@",
    ]
    service = tickets[2]
    assert service.service == "HTTP/cas.lab.test@LAB.TEST"  # the realm from the ticket, not the referral entry
    assert (service.ticket_enctype, service.kvno, service.session_enctype) == (17, 7, 18)
    assert service.starttime == datetime.fromtimestamp(START, UTC)
    assert service.forwardable


def test_evidence_and_service_tickets_are_told_apart_from_the_gateways_own() -> None:
    """The evidence ticket is the user's to the gateway; the gateway's TGT is neither."""
    evidence, service = pick(parse_export(EXPORT), proxy="HTTP/proxy.lab.test@LAB.TEST", spn="HTTP/cas.lab.test")
    assert evidence is not None
    assert service is not None
    assert (evidence.client, evidence.server) == ("alice@LAB.TEST", "HTTP/proxy.lab.test@LAB.TEST")
    assert service.sname == "HTTP/cas.lab.test"


def test_ticket_facts_name_forwardable_and_hold_no_key_or_ticket() -> None:
    """to_json: forwardable named, enctype by name, ISO times; the session key and the ticket bytes absent."""
    tickets = parse_export(EXPORT)
    shown = json.dumps([t.to_json() for t in tickets])
    facts = tickets[1].to_json()
    assert facts["forwardable"] is True
    assert facts["flags"] == ["forwardable", "transited-policy-checked", "enc-pa-rep"]
    assert facts["enctype"] == "aes256-cts-hmac-sha1-96"
    assert (facts["start"], facts["end"]) == ("2026-11-22T05:01:28Z", "2026-11-23T05:01:28Z")
    assert SESSION_KEY not in shown
    assert base64.b64encode(_ticket("HTTP", "proxy.lab.test")).decode()[:40] not in shown


def test_a_not_forwardable_evidence_ticket_says_so() -> None:
    """Without the forwardable bit (no protocol transition, or a sensitive user) the facts say false."""
    blob = _export(
        [_cred("eve@LAB.TEST", "HTTP/proxy.lab.test@LAB.TEST", 0x00090000, _ticket("HTTP", "proxy.lab.test"))]
    )
    evidence, service = pick(parse_export(blob), proxy="HTTP/proxy.lab.test@LAB.TEST", spn="HTTP/cas.lab.test")
    assert evidence is not None
    assert service is None
    assert evidence.to_json()["forwardable"] is False
    assert "forwardable" not in evidence.to_json()["flags"]


@pytest.mark.parametrize(
    "blob",
    [
        b"\x00\x00\x00\x09" + KRB5_OID + b"\x00\x00\x00\x10",  # truncated token
        b"\x00\x00\x00\x09" + KRB5_OID + b"\x00\x00\x00\x04K5C2",  # not MIT's serialisation
        b"",  # nothing at all
    ],
)
def test_an_unreadable_export_is_a_value_error(blob: bytes) -> None:
    """What cannot be read is reported as such, never guessed."""
    with pytest.raises(ValueError):  # noqa: PT011  the message varies with what was wrong
        parse_export(blob)


def test_a_refusal_carries_the_facts_of_its_exchange() -> None:
    """attach / facts_of: the S4U facts ride on the error to the trace; other errors have none."""
    error = RuntimeError("refused")
    facts = S4UFacts(None, None, 1.0, None, failed_step="s4u2self")
    assert facts_of(error) is None
    attach(error, facts)
    assert facts_of(error) is facts
    assert facts.ticket_json("evidence") == {"facts": "not issued"}
