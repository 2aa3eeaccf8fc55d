"""Is a lab daemon ready? Asked the way a client would ask it, not by a TCP connect.

A port that accepts a connection says only that something listens there: krb5kdc listens before it can read
its database from slapd, slapd before its database is open, and a port taken by another process accepts too.
So each daemon is asked a real question, and only its answer counts:

- the KDC: an AS-REQ (RFC 4120 section 5.4.1) over TCP for a client name no realm has. A KDC that read its
  database answers KRB-ERROR KDC_ERR_C_PRINCIPAL_UNKNOWN (6); anything else (another error code, no answer, a
  closed connection) is not ready, and the answer is named. The request is built here, a few dozen bytes of
  DER, because no maintained library small enough for the lab sends a bare AS-REQ (python-gssapi goes through
  krb5.conf and the environment; impacket and minikerberos are large). The KDC logs it as an AS_REQ for
  `CLIENT_NAME` (CLIENT_NOT_FOUND), which says what it was.
- slapd: an LDAP search of the root DSE with `ldapsearch`, which must list the lab's suffix among its
  namingContexts (the database is configured and open).
- the backend and the CRL server: an HTTP GET that answers 200 with a body (`proxy.lab.serve.probe`).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
from datetime import UTC, datetime, timedelta

CLIENT_NAME = "kcd-lab-readiness-probe"  # no principal of any realm; the KDC's log shows it for what it is
KDC_ERR_C_PRINCIPAL_UNKNOWN = 6
_KRB_ERROR = 0x7E  # [APPLICATION 30]
_NT_PRINCIPAL, _NT_SRV_INST = 1, 2
_AES256, _AES128 = 18, 17
_MAX_ANSWER = 1 << 20  # a KRB-ERROR is a few hundred bytes; a longer length prefix is another protocol


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = (
        bytes([n])
        if n < 0x80
        else bytes([0x80 | len(n.to_bytes(4, "big").lstrip(b"\0"))]) + n.to_bytes(4, "big").lstrip(b"\0")
    )
    return bytes([tag]) + length + body


def _ctx(number: int, body: bytes) -> bytes:
    return _tlv(0xA0 + number, body)


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True))


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _principal(name_type: int, *parts: str) -> bytes:
    return _seq(_ctx(0, _int(name_type)), _ctx(1, _seq(*(_tlv(0x1B, p.encode()) for p in parts))))


def as_req(realm: str, client: str = CLIENT_NAME, *, now: datetime | None = None) -> bytes:
    """An AS-REQ without pre-authentication for `client`@`realm` to krbtgt/`realm` (DER)."""
    till = ((now or datetime.now(UTC)) + timedelta(hours=1)).strftime("%Y%m%d%H%M%SZ")
    body = _seq(
        _ctx(0, _tlv(0x03, b"\0\0\0\0\0")),  # kdc-options: no flags (a 32-bit BIT STRING)
        _ctx(1, _principal(_NT_PRINCIPAL, client)),
        _ctx(2, _tlv(0x1B, realm.encode())),
        _ctx(3, _principal(_NT_SRV_INST, "krbtgt", realm)),
        _ctx(5, _tlv(0x18, till.encode())),
        _ctx(7, _int(secrets.randbits(31))),
        _ctx(8, _seq(_int(_AES256), _int(_AES128))),
    )
    return _tlv(0x6A, _seq(_ctx(1, _int(5)), _ctx(2, _int(10)), _ctx(4, body)))  # [APPLICATION 10]


def _read_tlv(data: bytes, at: int) -> tuple[int, bytes, int]:
    """The (tag, body, offset after it) of the DER element at `at`; ValueError if it is cut short."""
    tag, first = data[at], data[at + 1]
    at += 2
    if first & 0x80:
        width = first & 0x7F
        length = int.from_bytes(data[at : at + width], "big")
        at += width
    else:
        length = first
    if at + length > len(data):
        raise ValueError("a DER element runs past the end of the answer")
    return tag, data[at : at + length], at + length


def krb_error_code(answer: bytes) -> int | None:
    """The error-code of a KRB-ERROR, or None if `answer` is something else (an AS-REP, say)."""
    if not answer or answer[0] != _KRB_ERROR:
        return None
    _, outer, _ = _read_tlv(answer, 0)
    _, fields, _ = _read_tlv(outer, 0)  # the SEQUENCE
    at = 0
    while at < len(fields):
        tag, body, at = _read_tlv(fields, at)
        if tag == 0xA6:  # [6] error-code
            _, value, _ = _read_tlv(body, 0)
            return int.from_bytes(value, "big", signed=True)
    raise ValueError("a KRB-ERROR without an error-code")


def kdc_answers(host: str, port: int, realm: str, timeout: float = 3.0) -> str | None:
    """None if the KDC at host:port answers an AS-REQ for an unknown client with 'client not found' (so it reads
    its database); else what it did instead."""
    request = as_req(realm)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">I", len(request)) + request)
            answer = b""
            while len(answer) < 4 or len(answer) < 4 + struct.unpack(">I", answer[:4])[0]:
                if len(answer) >= 4 and struct.unpack(">I", answer[:4])[0] > _MAX_ANSWER:
                    return f"the KDC at {host}:{port} answered something that is not Kerberos: {answer[:16]!r}"
                chunk = s.recv(65536)
                if not chunk:
                    return f"the KDC at {host}:{port} closed the connection after {len(answer)} bytes of its answer"
                answer += chunk
    except OSError as exc:
        return f"no answer from the KDC at {host}:{port}: {exc}"
    try:
        code = krb_error_code(answer[4:])
    except (ValueError, IndexError) as exc:
        return f"the KDC at {host}:{port} answered something that is not Kerberos ({exc})"
    if code == KDC_ERR_C_PRINCIPAL_UNKNOWN:
        return None
    what = "an AS-REP" if code is None else f"KRB-ERROR {code}"
    return f"the KDC at {host}:{port} answered {what} to an AS-REQ for an unknown client (expected KRB-ERROR 6)"


def ldap_answers(url: str, suffix: str, timeout: float = 5.0) -> str | None:
    """None if the LDAP server at `url` answers a root DSE search listing `suffix`; else what it did instead."""
    argv = ["ldapsearch", "-x", "-LLL", "-o", f"nettimeout={timeout:g}", "-H", url, "-b", "", "-s", "base"]
    argv.append("namingContexts")
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            check=False,
            env={**os.environ, "LDAPNOINIT": "1"},  # libldap: ignore /etc/ldap/ldap.conf, ~/.ldaprc
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ldapsearch at {url} did not run: {exc}"
    if done.returncode != 0:
        return f"{url} did not answer a root DSE search: {(done.stderr.strip() or done.stdout.strip())[:300]}"
    if f"namingContexts: {suffix}" not in done.stdout:
        return f"{url} answered, but its root DSE names no {suffix} (database not open)"
    return None
