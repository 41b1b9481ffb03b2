"""deploy/nginx.conf (the compose file's front door) run by Debian's nginx in front of the real api.

A full long-poll passes through; bodies over a route's limit are refused in the api's JSON error shape,
by the api when only the api's limit is passed, by nginx (before the body is sent) past its own; the
errors nginx answers itself (413, 500, 502, 504) are JSON too. What reaches the api is read from its
own request counter (`/metrics`, through nginx).
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from api.validation import MULTIPART_OVERHEAD_BYTES
from bench.front_door import PNG_1PX
from launch.processes import free_port
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from tests import nginx
from tests.service import Stack, service_stack

pytestmark = pytest.mark.skipif(
    nginx.nginx_binary() is None, reason="nginx is not installed (Debian's nginx: make test-packages)"
)

# The api runs with the limits the compose file's api has: the defaults, whatever this shell sets.
MAX_UPLOAD = int(Settings.model_fields["max_upload_bytes"].default)
MAX_BATCH_UPLOAD = int(Settings.model_fields["max_batch_upload_bytes"].default)
MAX_WAIT = float(Settings.model_fields["max_wait_seconds"].default)
JOB_LIMIT = MAX_UPLOAD + MULTIPART_OVERHEAD_BYTES  # the api's, for a multipart POST /v1/jobs
OTHER_ROUTES_LIMIT = 1024 * 1024  # nginx's, for the routes that take no upload


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The api without workers: a submitted job stays queued."""
    limits = {"MAX_UPLOAD_BYTES": MAX_UPLOAD, "MAX_BATCH_UPLOAD_BYTES": MAX_BATCH_UPLOAD}
    with service_stack(redis_server.url, tmp_path_factory.mktemp("api"), workers=0, **limits) as stack:
        yield stack


@pytest.fixture(scope="module")
def front(api: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[nginx.Nginx]:
    with nginx.running_nginx(tmp_path_factory.mktemp("nginx"), api.base.removeprefix("http://")) as proxy:
        yield proxy


def answered_by_api(front: nginx.Nginx, route: str | None = None, status: int | None = None) -> float:
    """How many POSTs (to `route`, a route template, with `status`, if given) the api has answered:
    its request counter."""
    text = requests.get(f"{front.base}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "inferq_http_requests"]
    return sum(
        sample.value
        for sample in family.samples
        if sample.name.endswith("_total")
        and sample.labels["method"] == "POST"
        and (route is None or sample.labels["route"] == route)
        and (status is None or sample.labels["status"] == str(status))
    )


def assert_json_error(
    response: requests.Response | tuple[int, dict[str, str], bytes], status: int, code: str
) -> str:
    """The response is `status` with the api's error shape and `code`; its message."""
    if isinstance(response, requests.Response):
        got, headers, body = response.status_code, dict(response.headers), response.content
    else:
        got, headers, body = response
    assert got == status, body[:300]
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.split(";")[0] == "application/json", content_type
    error = json.loads(body)["error"]
    assert error["code"] == code
    return str(error["message"])


def padded_png(size: int) -> bytes:
    """A valid 1x1 PNG of exactly `size` bytes: what follows its IEND chunk is ignored."""
    return PNG_1PX + b"\0" * (size - len(PNG_1PX))


def multipart(files: list[bytes], note: str = "") -> tuple[bytes, str]:
    """A form of `image` file parts (and a `note` text field, when given), and its content type."""
    boundary = "inferq-nginx-test"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    if note:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\n{note}\r\n'.encode()
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def largest_job_form() -> tuple[bytes, str]:
    """A POST /v1/jobs form of exactly the api's limit: an image of MAX_UPLOAD_BYTES, and a `note`
    field taking the envelope's room."""
    body, _ = multipart([padded_png(MAX_UPLOAD)], note="n")
    return multipart([padded_png(MAX_UPLOAD)], note="n" * (JOB_LIMIT - len(body) + 1))


def largest_batch_form() -> tuple[bytes, str]:
    """A POST /v1/batches form of exactly MAX_BATCH_UPLOAD_BYTES: whole images of MAX_UPLOAD_BYTES
    and one of what is left."""
    whole = [padded_png(MAX_UPLOAD)] * (MAX_BATCH_UPLOAD // MAX_UPLOAD)
    body, _ = multipart([*whole, PNG_1PX])
    last = len(PNG_1PX) + MAX_BATCH_UPLOAD - len(body)
    assert len(PNG_1PX) <= last <= MAX_UPLOAD
    return multipart([*whole, padded_png(last)])


def headers_only(front: nginx.Nginx, path: str, length: int) -> tuple[int, dict[str, str], bytes]:
    """POST `path` announcing a `length`-byte body and sending none of it: nginx's answer (a
    connection closed without one fails here)."""
    port = int(front.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: inferq\r\nContent-Type: application/octet-stream\r\n"
        sock.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)  # the body never comes
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            pytest.fail(f"nginx closed the connection without an answer (it waited for the body of {path})")
        return response.status, dict(response.getheaders()), response.read()


def test_a_full_long_poll_passes_through(front: nginx.Nginx, photo_bytes: dict[str, bytes]) -> None:
    submitted = requests.post(
        f"{front.base}/v1/jobs",
        data=photo_bytes["chelsea.png"],
        headers={"Content-Type": "image/png"},
        timeout=30,
    )
    assert submitted.status_code == 202, submitted.text
    started = time.monotonic()
    polled = requests.get(
        f"{front.base}/v1/jobs/{submitted.json()['id']}", params={"wait": MAX_WAIT}, timeout=MAX_WAIT + 60
    )
    held = time.monotonic() - started
    assert polled.status_code == 200, polled.text
    assert polled.json()["status"] == "queued"  # no worker: the api held it for the whole wait
    assert held >= MAX_WAIT - 1


@pytest.mark.parametrize(
    ("path", "form", "limit"),
    [("/v1/jobs", largest_job_form, JOB_LIMIT), ("/v1/batches", largest_batch_form, MAX_BATCH_UPLOAD)],
)
def test_the_largest_forms_the_api_takes_pass_nginx(
    front: nginx.Nginx, path: str, form: Callable[[], tuple[bytes, str]], limit: int
) -> None:
    body, content_type = form()
    assert len(body) == limit
    response = requests.post(
        f"{front.base}{path}", data=body, headers={"Content-Type": content_type}, timeout=300
    )
    assert response.status_code == 202, response.text


def test_a_body_over_the_apis_limit_within_nginxs_gets_the_apis_413(front: nginx.Nginx) -> None:
    before = answered_by_api(front, "/v1/jobs", 413)
    response = requests.post(
        f"{front.base}/v1/jobs",
        data=padded_png(MAX_UPLOAD + 1),  # a raw body: the api takes MAX_UPLOAD_BYTES, nginx a form's more
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert_json_error(response, 413, "payload_too_large")
    assert answered_by_api(front, "/v1/jobs", 413) == before + 1


@pytest.mark.parametrize(
    ("path", "length", "limit_text"),
    [
        ("/v1/jobs", JOB_LIMIT + 1, f"{MAX_UPLOAD:,}"),
        ("/v1/jobs", 60_000_000, f"{MAX_UPLOAD:,}"),
        ("/v1/batches", MAX_BATCH_UPLOAD + 1, f"{MAX_BATCH_UPLOAD:,}"),
        ("/v1/jobs/0123456789abcdef/cancel", OTHER_ROUTES_LIMIT + 1, f"{OTHER_ROUTES_LIMIT:,}"),
    ],
)
def test_a_body_over_nginxs_limit_is_refused_before_it_is_sent(
    front: nginx.Nginx, path: str, length: int, limit_text: str
) -> None:
    before = answered_by_api(front)
    message = assert_json_error(headers_only(front, path, length), 413, "payload_too_large")
    assert limit_text in message
    assert answered_by_api(front) == before, "the api must not see it"


def test_a_chunked_body_over_nginxs_limit_gets_the_json_413(front: nginx.Nginx) -> None:
    """Without a Content-Length nginx counts the body as it arrives, and stops at the limit."""
    chunk = b"\0" * (1024 * 1024)
    before = answered_by_api(front)
    response = requests.post(
        f"{front.base}/v1/jobs",
        data=(chunk for _ in range(JOB_LIMIT // len(chunk) + 2)),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert f"{MAX_UPLOAD:,}" in assert_json_error(response, 413, "payload_too_large")
    assert answered_by_api(front) == before


def test_nginx_answers_502_in_json_when_the_api_is_down(tmp_path: Path) -> None:
    with nginx.running_nginx(tmp_path, f"127.0.0.1:{free_port()}") as proxy:
        assert_json_error(requests.get(f"{proxy.base}/healthz", timeout=30), 502, "bad_gateway")


def test_nginx_answers_504_in_json_when_the_api_does_not_answer(tmp_path: Path) -> None:
    # A listening socket nobody accepts from: the kernel completes the handshake, nothing answers.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        upstream = f"127.0.0.1:{silent.getsockname()[1]}"
        fast = {"proxy_read_timeout 45s;": "proxy_read_timeout 1s;"}  # not the 45 s of the file
        with nginx.running_nginx(tmp_path, upstream, replace=fast) as proxy:
            assert_json_error(requests.get(f"{proxy.base}/healthz", timeout=30), 504, "gateway_timeout")


def test_nginx_answers_500_in_json_when_its_body_temp_path_is_gone(api: Stack, tmp_path: Path) -> None:
    """Why the temp paths must be writable (README): a body larger than client_body_buffer_size is
    spooled to client_body_temp_path before the api is called."""
    with nginx.running_nginx(tmp_path, api.base.removeprefix("http://")) as proxy:
        shutil.rmtree(tmp_path / "client_body")
        body, content_type = multipart([padded_png(2 * 1024 * 1024)])
        response = requests.post(
            f"{proxy.base}/v1/batches", data=body, headers={"Content-Type": content_type}, timeout=60
        )
        assert_json_error(response, 500, "internal_error")
        assert "client_body" in proxy.error_log()


def test_a_stalled_body_is_cut_off_by_nginx(front: nginx.Nginx) -> None:
    """client_body_timeout: nginx closes the connection of a body that stops arriving, without a
    response (nginx sends no 408), and the api never sees the request."""
    before = answered_by_api(front)
    port = int(front.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: inferq\r\nContent-Length: 1000\r\n\r\npartial")
        assert sock.recv(65536) == b""
    assert answered_by_api(front) == before
