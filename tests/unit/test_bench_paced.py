"""bench.paced, the bench's open-loop generator, against a real TLS server on loopback."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench import paced


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paced test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    root = tmp_path_factory.mktemp("paced")
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return root / "cert.pem", root / "key.pem"


async def _measure(
    files: tuple[Path, Path],
    *,
    rate: float,
    seconds: float,
    stall_at: int = -1,
    chunked: bool = False,
    status: int = 200,
) -> dict[str, float]:
    """Run bench.paced over one connection against a server that stalls 0.3 s before its `stall_at`-th answer."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*files)
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                served += 1
                if served == stall_at:
                    await asyncio.sleep(0.3)
                head = f"HTTP/1.1 {status} X\r\n"
                if chunked:
                    writer.write(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                else:
                    writer.write(head.encode() + b"Content-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(files[0]))
    async with server:
        return await paced.run(f"https://127.0.0.1:{port}/x", rate, 1, seconds, [client_ctx])


def test_latency_counts_from_the_due_time_not_the_send_time(tls_files: tuple[Path, Path]) -> None:
    """A 0.3 s stall delays every request due meanwhile: they count as late (no coordinated omission), where a
    closed-loop generator would have sent them late and timed only their last few milliseconds."""
    figures = asyncio.run(_measure(tls_files, rate=100, seconds=1, stall_at=10))
    assert figures["answered"] == figures["sent"] == 100
    assert figures["errors"] == 0
    assert figures["max_ms"] >= 300
    assert figures["p90_ms"] >= 100  # about 20 of the 100 were due during the stall and waited over 100 ms


def test_chunked_answers_are_read_and_non_2xx_are_errors(tls_files: tuple[Path, Path]) -> None:
    """Chunked answers are read to their end (the connection stays usable); a 500 counts as an error."""
    chunked = asyncio.run(_measure(tls_files, rate=200, seconds=0.25, chunked=True))
    assert chunked["answered"] == chunked["sent"] == 50
    assert chunked["errors"] == 0
    failing = asyncio.run(_measure(tls_files, rate=200, seconds=0.25, status=500))
    assert failing["errors"] == failing["answered"] == 50


def test_percentile_is_nearest_rank() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 the largest; no values give NaN."""
    values = [float(v) for v in range(1, 101)]
    assert paced.percentile(values, 50) == 50
    assert paced.percentile(values, 99) == 99
    assert paced.percentile(values, 100) == 100
    assert paced.percentile([], 99) != paced.percentile([], 99)  # NaN
