"""The TLS facts of the connection a request arrived on: its client certificate's bytes, version, cipher."""

from __future__ import annotations

import ssl
import sys

from proxy.device.request import DeviceRequest


def presented_der(request: DeviceRequest) -> tuple[ssl.SSLObject, bytes] | None:
    """The TLS connection and the DER bytes of the leaf certificate its client presented (OpenSSL verified it in
    the handshake), or None. Read on every request: what is remembered per connection is checked against it."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return (ssl_object, der) if der else None


def tls_facts(request: DeviceRequest) -> dict[str, object]:
    """The TLS version, cipher and whether the session was resumed, noted on the request's trace and summary line;
    {} without TLS."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return {}
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    # interned: a handful of names, which OpenSSL's wrapper makes anew on every call; the trace of a held
    # long-poll then keeps no copy of its own
    return {
        "tls_version": sys.intern(version) if version else None,
        "tls_cipher": sys.intern(cipher[0]) if cipher else None,
        "tls_resumed": ssl_object.session_reused,
    }
