"""Nothing vanishes, and Redis memory has a budget: real Redis servers (some with a small
`maxmemory`), the api through Flask's test client, workers in-process with a stub model.

- a queued job whose image expired ends `failed` / `image_expired`, seen by its owner and counted;
- a `deadline_ms` longer than IMAGE_TTL keeps the image until the deadline;
- the 429 backlog counts only live jobs;
- MAX_QUEUED_BYTES gives 429 `queued_bytes_full` (with Retry-After) and is released when jobs end;
- a Redis at `maxmemory` answers 503 `redis_full`, and workers still finish and free images;
- api and workers refuse (or warn about) an eviction policy that can evict job keys.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from flask.testing import FlaskClient

from api import create_app
from shared.config import Settings
from shared.telemetry import read_snapshot
from tests.worker_stub import png, stub_worker

IMAGE = png(90, size=64)


def settings_for(url: str, **overrides: Any) -> Settings:
    overrides.setdefault("abandoned_after_seconds", 2)
    return Settings(redis_url=url, **overrides)


def client_for(settings: Settings) -> FlaskClient:
    return create_app(settings).test_client()


def submit(client: FlaskClient, query: str = "", data: bytes = IMAGE) -> Any:
    return client.post(f"/v1/jobs{query}", data=data, content_type="image/png")


def job_id_of(response: Any) -> str:
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.json["id"])


def failed_counts(conn: redis.Redis, settings: Settings) -> dict[str, int]:
    return read_snapshot(conn, settings.queue_name, []).failed_by_code


# --- nothing vanishes ----------------------------------------------------------------------------


def test_a_job_whose_image_expired_ends_failed_image_expired(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = settings_for(redis_url, image_ttl=1)
    client = client_for(settings)
    job_id = job_id_of(submit(client))
    time.sleep(2.2)  # the image (IMAGE_TTL = 1 s) is gone; no worker ran meanwhile

    stub_worker(settings).work(burst=True)

    body = client.get(f"/v1/jobs/{job_id}").json
    assert body["status"] == "failed", body
    assert body["error"]["code"] == "image_expired"
    assert failed_counts(redis_conn, settings).get("image_expired") == 1
