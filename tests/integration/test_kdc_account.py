"""The KDC-account check when an evidence ticket names no account (`kerberos.kdc_account`), against the lab's KDC.

The lab's KDC (MIT 1.20) puts a PAC in its tickets that names no account (the client's name and signatures
only): `auto` serves it, `require` refuses it. A ticket with no PAC at all is what Windows AD issues to a
gateway account flagged NO_AUTH_DATA_REQUIRED; neither KDC here can issue one to S4U2Self (MIT 1.20 refuses
S4U2Self on a TGT without a PAC, `S4U2SELF_NO_PAC`, and Samba 4.17 keeps the PAC despite the flag:
`test_ad_mapping.py` pins that), so the in-process tests take a real S4U2Self from the lab and replace only the
PAC's reading with "none": `auto` then refuses before S4U2Proxy asks the KDC for anything, and `optional`
goes on with a `kdc_account_unverified` warning.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import gssapi
import pytest
import structlog

from proxy.config import KdcAccountPolicy, Kerberos
from proxy.errors import AccountMismatch
from proxy.identity.principal import UserPrincipal
from proxy.kerberos.delegate import Delegation, Delegator
from proxy.kerberos.pac import PacFacts
from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog
from proxy.lab.layout import PROXY_SERVICE, REALM, LabLayout
from tests.integration.conftest import REPO, curl, free_port, lab_config, start_gateway

SPN, TARGET = "HTTP/cas.lab.test", "HTTP@cas.lab.test"


def _without_pac(self: Delegator, creds: gssapi.Credentials) -> tuple[PacFacts | None, str | None]:
    """The evidence ticket read as carrying no PAC (what AD's NO_AUTH_DATA_REQUIRED gives)."""
    return None, None


def _delegate(
    lab: LabLayout, user: str, policy: KdcAccountPolicy, monkeypatch: pytest.MonkeyPatch, *, pac: bool = False
) -> Delegation:
    """One delegation of `user` through a Delegator on the lab's KDC whose evidence tickets read as PAC-less
    (with `pac`, as the KDC issued them: MIT's PAC naming no account)."""
    if not pac:
        monkeypatch.setattr(Delegator, "_evidence_pac", _without_pac)
    settings = Kerberos(
        principal=f"{PROXY_SERVICE}@{REALM}", keytab=lab.proxy_keytab, krb5_config=lab.krb5_conf, kdc_account=policy
    )
    principal = UserPrincipal(upn=f"{user}@lab.test", principal=f"{user}@{REALM}", realm=REALM, source="test")

    async def run() -> Delegation:
        delegator = Delegator(settings)
        try:
            return await delegator.delegation(principal, SPN, TARGET)
        finally:
            delegator.close()

    return asyncio.run(run())


def test_auto_refuses_a_ticket_without_a_pac_before_s4u2proxy(lab: LabLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (auto): an evidence ticket without a PAC is AccountMismatch (403) with the NO_AUTH_DATA_REQUIRED
    fix, and the KDC saw S4U2Self only: nothing more was asked on a ticket that names nobody."""
    kdc = KdcLog(lab.kdc_log)
    with pytest.raises(AccountMismatch) as refused:
        _delegate(lab, "alice", "auto", monkeypatch)
    assert refused.value.status == 403
    assert refused.value.reason == "the KDC's account for alice@LAB.TEST cannot be verified"
    assert "NO_AUTH_DATA_REQUIRED" in (refused.value.hint or "")
    assert kdc.settled()
    assert (kdc.count()[S4U2SELF], kdc.count()[S4U2PROXY]) == (1, 0)


def test_optional_goes_on_without_a_pac_and_warns(lab: LabLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """kdc_account = "optional": the same ticket is delegated (S4U2Proxy follows), the account is "not stated (the
    ticket carries no PAC)", and kdc_account_unverified is logged with the fix: never served silently."""
    with structlog.testing.capture_logs() as logs:
        delegation = _delegate(lab, "bob", "optional", monkeypatch)
    assert str(delegation.account) == (
        "not stated (the ticket carries no PAC; its client bob@LAB.TEST is the principal asked for)"
    )
    warning = next(e for e in logs if e["event"] == "kdc_account_unverified")
    assert warning["log_level"] == "warning"
    assert "NO_AUTH_DATA_REQUIRED" in warning["fix"]


def test_require_refuses_mits_pac_naming_no_account(lab: LabLayout, tmp_path: Path) -> None:
    """kdc_account = "require" (for AD) in front of the MIT lab, whose PAC names nobody: curl gets 403 at kerberos,
    the fix says to use auto for an MIT realm, nothing reaches the backend. The default serves the same user
    (test_gateway pins that)."""
    text = lab_config(lab, port=free_port()).replace("[kerberos]\n", '[kerberos]\nkdc_account = "require"\n')
    gw = start_gateway(lab, tmp_path, text)
    try:
        done = curl(lab, gw.url + "/owa/", "bob")
        body, _, status = done.stdout.rpartition("\n")
        assert status == "403", body
        assert "the KDC's account for bob@LAB.TEST cannot be verified" in body
        assert 'use "auto" for an MIT realm' in gw.wait_event("kdc_account_mismatch", upn="bob@lab.test")["fix"]
        assert "backend" not in gw.wait_event("request", upn="bob@lab.test")["ms"]
    finally:
        gw.stop()


def test_check_config_refuses_optional_beside_a_directory(lab: LabLayout, tmp_path: Path) -> None:
    """check-config: kdc_account = "optional" with a [directory] (the realm is Active Directory) names the key."""
    text = lab_config(lab, port=free_port()).replace("[kerberos]\n", '[kerberos]\nkdc_account = "optional"\n')
    text = text.replace("[identity]\n", '[identity]\nmapping = "strong"\n')
    text += f'\n[directory]\nurls = ["ldap://dc-{uuid.uuid4().hex[:6]}.ad.test"]\nbase_dn = "DC=ad,DC=test"\n'
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    argv = [sys.executable, "-m", "proxy", "check-config", str(path)]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert res.returncode == 1
    assert 'kerberos.kdc_account: "optional" serves evidence tickets without a PAC' in res.stdout + res.stderr


def test_auto_serves_mits_pac_when_the_client_is_the_principal_asked_for(
    lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real S4U2Self for carol under auto: MIT's PAC names no account, the evidence ticket's client is
    carol@LAB.TEST as asked, the delegation goes on and its account says so."""
    delegation = _delegate(lab, "carol", "auto", monkeypatch, pac=True)
    assert (delegation.account.rule, delegation.account.client) == ("none", "carol@LAB.TEST")
    assert delegation.principal == "carol@LAB.TEST"


@pytest.mark.parametrize("policy", ["auto", "optional"])
def test_a_ticket_for_another_client_is_refused_before_s4u2proxy(
    lab: LabLayout, monkeypatch: pytest.MonkeyPatch, policy: KdcAccountPolicy
) -> None:
    """The KDC hands back an evidence ticket for another principal than asked (an alias, a canonicalising KDC;
    here the S4U2Self is really made for bob while the certificate's principal is alice): MIT's PAC names no
    account, so the ticket's client is compared, and alice is refused 403 kdc_account_mismatch before
    S4U2Proxy: the KDC saw one S4U2Self and nothing was delegated as bob."""
    import proxy.kerberos.delegate as delegate

    asked = gssapi.Name(f"bob@{REALM}", gssapi.NameType.kerberos_principal)
    monkeypatch.setattr(delegate, "user_name", lambda user: asked)
    kdc = KdcLog(lab.kdc_log)
    with pytest.raises(AccountMismatch) as refused:
        _delegate(lab, "alice", policy, monkeypatch, pac=policy == "auto")
    assert refused.value.status == 403
    assert refused.value.reason == "the KDC's account for alice@LAB.TEST is not the certificate's"
    assert "impersonated bob@LAB.TEST when asked for alice@LAB.TEST" in (refused.value.hint or "")
    assert kdc.settled()
    assert (kdc.count()[S4U2SELF], kdc.count()[S4U2PROXY]) == (1, 0)
