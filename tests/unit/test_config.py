"""Configuration loading: typed values, relative paths, and problems that name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError

GOOD = """
[listener]
bind = "127.0.0.1:8443"
certificate = "tls/server-chain.pem"
private_key = "tls/server.key"

[client_certificates]
trust_anchors = ["pki/root.pem"]
intermediates = ["pki/issuing.pem"]
crls = ["pki/crls.pem"]

[identity]
source = "san-upn"
realm_map = { "Corp.Example" = "LAB.TEST" }

[kerberos]
principal = "HTTP/proxy.lab.test@LAB.TEST"
keytab = "proxy.keytab"

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:8081"
spn = "HTTP/cas.lab.test"

[[routes]]
prefix = "/EWS/"
upstream = "https://ews.lab.test:8444"
"""

FILES = ["tls/server-chain.pem", "tls/server.key", "pki/root.pem", "pki/issuing.pem", "pki/crls.pem", "proxy.keytab"]


def _write(tmp_path: Path, text: str) -> Path:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_good_configuration_is_typed_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    """Values come out typed; relative paths resolve against the file's directory; defaults apply."""
    cfg = config.load(_write(tmp_path, GOOD))
    assert (cfg.listener.host, cfg.listener.port) == ("127.0.0.1", 8443)
    assert cfg.listener.certificate == tmp_path / "tls/server-chain.pem"
    assert cfg.client_certificates.crls == (tmp_path / "pki/crls.pem",)
    assert cfg.client_certificates.revocation == "require"
    assert cfg.identity.realm_map == {"corp.example": "LAB.TEST"}
    assert cfg.kerberos.keytab == tmp_path / "proxy.keytab"
    assert cfg.kerberos.krb5_config is None


def test_longest_prefix_wins_and_spn_defaults_to_the_upstream_host(tmp_path: Path) -> None:
    """Routes match by longest prefix; a route without spn gets HTTP/<upstream host>."""
    cfg = config.load(_write(tmp_path, GOOD))
    ews = cfg.route_for("/EWS/Exchange.asmx")
    assert ews is not None
    assert ews.spn == "HTTP/ews.lab.test"
    assert ews.gss_target == "HTTP@ews.lab.test"
    other = cfg.route_for("/Microsoft-Server-ActiveSync")
    assert other is not None
    assert other.prefix == "/"
    assert other.spn == "HTTP/cas.lab.test"


def test_no_crls_means_revocation_off_unless_required(tmp_path: Path) -> None:
    """Without CRLs revocation defaults to off; an explicit "require" with none is refused by key."""
    text = GOOD.replace('crls = ["pki/crls.pem"]', "")
    assert config.load(_write(tmp_path, text)).client_certificates.revocation == "off"
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text.replace("[identity]", 'revocation = "require"\n[identity]')))
    assert e.value.problems[0].startswith("client_certificates.revocation:")


BROKEN = [
    ('bind = "127.0.0.1:8443"', 'bind = "8443"', "listener.bind: expected host:port"),
    ('bind = "127.0.0.1:8443"', 'bind = "127.0.0.1:99999"', "listener.bind: expected host:port"),
    ('bind = "127.0.0.1:8443"', "", "listener.bind: missing"),
    ('private_key = "tls/server.key"', 'private_key = "tls/nope.key"', "listener.private_key: file not found"),
    ('trust_anchors = ["pki/root.pem"]', "trust_anchors = []", "client_certificates.trust_anchors: at least one"),
    ('crls = ["pki/crls.pem"]', 'crls = ["pki/gone.pem"]', "client_certificates.crls[0]: file not found"),
    ('source = "san-upn"', 'source = "fingerprint"', "identity.source: expected one of"),
    (
        'principal = "HTTP/proxy.lab.test@LAB.TEST"',
        'principal = "HTTP/proxy"',
        "kerberos.principal: 'HTTP/proxy' has no realm",
    ),
    ('keytab = "proxy.keytab"', "keytab = 7", "kerberos.keytab: expected str, got int"),
    (  # krb5's keytab name (KRB5_KTNAME's form) for the file's path
        'keytab = "proxy.keytab"',
        'keytab = "FILE:proxy.keytab"',
        "kerberos.keytab: 'FILE:proxy.keytab' is a keytab name, not a path: write the path without 'FILE:'",
    ),
    (  # the listener's URL for its address
        'bind = "127.0.0.1:8443"',
        'bind = "https://127.0.0.1:8443"',
        "listener.bind: expected host:port, got 'https://127.0.0.1:8443': an address, not a URL "
        "(write '127.0.0.1:8443')",
    ),
    ('upstream = "http://127.0.0.1:8081"', 'upstream = "ftp://x"', "routes[0].upstream: expected http(s)"),
    ('upstream = "http://127.0.0.1:8081"', 'upstream = "http://x/owa"', "routes[0].upstream: expected http(s)"),
    ('spn = "HTTP/cas.lab.test"', 'spn = "cas.lab.test"', "routes[0].spn: expected service/host"),
    ('prefix = "/EWS/"', 'prefix = "EWS"', "routes[1].prefix: must start with '/'"),
    ('prefix = "/EWS/"', 'prefix = "/"', "routes[1].prefix: duplicate prefix"),
    ('prefix = "/EWS/"', 'prefix = "/EWS./"', "routes[1].prefix: '/EWS./': a path segment ends in a dot"),
    ("[identity]", "colour = 1\n[identity]", "client_certificates.colour: unknown key"),
    ('source = "san-upn"', 'sorce = "san-upn"', "identity.sorce: unknown key; did you mean source?"),
    ("[kerberos]", "[kerberoz]", "kerberoz: unknown key; did you mean kerberos?"),
    ('spn = "HTTP/cas.lab.test"', 'spn = "HTTP/cas.lab.test"\nread_timeout = -1', "routes[0].read_timeout: must be"),
    ('"LAB.TEST" }', '"LAB.TEST/x" }', "identity.realm_map.Corp.Example: expected a Kerberos realm name"),
    ('"LAB.TEST" }', '"LAB.TEST@EVIL.TEST" }', "identity.realm_map.Corp.Example: expected a Kerberos realm name"),
    ('"LAB.TEST" }', '"LAB TEST" }', "identity.realm_map.Corp.Example: expected a Kerberos realm name"),
    ('"LAB.TEST" }', '"lab.test" }', "identity.realm_map.Corp.Example: 'lab.test' is kerberos.principal's realm"),
    ('"LAB.TEST" }', '"Lab.Test" }', "identity.realm_map.Corp.Example: 'Lab.Test' is kerberos.principal's realm"),
    ('source = "san-upn"', 'default_realm = "lab.test"', "identity.default_realm: 'lab.test' is kerberos.principal's"),
    (
        '"Corp.Example" = "LAB.TEST"',
        '"CORP.EXAMPLE" = "lab.test"',
        "identity.realm_map.CORP.EXAMPLE: written the wrong way",
    ),
    (  # a key no UPN suffix can equal: never used, and nothing said (review57)
        '"Corp.Example" = "LAB.TEST"',
        '"Corp.Example " = "LAB.TEST"',
        "identity.realm_map.Corp.Example : a key is a UPN suffix such as corp.example, with no '@', no space at "
        'either end and nothing invisible: write "Corp.Example"',
    ),
    (  # the '@' of a UPN copied into the key: the problem named the realm
        '"Corp.Example" = "LAB.TEST"',
        '"@Corp.Example" = "LAB.TEST"',
        "identity.realm_map.@Corp.Example: a key is a UPN suffix such as corp.example, with no '@', no space at "
        'either end and nothing invisible: write "Corp.Example"',
    ),
    (  # a wildcard, as a certificate's or DNS's: realm_map matches a suffix exactly, so it matched none
        '"Corp.Example" = "LAB.TEST"',
        '"*.Corp.Example" = "LAB.TEST"',
        "identity.realm_map.*.Corp.Example: a key is one UPN suffix, matched whole (no wildcards): write each one, "
        'such as "Corp.Example"',
    ),
    (  # an empty key: no UPN has an empty suffix
        '"Corp.Example" = "LAB.TEST"',
        '"" = "LAB.TEST"',
        "identity.realm_map.: a key is a UPN suffix such as corp.example, with no '@', no space at either end and "
        "nothing invisible",
    ),
    (  # one suffix written twice in another case, to two realms: matched without regard to case, the last won
        '"Corp.Example" = "LAB.TEST"',
        '"Corp.Example" = "LAB.TEST", "CORP.EXAMPLE" = "OTHER.TEST"',
        "identity.realm_map.CORP.EXAMPLE: the same UPN suffix as identity.realm_map.Corp.Example (keys match without "
        "regard to case), mapped to another realm ('OTHER.TEST', not 'LAB.TEST'): keep the one meant",
    ),
    (  # [directory]'s realm comes from base_dn's DC components: DC=ad,DC=test is AD.TEST
        '"Corp.Example" = "LAB.TEST"',
        '"corp.example" = "ad.test"',
        "identity.realm_map.corp.example: 'ad.test' is [directory]'s realm (from base_dn) 'AD.TEST' in another case",
    ),
]
DIRECTORY = '\n[directory]\nurls = ["ldap://dc.ad.test"]\nbase_dn = "DC=ad,DC=test"\n'


@pytest.mark.parametrize(("old", "new", "problem"), BROKEN)
def test_broken_configurations_name_the_key_and_the_file(tmp_path: Path, old: str, new: str, problem: str) -> None:
    """Each broken value is reported with its key and the configuration file's path."""
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD.replace(old, new, 1) + (DIRECTORY if "ad.test" in new else "")))
    assert any(p.startswith(problem) and str(tmp_path / "gateway.toml") in p for p in e.value.problems), (
        e.value.problems
    )


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (  # a route's key after [kerberos], meant for the [[routes]] header below it
            'keytab = "proxy.keytab"\n',
            'keytab = "proxy.keytab"\nprefix = "/owa/"\n',
            "kerberos.prefix: unknown key (a key of [[routes]]: written above its [[routes]] header?)",
        ),
        (  # a listener's key above every header: TOML puts it at the top level
            "[listener]\n",
            "max_connections = 100\n[listener]\n",
            "max_connections: unknown key (a key of [listener]: written above its [listener] header?)",
        ),
        (  # a key two tables have, under a third
            'source = "san-upn"\n',
            'source = "san-upn"\nbind = "127.0.0.1:9443"\n',
            "identity.bind: unknown key (a key of [listener] or [admin] or [directory]: written under the wrong "
            "header?)",
        ),
        (  # a key of [client_certificates] in a route
            'spn = "HTTP/cas.lab.test"\n',
            'spn = "HTTP/cas.lab.test"\nrevocation = "best-effort"\n',
            "routes[0].revocation: unknown key (a key of [client_certificates]: written under the wrong header?)",
        ),
    ],
)
def test_an_unknown_key_of_another_table_names_that_table(tmp_path: Path, old: str, new: str, problem: str) -> None:
    """A key unknown in its table but known in another (TOML put it in the table whose header came before it) is
    reported naming the table it belongs to, instead of a bare "unknown key" or a did-you-mean of its own table."""
    assert old in GOOD
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD.replace(old, new, 1)))
    assert f"{problem} (in {tmp_path / 'gateway.toml'})" in e.value.problems, e.value.problems


@pytest.mark.parametrize("name", ["svc-kcdproxy", "HTTP/kcd-gw.corp.example.com"])
def test_a_principal_without_its_realm_is_refused_naming_the_realm_and_both_forms(tmp_path: Path, name: str) -> None:
    """`kerberos.principal` without `@REALM` is refused saying the realm is missing and how to write it, for an
    account's name (AD: what docs/deploying.md says to use) as for a service principal (MIT). Failed before: the
    message was "expected service/host@REALM" for both, steering an AD administrator to the bare SPN that AD
    refuses as a client."""
    text = GOOD.replace('principal = "HTTP/proxy.lab.test@LAB.TEST"', f'principal = "{name}"')
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    (problem,) = [p for p in e.value.problems if p.startswith("kerberos.principal:")]
    assert f"{name!r} has no realm" in problem, problem
    assert f"{name}@" in problem, problem
    assert "svc-kcdproxy@CORP.EXAMPLE.COM" in problem, problem
    assert "HTTP/" in problem, problem
    assert "expected service/host@REALM" not in problem, problem


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    """Several mistakes come back in one pass, not one per run."""
    text = GOOD.replace('bind = "127.0.0.1:8443"', 'bind = "x"').replace('spn = "HTTP/cas.lab.test"', 'spn = "x"')
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    assert len(e.value.problems) == 2


def test_not_toml_and_missing_file_are_reported(tmp_path: Path) -> None:
    """A file that is not TOML, or not there, is a clear error."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(_write(tmp_path, "[listener\n"))
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "absent.toml")


def test_checked_in_lab_configuration_points_into_the_default_lab() -> None:
    """config/lab.toml names the files the default lab directory holds."""
    from proxy.lab.layout import LabLayout

    text = (Path(__file__).parents[2] / "config" / "lab.toml").read_text()
    layout = LabLayout.default()
    import tomllib

    data = tomllib.loads(text)
    base = Path(__file__).parents[2] / "config"
    assert (base / data["kerberos"]["keytab"]).resolve() == layout.proxy_keytab
    assert (base / data["client_certificates"]["trust_anchors"][0]).resolve() == layout.pki_dir / "root.pem"
    assert data["routes"][0]["upstream"].endswith(f":{layout.backend_port}")


@pytest.mark.parametrize(
    ("prefix", "path", "taken"),
    [
        ("/ews", "/ews", True),
        ("/ews", "/EWS/x", True),
        ("/ews", "/ewsfoo", False),
        ("/ews", "/ews.bak", False),
        ("/ews/", "/ews/x", True),
        ("/ews/", "/ews", False),
        ("/", "/anything", True),
    ],
)
def test_a_route_prefix_is_whole_path_segments(prefix: str, path: str, taken: bool) -> None:
    """`/ews` takes `/ews` and what is under `/ews/`, never `/ewsfoo`."""
    assert config.Route(prefix=prefix, upstream="http://b", spn="HTTP/b").matches(path) is taken


@pytest.mark.parametrize("value", ["nan", "inf", "-nan", "+inf"])
@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("[listener]", "keepalive_timeout"),
        ("[client_certificates]", "crl_refresh_seconds"),
        ("[kerberos]", "kdc_timeout"),
        ("[identity]", "certificate_backdating_compensation"),
    ],
)
def test_a_number_that_is_not_finite_names_its_key(tmp_path: Path, section: str, key: str, value: str) -> None:
    """TOML reads `nan` and `inf` as floats, and `nan` passed every "must be positive" check (`nan <= 0` is false):
    `crl_refresh_seconds = nan` made the CRL refresher a busy loop (asyncio.wait_for times out at once), a `nan`
    timeout failed every wait at once. Each is refused, naming the key."""
    text = GOOD.replace(section, f"{section}\n{key} = {value}", 1)
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    prefix = section.strip("[]")
    assert any(p.startswith(f"{prefix}.{key}: expected a finite number") for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    ("listener", "admin"),
    [
        ("127.0.0.1:8443", "127.0.0.1:8443"),
        ("0.0.0.0:8443", "127.0.0.1:8443"),
        ("[::]:8443", "127.0.0.1:8443"),
        ("127.0.0.1:8443", "localhost:8443"),
    ],
)
def test_an_admin_listener_on_the_listeners_address_is_refused(tmp_path: Path, listener: str, admin: str) -> None:
    """`admin.bind` on the device listener's port, at its address or under its wildcard, is refused naming both
    keys: with several workers both bind with SO_REUSEPORT and the kernel gave about half of the devices'
    connections to the plain-HTTP admin listener (TLS failed, and the traces answered on the device port)."""
    text = GOOD.replace('bind = "127.0.0.1:8443"', f'bind = "{listener}"\nworkers = 2')
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text + f'\n[admin]\nbind = "{admin}"\n'))
    assert any(p.startswith("admin.bind:") and "listener.bind" in p for p in e.value.problems), e.value.problems


def test_the_overlap_names_an_ipv6_address_in_brackets(tmp_path: Path) -> None:
    """The refusal writes both addresses as every output does, an IPv6 one in brackets (`proxy.addresses.host_port`,
    once copied here as `_bind`): the text is as it was."""
    text = GOOD.replace('bind = "127.0.0.1:8443"', 'bind = "[::]:8443"\nworkers = 2')
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text + '\n[admin]\nbind = "[::1]:8443"\n'))
    expected = "admin.bind: [::1]:8443 takes connections meant for listener.bind ([::]:8443)"
    assert any(p.startswith(expected) for p in e.value.problems), e.value.problems


def test_an_admin_listener_on_another_port_or_address_is_accepted(tmp_path: Path) -> None:
    """The same port at another specific address, or another port, is no overlap."""
    for listener, admin in (("192.0.2.10:8443", "127.0.0.1:8443"), ("0.0.0.0:8443", "127.0.0.1:9443")):
        text = GOOD.replace('bind = "127.0.0.1:8443"', f'bind = "{listener}"')
        cfg = config.load(_write(tmp_path, text + f'\n[admin]\nbind = "{admin}"\n'))
        assert cfg.admin is not None


@pytest.mark.parametrize(
    "url", ["http://:8080/ca.crl?sig=T0kenT0ken", "https://svc:T0kenT0ken@/ca.crl", "ftp://h/ca.crl?sig=T0kenT0ken"]
)
def test_a_refused_crl_url_is_named_without_its_password_or_token(tmp_path: Path, url: str) -> None:
    """A CRL URL the configuration refuses (no host, another scheme) is named as every output names a CRL URL
    (`shown_location`): the problem is printed by check-config and logged by a reload, so no password or query value."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD.replace('crls = ["pki/crls.pem"]', f'crls = ["{url}"]')))
    assert e.value.problems[0].startswith("client_certificates.crls[0]:")
    assert "T0kenT0ken" not in " ".join(e.value.problems)


def test_a_configuration_loaded_from_text_read_before_is_the_files_and_equal_to_itself(tmp_path: Path) -> None:
    """`load(path, text)` parses the text (a reload's, kept for a replacement worker) whatever the file holds now, its
    relative names the file's; two loads of one text are equal, which a replacement relies on not to try one twice."""
    path = _write(tmp_path, GOOD)
    text = path.read_bytes()
    path.write_text(GOOD + "\n[listener\n")  # caught half edited
    with pytest.raises(ConfigError):
        config.load(path)
    cfg = config.load(path, text)
    assert cfg.path == path
    assert cfg.listener.certificate == tmp_path / "tls/server-chain.pem"
    assert cfg == config.load(path, text)
    assert cfg in [config.load(path, text)]


@pytest.mark.parametrize(
    "realm_map",
    [
        '{ "corp.example" = "corp.example" }',  # a realm in small letters no other key names: check-config warns
        '{ "CORP.EXAMPLE" = "LAB.TEST" }',  # a suffix in capitals, mapped to a realm in capitals
        '{ "lab.test" = "OTHER.TEST" }',  # the gateway's realm's domain as a UPN suffix of another realm (a forest's)
    ],
)
def test_realm_maps_that_may_be_meant_load(tmp_path: Path, realm_map: str) -> None:
    """A realm_map that is not a known realm in another case, nor the wrong way round, loads."""
    cfg = config.load(_write(tmp_path, GOOD.replace('{ "Corp.Example" = "LAB.TEST" }', realm_map, 1)))
    assert len(cfg.identity.realm_map) == 1
