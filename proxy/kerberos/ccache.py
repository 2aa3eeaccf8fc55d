"""What the KDC issued in a delegation: the evidence ticket and the service ticket, read without a key.

Theory of operation. MIT keeps an impersonated credential (`Credentials.impersonate`, S4U2Self) in a
MEMORY credential cache of its own, under a name GSSAPI does not reveal; after S4U2Proxy the same cache
also holds the service ticket. `gss_export_cred` serialises a credential, and for a MEMORY cache MIT
writes the cache's contents: after the mechanism framing (RFC 2743 style: a 4-byte length and the OID,
a 4-byte length and the token, SPNEGO wrapping krb5) comes MIT's JSON, `["K5C1", [..., [principal,
cred, cred, ...], ...]]`, where each cred is `[client, server, [enctype, key], authtime, starttime,
endtime, renew_till, is_skey, ticket_flags, addresses, ticket, second_ticket, authdata]` (MIT's
`export_cred.c`). From each cred this module keeps the names, the flags, the times, the session key's
*enctype* (never the key) and the clear-text header of the ticket itself (`proxy.kerberos.ticket`:
realm, service, the ticket's enctype and key version). The serialised bytes live only in the function
that reads them; nothing here stores, logs or returns a key or a ticket.

Which ticket is which: the evidence ticket is the one whose client is the user and whose server is the
gateway's own principal; the service ticket's client is the user and its server the SPN (MIT files it
under the referral realm, `HTTP/cas.lab.test@`; the ticket's header says the realm that issued it).
Entries whose server is `krb5_ccache_conf_data/...` are the cache's configuration, not tickets.

Honest limits: this is MIT's serialisation (1.11 on); another GSSAPI (Heimdal) or a credential that is
not in a MEMORY cache gives no facts, and the caller says so (`unavailable`) rather than guessing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.kerberos.pac import PacFacts
from proxy.kerberos.ticket import ticket_fields

# RFC 4120 5.3 TicketFlags, as MIT's krb5_flags hold them (bit 0 is the most significant).
TICKET_FLAGS = (
    (0x40000000, "forwardable"),
    (0x20000000, "forwarded"),
    (0x10000000, "proxiable"),
    (0x08000000, "proxy"),
    (0x04000000, "may-postdate"),
    (0x02000000, "postdated"),
    (0x01000000, "invalid"),
    (0x00800000, "renewable"),
    (0x00400000, "initial"),
    (0x00200000, "pre-authent"),
    (0x00100000, "hw-authent"),
    (0x00080000, "transited-policy-checked"),
    (0x00040000, "ok-as-delegate"),
    (0x00010000, "enc-pa-rep"),
    (0x00008000, "anonymous"),
)
FORWARDABLE = 0x40000000

# RFC 3961/3962/8009/4757 encryption type numbers.
ENCTYPES = {
    1: "des-cbc-crc",
    3: "des-cbc-md5",
    16: "des3-cbc-sha1",
    17: "aes128-cts-hmac-sha1-96",
    18: "aes256-cts-hmac-sha1-96",
    19: "aes128-cts-hmac-sha256-128",
    20: "aes256-cts-hmac-sha384-192",
    23: "rc4-hmac",
    24: "rc4-hmac-exp",
    25: "camellia128-cts-cmac",
    26: "camellia256-cts-cmac",
}
_KRB5_OID = bytes.fromhex("2a864886f712010202")
_CONFIG_SERVER = "krb5_ccache_conf_data/"


def enctype_name(etype: int | None) -> str | None:
    return None if etype is None else ENCTYPES.get(etype, f"enctype {etype}")


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in TICKET_FLAGS if flags & bit]


@dataclass(frozen=True)
class TicketFacts:
    """One ticket in a credential cache, as far as it can be read without a key."""

    client: str
    server: str  # as the cache files it; a service ticket may carry an empty (referral) realm
    flags: int
    session_enctype: int  # the session key's type (the key itself is never read out)
    authtime: datetime
    starttime: datetime
    endtime: datetime
    renew_till: datetime | None
    realm: str | None = None  # from the ticket's clear-text header: the realm that issued it
    sname: str | None = None  # the service the ticket is for, from the same header
    ticket_enctype: int | None = None  # what the ticket is encrypted with: the service's long-term key type
    kvno: int | None = None  # that key's version

    @property
    def forwardable(self) -> bool:
        return bool(self.flags & FORWARDABLE)

    @property
    def service(self) -> str:
        """The service principal with its realm: from the ticket's header when it could be read."""
        if self.sname and self.realm:
            return f"{self.sname}@{self.realm}"
        return self.server

    def to_json(self) -> dict[str, Any]:
        """The facts a trace shows: names, flags (forwardable named), enctypes, times. No key, no ticket."""
        return {
            "client": self.client,
            "server": self.service,
            "forwardable": self.forwardable,
            "flags": flag_names(self.flags),
            "flags_hex": f"0x{self.flags:08x}",
            "enctype": enctype_name(self.ticket_enctype if self.ticket_enctype is not None else self.session_enctype),
            "session_enctype": enctype_name(self.session_enctype),
            "kvno": self.kvno,
            "authtime": _iso(self.authtime),
            "start": _iso(self.starttime),
            "end": _iso(self.endtime),
            "renew_till": _iso(self.renew_till) if self.renew_till else None,
        }


@dataclass(frozen=True)
class S4UFacts:
    """What one S4U2Self + S4U2Proxy exchange produced, and how long each half took."""

    evidence: TicketFacts | None  # the S4U2Self ticket: the user, to the gateway itself
    service: TicketFacts | None  # the S4U2Proxy ticket: the user, to the backend's SPN
    s4u2self_ms: float
    s4u2proxy_ms: float | None  # None when S4U2Proxy did not complete
    failed_step: str | None = None  # "s4u2self" or "s4u2proxy" when the KDC (or the library) said no
    unavailable: str | None = None  # why the ticket facts could not be read, when they could not
    evidence_pac: PacFacts | None = None  # the evidence ticket's PAC, read with the gateway's own key
    gateway_tgt_ms: float | None = None  # the gateway's own AS exchange (its TGT), when this exchange needed one

    def ticket_json(self, which: str) -> dict[str, Any]:
        """`evidence` or `service` as trace details; says why when the facts are missing. The evidence
        ticket's facts include its PAC (size, buffers, UPN, SID) or "none" (an MIT KDC may issue none)."""
        ticket = self.evidence if which == "evidence" else self.service
        if ticket is None:
            return {"facts": self.unavailable or "not issued"}
        facts = ticket.to_json()
        if which == "evidence":
            facts["pac"] = self.evidence_pac.to_json() if self.evidence_pac else "none"
        return facts


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _time(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


def _mech_tokens(blob: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (OID, token) elements of an exported credential; SPNEGO's token holds its mechanism's."""
    pos = 0
    while pos + 4 <= len(blob):
        n = int.from_bytes(blob[pos : pos + 4], "big")
        oid = blob[pos + 4 : pos + 4 + n]
        pos += 4 + n
        if pos + 4 > len(blob):
            raise ValueError("truncated exported credential")
        m = int.from_bytes(blob[pos : pos + 4], "big")
        token = blob[pos + 4 : pos + 4 + m]
        if len(oid) != n or len(token) != m:
            raise ValueError("truncated exported credential")
        pos += 4 + m
        yield oid, token


def _krb5_json(blob: bytes) -> Any:
    for oid, token in _mech_tokens(blob):
        if oid == _KRB5_OID:
            if not token.startswith(b'["K5C1"'):
                raise ValueError("not MIT's krb5 credential serialisation (K5C1)")
            return json.loads(token)
        if token[:4] != b'["K5':  # a wrapper mechanism (SPNEGO): its token is a list of the same shape
            found = _krb5_json(token)
            if found is not None:
                return found
    return None


def _is_cred(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 11
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and isinstance(value[2], list)
        and len(value[2]) == 2
        and all(isinstance(v, int) for v in (value[3], value[4], value[5], value[6], value[8]))
    )


def _creds(value: Any) -> Iterator[list[Any]]:
    """Every credential entry in the JSON, wherever the cache contents sit in it."""
    if _is_cred(value):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _creds(item)


def parse_export(blob: bytes) -> list[TicketFacts]:
    """The tickets in an exported MIT credential (configuration entries left out); ValueError if unreadable."""
    try:
        data = _krb5_json(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"the exported credential is not JSON: {e}") from None
    if data is None:
        raise ValueError("no krb5 credential in the exported credential")
    out = []
    for cred in _creds(data):
        client, server, keyblock = cred[0], cred[1], cred[2]
        if server.startswith(_CONFIG_SERVER):
            continue
        header = None
        if isinstance(cred[10], str) and cred[10]:
            try:
                header = ticket_fields(base64.b64decode(cred[10]))
            except ValueError:
                header = None  # the facts from the cache entry still stand
        out.append(
            TicketFacts(
                client=client,
                server=server,
                flags=cred[8],
                session_enctype=int(keyblock[0]),
                authtime=_time(cred[3]),
                starttime=_time(cred[4] or cred[3]),
                endtime=_time(cred[5]),
                renew_till=_time(cred[6]) if cred[6] else None,
                realm=header.realm if header else None,
                sname=header.sname if header else None,
                ticket_enctype=header.etype if header else None,
                kvno=header.kvno if header else None,
            )
        )
    return out


def _principal_name(principal: str) -> str:
    """`HTTP/cas.lab.test@LAB.TEST` and `HTTP/cas.lab.test@` -> `HTTP/cas.lab.test`."""
    return principal.rpartition("@")[0] if "@" in principal else principal


def pick(tickets: list[TicketFacts], *, proxy: str, spn: str | None) -> tuple[TicketFacts | None, TicketFacts | None]:
    """(evidence ticket, service ticket) among an impersonated credential's `tickets`.

    The evidence ticket is for the gateway's own principal `proxy` in another client's name (the
    gateway's own tickets to itself have `proxy` as client); the service ticket is for `spn`."""
    evidence = service = None
    own = _principal_name(proxy)
    for t in tickets:
        server = _principal_name(t.server)
        if (server == own or t.sname == own) and _principal_name(t.client) != own:
            evidence = t
        elif spn is not None and (server == spn or t.sname == spn):
            service = t
    return evidence, service


_FACTS_ATTRIBUTE = "kcd_s4u_facts"


def attach(error: BaseException, facts: S4UFacts) -> None:
    """Let a refusal carry what its exchange produced before it failed (for the trace)."""
    setattr(error, _FACTS_ATTRIBUTE, facts)


def facts_of(error: BaseException) -> S4UFacts | None:
    """What `attach` put on `error`, if anything."""
    found = getattr(error, _FACTS_ATTRIBUTE, None)
    return found if isinstance(found, S4UFacts) else None


def read_tickets(creds: Any) -> list[TicketFacts]:
    """The tickets an (impersonated) GSSAPI credential holds; ValueError when they cannot be read."""
    import gssapi.raw

    try:
        blob = gssapi.raw.export_cred(creds)
    except (gssapi.raw.GSSError, NotImplementedError, AttributeError) as e:
        raise ValueError(f"the credential cannot be exported: {e}") from None
    return parse_export(blob)


def s4u_facts(
    creds: Any,
    *,
    proxy: str,
    spn: str,
    s4u2self_ms: float,
    s4u2proxy_ms: float | None,
    failed_step: str | None = None,
    evidence_pac: PacFacts | None = None,
    gateway_tgt_ms: float | None = None,
) -> S4UFacts:
    """The facts of one exchange from its impersonated credential (`creds`; None when S4U2Self failed);
    `gateway_tgt_ms`, when the exchange began with the gateway's own AS exchange, how long that took."""
    evidence = service = None
    unavailable = None
    if creds is not None:
        try:
            evidence, service = pick(read_tickets(creds), proxy=proxy, spn=spn)
        except ValueError as e:
            unavailable = str(e)
        else:
            if evidence is None and service is None:
                unavailable = "the credential shows no ticket (not an MIT MEMORY credential cache?)"
    return S4UFacts(
        evidence, service, s4u2self_ms, s4u2proxy_ms, failed_step, unavailable, evidence_pac, gateway_tgt_ms
    )
