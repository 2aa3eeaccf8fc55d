"""The AD lab's tools (samba-tool, ldbmodify) failing against the real Samba realm: the error names the step, never
the password the step was given (`proxy.lab.tools`)."""

from __future__ import annotations

import secrets

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
