"""A scripted ActiveSync device: a client certificate, an OPTIONS and a POST, and what the backend saw.

    python -m proxy.lab.device --url https://proxy.lab.test:8443 \\
        --cert alice.pem --key alice.key --cacert root.pem

It does what a phone does first against Exchange, over one kept-alive TLS connection that presents the
certificate: `OPTIONS /Microsoft-Server-ActiveSync` (which protocol versions does the server speak?),
then a `POST ...?Cmd=FolderSync` with a WBXML content type and a small body. It prints both statuses and
the lab backend's JSON echo of the POST: the principal the backend authenticated through Negotiate,
the method, the path and the body's digest. It exits 0 when both answers are 2xx and the POST's echo
names a principal, else 1 with the gateway's reason (a refused certificate ends in the TLS handshake;
a refused identity is a 403 with a one-line reason). The docker compose `device` service runs it; it
works as well against the native lab (`kcd-proxy lab up` and a gateway).

It trusts only `--cacert` for the gateway's certificate and checks the host name, as a device does.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

ACTIVESYNC = "/Microsoft-Server-ActiveSync"
DEVICE_ID = "KCDLABDEVICE0001"
DEVICE_TYPE = "KcdLab"
PROTOCOL_VERSION = "14.1"
# The start of a FolderSync request in WBXML (version 1.3, public id 1, UTF-8, code page 7, FolderSync, SyncKey "0").
FOLDER_SYNC_BODY = bytes.fromhex("03016a00000756520330000101")


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m proxy.lab.device", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the gateway, e.g. https://proxy.lab.test:8443")
    p.add_argument("--cert", required=True, help="the device's certificate (PEM)")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--cacert", required=True, help="the CA that issued the gateway's certificate (PEM)")
    p.add_argument("--user", default="device", help="the ActiveSync User= query parameter (informational)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds per request (default 20)")
    return p.parse_args(argv)


def tls_context(cert: str, key: str, cacert: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cacert)
    ctx.load_cert_chain(cert, key)
    return ctx


def _request(conn: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None) -> Answer:
    headers = {
        "User-Agent": "kcd-lab-device/1.0",
        "MS-ASProtocolVersion": PROTOCOL_VERSION,
        "Accept": "*/*",
    }
    if body is not None:
        headers["Content-Type"] = "application/vnd.ms-sync.wbxml"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return Answer(response.status, response.reason, dict(response.getheaders()), response.read())


def run(url: str, ctx: ssl.SSLContext, *, user: str = "device", timeout: float = 20.0) -> tuple[Answer, Answer]:
    """OPTIONS then POST on one connection; raises OSError/ssl.SSLError if the gateway refuses the handshake."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"expected https://host[:port], got {url!r}")
    conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, context=ctx, timeout=timeout)
    try:
        options = _request(conn, "OPTIONS", ACTIVESYNC)
        query = f"Cmd=FolderSync&User={user}&DeviceId={DEVICE_ID}&DeviceType={DEVICE_TYPE}"
        post = _request(conn, "POST", f"{ACTIVESYNC}?{query}", FOLDER_SYNC_BODY)
    finally:
        conn.close()
    return options, post


def report(options: Answer, post: Answer) -> tuple[list[str], bool]:
    """Lines to print, and whether the device got through."""
    lines = [f"OPTIONS {ACTIVESYNC}: {options.status} {options.reason}"]
    if versions := options.headers.get("MS-ASProtocolVersions"):
        lines.append(f"  MS-ASProtocolVersions: {versions}")
    lines.append(f"POST {ACTIVESYNC}?Cmd=FolderSync: {post.status} {post.reason}")
    ok = 200 <= options.status < 300 and 200 <= post.status < 300
    try:
        echo = json.loads(post.body)
    except ValueError:
        echo = None
    if isinstance(echo, dict) and echo.get("principal"):
        sent = hashlib.sha256(FOLDER_SYNC_BODY).hexdigest()
        lines.append(f"  the backend saw: {echo['principal']} via {echo.get('auth_type')}")
        lines.append(f"  body intact: {echo.get('body_sha256') == sent}")
        lines.append(json.dumps(echo, indent=2, sort_keys=True))
    else:
        ok = False
        refused = post.headers.get("X-KCD-Refused-Stage")
        text = post.body.decode("utf-8", "replace").strip()
        lines.append(f"  refused at {refused}: {text}" if refused else f"  no echo from the backend: {text[:500]}")
    return lines, ok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ctx = tls_context(args.cert, args.key, args.cacert)
        options, post = run(args.url, ctx, user=args.user, timeout=args.timeout)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: e.g. the gateway's TLS alert
        print(f"device: {args.url}: {exc}", file=sys.stderr)
        return 1
    lines, ok = report(options, post)
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
