"""Real processes for end-to-end tests: batch workers and the gunicorn api, each its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from rq.job import Job
from rq.results import Result

from api.job_view import job_view
from launch.processes import free_port, stop_process, wait_until
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import LANES, SERIALIZER, TERMINAL_STATUSES, lane_queue_name, make_queue, submit

# Every test service: one torch thread per worker (the machine is small and shared) and a dead
# worker's jobs back within seconds.
ABANDONED_AFTER_SECONDS = 4
TEST_SETTINGS: dict[str, str] = {
    "TORCH_THREADS": "1",
    "ABANDONED_AFTER_SECONDS": str(ABANDONED_AFTER_SECONDS),
    "HEARTBEAT_SECONDS": "1",
}
# How soon a dead worker's jobs are back in other hands: the README's promise (its registry entries
# expire after ABANDONED_AFTER_SECONDS, and the next maintenance pass, every half of that, requeues
# them), plus a margin: a live worker runs maintenance between grabs, and on a loaded 2-core machine
# a grab can wait for a forward pass or two.
RECOVERY_MARGIN_S = 5.0
RECOVERY_BOUND_S = ABANDONED_AFTER_SECONDS * 1.5 + RECOVERY_MARGIN_S


def service_env(redis_url: str, **overrides: str | int | float) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"REDIS_URL": redis_url, "PYTHONPATH": str(PROJECT_ROOT), **TEST_SETTINGS})
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def start_worker(
    env: dict[str, str], cwd: Path | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "worker"],
        env=env,
        cwd=cwd or PROJECT_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def start_pool(env: dict[str, str], workers: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """RQ's worker-pool with `workers` BatchWorkers: the Procfile's `worker` line, as honcho runs it."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    settings = Settings()
    lanes = [lane_queue_name(settings, lane) for lane in LANES]
    args = ["worker-pool", "--path", ".", "--num-workers", str(workers)]
    args += [
        "--worker-class",
        "worker.batch_worker.BatchWorker",
        "--serializer",
        "rq.serializers.JSONSerializer",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "rq.cli", *args, *lanes],
        env={**env, "RQ_REDIS_URL": env["REDIS_URL"]},
        cwd=PROJECT_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def start_api(env: dict[str, str], port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    # The launcher's own stop, so tests stop processes the way the service does; only the longer
    # default patience (a loaded worker drains its batch first) is the tests' own.
    code = stop_process(proc, timeout, sig)
    assert code is not None  # stop_process answers None only for a missing process
    return code


def run_module(
    module: str, *args: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the project root, to its end; its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def running(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            stop(proc)


@dataclass
class Stack:
    """A running service for a test: api base URL, a Redis client, the worker processes."""

    base: str
    conn: redis.Redis
    api: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    env: dict[str, str]
    logs: Path


@contextmanager
def service_stack(
    redis_url: str, logs: Path, workers: int = 1, **overrides: str | int | float
) -> Iterator[Stack]:
    """gunicorn api + `workers` batch workers on `redis_url`, ready (a worker registered, or the api
    healthy when `workers` is 0); everything stopped (SIGTERM) on exit."""
    env = service_env(redis_url, **overrides)
    port = free_port()
    api = start_api(env, port, log=logs / "api.log")
    procs = [start_worker(env, log=logs / f"worker{i}.log") for i in range(workers)]
    conn = redis.Redis.from_url(redis_url)
    stack = Stack(f"http://127.0.0.1:{port}", conn, api, procs, env, logs)
    try:
        path = "/readyz" if workers else "/healthz"
        wait_until(lambda: http_ok(stack.base + path), 180, 0.5, f"api {path}")
        yield stack
    finally:
        for proc in [*stack.workers, api]:
            stop(proc)
        conn.close()


def post_image(base: str, data: bytes, **params: str | int) -> requests.Response:
    return requests.post(
        f"{base}/v1/jobs",
        params=params,
        data=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=30,
    )


def wait_job(base: str, job_id: str, wait: float = 30, patience: float = 120) -> dict[str, Any]:
    """The job's view once it has ended, by long-polling."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + 10).json()
        if body["status"] in TERMINAL_STATUSES:
            return dict(body)
    raise TimeoutError(job_id)


def enqueue_photos(
    conn: redis.Redis, settings: Settings, photo_bytes: dict[str, bytes], count: int
) -> list[str]:
    """`count` jobs straight onto the queue (no api), cycling through the sample photos in order:
    job i carries photo `list(photo_bytes)[i % len(photo_bytes)]`."""
    queue = make_queue(conn, settings)
    names = list(photo_bytes)
    return [submit(queue, photo_bytes[names[i % len(names)]], 5, settings).id for i in range(count)]


def views(conn: redis.Redis, ids: list[str]) -> list[dict[str, Any]]:
    return [job_view(Job.fetch(i, connection=conn, serializer=SERIALIZER)) for i in ids]


def all_ended(conn: redis.Redis, ids: list[str]) -> bool:
    return all(v["status"] in TERMINAL_STATUSES for v in views(conn, ids))


def results_of(conn: redis.Redis, job_id: str) -> list[Result]:
    """Every result RQ holds for the job: exactly one for a job that ended once."""
    return Result.all(Job.fetch(job_id, connection=conn, serializer=SERIALIZER), serializer=SERIALIZER)


def http_requests(base: str) -> dict[tuple[str, str, str], float]:
    """The api's `inferq_http_requests_total` (all its processes) by (method, route, status)."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "inferq_http_requests_total"
    }


def request_counts(base: str) -> dict[str, float]:
    """What the api at `base` has answered so far: submits answered with the ended job
    (`one_request`: 200) or queued (`submitted`: 202), and reads of a job (`reads`: GET, any status)."""
    counts = http_requests(base)
    return {
        "one_request": counts.get(("POST", "/v1/jobs", "200"), 0.0),
        "submitted": counts.get(("POST", "/v1/jobs", "202"), 0.0),
        "reads": sum(
            n for (method, route, _), n in counts.items() if method == "GET" and route.startswith("/v1/jobs/")
        ),
    }


def jobs_failed_by_code(metrics: str) -> dict[str, float]:
    """`inferq_jobs_failed_total` by code, as a scraper reads it from a /metrics page."""
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "inferq_jobs_failed"
        for sample in family.samples
        if sample.name == "inferq_jobs_failed_total"
    }
