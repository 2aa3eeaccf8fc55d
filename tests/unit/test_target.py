"""The request target as the backend reads it (proxy/target.py): one reading for routing and forwarding."""

from __future__ import annotations

import pytest

from proxy.errors import BadRequest
from proxy.target import checked_host, origin_form, remove_dot_segments


@pytest.mark.parametrize(
    ("target", "path", "forward", "query"),
    [
        ("/owa/", "/owa/", "/owa/", ""),
        (
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=a%2Fb",
            "/Microsoft-Server-ActiveSync",
            None,
            "Cmd=Sync&User=a%2Fb",
        ),
        ("/owa/../ecp/x", "/ecp/x", "/ecp/x", ""),
        ("/owa/%2e%2e/ecp/x", "/ecp/x", "/ecp/x", ""),
        ("/owa/%2E./ecp/", "/ecp/", "/ecp/", ""),
        ("//ecp", "/ecp", "/ecp", ""),
        ("/owa//x///y", "/owa/x/y", "/owa/x/y", ""),
        ("/owa\\..\\ecp\\x", "/ecp/x", "/ecp/x", ""),
        ("/owa/./x/.", "/owa/x/", "/owa/x/", ""),
        ("/owa/x/..", "/owa/", "/owa/", ""),
        ("/a%20b/%41", "/a b/A", "/a%20b/%41", ""),
        ("/caf%C3%A9/..//x%20y", "/x y", "/x%20y", ""),
        ("/.well-known/x", "/.well-known/x", "/.well-known/x", ""),
        ("/x?", "/x", "/x", ""),
        ("/owa/%25zz", "/owa/%zz", "/owa/%25zz", ""),  # decoded once: '%zz' is no escape to a second reader either
    ],
)
def test_paths_are_read_as_iis_reads_them(target: str, path: str, forward: str | None, query: str) -> None:
    """Percent-decoding, backslashes, repeated slashes and dot-segments give the path the backend acts on;
    it is forwarded as sent when that already reads the same, else re-encoded."""
    read = origin_form(target)
    assert read.path == path
    assert read.forward == (forward or target.partition("?")[0])
    assert read.query == query


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/owa%2f..%2fecp/x", "encoded slash"),
        ("/owa/..%2Fecp", "encoded slash"),
        ("/owa/..%5cecp", "encoded backslash"),
        ("/owa/%252e%252e/ecp", "encoded twice"),
        ("/owa/%25%32%65", "encoded twice"),
        ("/owa/%00.aspx", "control character"),
        ("/owa/%0d%0aX-Injected:%201", "control character"),
        ("/owa/%u002e%u002e/ecp", "does not start a %XX escape"),
        ("/owa/%zz", "does not start a %XX escape"),
        ("/owa/%", "does not start a %XX escape"),
        ("/owa/%%", "does not start a %XX escape"),
        ("/owa/%%2e%2e/ecp", "does not start a %XX escape"),  # '%%2e' is '%' then '.' to a lenient reader
        ("/owa/%4%31", "does not start a %XX escape"),  # '%41' ('A') to a reader that decodes from the right
        ("/owa/%2", "does not start a %XX escape"),
        ("/owa/%+41", "does not start a %XX escape"),  # int('+4', 16) is 4: int() takes it for an escape
        ("/owa/%u2215", "does not start a %XX escape"),
        ("/owa/..%5Cecp", "encoded backslash"),
        ("/owa/%7f", "control character"),
        ("/owa/%F0%80%80%AF", "not UTF-8"),  # a four-byte overlong '/'
        ("/owa/%c3%28", "not UTF-8"),
        ("/owa/%ff", "not UTF-8"),
        ("/..", "climbs above the root"),
        ("/owa/../../ecp", "climbs above the root"),
        ("/%2e%2e/x", "climbs above the root"),
        ("/ew%C5%BF/", "U+017F"),
        ("/%E2%84%AAey/", "U+212A"),
        ("/owa/x#frag", "fragment"),
        ("/owa/\u00e9", "not percent-encoded"),
    ],
)
def test_ambiguous_targets_are_refused(target: str, why: str) -> None:
    """What a second reader could read otherwise is a 400 with the reason, never a guess."""
    with pytest.raises(BadRequest) as refused:
        origin_form(target)
    assert refused.value.status == 400
    assert why in refused.value.reason


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/ews./Exchange.asmx", "ends in a dot or a space"),
        ("/ews%2e/Exchange.asmx", "ends in a dot or a space"),
        ("/ews%2E%2E%2E/x", "ends in a dot or a space"),
        ("/ews%20/x", "ends in a dot or a space"),
        ("/ews.%20./x", "ends in a dot or a space"),
        ("/owa/x.", "ends in a dot or a space"),
        ("/ews::$DATA/x", "':'"),
        ("/ews%3a%3a$DATA/x", "':'"),
        ("/ews;jsessionid=1/x", "';'"),
        ("/ews%3bx/y", "';'"),
        ("/ews*/x", "'*'"),
        ("/ews%3c/x", "'<'"),
        ("/ews%3e/x", "'>'"),
        ("/ews%22/x", "'\"'"),
        ("/ews%7c/x", "'|'"),
        ("/ews%3f/x", "'?'"),
        ("/EXCHAN~1/ews", "8.3 short name"),
        ("/owa/AUTH~12.ASP", "8.3 short name"),
        ("/ews%c0%ae/x", "not UTF-8"),
        ("/ews%c0%af/x", "not UTF-8"),
        ("/ews%e0%80%ae/x", "not UTF-8"),
        ("/ews%EF%BC%8E/x", "U+FF0E"),
        ("/ews%EF%BC%8Fx", "U+FF0F"),
        ("/ews%EF%BC%BCx", "U+FF3C"),
        ("/%EF%BD%85ws/x", "U+FF45"),
        ("/ews%E2%88%95x", "U+2215"),
        ("/ews%E2%80%A4/x", "U+2024"),
        ("/ews%C2%A0/x", "U+00A0"),
    ],
)
def test_what_windows_reads_otherwise_is_refused(target: str, why: str) -> None:
    """A segment Windows would trim (trailing dots and spaces), a stream or a parameter a reader would cut off
    (`::$DATA`, `;x`), wildcards and characters no Windows name may hold, an 8.3 alias, and non-ASCII characters
    that a compatibility or best-fit mapping turns into ASCII (full-width dot, slash, backslash, letters): 400,
    with the reason."""
    with pytest.raises(BadRequest) as refused:
        origin_form(target)
    assert refused.value.status == 400
    assert why in refused.value.reason


@pytest.mark.parametrize(
    "target",
    [
        "/owa/auth/15.2.1118/themes/resources/favicon.ico",
        "/ews.bak/x",
        "/owa/.hidden",
        "/a%20b/c",
        "/autodiscover/autodiscover.json/v1.0/alice@lab.test",
        "/owa/~alice/x",
        "/owa/AB~C/x",
        "/owa/%C3%A9t%C3%A9.docx",
        "/owa/%E8%B3%87%E6%96%99",
    ],
)
def test_what_windows_reads_the_same_way_passes(target: str) -> None:
    """Dots and spaces inside a segment, a tilde that is not an 8.3 alias, letters that stay non-ASCII: served."""
    assert origin_form(target).path


@pytest.mark.parametrize("target", ["*", "http://cas.lab.test/owa/", "owa/", ""])
def test_only_origin_form_is_accepted(target: str) -> None:
    """Asterisk-form, absolute-form and relative targets are refused."""
    with pytest.raises(BadRequest, match="starting with '/'"):
        origin_form(target)


def test_non_ascii_letters_that_stay_non_ascii_are_kept() -> None:
    """A plain non-ASCII path (an OWA attachment name) is not refused, and goes out as the client encoded it."""
    read = origin_form("/owa/%C3%A9t%C3%A9.docx")
    assert read.path == "/owa/\u00e9t\u00e9.docx"
    assert read.forward == "/owa/%C3%A9t%C3%A9.docx"
    assert origin_form("/owa/Stra%C3%9Fe").path == "/owa/Stra\u00dfe"  # sharp s: upper() gives "SS", two letters


def test_the_reading_is_stable() -> None:
    """Reading the forwarded path again gives the same path: the backend sees what was routed."""
    for target in ("/owa/../ecp/x%20y", "/a\\b//c/./d/", "/%41%42/../c"):
        once = origin_form(target)
        again = origin_form(once.forward)
        assert (again.path, again.forward) == (once.path, once.forward)


@pytest.mark.parametrize(
    ("path", "normal"),
    [("/", "/"), ("/a/b/../c", "/a/c"), ("/a/./b/", "/a/b/"), ("/a/b/..", "/a/"), ("/a//b", "/a/b")],
)
def test_remove_dot_segments(path: str, normal: str) -> None:
    """RFC 3986 5.2.4 on absolute paths, with empty segments dropped."""
    assert remove_dot_segments(path) == normal


@pytest.mark.parametrize("value", ["h", "Mail.Example.com.", "cas_01:443", "10.0.0.1:0", "[::1]", "[fe80::1]:65535"])
def test_a_host_with_an_optional_port_is_taken_as_sent(value: str) -> None:
    """Host names, IPv4 and bracketed IPv6 addresses, with a port up to 65535, pass unchanged."""
    assert checked_host(value) == value


@pytest.mark.parametrize("value", ["", " h", "h/x", "u@h", "h:", "h:65536", "h:1:2", "[::1", "::1", "h%41", "h;x", "é"])
def test_a_host_that_is_not_host_and_port_is_a_bad_request(value: str) -> None:
    """Anything else a Host could carry (a path, user info, an empty or bad port, escapes, sub-delims) is 400."""
    with pytest.raises(BadRequest):
        checked_host(value)


def test_no_host_is_no_host() -> None:
    """HTTP/1.0 without Host: nothing to check, nothing to send on."""
    assert checked_host(None) is None
