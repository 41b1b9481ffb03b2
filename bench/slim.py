"""Torch venv vs slim worker venv: what each environment costs on disk, in memory and at start.

The two environments a CPU worker can run from: the project's venv (requirements-dev.txt, with
torch: the interpreter running the bench) and the torch-free one built from requirements-worker.txt
(`launch.slim_venv`). For each:
* installed size (`bench.venv_size`, run by that environment's interpreter);
* cold start: a job waits on a queue of the phase's own, then a fresh `python -m worker` process
  starts (BACKEND=auto, glibc, the settings' defaults) → that job's result. The phase's own empty
  warm-up cache per environment: its first start times every installed backend (`first_start_s`),
  the starts after it reuse that measurement (WARM_UP_CACHE, as every start of a machine after its
  first does: `cold_start_s`);
* RSS: after each start's first job, `jobs` more images of the bench's mix, then VmRSS of the worker
  process and, apart, the sum over its decoder processes (each a Python interpreter of its own);
* the backend that served the jobs.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Log, base_env, rss_mb, run_json, spawn, summarize
from launch.processes import cmdline, descendants, stop_process
from shared.config import PROJECT_ROOT

QUEUE = "slimbench"
START_TIMEOUT_S = 300.0
JOBS_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Environment:
    """A venv the worker runs from: its interpreter, and the file that pins its runtime."""

    name: str
    python: Path
    requirements: Path


def torch_environment() -> Environment:
    """The project's venv: the interpreter running the bench."""
    return Environment("torch venv", Path(sys.executable), PROJECT_ROOT / "requirements.txt")


def slim_environment(cache: Path) -> Environment:
    """The torch-free venv, built into `cache` if missing (pip, from the package index)."""
    from launch.slim_venv import REQUIREMENTS, slim_venv

    return Environment("slim worker venv", slim_venv(cache) / "bin" / "python", REQUIREMENTS)


def memory(pid: int) -> dict[str, Any]:
    """VmRSS of the worker and of its decoder processes (summed)."""
    sizes = [rss_mb(p) for p in descendants(pid) if "worker.decoders" in cmdline(p)]
    sizes = [size for size in sizes if not math.isnan(size)]  # NaN: it exited meanwhile
    return {"worker_mb": rss_mb(pid), "decoders_mb": sum(sizes), "decoders": len(sizes)}


class Runner:
    """Starts workers of one environment against the bench's Redis and times their jobs."""

    def __init__(self, redis_url: str, workdir: Path, log: Path) -> None:
        from shared.config import Settings
        from shared.jobs import make_queue
        from shared.redis_conn import redis_from_url

        self.redis_url = redis_url
        self.workdir = workdir
        self.log = log
        self.conn = redis_from_url(redis_url)
        self.settings = Settings(redis_url=redis_url, queue_name=QUEUE)
        self.queue = make_queue(self.conn, self.settings)

    def close(self) -> None:
        self.conn.close()

    def submit(self, image: bytes) -> str:
        from shared.jobs import submit

        return submit(self.queue, image, 5, self.settings).id

    def wait(
        self, ids: list[str], proc: subprocess.Popen[bytes], timeout: float, poll: float
    ) -> list[dict[str, Any]]:
        """The results of `ids`, once all have finished (polled); fails if one fails or the worker dies."""
        from rq.job import Job, JobStatus
        from rq.serializers import JSONSerializer

        deadline = time.monotonic() + timeout
        while True:
            jobs = Job.fetch_many(ids, connection=self.conn, serializer=JSONSerializer)
            statuses = [job.get_status(refresh=False) if job else None for job in jobs]
            if all(s == JobStatus.FINISHED for s in statuses):
                return [job.return_value() for job in jobs if job]
            if any(s in (JobStatus.FAILED, None) for s in statuses):
                raise RuntimeError(f"a job failed or vanished ({statuses}); see {self.log}")
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the worker exited {proc.returncode} before its jobs ended; see {self.log}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not finished after {timeout:.0f} s; see {self.log}")
            time.sleep(poll)

    def start(self, env: Environment, cache: Path, first: bytes, more: list[bytes]) -> dict[str, Any]:
        """One cold start: `first` waiting, a fresh worker → its result; then `more`, then memory."""
        worker_env = base_env(
            self.redis_url,
            "glibc",
            QUEUE_NAME=QUEUE,
            BACKEND="auto",
            INFERQ_CACHE=cache,
            DATA_DIR=self.workdir / "data",
            ARTIFACT_DIR=self.settings.artifact_dir.resolve(),
        )
        job = self.submit(first)
        started = time.monotonic()
        # The worker's own interpreter, not this one: its venv is what is measured.
        proc = spawn([str(env.python), "-m", "worker"], worker_env, self.log)
        try:
            (result,) = self.wait([job], proc, START_TIMEOUT_S, poll=0.01)
            seconds = time.monotonic() - started
            results = self.wait([self.submit(image) for image in more], proc, JOBS_TIMEOUT_S, poll=0.1)
            backends = sorted({r["model"]["backend"] for r in [result, *results]})
            return {"seconds": seconds, "backends": backends, "jobs": 1 + len(results), **memory(proc.pid)}
        finally:
            stop_process(proc, timeout=60)


def measure(
    env: Environment, runner: Runner, workdir: Path, images: list[bytes], runs: int, jobs: int
) -> dict[str, Any]:
    """The size of `env`, then `runs` + 1 worker starts from an empty warm-up cache of its own."""
    size = run_json(
        [str(env.python), "-m", "bench.venv_size", "--requirements", str(env.requirements)],
        base_env(None, "glibc"),
        300,
        runner.log,
    )
    cache = workdir / "slim-cache" / env.name.replace(" ", "-")
    starts = []
    for run in range(runs + 1):
        Log.say(f"slim: {env.name}, start {run + 1}/{runs + 1}")
        first = images[run % len(images)]
        more = [images[(run + 1 + i) % len(images)] for i in range(jobs)]
        starts.append(runner.start(env, cache, first, more))
    first_start, warm = starts[0], starts[1:]
    return {
        "python": str(env.python),
        "requirements": env.requirements.name,
        "size": size,
        "first_start_s": first_start["seconds"],
        "first_start": first_start,
        "cold_start_s": summarize(s["seconds"] for s in warm),
        "rss_worker_mb": summarize(s["worker_mb"] for s in warm),
        "rss_decoders_mb": summarize(s["decoders_mb"] for s in warm),
        "decoders": max((s["decoders"] for s in warm), default=0),
        "backends": sorted({b for s in starts for b in s["backends"]}),
        "starts": starts,
    }


def compare(
    redis_url: str, cache: Path, workdir: Path, logs: Path, images: list[bytes], runs: int, jobs: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Both environments measured; an environment that cannot be measured (its venv cannot be built,
    its worker fails) is reported as an error without losing the other's figures."""
    out: dict[str, Any] = {"runs": runs, "jobs": jobs, "environments": {}}
    errors: dict[str, str] = {}
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    envs = [torch_environment()]
    try:
        envs.append(slim_environment(cache))
    except (OSError, subprocess.SubprocessError) as exc:
        errors["slim worker venv"] = f"building the venv failed: {type(exc).__name__}: {exc}"
    runner = Runner(redis_url, workdir, logs / "slim.log")
    try:
        for env in envs:
            try:
                out["environments"][env.name] = measure(env, runner, workdir, images, runs, jobs)
            except Exception as exc:
                errors[env.name] = f"{type(exc).__name__}: {exc}"
    finally:
        runner.close()
    return out, errors
