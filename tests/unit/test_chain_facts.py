"""What the restriction and identity stages compute from a verified chain, remembered per chain and gateway.

A request's certificate stages get the same `VerifiedCertificate` object for every request of a certificate
(`proxy.certs.memo.VerifiedChains`); the restriction rule that admits it and the user principal its names give
depend only on it and on the configuration, which each `Gateway` has one of. These tests attack that memory:
two users interleaved, a reloaded configuration that maps or restricts differently, refusals.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from proxy.certs.chain import TrustList, VerifiedCertificate
from proxy.certs.memo import ChainFacts, VerifiedChains
from proxy.config import Identity, Restriction
from proxy.errors import CertificateRejected, IdentityRejected
from proxy.lab.pki import Pki
from proxy.pipeline import Gateway
from tests.unit.conftest import NOW


@pytest.fixture(scope="module")
def chains(pki: Pki) -> VerifiedChains:
    return VerifiedChains(TrustList.load([pki.root_cert], [pki.issuing_cert]))


def verified(pki: Pki, chains: VerifiedChains, name: str) -> VerifiedCertificate:
    """As a request gets it: the certificate parsed anew, its chain from the memo."""
    return chains.verify(x509.load_pem_x509_certificate(pki.user_cert(name).read_bytes()), at=NOW)


def gateway(realm: str = "LAB.TEST", restrictions: tuple[Restriction, ...] = ()) -> Any:
    config = SimpleNamespace(
        identity=Identity(realm_map={"lab.test": realm}),
        client_certificates=SimpleNamespace(restrictions=restrictions),
    )
    return Gateway(config=config, trust=None, revocation=None, delegator=None, pools=None, basic=None)  # type: ignore[arg-type]


def test_two_users_interleaved_get_their_own_principals(pki: Pki, chains: VerifiedChains) -> None:
    """Alice's and bob's requests in turn: each one's principal, every time."""
    gw = gateway()
    for _ in range(3):
        for name in ("alice", "bob", "carol"):
            user = gw.identify(verified(pki, chains, name))
            assert (user.upn, user.principal) == (f"{name}@lab.test", f"{name}@LAB.TEST")


def test_a_reloaded_configuration_maps_the_same_chain_afresh(pki: Pki, chains: VerifiedChains) -> None:
    """The gateway built from a new configuration maps the very chain object the old one had remembered."""
    alice = verified(pki, chains, "alice")
    old, new = gateway("LAB.TEST"), gateway("CORP.EXAMPLE")
    assert old.identify(alice).principal == "alice@LAB.TEST"
    assert new.identify(alice).principal == "alice@CORP.EXAMPLE"
    assert old.identify(alice).principal == "alice@LAB.TEST"


def test_a_reloaded_restriction_applies_to_a_remembered_chain(pki: Pki, chains: VerifiedChains) -> None:
    """Admitted under one rule set, refused under a new one that no longer admits it, at once."""
    alice = verified(pki, chains, "alice")
    admits = gateway(restrictions=(Restriction(name="alice", subject="CN=alice"),))
    refuses = gateway(restrictions=(Restriction(name="bob only", subject="CN=bob"),))
    assert admits.admission(alice).rule == "alice"
    with pytest.raises(CertificateRejected):
        refuses.admission(alice)
    assert admits.admission(alice).rule == "alice"


def test_refusals_are_computed_every_time(pki: Pki, chains: VerifiedChains) -> None:
    """A chain whose names give no identity is refused on each request, and an answer is computed once."""
    calls: list[str] = []

    def compute(v: VerifiedCertificate) -> str:
        calls.append(v.subject)
        if v.subject == "CN=heidi":
            raise IdentityRejected("no UPN")
        return v.subject

    facts = ChainFacts(compute)
    noupn = verified(pki, chains, "noupn")
    for _ in range(2):
        with pytest.raises(IdentityRejected):
            facts(noupn)
        assert facts(verified(pki, chains, "alice")) == "CN=alice"
    assert calls == ["CN=heidi", "CN=alice", "CN=heidi"]


def test_only_the_same_chain_object_gets_the_answer(pki: Pki, chains: VerifiedChains) -> None:
    """An equal chain in another object is computed afresh (the answer is filed under the object it was for)."""
    import dataclasses

    facts = ChainFacts(lambda v: v.subject)
    alice = verified(pki, chains, "alice")
    assert facts(alice) == "CN=alice"
    assert facts(dataclasses.replace(alice, subject="CN=other")) == "CN=other"
    assert len(facts) == 2
