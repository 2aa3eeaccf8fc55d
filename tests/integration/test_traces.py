"""Traces of real requests through a real gateway: /traces, the export, the page in Chromium, `kcd-proxy trace`.

One gateway for the module, with the admin listener and a JSON-lines export. A test that needs a user nobody
has used yet makes a principal of its own; the others do not depend on what another test cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.lab.layout import USERS, LabLayout
from proxy.observability.siblings import MAX_TRACES
from tests.integration.conftest import REPO, Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually, whole_json_lines
from tests.integration.loopback import serving, stop_listening
from tests.integration.recorder import raw_request
from tests.integration.test_revocation import curl_with
from tests.integration.test_ticket_cache import _certificate_for, _kadmin

STAGES = ["tls", "certificate", "revocation", "identity", "s4u2self", "s4u2proxy", "backend"]


@dataclass
class Traced:
    gw: Gateway
    admin: str
    export: Path
    config: Path


@pytest.fixture(scope="module")
def traced(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    directory = tmp_path_factory.mktemp("traces")
    admin_port = free_port()
    export = directory / "traces.jsonl"
    extra = f"""
[[routes]]
prefix = "/not-delegable/"
upstream = "http://127.0.0.1:{lab.backend_port}"
spn = "HTTP/other.lab.test"

[admin]
bind = "127.0.0.1:{admin_port}"

[traces]
keep = 100
export = "{export}"
"""
    gw = start_gateway(lab, directory, lab_config(lab, port=free_port(), extra=extra))
    yield Traced(gw, f"http://{gw.admin}", export, gw.config_path)
    assert gw.stop() == 0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310  loopback test URLs
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _traces(admin: str, limit: int = 100, user: str | None = None, before: str | None = None) -> list[dict[str, Any]]:
    query = f"limit={limit}" + (f"&user={user}" if user else "") + (f"&before={before}" if before else "")
    status, body = _get(f"{admin}/traces?{query}")
    assert status == 200, body
    records: list[dict[str, Any]] = json.loads(body)
    return records


def _ids(admin: str, user: str | None = None) -> set[str]:
    return {r["id"] for r in _traces(admin, user=user)}


def _new_traces(admin: str, seen: set[str], count: int, user: str | None = None) -> list[dict[str, Any]]:
    """The records (of `user`) whose ids are not in `seen`, newest first, once there are `count`: a forwarded
    request's trace is recorded after its answer has gone out, so right after curl it may not be there yet."""

    def found() -> list[dict[str, Any]] | None:
        new = [r for r in _traces(admin, user=user) if r["id"] not in seen]
        return new if len(new) >= count else None

    return eventually(found, f"{count} new trace(s) of {user or 'anyone'}")


def _stages(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in record["stages"]}


def test_a_request_trace_has_every_stage_and_the_second_comes_from_the_cache(lab: LabLayout, traced: Traced) -> None:
    """Two requests of a user of its own (no other test, before or beside it, cached its tickets or opened its
    backend connection): every stage in order with issue 10's details (TLS version, cipher, resumed; the chain's
    subjects and serials; the revocation's source and age; the identity rule; the backend's status and time); the
    S4U tickets' facts (forwardable, client, server); the first from the KDC, the second from the cache; the backend
    connection new, then reused."""
    name = f"tr{uuid.uuid4().hex[:8]}"
    _kadmin(lab, f"addprinc -randkey {name}")
    cert, key = _certificate_for(lab, name, traced.export.parent)
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    user, principal = f"{name}@lab.test", f"{name}@LAB.TEST"
    seen = _ids(traced.admin, user)
    for _ in range(2):
        assert curl_with(lab, traced.gw, cert, key)[0] == 200
    second, first = _new_traces(traced.admin, seen, 2, user)
    assert first["id"] != second["id"]
    for record in (first, second):
        assert [s["name"] for s in record["stages"]] == STAGES
        assert (record["upn"], record["principal"], record["status"]) == (user, principal, 200)
        assert all(isinstance(s["ms"], float | int) and s["ms"] >= 0 for s in record["stages"])
        stages = _stages(record)
        evidence, service = stages["s4u2self"], stages["s4u2proxy"]
        assert (evidence["client"], evidence["server"]) == (principal, "HTTP/proxy.lab.test@LAB.TEST")
        assert (service["client"], service["server"]) == (principal, "HTTP/cas.lab.test@LAB.TEST")
        assert evidence["forwardable"] is True
        assert service["forwardable"] is True
        assert "forwardable" in evidence["flags"]
        assert evidence["enctype"].startswith("aes")
        assert evidence["start"] < evidence["end"]
        assert stages["tls"]["version"].startswith("TLSv1.")
        assert stages["tls"]["cipher"].startswith("TLS_")  # TLS 1.3's, as curl negotiates here
        assert stages["tls"]["resumed"] is False  # each curl a new process: a full handshake
        chain = stages["certificate"]["chain"]
        assert [c["subject"] for c in chain] == [f"CN={name}-tablet", "CN=Lab Issuing CA", "CN=Lab Root CA"]
        assert chain[0]["serial"] == f"{serial:x}"  # issue 10: the chain's subjects and serials
        assert stages["revocation"]["status"] == "good"
        assert stages["revocation"]["source"] == str(lab.pki_dir / "crls.pem")  # its source and age
        assert stages["revocation"]["age_s"] >= 0
        assert stages["identity"]["rule"] == "san-upn"
        assert stages["backend"]["status"] == 200
        assert stages["backend"]["ms"] > 0  # its time
    one, two = _stages(first), _stages(second)
    assert (one["s4u2self"]["cached"], one["s4u2proxy"]["cached"]) == (False, False)
    assert (two["s4u2self"]["cached"], two["s4u2proxy"]["cached"]) == (True, True)
    assert one["s4u2self"]["ms"] > 0
    assert two["s4u2self"]["ms"] == 0
    assert two["s4u2proxy"]["end"] == one["s4u2proxy"]["end"]  # the same service ticket
    assert (one["backend"]["reused"], two["backend"]["reused"]) == (False, True)
    assert _get(f"{traced.admin}/traces?limit=0")[0] == 400
    assert _get(f"{traced.admin}/trace/{'0' * 16}")[0] == 404


def test_a_resumed_tls_session_is_traced_as_resumed(lab: LabLayout, traced: Traced) -> None:
    """Issue 10: the TLS stage says "resumed or not": one curl, two URLs, each on a connection of its own
    (`Connection: close`), the second resuming the first's session: its trace's tls stage says resumed, the first's
    not (before, only a full handshake's `resumed: false` was read)."""
    tag = uuid.uuid4().hex[:8]
    first, second = f"/owa/resume-{tag}-1", f"/owa/resume-{tag}-2"
    done = curl(
        lab, traced.gw.url + second, "alice", "-H", "Connection: close", "-o", "/dev/null", traced.gw.url + first
    )
    assert done.returncode == 0, done.stderr

    def both() -> dict[str, dict[str, Any]] | None:
        records = {r["path"]: r for r in _traces(traced.admin, user="alice@lab.test") if r["path"] in (first, second)}
        return records if len(records) == 2 else None

    records = eventually(both, "both requests' traces")
    assert _stages(records[first])["tls"]["resumed"] is False
    assert _stages(records[second])["tls"]["resumed"] is True
    assert records[second]["status"] == 200


def test_the_gateways_own_as_exchange_is_shown_where_it_happened(lab: LabLayout, tmp_path: Path) -> None:
    """A fresh gateway's first delegated request also asks the KDC for the gateway's own TGT (an AS-REQ for
    HTTP/proxy.lab.test in the KDC's log, before the PROTOCOL-TRANSITION TGS-REQ): the trace's S4U2Self step shows
    that exchange and its time (it showed two KDC exchanges where the log has three, and counted the AS exchange's
    time as S4U2Proxy's); the next user's first request on the same gateway holds that TGT and shows none. Before it
    listens, the gateway's probe of its KDCs is an AS-REQ of its own too (two enctypes: docs/delegation-flow.md), whose
    TGT it does not keep: the first request still makes its AS exchange."""
    admin_port = free_port()
    extra = f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    as_req = "HTTP/proxy.lab.test@LAB.TEST for krbtgt/LAB.TEST@LAB.TEST"
    start = lab.kdc_log.stat().st_size
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    admin = f"http://{gw.admin}"
    try:
        probe = rf"AS_REQ \(2 etypes .*: ISSUE: .*{as_req}"
        eventually(lambda: _kdc_lines_from(lab, start, probe), f"krb5kdc.log: the start's probe, {probe}")
        names = [f"as{uuid.uuid4().hex[:8]}" for _ in range(2)]
        records = []
        for name in names:
            _kadmin(lab, f"addprinc -randkey {name}")
            cert, key = _certificate_for(lab, name, tmp_path)
            offset = lab.kdc_log.stat().st_size
            assert curl_with(lab, gw, cert, key)[0] == 200
            (record,) = _new_traces(admin, set(), 1, f"{name}@lab.test")
            with lab.kdc_log.open("rb") as log:
                log.seek(offset)
                records.append((record, log.read().decode()))
        (first, first_log), (second, second_log) = records
        assert as_req in first_log, first_log
        assert "AS_REQ" in first_log
        evidence = _stages(first)["s4u2self"]
        assert evidence["gateway_tgt_ms"] > 0
        assert evidence["ms"] >= evidence["gateway_tgt_ms"]
        assert "gateway_tgt_ms" not in _stages(second)["s4u2self"]
        assert "PROTOCOL-TRANSITION" in second_log
    finally:
        assert gw.stop() == 0


def test_refusals_land_on_the_step_the_kdc_refused_with_cause_and_fix(lab: LabLayout, traced: Traced) -> None:
    """An SPN outside the delegation list: S4U2Proxy refused after a forwardable evidence ticket. A user whose
    tickets may not be forwarded: the evidence ticket is not forwardable, and the explainer says so (also in
    the log's audit event). An unknown user: S4U2Self refused."""
    assert curl(lab, traced.gw.url + "/not-delegable/", "alice").stdout.endswith("403")
    (refused,) = [r for r in _traces(traced.admin, user="alice@lab.test") if r["path"] == "/not-delegable/"]
    assert [s["name"] for s in refused["stages"]] == STAGES[:-1]
    stages = _stages(refused)
    assert stages["s4u2self"]["forwardable"] is True
    assert stages["s4u2proxy"]["refused"] is True
    assert refused["refused"]["stage"] == "s4u2proxy"
    assert "add HTTP/other.lab.test to the delegation list" in refused["refused"]["fix"]

    name = f"sens{uuid.uuid4().hex[:8]}"
    _kadmin(lab, f"addprinc -randkey -allow_forwardable {name}")  # MIT's "sensitive, cannot be delegated"
    cert, key = _certificate_for(lab, name, traced.export.parent)
    assert curl_with(lab, traced.gw, cert, key)[0] == 403
    (sensitive,) = _traces(traced.admin, limit=1, user=f"{name}@lab.test")
    stages = _stages(sensitive)
    assert stages["s4u2self"]["forwardable"] is False
    assert stages["s4u2self"]["client"] == f"{name}@LAB.TEST"
    assert stages["s4u2proxy"]["refused"] is True
    assert (
        sensitive["refused"]["reason"]
        == f"the gateway may not act for {name}@LAB.TEST: its evidence ticket is not forwardable"
    )
    assert sensitive["refused"]["fix"].startswith("evidence ticket not forwardable: the service account")
    audit = traced.gw.wait_event("kerberos_refused", principal=f"{name}@LAB.TEST")
    assert audit["fix"].startswith("evidence ticket not forwardable")

    assert curl(lab, traced.gw.url + "/owa/", "ghost").stdout.endswith("403")
    (ghost,) = _traces(traced.admin, limit=1, user="ghost@lab.test")
    assert [s["name"] for s in ghost["stages"]][-1] == "s4u2self"
    assert ghost["refused"]["stage"] == "s4u2self"
    assert "no Kerberos account matches" in ghost["refused"]["reason"]


def _kdc_lines_from(lab: LabLayout, offset: int, pattern: str) -> list[str] | None:
    """krb5kdc.log's lines written after `offset`, from the first matching `pattern` on; None while none does."""
    with lab.kdc_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    return next((lines[i:] for i, line in enumerate(lines) if re.search(pattern, line)), None)


def test_each_kdc_refusal_is_the_line_delegation_flow_gives(lab: LabLayout, traced: Traced, tmp_path: Path) -> None:
    """docs/delegation-flow.md's "When the KDC says no" on the MIT lab, each refusal's krb5kdc.log line as its table
    gives it, on the step the trace names: an unknown user (UNKNOWN_S4U2SELF_PRINCIPAL at S4U2Self), a disabled one
    (CLIENT LOCKED OUT at S4U2Self, then `PROTOCOL-TRANSITION s4u-client=<unknown>`: the table had no such row), a
    user who may not be delegated (EVIDENCE_TKT_NOT_FORWARDABLE) and an SPN outside the delegation list
    (UNSUPPORTED_S4U2PROXY_REQUEST, then `CONSTRAINED-DELEGATION s4u-client=<unknown>`), both at S4U2Proxy; the
    other two refusals are followed by no s4u line."""
    gateway = "HTTP/proxy.lab.test@LAB.TEST"
    cant = "KDC can't fulfill requested option"
    scenes = [  # kadmin's addprinc options (None: no principal), path, the KDC's line, the s4u line after it, step
        (
            None,
            "/owa/",
            f"UNKNOWN_S4U2SELF_PRINCIPAL: .* {gateway} for {gateway}, Client not found in",
            None,
            "s4u2self",
        ),
        (
            "-allow_tix",
            "/owa/",
            f"CLIENT LOCKED OUT: .* {gateway} for {gateway}, Client's credentials have been revoked",
            "PROTOCOL-TRANSITION",
            "s4u2self",
        ),
        (
            "-allow_forwardable",
            "/owa/",
            f"EVIDENCE_TKT_NOT_FORWARDABLE: .* for HTTP/cas.lab.test@LAB.TEST, {cant}",
            None,
            "s4u2proxy",
        ),
        (
            "",
            "/not-delegable/",
            f"UNSUPPORTED_S4U2PROXY_REQUEST: .* {gateway} for HTTP/other.lab.test@LAB.TEST, {cant}",
            "CONSTRAINED-DELEGATION",
            "s4u2proxy",
        ),
    ]
    for options, path, line, after, step in scenes:
        name = f"kr{uuid.uuid4().hex[:8]}"
        if options is not None:
            _kadmin(lab, f"addprinc -randkey {options} {name}")
        cert, key = _certificate_for(lab, name, tmp_path)
        offset = lab.kdc_log.stat().st_size
        cmd = ["curl", "-sS", "--max-time", "20", "--cacert", str(lab.pki_dir / "root.pem"), "--cert", str(cert)]
        done = subprocess.run(
            [*cmd, "--key", str(key), "-o", "/dev/null", "-w", "%{http_code}", traced.gw.url + path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.stdout == "403", (name, options, done.stdout, done.stderr)
        (record,) = _traces(traced.admin, limit=1, user=f"{name}@lab.test")
        assert record["refused"]["stage"] == step, record["refused"]
        lines = eventually(lambda: _kdc_lines_from(lab, offset, line), f"krb5kdc.log: {line}")  # noqa: B023
        s4u = [x for x in lines[1:] if "s4u-client=" in x]  # MIT's line after the refusal, if any
        if after is None:
            assert not s4u, lines
        else:
            assert s4u, lines
            assert s4u[0].endswith(f"{after} s4u-client=<unknown>"), lines


def test_the_export_file_is_readable_by_the_gateways_user_only(lab: LabLayout, traced: Traced) -> None:
    """The JSON-lines export (users' names, addresses, paths) is created 0600 by the running gateway, not with the
    umask's 0644 (the test's gateway runs under the test's umask, 022 here). Issue 10's "exported as JSON lines":
    every line of the file is one JSON object, and the request's is the record GET /traces gives, stages and all."""
    seen = _ids(traced.admin)
    curl(lab, traced.gw.url + "/owa/", "alice")
    (record,) = _new_traces(traced.admin, seen, 1)

    def exported() -> dict[str, Any] | None:
        return next((r for r in whole_json_lines(traced.export) if r["id"] == record["id"]), None)

    assert eventually(exported, "the request's trace exported") == record
    text = traced.export.read_text()
    assert all(json.loads(line)["id"] for line in text[: text.rfind("\n")].splitlines())  # one object a line
    assert oct(traced.export.stat().st_mode & 0o777) == oct(0o600)


def test_one_traces_answer_is_bounded_and_the_rest_is_paged_with_before(lab: LabLayout, tmp_path: Path) -> None:
    """`[traces] keep` may be 100,000: `/traces?limit=` asking for more than MAX_TRACES gets MAX_TRACES (it got
    the whole ring), and `before=<id>` pages on from the last one, so every held trace is reached once; a `before`
    the ring no longer holds is a 404 saying so, a malformed one a 400."""
    admin_port = free_port()
    extra = f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n\n[traces]\nkeep = {MAX_TRACES + 100}\n'
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    admin = f"http://{gw.admin}"
    try:
        sent = MAX_TRACES + 5
        done = curl(lab, f"{gw.url}/owa/[1-{sent}]", "alice", "-o", "/dev/null")  # one connection, curl's URL glob
        assert done.returncode == 0, done.stderr

        def page(count: int, before: str | None = None) -> list[dict[str, Any]] | None:
            records = _traces(admin, limit=sent * 10, before=before)
            return records if len(records) == count else None

        first = eventually(lambda: page(MAX_TRACES), "a full first page")
        rest = eventually(lambda: page(5, first[-1]["id"]), "the 5 oldest on the second page")
        ids = [r["id"] for r in first + rest]
        assert len(set(ids)) == sent
        assert _traces(admin, limit=2, before=first[0]["id"]) == first[1:3]
        assert _get(f"{admin}/traces?before=0123456789abcdef")[0] == 404
        assert _get(f"{admin}/traces?before=../metrics")[0] == 400
    finally:
        assert gw.stop() == 0


def test_no_secret_reaches_a_trace(lab: LabLayout, traced: Traced) -> None:
    """After real traffic, /traces, the pages and the JSON-lines export hold no Negotiate token and no password."""
    seen = _ids(traced.admin)
    for user in ("alice", "bob", "carol"):
        curl(lab, traced.gw.url + "/owa/", user)
    _new_traces(traced.admin, seen, 3)
    records = _traces(traced.admin)
    assert records
    texts = {"/traces": json.dumps(records), "export": traced.export.read_text(), "/": _get(traced.admin + "/")[1]}
    texts.update({f"/trace/{r['id']}": _get(f"{traced.admin}/trace/{r['id']}")[1] for r in records[:5]})
    export_ids = [json.loads(line)["id"] for line in texts["export"].splitlines()]
    assert {r["id"] for r in records} <= set(export_ids)
    secrets = ["YII", "Negotiate ", *USERS.values()]
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} in {where}"


def _png_facts(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the image data) of a PNG: enough to tell a picture from a blank."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def test_the_page_draws_a_known_request_in_a_real_browser(lab: LabLayout, traced: Traced, tmp_path: Path) -> None:
    """Chromium renders /trace/<id> of bob's second request: the SVG with four lifelines, S4U2Self and
    S4U2Proxy as their own arrows, marked as cache hits; the list page links to it; a screenshot is taken."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (make setup installs Debian's chromium)")
    seen = _ids(traced.admin, "bob@lab.test")
    for _ in range(2):
        assert curl(lab, traced.gw.url + "/owa/", "bob").stdout.endswith("200")
    second, _first = _new_traces(traced.admin, seen, 2, "bob@lab.test")
    page = f"{traced.admin}/trace/{second['id']}"
    dom = _chromium(tmp_path / "profile", "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert '<svg id="sequence"' in html
    for actor in ("device", "gateway", "kdc", "backend"):
        assert f'class="lifeline" data-actor="{actor}"' in html
    for step in ("s4u2self", "s4u2proxy"):
        assert f'data-step="{step}" data-from="gateway" data-to="kdc" data-cached="true"' in html
        assert f'data-step="{step}" data-from="kdc" data-to="gateway" data-cached="true"' in html
    assert html.count("cache hit</text>") == 2
    assert 'data-step="backend" data-from="gateway" data-to="backend"' in html
    assert "HTTP/cas.lab.test" in html

    index = _chromium(tmp_path / "profile", "--dump-dom", traced.admin + "/")
    assert f'href="/trace/{second["id"]}"' in index.stdout

    shot = tmp_path / "trace.png"
    done = _chromium(tmp_path / "profile", f"--screenshot={shot}", page)
    assert done.returncode == 0, done.stderr[-2000:]
    width, height, distinct = _png_facts(shot)
    assert (width, height) == (1200, 900)
    assert shot.stat().st_size > 30_000
    assert distinct > 32  # a drawing, not a blank page


def test_the_page_shows_each_tickets_authtime_and_flags_as_delegation_flow_reads_them(
    lab: LabLayout, traced: Traced
) -> None:
    """The trace page of a real request, read as docs/delegation-flow.md reads a trace: each ticket's authtime (the
    gateway's own TGT's, the same in the evidence and the service ticket, no later than either's start) and its flags
    by name and as 0x40090000 (the page showed neither: a learner found the doc's authtime only in the JSON)."""
    seen = _ids(traced.admin, "carol@lab.test")
    assert curl(lab, traced.gw.url + "/owa/", "carol").stdout.endswith("200")
    (record,) = _new_traces(traced.admin, seen, 1, "carol@lab.test")
    stages = _stages(record)
    status, page = _get(f"{traced.admin}/trace/{record['id']}")
    assert status == 200, page
    shown = [
        dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]*)</dd>", dl))
        for dl in re.findall(r'<dl class="facts">(.*?)</dl>', page)
    ]
    assert len(shown) == 2, page  # the evidence ticket's facts, then the service ticket's
    for name, facts in zip(("s4u2self", "s4u2proxy"), shown, strict=True):
        assert facts["authtime"] == stages[name]["authtime"]
        assert facts["authtime"] <= facts["start"] == stages[name]["start"]
        assert facts["flags"] == "forwardable, transited-policy-checked, enc-pa-rep (0x40090000)"
    assert stages["s4u2self"]["authtime"] == stages["s4u2proxy"]["authtime"]


def test_trace_command_prints_and_follows_one_users_requests(lab: LabLayout, traced: Traced) -> None:
    """`kcd-proxy trace --config F --user U --json` prints that user's records; with --follow it prints a new
    request of theirs as it happens, and nobody else's."""
    seen = _ids(traced.admin, "alice@lab.test")
    curl(lab, traced.gw.url + "/owa/", "alice")
    _new_traces(traced.admin, seen, 1, "alice@lab.test")  # recorded, so `trace --limit 1` shows this request
    env = {**os.environ, **lab.env()}
    base = [sys.executable, "-m", "proxy", "trace", "--config", str(traced.config), "--user", "alice@lab.test"]
    once = subprocess.run(
        [*base, "--json", "--limit", "1"], capture_output=True, text=True, cwd=REPO, env=env, timeout=30, check=False
    )
    assert once.returncode == 0, once.stderr
    (line,) = once.stdout.splitlines()
    assert json.loads(line)["upn"] == "alice@lab.test"

    follow = subprocess.Popen(
        [*base, "--follow", "--limit", "1", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert follow.stdout is not None

    def read() -> None:
        for line in follow.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert "alice@lab.test" in lines.get(timeout=WAIT)  # the last request before following: its baseline
        curl(lab, traced.gw.url + "/owa/", "bob")
        curl(lab, traced.gw.url + "/EWS/Exchange.asmx", "alice")
        shown = ""
        deadline = time.monotonic() + WAIT
        while "  backend" not in shown.partition("/EWS/Exchange.asmx")[2] and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                shown += lines.get(timeout=0.5)
        assert "GET /EWS/Exchange.asmx alice@lab.test (alice@LAB.TEST)" in shown
        assert "s4u2proxy" in shown
        assert "from the cache" in shown
        assert "bob@lab.test" not in shown
    finally:
        follow.terminate()
        follow.wait(timeout=10)
        reader.join(timeout=5)
        follow.stdout.close()


def test_trace_command_prints_a_revoked_certificates_refusal_without_an_invented_source(
    lab: LabLayout, traced: Traced
) -> None:
    """`kcd-proxy trace` of the README's revoked curl prints the refusal's reason alone on the revocation line: since
    the refusal notes its `revocation` verdict, it printed "— revoked from no source" after a reason naming the CRL."""
    seen = _ids(traced.admin)
    users = lab.pki_dir / "users"
    status, body = curl_with(lab, traced.gw, users / "revoked.pem", users / "revoked.key")
    assert status == 403, body
    (record,) = _new_traces(traced.admin, seen, 1)
    assert _stages(record)["revocation"]["status"] == "revoked"  # the verdict stays in the record
    env = {**os.environ, **lab.env()}
    cmd = [sys.executable, "-m", "proxy", "trace", "--config", str(traced.config), "--limit", "1"]
    shown = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=30, check=False)
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.lstrip().startswith("revocation"))
    assert line.endswith(f"REFUSED: {body.strip()}"), shown.stdout


def test_trace_command_prints_no_terminal_control_sequence_a_client_sent(lab: LabLayout, traced: Traced) -> None:
    """A device's path with escape sequences (`%1B]0;...%07` sets the terminal's title, `%1B[2J` clears the screen,
    `%1B[1A` moves up to overwrite the line above) is refused with 400, but its trace keeps the decoded path: `kcd-proxy
    trace` prints it with every control character shown as an escape (`\\x1b`), never raw to the admin's terminal."""
    seen = _ids(traced.admin, None)
    attack = "/owa/%1B]0;pwned%07%1B[2J%1B[1A%0D%1B[32mPASS%9B2J%7F"
    answer = raw_request(lab, traced.gw.port, f"GET {attack} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.status == 400
    (record,) = _new_traces(traced.admin, seen, 1)
    assert "\x1b" in record["path"]  # the trace keeps what was sent (JSON escapes it)
    env = {**os.environ, **lab.env()}
    shown = subprocess.run(
        [sys.executable, "-m", "proxy", "trace", "--config", str(traced.config), "--limit", "1"],
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode("utf-8", errors="surrogateescape")  # a raw byte 0x9b (8-bit CSI) shows as \udc9b
    assert record["id"] in text
    controls = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 or "\ud800" <= c <= "\udfff"]
    assert controls == []
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in text


def test_trace_command_prints_no_control_sequence_from_what_answered_on_the_admin_port(tmp_path: Path) -> None:
    """Whatever answers on the admin port (a program of another local user that took it while the gateway was
    down) is not the operator's terminal's master: its error body's escape sequences go to stderr as `\\x1b`."""

    async def hostile(_request: web.Request) -> web.Response:
        return web.Response(status=500, text="\x1b]0;pwned\x07\x1b[2J\x1b[1Aall is well")

    async def run() -> subprocess.CompletedProcess[bytes]:
        app = web.Application()
        app.router.add_get("/traces", hostile)
        async with serving(app) as url:
            argv = [sys.executable, "-m", "proxy", "trace", "--admin", url]
            proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=PIPE, stderr=PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)

    done = asyncio.run(run())
    assert done.returncode == 1
    text = done.stderr.decode("utf-8", errors="surrogateescape")
    assert "pwned" in text
    assert [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0] == []


def test_unicode_separators_and_bidi_controls_a_client_sent_show_as_escapes(lab: LabLayout, traced: Traced) -> None:
    """A device's path with U+202E (right-to-left override: the rest of the line is drawn reversed, so `exe.txt`
    reads `txt.exe` and a status can be made to read as another), U+2066 (an isolate), U+200B (zero width) and
    U+2028 (line separator): `kcd-proxy trace` and the admin's pages show each as an escape (`\\u202e`), never raw,
    so what the operator reads is what the device sent."""
    seen = _ids(traced.admin, None)
    attack = "/owa/%E2%80%AEexe.txt%E2%81%A6%E2%80%8B%E2%80%A8done"
    answer = raw_request(lab, traced.gw.port, f"GET {attack} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.status in (200, 400, 404)
    (record,) = _new_traces(traced.admin, seen, 1)
    sneaky = ("\u202e", "\u2066", "\u200b", "\u2028")
    assert all(c in record["path"] for c in sneaky)  # the trace keeps what was sent (JSON escapes it)
    shown = subprocess.run(
        [sys.executable, "-m", "proxy", "trace", "--config", str(traced.config), "--limit", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **lab.env()},
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert record["id"] in shown.stdout
    assert [c for c in sneaky if c in shown.stdout] == []
    assert "\\u202eexe.txt\\u2066\\u200b\\u2028done" in shown.stdout
    for page in ("/", f"/trace/{record['id']}"):
        status, html = _get(traced.admin + page)
        assert status == 200
        assert [c for c in sneaky if c in html] == [], page
        assert "\\u202eexe.txt" in html, page


def test_trace_command_stops_reading_an_answer_larger_than_it_asked_for() -> None:
    """Whatever answers on the admin port cannot make `kcd-proxy trace` read without bound: a well-formed list far
    larger than `--limit` records can be (20 MiB for one record) and an answer that never ends each end the command
    with exit 1 and an error naming the size it stopped at and `--limit`, not a read to the end (or forever)."""
    record = {"id": "0" * 16, "path": "/" + "a" * 10_000, "stages": []}
    huge = json.dumps([record] * 2_000).encode()

    async def large(_request: web.Request) -> web.Response:
        return web.Response(body=huge, content_type="application/json")

    async def endless(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        await answer.write(b"[")
        while True:  # until the command hangs up
            await answer.write(json.dumps(record).encode() + b",")

    async def run(handler: Any) -> subprocess.CompletedProcess[bytes]:
        app = web.Application()
        app.router.add_get("/traces", handler)
        async with serving(app) as url:
            argv = [sys.executable, "-m", "proxy", "trace", "--admin", url, "--limit", "1"]
            proc = await asyncio.create_subprocess_exec(*argv, cwd=REPO, stdout=PIPE, stderr=PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)

    for handler in (large, endless):
        done = asyncio.run(run(handler))
        assert done.returncode == 1, (handler.__name__, done.returncode, done.stderr[-500:])
        assert done.stdout == b"", handler.__name__
        assert b"--limit" in done.stderr, (handler.__name__, done.stderr[-500:])
        assert b"bytes" in done.stderr, (handler.__name__, done.stderr[-500:])


def test_trace_fetch_gives_up_on_an_answer_that_trickles() -> None:
    """An answer that comes a byte at a time, each within the socket's timeout, ends `trace`'s read once its
    deadline has passed (2 s here), not when (or if) the answer ends."""
    from proxy.ops.trace_cli import AdminUnreachable, fetch

    async def trickle(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        while True:
            await answer.write(b" ")
            await asyncio.sleep(0.2)  # the scenario: a byte now and then, never a silence the timeout would end

    async def run() -> tuple[float, str]:
        app = web.Application()
        app.router.add_get("/traces", trickle)
        async with serving(app) as url:
            start = time.monotonic()
            try:
                await asyncio.to_thread(fetch, url, limit=1, user=None, context=None, seconds=2)
            except AdminUnreachable as e:
                return time.monotonic() - start, str(e)
            raise AssertionError("the trickling answer was read to an end")

    took, error = asyncio.run(run())
    assert "2 s" in error, error
    assert took < 30, took


def test_a_failing_export_is_logged_once_per_streak_and_counted(lab: LabLayout, tmp_path: Path) -> None:
    """`[traces] export` on a full disk (/dev/full: every write fails with ENOSPC): requests are served, the first
    failure logs `trace_export_failed` naming the file and the error, the next ones of the streak log nothing more,
    and `/metrics` counts each (`kcd_trace_export_errors_total`). Failed before: nothing said so (the count was read
    by nothing)."""
    admin_port = free_port()
    extra = f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n\n[traces]\nexport = "/dev/full"\n'
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    try:
        mark = gw.mark()
        for _ in range(3):
            res = curl(lab, gw.url + "/owa/", "alice")
            assert res.stdout.endswith("\n200"), res
        failed = gw.wait_event("trace_export_failed")
        assert failed["path"] == "/dev/full"
        assert "No space left on device" in failed["error"], failed

        def counted() -> float | None:
            text = _get(f"http://127.0.0.1:{admin_port}/metrics")[1]
            value = sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "kcd_trace_export_errors_total"
            )
            return value if value >= 3 else None

        assert eventually(counted, "three failed exports counted")
        assert len(gw.events("trace_export_failed", mark)) == 1  # once for the streak
    finally:
        assert gw.stop() == 0


class _SlowKdc:
    """A TCP relay to the lab's KDC that holds each of the KDC's answers `delay` seconds: every KDC exchange through it
    takes at least that long, and so does nothing else."""

    def __init__(self, kdc_port: int, delay: float) -> None:
        self._kdc, self._delay = kdc_port, delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closing = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            kdc = socket.create_connection(("127.0.0.1", self._kdc))
            asked = threading.Event()
            threading.Thread(target=self._pump, args=(client, kdc, asked, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(kdc, client, asked, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, asked: threading.Event, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not answers:
                    asked.set()
                elif asked.is_set():  # the first bytes of an answer: held, once per request
                    asked.clear()
                    time.sleep(self._delay)  # the KDC's slowness itself, not a wait for an event
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closing.set()
        stop_listening(self._server)


def test_s4u2proxys_time_is_its_kdc_exchange_not_a_wait_for_a_thread(lab: LabLayout, tmp_path: Path) -> None:
    """Against a KDC whose every answer takes DELAY s, with one KDC thread (`max_in_flight = 1`), two new users at once:
    the one that waited for the other's exchange spent about 2 * DELAY in the Kerberos stage before its own began.
    Each trace's S4U2Proxy time is its own exchange (at least DELAY, under 2 * DELAY) and S4U2Self + S4U2Proxy fit in
    the request. Before, S4U2Proxy's was the stage less S4U2Self: the wait for the thread counted as S4U2Proxy's."""
    delay = 1.0
    kdc = _SlowKdc(lab.kdc_port, delay)
    krb5 = tmp_path / "krb5.conf"
    krb5.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", f"127.0.0.1:{kdc.port}"))
    admin_port = free_port()
    text = lab_config(lab, port=free_port(), krb5_conf=krb5, extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    text = text.replace("[kerberos]\n", "[kerberos]\nmax_in_flight = 1\nkdc_timeout = 30\n", 1)
    gw = start_gateway(lab, tmp_path / "gw", text)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        users = []
        for _ in range(3):
            name = f"sp{uuid.uuid4().hex[:8]}"
            _kadmin(lab, f"addprinc -randkey {name}")
            users.append((name, *_certificate_for(lab, name, tmp_path)))
        warm, *pair = users
        assert curl_with(lab, gw, warm[1], warm[2])[0] == 200  # the gateway's own TGT, out of the way
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda c=cert, k=key: statuses.append(curl_with(lab, gw, c, k)[0]))
            for _, cert, key in pair
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200, 200]
        records = [_new_traces(admin, set(), 1, f"{name}@lab.test")[0] for name, _, _ in pair]
        waited = []
        for record in records:
            stages = _stages(record)
            self_ms, proxy_ms = stages["s4u2self"]["ms"], stages["s4u2proxy"]["ms"]
            assert stages["s4u2proxy"]["cached"] is False
            assert delay * 1000 <= proxy_ms < 2 * delay * 1000, record
            assert self_ms + proxy_ms <= record["ms"], record
            waited.append(record["ms"] - self_ms - proxy_ms)
        assert max(waited) >= delay * 1000, records  # one did wait for the other's exchange (the case at hand)
    finally:
        assert gw.stop() == 0
        kdc.close()
