"""Where HTTP/1.1 message parts end, found in the bytes before a parser reads them: a head at its first CRLF CRLF,
a chunked body after its last chunk's trailer section.

llhttp (and aiohttp's parser) report no offsets: a read that holds the end of one request and the start of the
next gives no way to tell how many of its bytes the next head had, and a header block budget
(`listener.max_header_bytes`) then counts too few or too many. The device-side servers cut each read at these
points and feed the parser one part at a time (`proxy.device.server`, `proxy.tls.limits.HeaderBlockBudget`).
These functions only locate ends, the way llhttp does (it refuses a bare CR or LF, so every line ends at
CRLF); the parser still judges every byte, and a server that finds the two readings apart refuses the bytes.
`BodyEnd` is what both servers ask while a body is read: a length counted down, or a `ChunkedEnd`.
"""

from __future__ import annotations

import re

_ZEROS = re.compile(rb"0*")


def head_end(tail: bytes, data: bytes) -> int:
    """How many bytes of `data` belong to the head being read: up to its first CRLF CRLF, counting `tail` (the last
    bytes, at most 3, of that head fed before); all of `data` when the head does not end in it."""
    if tail:
        joint = (tail + data[:3]).find(b"\r\n\r\n")
        if joint >= 0:
            return joint + 4 - len(tail)
    end = data.find(b"\r\n\r\n")
    return len(data) if end < 0 else end + 4


class ChunkedEnd:
    """Where a chunked body ends (RFC 9112 7.1), found in the bytes as they come, so that what follows it is read
    as the next head, under its own budget. llhttp parses and judges the framing; this only locates its end the
    way llhttp does (every line ends at LF: llhttp refuses a bare CR or LF, and a quoted extension value cannot
    hold either). When the two disagree, the connection's bytes stop being HTTP (`DeviceConnection`)."""

    __slots__ = ("_left", "_line", "_line_bytes", "_run", "_state", "framing")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0  # payload bytes of the current chunk still to come
        self._line = b""  # the first bytes of the current line (a chunk size, zeros aside, is at most 16 hex digits)
        self._line_bytes = 0  # bytes of the current line before its LF
        self._run = 0  # bytes that are not payload (sizes, extensions, line ends, trailers) since the last payload byte
        self.framing = 0  # the longest such run read so far: what a parser holds or skips without a byte of payload

    def end(self, data: bytes) -> int | None:
        """Reads `data`, the body's next bytes: the offset just past the body's end, or None if it goes on."""
        at, size = 0, len(data)
        while at < size:
            if self._state == self._DATA:
                step = min(self._left, size - at)
                at += step
                self._left -= step
                self._run = 0
                if not self._left:
                    self._state = self._DATA_END
                continue
            lf = data.find(b"\n", at)
            stop = size if lf < 0 else lf
            self._run += stop - at + (lf >= 0)
            self.framing = max(self.framing, self._run)
            zeros = _ZEROS.match(data, at, stop) if self._state == self._SIZE and not self._line else None
            start = zeros.end() if zeros else at
            if len(self._line) < 24:  # a size's leading zeros, as many as the device likes, are not kept
                self._line += data[start : min(stop, start + 24)]
            self._line_bytes += stop - at
            if lf < 0:
                return None
            at = lf + 1
            line, empty = self._line, self._line_bytes == 0 or (self._line_bytes == 1 and self._line == b"\r")
            self._line, self._line_bytes = b"", 0
            if self._state == self._DATA_END:
                self._state = self._SIZE
            elif self._state == self._TRAILER:
                if empty:
                    return at
            else:  # a chunk-size line: its leading hex digits (llhttp refuses the line if there are none)
                digits = len(line) - len(line.lstrip(b"0123456789abcdefABCDEF"))
                chunk = int(line[:digits], 16) if digits else 0
                self._left = chunk
                self._state = self._DATA if chunk else self._TRAILER
        return None


class BodyEnd:
    """Where the body of the request whose head was just read ends: after its Content-Length's `length` bytes, or,
    `chunked`, after its last chunk's trailer section (`ChunkedEnd`). Both device-side servers ask it for each read
    inside a body (`proxy.device.server.DeviceConnection`, `proxy.tls.limits.HeaderBlockBudget`)."""

    __slots__ = ("_chunks", "_left")

    def __init__(self, length: int = 0, *, chunked: bool = False) -> None:
        self._left = length  # Content-Length bytes still to come
        self._chunks = ChunkedEnd() if chunked else None

    @property
    def framing(self) -> int:
        """The longest run of bytes that are not payload read so far (`ChunkedEnd.framing`; 0 for a Content-Length).
        Both servers hold it to `listener.max_header_bytes`: llhttp holds a trailer field whole until it ends."""
        return 0 if self._chunks is None else self._chunks.framing

    def end(self, data: bytes) -> tuple[int, bool]:
        """How many bytes of `data`, the body's next bytes, belong to the body, and whether it ends with them."""
        if self._chunks is None:
            take = min(self._left, len(data))
            self._left -= take
            return take, self._left == 0
        end = self._chunks.end(data)
        return (len(data), False) if end is None else (end, True)
