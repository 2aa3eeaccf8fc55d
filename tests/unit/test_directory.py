"""The directory client's pure parts: the LDAP filter a name becomes (RFC 4515 escaping), the realm of base_dn."""

from __future__ import annotations

from proxy.directory import _domain, _escape, _filter


def test_filter_by_upn_and_by_the_domains_own_names() -> None:
    """A UPN in the domain's DNS name is looked up by UPN or sAMAccountName; another suffix by UPN only."""
    assert _filter("alice@ad.test", "DC=ad,DC=test") == (
        "(&(objectCategory=person)(objectClass=user)(|(userPrincipalName=alice@ad.test)(sAMAccountName=alice)))"
    )
    assert _filter("carol@corp.example", "DC=ad,DC=test") == (
        "(&(objectCategory=person)(objectClass=user)(|(userPrincipalName=carol@corp.example)))"
    )
    assert _filter("frank", "DC=ad,DC=test").endswith("(|(sAMAccountName=frank)))")


def test_a_crafted_name_cannot_widen_the_filter() -> None:
    """`*`, parentheses, backslash and NUL in a name are escaped as \\xx: `a*)(objectClass=*` matches nothing else."""
    crafted = _filter("a*)(objectClass=*@ad.test", "DC=ad,DC=test")
    assert crafted.count("(") == crafted.count(")") == 6  # the filter's own six pairs, no more
    assert "*" not in crafted
    assert _escape("x\\y\x00z(") == "x\\5cy\\00z\\28"


def test_realm_of_base_dn() -> None:
    """The DC= parts of base_dn, in order, are the domain; other parts are skipped."""
    assert _domain("OU=Staff,DC=corp,DC=example,DC=com") == "corp.example.com"
