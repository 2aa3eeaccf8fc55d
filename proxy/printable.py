"""Text safe to show: what a device, a CRL distribution point or an OCSP responder sent, on a terminal, in a log
viewer, a page or a device's refusal, with every invisible character written as an escape.

One function for every output, so that none escapes less than another (the CRL errors once escaped C0 and C1
controls only, and a right-to-left override a distribution point sent reversed what a log viewer showed after it).
"""

from __future__ import annotations

import unicodedata

# Unicode's categories of the characters that draw nothing of their own or change how the rest of a line reads:
# controls (Cc: C0, DEL, C1, 0x9b an 8-bit CSI), format characters (Cf: bidirectional controls such as U+202E, which
# draws the rest of a line reversed, zero-width ones, the soft hyphen, tag characters), lone surrogates (Cs: the
# bytes of a path that were not UTF-8, decoded with surrogateescape, which a C-locale stdout writes back raw), the
# line and paragraph separators (Zl, Zp), and unassigned code points (Cn: a later Unicode may make one a format
# character, as it did U+2066..U+2069).
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Cn"})


def printable(text: str) -> str:
    """`text` with each invisible character as an escape (`\\x1b`, `\\u202e`, `\\U000e0041`), so what a client or a
    server sent cannot move the cursor, rewrite what is shown, retitle a window, add a line or reverse what follows."""
    if text.isprintable():  # none of those categories is printable: the common case costs one scan in C
        return text
    return "".join(ascii(c)[1:-1] if unicodedata.category(c) in _ESCAPED else c for c in text)
