"""`proxy.printable.printable`: the one escaping function every output uses."""

from __future__ import annotations

import pytest

from proxy.certs.revocation import shown_error
from proxy.certs.sources import shown_location
from proxy.printable import printable


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        ("\x1b[31m\x07\x7f\x9b", "\\x1b[31m\\x07\\x7f\\x9b"),  # C0, DEL, C1 (an 8-bit CSI)
        ("a\u202eb\u2066c\u061c", "a\\u202eb\\u2066c\\u061c"),  # bidirectional controls
        ("\u200b\u200d\ufeff\u00ad\u2060", "\\u200b\\u200d\\ufeff\\xad\\u2060"),  # zero-width, soft hyphen
        ("\u2028\u2029", "\\u2028\\u2029"),  # line and paragraph separators
        ("\U000e0041\U000e007f", "\\U000e0041\\U000e007f"),  # tag characters (ASCII smuggled unseen)
        ("\udcff", "\\udcff"),  # a byte that was not UTF-8 (surrogateescape)
        ("\u2065", "\\u2065"),  # unassigned: a later Unicode may make it a format character
    ],
)
def test_invisible_characters_are_escapes(said: str, shown: str) -> None:
    """Controls, format characters (bidirectional, zero-width, tags), separators, surrogates, unassigned: escapes."""
    assert printable(said) == shown


def test_visible_text_is_kept() -> None:
    """Names in any script, a space, a no-break space and emoji come out as they went in."""
    text = "Zoë Ørsted 山田 Ελένη\u00a0🙂 \\x1b"
    assert printable(text) == text
    assert printable("plain") == "plain"


def test_fetch_errors_and_locations_escape_alike() -> None:
    """A fetch's error and a CRL or OCSP location escape what `printable` escapes (one function, not two)."""
    said = f"CN=CA{chr(0x202E)}x{chr(0x200B)}"
    assert shown_error(said) == printable(said) == "CN=CA\\u202ex\\u200b"
    assert shown_location("http://ca.example/\x1bx\u202e") == "http://ca.example/\\x1bx\\u202e"
