"""The lab realm (slapd + MIT KDC with the LDAP back end) does protocol transition and constrained delegation.

These tests drive python-gssapi the way the gateway will: the proxy's keytab gets a TGT, `impersonate`
does S4U2Self, and a SecurityContext to the backend's SPN does S4U2Proxy. The realm lives in a temporary
directory on its own ports, so it never meets the main lab.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gssapi
import pytest
from gssapi.raw.misc import GSSError

from proxy.lab.kdc import RealmError, ensure_realm, realm_status, stop_realm
from proxy.lab.layout import BACKEND_SERVICE, OTHER_SERVICE, PROXY_SERVICE, REALM, LabLayout
from tests.integration.conftest import free_port

_TOOLS = ("slapd", "krb5kdc", "kdb5_ldap_util", "kadmin.local", "ldapadd", "ldapmodify")
_MISSING = [tool for tool in _TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"lab realm tools not on PATH: {', '.join(_MISSING)}")


@pytest.fixture(scope="module")
def realm_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabLayout]:
    layout = LabLayout(root=tmp_path_factory.mktemp("kdc-lab"), ldap_port=free_port(), kdc_port=free_port())
    try:
        ensure_realm(layout)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KRB5_CONFIG", str(layout.krb5_conf))
            yield layout
    finally:
        stop_realm(layout)


def _principal(name: str) -> gssapi.Name:
    return gssapi.Name(f"{name}@{REALM}", gssapi.NameType.kerberos_principal)


def _impersonate(layout: LabLayout, user: str) -> gssapi.Credentials:
    """S4U2Self: the proxy's credentials from its keytab, then an evidence ticket for `user`."""
    keytab = str(layout.proxy_keytab)
    store: dict[bytes | str, bytes | str] = {
        "client_keytab": keytab,
        "keytab": keytab,
        "ccache": f"MEMORY:{uuid.uuid4().hex}",
    }
    service = gssapi.Credentials(name=_principal(PROXY_SERVICE), usage="both", store=store)
    return service.impersonate(_principal(user), usage="initiate")


def _delegate(layout: LabLayout, user: str, spn: str) -> bytes:
    """S4U2Self, then S4U2Proxy to `spn` (e.g. HTTP/cas.lab.test): the Negotiate token a backend would get."""
    service, host = spn.split("/")
    target = gssapi.Name(f"{service}@{host}", gssapi.NameType.hostbased_service)
    context = gssapi.SecurityContext(name=target, creds=_impersonate(layout, user), usage="initiate")
    token: bytes = context.step()
    return token


def _accept(keytab: Path, token: bytes) -> str:
    """What an independent acceptor holding `keytab` believes about the token's client."""
    creds = gssapi.Credentials(usage="accept", store={"keytab": str(keytab)})
    context = gssapi.SecurityContext(creds=creds, usage="accept")
    context.step(token)
    assert context.complete
    return str(context.initiator_name)


def _lab_processes(layout: LabLayout) -> list[str]:
    """Command lines of live processes that name a file of this lab (zombies have none)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg.startswith(f"{layout.root}{os.sep}") for arg in argv):
            found.append(" ".join(argv).strip())
    return found


def test_delegation_to_allowed_backend_reaches_acceptor_as_user(realm_lab: LabLayout) -> None:
    """S4U2Self + S4U2Proxy for alice gives a token the backend's own keytab accepts as alice@LAB.TEST."""
    token = _delegate(realm_lab, "alice", BACKEND_SERVICE)

    assert _accept(realm_lab.backend_keytab, token) == f"alice@{REALM}"
    log = realm_lab.kdc_log.read_text()
    assert f"PROTOCOL-TRANSITION s4u-client=alice@{REALM}" in log
    assert f"CONSTRAINED-DELEGATION s4u-client=alice@{REALM}" in log


def test_target_outside_allow_list_is_refused(realm_lab: LabLayout) -> None:
    """The KDC refuses S4U2Proxy to an existing service that is not in krbAllowedToDelegateTo."""
    with pytest.raises(GSSError, match="KDC can't fulfill requested option"):
        _delegate(realm_lab, "alice", OTHER_SERVICE)


def test_unknown_user_is_not_found(realm_lab: LabLayout) -> None:
    """S4U2Self for a user the realm does not know fails with the KDC's client-not-found error."""
    with pytest.raises(GSSError, match="Client not found in Kerberos database"):
        _delegate(realm_lab, "nobody", BACKEND_SERVICE)


def test_disabled_user_is_revoked(realm_lab: LabLayout) -> None:
    """S4U2Self for a user created with -allow_tix (dave) fails as revoked credentials."""
    with pytest.raises(GSSError, match="credentials have been revoked"):
        _delegate(realm_lab, "dave", BACKEND_SERVICE)


def test_second_ensure_realm_is_a_fast_no_op(realm_lab: LabLayout) -> None:
    """ensure_realm on a running realm returns within a second and restarts nothing."""
    pids = {name: (realm_lab.run_dir / f"{name}.pid").read_text() for name in ("slapd", "krb5kdc")}

    started = time.monotonic()
    ensure_realm(realm_lab)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert {name: (realm_lab.run_dir / f"{name}.pid").read_text() for name in pids} == pids
    assert realm_status(realm_lab) == {"slapd": True, "krb5kdc": True}
    assert _accept(realm_lab.backend_keytab, _delegate(realm_lab, "bob", BACKEND_SERVICE)) == f"bob@{REALM}"


def test_stop_leaves_nothing_and_restart_keeps_the_realm(realm_lab: LabLayout) -> None:
    """stop_realm leaves no process of the lab; ensure_realm then restarts it from its files, keys unchanged."""
    keytab_before = realm_lab.proxy_keytab.read_bytes()

    stop_realm(realm_lab)
    assert realm_status(realm_lab) == {"slapd": False, "krb5kdc": False}
    assert _lab_processes(realm_lab) == []
    stop_realm(realm_lab)  # stopping a stopped realm is fine

    ensure_realm(realm_lab)
    assert realm_status(realm_lab) == {"slapd": True, "krb5kdc": True}
    assert realm_lab.proxy_keytab.read_bytes() == keytab_before
    assert _accept(realm_lab.backend_keytab, _delegate(realm_lab, "carol", BACKEND_SERVICE)) == f"carol@{REALM}"


def test_failed_start_names_the_port_and_leaves_nothing_running(tmp_path: Path) -> None:
    """A realm whose KDC port is taken fails with a RealmError naming the port, and stops the slapd it started."""
    layout = LabLayout(root=tmp_path / "lab", ldap_port=free_port(), kdc_port=free_port())
    with (
        socket.create_server(("127.0.0.1", layout.kdc_port)),
        pytest.raises(RealmError, match=re.escape(f"127.0.0.1:{layout.kdc_port} is taken")),
    ):
        ensure_realm(layout)

    assert realm_status(layout) == {"slapd": False, "krb5kdc": False}
    assert _lab_processes(layout) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["ldapadd", "-x", "-H", "ldap://127.0.0.1:{port}/", "-D", "cn=admin,dc=lab,dc=test", "-w", "{secret}"],
        ["kdb5_ldap_util", "-H", "ldap://127.0.0.1:{port}/", "create", "-r", "LAB.TEST", "-s", "-P", "{secret}"],
        ["no-such-lab-tool-{port}", "-w", "{secret}"],
    ],
    ids=["ldapadd", "kdb5_ldap_util", "not-run"],
)
def test_a_failing_lab_tool_is_named_without_the_password_it_was_given(tmp_path: Path, argv: list[str]) -> None:
    """A provisioning step that fails (ldapadd -w, kdb5_ldap_util -P; a tool that does not run) raises RealmError
    naming the command, with `-w`'s and `-P`'s value left out: the message reaches `lab serve kdc`'s stderr, the
    container's log (it quoted the LDAP root and KDC master passwords)."""
    from proxy.lab import kdc

    password = f"s3cret-{uuid.uuid4().hex[:8]}"
    layout = LabLayout(root=tmp_path, ldap_port=free_port(), kdc_port=free_port())
    command = [arg.format(port=layout.ldap_port, secret=password) for arg in argv]
    with pytest.raises(RealmError) as e:
        kdc._run(command, layout)
    assert command[0] in str(e.value)
    assert password not in str(e.value)
    assert "-w ***" in str(e.value) or "-P ***" in str(e.value)


def test_a_failing_kadmin_query_is_named_without_the_password_it_sets(tmp_path: Path) -> None:
    """`kadmin.local -q "addprinc -pw <password> alice"` failing (here: no realm database behind the lab's krb5.conf)
    raises RealmError naming the query with `-pw ***`: it quoted the query whole, the user's password with it."""
    from proxy.lab import kdc

    password = f"s3cret-{uuid.uuid4().hex[:8]}"
    layout = LabLayout(root=tmp_path, ldap_port=free_port(), kdc_port=free_port())
    kdc._write_files(layout)
    with pytest.raises(RealmError) as e:
        kdc._kadmin(layout, f"addprinc -pw {password} alice")
    assert "kadmin.local -q" in str(e.value)
    assert "addprinc -pw *** alice" in str(e.value)
    assert password not in str(e.value)
