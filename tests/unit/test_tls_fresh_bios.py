"""Fresh memory BIOs for a connection after its handshake (proxy/tls/openssl.py `fresh_bios`), on real OpenSSL."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from proxy.tls.openssl import _bio, _libssl, _ssl, fresh_bios
from tests.pem import write_self_signed


def _server_context(tmp_path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*write_self_signed(tmp_path, "gateway.test"))
    return ctx


class _Pair:
    """A TLS client and server, each an SSLObject on memory BIOs; `pump` carries the bytes between them."""

    def __init__(self, tmp_path: Path) -> None:
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.verify_mode = ssl.CERT_NONE
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out)
        self.server = _server_context(tmp_path).wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> None:
        if self.c_out.pending:
            self.s_in.write(self.c_out.read())
        if self.s_out.pending:
            self.c_in.write(self.s_out.read())

    def handshake(self) -> None:
        done = {"client": False, "server": False}
        for _ in range(10):
            for side, obj in (("client", self.client), ("server", self.server)):
                if not done[side]:
                    try:
                        obj.do_handshake()
                        done[side] = True
                    except ssl.SSLWantReadError:
                        pass
                self.pump()
            if all(done.values()):
                return
        raise AssertionError("the handshake did not finish")


def test_fresh_bios_carry_the_connection_on(tmp_path: Path) -> None:
    """After the swap the SSL reads and writes through the new BIOs; bytes the client sent with its Finished
    (still in the old incoming BIO) are read from the new one, and the old BIOs are no longer the SSL's."""
    pair = _Pair(tmp_path)
    pair.handshake()
    pair.client.write(b"GET / HTTP/1.1\r\n\r\n")
    pair.pump()  # the request waits, undecrypted, in the server's incoming BIO (the server's tickets in its outgoing)
    assert pair.s_in.pending
    old_in, old_out = pair.s_in, pair.s_out
    if old_out.pending:
        pair.c_in.write(old_out.read())
    fresh = fresh_bios(pair.server, old_in, old_out)
    assert fresh is not None
    pair.s_in, pair.s_out = fresh
    assert not old_in.pending
    assert pair.server.read(1024) == b"GET / HTTP/1.1\r\n\r\n"
    pair.server.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert not old_out.pending
    pair.pump()
    assert pair.client.read(1024) == b"HTTP/1.1 200 OK\r\n\r\n"
    old_in.write(b"\x17\x03\x03\x00\x05junk")  # the old BIO is not read any more: no record error
    with pytest.raises(ssl.SSLWantReadError):
        pair.server.read(1024)
    pair.client.write(b"next")
    pair.pump()
    assert pair.server.read(1024) == b"next"


def test_fresh_bios_own_their_buffers_after_the_old_ones_go(tmp_path: Path) -> None:
    """The SSL holds its own reference to each new BIO: dropping the old Python objects frees them, the new
    BIOs stay usable, and the SSL's read and write BIOs are the new ones."""
    pair = _Pair(tmp_path)
    pair.handshake()
    pair.pump()
    fresh = fresh_bios(pair.server, pair.s_in, pair.s_out)
    assert fresh is not None
    pair.s_in, pair.s_out = fresh
    ssl_pointer = _ssl(pair.server)
    assert _libssl().SSL_get_rbio(ssl_pointer) == _bio(fresh[0])
    assert _libssl().SSL_get_wbio(ssl_pointer) == _bio(fresh[1])
    for _ in range(3):
        pair.client.write(b"x" * 40000)
        pair.pump()
        assert len(b"".join(iter(lambda: _read_or_empty(pair.server), b""))) == 40000


def test_fresh_bios_refuse_what_is_not_the_connections(tmp_path: Path) -> None:
    """BIOs that are not the SSL's own are not swapped (None, nothing changed); records still unsent refuse."""
    pair = _Pair(tmp_path)
    pair.handshake()
    pair.pump()
    assert fresh_bios(pair.server, ssl.MemoryBIO(), ssl.MemoryBIO()) is None
    pair.client.write(b"still")
    pair.pump()
    assert pair.server.read(1024) == b"still"
    pair.server.write(b"unsent")
    with pytest.raises(ValueError, match="outgoing"):
        fresh_bios(pair.server, pair.s_in, pair.s_out)


def _read_or_empty(obj: ssl.SSLObject) -> bytes:
    try:
        return obj.read(65536)
    except ssl.SSLWantReadError:
        return b""
