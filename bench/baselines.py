"""The naive baselines: stock `rq worker` running `worker.tasks.classify` one job per image.

* forking: RQ's default `Worker` forks a child per job; `classify` loads the model lazily, in the
  child, so every job imports torch and loads + verifies + optimizes the artifact again.
* preloaded: `rq worker -w rq.worker.SimpleWorker` runs jobs in its own process, so the lazy model
  cache persists after the first job: batch 1, model preloaded.

Both get the same images through the project's own enqueue path (`shared.jobs.submit`), in the
same Redis, pre-queued; then `rq worker --burst` drains the queue. Throughput comes from the jobs'
own RQ timestamps: (n − 1) / (last end − first end), so the forking worker's per-job model load is
in it; the SimpleWorker's one-off first load and warm-up (its first `skip` jobs) are not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import PY, percentile, spawn


def enqueue(redis_url: str, images: list[bytes], count: int, queue_name: str = "inferq") -> list[str]:
    from shared.config import Settings
    from shared.jobs import make_queue, submit
    from shared.redis_conn import redis_from_url

    settings = Settings(redis_url=redis_url, queue_name=queue_name)
    conn = redis_from_url(redis_url)
    try:
        queue = make_queue(conn, settings)
        return [submit(queue, images[i % len(images)], 5, settings).id for i in range(count)]
    finally:
        conn.close()


def job_times(redis_url: str, ids: list[str]) -> list[dict[str, Any]]:
    from rq.job import Job

    from shared.jobs import SERIALIZER
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        jobs = Job.fetch_many(ids, connection=conn, serializer=SERIALIZER)
        out = []
        for job in jobs:
            if job is None:
                out.append({"status": "missing"})
                continue
            out.append(
                {
                    "status": str(getattr(job.get_status(refresh=False), "value", "unknown")),
                    "enqueued": job.enqueued_at.timestamp() if job.enqueued_at else None,
                    "started": job.started_at.timestamp() if job.started_at else None,
                    "ended": job.ended_at.timestamp() if job.ended_at else None,
                    "meta": job.meta,
                }
            )
        return out
    finally:
        conn.close()


def run_rq_baseline(
    redis_url: str,
    images: list[bytes],
    count: int,
    worker_class: str,
    env: dict[str, str],
    log: Path,
    timeout: float,
    skip: int = 0,
) -> dict[str, Any]:
    """Pre-queue `count` jobs, drain them with `rq worker --burst -w worker_class`; per-job figures.

    The first `skip` completions are left out of the rate (warm-up of a preloaded worker: the
    TorchScript profiling executor specializes the graph during the first calls)."""
    import time

    ids = enqueue(redis_url, images, count)
    started = time.time()
    proc = spawn(
        [
            str(Path(PY).with_name("rq")),
            "worker",
            "--burst",
            "--url",
            redis_url,
            "--serializer",
            "rq.serializers.JSONSerializer",
            "--worker-class",
            worker_class,
            "--path",
            env["PYTHONPATH"],
            "inferq",
        ],
        env,
        log,
    )
    try:
        proc.wait(timeout)
    except Exception:
        proc.kill()
        proc.wait()
        raise
    wall = time.time() - started
    times = job_times(redis_url, ids)
    finished = [t for t in times if t["status"] == "finished" and t["ended"]]
    finished.sort(key=lambda t: t["ended"])
    ends = [t["ended"] for t in finished][skip:]
    per_job = [t["ended"] - t["started"] for t in finished]
    rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) >= 2 and ends[-1] > ends[0] else float("nan")
    return {
        "jobs": count,
        "skipped": skip,
        "finished": len(finished),
        "images_per_s": rate,
        "job_ms_p50": percentile(per_job[skip:], 50) * 1000 if per_job[skip:] else float("nan"),
        "first_job_ms": per_job[0] * 1000 if per_job else float("nan"),
        "wall_s": wall,
        "returncode": proc.returncode,
    }
