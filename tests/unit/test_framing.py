"""Where a request body ends (`proxy.device.framing.BodyEnd`), and that both device-side servers read it from there:
the gateway's own (`proxy.device.server`) and aiohttp's behind the header budget (`proxy.tls.limits`)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser

from proxy.device.framing import BodyEnd, ChunkedEnd
from proxy.tls.limits import HeaderBlockBudget
from tests.unit.test_device_server import GET, run, statuses

CHUNKED_POST = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
CHUNKED_BODY = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"


def _cut(end: BodyEnd, pieces: list[bytes]) -> list[tuple[int, bool]]:
    return [end.end(piece) for piece in pieces]


def test_a_length_body_ends_after_its_length_in_any_pieces() -> None:
    """A Content-Length body takes exactly its length, across reads, and ends in the read that completes it; what
    follows it in that read is not the body's."""
    assert _cut(BodyEnd(10), [b"abcd", b"efghijGET"]) == [(4, False), (6, True)]
    assert _cut(BodyEnd(3), [b"abcGET"]) == [(3, True)]
    one = BodyEnd(5)
    assert [one.end(b"x") for _ in range(5)] == [(1, False)] * 4 + [(1, True)]


def test_a_chunked_body_ends_after_its_trailer_section_in_any_pieces() -> None:
    """A chunked body ends after its last chunk's trailer section, whether it comes at once or byte by byte (the
    offsets are `ChunkedEnd`'s), and the bytes after it are not the body's."""
    data = CHUNKED_BODY + GET
    assert BodyEnd(chunked=True).end(data) == (len(CHUNKED_BODY), True)
    end, results = BodyEnd(chunked=True), []
    for i in range(len(CHUNKED_BODY)):
        results.append(end.end(data[i : i + 1]))
    assert results == [(1, False)] * (len(CHUNKED_BODY) - 1) + [(1, True)]


class _Early(ChunkedEnd):
    """A reading of a chunked body's end that stops too soon: what a divergence from the parser looks like."""

    def end(self, data: bytes) -> int | None:
        return min(len(data), 3)


def test_the_gateways_server_reads_body_ends_from_body_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own server takes a body's end from `BodyEnd`: made to read it wrong, the server finds the
    parser disagreeing and refuses the bytes (400, nothing served)."""
    monkeypatch.setattr("proxy.device.framing.ChunkedEnd", _Early)
    served, transport, unparsed = asyncio.run(run([CHUNKED_POST + CHUNKED_BODY + GET]))
    assert statuses(bytes(transport.written)) == [400]
    assert served.requests == []
    assert unparsed == [400]


async def _aiohttp_reads(data: bytes) -> list[tuple[str, str]]:
    loop = asyncio.get_running_loop()
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16)

    class Handler:
        transport = None

    budget = HeaderBlockBudget(parser, Handler(), 4096, lambda: None)  # type: ignore[arg-type]
    messages, _, _ = budget.feed_data(data)
    return [(message.method, message.path) for message, _ in messages]


def test_aiohttps_server_reads_body_ends_from_body_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiohttp's server, behind the header budget, parses a chunked request and the one after it in one read; made
    to read the body's end wrong through `BodyEnd`, the budget refuses the bytes as aiohttp's own parse error
    (aiohttp answers 400), never guessing where the next head starts."""
    data = CHUNKED_POST + CHUNKED_BODY + GET
    assert asyncio.run(_aiohttp_reads(data)) == [("POST", "/c"), ("GET", "/a")]
    monkeypatch.setattr("proxy.device.framing.ChunkedEnd", _Early)
    with pytest.raises(BadHttpMessage, match="the body ends where the parser did not end it"):
        asyncio.run(_aiohttp_reads(data))


def test_the_longest_run_of_framing_is_counted_to_the_byte_whatever_the_pieces() -> None:
    """`BodyEnd.framing` is the longest run of bytes that are not payload (a size line, its extension, the CRLF
    after a chunk, the trailer section), the same whether the body comes whole or a byte at a time, and payload
    ends a run."""
    body = b"3;ext=12345\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    whole = BodyEnd(chunked=True)
    assert whole.end(body) == (len(body), True)
    bytewise = BodyEnd(chunked=True)
    ends = [bytewise.end(body[i : i + 1]) for i in range(len(body))]
    assert ends[-1] == (1, True)
    assert whole.framing == bytewise.framing == len(b"\r\n0\r\nX-T: 1\r\n\r\n")  # longer than the first size line
    assert BodyEnd(5).framing == 0
