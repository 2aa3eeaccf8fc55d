"""strong-or-audit and a certificate older than its account, against the Samba AD DC.

AD's compatibility mode (KB5014754) refuses a weakly mapped certificate whose notBefore is earlier than the
account's whenCreated, beyond the KDC's CertificateBackdatingCompensation: it may have been issued to an earlier
holder of the name. Each test here uses an account made for this module (a unique name, deleted afterwards)
and certificates from the lab CA whose notBefore is set against that account's whenCreated as Samba wrote it:
two hours before, half an hour before, the same second; and one with the account's SID extension, two hours
before. Gateways run inside the realm's namespace: `strong-or-audit` with the lab's one-hour compensation, the
same with AD's default (none), and `strong`; curl is the device.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.identity.sid import sid_extension
from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _start, status_and_body
from tests.integration.jsonlog import eventually

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

BACKDATED = timedelta(hours=1)  # the lab PKI writes notBefore an hour before the `now` it is given


@dataclass(frozen=True)
class Newcomer:
    """An account made after its certificates' notBefore, and those certificates (`<dir>/<label>.pem`, `.key`)."""

    name: str
    created: datetime  # whenCreated
    certs: Path

    @property
    def upn(self) -> str:
        return f"{self.name}@{ad.DNS_DOMAIN}"

    @property
    def principal(self) -> str:
        return f"{self.name}@{ad.REALM}"


def when_created(realm: ad.AdRealm, name: str) -> datetime:
    """The account's whenCreated as Samba stored it."""
    out = realm.ldbsearch(f"(sAMAccountName={name})", "whenCreated")
    found = re.search(r"^whenCreated: (\d{14})\.0Z$", out, re.MULTILINE)
    assert found is not None, out
    return datetime.strptime(found.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


@pytest.fixture(scope="module")
def newcomer(ad_mapping_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    """A fresh account (unique name: the realm is shared by the run's workers) and its four certificates."""
    realm = ad_mapping_realm
    name = f"nc{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", name, f"Nc-{secrets.token_hex(8)}-Pa55")
    try:
        created = when_created(realm, name)
        who = Newcomer(name, created, tmp_path_factory.mktemp("newcomer"))
        sid = sid_extension(ad_mapping.object_sid(realm, name))
        for label, not_before, extensions in (
            ("two-hours-older", created - timedelta(hours=2), []),
            ("half-hour-older", created - timedelta(minutes=30), []),
            ("same-second", created, []),
            ("two-hours-older-sid", created - timedelta(hours=2), [sid]),
        ):
            now = not_before + BACKDATED
            ad.issue_user_certificate(realm.pki, who.certs, label, who.upn, extensions=extensions, now=now)
        yield who
    finally:
        realm.samba_tool("user", "delete", name)


def start(
    realm: ad.AdRealm,
    directory: Path,
    backend: AdProcess,
    mode: str,
    compensation: int | None,
    cache_seconds: float = 300,
) -> AdProcess:
    """A gateway in the namespace with `mapping = mode`, `certificate_backdating_compensation = compensation`
    (None: the key left out, AD's default) and the directory's `cache_seconds`."""
    directory.mkdir(parents=True, exist_ok=True)
    port = realm.free_port()
    table = ad_mapping.directory_table(realm, cache_seconds=cache_seconds)
    text = ad_mapping.gateway_config(realm, mode, port=port, backend_port=backend.port, directory_text=table)
    line = f"certificate_backdating_compensation = {ad_mapping.LAB_BACKDATING_SECONDS}\n"
    assert line in text
    text = text.replace(line, "" if compensation is None else f"certificate_backdating_compensation = {compensation}\n")
    config = directory / "gateway.toml"
    config.write_text(text)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    return _start(realm, argv, port, directory / "gateway.log", scheme="https")


@pytest.fixture(scope="module")
def lab_audit(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """strong-or-audit with the lab's compensation, an hour (what `kcd-proxy lab up --ad` writes)."""
    gw = start(ad_mapping_realm, tmp_path_factory.mktemp("lab-audit"), ad_backend, "strong-or-audit", 3600)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def default_audit(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """strong-or-audit without the key: AD's default, no compensation."""
    gw = start(ad_mapping_realm, tmp_path_factory.mktemp("default-audit"), ad_backend, "strong-or-audit", None)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def strong(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    gw = start(ad_mapping_realm, tmp_path_factory.mktemp("strong"), ad_backend, "strong", None)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def long_cache_audit(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """strong-or-audit without compensation, and a directory cache of an hour: what the gateway looked up outlives
    the account's deletion for the whole test, as it does for `cache_seconds` (300 s by default) in a deployment."""
    gw = start(ad_mapping_realm, tmp_path_factory.mktemp("long-cache"), ad_backend, "strong-or-audit", None, 3600)
    yield gw
    gw.stop()


def curl(realm: ad.AdRealm, gw: AdProcess, who: Newcomer, label: str) -> tuple[int, str]:
    """The newcomer's certificate `label` through `gw` (marked first: the events waited for are this request's)."""
    gw.mark()
    argv = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert)]
    argv += ["--cert", str(who.certs / f"{label}.pem"), "--key", str(who.certs / f"{label}.key")]
    done = realm.run([*argv, "-w", "\n%{http_code}", f"{gw.url}/Microsoft-Server-ActiveSync"], timeout=60)
    return status_and_body(done)


def test_a_weak_certificate_two_hours_older_than_its_account_is_refused(
    ad_mapping_realm: ad.AdRealm, lab_audit: AdProcess, newcomer: Newcomer
) -> None:
    """strong-or-audit, an hour's compensation: the certificate whose notBefore is two hours before whenCreated
    is 403 at mapping with the reason; the log's fix gives both times, the key and the strong entry; the KDC
    and the backend see nothing."""
    status, body = curl(ad_mapping_realm, lab_audit, newcomer, "two-hours-older")
    assert status == 403, body
    assert "issued before its account was created and is only weakly mapped" in body
    event = lab_audit.wait_event("mapping_refused", upn=newcomer.upn)
    assert f"whenCreated {newcomer.created.isoformat()}" in event["fix"]
    assert "7200 s (2:00:00) before" in event["fix"]
    assert "certificate_backdating_compensation (3600 s (1:00:00))" in event["fix"]
    assert "altSecurityIdentities: X509:<I>" in event["fix"]
    line = lab_audit.wait_event("request", upn=newcomer.upn)
    assert (line["status"], line["refused_stage"]) == (403, "mapping"), line
    assert not {"kerberos", "backend"} & set(line["ms"]), line


def test_a_weak_certificate_within_the_compensation_is_served_with_the_warning(
    ad_mapping_realm: ad.AdRealm, lab_audit: AdProcess, newcomer: Newcomer
) -> None:
    """Half an hour older than the account, an hour's compensation: served as the newcomer, weakly mapped."""
    status, body = curl(ad_mapping_realm, lab_audit, newcomer, "half-hour-older")
    assert status == 200, body
    assert f'"principal": "{newcomer.principal}"' in body
    lab_audit.wait_event("weak_certificate_mapping", upn=newcomer.upn)
    assert lab_audit.wait_event("request", upn=newcomer.upn)["mapping"] == "weak-audit"


def test_without_the_key_no_backdating_is_allowed(
    ad_mapping_realm: ad.AdRealm, default_audit: AdProcess, newcomer: Newcomer
) -> None:
    """AD's default: half an hour older than the account is 403; notBefore in the account's own second is served."""
    status, body = curl(ad_mapping_realm, default_audit, newcomer, "half-hour-older")
    assert status == 403, body
    event = default_audit.wait_event("mapping_refused", upn=newcomer.upn)
    assert "1800 s (0:30:00) before" in event["fix"]
    assert "certificate_backdating_compensation (0 s (0:00:00))" in event["fix"]
    status, body = curl(ad_mapping_realm, default_audit, newcomer, "same-second")
    assert status == 200, body
    assert f'"principal": "{newcomer.principal}"' in body


@pytest.mark.parametrize("gateway", ["default_audit", "strong"])
def test_a_strongly_mapped_certificate_is_not_compared_with_the_account_age(
    ad_mapping_realm: ad.AdRealm, newcomer: Newcomer, gateway: str, request: pytest.FixtureRequest
) -> None:
    """Two hours older than the account but carrying its SID: served by rule sid-extension in strong-or-audit
    without compensation and in strong; the age only matters to a weak mapping."""
    gw: AdProcess = request.getfixturevalue(gateway)
    status, body = curl(ad_mapping_realm, gw, newcomer, "two-hours-older-sid")
    assert status == 200, body
    assert f'"principal": "{newcomer.principal}"' in body
    assert gw.wait_event("request", upn=newcomer.upn)["mapping"] == "sid-extension"


def test_an_account_deleted_and_made_again_is_not_decided_on_the_cached_one(
    ad_mapping_realm: ad.AdRealm, long_cache_audit: AdProcess, tmp_path: Path
) -> None:
    """The directory cache holds an account (looked up for a certificate refused at mapping); the account is deleted
    and made again a few seconds later: same name, new objectSid, new whenCreated. A weakly mapped certificate from
    the first account's second is older than the new account, yet the cached whenCreated admitted it, and the KDC
    impersonated the new account: served as its user. Now the evidence ticket's PAC SID is not the cached account's:
    403 `kdc_account_replaced` naming both SIDs, the cache entry and the tickets are dropped, and the next request,
    decided on a fresh look-up, is 403 at mapping: older than the account."""
    realm, gw = ad_mapping_realm, long_cache_audit
    name = f"rc{secrets.token_hex(4)}"
    password = f"Rc-{secrets.token_hex(8)}-Pa55"
    realm.samba_tool("user", "create", name, password)
    try:
        first, first_sid = when_created(realm, name), str(ad_mapping.object_sid(realm, name))
        who = Newcomer(name, first, tmp_path)
        for label, not_before in (("older", first - timedelta(hours=2)), ("same-second", first)):
            ad.issue_user_certificate(realm.pki, tmp_path, label, who.upn, now=not_before + BACKDATED)
        status, body = curl(realm, gw, who, "older")  # the look-up that fills the cache; nothing reaches the KDC
        assert status == 403, body
        assert gw.wait_event("request", upn=who.upn)["refused_stage"] == "mapping"

        realm.samba_tool("user", "delete", name)
        eventually(lambda: datetime.now(UTC) >= first + timedelta(seconds=2), "a later second than the first account's")
        realm.samba_tool("user", "create", name, password)
        second, second_sid = when_created(realm, name), str(ad_mapping.object_sid(realm, name))
        assert second > first
        assert second_sid != first_sid

        status, body = curl(realm, gw, who, "same-second")
        assert status == 403, body  # was 200, served as the new account
        event = gw.wait_event("kdc_account_replaced", upn=who.upn)
        assert f"SID {second_sid}" in event["fix"]
        assert first_sid in event["fix"]
        assert gw.wait_event("request", upn=who.upn)["refused_stage"] == "kerberos"

        status, body = curl(realm, gw, who, "same-second")
        assert status == 403, body
        assert "issued before its account was created" in body
        refused = gw.wait_event("mapping_refused", upn=who.upn)
        assert f"whenCreated {second.isoformat()}" in refused["fix"]
    finally:
        with contextlib.suppress(ad.AdRealmError):
            realm.samba_tool("user", "delete", name)
