"""Faults with real processes: poison inputs that kill workers, Redis restarts, workers dying
under load, deadlines. Nothing accepted may be lost, stuck, duplicated or mixed up."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.results import Result

from api.job_view import job_view
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import META_CRASHES, META_DEADLINE, SERIALIZER, make_queue, submit
from shared.keys import at_risk_key
from tests.conftest import PHOTO_LABELS
from tests.service import free_port, http_ok, service_env, start_api, start_worker, stop, wait_until

pytestmark = pytest.mark.slow


def views(conn: redis.Redis, ids: list[str]) -> list[dict]:
    return [job_view(Job.fetch(i, connection=conn, serializer=SERIALIZER)) for i in ids]


def all_ended(conn: redis.Redis, ids: list[str]) -> bool:
    return all(v["status"] in ("finished", "failed", "canceled", "expired") for v in views(conn, ids))


def test_a_poison_job_fails_as_worker_crashed_and_spares_its_neighbours(
    fresh_redis_server: Callable[..., EmbeddedRedis],
    photo_bytes: dict[str, bytes],
    artifact_dir: Path,
    tmp_path: Path,
) -> None:
    """The test plays the OOM killer: whichever worker is decoding the poison job, or running it
    through the model, dies at once. (A death while it only waits is not its doing, and costs it
    nothing: that is checked by freezing the worker and reading what it is doing before the kill.)"""
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, max_attempts=3)
    queue = make_queue(conn, settings)
    names = list(photo_bytes)
    normal = [submit(queue, photo_bytes[names[i % 5]], 1, settings).id for i in range(6)]
    poison = submit(queue, photo_bytes["coffee.png"], 1, settings).id
    normal += [submit(queue, photo_bytes[names[i % 5]], 1, settings).id for i in range(6)]
    env = service_env(server.url, MAX_BATCH_SIZE=16, MAX_ATTEMPTS=3)
    started = StartedJobRegistry(queue=queue)
    at_risk = at_risk_key(started.key)
    kills = 0
    killed: set[bytes] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not all_ended(conn, [poison, *normal]):
        worker = start_worker(env, log=tmp_path / f"worker{kills}.log")
        try:
            while worker.poll() is None and time.monotonic() < deadline:
                # A live execution of the poison job being decoded or in a forward pass.
                risky = {e for e in conn.smembers(at_risk) if e.decode().startswith(poison)} - killed
                if risky:
                    worker.send_signal(signal.SIGSTOP)
                    time.sleep(0.05)  # let the commands it sent before it froze land
                    if not {e for e in conn.smembers(at_risk) if e.decode().startswith(poison)} & risky:
                        worker.send_signal(signal.SIGCONT)  # it was done with that stage: wait for the next
                        continue
                    killed.update(risky)
                    worker.send_signal(signal.SIGKILL)
                    worker.wait(10)
                    kills += 1
                    break
                if all_ended(conn, [poison, *normal]):
                    break
                time.sleep(0.01)
        finally:
            stop(worker)

    poison_view = views(conn, [poison])[0]
    assert poison_view["status"] == "failed", poison_view
    assert poison_view["error"]["code"] == "worker_crashed"
    assert kills == settings.max_attempts, "it killed exactly MAX_ATTEMPTS workers, then was given up"
    for view, job_id in zip(views(conn, normal), normal, strict=True):
        assert view["status"] == "finished", (job_id, view)
    # Neighbours decoded in the poison's decode step or sharing its forward pass are charged for
    # its first kill at most: from then on it runs alone.
    neighbours = [Job.fetch(i, connection=conn, serializer=SERIALIZER) for i in normal]
    assert all(int(job.meta.get(META_CRASHES, 0)) <= 1 for job in neighbours)


def test_no_accepted_job_is_lost_when_redis_restarts_mid_load(
    fresh_redis_server: Callable[..., EmbeddedRedis],
    photo_bytes: dict[str, bytes],
    artifact_dir: Path,
    tmp_path: Path,
) -> None:
    server = fresh_redis_server(appendonly=True, appendfsync="always")
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url)
    queue = make_queue(conn, settings)
    names = list(photo_bytes)
    ids = [submit(queue, photo_bytes[names[i % 5]], 1, settings).id for i in range(120)]
    worker = start_worker(service_env(server.url, MAX_BATCH_SIZE=8), log=tmp_path / "worker.log")
    try:
        wait_until(
            lambda: sum(v["status"] == "finished" for v in views(conn, ids)) >= 8, 180, 0.2, "some progress"
        )
        server.kill()
        time.sleep(3)
        server.restart()
        conn = redis.Redis.from_url(server.url)
        wait_until(lambda: all_ended(conn, ids), 240, 0.5, "every job ended")
        assert worker.poll() is None, "the worker rode out the outage"
    finally:
        stop(worker)
    final = views(conn, ids)
    assert [v["status"] for v in final].count("finished") == len(ids), [
        v for v in final if v["status"] != "finished"
    ]
    for view, i in zip(final, range(len(ids)), strict=True):
        assert view["result"]["predictions"][0]["label"] in PHOTO_LABELS[names[i % 5]]


def test_deadline_passed_before_start_ends_expired(
    fresh_redis_server: Callable[..., EmbeddedRedis],
    photo_bytes: dict[str, bytes],
    artifact_dir: Path,
    tmp_path: Path,
) -> None:
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url)
    queue = make_queue(conn, settings)
    late = submit(queue, photo_bytes["coffee.png"], 1, settings, meta={META_DEADLINE: time.time() + 0.2}).id
    in_time = submit(
        queue, photo_bytes["coffee.png"], 1, settings, meta={META_DEADLINE: time.time() + 600}
    ).id
    time.sleep(0.3)
    worker = start_worker(service_env(server.url), log=tmp_path / "worker.log")
    try:
        wait_until(lambda: all_ended(conn, [late, in_time]), 120, 0.2, "both ended")
    finally:
        stop(worker)
    late_view, in_time_view = views(conn, [late, in_time])
    assert late_view["error"]["code"] == "deadline_expired"
    assert late_view["status"] in ("expired", "failed")
    assert late_view["started_at"] is None, "an expired job never took a batch slot"
    assert in_time_view["status"] == "finished"
    assert not conn.exists(f"inferq:img:{late}")


def test_many_workers_some_dying_lose_nothing_and_mix_nothing(
    fresh_redis_server: Callable[..., EmbeddedRedis],
    photo_bytes: dict[str, bytes],
    artifact_dir: Path,
    tmp_path: Path,
) -> None:
    """3 workers, one SIGKILLed every few seconds (and replaced), jobs submitted over HTTP.
    At least 300 jobs in `make test`, and until 3 kills; `INFERQ_CHAOS_JOBS=2000` for a full-size run."""
    jobs_total = int(os.environ.get("INFERQ_CHAOS_JOBS", "300"))
    server = fresh_redis_server()
    env = service_env(server.url, MAX_BATCH_SIZE=8)
    port = free_port()
    api = start_api(env, port, log=tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    workers = [start_worker(env, log=tmp_path / f"w{i}.log") for i in range(3)]
    names = list(photo_bytes)
    stop_killing = threading.Event()
    kills = 0

    def killer() -> None:
        nonlocal kills
        rng = random.Random(7)
        while not stop_killing.wait(4.0):
            i = rng.randrange(len(workers))
            workers[i].send_signal(signal.SIGKILL)
            workers[i].wait(10)
            kills += 1
            workers[i] = start_worker(env, log=tmp_path / f"w{i}-{kills}.log")

    try:
        wait_until(lambda: http_ok(base + "/readyz"), 180, 0.5, "api ready")
        chaos = threading.Thread(target=killer, daemon=True)
        chaos.start()

        def post(i: int) -> str:
            response = requests.post(
                f"{base}/v1/jobs",
                data=photo_bytes[names[i % 5]],
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            )
            assert response.status_code == 202, response.text
            return response.json()["id"]

        # At least `jobs_total`, and on until three workers died under load (a fast machine
        # finishes the first few hundred between two kills).
        ids: list[str] = []
        with ThreadPoolExecutor(8) as pool:
            while len(ids) < jobs_total or kills < 3:
                ids += pool.map(post, range(len(ids), len(ids) + 50))

        def final(job_id: str) -> dict:
            end = time.monotonic() + 400
            while time.monotonic() < end:
                body = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": 30}, timeout=45).json()
                if body["status"] not in ("queued", "started"):
                    return body
            raise TimeoutError(job_id)

        with ThreadPoolExecutor(16) as pool:
            bodies = list(pool.map(final, ids))
        stop_killing.set()
        chaos.join(15)
    finally:
        stop_killing.set()
        for proc in workers:
            stop(proc)
        stop(api)

    assert kills >= 3, "the run outlived several kills"
    conn = redis.Redis.from_url(server.url)
    for i, (job_id, body) in enumerate(zip(ids, bodies, strict=True)):
        assert body["status"] == "finished", body
        assert body["result"]["predictions"][0]["label"] in PHOTO_LABELS[names[i % 5]], "results mixed up"
        results = Result.all(Job.fetch(job_id, connection=conn, serializer=SERIALIZER), serializer=SERIALIZER)
        assert [r.type for r in results] == [Result.Type.SUCCESSFUL], "exactly one result per job"
