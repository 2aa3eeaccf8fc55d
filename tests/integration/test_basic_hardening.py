"""Basic-auth throttles attacked the way a client would: a real gateway, the lab's real KDC, TLS clients.

The KDC's own log is the witness for what reached it; the gateway's summary lines say who was served.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from proxy.auth.basic import BasicLogin, CredentialCache, parse_basic
from proxy.config import Authentication, Identity, Kerberos
from proxy.errors import AuthenticationRequired, TooManyAttempts
from proxy.lab.kdclog import KdcLog
from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.test_ticket_cache import _kadmin


def basic_gateway(lab: LabLayout, directory: Path, *, per_user: int, per_address: int) -> Gateway:
    extra = f"""
[authentication]
mode = "basic"
basic_failures_per_user = {per_user}
basic_failures_per_address = {per_address}
"""
    return start_gateway(lab, directory, lab_config(lab, port=free_port(), extra=extra))


def authorization(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


async def get(session: aiohttp.ClientSession, gw: Gateway, lab: LabLayout, login: str) -> int:
    async with session.get(gw.url + "/owa/", headers=authorization(login), ssl=client_context(lab, None)) as r:
        await r.read()
        return r.status


def statuses(lab: LabLayout, gw: Gateway, logins: list[str]) -> list[int]:
    """One request per login, one after the other, on one keep-alive connection."""

    async def run() -> list[int]:
        async with aiohttp.ClientSession() as session:
            return [await get(session, gw, lab, login) for login in logins]

    return asyncio.run(run())


@pytest.fixture
def sprayed(lab: LabLayout, tmp_path: Path) -> Iterator[Gateway]:
    gw = basic_gateway(lab, tmp_path, per_user=5, per_address=20)
    yield gw
    gw.stop()


def test_a_concurrent_spray_from_one_address_reaches_the_kdc_at_most_the_limit(
    lab: LabLayout, sprayed: Gateway
) -> None:
    """100 wrong passwords for 100 user names, sent at once on 100 connections from one address, with
    basic_failures_per_address = 20: at most 20 AS requests reach the KDC; the rest are 429.

    The 100 TLS handshakes are done first, then the 100 requests written: sent with their handshakes, they were
    spread over the seconds 100 handshakes take on a loaded machine, and one came after the address's first 1 s
    refusal had lapsed, when the throttle lets one more through by design (then 2 s, 4 s, ...): 21 reached the KDC."""
    tag = uuid.uuid4().hex[:8]
    kdc = KdcLog(lab.kdc_log)
    ctx = client_context(lab, None)

    async def connected() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", sprayed.port, ssl=ctx), 60)

    async def status(reader: asyncio.StreamReader) -> int:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 60)
        return int(head.split(b" ", 2)[1])

    async def run() -> list[int]:
        devices = await asyncio.gather(*(connected() for _ in range(100)))
        try:
            for i, (_, writer) in enumerate(devices):
                login = authorization(f"spray-{tag}-{i}:guess")["Authorization"]
                head = f"GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {login}\r\nConnection: close\r\n\r\n"
                writer.write(head.encode())
            return await asyncio.gather(*(status(reader) for reader, _ in devices))
        finally:
            for _, writer in devices:
                writer.close()

    answers = asyncio.run(run())
    reached = set(_as_requests(lab, kdc, f"spray-{tag}-"))
    assert len(reached) <= 20, sorted(reached)
    assert answers.count(401) <= 20
    assert answers.count(401) + answers.count(429) == 100, answers


def _as_lines(lab: LabLayout, kdc: KdcLog) -> list[str]:
    """The KDC's log lines for AS requests since `kdc` was made, once the log has settled."""
    kdc.settled()
    with lab.kdc_log.open(errors="replace") as f:
        f.seek(kdc.offset)
        return [line for line in f.read().splitlines() if "AS_REQ" in line]


def _as_requests(lab: LabLayout, kdc: KdcLog, needle: str) -> list[str]:
    """The user names (after `needle`) of AS requests naming `needle` since `kdc` was made."""
    return [line.split(needle, 1)[1].split("@", 1)[0] for line in _as_lines(lab, kdc) if needle in line]


def test_names_differing_in_case_share_the_cache_and_the_counter(lab: LabLayout, tmp_path: Path) -> None:
    """ALICE with alice's password is served from alice's cache entry, as alice, without the KDC; failures
    for BOB and Bob count against bob."""
    gw = basic_gateway(lab, tmp_path, per_user=2, per_address=100)
    try:
        assert statuses(lab, gw, [f"alice:{USERS['alice']}"]) == [200]
        kdc = KdcLog(lab.kdc_log)
        assert statuses(lab, gw, [f"ALICE:{USERS['alice']}"]) == [200]
        assert not [line for line in _as_lines(lab, kdc) if "alice@lab.test" in line.lower()]
        assert gw.wait_event("request", basic_cached=True)["principal"] == "alice@LAB.TEST"
        assert statuses(lab, gw, ["BOB:guess", "Bob:guess", f"bob:{USERS['bob']}"]) == [401, 401, 429]
    finally:
        gw.stop()


def test_a_signed_in_device_keeps_being_served_while_a_guesser_is_throttled(lab: LabLayout, tmp_path: Path) -> None:
    """carol's device is signed in; someone guesses her password until the throttle answers 429; her device,
    with the password the KDC verified, is still served from the cache."""
    gw = basic_gateway(lab, tmp_path, per_user=2, per_address=100)
    try:
        device = f"carol:{USERS['carol']}"
        assert statuses(lab, gw, [device]) == [200]
        assert statuses(lab, gw, ["carol:guess1", "carol:guess2", "carol:guess3"]) == [401, 401, 429]
        assert statuses(lab, gw, [device, device]) == [200, 200]
        carol_served = ("carol@LAB.TEST", 200)
        served = gw.wait_events("request", 3, accept=lambda e: (e.get("principal"), e.get("status")) == carol_served)
        assert [e.get("basic_cached") for e in served] == [False, True, True]
    finally:
        gw.stop()


def test_known_and_unknown_users_answer_in_about_the_same_time(lab: LabLayout, tmp_path: Path) -> None:
    """Wrong passwords for an existing user and for unknown names, interleaved on one connection: the
    median answer times are within a wide margin of each other (without the pace: 10 against 20 ms)."""
    gw = basic_gateway(lab, tmp_path, per_user=1000, per_address=1000)

    async def run() -> tuple[list[float], list[float]]:
        known: list[float] = []
        unknown: list[float] = []
        async with aiohttp.ClientSession() as session:
            assert await get(session, gw, lab, "bob:warm-up") == 401  # the connection, and a first pace sample
            for i in range(12):
                for login, into in ((f"alice:wrong-{i}", known), (f"ghost-{uuid.uuid4().hex[:6]}:wrong", unknown)):
                    started = time.perf_counter()
                    assert await get(session, gw, lab, login) == 401
                    into.append(time.perf_counter() - started)
        return known, unknown

    try:
        known, unknown = asyncio.run(run())
    finally:
        gw.stop()
    k, u = statistics.median(known) * 1000, statistics.median(unknown) * 1000
    print(f"median answer: existing user, wrong password {k:.1f} ms; unknown user {u:.1f} ms")
    assert u >= 0.75 * k, (known, unknown)


def test_a_throttled_attempt_costs_no_hash_against_the_real_kdc(
    lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BasicLogin against the lab KDC, counting scrypt hashes: once bob is throttled, attempts are 429 and
    hash nothing; before that, each attempt that reached the KDC was hashed once."""
    hashed: list[str] = []
    real = CredentialCache.digest

    def counting(self: CredentialCache, key: str, password: bytes) -> bytes:
        hashed.append(key)
        return real(self, key, password)

    monkeypatch.setattr(CredentialCache, "digest", counting)
    monkeypatch.setenv("KRB5_CONFIG", str(lab.krb5_conf))
    settings = Authentication(mode="basic", basic_failures_per_user=2, basic_failures_per_address=100)
    kerberos = Kerberos(principal="HTTP/proxy.lab.test@LAB.TEST", keytab=lab.proxy_keytab)
    service = BasicLogin(settings, Identity(default_realm="LAB.TEST"), kerberos)

    async def attempt(password: str) -> int:
        credentials = parse_basic("Basic " + base64.b64encode(f"bob:{password}".encode()).decode())
        assert credentials is not None
        try:
            await service.login(credentials, "192.0.2.7")
        except (AuthenticationRequired, TooManyAttempts) as e:
            return e.status
        return 200

    async def run() -> list[int]:
        return [await attempt(p) for p in ("guess1", "guess2", "guess3", USERS["bob"], "guess4")]

    try:
        assert asyncio.run(run()) == [401, 401, 429, 429, 429]
    finally:
        service.close()  # its password-check thread ends (it waited for calls for the rest of the worker's life)
    assert hashed == ["bob@lab.test"] * 2


def test_names_active_directory_takes_for_one_account_share_the_hold(lab: LabLayout, tmp_path: Path) -> None:
    """Wrong passwords for one account sent under the spellings Active Directory takes for that account's name
    (full-width letters, accents precomposed or combining, a slashed o: MS-ADTS 6.5 compares names ignoring case,
    width, non-spacing marks and kana type) count against one user: with basic_failures_per_user = 3 the fourth
    spelling, and the name itself, are 429 without the KDC. Each spelling was a user of its own to the throttle, so a
    guesser carried an AD account past its lockout threshold (20 guesses from one address, 5 per spelling) while the
    gateway's hold was meant to keep it below."""
    tag = uuid.uuid4().hex[:8]
    name = f"fold{tag}"
    _kadmin(lab, f"addprinc -pw Fold-{tag} {name}")
    spellings = [name, f"\uff46old{tag}", f"f\u00f3ld{tag}", f"fo\u0301ld{tag}", f"f\u00f8ld{tag}", name]
    gw = basic_gateway(lab, tmp_path, per_user=3, per_address=100)
    try:
        kdc = KdcLog(lab.kdc_log)
        answers = statuses(lab, gw, [f"{spelling}:guess-{i}" for i, spelling in enumerate(spellings)])
        reached = [line for line in _as_lines(lab, kdc) if tag in line]
    finally:
        gw.stop()
    assert answers == [401, 401, 401, 429, 429, 429], answers
    assert len(reached) == 3, reached


def test_a_basic_sign_in_as_the_gateways_own_account_never_reaches_the_kdc(lab: LabLayout, tmp_path: Path) -> None:
    """A gateway whose principal is an account name (as on AD: `svc-kcdproxy@AD.TEST`): Basic guesses at that name,
    however spelt (`gw...`, `LAB\\gw...`, `gw...@lab.test`), are the same 401 as any wrong password and never reach
    the KDC. Each one was a failed pre-authentication of the gateway's own account, towards the directory's lockout
    of the one account every delegation needs (with several gateways behind a balancer, `basic_failures_per_user` of
    them each)."""
    tag = uuid.uuid4().hex[:8]
    account = f"gw{tag}"
    keytab = tmp_path / "gateway.keytab"
    _kadmin(lab, f"addprinc -randkey +requires_preauth {account}")
    _kadmin(lab, f"ktadd -k {keytab} {account}")
    extra = '\n[authentication]\nmode = "basic"\nbasic_failures_per_user = 3\nbasic_failures_per_address = 100\n'
    text = lab_config(lab, port=free_port(), extra=extra)
    text = text.replace('principal = "HTTP/proxy.lab.test@LAB.TEST"', f'principal = "{account}@LAB.TEST"')
    text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{keytab}"')
    assert f'keytab = "{keytab}"' in text
    gw = start_gateway(lab, tmp_path, text)
    try:
        kdc = KdcLog(lab.kdc_log)
        logins = [f"{account}:guess-1", f"LAB\\{account}:guess-2", f"{account}@lab.test:guess-3"]
        answers = statuses(lab, gw, logins)
        refused = [line for line in _as_lines(lab, kdc) if f"PREAUTH_FAILED: {account}@" in line]
        reason = gw.wait_event("authentication_required", stage="authentication")["fix"]
    finally:
        gw.stop()
    assert answers == [401, 401, 401], answers
    assert refused == [], refused
    assert "kerberos.principal" in reason
