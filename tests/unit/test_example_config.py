"""config/example.toml is the key reference the README points to ("documents every key"): every key the loader
reads is in it, in its own section; every key it shows (commented-out optional ones too) is one the loader knows
there; and every scalar key it shows with a value shows the loader's default, so the reference cannot drift from
the code unnoticed."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "example.toml"

SECTIONS: dict[str, type[Any]] = {
    "listener": config.Listener,
    "client_certificates": config.ClientCertificates,
    "identity": config.Identity,
    "directory": config.Directory,
    "authentication": config.Authentication,
    "kerberos": config.Kerberos,
    "routes": config.Route,
    "admin": config.Admin,
    "reload": config.Reload,
    "doctor": config.Doctor,
    "traces": config.Traces,
}
# Keys the example sets to a site's value on purpose (its comment gives the default).
SITE_VALUES = {("identity", "default_realm")}


def _example() -> dict[str, Any]:
    """The example with its commented-out `# key = value` lines read as set (they document optional keys)."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        optional = re.match(r"^# ([a-z0-9_]+ = .*)$", line)
        lines.append(optional.group(1) if optional and ";" not in optional.group(1) else line)
    return tomllib.loads("\n".join(lines))


def _table(doc: dict[str, Any], section: str) -> dict[str, Any]:
    table = doc.get(section, {})
    first: dict[str, Any] = table[0] if isinstance(table, list) else table
    return first


def _loaders_keys(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, set[str]], list[str]]:
    """The keys the loader knows, by section (`routes`, `client_certificates.restrictions.extension`), as it
    names them to `_Reader.unknown` while it reads the example; and the problems it finds, unknown keys included."""
    known: dict[str, set[str]] = {}
    check = config._Reader.unknown

    def spy(self: config._Reader, table: dict[str, Any], prefix: str, keys: set[str]) -> None:
        known.setdefault(re.sub(r"\[\d+\]", "", prefix), set()).update(keys)
        check(self, table, prefix, keys)

    monkeypatch.setattr(config._Reader, "unknown", spy)
    with pytest.raises(ConfigError) as e:  # its file paths are a site's, not here
        config.parse(_example(), EXAMPLE)
    return known, e.value.problems


def _sections() -> dict[str, set[str]]:
    """The keys the example shows in each section, set or in a commented-out `# key = ...` line (also after a `;`,
    as in `# bind = "simple"; bind_dn = ...`); inline tables' keys under the key's name (`....extension`)."""
    shown: dict[str, set[str]] = {"": set()}
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"^\[\[?([a-z_.]+)\]\]?", line)
        if header:
            section = header.group(1)
            parent, _, name = section.rpartition(".")
            shown.setdefault(parent, set()).add(name)  # [[client_certificates.restrictions]]: a key of its parent
            shown.setdefault(section, set())
            continue
        for key, inline in re.findall(r"(?:^#? ?|; )([a-z0-9_]+) = (\{[^}]*\})?", line):
            shown[section].add(key)
            if inline:
                shown.setdefault(f"{section}.{key}", set()).update(re.findall(r"([a-z0-9_]+) =", inline))
    return shown


def test_every_key_the_loader_reads_is_in_the_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each key the loader reads appears in config/example.toml in its own section (set or commented), so the
    reference names every key where it goes; e.g. `directory.bind_dn`, `routes.host`, `admin.socket`."""
    known, shown = _loaders_keys(monkeypatch)[0], _sections()
    missing = [f"{s}.{k}".lstrip(".") for s, keys in known.items() for k in keys - shown.get(s, set())]
    assert missing == []


def test_every_key_the_example_shows_is_the_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example, its commented-out optional keys read as set, has no key the loader does not know where it stands
    (no `unknown key` problem): a key renamed or dropped in proxy/config.py cannot stay documented."""
    problems = _loaders_keys(monkeypatch)[1]
    assert sorted(p for p in problems if "unknown key" in p) == []


def test_each_scalar_key_shown_with_a_value_shows_its_default() -> None:
    """A bool, number or word the example sets is the loader's default (e.g. directory.cache_seconds = 300,
    kerberos.ticket_recheck_seconds = 0, routes[].backend_binding = "request", traces.keep = 200)."""
    doc = _example()
    wrong = []
    for section, cls in SECTIONS.items():
        table = _table(doc, section)
        for f in dataclasses.fields(cls):
            if f.name not in table or (section, f.name) in SITE_VALUES or f.default is dataclasses.MISSING:
                continue
            if isinstance(f.default, bool | int | float | str) and table[f.name] != f.default:
                wrong.append(f"{section}.{f.name} = {table[f.name]!r}; the default is {f.default!r}")
    assert wrong == []


# The optional sections, added to test_config's GOOD so that every section loads ([admin] and [directory] with their
# required keys only).
OPTIONAL_SECTIONS = """
[admin]
bind = "127.0.0.1:9443"

[directory]
urls = ["ldap://dc.lab.test"]
base_dn = "DC=lab,DC=test"

[authentication]
[reload]
[doctor]
[traces]
"""
# Defaults the loader derives from other keys (the example's comment says how).
DERIVED = {("identity", "default_realm")}


def test_a_key_left_out_takes_the_default_the_example_is_checked_against(tmp_path: Path) -> None:
    """Each optional key left out loads as its dataclass field's default, the value the test above holds the
    example to: the loader's own fallback (written again in each `_number(...)` call) cannot drift from it."""
    cfg = config.load(_write(tmp_path, GOOD + OPTIONAL_SECTIONS))
    given = tomllib.loads(GOOD + OPTIONAL_SECTIONS)
    loaded = {section: getattr(cfg, section) for section in SECTIONS if section != "routes"} | {"routes": cfg.routes[0]}
    wrong = []
    for section, value in loaded.items():
        for f in dataclasses.fields(value):
            default, got = _default(f), getattr(value, f.name)
            left_out = f.name not in _table(given, section) and (section, f.name) not in DERIVED
            if left_out and default is not dataclasses.MISSING and got != default:
                wrong.append(f"{section}.{f.name} = {got!r}; the dataclass says {default!r}")
    assert wrong == []


def _default(f: dataclasses.Field[Any]) -> Any:
    """A field's default (its factory's product), or MISSING for a required field."""
    factory: Any = f.default_factory
    return f.default if f.default is not dataclasses.MISSING else factory() if callable(factory) else factory


def test_the_readmes_security_settings_show_the_loaders_defaults() -> None:
    """The README's Security section names each protection's setting with its default (issue 14: "the README's security
    section lists each protection and its setting"): each `section.key` (value), and each bare `key` (value) after it
    in that section, is a key the loader knows with that default."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text()
    section_text = readme.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(?:([a-z_]+)(?:\[\])?\.)?([a-z_]+)`\s+\(`?([0-9a-z]+)`?", section_text)
    assert len(named) >= 10, named
    defaults = {
        name: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for name, cls in SECTIONS.items()
    }
    current = ""
    for section, key, shown in named:
        current = section or current
        default = defaults[current][key]
        expected = str(default).lower() if isinstance(default, bool) else str(round(default))
        assert shown == expected, (f"{current}.{key}", shown, default)
