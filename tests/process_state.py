"""What a test leaves of its process for the next test in the same worker: the environment, the working directory,
the umask, the open-file and core-file limits, the excepthooks and the root logger's level.

Why: a test passed or failed by the order xdist gave its worker. A Delegator made in a test's process points
KRB5_CONFIG at its overlay of the krb5.conf it was given (the gateway's behaviour: one per process); a krb5.conf
naming the test's own relay, gone at its end, stayed the process's, and the next test that relied on the
environment reached no KDC ("Cannot contact any KDC"). tests/conftest.py checks every test: what it changed here and
did not put back is put back, and the test fails naming it (the fix: `monkeypatch`, or a `try`/`finally` that
restores). The excepthooks are pytest's own (installed once per run): `proxy.observability.logging.configure` replaces
them, and a test that left them replaced had every later test's thread dying of an exception reported to the gateway's
logger instead of by pytest. State a fixture of a wider scope sets (the lab's KRB5_CONFIG, a module's realm) is set
before the check's snapshot and undone after its comparison, so it never counts against a test.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

_LIMITS = {"RLIMIT_NOFILE": resource.RLIMIT_NOFILE, "RLIMIT_CORE": resource.RLIMIT_CORE}
_CHANGING = frozenset({"PYTEST_CURRENT_TEST"})  # pytest's own, set for each phase of each test
_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")  # such a variable is named, its value never shown


@dataclass(frozen=True)
class ProcessState:
    """The process-wide state a test could leave to the next one."""

    environ: dict[str, str]
    cwd: str
    umask: int
    limits: dict[str, tuple[int, int]]
    hooks: dict[str, object]
    root_level: int


def _hooks() -> dict[str, object]:
    return {
        "sys.excepthook": sys.excepthook,
        "threading.excepthook": threading.excepthook,
        "sys.unraisablehook": sys.unraisablehook,
    }


def snapshot() -> ProcessState:
    umask = os.umask(0o077)  # the only way to read it is to set it: put back at once
    os.umask(umask)
    return ProcessState(
        environ={name: value for name, value in os.environ.items() if name not in _CHANGING},
        cwd=_cwd(),
        umask=umask,
        limits={name: resource.getrlimit(limit) for name, limit in _LIMITS.items()},
        hooks=_hooks(),
        root_level=logging.getLogger().level,
    )


def _cwd() -> str:
    try:
        return str(Path.cwd())
    except OSError as e:  # removed from under the process (a test's directory, gone with it)
        return f"(none: {e.strerror})"


def _shown(name: str, value: str | None) -> str:
    if value is None:
        return "unset"
    if any(word in name.upper() for word in _SECRET_WORDS):
        return "(a value not shown)"
    return repr(value)


def differences(before: ProcessState, after: ProcessState) -> list[str]:
    """One line per thing `after` has other than `before`, each naming it and both values."""
    lines = []
    for name in sorted(before.environ.keys() | after.environ.keys()):
        was, now = before.environ.get(name), after.environ.get(name)
        if was != now:
            lines.append(f"os.environ[{name!r}]: {_shown(name, was)}, now {_shown(name, now)}")
    if before.cwd != after.cwd:
        lines.append(f"the working directory: {before.cwd!r}, now {after.cwd!r}")
    if before.umask != after.umask:
        lines.append(f"the umask: {before.umask:04o}, now {after.umask:04o}")
    for name, was_limit in before.limits.items():
        if after.limits[name] != was_limit:
            lines.append(f"resource.{name} (soft, hard): {was_limit}, now {after.limits[name]}")
    for name, hook in before.hooks.items():
        if after.hooks[name] is not hook:
            lines.append(f"{name}: {hook!r}, now {after.hooks[name]!r}")
    if before.root_level != after.root_level:
        was_level, now_level = (logging.getLevelName(n) for n in (before.root_level, after.root_level))
        lines.append(f"the root logger's level: {was_level}, now {now_level}")
    return lines


def restore(state: ProcessState) -> None:
    """Put the process back as `state` found it (what a lowered hard limit no longer allows stays as it is)."""
    for name in set(os.environ) - set(state.environ) - _CHANGING:
        del os.environ[name]
    for name, value in state.environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value
    if _cwd() != state.cwd:
        os.chdir(state.cwd)
    os.umask(state.umask)
    for name, limit in state.limits.items():
        if resource.getrlimit(_LIMITS[name]) != limit:
            try:
                resource.setrlimit(_LIMITS[name], limit)
            except (ValueError, OSError):
                continue
    sys.excepthook = state.hooks["sys.excepthook"]  # type: ignore[assignment]
    threading.excepthook = state.hooks["threading.excepthook"]  # type: ignore[assignment]
    sys.unraisablehook = state.hooks["sys.unraisablehook"]  # type: ignore[assignment]
    logging.getLogger().setLevel(state.root_level)
