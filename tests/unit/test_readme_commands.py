"""The commands the README shows exist as it writes them: each `kcd-proxy <command>` is one of the command line's,
with options that command takes (and `lab` actions it knows), and each `make <target>` is a Makefile target. A
command renamed or an option dropped in proxy/cli.py then fails here, not in a reader's terminal."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from proxy import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _code() -> list[str]:
    """The README's code: each line of a fenced block, and each inline `span` (which may wrap a line)."""
    fenced = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", README, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^ *```[a-z]*\n.*?^ *```", "", README, flags=re.MULTILINE | re.DOTALL)
    return [line for block in fenced for line in block.splitlines()] + re.findall(r"`([^`]+)`", prose)


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _uses() -> list[tuple[str, str]]:
    """Each `kcd-proxy <command> ...` in the README's code: the command and what follows it up to a comment."""
    found = []
    for code in _code():
        for part in code.split("kcd-proxy ")[1:]:
            command, _, rest = part.partition(" ")
            found.append((command.strip(), rest.split("#")[0]))
    return found


def test_the_readme_shows_the_commands() -> None:
    """The reader finds the README's commands: each of the six, and nothing else after `kcd-proxy `."""
    assert {command for command, _ in _uses()} == set(_commands())


def test_each_kcd_proxy_command_and_option_the_readme_shows_exists() -> None:
    """`kcd-proxy explain --config ... --cert ... [--path P] [--at TIME] [--kdc] [--json]` and the others: the
    command, and each option written after it, is the command line's."""
    commands, wrong = _commands(), []
    for command, rest in _uses():
        if command not in commands:
            wrong.append(f"kcd-proxy {command}")
            continue
        options = {s for a in commands[command]._actions for s in a.option_strings}
        wrong += [f"kcd-proxy {command} {o}" for o in re.findall(r"--[a-z][a-z-]*", rest) if o not in options]
    assert wrong == []


def test_each_lab_action_the_readme_shows_exists() -> None:
    """`kcd-proxy lab up | down | status | env`, `lab serve kdc|backend|crl`, `lab probe <part>`: known actions."""
    lab = _commands()["lab"]
    actions = next(a for a in lab._actions if a.dest == "action").choices
    assert actions is not None
    shown = [w for command, rest in _uses() if command == "lab" for w in re.split(r" \| ", rest.split(" [")[0])]
    named = {w.split()[0] for w in shown if w.strip()}
    assert {"up", "serve", "probe"} <= named
    assert sorted(named - set(actions)) == []


def test_each_make_target_the_readme_shows_exists() -> None:
    """`make lab`, `make lab-ad`, `make test`, `make bench`, `make base-image`...: targets of the Makefile."""
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    shown = {m for code in _code() for m in re.findall(r"\bmake ([a-z][a-z-]*)", code)}
    assert {"lab", "lab-ad", "test", "lab-down"} <= shown
    assert sorted(shown - targets) == []
