"""A keep-alive connection's later requests take the certificate stages' outcome from its first request
(`proxy.pipeline.again`); these attack that memory with what can change between two requests on one connection:
a CRL that stops being current, a reload that changes the restrictions, and the summary line it must still write
as the full stages write it. (A CRL revoking the certificate on an open connection: `test_revocation`; the
certificate's notAfter passing: `test_connection_certificate`; a directory change for a held user:
`test_ad_held_mapping`, whose mapping stage runs on every request.)"""

from __future__ import annotations

import http.client
import itertools
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway

LIFE = 8  # seconds from its publication to the short-lived CRL's nextUpdate: time for a reload and a first request


def _get(conn: http.client.HTTPSConnection) -> tuple[int, str, str | None]:
    conn.request("GET", "/owa/")
    answer = conn.getresponse()
    return answer.status, answer.read().decode(errors="replace"), answer.getheader("X-KCD-Refused-Stage")


def _local(conn: http.client.HTTPSConnection) -> object:
    assert conn.sock is not None
    return conn.sock.getsockname()


def _reload(gw: Gateway, text: str) -> None:
    gw.mark()
    gw.config_path.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_event("reloaded")


def test_a_crl_that_stops_being_current_refuses_the_open_connection_at_its_next_update(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The issuing CA's only CRL reaches its nextUpdate while alice's keep-alive connection is open (revocation
    "require", nothing refreshed meanwhile): her next request on that connection is refused at the revocation stage
    instead of being served on the verdict her connection's first request got.

    The short-lived CRL is put in force by a reload once the gateway runs and the connection is open (a reload makes
    a new gateway: the connection's next request is its first there): written before the start, its LIFE of 8 s ran
    out before a slow start served the first request (403 for it, on a loaded machine). Where the reload and that
    request still take longer than the CRL's life, it is published again with twice the life."""
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    issuing = write_crl(tmp_path / "issuing.pem", issuing_ca)  # current for a day: the start may take its time
    crls = f'crls = ["{lab.pki_dir / "root.crl"}", "{issuing}"]'
    text = lab_config(lab, port=free_port()).replace(f'crls = ["{lab.pki_dir / "crls.pem"}"]', crls)
    assert crls in text
    gw = start_gateway(lab, tmp_path, text)
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, "alice"), timeout=30)
    try:
        assert _get(conn)[0] == 200
        local = _local(conn)
        life, deadline = LIFE, time.monotonic() + 300
        for number in itertools.count(1001):  # each publication newer than the last (a CRL number never goes back)
            next_update = (datetime.now(UTC) + timedelta(seconds=life)).replace(microsecond=0)  # as the CRL has it
            write_crl(tmp_path / "issuing.new", issuing_ca, next_update=next_update, number=number).replace(issuing)
            _reload(gw, text)
            taken = [e for e in gw.events("crl_loaded", gw.since) if e.get("source") == str(issuing)]
            if [e.get("crl_number") for e in taken] == [number]:
                answer = _get(conn)
                if answer[0] == 200:
                    break  # served on the short-lived CRL: this connection's first request on the new gateway
                assert datetime.now(UTC) > next_update, f"refused while the CRL was current: {answer}"
            assert time.monotonic() < deadline, "no reload put the short-lived CRL in force in time"
            life *= 2  # read or asked for past its nextUpdate: the machine is slower than that life
        served = 1
        while (answer := _get(conn))[0] == 200:
            assert datetime.now(UTC) <= next_update + timedelta(seconds=1), "served on a CRL past its nextUpdate"
            assert time.monotonic() < deadline
            served += 1
            time.sleep(0.2)
        assert _local(conn) == local  # one TCP (and TLS) connection all along
        assert (answer[0], answer[2]) == (403, "revocation"), answer
        assert datetime.now(UTC) > next_update
        assert served >= 2  # the connection's later requests were served from its memory before
    finally:
        conn.close()
        assert gw.stop() == 0


def test_a_reload_between_two_requests_on_one_connection_decides_the_restriction_anew(
    lab: LabLayout, tmp_path: Path
) -> None:
    """On one keep-alive connection of alice: served with no restriction, then (reloaded) admitted by a rule that
    names every lab user, then (reloaded again) refused by a rule that admits only bob: each request is judged by
    the configuration in force, not by what the connection's first request was told. Revocation is off: its
    evidence is then the same on both sides of a reload, and nothing but the configuration tells them apart."""
    crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"'
    text = lab_config(lab, port=free_port()).replace(crls, 'revocation = "off"')
    assert 'revocation = "off"' in text
    gw = start_gateway(lab, tmp_path, text)
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, "alice"), timeout=30)
    try:
        gw.mark()
        assert _get(conn)[0] == 200
        assert _get(conn)[0] == 200  # the connection's memory in use
        assert gw.wait_events("request", 2)[-1]["restriction"] is None
        local = _local(conn)

        _reload(gw, text + '\n[[client_certificates.restrictions]]\nname = "lab users"\nsubject = "CN=*"\n')
        gw.mark()
        assert _get(conn)[0] == 200
        assert gw.wait_event("request", upn="alice@lab.test")["restriction"] == "lab users"

        _reload(gw, text + '\n[[client_certificates.restrictions]]\nname = "bob only"\nsubject = "CN=bob*"\n')
        status, body, stage = _get(conn)
        assert (status, stage) == (403, "certificate"), body
        assert "bob only" in body
        assert _local(conn) == local  # one TCP (and TLS) connection all along
    finally:
        conn.close()
        assert gw.stop() == 0


def test_a_connections_later_requests_write_the_summary_line_of_its_first(lab: LabLayout, tmp_path: Path) -> None:
    """Three requests on one keep-alive connection: the later ones' summary lines have the first one's fields in the
    same order, the same certificate, TLS, revocation and identity facts, and the same stage times."""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, "alice"), timeout=30)
    try:
        gw.mark()
        for _ in range(3):
            assert _get(conn)[0] == 200
        first, *later = gw.wait_events("request", 3)[-3:]
        constant = [*("tls_version", "tls_cipher", "tls_resumed", "cert_subject", "cert_issuer", "cert_serial")]
        constant += ["restriction", "revocation", "revocation_source", "upn", "principal", "identity_source"]
        assert first["cert_subject"]
        assert first["revocation"] == "good"
        for line in later:
            assert list(line) == list(first)
            assert [line[name] for name in constant] == [first[name] for name in constant]
            assert list(line["ms"]) == list(first["ms"])
    finally:
        conn.close()
        assert gw.stop() == 0
