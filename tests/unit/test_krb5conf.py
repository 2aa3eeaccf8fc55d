"""krb5.conf's reader (proxy.kerberos.krb5conf) held against MIT's own parser, and its two users (the KDC watch's
realm section, the one file's copy without some realms), on inputs a line-by-line guess gets wrong."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxy.kerberos import kdcs, krb5conf, profile

Tree = dict[str, Any]  # {"=": {relation: [values]}, "/": {subsection: Tree}}

_LIBRARY = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")

# Each input is something MIT 1.20 reads; the comment says what a guessing reader gets wrong.
READ_BY_MIT = {
    "two-line opening": "[realms]\n LAB.TEST =\n {\n  kdc = a:88\n }\n",  # `NAME =` then `{` on its own line
    "no blanks": "[realms]\nLAB.TEST={\nkdc=a:88\nkdc\t=\tb:88\n}\n",
    "brace with a note": (  # `{ # note` is a value, not a subsection: the next `}` ends the realm
        "[realms]\n LAB.TEST = {\n  auth_to_local = { # not a subsection\n  kdc = a:88\n }\n"
        " OTHER.TEST = {\n  kdc = o:88\n }\n"
    ),
    "comments": (  # `#` and `;` after blanks are comments; a `#` after a value is part of it
        "# top\n[realms]\n  # kdc = no:1\n\t; kdc = no:2\n LAB.TEST = {\n  kdc = a:88 # primary\n  ;x = 1\n }\n"
    ),
    "preamble": (  # before the first `[` in the first column everything is ignored, an indented header included
        "kdc = ignored\n  [realms]\n  LAB.TEST = {\n  kdc = no:1\n  }\n[realms]\n LAB.TEST = {\n  kdc = a:88\n }\n"
    ),
    "final marks": (  # `}*`, `[section]*` and a tag's `*` end nothing early inside one file
        "[realms]*\n LAB.TEST* = {\n  kdc* = a:88\n  kdc = b:88\n }*\n LAB.TEST = {\n  kdc = c:88\n } trailing\n"
    ),
    "named twice": (  # a section and a subsection named twice are one, in order
        "[realms]\n LAB.TEST = {\n  kdc = a:88\n }\n[libdefaults]\n default_realm = LAB.TEST\n"
        "[realms]\n LAB.TEST = {\n  kdc = b:88\n  kdc = {\n   nested = 1\n  }\n }\n"
    ),
    "quotes and escapes": '[realms]\n LAB.TEST = {\n  kdc = "a:88" tail\n  x = "t\\tq\\"n\\\\"\n  y = "open\n }\n',
    "values": "[realms]\n LAB.TEST = {\n  kdc = a:88   \t\n  x = b = c\n  y = {}\n }\n",  # = in a value, `{}`
    "windows line ends": "[realms]\r\n LAB.TEST = {\r\n  kdc = a:88\r\n }\r\n",
    "odd blanks": "[realms]\n\v LAB.TEST = {\f\n  kdc = a:88\n }\n",  # vertical tab, form feed: C's isspace
    "section name with blanks": "[ realms ]\n LAB.TEST = {\n  kdc = a:88\n }\n[realms]\n",
    "open at the end": "[realms]\n LAB.TEST = {\n  kdc = a:88\n",  # never closed: ends with the file
    "no newline at the end": "[realms]\n LAB.TEST = {\n  kdc = a:88\n }",
}

REFUSED_BY_MIT = {
    "header without ]": "[libdefaults\n",
    "two words before =": "[realms]\n LAB TEST = {\n }\n",
    "no tag": "[realms]\n = x\n",
    "no =": "[realms]\n kdc\n",
    "} at the top": "[realms]\n}\n",
    "section inside a subsection": "[realms]\n LAB.TEST = {\n[libdefaults]\n",
    "text after ]": "[realms] x\n",
    "no { after `NAME =`": "[realms]\n LAB.TEST =\n kdc = a\n",
    "comment instead of {": "[realms]\n LAB.TEST =\n # {\n {\n }\n",
    "carriage returns alone": "[realms]\r LAB.TEST = {\r  kdc = a:88\r }\r",  # one line to MIT: no \n in it
}


def _mit_list(handle: ctypes.c_void_p, call: str, path: tuple[str, ...]) -> list[str]:
    """A list MIT's profile library answers for `path` (subsection names, relation names, values)."""
    names = (ctypes.c_char_p * (len(path) + 1))(*[n.encode() for n in path], None)
    found = ctypes.POINTER(ctypes.c_char_p)()
    code = getattr(_LIBRARY, call)(handle, names, ctypes.byref(found))
    if code != 0:
        return []  # PROF_NO_SECTION / PROF_NO_RELATION: nothing there
    values: list[str] = []
    while (value := found[len(values)]) is not None:
        values.append(value.decode())
    _LIBRARY.profile_free_list(found)
    return values


def _mit_tree(path: Path) -> Tree | None:
    """The whole tree MIT's parser makes of the file at `path`, or None where it refuses the file."""
    handle = ctypes.c_void_p()
    if _LIBRARY.profile_init_path(str(path).encode(), ctypes.byref(handle)) != 0:
        return None
    try:

        def node(at: tuple[str, ...]) -> Tree:
            relations = {
                name: _mit_list(handle, "profile_get_values", (*at, name))
                for name in _mit_list(handle, "profile_get_relation_names", at)
            }
            sections = {name: node((*at, name)) for name in _mit_list(handle, "profile_get_subsection_names", at)}
            return {"=": relations, "/": sections}

        return node(())
    finally:
        _LIBRARY.profile_release(handle)


def _our_tree(text: str) -> Tree:
    """The same tree built from the reader's lines."""
    root: Tree = {"=": {}, "/": {}}

    def at(path: tuple[str, ...]) -> Tree:
        node = root
        for name in path:
            node = node["/"].setdefault(name, {"=": {}, "/": {}})
        return node

    for line in krb5conf.read(text):
        if line.kind in (krb5conf.Kind.SECTION, krb5conf.Kind.OPEN):
            at(line.path)
        elif line.kind is krb5conf.Kind.RELATION:
            at(line.path)["="].setdefault(line.name, []).append(line.value)
    return root


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "krb5.conf"
    path.write_bytes(text.encode())
    return path


@pytest.mark.parametrize("text", READ_BY_MIT.values(), ids=READ_BY_MIT.keys())
def test_the_reader_puts_every_relation_where_mit_does(tmp_path: Path, text: str) -> None:
    """Every section, subsection and value the reader finds is MIT's, in MIT's order, and nothing more."""
    mit = _mit_tree(_file(tmp_path, text))
    assert mit is not None
    assert _our_tree(text) == mit


@pytest.mark.parametrize("text", REFUSED_BY_MIT.values(), ids=REFUSED_BY_MIT.keys())
def test_the_reader_refuses_what_mit_refuses(tmp_path: Path, text: str) -> None:
    """A file MIT will not read is a ProfileSyntaxError naming the line, not a best guess."""
    assert _mit_tree(_file(tmp_path, text)) is None
    with pytest.raises(krb5conf.ProfileSyntaxError, match=r"krb5.conf line \d+"):
        krb5conf.read(text)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("module /usr/lib/p.so:r\n[realms]\n", "module"),
        ("[realms]\ninclude /etc/krb5.d/x.conf\n", "include"),
        ("[realms]\n LAB.TEST = {\nincludedir\t/etc/krb5.conf.d/\n }\n", "includedir"),
    ],
)
def test_directives_are_reported_not_followed(text: str, kind: str) -> None:
    """module (before the first section), include and includedir (first column, anywhere) are directives."""
    directives = [line.name for line in krb5conf.read(text) if line.kind is krb5conf.Kind.DIRECTIVE]
    assert directives == [kind]


def test_indented_or_late_directives_are_what_mit_makes_of_them() -> None:
    """`module` after the first section, and an indented `include`, are not directives: MIT reads them as lines."""
    assert krb5conf.read("[realms]\nmodule = x\n")[1].kind is krb5conf.Kind.RELATION
    with pytest.raises(krb5conf.ProfileSyntaxError):
        krb5conf.read("[realms]\n  include /etc/x\n")


def test_a_line_longer_than_mits_buffer_is_refused() -> None:
    """MIT reads a line over 2047 bytes as several lines; the reader refuses it rather than guess."""
    with pytest.raises(krb5conf.ProfileSyntaxError, match="2047"):
        krb5conf.read("[realms]\n x = " + "a" * 2100 + "\n")


@pytest.mark.parametrize("text", READ_BY_MIT.values(), ids=READ_BY_MIT.keys())
def test_the_kdc_watch_reads_the_kdcs_mit_reads(tmp_path: Path, text: str) -> None:
    """kdcs.realm_section: LAB.TEST's kdc values are the ones MIT asks, wherever and however often it is written."""
    mit = _mit_tree(_file(tmp_path, text))
    assert mit is not None
    expected = mit["/"].get("realms", {"/": {}})["/"].get("LAB.TEST")
    section = kdcs.realm_section(text, "LAB.TEST")
    if expected is None:
        assert section is None
        return
    assert section is not None
    assert list(section.kdcs) == expected["="].get("kdc", [])


@pytest.mark.parametrize("text", READ_BY_MIT.values(), ids=READ_BY_MIT.keys())
def test_the_one_files_copy_leaves_out_exactly_the_realms_sections(tmp_path: Path, text: str) -> None:
    """profile._without_realms: MIT reads the copy as krb5.conf less LAB.TEST's section, every other line intact."""
    mit = _mit_tree(_file(tmp_path, text))
    assert mit is not None
    mit["/"].get("realms", {"/": {}})["/"].pop("LAB.TEST", None)
    copy = tmp_path / "copy.conf"
    copy.write_text(profile._without_realms(text, {"LAB.TEST"}))
    assert _mit_tree(copy) == mit


@pytest.mark.usefixtures("fresh_profile")
@pytest.mark.parametrize("text", REFUSED_BY_MIT.values(), ids=REFUSED_BY_MIT.keys())
def test_a_krb5_conf_mit_refuses_is_not_copied_into_the_one_file(tmp_path: Path, text: str) -> None:
    """use_profile keeps such a krb5.conf in KRB5_CONFIG's list, for MIT to refuse itself, and says why."""
    conf = _file(tmp_path, text)
    with capture_logs() as logs:
        value = profile.use_profile(conf)
    assert value.endswith(f":{conf}")
    assert [e["event"] for e in logs] == ["krb5_conf_not_copied"]


@pytest.mark.parametrize("text", READ_BY_MIT.values(), ids=READ_BY_MIT.keys())
def test_the_overlays_section_is_the_realms_section_as_mit_read_it(tmp_path: Path, text: str) -> None:
    """kdcs.overlay_section with every KDC answering: MIT reads the realm's kdcs, other relations and nested
    subsections from it exactly as it read them from krb5.conf."""
    mit = _mit_tree(_file(tmp_path, text))
    assert mit is not None
    expected = mit["/"].get("realms", {"/": {}})["/"].get("LAB.TEST")
    section = kdcs.realm_section(text, "LAB.TEST")
    if expected is None or section is None:
        assert expected is section is None
        return
    overlay = tmp_path / "overlay.conf"
    overlay.write_text("[realms]\n" + kdcs.overlay_section(section, section.kdcs))
    assert _mit_tree(overlay) == {"=": {}, "/": {"realms": {"=": {}, "/": {"LAB.TEST": expected}}}}


@pytest.mark.parametrize("value", ["a:88", "a:88 # note", '"quoted"', "{", "  padded ", "tab\there", "back\\slash\n"])
def test_a_relation_written_by_the_gateway_reads_back_as_its_value(tmp_path: Path, value: str) -> None:
    """krb5conf.relation quotes what MIT would otherwise read differently; MIT reads back the very value."""
    conf = _file(tmp_path, f"[x]\n {krb5conf.relation('v', value)}\n")
    assert _mit_tree(conf) == {"=": {}, "/": {"x": {"=": {"v": [value]}, "/": {}}}}


def test_a_krb5_conf_mit_refuses_turns_the_kdc_watch_off_naming_the_line(tmp_path: Path) -> None:
    """kdcs.watch_for on a krb5.conf MIT would not read: no watch (MIT's own behaviour stands, and MIT will say
    why), and `kdc_watch_off` names the file and the line."""
    conf = _file(tmp_path, "[realms]\n LAB.TEST = {\n  kdc = 127.0.0.1:88\n  two words = x\n }\n")
    with capture_logs() as logs:
        watch = kdcs.watch_for("HTTP/proxy.lab.test@LAB.TEST", conf, 1.0, lambda realm, text: None)
    assert watch is None
    [event] = [e for e in logs if e["event"] == "kdc_watch_off"]
    assert str(conf) in event["reason"]
    assert "(line 4)" in event["reason"]


@pytest.mark.usefixtures("fresh_profile")
def test_an_edit_mit_would_refuse_leaves_the_last_copy_and_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """krb5.conf edited into something MIT refuses, in one-file mode: the last good copy stays in force (MIT reads
    it), `krb5_conf_not_copied` is logged once for that edit, not at every look; the next good edit is copied."""
    conf = _file(tmp_path, "[realms]\n LAB.TEST = {\n  kdc = 127.0.0.1:1111\n }\n")
    value = profile.use_profile(conf)
    assert ":" not in value
    conf.write_text("[realms]\n LAB.TEST = {\n  kdc = 127.0.0.1:2222\n}\n}\n")  # one `}` too many
    with capture_logs() as logs:
        for _ in range(3):
            monkeypatch.setattr(profile._merged, "_looked", 0.0)
            profile.refresh_profile()
    assert [e["event"] for e in logs] == ["krb5_conf_not_copied"]
    assert logs[0]["kept"] == "the last copy"
    mit = _mit_tree(Path(value))
    assert mit is not None
    assert mit["/"]["realms"]["/"]["LAB.TEST"]["="]["kdc"] == ["127.0.0.1:1111"]
    conf.write_text("[realms]\n LAB.TEST = {\n  kdc = 127.0.0.1:3333\n }\n")
    monkeypatch.setattr(profile._merged, "_looked", 0.0)
    profile.refresh_profile()
    mit = _mit_tree(Path(value))
    assert mit is not None
    assert mit["/"]["realms"]["/"]["LAB.TEST"]["="]["kdc"] == ["127.0.0.1:3333"]
