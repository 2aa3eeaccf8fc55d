"""`ascii_lower` and `ascii_upper` change A-Z and a-z only, whatever else a name holds."""

from __future__ import annotations

import random
import string

from proxy.identity.principal import ascii_lower, ascii_upper

_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)

# Letters whose Unicode case mapping lands on (or comes from) ASCII, or changes a string's length.
_TRAPS = "\u017f\u0130\u0131\u212a\u212b\u00df\ufb00\u1e9e\u03a3\u00b5"


def test_non_ascii_letters_are_left_as_they_are() -> None:
    """U+017F, the Kelvin sign, dotted I and the rest keep their case; only the ASCII letters around them change."""
    assert ascii_lower("LAB.TE\u017fT") == "lab.te\u017ft"
    assert ascii_upper("lab.te\u017ft") == "LAB.TE\u017fT"
    assert ascii_lower("\u212aALICE@LAB.TEST") == "\u212aalice@lab.test"  # str.lower would make the sign a "k"
    assert ascii_upper("stra\u00dfe\u0131") == "STRA\u00dfE\u0131"  # str.upper would make "SS" and "I"
    assert ascii_lower("\u0130") == "\u0130"  # str.lower would make two code points


def test_the_same_as_the_translation_table_for_any_name() -> None:
    """ASCII names and names with non-ASCII letters alike get what the A-Z/a-z translation gives."""
    rng = random.Random(18)
    alphabet = string.ascii_letters + string.digits + "@.-_\\$" + _TRAPS
    names = ["", "alice@LAB.TEST", "HTTP/cas.lab.test@LAB.TEST", "Bench-User-0001@lab.test"]
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(2000)]
    for name in names:
        assert ascii_lower(name) == name.translate(_LOWER), name
        assert ascii_upper(name) == name.translate(_UPPER), name
