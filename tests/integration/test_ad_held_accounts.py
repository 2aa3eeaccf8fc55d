"""A request held at the backend outliving its account, in every authentication mode, against the Samba AD DC.

test_ad_held_mapping.py pins the strong modes, where the directory decided the request on its way in. Here the
directory is configured but did not decide it: a Basic sign-in (the KDC checked the password) and a certificate
under `mapping = "upn"` (the KDC impersonated the UPN). An ActiveSync Ping of either is held at the backend for up
to an hour; the account is disabled in Samba meanwhile, and the held Ping must end with 403 within `cache_seconds`
and one search, another user's held Ping must be left alone, and a directory that does not answer must end
nothing (fail open: docs/strong-mapping.md says why). The device is a small TLS client inside the realm's
namespace that sends the Ping with `Expect: 100-continue`: the gateway answers `100 Continue` only once every stage
said yes and it forwards, so that interim answer is the witness that the Ping is held at the backend.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _start, ad_curl, status_and_body
from tests.integration.jsonlog import WAIT
from tests.integration.test_ad_held_mapping import _DEVICE, _certificate

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

HOLD = 40  # seconds the backend holds an ended Ping; the gateway must end it long before
KEPT = 110  # seconds the backend holds a Ping the test ends itself (X-Lab-Release), under the device's 120 s read
EVERY = 2  # [directory] cache_seconds: the sweep's period


@dataclass
class _User:
    name: str
    password: str

    @property
    def upn(self) -> str:
        return f"{self.name}@{ad.DNS_DOMAIN}"

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.upn}:{self.password}".encode()).decode()


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the DC's name in the namespace's hosts file (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


def _user(realm: ad.AdRealm, prefix: str = "ha") -> Iterator[_User]:
    """An account of this test's own, its name starting `prefix` (the realm is shared by the run's workers), deleted
    after."""
    user = _User(f"{prefix}{secrets.token_hex(4)}", f"{prefix.capitalize()}-{secrets.token_hex(8)}-Pa55")
    realm.samba_tool("user", "create", user.name, user.password)
    try:
        yield user
    finally:
        realm.samba_tool("user", "delete", user.name)


@pytest.fixture
def user(realm: ad.AdRealm) -> Iterator[_User]:
    yield from _user(realm)


@pytest.fixture
def other(realm: ad.AdRealm) -> Iterator[_User]:
    yield from _user(realm)


def _gateway(
    realm: ad.AdRealm,
    where: Path,
    backend: AdProcess,
    *,
    urls: tuple[str, ...] | None = None,
    mapping: str = "upn",
    mode: str = "certificate-or-basic",
    workers: int = 1,
) -> AdProcess:
    """A gateway under `mapping` that takes a certificate or else Basic (`mode`), with the realm's directory (or
    `urls`) configured, swept every EVERY seconds; in `workers` processes."""
    where.mkdir(parents=True, exist_ok=True)
    port = realm.free_port()
    table = ad_mapping.directory_table(realm, urls=urls, cache_seconds=EVERY)
    text = ad_mapping.gateway_config(realm, mapping, port=port, backend_port=backend.port, directory_text=table)
    bind = f'bind = "127.0.0.1:{port}"\n'
    assert bind in text
    text = text.replace(bind, f"{bind}workers = {workers}\n")
    text += f'\n[authentication]\nmode = "{mode}"\n'
    config = where / "gateway.toml"
    config.write_text(text)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    return _start(realm, argv, port, where / "gateway.log", scheme="https")


class _Ping:
    """A device's Ping held at the backend: started, then its answer read."""

    def __init__(
        self,
        realm: ad.AdRealm,
        gw: AdProcess,
        hold: int,
        *,
        basic: str = "",
        cert: tuple[Path, Path] | None = None,
        until: str = "",
    ) -> None:
        """`until`: the backend holds the Ping until a request sends `X-Lab-Release: until` (or `hold` ends)."""
        held = f"{hold}/{until}" if until else str(hold)
        argv = [sys.executable, "-c", _DEVICE, str(gw.port), str(realm.pki.root_cert), held, basic]
        argv += [str(cert[0]), str(cert[1])] if cert is not None else []
        self.proc = subprocess.Popen(realm.netns_argv(argv), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        interim = json.loads(self.proc.stdout.readline() or "{}")
        assert interim.get("interim", "").startswith("HTTP/1.1 100"), interim  # held at the backend now

    def answer(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        answer: dict[str, object] = json.loads(self.proc.stdout.readline() or "{}")
        assert self.proc.wait(timeout=WAIT) == 0
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _ended_within_a_sweep(ping: _Ping) -> dict[str, object]:
    """The Ping's answer, which must come within a sweep's period and one search of now (the account's change)."""
    changed = time.monotonic()
    answer = ping.answer()
    ended_after = time.monotonic() - changed
    assert answer.get("status") == "403", answer
    assert ended_after < EVERY + 5, (ended_after, answer)  # the first sweep after the change, its search, load
    return answer


@pytest.mark.parametrize("sign_in", ["basic", "upn-certificate"])
def test_a_held_ping_is_ended_when_its_account_is_disabled_and_another_users_is_not(
    realm: ad.AdRealm, ad_backend: AdProcess, user: _User, other: _User, tmp_path: Path, sign_in: str
) -> None:
    """A Ping held by a Basic sign-in (or a certificate under `mapping = "upn"`) whose account is disabled in Samba
    is ended with 403 'the account is disabled' within cache_seconds and a search, `held_request_ended` saying
    why; the user's next request is refused (the KDC is asked again: no cached password or ticket serves it); a
    Ping another user holds meanwhile is served to its end. Before, nothing looked: the Ping ran on for the
    backend's whole hold (40 s here, up to an hour for Exchange) and ended 200."""
    gw = _gateway(realm, tmp_path / "gw", ad_backend)
    pings: list[_Ping] = []
    try:
        if sign_in == "basic":
            held = _Ping(realm, gw, HOLD, basic=user.basic)
        else:
            (tmp_path / "cert").mkdir()
            held = _Ping(realm, gw, HOLD, cert=_certificate(realm, tmp_path / "cert", user.upn))
        pings.append(held)
        key = f"others-{secrets.token_hex(6)}"  # the backend is shared: a key of this test's own
        others = _Ping(realm, gw, KEPT, basic=other.basic, until=key)  # held across sweeps until released below
        pings.append(others)
        gw.mark()
        realm.samba_tool("user", "disable", user.name)
        answer = _ended_within_a_sweep(held)
        assert others.proc.poll() is None  # still held when the sweep that ended the first Ping passed it over
        assert "the account is disabled" in str(answer["answer"])
        ended = gw.wait_event("held_request_ended", upn=user.upn if sign_in != "basic" else f"{user.name}@{ad.REALM}")
        assert "the account is disabled" in ended["reason"]
        assert "samba-tool user enable" in ended["fix"]
        assert others.proc.poll() is None  # still held: no sweep ended it
        release = ("-u", f"{other.upn}:{other.password}", "-H", f"X-Lab-Release: {key}")
        released = ad_curl(realm, f"{gw.url}/owa/", None, *release)
        assert status_and_body(released)[0] == 200, released.stdout
        kept = others.answer()
        assert kept.get("status") == "200", kept  # the other user's Ping was held until the test released it
        assert not [e for e in gw.events("held_request_ended", gw.since) if other.name in json.dumps(e)]
        if sign_in == "basic":  # the next request is the KDC's to judge again, not the cached password's
            again = ad_curl(realm, f"{gw.url}/owa/", None, "-u", f"{user.upn}:{user.password}")
        else:
            cert = tmp_path / "cert" / "device.pem", tmp_path / "cert" / "device.key"
            again = ad_curl(realm, f"{gw.url}/owa/", None, "--cert", str(cert[0]), "--key", str(cert[1]))
        status, body = status_and_body(again)
        assert status == 403, body
        assert "disabled" in body
    finally:
        for ping in pings:
            ping.stop()
        gw.stop()


def _until_both_workers_answered(realm: ad.AdRealm, gw: AdProcess, cert: tuple[Path, Path], status: int) -> None:
    """Requests of the certificate, each on a new connection (the kernel places each anew), until each of the two
    workers has answered one since `gw.mark()`: every answer must be `status`."""
    deadline = time.monotonic() + WAIT
    while True:
        done = ad_curl(realm, f"{gw.url}/owa/", None, "--cert", str(cert[0]), "--key", str(cert[1]))
        got, body = status_and_body(done)
        assert got == status, (got, body)
        answered = {e["pid"] for e in gw.events("request", gw.since) if e.get("path") == "/owa/"}
        if len(answered) == 2:
            return
        assert time.monotonic() < deadline, f"one worker answered every request: {answered}"


def test_with_two_workers_a_held_upn_users_end_drops_the_tickets_of_every_worker(
    realm: ad.AdRealm, ad_backend: AdProcess, user: _User, tmp_path: Path
) -> None:
    """`mapping = "upn"` in two workers: each has served the user's certificate (and cached the user's delegated
    tickets). A Ping of that certificate held in one of them is ended when the account is disabled; then no worker
    serves the user's next requests from its tickets: each is refused (403, the KDC asked again). Before, only the
    worker whose sweep ended the Ping dropped them, and the other served the disabled account (200) from its own
    until they ended (10 hours at AD) or `kerberos.ticket_recheck_seconds`; under the strong modes the mapping stage
    refuses the account on the way in, and a Basic password is dropped through the workers' shared table."""
    (tmp_path / "cert").mkdir()
    cert = _certificate(realm, tmp_path / "cert", user.upn)
    gw = _gateway(realm, tmp_path / "gw", ad_backend, workers=2)
    ping = None
    try:
        gw.mark()
        _until_both_workers_answered(realm, gw, cert, 200)  # both hold the user's tickets now
        ping = _Ping(realm, gw, HOLD, cert=cert)
        realm.samba_tool("user", "disable", user.name)
        answer = _ended_within_a_sweep(ping)
        assert "the account is disabled" in str(answer["answer"])
        gw.mark()
        _until_both_workers_answered(realm, gw, cert, 403)
    finally:
        if ping is not None:
            ping.stop()
        gw.stop()


def test_a_held_ping_with_a_certificate_and_a_password_is_still_judged_on_its_strong_mapping(
    realm: ad.AdRealm, ad_backend: AdProcess, user: _User, tmp_path: Path
) -> None:
    """`certificate-and-basic` under `mapping = "strong"`: a Ping held with both is judged on the certificate's
    mapping (its strong altSecurityIdentities entry removed: 403 'not strongly mapped'), not only on the account's
    state that a password alone would be judged on."""
    entry = "altSecurityIdentities: X509:<I>CN=Lab Issuing CA<SR>010a4d\n"
    dn = f"dn: CN={user.name},CN=Users,{realm.base_dn}\nchangetype: modify\n"
    realm.ldbmodify(dn + "replace: altSecurityIdentities\n" + entry)
    (tmp_path / "cert").mkdir()
    cert = _certificate(realm, tmp_path / "cert", user.upn)
    gw = _gateway(realm, tmp_path / "gw", ad_backend, mapping="strong", mode="certificate-and-basic")
    ping = None
    try:
        ping = _Ping(realm, gw, HOLD, basic=user.basic, cert=cert)
        gw.mark()
        realm.ldbmodify(dn + "delete: altSecurityIdentities\n")
        answer = _ended_within_a_sweep(ping)
        assert "not strongly mapped" in str(answer["answer"])
        assert "not strongly mapped" in gw.wait_event("held_request_ended", upn=user.upn)["reason"]
    finally:
        if ping is not None:
            ping.stop()
        gw.stop()


def test_a_directory_that_does_not_answer_ends_no_held_ping(
    realm: ad.AdRealm, ad_backend: AdProcess, user: _User, tmp_path: Path
) -> None:
    """No directory server answers (the only URL a port nobody listens on): the sweeps fail and end nothing, so a
    held Basic Ping whose account is disabled meanwhile is served to its end (fail open: the account was admitted
    by the KDC, and an outage is no verdict on it; docs/strong-mapping.md)."""
    dead = f"ldap://127.0.0.1:{realm.free_port()}"
    gw = _gateway(realm, tmp_path / "gw", ad_backend, urls=(dead,))
    ping = None
    try:
        gw.mark()
        ping = _Ping(realm, gw, 5 * EVERY, basic=user.basic)
        realm.samba_tool("user", "disable", user.name)
        gw.wait_event("directory_server_failed", url=dead)  # a sweep ran against the dead directory
        answer = ping.answer()
        assert answer.get("status") == "200", answer
        assert len(gw.events("directory_server_failed", gw.since)) >= 2, "the sweeps ran while it was held"
        assert not gw.events("held_request_ended", gw.since)
    finally:
        if ping is not None:
            ping.stop()
        gw.stop()


def test_an_expired_account_signing_in_with_basic_is_told_it_has_expired(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """ivan's accountExpires is in 2020 (the mapping realm). Samba refuses his right password with
    KDC_ERR_CLIENT_REVOKED, its one code for disabled, locked and expired: the 403 said 'disabled or locked'. With a
    [directory] configured the gateway asks it which: 'the account ivan@AD.TEST has expired', the fix names
    setexpiry; without one the reason names all three (tests/unit/test_hints.py)."""
    gw = _gateway(realm, tmp_path / "gw", ad_backend)
    try:
        gw.mark()
        status, body = status_and_body(ad_curl(realm, f"{gw.url}/owa/", None, "-u", "ivan@ad.test:Ivan-Ad-Pa55"))
        assert status == 403, body
        assert "the account ivan@AD.TEST has expired" in body
        refused = gw.wait_event("kerberos_refused")
        assert "setexpiry" in refused["fix"]
        assert "KDC_ERR_CLIENT_REVOKED" in refused["fix"]  # the KDC's words kept beside the directory's
    finally:
        gw.stop()
