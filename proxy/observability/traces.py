"""Recent requests, stage by stage: the trace records behind `GET /traces`, the page and `kcd-proxy trace`.

Theory of operation. Every request already has a `Trace` (`proxy.observability.trace`): the middleware
creates it, each stage times itself into it and notes its facts. When the request ends, the middleware
hands the trace to the `TraceRing`, which keeps the last `[traces] keep` of them (a bounded deque: the
oldest falls out) and, with `[traces] export` set, appends each as one JSON line to that file. A trace is
turned into its JSON record when it is first read (or exported), not on the request path: a request pays
for one append.

A record is the request's story in the issue's words: `id`, `time`, `upn`, `principal`, `status`, `ms`,
and `stages`, in the order they ran, each `{"name", "ms", ...facts}`:

- `tls`: protocol version, cipher, whether the session was resumed;
- `certificate`: the leaf's subject, issuer and serial, and the verified chain (subject, serial, issuer,
  validity of each certificate, leaf first), the restriction rule that admitted it;
- `revocation`: good / unknown, where the answer came from (CRL file or URL, OCSP responder) and how old
  that CRL was (seconds since its thisUpdate);
- `identity`: the rule that matched (`san-upn`, `san-email`, `subject-cn`), the UPN and the principal,
  and the authentication mode's factors (its milliseconds are counted here);
- `s4u2self`: the evidence ticket (client, server, flags with `forwardable` named, enctype, start and end)
  and `cached`; `s4u2proxy`: the service ticket (the same fields, the SPN) and `cached`. The gateway
  times the two KDC exchanges separately, and each step's `ms` is its exchange's own: the Kerberos stage's other
  work (the hand-off to a KDC thread, reading the evidence ticket's PAC) is in neither, so the two may add up to
  less than the stage (before, S4U2Proxy's was the stage less S4U2Self's, that work included). On a cache hit
  nothing went to the KDC, S4U2Self took no time and S4U2Proxy's time is building the token from the cached
  ticket. When the exchange first had to get the gateway's own TGT (an AS exchange with its keytab: the first
  request after a start, or once the TGT is near its end), S4U2Self's time includes it and `gateway_tgt_ms` says
  how much: three KDC exchanges, as the KDC logs. Requests after a Basic sign-in have one `kerberos` stage
  instead (the user's own ticket, no S4U). A connection-bound route's ticket asked for again once a slow backend
  connection was open (`proxy.pipeline.delegated`) adds a second `s4u2self` and `s4u2proxy`, with `again: true`;
- `backend`: the status, time to the answer's headers, whether the pooled connection was reused.

A refused request's stages stop at the one that refused, which carries `refused: true`, the `reason` the
client saw and the `fix` (`proxy.kerberos.hints` for Kerberos: cause and fix in plain words); `refused`
at the top names the stage. A Kerberos refusal lands on the step that failed (`s4u2self` or `s4u2proxy`),
and the evidence ticket's facts are shown when S4U2Self had succeeded: that is where "not forwardable"
shows.

Never in a record: a token, a key, a password, a ticket. The ring holds the trace's facts and the frozen
evidence objects the stages returned (chain, CRL answer, ticket facts), not the request or any error.
With several workers each keeps its own ring, and the admin listener asks every worker's
(`proxy.observability.siblings`); the export file is shared (one `write` per line, appended), created 0600.
An export that fails (a full disk, a file made unwritable) never fails the request: each failure is counted
(`kcd_trace_export_errors_total`), the first of a streak logged (`trace_export_failed`), and the next trace opens the
file again.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import structlog
from cryptography import x509

from proxy.config import Traces
from proxy.identity.mapping import describe as mapping_words
from proxy.kerberos.ccache import S4UFacts
from proxy.observability.trace import Trace
from proxy.printable import printable

log = structlog.get_logger("proxy.traces")

STAGES = ("tls", "certificate", "revocation", "identity", "mapping", "s4u2self", "s4u2proxy", "backend")


@dataclass(frozen=True)
class Cursor:
    """Where a page of `/traces?before=<id>` starts: after trace `id`. In one ring, after its place there; over
    several workers' rings, after its place in their merged order, newest first by (`time`, `worker`) and, within
    one worker's records of one millisecond, that ring's order (`proxy.observability.siblings.merge_traces`)."""

    id: str
    time: str | None = None  # the trace's record's `time`, and the worker holding it: a merged view's cursor
    worker: int = 0

    def follows(self, time: str, worker: int, after_id_in_ring: bool) -> bool:
        """Whether a record of `worker` at `time` comes after this cursor in the merged order (`after_id_in_ring`:
        that worker's ring lists it after the cursor's trace, which decides a tie)."""
        assert self.time is not None
        mine, theirs = (time, worker), (self.time, self.worker)
        return mine < theirs or (mine == theirs and after_id_in_ring)


# Where a refusal's stage (`GatewayError.stage`) shows in the record's stages.
_REFUSAL_STAGE = {"authentication": "identity", "restrictions": "certificate"}


@dataclass
class _Entry:
    trace: Trace
    status: int
    total_ms: float
    record: dict[str, Any] | None = None  # rendered on first read


@dataclass
class TraceRing:
    """The last `keep` requests' traces, newest last; rendered to records when read."""

    keep: int = 200
    _entries: deque[_Entry] = field(default_factory=deque, repr=False)
    _export_path: Path | None = field(default=None, repr=False)
    _export: IO[str] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    export_errors: int = 0  # traces whose export failed (`kcd_trace_export_errors_total`)
    _export_failing: bool = field(default=False, repr=False)  # the last export failed: `trace_export_failed` logged

    def record(self, trace: Trace, status: int, settings: Traces | None = None) -> None:
        """The request of `trace` ended with `status`: keep it (and export it, when configured)."""
        total = round((time.perf_counter() - trace.started) * 1e6) / 1e3
        entry = _Entry(trace, status, total)
        if settings is not None and settings.keep != self.keep:
            self.keep = settings.keep
        self._entries.append(entry)
        while len(self._entries) > self.keep:
            self._entries.popleft()
        export = settings.export if settings is not None else None
        if export is not None:
            self._write(export, self._render(entry))

    def recent(
        self, limit: int, user: str | None = None, before: Cursor | None = None, worker: int = 0
    ) -> list[dict[str, Any]]:
        """Up to `limit` records, newest first; with `user`, only that UPN's or principal's; with `before`, only those
        listed after that trace (this ring's order, or, for a cursor with a `time`, the merged order of every
        worker's records, where this ring is worker number `worker`)."""
        wanted = user.lower() if user else None
        out: list[dict[str, Any]] = []
        passed = before is None
        for entry in reversed(self._entries):
            if len(out) >= limit:
                break
            if before is not None:
                if entry.trace.id == before.id:
                    passed = True
                    continue
                if before.time is None:
                    if not passed:
                        continue
                elif not before.follows(str(self._render(entry).get("time", "")), worker, passed):
                    continue
            if wanted is not None:
                facts = entry.trace.facts
                names = {str(facts.get("upn", "")).lower(), str(facts.get("principal", "")).lower()}
                if wanted not in names:
                    continue
            out.append(self._render(entry))
        return out

    def get(self, trace_id: str) -> dict[str, Any] | None:
        for entry in reversed(self._entries):
            if entry.trace.id == trace_id:
                return self._render(entry)
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            if self._export is not None:
                self._export.close()
                self._export = None

    def _render(self, entry: _Entry) -> dict[str, Any]:
        if entry.record is None:
            entry.record = build_record(entry.trace, entry.status, entry.total_ms)
        return entry.record

    def _write(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                if self._export is None or self._export_path != path:
                    if self._export is not None:
                        self._export.close()
                    self._export = _open_export(path)
                    self._export_path = path
                self._export.write(line)
            except OSError as e:  # a full disk must not fail requests: counted (/metrics), logged once per streak
                self.export_errors += 1
                if self._export is not None:  # its unwritten line is dropped with it; the next one opens it again
                    with contextlib.suppress(OSError):
                        self._export.close()
                    self._export = None
                if not self._export_failing:
                    log.warning(
                        "trace_export_failed",
                        path=str(path),
                        error=f"{type(e).__name__}: {e.strerror or e}"[:200],
                        fix="free space on its file system or make the file writable for the gateway; until then "
                        "traces are not exported (kcd_trace_export_errors_total counts them), requests are served",
                    )
                self._export_failing = True
            else:
                self._export_failing = False


def _open_export(path: Path) -> IO[str]:
    """The export file for appending, line-buffered (one write a line). Created 0600 whatever the umask: its lines
    name users, their addresses and paths (a launcher other than the shipped unit leaves 022, so 0644). A file
    already there keeps its mode (an operator may have given a log shipper's group read access)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


# -- one trace to its record ----------------------------------------------------------------------------------


def build_record(trace: Trace, status: int, total_ms: float) -> dict[str, Any]:
    """The JSON record of a finished request's trace (pure: reads the trace, adds nothing secret)."""
    f = trace.facts
    refused_stage = f.get("refused_stage")
    stages: list[dict[str, Any]] = []
    for name, ms in trace.ms.items():
        if name == "authentication":
            _fold_authentication(stages, trace, ms)
        elif name == "kerberos":
            again = trace.details.get("kerberos_again")
            if again is None:
                stages.extend(_kerberos_stages(trace.details.get("kerberos", {}), trace, ms))
            else:  # the ticket asked for again once a slow backend connection was open (`proxy.pipeline.delegated`)
                again_ms = float(again.get("ms", 0.0))
                stages.extend(_kerberos_stages(trace.details.get("kerberos", {}), trace, round(ms - again_ms, 3)))
                stages.extend({**s, "again": True} for s in _kerberos_stages(again, trace, again_ms))
        else:
            stages.append({"name": name, "ms": ms, **_STAGE_FACTS.get(name, _no_facts)(trace)})
    refused = None
    if refused_stage is not None:
        fix = trace.details.get("refused", {}).get("fix")
        where = _mark_refusal(stages, str(refused_stage), f.get("reason"), fix)
        refused = {"stage": where, "reason": f.get("reason"), "fix": fix, "event": f.get("refusal")}
    return {
        "id": trace.id,
        "time": _iso(datetime.fromtimestamp(trace.wall, UTC)),
        "method": f.get("method"),
        "path": f.get("path"),
        "client": f.get("client"),
        "upn": f.get("upn"),
        "principal": f.get("principal"),
        "route": f.get("route"),
        "spn": f.get("spn"),
        "upstream": f.get("upstream"),
        "status": status,
        "ms": total_ms,
        "refused": refused,
        "stages": stages,
    }


def _no_facts(_trace: Trace) -> dict[str, Any]:
    return {}


def _tls(trace: Trace) -> dict[str, Any]:
    f = trace.facts
    return {"version": f.get("tls_version"), "cipher": f.get("tls_cipher"), "resumed": f.get("tls_resumed")}


def _certificate(trace: Trace) -> dict[str, Any]:
    f = trace.facts
    out: dict[str, Any] = {
        "subject": f.get("cert_subject"),
        "issuer": f.get("cert_issuer"),
        "serial": f.get("cert_serial"),
    }
    if "restriction" in f:
        out["restriction"] = f["restriction"]
    verified = trace.details.get("certificate", {}).get("verified")
    chain = getattr(verified, "chain", None)
    if chain:
        out["chain"] = [_certificate_facts(c) for c in chain]
    return out


def _certificate_facts(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
    }


def _revocation(trace: Trace) -> dict[str, Any]:
    f = trace.facts
    out: dict[str, Any] = {"status": f.get("revocation"), "source": f.get("revocation_source")}
    detail = trace.details.get("revocation", {})
    evidence, at = detail.get("evidence"), detail.get("at")
    this_update = getattr(evidence, "crl_this_update", None)
    if isinstance(this_update, datetime):
        out["crl_this_update"] = _iso(this_update)
        if isinstance(at, datetime):
            out["age_s"] = round((at - this_update).total_seconds(), 1)
    next_update = getattr(evidence, "crl_next_update", None)
    if isinstance(next_update, datetime):
        out["crl_next_update"] = _iso(next_update)
    if getattr(evidence, "detail", None):
        out["detail"] = evidence.detail  # type: ignore[union-attr]
    return out


def _identity(trace: Trace) -> dict[str, Any]:
    f = trace.facts
    return {"rule": f.get("identity_source"), "upn": f.get("upn"), "principal": f.get("principal")}


def _mapping(trace: Trace) -> dict[str, Any]:
    """The mapping stage: the directory account, and the rule that tied the certificate to it (or why not)."""
    f = trace.facts
    out: dict[str, Any] = {"account": f.get("account_dn"), "sid": f.get("account_sid")}
    if "mapping" in f:
        out.update(rule=f["mapping"], mode=f.get("mapping_mode"), detail=f.get("mapping_detail"))
        out["weak"] = bool(f.get("mapping_weak"))
    return out


def _backend(trace: Trace) -> dict[str, Any]:
    f = trace.facts
    return {
        "status": f.get("backend_status"),
        "headers_ms": f.get("backend_ms"),
        "upstream": f.get("upstream"),
        "reused": trace.details.get("backend", {}).get("reused"),
    }


_STAGE_FACTS = {
    "tls": _tls,
    "certificate": _certificate,
    "revocation": _revocation,
    "identity": _identity,
    "mapping": _mapping,
    "backend": _backend,
}


def _fold_authentication(stages: list[dict[str, Any]], trace: Trace, ms: float) -> None:
    """The authentication mode's decision belongs to the identity stage (with Basic alone, it is all of it)."""
    f = trace.facts
    identity = next((s for s in stages if s["name"] == "identity"), None)
    if identity is None:
        identity = {"name": "identity", "ms": 0.0, **_identity(trace)}
        if "basic_user" in f:
            identity["rule"] = "basic"
        stages.append(identity)
    identity["ms"] = round(identity["ms"] + ms, 3)
    if "factors" in f:
        identity["factors"] = f["factors"]
    if "basic_user" in f:
        identity["basic_cached"] = f.get("basic_cached")


def _kerberos_stages(detail: dict[str, Any], trace: Trace, ms: float) -> list[dict[str, Any]]:
    """The Kerberos stage (its trace `detail`), shown as its two KDC exchanges: S4U2Self, then S4U2Proxy."""
    if detail.get("own_ticket"):
        return [{"name": "kerberos", "ms": ms, "ticket": "the user's own (Basic credentials checked at the KDC)"}]
    facts: S4UFacts | None = detail.get("facts")
    cached = bool(detail.get("cached", False))
    spn = trace.facts.get("spn")
    if facts is None:
        # The exchange failed before it said which step (a KDC that did not answer in time), or no facts.
        return [{"name": "s4u2self", "ms": ms, "cached": False, "note": "the exchange's steps are not known"}]
    tgt_ms = None if cached else facts.gateway_tgt_ms
    if cached:
        self_ms, proxy_ms = 0.0, ms
    else:
        self_ms = round(min(facts.s4u2self_ms + (tgt_ms or 0.0), ms), 3)  # the gateway's TGT came first
        rest = max(ms - self_ms, 0.0)  # the stage's time after S4U2Self: a thread's hand-off and the PAC included
        # the exchange as measured; the rest where S4U2Proxy failed (not measured), and never beyond the stage (a
        # request that joined another's exchange waited for part of it only)
        proxy_ms = round(rest if facts.s4u2proxy_ms is None else min(facts.s4u2proxy_ms, rest), 3)
    evidence = {"name": "s4u2self", "ms": self_ms, "cached": cached, **facts.ticket_json("evidence")}
    if tgt_ms is not None:
        evidence["gateway_tgt_ms"] = round(tgt_ms, 3)
    if facts.failed_step == "s4u2self":
        evidence["ms"] = ms
        return [evidence]
    service = {"name": "s4u2proxy", "ms": proxy_ms, "cached": cached, "spn": spn, **facts.ticket_json("service")}
    return [evidence, service]


def _mark_refusal(stages: list[dict[str, Any]], stage: str, reason: Any, fix: Any) -> str:
    """Mark the stage that refused (the last of its kind), and return its name in the record."""
    name = _REFUSAL_STAGE.get(stage, stage)
    if name == "kerberos":
        kerberos = [s for s in stages if s["name"] in ("s4u2self", "s4u2proxy", "kerberos")]
        target = kerberos[-1] if kerberos else None
    else:
        target = next((s for s in reversed(stages) if s["name"] == name), None)
    if target is None:
        return name  # refused outside the stages (route, request): the record's `refused` says so
    target.update(refused=True, reason=reason, fix=fix)
    return str(target["name"])


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- one line per stage, for the terminal and the page --------------------------------------------------------


def describe(stage: dict[str, Any]) -> str:
    """A stage's facts in one line of plain words."""
    name = stage.get("name")
    text = _DESCRIBE.get(str(name), _describe_other)(stage)
    if stage.get("refused"):
        text = f"REFUSED: {stage.get('reason')}" + (f" — {text}" if text else "")
    return text


def _describe_tls(s: dict[str, Any]) -> str:
    if not s.get("version"):
        return "plain connection"
    return f"{s['version']} {s.get('cipher') or ''}, {'resumed session' if s.get('resumed') else 'full handshake'}"


def _describe_certificate(s: dict[str, Any]) -> str:
    chain = s.get("chain") or []
    text = f"{s.get('subject')} serial {s.get('serial')}"
    if chain:
        text += f", chain of {len(chain)} to {chain[-1]['subject']}"
    return text


def _describe_revocation(s: dict[str, Any]) -> str:
    if s.get("status") is None or s.get("refused"):  # refused: the reason says it all (its verdict has no source)
        return ""
    text = f"{s.get('status')} from {s.get('source') or 'no source'}"
    if s.get("age_s") is not None:
        text += f" (CRL {s['age_s']:g} s old)"
    return text


def _describe_identity(s: dict[str, Any]) -> str:
    if s.get("upn") is None:  # refused before a name was read (none in the certificate, two of them...)
        return ""
    return f"{s.get('rule')}: {s.get('upn')} -> {s.get('principal')}"


def _describe_mapping(s: dict[str, Any]) -> str:
    """The decision in `explain`'s words (`proxy.identity.mapping.describe`), and what matched or why it is weak."""
    text = mapping_words(s.get("rule"), s.get("account"), s.get("sid"))
    return f"{text}; {s['detail']}" if s.get("detail") else text


def _describe_ticket(s: dict[str, Any]) -> str:
    what = "evidence ticket" if s.get("name") == "s4u2self" else "service ticket"
    if s.get("again"):  # the ticket asked for again once a slow backend connection was open
        what = f"again, once the backend connection was open: {what}"
    if "client" not in s:
        facts = s.get("facts") or s.get("note") or "no facts"
        return f"{what}: {facts}" + (", from the cache" if s.get("cached") else "")
    forwardable = "forwardable" if s.get("forwardable") else "NOT forwardable"
    source = "from the cache" if s.get("cached") else "from the KDC"
    pac = s.get("pac")
    if isinstance(pac, dict):
        source += f", PAC {pac.get('size')} bytes" + (f" (SID {pac['sid']})" if pac.get("sid") else "")
    elif pac == "none":
        source += ", no PAC"
    if s.get("gateway_tgt_ms") is not None:
        source += f", after the gateway's own TGT (an AS exchange with its keytab, {s['gateway_tgt_ms']:g} ms)"
    return (
        f"{what} {s['client']} -> {s.get('server')}, {forwardable}, {s.get('enctype')}, until {s.get('end')}, {source}"
    )


def _describe_backend(s: dict[str, Any]) -> str:
    reused = {True: "reused connection", False: "new connection", None: "connection unknown"}[s.get("reused")]
    status = s.get("status")
    return f"{status if status is not None else 'no answer'} from {s.get('upstream')}, {reused}"


def _describe_other(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("name", "ms", "refused", "reason", "fix"))


_DESCRIBE = {
    "tls": _describe_tls,
    "certificate": _describe_certificate,
    "revocation": _describe_revocation,
    "identity": _describe_identity,
    "mapping": _describe_mapping,
    "s4u2self": _describe_ticket,
    "s4u2proxy": _describe_ticket,
    "backend": _describe_backend,
}


def render_text(records: Iterable[dict[str, Any]]) -> str:
    """Records as the terminal shows them: a heading line each, then one line per stage. What a client sent
    (its path, its certificate's names) is in them: every line goes through `printable`."""
    lines = []
    for r in records:
        who = r.get("upn") or "-"
        principal = f" ({r['principal']})" if r.get("principal") else ""
        lines.append(
            f"{r.get('time')} {r.get('id')} {r.get('method')} {r.get('path')} {who}{principal} "
            f"-> {r.get('status')} in {r.get('ms')} ms"
        )
        for s in r.get("stages", []):
            lines.append(f"  {s.get('name', '?'):<12} {s.get('ms', 0):>9.3f} ms  {describe(s)}")
            if s.get("refused") and s.get("fix"):
                lines.append(f"  {'':<12} {'':>12}  fix: {s['fix']}")
        if r.get("refused") and r["refused"].get("stage") not in {s.get("name") for s in r.get("stages", [])}:
            lines.append(f"  refused at {r['refused']['stage']}: {r['refused'].get('reason')}")
    return "\n".join(printable(line) for line in lines)
