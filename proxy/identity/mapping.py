"""The mapping stage: does this certificate belong to the account its UPN names?

Theory of operation. The identity stage read a UPN from a certificate a trusted CA signed; a UPN only
*names* an account. An enrolment template that lets the requester choose the subjectAltName (ESC1), or a
computer object whose dNSHostName was changed (Certifried, CVE-2022-26923), gets a CA to sign any name,
the domain administrator's included. Domain controllers stopped trusting names alone (KB5014754, full
enforcement since 2025); with `[identity] mapping = "strong"` this gateway decides as they do. It finds the
account in the directory (`proxy.directory`) and admits the certificate when one of these holds, in order:

1. `sid-extension`: the certificate's SID extension (`proxy.identity.sid`) equals the account's `objectSid`;
2. `alt-security-identity`: one of the account's strong `altSecurityIdentities` entries names the
   certificate (`proxy.identity.altsecid`).

The principal the gateway then impersonates is the account found, `sAMAccountName@REALM` (the realm of
the directory's domain), not the name read from the certificate: a UPN and a principal built from it by
`realm_map` can name two different accounts (mallory's UPN `alice@corp.example` mapped to `alice@AD.TEST`
is alice's account), and the KDC must be asked for the account the certificate was proven to belong to.

A SID extension naming another account is refused even if an `altSecurityIdentities` entry matches: the CA
said the certificate is someone else's, which is exactly the attack. Otherwise the refusal says why: no SID
extension (and no strong entry), or a SID of another account; and what fixes it.

`mapping = "strong-or-audit"` decides the same way but serves a weakly mapped certificate, with a warning
(`weak_certificate_mapping`), so an operator can find those certificates before enforcing. A SID of another
account is refused in both modes: it is never a migration problem. Like AD's compatibility mode
(KB5014754), it does not serve a weakly mapped certificate issued before its account was created
(`predates_account`: notBefore earlier than `whenCreated` by more than `[identity]
certificate_backdating_compensation`, AD's `CertificateBackdatingCompensation`, default 0): such a
certificate was made for an earlier holder of the name (a deleted account's UPN given to a new one), and
only a weak mapping ties it to the new account. Strong mappings are not compared: they name the account.

Before any of that, the account itself (`account_state`): disabled (`userAccountControl` bit
ACCOUNTDISABLE), locked out (`lockoutTime` set, or `msDS-User-Account-Control-Computed` bit LOCKOUT when the
directory computes it) or expired (`accountExpires` in the past) is refused here, before the KDC is asked
for anything, in every mode that reads the directory. Pure: the account and the time are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509

from proxy.config import MappingMode
from proxy.errors import AccountRefused, MappingRefused
from proxy.identity import altsecid
from proxy.identity.altsecid import AltSecurityIdentity
from proxy.identity.sid import SID_URL_PREFIX, CertificateSid, MalformedSid, Sid, SidConflict, read_certificate_sid

Rule = Literal["sid-extension", "sid-url", "alt-security-identity", "weak-audit"]
_SID_WHERE = {"extension": "SID extension", "url": "subjectAltName SID URL", "both": "SID extension (and URL)"}

# userAccountControl and msDS-User-Account-Control-Computed bits ([MS-ADTS] 2.2.16)
UF_ACCOUNTDISABLE = 0x0002
UF_LOCKOUT = 0x0010
# accountExpires: 0 and 0x7FFFFFFFFFFFFFFF both mean "never"; otherwise 100 ns intervals since 1601-01-01 UTC
_NEVER = (0, 0x7FFFFFFFFFFFFFFF)
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Account:
    """What the directory says about one account: the facts the mapping stage needs, nothing else."""

    dn: str
    sam_account_name: str
    upn: str | None
    sid: Sid
    alt_security_identities: tuple[str, ...] = ()
    user_account_control: int = 0
    lockout_time: int = 0  # FILETIME; 0 when not locked out
    account_expires: int = 0  # FILETIME; 0 or 0x7FFFFFFFFFFFFFFF: never
    computed_control: int | None = None  # msDS-User-Account-Control-Computed, when the directory returns it
    when_created: datetime | None = None  # whenCreated; None when the directory did not return it


def filetime(value: int) -> datetime:
    """A Windows FILETIME (100 ns since 1601) as a UTC datetime; OverflowError past datetime's years 1 to 9999."""
    return _FILETIME_EPOCH + timedelta(microseconds=value // 10)


def as_filetime(when: datetime) -> int:
    """A UTC datetime as a Windows FILETIME: what a directory's times are compared with, as integers, since they
    may lie past the year 9999 that a datetime can hold (`accountExpires` is any 64-bit integer)."""
    return (when - _FILETIME_EPOCH) // timedelta(microseconds=1) * 10


def _filetime_text(value: int) -> str:
    """A FILETIME for a reason or a fix: its UTC time, or the integer when a datetime cannot hold it."""
    try:
        return filetime(value).isoformat()
    except OverflowError:
        return f"FILETIME {value} (outside the years 1 to 9999)"


def reread_note(cache_seconds: float) -> str:
    """What a refusal fixed on the DC adds to its fix: when the gateway will see the change (its directory cache
    keeps the answer; nothing when it keeps none). An administrator who made the change and got the same 403 had
    no word of why."""
    if cache_seconds <= 0:
        return ""
    return (
        f"; the gateway sees a change on the DC within [directory] cache_seconds ({cache_seconds:g} s), "
        "for it keeps the directory's answer that long (a restart forgets it)"
    )


def account_state(account: Account, now: datetime, reread: str = "") -> None:
    """Refuse (AccountRefused) a disabled, locked-out or expired account; return quietly otherwise. `reread`
    (`reread_note`) ends each fix."""
    who = account.upn or account.sam_account_name
    if account.user_account_control & UF_ACCOUNTDISABLE:
        raise AccountRefused(
            "the account is disabled",
            hint=f"{who} ({account.dn}) has ACCOUNTDISABLE in userAccountControl; "
            f"enable it (samba-tool user enable / Enable-ADAccount) if this user should get in{reread}",
        )
    computed = account.computed_control
    locked = computed & UF_LOCKOUT if computed is not None else account.lockout_time not in _NEVER
    if locked:
        raise AccountRefused(
            "the account is locked out",
            hint=f"{who} ({account.dn}) is locked out (lockoutTime set); "
            f"unlock it (samba-tool user unlock / Unlock-ADAccount) or wait for the lockout duration{reread}",
        )
    if account.account_expires not in _NEVER and account.account_expires <= as_filetime(now):
        raise AccountRefused(
            "the account has expired",
            hint=f"{who} ({account.dn}) expired at {_filetime_text(account.account_expires)} "
            f"(accountExpires); extend it (samba-tool user setexpiry / Set-ADAccountExpiration){reread}",
        )


@dataclass(frozen=True)
class Mapping:
    """Evidence of the mapping stage: which account, and which rule tied the certificate to it."""

    mode: MappingMode
    account_dn: str
    account_sid: str
    rule: Rule
    detail: str  # the matching SID or altSecurityIdentities entry; for weak-audit, why it is weak
    weak: bool = False  # strong-or-audit served a certificate that strong would refuse
    principal: str = ""  # the account's own principal, sAMAccountName@REALM: whom the KDC is asked for
    account_name: str = ""  # its sAMAccountName: the KDC's evidence ticket must name it (proxy.kerberos.account)

    def as_facts(self) -> dict[str, str | bool]:
        """The trace's and log's view of the decision."""
        principal = {"principal": self.principal} if self.principal else {}
        return {
            **principal,
            "mapping": self.rule,
            "mapping_mode": self.mode,
            "account_dn": self.account_dn,
            "account_sid": self.account_sid,
            "mapping_detail": self.detail,
            "mapping_weak": self.weak,
        }


def predates_account(not_before: datetime, when_created: datetime, compensation: timedelta) -> timedelta | None:
    """How much earlier than the account's creation the certificate's validity starts, beyond `compensation`
    (AD's CertificateBackdatingCompensation); None when it does not (equal times are not earlier)."""
    early = when_created - not_before
    return early if early > compensation else None


def decide(
    cert: x509.Certificate,
    account: Account,
    mode: MappingMode,
    realm: str = "",
    backdating: timedelta = timedelta(0),
    reread: str = "",
) -> Mapping:
    """Admit `cert` for `account` (of the domain whose realm is `realm`) under `mode` ("strong" or
    "strong-or-audit"), or raise MappingRefused. `backdating` is how much earlier than the account a weakly
    mapped certificate may be in "strong-or-audit" ([identity] certificate_backdating_compensation). `reread`
    (`reread_note`) ends the fix of a refusal a change on the DC mends (a mapping to add), not of another's SID."""
    sam = account.sam_account_name
    principal = f"{sam}@{realm}" if realm else ""
    found = stated_sid(cert, account)
    cert_sid = found.sid if found is not None else None
    where = f"{account.upn or account.sam_account_name} ({account.dn}, {account.sid})"
    if found is not None and cert_sid == _domain_of(account.sid):
        raise MappingRefused(  # the CA wrote the domain's SID: an administrator's slip, refused as no account's
            "the certificate belongs to another account (SID of another account)",
            hint=f"its {_SID_WHERE[found.source]} names {found.sid}, which is the SID of the account's domain, not of "
            f"an account (no RID): the CA or its template writes the wrong SID; {_must_carry(account)}, reissue it",
        )
    if found is not None and cert_sid != account.sid:
        raise _another_account(found, f"its UPN names {where}")
    if found is not None:
        rule: Rule = "sid-url" if found.source == "url" else "sid-extension"
        detail = str(found.sid) + (" (SID extension and subjectAltName URL)" if found.source == "both" else "")
        return Mapping(mode, account.dn, str(account.sid), rule, detail, False, principal, sam)
    entries = [altsecid.parse(raw) for raw in account.alt_security_identities]
    for entry in entries:
        if entry.strong and altsecid.matches(entry, cert):
            rule = "alt-security-identity"
            return Mapping(mode, account.dn, str(account.sid), rule, entry.raw, False, principal, sam)
    why = _weak_reason(entries, cert)
    fix = (
        f"issue certificates with the SID extension (AD CS does since KB5014754), or add a strong mapping "
        f"to {account.dn}: altSecurityIdentities: {altsecid.issuer_serial_entry(cert)}"
    )
    slip = next(filter(None, (altsecid.serial_slip(entry, cert) for entry in entries)), None)
    if slip is not None:  # an entry the administrator meant for this certificate: name it and its replacement
        why, fix = f"{why} ({slip[0]})", _slipped(entries, cert, account.dn)
    if mode == "strong-or-audit":
        _not_older_than_account(cert, account, backdating, fix + reread)
        detail = f"{why}; {fix}"
        return Mapping(mode, account.dn, str(account.sid), "weak-audit", detail, True, principal, sam)
    raise MappingRefused(
        f"the certificate is not strongly mapped to the account ({why})", hint=f"{where}: {fix}{reread}"
    )


def _slipped(entries: list[AltSecurityIdentity], cert: x509.Certificate, dn: str) -> str:
    """The fix for the entries of `dn` that nearly name `cert` (`altsecid.serial_slip`): each, its slip, and the
    entry that maps the certificate."""
    said = [f"{e.raw} on {dn}: {slip[1]}" for e in entries if (slip := altsecid.serial_slip(e, cert)) is not None]
    return f"{'; '.join(said)}: replace it with altSecurityIdentities: {altsecid.issuer_serial_entry(cert)}"


def _domain_of(sid: Sid) -> Sid | None:
    """The SID of the domain an account's SID is in (without its RID); None for a SID of one part."""
    return Sid(sid.authority, sid.sub_authorities[:-1]) if len(sid.sub_authorities) > 1 else None


def _must_carry(account: Account) -> str:
    """The SID a certificate of `account` must carry, for a fix."""
    who = account.upn or account.sam_account_name
    return f"{who} is {account.dn}: its objectSid is {account.sid}: that string is what the certificate must carry"


def stated_sid(cert: x509.Certificate, account: Account | None = None) -> CertificateSid | None:
    """The SID the certificate states (its SID extension, its subjectAltName SID URL, or both agreeing), or None;
    MappingRefused when it is malformed or the two disagree (in every mode, whatever the directory says). `account`,
    the one its name found: a malformed SID's fix then says which SID to write."""
    carry = f"; {_must_carry(account)}" if account is not None else ""
    try:
        return read_certificate_sid(cert)
    except SidConflict as e:
        raise MappingRefused(
            "the certificate names two different SIDs",
            hint=f"{e}: a certificate that names two accounts belongs to neither; revoke it and check the CA "
            "and template that wrote it",
        ) from None
    except MalformedSid as e:
        if e.form == "url":
            raise MappingRefused(
                "the certificate's subjectAltName SID URL cannot be read",
                hint=f"{e}; ask the CA to reissue the certificate with one subjectAltName URL "
                f"{SID_URL_PREFIX}<SID> holding exactly the account's SID{carry}",
            ) from None
        raise MappingRefused(
            "the certificate's SID extension cannot be read",
            hint=f"{e}; ask the CA to reissue the certificate (AD CS writes the SID extension for the enrollee){carry}",
        ) from None


def sid_of_another(found: CertificateSid, owner: Account, name: str, base_dn: str) -> MappingRefused:
    """The refusal for a certificate whose name no account under `base_dn` has and whose SID is `owner`'s, another
    object of the domain (`Directory.sid_owner`): the certificate is `owner`'s, whatever name it carries."""
    who = f"{owner.upn or owner.sam_account_name or 'an object'} ({owner.dn})"
    return _another_account(found, f"that is {who}, while its UPN {name!r} names no user account under {base_dn}")


def _another_account(found: CertificateSid, whose: str) -> MappingRefused:
    return MappingRefused(
        "the certificate belongs to another account (SID of another account)",
        hint=f"its {_SID_WHERE[found.source]} names {found.sid}, but {whose}: a certificate issued "
        "for one account carrying another's name (ESC1, CVE-2022-26923); revoke it and check the template "
        "that issued it (does it let the requester supply the subject?)",
    )


def _not_older_than_account(cert: x509.Certificate, account: Account, backdating: timedelta, fix: str) -> None:
    """strong-or-audit: refuse a weakly mapped certificate issued before its account (KB5014754's compatibility
    mode), or one whose account's creation time the directory did not give (nothing to compare it with)."""
    who = f"{account.upn or account.sam_account_name} ({account.dn})"
    not_before = cert.not_valid_before_utc
    if account.when_created is None:
        raise MappingRefused(
            "the certificate is weakly mapped and its account's creation time is unknown",
            hint=f"the directory returned no whenCreated for {who}, so a weakly mapped certificate cannot be "
            f"checked against it; let the bind account read whenCreated, or {fix}",
        )
    early = predates_account(not_before, account.when_created, backdating)
    if early is not None:
        raise MappingRefused(
            "the certificate was issued before its account was created and is only weakly mapped",
            hint=f"its notBefore {not_before.isoformat()} is {_span(early)} before {who} was created "
            f"(whenCreated {account.when_created.isoformat()}), more than "
            f"[identity] certificate_backdating_compensation ({_span(backdating)}): it may have been issued to an "
            f"earlier account of that name. Reissue it for this account, or map it strongly: {fix}; if your CA "
            "backdates notBefore, raise certificate_backdating_compensation to cover it",
        )


def _span(delta: timedelta) -> str:
    """A duration in whole seconds, as an administrator reads it: `3720 s (1:02:00)`."""
    seconds = int(delta.total_seconds())
    return f"{seconds} s ({timedelta(seconds=seconds)})"


def describe(rule: str | None, account_dn: str | None, account_sid: str | None) -> str:
    """The mapping decision in plain words, one sentence: what `explain` and the trace page both say."""
    account = f"account {account_dn} ({account_sid})" if account_dn else "no account found"
    if rule == "sid-extension":
        return f"the certificate's SID extension is the objectSid of {account}"
    if rule == "sid-url":
        return f"the certificate's subjectAltName SID URL is the objectSid of {account}"
    if rule == "alt-security-identity":
        return f"{account} lists the certificate in altSecurityIdentities"
    if rule == "weak-audit":
        return f"WEAK: served only because mapping = 'strong-or-audit'; 'strong' refuses it ({account})"
    return account  # the stage refused before a rule applied


def unknown_account(name: str, base_dn: str, reread: str = "") -> MappingRefused:
    """The refusal of `name`, which no account under `base_dn` has; `reread` (`reread_note`) ends its fix."""
    return MappingRefused("no account in the directory has this name", hint=_nobody(name, base_dn) + reread)


def _nobody(name: str, base_dn: str) -> str:
    return f"no user with userPrincipalName or sAMAccountName {name!r} under {base_dn}"


def no_account(name: str, base_dn: str, mode: MappingMode, sid: Sid | None = None, reread: str = "") -> Mapping:
    """No account has the certificate's name: `strong` refuses (`unknown_account`); `strong-or-audit` serves it as
    weakly mapped (the KDC still decides whether the name is a user: an account outside base_dn, a trusted domain's).
    `sid`: the SID the certificate states, which no other object of the domain has (the caller made sure:
    `sid_of_another`). `reread` (`reread_note`) ends the refusal's fix."""
    if mode != "strong-or-audit":
        raise unknown_account(name, base_dn, reread)
    where = _nobody(name, base_dn)
    stated = f" (its SID {sid} is no other object's in the domain)" if sid is not None else ""
    detail = f"{where}{stated}; the certificate cannot be mapped strongly: extend [directory] base_dn or reissue it"
    return Mapping(mode, "", "", "weak-audit", detail, True, "")


def _weak_reason(entries: list[AltSecurityIdentity], cert: x509.Certificate) -> str:
    weak = [e for e in entries if not e.strong and altsecid.weakly_matches(e, cert)]
    if weak:
        return f"no SID extension; only a weak altSecurityIdentities entry matches ({weak[0].kind})"
    if any(e.strong for e in entries):
        return "no SID extension; no strong mapping: no altSecurityIdentities entry names this certificate"
    return "no SID extension; no strong mapping"
