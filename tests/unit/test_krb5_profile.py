"""The krb5 context held open so MIT keeps krb5.conf parsed between tokens (proxy.kerberos.profile)."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy.kerberos import ap_req, kdcs, libkrb5, profile


def test_one_context_is_held_per_configuration_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hold_profile opens one krb5 context for the KRB5_CONFIG in force, and a second call opens none."""
    conf = tmp_path / "krb5.conf"
    conf.write_text("[libdefaults]\n    default_realm = LAB.TEST\n")
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    monkeypatch.setattr(profile, "_held", {})
    assert profile.hold_profile()
    first = profile._held[str(conf)]
    assert first.value  # a krb5_context pointer from libkrb5
    assert profile.hold_profile()
    assert profile._held == {str(conf): first}  # the second call opens nothing more


def test_a_configuration_krb5_refuses_holds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A krb5.conf MIT cannot parse: hold_profile says no context is held, and holds none."""
    conf = tmp_path / "krb5.conf"
    conf.write_text("[libdefaults\n")  # a syntax error: krb5_init_context fails, tokens would fail too
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    monkeypatch.setattr(profile, "_held", {})
    assert not profile.hold_profile()
    assert profile._held == {}


def test_the_profile_is_the_overlay_then_the_configured_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_profile: KRB5_CONFIG names the gateway's overlay (forwardable = true) first, then kerberos.krb5_config;
    without one, what the environment's KRB5_CONFIG named, else /etc/krb5.conf; a second call does not stack
    overlays."""
    conf = tmp_path / "krb5.conf"
    monkeypatch.setenv("KRB5_CONFIG", "/somewhere/else.conf")
    value = profile.use_profile(conf)
    overlay, _, rest = value.partition(":")
    assert rest == str(conf)
    assert Path(overlay).read_text() == "[libdefaults]\n    forwardable = true\n"
    assert profile.use_profile(None) == f"{overlay}:/somewhere/else.conf"  # the environment's again
    monkeypatch.delenv("KRB5_CONFIG")
    # one overlay, then MIT's default (the overlay's text names /etc/krb5.conf's KDCs as primaries: a file of its own)
    first, _, default = profile.use_profile(None).partition(":")
    assert default == "/etc/krb5.conf"
    assert profile._OVERLAY_NAME.fullmatch(Path(first).name)


def _mit_value(config: str, *names: str) -> str | None:
    """What MIT's profile library reads for `names` from the KRB5_CONFIG value `config` (its own parser)."""
    library = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
    handle = ctypes.c_void_p()
    assert library.profile_init_path(config.encode(), ctypes.byref(handle)) == 0
    try:
        value = ctypes.c_char_p()
        path = [n.encode() for n in names] + [None] * (3 - len(names))
        code = library.profile_get_string(handle, *path, None, ctypes.byref(value))
        assert code == 0
        text = None if value.value is None else value.value.decode()
        library.profile_release_string(value)
        return text
    finally:
        library.profile_release(handle)


def _krb5_conf(path: Path, kdc: str) -> None:
    path.write_text(
        "[libdefaults]\n    default_realm = LAB.TEST\n    forwardable = false\n\n"
        f"[realms]\n    LAB.TEST = {{\n        kdc = {kdc}\n    }}\n"
    )


@pytest.mark.usefixtures("fresh_profile")
def test_a_configured_krb5_conf_is_read_as_one_file_with_the_overlay_winning(tmp_path: Path) -> None:
    """kerberos.krb5_config, one plain file: KRB5_CONFIG names one file (a token's library contexts check one
    file, not two), in which MIT reads forwardable = true although krb5.conf says false, and krb5.conf's realm."""
    conf = tmp_path / "krb5.conf"
    _krb5_conf(conf, "127.0.0.1:8888")
    value = profile.use_profile(conf)
    assert ":" not in value
    assert _mit_value(value, "libdefaults", "forwardable") == "true"
    assert _mit_value(str(conf), "libdefaults", "forwardable") == "false"
    assert _mit_value(value, "realms", "LAB.TEST", "kdc") == "127.0.0.1:8888"
    assert profile.use_profile(None).endswith(":/etc/krb5.conf")  # the environment's again, not a copy of the copy


@pytest.mark.usefixtures("fresh_profile")
def test_the_one_file_follows_krb5_conf_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit of krb5.conf reaches MIT as it did with krb5.conf in the list: refresh_profile writes the copy
    again (it looks at most once a second), and MIT rereads the changed file."""
    conf = tmp_path / "krb5.conf"
    _krb5_conf(conf, "127.0.0.1:8888")
    value = profile.use_profile(conf)
    _krb5_conf(conf, "127.0.0.1:9999")
    profile.refresh_profile()  # within the second: not looked at yet
    assert _mit_value(value, "realms", "LAB.TEST", "kdc") == "127.0.0.1:8888"
    monkeypatch.setattr(profile._merged, "_looked", 0.0)
    profile.refresh_profile()
    assert _mit_value(value, "realms", "LAB.TEST", "kdc") == "127.0.0.1:9999"
    assert _mit_value(value, "libdefaults", "forwardable") == "true"
    assert [p.name for p in tmp_path.iterdir()] == ["krb5.conf"]


@pytest.mark.usefixtures("fresh_profile")
def test_a_krb5_conf_that_is_not_plain_text_stays_in_the_list(tmp_path: Path) -> None:
    """A krb5.conf whose profile comes from a module, or one that cannot be read, is not copied: the overlay file
    holds the overlay alone, and krb5.conf follows it in KRB5_CONFIG as before."""
    conf = tmp_path / "krb5.conf"
    conf.write_text("module /usr/lib/some-profile-module.so:residual\n")
    value = profile.use_profile(conf)
    overlay, _, rest = value.partition(":")
    assert rest == str(conf)
    assert Path(overlay).read_text() == "[libdefaults]\n    forwardable = true\n"
    missing = tmp_path / "absent.conf"
    assert profile.use_profile(missing).endswith(f":{missing}")


def _mit_values(config: str, *names: str) -> list[str]:
    """Every value MIT's profile library reads for `names` (a relation given several times: all, in order)."""
    library = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
    handle = ctypes.c_void_p()
    assert library.profile_init_path(config.encode(), ctypes.byref(handle)) == 0
    try:
        path = (ctypes.c_char_p * (len(names) + 1))(*[n.encode() for n in names], None)
        found = ctypes.POINTER(ctypes.c_char_p)()
        assert library.profile_get_values(handle, path, ctypes.byref(found)) == 0
        values: list[str] = []
        while (value := found[len(values)]) is not None:
            values.append(value.decode())
        library.profile_free_list(found)
        return values
    finally:
        library.profile_release(handle)


@pytest.mark.usefixtures("fresh_profile")
def test_the_kdc_watch_still_replaces_a_realms_kdcs_in_the_one_file(tmp_path: Path) -> None:
    """The KDC watch's section for a realm (proxy.kerberos.kdcs: only the KDCs that answer, marked final) replaces
    krb5.conf's KDCs of that realm in the one file as it does across two files, where MIT honours the final mark;
    inside one file MIT would have added krb5.conf's silent KDC back. Other realms, and the realm's KDCs once the
    section is taken out, are krb5.conf's."""
    conf = tmp_path / "krb5.conf"
    conf.write_text(
        "[libdefaults]\n    default_realm = LAB.TEST\n\n[realms]\n"
        "    LAB.TEST = {\n        kdc = 127.0.0.1:1111\n        kdc = 127.0.0.1:2222\n"
        "        admin_server = a\n    }\n"
        "    OTHER.TEST = {\n        kdc = 127.0.0.1:3333\n    }\n"
    )
    value = profile.use_profile(conf)
    assert ":" not in value
    assert _mit_values(value, "realms", "LAB.TEST", "kdc") == ["127.0.0.1:1111", "127.0.0.1:2222"]
    section = kdcs.realm_section(conf.read_text(), "LAB.TEST")
    assert section is not None
    profile.set_realm_section("LAB.TEST", kdcs.overlay_section(section, ["127.0.0.1:2222"]))
    assert _mit_values(value, "realms", "LAB.TEST", "kdc") == ["127.0.0.1:2222"]
    assert _mit_values(value, "realms", "LAB.TEST", "admin_server") == ["a"]
    assert _mit_values(value, "realms", "OTHER.TEST", "kdc") == ["127.0.0.1:3333"]
    assert _mit_value(value, "libdefaults", "default_realm") == "LAB.TEST"
    assert _mit_value(value, "libdefaults", "forwardable") == "true"
    profile.set_realm_section("LAB.TEST", None)
    assert _mit_values(value, "realms", "LAB.TEST", "kdc") == ["127.0.0.1:1111", "127.0.0.1:2222"]


@pytest.mark.usefixtures("fresh_profile")
@pytest.mark.parametrize("files", ["one", "two"])
def test_every_kdc_of_krb5_conf_is_a_primary_kdc_to_mit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: str
) -> None:
    """MIT reads each realm's `kdc` entries as its `primary_kdc` too, ahead of krb5.conf's own primary, in one file
    and across two (the environment's KRB5_CONFIG), also while the KDC watch's section stands for the realm; a realm
    without `kdc` lines gets none. A reply from any of them is then a primary's: MIT no longer sends a refused
    password again to the primary KDC, which counted each wrong Basic password twice towards the directory's
    lockout (tests/integration/test_basic_primary_kdc.py)."""
    conf = tmp_path / "krb5.conf"
    conf.write_text(
        "[libdefaults]\n    default_realm = LAB.TEST\n\n[realms]\n"
        "    LAB.TEST = {\n        kdc = 127.0.0.1:1111\n        kdc = tcp/dc2.lab.test\n"
        "        primary_kdc = pdc.lab.test\n    }\n"
        "    DNS.TEST = {\n        admin_server = a\n    }\n"
    )
    if files == "two":
        monkeypatch.setenv("KRB5_CONFIG", str(conf))
    value = profile.use_profile(conf if files == "one" else None)
    assert (":" in value) == (files == "two")
    expected = ["127.0.0.1:1111", "tcp/dc2.lab.test", "pdc.lab.test"]
    assert _mit_values(value, "realms", "LAB.TEST", "primary_kdc") == expected
    assert _mit_values(value, "realms", "LAB.TEST", "kdc") == expected[:2]
    assert _mit_value(value, "realms", "DNS.TEST", "primary_kdc") is None
    section = kdcs.realm_section(conf.read_text(), "LAB.TEST")
    assert section is not None
    profile.set_realm_section("LAB.TEST", kdcs.overlay_section(section, ["127.0.0.1:1111"]))
    assert _mit_values(value, "realms", "LAB.TEST", "kdc") == ["127.0.0.1:1111"]
    assert set(expected[:2]) <= set(_mit_values(value, "realms", "LAB.TEST", "primary_kdc"))


@pytest.mark.usefixtures("fresh_profile")
def test_a_krb5_conf_that_includes_files_stays_in_the_list(tmp_path: Path) -> None:
    """An included file would join the one file's tree, where a realm's final mark keeps nothing out: krb5.conf
    with `include` or `includedir` keeps the two-file list."""
    conf = tmp_path / "krb5.conf"
    for directive in ("include /etc/krb5.d/x.conf", "includedir /etc/krb5.conf.d/"):
        conf.write_text(f"{directive}\n[libdefaults]\n    default_realm = LAB.TEST\n")
        assert profile.use_profile(conf).endswith(f":{conf}")


@pytest.mark.usefixtures("fresh_profile")
def test_an_edit_that_adds_an_include_is_said_not_silently_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """krb5.conf read as one file at start, then edited to include another file: the one file cannot take it (an
    included file would join its tree), so MIT goes on reading the last copy. That is said once per edit
    (`krb5_conf_not_copied`, naming the directive and the restart that makes MIT read krb5.conf itself), as for a
    line MIT refuses; the edit was dropped without a word, and the file read and parsed again every second."""
    conf = tmp_path / "krb5.conf"
    _krb5_conf(conf, "127.0.0.1:8888")
    value = profile.use_profile(conf)
    conf.write_text(conf.read_text().replace("8888", "9999") + f"include {tmp_path / 'other.conf'}\n")
    monkeypatch.setattr(profile._merged, "_looked", 0.0)
    with capture_logs() as logs:
        profile.refresh_profile()
        monkeypatch.setattr(profile._merged, "_looked", 0.0)
        profile.refresh_profile()  # the same edit: not said again
    said = [e for e in logs if e["event"] == "krb5_conf_not_copied"]
    assert len(said) == 1, logs
    assert "include" in said[0]["reason"]
    assert "restart" in said[0]["kept"]
    assert _mit_value(value, "realms", "LAB.TEST", "kdc") == "127.0.0.1:8888"  # the last copy, as said


def test_libkrb5_is_loaded_once_with_every_prototype_declared() -> None:
    """One library object for the held context and the tokens (proxy.kerberos.libkrb5), each call declared: a wrong
    argument is refused by ctypes before it reaches C, and the error message's pointer is not cut to an int."""
    library = libkrb5.LIB
    assert library is not None, libkrb5.NOT_LOADED
    assert library.krb5_get_error_message.restype is ctypes.c_void_p
    assert library.krb5_free_context.restype is None
    with pytest.raises(ctypes.ArgumentError):
        library.krb5_init_context("not a pointer")
    libkrb5.check(0, ctypes.c_void_p(), "nothing")  # code 0: no error, nothing asked of MIT


def test_without_libkrb5_no_context_is_held_and_tokens_are_python_gssapis(monkeypatch: pytest.MonkeyPatch) -> None:
    """libkrb5 that cannot be loaded: no context is held (`krb5_profile_not_held` with the loader's reason), and a
    held ticket cannot be read (Krb5Error: the delegator logs krb5_tokens_unavailable, python-gssapi makes tokens)."""
    monkeypatch.setattr(libkrb5, "LIB", None)
    monkeypatch.setattr(libkrb5, "NOT_LOADED", "libkrb5.so.3: cannot open shared object file")
    monkeypatch.setattr(profile, "_held", {})
    with capture_logs() as logs:
        assert not profile.hold_profile()
    assert [e["reason"] for e in logs if e["event"] == "krb5_profile_not_held"] == [
        "libkrb5.so.3: cannot open shared object file"
    ]
    assert profile.held_context() is None
    with pytest.raises(ap_req.Krb5Error, match="libkrb5 is not loaded"):
        ap_req.TicketTokens.read(None, None, [])  # type: ignore[arg-type]  # refused before either is looked at


def _held_value(*names: str) -> str | None:
    """What the held library context (`profile.held_context`) reads for `names` from its profile."""
    library = ctypes.CDLL(ctypes.util.find_library("krb5") or "libkrb5.so.3")
    handle = ctypes.c_void_p()
    assert library.krb5_get_profile(profile.held_context(), ctypes.byref(handle)) == 0
    try:
        value = ctypes.c_char_p()
        path = [n.encode() for n in names] + [None] * (3 - len(names))
        assert library.profile_get_string(handle, *path, None, ctypes.byref(value)) == 0
        text = None if value.value is None else value.value.decode()
        library.profile_release_string(value)
        return text
    finally:
        library.profile_release(handle)


@pytest.mark.usefixtures("fresh_profile")
def test_a_reload_to_another_krb5_conf_is_read_by_new_and_held_contexts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """use_profile for another krb5.conf (a reload that changes kerberos.krb5_config): contexts opened after it read
    the new file's KDC, and so does the held context, a fresh one (the earlier freed). The one-file overlay kept the
    krb5.conf it had copied first, so MIT read the old realm's KDCs until a restart. The new profile is a new overlay
    file: the one before stays as it was for a call begun on it, older ones are removed."""
    monkeypatch.setattr(profile, "_held", {})
    first, second, third = tmp_path / "first.conf", tmp_path / "second.conf", tmp_path / "third.conf"
    for path, kdc in ((first, "127.0.0.1:1111"), (second, "127.0.0.1:2222"), (third, "127.0.0.1:3333")):
        _krb5_conf(path, kdc)
    realm_kdc = ("realms", "LAB.TEST", "kdc")
    before = profile.use_profile(first)
    assert profile.hold_profile()
    earlier = profile.held_context()
    assert _held_value(*realm_kdc) == "127.0.0.1:1111"
    value = profile.use_profile(second)
    assert profile.hold_profile()
    assert value != before
    assert _mit_value(value, *realm_kdc) == "127.0.0.1:2222"
    assert _held_value(*realm_kdc) == "127.0.0.1:2222"
    assert list(profile._held) == [value]
    assert profile.held_context() is not earlier
    assert _mit_value(before, *realm_kdc) == "127.0.0.1:1111"  # a call begun before reads on as it began
    assert profile.use_profile(second) == value  # the same profile again (the directory's call): the same file
    latest = profile.use_profile(third)
    assert profile._written[os.getpid()][-2:] == [value, latest]
    assert not Path(before).exists()
    assert sorted(tmp_path.iterdir()) == [first, second, third]


def test_only_overlays_no_live_process_holds_are_removed_as_stale(tmp_path: Path) -> None:
    """`_remove_stale` removes this user's overlay files (and half-written copies) named for a process that is gone
    and locked by none; it keeps a file a live process holds locked (a gateway in another PID namespace, whose PID
    means nothing here), another user's, one named for a live process, and files of other names."""
    gone = _gone_pid()
    names = {
        "stale": f"kcd-proxy-krb5-{gone}-a1.conf",
        "half_written": f"kcd-proxy-krb5-{gone}-a1.conf.b2.new",
        "locked": f"kcd-proxy-krb5-{gone}-c3.conf",
        "other_user": f"kcd-proxy-krb5-{gone}-d4.conf",
        "live": f"kcd-proxy-krb5-{os.getpid()}-e5.conf",
        "unrelated": f"kcd-proxy-krb5-{gone}.txt",
    }
    for name in names.values():
        (tmp_path / name).write_text("[libdefaults]\n")
    os.chown(tmp_path / names["other_user"], 65534, 65534)
    holder = os.open(tmp_path / names["locked"], os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        with capture_logs() as logs:
            profile._remove_stale(str(tmp_path))
    finally:
        os.close(holder)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("locked", "other_user", "live", "unrelated")
    )
    [said] = [e for e in logs if e["event"] == "krb5_overlays_removed"]
    assert sorted(said["files"]) == sorted([names["stale"], names["half_written"]])


def _gone_pid() -> int:
    """The PID of a process that has exited (and been waited for)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_an_overlay_name_with_a_pid_no_process_can_have_does_not_stop_the_start(tmp_path: Path) -> None:
    """A file in the temporary directory named as an overlay of a PID beyond any C int (anyone may make one in /tmp)
    is judged like any other stale file: `_remove_stale` removes it if it is this user's and unlocked, and leaves
    another user's. os.kill raised OverflowError on it, which stopped every gateway's start (app.serve)."""
    ours = tmp_path / f"kcd-proxy-krb5-{2**31}-a1.conf"
    theirs = tmp_path / f"kcd-proxy-krb5-{10**20}-b2.conf"
    for path in (ours, theirs):
        path.write_text("[libdefaults]\n")
    os.chown(theirs, 65534, 65534)
    profile._remove_stale(str(tmp_path))
    assert sorted(tmp_path.iterdir()) == [theirs]


@pytest.mark.usefixtures("fresh_profile")
@pytest.mark.parametrize("include", [False, True], ids=["one-file", "krb5-conf-in-the-list"])
def test_the_kdc_watchs_section_is_read_by_the_next_context_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, include: bool
) -> None:
    """The KDC watch's section put in the overlay, or taken out (a reload's `stop_watch`), right after the held
    context read the file: the next library context reads the new KDC list. MIT rereads a shared profile file only
    when its modification time (seconds and nanoseconds) differs from the one it read, and the kernel stamps a file
    with a clock that moves in ticks of a few ms: the file replaced within the tick kept the time, and MIT the old list
    for as long as the context held it open lived (CI: bob 503, "Cannot contact any KDC", after a reload)."""
    monkeypatch.setattr(profile, "_held", {})
    conf = tmp_path / "krb5.conf"
    _krb5_conf(conf, "127.0.0.1:1111")
    if include:  # the two-file list the failing reload had: the overlay holds the overlay's lines alone
        (tmp_path / "other.conf").write_text("[libdefaults]\n    ticket_lifetime = 1h\n")
        conf.write_text(conf.read_text() + f"\ninclude {tmp_path / 'other.conf'}\n")
    profile.use_profile(conf)
    realm_kdc = ("realms", "LAB.TEST", "kdc")
    section = kdcs.RealmSection("LAB.TEST", ("127.0.0.1:1111",), ())
    for round_ in range(5):  # each time at once after MIT read the file, within the same clock tick as a rule
        assert profile.hold_profile()
        kdc = f"127.0.0.1:{2000 + round_}"
        profile.set_realm_section("LAB.TEST", kdcs.overlay_section(section, [kdc]))
        assert _mit_values(os.environ["KRB5_CONFIG"], *realm_kdc) == [kdc], f"round {round_}: section put in"
        assert _held_value(*realm_kdc) == kdc
        profile.set_realm_section("LAB.TEST", None)
        assert _mit_values(os.environ["KRB5_CONFIG"], *realm_kdc) == ["127.0.0.1:1111"], f"round {round_}: taken out"


def _names_one_overlay(value: str, base: str) -> str:
    """The overlay file `value` (a KRB5_CONFIG) names, checked to be the only overlay in it, followed by `base` alone
    (or, in one-file mode, nothing: the overlay holds base's text). The caller checks that it exists."""
    files = value.split(":")
    overlays = [f for f in files if profile._OVERLAY_NAME.fullmatch(Path(f).name)]
    assert overlays == files[:1], value  # one overlay, first
    assert files[1:] in ([], [base]), value
    return files[0]


@pytest.mark.usefixtures("fresh_profile")
def test_reloads_and_a_forked_worker_never_stack_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway's life without the module state reset between calls (unlike the tests above): reloads that change
    kerberos.krb5_config (one-file and two-file mode in turn), the KDC watch's realm sections in between, and a worker
    forked afterwards, as the supervisor forks a replacement. KRB5_CONFIG names one overlay, then the base file (no
    `overlay2:overlay1:krb5.conf`), and only the overlay in force and the one before it are left."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(profile, "_overlay", [])
    monkeypatch.setattr(profile, "_written", {})
    monkeypatch.setattr(profile, "_texts", {})
    monkeypatch.setattr(profile, "_locks", {})
    plain_a, plain_b, including = tmp_path / "a.conf", tmp_path / "b.conf", tmp_path / "i.conf"
    _krb5_conf(plain_a, "127.0.0.1:1111")
    _krb5_conf(plain_b, "127.0.0.1:2222")
    including.write_text(f"include {plain_a}\n[libdefaults]\n    default_realm = LAB.TEST\n")
    monkeypatch.setenv("KRB5_CONFIG", str(plain_b))  # the environment's: two-file mode while none is configured
    # (kerberos.krb5_config, the file MIT then reads): a reload keeping the environment's, then ones changing the key
    steps: list[tuple[Path | None, Path]] = [
        (None, plain_b), (None, plain_b), (including, including), (plain_a, plain_a), (including, including),
        (plain_b, plain_b), (plain_a, plain_a), (plain_a, plain_a),
    ]  # fmt: skip
    named: list[str] = []
    try:
        for n, (configured, base) in enumerate(steps):
            value = profile.use_profile(configured)
            assert os.environ["KRB5_CONFIG"] == value
            overlay = _names_one_overlay(value, str(base))
            assert Path(overlay).is_file()
            if overlay not in named:  # the same profile again (the last step) keeps its file
                named.append(overlay)
            profile.set_realm_section("LAB.TEST", f"    LAB.TEST = {{\n        kdc = 127.0.0.1:{3000 + n}\n    }}*\n")
            assert {str(p) for p in temp.iterdir()} == set(named[-2:])  # older overlays are removed
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the replacement worker: inherits the environment and the module's state, builds its own
            code = 1
            try:
                os.close(read)
                os.write(write, profile.use_profile(plain_a).encode())
                profile.remove_overlay()
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            child = pipe.read().decode()
        assert os.waitpid(pid, 0)[1] == 0
        own = _names_one_overlay(child, str(plain_a))
        assert f"-{pid}-" in Path(own).name  # the worker's own overlay, in place of ours (not on top of it)
        assert not Path(own).exists()  # removed at the worker's exit; ours stay ours
        assert {str(p) for p in temp.iterdir()} == set(named[-2:])
    finally:
        profile.remove_overlay()


@pytest.mark.usefixtures("fresh_profile")
def test_a_reload_that_drops_kerberos_krb5_config_reads_the_environments_krb5_conf_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kerberos.krb5_config set at the start (one file, or a list where it includes another), then taken out of the
    configuration and reloaded: MIT reads the environment's krb5.conf again, as at a start without the key, and the
    KDC watch follows that file. The gateway went on reading the file no longer configured (its copy, in one-file mode,
    where the KDC watch then found no krb5.conf at all) until a restart."""
    environment, configured, including = tmp_path / "env.conf", tmp_path / "a.conf", tmp_path / "i.conf"
    _krb5_conf(environment, "127.0.0.1:2222")
    _krb5_conf(configured, "127.0.0.1:1111")
    including.write_text(f"include {configured}\n")
    realm_kdc = ("realms", "LAB.TEST", "kdc")
    for first in (configured, including):
        monkeypatch.setenv("KRB5_CONFIG", str(environment))
        assert _mit_value(profile.use_profile(first), *realm_kdc) == "127.0.0.1:1111"
        value = profile.use_profile(None)
        assert _mit_value(value, *realm_kdc) == "127.0.0.1:2222", value
        assert kdcs.krb5_files(None) == [environment]
        assert profile.use_profile(None) == value  # and so on, reload after reload


@pytest.mark.usefixtures("fresh_profile")
def test_a_kdc_added_to_krb5_conf_read_as_two_files_becomes_a_primary_without_a_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """krb5.conf read by MIT itself (two files: it includes another) and edited to name another KDC: MIT uses it
    within a second, so the overlay names it a primary_kdc too within a second of `refresh_profile`, without a reload.
    Before, the overlay's primaries stayed those of the start: a refusal from the new KDC was sent again to the old
    ones as to the primary, two failures per wrong Basic password until a reload."""
    extra = tmp_path / "extra.conf"
    extra.write_text("[libdefaults]\n    dns_lookup_realm = false\n")
    conf = tmp_path / "krb5.conf"
    realm = "[realms]\n    LAB.TEST = {\n        kdc = 127.0.0.1:1111\n    }\n"
    conf.write_text(f"include {extra}\n{realm}")
    value = profile.use_profile(conf)
    assert value.endswith(f":{conf}")
    assert _mit_values(value, "realms", "LAB.TEST", "primary_kdc") == ["127.0.0.1:1111"]
    added = realm.replace("1111\n", "1111\n        kdc = 127.0.0.2:2222\n")
    conf.write_text(f"include {extra}\n{added}")
    deadline = time.monotonic() + 10
    while _mit_values(value, "realms", "LAB.TEST", "primary_kdc") != ["127.0.0.1:1111", "127.0.0.2:2222"]:
        assert time.monotonic() < deadline, _mit_values(value, "realms", "LAB.TEST", "primary_kdc")
        profile.refresh_profile()
        time.sleep(0.05)  # a poll's pace: the deadline above bounds the wait
