"""What a reload's backend pools keep (the users' connections, unchanged routes' TLS) and what they make anew."""

from __future__ import annotations

import dataclasses
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.backend.forward import Pools
from proxy.config import Listener, Route
from proxy.lab.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), now=datetime.now(UTC))


def _route(prefix: str, upstream: str, bundle: Path | None = None) -> Route:
    return Route(prefix=prefix, upstream=upstream, spn="HTTP/cas.lab.test", ca_bundle=bundle)


def test_unchanged_routes_keep_their_context_and_upstream_and_users_are_shared(pki: Pki, tmp_path: Path) -> None:
    """Same routes, same bundle bytes: the successor has the very same TLS context and upstream (so the users'
    warm connections, keyed by upstream, are used), and the same users' pools, not a copy."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pki.root_cert.read_bytes())
    routes = (_route("/tls/", "https://cas.lab.test", bundle), _route("/", "http://127.0.0.1:8081"))
    old = Pools(routes)
    before = {r: old.upstream(r) for r in routes}
    with old.lease("alice@LAB.TEST"):
        new = old.successor(routes, None)
        assert new.users() == {"alice@LAB.TEST": 1}  # the lease taken through the old pools counts in the new
    assert new.shares_users(old)
    assert all(new.upstream(r) is before[r] for r in routes)
    assert new.tls(routes[0]) is old.tls(routes[0])


def test_a_bundle_rewritten_in_place_gets_a_new_context_and_upstream(pki: Pki, tmp_path: Path) -> None:
    """The same route whose CA bundle now holds other bytes (a CA rotation under the same file name): a new
    TLS context and a new upstream, so no connection made under the old trust is reused for it."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pki.root_cert.read_bytes())
    route = _route("/tls/", "https://cas.lab.test", bundle)
    old = Pools([route])
    upstream = old.upstream(route)
    bundle.write_bytes(pki.rogue_root_cert.read_bytes())
    new = old.successor([route], None)
    assert new.tls(route) is not old.tls(route)
    assert new.upstream(route) is not upstream
    assert new.shares_users(old)


def test_the_send_timeout_stays_and_the_body_timeout_follows_the_reload(tmp_path: Path) -> None:
    """client_body_timeout is the pools' alone, so a reload applies it; client_send_timeout is shared with the
    device server, which reads it at start, so the pools keep theirs too (reload_needs_restart names it)."""
    base = Listener("127.0.0.1", 8443, tmp_path / "c.pem", tmp_path / "k.pem")
    old = Pools((), base)
    new = old.successor((), dataclasses.replace(base, client_body_timeout=7.0, client_send_timeout=9.0))
    assert (new.client_body_timeout, new.client_send_timeout) == (7.0, base.client_send_timeout)


def test_the_bundle_bytes_compared_on_reload_are_the_ones_trusted(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA rotation that lands while the pools are being made (a `[reload] watch` reload fired by the rewrite
    itself) never leaves the old trust in place: the bytes a reload compares are those the TLS context trusts.
    Before, the context read the file and then the bytes were read again: made from the old CA, remembered
    as the new one, and every later reload kept the old CA's context."""
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pki.root_cert.read_bytes())
    rotated = pki.rogue_root_cert.read_bytes()
    route = _route("/tls/", "https://cas.lab.test", bundle)
    made = ssl.create_default_context

    def made_then_rotated(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        context = made(*args, **kwargs)
        bundle.write_bytes(rotated)  # the rotation's write lands just after the context read the file
        return context

    monkeypatch.setattr(ssl, "create_default_context", made_then_rotated)
    old = Pools([route])
    monkeypatch.setattr(ssl, "create_default_context", made)
    new = old.successor([route], None)
    trusted = new.tls(route)
    assert isinstance(trusted, ssl.SSLContext)
    rotated_der = x509.load_pem_x509_certificate(rotated).public_bytes(serialization.Encoding.DER)
    assert trusted.get_ca_certs(binary_form=True) == [rotated_der]
