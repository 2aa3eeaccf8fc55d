"""The gateway as an ordinary Kerberos client of another service (the directory's LDAP), from its keytab.

Theory of operation. SASL GSSAPI (Cyrus SASL inside libldap, which bonsai drives) takes its credentials
from the default credential cache. `ldap_ticket` fills a cache of our own with a TGT for
`[kerberos] principal`, obtained with the keytab, and the service ticket for `ldap/<host>`, by running the
first step of a GSSAPI exchange with that service (MIT krb5 gets the TGT from the client keytab when the
cache has none, or an expired one). The directory client names that cache in KRB5CCNAME, so the bind
finds both tickets there. Any principal works, the SPN form included (bonsai's own keytab option builds a
one-component name, `HTTP/proxy.lab.test` would not be one). Blocking (it talks to the KDC): call it off
the event loop.
"""

from __future__ import annotations

import gssapi
import gssapi.raw

from proxy.config import Kerberos
from proxy.errors import KerberosMisconfigured


def ldap_ticket(settings: Kerberos, ccache: str, host: str) -> None:
    """A TGT for `settings.principal` and a ticket for ldap/`host` in `ccache`, or KerberosMisconfigured."""
    keytab = str(settings.keytab)
    try:
        name = gssapi.Name(settings.principal, gssapi.NameType.kerberos_principal)
        creds = gssapi.Credentials(name=name, usage="initiate", store={"client_keytab": keytab, "ccache": ccache})
        target = gssapi.Name(f"ldap@{host}", gssapi.NameType.hostbased_service)
        gssapi.SecurityContext(name=target, creds=creds, usage="initiate", mech=gssapi.MechType.kerberos).step()
    except gssapi.raw.GSSError as e:
        raise KerberosMisconfigured(
            f"no Kerberos ticket for the directory at ldap/{host}",
            hint=f"{e.gen_message()}; the gateway binds to the directory as {settings.principal} with "
            f"{settings.keytab}, and the directory's URL must name the host its ldap/ SPN has",
        ) from None
