"""The worker-death drill: N workers drain a stream of jobs submitted over HTTP while busy workers
are SIGKILLed at random moments, each replaced at once (as RQ's worker-pool does). Every job must
finish, with the label its image gets when it runs alone and exactly one result; none may fail.

A kill is aimed at work in progress: the drill freezes every worker (SIGSTOP) at a moment when some
job sits grabbed but not yet started, lets all but the victim run on until they have started what
they grabbed, and then reads exactly what the frozen victim holds: the jobs it started (its entries
in the started registries) and the ids it grabbed but never started (still in its own grabbed
lists, `shared.keys.grabbed_key`). Then it SIGKILLs the victim. The freeze lasts well under
`ABANDONED_AFTER_SECONDS`, so no live worker is taken for dead meanwhile. A kill happens only while
another worker is registered, so each recovery time is the promised one (`ABANDONED_AFTER_SECONDS`
and half of it), not a replacement's model load.

    python -m bench.soak_chaos --workers 2 --jobs 5000 --kills 20   # prints one JSON document

`run_drill` is also what the reliability tests run, at small counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from rq.job import Job
from rq.results import Result

from api.job_view import job_view
from bench.common import load_images, process_tree, rss_mb
from bench.service import Stack
from launch.processes import descendants
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import LANES, META_ATTEMPTS, SERIALIZER, TERMINAL_STATUSES, make_queue
from shared.keys import grabbed_key

# How long the survivors run while the victim stays frozen: they start what they grabbed within a
# round trip or two, so what is still in an intermediate list after this is the victim's.
SETTLE_SECONDS = 1.5
# Once `--jobs` are in and kills are still owed, more jobs go in only while fewer than this many wait.
EXTRA_BACKLOG = 100


@dataclass
class Kill:
    """One SIGKILL and what the victim held when it died."""

    victim: str  # the worker's RQ name
    at: float  # epoch seconds
    started: list[str]  # jobs it had started and not yet written
    grabbed: list[str]  # ids it had moved into its grabbed lists but not started
    recovery_s: float | None = None  # kill → every held job back in other hands (`RecoveryWatch`)


@dataclass
class JobOutcome:
    job_id: str
    image: int  # index into the drill's image list
    status: str
    code: str | None
    label: str | None
    results: int  # entries in RQ's result stream: exactly 1 for a job that ended once
    attempts: int
    worker: str | None
    ended_at: float | None


@dataclass
class DrillReport:
    jobs: list[JobOutcome]
    kills: list[Kill]
    expected_labels: list[str]
    seconds: float
    peak_rss_mb: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        failed = Counter(j.code or "unknown" for j in self.jobs if j.status != "finished")
        recoveries = [k.recovery_s for k in self.kills if k.recovery_s is not None]
        return {
            "jobs_submitted": len(self.jobs),
            "finished": sum(j.status == "finished" for j in self.jobs),
            "failed_by_code": dict(failed),
            "lost": sum(j.status not in TERMINAL_STATUSES for j in self.jobs),
            "results_not_exactly_one": sum(j.results != 1 for j in self.jobs),
            "wrong_label": sum(
                j.status == "finished" and j.label != self.expected_labels[j.image] for j in self.jobs
            ),
            "kills": len(self.kills),
            "held_started": sum(len(k.started) for k in self.kills),
            "held_grabbed_not_started": sum(len(k.grabbed) for k in self.kills),
            "recovery_s": {
                "max": max(recoveries, default=None),
                "median": statistics.median(recoveries) if recoveries else None,
                "each": [round(r, 2) for r in recoveries],
            },
            "peak_rss_mb": {k: round(v, 1) for k, v in self.peak_rss_mb.items()},
            "seconds": round(self.seconds, 1),
        }


# --- what a worker holds, and the kill -------------------------------------------------------------


def worker_name_of(conn: redis.Redis, pid: int) -> str | None:
    """The RQ name of the registered worker running as `pid` (None until it has registered)."""
    for key in conn.smembers("rq:workers"):
        if conn.hget(key, "pid") == str(pid).encode():
            return key.decode().removeprefix("rq:worker:")
    return None


def grabbed_ids(conn: redis.Redis, settings: Settings, worker: str | None = None) -> set[str]:
    """Ids grabbed but not started: in the workers' own reliable-dequeue lists
    (`shared.keys.grabbed_key`), only `worker`'s when it is given."""
    queue_keys = [make_queue(conn, settings, lane).key for lane in LANES]
    if worker is not None:
        keys = [grabbed_key(key, worker) for key in queue_keys]
    else:
        keys = [k for key in queue_keys for k in conn.scan_iter(match=grabbed_key(key, "*"))]
    with conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.lrange(key, 0, -1)
        return {i.decode() for ids in pipe.execute() for i in ids}


def started_by(conn: redis.Redis, settings: Settings, worker: str) -> list[str]:
    """Jobs in the started registries whose job hash names `worker`: started, not yet written."""
    entries = [
        e.decode()
        for lane in LANES
        for e in conn.zrange(make_queue(conn, settings, lane).started_job_registry.key, 0, -1)
    ]
    ids = sorted({e.split(":", 1)[0] for e in entries})
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(Job.key_for(job_id), ["worker_name", "status"])
        rows = pipe.execute()
    return [
        i
        for i, (name, status) in zip(ids, rows, strict=True)
        if name == worker.encode() and status == b"started"
    ]


def _signal_all(procs: Sequence[subprocess.Popen[bytes]], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, sig)


def kill_mid_work(
    conn: redis.Redis,
    settings: Settings,
    workers: Sequence[subprocess.Popen[bytes]],
    victim: subprocess.Popen[bytes],
    patience: float,
    settle: float = SETTLE_SECONDS,
    orphans: frozenset[str] = frozenset(),
) -> Kill | None:
    """SIGKILL `victim` while it holds started jobs, preferably also grabbed-not-started ones
    (waited for up to `patience` seconds; after that, started ones suffice). None if the victim
    never held a started job in 4 × `patience` (idle) or has not registered.

    `orphans`: ids that earlier victims left in the intermediate lists; they stay there until RQ's
    maintenance deals with them, so they are nobody's grab now."""
    name = worker_name_of(conn, victim.pid)
    if name is None:
        return None
    started_at = time.monotonic()
    while victim.poll() is None:
        waited = time.monotonic() - started_at
        if waited > 4 * patience:
            return None
        if waited < patience and not grabbed_ids(conn, settings, name):
            time.sleep(0.002)
            continue
        _signal_all(workers, signal.SIGSTOP)
        try:
            time.sleep(0.02)  # a command the victim sent just before the stop lands in Redis first
            grabbed_any = grabbed_ids(conn, settings, name) - orphans
            _signal_all([w for w in workers if w is not victim], signal.SIGCONT)
            time.sleep(settle if grabbed_any else 0)
            grabbed = sorted(grabbed_any & grabbed_ids(conn, settings, name))
            started = started_by(conn, settings, name)
            if started and (grabbed or time.monotonic() - started_at > patience):
                at = time.time()
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                return Kill(name, at, started, grabbed)
        finally:
            _signal_all(workers, signal.SIGCONT)
        time.sleep(random.uniform(0.05, 0.3))  # another moment
    return None


def recovered(conn: redis.Redis, settings: Settings, kill: Kill) -> bool:
    """Every job the victim held is out of its hands: a started one requeued (or restarted, or
    ended) by another worker's maintenance, a grabbed one out of the victim's grabbed lists."""
    held = kill.started + kill.grabbed
    with conn.pipeline(transaction=False) as pipe:
        for job_id in held:
            pipe.hmget(Job.key_for(job_id), ["status", "worker_name"])
        rows = pipe.execute()
    stuck = grabbed_ids(conn, settings, kill.victim)
    for job_id, (status, worker) in zip(held, rows, strict=True):
        if job_id in kill.grabbed and job_id in stuck and status == b"queued":
            return False
        if job_id in kill.started and status == b"started" and worker == kill.victim.encode():
            return False
    return True


class RecoveryWatch(threading.Thread):
    """Fills in `Kill.recovery_s` for each watched kill, polling every 0.1 s."""

    def __init__(self, conn: redis.Redis, settings: Settings) -> None:
        super().__init__(name="recovery-watch", daemon=True)
        self.conn = conn
        self.settings = settings
        self.kills: list[Kill] = []
        self.stopped = threading.Event()

    def watch(self, kill: Kill) -> None:
        self.kills.append(kill)

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            for kill in list(self.kills):
                if kill.recovery_s is None and recovered(self.conn, self.settings, kill):
                    kill.recovery_s = time.time() - kill.at

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(k.recovery_s is None for k in self.kills) and time.monotonic() < deadline:
            time.sleep(0.1)


# --- the drill ---------------------------------------------------------------------------------------


def _post(base: str, image: bytes, patience: float = 120.0) -> str:
    """Submit, honouring 429/503 with Retry-After (a full queue or a restart is not a failure)."""
    deadline = time.monotonic() + patience
    while True:
        response = requests.post(
            f"{base}/v1/jobs",
            params={"top_k": 1},
            data=image,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        if response.status_code == 202:
            return str(response.json()["id"])
        if response.status_code not in (429, 503) or time.monotonic() > deadline:
            raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
        time.sleep(float(response.headers.get("Retry-After", "1")))


def _wait_label(base: str, job_id: str, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{base}/v1/jobs/{job_id}", params={"wait": 10}, timeout=30).json()
        if body["status"] == "finished":
            return str(body["result"]["predictions"][0]["label"])
        if body["status"] in TERMINAL_STATUSES:
            raise RuntimeError(f"calibration job {job_id} ended {body['status']}: {body.get('error')}")
    raise TimeoutError(job_id)


def outcomes(conn: redis.Redis, ids: Sequence[str], images: Sequence[int]) -> list[JobOutcome]:
    out = []
    for job_id, image in zip(ids, images, strict=True):
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        view = job_view(job)
        predictions = (view.get("result") or {}).get("predictions") or [{}]
        out.append(
            JobOutcome(
                job_id=job_id,
                image=image,
                status=view["status"],
                code=(view.get("error") or {}).get("code"),
                label=predictions[0].get("label"),
                results=len(Result.all(job, serializer=SERIALIZER)),
                attempts=int(job.meta.get(META_ATTEMPTS, 0)),
                worker=job.worker_name,
                ended_at=job.ended_at.timestamp() if job.ended_at else None,
            )
        )
    return out


class _PeakRss(threading.Thread):
    """Peak resident memory of each part: the api (gunicorn master and its workers, summed), the
    largest single worker, the largest worker's decoder processes (summed), Redis."""

    def __init__(self, parts: Callable[[], dict[str, list[list[int]]]], interval: float = 0.5) -> None:
        super().__init__(name="peak-rss", daemon=True)
        self.parts = parts
        self.interval = interval
        self.peak: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for part, groups in self.parts().items():
                for pids in groups:
                    try:
                        total = sum(rss_mb(pid) for pid in pids)
                    except OSError:  # the process just died (a kill)
                        continue
                    self.peak[part] = max(self.peak.get(part, 0.0), total)


def run_drill(
    workers: int,
    jobs: int,
    kills: int,
    workdir: Path,
    *,
    seed: int = 1,
    patience: float = 5.0,
    timeout: float = 3600.0,
    **overrides: Any,
) -> DrillReport:
    """The drill on its own Valkey, api and `workers` workers; `overrides` are service settings."""
    rng = random.Random(seed)
    images = [data for _, data in load_images()]
    settings = Settings()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (
        EmbeddedRedis(workdir / "redis", appendonly=False) as server,
        Stack(server.url, logs, "soak", workers=workers, **overrides) as stack,
    ):
        conn = redis.Redis.from_url(server.url)
        expected = [_wait_label(stack.base, _post(stack.base, image)) for image in images]
        peak = _PeakRss(
            lambda: {
                "api": [process_tree(stack.api_proc.pid)],
                "worker": [[p.pid] for p in stack.worker_procs if p.poll() is None],
                "decoders": [list(descendants(p.pid)) for p in stack.worker_procs if p.poll() is None],
                "redis": [[server.pid]] if server.pid else [],
            }
        )
        peak.start()
        began = time.monotonic()
        deadline = began + timeout
        done: list[Kill] = []
        order: list[int] = []  # image index of each submitted job, in `ids` order
        ids: list[str] = []
        submitting = threading.Event()
        submitting.set()
        pick = random.Random(seed + 1)  # the submitter's own: the kill loop uses `rng`

        def ended() -> int:
            """Drill jobs ended (the calibration jobs are in the registries too)."""
            return sum(
                make_queue(conn, settings, lane).finished_job_registry.count
                + make_queue(conn, settings, lane).failed_job_registry.count
                for lane in LANES
            ) - len(images)

        def submit_all() -> None:
            """At least `jobs`, and on in small chunks until every kill has happened (a kill needs
            work in progress to hit, and a replacement worker takes a while to load its model);
            the extra chunks only while the backlog is short, so the run does not outgrow the drill."""
            try:
                with ThreadPoolExecutor(8) as pool:
                    while len(ids) < jobs or (len(done) < kills and time.monotonic() < deadline):
                        if len(ids) >= jobs and len(ids) - ended() > EXTRA_BACKLOG:
                            time.sleep(0.2)
                            continue
                        size = min(200, jobs - len(ids)) if len(ids) < jobs else 50
                        chunk = [pick.randrange(len(images)) for _ in range(size)]
                        ids.extend(pool.map(lambda i: _post(stack.base, images[i]), chunk))
                        order.extend(chunk)
            finally:
                submitting.clear()

        submitter = threading.Thread(target=submit_all, name="submitter", daemon=True)
        submitter.start()
        watch = RecoveryWatch(conn, settings)
        watch.start()

        # Kills spread over the run: a random pause, then the next busy moment of a random worker.
        while (
            len(done) < kills and time.monotonic() < deadline and (submitting.is_set() or ended() < len(ids))
        ):
            time.sleep(rng.uniform(0.2, 2.0))
            live = [p for p in stack.worker_procs if p.poll() is None]
            if not live:
                stack.start_worker()
                continue
            # Only while another worker is registered (model loaded) to take the victim's jobs over:
            # the recovery measured is the promised one, not a replacement's model load.
            if sum(worker_name_of(conn, p.pid) is not None for p in live) < 2:
                continue
            orphans = frozenset(i for k in done for i in k.grabbed)
            kill = kill_mid_work(conn, settings, live, rng.choice(live), patience, orphans=orphans)
            if kill is not None:
                done.append(kill)
                watch.watch(kill)
                stack.start_worker()  # the replacement, as RQ's worker-pool would start one
        submitter.join(timeout=max(0.0, deadline - time.monotonic()))
        while ended() < len(ids) and time.monotonic() < deadline:
            time.sleep(0.5)
        seconds = time.monotonic() - began
        watch.wait_all(timeout=10)
        watch.stopped.set()
        peak.stopped.set()
        peak.join(2)
        report = DrillReport(outcomes(conn, ids, order), done, expected, seconds, peak.peak)
        conn.close()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and Redis data (default: a temp dir)"
    )
    parser.add_argument("--quick", action="store_true", help="300 jobs, 3 kills (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.kills = min(args.jobs, 300), min(args.kills, 3)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="inferq-soak-"))
    report = run_drill(args.workers, args.jobs, args.kills, workdir, seed=args.seed)
    summary = {
        "workers": args.workers,
        "kills_requested": args.kills,
        **report.summary(),
        "kills_detail": [asdict(k) for k in report.kills],
    }
    summary["workdir"] = str(workdir)
    print(json.dumps(summary))
    ok = summary["finished"] == summary["jobs_submitted"] and summary["results_not_exactly_one"] == 0
    return 0 if ok and summary["wrong_label"] == 0 and summary["kills"] == args.kills else 1


if __name__ == "__main__":
    sys.exit(main())
