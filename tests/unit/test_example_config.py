"""config/example.toml is the key reference the README points to ("documents every key"): every key the loader
reads is in it, and every scalar key it shows with a value shows the loader's default, so the reference cannot
drift from the code unnoticed."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from proxy import config

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
# Fields whose key in the file has another name, or that the loader derives from another key.
KEYS = {("listener", "host"): "bind", ("listener", "port"): "bind", ("admin", "host"): "bind"}
KEYS |= {("admin", "port"): "bind", ("identity", "sources"): "source", ("client_certificates", "crl_urls"): "crls"}
KEYS |= {("admin", "crl_urls"): "crls"}
# Keys the example sets to a site's value on purpose (its comment gives the default).
SITE_VALUES = {("identity", "default_realm")}


def _example() -> dict[str, Any]:
    """The example with its commented-out `# key = value` lines read as set (they document optional keys)."""
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        optional = re.match(r"^# ([a-z_]+ = .*)$", line)
        lines.append(optional.group(1) if optional and ";" not in optional.group(1) else line)
    return tomllib.loads("\n".join(lines))


def _table(doc: dict[str, Any], section: str) -> dict[str, Any]:
    table = doc.get(section, {})
    first: dict[str, Any] = table[0] if isinstance(table, list) else table
    return first


def test_every_key_the_loader_reads_is_in_the_example() -> None:
    """Each field of each section's dataclass appears in config/example.toml under its key (set or commented)."""
    doc, text = _example(), EXAMPLE.read_text()
    missing = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = KEYS.get((section, f.name), f.name)
            if key not in _table(doc, section) and not re.search(rf"\b{key}\b", text):
                missing.append(f"{section}.{key}")
    assert missing == []


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
