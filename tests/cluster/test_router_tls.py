"""TLS on the client port: a certificate turns it on; plaintext clients are refused; with a
client CA, only clients presenting a certificate it signed get in (mutual TLS)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.client import AsyncClient, TandemClientError, Tls
from tandem.testing.fake_worker import FakeWorker

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
ECHOED = "hell"  # the fake workers echo the prompt: its first max_tokens=4 bytes


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


async def _serve_and_call(config: RouterConfig, tls: Tls | None) -> str:
    server = RouterServer(config, ByteTokenizer())
    await server.start()
    workers = [FakeWorker("p0"), FakeWorker("d0")]
    await server.add_worker("p0", "prefill", workers[0])
    await server.add_worker("d0", "decode", workers[1])
    client = AsyncClient(server.address, tls=tls, timeout=5)
    try:
        text, _ = await client.generate_text("hello", max_tokens=4)
        return text
    finally:
        await client.close()
        await server.stop(grace_s=0.1)
        for w in workers:
            await w.close()


def test_tls_port_serves_tls_clients_and_refuses_plaintext(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path, "server")
    config = RouterConfig(max_model_len=256, tls_cert_file=str(cert), tls_key_file=str(key))
    assert asyncio.run(_serve_and_call(config, Tls(ca_file=str(cert)))) == ECHOED
    with pytest.raises(TandemClientError) as err:
        asyncio.run(_serve_and_call(config, None))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path, "server")
    client_key, client_cert = _self_signed(tmp_path, "client")
    config = RouterConfig(
        max_model_len=256,
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_client_ca_file=str(client_cert),
    )
    ok = Tls(ca_file=str(cert), cert_file=str(client_cert), key_file=str(client_key))
    assert asyncio.run(_serve_and_call(config, ok)) == ECHOED
    with pytest.raises(TandemClientError) as err:
        asyncio.run(_serve_and_call(config, Tls(ca_file=str(cert))))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_config_is_validated() -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        RouterConfig(max_model_len=256, tls_cert_file="cert.pem")
