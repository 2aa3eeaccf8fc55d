"""A CRL set's verdicts, remembered per verified chain: never served past the moment a CRL changes state.

`CrlSet.check` remembers its answer for a `VerifiedCertificate` (the chain memo hands out the same object on
every request of a certificate) for as long as no CRL of the set becomes or stops being current. These
tests attack that memory: a CRL that expires, one that becomes current, a delta that goes stale, another
policy, another certificate, a new set after a refresh; and every boundary of a set compared against a
set that has remembered nothing.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.revocation import CLOCK_SKEW, CrlSet, RevocationEvidence, RevocationPolicy, RevocationStatus
from proxy.errors import CertificateRevoked
from proxy.lab.pki import Pki
from tests.pem import load_cert, load_key
from tests.unit.conftest import NOW

US = timedelta(microseconds=1)


def verified(pki: Pki, trust: TrustList, name: str) -> VerifiedCertificate:
    return verify_chain(load_cert(pki.user_cert(name)), trust, at=NOW)


def crl(
    pki: Pki,
    serials: tuple[int, ...] = (),
    *,
    this_update: datetime = NOW - timedelta(hours=1),
    next_update: datetime = NOW + timedelta(days=1),
    number: int = 1,
    delta_of: int | None = None,
) -> tuple[str, x509.CertificateRevocationList]:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(load_cert(pki.issuing_cert).subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    if delta_of is not None:
        builder = builder.add_extension(x509.DeltaCRLIndicator(delta_of), critical=True)
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=2))
        builder = builder.add_revoked_certificate(entry.build())
    name = f"{'delta' if delta_of is not None else 'crl'}-{number}.crl"
    return name, builder.sign(load_key(pki.issuing_key), hashes.SHA256())


def crl_set(trust: TrustList, *crls: tuple[str, x509.CertificateRevocationList], at: datetime = NOW) -> CrlSet:
    made, problems = CrlSet.build(list(crls), trust, at=at)
    assert problems == []
    return made


def answer(crls: CrlSet, v: VerifiedCertificate, at: datetime, policy: RevocationPolicy) -> RevocationEvidence | str:
    """The evidence, or the refusal's reason and hint: what a request would see."""
    try:
        return crls.check(v, at=at, policy=policy)
    except CertificateRevoked as e:
        return f"refused: {e.reason} ({e.hint})"


def test_a_verdict_is_remembered_for_the_same_chain(pki: Pki, trust: TrustList) -> None:
    """The second request of a certificate gets the first one's evidence object: the lookup ran once."""
    crls = crl_set(trust, crl(pki))
    alice = verified(pki, trust, "alice")
    first = crls.check(alice, at=NOW, policy="require")
    assert first.status is RevocationStatus.GOOD
    assert crls.check(alice, at=NOW + timedelta(minutes=5), policy="require") is first


def test_a_crl_past_its_next_update_is_not_served_from_memory(pki: Pki, trust: TrustList) -> None:
    """Good while the CRL is current; one microsecond past its nextUpdate there is no current CRL."""
    next_update = NOW + timedelta(hours=2)
    crls = crl_set(trust, crl(pki, next_update=next_update))
    alice = verified(pki, trust, "alice")
    assert crls.check(alice, at=NOW, policy="require").status is RevocationStatus.GOOD
    assert crls.check(alice, at=next_update, policy="require").status is RevocationStatus.GOOD  # inclusive
    with pytest.raises(CertificateRevoked, match="no current CRL for issuer 'CN=Lab Issuing CA'"):
        crls.check(alice, at=next_update + US, policy="require")
    late = crls.check(alice, at=next_update + US, policy="best-effort")
    assert late.status is RevocationStatus.UNKNOWN
    assert "expired on" in late.detail
    assert crls.check(alice, at=NOW, policy="require").status is RevocationStatus.GOOD  # and back in time


def test_a_crl_that_becomes_current_is_not_remembered_as_absent(pki: Pki, trust: TrustList) -> None:
    """A CRL issued ahead of time counts from thisUpdate minus the allowed clock skew, not before, not after."""
    starts = NOW + timedelta(hours=1)
    crls = crl_set(trust, crl(pki, this_update=starts), at=starts)  # accepted once current
    alice = verified(pki, trust, "alice")
    before = starts - CLOCK_SKEW - US
    assert crls.check(alice, at=before, policy="best-effort").status is RevocationStatus.UNKNOWN
    assert crls.check(alice, at=starts - CLOCK_SKEW, policy="best-effort").status is RevocationStatus.GOOD
    assert crls.check(alice, at=before, policy="best-effort").status is RevocationStatus.UNKNOWN


def test_a_delta_going_stale_ends_the_remembered_verdict(pki: Pki, trust: TrustList) -> None:
    """A base CRL good for a day with a delta good for an hour: unknown once the delta is stale."""
    delta_until = NOW + timedelta(hours=1)
    crls = crl_set(trust, crl(pki, number=1), crl(pki, number=2, delta_of=1, next_update=delta_until))
    alice = verified(pki, trust, "alice")
    good = crls.check(alice, at=NOW, policy="best-effort")
    assert good.status is RevocationStatus.GOOD
    assert "nor on its delta CRL #2" in good.detail
    assert crls.check(alice, at=delta_until + US, policy="best-effort").status is RevocationStatus.UNKNOWN


def test_the_policy_is_part_of_the_verdict(pki: Pki, trust: TrustList) -> None:
    """Unknown passed under best-effort is not remembered as passed under require."""
    crls = crl_set(trust)  # no CRL at all
    alice = verified(pki, trust, "alice")
    assert crls.check(alice, at=NOW, policy="best-effort").status is RevocationStatus.UNKNOWN
    with pytest.raises(CertificateRevoked, match="no current CRL"):
        crls.check(alice, at=NOW, policy="require")


def test_each_certificate_has_its_own_verdict(pki: Pki, trust: TrustList) -> None:
    """Two users, one set: the revoked one is refused after the good one passed, and the other way round;
    each one's evidence names its own serial."""
    erin = verified(pki, trust, "revoked")
    crls = crl_set(trust, crl(pki, (erin.serial,)))
    alice, bob = verified(pki, trust, "alice"), verified(pki, trust, "bob")
    for _ in range(2):
        assert f"serial 0x{alice.serial:x} is not on" in crls.check(alice, at=NOW, policy="require").detail
        with pytest.raises(CertificateRevoked, match=f"serial 0x{erin.serial:x} was revoked"):
            crls.check(erin, at=NOW, policy="require")
        assert f"serial 0x{bob.serial:x} is not on" in crls.check(bob, at=NOW, policy="require").detail


def test_a_refreshed_set_that_revokes_the_certificate_refuses_it(pki: Pki, trust: TrustList) -> None:
    """The same chain object (as the chain memo hands out to every request of a connection) is refused by the
    set that replaced the one that had found it good: the memory belongs to one set."""
    alice = verified(pki, trust, "alice")
    old = crl_set(trust, crl(pki, number=1))
    assert old.check(alice, at=NOW, policy="require").status is RevocationStatus.GOOD
    new = crl_set(trust, crl(pki, (alice.serial,), number=2))
    with pytest.raises(CertificateRevoked, match=f"serial 0x{alice.serial:x} was revoked"):
        new.check(alice, at=NOW, policy="require")
    assert old.check(alice, at=NOW, policy="require").status is RevocationStatus.GOOD  # the old set is unchanged


def test_at_every_boundary_the_memory_agrees_with_a_fresh_set(pki: Pki, trust: TrustList) -> None:
    """Every moment where a CRL of the set changes state, a microsecond either side, in random order, under
    both policies and for a good and a listed certificate: what a remembering set answers is what a set that
    has remembered nothing answers."""
    erin = verified(pki, trust, "revoked")
    crls = (
        crl(pki, number=1, next_update=NOW + timedelta(hours=6)),
        crl(pki, (erin.serial,), number=2, delta_of=1, next_update=NOW + timedelta(hours=2)),
        crl(pki, number=3, this_update=NOW + timedelta(hours=1), next_update=NOW + timedelta(hours=4)),
    )
    built = NOW + timedelta(hours=1)  # when all three are current
    remembering = crl_set(trust, *crls, at=built)
    edges = [c.this_update - CLOCK_SKEW for c in remembering.crls] + [c.next_update for c in remembering.crls]
    moments = [edge + step for edge in edges for step in (-US, timedelta(0), US)] + [NOW, NOW - timedelta(days=1)]
    random.Random(18).shuffle(moments)
    users = (verified(pki, trust, "alice"), erin)
    seen: set[str] = set()
    policies: tuple[RevocationPolicy, ...] = ("require", "best-effort")
    for at in moments * 2:
        for user in users:
            for policy in policies:
                expected = answer(crl_set(trust, *crls, at=built), user, at, policy)
                assert answer(remembering, user, at, policy) == expected, (at, user.subject, policy)
                seen.add(expected if isinstance(expected, str) else expected.status.value)
    assert {"good", "unknown"} <= seen  # every kind of answer was met
    assert any(s.startswith("refused") for s in seen)


def test_a_naive_time_is_still_refused(pki: Pki, trust: TrustList) -> None:
    """A time without a zone is a programming error, remembered verdict or not."""
    crls = crl_set(trust, crl(pki))
    alice = verified(pki, trust, "alice")
    crls.check(alice, at=NOW, policy="require")
    with pytest.raises(ValueError, match="timezone-aware"):
        crls.check(alice, at=NOW.replace(tzinfo=None), policy="require")


def test_may_list_is_remembered_per_chain_and_per_set(pki: Pki, trust: TrustList) -> None:
    """The pre-filter of the revocation watch: a revoked user's chain is listed, another's is not, each answer the
    same when asked again and the same as a set that remembers nothing; a chain equal to a remembered one but
    another object is decided afresh; a refreshed set that lists alice says so for the same chain object."""
    erin, alice = verified(pki, trust, "revoked"), verified(pki, trust, "alice")
    crls = crl_set(trust, crl(pki, (erin.serial,)))
    for _ in range(2):
        assert crls.may_list(erin) is True
        assert crls.may_list(alice) is False
    fresh = crl_set(trust, crl(pki, (erin.serial,)))
    assert [fresh.may_list(erin), fresh.may_list(alice)] == [True, False]
    again = verified(pki, trust, "revoked")  # another object for erin's chain
    assert again is not erin
    assert crls.may_list(again) is True
    refreshed = crl_set(trust, crl(pki, (erin.serial, alice.serial), number=2))
    assert refreshed.may_list(alice) is True
    assert crls.may_list(alice) is False  # the old set is unchanged
