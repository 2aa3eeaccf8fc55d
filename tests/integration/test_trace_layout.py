"""The trace page's ticket facts, laid out by a real browser (headless Chromium at 1400 px)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from proxy.kerberos.ccache import S4UFacts
from proxy.kerberos.pac import PacFacts
from proxy.observability.tracepage import render_trace
from proxy.observability.traces import build_record
from tests.unit.test_traces import EVIDENCE, SERVICE, _trace

# Run by the browser after layout: for every <dt>, is its <dd> on the same row? The answer goes into the DOM,
# which --dump-dom prints. The page itself carries no script; this one is added to the copy under test.
_MEASURE = """<script>
window.addEventListener('load', () => {
  const rows = [];
  for (const dt of document.querySelectorAll('dl.facts dt')) {
    const dd = dt.nextElementSibling;
    const offset = Math.abs(dt.getBoundingClientRect().top - dd.getBoundingClientRect().top);
    rows.push(dt.textContent + ':' + Math.round(offset));
  }
  document.body.setAttribute('data-rows', rows.join(' '));
});
</script>"""

_PAC = PacFacts(
    size=912,
    buffers=(("logon-info", 432), ("delegation-info", 144), ("upn-dns-info", 112)),
    upn="alice@ad.test",
    dns_domain="AD.TEST",
    sam_name="alice",
    sid="S-1-5-21-2475063116-2525469110-3454126558-1103",
)


def test_ticket_facts_stay_aligned_when_a_label_or_value_wraps(tmp_path: Path) -> None:
    """At 1400 px every ticket fact's value sits on its label's row (a wrapping `session_enctype` label once
    pushed each later value one row down, so `kvno` showed a date), with the PAC's long line in the list."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    facts = S4UFacts(EVIDENCE, SERVICE, s4u2self_ms=2.0, s4u2proxy_ms=1.5, evidence_pac=_PAC)
    html = render_trace(build_record(_trace(cached=False, facts=facts), 200, 9.0))
    page = tmp_path / "trace.html"
    page.write_text(html.replace("</body>", _MEASURE + "</body>"))
    done = subprocess.run(
        [
            "chromium",
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,900",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-rows="([^"]*)"', done.stdout)
    assert found, done.stdout[-2000:]
    rows = dict(item.rsplit(":", 1) for item in found.group(1).split())
    assert {"session_enctype", "kvno", "end", "pac"} <= set(rows)
    assert {label: int(offset) for label, offset in rows.items() if int(offset) > 1} == {}
    assert "S-1-5-21-2475063116-2525469110-3454126558-1103" in done.stdout
