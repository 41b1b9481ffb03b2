"""The service end to end: real Valkey, real gunicorn api over HTTP, real batch worker processes."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from rq import Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import META_CRASHES, SERIALIZER, make_queue, submit
from shared.manifest import Manifest
from tests.conftest import PHOTO_LABELS
from tests.service import free_port, http_ok, service_env, start_api, start_worker, stop, wait_until

pytestmark = pytest.mark.slow
QUEUE = "inferq"


def truncated(data: bytes) -> bytes:
    """A PNG whose header is intact (it passes the api's header check) but whose pixels are cut."""
    return data[: len(data) // 3]


@pytest.fixture(scope="module")
def stack(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One Valkey, one api (gunicorn), one batch worker, for the module."""
    logs = tmp_path_factory.mktemp("stack")
    with EmbeddedRedis(logs / "redis") as server:
        env = service_env(server.url, MAX_BATCH_SIZE=16)
        port = free_port()
        api = start_api(env, port, log=logs / "api.log")
        worker = start_worker(env, log=logs / "worker.log")
        conn = redis.Redis.from_url(server.url)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_ok(base + "/readyz"), 180, 0.5, "api ready with a worker")
            yield {"base": base, "conn": conn, "worker": worker, "logs": logs}
        finally:
            stop(worker)
            stop(api)


def post_image(base: str, data: bytes, top_k: int = 5) -> requests.Response:
    return requests.post(
        f"{base}/v1/jobs",
        params={"top_k": top_k},
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )


def wait_job(base: str, job_id: str, wait: float = 30) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10).json()
        if body["status"] in ("finished", "failed", "canceled"):
            return body
    raise TimeoutError(job_id)


def test_photos_come_back_with_the_right_labels(
    stack: dict, photo_bytes: dict[str, bytes], artifact_dir: Path
):
    base = stack["base"]
    manifest = Manifest.read(artifact_dir)
    for name, data in photo_bytes.items():
        response = post_image(base, data, top_k=3)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.headers["Location"].endswith(f"/v1/jobs/{job_id}")
        body = wait_job(base, job_id)
        assert body["status"] == "finished", body
        predictions = body["result"]["predictions"]
        assert len(predictions) == 3
        assert predictions[0]["label"] in PHOTO_LABELS[name], (name, predictions)
        served = body["result"]["model"]
        assert served["name"] == manifest.name
        # The sha256 of the file its backend served: model.pt for TorchScript, else the ONNX export.
        assert manifest.onnx is not None
        want = manifest.sha256 if served["backend"] == "torchscript" else manifest.onnx.sha256
        assert served["sha256"] == want
        assert body["timings"]["batch_size"] >= 1
        assert body["timings"]["inference_ms"] > 0
        assert body["timings"]["queue_ms"] >= 0
        assert body["error"] is None


def test_a_burst_is_batched_and_a_corrupt_image_fails_alone(stack: dict, photo_bytes: dict[str, bytes]):
    base, conn = stack["base"], stack["conn"]
    names = list(photo_bytes)
    payloads = [photo_bytes[names[i % len(names)]] for i in range(50)]
    corrupt_at = 25
    payloads[corrupt_at] = truncated(photo_bytes["chelsea.png"])
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: post_image(base, data), payloads))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    ids = [r.json()["id"] for r in responses]
    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(lambda job_id: wait_job(base, job_id), ids))

    for i, body in enumerate(bodies):
        if i == corrupt_at:
            assert body["status"] == "failed"
            assert body["error"]["code"] == "corrupt_image"
            assert body["result"] is None
        else:
            assert body["status"] == "finished", body
            assert body["result"]["predictions"][0]["label"] in PHOTO_LABELS[names[i % len(names)]]
    sizes = [body["timings"]["batch_size"] for body in bodies]
    assert max(sizes) > 1, sizes
    # The corrupt image shared its batch with neighbours that finished.
    assert bodies[corrupt_at]["timings"]["batch_size"] > 1 or max(sizes) > 1

    # RQ's own API agrees with what HTTP reported.
    queue = make_queue(conn, Settings())
    finished = FinishedJobRegistry(queue=queue)
    failed = FailedJobRegistry(queue=queue)
    for job_id, body in zip(ids, bodies, strict=True):
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        assert job.get_status().value == body["status"]
        if body["status"] == "finished":
            assert job.return_value() == body["result"]
            assert job_id in finished
        else:
            assert job.latest_result().type.name == "FAILED"
            assert job_id in failed
        assert not conn.exists(f"inferq:img:{job_id}"), "image bytes outlived their job"
    assert StartedJobRegistry(queue=queue).count == 0
    workers = Worker.all(connection=conn, queue=queue, serializer=SERIALIZER)
    assert sum(w.successful_job_count for w in workers) >= 49
    assert sum(w.failed_job_count for w in workers) >= 1


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


def enqueue_many(
    conn: redis.Redis, photo_bytes: dict[str, bytes], count: int, settings: Settings
) -> list[str]:
    queue = make_queue(conn, settings)
    names = list(photo_bytes)
    return [submit(queue, photo_bytes[names[i % len(names)]], 5, settings).id for i in range(count)]


def statuses(conn: redis.Redis, ids: list[str]) -> list[str]:
    return [Job.fetch(i, connection=conn, serializer=SERIALIZER).get_status().value for i in ids]


def test_sigterm_finishes_the_batch_and_leaves_the_rest_queued(
    own_redis: EmbeddedRedis, photo_bytes: dict[str, bytes], artifact_dir: Path, tmp_path: Path
):
    conn = redis.Redis.from_url(own_redis.url)
    settings = Settings(redis_url=own_redis.url)
    ids = enqueue_many(conn, photo_bytes, 60, settings)
    env = service_env(own_redis.url, MAX_BATCH_SIZE=4)
    worker = start_worker(env, log=tmp_path / "worker1.log")
    queue = make_queue(conn, settings)
    started = StartedJobRegistry(queue=queue)
    try:
        wait_until(lambda: started.count > 0, 120, 0.005, "a batch in flight")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        stop(worker)
    after = statuses(conn, ids)
    assert "started" not in after and "failed" not in after, after
    assert 1 <= after.count("finished") < len(ids), after
    assert after.count("queued") == len(ids) - after.count("finished")
    assert started.count == 0
    assert conn.llen(queue.intermediate_queue_key) == 0
    assert Worker.count(connection=conn, queue=queue) == 0, "the stopped worker deregistered"

    successor = start_worker(env, log=tmp_path / "worker2.log")
    try:
        wait_until(lambda: statuses(conn, ids).count("finished") == len(ids), 180, 0.5, "all jobs finished")
    finally:
        stop(successor)


def test_a_sigkilled_worker_does_not_strand_its_jobs(
    own_redis: EmbeddedRedis, photo_bytes: dict[str, bytes], artifact_dir: Path, tmp_path: Path
):
    conn = redis.Redis.from_url(own_redis.url)
    settings = Settings(redis_url=own_redis.url)
    ids = enqueue_many(conn, photo_bytes, 60, settings)
    env = service_env(own_redis.url, MAX_BATCH_SIZE=8)
    queue = make_queue(conn, settings)
    started = StartedJobRegistry(queue=queue)
    victim = start_worker(env, log=tmp_path / "victim.log")
    try:
        wait_until(lambda: started.count > 0, 120, 0.005, "a batch in flight")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        stranded = [job_id for job_id, _ in started.get_job_and_execution_ids(cleanup=False)]
    finally:
        stop(victim)
    stranded = [
        i
        for i in stranded
        if Job.fetch(i, connection=conn, serializer=SERIALIZER).get_status().value == "started"
    ]
    assert stranded, "the kill landed between batches; nothing to recover"

    killed_at = time.monotonic()
    rescuer = start_worker(env, log=tmp_path / "rescuer.log")
    try:
        wait_until(lambda: statuses(conn, ids).count("finished") == len(ids), 180, 0.5, "all jobs finished")
    finally:
        stop(rescuer)
    # Bounded: the abandoned jobs came back within the configured window plus the rescuer's start.
    assert time.monotonic() - killed_at < 120
    for job_id in stranded:
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        # An attempt is spent only by a job that was being decoded or in a forward pass when its
        # worker died; one that was waiting for the model went back free of charge.
        crashes = int(job.meta.get(META_CRASHES, 0))
        assert crashes in (0, 1)
        assert job.retries_left == settings.max_attempts - 1 - crashes
