"""The bench's long-poll backend: holds each request `X-Lab-Hold-Seconds`, like an ActiveSync `Ping`.

Plain HTTP/1.1 on asyncio, a few hundred bytes of state per connection, so that 10,000 held requests
measure the proxy in front of it and not this. It insists on `Authorization: Negotiate` (401 without),
but cannot check the ticket: for nginx, which has no Kerberos, the bench adds a fixed header of a real
token's size. `GET /_held` (no authorization) answers how many requests are being held right now.

    python -m bench.holdback --port 9000
"""

from __future__ import annotations

import argparse
import asyncio

_held = 0


class HoldProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and self.timer is None:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.request(head.decode("latin-1").split("\r\n"))

    def request(self, lines: list[str]) -> None:
        global _held
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if lines[0].startswith("GET /_held "):
            self.answer("200 OK", str(_held).encode())
        elif not fields.get("authorization", "").startswith("Negotiate "):
            self.answer("401 Unauthorized", b"no Negotiate\n")
        else:
            _held += 1
            delay = float(fields.get("x-lab-hold-seconds", "0"))
            self.timer = asyncio.get_running_loop().call_later(delay, self.release)

    def release(self) -> None:
        global _held
        _held -= 1
        self.timer = None
        self.answer("200 OK", b"pong\n")

    def answer(self, status: str, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n\r\n"
            self.transport.write(head.encode() + body)

    def connection_lost(self, exc: Exception | None) -> None:
        global _held
        if self.timer is not None:
            self.timer.cancel()
            _held -= 1
        self.transport = None


async def serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(HoldProtocol, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
