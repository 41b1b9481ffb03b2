"""The HTTP api against a real (throwaway) Redis, no worker running.

Flask's test client drives the app in-process; the last test starts the real thing (gunicorn).
Every refusal is also checked to leave the queue untouched: nothing invalid may reach Redis.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from redis.exceptions import OutOfMemoryError
from rq import Worker
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer
from werkzeug.test import TestResponse

from api import create_app
from api.validation import MULTIPART_OVERHEAD_BYTES
from shared.config import Settings
from shared.keys import image_key
from tests.factories import png_declaring, settings_for
from tests.service import free_port, http_ok, service_env, start_api, stop, wait_until

QUEUE_KEY = "rq:queue:inferq"
PNG = "coffee.png"
JPEG = "rocket.jpg"


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def app(redis_url: str) -> Flask:
    return create_app(settings_for(redis_url))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def multipart(*files: tuple[str, bytes], **fields: str) -> dict[str, Any]:
    data: dict[str, Any] = dict(fields)
    for name, content in files:
        data.setdefault(name, []).append((io.BytesIO(content), "upload.bin"))
    return {"data": data, "content_type": "multipart/form-data"}


def image_keys(conn: redis.Redis) -> list[bytes]:
    return list(conn.scan_iter("inferq:img:*"))


def fetch_job(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def submit_png(client: FlaskClient, photo_bytes: dict[str, bytes], query: str = "") -> str:
    response = client.post(f"/v1/jobs{query}", data=photo_bytes[PNG], content_type="image/png")
    assert response.status_code == 202, response.json
    return str(response.json["id"])


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.json["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


def keyspace_reads(conn: redis.Redis) -> int:
    """Key lookups the server has served so far (any GET/HGETALL/EXISTS/... of a key counts)."""
    stats = conn.info("stats")
    return int(stats["keyspace_hits"]) + int(stats["keyspace_misses"])


# --- submit ---------------------------------------------------------------------------------------


def test_submit_raw_body(client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]) -> None:
    response = client.post("/v1/jobs?top_k=3", data=photo_bytes[PNG], content_type="image/png")

    assert response.status_code == 202
    job_id = response.json["id"]
    assert response.json == {"id": job_id, "status": "queued", "url": f"/v1/jobs/{job_id}"}
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    job = fetch_job(redis_conn, job_id)
    assert job.get_status() == JobStatus.QUEUED
    assert tuple(job.args) == (image_key(job_id), 3)
    assert redis_conn.get(image_key(job_id)) == photo_bytes[PNG]
    assert 0 < redis_conn.ttl(image_key(job_id)) <= 3600
    assert redis_conn.lrange(QUEUE_KEY, 0, -1) == [job_id.encode()]


def test_submit_multipart_sniffs_bytes_not_declared_types(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    # A JPEG in a part named "upload.bin": the filename and part type are not trusted, the bytes are.
    response = client.post("/v1/jobs", **multipart(("image", photo_bytes[JPEG])))

    assert response.status_code == 202
    job_id = response.json["id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    job = fetch_job(redis_conn, job_id)
    assert job.get_status() == JobStatus.QUEUED
    assert tuple(job.args) == (image_key(job_id), 5)  # DEFAULT_TOP_K
    assert redis_conn.get(image_key(job_id)) == photo_bytes[JPEG]
    assert redis_conn.ttl(image_key(job_id)) > 0


def test_octet_stream_body_is_accepted(client: FlaskClient, photo_bytes: dict[str, bytes]) -> None:
    response = client.post("/v1/jobs", data=photo_bytes[JPEG], content_type="application/octet-stream")
    assert response.status_code == 202


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'


@pytest.mark.parametrize(
    ("body", "content_type", "query", "status", "code"),
    [
        pytest.param(b"", "image/png", "", 400, "empty_image", id="empty"),
        pytest.param(
            b"just some words\n" * 10,
            "application/octet-stream",
            "",
            415,
            "unsupported_image_format",
            id="text",
        ),
        pytest.param(
            b"<!DOCTYPE html><html><body>hi</body></html>",
            "image/jpeg",
            "",
            415,
            "unsupported_image_format",
            id="html",
        ),
        pytest.param(SVG, "image/png", "", 415, "unsupported_image_format", id="svg"),
        pytest.param("truncated-png", "image/png", "", 400, "corrupt_image", id="truncated-png"),
        pytest.param(
            png_declaring(50_000, 50_000), "image/png", "", 413, "image_too_large", id="png-bomb-header"
        ),
        pytest.param("png", "text/plain", "", 415, "unsupported_media_type", id="text-plain"),
        pytest.param("png", "application/json", "", 415, "unsupported_media_type", id="json"),
        pytest.param("png", None, "", 415, "unsupported_media_type", id="no-content-type"),
        pytest.param("png", "image/png", "?top_k=0", 422, "invalid_top_k", id="top_k-0"),
        pytest.param("png", "image/png", "?top_k=21", 422, "invalid_top_k", id="top_k-21"),
        pytest.param("png", "image/png", "?top_k=abc", 422, "invalid_top_k", id="top_k-abc"),
        pytest.param("png", "image/png", "?top_k=2.5", 422, "invalid_top_k", id="top_k-float"),
    ],
)
def test_invalid_submissions_are_refused_and_nothing_is_queued(
    client: FlaskClient,
    redis_conn: redis.Redis,
    photo_bytes: dict[str, bytes],
    body: bytes | str,
    content_type: str | None,
    query: str,
    status: int,
    code: str,
) -> None:
    if body == "png":
        body = photo_bytes[PNG]
    elif body == "truncated-png":
        body = photo_bytes[PNG][:30]  # cut inside the IHDR chunk: the header itself is broken
    assert isinstance(body, bytes)
    kwargs: dict[str, Any] = {"data": body}
    if content_type is not None:
        kwargs["content_type"] = content_type

    assert_error(client.post(f"/v1/jobs{query}", **kwargs), status, code)

    assert redis_conn.llen(QUEUE_KEY) == 0
    assert image_keys(redis_conn) == []


@pytest.mark.parametrize(
    ("files", "status", "code"),
    [
        pytest.param([("file", "png")], 400, "missing_image", id="wrong-field-name"),
        pytest.param([], 400, "missing_image", id="no-file"),
        pytest.param([("image", "png"), ("image", "png")], 400, "too_many_images", id="two-images"),
        pytest.param([("image", b"")], 400, "empty_image", id="empty-file"),
        pytest.param([("image", b"GIF89a\x00")], 400, "corrupt_image", id="corrupt-gif"),
    ],
)
def test_invalid_multipart_submissions(
    client: FlaskClient,
    redis_conn: redis.Redis,
    photo_bytes: dict[str, bytes],
    files: list[tuple[str, bytes | str]],
    status: int,
    code: str,
) -> None:
    parts = [(name, photo_bytes[PNG] if content == "png" else content) for name, content in files]
    assert all(isinstance(content, bytes) for _, content in parts)
    response = client.post("/v1/jobs", **multipart(*parts, note="hello"))  # type: ignore[arg-type]

    assert_error(response, status, code)
    assert redis_conn.llen(QUEUE_KEY) == 0
    assert image_keys(redis_conn) == []


def test_image_sent_as_text_field_is_missing_image(client: FlaskClient, redis_conn: redis.Redis) -> None:
    response = client.post("/v1/jobs", data={"image": "not a file"}, content_type="multipart/form-data")
    error = assert_error(response, 400, "missing_image")
    assert "file" in error["message"]
    assert redis_conn.llen(QUEUE_KEY) == 0


def test_body_over_max_upload_bytes_is_413(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    image = photo_bytes[PNG]
    client = create_app(settings_for(redis_url, max_upload_bytes=len(image) - 1)).test_client()

    assert_error(client.post("/v1/jobs", data=image, content_type="image/png"), 413, "payload_too_large")
    assert_error(client.post("/v1/jobs", **multipart(("image", image))), 413, "payload_too_large")
    assert redis_conn.llen(QUEUE_KEY) == 0


def test_a_multipart_413_states_max_upload_bytes(redis_url: str, redis_conn: redis.Redis) -> None:
    """The limit a client can act on is MAX_UPLOAD_BYTES, whatever room the api leaves for the
    multipart envelope on top of it: by Content-Length, and for a body without one (chunked)."""
    limit = 1000
    client = create_app(settings_for(redis_url, max_upload_bytes=limit)).test_client()
    body = b"\0" * (limit + MULTIPART_OVERHEAD_BYTES + 1)
    chunked = {"wsgi.input_terminated": True}
    for overrides in ({}, chunked):
        response = client.post("/v1/jobs", **multipart(("image", body)), environ_overrides=overrides)
        error = assert_error(response, 413, "payload_too_large")
        assert f"at most {limit:,} bytes" in error["message"], error
        assert f"{limit + MULTIPART_OVERHEAD_BYTES:,}" not in error["message"], error
    assert redis_conn.llen(QUEUE_KEY) == 0


class _WatchedBody(io.BytesIO):
    """A request body that records whether anyone read it."""

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        return super().readinto(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().readline(size)


def test_huge_content_length_is_refused_without_reading_the_body(
    client: FlaskClient, redis_conn: redis.Redis
) -> None:
    for path in ("/v1/jobs", "/v1/batches"):
        body = _WatchedBody(b"\0" * 1024)
        content_type = "image/jpeg" if path == "/v1/jobs" else "multipart/form-data; boundary=x"
        response = client.post(
            path,
            input_stream=body,
            content_type=content_type,
            environ_overrides={"CONTENT_LENGTH": str(10**12)},
        )
        assert_error(response, 413, "payload_too_large")
        assert body.reads == 0
    assert redis_conn.llen(QUEUE_KEY) == 0


def test_chunked_body_is_bounded_too(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    image = photo_bytes[PNG]
    client = create_app(settings_for(redis_url, max_upload_bytes=len(image))).test_client()
    # No Content-Length: the server (gunicorn) says it terminates the stream, as for chunked bodies.
    chunked = {"wsgi.input_terminated": True}

    exact = client.post(
        "/v1/jobs", input_stream=io.BytesIO(image), content_type="image/png", environ_overrides=chunked
    )
    assert exact.status_code == 202
    too_big = client.post(
        "/v1/jobs",
        input_stream=io.BytesIO(image + b"\0"),
        content_type="image/png",
        environ_overrides=chunked,
    )
    assert_error(too_big, 413, "payload_too_large")
    assert redis_conn.llen(QUEUE_KEY) == 1


def test_queue_full_is_429_with_retry_after(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    client = create_app(settings_for(redis_url, max_queue_depth=1, queue_share_per_key=1)).test_client()
    submit_png(client, photo_bytes)

    response = client.post("/v1/jobs", data=photo_bytes[PNG], content_type="image/png")

    assert_error(response, 429, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1
    assert redis_conn.llen(QUEUE_KEY) == 1


def test_idempotency_key_returns_the_first_job(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", data=photo_bytes[PNG], content_type="image/png", headers=headers)
    again = client.post("/v1/jobs", data=photo_bytes[PNG], content_type="image/png", headers=headers)

    assert first.status_code == again.status_code == 202
    assert again.json["id"] == first.json["id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert redis_conn.llen(QUEUE_KEY) == 1

    other_image = client.post("/v1/jobs", data=photo_bytes[JPEG], content_type="image/jpeg", headers=headers)
    assert_error(other_image, 409, "idempotency_key_reused")
    bad_key = client.post(
        "/v1/jobs", data=photo_bytes[PNG], content_type="image/png", headers={"Idempotency-Key": "a b"}
    )
    assert_error(bad_key, 400, "invalid_idempotency_key")
    assert redis_conn.llen(QUEUE_KEY) == 1


# --- batches --------------------------------------------------------------------------------------


def test_batch_enqueues_every_image(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    images = [photo_bytes[PNG], photo_bytes[JPEG], photo_bytes["camera.png"]]
    response = client.post("/v1/batches?top_k=2", **multipart(*[("image", image) for image in images]))

    assert response.status_code == 202
    jobs = response.json["jobs"]
    assert [job["status"] for job in jobs] == ["queued"] * 3
    assert redis_conn.llen(QUEUE_KEY) == 3
    for entry, image in zip(jobs, images, strict=True):
        assert entry["url"] == f"/v1/jobs/{entry['id']}"
        job = fetch_job(redis_conn, entry["id"])
        assert tuple(job.args) == (image_key(entry["id"]), 2)
        assert redis_conn.get(image_key(entry["id"])) == image


def test_batch_is_all_or_nothing(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    images = [photo_bytes[PNG], photo_bytes[JPEG], photo_bytes[PNG][:30], photo_bytes[PNG]]
    response = client.post("/v1/batches", **multipart(*[("image", image) for image in images]))

    error = assert_error(response, 400, "corrupt_image")
    assert error["index"] == 2
    assert "image 2" in error["message"]
    assert redis_conn.llen(QUEUE_KEY) == 0
    assert image_keys(redis_conn) == []


def test_batch_limits(redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]) -> None:
    client = create_app(settings_for(redis_url, max_batch_submit=2)).test_client()
    three = multipart(*[("image", photo_bytes[JPEG])] * 3)

    assert_error(client.post("/v1/batches", **three), 422, "too_many_images")
    assert_error(client.post("/v1/batches", **multipart(("file", photo_bytes[JPEG]))), 400, "missing_image")
    assert_error(
        client.post("/v1/batches", data=photo_bytes[JPEG], content_type="image/jpeg"),
        415,
        "unsupported_media_type",
    )
    assert_error(
        client.post("/v1/batches?top_k=0", **multipart(("image", photo_bytes[JPEG]))), 422, "invalid_top_k"
    )
    assert redis_conn.llen(QUEUE_KEY) == 0


# --- read, long-poll, cancel ------------------------------------------------------------------------


def test_get_queued_job(client: FlaskClient, photo_bytes: dict[str, bytes]) -> None:
    job_id = submit_png(client, photo_bytes)

    response = client.get(f"/v1/jobs/{job_id}")

    assert response.status_code == 200
    body = response.json
    documented = client.get("/openapi.json").json["components"]["schemas"]["Job"]
    assert list(body) == documented["required"]  # every field of the contract, in its order
    assert body["id"] == job_id
    assert body["status"] == "queued"
    assert body["result"] is None and body["error"] is None
    assert body["created_at"].endswith("Z")
    assert body["timings"] == {"queue_ms": None, "inference_ms": None, "batch_size": None}


def test_unknown_job_is_404(client: FlaskClient) -> None:
    missing = "0b7e3a4c-9d2f-4c1e-8a6b-5f4e3d2c1b0a"
    assert_error(client.get(f"/v1/jobs/{missing}"), 404, "job_not_found")
    assert_error(client.post(f"/v1/jobs/{missing}/cancel"), 404, "job_not_found")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/../x",
        "/v1/jobs/%2e%2e",
        "/v1/jobs/..%2f..%2frq:queue:inferq",
        "/v1/jobs/rq:queue:inferq",
        "/v1/jobs/" + "a" * 5000,
        "/v1/jobs/0B7E3A4C-9D2F-4C1E-8A6B-5F4E3D2C1B0A",  # not the form the server generates
        "/v1/jobs/*",
    ],
)
def test_ids_that_are_not_server_ids_never_reach_redis(
    client: FlaskClient, redis_conn: redis.Redis, path: str
) -> None:
    before = keyspace_reads(redis_conn)
    for response in (client.get(path), client.post(f"{path}/cancel")):
        assert response.status_code == 404
        assert response.json["error"]["code"] in {"job_not_found", "not_found"}
    assert keyspace_reads(redis_conn) == before


@pytest.mark.parametrize("wait", ["-1", "31", "x", "nan", "inf", ""])
def test_invalid_wait_is_422(client: FlaskClient, photo_bytes: dict[str, bytes], wait: str) -> None:
    job_id = submit_png(client, photo_bytes)
    assert_error(client.get(f"/v1/jobs/{job_id}?wait={wait}"), 422, "invalid_wait")


def test_wait_on_a_queued_job_returns_after_the_wait(
    client: FlaskClient, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit_png(client, photo_bytes)

    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}?wait=1")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.json["status"] == "queued"
    assert 0.9 <= elapsed < 2.5


def _long_poll(client: FlaskClient, job_id: str, wait: float) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{job_id}?wait={wait}")
        outcome["elapsed"] = time.monotonic() - started
        outcome["status_code"] = response.status_code
        outcome["body"] = response.json

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_wait_returns_as_soon_as_the_job_finishes(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit_png(client, photo_bytes)
    thread, outcome = _long_poll(app.test_client(), job_id, 10)
    time.sleep(0.3)

    # What a worker writes on success, in one transaction as RQ does: status, then the result
    # (appending to the result stream is what wakes the long-poll).
    payload = {
        "predictions": [{"label": "espresso", "index": 967, "score": 0.9}],
        "model": {"name": "m", "sha256": "0"},
    }
    job = fetch_job(redis_conn, job_id)
    with redis_conn.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=payload, pipeline=pipe)
        pipe.execute()
    thread.join(5)

    assert not thread.is_alive()
    assert outcome["status_code"] == 200
    assert outcome["body"]["status"] == "finished"
    assert outcome["body"]["result"] == payload
    assert outcome["elapsed"] < 3


def test_cancel_takes_a_queued_job_off_its_queue_and_wakes_long_polls(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit_png(client, photo_bytes)
    thread, outcome = _long_poll(app.test_client(), job_id, 10)
    time.sleep(0.3)  # let the long-poll block first

    response = client.post(f"/v1/jobs/{job_id}/cancel")
    thread.join(5)

    assert response.status_code == 200
    assert response.json["id"] == job_id
    assert response.json["status"] == "canceled"
    assert response.json["error"]["code"] == "canceled"
    assert redis_conn.llen(QUEUE_KEY) == 0
    assert redis_conn.exists(image_key(job_id)) == 0
    assert not thread.is_alive()
    assert outcome["status_code"] == 200
    assert outcome["body"]["status"] == "canceled"
    assert outcome["elapsed"] < 3
    # Ended: canceling again is a conflict.
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_not_cancelable")


def test_a_canceled_job_says_when_it_was_canceled(client: FlaskClient, photo_bytes: dict[str, bytes]) -> None:
    job_id = submit_png(client, photo_bytes)
    before = datetime.now(UTC)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    after = datetime.now(UTC)

    assert response.status_code == 200, response.json
    for view in (response.json, client.get(f"/v1/jobs/{job_id}").json):
        assert view["status"] == "canceled"
        assert view["ended_at"] is not None, view
        ended = datetime.fromisoformat(view["ended_at"].replace("Z", "+00:00"))
        created = datetime.fromisoformat(view["created_at"].replace("Z", "+00:00"))
        assert created <= before <= ended <= after, view


def test_job_taken_by_a_worker_cannot_be_canceled(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit_png(client, photo_bytes)
    # A worker's first step: move the id out of the queue (BLMOVE), before it marks the job started.
    assert redis_conn.lmove(QUEUE_KEY, "rq:queue:inferq:intermediate", "LEFT", "RIGHT") == job_id.encode()

    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_not_cancelable")
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.QUEUED  # untouched

    fetch_job(redis_conn, job_id).set_status(JobStatus.STARTED)
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_not_cancelable")


# --- health, readiness, metrics, openapi, errors -----------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_needs_a_live_worker(client: FlaskClient, redis_url: str, redis_conn: redis.Redis) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"
    assert "worker" in response.json["reason"]

    # A worker that died without deregistering: still in RQ's set, but its key has expired.
    redis_conn.sadd("rq:workers:inferq", "rq:worker:ghost")
    assert client.get("/readyz").status_code == 503

    worker_conn = redis.Redis.from_url(redis_url)  # RQ's Worker changes its connection's timeouts
    worker = Worker(["inferq"], connection=worker_conn, serializer=JSONSerializer)
    worker.register_birth()
    try:
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json["status"] == "ok"
    finally:
        worker.register_death()
        worker_conn.close()


@pytest.fixture
def down_client() -> FlaskClient:
    """An app whose Redis URL points at a port nothing listens on."""
    return create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()


def test_readyz_when_redis_is_down(down_client: FlaskClient) -> None:
    started = time.monotonic()
    response = down_client.get("/readyz")
    assert time.monotonic() - started < 2
    assert response.status_code == 503
    assert response.json["status"] == "unavailable"
    assert "Redis" in response.json["reason"]
    assert down_client.get("/healthz").status_code == 200


def test_v1_routes_answer_503_promptly_when_redis_is_down(
    down_client: FlaskClient, photo_bytes: dict[str, bytes]
) -> None:
    job_id = "0b7e3a4c-9d2f-4c1e-8a6b-5f4e3d2c1b0a"
    calls = [
        lambda: down_client.post("/v1/jobs", data=photo_bytes[PNG], content_type="image/png"),
        lambda: down_client.get(f"/v1/jobs/{job_id}?wait=5"),
    ]
    for call in calls:
        started = time.monotonic()
        response = call()
        assert time.monotonic() - started < 5
        error = assert_error(response, 503, "redis_unavailable")
        assert "127.0.0.1" not in error["message"]  # no connection details leak


def _submit_raising(
    error: Exception, client: FlaskClient, photo_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> TestResponse:
    """A submission during which the queueing itself raises `error`."""

    def raising(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr("api.routes.submit", raising)
    return client.post("/v1/jobs", data=photo_bytes[PNG], content_type="image/png")


def test_unexpected_errors_are_json_500_without_details(
    client: FlaskClient, photo_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    error = RuntimeError("password=hunter2 in a traceback")
    response = _submit_raising(error, client, photo_bytes, monkeypatch)

    assert_error(response, 500, "internal_error")
    text = response.get_data(as_text=True)
    assert "hunter2" not in text and "Traceback" not in text and "RuntimeError" not in text


def test_redis_refusing_writes_is_503(
    client: FlaskClient, photo_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    error = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    response = _submit_raising(error, client, photo_bytes, monkeypatch)
    assert_error(response, 503, "redis_full")  # maxmemory under noeviction: full, not down
    assert int(response.headers["Retry-After"]) >= 1


def test_http_errors_are_json(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.put("/v1/jobs")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def _allowed(response: TestResponse) -> set[str]:
    return {method.strip() for method in response.headers["Allow"].split(",")}


def test_each_job_path_answers_only_the_methods_the_document_lists(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    """A job id is one path segment: `/v1/jobs/<id>/cancel` is not a job read of the id
    `<id>/cancel`, and `DELETE /v1/jobs/<id>` (which would not delete the job) is not a route."""
    job_id = submit_png(client, photo_bytes)
    document = client.get("/openapi.json").json["paths"]
    implicit = {"HEAD", "OPTIONS"}  # answered by Flask for every route
    for path, template in [
        (f"/v1/jobs/{job_id}", "/v1/jobs/{job_id}"),
        (f"/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/cancel"),
    ]:
        response = client.options(path)
        assert response.status_code == 200
        assert _allowed(response) - implicit == {method.upper() for method in document[template]}, path

    response = client.get(f"/v1/jobs/{job_id}/cancel")
    assert_error(response, 405, "method_not_allowed")
    assert _allowed(response) == {"POST", "OPTIONS"}
    deleted = client.delete(f"/v1/jobs/{job_id}")
    error = assert_error(deleted, 405, "method_not_allowed")
    assert "POST /v1/jobs/<id>/cancel" in error["message"]  # what a client of the old alias should call
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.QUEUED  # neither touched the job
    assert client.get(f"/v1/jobs/{job_id}").json["status"] == "queued"


def test_metrics(client: FlaskClient, photo_bytes: dict[str, bytes]) -> None:
    submit_png(client, photo_bytes)
    client.get("/v1/jobs/not-an-id")

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    assert 'inferq_http_requests_total{method="POST",route="/v1/jobs",status="202"}' in text
    assert 'route="/v1/jobs/<job_id>",status="404"' in text
    assert "not-an-id" not in text  # route templates, not raw paths
    assert "inferq_http_request_duration_seconds_bucket" in text
    assert 'inferq_queue_depth{queue="inferq"} 1.0' in text
    assert "inferq_redis_up 1.0" in text


def test_openapi_document(client: FlaskClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.get_data(as_text=True))
    assert document["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/batches", "/v1/jobs/{job_id}", "/healthz", "/readyz", "/metrics"} <= set(
        document["paths"]
    )
    assert set(document["paths"]["/v1/jobs/{job_id}"]) == {"get"}
    assert set(document["paths"]["/v1/jobs/{job_id}/cancel"]) == {"post"}


# --- the real server --------------------------------------------------------------------------------


@pytest.fixture
def gunicorn_api(redis_url: str, tmp_path: Any) -> Iterator[str]:
    port = free_port()
    env = service_env(redis_url, WEB_CONCURRENCY=2, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    proc = start_api(env, port, log=tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or http_ok(f"{base}/healthz"), 30, what="gunicorn up")
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        yield base
    finally:
        returncode = stop(proc, timeout=20)
        log = (tmp_path / "api.log").read_text()
        assert returncode == 0, log
        assert "Traceback" not in log, log


@pytest.mark.slow
def test_gunicorn_serves_the_api(
    gunicorn_api: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    response = requests.post(
        f"{gunicorn_api}/v1/jobs?top_k=2",
        data=photo_bytes[JPEG],
        headers={"Content-Type": "image/jpeg"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    location = response.headers["Location"]

    job = requests.get(f"{gunicorn_api}{location}", timeout=10)
    assert job.status_code == 200
    assert job.json()["status"] == "queued"
    assert tuple(fetch_job(redis_conn, job.json()["id"]).args) == (image_key(job.json()["id"]), 2)

    # A chunked body (no Content-Length) over the limit is refused too.
    def chunks() -> Iterator[bytes]:
        for _ in range(11):
            yield b"\0" * (1024 * 1024)

    too_big = requests.post(
        f"{gunicorn_api}/v1/jobs", data=chunks(), headers={"Content-Type": "image/png"}, timeout=10
    )
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "payload_too_large"

    # Multiprocess mode: whichever of the two processes answers the scrape, it reports the
    # requests every process served (the 202 may have been served by the other one).
    metrics = requests.get(f"{gunicorn_api}/metrics", timeout=10).text
    assert 'inferq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in metrics
    assert redis_conn.llen(QUEUE_KEY) == 1
