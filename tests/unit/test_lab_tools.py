"""The lab's tools are named without their passwords (`proxy.lab.tools`): each syntax the lab uses, and output."""

from __future__ import annotations

import pytest

from proxy.lab import tools

PW = "Pa55-w0rd-of-the-step"


@pytest.mark.parametrize(
    "argv",
    [
        ["ldapadd", "-x", "-D", "cn=admin,dc=lab,dc=test", "-w", PW],
        ["kdb5_ldap_util", "create", "-r", "LAB.TEST", "-s", "-P", PW],
        ["kadmin.local", "-q", f"addprinc -pw {PW} alice"],
        ["samba-tool", "user", "create", "alice", PW, "--configfile=/lab/smb.conf"],
        ["/usr/bin/samba-tool", "user", "add", "alice", PW],
        ["samba-tool", "user", "setpassword", "alice", f"--newpassword={PW}"],
        ["samba-tool", "user", "setpassword", "alice", "--newpassword", PW],
        ["samba-tool", "domain", "provision", "--realm=AD.TEST", f"--adminpass={PW}"],
        ["samba-tool", "domain", "provision", f"--krbtgtpass={PW}"],
        ["samba-tool", "user", "list", "-U", f"Administrator%{PW}"],
        ["samba-tool", "user", "list", f"--username=Administrator%{PW}"],
    ],
    ids=lambda argv: " ".join(argv[:3]),
)
def test_each_password_syntax_is_masked_in_the_command_line(argv: list[str]) -> None:
    """Option values (-w, -P, --newpassword, --adminpass, --*pass=), samba-tool's positional password, `-U user%pw`
    and the `-pw` of a kadmin query: found, and shown as ***; the rest of the command stays readable."""
    assert tools.secrets(argv) == [PW]
    line = tools.shown(argv)
    assert PW not in line
    assert tools.MASK in line
    assert line.split()[0] == argv[0]


def test_a_command_without_a_password_is_shown_whole() -> None:
    """Nothing to hide: the command line is shell-quoted as it is (samba-tool user create with no password)."""
    argv = ["samba-tool", "user", "create", "alice", "--random-password", "--configfile=/lab/smb.conf"]
    assert tools.secrets(argv) == []
    assert tools.shown(argv) == "samba-tool user create alice --random-password --configfile=/lab/smb.conf"


def test_a_tool_that_fails_is_named_and_quoted_without_the_password() -> None:
    """A failing tool's own output repeating the password (here `sh -c` echoing its arguments) is masked too; a tool
    that does not run is named with the password masked."""
    argv = ["sh", "-c", 'echo "bad password $*" >&2; exit 3', "sh", "-w", PW]
    with pytest.raises(RuntimeError) as e:
        tools.run(argv, RuntimeError, timeout=30)
    assert "exited with 3" in str(e.value)
    assert "bad password" in str(e.value)
    assert PW not in str(e.value)
    with pytest.raises(RuntimeError) as e:
        tools.run(["no-such-lab-tool-here", "-w", PW], RuntimeError, timeout=30)
    assert "no-such-lab-tool-here -w *** did not run" in str(e.value)
    assert PW not in str(e.value)
