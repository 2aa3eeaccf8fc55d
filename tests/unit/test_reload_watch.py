"""`[reload] watch`: what the watcher counts as already loaded."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from proxy import config
from proxy.live import Live
from tests.unit.test_config import GOOD, _write


class _Watched:
    """What `Live.watch` reads of a live gateway: its configuration, and a reload that a rewrite overtakes."""

    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        self.reloads = 0
        self.twice = asyncio.Event()

    async def reload(self) -> bool:
        self.reloads += 1
        if self.reloads == 1:  # the operator's next write lands while this reload is reading the files
            certificate = self.config.listener.certificate
            certificate.write_bytes(certificate.read_bytes() + b"\n# rewritten during the reload\n")
        else:
            self.twice.set()
        return True


def test_a_file_rewritten_during_a_reload_is_reloaded_again(tmp_path: Path) -> None:
    """A watched file that changes while a reload reads the files is reloaded once more: what the watcher
    remembers as loaded is the files as they were before that reload read them. Before, it looked again after
    the reload, took the rewrite for loaded, and the gateway ran on what it had read half-way (a CA bundle or
    certificate rotated in two writes) until some file changed again."""
    cfg = config.load(_write(tmp_path, GOOD + "\n[reload]\nwatch = true\nwatch_interval = 0.02\n"))

    async def scenario() -> _Watched:
        watched = _Watched(cfg)  # its Event belongs to this loop
        watcher = asyncio.create_task(Live.watch(watched))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the watcher has taken its first look
        crls = cfg.client_certificates.crls[0]
        crls.write_bytes(crls.read_bytes() + b"\n")  # the first change: one reload
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watched.twice.wait(), 10)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return watched

    assert asyncio.run(scenario()).reloads == 2
