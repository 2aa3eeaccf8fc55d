"""The gateway hands python-gssapi's raw credential-store calls bytes only (docs/hardening.md, section 10).

python-gssapi 1.12's raw `store_cred_into`, `acquire_cred_from` and `add_cred_from` point MIT at a temporary it
encodes a str key or value into, freed before MIT reads it: a ccache name MIT then reads from reused memory
(tests/integration/test_ccache_names.py). A source check, since the defect shows only under a race: every such call
in `proxy/` passes a dict literal whose keys are bytes literals and whose values are no str literal or f-string.
"""

from __future__ import annotations

import ast
from pathlib import Path

_RAW_CALLS = {"store_cred_into", "acquire_cred_from", "add_cred_from"}
_PROXY = Path(__file__).resolve().parents[2] / "proxy"


def _problems(path: Path, base: Path = _PROXY.parent) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _RAW_CALLS):
            continue
        where = f"{path.relative_to(base)}:{node.lineno}"
        store = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "store"), None)
        if not isinstance(store, ast.Dict):
            found.append(f"{where}: the store is not a dict literal (its keys' and values' types cannot be checked)")
            continue
        for key, value in zip(store.keys, store.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, bytes)):
                found.append(f"{where}: a key that is not a bytes literal")
            if isinstance(value, ast.JoinedStr) or (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                found.append(f"{where}: a str value")
    return found


def test_raw_credential_store_calls_get_bytes() -> None:
    """Every raw credential-store call in proxy/ passes bytes keys (and no str literal value); at least one exists."""
    calls = [p for p in _PROXY.rglob("*.py") if any(name in p.read_text() for name in _RAW_CALLS)]
    assert calls, "no raw credential-store call found: the check looks at nothing"
    assert [problem for path in calls for problem in _problems(path)] == []


def test_the_check_sees_a_str_key(tmp_path: Path) -> None:
    """The check itself: the call as it was before the fix (a str key) is reported."""
    source = tmp_path / "proxy" / "old.py"
    source.parent.mkdir()
    source.write_text('gssapi.raw.store_cred_into({"ccache": name}, creds, usage="initiate")\n')
    assert _problems(source, tmp_path) == ["proxy/old.py:1: a key that is not a bytes literal"]
