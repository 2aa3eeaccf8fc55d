"""The same requests against both lab realms, where MIT and Active Directory (Samba AD DC) behave alike.

The `realm` fixture is parametrised: `mit` is the LDAP-backed MIT KDC on loopback, `ad` the Samba AD DC in
its network namespace (gateway, Exchange stand-in and curl in there too). Each test runs once per realm;
what only AD does is in test_ad.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, ad_curl, start_ad_gateway
from tests.integration.conftest import curl, free_port, lab_config, start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


class _Gateway(Protocol):
    """What both realms' gateway handles offer (conftest.Gateway, ad_fixtures.AdProcess)."""

    url: str

    def mark(self) -> int: ...
    def wait_event(self, name: str, timeout: float = ..., **match: Any) -> dict[str, Any]: ...
    def stop(self) -> Any: ...


@dataclass
class Realm:
    """One realm under test: its name, a running gateway in front of it, and a device's curl."""

    kind: str
    name: str  # the Kerberos realm
    other_spn: str  # a real service outside the gateway's delegation list
    gateway: _Gateway
    _curl: Callable[[str, str | None], subprocess.CompletedProcess[str]]

    def get(self, path: str, user: str) -> tuple[int, str]:
        """GET `path` through the gateway with `user`'s certificate: (status, body). The gateway's log is marked
        first, so a test's `wait_event` finds this request's lines, not an older test's."""
        self.gateway.mark()
        done = self._curl(self.gateway.url + path, user)
        body, _, status = done.stdout.rpartition("\n")
        return int(status or 0), body


@pytest.fixture(scope="module", params=["mit", "ad"])
def realm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realm]:
    directory = tmp_path_factory.mktemp(f"realm-{request.param}")
    if request.param == "mit":
        lab = request.getfixturevalue("lab")
        extra = f"""
[[routes]]
prefix = "/not-delegable/"
upstream = "http://127.0.0.1:{lab.backend_port}"
spn = "HTTP/other.lab.test"
"""
        gw: Any = start_gateway(lab, directory, lab_config(lab, port=free_port(), extra=extra))
        yield Realm("mit", "LAB.TEST", "HTTP/other.lab.test", gw, lambda url, user: curl(lab, url, user))
    else:
        adr: ad.AdRealm = request.getfixturevalue("ad_realm")
        backend = request.getfixturevalue("ad_backend")
        extra = f"""
[[routes]]
prefix = "/not-delegable/"
upstream = "http://127.0.0.1:{backend.port}"
spn = "{ad.OTHER_SPN}"
"""
        gw = start_ad_gateway(adr, directory, backend, extra)
        yield Realm("ad", ad.REALM, ad.OTHER_SPN, gw, lambda url, user: ad_curl(adr, url, user))
    gw.stop()


def test_a_certificate_user_reaches_the_backend_as_themselves(realm: Realm) -> None:
    """alice's certificate: S4U2Self + S4U2Proxy, and the real acceptor serves alice@<realm>."""
    status, body = realm.get("/Microsoft-Server-ActiveSync", "alice")
    assert status == 200, body
    assert json.loads(body)["principal"] == f"alice@{realm.name}"
    line = realm.gateway.wait_event("request", principal=f"alice@{realm.name}", status=200)
    assert line["spn"].startswith("HTTP/cas.")


def test_the_second_request_is_served_from_the_ticket_cache(realm: Realm) -> None:
    """bob's second request costs the KDC nothing: the summary line says the impersonation was cached."""
    for _ in range(2):
        status, body = realm.get("/owa/", "bob")
        assert status == 200, body
    line = realm.gateway.wait_event("request", principal=f"bob@{realm.name}", impersonation_cached=True)
    assert line["status"] == 200


def test_a_disabled_user_is_refused_with_403_and_the_log_names_the_account(realm: Realm) -> None:
    """dave is disabled in the directory: 403 saying so, and the refusal is logged with a fix."""
    status, body = realm.get("/owa/", "dave")
    assert status == 403
    assert f"the account dave@{realm.name} is disabled" in body
    event = realm.gateway.wait_event("kerberos_refused", principal=f"dave@{realm.name}")
    assert "dave" in event["fix"]


def test_an_unknown_user_is_refused_with_403(realm: Realm) -> None:
    """A certificate for a name the directory does not have: 403, no Kerberos account matches."""
    status, body = realm.get("/owa/", "ghost")
    assert status == 403
    assert f"no Kerberos account matches ghost@{realm.name}" in body


def test_an_spn_outside_the_delegation_list_is_refused_with_the_fix(realm: Realm) -> None:
    """A route to a real service that is not in the gateway's delegation list: 403, and the log says to add it."""
    status, body = realm.get("/not-delegable/x", "alice")
    assert status == 403
    assert f"may not act for alice@{realm.name} at {realm.other_spn}" in body
    event = realm.gateway.wait_event("kerberos_refused", principal=f"alice@{realm.name}")
    assert f"{realm.other_spn} is not in the delegation list" in event["fix"]
