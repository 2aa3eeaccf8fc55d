"""`listener.tls_session_cache`: its default, its bad values named, a reload applying it, and the context it makes."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.live import _needs_restart
from proxy.tls.openssl import keep_sessions
from tests.unit.test_config import GOOD, _write


def _with(tmp_path: Path, setting: str) -> config.Config:
    return config.load(_write(tmp_path, GOOD.replace("[listener]\n", f"[listener]\n{setting}\n")))


def test_sessions_are_kept_by_default_and_0_turns_the_cache_off(tmp_path: Path) -> None:
    """2,048 TLS sessions per worker without the key; 0 (stateless tickets) and any positive number when set."""
    assert config.load(_write(tmp_path, GOOD)).listener.tls_session_cache == 2048
    assert _with(tmp_path, "tls_session_cache = 0").listener.tls_session_cache == 0
    assert _with(tmp_path, "tls_session_cache = 50000").listener.tls_session_cache == 50000


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("tls_session_cache = -1", "listener.tls_session_cache: 0 (stateless session tickets) or a positive number"),
        ('tls_session_cache = "big"', "listener.tls_session_cache: expected int"),
        ("tls_session_cache = 1.5", "listener.tls_session_cache: expected int"),
        ("tls_session_cache = true", "listener.tls_session_cache: expected int"),
    ],
)
def test_a_bad_session_cache_names_its_key(tmp_path: Path, setting: str, problem: str) -> None:
    """A negative or non-integer cache size is refused with the key named."""
    with pytest.raises(ConfigError) as e:
        _with(tmp_path, setting)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_a_reload_applies_the_session_cache(tmp_path: Path) -> None:
    """The cache belongs to the listener's SSLContext, which a reload makes anew: no reload_needs_restart for it."""
    before = config.load(_write(tmp_path, GOOD))
    after = _with(tmp_path, "tls_session_cache = 10")
    assert _needs_restart(before, after) == []


def test_keep_sessions_sets_the_bound_openssl_reads_back() -> None:
    """The cache's size is set on the context's SSL_CTX (OpenSSL's default is 20,480) and read back; OpenSSL's
    own statistics then count against it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert keep_sessions(ctx, 7) is None
    assert keep_sessions(ctx, 20480) is None
