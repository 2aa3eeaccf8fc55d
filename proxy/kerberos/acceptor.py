"""The PAC of a ticket a GSSAPI acceptor has just accepted: one reading for the gateway and the lab's backend.

MIT hands an acceptor the PAC of the ticket as the `urn:mspac:` attribute of the initiator's name, after its
mspac plugin has checked the server signature (a PAC that fails it is dropped, and then there is none). The
name must come from `inquire_context`: the one `accept_sec_context` returns for a SPNEGO token is SPNEGO's,
and MIT answers "invalid name" for its attributes. The gateway reads its evidence tickets' PACs this way
(`proxy.kerberos.delegate`), the lab's Exchange stand-in the PAC of the tickets it serves (`proxy.lab.backend`).
"""

from __future__ import annotations

import gssapi.raw

from proxy.kerberos.pac import PacFacts, parse_pac


def initiator_pac(initiator: gssapi.raw.Name | None) -> PacFacts | None:
    """The PAC carried by an accepted context's initiator name; None when it carries none (an MIT KDC's
    ticket, or a PAC that failed its signature check); ValueError when its bytes are not a PAC."""
    if initiator is None:
        return None
    try:
        values = gssapi.raw.get_name_attribute(initiator, b"urn:mspac:").values
    except gssapi.raw.GSSError:
        return None
    return parse_pac(bytes(values[0])) if values else None


def context_pac(context: gssapi.raw.SecurityContext) -> PacFacts | None:
    """`initiator_pac` of an accepted security context's initiator, asked of the context itself."""
    found = gssapi.raw.inquire_context(
        context,
        initiator_name=True,
        target_name=False,
        lifetime=False,
        mech=False,
        flags=False,
        locally_init=False,
        complete=False,
    )
    return initiator_pac(found.initiator_name)
