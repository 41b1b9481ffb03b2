"""Nothing vanishes, and Redis memory has a budget: real Redis servers (some with a small
`maxmemory`), the api through Flask's test client, workers in-process with a stub model.

- a queued job whose image expired ends `failed` / `image_expired`, seen by its owner and counted;
- a `deadline_ms` longer than IMAGE_TTL keeps the image until the deadline;
- the 429 backlog counts only live jobs;
- MAX_QUEUED_BYTES gives 429 `queued_bytes_full` (with Retry-After) and is released when jobs end;
- a Redis at `maxmemory` answers 503 `redis_full`, and workers still finish and free images; a
  real worker process drains a Redis held past maxmemory (the Redis-full drill in small);
- api and workers refuse (or warn about) an eviction policy that can evict job keys.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from flask.testing import FlaskClient
from PIL import Image
from rq import SimpleWorker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.suspension import resume, suspend

from api import create_app
from launch.processes import wait_until
from launch.redis_server import EmbeddedRedis
from shared import image_budget, keys
from shared.config import Settings
from shared.jobs import LANES, _queue_job, lane_queue_name, make_queue, new_job_id
from shared.keys import image_key
from shared.redis_conn import redis_from_url
from shared.redis_policy import EvictionPolicyError
from shared.telemetry import read_snapshot
from tests.service import (
    all_ended,
    post_image,
    results_of,
    running,
    service_stack,
    start_worker,
    views,
)
from tests.worker_stub import MeanRunner, png, stub_handler, stub_worker
from worker.batch_worker import BatchWorker

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


def submit_without_image(client: FlaskClient, conn: redis.Redis) -> str:
    """A queued job whose image bytes are gone from Redis; its id."""
    job_id = job_id_of(submit(client))
    conn.delete(image_key(job_id))
    return job_id


def failed_counts(conn: redis.Redis, settings: Settings) -> dict[str, int]:
    return read_snapshot(conn, settings.queue_name, []).failed_by_code


# --- nothing vanishes ----------------------------------------------------------------------------


def test_a_queued_job_whose_image_expired_reads_failed_image_expired(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """No worker at all: the owner's GET ends the job (never 410 for a job that never ran)."""
    settings = settings_for(redis_url, image_ttl=1)
    client = client_for(settings)
    job_id = job_id_of(submit(client))
    time.sleep(2.2)  # the image (IMAGE_TTL = 1 s) is gone

    response = client.get(f"/v1/jobs/{job_id}")

    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["status"] == "failed"
    assert response.json["error"]["code"] == "image_expired"
    assert failed_counts(redis_conn, settings) == {"image_expired": 1}
    assert redis_conn.llen("rq:queue:inferq") == 0
    assert image_budget.queued_bytes(redis_conn) == 0


def test_a_job_left_queued_in_no_list_is_ended_too(redis_url: str, redis_conn: redis.Redis) -> None:
    """A cancel (or an expiry) that died between its claim (LREM) and its end leaves a `queued` hash in
    no list; queued hashes have no TTL, so the sweep must end it once its image is long gone."""
    settings = settings_for(redis_url, image_ttl=1)
    client = client_for(settings)
    job_id = job_id_of(submit(client))
    assert redis_conn.lrem("rq:queue:inferq", 1, job_id) == 1  # the claim of a process that then died
    time.sleep(2.2)
    assert image_budget.sweep(redis_conn, settings, force=True).ended == 0  # type: ignore[union-attr]
    job = Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer)
    job.meta[image_budget.META_IMAGE_EXPIRES] = time.time() - image_budget.ORPHAN_GRACE_SECONDS - 1
    job.save_meta()  # as if the image had expired a while ago: no claimant can still be alive

    report = image_budget.sweep(redis_conn, settings, force=True)

    assert report is not None and report.ended == 1
    assert client.get(f"/v1/jobs/{job_id}").json["error"]["code"] == "image_expired"
    assert image_budget.queued_bytes(redis_conn) == 0


def test_a_worker_ends_a_job_whose_image_expired(redis_url: str, redis_conn: redis.Redis) -> None:
    """Nobody reads the job: the worker (its sweep, or its own grab) ends it, counted once."""
    settings = settings_for(redis_url, image_ttl=1)
    client = client_for(settings)
    expired_id = job_id_of(submit(client))
    time.sleep(2.2)
    # A deadline keeps this image past IMAGE_TTL: on a loaded machine the worker may take longer
    # than IMAGE_TTL to start, and this job must not expire with the other.
    fresh_id = job_id_of(submit(client, "?deadline_ms=60000"))

    stub_worker(settings).work(burst=True)

    expired = Job.fetch(expired_id, connection=redis_conn, serializer=JSONSerializer)
    assert expired.get_status() == JobStatus.FAILED
    assert expired.meta["error"]["code"] == "image_expired"
    assert Job.fetch(fresh_id, connection=redis_conn, serializer=JSONSerializer).get_status() == "finished"
    assert failed_counts(redis_conn, settings) == {"image_expired": 1}
    assert client.get(f"/v1/jobs/{expired_id}").json["error"]["code"] == "image_expired"


def test_the_worker_tells_an_expired_image_from_a_deleted_one(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """The worker's own check (a grabbed job whose image is gone), without the sweep's help."""
    settings = settings_for(redis_url)
    client = client_for(settings)
    deleted_id = submit_without_image(client, redis_conn)  # gone long before its IMAGE_TTL
    expired_id = submit_without_image(client, redis_conn)
    job = Job.fetch(expired_id, connection=redis_conn, serializer=JSONSerializer)
    job.meta[image_budget.META_IMAGE_EXPIRES] = time.time() - 5  # as if IMAGE_TTL had run out
    job.save_meta()
    worker = stub_worker(settings)
    worker.clean_registries = lambda: None  # type: ignore[method-assign]  # no sweep: the grab path

    worker.work(burst=True)

    codes = {
        job_id: Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).meta["error"]["code"]
        for job_id in (deleted_id, expired_id)
    }
    assert codes == {deleted_id: "image_missing", expired_id: "image_expired"}
    assert failed_counts(redis_conn, settings) == {"image_missing": 1, "image_expired": 1}


def test_a_deadline_beyond_image_ttl_keeps_the_image(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = settings_for(redis_url, image_ttl=1)
    client = client_for(settings)
    job_id = job_id_of(submit(client, "?deadline_ms=6000"))
    assert redis_conn.ttl(image_key(job_id)) >= 5  # raised to the deadline, not IMAGE_TTL's 1 s
    time.sleep(2.2)

    stub_worker(settings).work(burst=True)

    assert client.get(f"/v1/jobs/{job_id}").json["status"] == "finished"


def test_the_backlog_behind_429_counts_only_live_jobs(redis_url: str, redis_conn: redis.Redis) -> None:
    # One key fills the whole queue here: this is about the global backlog, not the per-key share.
    settings = settings_for(redis_url, image_ttl=1, max_queue_depth=2, queue_share_per_key=1.0)
    client = client_for(settings)
    dead = [job_id_of(submit(client)) for _ in range(2)]
    assert submit(client).status_code == 429  # two live jobs: full
    time.sleep(2.2)  # both images expired: nothing live is waiting

    live = job_id_of(submit(client))

    assert redis_conn.lrange("rq:queue:inferq", 0, -1) == [live.encode()]
    for job_id in dead:
        assert client.get(f"/v1/jobs/{job_id}").json["error"]["code"] == "image_expired"


# --- the byte budget ---------------------------------------------------------------------------------


def test_max_queued_bytes_gives_429_and_is_released_when_jobs_end(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    settings = settings_for(redis_url, max_queued_bytes=3 * len(IMAGE))
    client = client_for(settings)
    ids = [job_id_of(submit(client)) for _ in range(3)]
    assert image_budget.queued_bytes(redis_conn) == 3 * len(IMAGE)

    refused = submit(client)
    batch = client.post(
        "/v1/batches",
        data={"image": [(io.BytesIO(IMAGE), "a.png"), (io.BytesIO(IMAGE), "b.png")]},
        content_type="multipart/form-data",
    )

    for response in (refused, batch):
        assert response.status_code == 429, response.get_data(as_text=True)
        assert response.json["error"]["code"] == "queued_bytes_full"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert redis_conn.llen("rq:queue:inferq") == 3  # nothing of the refused uploads was stored

    stub_worker(settings).work(burst=True)

    assert all(client.get(f"/v1/jobs/{job_id}").json["status"] == "finished" for job_id in ids)
    assert image_budget.queued_bytes(redis_conn) == 0
    assert job_id_of(submit(client))  # room again


def test_concurrent_submitters_cannot_overshoot_the_byte_budget(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    settings = settings_for(redis_url, max_queued_bytes=5 * len(IMAGE))
    app = create_app(settings)
    answers: list[int] = []
    lock = threading.Lock()

    def post() -> None:
        status = submit(app.test_client()).status_code
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=post) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(answers) == [202] * 5 + [429] * 19
    assert redis_conn.llen("rq:queue:inferq") == 5
    assert image_budget.queued_bytes(redis_conn) == 5 * len(IMAGE)


def test_a_submit_that_fails_gives_its_bytes_back(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(redis_url, max_queued_bytes=2 * len(IMAGE))
    client = client_for(settings)

    def broken_enqueue(*args: Any, **kwargs: Any) -> None:
        raise redis.exceptions.ResponseError("the transaction failed")

    with monkeypatch.context() as patch:
        patch.setattr("rq.Queue.enqueue_call", broken_enqueue)
        for _ in range(3):
            answer = submit(client)
            assert answer.status_code == 500, answer.get_data(as_text=True)

    assert image_budget.queued_bytes(redis_conn) == 0
    assert redis_conn.hlen(keys.queued_images_key()) == 0
    assert [submit(client).status_code for _ in range(3)] == [202, 202, 429]


def test_cancel_and_deadline_expiry_release_their_bytes(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = settings_for(redis_url)
    client = client_for(settings)
    canceled = job_id_of(submit(client))
    late = job_id_of(submit(client, "?deadline_ms=1"))
    assert image_budget.queued_bytes(redis_conn) == 2 * len(IMAGE)

    assert client.post(f"/v1/jobs/{canceled}/cancel").status_code == 200
    assert image_budget.queued_bytes(redis_conn) == len(IMAGE)
    time.sleep(0.05)
    stub_worker(settings).work(burst=True)

    assert client.get(f"/v1/jobs/{late}").json["status"] == "expired"
    assert image_budget.queued_bytes(redis_conn) == 0
    assert not redis_conn.exists(image_key(late))


def test_a_sweep_never_ends_a_job_whose_submit_lands_while_it_runs(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the Redis-full drill: a submit counted (reserved) but not yet stored when a sweep
    began, and stored between the sweep's reads, was ended `image_missing` 14 ms after its 202."""
    settings = settings_for(redis_url)
    queue = make_queue(redis_conn, settings)
    job_id = new_job_id()
    image_budget.reserve(redis_conn, [(job_id, len(IMAGE))], settings)  # the submit has counted...

    def land_the_submit() -> None:  # ...and its transaction lands right after the sweep's first read
        with redis_conn.pipeline() as pipe:
            pipe.multi()
            _queue_job(queue, pipe, job_id, IMAGE, 5, settings, None)
            pipe.execute()

    real_execute = redis.client.Pipeline.execute
    landed: list[bool] = []

    def execute(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        result = real_execute(self, raise_on_error)
        if not landed:
            landed.append(True)
            land_the_submit()
        return result

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    report = image_budget.sweep(redis_conn, settings, force=True)
    monkeypatch.undo()

    assert landed and report is not None and report.ended == 0
    assert Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer).get_status() == "queued"
    assert redis_conn.exists(image_key(job_id))
    assert image_budget.queued_bytes(redis_conn) == len(IMAGE)


def test_a_plain_rq_worker_releases_the_bytes_of_the_jobs_it_runs(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    """`worker.tasks.classify` (jobs run by `rq worker` instead of the batch worker) releases too."""
    settings = settings_for(redis_url)
    client = client_for(settings)
    job_id = submit_without_image(client, redis_conn)  # fails before any model is loaded

    SimpleWorker(["inferq"], connection=redis_conn, serializer=JSONSerializer).work(burst=True)

    assert client.get(f"/v1/jobs/{job_id}").json["error"]["code"] == "image_missing"
    assert image_budget.queued_bytes(redis_conn) == 0


def test_the_byte_count_heals_itself(redis_url: str, redis_conn: redis.Redis) -> None:
    """Drift (a submitter that died between reserve and enqueue, a hand edit) is undone by the sweep."""
    settings = settings_for(redis_url)
    client = client_for(settings)
    job_id_of(submit(client))
    stale = int(time.time()) - image_budget.ORPHAN_GRACE_SECONDS - 5
    redis_conn.hset(keys.queued_images_key(), "no-such-job", f"5000000 {stale}")  # a dead submitter's
    redis_conn.incrby(keys.queued_bytes_key(), 5_000_000 + 777)  # and a hand edit

    report = image_budget.sweep(redis_conn, settings, force=True)

    assert report is not None and report.total == len(IMAGE)
    assert image_budget.queued_bytes(redis_conn) == len(IMAGE)
    assert redis_conn.hlen(keys.queued_images_key()) == 1


# --- a full Redis ---------------------------------------------------------------------------------------


def noise_png(seed: int, side: int = 160) -> bytes:
    """An incompressible PNG of about side * side * 3 bytes (fills Redis quickly)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_full_redis_answers_503_redis_full_then_drains_without_losing_a_job(
    fresh_redis_server: Callable[..., EmbeddedRedis],
) -> None:
    server = fresh_redis_server(appendonly=False, maxmemory="6mb")
    settings = settings_for(server.url, max_queued_bytes=0, redis_headroom_bytes=512 * 1024)
    client = client_for(settings)
    conn = redis_from_url(server.url)
    accepted: list[str] = []
    refused = None
    for seed in range(200):
        response = submit(client, data=noise_png(seed))
        if response.status_code != 202:
            refused = response
            break
        accepted.append(job_id_of(response))
    assert refused is not None and len(accepted) >= 5
    assert refused.status_code == 503, refused.get_data(as_text=True)
    assert refused.json["error"]["code"] == "redis_full"
    assert int(refused.headers["Retry-After"]) >= 1
    info = conn.info("memory")
    assert info["used_memory"] <= info["maxmemory"]  # the api stopped before Redis had to refuse

    stub_worker(settings).work(burst=True)

    statuses = [client.get(f"/v1/jobs/{job_id}").json["status"] for job_id in accepted]
    assert statuses == ["finished"] * len(accepted)
    assert image_budget.queued_bytes(conn) == 0
    assert job_id_of(submit(client, data=noise_png(999)))  # accepting again


class FillingRunner(MeanRunner):
    """Runs `during_first_batch` inside the first forward pass, while its jobs are in flight."""

    def __init__(self, during_first_batch: Callable[[], None]) -> None:
        super().__init__()
        self.during_first_batch: Callable[[], None] | None = during_first_batch

    def predict(self, inputs: Any, top_k: list[int]) -> list[list[dict[str, Any]]]:
        if self.during_first_batch is not None:
            action, self.during_first_batch = self.during_first_batch, None
            action()
        return super().predict(inputs, top_k)


def test_workers_finish_and_free_images_when_redis_is_past_maxmemory(
    fresh_redis_server: Callable[..., EmbeddedRedis], caplog: pytest.LogCaptureFixture
) -> None:
    """Redis over maxmemory (noeviction) refuses every MULTI that writes; a worker's batch must still
    end (its images freed first), and the api answers 503 redis_full meanwhile, never 500."""
    server = fresh_redis_server(appendonly=False)
    settings = settings_for(server.url, max_queued_bytes=0, redis_headroom_bytes=0)
    client = client_for(settings)
    conn = redis_from_url(server.url)
    ids = [job_id_of(submit(client, data=noise_png(seed))) for seed in range(6)]
    seen: dict[str, Any] = {}

    def push_redis_past_maxmemory() -> None:
        # As if results had grown, or an operator lowered the limit, while a batch is in flight.
        conn.config_set("maxmemory", conn.info("memory")["used_memory"] - 100_000)
        try:
            conn.set("probe", b"x")
        except redis.exceptions.OutOfMemoryError:
            seen["oom"] = True
        seen["submit"] = submit(client, data=noise_png(100))

    runner = FillingRunner(push_redis_past_maxmemory)
    worker = BatchWorker(
        [lane_queue_name(settings, lane) for lane in LANES], settings=settings, handler=stub_handler(runner)
    )

    with caplog.at_level(logging.WARNING, logger="inferq.worker"):
        worker.work(burst=True)

    assert seen["oom"]
    assert seen["submit"].status_code == 503, seen["submit"].get_data(as_text=True)
    assert seen["submit"].json["error"]["code"] == "redis_full"
    assert "Redis is full" in caplog.text
    statuses = [client.get(f"/v1/jobs/{job_id}").json["status"] for job_id in ids]
    assert statuses == ["finished"] * len(ids)
    assert not any(conn.exists(image_key(job_id)) for job_id in ids)
    assert image_budget.queued_bytes(conn) == 0


# --- the eviction policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
def test_api_and_worker_refuse_a_policy_that_evicts(
    fresh_redis_server: Callable[..., EmbeddedRedis], policy: str
) -> None:
    server = fresh_redis_server(appendonly=False, maxmemory="64mb")
    redis_from_url(server.url).config_set("maxmemory-policy", policy)
    settings = settings_for(server.url)

    with pytest.raises(EvictionPolicyError, match=policy):
        create_app(settings)
    with pytest.raises(EvictionPolicyError, match="noeviction"):
        stub_worker(settings).work(burst=True)


def test_warn_mode_runs_but_says_so(
    fresh_redis_server: Callable[..., EmbeddedRedis], caplog: pytest.LogCaptureFixture
) -> None:
    server = fresh_redis_server(appendonly=False, maxmemory="64mb")
    redis_from_url(server.url).config_set("maxmemory-policy", "volatile-ttl")
    settings = settings_for(server.url, redis_eviction_check="warn")

    with caplog.at_level(logging.ERROR):
        client = client_for(settings)

    assert "volatile-ttl" in caplog.text
    assert submit(client).status_code == 202


def test_noeviction_passes_quietly(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        create_app(settings_for(redis_url))
    assert "maxmemory-policy" not in caplog.text


def test_a_real_worker_drains_a_redis_held_past_maxmemory(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    """The drill in small (bench.soak_redis_full): the gunicorn api over HTTP and a real worker
    process with the model. Jobs wait while Redis is pushed past maxmemory by far more than a worker
    holds in flight; a worker started then (workers suspended until it is up) must bring it back
    alone: register, grab, start, heartbeat and end past maxmemory, every end freeing an image.
    Meanwhile the api answers 503 `redis_full`, never 500; at the end every job has finished once
    and nothing is counted."""
    server = fresh_redis_server(appendonly=False, maxmemory="64mb")
    images = [noise_png(seed) for seed in range(40)]
    with service_stack(
        server.url, tmp_path, workers=0, MAX_QUEUED_BYTES=0, REDIS_HEADROOM_BYTES=0, LOG_FORMAT="text"
    ) as stack:
        conn = stack.conn
        ids = [job_id_of_http(post_image(stack.base, data)) for data in images]
        suspend(conn)
        used = int(conn.info("memory")["used_memory"])
        conn.config_set("maxmemory", used - 20 * len(images[0]))  # 20 images over
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            conn.set("probe", b"x")
        refused = post_image(stack.base, images[0])
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "redis_full"
        worker = start_worker(stack.env, log=tmp_path / "worker0.log")
        with running(worker):
            wait_until(lambda: worker_states(conn) == {b"suspended"}, 120, 0.2, "the worker up, suspended")
            resume(conn)
            wait_until(lambda: all_ended(conn, ids), 120, 0.5, "every job ended")

            assert [v["status"] for v in views(conn, ids)] == ["finished"] * len(ids)
            assert all(len(results_of(conn, job_id)) == 1 for job_id in ids)
            assert not any(conn.exists(image_key(job_id)) for job_id in ids)
            assert image_budget.queued_bytes(conn) == 0
            info = conn.info("memory")
            assert info["used_memory"] < info["maxmemory"]  # drained below the limit by the worker
            assert post_image(stack.base, images[1]).status_code == 202  # accepting again
    worker_log = (tmp_path / "worker0.log").read_text()
    assert "past maxmemory" in worker_log
    assert "Traceback" not in worker_log


def worker_states(conn: redis.Redis) -> set[bytes]:
    return {conn.hget(key, "state") for key in conn.smembers("rq:workers")}


def job_id_of_http(response: requests.Response) -> str:
    assert response.status_code == 202, response.text
    return str(response.json()["id"])
