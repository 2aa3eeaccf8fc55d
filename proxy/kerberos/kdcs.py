"""Which of the realm's KDCs answer: asked by the gateway itself, and MIT told to ask those only.

Theory of operation. MIT krb5 (1.20, Debian 12's) sends a request to the realm's KDCs in krb5.conf's order and
waits for a KDC that accepts TCP and never answers: 10 s once the connection is established, then a UDP attempt
and back-off waits of 2, 4 and 8 s, about 25 s for one request (`k5_sendto` in src/lib/krb5/os/sendto_kdc.c;
strace shows `poll(..., 10000)`, then 1000, 2000, 4000, 8000). A delegation that needs two requests (the gateway's
own ticket, then S4U2Self) holds its thread about 50 s; with a second KDC listed after the silent one, each request
waits 10 s before the second is asked, so S4U2Self and S4U2Proxy take 20 s and every new user gets 503 at
`kerberos.kdc_timeout` although a KDC answers. No krb5.conf setting bounds this before MIT 1.22
(`request_timeout`), and a thread inside MIT cannot be stopped from Python.

So the gateway asks the KDCs of its own realm (its principal's) itself, off MIT's path: at start (before it
listens), at once after an exchange hit `kdc_timeout`, and every `PROBE_EVERY` seconds while a KDC is silent (none
while all answer: no steady traffic), each KDC krb5.conf lists gets an AS-REQ for the gateway's principal over
TCP, with `probe_timeout` to answer. Any Kerberos answer counts (an error such as
PREAUTH_REQUIRED included); no answer, a refused or reset connection do not. The answer is evidence
(`KdcProbe`). Then:

- the KDCs that answered are MIT's list: the gateway's krb5.conf overlay (`proxy.kerberos.profile`) gets the
  realm's section with only those `kdc` lines, in krb5.conf's order, the section's other lines kept, and the
  final mark (`}*`) so that krb5.conf's own list is not appended. MIT rereads the overlay when it changes (at
  most a second later). A new user's exchange then goes to a KDC that answers, without the 10 s wait;
- when none answered, exchanges are refused at once (`KdcUnavailable`, 503 with Retry-After), before any thread
  is taken, until a probe finds one again: MIT's list is left as krb5.conf has it meanwhile;
- users whose service tickets are cached are served from the cache throughout: that path asks no KDC.

krb5.conf is read again before each probe: a KDC replaced in it (a domain controller retired, its successor named)
is what the next probe asks (`kdc_list_changed`), within `PROBE_EVERY` seconds while one is silent or none answers,
without a restart (a reload keeps the delegator, and with it this watch, when [kerberos] is unchanged). A krb5.conf
the watch can no longer follow, two looks in a row, hands the realm back to MIT (`kdc_watch_off`). A file that ends
inside the realm's section is one of those: written in place and read half-way, its last `kdc` value may be cut
(`10.0.0.3:7`), and taken, that address was probed and MIT pinned to what else answered until the next look.

Not bounded: an exchange already inside MIT's wait when its KDC fell silent stays there (25 s a request; 10 s
when another KDC follows). What is read from krb5.conf: `kdc` lines of the form host, host:port, [v6]:port,
optionally `tcp/`-prefixed; a realm whose KDCs are found otherwise (DNS SRV records, `https://` KDC proxies,
`udp/` entries), a krb5.conf that reads other files (`include`, `includedir`, `module`: one of them may name
more KDCs of the realm, which MIT merges into its list), or a realm named in more than one of KRB5_CONFIG's files
(merged likewise), is not watched and MIT's behaviour stands (the log says
so at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from proxy.kerberos import krb5conf

log = structlog.get_logger("proxy.kerberos")

PROBE_EVERY = 5.0  # seconds between two probes of the realm's KDCs while one of them is silent
KDC_PORT = 88
_AS_REP, _KRB_ERROR = 0x6B, 0x7E  # [APPLICATION 11], [APPLICATION 30]: what a KDC answers an AS-REQ with


@dataclass(frozen=True)
class KdcProbe:
    """What one KDC did with the gateway's AS-REQ: answered (any Kerberos message), or not, and why."""

    address: str  # as krb5.conf writes it
    answered: bool
    detail: str  # "KRB-ERROR", "AS-REP", "no answer within 2.5 s", "connection refused" ...
    ms: float


@dataclass(frozen=True)
class RealmSection:
    """A realm's section of krb5.conf: its KDCs, and its other lines as written."""

    realm: str
    kdcs: tuple[str, ...]
    other_lines: tuple[str, ...]


_NESTED = (krb5conf.Kind.OPEN, krb5conf.Kind.BRACE, krb5conf.Kind.CLOSE)  # a nested subsection's braces, kept


def realm_section(text: str, realm: str) -> RealmSection | None:
    """The `[realms]` section of `realm` in krb5.conf `text`, if it has one (every time it is named, as MIT merges
    them); `krb5conf.ProfileSyntaxError` where MIT would not read `text`."""
    return _realm_section(krb5conf.read(text), realm)


def _realm_section(read: tuple[krb5conf.Line, ...], realm: str) -> RealmSection | None:
    """`realm_section` of a krb5.conf already read (`krb5conf.read`)."""
    lines = list(krb5conf.subsection_lines(read, "realms", realm))
    if not lines:
        return None
    kdcs, other = [], []
    for line in lines:
        if len(line.path) == 2 and line.kind is krb5conf.Kind.RELATION and line.name == "kdc":
            kdcs.append(line.value)
        elif line.kind is krb5conf.Kind.RELATION or (len(line.path) > 2 and line.kind in _NESTED):
            other.append(line.raw.strip())  # not the realm's own braces, comments, nor directives
    return RealmSection(realm, tuple(kdcs), tuple(other))


def _ends_inside(read: tuple[krb5conf.Line, ...], realm: str) -> bool:
    """Whether krb5.conf ends inside `realm`'s section: a file being written in place and read half-way, whose last
    `kdc` value may be cut (`10.0.0.3:7` of `10.0.0.3:750`). MIT closes the section at the end of the file and reads
    what is there; the watch does not take it (`KdcWatch._follow` looks once more, then lets MIT decide)."""
    if not read:
        return False
    last = read[-1]
    inside = last.path[:-1] if last.kind is krb5conf.Kind.CLOSE else last.path
    return inside[:2] == ("realms", realm)


def kdc_address(entry: str) -> tuple[str, int] | None:
    """Host and port of a krb5.conf `kdc` entry; None for a form the watch does not probe (udp/, https://)."""
    entry = entry.removeprefix("tcp/")
    if "/" in entry:
        return None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
    if not host or (port and not port.isdigit()):
        return None
    return host, int(port) if port else KDC_PORT


def overlay_section(section: RealmSection, answering: Sequence[str]) -> str:
    """The realm's section for the overlay: the KDCs that answer, its other lines, and the final mark."""
    body = [f"        {krb5conf.relation('kdc', kdc)}" for kdc in answering]
    body += [f"        {line}" for line in section.other_lines]
    return "\n".join([f"    {section.realm} = {{", *body, "    }*"]) + "\n"


# -- the question: an AS-REQ (RFC 4120 5.4.1), DER by hand: eight fields, no library needed for so little ----------


def _tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big"))


def _string(text: str) -> bytes:
    return _tlv(0x1B, text.encode("utf-8"))  # KerberosString: GeneralString


def _principal(name_type: int, components: Sequence[str]) -> bytes:
    return _tlv(0x30, _tlv(0xA0, _int(name_type)) + _tlv(0xA1, _tlv(0x30, b"".join(map(_string, components)))))


def as_req(principal: str, nonce: int) -> bytes:
    """An AS-REQ from `principal` (name@REALM) for its realm's TGT, without pre-authentication: every KDC answers
    it (PREAUTH_REQUIRED, or an AS-REP only the principal's key opens), and nothing in it is secret."""
    name, _, realm = principal.rpartition("@")
    body = b"".join(
        [
            _tlv(0xA0, _tlv(0x03, b"\x00\x00\x00\x00\x00")),  # kdc-options: none
            _tlv(0xA1, _principal(1, name.split("/"))),  # cname, NT-PRINCIPAL
            _tlv(0xA2, _string(realm)),
            _tlv(0xA3, _principal(2, ["krbtgt", realm])),  # sname, NT-SRV-INST
            _tlv(0xA5, _tlv(0x18, b"20370101000000Z")),  # till
            _tlv(0xA7, _int(nonce)),
            _tlv(0xA8, _tlv(0x30, _int(18) + _int(17))),  # aes256-cts, aes128-cts
        ]
    )
    request = _tlv(0x6A, _tlv(0x30, _tlv(0xA1, _int(5)) + _tlv(0xA2, _int(10)) + _tlv(0xA4, _tlv(0x30, body))))
    return struct.pack("!I", len(request)) + request


async def probe(entry: str, principal: str, within: float) -> KdcProbe:
    """Ask the KDC at krb5.conf's `entry` (over TCP) the AS-REQ, and wait at most `within` seconds for its answer."""
    start = time.perf_counter()

    def result(answered: bool, detail: str) -> KdcProbe:
        return KdcProbe(entry, answered, detail, round((time.perf_counter() - start) * 1000, 1))

    address = kdc_address(entry)
    if address is None:
        return result(False, "not a host:port the gateway can ask")
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(as_req(principal, secrets.randbits(31)))
            await writer.drain()
            head = await reader.readexactly(5)  # the answer's length, and its first byte: its type
    except TimeoutError:
        return result(False, f"no answer within {within:g} s")
    except asyncio.IncompleteReadError:
        return result(False, "the connection ended without an answer")
    except OSError as e:
        return result(False, e.strerror or type(e).__name__)
    finally:
        if writer is not None:
            writer.close()
    kind = {_AS_REP: "AS-REP", _KRB_ERROR: "KRB-ERROR"}.get(head[4])
    return result(kind is not None, kind or f"not a Kerberos answer (first byte {head[4]:#04x})")


class KdcWatch:
    """Probes the realm's KDCs (`probe`), and has MIT ask only those that answer (module docstring)."""

    def __init__(
        self,
        section: RealmSection,
        principal: str,
        probe_timeout: float,
        write_section: Callable[[str, str | None], None],
        reread: Callable[[], RealmSection | str] | None = None,
    ) -> None:
        self.section = section
        self._reread = reread  # the realm's section as krb5.conf has it now, or why it cannot be watched any more
        self._doubt: str | None = (
            None  # why the last look could not follow krb5.conf (given up if the next says so too)
        )
        self._principal = principal
        self._timeout = probe_timeout
        self._write_section = write_section  # (realm, section text or None for krb5.conf's own): the overlay's
        self._wrote = False  # the overlay holds a section of this watch's (`stop` takes it out)
        self.answering: tuple[str, ...] = section.kdcs  # until the first probe says otherwise
        self.last: tuple[KdcProbe, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._first = asyncio.Event()

    @property
    def none_answer(self) -> bool:
        """No KDC answered the last probe (exchanges are refused at once meanwhile)."""
        return bool(self.last) and not self.answering

    async def start(self) -> None:
        """The first probe (before the gateway listens), then the watch in the background."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
            await self._first.wait()

    def check_soon(self) -> None:
        """Probe now rather than at the next interval (an exchange hit kdc_timeout)."""
        self._wake.set()

    async def check(self) -> tuple[KdcProbe, ...]:
        """Probe every KDC krb5.conf lists now at once; tell MIT which answer if that changed."""
        self._follow()
        if not self.section.kdcs:  # no longer watched: MIT asks krb5.conf's KDCs itself
            return ()
        probes = tuple(await asyncio.gather(*(probe(kdc, self._principal, self._timeout) for kdc in self.section.kdcs)))
        answering = tuple(p.address for p in probes if p.answered)
        changed = answering != self.answering or not self.last
        self.last = probes
        if changed:
            self.answering = answering
            silent = [{"kdc": p.address, "reason": p.detail} for p in probes if not p.answered]
            realm = self.section.realm
            if not silent:
                self._write(realm, None)
                log.info("kdcs_answer", realm=realm, kdcs=list(answering))
            elif answering:
                self._write(realm, overlay_section(self.section, answering))
                log.warning(
                    "kdc_silent",
                    realm=realm,
                    silent=silent,
                    asked=list(answering),
                    detail="MIT is told to ask only the KDCs that answered, until the silent ones answer again",
                )
            else:
                self._write(realm, None)
                log.error(
                    "kdcs_silent",
                    realm=realm,
                    silent=silent,
                    detail="no KDC answers: new users' exchanges are refused at once (503) until one does; "
                    "users with cached tickets are still served",
                )
        return probes

    def _follow(self) -> None:
        """Take krb5.conf's section of the realm as it is now: an operator who replaced a KDC there (MIT reads the
        edit) would otherwise see the start's list probed, pinned in the overlay or all new users refused, until a
        restart. A krb5.conf the watch can no longer follow leaves MIT's reading of it: every KDC counts as answering
        and the overlay's section goes (`kdc_watch_off`)."""
        if self._reread is None:
            return
        now = self._reread()
        if isinstance(now, str) and now != self._doubt:  # once more first: a file written in place may be half-read
            self._doubt = now
            return
        self._doubt = None
        if isinstance(now, str):
            log.info("kdc_watch_off", realm=self.section.realm, reason=now)
            self._reread = None
            self.section = RealmSection(self.section.realm, (), ())
            self.last = ()
            self.answering = ()
            self._write(self.section.realm, None)
        elif now != self.section:
            log.info("kdc_list_changed", realm=now.realm, kdcs=list(now.kdcs), before=list(self.section.kdcs))
            self.section = now
            self.last = ()  # the next probe's answer is news, whatever it is

    async def _run(self) -> None:
        """Probe at start; then after each `check_soon`, and every `PROBE_EVERY` seconds while a KDC is silent (no
        steady traffic to KDCs that answer: a silent one is noticed by the exchange that waited for it). A `stop` always
        ends it: `asyncio.timeout`, not Python 3.11's `wait_for`, which returns instead of raising when the cancel comes
        in the same loop pass as a `check_soon` (the stopped watch went on probing and writing its KDC list)."""
        while True:
            try:
                await self.check()
            except Exception as e:  # noqa: BLE001  never let the watch die: MIT's own behaviour is the fallback
                log.warning("kdc_probe_failed", realm=self.section.realm, reason=f"{type(e).__name__}: {e}")
            self._first.set()
            self._wake.clear()
            if len(self.answering) == len(self.section.kdcs):
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PROBE_EVERY):
                        await self._wake.wait()

    def _write(self, realm: str, section: str | None) -> None:
        self._write_section(realm, section)
        self._wrote = section is not None

    def stop(self) -> None:
        """Stop probing, and take this watch's section out of the overlay (krb5.conf's own list stands): a watch a
        reload replaced, or one whose successor is off (`kdc_watch_off`), left its KDC list in force, final, over the
        krb5.conf the reload named, until a restart."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._wrote:
            with contextlib.suppress(OSError):  # the overlay cannot be written: MIT keeps the last one it read
                self._write(self.section.realm, None)


def krb5_files(krb5_config: Path | None) -> list[Path]:
    """The krb5.conf files MIT reads for the gateway, the overlay aside: `kerberos.krb5_config`, else KRB5_CONFIG's,
    else MIT's default."""
    if krb5_config is not None:
        return [krb5_config]
    value = os.environ.get("KRB5_CONFIG") or "/etc/krb5.conf"
    return [Path(p) for p in value.split(":") if p and "kcd-proxy-krb5-" not in Path(p).name]


def watch_for(
    principal: str, krb5_config: Path | None, probe_timeout: float, write_section: Callable[[str, str | None], None]
) -> KdcWatch | None:
    """The watch of the gateway's realm (its principal's), or None when krb5.conf does not list its KDCs in a form
    the gateway can ask, or not all in one place it reads (logged). The watch reads the realm's section again before
    each probe, so an edited krb5.conf's list is the one it asks."""
    realm = principal.rpartition("@")[2]
    section = watched_section(realm, krb5_config)
    if isinstance(section, str):
        log.info("kdc_watch_off", realm=realm, reason=section)
        return None
    return KdcWatch(section, principal, probe_timeout, write_section, lambda: watched_section(realm, krb5_config))


def watched_section(realm: str, krb5_config: Path | None) -> RealmSection | str:
    """`realm`'s section as the files MIT reads for the gateway have it, or why the watch cannot follow it."""
    found: list[tuple[Path, RealmSection]] = []
    for path in krb5_files(krb5_config):
        try:
            read = krb5conf.read(path.read_bytes().decode(errors="replace"))
        except OSError:
            continue
        except krb5conf.ProfileSyntaxError as e:
            return f"{path}: {e.reason} (line {e.number}); MIT refuses it too"
        directives = [line for line in read if line.kind is krb5conf.Kind.DIRECTIVE]
        if directives:  # an included file may name the realm's KDCs too: MIT merges them, the watch would not see them
            named = ", ".join(line.raw.strip() for line in directives)
            return f"{path} reads other files ({named}): MIT asks their KDCs too"
        section = _realm_section(read, realm)
        if section is not None and _ends_inside(read, realm):
            return f"{path} ends inside the realm's section (its `}}` not written yet?): its kdc list may be cut short"
        if section is not None:
            found.append((path, section))
    if len(found) > 1:  # MIT merges the realm's lines across KRB5_CONFIG's files; the overlay's `}*` would hide all
        return f"the realm is named in several files ({', '.join(str(path) for path, _ in found)}): MIT merges them"
    if not found or not found[0][1].kdcs:
        return "krb5.conf lists no kdc for the realm (DNS or another file)"
    unusable = [kdc for kdc in found[0][1].kdcs if kdc_address(kdc) is None]
    if unusable:
        return f"kdc entries the gateway cannot ask: {unusable}"
    return found[0][1]
