"""inferq end to end: the gunicorn api and batch workers as real processes, driven over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import PY, CpuMeter, base_env, free_port, process_tree, spawn, stop, wait_until
from bench.loadgen import InferqTarget


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def flush(redis_url: str) -> None:
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        conn.flushall()
    finally:
        conn.close()


class Stack:
    """api (gunicorn, the service's own config) + `workers` worker processes on one Redis.

    `worker_cmd` defaults to `python -m worker` (what the Procfile's worker-pool runs per worker);
    the bench's variants pass `python -m bench.probe_worker …`. `ready` waits for `/readyz` (a
    worker registered: model loaded and warmed up), else only for `/healthz`."""

    def __init__(
        self,
        redis_url: str,
        logs: Path,
        name: str,
        *,
        allocator: str = "glibc",
        workers: int = 1,
        worker_cmd: list[str] | None = None,
        api: bool = True,
        ready: bool = True,
        **overrides: Any,
    ) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.name = name
        self.workers = workers
        self.worker_cmd = worker_cmd or [PY, "-m", "worker"]
        self.with_api = api
        self.ready = ready
        self.port = free_port()
        self.env = base_env(redis_url, allocator, **overrides)
        self.api_proc: Any = None
        self.worker_procs: list[Any] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target(self, images: list[bytes], **kwargs: Any) -> InferqTarget:
        return InferqTarget("127.0.0.1", self.port, images, **kwargs)

    def start_api(self) -> None:
        env = {**self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self.api_proc = spawn(
            [PY, "-m", "gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app"],
            env,
            self.logs / f"{self.name}-api.log",
        )

    def start_worker(self) -> Any:
        proc = spawn(self.worker_cmd, self.env, self.logs / f"{self.name}-worker{len(self.worker_procs)}.log")
        self.worker_procs.append(proc)
        return proc

    def __enter__(self) -> Stack:
        try:
            if self.with_api:
                self.start_api()
            for _ in range(self.workers):
                self.start_worker()
            if self.with_api:
                path = "/readyz" if self.ready and self.workers else "/healthz"
                wait_until(lambda: http_status(self.base + path) == 200, 180, 0.1, f"{self.name} {path}")
                self.check_alive()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def batch_caps(self) -> list[int]:
        """The batch cap each worker chose at warm-up (from its `batch cap N of at most M` log line)."""
        caps = []
        for i in range(len(self.worker_procs)):
            log = self.logs / f"{self.name}-worker{i}.log"
            found = (
                re.findall(r"batch cap (\d+) of at most", log.read_text(errors="replace"))
                if log.exists()
                else []
            )
            if found:
                caps.append(int(found[-1]))
        return caps

    def check_alive(self) -> None:
        for proc in [self.api_proc, *self.worker_procs]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{self.name}: a process exited with {proc.returncode}; see {self.logs}")

    def cpu_meter(self, redis_pid: int | None) -> CpuMeter:
        """CPU of the worker(s), the api (master + workers), Redis and this (client) process."""
        groups = {
            "worker": [p for proc in self.worker_procs for p in process_tree(proc.pid)],
            "api": process_tree(self.api_proc.pid) if self.api_proc is not None else [],
            "redis": [redis_pid] if redis_pid else [],
            "client": [os.getpid()],
        }
        return CpuMeter(groups)

    def __exit__(self, *exc: object) -> None:
        for proc in self.worker_procs:
            stop(proc)
        stop(self.api_proc)
        self.worker_procs = []
        self.api_proc = None


def wait_idle(redis_url: str, timeout: float = 120.0) -> None:
    """Until the queue is empty and no job is in flight (after an overloaded run), bounded."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    from shared.redis_conn import redis_from_url

    conn = redis_from_url(redis_url)
    try:
        queue = Queue("inferq", connection=conn)
        started = StartedJobRegistry(queue=queue)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: queue.count == 0 and started.count == 0, timeout, 0.2, "queue drained")
    finally:
        conn.close()


def settle(redis_url: str, patience: float = 20.0) -> int:
    """Between runs: let the worker drain the queue for `patience` s, then drop what is left (an
    overloaded run's backlog would otherwise spill into the next measurement); wait for the batch in
    flight. Returns how many queued jobs were dropped."""
    from shared.redis_conn import redis_from_url

    wait_idle(redis_url, patience)
    conn = redis_from_url(redis_url)
    try:
        # The queue lists themselves (rq:queue:<name>), not their :intermediate lists (jobs in flight).
        keys = [k.decode() for k in conn.keys("rq:queue:*") if b":" not in k[len(b"rq:queue:") :]]
        dropped = sum(int(conn.llen(k)) for k in keys)
        if dropped:
            conn.delete(*keys)
    finally:
        conn.close()
    if dropped:
        wait_idle(redis_url, 60)
    return dropped


def first_prediction_s(base: str, image: bytes, started: float, timeout: float = 120.0) -> float:
    """Seconds from `started` (time.monotonic) until a first image submitted to `base` has its result."""
    target = InferqTarget(
        base.split(":")[1].lstrip("/"), int(base.rsplit(":", 1)[1]), [image], timeout=timeout
    )
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            out = target(0)
        except OSError:
            time.sleep(0.02)  # the api is not listening yet
            continue
        if out.get("ok"):
            return time.monotonic() - started
        if "POST 503" in str(out.get("error")) or "POST 5" in str(out.get("error")):
            time.sleep(0.02)
            continue
        raise RuntimeError(f"first prediction failed: {out}")
    raise TimeoutError("no first prediction")


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))
