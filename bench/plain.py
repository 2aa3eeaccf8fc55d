"""The bench's third column: a plain aiohttp reverse proxy, and nothing else.

What a general web framework costs on this path before any of the gateway's stages: aiohttp's server over
asyncio's TLS (a verified client certificate, as the others), one pooled `ClientSession` for all
requests, each request forwarded with the device's headers and a fixed `Authorization: Negotiate` header
of a real token's size (as nginx's), the answer read and sent back whole (small answers) or streamed. No
certificate stages beyond OpenSSL's, no Kerberos, no log line, no metrics. The gateway's per-request
CPU is compared to this one's in the same run: a hot path built for the job should cost less.

    python -m bench.plain --port 9443 --upstream http://127.0.0.1:9000 --cert C --key K --client-ca CA [--crl F]
"""

from __future__ import annotations

import argparse
import ssl

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"})


def make_app(upstream: str, authorization: str) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def start(_: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=3600),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def stop(_: web.Application) -> None:
        if session is not None:
            await session.close()

    async def forward(request: web.Request) -> web.StreamResponse:
        assert session is not None
        out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        out["Authorization"] = authorization
        data = request.content if request.body_exists else None
        async with session.request(
            request.method, upstream + request.raw_path, headers=out, data=data, allow_redirects=False
        ) as up:
            headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP | {"content-length"}}
            if up.content.is_eof():
                return web.Response(status=up.status, body=await up.read(), headers=headers)
            response = web.StreamResponse(status=up.status, headers=headers)
            await response.prepare(request)
            async for chunk in up.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-ca", required=True, help="PEM: the CAs a client certificate must chain to")
    parser.add_argument("--crl", help="PEM CRLs, checked on the handshake (as nginx's ssl_crl)")
    parser.add_argument("--authorization", default="Negotiate " + "A" * 1224)
    args = parser.parse_args()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=args.client_ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if args.crl:
        ctx.load_verify_locations(args.crl)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    web.run_app(
        make_app(args.upstream, args.authorization),
        host="127.0.0.1",
        port=args.port,
        ssl_context=ctx,
        access_log=None,
        print=None,
        backlog=4096,
        keepalive_timeout=75,
        handler_cancellation=True,
    )


if __name__ == "__main__":
    main()
