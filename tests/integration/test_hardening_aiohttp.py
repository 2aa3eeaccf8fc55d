"""The hardening tests (tests/integration/test_hardening.py, every one of them) against aiohttp's server
(`listener.http_server = "aiohttp"`); the module they come from runs them against the default, the
gateway's own (`"own"`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import free_port, lab_config, start_gateway, wait_port
from tests.integration.recorder import Recorder
from tests.integration.test_hardening import *  # noqa: F403  the tests themselves, collected here again
from tests.integration.test_hardening import Scene


@pytest.fixture(scope="module", name="scene")
def aiohttp_scene(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """test_hardening's scene, with aiohttp's server parsing the device's requests."""
    recorders = {prefix: Recorder() for prefix in ("/", "/owa/", "/ecp/", "/basic/")}
    base = lab_config(lab, port=free_port()).split("[[routes]]", 1)[0]
    base = base.replace("[listener]\n", '[listener]\nhttp_server = "aiohttp"\n', 1)
    routes = "".join(
        f'[[routes]]\nprefix = "{prefix}"\nupstream = "{rec.url}"\nspn = "HTTP/cas.lab.test"\n'
        + ('backend_auth = "basic"\n' if prefix == "/basic/" else "")
        for prefix, rec in recorders.items()
    )
    auth = '[authentication]\nmode = "certificate-or-basic"\nbasic_failures_per_address = 1000\n'
    admin = free_port()
    admin_table = f'[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("hardening-aiohttp"), base + routes + auth + admin_table)
    try:
        wait_port(admin, gw.proc)
        gw.wait_for("listening", lambda e: e.get("http_server") == "aiohttp", what="aiohttp's server")
        yield Scene(gw, recorders, lab, f"http://127.0.0.1:{admin}")
    finally:
        gw.stop()
        for rec in recorders.values():
            rec.close()
