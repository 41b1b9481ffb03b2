"""Scale-out proof: 3 batch workers as if on 3 machines, 2 api servers, 600 jobs over HTTP, one worker
SIGKILLed mid-run. Everything the operator looks at (the dashboard, /metrics, the logs) sees all of it.

"Separate machines": each worker runs from its own temporary working directory with its own DATA_DIR;
all they share is REDIS_URL and the artifact path (and this box's CPUs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.results import Result

from bench.soak_chaos import RecoveryWatch, kill_mid_work
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import SERIALIZER
from shared.manifest import Manifest
from tests.factories import jpegs
from tests.service import RECOVERY_BOUND_S, free_port, http_ok, service_env, start_api, stop, wait_until

pytestmark = pytest.mark.slow

N_JOBS = 600
WORKERS = ("machine-a", "machine-b", "machine-c")
VICTIM = WORKERS[0]
QUEUES = ("inferq", "inferq-low")
BATCH_UPLOAD = 10  # images per POST /v1/batches; half the jobs come that way, half one per POST


def start_machine(env: dict[str, str], name: str, home: Path) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True)
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--name", name],
        env={**env, "DATA_DIR": str(home / "data")},
        cwd=home,
        stdout=(home / "worker.log").open("ab"),
        stderr=subprocess.STDOUT,
    )


def scrape(base: str) -> dict[str, Any]:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (over all their other labels)."""
    return sum(
        s.value
        for family in families.values()
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def worker_info(base: str) -> dict[str, dict[str, str]]:
    return {s.labels["worker"]: s.labels for s in scrape(base)["inferq_worker_info"].samples}


def ended_count(conn: redis.Redis) -> int:
    """Jobs in the finished and failed registries of both lanes."""
    keys = [r(q, connection=conn).key for r in (FinishedJobRegistry, FailedJobRegistry) for q in QUEUES]
    with conn.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.zcard(key)
        return sum(pipe.execute())


def log_lines(path: Path, tolerate_cut_last_line: bool = False) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            # rq's worker-pool is not involved here: every line of these processes is ours, JSON.
            assert tolerate_cut_last_line and i == len(lines) - 1, f"{path}: not a JSON line: {line!r}"
    return parsed


def test_three_workers_two_apis_600_jobs_one_worker_killed(artifact_dir: Path, tmp_path: Path) -> None:
    manifest = Manifest.read(artifact_dir)
    # Each worker serves one file of the artifact, the one its backend runs (BACKEND=auto).
    served = {manifest.sha256} | ({manifest.onnx.sha256} if manifest.onnx else set())
    with EmbeddedRedis(tmp_path / "redis", appendonly=False) as server:
        env = service_env(
            server.url,
            ARTIFACT_DIR=str(artifact_dir),
            MAX_BATCH_SIZE=8,
            LOG_FORMAT="json",
            WEB_CONCURRENCY=1,
            # One client submits everything at once here: the per-key limits are another test's subject.
            SUBMIT_RATE_LIMIT="100000/second",
            QUEUE_SHARE_PER_KEY=1,
        )
        machines = {name: start_machine(env, name, tmp_path / name) for name in WORKERS}
        ports = [free_port(), free_port()]
        apis = [start_api(env, port, log=tmp_path / f"api-{i}.log") for i, port in enumerate(ports)]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        conn = redis.Redis.from_url(server.url)
        try:
            # --- all three workers registered, seen by the dashboard and /metrics of both apis -------
            def all_registered() -> bool:
                for name, proc in machines.items():
                    assert proc.poll() is None, (tmp_path / name / "worker.log").read_text()[-3000:]
                return all(http_ok(f"{b}/readyz") for b in bases) and set(worker_info(bases[1])) == set(
                    WORKERS
                )

            wait_until(all_registered, 180, 1.0, "3 workers registered, both apis ready")
            listed = requests.get(f"{bases[0]}/rq/0/data/workers.json", timeout=10).json()["workers"]
            assert {w["name"] for w in listed} == set(WORKERS)
            assert all(w["queues"] == ["inferq", "inferq-low"] and w["state"] for w in listed)
            info = worker_info(bases[0])
            assert {i["model_sha256"] for i in info.values()} <= served
            assert {i["queues"] for i in info.values()} == {"inferq,inferq-low"}

            # --- 600 jobs over HTTP, spread over both apis and both lanes -------------------------------
            images = jpegs(24)
            singles = N_JOBS // 2
            uploads = (N_JOBS - singles) // BATCH_UPLOAD

            def post_single(i: int) -> list[str]:
                response = requests.post(
                    f"{bases[i % 2]}/v1/jobs",
                    params={"priority": "low" if i % 3 == 0 else "high", "top_k": 3},
                    data=images[i % len(images)],
                    headers={"Content-Type": "image/jpeg"},
                    timeout=30,
                )
                assert response.status_code == 202, response.text
                return [response.json()["id"]]

            def post_batch(i: int) -> list[str]:
                files = [("image", (f"{k}.jpg", images[(i + k) % len(images)])) for k in range(BATCH_UPLOAD)]
                response = requests.post(
                    f"{bases[(i + 1) % 2]}/v1/batches",
                    params={"priority": "high" if i % 2 else "low"},
                    files=files,
                    timeout=30,
                )
                assert response.status_code == 202, response.text
                return [job["id"] for job in response.json()["jobs"]]

            started = time.monotonic()
            with ThreadPoolExecutor(6) as pool:
                batch_futures = [pool.submit(post_batch, i) for i in range(uploads)]
                single_futures = [pool.submit(post_single, i) for i in range(singles)]
                ids = [i for f in batch_futures + single_futures for i in f.result()]
            assert len(set(ids)) == N_JOBS

            # --- SIGKILL one worker mid-batch, once it has done a share --------------------------------
            victim_key = f"rq:worker:{VICTIM}"
            wait_until(
                lambda: int(conn.hget(victim_key, "successful_job_count") or 0) >= 24,
                120,
                0.2,
                "victim working",
            )
            kill = kill_mid_work(conn, Settings(), list(machines.values()), machines[VICTIM], patience=20)
            assert kill is not None and kill.victim == VICTIM, "the victim was never seen busy"
            killed_at_done = ended_count(conn)
            assert killed_at_done < N_JOBS, "the kill came too late to prove anything"
            # It died holding work of both kinds: jobs started, and ids grabbed but not started.
            assert kill.started, kill
            assert kill.grabbed, kill
            watch = RecoveryWatch(redis.Redis.from_url(server.url), Settings())  # checked at the end
            watch.watch(kill)
            watch.start()

            # --- every job finishes, survivors included the victim's share ------------------------------
            def ended() -> int:
                for name in WORKERS[1:]:
                    assert machines[name].poll() is None, (tmp_path / name / "worker.log").read_text()[-3000:]
                return ended_count(conn)

            wait_until(lambda: ended() >= N_JOBS, 240, 0.5, "all 600 jobs ended")
            elapsed = time.monotonic() - started
            with conn.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(Job.key_for(job_id), ["status", "worker_name", "meta"])
                rows = pipe.execute()
            statuses = Counter(row[0].decode() for row in rows)
            assert statuses == {"finished": N_JOBS}, statuses
            by_worker = Counter(row[1].decode() for row in rows)
            assert set(by_worker) == set(WORKERS), by_worker  # every worker took a share
            metas = [json.loads(row[2]) for row in rows]
            retried = {job_id for job_id, m in zip(ids, metas, strict=True) if m["attempts"] > 1}
            assert all(
                row[1].decode() != VICTIM for m, row in zip(metas, rows, strict=True) if m["attempts"] > 1
            )
            # What the victim held went back and was finished by a survivor, exactly once; the jobs
            # it had started were charged that start.
            assert set(kill.started) <= retried, set(kill.started) - retried
            for job_id in kill.started + kill.grabbed:
                row = rows[ids.index(job_id)]
                assert row[0] == b"finished" and row[1].decode() != VICTIM, (job_id, row)
                job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
                assert len(Result.all(job, serializer=SERIALIZER)) == 1, job_id
            batches = {m["batch_id"] for m in metas}

            # --- one scrape of either api shows every worker's data, consistent with the jobs -----------
            for base in bases:
                families = scrape(base)
                assert value(families, "inferq_job_queue_wait_seconds_count") == N_JOBS
                assert value(families, "inferq_job_preprocess_seconds_count") == N_JOBS
                assert value(families, "inferq_batch_size_count") == len(batches)
                assert value(families, "inferq_batch_size_sum") == N_JOBS
                assert value(families, "inferq_batch_inference_seconds_count") == len(batches)
                assert value(families, "inferq_jobs_finished_total") == N_JOBS
                assert value(families, "inferq_job_queue_wait_seconds_bucket", le="+Inf") == N_JOBS
            submitted = [scrape(base) for base in bases]
            assert sum(value(f, "inferq_jobs_submitted_total") for f in submitted) == N_JOBS
            assert all(value(f, "inferq_jobs_submitted_total") > 0 for f in submitted)  # both apis took some
            # The killed worker's registration expires: it leaves the info metric and the dashboard.
            wait_until(lambda: set(worker_info(bases[0])) == set(WORKERS[1:]), 30, 1.0, "victim gone")
            listed = requests.get(f"{bases[1]}/rq/0/data/workers.json", timeout=10).json()["workers"]
            assert {w["name"] for w in listed} == set(WORKERS[1:])
            queues = requests.get(f"{bases[1]}/rq/0/data/queues.json", timeout=10).json()["queues"]
            assert {q["name"] for q in queues} == {"inferq", "inferq-low"}
        finally:
            for proc in [*machines.values(), *apis]:
                stop(proc)

    # --- the logs follow every job: submitted on an api, ended on the worker that ran it -------------
    submitted_ids = [
        line["job_id"]
        for i in range(2)
        for line in log_lines(tmp_path / f"api-{i}.log")
        if line["message"] == "job submitted"
    ]
    assert sorted(submitted_ids) == sorted(ids)
    for name in WORKERS:
        lines = log_lines(tmp_path / name / "worker.log", tolerate_cut_last_line=name == VICTIM)
        ended_here = [line for line in lines if line["message"].startswith("batch of")]
        assert all(line["worker"] == name and line["model_sha256"] in served for line in ended_here)
        assert len({line["model_sha256"] for line in ended_here}) <= 1, "one worker serves one file"
        logged = {job_id for line in ended_here for job_id in line["job_ids"]}
        ran_here = {job_id for job_id, row in zip(ids, rows, strict=True) if row[1].decode() == name}
        # The victim may die between writing a batch and logging it: its lines are a subset.
        assert logged <= ran_here if name == VICTIM else logged == ran_here, name
    # All the victim held was back in the survivors' hands within the promised window. (Fails while
    # RQ's IntermediateQueue.cleanup is what frees a dead worker's grabbed-not-started ids: a minute.)
    watch.wait_all(timeout=5)
    watch.stopped.set()
    assert kill.recovery_s is not None and kill.recovery_s <= RECOVERY_BOUND_S, (
        f"the victim's jobs back {kill.recovery_s} s after the kill (bound {RECOVERY_BOUND_S} s): {kill}"
    )
    print(
        f"\n600 jobs in {elapsed:.1f} s over 2 apis; per worker {dict(by_worker)}; "
        f"{len(batches)} batches; {len(retried)} jobs re-run after the kill"
    )
