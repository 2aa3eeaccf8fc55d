"""A reload keeps the directory client only where the mapping stage still uses the same one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from proxy.auth.basic import BasicLogin
from proxy.backend.forward import Pools
from proxy.config import Config
from proxy.kerberos.delegate import Delegator
from proxy.live import _carry_over
from proxy.pipeline import Gateway
from tests.unit.test_config_directory import DIRECTORY, _load, _mapping


def _gateway(config: Config, directory: object | None) -> Gateway:
    """A gateway as `proxy.app.build` makes it, with `directory` standing in for its directory client."""
    return Gateway(
        config=config,
        trust=cast(Any, None),
        revocation=cast(Any, None),
        delegator=Delegator(config.kerberos),
        pools=Pools(config.routes, config.listener),
        basic=BasicLogin(config.authentication, config.identity, config.kerberos),
        directory=cast(Any, directory),
    )


def _configs(tmp_path: Path, before: str, after: str) -> tuple[Config, Config]:
    """The configuration before and after a reload that changed `identity.mapping` (the same file, rewritten)."""
    return _load(tmp_path, _mapping(before) + DIRECTORY), _load(tmp_path, _mapping(after) + DIRECTORY)


def test_turning_strong_mapping_on_by_reload_keeps_the_new_directory_client(tmp_path: Path) -> None:
    """mapping "upn" -> "strong" with [directory] unchanged: the reloaded gateway has a directory (no mapping
    stage silently skipped because the old gateway, which needed none, had none)."""
    old_config, new_config = _configs(tmp_path, "upn", "strong")
    assert old_config.directory == new_config.directory
    fresh = object()
    kept = _carry_over(_gateway(new_config, fresh), _gateway(old_config, None))
    assert kept.directory is fresh


def test_turning_strong_mapping_off_by_reload_drops_the_directory_client(tmp_path: Path) -> None:
    """mapping "strong" -> "upn" with [directory] unchanged: the reloaded gateway has no directory client."""
    old_config, new_config = _configs(tmp_path, "strong", "upn")
    kept = _carry_over(_gateway(new_config, None), _gateway(old_config, object()))
    assert kept.directory is None


def test_an_unchanged_directory_keeps_its_client_and_cache(tmp_path: Path) -> None:
    """mapping "strong" on both sides, [directory] unchanged: the old client (and its account cache) stays."""
    old_config, new_config = _configs(tmp_path, "strong", "strong")
    old = object()
    kept = _carry_over(_gateway(new_config, object()), _gateway(old_config, old))
    assert kept.directory is old
