"""Walking DER by its headers alone: where each element of a structure starts and ends, nothing decoded.

For the few places that must look at an answer's shape before cryptography reads it whole (an OCSP answer's count of
certificates; a CRL's signed bytes, and its outline, before its entries are read: `revocation.accept_der`): the walk
only finds boundaries, and cryptography reads what it bounds later; anything it does not expect (a tag of more than one
byte, a length past its container) is a ValueError. `tlv` writes one element back.
"""

from __future__ import annotations

from collections.abc import Iterator

Element = tuple[int, int, int]  # a DER element: its tag, where its header starts, where it ends


def inside(der: bytes, element: Element) -> list[Element]:
    """The elements inside `element` (a constructed one: SEQUENCE, explicit tag; or an OCTET STRING that holds DER)."""
    return list(elements(der, *value(der, element)))


def whole(der: bytes) -> Element:
    """`der` as one element (its outermost)."""
    return (der[0], 0, len(der)) if der else (0, 0, 0)


def value(der: bytes, element: Element) -> tuple[int, int]:
    """Where the value of `element` starts and ends."""
    _, at, end = element
    if at + 2 > end:
        raise ValueError("a DER element cut short")
    start, length = at + 2, der[at + 1]
    if der[at] & 0x1F == 0x1F:
        raise ValueError("a DER tag of more than one byte")
    if length & 0x80:
        size = length & 0x7F
        start, length = start + size, int.from_bytes(der[start : start + size])
    if start + length > end:
        raise ValueError("a DER element longer than what holds it")
    return start, start + length


def elements(der: bytes, start: int, end: int) -> Iterator[Element]:
    """The DER elements one after another from `start` to `end`."""
    while start < end:
        element_end = value(der, (der[start], start, end))[1]
        yield der[start], start, element_end
        start = element_end


def tlv(tag: int, content: bytes) -> bytes:
    """One DER element: `tag` (of one byte), its length (definite, shortest form), `content`."""
    if len(content) < 0x80:
        return bytes((tag, len(content))) + content
    size = (len(content).bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + len(content).to_bytes(size) + content
