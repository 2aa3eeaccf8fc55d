"""The directory client's pure parts: the LDAP filter a name becomes (RFC 4515 escaping), the realm of base_dn, the
cache's key."""

from __future__ import annotations

import asyncio
import struct
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.config import Directory as DirectorySettings
from proxy.config import Kerberos
from proxy.directory import (
    ATTRIBUTES,
    FAILED_SERVER_SECONDS,
    Ace,
    Directory,
    ResourceBased,
    _account,
    _domain,
    _escape,
    _filter,
    acting_for_others,
)
from proxy.errors import DirectoryUnavailable, MappingRefused
from proxy.identity import altsecid
from proxy.identity.mapping import Account
from proxy.identity.sid import Sid


def test_filter_by_upn_and_by_the_domains_own_names() -> None:
    """A UPN in the domain's DNS name is looked up by UPN or sAMAccountName; another suffix by UPN only."""
    assert _filter("alice@ad.test", "DC=ad,DC=test") == (
        "(&(objectCategory=person)(objectClass=user)(|(userPrincipalName=alice@ad.test)(sAMAccountName=alice)))"
    )
    assert _filter("carol@corp.example", "DC=ad,DC=test") == (
        "(&(objectCategory=person)(objectClass=user)(|(userPrincipalName=carol@corp.example)))"
    )
    assert _filter("frank", "DC=ad,DC=test").endswith("(|(sAMAccountName=frank)))")


def test_a_crafted_name_cannot_widen_the_filter() -> None:
    """`*`, parentheses, backslash and NUL in a name are escaped as \\xx: `a*)(objectClass=*` matches nothing else."""
    crafted = _filter("a*)(objectClass=*@ad.test", "DC=ad,DC=test")
    assert crafted.count("(") == crafted.count(")") == 6  # the filter's own six pairs, no more
    assert "*" not in crafted
    assert _escape("x\\y\x00z(") == "x\\5cy\\00z\\28"


def test_realm_of_base_dn() -> None:
    """The DC= parts of base_dn, in order, are the domain; other parts are skipped."""
    assert _domain("OU=Staff,DC=corp,DC=example,DC=com") == "corp.example.com"


def test_the_cache_joins_names_only_by_ascii_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """STRASSE and strasse are one cached look-up; straße is asked of the directory itself, never served
    strasse's account from the cache (Unicode case folding would make them one key)."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    asked: list[str] = []

    class Recording(Directory):
        async def search(self, name: str) -> Account | None:
            asked.append(name)
            return None

    settings = DirectorySettings(urls=("ldap://dc.ad.test",), base_dn="DC=ad,DC=test")
    directory = Recording(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab")))

    async def run() -> None:
        for name in ("strasse@ad.test", "STRASSE@ad.test", "straße@ad.test"):
            await directory.lookup(name)

    asyncio.run(run())
    assert asked == ["strasse@ad.test", "straße@ad.test"]


def test_a_fresh_look_up_asks_the_directory_and_keeps_its_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lookup(fresh=True)` (the held requests' sweep) searches although the cache holds the name, and the cache then
    keeps that newer answer for the look-ups after it."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    asked: list[str] = []

    class Recording(Directory):
        async def search(self, name: str) -> Account | None:
            asked.append(name)
            return None if len(asked) == 1 else _account(_entry())

    settings = DirectorySettings(urls=("ldap://dc.ad.test",), base_dn="DC=ad,DC=test", cache_seconds=300)
    directory = Recording(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab")))

    async def run() -> list[Account | None]:
        return [
            await directory.lookup("alice@ad.test"),
            await directory.lookup("alice@ad.test"),  # the cache's
            await directory.lookup("alice@ad.test", fresh=True),  # asked again
            await directory.lookup("alice@ad.test"),  # the fresh answer, from the cache
        ]

    found = asyncio.run(run())
    assert asked == ["alice@ad.test", "alice@ad.test"]
    assert found[:2] == [None, None]
    assert found[2] is not None
    assert found[3] == found[2]


class _Entry(dict[str, list[object]]):
    """What bonsai hands over for one account: attribute -> values, and a dn."""

    dn = "CN=alice,CN=Users,DC=ad,DC=test"


def _entry(**attrs: object) -> _Entry:
    sid = bytes.fromhex("010500000000000515000000") + bytes(12) + (1105).to_bytes(4, "little")
    entry = _Entry(objectSid=[sid], sAMAccountName=["alice"])
    entry.update({name.replace("_", "-"): [value] for name, value in attrs.items()})
    return entry


def test_when_created_is_read_as_utc_and_absent_is_none() -> None:
    """whenCreated as AD writes it (GeneralizedTime, `.0Z`) becomes a UTC datetime; without it, None."""
    assert _account(_entry(whenCreated="20261205043959.0Z")).when_created == datetime(
        2026, 12, 5, 4, 39, 59, tzinfo=UTC
    )
    assert _account(_entry(whenCreated=b"20261205043959Z")).when_created == datetime(2026, 12, 5, 4, 39, 59, tzinfo=UTC)
    assert _account(_entry()).when_created is None


@pytest.mark.parametrize("value", ["20261205043959.0", "20261305043959.0Z", "2026-12-05", "20261205043959+0100"])
def test_an_unreadable_when_created_is_a_refusal_not_a_guess(value: str) -> None:
    """A whenCreated without Z, with a 13th month, in another format or another zone: MappingRefused naming it."""
    with pytest.raises(MappingRefused, match="whenCreated cannot be read"):
        _account(_entry(whenCreated=value))


def test_a_failed_server_is_tried_last_for_a_while_then_first_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """dc1 fails: for FAILED_SERVER_SECONDS look-ups ask dc2 first (dc1 still after it, so a lone server is still
    asked), then dc1 first again; both failed lately: their own order; a server that answers is forgotten."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    now = [1000.0]
    down = {"ldap://dc1.ad.test"}
    asked: list[str] = []

    class Servers(Directory):
        async def _search_locked(
            self, url: str, filter_exp: str, base: str | None, attributes: list[str], root: str | None = None
        ) -> list[object]:
            asked.append(url)
            if url in down:
                raise TimeoutError
            return []

    settings = DirectorySettings(urls=("ldap://dc1.ad.test", "ldap://dc2.ad.test"), base_dn="DC=ad,DC=test")
    directory = Servers(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab")), clock=lambda: now[0])

    def look_up() -> list[str]:
        asked.clear()
        asyncio.run(directory.search("alice@ad.test"))
        return [url.removeprefix("ldap://").removesuffix(".ad.test") for url in asked]

    assert look_up() == ["dc1", "dc2"]
    now[0] += FAILED_SERVER_SECONDS - 1
    assert look_up() == ["dc2"]
    now[0] += 1
    assert look_up() == ["dc1", "dc2"]  # FAILED_SERVER_SECONDS later dc1 is asked first again (and fails again)
    down.add("ldap://dc2.ad.test")
    with pytest.raises(DirectoryUnavailable):
        look_up()
    assert asked == ["ldap://dc2.ad.test", "ldap://dc1.ad.test"]  # dc2 had not failed lately, dc1 had
    down.clear()
    assert look_up() == ["dc1"]  # both failed lately: in their own order; dc1 answers and is forgotten as failed
    assert look_up() == ["dc1"]


def test_a_name_two_accounts_answer_to_is_refused_never_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two entries for one name (a UPN on one account, the same name as another's implicit UPN: Windows allows
    it across domains and in replication conflicts; Samba 4.17 refuses to write it): 403, naming both DNs."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    first, second = _entry(), _entry()
    second.dn = "CN=alice2,CN=Users,DC=ad,DC=test"  # an instance's dn, as bonsai has

    class Two(Directory):
        async def _search_at(
            self,
            url: str,
            filter_exp: str,
            base: str | None = None,
            attributes: list[str] = ATTRIBUTES,
            *,
            root: str | None = None,
        ) -> list[object]:
            return [first, second]

    settings = DirectorySettings(urls=("ldap://dc.ad.test",), base_dn="DC=ad,DC=test")
    directory = Two(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab")))
    with pytest.raises(MappingRefused) as refused:
        asyncio.run(directory.account("alice@ad.test"))
    assert refused.value.reason == "the name matches several accounts in the directory"
    hint = refused.value.hint or ""
    assert "CN=alice,CN=Users" in hint
    assert "CN=alice2,CN=Users" in hint


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("objectSid", bytes.fromhex("0105000000000005150000")),  # cut short
        ("objectSid", bytes.fromhex("0201000000000005") + bytes(4)),  # revision 2
        ("userAccountControl", "512x"),
        ("accountExpires", b"never"),
    ],
)
def test_an_unreadable_account_attribute_is_a_refusal_not_a_500(field: str, value: object) -> None:
    """An objectSid of the wrong length or revision, a userAccountControl or accountExpires that is not a number:
    the directory's answer cannot be decided on, so MappingRefused naming the attribute (a 403 with the reason),
    not a ValueError out of the mapping stage (a 500)."""
    entry = _entry()
    entry[field] = [value]
    with pytest.raises(MappingRefused, match=f"{field} cannot be read"):
        _account(entry)


def test_an_alt_security_identity_that_is_not_utf8_never_matches_and_is_no_500() -> None:
    """altSecurityIdentities bytes that are not UTF-8: read with U+FFFD, an entry of no kind, not a decoding error."""
    entry = _entry()
    entry["altSecurityIdentities"] = [b"X509:<SKI>9c1f\xff"]
    (raw,) = _account(entry).alt_security_identities
    assert altsecid.parse(raw).kind == "unknown"


def test_a_sids_owner_is_searched_in_the_whole_domain_and_never_the_names_own_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`sid_owner`: the binary SID, every byte escaped (RFC 4515), under the domain's DN even with a narrower base_dn;
    the account the name names and a trusted domain's foreignSecurityPrincipal are left out by the filter; the
    answer is cached under a key no name can have, so a name's look-up is never answered by it."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    asked: list[tuple[str, str | None]] = []

    class Recorded(Directory):
        async def _search_at(
            self,
            url: str,
            filter_exp: str,
            base: str | None = None,
            attributes: list[str] = ATTRIBUTES,
            *,
            root: str | None = None,
        ) -> list[object]:
            asked.append((filter_exp, root))
            return [_entry()]

    settings = DirectorySettings(urls=("ldap://dc.ad.test",), base_dn="CN=Users,DC=ad,DC=test", cache_seconds=60)
    directory = Recorded(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab")))
    sid = Sid.parse("S-1-5-21-1-2-3-1104")
    owner = asyncio.run(directory.sid_owner(sid, "ws01$@ad.test"))
    assert owner is not None
    assert owner.dn == "CN=alice,CN=Users,DC=ad,DC=test"
    escaped = "".join(f"\\{b:02x}" for b in sid.to_bytes())
    assert asked == [
        (
            f"(&(objectSid={escaped})(!(objectClass=foreignSecurityPrincipal))"
            "(!(|(userPrincipalName=ws01$@ad.test)(sAMAccountName=ws01$))))",
            "DC=ad,DC=test",
        )
    ]
    asyncio.run(directory.sid_owner(sid, "WS01$@ad.test"))  # the cache's answer: no second search
    assert len(asked) == 1
    assert directory.cached("ws01$@ad.test") is None  # a name's key is not the SID's


def _descriptor(*aces: tuple[int, int, Sid], mask: int = 0x000F01FF) -> bytes:
    """A self-relative security descriptor whose DACL holds `aces`, each (type, flags, trustee), with access `mask`
    (default full control)."""
    body = b""
    for kind, flags, sid in aces:
        ace = struct.pack("<I", mask) + sid.to_bytes()
        body += struct.pack("<BBH", kind, flags, 4 + len(ace)) + ace
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    owner = Sid(5, (32, 544)).to_bytes()
    return struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 20 + len(owner)) + owner + acl


def test_inherit_only_entries_of_a_resource_based_delegation_apply_to_nobody() -> None:
    """msDS-AllowedToActOnBehalfOfOtherIdentity's DACL: allow and deny entries are read by SID, in order, but one marked
    INHERIT_ONLY_ACE (for objects below, skipped by the access check on the account itself) allows or denies nobody."""
    gateway, group, other = (Sid(5, (21, 1, 2, 3, rid)) for rid in (1105, 1106, 1107))
    entries = acting_for_others(
        _descriptor((0, 0x08 | 0x02, gateway), (1, 0x08, group), (0, 0, other), (1, 0x02, group), (0, 0x02, gateway))
    )
    assert entries == (Ace(True, other), Ace(False, group), Ace(True, gateway))  # the last is container-inherit only
    assert acting_for_others(_descriptor((0, 0x08, gateway), (1, 0x0A, other))) == ()


def test_resource_based_delegation_is_judged_as_the_kdcs_access_check() -> None:
    """The KDC's access check on msDS-AllowedToActOnBehalfOfOtherIdentity: the first entry naming a SID of the
    gateway's token decides (an allow before a deny grants); the token holds Everyone and Authenticated Users; an
    entry without CONTROL_ACCESS (0x100) decides nothing."""
    gateway, group = Sid(5, (21, 1, 2, 3, 1105)), Sid(5, (21, 1, 2, 3, 1106))
    everyone, authenticated = Sid(1, (0,)), Sid(5, (11,))

    def judged(raw: bytes) -> bool:
        return (
            ResourceBased("HTTP/cas.ad.test", "CN=cas", acting_for_others(raw))
            .verdict(frozenset({gateway, group}))
            .allows
            is True
        )

    assert judged(_descriptor((0, 0, everyone)))
    assert not judged(_descriptor((1, 0, authenticated), (0, 0, gateway)))
    assert judged(_descriptor((0, 0, group), (1, 0, gateway)))  # out of canonical order: the allow came first
    assert not judged(_descriptor((1, 0, gateway), (0, 0, group)))
    assert not judged(_descriptor((0, 0, gateway), mask=0x00020014))  # read control, list, read property
    assert judged(_descriptor((0, 0, gateway), mask=0x100))
    assert not judged(_descriptor((0, 0, Sid(5, (21, 1, 2, 3, 1107)))))


def test_a_null_dacl_of_a_resource_based_delegation_allows_every_account() -> None:
    """A descriptor whose DACL is present but NULL (SE_DACL_PRESENT, no list) grants every access to everyone in the
    KDC's access check: every account may act for users; one without SE_DACL_PRESENT, or with an empty list, none."""
    gateway = Sid(5, (21, 1, 2, 3, 1105))
    owner = Sid(5, (32, 544)).to_bytes()

    def judged(control: int, dacl: bytes = b"") -> bool:
        at = 20 + len(owner) if dacl else 0
        raw = struct.pack("<BBHIIII", 1, 0, control, 20, 0, 0, at) + owner + dacl
        return (
            ResourceBased("HTTP/cas.ad.test", "CN=cas", acting_for_others(raw)).verdict(frozenset({gateway})).allows
            is True
        )

    assert judged(0x8004)  # self-relative, DACL present, no list: a NULL DACL
    assert not judged(0x8000)  # no DACL at all
    assert not judged(0x8004, struct.pack("<BBHHH", 2, 0, 8, 0, 0))  # an empty DACL


ASSERTED_IDENTITY, NETWORK, THIS_ORGANIZATION = Sid(18, (1,)), Sid(5, (2,)), Sid(5, (15,))
CLAIMS_VALID, COMPOUNDED = Sid(5, (21, 0, 0, 0, 497)), Sid(5, (21, 0, 0, 0, 496))


def _conditional_descriptor(*aces: tuple[int, Sid]) -> bytes:
    """`_descriptor` with entries of any type, each (type, trustee), with CONTROL_ACCESS; a callback entry (9 allow,
    10 deny) carries a conditional expression ([MS-DTYP] 2.4.4.17: "artx", then a Member_of{SID(...)} token)."""
    body = b""
    for kind, sid in aces:
        condition = b"artx" + b"\x89" if kind in (9, 10) else b""  # "artx" and Member_of with no operand: unreadable
        ace = struct.pack("<I", 0x100) + sid.to_bytes() + condition.ljust((len(condition) + 3) // 4 * 4, b"\0")
        body += struct.pack("<BBH", kind, 0, 4 + len(ace)) + ace
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    owner = Sid(5, (32, 544)).to_bytes()
    return struct.pack("<BBHIIII", 1, 0, 0x8004, 20, 0, 0, 20 + len(owner)) + owner + acl


def _verdict(*aces: tuple[int, Sid]) -> tuple[bool | None, str]:
    gateway = Sid(5, (21, 1, 2, 3, 1105))
    raw = _conditional_descriptor(*aces)
    verdict = ResourceBased("HTTP/cas.ad.test", "CN=cas", acting_for_others(raw)).verdict(frozenset({gateway}))
    return verdict.allows, verdict.doubt


def test_the_asserted_identity_sid_is_in_the_gateways_token() -> None:
    """S-1-18-1, which the KDC puts in the PAC of an account that signed in with its key (the gateway's keytab; seen
    on Samba 4.17), is in the token the KDC's access check reads: an entry denying it refuses the gateway, one
    allowing it grants (before: neither read, the gateway allowed by the entry after the deny)."""
    gateway = Sid(5, (21, 1, 2, 3, 1105))
    assert _verdict((1, ASSERTED_IDENTITY), (0, gateway)) == (False, "")
    assert _verdict((0, ASSERTED_IDENTITY)) == (True, "")


def test_an_entry_for_a_sid_only_some_kdcs_put_in_the_token_leaves_the_verdict_to_the_kdc() -> None:
    """Network, This Organization, Claims Valid and Compounded Authentication are in the token of some KDCs' access
    checks and not others': an entry for one that would decide otherwise than the entries after it leaves the verdict
    to the KDC (None, naming the entry and whose token holds the SID); one that agrees with them changes nothing."""
    gateway = Sid(5, (21, 1, 2, 3, 1105))
    for sid, name in [(NETWORK, "Network"), (CLAIMS_VALID, "Claims Valid"), (COMPOUNDED, "Compounded")]:
        allows, doubt = _verdict((0, sid))
        assert allows is None, sid
        assert doubt.startswith(f"its entry allowing {sid} names {name}"), doubt
    allows, doubt = _verdict((1, THIS_ORGANIZATION), (0, gateway))
    assert allows is None
    assert "This Organization, which Windows adds" in doubt, doubt
    assert _verdict((1, NETWORK), (1, gateway)) == (False, "")
    assert _verdict((0, NETWORK), (0, gateway)) == (True, "")
    assert _verdict((0, gateway), (1, NETWORK)) == (True, "")  # the gateway's own entry comes first: it decides


def test_a_conditional_entry_naming_the_gateway_leaves_the_verdict_to_the_kdc() -> None:
    """A callback (conditional) entry naming a SID of the gateway's token is decided by its condition where the KDC
    evaluates conditions (Windows) and skipped where it does not (Samba's access check before its claims support): the
    verdict is the KDC's when it would say otherwise than the entries after it (before: skipped, the gateway refused
    or allowed as if the entry were not there); one naming another account changes nothing."""
    gateway, other = Sid(5, (21, 1, 2, 3, 1105)), Sid(5, (21, 1, 2, 3, 1107))
    allows, doubt = _verdict((9, gateway))
    assert allows is None
    assert doubt.startswith(f"its entry allowing {gateway} is conditional"), doubt
    assert _verdict((10, gateway), (0, gateway))[0] is None
    assert _verdict((9, other)) == (False, "")
    assert _verdict((10, Sid(1, (0,))), (1, gateway)) == (False, "")  # a conditional deny before a deny: a deny


def test_doctors_bind_check_names_its_own_bound_when_the_kdc_keeps_the_ticket_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`check` (doctor) gives up on a bind's ticket request the KDC keeps waiting at 3 x directory.timeout and says
    so; a second check while that request holds the directory's one KDC thread names that limit, not kdc_timeout."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    answered = threading.Event()
    monkeypatch.setattr("proxy.directory.ldap_ticket", lambda *_: answered.wait(30))  # a KDC that does not answer
    settings = DirectorySettings(urls=("ldap://dc1.ad.test",), base_dn="DC=ad,DC=test", timeout=0.1)
    directory = Directory(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab"), kdc_timeout=60))

    async def twice() -> list[str]:
        hints = []
        for _ in range(2):
            with pytest.raises(DirectoryUnavailable) as refused:
                await directory.check()
            hints.append(refused.value.hint or "")
        return hints

    try:
        first, second = asyncio.run(twice())
    finally:
        answered.set()
    assert "0.3 s (3 x directory.timeout: bind, read, Who am I?) ended the wait" in first
    assert "kerberos.kdc_timeout (60 s) did not end it" in first
    assert "given up at 3 x directory.timeout (0.3 s)" in second
    assert "max_in_flight" not in second


def test_a_look_up_passing_a_server_that_just_failed_for_another_by_a_limit_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two devices' look-ups while the KDC keeps the bind's ticket waiting: the first is given up at 2 x
    directory.timeout; the second, waiting for its turn on that server meanwhile, passes it by. Both are told to try
    again in 30 s and the second's hint names the limit that ended the other's wait: before, the second said "try
    again later" and named no limit, the same outage told two devices two things."""
    for name in ("KRB5_CONFIG", "KRB5CCNAME", "LDAPSASL_NOCANON"):  # Directory() sets them: restored after
        monkeypatch.setenv(name, "")
    answered = threading.Event()
    monkeypatch.setattr("proxy.directory.ldap_ticket", lambda *_: answered.wait(30))  # a KDC that does not answer
    settings = DirectorySettings(urls=("ldap://dc1.ad.test",), base_dn="DC=ad,DC=test", timeout=1)
    directory = Directory(settings, Kerberos("gateway@AD.TEST", Path("/nonexistent.keytab"), kdc_timeout=60))

    async def refused(name: str, after: float) -> DirectoryUnavailable:
        await asyncio.sleep(after)  # the second asks once the first has waited one timeout: its turn comes at 2
        with pytest.raises(DirectoryUnavailable) as e:
            await directory.search(name)
        return e.value

    async def both() -> list[DirectoryUnavailable]:
        return list(await asyncio.gather(refused("alice@ad.test", 0), refused("bob@ad.test", 1.5)))

    try:
        first, second = asyncio.run(both())
    finally:
        answered.set()
    assert "failed for another look-up" in (second.hint or ""), second.hint  # the path this test is about
    for refusal in (first, second):
        assert "did not answer in time; try again in 30 s" in refusal.reason, (refusal.reason, refusal.hint)
    assert "failed for another look-up while this one waited for it: no answer in time: 2 s (2 x directory.timeout" in (
        second.hint or ""
    ), second.hint
