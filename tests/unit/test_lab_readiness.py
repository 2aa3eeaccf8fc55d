"""The readiness AS-REQ and the KRB-ERROR reader (proxy.lab.readiness), byte for byte."""

from __future__ import annotations

import pytest

from proxy.lab import readiness
from proxy.lab.readiness import _ctx, _int, _seq, _tlv


def _krb_error(code: int) -> bytes:
    """A KRB-ERROR as a KDC sends it: pvno, msg-type 30, stime, susec, error-code, realm, sname."""
    fields = _seq(
        _ctx(0, _int(5)),
        _ctx(1, _int(30)),
        _ctx(4, _tlv(0x18, b"20261205020000Z")),
        _ctx(5, _int(0)),
        _ctx(6, _int(code)),
        _ctx(9, _tlv(0x1B, b"LAB.TEST")),
    )
    return _tlv(0x7E, fields)


def test_the_as_req_is_an_application_10_naming_the_client_and_realm() -> None:
    """The request is [APPLICATION 10] (AS-REQ) with pvno 5, msg-type 10, the probe's client and krbtgt/REALM."""
    request = readiness.as_req("LAB.TEST")
    assert request[0] == 0x6A
    assert _ctx(1, _int(5)) + _ctx(2, _int(10)) in request
    assert readiness.CLIENT_NAME.encode() in request
    assert b"krbtgt" in request
    assert request.count(b"LAB.TEST") == 2


@pytest.mark.parametrize("code", [6, 24, 25, 29, 68, 300])
def test_the_error_code_of_a_krb_error_is_read(code: int) -> None:
    """Any KRB-ERROR's error-code is read back, whatever its size."""
    assert readiness.krb_error_code(_krb_error(code)) == code


def test_an_answer_that_is_not_a_krb_error_has_no_code() -> None:
    """An AS-REP ([APPLICATION 11]) or an empty answer is not a KRB-ERROR."""
    assert readiness.krb_error_code(_tlv(0x6B, _seq())) is None
    assert readiness.krb_error_code(b"") is None


def test_a_cut_krb_error_is_refused() -> None:
    """A KRB-ERROR cut short raises ValueError rather than reading past its end."""
    with pytest.raises(ValueError, match="past the end"):
        readiness.krb_error_code(_krb_error(6)[:-3])


def test_long_lengths_are_encoded_in_long_form() -> None:
    """A body of 300 bytes gets the two-byte long form of its length."""
    assert _tlv(0x04, b"x" * 300)[:4] == bytes([0x04, 0x82, 0x01, 0x2C])
