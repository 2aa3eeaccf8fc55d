"""Many first requests at once, against the lab's KDC, and what the backend gets for each.

A recording backend keeps each request's `Authorization: Negotiate`; the test opens each token as the backend
would, with HTTP/cas.lab.test's keytab (MIT's acceptor, no replay cache), and reads who the ticket is for, its
flags and its PAC (MIT's PAC names the client in its client-info buffer, read here from the bytes, not by the
gateway's code), and the ticket's session key (`tests.krb5_keys`): the tokens of one user share one service
ticket, those of two users never do. The KDC's log counts the exchanges per user.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gssapi
import gssapi.raw
import pytest

from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog
from proxy.lab.layout import REALM, LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.integration.recorder import Recorded, Recorder
from tests.integration.test_ticket_cache import _certificate_for
from tests.krb5_keys import token_keys
from tests.negotiate_asn1 import read_negotiate

CROWD = 50
TKT_FLG_FORWARDABLE = 0x40000000  # RFC 4120 TicketFlags bit 1, as MIT's krb5_flags hold it
PAC_CLIENT_INFO = 10  # MS-PAC 2.4 ulType


@pytest.fixture(scope="module")
def recorded(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Recorder]]:
    """The lab's gateway with a route /rec/ to a recording backend (HTTP/cas.lab.test's SPN)."""
    recorder = Recorder()
    text = lab_config(lab, port=free_port())
    text += f'\n[[routes]]\nprefix = "/rec/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("delegation-crowd"), text)
    try:
        yield gw, recorder
    finally:
        gw.stop()
        recorder.close()


def new_users(lab: LabLayout, names: list[str]) -> list[str]:
    """`names` made principals of the lab realm (one kadmin.local reading its queries from stdin); returns them."""
    queries = "".join(f"addprinc -randkey {name}\n" for name in names)
    done = subprocess.run(
        ["kadmin.local"], input=queries, capture_output=True, text=True, env={**os.environ, **lab.env()}, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "rror" in line] == [], done.stderr
    return names


def tls_context(lab: LabLayout, user: str, directory: Path) -> ssl.SSLContext:
    """A TLS client context presenting a certificate from the lab's issuing CA with the UPN `user`@lab.test."""
    cert_path, key_path = _certificate_for(lab, user, directory)
    ctx = ssl.create_default_context(cafile=str(lab.pki_dir / "root.pem"))
    ctx.check_hostname = False
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


async def _get(gw: Gateway, ctx: ssl.SSLContext, path: str) -> bytes:
    """One request on a connection of its own; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    return answer


def _crowd(gw: Gateway, requests: list[tuple[ssl.SSLContext, str]]) -> list[bytes]:
    """Every request sent at once, each on a connection of its own, within 120 s in all."""

    async def run() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(_get(gw, ctx, path) for ctx, path in requests)), 120)

    return asyncio.run(run())


@dataclass(frozen=True)
class Seen:
    """What the backend's acceptor reads in one forwarded token."""

    client: str  # the ticket's client principal
    flags: int  # the ticket's flags
    pac_client: str | None  # the name in the PAC's client-info buffer
    session_key: bytes  # the service ticket's session key


def _pac_client(pac: bytes) -> str | None:
    """The client-info buffer's name (MS-PAC 2.7: ClientId, NameLength, Name in UTF-16LE), if the PAC has one."""
    count = int.from_bytes(pac[0:4], "little")
    for i in range(count):
        entry = pac[8 + 16 * i : 8 + 16 * (i + 1)]
        kind, size, offset = (int.from_bytes(entry[a:b], "little") for a, b in ((0, 4), (4, 8), (8, 16)))
        if kind == PAC_CLIENT_INFO:
            info = pac[offset : offset + size]
            length = int.from_bytes(info[8:10], "little")
            return info[10 : 10 + length].decode("utf-16-le")
    return None


def session_keys(lab: LabLayout, taken: list[Recorded]) -> dict[str, set[bytes]]:
    """Each user's service-ticket session keys, read from the Negotiate token of every request the recording backend
    took (`/rec/<user>/...`): each ticket checked to name that user (client and PAC) and to be forwardable."""
    keys: dict[str, set[bytes]] = {}
    for request in taken:
        user = request.path.split("/")[2]
        (header,) = request.headers("Authorization")
        seen = _seen(lab, header)
        assert (seen.client, seen.pac_client) == (f"{user}@{REALM}", user), (request.path, seen)
        assert seen.flags & TKT_FLG_FORWARDABLE, (request.path, hex(seen.flags))
        keys.setdefault(user, set()).add(seen.session_key)
    return keys


def _seen(lab: LabLayout, header: str) -> Seen:
    scheme, _, value = header.partition(" ")
    assert scheme == "Negotiate"
    mech_token = read_negotiate(base64.b64decode(value, validate=True)).mech_token
    creds = gssapi.Credentials(usage="accept", store={"keytab": str(lab.backend_keytab), "rcache": "none:"})
    accepted = gssapi.raw.accept_sec_context(mech_token, acceptor_creds=creds)
    flags = int(gssapi.raw.krb5_get_tkt_flags(accepted.context))
    initiator = gssapi.raw.inquire_context(accepted.context, initiator_name=True).initiator_name
    assert initiator is not None
    pac = gssapi.raw.get_name_attribute(initiator, b"urn:mspac:").values
    assert pac, "the service ticket carries no PAC"
    client = str(gssapi.Name(base=initiator))
    return Seen(client, flags, _pac_client(bytes(pac[0])), token_keys(mech_token, lab.backend_keytab).session_key)


def test_fifty_new_users_at_once_each_reach_the_backend_as_themselves(
    lab: LabLayout, recorded: tuple[Gateway, Recorder], tmp_path: Path
) -> None:
    """50 users the gateway never saw, one request each, all at once, and 50 connections of one more new user at once:
    every request is 200, and the ticket in each forwarded token is for the user of that request (client principal,
    PAC client-info, forwardable), the new user's 50 tokens on one service ticket, no two users on one; the KDC
    logged exactly one S4U2Self and one S4U2Proxy per user (single flight: 51 pairs, not 100)."""
    gw, recorder = recorded
    names = new_users(lab, [f"cr{uuid.uuid4().hex[:10]}" for _ in range(CROWD + 1)])
    many, one = names[:CROWD], names[CROWD]
    contexts = {name: tls_context(lab, name, tmp_path) for name in names}
    recorder.taken()
    kdc = KdcLog(lab.kdc_log)
    requests = [(contexts[name], f"/rec/{name}/0") for name in many]
    requests += [(contexts[one], f"/rec/{one}/{i}") for i in range(CROWD)]
    answers = _crowd(gw, requests)

    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * len(requests), answers
    taken = recorder.taken()
    assert sorted(r.path for r in taken) == sorted(path for _, path in requests)
    keys = session_keys(lab, taken)
    assert all(len(found) == 1 for found in keys.values()), {u: len(k) for u, k in keys.items() if len(k) != 1}
    assert len({key for found in keys.values() for key in found}) == CROWD + 1  # no two users share a ticket

    mine = {f"{name}@{REALM}" for name in names}  # another module's gateway, if one still runs, is not counted
    exchanges = Counter((r.extension, r.user) for r in kdc.settled() if r.extension and r.user in mine)
    wanted = Counter({(step, f"{name}@{REALM}"): 1 for name in names for step in (S4U2SELF, S4U2PROXY)})
    assert exchanges == wanted, exchanges
