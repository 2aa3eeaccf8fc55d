"""A CRL's entries as `Entries` holds them: ints the garbage collector does not track, an `Entry` made when asked."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.certs.revocation import Entries, Entry

CA = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Issuing CA")])
PARTNER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Partner CA")])


def test_every_reason_and_time_comes_back_as_it_was_listed() -> None:
    """Each of RFC 5280's reasons, with times before the epoch, to the microsecond and near datetime's end, comes
    back as the `Entry` the CRL listed; a serial not listed is None."""
    times = [
        datetime(1950, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 12, 6, 15, 27, 8, 250, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ]
    entries = Entries()
    expected = {}
    for i, (reason, when) in enumerate((r, t) for r in x509.ReasonFlags for t in times):
        serial = 2**159 + i  # twenty octets, as a CA's random serials are
        entries.add(CA, serial, when, reason)
        expected[(CA, serial)] = Entry(when, reason)
    assert {key: entries.get(key) for key in expected} == expected
    assert all(entries.get(key).reason is entry.reason for key, entry in expected.items())  # type: ignore[union-attr]
    assert entries.get((CA, 7)) is None
    assert len(entries) == len(expected) == len(x509.ReasonFlags) * len(times)


def test_an_indirect_crls_entries_are_keyed_by_their_certificate_issuer() -> None:
    """The same serial under two certificate issuers (an indirect CRL) is two entries; a serial listed again replaces
    its entry and is counted once; iteration gives every (issuer, serial) key."""
    entries = Entries()
    when = datetime(2026, 1, 2, tzinfo=UTC)
    entries.add(CA, 5, when, x509.ReasonFlags.unspecified)
    entries.add(PARTNER, 5, when, x509.ReasonFlags.key_compromise)
    entries.add(CA, 5, when + timedelta(hours=1), x509.ReasonFlags.certificate_hold)
    assert len(entries) == 2
    assert sorted(entries, key=lambda k: k[0].rfc4514_string()) == [(CA, 5), (PARTNER, 5)]
    assert (PARTNER, 5) in entries
    assert (PARTNER, 6) not in entries
    assert (x509.Name([]), 5) not in entries
    assert entries.get((CA, 5)) == Entry(when + timedelta(hours=1), x509.ReasonFlags.certificate_hold)
    assert entries.get((PARTNER, 5)) == Entry(when, x509.ReasonFlags.key_compromise)


def test_the_serials_are_held_where_the_garbage_collector_does_not_look() -> None:
    """However many entries, each issuer's dictionary of serials holds only ints, which the collector does not track."""
    entries = Entries()
    for serial in range(10_000):
        entries.add(CA, serial, datetime(2026, 1, 2, tzinfo=UTC), x509.ReasonFlags.superseded)
    assert not gc.is_tracked(entries._by_issuer[CA])
