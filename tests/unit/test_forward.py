"""Per-user pools, backend 401s, and the context headers the backend gets: no network involved."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from multidict import CIMultiDict

from proxy.backend import forward, headers
from proxy.backend.client import BackendProtocolError
from proxy.backend.forward import Pools, _rejected
from proxy.config import Route
from proxy.errors import BackendUnavailable
from proxy.identity.principal import UserPrincipal
from proxy.lab.pki import make_pki


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_principal_has_its_own_session() -> None:
    """Two users never share a ClientSession (so never a connection); one user keeps theirs."""

    async def case() -> None:
        pools = Pools()
        with pools.lease("alice@LAB.TEST") as a1, pools.lease("bob@LAB.TEST") as b:
            assert a1 is not b
        with pools.lease("alice@LAB.TEST") as a2:
            assert a2 is a1
        await pools.close()
        assert a1.closed
        assert b.closed

    asyncio.run(case())


def test_idle_pools_close_but_not_while_a_request_runs() -> None:
    """After idle_seconds a user's pool is closed, unless one of their requests (a long Ping) is still running."""

    async def case() -> None:
        clock = Clock()
        pools = Pools(idle_seconds=300, clock=clock)
        with pools.lease("alice@LAB.TEST") as held:
            with pools.lease("bob@LAB.TEST") as bob:
                pass
            clock.now += 310  # alice's Ping is still held; bob has been idle for 310 s
            with pools.lease("carol@LAB.TEST"):
                pass
            await asyncio.sleep(0)
            assert not held.closed
            assert bob.closed
            assert set(pools.users()) == {"alice@LAB.TEST", "carol@LAB.TEST"}
            assert pools.users()["alice@LAB.TEST"] == 1
        clock.now += 310
        with pools.lease("dave@LAB.TEST"):
            pass
        await asyncio.sleep(0)
        assert held.closed
        await pools.close()

    asyncio.run(case())


def test_over_max_users_the_least_recently_used_idle_pool_goes() -> None:
    """Past max_users, idle pools are closed least recently used first; busy ones stay."""

    async def case() -> None:
        pools = Pools(max_users=2, clock=Clock())
        with pools.lease("alice@LAB.TEST") as alice:
            with pools.lease("bob@LAB.TEST") as bob:
                pass
            with pools.lease("carol@LAB.TEST"):
                pass
            await asyncio.sleep(0)
            assert bob.closed
            assert not alice.closed
        assert set(pools.users()) == {"alice@LAB.TEST", "carol@LAB.TEST"}
        await pools.close()

    asyncio.run(case())


def test_https_routes_get_a_context_of_their_ca_bundle_only(tmp_path: Path) -> None:
    """An https route is verified with its ca_bundle alone; an http route gets aiohttp's default."""
    pki = make_pki(tmp_path, now=datetime.now(UTC))
    route = Route(prefix="/", upstream="https://cas.lab.test", spn="HTTP/cas.lab.test", ca_bundle=pki.root_cert)
    plain = Route(prefix="/", upstream="http://cas.lab.test", spn="HTTP/cas.lab.test")

    async def case() -> None:
        pools = Pools([route, plain])
        ctx = pools.tls(route)
        assert not isinstance(ctx, bool)
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "Lab Root CA"),),)]
        assert ctx.check_hostname
        assert pools.tls(plain) is True
        await pools.close()

    asyncio.run(case())


ROUTE = Route(prefix="/", upstream="http://cas.lab.test", spn="HTTP/cas.lab.test")


@pytest.mark.parametrize(
    ("challenges", "hint"),
    [
        (["Negotiate"], "is HTTP/cas.lab.test the SPN of the backend's account"),
        (["Negotiate oYGBMH+gAwoBA6F4BHYwdKADAgEFoQMCAR6iERgPMjAyNjEx"], "Negotiate continuation token"),
        (["NTLM", "Basic realm=x"], "it offers NTLM, Basic but not Negotiate"),
        ([], "no WWW-Authenticate challenge"),
    ],
)
def test_backend_401_hint_says_what_the_backend_wanted(challenges: list[str], hint: str) -> None:
    """A backend 401 is a 502 whose log hint reads the backend's challenges; the device sees no challenge."""
    error = _rejected(ROUTE, challenges)
    assert error.status == 502
    assert error.hint is not None
    assert hint in error.hint
    assert "WWW-Authenticate" not in error.headers


@pytest.fixture(scope="module")
def alice_cert(tmp_path_factory: pytest.TempPathFactory) -> x509.Certificate:
    pki = make_pki(tmp_path_factory.mktemp("pki"), now=datetime.now(UTC))
    return x509.load_pem_x509_certificate(pki.user_cert("alice").read_bytes())


ALICE = UserPrincipal(upn="alice@lab.test", principal="alice@LAB.TEST", realm="LAB.TEST", source="san-upn")


def test_context_headers_carry_the_callers_facts(alice_cert: x509.Certificate) -> None:
    """Each configured source becomes its header with this caller's value, in configuration order."""
    wanted = [
        ("X-KCD-UPN", "upn"),
        ("X-KCD-Principal", "principal"),
        ("X-KCD-Cert-Serial", "cert_serial"),
        ("X-KCD-Cert-SHA256", "cert_sha256"),
        ("X-KCD-Cert-Subject", "cert_subject"),
        ("X-KCD-Cert-Issuer", "cert_issuer"),
    ]
    got = dict(headers.context_headers(wanted, user=ALICE, leaf=alice_cert))
    assert got["X-KCD-UPN"] == "alice@lab.test"
    assert got["X-KCD-Principal"] == "alice@LAB.TEST"
    assert got["X-KCD-Cert-Serial"] == format(alice_cert.serial_number, "x")
    assert len(got["X-KCD-Cert-SHA256"]) == 64
    assert got["X-KCD-Cert-Subject"] == "CN=alice"
    assert got["X-KCD-Cert-Issuer"] == "CN=Lab Issuing CA"
    assert headers.context_headers(wanted, user=ALICE, leaf=None) == (
        ("X-KCD-UPN", "alice@lab.test"),
        ("X-KCD-Principal", "alice@LAB.TEST"),
    )


def test_context_header_values_are_printable_ascii() -> None:
    """A non-ASCII UPN goes out percent-encoded; control characters can never split a header."""
    user = UserPrincipal(upn="zoë\r\nX-Evil: 1@lab.test", principal="zoe@LAB.TEST", realm="LAB.TEST", source="x")
    ((_, value),) = headers.context_headers([("X-KCD-UPN", "upn")], user=user, leaf=None)
    assert value == "zo%C3%AB%0D%0AX-Evil: 1@lab.test"


@pytest.mark.parametrize("sent", ["X-Employee", "x-employee", "X_Employee", "X-EMPLOYEE"])
def test_configured_context_header_names_are_stripped_from_the_client(sent: str) -> None:
    """Whatever the client sends under a context header's name, in any spelling, is replaced by the gateway's."""
    out = headers.to_backend(
        CIMultiDict([(sent, "mallory@lab.test"), ("Accept", "*/*")]),
        client_ip="192.0.2.7",
        client_host="mail.example.com",
        upstream_host="cas.lab.test",
        authorization="Negotiate abc",
        extra=[("X-Employee", "alice@lab.test")],
    )
    assert out.getall("X-Employee") == ["alice@lab.test"]
    assert "mallory@lab.test" not in out.values()


def test_expect_ends_at_the_gateway() -> None:
    """Expect: 100-continue is answered by the gateway, not passed to the backend."""
    out = headers.to_backend(
        CIMultiDict([("Expect", "100-continue"), ("Content-Length", "10")]),
        client_ip="192.0.2.7",
        client_host="",
        upstream_host="cas.lab.test",
        authorization="Negotiate abc",
    )
    assert "Expect" not in out
    assert out["Content-Length"] == "10"


def test_an_unreachable_backends_fix_says_what_to_check() -> None:
    """The backend down (connection refused): the log's fix was the bare error ('http://...:8081 (/):
    ConnectionRefusedError: ...'); it names the upstream and its route and says what to check: that the backend
    runs there and that `routes[].upstream` is its address."""
    error = forward._failure(ROUTE, ConnectionRefusedError(111, "Connection refused"), None)
    assert isinstance(error, BackendUnavailable)
    assert error.status == 502
    assert error.hint is not None
    assert "ConnectionRefusedError" in error.hint
    assert "routes[].upstream" in error.hint, error.hint


def test_a_malformed_answers_fix_says_the_backend_answered_badly_not_that_it_is_unreachable() -> None:
    """A backend that answered with something that is not HTTP/1.1 (a head over 64 KiB, a status 099): the log's
    fix said to check that the backend runs and that `routes[].upstream` is its address, which it is; it says
    what the backend sent and where to look instead. The device still gets 502."""
    why = BackendProtocolError("the backend's answer head is over 65536 bytes")
    error = forward._failure(ROUTE, why, None)
    assert isinstance(error, BackendUnavailable)
    assert error.status == 502
    assert error.hint is not None
    assert "answer head is over 65536 bytes" in error.hint
    assert "reachable" not in error.hint, error.hint
    assert "not valid HTTP/1.1" in error.hint, error.hint
