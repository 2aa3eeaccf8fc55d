"""What a start imports: each module a command does not need on its path is start-up CPU spent for nothing.

Run in a fresh interpreter (this process has imported everything already), from this checkout (`-c` puts the
working directory first on `sys.path`); no timing is asserted, only which modules a start loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _loaded(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are in `sys.modules` after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([n for n in {list(names)!r} if n in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_gateway_import_leaves_out_the_directory_client_and_the_sid_decoder() -> None:
    """Importing proxy.app (every `run`) loads neither bonsai nor pyasn1_modules: only [directory] and SIDs use them."""
    assert _loaded("import proxy.app", ("bonsai", "proxy.directory", "pyasn1_modules")) == []


def test_directory_client_is_imported_where_a_directory_is_configured() -> None:
    """app._directory imports the directory client (and bonsai) when the configuration has a [directory]."""
    code = (
        "from pathlib import Path\n"
        "from proxy import app\n"
        "from proxy.config import Directory, Kerberos\n"
        "class C: directory = Directory(urls=('ldap://dc.invalid',), base_dn='DC=x'); kerberos = Kerberos("
        "principal='HTTP/p@X', keytab=Path('/nonexistent'))\n"
        "app._directory(C())"
    )
    assert _loaded(code, ("bonsai", "proxy.directory")) == ["bonsai", "proxy.directory"]


@pytest.mark.parametrize("missing", ["bonsai", "pyasn1_modules"])
def test_a_missing_deferred_library_still_stops_the_start(missing: str) -> None:
    """A library imported only where used, when not installed, still fails importing proxy.app, naming it."""
    code = f"import sys\nsys.modules[{missing!r}] = None  # find_spec: None, as if not installed\nimport proxy.app"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = done.stderr.splitlines()[-1]
    assert done.returncode != 0
    assert last.startswith("ModuleNotFoundError"), done.stderr
    assert missing in last


def test_command_line_parser_leaves_out_the_gateway() -> None:
    """`kcd-proxy --help` (every command's parser) loads neither the configuration, aiohttp nor the lab's modules."""
    heavy = ("aiohttp", "proxy.config", "proxy.lab.ad", "proxy.observability.traces", "cryptography.x509")
    assert _loaded("import proxy.cli\nproxy.cli.parser()", heavy) == []


def test_configuration_and_lab_commands_leave_out_aiohttp() -> None:
    """Loading a configuration, or the lab's commands (`lab up/down/status/env`), does not import aiohttp."""
    code = "import proxy.config, proxy.lab.runner, proxy.lab.ad, proxy.lab.ad_mapping"
    assert _loaded(code, ("aiohttp", "proxy.certs.sources")) == []
