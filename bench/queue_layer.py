"""The queue layer alone: the project's enqueue path and the BatchWorker with a no-op model.

* enqueue: P producer processes call `shared.jobs.submit` (one MULTI/EXEC per job, exactly what
  the api does per request, minus HTTP) as fast as they can;
* drain: N jobs are queued first and parked under another key; K no-op BatchWorkers start and
  register; then the list is RENAMEd back in one atomic step and the workers drain it. The rate
  comes from the jobs' own RQ end timestamps (middle 80 %, so start-up and tail are left out);
* sustained: producers and workers at the same time, the figure "one Redis sustains".
* memory: the worker's RSS, sampled by the worker itself every few hundred jobs.

The images are the 640×480 JPEG uploads of the mix (the job hash never holds them: they go in
their own key, which the worker deletes when the job ends).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import PY, base_env, run_json, span_rate, spawn, stop, wait_until

QUEUE = "inferq"
QUEUE_KEY = f"rq:queue:{QUEUE}"
PARKED_KEY = "bench:parked"


def upload_images() -> list[bytes]:
    from bench.common import load_images

    return [data for name, data in load_images() if name.endswith("@640x480.jpg")]


def _conn(redis_url: str) -> Any:
    """A client for `redis_url`; use it as `with _conn(url) as conn:` (redis-py closes it on exit)."""
    from shared.redis_conn import redis_from_url

    return redis_from_url(redis_url)


def _settings(redis_url: str) -> Any:
    from shared.config import Settings

    return Settings(redis_url=redis_url, queue_name=QUEUE)


# --- producer (child process) ---------------------------------------------------------------------


def produce(redis_url: str, count: int, max_backlog: int, offset: int) -> dict[str, Any]:
    from shared.jobs import make_queue, submit

    images = upload_images()
    settings = _settings(redis_url)
    with _conn(redis_url) as conn:
        queue = make_queue(conn, settings)
        started = time.time()
        for i in range(count):
            if max_backlog and i % 50 == 0:
                while conn.llen(QUEUE_KEY) > max_backlog:
                    time.sleep(0.005)
            submit(queue, images[(offset + i) % len(images)], 5, settings)
        ended = time.time()
    return {"count": count, "start": started, "end": ended, "jobs_per_s": count / (ended - started)}


def prefill(redis_url: str, count: int, chunk: int = 200) -> None:
    """Queue `count` jobs fast (submit_many: one transaction per chunk), parked under PARKED_KEY."""
    from shared.jobs import make_queue, submit_many

    images = upload_images()
    settings = _settings(redis_url)
    with _conn(redis_url) as conn:
        queue = make_queue(conn, settings)
        for first in range(0, count, chunk):
            n = min(chunk, count - first)
            submit_many(queue, [(images[(first + i) % len(images)], 5) for i in range(n)], settings)
        conn.rename(QUEUE_KEY, PARKED_KEY)


def finished_ends(redis_url: str) -> list[float]:
    """End timestamps of every finished job (from RQ's finished registry scores + job hashes)."""
    with _conn(redis_url) as conn:
        ids = [i.decode() for i in conn.zrange(f"rq:finished:{QUEUE}", 0, -1)]
        ends: list[float] = []
        for first in range(0, len(ids), 1000):
            with conn.pipeline(transaction=False) as pipe:
                for job_id in ids[first : first + 1000]:
                    pipe.hget(f"rq:job:{job_id}", "ended_at")
                for raw in pipe.execute():
                    if raw:
                        ends.append(_ts(raw.decode()))
        return ends


def _ts(value: str) -> float:
    from rq.utils import utcparse

    return utcparse(value).timestamp()


def redis_calls(redis_url: str) -> int:
    """Commands the server has executed so far (INFO commandstats, every command counted)."""
    with _conn(redis_url) as conn:
        return sum(int(v["calls"]) for v in conn.info("commandstats").values())


def _worker_count(redis_url: str) -> int:
    with _conn(redis_url) as conn:
        return int(conn.scard(f"rq:workers:{QUEUE}"))


def _finished_count(redis_url: str) -> int:
    with _conn(redis_url) as conn:
        return int(conn.zcard(f"rq:finished:{QUEUE}"))


@contextlib.contextmanager
def noop_workers(redis_url: str, k: int, logs: Path, tag: str, allocator: str = "glibc") -> Iterator[None]:
    """`k` no-op workers, registered before the block runs and stopped when it is left."""
    env = base_env(redis_url, allocator, LOG_LEVEL="WARNING")
    procs = [
        spawn([PY, "-m", "bench.probe_worker", "--handler", "noop"], env, logs / f"{tag}-noop{i}.log")
        for i in range(k)
    ]
    try:
        wait_until(lambda: _worker_count(redis_url) >= k, 120, 0.1, f"{k} no-op workers registered")
        yield
    finally:
        for proc in procs:
            stop(proc)


def drain_rate(redis_url: str, k: int, count: int, logs: Path, tag: str) -> dict[str, Any]:
    from bench.service import flush

    flush(redis_url)
    prefill(redis_url, count)
    with noop_workers(redis_url, k, logs, tag):
        calls = redis_calls(redis_url)
        with _conn(redis_url) as conn:
            conn.rename(PARKED_KEY, QUEUE_KEY)
        wait_until(lambda: _finished_count(redis_url) >= count, 300, 0.1, f"{count} jobs drained")
        # Includes the workers' idle polling and the bench's own progress checks (a few per 0.1 s).
        calls = redis_calls(redis_url) - calls
    ends = finished_ends(redis_url)
    return {
        "workers": k,
        "jobs": count,
        "finished": len(ends),
        "jobs_per_s": span_rate(ends),
        "redis_commands_per_job": calls / count,
    }


def enqueue_rate(redis_url: str, producers: int, count: int, logs: Path) -> dict[str, Any]:
    """P producer processes, `count` jobs each, no worker: the enqueue path alone."""
    from bench.service import flush

    flush(redis_url)
    calls = redis_calls(redis_url)
    outs = _run_producers(redis_url, producers, count, 0, logs)
    calls = redis_calls(redis_url) - calls
    start, end = min(o["start"] for o in outs), max(o["end"] for o in outs)
    return {
        "producers": producers,
        "jobs": producers * count,
        "jobs_per_s": producers * count / (end - start),
        "redis_commands_per_job": calls / (producers * count),
    }


def _run_producers(redis_url: str, producers: int, count: int, max_backlog: int, logs: Path) -> list[Any]:
    import concurrent.futures

    env = base_env(redis_url)
    args = ["--url", redis_url, "--count", str(count), "--max-backlog", str(max_backlog)]
    with concurrent.futures.ThreadPoolExecutor(producers) as pool:
        futures = [
            pool.submit(
                run_json,
                [PY, "-m", "bench.queue_layer", "produce", *args, "--offset", str(i)],
                env,
                600,
                logs / f"producer{i}.log",
            )
            for i in range(producers)
        ]
        return [f.result() for f in futures]


def sustained_rate(redis_url: str, producers: int, k: int, count: int, logs: Path) -> dict[str, Any]:
    """Producers and K no-op workers at once; completions/s over the middle of the run."""
    from bench.service import flush

    flush(redis_url)
    with noop_workers(redis_url, k, logs, f"sustained{k}"):
        outs = _run_producers(redis_url, producers, count, 0, logs)
        total = producers * count
        wait_until(lambda: _finished_count(redis_url) >= total, 300, 0.1, "sustained drain")
    ends = finished_ends(redis_url)
    return {
        "producers": producers,
        "workers": k,
        "jobs": producers * count,
        "jobs_per_s": span_rate(ends),
        "enqueue_jobs_per_s": sum(o["jobs_per_s"] for o in outs),
    }


def rss_run(
    redis_url: str,
    handler: str,
    count: int,
    every: int,
    logs: Path,
    allocator: str = "glibc",
    threads: int | None = None,
) -> dict[str, Any]:
    """A worker (`noop` or `real`) runs `count` jobs fed by a producer that keeps the backlog small;
    returns its own RSS samples (MiB) by jobs done."""
    from bench.service import flush

    flush(redis_url)
    stats = logs / f"rss-{handler}-{allocator}.json"
    stats.unlink(missing_ok=True)
    env = base_env(redis_url, allocator, LOG_LEVEL="WARNING")
    if threads is not None:
        env["TORCH_THREADS"] = str(threads)
    proc = spawn(
        [
            PY,
            "-m",
            "bench.probe_worker",
            "--handler",
            handler,
            "--rss-every",
            str(every),
            "--max-jobs",
            str(count),
            "--stats-out",
            str(stats),
        ],
        env,
        logs / f"rss-{handler}-{allocator}.log",
    )
    try:
        wait_until(lambda: _worker_count(redis_url) >= 1, 180, 0.1, f"{handler} worker registered")
        backlog = 2000 if handler == "noop" else 64
        _run_producers(redis_url, 1, count, backlog, logs)
        proc.wait(600)
    finally:
        stop(proc)
    data = json.loads(stats.read_text())
    return {"handler": handler, "allocator": allocator, "torch_threads": threads, **data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_layer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--max-backlog", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(produce(args.url, args.count, args.max_backlog, args.offset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
