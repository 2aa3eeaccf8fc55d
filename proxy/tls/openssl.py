"""What Python's `ssl` lacks, reached through ctypes: two limits on the client's chain, the size of the TLS session
cache, fresh memory BIOs, and client chains OpenSSL verified remembered.

A client chooses the chain it sends in its Certificate message. OpenSSL parses all of it and, to verify
the client's certificate, builds paths through it up to its verify depth (100 by default): a long chain
of junk certificates that chain to each other cost a refused handshake about twelve times a normal one.
Two settings bound that, and Python 3.11's `ssl.SSLContext` exposes neither:

- the verify depth (`SSL_CTX_set_verify_depth`): at most this many CA certificates between the client's
  certificate and a trust anchor; a longer path ends the handshake ("certificate chain too long");
- the largest Certificate message accepted (`SSL_CTX_set_max_cert_list`, 100 KiB by default): a larger
  one ends the handshake before any of it is parsed ("excessive message size").

So they are set through ctypes on the context's `SSL_CTX`, called in the libssl that Python's `_ssl`
module itself is linked against. CPython keeps the `SSL_CTX *` as the first field after the object
header of an `SSLContext` (Modules/_ssl.c, `PySSLContext`); that layout is not an API, so before
writing anything the pointer is checked against two values Python does expose (the verify mode and the
options), and read back afterwards. If any check fails, nothing is written and the reason is returned
for the start-up log: the gateway then runs with OpenSSL's defaults.

The session cache's size (`keep_sessions`, `SSL_CTX_sess_set_cache_size`, a macro over `SSL_CTX_ctrl`): the
listener keeps TLS sessions in the context's own cache and sends tickets that only name them (`SSL_OP_NO_TICKET`,
proxy.tls.server.server_context, docs/performance.md "Stateful session tickets"). OpenSSL's default bound is 20,480
sessions; Python exposes none. The same checks on the `SSL_CTX *` as above; the size is read back.

Fresh memory BIOs (`fresh_bios`). A memory BIO's buffer grows to the most bytes it ever held at once and
never shrinks (OpenSSL's `BUF_MEM_grow_clean`): after a handshake the outgoing BIO keeps the size of the
server's whole flight (about 1.9 KiB here: its certificate chain, the CertificateRequest, the session
tickets) and the incoming BIO the client's (about 1.1 KiB: its certificate), for the connection's life,
3 KiB of every held long-poll (heaptrack, docs/performance.md, "Outside Python"). Python's `SSLObject`
cannot be given other BIOs, so once both are drained, new ones are set on its `SSL` with `SSL_set0_rbio`
and `SSL_set0_wbio`. CPython keeps the `SSL *` right after the socket weakref of its `_ssl._SSLSocket`
(Modules/_ssl.c, `PySSLSocket`) and a memory BIO's `BIO *` right after the object header
(`PySSLMemoryBIO`); neither is an API, so the pointers are used only when the `SSL`'s own read and write
BIOs are the two BIOs Python says the object has, and nothing is changed otherwise.

Verified client chains remembered (`remember_verified_chains`). OpenSSL verifies the client's chain in every full
handshake (`X509_verify_cert`: the chain built from the trust store, a signature checked per link, validity,
purposes, the depth), about 130 µs of a handshake's 550 here, and most of it is the same work every time a device
reconnects: the result depends only on the bytes the device presented, the trust store, the verification
parameters and the time. So the context's certificate-verification callback (`SSL_CTX_set_cert_verify_callback`,
which OpenSSL calls instead of `X509_verify_cert`) remembers each chain that verified, keyed by a SHA-256 over the
SHA-256 of each certificate presented (`X509_digest` of the peer's and of every other one it sent, as OpenSSL parsed
them), the verification flags and depth and the number of objects in the trust store, with the span in which every
certificate of the verified chain is valid (their notBefore and notAfter as OpenSSL reads them, `ASN1_TIME_to_tm`).
The same bytes within that span are accepted without verifying them again; anything else (a chain not seen, a
chain that failed, one outside its span, a changed store or flags, CRL checking or a fixed check time asked for)
goes to `X509_verify_cert` as before, whose error, alert and log are unchanged. A failure is never remembered.
One memo per context, so a reload (a new context, another trust list) starts empty; bounded, the oldest dropped.
On a remembered chain OpenSSL keeps no verified chain for the connection (`SSL_get0_verified_chain`, Python 3.13's
`get_verified_chain()`): nothing here reads it, the certificate stages build the chain themselves.

Which certificate a refusal is about (`take_refused_certificate`). Python's `ssl.SSLCertVerificationError` carries
OpenSSL's reason ("certificate has expired") but not which certificate of the chain it is about: the device's own,
or a CA above it (an expired issuing CA, a CA whose extended key usage lacks clientAuth). Their fixes differ (a new
certificate for the user, or a renewed CA for everyone), so when `X509_verify_cert` fails the callback keeps the
error depth (`X509_STORE_CTX_get_error_depth`, 0 the device's certificate) and the certificate it failed on
(`X509_STORE_CTX_get_current_cert`, as DER) for the thread. OpenSSL calls the callback inside the `do_handshake`
that then raises, in the same thread and the same synchronous call, so the caller takes it right there
(`take_refused_certificate`) and nothing of another connection can come between.
"""

from __future__ import annotations

import calendar
import contextlib
import ctypes
import functools
import hashlib
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_SSL_CTRL_SET_MAX_CERT_LIST = 51
_SSL_CTRL_GET_MAX_CERT_LIST = 50
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_PEER | FAIL_IF_NO...


@functools.cache
def _libssl() -> ctypes.CDLL:
    """The libssl of Python's own `_ssl` module (a handle's symbol lookup includes its dependencies)."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_CTX_set_verify_depth.restype = None
    lib.SSL_CTX_get_verify_depth.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_depth.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    for name in ("SSL_get_rbio", "SSL_get_wbio"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_void_p
    for name in ("SSL_set0_rbio", "SSL_set0_wbio"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        getattr(lib, name).restype = None
    lib.BIO_up_ref.argtypes = [ctypes.c_void_p]
    lib.BIO_up_ref.restype = ctypes.c_int
    lib.SSL_has_pending.argtypes = [ctypes.c_void_p]
    lib.SSL_has_pending.restype = ctypes.c_int
    return lib


def _ssl_ctx(ctx: ssl.SSLContext) -> int | None:
    """The `SSL_CTX *` of `ctx`, if what sits where CPython keeps it behaves like this context's."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        return None
    lib = _libssl()
    if lib.SSL_CTX_get_verify_mode(pointer) != _VERIFY_FLAGS[ctx.verify_mode]:
        return None
    if lib.SSL_CTX_get_options(pointer) != int(ctx.options):
        return None
    return pointer


def _reach(ctx: ssl.SSLContext) -> tuple[ctypes.CDLL, int] | str:
    """libssl and the `SSL_CTX *` of `ctx` (checked as `_ssl_ctx` says), or why they cannot be reached."""
    try:
        lib = _libssl()
        pointer = _ssl_ctx(ctx)
    except (OSError, AttributeError, KeyError) as e:
        return f"OpenSSL's functions are not reachable from Python here ({type(e).__name__}: {e})"
    if pointer is None:
        return "this Python's SSLContext does not have the layout expected (CPython's PySSLContext)"
    return lib, pointer


def limit_client_chain(ctx: ssl.SSLContext, *, depth: int, max_bytes: int) -> str | None:
    """Cap the client chain `ctx` accepts: `depth` CA certificates above the client's, a Certificate
    message of `max_bytes`. None when both are in force, else why not (nothing was changed then)."""
    reached = _reach(ctx)
    if isinstance(reached, str):
        return reached
    lib, pointer = reached
    lib.SSL_CTX_set_verify_depth(pointer, depth)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_MAX_CERT_LIST, max_bytes, None)
    if lib.SSL_CTX_get_verify_depth(pointer) != depth:
        return "the verify depth did not take"
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_MAX_CERT_LIST, 0, None) != max_bytes:
        return "the Certificate message limit did not take"
    return None


def keep_sessions(ctx: ssl.SSLContext, sessions: int) -> str | None:
    """Bound the session cache of `ctx` to `sessions` (OpenSSL drops the oldest past it). None when in force, else
    why not (nothing was changed then)."""
    reached = _reach(ctx)
    if isinstance(reached, str):
        return reached
    lib, pointer = reached
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, sessions, None)
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) != sessions:
        return "the session cache's size did not take"
    return None


_POINTER = ctypes.sizeof(ctypes.c_void_p)


def _ssl(sslobj: ssl.SSLObject) -> int | None:
    """Where CPython keeps the `SSL *` of `sslobj` (checked by the caller before any use)."""
    inner = sslobj._sslobj  # type: ignore[attr-defined]
    pointer: int | None = ctypes.c_void_p.from_address(id(inner) + object.__basicsize__ + _POINTER).value
    return pointer


def _bio(bio: ssl.MemoryBIO) -> int | None:
    """Where CPython keeps the `BIO *` of `bio`."""
    pointer: int | None = ctypes.c_void_p.from_address(id(bio) + object.__basicsize__).value
    return pointer


def fresh_bios(
    sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
    """New, empty memory BIOs for `sslobj` in place of `incoming` and `outgoing`, whose buffers are freed when
    the caller drops them. Bytes still in `incoming` move to the new one; `outgoing` must be drained. None
    when this Python's objects do not have the layout expected (nothing was changed then)."""
    if outgoing.pending:
        raise ValueError("the outgoing BIO still holds records to send")
    lib = _libssl()
    ssl_pointer = _ssl(sslobj)
    if ssl_pointer is None:
        return None
    if lib.SSL_get_rbio(ssl_pointer) != _bio(incoming) or lib.SSL_get_wbio(ssl_pointer) != _bio(outgoing):
        return None
    new_in, new_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    if incoming.pending:
        new_in.write(incoming.read())
    lib.BIO_up_ref(_bio(new_in))  # SSL_set0_* take one reference; the Python objects keep theirs
    lib.BIO_up_ref(_bio(new_out))
    lib.SSL_set0_rbio(ssl_pointer, _bio(new_in))  # frees the SSL's reference to the old ones
    lib.SSL_set0_wbio(ssl_pointer, _bio(new_out))
    return new_in, new_out


def holds_device_bytes(sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO) -> bool:
    """Whether OpenSSL holds bytes of the device's it has read from `incoming` and not yet given out
    (`SSL_has_pending`): a TLS record half received (its header, or part of its body: OpenSSL takes them out of the
    BIO and keeps them until the rest comes, where neither the BIO's `pending` nor `SSLObject.pending`, decrypted bytes
    only, sees them), or decrypted bytes unread. True, to be safe, when this Python's objects do not have the layout
    expected (`fresh_bios`'s check)."""
    lib = _libssl()
    ssl_pointer = _ssl(sslobj)
    if ssl_pointer is None or lib.SSL_get_rbio(ssl_pointer) != _bio(incoming):
        return True
    return bool(lib.SSL_has_pending(ssl_pointer))


# X509_V_FLAG_USE_CHECK_TIME, X509_V_FLAG_CRL_CHECK, X509_V_FLAG_CRL_CHECK_ALL: a result that depends on more than the
# chain, the store and the current time; with any of them set, nothing is remembered.
_NOT_REMEMBERED_FLAGS = 0x2 | 0x4 | 0x8
_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


@functools.cache
def _libcrypto() -> ctypes.CDLL:
    """libssl's handle again, with the X509 functions `remember_verified_chains` calls (libcrypto's, reached through
    libssl's dependencies)."""
    lib = _libssl()
    lib.SSL_CTX_set_cert_verify_callback.argtypes = [ctypes.c_void_p, _VERIFY_CALLBACK, ctypes.c_void_p]
    lib.SSL_CTX_set_cert_verify_callback.restype = None
    for name in (
        "X509_STORE_CTX_get0_cert",
        "X509_STORE_CTX_get0_untrusted",
        "X509_STORE_CTX_get0_chain",
        "X509_STORE_CTX_get0_param",
        "X509_STORE_CTX_get0_store",
        "X509_STORE_get0_objects",
    ):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_void_p
    lib.X509_VERIFY_PARAM_get_flags.argtypes = [ctypes.c_void_p]
    lib.X509_VERIFY_PARAM_get_flags.restype = ctypes.c_ulong
    lib.X509_VERIFY_PARAM_get_depth.argtypes = [ctypes.c_void_p]
    lib.X509_VERIFY_PARAM_get_depth.restype = ctypes.c_int
    lib.OPENSSL_sk_num.argtypes = [ctypes.c_void_p]
    lib.OPENSSL_sk_num.restype = ctypes.c_int
    lib.OPENSSL_sk_value.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.OPENSSL_sk_value.restype = ctypes.c_void_p
    for name in ("X509_get0_notBefore", "X509_get0_notAfter"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_void_p
    lib.ASN1_TIME_to_tm.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ASN1_TIME_to_tm.restype = ctypes.c_int
    lib.EVP_sha256.argtypes = []
    lib.EVP_sha256.restype = ctypes.c_void_p
    lib.X509_digest.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.X509_digest.restype = ctypes.c_int
    lib.X509_verify_cert.argtypes = [ctypes.c_void_p]
    lib.X509_verify_cert.restype = ctypes.c_int
    lib.X509_STORE_CTX_get_error_depth.argtypes = [ctypes.c_void_p]
    lib.X509_STORE_CTX_get_error_depth.restype = ctypes.c_int
    lib.X509_STORE_CTX_get_current_cert.argtypes = [ctypes.c_void_p]
    lib.X509_STORE_CTX_get_current_cert.restype = ctypes.c_void_p
    lib.i2d_X509.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.i2d_X509.restype = ctypes.c_int
    return lib


@dataclass(frozen=True)
class RefusedCertificate:
    """The certificate OpenSSL's verification failed on: its depth in the chain (0: the device's own) and its DER
    encoding (empty when OpenSSL named none)."""

    depth: int
    der: bytes


_refused = threading.local()  # the last failed verification of this thread's handshake (module docstring)


def take_refused_certificate() -> RefusedCertificate | None:
    """The certificate the verification that just failed in this thread was about, once; None if none failed."""
    refused: RefusedCertificate | None = getattr(_refused, "value", None)
    _refused.value = None
    return refused


def _der_of(lib: ctypes.CDLL, cert: int | None) -> bytes:
    """The DER encoding of OpenSSL's `X509 *cert` (`i2d_X509`); empty for none."""
    if not cert:
        return b""
    size = lib.i2d_X509(cert, None)
    if size <= 0:
        return b""
    buffer = ctypes.create_string_buffer(size)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))  # i2d_X509 writes there and moves it on
    written = lib.i2d_X509(cert, ctypes.byref(cursor))
    return buffer.raw[: max(written, 0)]


def _sha256_of(lib: ctypes.CDLL, cert: int) -> bytes:
    """The SHA-256 of the DER encoding of OpenSSL's `X509 *cert` (`X509_digest`)."""
    digest = ctypes.create_string_buffer(32)
    size = ctypes.c_uint(0)
    if lib.X509_digest(cert, _sha256(lib), digest, ctypes.byref(size)) != 1 or size.value != 32:
        raise ValueError("X509_digest failed")
    return digest.raw


@functools.cache
def _sha256(lib: ctypes.CDLL) -> int:
    md: int | None = lib.EVP_sha256()
    if not md:
        raise ValueError("no SHA-256 in this OpenSSL")
    return md


def _posix(lib: ctypes.CDLL, when: int | None) -> float:
    """OpenSSL's `ASN1_TIME *when` (a certificate's notBefore or notAfter, as OpenSSL compares it) in POSIX seconds."""
    if not when:
        raise ValueError("no time")
    tm = (ctypes.c_int * 16)()  # struct tm: its first six ints are what is read; room for the rest
    if lib.ASN1_TIME_to_tm(when, tm) != 1:
        raise ValueError("ASN1_TIME_to_tm failed")
    return float(calendar.timegm((tm[5] + 1900, tm[4] + 1, tm[3], tm[2], tm[1], tm[0])))


def _stack(lib: ctypes.CDLL, stack: int | None) -> list[int]:
    return [lib.OPENSSL_sk_value(stack, i) for i in range(lib.OPENSSL_sk_num(stack))] if stack else []


class VerifiedChains:
    """The chains OpenSSL verified for one context: key → (valid from, valid until), POSIX seconds with a second's
    margin inside the span of every certificate of the verified chain. Bounded; the oldest goes first."""

    def __init__(self, size: int, now: Callable[[], float] = time.time) -> None:
        self.size = size
        self.spans: dict[bytes, tuple[float, float]] = {}
        self.hits = 0  # handshakes whose chain was accepted from here (tests, docs/performance.md)
        self._now = now
        self.callback = _VERIFY_CALLBACK(self._verify)  # kept alive with the context (see remember_verified_chains)

    def _key(self, lib: ctypes.CDLL, store_ctx: int) -> bytes | None:
        """What OpenSSL's result depends on besides the time, or None when it depends on more than that."""
        param = lib.X509_STORE_CTX_get0_param(store_ctx)
        flags = lib.X509_VERIFY_PARAM_get_flags(param)
        if flags & _NOT_REMEMBERED_FLAGS:
            return None
        leaf = lib.X509_STORE_CTX_get0_cert(store_ctx)
        presented = [leaf, *(c for c in _stack(lib, lib.X509_STORE_CTX_get0_untrusted(store_ctx)) if c != leaf)]
        objects = lib.OPENSSL_sk_num(lib.X509_STORE_get0_objects(lib.X509_STORE_CTX_get0_store(store_ctx)))
        digest = hashlib.sha256(b"%d %d %d " % (flags, lib.X509_VERIFY_PARAM_get_depth(param), objects))
        for cert in presented:
            digest.update(_sha256_of(lib, cert))
        return digest.digest()

    def _verify(self, store_ctx: int, _arg: int | None) -> int:
        lib = _libcrypto()
        _refused.value = None
        try:
            key = self._key(lib, store_ctx)
        except Exception:  # noqa: BLE001 -- whatever went wrong, OpenSSL's own verification decides
            key = None
        if key is not None:
            span = self.spans.get(key)
            if span is not None and span[0] < self._now() < span[1]:
                self.hits += 1
                return 1
        verified: int = lib.X509_verify_cert(store_ctx)
        if verified == 1 and key is not None:
            with contextlib.suppress(Exception):  # not remembered: the next handshake verifies again
                self._remember(lib, store_ctx, key)
        elif verified != 1:
            with contextlib.suppress(Exception):  # the refusal is logged without naming the certificate then
                depth = lib.X509_STORE_CTX_get_error_depth(store_ctx)
                _refused.value = RefusedCertificate(depth, _der_of(lib, lib.X509_STORE_CTX_get_current_cert(store_ctx)))
        return verified

    def _remember(self, lib: ctypes.CDLL, store_ctx: int, key: bytes) -> None:
        chain = _stack(lib, lib.X509_STORE_CTX_get0_chain(store_ctx))
        if not chain or self.size <= 0:
            return
        start = max(_posix(lib, lib.X509_get0_notBefore(cert)) for cert in chain) + 1
        end = min(_posix(lib, lib.X509_get0_notAfter(cert)) for cert in chain) - 1
        if len(self.spans) >= self.size:
            del self.spans[next(iter(self.spans))]
        self.spans[key] = (start, end)


def remember_verified_chains(ctx: ssl.SSLContext, size: int) -> VerifiedChains | str:
    """OpenSSL's verification of client chains remembered for `ctx` (at most `size` chains), or why not (nothing was
    changed then). Call it once `ctx` has its trust store and verification settings."""
    reached = _reach(ctx)
    if isinstance(reached, str):
        return reached
    _, pointer = reached
    try:
        lib = _libcrypto()
    except AttributeError as e:
        return f"OpenSSL's functions are not reachable from Python here ({type(e).__name__}: {e})"
    chains = VerifiedChains(size)
    lib.SSL_CTX_set_cert_verify_callback(pointer, chains.callback, None)
    ctx.verified_chains = chains  # type: ignore[attr-defined]  # the callback lives as long as the context
    return chains
