"""A client's address as the gateway's per-address limits count it: Basic's address throttle and the listener's
per-address connection cap (`proxy.tls.limits.AddressCap`); an address with its port as every output writes it
(`host_port`); and why a listening address could not be bound, with what to do (`cannot_bind`)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket


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


def cannot_bind(key: str, error: OSError) -> str:
    """Why the address `key` names could not be bound, and what to do: `REASON: FIX` (`bind_fix`). asyncio's
    `create_server` wraps the reason in a sentence of its own ("error while attempting to bind on address ..."); the
    errno's own words are used instead."""
    known = error.errno in errno.errorcode  # not a resolver's (socket.gaierror: negative codes of its own)
    reason = os.strerror(error.errno) if known and error.errno else (error.strerror or str(error))
    fix = bind_fix(key, error)
    return reason if fix is None else f"{reason}: {fix}"


def bind_fix(key: str, error: OSError) -> str | None:
    """What to do about a bind of the address `key` names that failed with `error`, for its usual causes; else None."""
    if isinstance(error, socket.gaierror):
        return f"the host name does not resolve on this machine: give {key} one of its IP addresses"
    if error.errno == errno.EADDRINUSE:
        return f"something listens there already (this gateway started before?): stop it, or give {key} another port"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"no interface of this machine has that address: give {key} one of its addresses (0.0.0.0 or [::]: all)"
    if error.errno == errno.EACCES:
        return (
            "a port below 1024 needs CAP_NET_BIND_SERVICE (deploy/systemd/kcd-proxy.service grants it; a container, "
            f"its capability or net.ipv4.ip_unprivileged_port_start): grant it, or give {key} a port above 1023"
        )
    return None
