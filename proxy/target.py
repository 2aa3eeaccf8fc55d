"""The request target: which path the backend will act on, decided once, before routing.

Theory of operation
-------------------
A gateway that routes on one reading of the path and forwards another lets a client choose its route:
`/owa/../ecp/x` matched by the `/owa/` route and then resolved to `/ecp/x` on the way out reaches the
backend's `/ecp/` with a ticket (or a password) that was meant for `/owa/`. So the path is read here the
way IIS (http.sys) reads it, once, and that one reading is both what the routes are matched against and
what is forwarded:

1. the request target must be in origin-form (`/path?query`, RFC 9112 3.2.1); the query is kept as sent;
2. percent-decoding, once (RFC 3986 2.1); the decoded bytes must be UTF-8, as http.sys reads them;
3. a backslash is a slash (IIS maps both to the file system's separator);
4. repeated slashes are one, and the dot-segments `.` and `..` are removed (RFC 3986 5.2.4).

What cannot be read one way only is refused (`BadRequest`, 400, before any stage runs), never guessed:
an encoded slash or backslash (`%2F`, `%5C`: a separator to one reader, a name character to another),
double encoding (a `%XX` left after decoding, which a second decoder would decode again: IIS's
`allowDoubleEscaping`), a malformed escape (IIS's `%uXXXX` among them), NUL and other control
characters, bytes that are not UTF-8 (overlong forms such as `%C0%AE` among them), a `..` that climbs above the
root, a fragment, and non-ASCII letters whose case mapping lands on ASCII (U+017F, long s, is `S` to a
case-insensitive reader: `/EWS/` spelt with it would be `/EWS/` to IIS and not to a prefix compare).

Below IIS the path becomes a Windows file name, and Windows reads names its own way (docs/hardening.md, "What
Windows reads otherwise", with the sources). What it would read as another path is refused too, since no device
sends it: a segment ending in a dot or a space (Windows trims them: `/ews./x` is `/ews/x` to it), `:` (a stream,
`::$DATA`), `;` (a parameter that servlet-style readers cut off the segment), the characters no Windows name may
hold (`* ? " < > |`, wildcards to the file system), a segment shaped like an 8.3 short name (`EXCHAN~1`, which
may be another directory's alias), and non-ASCII characters that a compatibility or best-fit mapping turns into
ASCII (the full-width dot, slash, backslash and letters U+FF0E, U+FF0F, U+FF3C, U+FF45..., U+2215 division
slash, U+00A0 no-break space).

The evidence, `OriginForm`, carries the decoded path (what routes are matched against: IIS paths are
case-insensitive, so a route's prefix is by default too, `proxy.config.Route.matches`) and the encoded
path to send: the client's own bytes when they decode to the same path, else the normalised path,
percent-encoded again.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import quote, unquote_to_bytes

from proxy.errors import BadRequest

_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_PERCENT = re.compile(rb"%")
# RFC 3986 pchar and '/' pass unencoded; everything else is percent-encoded again.
_SAFE = "/!$&'()*+,;=:@-._~"


@dataclass(frozen=True)
class OriginForm:
    """A request target read as the backend will read it."""

    path: str  # decoded and normalised: what routes match and what the backend acts on
    forward: str  # the same path, percent-encoded, as it goes to the backend
    query: str  # the raw query string, without '?' ('' when there is none)

    @property
    def forward_with_query(self) -> str:
        return f"{self.forward}?{self.query}" if self.query else self.forward


def origin_form(request_target: str) -> OriginForm:
    """Read `request_target` (the request line's target, as sent) into the one path the backend acts on."""
    raw, question, query = request_target.partition("?")
    if not raw.startswith("/"):
        raise BadRequest(
            "the request target must be a path starting with '/'",
            hint=f"request target of {len(request_target)} characters not in origin-form",
        )
    if "#" in raw or "#" in query:
        _refuse("a fragment ('#') is not part of a request target")
    plain = raw.isascii() and raw.isprintable() and "%" not in raw and "\\" not in raw
    if plain and "//" not in raw and "/." not in raw:  # most paths: nothing to decode, nothing to resolve
        if _WINDOWS.search(raw):
            _windows_reading(raw)
        return OriginForm(path=raw, forward=raw, query=query if question else "")
    path = _decode(raw)
    normal = remove_dot_segments(path.replace("\\", "/"))
    if _WINDOWS.search(normal):
        _windows_reading(normal)
    forward = raw if normal == path else quote(normal, safe=_SAFE)
    return OriginForm(path=normal, forward=forward, query=query if question else "")


def _decode(raw: str) -> str:
    """Percent-decode once, refusing what a second reader could read otherwise."""
    try:
        data = raw.encode("ascii")
    except UnicodeEncodeError:
        _refuse("the path has characters that were not percent-encoded")
    if len(_ESCAPE.findall(data)) != len(_PERCENT.findall(data)):
        _refuse("the path has a '%' that does not start a %XX escape")
    decoded = unquote_to_bytes(data)  # every % starts an escape (checked above): each decoded once
    escaped = {int(m.group(1), 16) for m in _ESCAPE.finditer(data)}
    for byte, why in ((ord("/"), "an encoded slash (%2F)"), (ord("\\"), "an encoded backslash (%5C)")):
        if byte in escaped:
            _refuse(f"the path has {why}")
    if _ESCAPE.search(decoded):
        _refuse("the path is encoded twice (a %XX escape is left after decoding)")
    if any(b < 0x20 or b == 0x7F for b in decoded):
        _refuse("the path has a control character (NUL, CR, LF...)")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("the path's percent-encoded bytes are not UTF-8")
    for ch in text:
        if ch.isascii():
            continue
        if _folds_to_ascii(ch):
            _refuse(f"the path has U+{ord(ch):04X}, which a case-insensitive reader takes for an ASCII letter")
        if ch in _SEPARATOR_LOOKALIKES or any(c.isascii() for c in unicodedata.normalize("NFKC", ch)):
            _refuse(f"the path has U+{ord(ch):04X}, which a compatibility or best-fit mapping reads as ASCII")
    return text


def _folds_to_ascii(ch: str) -> bool:
    """Whether a non-ASCII character maps to one ASCII letter by case: U+017F -> S, U+212A -> k, U+0131 -> I.
    (Expansions such as U+00DF -> SS are Python's full mapping, not the one-to-one kind servers compare by.)"""
    return any(len(m) == 1 and m.isascii() for m in (ch.upper(), ch.lower(), ch.casefold()))


# What Windows reads otherwise, in a decoded path (docs/hardening.md, "What Windows reads otherwise"): a segment's
# trailing dot or space, stream and parameter marks, the characters no Windows name may hold, and `~` + digit
# (looked at further: only a segment shaped like an 8.3 short name is refused).
_WINDOWS = re.compile(r'[:;*?"<>|]|[. ](?=/|$)|~[0-9]')
_SHORT_NAME = re.compile(r"(?=[^.]{1,8}(?:\.|$))[^~.]{1,6}~[0-9]+(?:\.[^.]{1,3})?")
# Slashes and backslashes with no compatibility decomposition, which best-fit tables map to '/' and '\\'.
_SEPARATOR_LOOKALIKES = frozenset("\u2044\u2215\u2216\u29f5\u29f8")
_WHY = {
    ":": "a Windows stream name ('::$DATA') follows it",
    ";": "servlet-style readers cut a parameter off the segment there ('/ews;x/' is '/ews/' to them)",
}


def _windows_reading(path: str) -> None:
    """Refuse a decoded, normalised path that Windows, below IIS, would read as another one (one of `_WINDOWS`)."""
    for found in _WINDOWS.finditer(path):
        mark = found.group()
        if mark in (".", " "):
            _refuse("a path segment ends in a dot or a space, which Windows trims ('/ews./x' is '/ews/x' to it)")
        if mark[0] == "~":
            start = path.rfind("/", 0, found.start()) + 1
            end = path.find("/", found.start())
            segment = path[start : end if end >= 0 else len(path)]
            if _SHORT_NAME.fullmatch(segment):
                _refuse("a segment has the shape of an 8.3 short name (NAME~1.EXT): Windows may read another name")
            continue
        _refuse(f"the path has {mark!r}: " + _WHY.get(mark, "no Windows name may hold it (a file-system wildcard)"))


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path, with repeated slashes read as one; climbing above '/' is refused."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if not out:
                _refuse("the path climbs above the root ('..')")
            out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = segments[-1] in ("", ".", "..") and bool(out)
    return "/" + "/".join(out) + ("/" if trailing else "")


# A host name (letters, digits, '.', '-', '_') or an IPv4 or bracketed IPv6 address, with an optional port: what a
# device has any reason to send. RFC 3986's reg-name also allows sub-delims and %XX escapes; no device needs them.
_HOST = re.compile(r"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?")


def checked_host(value: str | None) -> str | None:
    """The request's `Host` if it names a host (and optional port), else `BadRequest` (RFC 9112 3.2: a server
    answers 400 to an invalid Host). None when there is none (HTTP/1.0; the servers refuse HTTP/1.1 without one).

    The gateway sends this value on as `X-Forwarded-Host` (and as `Host` on `preserve_host` routes): a path, user
    info or an empty value there would be the device's words in the gateway's mouth."""
    if value is None:
        return None
    match = _HOST.fullmatch(value)
    if match is None or int(match.group(1) or 0) > 65535:
        raise BadRequest(
            "the Host header must be a host name or address, with an optional port",
            hint=f"a Host header of {len(value)} characters that is not host[:port]",
        )
    return value


def _refuse(why: str) -> NoReturn:
    raise BadRequest(f"ambiguous request target: {why}", hint=why)
