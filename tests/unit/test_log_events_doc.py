"""docs/log-events.md lists every log event the gateway emits, and no other: the event names are read from the code
under proxy/ (the lab's daemons apart) as the code writes them, so one added, renamed or dropped fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

from proxy import errors
from proxy.tls import proxy_protocol

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "log-events.md"
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
EVENT_NAME = re.compile(r"[a-z][a-z0-9_]*")


def _modules() -> list[ast.Module]:
    return [ast.parse(p.read_text()) for p in sorted((ROOT / "proxy").rglob("*.py")) if "lab" not in p.parts]


def _event_parameters(modules: list[ast.Module]) -> dict[str, int]:
    """Functions that take an event name to log (`summary_fields(event, ...)`, `_cut(request, route, event, e)`),
    by name, with the position of that parameter."""
    found = {}
    for module in modules:
        for node in ast.walk(module):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [a.arg for a in node.args.args]
                if "event" in names and names[0] not in ("self", "cls"):
                    found[node.name] = names.index("event")
    return found


def _literal(args: list[ast.expr], i: int) -> str | None:
    arg = args[i] if i < len(args) else None
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and EVENT_NAME.fullmatch(arg.value):
        return arg.value
    return None


def code_events() -> set[str]:
    """What the code logs: a logger method's literal event, a literal given to a function's `event` parameter, and
    each error class's `event` (proxy/errors.py: the middleware logs a refusal under it)."""
    modules = _modules()
    takes_event = _event_parameters(modules)
    events: set[str] = set()
    for module in modules:
        for node in ast.walk(module):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                at = 0 if isinstance(node.func, ast.Attribute) and name in LOG_METHODS else takes_event.get(name)
                event = _literal(node.args, at) if at is not None else None
                if event is not None:
                    events.add(event)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.Assign) and [ast.unparse(t) for t in item.targets] == ["event"]:
                        event = _literal([item.value], 0)
                        if event is not None:
                            events.add(event)
    return events


def doc_events() -> set[str]:
    """The events docs/log-events.md's tables name, one a row."""
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", DOC.read_text(), flags=re.MULTILINE))


def test_the_reader_finds_the_events_logged_each_way() -> None:
    """The reader of the code finds a logger call's event, an error class's, and one passed on by name (`_cut`)."""
    events = code_events()
    assert {"listening", "kerberos_refused", "stream_stalled", "request"} <= events


def test_every_event_the_code_logs_is_documented() -> None:
    """Each event name the gateway's code can log has its row in docs/log-events.md."""
    assert sorted(code_events() - doc_events()) == []


def test_every_documented_event_is_still_logged() -> None:
    """docs/log-events.md names no event the code no longer logs."""
    assert sorted(doc_events() - code_events()) == []


def test_the_readme_links_the_event_reference() -> None:
    """The README, the tour, points to the reference."""
    assert "docs/log-events.md" in (ROOT / "README.md").read_text()


def test_the_refusal_counters_labels_are_documented() -> None:
    """The refusal counter's section names every stage an error refuses at and each PROXY-gate refusal kind."""
    section = DOC.read_text().partition("## The refusal counter's reasons")[2]
    refusals = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.GatewayError)]
    stages = {cls.stage for cls in refusals} - {"gateway"}
    kinds = set(get_args(proxy_protocol.Refusal))
    assert sorted(name for name in stages | kinds if f"`{name}`" not in section) == []


def test_the_deploying_guide_names_each_proxy_gate_refusal_kind() -> None:
    """docs/deploying.md's "Several gateways", where an operator puts a balancer in front, names every `refusal` of
    `proxy_header_refused` (and of `kcd_refusals_total{stage="proxy_protocol"}`) among the ones it counts."""
    guide = (ROOT / "docs" / "deploying.md").read_text()
    section = guide.partition("## 9. Several gateways")[2].partition("\n## ")[0]
    counted = section.partition("kcd_refusals_total{stage=")[2].partition("A connection that ends before")[0]
    assert sorted(kind for kind in get_args(proxy_protocol.Refusal) if f"`{kind}`" not in counted) == []
