"""The lab's daemons in the foreground: what a container runs, and what `kcd-proxy lab up` spawns.

`kcd-proxy lab serve kdc|backend|crl` runs one part of the lab until SIGTERM or SIGINT, with the layout
that `KCD_LAB_*` variables describe (`LabLayout.from_env`). The docker compose services run exactly
these commands, and `lab up` (`proxy.lab.runner`) starts the native lab through them too, so the
integration tests exercise the code the containers run.

- `kdc`: `proxy.lab.kdc.ensure_realm` (provisions the LDAP-backed realm on first use, starts slapd and
  krb5kdc, which fork into the background), then watches both. It stops them on SIGTERM and exits 0; if
  one of them dies it stops the other and exits 1, so a container restarts whole.
- `backend`: the Exchange stand-in, `proxy.lab.backend`, on `bind_host:backend_port` with the lab's keytab.
- `crl`: a plain HTTP server publishing the CRLs (and nothing else: the PKI directory holds keys).
- `dc`: the compose lab's Samba AD DC (profile `ad`, `proxy.lab.ad_compose.serve_dc`): provisions `AD.TEST` on
  first use, then becomes `samba` in the foreground. Its probe: the KDC answers an AS-REQ for an unknown client
  "client not found" (it reads its database), and LDAP's port accepts connections.

`kcd-proxy lab probe kdc|backend|crl|gateway` is the containers' health check, and what `lab up` waits for: it
asks the part a real question (slapd an LDAP search, the KDC an AS-REQ, see `proxy.lab.readiness`; the backend
`GET /healthz`, the CRL server `GET /issuing.crl`, the gateway's admin listener `GET /readyz`, each answering 200
with a body) and exits 0, or prints what is wrong and exits 1.
"""

from __future__ import annotations

import functools
import http.client
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

from proxy.lab import kdc, readiness
from proxy.lab.layout import LabLayout

COMPONENTS = ("kdc", "backend", "crl", "dc")
PROBES = (*COMPONENTS, "gateway")
AD_REALM = "AD.TEST"  # proxy.lab.ad.REALM, not imported here (cryptography): the dc's probe stays light
_WATCH_INTERVAL = 1.0  # seconds between two looks at slapd and krb5kdc


def serve(layout: LabLayout, component: str) -> int:
    """Run one part of the lab in the foreground; its exit code."""
    return {"kdc": serve_kdc, "backend": serve_backend, "crl": serve_crl, "dc": serve_dc}[component](layout)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def _say(message: str) -> None:
    print(f"lab {message}", flush=True)


def serve_kdc(layout: LabLayout) -> int:
    stop = _stop_on_signals()  # before provisioning: a stop request then waits for it, then stops the realm
    try:
        kdc.ensure_realm(layout)
    except kdc.RealmError as exc:
        print(f"lab kdc: {exc}", file=sys.stderr, flush=True)
        return 1
    _say(f"kdc: realm up, KDC on {layout.bind_host}:{layout.kdc_port}, keytabs in {layout.keytab_dir}")
    code = 0
    while not stop.wait(_WATCH_INTERVAL):
        down = [name for name, up in kdc.realm_status(layout).items() if not up]
        if down:
            print(f"lab kdc: {', '.join(down)} stopped; stopping the realm", file=sys.stderr, flush=True)
            code = 1
            break
    kdc.stop_realm(layout)
    _say("kdc: realm stopped")
    return code


def serve_backend(layout: LabLayout) -> int:
    from proxy.lab import backend  # imports gssapi: only this part needs it

    return backend.main(
        [
            "--keytab",
            str(layout.backend_keytab),
            "--bind",
            f"{layout.bind_host}:{layout.backend_port}",
            "--krb5-config",
            str(layout.krb5_conf),
            "--rcache",
            str(layout.run_dir / "cas.rcache2"),
        ]
    )


def serve_dc(layout: LabLayout) -> int:
    from proxy.lab import ad_compose  # the AD lab's code imports cryptography: not at the top (proxy.lab.probe)

    return ad_compose.serve_dc(layout)


def serve_crl(layout: LabLayout) -> int:
    from proxy.lab import runner  # not at the top: `probe`, the containers' health check, stays light (proxy.lab.probe)

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(runner.publish_dir(layout)))
    with ThreadingHTTPServer((layout.bind_host, layout.crl_port), handler) as server:
        stop = _stop_on_signals()

        def shut_down_on_signal() -> None:
            stop.wait()
            server.shutdown()

        threading.Thread(target=shut_down_on_signal, daemon=True).start()
        _say(f"crl: serving {runner.publish_dir(layout)} on {layout.bind_host}:{layout.crl_port}")
        server.serve_forever()
    return 0


def probe(layout: LabLayout, component: str) -> str | None:
    """None if the part works, else what is wrong."""
    host = layout.local_host
    if component == "kdc":  # an LDAP search of slapd, an AS-REQ to the KDC (proxy.lab.readiness)
        problems = [problem for problem in kdc.realm_answers(layout).values() if problem]
        return " / ".join(problems) if problems else None
    if component == "dc":  # the compose lab's Samba DC (profile ad): an AS-REQ answered "client not found", LDAP's port
        problems = [p for p in (readiness.kdc_answers(host, 88, AD_REALM), _port_closed(host, 389)) if p]
        return " / ".join(problems) or None
    if component == "gateway":  # its admin listener's readiness: no TLS handshake left half-done in its log
        url = f"http://127.0.0.1:{layout.admin_port}/readyz"
    else:
        port, path = {"backend": (layout.backend_port, "/healthz"), "crl": (layout.crl_port, "/issuing.crl")}[component]
        url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (an http:// URL made above)
            if response.status == 200 and response.read():
                return None
            return f"{url} answered {response.status} with no body"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {exc}"
    except http.client.HTTPException as exc:  # something answered, not in HTTP (another daemon holds the port)
        return f"{url}: not an HTTP answer ({type(exc).__name__})"


def _port_closed(host: str, port: int) -> str | None:
    """None if `host:port` accepts a TCP connection, else why not."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"{host}:{port}: {exc}"
    return None
