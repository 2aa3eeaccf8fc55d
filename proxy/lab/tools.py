"""Running the lab's command-line tools (kadmin.local, kdb5_ldap_util, ldapadd, samba-tool, ldbmodify, ...).

A step that fails raises the caller's error naming the command and quoting the tool's own words, which reach
`lab up`'s and `lab serve kdc`'s stderr (a container's log). Many of these commands carry a password: the MIT
realm's `ldapadd -w`, `kdb5_ldap_util -P` and `kadmin.local -q "addprinc -pw ..."`, the AD realm's
`samba-tool user create NAME PASSWORD`, `--newpassword=`, `provision --adminpass=`. `secrets` finds them in the
command line by the tools' own syntax; the message shows `***` in their place, in the command and wherever the
tool's output repeats them. A password given on stdin (kinit, stashsrvpw) is never quoted at all.

A tool ends with the process that runs it (`setpriv --pdeathsig KILL`, util-linux): `samba-tool domain provision`
whose caller was killed (a test run or worker killed midway, `lab up` killed) went on alone, adopted by init, writing
a half-made realm into the directory the next session provisions again. A daemon a tool starts (`samba -D`,
`slapd`) forks first and so is not its child: the signal is not inherited by a fork.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

MASK = "***"
_PASSWORD_OPTIONS = ("-w", "-P", "-pw")  # ldap*'s bind password, kdb5_ldap_util's master, kadmin's addprinc/cpw
_PASSWORD_LONG = ("--password", "--newpassword", "--adminpass")  # samba-tool's, also as `--option VALUE`
_CREDENTIALS = ("-U", "--username")  # samba's `-U user%password`
_POSITIONAL = {("user", "create"): 2, ("user", "add"): 2}  # samba-tool user create NAME PASSWORD: the password's index


def secrets(argv: Sequence[str]) -> list[str]:
    """The passwords in a command line: option values, samba-tool's positional one, and those of a kadmin query."""
    found: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        name, equals, value = arg.partition("=")
        if following is not None and arg in (*_PASSWORD_OPTIONS, *_PASSWORD_LONG):
            found.append(following)
        elif equals and name.startswith("--") and "pass" in name:  # --adminpass=, --newpassword=, --krbtgtpass=
            found.append(value)
        elif following is not None and arg in _CREDENTIALS and "%" in following:
            found.append(following.split("%", 1)[1])
        elif equals and name in _CREDENTIALS and "%" in value:
            found.append(value.split("%", 1)[1])
        elif following is not None and arg == "-q":  # kadmin.local -q "addprinc -pw PASSWORD user"
            try:
                found += secrets(shlex.split(following))
            except ValueError:  # a query shlex cannot split: hide it whole
                found.append(following)
    if args and args[0].rsplit("/", 1)[-1] == "samba-tool":
        words = [arg for arg in args[1:] if not arg.startswith("-")]
        for verb, index in _POSITIONAL.items():
            if tuple(words[:2]) == verb and len(words) > index + 1:
                found.append(words[index + 1])
    return [secret for secret in found if secret]


def masked(text: str, hidden: Sequence[str]) -> str:
    """`text` with each of `hidden` replaced by `***` (the longest first: one may contain another)."""
    for secret in sorted(set(hidden), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def shown(argv: Sequence[str]) -> str:
    """The command line for a message, each password in it replaced by `***`."""
    hidden = secrets(argv)
    return shlex.join(masked(arg, hidden) for arg in argv).replace(f"'{MASK}'", MASK)


def run(
    argv: Sequence[str],
    error: type[Exception],
    *,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """Run a tool, its output captured as text; a tool that did not run or failed raises `error(message)`, the message
    naming the command and quoting its stderr (else stdout, the last 2,000 characters), passwords masked."""
    hidden = secrets(argv)
    path = None if env is None else env.get("PATH")
    if shutil.which(argv[0], path=path) is None:
        raise error(f"{shown(argv)} did not run: {argv[0]} is not on PATH")
    setpriv = shutil.which("setpriv")
    try:
        done = subprocess.run(
            [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv is not None else list(argv),
            input=stdin if stdin is not None else "",  # never the caller's terminal: a tool that prompts gets EOF
            capture_output=True,
            text=True,
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{shown(argv)} did not run: {masked(str(exc), hidden)}") from None
    if done.returncode != 0:
        output = masked((done.stderr.strip() or done.stdout.strip()).replace("\n", " / "), hidden)[-2000:]
        raise error(f"{shown(argv)} exited with {done.returncode}" + (f": {output}" if output else ""))
    return done
