"""NIST PKITS revocation tests (sections 4.4, 4.14 and 4.15) through the gateway's own chain and CRL code.

Each test's end-entity certificate is validated with `verify_chain` (purpose "any": PKITS end entities
carry no clientAuth) against the PKITS trust anchor, every PKITS CA certificate being configured as an
intermediate, and then `CrlSet.check` under "require" with every PKITS CRL loaded, at a fixed time
inside the CRLs' validity (they run from 2010 to the end of 2030). The expected verdict is the test's
name: "Valid..." must pass, "Invalid..." must be refused. The data comes from the `cryptography-vectors`
package. docs/revocation.md's "PKITS results" section records the outcome.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

import pytest
from cryptography import x509

from proxy.certs.chain import TrustList, verify_chain
from proxy.certs.revocation import CrlSet, load_crls
from proxy.errors import GatewayError

PKITS = Path(str(files("cryptography_vectors"))) / "x509" / "PKITS_data"
AT = datetime(2020, 6, 1, tzinfo=UTC)

SECTIONS = {
    "4.4 basic certificate revocation": [
        "InvalidMissingCRLTest1",
        "InvalidRevokedCATest2",
        "InvalidRevokedEETest3",
        "InvalidBadCRLSignatureTest4",
        "InvalidBadCRLIssuerNameTest5",
        "InvalidWrongCRLTest6",
        "ValidTwoCRLsTest7",
        "InvalidUnknownCRLEntryExtensionTest8",
        "InvalidUnknownCRLExtensionTest9",
        "InvalidUnknownCRLExtensionTest10",
        "InvalidOldCRLnextUpdateTest11",
        "Invalidpre2000CRLnextUpdateTest12",
        "ValidGeneralizedTimeCRLnextUpdateTest13",
        "ValidNegativeSerialNumberTest14",
        "InvalidNegativeSerialNumberTest15",
        "ValidLongSerialNumberTest16",
        "ValidLongSerialNumberTest17",
        "InvalidLongSerialNumberTest18",
        "ValidSeparateCertificateandCRLKeysTest19",
        "InvalidSeparateCertificateandCRLKeysTest20",
        "InvalidSeparateCertificateandCRLKeysTest21",
    ],
    "4.14 distribution points": [
        "ValiddistributionPointTest1",
        "InvaliddistributionPointTest2",
        "InvaliddistributionPointTest3",
        "ValiddistributionPointTest4",
        "ValiddistributionPointTest5",
        "InvaliddistributionPointTest6",
        "ValiddistributionPointTest7",
        "InvaliddistributionPointTest8",
        "InvaliddistributionPointTest9",
        "ValidNoissuingDistributionPointTest10",
        "InvalidonlyContainsUserCertsTest11",
        "InvalidonlyContainsCACertsTest12",
        "ValidonlyContainsCACertsTest13",
        "InvalidonlyContainsAttributeCertsTest14",
        "InvalidonlySomeReasonsTest15",
        "InvalidonlySomeReasonsTest16",
        "InvalidonlySomeReasonsTest17",
        "ValidonlySomeReasonsTest18",
        "ValidonlySomeReasonsTest19",
        "InvalidonlySomeReasonsTest20",
        "InvalidonlySomeReasonsTest21",
        "ValidIDPwithindirectCRLTest22",
        "InvalidIDPwithindirectCRLTest23",
        "ValidIDPwithindirectCRLTest24",
        "ValidIDPwithindirectCRLTest25",
        "InvalidIDPwithindirectCRLTest26",
        "InvalidcRLIssuerTest27",
        "ValidcRLIssuerTest28",
        "ValidcRLIssuerTest29",
        "ValidcRLIssuerTest30",
        "InvalidcRLIssuerTest31",
        "InvalidcRLIssuerTest32",
        "ValidcRLIssuerTest33",
        "InvalidcRLIssuerTest34",
        "InvalidcRLIssuerTest35",
    ],
    "4.15 delta-CRLs": [
        "InvaliddeltaCRLIndicatorNoBaseTest1",
        "ValiddeltaCRLTest2",
        "InvaliddeltaCRLTest3",
        "InvaliddeltaCRLTest4",
        "ValiddeltaCRLTest5",
        "InvaliddeltaCRLTest6",
        "ValiddeltaCRLTest7",
        "ValiddeltaCRLTest8",
        "InvaliddeltaCRLTest9",
        "InvaliddeltaCRLTest10",
    ],
}
TESTS = [name for names in SECTIONS.values() for name in names]

# Tests whose verdict agrees but is reached before the revocation stage. cryptography's verifier refuses a
# certificate with a negative serial number (RFC 5280 4.1.2.2 wants a positive one), so the revoked
# negative serial of 4.4.15 never reaches the CRL lookup.
REFUSED_BEFORE_REVOCATION = {"InvalidNegativeSerialNumberTest15": "certificate"}
# Tests where the gateway's verdict differs from PKITS', with the reason. None today.
DISAGREEMENTS: dict[str, str] = {}


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    stage: str | None  # where a refused certificate stopped
    detail: str


@pytest.fixture(scope="module")
def pkits() -> tuple[TrustList, CrlSet]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography warns about PKITS' deliberately negative serials
        certs = {p.stem: _load(p) for p in sorted((PKITS / "certs").glob("*.crt"))}
    anchor = certs.pop("TrustAnchorRootCertificate")
    assert anchor is not None
    cas = tuple(c for name, c in certs.items() if c is not None and not name.endswith("EE"))
    trust = TrustList(anchors=(anchor,), intermediates=cas)
    crls = [(p.name, crl) for p in sorted((PKITS / "crls").glob("*.crl")) for crl in load_crls(p)]
    crl_set, _problems = CrlSet.build(crls, trust, at=AT)  # the refused CRLs are what several tests are about
    return trust, crl_set


def _load(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_der_x509_certificate(path.read_bytes())
    except ValueError:  # two DSA certificates whose parameters are inherited, outside these sections
        return None


def run(name: str, trust: TrustList, crls: CrlSet) -> Verdict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the negative serial numbers again
        leaf = x509.load_der_x509_certificate((PKITS / "certs" / f"{name}EE.crt").read_bytes())
        try:
            verified = verify_chain(leaf, trust, at=AT, purpose="any")
            evidence = crls.check(verified, at=AT, policy="require")
        except GatewayError as e:
            return Verdict(False, e.stage, e.reason)
    return Verdict(True, None, evidence.detail)


@pytest.mark.parametrize("name", TESTS)
def test_pkits_revocation(name: str, pkits: tuple[TrustList, CrlSet]) -> None:
    """Each PKITS revocation test gets the verdict its name says, from the stage that should decide it."""
    verdict = run(name, *pkits)
    expected = name.startswith("Valid")
    if name in DISAGREEMENTS:
        assert verdict.accepted is not expected, f"{name} now agrees: remove it from DISAGREEMENTS"
        return
    assert verdict.accepted is expected, verdict.detail
    if not expected:
        assert verdict.stage == REFUSED_BEFORE_REVOCATION.get(name, "revocation"), verdict.detail


def test_pkits_agreement_summary(pkits: tuple[TrustList, CrlSet], capsys: pytest.CaptureFixture[str]) -> None:
    """All 66 PKITS revocation tests are run and the agreements counted; only the listed disagreements remain."""
    agree = {
        section: sum(run(n, *pkits).accepted is n.startswith("Valid") for n in names)
        for section, names in SECTIONS.items()
    }
    with capsys.disabled():
        for section, names in SECTIONS.items():
            print(f"\nPKITS {section}: {agree[section]} of {len(names)} agree")
        print(f"PKITS revocation total: {sum(agree.values())} of {len(TESTS)} agree")
    assert len(TESTS) == 66
    assert sum(agree.values()) == len(TESTS) - len(DISAGREEMENTS)
