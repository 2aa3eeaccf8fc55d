"""A client's address as the gateway's per-address limits count it: Basic's address throttle and the listener's
per-address connection cap (`proxy.tls.limits.AddressCap`); and an address with its port as every output writes it
(`host_port`)."""

from __future__ import annotations

import ipaddress


def host_port(host: str, port: object) -> str:
    """`host:port`, an IPv6 address in brackets (RFC 3986's form)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_key(client: str) -> str:
    """The key of a client address: an IPv6 address's /64 (an IPv4-mapped one is its IPv4 address), an IPv4
    address itself; anything else (no address) as given. One device or home is given a whole /64 and picks
    addresses in it at will, so counted per address a client stepping through its prefix would start afresh."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
