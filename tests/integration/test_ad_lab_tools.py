"""The AD lab's tools (samba-tool, ldbmodify) failing against the real Samba realm: the error names the step, never
the password the step was given (`proxy.lab.tools`)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, kdc_log_offset

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


def _weak() -> str:
    """A password the domain's policy refuses (lower-case letters only: one character class of the three needed)."""
    return "weak" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(16))


def _strong() -> str:
    return f"Lt-{secrets.token_hex(8)}-Pa55"


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("existing name", lambda password: ("user", "create", "alice", password)),
        ("refused by policy", lambda password: ("user", "create", f"lt{secrets.token_hex(4)}", password)),
        ("invalid name", lambda password: ("user", "create", "bad/name*?", password)),
        ("no such user", lambda password: ("user", "setpassword", "nobody-here", f"--newpassword={password}")),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_failing_samba_tool_step_names_the_command_but_not_the_password(
    ad_realm: ad.AdRealm, capfd: pytest.CaptureFixture[str], case: str, args: object
) -> None:
    """samba-tool refusing a step (the user exists, the policy refuses the password, the name is invalid, no such user)
    raises AdRealmError naming `samba-tool user ...` and samba-tool's reason; the password is in neither the message,
    nor this process's stdout/stderr, nor Samba's log (it quoted `samba-tool user create alice <password>` whole)."""
    password = _weak() if case == "refused by policy" else _strong()
    argv = args(password)  # type: ignore[operator]
    offset = kdc_log_offset(ad_realm)
    with pytest.raises(ad.AdRealmError) as e:
        ad_realm.samba_tool(*argv)
    message = str(e.value)
    assert f"samba-tool {argv[0]} {argv[1]}" in message
    assert "exited with" in message
    assert password not in message
    assert "***" in message
    out, err = capfd.readouterr()
    assert password not in out + err
    assert password not in ad_realm.samba_log.read_bytes()[offset:].decode(errors="replace")


def test_a_provisioning_step_that_fails_does_not_quote_the_admin_password() -> None:
    """`samba-tool domain provision --adminpass=...` refusing its arguments (here an option it does not know): the
    error names the command with `--adminpass=***`."""
    password = _strong()
    argv = ["samba-tool", "domain", "provision", f"--adminpass={password}", "--no-such-option-of-samba"]
    with pytest.raises(ad.AdRealmError) as e:
        ad._run(argv)
    assert "samba-tool domain provision" in str(e.value)
    assert "--adminpass=***" in str(e.value)
    assert password not in str(e.value)


def test_a_samba_whose_kdc_is_slow_to_accept_is_waited_for_never_stopped(tmp_path: Path) -> None:
    """`ad.ensure` on a realm whose samba runs but whose port 88 does not accept (a loaded machine; here a stand-in
    process in a namespace of its own, nothing on 88) waits up to its deadline and raises naming the pid and the fix,
    leaving the process running: it stopped everything in the namespace after one 2 s probe, under another run."""
    if os.geteuid() != 0:
        pytest.skip("the AD realm's namespace needs root (make test runs as root)")
    realm = ad.AdRealm.at(tmp_path / "ad")
    ad.ensure_namespace(realm)
    try:
        realm.marker.parent.mkdir(parents=True, exist_ok=True)
        realm.marker.write_text("a realm another run started\n")
        samba = realm.popen(["sleep", "600"], log=realm.run_dir / "stand-in.log")
        (realm.run_dir / "samba.pid").write_text(f"{samba.pid}\n")  # `ip netns exec` execs sleep: the same pid
        with pytest.raises(ad.AdRealmError) as refused:
            ad.ensure(realm, wait=2)
        assert f"samba (pid {samba.pid}) runs in namespace {realm.netns}" in str(refused.value)
        assert "lab down --ad" in str(refused.value)
        assert samba.poll() is None, "the realm's samba was stopped"
    finally:
        ad.down(realm)
    assert samba.wait(timeout=30) is not None
