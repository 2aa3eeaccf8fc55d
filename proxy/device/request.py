"""What the request path uses of a device's request: the one interface both device-side servers satisfy.

The pipeline (`proxy.pipeline`), the backend stage (`proxy.backend.forward`) and the revocation watch
(`proxy.certs.live`) read a request and answer it through `DeviceRequest` only, never through a web
framework's objects, so the server that parses the device's bytes can be chosen (`listener.http_server`):
`proxy.device.server` (an asyncio Protocol of our own, llhttp through httptools) or aiohttp's
(`proxy.device.aiohttp_side`, an adapter).

An answer is either whole (`answer`: head and body in one write, with a Content-Length) or streamed
(`start_answer`, then `write` per chunk, then `end_answer`). The interim `100 Continue` is sent only when
the backend stage asks for it (`send_continue`), after every stage has said yes.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from multidict import MultiMapping

CONTINUE = "100-continue"


def expectations(headers: MultiMapping[str]) -> list[str]:
    """The members of a request's `Expect` fields, lower case (RFC 9110 10.1.1: a case-insensitive list, whose
    empty members count for nothing)."""
    return [m for v in headers.getall("Expect", ()) for m in (m.strip().lower() for m in v.split(",")) if m]


class DeviceRequest(Protocol):
    """One request of a device, as a server parsed it, and the way back to that device."""

    @property
    def method(self) -> str: ...
    @property
    def raw_path(self) -> str:
        """The request target exactly as sent (path and query; absolute-form included)."""

    @property
    def rel_raw_path(self) -> str:
        """The path of the target as the server read it (aiohttp's normalised one), for the trace only."""

    @property
    def path(self) -> str:
        """The decoded path, for the log and the trace."""

    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def headers(self) -> MultiMapping[str]: ...
    @property
    def host(self) -> str: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def transport(self) -> asyncio.Transport | None:
        """The device's (TLS) transport: its `ssl_object` carries the client certificate."""

    @property
    def status(self) -> int | None:
        """The status of the answer given, once its head is written."""

    @property
    def answer_started(self) -> bool:
        """Whether any byte of the answer has gone to the device (then no other answer can be given)."""

    async def read_body(self) -> bytes:
        """The next bytes of the request body as they come (b"" once it has ended)."""

    async def send_continue(self) -> None:
        """`100 Continue`, when the device asked for it (HTTP/1.1, `Expect: 100-continue`); else nothing."""

    def head_forwarded(self) -> None:
        """The backend has the request's head and it is never sent again: its header fields may be let go (then
        `headers` is empty). A long-poll is held up to half an hour, and its fields (a Basic `Authorization`
        among them) need not be."""

    async def answer(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> None:
        """A whole answer: head and body in one write, framed by a Content-Length."""

    def answer_written(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> bool | None:
        """`answer` up to its wait: the answer written, and whether the device has yet to take it (then `drain`
        waits for that, as `answer` would have); None, with nothing written, where this server cannot write
        without waiting (then `answer`). The caller's bound on the wait then needs no timer when nothing waits."""

    async def drain(self) -> None:
        """Wait while the device is not taking our bytes (after `answer_written` said it has yet to)."""

    async def start_answer(
        self, status: int, reason: str | None, headers: MultiMapping[str], content_length: int | None
    ) -> None:
        """The head of a streamed answer (chunked when the length is unknown)."""

    async def write(self, chunk: bytes) -> None:
        """A piece of a streamed answer's body; waits while the device is not taking them."""

    async def end_answer(self) -> None:
        """The streamed answer is complete."""

    def abort(self) -> None:
        """Cut the device's connection at once (an answer broke after its head went out)."""
