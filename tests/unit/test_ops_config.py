"""The operability keys: [admin], [reload] and [doctor], and the problems they report."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import config
from proxy.errors import ConfigError
from tests.unit.test_config import GOOD, _write

FINGERPRINT = "ab" * 32


def test_operability_is_off_by_default(tmp_path: Path) -> None:
    """Without the tables: no admin listener, no file watching, no canary, the http.sys header limit."""
    cfg = config.load(_write(tmp_path, GOOD))
    assert cfg.admin is None
    assert (cfg.reload.watch, cfg.doctor.canary_user, cfg.doctor.backend_header_limit) == (False, None, 16384)


def test_admin_reload_and_doctor_tables_are_typed(tmp_path: Path) -> None:
    """A loopback admin bind needs nothing else; the other tables' values come out typed."""
    extra = """
[admin]
bind = "127.0.0.1:9443"

[reload]
watch = true
watch_interval = 0.5

[doctor]
canary_user = "alice@lab.test"
backend_header_limit = 65534
"""
    cfg = config.load(_write(tmp_path, GOOD + extra))
    assert cfg.admin is not None
    assert (cfg.admin.host, cfg.admin.port, cfg.admin.tls) == ("127.0.0.1", 9443, False)
    assert (cfg.reload.watch, cfg.reload.watch_interval) == (True, 0.5)
    assert (cfg.doctor.canary_user, cfg.doctor.backend_header_limit) == ("alice@lab.test", 65534)


def test_an_admin_listener_off_loopback_needs_tls_and_an_allow_list(tmp_path: Path) -> None:
    """Bound elsewhere than loopback without TLS and client certificates, the admin table is refused."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD + '\n[admin]\nbind = "0.0.0.0:9443"\n'))
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith("admin.bind: 0.0.0.0 is not loopback")
    assert str(tmp_path / "gateway.toml") in e.value.problems[0]


def _resolver(table: dict[str, list[str]]) -> Callable[..., list[Any]]:
    """getaddrinfo over a fixed table (no DNS query leaves the machine in a test)."""

    def resolve(host: str, port: object, **_: object) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, 1, 6, "", (a, 0)) for a in table[host]]

    return resolve


NAMES = {
    "localhost": ["127.0.0.1", "::1"],
    "localhost.attacker.example": ["203.0.113.5"],
    "127.0.0.1.attacker.example": ["203.0.113.5"],
    "half.example": ["127.0.0.1", "203.0.113.5"],
    "v6.example": ["fe80::1%eth0"],
}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("localhost.attacker.example", False),
        ("127.0.0.1.attacker.example", False),
        ("half.example", False),
        ("v6.example", False),
        ("unknown.example", False),
    ],
)
def test_loopback_is_decided_by_the_addresses_a_name_resolves_to(host: str, loopback: bool) -> None:
    """Not a string prefix: every address the bind host stands for must be a loopback one."""
    assert config.is_loopback(host, _resolver(NAMES)) is loopback


def test_an_admin_bind_named_like_localhost_still_needs_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost.attacker.example` passed a prefix check; resolved, it is not loopback and is refused."""
    monkeypatch.setattr(socket, "getaddrinfo", _resolver(NAMES))
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD + '\n[admin]\nbind = "localhost.attacker.example:9443"\n'))
    assert e.value.problems[0].startswith("admin.bind: localhost.attacker.example is not loopback")


def test_an_admin_listener_off_loopback_with_tls_and_allow_list_is_accepted(tmp_path: Path) -> None:
    """TLS, a client CA and an allow-list of subjects or fingerprints make any bind acceptable."""
    extra = f"""
[admin]
bind = "0.0.0.0:9443"
certificate = "tls/server-chain.pem"
private_key = "tls/server.key"
client_ca = "pki/root.pem"
allowed_clients = ["CN=ops,O=Example", "{FINGERPRINT}"]
"""
    admin = config.load(_write(tmp_path, GOOD + extra)).admin
    assert admin is not None
    assert admin.tls
    assert admin.allowed_clients == ("CN=ops,O=Example", FINGERPRINT)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[admin]\nbind = "localhost"', "admin.bind"),
        ('[admin]\nbind = "127.0.0.1:9443"\ncertificate = "tls/server-chain.pem"', "admin.private_key"),
        (
            '[admin]\nbind = "127.0.0.1:9443"\ncertificate = "tls/server-chain.pem"\nprivate_key = "tls/server.key"\n'
            'client_ca = "pki/root.pem"',
            "admin.allowed_clients",
        ),
        ('[admin]\nbind = "127.0.0.1:9443"\nclient_ca = "pki/root.pem"\nallowed_clients = ["CN=x"]', "admin.client_ca"),
        (
            '[admin]\nbind = "127.0.0.1:9443"\ncertificate = "tls/server-chain.pem"\nprivate_key = "tls/server.key"\n'
            'client_ca = "pki/root.pem"\nallowed_clients = ["not a name"]',
            "admin.allowed_clients[0]",
        ),
        ('[admin]\nbind = "127.0.0.1:9443"\ncolour = "red"', "admin.colour"),
        ("[reload]\nwatch_interval = 0", "reload.watch_interval"),
        ('[doctor]\ncanary_user = "alice"', "doctor.canary_user"),
        ("[doctor]\nbackend_header_limit = -1", "doctor.backend_header_limit"),
    ],
)
def test_bad_operability_keys_name_their_key(tmp_path: Path, table: str, key: str) -> None:
    """Each problem in the new tables is one line naming its key and the file."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD + "\n" + table + "\n"))
    assert [p.split(":")[0] for p in e.value.problems] == [key]
    assert str(tmp_path / "gateway.toml") in e.value.problems[0]


def test_the_example_configuration_uses_only_known_keys() -> None:
    """config/example.toml documents every key: loading it finds nothing wrong but its example file paths."""
    with pytest.raises(ConfigError) as e:
        config.load(Path(__file__).resolve().parents[2] / "config" / "example.toml")
    assert [p for p in e.value.problems if ": file not found: " not in p] == []


def test_an_admin_socket_alone_is_an_admin_listener(tmp_path: Path) -> None:
    """`admin.socket` without `admin.bind`: the admin listener on that Unix socket only (a relative path is the
    configuration file's directory's); with both, both."""
    cfg = config.load(_write(tmp_path, GOOD + '\n[admin]\nsocket = "admin.sock"\n'))
    assert cfg.admin is not None
    assert cfg.admin.socket == tmp_path / "admin.sock"
    assert cfg.admin.port == 0
    both = config.load(_write(tmp_path, GOOD + f'\n[admin]\nbind = "127.0.0.1:9443"\nsocket = "{tmp_path}/a.sock"\n'))
    assert both.admin is not None
    assert (both.admin.port, both.admin.socket) == (9443, tmp_path / "a.sock")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"missing-dir/admin.sock"', "admin.socket: its directory does not exist:"),
        ('"' + "x" * 120 + '.sock"', "admin.socket: a Unix socket's path is at most 107 bytes"),
        ('"file.txt"', "admin.socket: a file that is not a socket is there:"),
        ('""', "admin.socket: expected a path"),
        ("7", "admin.socket: expected str, got int"),
    ],
)
def test_a_bad_admin_socket_names_the_key(tmp_path: Path, value: str, problem: str) -> None:
    """A socket path whose directory is missing, too long for a Unix socket, or where a plain file is, is refused
    with the key's name and the file's."""
    (tmp_path / "file.txt").write_text("not a socket")
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD + f"\n[admin]\nsocket = {value}\n"))
    assert any(p.startswith(problem) and str(tmp_path / "gateway.toml") in p for p in e.value.problems), (
        e.value.problems
    )


def test_an_admin_table_without_bind_or_socket_names_bind(tmp_path: Path) -> None:
    """An [admin] table with neither a bind nor a socket says what is missing, as before the socket key."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD + '\n[admin]\ncertificate = "x.pem"\n'))
    assert any(p.startswith("admin.bind: missing") for p in e.value.problems), e.value.problems
