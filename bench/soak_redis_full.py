"""The Redis-full drill: fill a small Redis through the api, push it past `maxmemory`, let a real
worker drain it, and count what happened to every accepted job.

A throwaway Valkey with a small `maxmemory` (noeviction), two api servers and one real worker (the
model artifact):
- phase `budget`: submitters post 640×480 JPEGs as fast as they can to an api with MAX_QUEUED_BYTES
  at a third of `maxmemory`: the worker falls behind and the api answers 429 `queued_bytes_full`;
- phase `full`: the same load on a second api without a byte budget: Redis fills up to
  REDIS_HEADROOM_BYTES below `maxmemory` and the api answers 503 `redis_full`;
- phase `past_maxmemory`: `maxmemory` is lowered below what Redis holds (as when results grow or an
  operator lowers the limit) while the worker has jobs in flight, and the load goes on: the api
  keeps answering 503 (never 500) and the worker must still finish and free images;
- drain: no more submits; wait until every accepted job has ended.

Printed as one JSON document (`main`): submits by answer, jobs accepted / finished / failed by
code / lost (accepted but never ended, or vanished), peak Redis memory, and the bytes the image
budget still counts at the end (0 when nothing drifted). It passes (exit 0) with nothing lost,
nothing counted at the end and no 5xx answer but 503. `make soak` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from rq.job import Job
from rq.serializers import JSONSerializer

from bench.common import load_images
from bench.service import Stack
from launch.redis_server import EmbeddedRedis
from shared.image_budget import queued_bytes
from shared.redis_conn import redis_from_url

MB = 1024 * 1024
_ENDED = {"finished", "failed", "canceled"}


class _Submitters:
    """`threads` clients posting images in a loop to whichever api `target` names, recording answers."""

    def __init__(self, images: list[bytes], threads: int) -> None:
        self.images = images
        self.threads = threads
        self.target = ""
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.accepted: list[str] = []
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.threads):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._workers.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._workers:
            thread.join(30)

    def _run(self, index: int) -> None:
        session = requests.Session()
        n = index
        while not self.stop.is_set():
            image = self.images[n % len(self.images)]
            n += self.threads
            try:
                response = session.post(
                    f"{self.target}/v1/jobs", data=image, headers={"Content-Type": "image/jpeg"}, timeout=30
                )
            except requests.RequestException as exc:
                with self.lock:
                    self.answers[f"error {type(exc).__name__}"] += 1
                time.sleep(0.2)
                continue
            code = ""
            if response.status_code != 202:
                try:
                    code = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "?"
            with self.lock:
                self.answers[f"{response.status_code} {code}".strip()] += 1
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
            if response.status_code in (429, 503):
                # A polite client backs off (capped, so the drill keeps pressing on the limit).
                time.sleep(min(float(response.headers.get("Retry-After", 1)), 0.5))


class _MemorySampler(threading.Thread):
    def __init__(self, conn: Any) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.peak = 0
        self.peak_rss = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            try:
                info = self.conn.info("memory")
            except Exception:  # a busy Redis may time out a sample; the next one counts
                continue
            self.peak = max(self.peak, int(info["used_memory"]))
            self.peak_rss = max(self.peak_rss, int(info["used_memory_rss"]))


def _statuses(conn: Any, ids: list[str]) -> list[Job | None]:
    jobs: list[Job | None] = []
    for start in range(0, len(ids), 500):
        jobs += Job.fetch_many(ids[start : start + 500], connection=conn, serializer=JSONSerializer)
    return jobs


def drill(
    *,
    phase_seconds: float = 20.0,
    maxmemory_mb: int = 48,
    submitters: int = 4,
    drain_timeout: float = 300.0,
    logs: Path | None = None,
) -> dict[str, Any]:
    logs = logs or Path(tempfile.mkdtemp(prefix="inferq-soak-redis-full-"))
    logs.mkdir(parents=True, exist_ok=True)
    images = [data for name, data in load_images() if name.endswith("@640x480.jpg")]
    maxmemory = maxmemory_mb * MB
    headroom = max(MB, maxmemory // 16)
    common = {"REDIS_HEADROOM_BYTES": headroom, "LOG_FORMAT": "text", "MAX_QUEUE_DEPTH": 0}
    with EmbeddedRedis(logs / "redis", appendonly=False, maxmemory=maxmemory) as server:
        conn = redis_from_url(server.url)
        sampler = _MemorySampler(conn)
        budgeted = Stack(server.url, logs, "budget", workers=1, MAX_QUEUED_BYTES=maxmemory // 3, **common)
        unbudgeted = Stack(server.url, logs, "open", workers=0, ready=False, MAX_QUEUED_BYTES=0, **common)
        with budgeted as budget, unbudgeted as open_api:
            sampler.start()
            load = _Submitters(images, submitters)
            phases: dict[str, dict[str, int]] = {}
            before: Counter[str] = Counter()

            def phase(name: str, seconds: float) -> None:
                time.sleep(seconds)
                with load.lock:
                    phases[name] = dict(load.answers - before)
                    before.update(load.answers - before)

            load.target = budget.base
            load.start()
            phase("budget", phase_seconds)
            load.target = open_api.base
            phase("full", phase_seconds)
            # Past maxmemory while the worker has jobs in flight.
            conn.config_set("maxmemory", max(MB, int(conn.info("memory")["used_memory"]) - MB // 2))
            phase("past_maxmemory", phase_seconds / 2)
            load.join()
            drain_started = time.monotonic()
            ids = list(load.accepted)
            pending = ids
            while pending and time.monotonic() - drain_started < drain_timeout:
                jobs = _statuses(conn, pending)
                pending = [
                    job_id
                    for job_id, job in zip(pending, jobs, strict=True)
                    if job is not None and job.get_status(refresh=False) not in _ENDED
                ]
                time.sleep(1.0)
            drain_s = time.monotonic() - drain_started
            sampler.stopped.set()
            jobs = _statuses(conn, ids)
            ended: Counter[str] = Counter()
            lost = 0
            for job in jobs:
                status = job.get_status(refresh=False) if job is not None else None
                if job is None or status not in _ENDED:
                    lost += 1
                elif status == "finished":
                    ended["finished"] += 1
                else:
                    error = job.meta.get("error") or {}
                    ended[f"failed {error.get('code', 'worker_crashed')}"] += 1
            info = conn.info("memory")
            report = {
                "maxmemory_bytes": maxmemory,
                "maxmemory_lowered_to": int(info["maxmemory"]),
                "max_queued_bytes": maxmemory // 3,
                "redis_headroom_bytes": headroom,
                "phase_seconds": phase_seconds,
                "submitters": submitters,
                "answers_by_phase": phases,
                "submits": sum(load.answers.values()),
                "answers_5xx_other_than_503": sum(
                    n
                    for answer, n in load.answers.items()
                    if answer.startswith("5") and not answer.startswith("503")
                ),
                "jobs_submitted": len(ids),  # accepted (202): the soak table's column
                "accepted": len(ids),
                "finished": ended.pop("finished", 0),
                "failed_by_code": dict(ended),
                "lost": lost,
                "drain_seconds": round(drain_s, 1),
                "peak_redis_used_memory_bytes": sampler.peak,
                "peak_rss_mb": {"redis": round(sampler.peak_rss / MB, 1)},
                "queued_bytes_counted_at_end": queued_bytes(conn),
                "worker_log_redis_full_lines": _count_lines(logs / "budget-worker0.log", "Redis is full"),
                "logs": str(logs),
            }
        conn.close()
    return report


def _count_lines(path: Path, needle: str) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text(errors="replace").splitlines() if needle in line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--maxmemory-mb", type=int, default=48)
    parser.add_argument("--submitters", type=int, default=4)
    parser.add_argument("--logs", type=Path, default=None)
    # The soak runner's interface: --workdir is where the logs go (same as --logs).
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    args = parser.parse_args(argv)
    logs = args.logs or args.workdir
    report = drill(
        phase_seconds=min(args.phase_seconds, 5.0) if args.quick else args.phase_seconds,
        maxmemory_mb=args.maxmemory_mb,
        submitters=args.submitters,
        logs=logs,
    )
    print(json.dumps(report))
    passed = (
        report["lost"] == 0
        and report["queued_bytes_counted_at_end"] == 0
        and report["answers_5xx_other_than_503"] == 0
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
