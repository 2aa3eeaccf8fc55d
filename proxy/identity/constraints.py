"""A CA's name constraints, applied to the UPN the gateway is about to act on.

Theory of operation. A CA certificate may carry nameConstraints (RFC 5280 4.2.1.10): subtrees of names its
certificates may (permitted) or may not (excluded) carry. The chain's verifier (`cryptography`) applies them
to the name forms RFC 5280 defines; a UPN is an otherName, and RFC 5280 leaves otherNames to the constraint
of the same otherName form. So a partner CA constrained to `email:.partner.test`, or barred from
`email:lab.test`, still validates a certificate whose UPN is `alice@lab.test`: the constraint speaks only of
e-mail addresses, and the UPN is the one name this gateway acts on. (A constraint of the UPN's own form is
refused by the verifier as unsupported: such a chain never validates.)

The gateway reads the administrator's intent instead: a UPN is a `user@domain` name, so every CA in the
chain that constrains e-mail addresses (rfc822Name) constrains the UPN as if it were one (and a common name,
which the identity stage makes a user of the default realm, as the address `cn@<that realm in lower case>`:
otherwise a CA barred from naming lab.test users would name any of them by CN), and every CA that
constrains DNS names constrains the UPN's domain part as a DNS name. For each of those two forms that a CA
constrains: when it permits subtrees of that form, the UPN must fall in one of them; it must fall in none
of the excluded ones. rfc822Name subtrees: `user@host` is that mailbox, `host` that host's addresses,
`.domain` any address in a subdomain of it (RFC 5280's three forms). dNSName subtrees: the name and every
name below it. Domains compare without regard to ASCII case; a mailbox's local part exactly.

Pure: the UPN and the chain's CA certificates in, nothing or IdentityRejected out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography import x509

from proxy.errors import IdentityRejected
from proxy.identity.principal import ascii_lower


def require_within(upn: str, cas: Sequence[x509.Certificate], *, shown: str = "") -> None:
    """IdentityRejected unless `upn` lies within the e-mail and DNS name constraints of every CA in `cas`
    (`shown`: how the refusal names it, default "UPN <upn>")."""
    local, _, domain = upn.rpartition("@")
    for ca in cas:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        for kind, matches in ((x509.RFC822Name, _mailbox(local, domain)), (x509.DNSName, _dns(domain))):
            permitted = [t.value for t in constraints.permitted_subtrees or () if isinstance(t, kind)]
            excluded = [t.value for t in constraints.excluded_subtrees or () if isinstance(t, kind)]
            inside = not permitted or any(matches(tree) for tree in permitted)
            barred = next((tree for tree in excluded if matches(tree)), None)
            if inside and barred is None:
                continue
            form = "e-mail" if kind is x509.RFC822Name else "DNS"
            why = (
                f"excluded {form} subtree {barred!r}"
                if barred is not None
                else f"permitted {form} subtrees {permitted}"
            )
            raise IdentityRejected(
                f"the {shown or 'UPN ' + upn} is outside the name constraints of CA '{ca.subject.rfc4514_string()}'",
                hint=f"the CA's nameConstraints ({why}) do not let it name this user; the gateway applies a CA's "
                "e-mail and DNS constraints to the UPN, which RFC 5280 leaves unconstrained",
            )


def _mailbox(local: str, domain: str) -> Callable[[str], bool]:
    def matches(tree: str) -> bool:
        if "@" in tree:
            tree_local, _, tree_domain = tree.rpartition("@")
            return tree_local == local and ascii_lower(tree_domain) == ascii_lower(domain)
        if tree.startswith("."):
            return ascii_lower(domain).endswith(ascii_lower(tree))
        return ascii_lower(domain) == ascii_lower(tree)

    return matches


def _dns(domain: str) -> Callable[[str], bool]:
    def matches(tree: str) -> bool:
        tree = ascii_lower(tree.lstrip("."))
        name = ascii_lower(domain)
        return not tree or name == tree or name.endswith("." + tree)

    return matches
