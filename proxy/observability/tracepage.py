"""The admin listener's trace views: `/traces` (JSON), `/` (recent requests) and `/trace/<id>` (one, drawn).

Theory of operation. Everything here reads the `TraceRing` records (`proxy.observability.traces`) and
nothing else. `/traces?limit=N[&user=UPN][&before=<id>]` is the JSON list, newest first, at most MAX_TRACES
records an answer (a bigger `limit` gets MAX_TRACES), `before` paging on after that trace; `/traces/<id>` one record.
`/` is an HTML table of the recent requests; `/trace/<id>` draws one request as a sequence diagram between
four lifelines (device, gateway, KDC, backend): the TLS handshake and the request, the gateway's own checks,
S4U2Self and S4U2Proxy as their own arrows to the KDC and back (dashed, grey and marked "cache hit" when
the ticket came from the gateway's cache, so nothing was sent), the backend request with `Authorization:
Negotiate` and its answer; a refused request ends, in red, at the step that refused it. The diagram is SVG
built here as text, server side, with no script; the trace's stages and the tickets' facts stand beside it.
Every value that reaches the markup goes through `html.escape`, its control and invisible characters (a
bidirectional override in a path) shown as escapes (`printable`); the pages take no input but the trace id
and the filters, which are escaped too.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.observability.siblings import TRACE_ID, TraceSource, traces_limit
from proxy.observability.traces import describe
from proxy.printable import printable

TRACE_SOURCE_KEY = web.AppKey("trace_source", TraceSource)


def add_trace_views(app: web.Application, source: TraceSource) -> None:
    """Serve the trace views of `source` (this process's ring, or every worker's) on the (admin) application `app`."""
    app[TRACE_SOURCE_KEY] = source
    app.router.add_get("/traces", traces_json)
    app.router.add_get("/traces/{id}", trace_json)
    app.router.add_get("/", index_page)
    app.router.add_get("/trace/{id}", trace_page)


def _before(request: web.Request) -> str | None:
    """`before`, a trace id: the page after that trace."""
    before = request.query.get("before")
    if before is not None and not TRACE_ID.fullmatch(before):
        raise web.HTTPBadRequest(
            text='{"error": "before must be a trace id (16 hex digits)"}\n', content_type="application/json"
        )
    return before


async def traces_json(request: web.Request) -> web.Response:
    user = request.query.get("user") or None
    recent = await request.app[TRACE_SOURCE_KEY].recent(traces_limit(request), user, _before(request))
    if recent is None:
        raise web.HTTPNotFound(
            text='{"error": "no such trace to page on from (before=): kept are the most recent only"}\n',
            content_type="application/json",
        )
    return web.json_response(recent.records)


async def trace_json(request: web.Request) -> web.Response:
    record = await request.app[TRACE_SOURCE_KEY].get(request.match_info["id"])
    if record is None:
        raise web.HTTPNotFound(
            text='{"error": "no such trace (kept: the most recent only)"}\n', content_type="application/json"
        )
    return web.json_response(record)


async def index_page(request: web.Request) -> web.Response:
    user = request.query.get("user") or None
    recent = await request.app[TRACE_SOURCE_KEY].recent(traces_limit(request), user)
    assert recent is not None  # (no `before`)
    page = render_index(recent.records, user=user, held=recent.held, keep=recent.keep)
    return web.Response(text=page, content_type="text/html")


async def trace_page(request: web.Request) -> web.Response:
    record = await request.app[TRACE_SOURCE_KEY].get(request.match_info["id"])
    if record is None:
        body = _page("Trace not found", "<p>No such trace: only the most recent requests are kept.</p>")
        return web.Response(status=404, text=body, content_type="text/html")
    return web.Response(text=render_trace(record), content_type="text/html")


# -- pages ----------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #1d2330; background: #fafbfc; }
h1 { font-size: 20px; margin: 0 0 12px; } h2 { font-size: 16px; margin: 16px 0 8px; }
a { color: #1f5fbf; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; background: #fff; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #17803d; } .bad { color: #c62828; font-weight: 600; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; margin-right: 4px; }
.kdc { background: #e3edff; color: #1f4fa0; } .hit { background: #e8f5e9; color: #1b6e2c; }
.layout { display: flex; gap: 16px; align-items: flex-start; }
.layout > div:last-child { flex: 1; min-width: 0; } .layout table { width: 100%; }
td:first-child, td.num { white-space: nowrap; } .layout td:last-child { overflow-wrap: anywhere; }
.facts { font-size: 12px; color: #3c4655; margin: 2px 0 0; }
.facts { display: grid; grid-template-columns: max-content minmax(0, 1fr); column-gap: 8px; }
.facts dt { grid-column: 1; color: #6b7583; } .facts dd { grid-column: 2; margin: 0; overflow-wrap: anywhere; }
.fix { background: #fff4f4; border-left: 3px solid #c62828; padding: 6px 10px; margin: 8px 0; }
.muted { color: #6b7583; }
"""

# The pages' only inline content, let in by the admin listener's Content-Security-Policy by this hash (`proxy.admin`)
STYLE_SOURCE = "'sha256-" + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode() + "'"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _e(value: Any) -> str:
    """A value for the markup: escaped, and its invisible characters (a device's U+202E in a path) shown as escapes."""
    return html.escape(printable("" if value is None else str(value)))


def _clock(iso: Any) -> str:
    """`2026-11-22T05:11:19.885Z` -> `05:11:19.885` (the full time is the cell's title)."""
    text = str(iso or "")
    return text.partition("T")[2].rstrip("Z") or text


def _kerberos_badges(record: dict[str, Any]) -> str:
    out = []
    for stage in record.get("stages", []):
        if stage.get("name") in ("s4u2self", "s4u2proxy"):
            label = "S4U2Self" if stage["name"] == "s4u2self" else "S4U2Proxy"
            kind, where = ("hit", "cache hit") if stage.get("cached") else ("kdc", "KDC")
            out.append(f'<span class="badge {kind}">{label}: {where}</span>')
    return "".join(out)


def render_index(records: Iterable[dict[str, Any]], *, user: str | None, held: int, keep: int) -> str:
    rows = []
    for r in records:
        status = r.get("status")
        css = "ok" if isinstance(status, int) and status < 400 else "bad"
        refusal = r.get("refused") or {}
        rows.append(
            f'<tr data-trace="{_e(r["id"])}"><td title="{_e(r.get("time"))}">{_e(_clock(r.get("time")))}</td>'
            f'<td><a href="/trace/{_e(r["id"])}">{_e(r["id"])}</a></td>'
            f"<td>{_e(r.get('upn'))}</td><td>{_e(r.get('principal'))}</td>"
            f"<td>{_e(r.get('method'))} {_e(r.get('path'))}</td>"
            f'<td class="num {css}">{_e(status)}</td><td class="num">{_e(r.get("ms"))}</td>'
            f"<td>{_kerberos_badges(r)}</td><td>{_e(refusal.get('reason'))}</td></tr>"
        )
    filtered = f" for {_e(user)} (<a href='/'>all</a>)" if user else ""
    body = (
        f"<h1>kcd-proxy: recent requests{filtered}</h1>"
        f'<p class="muted">{held} request{"" if held == 1 else "s"} held (the last {keep} are kept), newest first. '
        'Open one to see its delegation flow. JSON: <a href="/traces">/traces</a>.</p>'
        '<form method="get" action="/"><label>User (UPN or principal) <input name="user" '
        f'value="{_e(user)}"></label> <button>Filter</button></form><br>'
        "<table><thead><tr><th>time</th><th>trace</th><th>UPN</th><th>principal</th><th>request</th>"
        "<th>status</th><th>ms</th><th>Kerberos</th><th>refusal</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="9" class="muted">no requests yet</td></tr>')
        + "</tbody></table>"
    )
    return _page("kcd-proxy: recent requests", body)


def pac_summary(pac: dict[str, Any]) -> str:
    """A PAC's facts in one line: its size, the account's SID and UPN, and its buffers."""
    buffers = ", ".join(f"{name} {size}" for name, size in (pac.get("buffers") or {}).items())
    who = ", ".join(f"{k} {pac[k]}" for k in ("sid", "upn") if pac.get(k))
    return f"{pac.get('size')} bytes" + (f"; {who}" if who else "") + (f"; buffers: {buffers}" if buffers else "")


def _ticket_facts(stage: dict[str, Any]) -> str:
    """A ticket's facts, with the names docs/delegation-flow.md reads them by: its flags also in hex, as the KDC's
    log shows them, and its authtime, which is the gateway's own TGT's (protocol transition: the user never
    authenticated), beside its start and end."""
    keys = (
        "client",
        "server",
        "spn",
        "forwardable",
        "flags",
        "enctype",
        "session_enctype",
        "kvno",
        "authtime",
        "start",
        "end",
        "pac",
    )
    items = []
    for key in keys:
        if key in stage and stage[key] is not None:
            value = stage[key]
            if isinstance(value, dict):
                value = pac_summary(value)
            elif isinstance(value, list):  # the flags by name, then as the KDC's log and klist show them
                value = ", ".join(value) + (f" ({stage['flags_hex']})" if stage.get("flags_hex") else "")
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            items.append(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>")
    if "facts" in stage:
        items.append(f"<dt>facts</dt><dd>{_e(stage['facts'])}</dd>")
    return f'<dl class="facts">{"".join(items)}</dl>' if items else ""


def _chain_facts(stage: dict[str, Any]) -> str:
    chain = stage.get("chain") or []
    items = "".join(f"<li>{_e(c['subject'])} <span class='muted'>serial {_e(c['serial'])}</span></li>" for c in chain)
    return f'<ol class="facts">{items}</ol>' if items else ""


def render_trace(record: dict[str, Any]) -> str:
    rows = []
    for stage in record.get("stages", []):
        extra = ""
        if stage.get("name") in ("s4u2self", "s4u2proxy"):
            extra = _ticket_facts(stage)
        elif stage.get("name") == "certificate":
            extra = _chain_facts(stage)
        css = ' class="bad"' if stage.get("refused") else ""
        rows.append(
            f'<tr data-stage="{_e(stage.get("name"))}"><td{css}>{_e(stage.get("name"))}</td>'
            f'<td class="num">{_e(stage.get("ms"))}</td><td>{_e(describe(stage))}{extra}</td></tr>'
        )
    refused = record.get("refused")
    fix = ""
    if refused:
        fix = (
            f'<div class="fix"><b>Refused at {_e(refused.get("stage"))}</b>: {_e(refused.get("reason"))}'
            + (f"<br><b>Fix</b>: {_e(refused.get('fix'))}" if refused.get("fix") else "")
            + "</div>"
        )
    heading = (
        f"<h1>{_e(record.get('method'))} {_e(record.get('path'))} → {_e(record.get('status'))} "
        f"<span class='muted'>{_e(record.get('ms'))} ms</span></h1>"
        f"<p class='muted'>trace {_e(record.get('id'))} at {_e(record.get('time'))} · "
        f"{_e(record.get('upn'))} → {_e(record.get('principal'))} · SPN {_e(record.get('spn'))} · "
        "<a href='/'>all requests</a> · "
        f"<a href='/traces/{_e(record.get('id'))}'>JSON</a></p>"
    )
    table = (
        "<table><thead><tr><th>stage</th><th>ms</th><th>what it established</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        "<p class='muted'>s4u2self and s4u2proxy: each KDC exchange's own time; the Kerberos stage's other work "
        "(a thread's hand-off, reading the PAC) is in neither.</p>"
    )
    body = f"{heading}{fix}<div class='layout'><div>{sequence_svg(record)}</div><div><h2>Trace</h2>{table}</div></div>"
    return _page(f"kcd-proxy trace {record.get('id')}", body)


# -- the sequence diagram -------------------------------------------------------------------------------------

ACTORS = (("device", "Device"), ("gateway", "kcd-proxy"), ("kdc", "KDC"), ("backend", "Backend"))
_X = {"device": 70, "gateway": 250, "kdc": 500, "backend": 690}
_WIDTH, _TOP, _STEP = 770, 78, 50
_CHAR = 6.4  # average width of a 12 px character: labels are cut to the space between two lifelines


@dataclass(frozen=True)
class Message:
    step: str  # the stage it belongs to (tls, request, checks, s4u2self, s4u2proxy, backend, response)
    source: str
    target: str
    label: str
    sublabel: str = ""
    reply: bool = False  # an answer: dashed
    cached: bool = False  # not sent: the gateway answered itself from its cache
    refused: bool = False


def messages(record: dict[str, Any]) -> list[Message]:
    """The exchange of one request, as arrows between the four lifelines, up to where it ended."""
    stages = {s["name"]: s for s in record.get("stages", [])}
    out: list[Message] = []
    tls = stages.get("tls")
    if tls is not None:
        handshake = "resumed session" if tls.get("resumed") else "full handshake"
        sub = f"{tls.get('version')}, {handshake}" if tls.get("version") else "no TLS"
        out.append(Message("tls", "device", "gateway", "TLS + client certificate", sub))
    out.append(Message("request", "device", "gateway", f"{record.get('method')} {record.get('path')}"))
    for name in ("certificate", "revocation", "identity"):
        stage = stages.get(name)
        if stage is None:
            continue
        refused = bool(stage.get("refused"))
        out.append(Message(name, "gateway", "gateway", _check_label(name, stage), refused=refused))
        if refused:
            return [*out, _refusal(record)]
    # in order, a pair of them twice where the ticket was asked for again once a slow backend connection was open
    for stage in record.get("stages", []):
        name = stage["name"]
        if name not in ("s4u2self", "s4u2proxy"):
            continue
        out.extend(_s4u(name, stage, record))
        if stage.get("refused"):
            return [*out, _refusal(record)]
    if "kerberos" in stages:
        out.append(Message("kerberos", "gateway", "gateway", "Kerberos: the user's own ticket (Basic sign-in)"))
    backend = stages.get("backend")
    if backend is not None:
        request = f"{record.get('method')} {record.get('path')} + Authorization: Negotiate"
        out.append(Message("backend", "gateway", "backend", request, "AP-REQ built from the service ticket"))
        status = backend.get("status")
        reused = {True: "reused connection", False: "new connection"}.get(backend.get("reused"), "")
        failed = bool(backend.get("refused"))
        sub = _short(str(backend.get("reason"))) if failed else f"{reused} · {backend.get('headers_ms')} ms"
        answer = str(status) if status is not None else "no answer"
        out.append(Message("backend", "backend", "gateway", answer, sub, reply=True, refused=failed))
    if record.get("refused"):
        out.append(_refusal(record))
    else:
        out.append(Message("response", "gateway", "device", str(record.get("status")), reply=True))
    return out


def _check_label(name: str, stage: dict[str, Any]) -> str:
    """The gateway's own checks, in a few words (the trace beside the diagram has the rest)."""
    if stage.get("refused"):
        return f"{name}: refused"
    if name == "certificate":
        chain = stage.get("chain") or []
        anchor = f" → {chain[-1]['subject']}" if chain else ""
        return f"chain: {stage.get('subject')}{anchor} ({len(chain)} certificates)"
    if name == "revocation":
        age = f", CRL {stage['age_s']:.0f} s old" if stage.get("age_s") is not None else ""
        return f"revocation: {stage.get('status')}{age}"
    return f"identity ({stage.get('rule')}): {stage.get('upn')} → {stage.get('principal')}"


def _s4u(name: str, stage: dict[str, Any], record: dict[str, Any]) -> list[Message]:
    cached = bool(stage.get("cached"))
    refused = bool(stage.get("refused"))
    ms = f"{stage.get('ms')} ms"
    if name == "s4u2self":
        ask, what, sub = "S4U2Self (TGS-REQ, PA-FOR-USER)", "evidence ticket", f"for {record.get('principal')}"
    else:
        ask, what, sub = (
            "S4U2Proxy (TGS-REQ + evidence)",
            "service ticket",
            f"for {stage.get('spn') or record.get('spn')}",
        )
    if cached:
        ask, sub = f"{ask.split(' ')[0]}: cache hit, not sent", "from the gateway's cache"
    if stage.get("again"):  # asked for again once a slow backend connection was open (proxy.pipeline.delegated)
        ask = f"again: {ask}"
    if refused:
        answer, answer_sub = "KRB-ERROR", _short(str(stage.get("reason")))
    elif "client" in stage:
        flag = "forwardable" if stage.get("forwardable") else "NOT forwardable"
        answer = f"{what}, {flag}"
        answer_sub = f"{stage.get('client')} → {_principal_name(str(stage.get('server')))}"
    else:
        answer, answer_sub = what, str(stage.get("facts") or stage.get("note") or "")
    return [
        *_gateway_tgt(stage),
        Message(name, "gateway", "kdc", ask, f"{sub} · {ms}", cached=cached),
        Message(name, "kdc", "gateway", answer, answer_sub, reply=True, cached=cached, refused=refused),
    ]


def _gateway_tgt(stage: dict[str, Any]) -> list[Message]:
    """The gateway's own AS exchange, drawn before S4U2Self when this request's exchange made one (its time is part
    of S4U2Self's): the KDC logs it, so the diagram shows it."""
    if stage.get("gateway_tgt_ms") is None:
        return []
    gateway = _principal_name(str(stage.get("server")))
    return [
        Message("s4u2self", "gateway", "kdc", "AS-REQ (the gateway's own TGT, from its keytab)", f"for {gateway}"),
        Message("s4u2self", "kdc", "gateway", "TGT", f"{stage['gateway_tgt_ms']} ms", reply=True),
    ]


def _principal_name(principal: str) -> str:
    return principal.rpartition("@")[0] or principal


def _refusal(record: dict[str, Any]) -> Message:
    refused = record.get("refused") or {}
    reason = _short(str(refused.get("reason")))
    return Message("response", "gateway", "device", f"{record.get('status')}", reason, reply=True, refused=True)


def _short(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sequence_svg(record: dict[str, Any]) -> str:
    """The SVG sequence diagram of one trace record (device, gateway, KDC, backend)."""
    msgs = messages(record)
    height = _TOP + _STEP * len(msgs) + 40
    parts = [
        f'<svg id="sequence" xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="system-ui, sans-serif" font-size="12" role="img" '
        f'aria-label="sequence diagram of trace {_e(record.get("id"))}">',
        "<defs>",
        '<marker id="head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#2b3445"/></marker>',
        '<marker id="head-grey" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa3ae"/></marker>',
        '<marker id="head-red" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#c62828"/></marker>',
        "</defs>",
        f'<rect x="0" y="0" width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
    ]
    for actor, title in ACTORS:
        x = _X[actor]
        parts.append(
            f'<g class="lifeline" data-actor="{actor}">'
            f'<rect x="{x - 62}" y="14" width="124" height="34" rx="6" fill="#1f3a5f"/>'
            f'<text x="{x}" y="36" text-anchor="middle" fill="#ffffff" font-size="14" font-weight="600">'
            f"{_e(title)}</text>"
            f'<line x1="{x}" y1="48" x2="{x}" y2="{height - 16}" stroke="#9aa3ae" stroke-dasharray="4 4"/></g>'
        )
    y = _TOP
    for m in msgs:
        parts.append(_arrow(m, y))
        y += _STEP
    parts.append("</svg>")
    return "".join(parts)


def _arrow(m: Message, y: int) -> str:
    colour, head = (
        ("#c62828", "head-red") if m.refused else ("#9aa3ae", "head-grey") if m.cached else ("#2b3445", "head")
    )
    dash = ' stroke-dasharray="6 4"' if m.reply or m.cached else ""
    attrs = (
        f'class="msg" data-step="{_e(m.step)}" data-from="{m.source}" data-to="{m.target}" '
        f'data-cached="{str(m.cached).lower()}" data-refused="{str(m.refused).lower()}"'
    )
    x1, x2 = _X[m.source], _X[m.target]
    if x1 == x2:  # the gateway's own check: a loop on its lifeline
        path = f"M{x1},{y} h34 v18 h-34"
        line = f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.5" marker-end="url(#{head})"/>'
        room = int((_WIDTH - x1 - 44) / _CHAR)
        text = f'<text x="{x1 + 40}" y="{y + 13}" fill="{colour}">{_e(_short(m.label, room))}</text>'
        return f"<g {attrs}>{line}{text}</g>"
    mid = (x1 + x2) / 2
    span = int(abs(x2 - x1) / _CHAR)  # characters that fit between the two lifelines
    line = (
        f'<line x1="{x1}" y1="{y + 14}" x2="{x2}" y2="{y + 14}" stroke="{colour}" stroke-width="1.5"{dash} '
        f'marker-end="url(#{head})"/>'
    )
    label = f'<text x="{mid}" y="{y + 8}" text-anchor="middle" fill="{colour}">{_e(_short(m.label, span))}</text>'
    sub = ""
    if m.sublabel:
        sub = (
            f'<text x="{mid}" y="{y + 29}" text-anchor="middle" fill="#6b7583" font-size="11">'
            f"{_e(_short(m.sublabel, int(span * 1.1)))}</text>"
        )
    badge = ""
    if m.cached and not m.reply:  # beside the KDC's lifeline, where nothing else is drawn
        bx = max(x1, x2) + 8
        badge = (
            f'<g class="cache-hit"><rect x="{bx}" y="{y + 6}" width="64" height="16" rx="8" fill="#e8f5e9" '
            f'stroke="#1b6e2c"/><text x="{bx + 32}" y="{y + 18}" text-anchor="middle" fill="#1b6e2c" '
            'font-size="10" font-weight="600">cache hit</text></g>'
        )
    return f"<g {attrs}>{line}{label}{sub}{badge}</g>"
