"""SIGTERM to RQ's worker-pool (the Procfile's worker process) while its workers have a batch in
flight: each worker finishes its batch and leaves the rest queued, the pool exits, nothing is lost,
and a later worker finishes everything, each job exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq import Worker
from rq.registry import StartedJobRegistry

from launch.redis_server import EmbeddedRedis
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import LANES, lane_queue_name, make_queue
from tests.conftest import PHOTO_LABELS
from tests.service import (
    all_ended,
    enqueue_photos,
    results_of,
    service_env,
    start_worker,
    stop,
    views,
    wait_until,
)

pytestmark = pytest.mark.slow
POOL_WORKERS = 2


def start_pool(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The Procfile's `worker` line, as honcho would run it."""
    settings = Settings()
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rq.cli",
            "worker-pool",
            "--path",
            ".",
            "--worker-class",
            "worker.batch_worker.BatchWorker",
            "--num-workers",
            str(POOL_WORKERS),
            "--serializer",
            "rq.serializers.JSONSerializer",
            *(lane_queue_name(settings, lane) for lane in LANES),
        ],
        env={**env, "RQ_REDIS_URL": env["REDIS_URL"]},
        cwd=PROJECT_ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def test_sigterm_to_the_pool_finishes_batches_in_flight_and_loses_nothing(
    photo_bytes: dict[str, bytes], artifact_dir: Path, tmp_path: Path
) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        conn = redis.Redis.from_url(server.url)
        settings = Settings(redis_url=server.url)
        ids = enqueue_photos(conn, settings, photo_bytes, 80)
        env = service_env(server.url, MAX_BATCH_SIZE=4)
        queue = make_queue(conn, settings)
        started = StartedJobRegistry(queue=queue)
        pool = start_pool(env, tmp_path / "pool.log")
        try:
            wait_until(lambda: Worker.count(connection=conn) == POOL_WORKERS, 180, 0.2, "pool workers up")
            wait_until(lambda: started.count > 0, 60, 0.005, "a batch in flight")
            in_flight = [i for i, v in zip(ids, views(conn, ids), strict=True) if v["status"] == "started"]
            assert in_flight
            pool.send_signal(signal.SIGTERM)
            code = pool.wait(90)
        finally:
            stop(pool)
        assert code == 0, (tmp_path / "pool.log").read_text()[-3000:]

        after = {i: v["status"] for i, v in zip(ids, views(conn, ids), strict=True)}
        assert all(after[i] == "finished" for i in in_flight), "a batch in flight was not finished"
        assert set(after.values()) <= {"finished", "queued"}, after
        assert list(after.values()).count("queued") > 0, "the pool drained everything: no stop was tested"
        assert started.count == 0 and conn.llen(queue.intermediate_queue_key) == 0
        assert Worker.count(connection=conn) == 0, "the pool's workers deregistered"

        successor = start_worker(env, log=tmp_path / "successor.log")
        try:
            wait_until(lambda: all_ended(conn, ids), 240, 0.5, "all jobs ended")
        finally:
            stop(successor)
        names = list(photo_bytes)
        for i, (job_id, view) in enumerate(zip(ids, views(conn, ids), strict=True)):
            assert view["status"] == "finished", view
            assert view["result"]["predictions"][0]["label"] in PHOTO_LABELS[names[i % len(names)]]
            assert len(results_of(conn, job_id)) == 1, job_id
        conn.close()
