"""The TLS listener's read buffer: one per event loop thread, not 256 KiB per connection."""

from __future__ import annotations

import asyncio
import ssl

from proxy.tls.server import _AlertingSSLProtocol


async def _two_connections() -> tuple[_AlertingSSLProtocol, _AlertingSSLProtocol]:
    loop = asyncio.get_running_loop()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return (
        _AlertingSSLProtocol(loop, asyncio.Protocol(), ctx, loop.create_future(), server_side=True),
        _AlertingSSLProtocol(loop, asyncio.Protocol(), ctx, loop.create_future(), server_side=True),
    )


def test_connections_share_one_read_buffer() -> None:
    """Two connections read into the same 32 KiB buffer, so a held connection costs no buffer of its own."""
    first, second = asyncio.run(_two_connections())
    assert first.get_buffer(-1).obj is second.get_buffer(-1).obj
    assert len(first.get_buffer(-1)) == 32 * 1024
