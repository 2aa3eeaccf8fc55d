"""Tokens made by MIT's krb5_mk_req_extended on the held service ticket (`proxy.kerberos.ap_req`), against the lab.

A Delegator in this process does a real S4U2Self + S4U2Proxy with the lab's KDC; its cached ticket then carries the
service ticket as MIT's `krb5_creds`. These tests compare the held path's tokens with those MIT's GSS initiator
makes on the same credential (the delegator's path without the held ticket), read with pyasn1 and judged by MIT's
acceptor with the backend's keytab; and pin the held ticket's lifetime and the fallbacks.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import gssapi
import gssapi.raw
import pytest
import structlog
from gssapi.raw.named_tuples import AcceptSecContextResult

from proxy.errors import GatewayError
from proxy.identity.principal import UserPrincipal
from proxy.kerberos import ap_req
from proxy.kerberos.ap_req import Krb5Error, TicketTokens
from proxy.kerberos.delegate import Delegation, Delegator
from proxy.lab.layout import REALM, LabLayout
from tests.negotiate_asn1 import read_negotiate

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"
ALICE = UserPrincipal(upn="alice@lab.test", principal=f"alice@{REALM}", realm=REALM, source="test")


def _delegation(delegator: Delegator) -> Delegation:
    return asyncio.run(delegator.delegation(ALICE, SPN, TARGET))


def _accept(lab: LabLayout, token: bytes, rcache: Path | None = None) -> AcceptSecContextResult:
    store: dict[bytes | str, bytes | str] = {
        "keytab": str(lab.backend_keytab),
        "rcache": f"file2:{rcache}" if rcache else "none:",
    }
    return gssapi.raw.accept_sec_context(token, acceptor_creds=gssapi.Credentials(usage="accept", store=store))


def _flags(accepted: AcceptSecContextResult) -> set[int]:
    """The context flags the initiator asked for, as the acceptor read them (a flag set, typed as one flag)."""
    return {int(flag) for flag in cast("Iterable[gssapi.RequirementFlag]", accepted.flags)}


def test_the_held_tickets_token_is_what_mits_gss_initiator_makes_on_the_same_credential(
    lab: LabLayout, delegator: Delegator
) -> None:
    """Same framing, same ticket, same AP options (all clear) and the same context flags as the acceptor reads them
    (MIT's GSS initiator on the same credential, as the gateway made tokens before), MIT's acceptor naming alice;
    each token its own authenticator."""
    _delegation(delegator)
    (ticket,) = delegator._tickets.values()
    assert ticket.tokens is not None, "the service ticket was not held (see the krb5_tokens_unavailable event)"
    held = [delegator._token(ticket.creds, TARGET, ticket.tokens) for _ in range(2)]
    mit = delegator._token(ticket.creds, TARGET)
    reads = [read_negotiate(t) for t in (*held, mit)]
    assert {(r.fields, r.mech_types, r.ap_req.ap_options, r.ap_req.ticket) for r in reads} == {
        (reads[-1].fields, reads[-1].mech_types, "0" * 32, reads[-1].ap_req.ticket)
    }
    assert len({r.ap_req.authenticator for r in reads}) == 3
    accepted = [_accept(lab, t) for t in (*held, mit)]
    assert {str(gssapi.Name(base=a.initiator_name)) for a in accepted} == {f"alice@{REALM}"}
    assert _flags(accepted[0]) == _flags(accepted[1]) == _flags(accepted[2])
    assert not any(a.more_steps for a in accepted)


def test_every_held_token_is_fresh_for_a_replay_cache(lab: LabLayout, delegator: Delegator, tmp_path: Path) -> None:
    """Three tokens from the held ticket are each accepted once by an acceptor with a replay cache, and the first is
    refused when it comes again: a fresh authenticator (time, subkey, sequence number) every time."""
    delegation = _delegation(delegator)
    tokens = [delegation.make_token() for _ in range(3)]
    rcache = tmp_path / "cas.rcache2"
    for token in tokens:
        assert str(gssapi.Name(base=_accept(lab, token, rcache).initiator_name)) == f"alice@{REALM}"
    with pytest.raises(gssapi.raw.GSSError, match=r"(?i)replay"):
        _accept(lab, tokens[0], rcache)


def test_the_held_ticket_is_freed_when_the_cache_lets_it_go(delegator: Delegator) -> None:
    """The session key is MIT's to zero (krb5_free_creds) as soon as the cache entry is gone: the held ticket's
    finalizer has run after `clear()`, and not before."""
    _delegation(delegator)
    (ticket,) = delegator._tickets.values()
    assert ticket.tokens is not None
    freed = ticket.tokens.freed  # a weak reference to it
    assert freed.alive
    del ticket
    delegator.clear()
    gc.collect()
    assert not freed.alive


def test_an_expired_held_ticket_is_refused_and_dropped_like_mits(
    delegator: Delegator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held ticket past its end time makes no token: the request gets the gateway's explained error (as MIT's
    GSS initiator refuses an expired ticket) and the entry is dropped, so the next request asks the KDC again."""
    delegation = _delegation(delegator)
    (ticket,) = delegator._tickets.values()
    assert ticket.tokens is not None
    monkeypatch.setattr(ticket.tokens, "_endtime", 1)
    with pytest.raises(GatewayError):
        delegation.make_token()
    assert not delegator._tickets


def test_without_a_held_ticket_python_gssapi_makes_the_token(
    lab: LabLayout, delegator: Delegator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the service ticket cannot be read (here: the read fails), the event says why and MIT's GSS initiator
    makes the tokens as before: the request is served the same."""

    def unreadable(*args: object) -> TicketTokens:
        raise Krb5Error("krb5_get_credentials: Matching credential not found")

    monkeypatch.setattr(ap_req.TicketTokens, "read", unreadable)
    with structlog.testing.capture_logs() as logs:
        delegation = _delegation(delegator)
    assert [e["reason"] for e in logs if e["event"] == "krb5_tokens_unavailable"] == [
        "krb5_get_credentials: Matching credential not found"
    ]
    (ticket,) = delegator._tickets.values()
    assert ticket.tokens is None
    assert str(gssapi.Name(base=_accept(lab, delegation.make_token()).initiator_name)) == f"alice@{REALM}"
