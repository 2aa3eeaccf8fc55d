"""flake9's `proxy.workers.end_process` attacked (review42): a one-process gateway ends with `os._exit`, after removing
its krb5.conf overlays and flushing its output. What it wrote just before must reach a log reader that is slow (stdout
a pipe, as under journald or `docker logs`), and its overlay files must be gone after every way it ends.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import REPO, client_context, free_port, lab_config, wait_port

REQUESTS = 20  # each a summary line of about 1.5 KiB, through a pipe of 4 KiB


class SlowReader:
    """The read end of a gateway's stdout, a pipe of one page (4 KiB, F_SETPIPE_SZ) read 512 bytes at a time with a
    pause after each: the gateway's writes wait on it often, its last ones too."""

    def __init__(self) -> None:
        self._read, self.write = os.pipe()
        fcntl.fcntl(self.write, fcntl.F_SETPIPE_SZ, 4096)
        self.data = bytearray()
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with os.fdopen(self._read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(512):
                self.data += chunk
                time.sleep(0.005)
        self.done.set()

    def lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in bytes(self.data).decode().splitlines() if line.startswith("{")]

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in self.lines() if e.get("event") == name]


def _start(lab: LabLayout, tmp_path: Path, text: str, reader: SlowReader) -> tuple[subprocess.Popen[bytes], Path]:
    """`kcd-proxy run` with `text`, its stdout and stderr `reader`'s pipe, and a temporary directory of its own."""
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=reader.write,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **lab.env(), "TMPDIR": str(tmp)},
        )
    finally:
        os.close(reader.write)  # the gateway's alone: the reader sees the end of the pipe when it exits
    return proc, tmp


def _listening(lab: LabLayout, tmp_path: Path, extra: str) -> tuple[subprocess.Popen[bytes], Path, SlowReader, int]:
    """`_start` on a free port, once the gateway listens; started again on another port (at most twice more) when
    another process took the one picked meanwhile (a connection's source port on a loaded machine), as
    `start_gateway` does."""
    for attempt in range(3):
        reader = SlowReader()
        port = free_port()
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        proc, tmp = _start(lab, directory, lab_config(lab, port=port, extra=extra), reader)
        try:
            wait_port(port, proc)
            return proc, tmp, reader, port
        except RuntimeError:
            if proc.poll() is None or not reader.done.wait(60) or b"Address already in use" not in reader.data:
                raise
    raise AssertionError(f"the port picked was taken three times: {bytes(reader.data)[-2000:]!r}")


def _overlays(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("kcd-proxy-krb5-*"))


def _get(lab: LabLayout, port: int) -> None:
    """alice's GET on a connection of its own, read to its end."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGTERM)])
def test_every_line_before_the_exit_reaches_a_slow_pipe_and_the_overlays_are_gone(
    lab: LabLayout, tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    """A one-process gateway whose stdout is a 4 KiB pipe read slowly (a busy journald, `docker logs`), serving 20
    requests and then stopped (SIGTERM, SIGINT, or SIGTERM twice): every summary line, `drained`, and `stopped` last
    reach the reader whole, the exit status is 0, every trace is in the `[traces] export` file, and the krb5.conf
    overlay files it wrote in its TMPDIR are gone."""
    traces = tmp_path / "traces.jsonl"
    proc, tmp, reader, port = _listening(lab, tmp_path, f'\n[traces]\nexport = "{traces}"\n')
    try:
        assert _overlays(tmp), "the lab's gateway writes a krb5.conf overlay"
        for _ in range(REQUESTS):
            _get(lab, port)
        for sig in signals:
            proc.send_signal(sig)
        assert proc.wait(timeout=120) == 0
        assert reader.done.wait(60)
        lines = reader.lines()
        assert len(reader.events("request")) == REQUESTS
        assert lines[-1]["event"] == "stopped", lines[-3:]
        assert len(reader.events("drained")) == 1
        assert _overlays(tmp) == []
        exported = traces.read_text().splitlines()
        assert [json.loads(line)["status"] for line in exported] == [200] * REQUESTS
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_gateway_that_fails_to_start_after_writing_its_overlay_removes_it(lab: LabLayout, tmp_path: Path) -> None:
    """A one-process gateway whose listener port is taken (it fails after building its Kerberos side, which writes
    the krb5.conf overlay): it exits 2 naming listener.bind, the message reaches a pipe, and no overlay file stays."""
    reader = SlowReader()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        proc, tmp = _start(lab, tmp_path, lab_config(lab, port=taken.getsockname()[1]), reader)
        assert proc.wait(timeout=120) == 2
    assert reader.done.wait(60)
    assert b"listener.bind" in reader.data, bytes(reader.data)
    assert b'"kdcs_answer"' in reader.data  # its Kerberos side was built (the overlay written) before the bind
    assert _overlays(tmp) == []
