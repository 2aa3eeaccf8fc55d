"""The client-chain limits set on the listener's TLS context through OpenSSL (proxy/tls/openssl.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.tls.openssl import _libssl, _ssl_ctx, limit_client_chain
from tests.unit.test_config import GOOD, _write


@pytest.mark.parametrize("mode", [ssl.CERT_REQUIRED, ssl.CERT_OPTIONAL, ssl.CERT_NONE])
def test_depth_and_message_size_take(mode: ssl.VerifyMode) -> None:
    """Both limits are written to the context's SSL_CTX and read back."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = mode
    assert limit_client_chain(ctx, depth=3, max_bytes=20000) is None
    pointer = _ssl_ctx(ctx)
    assert pointer is not None
    assert _libssl().SSL_CTX_get_verify_depth(pointer) == 3


def test_limits_are_read_from_client_certificates(tmp_path: Path) -> None:
    """max_chain_depth and max_chain_bytes default to 4 and 10 KiB, and must be positive integers."""
    cc = config.load(_write(tmp_path, GOOD)).client_certificates
    assert (cc.max_chain_depth, cc.max_chain_bytes) == (4, 10240)
    text = GOOD.replace("[client_certificates]\n", "[client_certificates]\nmax_chain_depth = 0\n")
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, text))
    assert any(p.startswith("client_certificates.max_chain_depth") for p in e.value.problems)
