"""What Python's `ssl` lacks, reached through ctypes: two limits on the client's chain, the size of the TLS session
cache, and fresh memory BIOs.

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
"""

from __future__ import annotations

import ctypes
import functools
import ssl

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
