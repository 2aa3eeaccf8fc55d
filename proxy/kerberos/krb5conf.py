"""krb5.conf read line by line as MIT's profile library reads it: which section and subsections each line is in.

Theory of operation. Two parts of the gateway read krb5.conf's text: `proxy.kerberos.profile` copies it into the
gateway's one file less some realms' sections, and `proxy.kerberos.kdcs` reads one realm's `kdc` lines. Both need
to know, for every line, where MIT puts it; this module says so, and nothing else: it follows no `include`, keeps
no tree, and has no opinion on what a relation means. MIT's parser is `src/util/profile/prof_parse.c` (krb5 1.20,
Debian 12's); `tests/unit/test_krb5conf.py` holds this reader against it (`profile_get_values` and friends) on
inputs chosen to trip a reader that guesses.

The syntax, as MIT 1.20 reads it ("blank" is C's isspace: space, tab, newline, CR, vertical tab, form feed):

- Until the first line that starts with `[` in its first column, every line is ignored, except `module ...`
  (first column), which makes the profile come from a module instead.
- `include PATH` and `includedir DIR` in the first column, anywhere in the file, read another file or directory
  into the same tree. Reported here as directives; their content is not read (the callers fall back to letting
  MIT read the file itself).
- A line whose first non-blank character is `#` or `;` is a comment. A `#` later in a line is part of the value:
  `kdc = a # b` is the value `a # b`.
- `[name]` opens a top-level section, named by everything between `[` and the first `]` (blanks included); `*`
  may follow (the final mark), then only blanks. Not allowed inside a subsection.
- `}` ends the innermost subsection; `}*` marks it final; the rest of the line is ignored.
- Any other line is `tag = value`, the tag one word (a `*` in it marks the node final and ends the name), the
  value after the blanks that follow `=`:
  - nothing: a subsection, whose `{` must be the first non-blank character of the next line (the rest of that line
    is ignored; a blank or comment line there is an error);
  - `{` followed only by blanks: a subsection (`{ # note` is not: it is the value `{ # note`);
  - `"...`: a quoted value, ending at the next unescaped `"` (the rest of the line ignored), `\\n`, `\\t` and `\\b`
    escapes, any other escaped character itself;
  - anything else: the value, trailing blanks removed.
- A section or subsection named twice is one (MIT merges them, in order); a subsection left open at the end of the
  file ends there.

Refused here though MIT reads them: a line longer than MIT's 2047-byte buffer (MIT reads it as several lines) and
a NUL byte (MIT stops the line there). Neither belongs in a krb5.conf; refusing keeps the callers on MIT's own
reading of the file.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass

_BLANK = " \t\n\v\f\r"  # isspace() in the C locale, as prof_parse.c's skip_over_blanks uses it
_LINE_BUFFER = 2048  # prof_parse.c's BUF_SIZE: fgets reads at most 2047 bytes of a line at a time
_ESCAPES = {"n": "\n", "t": "\t", "b": "\b"}
_QUOTE = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\b": "\\b"})
_TAG = re.compile(r"([^ \t\n\v\f\r]+)[ \t\n\v\f\r]*")  # one word, then only blanks up to `=`


class Kind(enum.Enum):
    """What a line is to MIT's parser."""

    IGNORED = "ignored"  # before the first section, blank, or a comment
    DIRECTIVE = "directive"  # include, includedir, module
    SECTION = "section"  # [name]
    OPEN = "open"  # tag = {  (or `tag =`, its `{` on the next line: BRACE)
    BRACE = "brace"
    CLOSE = "close"  # }
    RELATION = "relation"  # tag = value


@dataclass(frozen=True)
class Line:
    """One line of krb5.conf and where MIT puts it. `path` is the section and subsections the line is in; for a
    SECTION, OPEN, BRACE or CLOSE line, it ends with the (sub)section that line opens or ends."""

    number: int
    raw: str  # as written, its newline included
    kind: Kind
    path: tuple[str, ...]
    name: str = ""  # a section's, subsection's or relation's name, without the final mark
    value: str = ""  # a relation's value, as MIT reads it (quotes and escapes resolved)
    final: bool = False  # the final mark `*`


class ProfileSyntaxError(ValueError):
    """krb5.conf is not something MIT reads (or not as one line at a time); says where, as MIT's error would."""

    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"krb5.conf line {number}: {reason}")
        self.number = number
        self.reason = reason


def read(text: str) -> tuple[Line, ...]:
    """Every line of `text` (krb5.conf), with where MIT puts it; ProfileSyntaxError where MIT would refuse the file."""
    lines: list[Line] = []
    path: tuple[str, ...] = ()
    started = awaiting_brace = False
    for number, raw in enumerate(re.findall(r"[^\n]*\n|[^\n]+\Z", text), 1):
        if "\0" in raw or len(raw.encode("utf-8", "surrogatepass")) >= _LINE_BUFFER:
            raise ProfileSyntaxError(number, "a NUL byte, or longer than MIT reads as one line (2047 bytes)")
        if _directive(raw, started):
            lines.append(Line(number, raw, Kind.DIRECTIVE, path, name=raw.split(maxsplit=1)[0]))
            continue
        if not started and not raw.startswith("["):
            lines.append(Line(number, raw, Kind.IGNORED, path))
            continue
        started = True
        if awaiting_brace:
            if not raw.lstrip(_BLANK).startswith("{"):
                raise ProfileSyntaxError(number, f"`{path[-1]} =` must be followed by a line opening with `{{`")
            awaiting_brace = False
            lines.append(Line(number, raw, Kind.BRACE, path, name=path[-1]))
            continue
        line, path, awaiting_brace = _standard(number, raw, path)
        lines.append(line)
    return tuple(lines)


def subsection_lines(lines: tuple[Line, ...], *path: str) -> Iterator[Line]:
    """The lines of the (sub)section at `path` (every time it is named), its opening and closing lines included."""
    return (line for line in lines if line.path[: len(path)] == path)


def relation(name: str, value: str) -> str:
    """The line `name = value` that MIT reads back as exactly `value` (quoted where it would not be)."""
    if value and value[0] not in '"{' and value.strip(_BLANK) == value and "\n" not in value:
        return f"{name} = {value}"
    return f'{name} = "{value.translate(_QUOTE)}"'


def _directive(raw: str, started: bool) -> bool:
    """`include` and `includedir` anywhere, `module` before the first section: in the first column, then a blank."""
    words = ("include", "includedir") if started else ("include", "includedir", "module")
    return any(raw.startswith(word) and raw[len(word) : len(word) + 1] in tuple(_BLANK) for word in words)


def _standard(number: int, raw: str, path: tuple[str, ...]) -> tuple[Line, tuple[str, ...], bool]:
    """A line after the first section: the line, the path after it, and whether a `{` line must follow."""
    text = raw.lstrip(_BLANK)
    if text[:1] in ("", "#", ";"):
        return Line(number, raw, Kind.IGNORED, path), path, False
    text = text.rstrip("\r\n")
    if text.startswith("["):
        if len(path) > 1:
            raise ProfileSyntaxError(number, "a [section] inside a subsection (a `}` is missing above)")
        end = text.find("]")
        if end < 0:
            raise ProfileSyntaxError(number, "a section header without `]`")
        name, rest = text[1:end], text[end + 1 :]
        final = rest.startswith("*")
        if rest.removeprefix("*").strip(_BLANK):
            raise ProfileSyntaxError(number, "text after a section header's `]`")
        return Line(number, raw, Kind.SECTION, (name,), name=name, final=final), (name,), False
    if text.startswith("}"):
        if len(path) < 2:
            raise ProfileSyntaxError(number, "a `}` closing no subsection")
        closed = Line(number, raw, Kind.CLOSE, path, name=path[-1], final=text[1:2] == "*")
        return closed, path[:-1], False
    tag, equals, value = text.partition("=")
    word = _TAG.fullmatch(tag)
    if not equals or word is None:
        raise ProfileSyntaxError(number, "not `tag = value` (one word before `=`)")
    name = word.group(1)
    final = "*" in name
    name = name.partition("*")[0]
    value = value.lstrip(_BLANK)
    if value.startswith('"'):
        return Line(number, raw, Kind.RELATION, path, name, _unquote(value[1:]), final), path, False
    if not value or (value.startswith("{") and not value[1:].strip(_BLANK)):
        inner = (*path, name)
        return Line(number, raw, Kind.OPEN, inner, name=name, final=final), inner, not value
    return Line(number, raw, Kind.RELATION, path, name, value.rstrip(_BLANK), final), path, False


def _unquote(text: str) -> str:
    """A quoted value's text after its opening quote, up to the closing one, escapes resolved (parse_quoted_string)."""
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == '"':
            break
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                out.append(char)
                break
            out.append(_ESCAPES.get(escaped, escaped))
            continue
        out.append(char)
    return "".join(out)
