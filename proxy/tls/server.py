"""The TLS listener: request a client certificate, and say why a handshake failed.

Theory of operation. Python's `ssl` module has no verification callback: a server that asks for a
client certificate lets OpenSSL verify it during the handshake, and a failure ends the handshake
with a TLS alert ("unknown ca", "certificate expired", "unsupported certificate purpose", "certificate
required") that curl and devices show to the user. That is the first filter. OpenSSL is given the
configured trust anchors and intermediates, and no CRLs: revocation, EKU, identity and the
authoritative chain check (built only from configured CAs, never from what the client sent) are the
certificate stage's, per request, so a certificate revoked while its device holds a connection is
refused on its next request. A chain OpenSSL verified is remembered for the context: the same certificates
presented again while they are all valid are not verified again (`proxy.tls.openssl.remember_verified_chains`;
what fails is always OpenSSL's to say, and a reload's new context starts empty).

asyncio logs failed handshakes only in debug mode, and before Python 3.15 it drops the alert OpenSSL
wrote for the client (https://github.com/python/cpython/issues/98078): the device sees a bare reset
instead of "certificate expired". So the listener accepts plain TCP and performs each handshake itself,
sending the pending alert before closing: a failed handshake is logged here with the peer's address and
OpenSSL's reason, and a connection that ends before its first byte (a health check, a scan) is only counted
(`kcd_listener_empty_connections_total`); a completed one is handed to the device-side server
(`proxy.device.server`, or aiohttp's request handler: `listener.http_server`).

For the gateway's own server the handshake is `_Handshake`'s: an `SSLObject` on two memory BIOs, stepped
on each read, one timer for `listener.handshake_timeout`, then `proxy.tls.record.TlsRecords` carries the
records (no asyncio `SSLProtocol`, no task per connection: the same path on asyncio's loop and on uvloop;
docs/performance.md, "The handshake without asyncio's SSLProtocol"). aiohttp's server keeps asyncio's
protocol, as `loop.start_tls` runs it, subclassed to send the alert (`_AlertingSSLProtocol`).

The listener accepts through `proxy.tls.limits.accept_connections`, which holds at most
`listener.max_connections` connections per worker; whichever protocol owns a connection's socket when
it closes (this gate, the TLS protocol, or the drain after a refused handshake) gives its slot back.
`listener.max_header_bytes` is enforced in front of aiohttp's parser (`proxy.tls.limits`, wired in `proxy.app`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import weakref
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast, overload

import structlog
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.addresses import host_port
from proxy.certs.chain import format_time, load_certificates, netscape_type_excludes_client
from proxy.config import Config
from proxy.errors import ConfigError
from proxy.printable import printable
from proxy.tls.openssl import (
    RefusedCertificate,
    fresh_bios,
    holds_device_bytes,
    keep_sessions,
    limit_client_chain,
    remember_verified_chains,
    take_refused_certificate,
)
from proxy.tls.record import ANSWERS_HELD, TlsRecords, unread_bytes

log = structlog.get_logger("proxy.tls")


_VERIFY_MODES = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def server_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context. Whether a client certificate is asked for follows `authentication.mode`:
    required ("certificate"), optional ("certificate-or-basic", "certificate-and-basic": a certificate
    that is presented is still verified, and a bad one still ends the handshake, so it never falls back
    to a password), or not asked for at all ("basic")."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_certificate(ctx, "listener", config.listener.certificate, config.listener.private_key, config.path)
    ctx.verify_mode = _VERIFY_MODES[config.authentication.client_certificate]
    cc = config.client_certificates
    for key, paths in (("trust_anchors", cc.trust_anchors), ("intermediates", cc.intermediates)):
        for i, path in enumerate(paths):
            try:
                load_ca_file(ctx, path)
            except ValueError as e:
                raise ConfigError([f"client_certificates.{key}[{i}]: {e} (in {config.path})"]) from None
    if _an_anchor_is_not_a_root(config):
        # An issuing CA as a trust anchor (trusting one CA of a larger PKI): OpenSSL wants a chain up to a
        # self-signed root unless told that a trusted CA may end it. The certificate stage builds the chain again
        # from the configured anchors and intermediates (proxy.certs.chain), as `explain` does, and decides.
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # The CAs a client is told to pick a certificate for: the trust anchors only.
    # No renegotiation (TLS 1.2): a connection stays tied to the certificate of its handshake, which the stages
    # judged (OpenSSL 3 refuses a client's request by default; older ones did not).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.sslobject_class = _PeerSSLObject  # the peer certificate as DER only: no dict per connection
    # One TLS 1.3 session ticket per handshake, not OpenSSL's two: OpenSSL 3.0 makes each ticket by encoding the
    # session and decoding it again, the client's certificate and its public key included, about 7% of the CPU of a
    # handshake + request here (docs/performance.md, "The handshake without asyncio's SSLProtocol"). A device
    # resumes with the latest ticket it got; each resumed handshake brings it a new one.
    ctx.num_tickets = 1
    unavailable = limit_client_chain(ctx, depth=cc.max_chain_depth, max_bytes=cc.max_chain_bytes)
    if unavailable is not None:
        log.warning("client_chain_limits_unavailable", reason=unavailable, detail="OpenSSL's defaults apply")
    _session_tickets(ctx, config.listener.tls_session_cache)
    # Last, once the trust store and the verification settings are what they will stay: a client chain OpenSSL
    # verified is not verified again for the same bytes while its certificates are valid (proxy.tls.openssl,
    # docs/performance.md "The new-connection path, a fifth look").
    if ctx.verify_mode != ssl.CERT_NONE:
        remembered = remember_verified_chains(ctx, VERIFIED_CHAINS)
        if isinstance(remembered, str):
            log.warning("verified_chains_unavailable", reason=remembered, detail="every client chain is verified")
    return ctx


@dataclass(frozen=True)
class ServedCertificate:
    """The listener's own certificate as a TLS context took it: its file and the leaf's notAfter (`/readyz`)."""

    path: Path
    not_after: datetime

    @classmethod
    def of(cls, config: Config) -> ServedCertificate:
        """The leaf of `listener.certificate` (read again after `server_context` loaded it: the same file)."""
        path = config.listener.certificate
        return cls(path, load_certificates(path)[0].not_valid_after_utc)

    def problem(self, now: datetime) -> str | None:
        """Why no device's handshake can succeed (the certificate is past its notAfter), or None."""
        if now <= self.not_after:
            return None
        return (
            f"{self.path}: the listener's certificate expired on {format_time(self.not_after)}, so every device's TLS "
            "handshake fails; put a renewed certificate (and its key) in listener.certificate and "
            "listener.private_key, then reload (SIGHUP)"
        )


VERIFIED_CHAINS = 4096  # client chains remembered per context (about 100 bytes each)
# The address a connection's requests see when a PROXY header relayed a device without naming it (v1 UNKNOWN, v2
# UNSPEC): not an address, so nothing counts it as one; `proxy.app` refuses its requests.
UNNAMED = ("unknown", 0)


def _session_tickets(ctx: ssl.SSLContext, sessions: int) -> None:
    """Stateful session tickets with `sessions` (> 0) kept per worker: the session stays in the context's cache and
    the ticket only names it. A stateless ticket (OpenSSL's default, `sessions` = 0) seals the whole session in the
    ticket, and OpenSSL 3.0 makes it by encoding the session, decoding it again (the client's certificate and its
    public key through OpenSSL 3's decoders) and encoding the copy: about 170 µs of a full handshake's 700 here
    (docs/performance.md, "Stateful session tickets"). A TLS 1.2 device resumes by session ID from the same cache.
    OpenSSL forgets the session of a connection that did not end with the gateway's close_notify (a reset, an
    abort): that device's next connection is a full handshake."""
    if not sessions:
        return
    unavailable = keep_sessions(ctx, sessions)
    if unavailable is not None:  # OpenSSL's own bound (20,480) would apply: stateless tickets instead
        log.warning("tls_session_cache_unavailable", reason=unavailable, detail="stateless session tickets are sent")
        return
    ctx.options |= ssl.OP_NO_TICKET


def _an_anchor_is_not_a_root(config: Config) -> bool:
    return any(
        cert.issuer != cert.subject
        for path in config.client_certificates.trust_anchors
        for cert in load_certificates(path)
    )


def load_ca_file(ctx: ssl.SSLContext, path: Path) -> None:
    """A CA file as the configuration allows it: a PEM bundle, or DER (`cafile` reads PEM only; `cadata` given
    bytes reads DER). ValueError naming the file and the fix when OpenSSL cannot read it: cryptography's reader
    (`load_certificates`, which the other looks at the file use) passes over a damaged block OpenSSL refuses, and
    OpenSSL's own message ("[X509] PEM lib") names no file. Every CA file handed to OpenSSL goes through here: the
    device trust list's, `admin.client_ca`, and check-config's look at both (`proxy.ops.check`)."""
    data = path.read_bytes()
    try:
        if b"-----BEGIN" in data:
            ctx.load_verify_locations(cafile=path)
        else:
            ctx.load_verify_locations(cadata=data)
    except ssl.SSLError as e:
        raise ValueError(
            f"{path}: OpenSSL cannot read it ({e.reason or e}): a block in it is damaged or is no certificate (a CRL "
            "or a key?); keep only the CA certificates, in PEM or DER"
        ) from None


def load_certificate(ctx: ssl.SSLContext, table: str, certificate: Path, key: Path, config: Path) -> None:
    """A listener's certificate chain and key (`table`: "listener" or "admin"), or ConfigError naming the keys and
    the files (OpenSSL's SSLError named neither, and is an OSError the admin listener took for its bind failing)."""
    try:
        ctx.load_cert_chain(certificate, key)
    except ssl.SSLError as e:
        why = swapped(table, certificate) or f"OpenSSL refuses {certificate} with {table}.private_key {key}: {e}"
        raise ConfigError([f"{table}.certificate: {why} (in {config})"]) from None


def swapped(table: str, certificate: Path) -> str | None:
    """Why a listener's certificate file that holds a private key and no certificate is refused: most likely
    `certificate` and `private_key` were given each other's file (OpenSSL said only "[SSL] PEM lib")."""
    try:
        data = certificate.read_bytes()
    except OSError:
        return None
    if b"PRIVATE KEY-----" not in data or b"-----BEGIN CERTIFICATE-----" in data:
        return None
    return (
        f"{certificate}: holds a private key and no certificate: {table}.certificate and {table}.private_key swapped?"
    )


_LEAST_BUDGET = 0.001  # seconds: a handshake whose deadline has passed as it starts is cut at the next loop pass
LATE = 1.0  # seconds a handshake's timer may fire late before the gateway, not the device, is named as the cause


def _handshake_expired(peer: object, timeout: float, late: float) -> None:
    """`tls_handshake_abandoned` for a handshake that `listener.handshake_timeout` ended, its timer run `late` seconds
    after it was due. A timer runs late only when the event loop could not run: the gateway stopped (SIGSTOP, a
    debugger, a VM paused) or starved of CPU; then the device may have sent its flights in time, unread, and the
    event says so rather than blame a slow client."""
    reason = f"SSL handshake is taking longer than {timeout} seconds: aborting the connection"
    if late >= LATE:
        reason += (
            f"; the gateway's event loop ran the timer {late:.1f} s late (the gateway was stopped or starved of CPU):"
            " the client may not have been slow"
        )
    log.info("tls_handshake_abandoned", peer=peer_text(peer), reason=reason, loop_late_seconds=round(max(late, 0), 3))


def handshake_reason(exc: BaseException) -> str:
    """OpenSSL's words for a failed handshake, as plain as they come."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__


class _Drain(asyncio.Protocol):
    """Owns a socket after a failed handshake: discards what the client still sends, closes on its EOF.

    Closing at once would make the kernel answer the client's in-flight bytes (a TLS 1.3 client sends
    its request with its Finished message) with a reset, and a reset can destroy the alert before the
    client reads it. So: alert, FIN, drain until the client closes or `_LINGER` seconds pass.
    """

    def __init__(self, transport: asyncio.Transport, closed: Callable[[], None]) -> None:
        self._timer = asyncio.get_running_loop().call_later(_LINGER, transport.abort)
        self._closed = closed

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._closed()


_LINGER = 2.0


_per_thread = threading.local()


def _read_buffer(size: int) -> tuple[bytearray, memoryview]:
    """The read buffer the TLS connections of this thread's event loop share."""
    shared: tuple[bytearray, memoryview] | None = getattr(_per_thread, "buffer", None)
    if shared is None or len(shared[0]) < size:
        buffer = bytearray(size)
        shared = _per_thread.buffer = (buffer, memoryview(buffer))
    return shared


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol, but a failed handshake sends OpenSSL's fatal alert before closing.

    Workaround for https://github.com/python/cpython/issues/98078 (fixed upstream by python/cpython#153620):
    `SSLProtocol` force-closes the transport without flushing the outgoing buffer where the alert sits.
    Here the alert is flushed and the socket handed to `_Drain` for a lingering close.

    It also reads into one buffer per thread instead of one per connection. asyncio gives every TLS
    connection a 256 KiB read buffer (zero-filled, so all of it resident) and keeps it for the
    connection's life: with thousands of held long-polls that was most of the gateway's memory
    (bench/run.py). The buffer only carries bytes from `recv_into` to the TLS object's input BIO, both
    in the same synchronous call (`get_buffer`, then `buffer_updated`), so connections served by one
    event loop can share it. Reads stay 32 KiB: two full TLS records.
    """

    max_size = 32 * 1024
    received = False  # whether the client has sent a byte (an empty connection ends before its first one)
    answers_held = False  # reading stopped: OpenSSL answered the device by itself while it took none of our records
    answered = 0  # bytes OpenSSL answered by itself since the socket transport went over its high-water mark

    def __init__(self, *args: Any, closed: Callable[[], None] = lambda: None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ssl_buffer, self._ssl_buffer_view = _read_buffer(self.max_size)
        self._closed = closed

    def buffer_updated(self, nbytes: int) -> None:
        self.received = True
        super().buffer_updated(nbytes)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._closed()

    def _do_read(self) -> None:
        """asyncio's, and then: if OpenSSL wrote records of its own while reading (a KeyUpdate's answer, a refused
        renegotiation's alert) and the socket transport already holds more than its high-water mark of ours, and they
        come to more than `ANSWERS_HELD` bytes since, reading from the device stops until it has taken them
        (`resume_writing`). asyncio keeps such records in its outgoing BIO while writing is paused, and went on
        reading: a device that sent KeyUpdates asking for the gateway's and read nothing had the gateway keep every
        answer (docs/hardening.md, section 17; `TlsRecords` does the same, and says why not at the first answer)."""
        outgoing: ssl.MemoryBIO = getattr(self, "_outgoing")  # noqa: B009  asyncio's, untyped in typeshed
        before = outgoing.pending
        super()._do_read()  # type: ignore[misc]
        if getattr(self, "_ssl_writing_paused", False) and outgoing.pending > before:
            self.answered += outgoing.pending - before
            if self.answered > ANSWERS_HELD and not self.answers_held and self._transport is not None:
                self.answers_held = True
                socket_transport(self._transport).pause_reading()

    def _control_ssl_reading(self) -> None:
        """asyncio's flow control of its incoming BIO, which would resume reading, unless the answers hold it."""
        if not self.answers_held:
            super()._control_ssl_reading()  # type: ignore[misc]

    def resume_writing(self) -> None:
        super().resume_writing()
        self.answered = 0
        if self.answers_held:  # the device took our records: its own are read again
            self.answers_held = False
            if self._transport is not None and not getattr(self, "_ssl_reading_paused", False):
                socket_transport(self._transport).resume_reading()
            self._control_ssl_reading()

    def eof_received(self) -> None:
        """The device's TCP end. asyncio's protocol, when the server has paused its reading (aiohttp does once it
        holds `MAX_MSG_QUEUE_SIZE` pipelined requests), keeps the end from the server until it reads again and drops
        every answer meanwhile ("SSL connection is closed"): aiohttp served the requests it held, a backend request
        each, for a device that had left. The connection is aborted instead, so the server learns at once
        (`connection_lost`). No answer is lost: asyncio sends none after the device's end, paused or not."""
        state = getattr(self, "_state", None)  # asyncio's, untyped in typeshed
        held = state == sslproto.SSLProtocolState.WRAPPED and getattr(self, "_app_reading_paused", False)
        keep_open = super().eof_received()
        if held and self._transport is not None:
            socket_transport(self._transport).abort()
        return keep_open

    def quiet(self) -> bool:
        """Whether nothing moves on the connection (as `TlsRecords.quiet`): past the handshake and open, no byte of the
        device's waiting to be read (socket, incoming BIO, OpenSSL) and none of ours to be sent."""
        transport, sslobj = self._transport, getattr(self, "_sslobj", None)
        incoming: ssl.MemoryBIO = getattr(self, "_incoming")  # noqa: B009  asyncio's, untyped in typeshed
        outgoing: ssl.MemoryBIO = getattr(self, "_outgoing")  # noqa: B009
        return (
            transport is not None
            and sslobj is not None
            and getattr(self, "_state", None) == sslproto.SSLProtocolState.WRAPPED
            and not getattr(self, "_write_backlog", None)
            and not incoming.pending
            and not holds_device_bytes(sslobj, incoming)  # half a record included
            and not outgoing.pending
            and socket_transport(transport).get_write_buffer_size() == 0
            and unread_bytes(transport) == 0
        )

    def close_at_once(self) -> None:
        """Our close_notify, then the TCP connection closed without waiting for the device's (as
        `TlsRecords.close_at_once`; asyncio's own close waits for it up to its ssl_shutdown_timeout, 30 s). Its
        `connection_lost` tells aiohttp's handler and gives the slot back."""
        transport = self._transport
        if transport is None or getattr(self, "_state", None) != sslproto.SSLProtocolState.WRAPPED:
            return
        app_transport = getattr(self, "_app_transport", None)
        if app_transport is not None:
            app_transport._closed = True  # aiohttp's close of it is a no-op from now on
        self._set_state(sslproto.SSLProtocolState.FLUSHING)  # type: ignore[attr-defined]
        self._set_state(sslproto.SSLProtocolState.SHUTDOWN)  # type: ignore[attr-defined]
        try:
            self._sslobj.unwrap()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:  # ours is written; the device's is not awaited
            pass
        except (ssl.SSLError, ValueError):
            socket_transport(transport).abort()
            return
        self._process_outgoing()  # type: ignore[attr-defined]
        socket_transport(transport).close()

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            note_refused_certificate(handshake_exc)  # called from the do_handshake that raised it, synchronously
        transport = None if self._transport is None else socket_transport(self._transport)
        if handshake_exc is not None and transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]
                transport.set_protocol(_Drain(transport, self._closed))
                transport.write_eof()
                self._transport = None  # the drain closes it, not SSLProtocol's force-close
        super()._on_handshake_complete(handshake_exc)


class _PeerSSLObject(ssl.SSLObject):
    """The listener's TLS objects (`SSLContext.sslobject_class`): the peer certificate as DER only.

    asyncio reads the peer certificate as a dict when a handshake completes (`getpeercert()`) and keeps
    it as the transport's "peercert" for the connection's life. Nothing here reads that dict (the
    certificate stages read the DER), and it cost twice: about 2.7 KiB of every open connection (a held
    long-poll's, bench.traced) and a decode of every name in every handshake. Worse, CPython's `_ssl`
    decodes the names for it, a UPN otherName included, and a name that is not UTF-8 raised there:
    asyncio reset the connection instead of letting the certificate stages refuse it with a 403. So the
    dict form is empty (None without a certificate, as before); the DER form is unchanged."""

    @overload
    def getpeercert(self, binary_form: Literal[False] = False) -> dict[str, Any] | None: ...
    @overload
    def getpeercert(self, binary_form: Literal[True]) -> bytes | None: ...
    @overload
    def getpeercert(self, binary_form: bool) -> dict[str, Any] | bytes | None: ...
    def getpeercert(self, binary_form: bool = False) -> dict[str, Any] | bytes | None:
        der = super().getpeercert(True)
        if binary_form:
            return der
        return None if der is None else {}


class TlsGate(asyncio.Protocol):
    """Accepts a TCP connection, performs the TLS handshake, then hands over to `app_protocol`.

    An `app_protocol` that takes the TLS records (the gateway's own server) gets its handshake from `_Handshake`.
    For aiohttp's, during the handshake this object is also the TLS transport's protocol: asyncio may deliver the
    first application data (TLS 1.3 clients send their request with the Finished message) before
    `start_tls` returns, so it is held here and replayed once aiohttp's handler owns the connection.
    """

    def __init__(
        self,
        app_protocol: asyncio.Protocol,
        ctx: ssl.SSLContext,
        timeout: float,
        on_refused: Callable[[str], None] | None = None,
        closed: Callable[[], None] = lambda: None,
        on_empty: Callable[[], None] | None = None,
        on_health_check: Callable[[], None] | None = None,
    ) -> None:
        self._app = app_protocol
        self._ctx = ctx
        self._timeout = timeout
        self._on_refused = on_refused
        self._on_empty = on_empty  # counts a connection that ended before its first TLS byte (metrics)
        self._on_health_check = on_health_check  # counts the balancer's TLS checks without a certificate (metrics)
        self._health_check = False  # a PROXY v2 LOCAL connection: the balancer's own, relaying no device
        self._closed = closed  # gives the connection's slot back (proxy.tls.limits); safe to call twice
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._client: tuple[str, int] | None = None  # the device, when a balancer said so (PROXY protocol)
        self._unnamed = False  # the balancer relays a device it cannot name (PROXY UNKNOWN, UNSPEC)
        self._preread = b""
        self._started = 0.0  # the loop's time when the connection was taken: the handshake's timer starts then
        self._deadline: float | None = None  # behind a balancer: the loop's time the handshake must end by
        self._timeout_left = timeout  # seconds the handshake was given when it started (`_budget`)

    def behind_balancer(
        self,
        client: tuple[str, int] | None,
        preread: bytes,
        *,
        health_check: bool = False,
        unnamed: bool = False,
        deadline: float | None = None,
    ) -> None:
        """Before `connection_made`: the device's address from a PROXY header (None: the connection's own
        address stands), the bytes read after that header (the device's first TLS bytes), and whether the header
        was a v2 `LOCAL` one: the balancer's own connection, whose handshake without a client certificate is its
        TLS health check (HAProxy's `check-ssl`, every `inter`), not a device to refuse in the log and metrics.
        `unnamed`: the header relays a device it does not name (v1 `UNKNOWN`, v2 `UNSPEC`): its requests see the
        address `UNNAMED` (and are refused: `proxy.app`), the log of its handshake the balancer's. `deadline`: the
        loop's time `listener.handshake_timeout` after the accept, which bounds the header, a wait for a slot and the
        handshake together."""
        self._deadline = deadline
        self._client = client
        self._unnamed = unnamed
        self._preread = preread
        self._health_check = health_check

    @property
    def _budget(self) -> float:
        """Seconds the handshake may take from now (`connection_made`): `listener.handshake_timeout`, or behind a
        balancer what is left of it since the accept (a moment at least: asyncio refuses a timeout of 0)."""
        if self._deadline is None:
            return self._timeout
        return max(self._deadline - asyncio.get_running_loop().time(), _LEAST_BUDGET)

    @property
    def _app_peer(self) -> tuple[str, int] | None:
        """The address the connection's requests see, where it is not the socket's own: the device a PROXY header
        named, or `UNNAMED`."""
        return UNNAMED if self._unnamed else self._client

    def close_after_answer(self) -> bool:
        """The connection closed once the answer it is serving is sent (True), for a health check's place that has had
        its time (`proxy.tls.proxy_protocol`); False when it serves no request (its handshake not over, or between two
        requests), or while its request's body still comes (a health check sends none; served on, a body sent a byte
        at a time held the place for as long as it came): the caller resets it. HAProxy sends a v2 `LOCAL` header for
        a device it relays without IP addresses too (a frontend on a Unix socket), so a request read whole is not cut.
        aiohttp's handler closes once its request is answered (`close`: nothing pipelined after it is read), ours as
        `DeviceConnection.wind_down`."""
        app: Any = self._app
        if getattr(app, "takes_tls_records", False):
            return bool(app.close_after_answer())
        request = getattr(app, "_current_request", None)
        if request is None or not request.content.is_eof():  # aiohttp's handler answering nothing, or a body to come
            return False
        app.close()
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The TLS protocol takes the socket here, before this returns, not in the task: uvloop starts reading
        # when `connection_made` returns (a `pause_reading` here is a no-op there), and a ClientHello read
        # meanwhile would reach this gate instead of TLS, and the handshake would stall.
        self._started = asyncio.get_running_loop().time()
        self._timeout_left = self._budget
        stream = socket_transport(transport)
        peer = self._client or stream.get_extra_info("peername")
        if getattr(self._app, "takes_tls_records", False):  # the gateway's own server: the handshake is ours too
            handshake = _Handshake(self, stream, peer)
            stream.set_protocol(handshake)
            handshake.start(self._preread)
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tls_protocol = _AlertingSSLProtocol(
            loop,
            self,
            self._ctx,
            waiter,
            server_side=True,
            call_connection_made=False,
            ssl_handshake_timeout=self._timeout_left,  # typeshed says int; floats work
            closed=self._closed,
        )
        stream.set_protocol(tls_protocol)
        tls_protocol.connection_made(stream)
        if self._app_peer is not None:
            tls_protocol._extra["peername"] = self._app_peer  # what aiohttp's request.remote reports
        if self._preread:
            _feed(tls_protocol, self._preread)
        self._task = loop.create_task(self._upgrade(tls_protocol, waiter, peer))

    async def _upgrade(self, tls_protocol: _AlertingSSLProtocol, waiter: asyncio.Future[None], peer: object) -> None:
        try:
            await waiter
        except ConnectionError as exc:  # the client left mid-handshake: probes, scanners, impatient devices
            self._left(peer, exc, received=tls_protocol.received)
            return
        except (OSError, TimeoutError) as exc:
            # The TLS protocol has closed the socket, or handed it to `_Drain` after sending the alert.
            self._refused(peer, exc)
            return
        tls: asyncio.Transport = tls_protocol._app_transport
        tls.set_protocol(self._app)
        self._app.connection_made(tls)
        for chunk in self._early:
            self._app.data_received(chunk)
        self._early.clear()
        if self._early_eof:
            self._app.eof_received()

    def _left(self, peer: object, exc: BaseException, *, received: bool) -> None:
        """The device ended the connection mid-handshake: an empty connection if it reset before sending a byte,
        else an abandoned handshake (asyncio's handshake timeout, a `ConnectionAbortedError`, is one too)."""
        if isinstance(exc, ConnectionResetError) and not received:
            self._empty(peer)
        elif isinstance(exc, ConnectionAbortedError) and "taking longer than" in str(exc):  # asyncio's timer
            late = asyncio.get_running_loop().time() - self._started - self._timeout_left
            _handshake_expired(peer, self._timeout, late)
        else:
            log.info("tls_handshake_abandoned", peer=peer_text(peer), reason=handshake_reason(exc))

    def _refused(self, peer: object, exc: BaseException) -> None:
        """OpenSSL ended the handshake (its alert sent): logged with what to fix, and counted as a refusal."""
        reason = handshake_reason(exc)
        if self._health_check and NO_CERTIFICATE in reason:
            # The balancer's own check (PROXY v2 LOCAL), refused as any connection without a certificate, but logged
            # at debug level and counted apart: a warning and a refusal per check named the balancer every 2 s.
            log.debug("tls_handshake_refused", stage="tls", peer=peer_text(peer), reason=reason, health_check=True)
            if self._on_health_check is not None:
                self._on_health_check()
            return
        refused = _REFUSED_CERTIFICATES.pop(exc, None) if isinstance(exc, ssl.SSLCertVerificationError) else None
        fix = handshake_fix(reason, refused)
        about = {} if refused is None else {"certificate": _subject(refused), "depth": refused.depth}
        log.warning("tls_handshake_refused", stage="tls", peer=peer_text(peer), reason=reason, fix=fix, **about)
        if self._on_refused is not None:
            self._on_refused(reason)

    def _empty(self, peer: object) -> None:
        """A connection that ended (reset or closed) before its first TLS byte: a health check (HAProxy's end with a
        reset, often before the connection is accepted, when not even its address is left) or a port scan. Counted,
        logged at debug level only (a flood of them would otherwise flood the log), and no refusal: nothing was
        refused. `listener.max_connections` bounds how many are held at once, as any connection."""
        log.debug("connection_empty", stage="tls", peer=peer_text(peer))
        if self._on_empty is not None:
            self._on_empty()

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._early_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._closed()


class _Handshake(asyncio.BufferedProtocol):
    """The TLS handshake of a connection the gateway's own server will take (`takes_tls_records`), driven here.

    The `SSLObject` is made on two fresh memory BIOs; each read goes into the incoming one and `do_handshake`
    is called again, and whatever OpenSSL wrote (its flights, or the fatal alert of a refusal) is sent at once.
    One timer bounds the handshake (`listener.handshake_timeout`). No asyncio `SSLProtocol`, no task, no future:
    the same objects on asyncio's loop and on uvloop. What it does at each end is what `TlsGate` and
    `_AlertingSSLProtocol` do for aiohttp's server, with the same log events, reasons and counters:

    - done: the records go to `TlsRecords` on new BIOs (the handshake's flights freed), the server is given it,
      and what the device sent with its Finished message (TLS 1.3: often its request) is served;
    - refused (OpenSSL ended the handshake): its alert is sent, then FIN, and the socket goes to `_Drain`;
    - the device ended or reset the connection: an empty connection (counted) if it never sent a byte, else an
      abandoned handshake; the timeout is an abandoned handshake too, in asyncio's words ("taking longer").
    """

    __slots__ = (
        "_buffer",
        "_due",
        "_gate",
        "_incoming",
        "_outgoing",
        "_peer",
        "_received",
        "_sslobj",
        "_stream",
        "_timer",
    )

    def __init__(self, gate: TlsGate, stream: asyncio.Transport, peer: object) -> None:
        self._gate = gate
        self._stream: asyncio.Transport | None = stream  # None once the handshake has ended, however
        self._peer = peer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = gate._ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._received = False  # whether the device has sent a byte (an empty connection ends before its first)
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # the loop's time the timer is due at
        self._buffer = _read_buffer(_AlertingSSLProtocol.max_size)  # the TLS connections of this thread share it

    def start(self, preread: bytes) -> None:
        """The timeout starts; bytes read before this protocol owned the socket (after a PROXY header) go first."""
        self._timer = asyncio.get_running_loop().call_later(self._gate._timeout_left, self._expired)
        self._due = self._timer.when()
        if preread:
            self._received = True
            self._incoming.write(preread)
            self._step()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer[1]

    def buffer_updated(self, nbytes: int) -> None:
        if self._stream is None:
            return
        self._received = True
        self._incoming.write(self._buffer[1][:nbytes])
        self._step()

    def _step(self) -> None:
        stream = self._stream
        assert stream is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            if self._outgoing.pending:
                stream.write(self._outgoing.read())
            return
        except OSError as exc:  # ssl.SSLError: OpenSSL refused it, and its alert is in the outgoing BIO
            note_refused_certificate(exc)
            self._refused(stream, exc)
            return
        self._done(stream)

    def _done(self, stream: asyncio.Transport) -> None:
        self._end()
        gate = self._gate
        if self._outgoing.pending:  # the server's last flight (TLS 1.2), the session tickets (TLS 1.3)
            stream.write(self._outgoing.read())
        # The handshake's flights stay in the BIOs' buffers for the connection's life unless the BIOs are new
        # (proxy.tls.openssl.fresh_bios: 3 KiB of every held long-poll).
        incoming, outgoing = fresh_bios(self._sslobj, self._incoming, self._outgoing) or (
            self._incoming,
            self._outgoing,
        )
        records = TlsRecords(
            stream,
            self._sslobj,
            incoming,
            outgoing,
            self._buffer,
            peername=gate._app_peer,
            closed=gate._closed,
        )
        stream.set_protocol(records)
        records.set_protocol(gate._app)
        gate._app.connection_made(records)
        records.read_early()

    def _refused(self, stream: asyncio.Transport, exc: BaseException) -> None:
        """OpenSSL's alert, FIN, and a lingering drain; logged and counted as a refusal."""
        self._end()
        with contextlib.suppress(Exception):
            if self._outgoing.pending:
                stream.write(self._outgoing.read())
            stream.set_protocol(_Drain(stream, self._gate._closed))
            stream.write_eof()
        self._gate._refused(self._peer, exc)

    def _expired(self) -> None:
        self._timer = None
        stream = self._stream
        if stream is None:
            return
        self._end()
        _handshake_expired(self._peer, self._gate._timeout, asyncio.get_running_loop().time() - self._due)
        stream.abort()  # its connection_lost comes here, and gives the slot back

    def _left(self, exc: BaseException) -> None:
        """The device ended the connection mid-handshake: empty if it never sent a byte, else abandoned."""
        self._end()
        self._gate._left(self._peer, exc, received=self._received)

    def _end(self) -> None:
        self._stream = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._stream is not None:
            self._left(ConnectionResetError())  # asyncio's protocol's words for it
        return False  # the socket transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stream is not None:
            self._left(exc if exc is not None else ConnectionResetError())
        self._gate._closed()


def socket_transport(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """The TCP transport a listener protocol is given, typed as the stream transport it is.

    Not checked with isinstance: uvloop's transports have asyncio.Transport's methods without deriving from
    it (`isinstance(t, asyncio.Transport)` is False under `listener.event_loop = "uvloop"`). A check there
    made every handshake stall, and one in the refusal path silently skipped the TLS alert."""
    return cast(asyncio.Transport, transport)


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Hand `protocol` bytes that were read before it owned the socket."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def peer_text(peer: object) -> str:
    """A socket's peer address for the log: `host:port` (`[host]:port` for IPv6, whose `::1:443` would not say
    where the port begins), or as it comes when it is not an address pair."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return host_port(str(peer[0]), peer[1])
    return str(peer)


def gate_factory(
    app_factory: Callable[[], asyncio.Protocol],
    ctx: ssl.SSLContext | Callable[[], ssl.SSLContext],
    timeout: float,
    *,
    on_refused: Callable[[str], None] | None = None,
    on_empty: Callable[[], None] | None = None,
    on_health_check: Callable[[], None] | None = None,
) -> Callable[[Callable[[], None]], TlsGate]:
    """A protocol factory for `proxy.tls.limits.accept_connections` that puts TLS in front of aiohttp's handler.

    It is called with the function that gives the connection's slot back when the connection closes.
    `ctx` may be a function returning the current context: each new connection then gets the one in force
    when it arrives (a reload swaps the server certificate and trust list for new connections only).
    `on_refused` hears the reason of each refused handshake, `on_empty` of each connection that ended before its
    first TLS byte, `on_health_check` of each balancer's TLS health check refused for want of a certificate
    (metrics)."""
    current = ctx if callable(ctx) else lambda: ctx
    return lambda closed: TlsGate(app_factory(), current(), timeout, on_refused, closed, on_empty, on_health_check)


NO_CERTIFICATE = "did not return a certificate"  # OpenSSL's reason, TLS 1.2 and 1.3, for a client that sent none
_HANDSHAKE_FIXES = (
    (NO_CERTIFICATE, "the device presented no certificate: install the user's certificate on it"),
    ("has expired", "the certificate expired: issue the user a new one"),
    ("not yet valid", "the certificate is not valid yet: check the clocks of the device and of the issuing CA"),
    (
        "local issuer",
        "the issuer is not in the trust list: add its CA to client_certificates.trust_anchors or intermediates, "
        "or the certificate was not issued by our PKI",
    ),
    (
        "unable to get issuer certificate",
        "a CA of the chain is in the trust list but its own issuer is not: add that issuer to "
        "client_certificates.intermediates or trust_anchors",
    ),
    ("self-signed certificate", "the certificate signed itself: it was not issued by our PKI"),
    ("unsuitable certificate purpose", "the certificate lacks the clientAuth extended key usage: reissue it"),
    (
        "unhandled critical extension",
        "the certificate marks an extension critical that OpenSSL does not know (a SID extension 1.3.6.1.4.1.311.25.2 "
        "marked critical, say: AD CS writes it non-critical): reissue it with that extension non-critical",
    ),
    ("signature failure", "the certificate's signature does not verify: a forged or corrupted certificate"),
    (
        "invalid ca certificate",
        "a CA certificate of the chain may not sign certificates (its basicConstraints lacks cA=TRUE, or it has none, "
        "or its keyUsage lacks keyCertSign): reissue that CA certificate as a CA",
    ),
    (
        "path length constraint exceeded",
        "a CA of the chain allows fewer CAs below it (basicConstraints pathlen) than the chain has: issue the "
        "certificate from a CA that pathlen allows, or reissue that CA",
    ),
    (
        "subtree violation",
        "the certificate carries a name outside a CA's nameConstraints (subject, e-mail, DNS name): a CA of the "
        "chain may not name this user; issue the certificate from a CA whose constraints allow its names",
    ),
    (
        "unsupported name constraint type",
        "a CA of the chain has nameConstraints of a form OpenSSL cannot check (a UPN otherName, say): reissue that CA "
        "with e-mail or DNS name constraints, which the gateway applies to the UPN (docs/refusals.md)",
    ),
    (
        "too weak",
        "the certificate or a CA of its chain has a key or signature digest below OpenSSL's security level (an RSA "
        "key under 2048 bits, SHA-1 or MD5): reissue it with a 2048-bit or larger key and SHA-256",
    ),
    ("http request", "a plain HTTP request reached the TLS port: use https://"),
    ("chain too long", "more CA certificates than client_certificates.max_chain_depth: a junk chain, or raise it"),
    ("excessive message size", "a client chain over client_certificates.max_chain_bytes: a junk chain, or raise it"),
)
# OpenSSL's reason about a CA above the device's certificate (error depth > 0): the fix is the CA's, not the user's.
_CA_FIXES = (
    (
        "has expired",
        "the CA certificate {ca} expired: renew that CA, configure its new certificate "
        "(client_certificates.trust_anchors or intermediates) and reissue the certificates it signed",
    ),
    ("not yet valid", "the CA certificate {ca} is not valid yet: check the clocks of the gateway and of that CA"),
    (
        "unsuitable certificate purpose",
        "the CA certificate {ca} has an extended key usage without clientAuth, and OpenSSL applies a CA's extended key "
        "usage to every certificate below it (as Windows does): reissue that CA without one, or with clientAuth",
    ),
    (
        "unhandled critical extension",
        "the CA certificate {ca} marks an extension critical that OpenSSL does not know: reissue that CA with it "
        "non-critical",
    ),
    (
        "signature failure",
        "the signature on the CA certificate {ca} does not verify against its issuer: a forged or corrupted CA "
        "certificate, or the wrong one configured",
    ),
)


# OpenSSL's one reason for a device's certificate that is not for client use, when its extended key usage has
# clientAuth (or there is none) and something else is what fails (`_purpose_fix`).
_KEY_USAGE_FIX = (
    "the certificate's key usage lacks digitalSignature (a TLS client signs the handshake with its key): reissue it "
    "with digitalSignature in its key usage"
)
_NETSCAPE_TYPE_FIX = (
    "the certificate's Netscape certificate type (nsCertType, an obsolete extension) does not include SSL client, "
    "and OpenSSL refuses it for that whatever its extended key usage says: reissue it without one, or with client"
)


def handshake_fix(reason: str, refused: RefusedCertificate | None = None) -> str | None:
    """What the administrator can do about a refused handshake, when that is known; `refused` (the certificate
    OpenSSL's verification failed on) makes a reason about a CA above the device's certificate name that CA, and
    tells which of the device's own certificate's usages OpenSSL's "unsuitable certificate purpose" is about."""
    lowered = reason.lower()
    if refused is not None and refused.depth > 0:
        ca = f"'{_subject(refused)}' (depth {refused.depth})"
        fix = next((fix for needle, fix in _CA_FIXES if needle in lowered), None)
        if fix is not None:
            return fix.format(ca=ca)
    if refused is not None and "unsuitable certificate purpose" in lowered and (fix := _purpose_fix(refused.der)):
        return fix
    return next((fix for needle, fix in _HANDSHAKE_FIXES if needle in lowered), None)


def _purpose_fix(der: bytes) -> str | None:
    """Which usage OpenSSL's client-purpose check (its `check_purpose_ssl_client`) refused the device's certificate
    for, when it is not the extended key usage (the EKU, if any, names clientAuth): a key usage allowing neither
    digitalSignature nor keyAgreement, or a Netscape certificate type without SSL client. None for the EKU, or for a
    certificate that cannot be read."""
    try:
        certificate = x509.load_der_x509_certificate(der)
        extensions = certificate.extensions
        with contextlib.suppress(x509.ExtensionNotFound):
            if ExtendedKeyUsageOID.CLIENT_AUTH not in extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
                return None
        with contextlib.suppress(x509.ExtensionNotFound):
            usage = extensions.get_extension_for_class(x509.KeyUsage).value
            if not (usage.digital_signature or usage.key_agreement):
                return _KEY_USAGE_FIX
        return _NETSCAPE_TYPE_FIX if netscape_type_excludes_client(certificate) else None
    except (ValueError, x509.DuplicateExtension):
        return None


# Only `ssl.SSLCertVerificationError` is filed here and asked about: it is a heap type, weakly referable; `ssl.SSLError`
# itself (a refusal without a certificate to blame) is not, and a look-up with one raises TypeError.
_REFUSED_CERTIFICATES: weakref.WeakKeyDictionary[BaseException, RefusedCertificate] = weakref.WeakKeyDictionary()


def note_refused_certificate(exc: BaseException) -> None:
    """File the certificate the failed verification was about with the handshake's exception. Called where
    `do_handshake` raised `exc`, in the same synchronous call (proxy.tls.openssl, "Which certificate")."""
    refused = take_refused_certificate()
    if refused is not None and isinstance(exc, ssl.SSLCertVerificationError):
        _REFUSED_CERTIFICATES[exc] = refused


def _subject(refused: RefusedCertificate) -> str:
    """The RFC 4514 subject of the refused certificate, or what stands in for it; its invisible characters as escapes
    (`proxy.printable`): a certificate refused in the handshake may be anyone's, its subject written to be logged."""
    try:
        return printable(x509.load_der_x509_certificate(refused.der).subject.rfc4514_string())
    except ValueError:
        return "(a certificate OpenSSL named but that cannot be read)"
