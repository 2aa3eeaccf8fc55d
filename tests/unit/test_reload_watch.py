"""`[reload] watch`: what the watcher counts as already loaded."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from proxy import config
from proxy import live as live_module
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


def test_a_file_seen_half_written_is_reloaded_only_once_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A configuration written in place in two writes, the watcher looking between them: the first part is a
    valid configuration of its own (a TOML prefix may well parse, and lack the lines that followed). Reloading is
    put off until the files stay as they are for one look, so the one reload reads the whole file. Before, the
    look between the writes reloaded the first part at once."""
    cfg = config.load(_write(tmp_path, GOOD + "\n[reload]\nwatch = true\nwatch_interval = 0.2\n"))
    whole = cfg.path.read_text() + "\n# the end of the write\n"
    prefix = whole[: whole.index("# the end of the write")]
    looks: asyncio.Queue[None] = asyncio.Queue()
    fingerprint = live_module._fingerprint

    def counted(c: config.Config) -> dict[Path, tuple[int, int] | None]:
        looks.put_nowait(None)
        return fingerprint(c)

    monkeypatch.setattr(live_module, "_fingerprint", counted)

    class Reading(_Watched):
        def __init__(self, cfg: config.Config) -> None:
            super().__init__(cfg)
            self.read: list[str] = []

        async def reload(self) -> bool:
            self.read.append(cfg.path.read_text())
            self.twice.set()
            return True

    async def scenario() -> list[str]:
        watched = Reading(cfg)
        watcher = asyncio.create_task(Live.watch(watched))  # type: ignore[arg-type]
        await looks.get()  # the watcher's first look: what is loaded
        cfg.path.write_text(prefix + "\n")  # the first write of an editor writing in place
        await looks.get()  # a look sees it
        cfg.path.write_text(whole)  # the rest, before the next look (the watcher sleeps watch_interval)
        await asyncio.wait_for(watched.twice.wait(), 30)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        return watched.read

    assert asyncio.run(scenario()) == [whole]
