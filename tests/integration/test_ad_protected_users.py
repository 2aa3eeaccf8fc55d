"""The Protected Users hint against the Samba DC: a user in Protected Users through a nested group is told the group
it came through, and the command the hint gives works; a direct member is told the group itself; a user in neither
is not sent to remove a membership it does not have.

Samba 4.17's KDC does not apply Protected Users to delegation (Windows refuses its members: their evidence tickets
are not forwardable), so no request is refused here for it; what is tested is what the directory tells the hint,
through doctor's own look-up (`proxy.ops.doctor._named`, as the gateway's `forwarding_named`): the user's
`tokenGroups` (Samba 4.17 computes them, nested groups included) and the groups found by
LDAP_MATCHING_RULE_IN_CHAIN (Samba answers it). The groups and users are this file's own: quinn and rowan, in
kcd-pu-team, which is in kcd-pu-staff, which is in Protected Users.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, _locked

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

USER = "quinn"  # taken out of its group by one test, and put back
READER = "rowan"  # in the same group, never taken out: the test that only reads runs beside the one that writes
TEAM = "kcd-pu-team"  # quinn's own group
STAFF = "kcd-pu-staff"  # in Protected Users; TEAM is in it

_PROBE = """
import asyncio, json, sys
from pathlib import Path
from proxy import config
from proxy.ops import doctor

cfg = config.load(Path(sys.argv[1]))
principal = sys.argv[2]
named = asyncio.run(doctor._named(cfg, principal))
check = doctor.not_forwardable_check(principal, "", cfg.kerberos.principal, named)
print(json.dumps({"fix": check.fix}))
"""


_GATEWAY_PROBE = """
import asyncio, json, sys, types
from pathlib import Path
from proxy import config
from proxy.directory import Directory
from proxy.errors import NotForwardable
from proxy.pipeline import forwarding_named

async def main():
    cfg = config.load(Path(sys.argv[1]))
    directory = Directory(cfg.directory, cfg.kerberos)
    gw = types.SimpleNamespace(config=cfg, directory=directory)
    refused = NotForwardable("not forwardable", hint="both causes", user=sys.argv[2], message="KDC's words")
    try:
        named = await forwarding_named(gw, refused)
    finally:
        directory.close()
    print(json.dumps({"hint": named.hint}))

asyncio.run(main())
"""


def _nested_member(realm: ad.AdRealm, user: str = USER) -> None:
    """`user` in kcd-pu-team in kcd-pu-staff in Protected Users, made once (and the user put back in kcd-pu-team)."""
    with _locked(realm.root):
        groups = realm.samba_tool("group", "list")
        if STAFF not in groups.split():
            realm.samba_tool("group", "add", STAFF)
            realm.samba_tool("group", "addmembers", "Protected Users", STAFF)
        if TEAM not in groups.split():
            realm.samba_tool("group", "add", TEAM)
            realm.samba_tool("group", "addmembers", STAFF, TEAM)
        if user not in realm.samba_tool("user", "list").split():
            realm.samba_tool("user", "create", user, f"{user.title()}-Ad-Pa55")
        if user not in realm.samba_tool("group", "listmembers", TEAM).split():
            realm.samba_tool("group", "addmembers", TEAM, user)


def _fix(realm: ad.AdRealm, tmp_path: Path, principal: str) -> str:
    """The fix doctor's s4u2self check gives for `principal`'s evidence ticket not forwardable, the gateway having
    protocol transition (svc-kcdproxy), the account's directory facts read from the DC."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(ad_mapping.gateway_config(realm, "upn"))
    done = realm.run([sys.executable, "-c", textwrap.dedent(_PROBE), str(cfg), principal], timeout=120)
    assert done.returncode == 0, done.stderr
    fix = json.loads(done.stdout.strip().splitlines()[-1])["fix"]
    assert isinstance(fix, str)
    return fix


def _samba_removal(fix: str) -> list[str]:
    """The `samba-tool group removemembers GROUP USER` the fix gives, as arguments."""
    found = re.search(r"samba-tool group removemembers ('[^']+'|\S+) ([\w-]+)", fix)
    assert found, fix
    return ["group", "removemembers", *shlex.split(found.group(1)), found.group(2)]


def test_a_nested_member_is_told_the_group_it_came_through_and_the_command_works(
    ad_mapping_realm: ad.AdRealm, tmp_path: Path
) -> None:
    """quinn is in Protected Users only through kcd-pu-team (in kcd-pu-staff, in Protected Users): the fix names
    kcd-pu-team, and its samba-tool command, run as given, takes quinn out of Protected Users (before, the fix said
    `Remove-ADGroupMember 'Protected Users' quinn`, which Windows refuses for a nested member, and `samba-tool group
    removemembers 'Protected Users' quinn`, which says "Removed members" and leaves quinn protected)."""
    realm = ad_mapping_realm
    _nested_member(realm)
    try:
        fix = _fix(realm, tmp_path, f"{USER}@{ad.REALM}")
        assert f"through CN={TEAM},CN=Users,DC=ad,DC=test" in fix, fix
        assert f"Remove-ADGroupMember '{TEAM}' {USER}" in fix, fix
        realm.samba_tool(*_samba_removal(fix))  # raises, naming samba-tool's error, if the command fails
        after = _fix(realm, tmp_path, f"{USER}@{ad.REALM}")
        assert "is not a member of Protected Users" in after, after
        assert "Remove-ADGroupMember" not in after, after
    finally:
        _nested_member(realm)


def test_a_direct_member_is_told_protected_users_itself(ad_mapping_realm: ad.AdRealm, tmp_path: Path) -> None:
    """pat, a member of Protected Users itself: the fix says so and gives that group's removal."""
    fix = _fix(ad_mapping_realm, tmp_path, f"pat@{ad.REALM}")
    assert "pat@AD.TEST is a member of Protected Users (CN=Protected Users,CN=Users,DC=ad,DC=test)" in fix, fix
    assert "Remove-ADGroupMember 'Protected Users' pat" in fix, fix
    assert _samba_removal(fix) == ["group", "removemembers", "Protected Users", "pat"]


def test_the_gateways_refusal_names_the_group_too(ad_mapping_realm: ad.AdRealm, tmp_path: Path) -> None:
    """The gateway's own refusal (`proxy.pipeline.forwarding_named`, which turns the KDC's "not forwardable" into the
    403's hint and the kerberos_refused fix) reads the same membership from the DC: quinn's hint names kcd-pu-team
    and its removal, with the KDC's words after it."""
    realm = ad_mapping_realm
    _nested_member(realm, READER)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(ad_mapping.gateway_config(realm, "upn"))
    done = realm.run(
        [sys.executable, "-c", textwrap.dedent(_GATEWAY_PROBE), str(cfg), f"{READER}@{ad.REALM}"], timeout=120
    )
    assert done.returncode == 0, done.stderr
    hint = json.loads(done.stdout.strip().splitlines()[-1])["hint"]
    assert f"through CN={TEAM},CN=Users,DC=ad,DC=test" in hint, hint
    assert f"samba-tool group removemembers '{TEAM}' {READER}" in hint, hint
    assert hint.endswith(" [KDC's words]"), hint


CYCLED = "sage"  # in kcd-pu-ring-a; kcd-pu-ring-a and kcd-pu-ring-b are each in the other; ring-b in Protected Users
RING = ("kcd-pu-ring-a", "kcd-pu-ring-b")


def _ring_member(realm: ad.AdRealm) -> None:
    """sage in a cycle of groups (kcd-pu-ring-a in kcd-pu-ring-b in kcd-pu-ring-a), kcd-pu-ring-b in Protected Users,
    made once."""
    with _locked(realm.root):
        groups = realm.samba_tool("group", "list").split()
        for group in RING:
            if group not in groups:
                realm.samba_tool("group", "add", group)
        for group, member in ((RING[1], RING[0]), (RING[0], RING[1]), ("Protected Users", RING[1])):
            if member not in realm.samba_tool("group", "listmembers", group).split():
                realm.samba_tool("group", "addmembers", group, member)
        if CYCLED not in realm.samba_tool("user", "list").split():
            realm.samba_tool("user", "create", CYCLED, f"{CYCLED.title()}-Ad-Pa55")
        if CYCLED not in realm.samba_tool("group", "listmembers", RING[0]).split():
            realm.samba_tool("group", "addmembers", RING[0], CYCLED)


def test_a_member_through_a_cycle_of_groups_is_told_its_own_group(ad_mapping_realm: ad.AdRealm, tmp_path: Path) -> None:
    """sage is in Protected Users through a cycle of groups (kcd-pu-ring-a and kcd-pu-ring-b each in the other,
    ring-b in Protected Users): doctor's look-up ends, and the fix names sage's own group, kcd-pu-ring-a, and its
    removal (ring-b, which sage is not listed in, is not offered)."""
    realm = ad_mapping_realm
    _ring_member(realm)
    fix = _fix(realm, tmp_path, f"{CYCLED}@{ad.REALM}")
    assert f"through CN={RING[0]},CN=Users,DC=ad,DC=test" in fix, fix
    assert f"Remove-ADGroupMember '{RING[0]}' {CYCLED}" in fix, fix
    assert f"'{RING[1]}' {CYCLED}" not in fix, fix
