"""Configuration of a route's backend_binding: "request" (the default) or "connection", and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import _write
from tests.unit.test_config_auth import FULL

BOUND = FULL.replace('prefix = "/basic/"', 'prefix = "/bound/"\nbackend_binding = "connection"', 1).replace(
    'backend_auth = "basic"', 'backend_auth = "negotiate"', 1
)


def test_every_route_binds_per_request_by_default(tmp_path: Path) -> None:
    """Without the key, every route sends a fresh token on every request."""
    cfg = config.load(_write(tmp_path, FULL))
    assert {route.backend_binding for route in cfg.routes} == {"request"}


def test_connection_binding_is_read_per_route(tmp_path: Path) -> None:
    """backend_binding = "connection" applies to the route that says it, and to no other."""
    cfg = config.load(_write(tmp_path, BOUND))
    bindings = {route.prefix: route.backend_binding for route in cfg.routes}
    assert bindings.pop("/bound/") == "connection"
    assert set(bindings.values()) == {"request"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (BOUND.replace('"connection"', '"session"'), "routes[2].backend_binding: expected one of request, connection"),
        (BOUND.replace('"connection"', "true"), "routes[2].backend_binding:"),
        (
            BOUND.replace('backend_auth = "negotiate"', 'backend_auth = "basic"', 1),
            'routes[2].backend_binding: "connection" is for Negotiate',
        ),
    ],
)
def test_a_bad_binding_names_its_key(tmp_path: Path, text: str, problem: str) -> None:
    """An unknown value, a value of the wrong type, and "connection" on a Basic route are refused by key."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems
