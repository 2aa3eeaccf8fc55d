"""The GSS checksum (RFC 4121 §4.1.1) the held-ticket tokens carry: what MIT's GSS initiator writes for our flags."""

from __future__ import annotations

import gssapi
import pytest

from proxy.kerberos.ap_req import gss_checksum
from proxy.kerberos.password import TOKEN_FLAGS


def test_the_checksum_for_the_gateways_flags_is_mits() -> None:
    """Lgth 16, 16 zero bytes (no channel bindings), then sequence (8) with MIT's confidentiality (16), integrity
    (32) and TRANS (256), little-endian: 0x138, the flags MIT's acceptor reads from MIT's own tokens here."""
    assert gss_checksum(TOKEN_FLAGS) == bytes.fromhex("10000000") + bytes(16) + bytes.fromhex("38010000")


@pytest.mark.parametrize(
    "flag", [gssapi.RequirementFlag.mutual_authentication, gssapi.RequirementFlag.delegate_to_peer]
)
def test_flags_needing_more_than_one_token_are_refused(flag: gssapi.RequirementFlag) -> None:
    """Mutual authentication (an AP-REP to read) and delegation (a forwarded TGT) are not made by this path."""
    with pytest.raises(ValueError, match="context flags"):
        gss_checksum([*TOKEN_FLAGS, flag])
