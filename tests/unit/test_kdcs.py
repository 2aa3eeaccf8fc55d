"""The KDC watch's pure parts (`proxy.kerberos.kdcs`): krb5.conf's realm section, the AS-REQ, what MIT is told."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from pathlib import Path

import pytest
from pyasn1.codec.der import decoder
from structlog.testing import capture_logs

from proxy.kerberos import kdcs

KRB5_CONF = """
[libdefaults]
    default_realm = LAB.TEST
    # kdc = not.this:1

[realms]
    OTHER.TEST = {
        kdc = other.kdc:88
    }
    LAB.TEST = {
        kdc = 10.0.0.1:88
        admin_server = 10.0.0.9
        ; a comment
        kdc = tcp/10.0.0.2:750
        auth_to_local_names = {
            alice = root
        }
        kdc = [2001:db8::1]:88
    }

[domain_realm]
    .lab.test = LAB.TEST
"""


def test_the_realms_kdcs_and_other_lines_are_read_from_its_section() -> None:
    """Only LAB.TEST's own kdc lines, in order; its other lines (a nested subsection included) kept as written."""
    section = kdcs.realm_section(KRB5_CONF, "LAB.TEST")
    assert section is not None
    assert section.kdcs == ("10.0.0.1:88", "tcp/10.0.0.2:750", "[2001:db8::1]:88")
    assert section.other_lines == ("admin_server = 10.0.0.9", "auth_to_local_names = {", "alice = root", "}")
    assert kdcs.realm_section(KRB5_CONF, "NOPE.TEST") is None


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        ("kdc.example", ("kdc.example", 88)),
        ("10.0.0.1:750", ("10.0.0.1", 750)),
        ("tcp/10.0.0.1:750", ("10.0.0.1", 750)),
        ("[2001:db8::1]:88", ("2001:db8::1", 88)),
        ("[2001:db8::1]", ("2001:db8::1", 88)),
        ("udp/10.0.0.1", None),
        ("https://kdcproxy.example/KdcProxy", None),
        ("10.0.0.1:eighty", None),
    ],
)
def test_kdc_entries_the_gateway_can_ask(entry: str, address: tuple[str, int] | None) -> None:
    """krb5.conf's kdc forms over TCP are asked; UDP-only and KDC-proxy entries are not (the watch is then off)."""
    assert kdcs.kdc_address(entry) == address


def test_the_overlay_lists_the_answering_kdcs_and_is_final() -> None:
    """The overlay's section names only the KDCs that answer, keeps the realm's other lines, and ends with the final
    mark, so that MIT does not append krb5.conf's own list of the realm's KDCs."""
    section = kdcs.realm_section(KRB5_CONF, "LAB.TEST")
    assert section is not None
    text = kdcs.overlay_section(section, ["[2001:db8::1]:88"])
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0] == "LAB.TEST = {"
    assert [line for line in lines if line.startswith("kdc")] == ["kdc = [2001:db8::1]:88"]
    assert "admin_server = 10.0.0.9" in lines
    assert lines[-1] == "}*"


def test_the_as_req_is_der_a_kdc_can_read() -> None:
    """The probe's question is a length-prefixed DER [APPLICATION 10] (AS-REQ) with the gateway's name and realm."""
    wire = kdcs.as_req("HTTP/proxy.lab.test@LAB.TEST", 0x7FFFFFFF)
    (length,) = struct.unpack("!I", wire[:4])
    assert length == len(wire) - 4
    assert wire[4] == 0x6A
    _, rest = decoder.decode(wire[4:])
    assert rest == b""
    for text in (b"HTTP", b"proxy.lab.test", b"LAB.TEST", b"krbtgt"):
        assert text in wire


def test_a_listener_that_accepts_and_never_answers_is_silent() -> None:
    """A real listener that accepts and never answers: not an answer, within the probe's deadline; a closed port
    neither."""
    with socket.socket() as hung, socket.socket() as closed:
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port, dead = hung.getsockname()[1], closed.getsockname()[1]
        silent = asyncio.run(kdcs.probe(f"127.0.0.1:{port}", "HTTP/proxy.lab.test@LAB.TEST", 0.5))
        refused = asyncio.run(kdcs.probe(f"127.0.0.1:{dead}", "HTTP/proxy.lab.test@LAB.TEST", 0.5))
    assert (silent.answered, silent.detail) == (False, "no answer within 0.5 s")
    assert not refused.answered


def test_the_watch_tells_mit_what_answers_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """All answer: krb5.conf's list stands. One silent: MIT is given the others (`kdc_silent`). None: krb5.conf's
    stands and exchanges are refused meanwhile (`none_answer`, `kdcs_silent`). Back: krb5.conf's again."""
    section = kdcs.realm_section(KRB5_CONF, "LAB.TEST")
    assert section is not None
    silent: set[str] = set()

    async def fake(entry: str, principal: str, within: float) -> kdcs.KdcProbe:
        return kdcs.KdcProbe(entry, entry not in silent, "KRB-ERROR" if entry not in silent else "silent", 1.0)

    monkeypatch.setattr(kdcs, "probe", fake)
    written: list[tuple[str, str | None]] = []
    watch = kdcs.KdcWatch(section, "HTTP/proxy.lab.test@LAB.TEST", 1, lambda realm, text: written.append((realm, text)))

    def check() -> list[str]:
        with capture_logs() as logs:
            asyncio.run(watch.check())
        return [e["event"] for e in logs]

    assert (check(), written[-1], watch.none_answer) == (["kdcs_answer"], ("LAB.TEST", None), False)
    silent.add("10.0.0.1:88")
    assert check() == ["kdc_silent"]
    text = written[-1][1]
    assert text is not None
    assert "10.0.0.1:88" not in text
    assert "tcp/10.0.0.2:750" in text
    assert check() == []  # nothing changed: nothing written, nothing said
    silent.update(section.kdcs)
    assert (check(), written[-1], watch.none_answer) == (["kdcs_silent"], ("LAB.TEST", None), True)
    silent.clear()
    assert (check(), written[-1], watch.none_answer) == (["kdcs_answer"], ("LAB.TEST", None), False)


def test_the_watch_follows_krb5_conf_and_lets_go_when_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before each probe the realm's section is read again: an edited kdc list is the one probed
    (`kdc_list_changed`, then its news); a krb5.conf the watch can no longer follow (an include added, a line MIT
    refuses), two looks in a row (a file written in place may be read half-written), hands the realm back to MIT:
    the overlay's section goes, nothing is refused, nothing is probed."""
    section = kdcs.realm_section(KRB5_CONF, "LAB.TEST")
    assert section is not None
    asked: list[str] = []

    async def fake(entry: str, principal: str, within: float) -> kdcs.KdcProbe:
        asked.append(entry)
        return kdcs.KdcProbe(entry, entry != "10.0.0.9:88", "KRB-ERROR", 1.0)

    monkeypatch.setattr(kdcs, "probe", fake)
    now: list[kdcs.RealmSection | str] = [section]
    written: list[tuple[str, str | None]] = []
    watch = kdcs.KdcWatch(section, "P@LAB.TEST", 1, lambda realm, text: written.append((realm, text)), lambda: now[0])

    def check() -> list[str]:
        asked.clear()
        with capture_logs() as logs:
            asyncio.run(watch.check())
        return [e["event"] for e in logs]

    assert check() == ["kdcs_answer"]
    now[0] = kdcs.RealmSection("LAB.TEST", ("10.0.0.9:88",), ())
    assert (check(), asked, watch.none_answer) == (["kdc_list_changed", "kdcs_silent"], ["10.0.0.9:88"], True)
    now[0] = "krb5.conf reads other files (include /etc/krb5.conf.d)"
    assert (check(), asked) == ([], ["10.0.0.9:88"])  # the section in force, once more first
    assert (check(), asked, watch.none_answer, written[-1]) == (["kdc_watch_off"], [], False, ("LAB.TEST", None))
    assert check() == []


def test_a_krb5_conf_read_while_it_is_written_in_place_is_not_taken_cut_short(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """krb5.conf rewritten in place (an editor, `cat > krb5.conf`) and read half-way, cut in the middle of a kdc value
    (`10.0.0.3:7` of `10.0.0.3:750`), the realm's `}` not yet written: the watch neither probes the cut address nor
    pins MIT to what answers of it until the next look, 5 s later (a cut address answers nothing; were it the only
    one, every new user got 503 meanwhile); it keeps the list in force, and takes the new list once the file is
    whole."""
    asked: list[str] = []

    async def fake(entry: str, principal: str, within: float) -> kdcs.KdcProbe:
        asked.append(entry)
        return kdcs.KdcProbe(entry, entry in ("10.0.0.1:88", "10.0.0.3:750"), "KRB-ERROR", 1.0)

    monkeypatch.setattr(kdcs, "probe", fake)
    conf = tmp_path / "krb5.conf"
    old = "[realms]\n    LAB.TEST = {\n        kdc = 10.0.0.1:88\n    }\n"
    new = "[realms]\n    LAB.TEST = {\n        kdc = 10.0.0.1:88\n        kdc = 10.0.0.3:750\n    }\n"
    conf.write_text(old)
    written: list[tuple[str, str | None]] = []
    watch = kdcs.watch_for("P@LAB.TEST", conf, 1, lambda realm, text: written.append((realm, text)))
    assert watch is not None

    def check() -> list[str]:
        asked.clear()
        with capture_logs() as logs:
            asyncio.run(watch.check())
        return [e["event"] for e in logs]

    assert (check(), asked) == (["kdcs_answer"], ["10.0.0.1:88"])
    conf.write_text(new[: new.index("10.0.0.3:750") + len("10.0.0.3:7")])
    assert (check(), asked, watch.none_answer) == ([], ["10.0.0.1:88"], False)
    assert written == [("LAB.TEST", None)]  # MIT's list left as it was
    conf.write_text(new)
    assert (check(), asked) == (["kdc_list_changed", "kdcs_answer"], ["10.0.0.1:88", "10.0.0.3:750"])


def test_a_stopped_watch_takes_its_section_out_of_the_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch that told MIT to ask only the KDCs that answer takes that section out when it stops (a reload's new
    delegator replaces it, or the gateway stops): the section, final (`}*`), stayed in the overlay over whatever
    krb5.conf a reload named, until a restart. A watch that wrote no section writes nothing when it stops."""
    section = kdcs.realm_section(KRB5_CONF, "LAB.TEST")
    assert section is not None

    async def one_silent(entry: str, principal: str, within: float) -> kdcs.KdcProbe:
        answered = entry != "10.0.0.1:88"
        return kdcs.KdcProbe(entry, answered, "KRB-ERROR" if answered else "silent", 1.0)

    monkeypatch.setattr(kdcs, "probe", one_silent)
    written: list[tuple[str, str | None]] = []
    watch = kdcs.KdcWatch(section, "HTTP/proxy.lab.test@LAB.TEST", 1, lambda realm, text: written.append((realm, text)))
    asyncio.run(watch.check())
    assert written[-1][1] is not None
    watch.stop()
    assert written[-1] == ("LAB.TEST", None)
    quiet = kdcs.KdcWatch(section, "HTTP/proxy.lab.test@LAB.TEST", 1, lambda realm, text: written.append((realm, text)))
    count = len(written)
    quiet.stop()
    assert len(written) == count


def test_a_watch_stopped_in_the_pass_it_is_woken_stops() -> None:
    """A watch stopped (a reload) in the same loop pass as a `check_soon` ends: it neither probes again nor writes
    its KDC list back into the overlay (Python 3.11's `wait_for` returned instead of raising the cancel)."""

    async def scenario() -> tuple[bool, int, list[tuple[str, str | None]]]:
        asked = 0

        async def kdc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal asked
            asked += 1
            await reader.readexactly(4)
            writer.write(struct.pack("!IB", 1, 0x7E))  # a KRB-ERROR's length and first byte: an answer
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(kdc, "127.0.0.1", 0)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: a KDC that is down
            port, dead = server.sockets[0].getsockname()[1], closed.getsockname()[1]
            kdc_lines = f"        kdc = 127.0.0.1:{port}\n        kdc = 127.0.0.1:{dead}\n"
            conf = f"[realms]\n    LAB.TEST = {{\n{kdc_lines}    }}\n"
            section = kdcs.realm_section(conf, "LAB.TEST")
            assert section is not None
            written: list[tuple[str, str | None]] = []
            watch = kdcs.KdcWatch(section, "HTTP/proxy.lab.test@LAB.TEST", 2, lambda r, t: written.append((r, t)))
            await watch.start()
            assert written[-1][1] is not None  # one answers, one is down: MIT was given the one that answers
            task = watch._task
            assert task is not None
            watch.check_soon()
            watch.stop()
            before = asked
            await asyncio.wait({task}, timeout=10)  # a deadline: it ends at once, or never did
            ended = task.done()
            if not ended:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        server.close()
        await server.wait_closed()
        return ended, asked - before, written

    ended, probes, written = asyncio.run(scenario())
    assert (ended, probes, written[-1]) == (True, 0, ("LAB.TEST", None))
