"""The lab's Exchange stand-in (`proxy.lab.backend`) against real Kerberos tokens from a throwaway realm.

The realm (`_mini_realm`) is MIT krb5 with the DB2 back end: it issues ordinary service tickets, which is
all an acceptor needs. Clients get their tokens the plain way: initiator credentials from a password,
then `init_sec_context` for HTTP@cas.lab.test. The backend runs in-process on a free loopback port
(one test runs it through its command line instead).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import gssapi
import gssapi.raw
import pytest
import structlog
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy.lab.backend import (
    ACTIVESYNC_PROTOCOL_VERSIONS,
    BACKEND_KEY,
    MAX_HOLD_SECONDS,
    MAX_RELEASED,
    BadHook,
    LabHooks,
    body_pattern,
    main,
    make_app,
)
from tests.integration._mini_realm import MiniRealm, free_port, start_mini_realm
from tests.integration.jsonlog import WAIT
from tests.integration.loopback import serving

REPO = Path(__file__).resolve().parents[2]
CAS = "HTTP/cas.lab.test"
OTHER = "HTTP/other.lab.test"
USERS = {"alice": "alice-Pa55", "bob": "bob-Pa55"}
SPNEGO = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=LAB0001&DeviceType=iPhone"

_TOOLS = ("krb5kdc", "kdb5_util", "kadmin.local", "ktutil")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in _TOOLS),
    reason=f"needs MIT Kerberos tools on PATH ({', '.join(_TOOLS)}: Debian krb5-kdc, krb5-admin-server, krb5-user)",
)


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniRealm]:
    """A running mini realm; its environment is this process's while the module's tests run."""
    started = start_mini_realm(tmp_path_factory.mktemp("mini-realm") / "realm", users=USERS, services=(CAS, OTHER))
    saved = {name: os.environ.get(name) for name in started.env()}
    os.environ.update(started.env())
    try:
        yield started
    finally:
        started.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Kerberos:
    """A client side: password credentials per user, a fresh initiator context per token."""

    def __init__(self) -> None:
        self._creds: dict[str, Any] = {}

    def _credentials(self, user: str) -> Any:
        if user not in self._creds:
            name = gssapi.Name(f"{user}@LAB.TEST", gssapi.NameType.kerberos_principal)
            acquired = gssapi.raw.acquire_cred_with_password(
                name, USERS[user].encode(), usage="initiate", mechs=[gssapi.MechType.kerberos, SPNEGO]
            )
            self._creds[user] = gssapi.Credentials(acquired.creds)
        return self._creds[user]

    def context(self, user: str, *, host: str = "cas.lab.test", spnego: bool = False) -> gssapi.SecurityContext:
        return gssapi.SecurityContext(
            name=gssapi.Name(f"HTTP@{host}", gssapi.NameType.hostbased_service),
            creds=self._credentials(user),
            usage="initiate",
            mech=SPNEGO if spnego else gssapi.MechType.kerberos,
        )

    def header(self, user: str, *, host: str = "cas.lab.test", spnego: bool = False) -> str:
        """A ready `Authorization` value for one request."""
        return negotiate(self.context(user, host=host, spnego=spnego).step())


def negotiate(token: bytes) -> str:
    return "Negotiate " + base64.b64encode(token).decode("ascii")


@pytest.fixture(scope="module")
def kerberos(realm: MiniRealm) -> Kerberos:
    return Kerberos()


@pytest.fixture
def cas_app(realm: MiniRealm, tmp_path: Path) -> web.Application:
    """The backend with the cas keytab, every request authenticated afresh."""
    return make_app(realm.keytabs[CAS], rcache=tmp_path / "cas.rcache2")


@pytest.fixture
def bound_app(realm: MiniRealm, tmp_path: Path) -> web.Application:
    """The backend in connection-bound (IIS authPersistNonNTLM) mode."""
    return make_app(realm.keytabs[CAS], connection_bound=True, rcache=tmp_path / "cas.rcache2")


def one_connection() -> aiohttp.ClientSession:
    """A client whose requests all share one keep-alive connection."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))


# -- authentication --------------------------------------------------------------------------------------


def test_healthz_answers_without_authentication(cas_app: web.Application) -> None:
    """GET /healthz is 200 "ok" with no Authorization header, for lab status checks."""

    async def case() -> None:
        async with serving(cas_app) as url, aiohttp.ClientSession() as session, session.get(url + "/healthz") as r:
            assert r.status == 200
            assert await r.text() == "ok"

    asyncio.run(case())


def test_request_without_token_is_challenged(cas_app: web.Application) -> None:
    """No Authorization header: 401 with a bare `WWW-Authenticate: Negotiate` and a reason."""

    async def case() -> None:
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/EWS/Exchange.asmx") as r,
        ):
            assert r.status == 401
            assert r.headers.getall("WWW-Authenticate") == ["Negotiate"]
            assert "no Authorization header" in await r.text()
            assert "X-Lab-Principal" not in r.headers

    asyncio.run(case())


def test_other_scheme_is_challenged(cas_app: web.Application) -> None:
    """A Basic header is not a Negotiate token: 401 naming the scheme."""

    async def case() -> None:
        basic = "Basic " + base64.b64encode(b"alice:alice-Pa55").decode()
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers={"Authorization": basic}) as r,
        ):
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Negotiate"
            assert "'Basic' is not accepted" in await r.text()

    asyncio.run(case())


def test_garbage_token_is_refused_with_gss_reason(cas_app: web.Application) -> None:
    """A token the acceptor cannot parse: 401 with the GSS error in the text body."""

    async def case() -> None:
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers={"Authorization": negotiate(b"garbage")}) as r,
        ):
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == "Negotiate"
            assert (await r.text()).strip() == "Negotiate token rejected: Invalid token was supplied"

    asyncio.run(case())


def test_bad_base64_is_refused(cas_app: web.Application) -> None:
    """A Negotiate value that is not base64 never reaches the acceptor: 401 saying so."""

    async def case() -> None:
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers={"Authorization": "Negotiate not*base64"}) as r,
        ):
            assert r.status == 401
            assert "not valid base64" in await r.text()

    asyncio.run(case())


def test_large_negotiate_header_reaches_the_acceptor(cas_app: web.Application) -> None:
    """A 40 KB Negotiate header (AD-sized PAC) is read and judged by GSSAPI, not refused as too large."""

    async def case() -> None:
        big = negotiate(b"\x60" + b"\x00" * 30000)
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers={"Authorization": big}) as r,
        ):
            assert len(big) > 40000
            assert r.status == 401
            assert "Negotiate token rejected" in await r.text()

    asyncio.run(case())


def test_valid_token_is_echoed_with_principal_and_body_digest(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A valid token: 200, the client's principal in the echo and X-Lab-Principal, the body's digest, no
    Authorization in the echoed headers, and an AP-REP that completes the client's mutual authentication."""
    body = b"<soap:Envelope>" + os.urandom(5000) + b"</soap:Envelope>"

    async def case() -> None:
        client = kerberos.context("alice")
        headers = {"Authorization": negotiate(client.step()), "Content-Type": "text/xml", "X-Trace": "t-1"}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.post(url + "/EWS/Exchange.asmx?a=1&b=2", data=body, headers=headers) as r,
        ):
            assert r.status == 200
            echo = await r.json()
            assert r.headers["X-Lab-Principal"] == "alice@LAB.TEST"
            challenge = r.headers["WWW-Authenticate"]
        assert echo["principal"] == "alice@LAB.TEST"
        assert echo["auth_type"] == "Negotiate"
        assert echo["wire_mech"] == "krb5"
        assert echo["site"] == "ews"
        assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/EWS/Exchange.asmx", "a=1&b=2")
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert echo["body_length"] == len(body)
        assert echo["headers"]["X-Trace"] == "t-1"
        assert "Authorization" not in echo["headers"]
        assert all(name.lower() != "authorization" for name, _ in echo["raw_headers"])
        assert echo["connection_identity_reused"] is False
        assert echo["delegated_credentials"] is False
        scheme, _, reply = challenge.partition(" ")
        assert scheme == "Negotiate"
        client.step(base64.b64decode(reply))
        assert client.complete

    asyncio.run(case())


def test_spnego_wrapped_token_is_accepted(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A SPNEGO-wrapped Kerberos token (what browsers and pyspnego send) is accepted and named as such."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("bob", spnego=True)}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers=headers) as r,
        ):
            assert r.status == 200
            echo = await r.json()
        assert echo["principal"] == "bob@LAB.TEST"
        assert echo["wire_mech"] == "spnego"
        assert echo["site"] == "owa"

    asyncio.run(case())


def test_replayed_token_is_refused(cas_app: web.Application, kerberos: Kerberos) -> None:
    """The same token twice: the second is refused by the replay cache, with MIT's minor message."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice")}
        async with serving(cas_app) as url, aiohttp.ClientSession() as session:
            async with session.get(url + "/owa/", headers=headers) as first:
                assert first.status == 200
            async with session.get(url + "/owa/", headers=headers) as second:
                assert second.status == 401
                assert (await second.text()).strip() == "Negotiate token rejected: Request is a replay"

    asyncio.run(case())


def test_token_for_service_missing_from_keytab_is_refused(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A ticket for HTTP/other.lab.test cannot be decrypted with the cas keytab: 401 naming the ticket's server."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice", host="other.lab.test")}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers=headers) as r,
        ):
            assert r.status == 401
            text = await r.text()
        assert "HTTP/other.lab.test@LAB.TEST not found in keytab" in text

    asyncio.run(case())


def test_service_option_refuses_other_tickets_in_the_same_keytab(
    realm: MiniRealm, kerberos: Kerberos, tmp_path: Path
) -> None:
    """With a keytab holding cas and other keys, service="HTTP/cas.lab.test" refuses a ticket for other;
    without the option the keytab alone decides and both are accepted."""
    merged = tmp_path / "both.keytab"
    script = f"rkt {realm.keytabs[CAS]}\nrkt {realm.keytabs[OTHER]}\nwkt {merged}\nquit\n"
    subprocess.run(["ktutil"], input=script, text=True, check=True, capture_output=True, timeout=30)
    strict = make_app(merged, service=CAS, rcache=tmp_path / "strict.rcache2")
    lenient = make_app(merged, rcache=tmp_path / "lenient.rcache2")

    async def get(app: web.Application, host: str) -> tuple[int, str]:
        headers = {"Authorization": kerberos.header("alice", host=host)}
        async with (
            serving(app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers=headers) as r,
        ):
            return r.status, await r.text()

    async def case() -> None:
        status, text = await get(strict, "other.lab.test")
        assert status == 401
        assert "the ticket is for HTTP/other.lab.test@LAB.TEST, this backend is HTTP/cas.lab.test" in text
        assert (await get(strict, "cas.lab.test"))[0] == 200
        status, text = await get(lenient, "other.lab.test")
        assert status == 200
        assert '"principal": "alice@LAB.TEST"' in text

    asyncio.run(case())


def test_concurrent_requests_are_each_accepted(cas_app: web.Application, kerberos: Kerberos) -> None:
    """40 concurrent requests from two users, accepted in threads with shared service credentials: each
    is served as its own user."""

    async def case() -> None:
        users = ["alice", "bob"] * 20
        tokens = [kerberos.header(user) for user in users]
        async with serving(cas_app) as url, aiohttp.ClientSession() as session:

            async def one(token: str) -> str:
                async with session.get(url + "/owa/", headers={"Authorization": token}) as r:
                    assert r.status == 200, await r.text()
                    principal: str = (await r.json())["principal"]
                    return principal

            principals = await asyncio.gather(*(one(token) for token in tokens))
        assert principals == [f"{user}@LAB.TEST" for user in users]

    asyncio.run(case())


# -- Exchange behaviour ----------------------------------------------------------------------------------


def test_activesync_options_advertises_protocol(cas_app: web.Application, kerberos: Kerberos) -> None:
    """Authenticated OPTIONS /Microsoft-Server-ActiveSync: 200 with MS-ASProtocolVersions and -Commands."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice")}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.options(url + "/Microsoft-Server-ActiveSync", headers=headers) as r,
        ):
            assert r.status == 200
            assert r.headers["MS-ASProtocolVersions"] == "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
            commands = r.headers["MS-ASProtocolCommands"].split(",")
            assert r.headers["X-Lab-Principal"] == "alice@LAB.TEST"
        assert {"Sync", "FolderSync", "Ping", "Provision", "ItemOperations", "Find"} <= set(commands)
        assert len(commands) == 24
        assert ACTIVESYNC_PROTOCOL_VERSIONS.split(",")[-1] == "16.1"

    asyncio.run(case())


def test_activesync_options_needs_authentication(cas_app: web.Application) -> None:
    """OPTIONS /Microsoft-Server-ActiveSync without a token is challenged and advertises nothing."""

    async def case() -> None:
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.options(url + "/Microsoft-Server-ActiveSync") as r,
        ):
            assert r.status == 401
            assert "MS-ASProtocolVersions" not in r.headers

    asyncio.run(case())


@pytest.mark.parametrize("how", ["header", "query"])
def test_ping_is_held(cas_app: web.Application, kerberos: Kerberos, how: str) -> None:
    """POST ?Cmd=Ping with a 1 s hold (X-Lab-Hold-Seconds or ?hold=) answers 200 after >= 1 s, body read."""
    body = b"\x03\x01j\x00\x00\rE" + b"\x00" * 100  # WBXML-ish Ping request

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice"), "Content-Type": "application/vnd.ms-sync.wbxml"}
        target = PING
        if how == "header":
            headers["X-Lab-Hold-Seconds"] = "1"
        else:
            target += "&hold=1"
        async with serving(cas_app) as url, aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(url + target, data=body, headers=headers) as r:
                echo = await r.json()
            elapsed = time.monotonic() - started
        assert r.status == 200
        assert elapsed >= 1.0
        assert elapsed < 3.0
        assert echo["site"] == "activesync"
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert "Cmd=Ping" in echo["query"]

    asyncio.run(case())


def test_hold_is_capped_at_an_hour() -> None:
    """A hold above 3600 s is capped to 3600 (the longest ActiveSync heartbeat plus margin); a negative one is 400."""
    hooks = LabHooks.from_request(CIMultiDict({"X-Lab-Hold-Seconds": "86400"}), MultiDict())
    assert hooks.hold_seconds == MAX_HOLD_SECONDS == 3600
    assert LabHooks.from_request(CIMultiDict(), MultiDict({"hold": "540"})).hold_seconds == 540
    with pytest.raises(BadHook, match="between 0 and 3600"):
        LabHooks.from_request(CIMultiDict({"X-Lab-Hold-Seconds": "-1"}), MultiDict())


def test_a_hold_until_a_key_ends_when_a_request_releases_it(cas_app: web.Application, kerberos: Kerberos) -> None:
    """`X-Lab-Hold-Until: k` with a 600 s hold: still held while other requests come, answered once a request sends
    `X-Lab-Release: k` (a test's "held until I say so"); a malformed key is 400 naming the hook."""

    async def case() -> None:
        held = {"Authorization": kerberos.header("alice"), "X-Lab-Hold-Seconds": "600", "X-Lab-Hold-Until": "k1"}
        async with serving(cas_app) as url, aiohttp.ClientSession() as session:

            async def ping() -> int:
                async with session.post(url + PING, data=b"x", headers=held) as r:
                    return r.status

            task = asyncio.ensure_future(ping())
            other = {"Authorization": kerberos.header("bob"), "X-Lab-Release": "another"}
            async with session.get(url + "/owa/", headers=other) as r:
                assert r.status == 200
            assert not task.done()
            release = {"Authorization": kerberos.header("bob"), "X-Lab-Release": "k1"}
            async with session.get(url + "/owa/", headers=release) as r:
                assert r.status == 200
            assert await asyncio.wait_for(task, 30) == 200
            bad = {"Authorization": kerberos.header("bob"), "X-Lab-Release": ""}
            async with session.get(url + "/owa/", headers=bad) as r:
                assert r.status == 400
                assert "X-Lab-Release" in await r.text()

    asyncio.run(case())


def test_release_keys_are_bounded_and_a_hold_nobody_released_leaves_no_key(
    cas_app: web.Application, kerberos: Kerberos
) -> None:
    """`MAX_RELEASED` + 20 distinct `X-Lab-Release` keys leave at most `MAX_RELEASED` kept (every key was kept for
    good: a client's memory to grow at will), the newest still releases a hold that comes after it, and a hold whose
    key nobody released leaves no key behind once it ends."""

    async def case() -> None:
        backend = cas_app[BACKEND_KEY]
        async with serving(cas_app) as url, aiohttp.ClientSession() as session:
            for n in range(MAX_RELEASED + 20):
                release = {"Authorization": kerberos.header("bob"), "X-Lab-Release": f"key-{n}"}
                async with session.get(url + "/owa/", headers=release) as r:
                    assert r.status == 200
            assert len(backend.releases) <= MAX_RELEASED
            newest = f"key-{MAX_RELEASED + 19}"
            held = {"Authorization": kerberos.header("alice"), "X-Lab-Hold-Seconds": "600", "X-Lab-Hold-Until": newest}
            async with session.post(url + PING, data=b"x", headers=held) as r:
                assert r.status == 200  # released before it came: not held 600 s (the wait_for below bounds it)
            unreleased = {
                "Authorization": kerberos.header("alice"),
                "X-Lab-Hold-Seconds": "0.2",
                "X-Lab-Hold-Until": "nobody",
            }
            async with session.post(url + PING, data=b"x", headers=unreleased) as r:
                assert r.status == 200
            assert "nobody" not in backend.releases

    asyncio.run(asyncio.wait_for(case(), 120))


def test_hold_ends_when_client_hangs_up(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A 60 s hold whose client gives up after 0.3 s ends on the server within about a second."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice"), "X-Lab-Hold-Seconds": "60"}
        with structlog.testing.capture_logs() as logs:
            async with serving(cas_app) as url, aiohttp.ClientSession() as session:
                started = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await session.post(url + PING, data=b"x", headers=headers, timeout=aiohttp.ClientTimeout(total=0.3))
                for _ in range(100):  # the server logs its one line when the handler ends
                    if any(e.get("event") == "request" for e in logs):
                        break
                    await asyncio.sleep(0.05)
                ended = time.monotonic() - started
        assert any(e.get("event") == "request" and e.get("path") == "/Microsoft-Server-ActiveSync" for e in logs)
        assert ended < 2.5

    asyncio.run(case())


def test_status_hook_passes_exchange_status_and_headers(cas_app: web.Application, kerberos: Kerberos) -> None:
    """X-Lab-Status: 449 and X-Lab-Header make the backend answer 449 with that header, still as the user."""

    async def case() -> None:
        headers = {
            "Authorization": kerberos.header("alice"),
            "X-Lab-Status": "449",
            "X-Lab-Header": "X-MS-ASThrottle: CommandFrequency",
        }
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.post(url + "/Microsoft-Server-ActiveSync?Cmd=Sync", data=b"", headers=headers) as r,
        ):
            assert r.status == 449
            assert r.headers["X-MS-ASThrottle"] == "CommandFrequency"
            assert (await r.json())["principal"] == "alice@LAB.TEST"

    asyncio.run(case())


def test_status_hook_via_query(cas_app: web.Application, kerberos: Kerberos) -> None:
    """?lab_status=503&lab_header=Retry-After:30 gives a 503 with Retry-After: 30."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("bob")}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/?lab_status=503&lab_header=Retry-After:30", headers=headers) as r,
        ):
            assert r.status == 503
            assert r.headers["Retry-After"] == "30"
            assert r.headers["X-Lab-Principal"] == "bob@LAB.TEST"

    asyncio.run(case())


def test_status_hook_204_has_no_body(cas_app: web.Application, kerberos: Kerberos) -> None:
    """X-Lab-Status: 204 answers 204 with an empty body (no echo), still naming the principal."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice"), "X-Lab-Status": "204"}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.post(url + "/EWS/Exchange.asmx", data=b"x", headers=headers) as r,
        ):
            assert r.status == 204
            assert await r.read() == b""
            assert r.headers["X-Lab-Principal"] == "alice@LAB.TEST"

    asyncio.run(case())


def test_body_bytes_hook(cas_app: web.Application, kerberos: Kerberos) -> None:
    """X-Lab-Body-Bytes: N answers with exactly body_pattern(N)."""
    size = 300_001

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice"), "X-Lab-Body-Bytes": str(size)}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/attachment", headers=headers) as r,
        ):
            assert r.status == 200
            data = await r.read()
            assert r.headers["Content-Length"] == str(size)
            assert r.headers["X-Lab-Principal"] == "alice@LAB.TEST"
        assert data == body_pattern(size)
        assert len(data) == size

    asyncio.run(case())


def test_malformed_hook_is_400(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A status hook outside 200..599 is answered 400 naming the hook, after authentication."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice"), "X-Lab-Status": "101"}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/owa/", headers=headers) as r,
        ):
            assert r.status == 400
            assert "X-Lab-Status must be a status from 200 to 599" in await r.text()

    asyncio.run(case())


def test_unknown_path_is_served_as_generic_site(cas_app: web.Application, kerberos: Kerberos) -> None:
    """A path outside Exchange's sites is a generic Negotiate site: authenticated 200, site "generic"."""

    async def case() -> None:
        headers = {"Authorization": kerberos.header("alice")}
        async with (
            serving(cas_app) as url,
            aiohttp.ClientSession() as session,
            session.get(url + "/intranet/a%2Fb", headers=headers) as r,
        ):
            assert r.status == 200
            echo = await r.json()
        assert echo["site"] == "generic"
        assert echo["raw_path"] == "/intranet/a%2Fb"

    asyncio.run(case())


# -- connection-bound mode (IIS authPersistNonNTLM) ------------------------------------------------------


def test_connection_bound_keeps_first_identity(bound_app: web.Application, kerberos: Kerberos) -> None:
    """Connection-bound: on one keep-alive connection, alice's request then bob's token (then no token)
    are all served as alice, flagged as reused."""

    async def case() -> None:
        async with serving(bound_app) as url, one_connection() as session:
            echoes = []
            for header in (kerberos.header("alice"), kerberos.header("bob"), None):
                headers = {"Authorization": header} if header else {}
                async with session.get(url + "/EWS/Exchange.asmx", headers=headers) as r:
                    assert r.status == 200
                    echoes.append(await r.json())
        assert [e["principal"] for e in echoes] == ["alice@LAB.TEST"] * 3
        assert [e["connection_identity_reused"] for e in echoes] == [False, True, True]
        assert len({e["connection_number"] for e in echoes}) == 1
        assert [e["connection_request_index"] for e in echoes] == [1, 2, 3]

    asyncio.run(case())


def test_without_connection_bound_each_request_authenticates(cas_app: web.Application, kerberos: Kerberos) -> None:
    """Default mode: on one keep-alive connection bob's token after alice's is served as bob; no token is 401."""

    async def case() -> None:
        async with serving(cas_app) as url, one_connection() as session:
            echoes = []
            for user in ("alice", "bob"):
                async with session.get(url + "/owa/", headers={"Authorization": kerberos.header(user)}) as r:
                    assert r.status == 200
                    echoes.append(await r.json())
            async with session.get(url + "/owa/") as r:
                assert r.status == 401
        assert [e["principal"] for e in echoes] == ["alice@LAB.TEST", "bob@LAB.TEST"]
        assert [e["connection_identity_reused"] for e in echoes] == [False, False]
        assert echoes[0]["connection_number"] == echoes[1]["connection_number"]

    asyncio.run(case())


def test_connection_binding_is_per_connection_and_dropped_on_close(
    bound_app: web.Application, kerberos: Kerberos
) -> None:
    """Connection-bound: a second connection is not bound by the first; closing connections drops their state."""
    table = bound_app[BACKEND_KEY].connections

    async def case() -> None:
        async with serving(bound_app) as url:
            async with one_connection() as first, one_connection() as second:
                async with first.get(url + "/owa/", headers={"Authorization": kerberos.header("alice")}) as r:
                    a = await r.json()
                async with second.get(url + "/owa/", headers={"Authorization": kerberos.header("bob")}) as r:
                    b = await r.json()
                async with second.get(url + "/owa/") as r:
                    b_again = await r.json()
                assert len(table) == 2
            # the server sees the close a few loop iterations later (its table, polled: no event of ours to await)
            deadline = time.monotonic() + WAIT
            while len(table) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            assert len(table) == 0
            async with one_connection() as third:
                async with third.get(url + "/owa/") as r:
                    assert r.status == 401
                async with third.get(url + "/owa/", headers={"Authorization": kerberos.header("bob")}) as r:
                    assert (await r.json())["principal"] == "bob@LAB.TEST"
        assert a["principal"] == "alice@LAB.TEST"
        assert b["principal"] == "bob@LAB.TEST"
        assert b_again["principal"] == "bob@LAB.TEST"
        assert b_again["connection_identity_reused"] is True
        assert a["connection_number"] != b["connection_number"]

    asyncio.run(case())


# -- command line ----------------------------------------------------------------------------------------


def test_cli_serves_until_sigterm(realm: MiniRealm, kerberos: Kerberos, tmp_path: Path) -> None:
    """`python -m proxy.lab.backend --keytab --bind --krb5-config` serves /healthz and real Negotiate,
    and exits 0 on SIGTERM."""
    port = free_port()
    env = {**os.environ}
    env.pop("KRB5_CONFIG", None)  # the flag must be what points the child at the realm
    argv = [
        *(sys.executable, "-m", "proxy.lab.backend", "--keytab", str(realm.keytabs[CAS])),
        *("--bind", f"127.0.0.1:{port}", "--krb5-config", str(realm.krb5_conf)),
        *("--rcache", str(tmp_path / "cli.rcache2")),
    ]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "backend.log"

    async def case() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                try:
                    async with session.get(url + "/healthz") as r:
                        assert await r.text() == "ok"
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail(f"the backend did not answer /healthz within {WAIT} s: {log.read_text()}")
            headers = {"Authorization": kerberos.header("bob")}
            async with session.post(url + PING, data=b"abc", headers=headers) as r:
                assert r.status == 200
                assert r.headers["X-Lab-Principal"] == "bob@LAB.TEST"

    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        asyncio.run(case())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "listening" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_cli_refuses_unusable_keytab(realm: MiniRealm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing keytab stops the backend at start-up with exit status 2 and MIT's reason."""
    assert main(["--keytab", str(tmp_path / "missing.keytab"), "--bind", "127.0.0.1:1"]) == 2
    assert "is nonexistent or empty" in capsys.readouterr().err
