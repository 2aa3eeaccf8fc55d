"""When a cached service ticket stops serving requests (`usable_until`) and when its renewal starts (`renew_from`)."""

from __future__ import annotations

import pytest

from proxy.kerberos.delegate import RENEW_BEFORE, TOKEN_LEFT, USABLE_FOR, renew_from, usable_until


@pytest.mark.parametrize(
    ("life", "margin"),
    [
        (36_000.0, USABLE_FOR),  # AD's 10 hours
        (4 * USABLE_FOR, USABLE_FOR),
        (60.0, 15.0),
        (30.0, 7.5),
        (5.0, TOKEN_LEFT),
    ],
)
def test_a_ticket_keeps_usable_for_or_a_quarter_of_a_short_life_and_renews_before_it_stops_serving(
    life: float, margin: float
) -> None:
    """A long ticket stops serving USABLE_FOR before it ends; one living less than 4 x USABLE_FOR a quarter of its life
    before (at least TOKEN_LEFT), so one of 30 s serves its first 22.5 s (it served none: every request waited for the
    KDC); its background renewal always starts before it stops serving."""
    obtained = 1000.0
    expires = obtained + life
    until = usable_until(obtained, expires)
    assert until == pytest.approx(expires - margin)
    assert obtained < renew_from(obtained, expires) < until
    assert renew_from(obtained, expires) >= min(expires - RENEW_BEFORE, obtained + life / 2)


def test_a_ticket_of_unknown_age_keeps_the_fixed_margin() -> None:
    """No exchange time known (obtained infinite): USABLE_FOR before it ends, as before."""
    assert usable_until(float("inf"), 1000.0) == 1000.0 - USABLE_FOR
