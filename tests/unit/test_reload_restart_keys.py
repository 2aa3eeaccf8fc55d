"""Which changed listener keys a reload applies, and which it names in `reload_needs_restart` instead."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy import config
from proxy.lab.pki import make_pki
from proxy.live import _needs_restart, watched_files
from tests.unit.test_config import GOOD, _write

LISTENER = 'private_key = "tls/server.key"\n'

# Each listener key the running process reads once, at start, with a value other than its default.
READ_AT_START = [
    ("handshake_timeout", "handshake_timeout = 3"),
    ("keepalive_timeout", "keepalive_timeout = 5"),
    ("client_send_timeout", "client_send_timeout = 9"),
    ("max_body_bytes", "max_body_bytes = 1024"),
    ("workers", "workers = 2"),
    ("worker_cpus", "worker_cpus = [0]"),
    ("drain_timeout", "drain_timeout = 5"),
    ("max_header_bytes", "max_header_bytes = 65536"),
    ("max_connections", "max_connections = 50"),
    ("max_connections_per_address", "max_connections_per_address = 8"),
    ("proxy_protocol", 'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/24"]'),
    ("event_loop", 'event_loop = "asyncio"'),
    ("http_server", 'http_server = "aiohttp"'),
]


def _listener(tmp_path: Path, lines: str) -> config.Config:
    return config.load(_write(tmp_path, GOOD.replace(LISTENER, LISTENER + lines + "\n", 1)))


@pytest.mark.parametrize(("key", "lines"), READ_AT_START, ids=[k for k, _ in READ_AT_START])
def test_a_key_read_at_start_is_named_when_a_reload_changes_it(tmp_path: Path, key: str, lines: str) -> None:
    """A reload that changes a listener key the process read at start says so for that key (and only it):
    the log must not report a configuration as reloaded while a setting of it still runs with its old value."""
    before, after = _listener(tmp_path, ""), _listener(tmp_path, lines)
    assert _needs_restart(before, after) == [f"listener.{key}"]


def test_the_keys_a_reload_applies_are_not_named(tmp_path: Path) -> None:
    """The server certificate and key (new connections), the trusted balancers (each connection asks) and
    client_body_timeout (the backend pools', made per configuration) take effect on reload: no warning for them."""
    proxied = 'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/24"]'
    before = _listener(tmp_path, proxied + "\nclient_body_timeout = 7")
    (tmp_path / "tls/other.pem").write_text("x")
    (tmp_path / "tls/other.key").write_text("x")
    text = GOOD.replace(LISTENER, LISTENER + proxied.replace("10.0.0.0/24", "10.9.0.0/24") + "\n", 1)
    text = text.replace("tls/server-chain.pem", "tls/other.pem").replace("tls/server.key", "tls/other.key")
    after = config.load(_write(tmp_path, text))
    assert after.listener.trusted_proxies != before.listener.trusted_proxies
    assert after.listener.certificate != before.listener.certificate
    assert _needs_restart(before, after) == []


def test_a_new_address_is_listener_bind(tmp_path: Path) -> None:
    """A changed host or port is reported under the key the file uses: listener.bind."""
    before = _listener(tmp_path, "")
    after = config.load(_write(tmp_path, GOOD.replace("127.0.0.1:8443", "127.0.0.1:9443")))
    assert _needs_restart(before, after) == ["listener.bind"]


def test_watch_covers_the_files_a_reload_reads(tmp_path: Path) -> None:
    """[reload] watch looks at every file a reload would read again: besides the listener's, the trust list's,
    the CRLs' and the keytab, each https route's CA bundle and the directory's CA and password files."""
    pki = make_pki(tmp_path / "pki", now=datetime.now(UTC))
    for name in ("backend-ca.pem", "dc-ca.pem", "ldap.pw"):
        (tmp_path / name).write_bytes(pki.root_cert.read_bytes())
    route = 'upstream = "https://ews.lab.test:8444"\n'
    text = GOOD.replace(route, route + 'ca_bundle = "backend-ca.pem"\n')
    text += '[directory]\nurls = ["ldaps://dc1.lab.test"]\nbase_dn = "DC=lab,DC=test"\nbind = "simple"\n'
    text += 'bind_dn = "CN=svc,DC=lab,DC=test"\npassword_file = "ldap.pw"\nca_file = "dc-ca.pem"\n'
    watched = watched_files(config.load(_write(tmp_path, text)))
    assert {tmp_path / n for n in ("backend-ca.pem", "dc-ca.pem", "ldap.pw")} <= set(watched)
    assert len(watched) == len(set(watched))


@pytest.mark.parametrize(("before", "after"), [("", "\n[reload]\nwatch = true\n"), ("\n[reload]\nwatch = true\n", "")])
def test_turning_the_file_watch_on_or_off_is_named(tmp_path: Path, before: str, after: str) -> None:
    """The watch task is started, or not, when the process starts: a reload that turned `[reload] watch` off logged
    `reloaded` while the files were still watched and reloaded as they changed (half-edited ones included), and one
    that turned it on watched nothing. Both are named in `reload_needs_restart`; the interval is read at each look."""
    old, new = config.load(_write(tmp_path, GOOD + before)), config.load(_write(tmp_path, GOOD + after))
    assert _needs_restart(old, new) == ["reload.watch"]
    slower = config.load(
        _write(tmp_path, GOOD + before + ("\n[reload]\n" if not before else "") + "watch_interval = 9\n")
    )
    assert _needs_restart(old, slower) == []
