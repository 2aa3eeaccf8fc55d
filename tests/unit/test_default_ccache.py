"""`kcd-proxy run` and `lab serve` pin MIT's default credential cache to a MEMORY one (proxy.kerberos.default_ccache).

Each test runs the real command line in a child process whose environment names a FILE default ccache, then asks
MIT (`krb5_cc_default_name`, through the libkrb5 the gateway loads) which default ccache that process now has.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proxy.kerberos.default_ccache import DEFAULT_CCACHE

_ASK_MIT = """
import ctypes, sys
from ctypes import byref, c_char_p, c_void_p
from proxy import cli
from proxy.lab import serve
serve.serve = lambda layout, component: 0  # what `lab serve` does before it serves, then stop
code = cli.main(sys.argv[1:])
library = ctypes.CDLL("libkrb5.so.3")
library.krb5_cc_default_name.restype = c_char_p
context = c_void_p()
assert library.krb5_init_context(byref(context)) == 0
print(code, library.krb5_cc_default_name(context).decode())
"""


def _default_ccache_after(tmp_path: Path, *argv: str) -> tuple[int, str]:
    env = {**os.environ, "KRB5CCNAME": f"FILE:{tmp_path / 'default-ccache'}", "KCD_LAB_DIR": str(tmp_path / "lab")}
    done = subprocess.run(
        [sys.executable, "-c", _ASK_MIT, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    code, name = done.stdout.split()[-2:]
    return int(code), name


def test_run_pins_the_default_ccache_to_memory_before_anything_else(tmp_path: Path) -> None:
    """`kcd-proxy run` replaces a FILE KRB5CCNAME with the process's MEMORY name first (here its configuration does
    not even load: the pin comes before it), so no MIT call falling back to the default ccache writes a file."""
    code, name = _default_ccache_after(tmp_path, "run", "--config", str(tmp_path / "missing.toml"))
    assert code != 0
    assert name == DEFAULT_CCACHE
    assert not (tmp_path / "default-ccache").exists()


def test_lab_serve_pins_the_default_ccache_to_memory(tmp_path: Path) -> None:
    """`kcd-proxy lab serve backend` (a Negotiate acceptor) has the MEMORY default ccache too."""
    code, name = _default_ccache_after(tmp_path, "lab", "serve", "backend")
    assert (code, name) == (0, DEFAULT_CCACHE)
