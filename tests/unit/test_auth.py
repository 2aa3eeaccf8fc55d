"""Authentication modes: Basic parsing, the credential cache, throttling, name mapping, KDC answers, modes."""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any

import pytest

from proxy.auth.basic import CredentialCache, PasswordLogin, Throttle, parse_basic
from proxy.auth.modes import _same_user, wants_password
from proxy.auth.shared import SharedTable
from proxy.config import Identity, Route
from proxy.errors import AuthenticationRequired, IdentityRejected, KdcUnavailable, KerberosRefused
from proxy.identity.principal import map_name
from proxy.kerberos.password import UserTicket, refusal

IDENTITY = Identity(
    realm_map={"corp.example": "CORP.EXAMPLE.COM", "corp": "CORP.EXAMPLE.COM"}, default_realm="LAB.TEST"
)


def basic(raw: bytes) -> str:
    return "Basic " + base64.b64encode(raw).decode()


USER = map_name("alice", IDENTITY, source="basic")


def ticket(name: str = "alice@LAB.TEST") -> UserTicket:
    creds: Any = object()  # the cache never looks inside the credentials
    return UserTicket(principal=name, creds=creds)


def test_basic_header_is_parsed_and_the_password_kept_out_of_repr() -> None:
    """user:password decodes (UTF-8, Latin-1 as the fallback); the password may hold colons and stays out of repr."""
    creds = parse_basic(basic("jürgen:pa:ss".encode()))
    assert creds is not None
    assert (creds.username, creds.password) == ("jürgen", b"pa:ss")
    assert "pa:ss" not in repr(creds)
    latin = parse_basic(basic("jürgen:x".encode("latin-1")))
    assert latin is not None
    assert latin.username == "jürgen"


def test_a_latin1_password_goes_to_the_kdc_as_utf8() -> None:
    """A password sent in Latin-1 (not valid UTF-8) is the UTF-8 of the same text, as the KDC derives keys from;
    one sent in UTF-8 is kept byte for byte."""
    latin = parse_basic(basic("jürgen:Pässwört".encode("latin-1")))
    utf8 = parse_basic(basic("jürgen:Pässwört".encode()))
    assert latin is not None
    assert utf8 is not None
    assert latin.password == utf8.password == "Pässwört".encode()
    assert latin.header != utf8.header  # a backend_auth = "basic" route gets the header as the device sent it


def test_a_windows_1252_password_with_bytes_0x80_to_0x9f_goes_to_the_kdc_as_its_text() -> None:
    """An older Windows device (and what browsers call Latin-1: WHATWG's `iso-8859-1` is windows-1252) sends `€`,
    `„` or a right quote as one byte of 0x80-0x9f: read as that character, the password reaches the KDC as the UTF-8 of
    what the user typed. Failed before: Latin-1 read them as C1 control characters nobody types (U+0080...), a wrong
    password counted towards the hold and the directory's lockout. Bytes windows-1252 leaves undefined: Latin-1's."""
    typed = parse_basic(basic("jürgen:€uro„quoted\u2019".encode("cp1252")))
    assert typed is not None
    assert typed.username == "jürgen"
    assert typed.password == "€uro„quoted\u2019".encode()
    undefined = parse_basic(basic(b"j\xfcrgen:\x81\x8d\x8f\x90\x9d\xe9"))
    assert undefined is not None
    assert undefined.password == "\x81\x8d\x8f\x90\x9dé".encode()
    user = parse_basic(basic("Bj€rn:x".encode("cp1252")))
    assert user is not None
    assert user.username == "Bj€rn"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Negotiate YWJj",
        "Basic",
        "Basic !!!",
        basic(b"no-colon"),
        basic(b":password-only"),
        basic(b"alice:"),
        basic(b"alice:secret\x00junk"),
    ],
    ids=["absent", "other-scheme", "empty", "bad-base64", "no-colon", "no-user", "no-password", "nul-in-password"],
)
def test_unusable_authorization_headers_are_no_credentials(header: str | None) -> None:
    """Absent, another scheme or malformed Basic: no credentials, so the client is asked again."""
    assert parse_basic(header) is None


def test_user_names_map_to_principals() -> None:
    """alice, LAB\\alice and alice@lab.test are all users; a UPN suffix or down-level domain goes through realm_map."""
    assert map_name("alice", IDENTITY, source="basic").principal == "alice@LAB.TEST"
    assert map_name("LAB\\alice", IDENTITY, source="basic").principal == "alice@LAB.TEST"
    assert map_name("CORP\\bob", IDENTITY, source="basic").principal == "bob@CORP.EXAMPLE.COM"
    assert map_name("bob@corp.example", IDENTITY, source="basic").principal == "bob@CORP.EXAMPLE.COM"
    mapped = map_name("alice", IDENTITY, source="subject-cn")
    assert (mapped.upn, mapped.realm, mapped.enterprise) == ("alice", "LAB.TEST", None)


def test_enterprise_names_keep_the_upn_for_the_kdc() -> None:
    """With enterprise_names a UPN is kept as the NT-ENTERPRISE name; a bare user name is not one."""
    enterprise = Identity(default_realm="LAB.TEST", enterprise_names=True)
    assert map_name("alice@lab.test", enterprise, source="san-upn").enterprise == "alice@lab.test"
    assert map_name("alice", enterprise, source="basic").enterprise is None


@pytest.mark.parametrize("name", ["krbtgt/LAB.TEST", "\\alice", "al ice", "a@b@c", "HTTP/cas.lab.test@lab.test"])
def test_names_that_would_change_meaning_are_refused(name: str) -> None:
    """Service-like names, an empty domain, whitespace and double '@' never become principals."""
    with pytest.raises(IdentityRejected):
        map_name(name, IDENTITY, source="basic")


def test_clearing_the_cache_drops_every_entry_and_sign_ins_begun_before_but_keeps_known_passwords() -> None:
    """`clear` (a reload) drops every fresh entry, and a sign-in that began before it is not kept when the KDC's
    answer comes after; the password the KDC last accepted stays known (a held user's device passes its hold)."""
    cache = CredentialCache(60, known_for=600)
    good = cache.digest("alice@lab.test", b"alice-Pa55")
    cache.put("alice@lab.test", good, USER, ticket(), now=time.monotonic())
    began = time.monotonic()
    cache.clear()
    assert cache.get("alice@lab.test", good, now=time.monotonic()) is None
    cache.put("alice@lab.test", good, USER, ticket(), now=time.monotonic(), asked=began)
    assert cache.get("alice@lab.test", good, now=time.monotonic()) is None
    assert cache.known("alice@lab.test", time.monotonic(), good)
    cache.put("alice@lab.test", good, USER, ticket(), now=time.monotonic(), asked=time.monotonic())
    assert cache.get("alice@lab.test", good, now=time.monotonic()) is not None


def test_a_cache_entry_ends_before_its_ticket_does() -> None:
    """An entry is served until basic_cache_seconds or until 10 s before its TGT ends, whichever comes first; a
    TGT with less than that left is not kept at all."""
    cache = CredentialCache(60)
    good = cache.digest("alice@lab.test", b"alice-Pa55")
    cache.put("alice@lab.test", good, USER, dataclasses.replace(ticket(), lifetime=30), now=100)
    assert cache.get("alice@lab.test", good, now=119) is not None
    assert cache.get("alice@lab.test", good, now=120) is None
    cache.put("alice@lab.test", good, USER, dataclasses.replace(ticket(), lifetime=10), now=200)
    assert cache.get("alice@lab.test", good, now=200) is None


def test_cache_serves_the_same_password_until_it_expires() -> None:
    """A verified password is served from the cache for ttl seconds; another password or user is not."""
    cache = CredentialCache(60)
    good = cache.digest("alice@LAB.TEST", b"alice-Pa55")
    cache.put("alice@LAB.TEST", good, USER, ticket(), now=100)
    assert cache.get("alice@LAB.TEST", good, now=159) is not None
    assert cache.get("alice@LAB.TEST", good, now=160) is None
    assert cache.get("alice@LAB.TEST", cache.digest("alice@LAB.TEST", b"other"), now=101) is None
    assert cache.get("bob@LAB.TEST", cache.digest("bob@LAB.TEST", b"alice-Pa55"), now=101) is None


def test_cache_keeps_salted_hashes_and_forgets_on_request() -> None:
    """Digests differ per user and per process (random salt); forget drops the entry; ttl 0 keeps nothing."""
    one, two = CredentialCache(60), CredentialCache(60)
    assert one.digest("alice@LAB.TEST", b"pw") != two.digest("alice@LAB.TEST", b"pw")
    assert one.digest("alice@LAB.TEST", b"pw") != one.digest("bob@LAB.TEST", b"pw")
    digest = one.digest("alice@LAB.TEST", b"pw")
    one.put("alice@LAB.TEST", digest, USER, ticket(), now=0)
    one.forget("alice@LAB.TEST")
    assert one.get("alice@LAB.TEST", digest, now=1) is None
    off = CredentialCache(0)
    off.put("alice@LAB.TEST", digest, USER, ticket(), now=0)
    assert len(off) == 0


def test_a_password_one_worker_forgets_is_served_by_no_worker() -> None:
    """Two workers (two caches on one SharedTable, the memory file the supervisor maps into each) both signed alice
    in. The directory's sweep in the first ends her held request and forgets her password (`BasicLogin.forget`):
    the second must not serve her next request from its own entry, or a disabled account is served for up to
    basic_cache_seconds on every worker but the one that held her Ping. Failed before the fix: the second served."""
    table = SharedTable(max_keys=64)
    one, two = (CredentialCache(60, known_for=1800, shared=table) for _ in range(2))
    digest = one.digest("alice@LAB.TEST", b"pw")
    assert two.digest("alice@LAB.TEST", b"pw") == digest  # one salt for every worker
    one.put("alice@LAB.TEST", digest, USER, ticket(), now=0)
    two.put("alice@LAB.TEST", digest, USER, ticket(), now=0)
    assert two.get("alice@LAB.TEST", digest, now=1) is not None
    one.forget("alice@LAB.TEST")
    assert two.get("alice@LAB.TEST", digest, now=2) is None
    assert one.get("alice@LAB.TEST", digest, now=2) is None
    two.put("alice@LAB.TEST", digest, USER, ticket(), now=3)  # the KDC accepted her again: served again
    assert one.get("alice@LAB.TEST", digest, now=4) is None  # its own entry went with the forget
    assert two.get("alice@LAB.TEST", digest, now=4) is not None


def test_an_account_one_worker_forgets_is_served_by_no_worker_under_any_name_form() -> None:
    """Two workers (two caches on one SharedTable) signed alice in under two name forms, one each (`alice@ad.test` as
    NT-ENTERPRISE in the first, `AD\\alice` in the second: two keys, one account the KDC named alice@AD.TEST). The
    first's sweep ends her held request and drops her account (`BasicLogin.forget` -> `forget_account`): the second
    must not serve its own name form from its entry either, or the disabled account is served there for up to
    basic_cache_seconds. Failed before the fix: the second worker served it."""
    table = SharedTable(max_keys=64)
    one, two = (CredentialCache(60, known_for=1800, shared=table) for _ in range(2))
    upn, down_level = "alice@ad.test", "alice@AD.TEST"  # the two user_keys
    upn_digest, down_digest = one.digest(upn, b"pw"), two.digest(down_level, b"pw")
    one.put(upn, upn_digest, USER, ticket("alice@AD.TEST"), now=0)
    two.put(down_level, down_digest, USER, ticket("alice@AD.TEST"), now=0)
    bob = two.digest("bob@AD.TEST", b"pw")
    two.put("bob@AD.TEST", bob, USER, ticket("bob@AD.TEST"), now=0)
    assert two.get(down_level, down_digest, now=1) is not None
    one.forget_account("ALICE@ad.test")  # the ticket's principal, any ASCII case
    assert one.get(upn, upn_digest, now=2) is None
    assert two.get(down_level, down_digest, now=2) is None
    assert two.get("bob@AD.TEST", bob, now=2) is not None  # another account's entry stays
    two.put(down_level, down_digest, USER, ticket("alice@AD.TEST"), now=3)  # the KDC accepted her again
    assert two.get(down_level, down_digest, now=4) is not None


def test_a_sign_in_another_worker_began_before_an_accounts_forget_is_not_cached() -> None:
    """alice's device signs in on the second worker while the first worker's sweep ends her held request and forgets
    her account (her account disabled): the KDC's acceptance may predate the disable and reaches the second worker
    after the forget. It must not be cached (in either worker), or her devices are served for up to
    basic_cache_seconds without the KDC, which now refuses her. Failed before the fix: the second worker served it."""
    table = SharedTable(max_keys=64)
    one, two = (CredentialCache(60, known_for=1800, shared=table) for _ in range(2))
    key = "alice@AD.TEST"
    digest = one.digest(key, b"pw")
    one.put(key, digest, USER, ticket(key), now=time.monotonic())
    asked = time.monotonic()  # the second worker's sign-in begins
    one.forget_account(key)
    now = time.monotonic()
    two.put(key, digest, USER, ticket(key), now, asked=asked)  # the KDC's answer, after the forget
    assert two.get(key, digest, now) is None
    assert one.get(key, digest, now) is None
    two.put(key, digest, USER, ticket(key), now, asked=time.monotonic())  # a sign-in begun after it: cached
    assert two.get(key, digest, now) is not None


def test_cache_is_bounded() -> None:
    """Beyond max_entries the least recently used entry goes first."""
    cache = CredentialCache(60, max_entries=2)
    digests = {u: cache.digest(u, b"pw") for u in ("a@R", "b@R", "c@R")}
    cache.put("a@R", digests["a@R"], USER, ticket(), now=0)
    cache.put("b@R", digests["b@R"], USER, ticket(), now=0)
    assert cache.get("a@R", digests["a@R"], now=1) is not None  # a is now the most recent
    cache.put("c@R", digests["c@R"], USER, ticket(), now=1)
    assert cache.get("b@R", digests["b@R"], now=2) is None
    assert cache.get("a@R", digests["a@R"], now=2) is not None


def test_throttle_refuses_for_doubling_times_after_the_limit() -> None:
    """Under the limit nothing waits; at it 1 s, then 2 s, 4 s ...; a success or 15 idle minutes start afresh."""
    throttle = Throttle(3)
    throttle.failed("bob", now=0)
    throttle.failed("bob", now=0)
    assert throttle.wait("bob", now=0) == 0
    throttle.failed("bob", now=10)
    assert throttle.wait("bob", now=10) == 1
    throttle.failed("bob", now=11)
    assert throttle.wait("bob", now=11) == 2
    throttle.failed("bob", now=13)
    assert throttle.wait("bob", now=14) == 3
    assert throttle.wait("carol", now=14) == 0
    throttle.succeeded("bob")
    assert throttle.wait("bob", now=14) == 0
    for t in (0, 1, 2):
        throttle.failed("eve", now=t)
    throttle.failed("eve", now=2 + 901)  # long after: counted as a first failure
    assert throttle.wait("eve", now=903) == 0


def test_throttle_caps_at_five_minutes() -> None:
    """However many failures, a key never waits more than 300 s."""
    throttle = Throttle(1)
    for _ in range(40):
        throttle.failed("bob", now=0)
    assert throttle.wait("bob", now=0) == 300


@pytest.mark.parametrize(
    ("message", "error", "status"),
    [
        ("Minor (100005): Decrypt integrity check failed", AuthenticationRequired, 401),
        ("Minor (100001): Preauthentication failed", AuthenticationRequired, 401),
        ("Minor (100007): Client 'x@LAB.TEST' not found in Kerberos database", AuthenticationRequired, 401),
        ("Minor (100006): Client's credentials have been revoked", KerberosRefused, 403),
        ("Minor: Password has expired", KerberosRefused, 403),
        ("Minor: Cannot contact any KDC for realm 'LAB.TEST'", KdcUnavailable, 503),
    ],
    ids=["wrong-password", "preauth", "unknown-user", "disabled-or-locked", "expired-password", "kdc-down"],
)
def test_kdc_answers_to_a_password(message: str, error: type[Exception], status: int) -> None:
    """Wrong password and unknown user are one 401; disabled, locked and expired are 403; no KDC is 503."""
    mapped = refusal(message, "x@LAB.TEST")
    assert isinstance(mapped, error)
    assert mapped.status == status


@pytest.mark.parametrize(
    ("message", "cause", "shown"),
    [
        ("Major (458752): No credentials were supplied, Minor (100005): Decrypt integrity check failed", "wrong", ""),
        ("Minor (100001): Preauthentication failed", "wrong password", ""),
        (
            "Minor (100007): Client 'x@LAB.TEST' not found in Kerberos database",
            "has no account x…[1]@LAB.TEST",
            "Minor (100007): Client 'x…[1]@LAB.TEST' not found in Kerberos database",
        ),
    ],
    ids=["wrong-password", "preauth", "unknown-user"],
)
def test_a_refused_password_is_explained_for_the_log(message: str, cause: str, shown: str) -> None:
    """The log's fix for a refused password says the cause in words, the KDC's text after it (it was the raw
    'x@LAB.TEST: Major (458752): ...' alone, as a newcomer's wrong-password curl showed in the trace); a name the KDC
    does not know (perhaps a password typed into the name field) is shown as its first character and length only."""
    hint = refusal(message, "x@LAB.TEST").hint
    assert hint is not None
    assert cause in hint
    assert hint.endswith(f"[{shown or message}]")


def test_which_requests_need_a_password() -> None:
    """certificate: never; basic and certificate-and-basic: always; certificate-or-basic: without a
    certificate, or on a route that forwards Basic."""
    negotiate = Route(prefix="/", upstream="http://b", spn="HTTP/b")
    basic_route = Route(prefix="/b/", upstream="http://b", spn="HTTP/b", backend_auth="basic")
    table = {
        (mode, certified, route.backend_auth): wants_password(mode, certified, route)
        for mode in ("certificate", "certificate-or-basic", "certificate-and-basic", "basic")
        for certified in (True, False)
        for route in (negotiate, basic_route)
    }
    assert not any(v for (mode, _, _), v in table.items() if mode == "certificate")
    assert all(v for (mode, _, _), v in table.items() if mode in ("basic", "certificate-and-basic"))
    assert table["certificate-or-basic", True, "negotiate"] is False
    assert table["certificate-or-basic", True, "basic"] is True
    assert table["certificate-or-basic", False, "negotiate"] is True


def test_certificate_and_password_are_one_user_by_principal_or_by_the_name_asked() -> None:
    """certificate-and-basic: the password's user is the certificate's when the KDC's name for it is the mapped
    principal, or when both were asked for by the same NT-ENTERPRISE UPN (AD names that ticket as asked,
    `carol\\@corp.example@AD.TEST`: it was refused as another user); another UPN is another user however the
    realm_map maps it."""
    identity = Identity(default_realm="AD.TEST", enterprise_names=True, realm_map={"corp.example": "AD.TEST"})
    carol = map_name("carol@corp.example", identity, source="san-upn")

    def login(name: str, kdc_name: str) -> PasswordLogin:
        return PasswordLogin(map_name(name, identity, source="basic"), ticket(kdc_name), "", cached=False)

    assert _same_user(login("carol@corp.example", "carol\\@corp.example@AD.TEST"), carol)
    assert _same_user(login("CAROL@corp.example", "CAROL\\@corp.example@AD.TEST"), carol)
    # the principal realm_map builds from carol@corp.example is a name, not the account AD finds by that UPN
    assert not _same_user(login("AD.TEST\\carol", "carol@AD.TEST"), carol)
    assert not _same_user(login("alice@corp.example", "alice\\@corp.example@AD.TEST"), carol)
    assert not _same_user(
        login("carol@ad.test", "carol\\@ad.test@AD.TEST"), carol
    )  # another UPN: maybe another account


def test_under_strong_mapping_the_password_of_the_certificates_upn_is_its_account() -> None:
    """Strong mapping impersonates the proven account (`alice@AD.TEST`, no enterprise name); a password checked
    under the certificate's UPN as an NT-ENTERPRISE name is that account's, whatever AD calls the ticket; another
    UPN is not, even one whose realm_map principal is the same."""
    identity = Identity(default_realm="AD.TEST", enterprise_names=True, realm_map={"corp.example": "AD.TEST"})
    mapped = map_name("alice@ad.test", identity, source="san-upn")
    alice = dataclasses.replace(mapped, enterprise=None, principal="alice@AD.TEST", account="alice")

    def login(name: str, kdc_name: str) -> PasswordLogin:
        return PasswordLogin(map_name(name, identity, source="basic"), ticket(kdc_name), "", cached=False)

    assert _same_user(login("alice@ad.test", "alice\\@ad.test@AD.TEST"), alice)
    assert _same_user(login("Alice@AD.test", "Alice\\@AD.test@AD.TEST"), alice)
    assert not _same_user(login("alice@corp.example", "alice\\@corp.example@AD.TEST"), alice)  # mallory's UPN


def test_with_enterprise_names_the_certificates_built_principal_is_no_account() -> None:
    """enterprise_names without strong mapping: mallory's certificate (her UPN alice@corp.example, which realm_map
    builds into alice@AD.TEST) with alice's password under a down-level or bare name (her ticket alice@AD.TEST) is
    two accounts: the certificate's user is whoever AD finds by that UPN, so only a password asked for by the same
    UPN is hers (it was served as alice). Without enterprise names the principal is what the KDC is asked for."""
    identity = Identity(
        default_realm="AD.TEST", enterprise_names=True, realm_map={"corp.example": "AD.TEST", "adtest": "AD.TEST"}
    )
    mallory = map_name("alice@corp.example", identity, source="san-upn")

    def login(name: str, kdc_name: str, ident: Identity = identity) -> PasswordLogin:
        return PasswordLogin(map_name(name, ident, source="basic"), ticket(kdc_name), "", cached=False)

    assert not _same_user(login("ADTEST\\alice", "alice@AD.TEST"), mallory)
    assert not _same_user(login("alice", "alice@AD.TEST"), mallory)
    assert not _same_user(login("alice@ad.test", "alice@AD.TEST"), mallory)  # a KDC that canonicalises
    assert _same_user(login("alice@corp.example", "alice\\@corp.example@AD.TEST"), mallory)  # the same UPN asked
    plain = dataclasses.replace(identity, enterprise_names=False)
    alice = map_name("alice@corp.example", plain, source="san-upn")
    assert _same_user(login("ADTEST\\alice", "alice@AD.TEST", plain), alice)  # the principal the KDC is asked for
