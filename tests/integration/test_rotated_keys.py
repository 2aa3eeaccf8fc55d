"""The gateway's own key rotated at the lab's KDC (kvno + 1) before, or while, its keytab holds the new one.

Each test makes a gateway principal of its own in the lab realm (`+ok_to_auth_as_delegate`, HTTP/cas.lab.test in
its `krbAllowedToDelegateTo`) with a keytab of its own, so changing its key disturbs no other test. `cpw -randkey`
changes the key at the KDC only: the gateway's TGT (sealed in krbtgt's key) stays good, S4U2Self and S4U2Proxy
still succeed, but the evidence ticket, sealed in the new key, cannot be opened with the keytab, so its PAC cannot
be read. `ktadd -norandkey` then writes the KDC's current key into the keytab, as an operator (or `msktutil`,
`ktpass`) does some time after a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import gssapi
import pytest

from proxy.admin import READY_CACHE_SECONDS, Readiness
from proxy.auth.shared import SharedTable
from proxy.config import Kerberos
from proxy.errors import KerberosMisconfigured
from proxy.identity.principal import UserPrincipal
from proxy.kerberos.delegate import Delegator
from proxy.lab import kdc
from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog
from proxy.lab.layout import BACKEND_SERVICE, PROXY_SERVICE, REALM, LabLayout
from proxy.live import Live
from tests.integration.conftest import curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


@dataclass(frozen=True)
class Gateway:
    """A gateway principal of the lab realm with a keytab of its own."""

    principal: str  # without the realm
    keytab: Path

    def settings(self, lab: LabLayout) -> Kerberos:
        return Kerberos(principal=f"{self.principal}@{REALM}", keytab=self.keytab, krb5_config=lab.krb5_conf)


def _kadmin(lab: LabLayout, query: str) -> None:
    env = {**os.environ, **lab.env()}
    done = subprocess.run(
        ["kadmin.local", "-q", query], capture_output=True, text=True, env=env, timeout=30, check=True
    )
    assert "error" not in done.stderr.lower(), done.stderr


def _new_user(lab: LabLayout) -> UserPrincipal:
    name = f"rk{uuid.uuid4().hex[:10]}"
    _kadmin(lab, f"addprinc -randkey {name}")
    return UserPrincipal(upn=f"{name}@lab.test", principal=f"{name}@{REALM}", realm=REALM, source="test")


@contextlib.contextmanager
def gateway_principal(lab: LabLayout, directory: Path, options: str = "") -> Iterator[Gateway]:
    """A principal like the lab gateway's (protocol transition, delegation to HTTP/cas.lab.test) with kadmin's
    `options` too (e.g. `-maxlife "2 minutes"`), its keytab in `directory`; deleted at the end."""
    principal = f"HTTP/rot-{uuid.uuid4().hex[:8]}.lab.test"
    keytab = directory / "gateway.keytab"
    _kadmin(lab, f"addprinc -randkey +ok_to_auth_as_delegate {options} {principal}")
    try:
        _kadmin(lab, f"ktadd -k {keytab} -norandkey {principal}")
        modify = [f"dn: {kdc.principal_dn(principal)}", "changetype: modify", "replace: krbAllowedToDelegateTo"]
        kdc._ldap(lab, "ldapmodify", [*modify, f"krbAllowedToDelegateTo: {BACKEND_SERVICE}@{REALM}"])
        yield Gateway(principal, keytab)
    finally:
        _kadmin(lab, f"delprinc -force {principal}")


@pytest.fixture
def own_gateway(lab: LabLayout, tmp_path: Path) -> Iterator[Gateway]:
    """`gateway_principal` for one test."""
    with gateway_principal(lab, tmp_path) as made:
        yield made


def _exchanges(kdc_log: KdcLog, user: UserPrincipal) -> tuple[int, int]:
    """(S4U2Self, S4U2Proxy) requests the KDC logged for `user` since `kdc_log` was made."""
    requests = [r for r in kdc_log.settled() if r.user == user.principal]
    return sum(r.extension == S4U2SELF for r in requests), sum(r.extension == S4U2PROXY for r in requests)


def test_a_user_refused_while_the_keytab_was_stale_is_served_once_it_is_current(
    lab: LabLayout, own_gateway: Gateway
) -> None:
    """The key rotated at the KDC, the keytab not yet: a new user's evidence ticket cannot be opened, the operator's
    502 (`kerberos_misconfigured`, was the user's 403 `kdc_account_mismatch` "cannot be verified") whose fix names
    kerberos.keytab, the key version the KDC sealed the ticket in and the one the keytab holds, and nothing of that
    exchange is kept (S4U2Proxy is not even asked for). Once the keytab holds the new key the same user is served at
    the next request, after a fresh exchange, not refused from the cache until the unverifiable ticket would have
    expired (hours)."""
    user, earlier = _new_user(lab), _new_user(lab)

    async def run() -> None:
        delegator = Delegator(own_gateway.settings(lab))
        try:
            await delegator.delegation(earlier, SPN, TARGET)  # the gateway's TGT, from the key it has
            _kadmin(lab, f"cpw -randkey {own_gateway.principal}")  # kvno + 1 at the KDC; the keytab is stale
            kdc_log = KdcLog(lab.kdc_log)
            with pytest.raises(KerberosMisconfigured) as refused:
                await delegator.delegation(user, SPN, TARGET)
            assert refused.value.reason == "the gateway's Kerberos set-up is incomplete"
            hint = refused.value.hint or ""
            assert f"the KDC sealed it in key version 2 of {own_gateway.principal}@{REALM}" in hint, hint
            assert f"{own_gateway.keytab} holds version 1 only" in hint, hint
            assert "ktadd -norandkey" in hint, hint
            assert _exchanges(kdc_log, user) == (1, 0)
            assert len(delegator) == 1  # the earlier user's entry only

            _kadmin(lab, f"ktadd -k {own_gateway.keytab} -norandkey {own_gateway.principal}")
            kdc_log = KdcLog(lab.kdc_log)
            served = await delegator.delegation(user, SPN, TARGET)
            assert (served.principal, served.impersonation_cached) == (user.principal, False)
            assert served.account.client == user.principal
            assert _exchanges(kdc_log, user) == (1, 1)
            again = await delegator.delegation(earlier, SPN, TARGET)  # its ticket, sealed in cas's key, serves on
            assert again.impersonation_cached
        finally:
            delegator.close()

    asyncio.run(run())


def test_through_the_gateway_a_user_refused_in_the_window_is_served_once_the_keytab_is_rewritten(
    lab: LabLayout, own_gateway: Gateway, tmp_path: Path
) -> None:
    """The running gateway with a principal of its own, as deployed (no `[reload] watch`, nobody sends SIGHUP: a
    reload would empty the ticket cache): alice served; the key rotated at the KDC; bob, new, 502 with the operator's
    `kerberos_misconfigured` naming the keytab (was 403 "cannot be verified", `kdc_account_mismatch`: the user did
    nothing wrong); the keytab rewritten with the new key (as `msktutil --auto-update` from cron does); bob's next
    request is served as bob, not refused from a cached ticket for the rest of its life."""
    text = lab_config(lab, port=free_port())
    text = text.replace(f'principal = "{PROXY_SERVICE}@{REALM}"', f'principal = "{own_gateway.principal}@{REALM}"', 1)
    text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{own_gateway.keytab}"', 1)
    assert f"{own_gateway.principal}@{REALM}" in text
    assert str(own_gateway.keytab) in text
    gw = start_gateway(lab, tmp_path / "gateway", text)
    try:
        done = curl(lab, f"{gw.url}/owa/", "alice")
        assert done.stdout.endswith("\n200"), done.stdout + done.stderr
        _kadmin(lab, f"cpw -randkey {own_gateway.principal}")
        gw.mark()
        done = curl(lab, f"{gw.url}/owa/", "bob")
        assert done.stdout.endswith("\n502"), done.stdout + done.stderr
        assert "the gateway's Kerberos set-up is incomplete" in done.stdout
        event = gw.wait_event("kerberos_misconfigured", principal=f"bob@{REALM}")
        assert "kerberos.keytab" in event["fix"], event
        assert "key version 2" in event["fix"], event
        assert not gw.events("kdc_account_mismatch", gw.since)

        _kadmin(lab, f"ktadd -k {own_gateway.keytab} -norandkey {own_gateway.principal}")
        gw.mark()
        done = curl(lab, f"{gw.url}/owa/", "bob")
        assert done.stdout.endswith("\n200"), done.stdout + done.stderr
        line = gw.wait_event("request", upn="bob@lab.test")
        assert (line["principal"], line["impersonation_cached"]) == (f"bob@{REALM}", False), line
        assert not gw.events("reloaded", gw.since)
    finally:
        gw.stop()


def _preauth_failures(lab: LabLayout, offset: int, principal: str) -> int:
    """PREAUTH_FAILED lines the KDC logged for `principal` after `offset` (once its log is quiet)."""
    KdcLog(lab.kdc_log).settled()
    with lab.kdc_log.open(errors="replace") as f:
        f.seek(offset)
        return sum("PREAUTH_FAILED" in line and f"{principal}@{REALM} for krbtgt/" in line for line in f)


def test_readiness_offers_a_refused_key_once_until_the_keytab_changes(lab: LabLayout, tmp_path: Path) -> None:
    """/readyz's KDC probe (`Readiness`, a fresh AS exchange each time its answer is older than READY_CACHE_SECONDS)
    with a keytab the KDC refuses (the key changed at the KDC, preauthentication required, as in AD): five probes,
    each past the cache, are five "not ready" answers naming the fix, but the stale key goes to the KDC once, as the
    serving `Delegator` already does (in AD each try is a bad password, and a balancer asking every few seconds
    locked the account before anyone exported the keytab again). Once the file changes, the next probe asks again
    and is ready. Before, every probe made an AS exchange with the refused key."""
    with gateway_principal(lab, tmp_path, "+requires_preauth") as own:
        _kadmin(lab, f"cpw -randkey {own.principal}")
        offset = lab.kdc_log.stat().st_size
        now = [0.0]
        delegator = Delegator(own.settings(lab))
        gateway = SimpleNamespace(delegator=delegator)
        live = cast(Live, SimpleNamespace(config=SimpleNamespace(kerberos=own.settings(lab)), gateway=gateway))
        readiness = Readiness(live, clock=lambda: now[0])

        async def probes() -> tuple[list[str | None], str | None]:
            stale = []
            for _ in range(5):
                stale.append(await readiness.kdc_problem())
                now[0] += READY_CACHE_SECONDS + 1
            _kadmin(lab, f"ktadd -k {own.keytab} -norandkey {own.principal}")
            return stale, await readiness.kdc_problem()

        try:
            stale, current = asyncio.run(probes())
        finally:
            readiness.close()
            delegator.close()
        assert stale[0] is not None
        assert "keytab" in stale[0]
        assert stale == [stale[0]] * 5
        assert current is None
        assert _preauth_failures(lab, offset, own.principal) == 1


def _own_gateway_config(lab: LabLayout, own: Gateway, extra: str = "") -> str:
    """The lab gateway's configuration with `own`'s principal and keytab instead of the lab's."""
    text = lab_config(lab, port=free_port(), extra=extra)
    text = text.replace(f'principal = "{PROXY_SERVICE}@{REALM}"', f'principal = "{own.principal}@{REALM}"', 1)
    text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{own.keytab}"', 1)
    assert f"{own.principal}@{REALM}" in text
    assert str(own.keytab) in text
    return text


def _get(url: str) -> tuple[int, dict[str, object]]:
    """GET `url` (the admin listener, plain HTTP on loopback): (status, the JSON body)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310  a loopback test URL
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("first", ["request", "readyz"])
def test_requests_and_readyz_offer_a_refused_key_once_between_them(lab: LabLayout, tmp_path: Path, first: str) -> None:
    """The gateway's key changed at the KDC before its first request (preauthentication required, as in AD), so the
    keytab's key is refused. A request (502) and /readyz (503 naming the keytab), in either order, then another
    request: the stale key went to the KDC once between them, not once for the serving Delegator and once more for
    /readyz's probe (each a bad password against the account in AD; with a memory each, as before, two). Once the
    keytab holds the KDC's key, both agree again: /readyz is ready and the request is served."""
    admin = free_port()
    with gateway_principal(lab, tmp_path, "+requires_preauth") as own:
        _kadmin(lab, f"cpw -randkey {own.principal}")
        gw = start_gateway(
            lab, tmp_path / "gateway", _own_gateway_config(lab, own, f'\n[admin]\nbind = "127.0.0.1:{admin}"\n')
        )
        readyz = f"http://127.0.0.1:{admin}/readyz"
        try:
            offset = lab.kdc_log.stat().st_size
            steps = ["request", "readyz"] if first == "request" else ["readyz", "request"]
            for step in [*steps, "request"]:
                if step == "request":
                    done = curl(lab, f"{gw.url}/owa/", "bob")
                    assert done.stdout.endswith("\n502"), done.stdout + done.stderr
                else:
                    status, body = _get(readyz)
                    assert status == 503, body
                    assert "keytab" in str(body["kdc"]), body
            assert _preauth_failures(lab, offset, own.principal) == 1

            _kadmin(lab, f"ktadd -k {own.keytab} -norandkey {own.principal}")
            eventually(lambda: _get(readyz)[0] == 200, "/readyz ready once the keytab holds the KDC's key")
            done = curl(lab, f"{gw.url}/owa/", "bob")
            assert done.stdout.endswith("\n200"), done.stdout + done.stderr
        finally:
            gw.stop()


def _readyz(url: str, sock: Path | None = None) -> tuple[int, dict[str, Any]]:
    """GET /readyz at `url` (over the Unix socket `sock` if given): (status, its JSON body)."""
    args = ["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}"]
    args += ["--unix-socket", str(sock)] if sock is not None else []
    done = subprocess.run([*args, f"{url}/readyz"], capture_output=True, text=True, timeout=90, check=True)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(body)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_running_gateway_offers_a_refused_key_once_whoever_asks(lab: LabLayout, tmp_path: Path, workers: int) -> None:
    """A real gateway (admin listener on a port and on a Unix socket; one worker, or two) whose keytab the KDC refuses
    (its key changed at the KDC before the start, preauthentication required, as in AD): device requests (502, the
    gateway's own AS exchange refused) and /readyz on both admin listeners (503, naming the keytab) all say so, but
    the stale key goes to the KDC once in all, not once for the request path and once more for each admin listener's
    readiness check, nor once per worker (in AD each is a bad password against the gateway's account, and a lockout
    threshold of a few is common). Once the keytab holds the KDC's key, /readyz is 200 again and a device is
    served."""
    with gateway_principal(lab, tmp_path, "+requires_preauth") as own:
        _kadmin(lab, f"cpw -randkey {own.principal}")
        offset = lab.kdc_log.stat().st_size
        sock = tmp_path / "admin.sock"
        admin = f"127.0.0.1:{free_port()}"
        text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\nsocket = "{sock}"\n')
        text = text.replace(f'principal = "{PROXY_SERVICE}@{REALM}"', f'principal = "{own.principal}@{REALM}"', 1)
        text = text.replace(f'keytab = "{lab.proxy_keytab}"', f'keytab = "{own.keytab}"', 1)
        text = text.replace("[listener]\n", f"[listener]\nworkers = {workers}\n", 1)
        gw = start_gateway(lab, tmp_path / "gateway", text)
        try:
            gw.wait_event("admin_listening", socket=str(sock))
            for _ in range(3 * workers):  # new connections: the kernel spreads them over the workers
                done = curl(lab, f"{gw.url}/owa/", "alice")
                assert done.stdout.endswith("\n502"), done.stdout + done.stderr
                for status, body in (_readyz(f"http://{gw.admin}"), _readyz("http://localhost", sock)):
                    assert status == 503, body
                    assert "keytab" in body["kdc"], body
            assert _preauth_failures(lab, offset, own.principal) == 1

            _kadmin(lab, f"ktadd -k {own.keytab} -norandkey {own.principal}")
            eventually(lambda: _readyz(f"http://{gw.admin}")[0] == 200, "/readyz 200 with the keytab current")
            eventually(lambda: _readyz("http://localhost", sock)[0] == 200, "the socket's /readyz 200 too")
            done = curl(lab, f"{gw.url}/owa/", "alice")
            assert done.stdout.endswith("\n200"), done.stdout + done.stderr
        finally:
            gw.stop()


def test_a_reload_to_another_principal_of_the_same_keytab_offers_its_key(lab: LabLayout, tmp_path: Path) -> None:
    """One keytab file holding two gateway principals' keys, the first's stale (changed at the KDC, preauthentication
    required, as in AD): with workers, the workers' table keeps the first's refusal. A reload naming the second
    principal (the operator's fix) builds a new Delegator on the same table: its key, never offered, goes to the KDC
    and is accepted. Before, the table kept the refusal by the keytab's path alone, and refused the second principal
    from memory, without the KDC, until the file changed."""
    with gateway_principal(lab, tmp_path, "+requires_preauth") as stale, gateway_principal(lab, tmp_path) as good:
        assert good.keytab == stale.keytab  # one file, both principals' keys
        _kadmin(lab, f"cpw -randkey {stale.principal}")
        table = SharedTable(max_keys=64, max_known=64)
        first = Delegator(stale.settings(lab), shared=table)
        try:
            with pytest.raises(gssapi.raw.GSSError):
                first.fresh_credentials()
        finally:
            first.close()
        reloaded = Delegator(Gateway(good.principal, stale.keytab).settings(lab), shared=table)
        try:
            creds = reloaded.fresh_credentials()
            assert str(creds.name) == f"{good.principal}@{REALM}"
        finally:
            reloaded.close()


def test_a_keytab_rewritten_in_place_with_its_size_and_mtime_is_offered_again(lab: LabLayout, tmp_path: Path) -> None:
    """A stale keytab refused (in this process's memory and the workers' table), then written again in place with the
    KDC's current key: the same inode, the same size (same principal, same enctypes) and its mtime set back (`cp -p`,
    `rsync -t`, `install -p` from a source with normalised mtimes). The file's content changed, so the key is offered
    again and accepted. Before, the memory compared (inode, size, mtime) alone and kept refusing until some other
    write."""
    with gateway_principal(lab, tmp_path, "+requires_preauth") as own:
        _kadmin(lab, f"cpw -randkey {own.principal}")
        table = SharedTable(max_keys=64, max_known=64)
        delegator = Delegator(own.settings(lab), shared=table)
        try:
            with pytest.raises(gssapi.raw.GSSError):
                delegator.fresh_credentials()
            current = tmp_path / "current.keytab"
            _kadmin(lab, f"ktadd -k {current} -norandkey {own.principal}")
            before = own.keytab.stat()
            assert current.stat().st_size == before.st_size  # only the content tells them apart
            with own.keytab.open("r+b") as f:
                f.write(current.read_bytes())
            os.utime(own.keytab, ns=(before.st_atime_ns, before.st_mtime_ns))
            after = own.keytab.stat()
            assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
            assert after.st_mtime_ns == before.st_mtime_ns
            creds = delegator.fresh_credentials()
            assert str(creds.name) == f"{own.principal}@{REALM}"
            other = Delegator(own.settings(lab), shared=table)  # a worker with no memory of its own: the table's
            try:
                assert str(other.fresh_credentials().name) == f"{own.principal}@{REALM}"
            finally:
                other.close()
        finally:
            delegator.close()
