"""The Negotiate token the gateway sends on a `backend_binding = "request"` route, as a backend gets it.

A recording backend keeps the exact bytes; pyasn1 reads them with RFC 4178's and RFC 4120's ASN.1
(`tests.negotiate_asn1`, not the gateway's encoder), and MIT's acceptor, holding the backend's keytab and a replay
cache, decides. The gateway builds the krb5 token itself and wraps it in SPNEGO (`proxy.kerberos.spnego`): these
tests pin that what goes out is what MIT's own SPNEGO initiator sends (same framing, same mechanisms offered, same
AP options and context flags), and that every request carries an authenticator of its own.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import gssapi
import gssapi.raw
import pytest
from gssapi.raw.named_tuples import AcceptSecContextResult

from proxy.kerberos.password import TOKEN_FLAGS
from proxy.kerberos.spnego import neg_token_init
from proxy.lab.layout import PROXY_SERVICE, LabLayout
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.recorder import Recorder
from tests.negotiate_asn1 import KRB5, read_negotiate

SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")


@pytest.fixture(scope="module")
def recorded(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Recorder]]:
    recorder = Recorder()
    text = lab_config(lab, port=free_port())
    text += f'\n[[routes]]\nprefix = "/rec/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("negotiate-token"), text)
    try:
        yield gw, recorder
    finally:
        gw.stop()
        recorder.close()


def _tokens(gw: Gateway, recorder: Recorder, lab: LabLayout, n: int) -> list[bytes]:
    """alice's `n` requests through the gateway (one curl, one keep-alive connection), and the token of each."""
    recorder.taken()
    urls = [f"{gw.url}/rec/{i}" for i in range(n)]
    result = curl(lab, urls[0], "alice", *urls[1:])
    assert result.stdout.endswith("200"), result.stdout + result.stderr
    tokens = []
    for request in sorted(recorder.taken(), key=lambda r: r.path):
        (header,) = request.headers("Authorization")
        scheme, _, value = header.partition(" ")
        assert scheme == "Negotiate"
        tokens.append(base64.b64decode(value, validate=True))
    assert len(tokens) == n
    return tokens


def _accept(keytab: Path, token: bytes, rcache: Path | None = None) -> AcceptSecContextResult:
    store: dict[bytes | str, bytes | str] = {"keytab": str(keytab), "rcache": f"file2:{rcache}" if rcache else "none:"}
    creds = gssapi.Credentials(usage="accept", store=store)
    return gssapi.raw.accept_sec_context(token, acceptor_creds=creds)


def _who(accepted: AcceptSecContextResult) -> str:
    return str(gssapi.Name(base=accepted.initiator_name))


def _flags(accepted: AcceptSecContextResult) -> set[gssapi.RequirementFlag]:
    """The context flags the initiator asked for, as the acceptor read them (a flag set, typed as one flag)."""
    return set(cast("Iterable[gssapi.RequirementFlag]", accepted.flags))


def _mit_spnego_token(lab: LabLayout, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """The token MIT's SPNEGO initiator makes for alice at HTTP@cas.lab.test, as the gateway made it before. MIT reads
    KRB5_CONFIG when it makes a library context: a test run before in this process (a Delegator's overlay, another
    realm) may have pointed it elsewhere."""
    monkeypatch.setenv("KRB5_CONFIG", str(lab.krb5_conf))
    keytab = str(lab.proxy_keytab)
    service = gssapi.Credentials(
        name=gssapi.Name(f"{PROXY_SERVICE}@LAB.TEST", gssapi.NameType.kerberos_principal),
        usage="both",
        store={"client_keytab": keytab, "keytab": keytab, "ccache": f"MEMORY:test-{uuid.uuid4().hex}"},
    )
    alice = gssapi.Name("alice@LAB.TEST", gssapi.NameType.kerberos_principal)
    creds = service.impersonate(alice, usage="initiate", mechs=(SPNEGO,))
    target = gssapi.Name("HTTP@cas.lab.test", gssapi.NameType.hostbased_service)
    token = gssapi.raw.init_sec_context(target, creds=creds, mech=SPNEGO, flags=TOKEN_FLAGS).token
    assert token
    return token


def test_the_token_is_a_negtokeninit_offering_krb5_with_an_ap_req_for_the_routes_spn(
    recorded: tuple[Gateway, Recorder], lab: LabLayout
) -> None:
    """Strict DER end to end: the SPNEGO OID, a NegTokenInit with mechTypes [krb5] and the mechToken only (no
    reqFlags, no mechListMIC), the mechToken a krb5 AP-REQ on a ticket for HTTP/cas.lab.test@LAB.TEST, without
    mutual authentication asked (AP options all clear); MIT's acceptor takes it as alice's."""
    gw, recorder = recorded
    (token,) = _tokens(gw, recorder, lab, 1)
    read = read_negotiate(token)
    assert read.fields == ("mechTypes", "mechToken")
    assert read.mech_types == (KRB5,)
    assert (read.ap_req.realm, read.ap_req.sname) == ("LAB.TEST", ("HTTP", "cas.lab.test"))
    assert read.ap_req.ap_options == "0" * 32
    accepted = _accept(lab.backend_keytab, token)
    assert not accepted.more_steps
    assert _who(accepted) == "alice@LAB.TEST"


def test_the_token_is_what_mits_spnego_initiator_sends(
    recorded: tuple[Gateway, Recorder], lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MIT's SPNEGO token re-wrapped by the gateway's encoder is byte for byte MIT's (the framing is the same), and
    the gateway's token asks for the same AP options and context flags (out-of-sequence detection, no mutual
    authentication, no delegation) as MIT's SPNEGO made with the same `TOKEN_FLAGS`."""
    gw, recorder = recorded
    (ours,) = _tokens(gw, recorder, lab, 1)
    mit = _mit_spnego_token(lab, monkeypatch)
    mit_read, our_read = read_negotiate(mit), read_negotiate(ours)
    assert neg_token_init(mit_read.mech_token) == mit
    assert (our_read.fields, our_read.mech_types) == (mit_read.fields, mit_read.mech_types)
    assert our_read.ap_req.ap_options == mit_read.ap_req.ap_options
    our_flags = _flags(_accept(lab.backend_keytab, ours))
    mit_flags = _flags(_accept(lab.backend_keytab, mit))
    assert our_flags == mit_flags
    assert gssapi.RequirementFlag.mutual_authentication not in our_flags
    assert gssapi.RequirementFlag.delegate_to_peer not in our_flags


def test_each_request_carries_a_fresh_authenticator_on_the_same_ticket(
    recorded: tuple[Gateway, Recorder], lab: LabLayout, tmp_path: Path
) -> None:
    """Three requests: one cached ticket, three different authenticators, each accepted once by an acceptor with a
    replay cache, and the first refused when it comes again (so the cache was live: the tokens are not replays)."""
    gw, recorder = recorded
    tokens = _tokens(gw, recorder, lab, 3)
    reads = [read_negotiate(t).ap_req for t in tokens]
    assert len({r.ticket for r in reads}) == 1  # the cached service ticket, no new exchange
    assert len({r.authenticator for r in reads}) == 3
    rcache = tmp_path / "cas.rcache2"
    for token in tokens:
        assert _who(_accept(lab.backend_keytab, token, rcache)) == "alice@LAB.TEST"
    with pytest.raises(gssapi.raw.GSSError, match=r"(?i)replay"):
        _accept(lab.backend_keytab, tokens[0], rcache)
