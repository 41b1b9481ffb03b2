"""What a batch worker writes when things go wrong: a worker dies with jobs in every stage, a job
gets stuck, a result arrives after its job was handed to another worker; and the ended-jobs signal
the api's long-polls wake on. Real Redis; stub model (`tests.worker_stub`); real processes where a
worker must die."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from rq.job import Job
from rq.results import Result
from rq.suspension import resume, suspend

from api import create_app
from api.job_view import job_view
from launch.redis_server import EmbeddedRedis
from shared.config import PROJECT_ROOT, Settings
from shared.ended import parse_ended
from shared.jobs import (
    FAILED_BY_RQ,
    FAILED_BY_RQ_MESSAGE,
    JOB_TIMEOUT,
    META_CRASHES,
    META_DEADLINE,
    SERIALIZER,
    make_queue,
    submit,
)
from shared.keys import ended_channel
from shared.telemetry import read_snapshot
from tests.service import jobs_failed_by_code, service_env, stop, wait_until
from tests.worker_stub import MeanRunner, png, stub_handler, truncated_png
from worker import failed_elsewhere, rq_writes
from worker.batch_worker import BatchWorker
from worker.batching import BatchCollector, Grabbed
from worker.feeder import SUSPENSION_CHECK_SECONDS


def fetch(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)


def results(conn: redis.Redis, job_id: str) -> list[Result.Type]:
    return [r.type for r in Result.all(fetch(conn, job_id), serializer=SERIALIZER)]


def test_every_job_end_is_published_on_the_ended_channel(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = Settings(redis_url=redis_url, queue_name="ended-channel")
    queue = make_queue(redis_conn, settings)
    pubsub = redis_conn.pubsub()
    pubsub.subscribe(ended_channel())
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    good = submit(queue, png(80), 1, settings).id
    corrupt = submit(queue, truncated_png(), 1, settings).id
    expired = submit(queue, png(90), 1, settings, meta={META_DEADLINE: time.time() - 1}).id
    BatchWorker(settings=settings, handler=stub_handler()).work(burst=True)

    published = {}
    deadline = time.monotonic() + 5
    while len(published) < 3 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            end = parse_ended(message["data"])
            assert end is not None
            published[end.job_id] = end.view
    pubsub.close()
    assert set(published) == {good, corrupt, expired}
    views = [job_view(fetch(redis_conn, i)) for i in (good, corrupt, expired)]
    assert [view["status"] for view in views] == ["finished", "failed", "expired"]
    # Each message carries the body a read of the ended job gives (shared.ended).
    assert [published[i] for i in (good, corrupt, expired)] == views


class StuckOnceRunner(MeanRunner):
    """The stub model, whose first forward pass hangs for `hang` seconds."""

    def __init__(self, hang: float) -> None:
        super().__init__()
        self.hang = hang
        self.calls = 0

    def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
        self.calls += 1
        if self.calls == 1:
            time.sleep(self.hang)
        return super().predict(inputs, top_k)


def test_a_stuck_job_ends_job_timeout_once_and_the_worker_carries_on(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    settings = Settings(
        redis_url=redis_url,
        queue_name="job-timeout",
        job_timeout=0.5,
        heartbeat_seconds=0.2,
        abandoned_after_seconds=30,
        max_batch_size=1,
    )
    queue = make_queue(redis_conn, settings)
    runner = StuckOnceRunner(hang=6.0)
    stuck = submit(queue, png(30), 1, settings).id
    after = submit(queue, png(60), 1, settings).id
    BatchWorker(settings=settings, handler=stub_handler(runner)).work(max_jobs=2)

    job = fetch(redis_conn, stuck)
    view = job_view(job)
    assert view["status"] == "failed" and view["error"]["code"] == JOB_TIMEOUT, view
    assert job.started_at is not None and job.ended_at is not None
    # Ended by the heartbeat once past JOB_TIMEOUT, not when the forward pass came back.
    took = (job.ended_at - job.started_at).total_seconds()
    assert took < settings.job_timeout + 3 * settings.heartbeat_seconds + 2.0 < runner.hang, took
    assert results(redis_conn, stuck) == [Result.Type.FAILED], "the late forward pass wrote nothing"
    assert job_view(fetch(redis_conn, after))["status"] == "finished"
    snapshot = read_snapshot(redis_conn, settings.queue_name, [])
    assert snapshot.failed_by_code.get(JOB_TIMEOUT) == 1


def test_a_late_writer_never_adds_a_second_result(
    redis_url: str, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stalled past ABANDONED_AFTER_SECONDS (a Redis outage) comes back with its results
    while another worker's maintenance is handing the same jobs back: exactly one of them wins."""
    settings = Settings(
        redis_url=redis_url, queue_name="late-writer", abandoned_after_seconds=2, heartbeat_seconds=0.5
    )
    queue = make_queue(redis_conn, settings)
    ids = [submit(queue, png(40 + i), 1, settings).id for i in range(3)]
    late = BatchWorker(settings=settings, handler=stub_handler(), name="late")
    rescuer = BatchWorker(settings=settings, handler=stub_handler(), name="rescuer")
    for _ in ids:
        redis_conn.lmove(queue.key, late.grabbed_keys[0], "LEFT", "RIGHT")
    jobs = {i: fetch(redis_conn, i) for i in ids}
    running = rq_writes.start_grabbed(
        late,
        [Grabbed(0, i) for i in ids],
        late.grabbed_keys,
        jobs,
        late.execution_ttl,
        late.top_k_of,
        namespace=settings.queue_name,
    )
    assert running is not None and len(running) == 3
    time.sleep(
        settings.abandoned_after_seconds + 1.1
    )  # (RQ's scores are whole seconds)  # no heartbeat: the entries expire

    still_owned = rq_writes._still_owned

    def rescuer_runs_in_between(connection: redis.Redis, endings: Any) -> Any:
        owned = still_owned(connection, endings)
        rescuer.clean_registries()  # the other worker's maintenance lands between check and write
        return owned

    monkeypatch.setattr(rq_writes, "_still_owned", rescuer_runs_in_between)
    endings = [rq_writes.Ending(r, result={"predictions": [], "model": {}}) for r in running]
    written, _ = rq_writes.finish(late, endings, 1.0, namespace=settings.queue_name, result_ttl=60)
    monkeypatch.undo()
    assert written == []
    rescuer.work(burst=True)
    for job_id in ids:
        assert results(redis_conn, job_id) == [Result.Type.SUCCESSFUL], "exactly one result per job"
        assert fetch(redis_conn, job_id).worker_name == "rescuer"


def start_stub_worker(env: dict[str, str], log: Path, **overrides: str) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        [sys.executable, "-m", "tests.worker_stub"],
        env={**env, **overrides},
        cwd=PROJECT_ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def grabbed_not_started(conn: redis.Redis, job_id: str) -> bool:
    """The id sits in a worker's reliable-dequeue list (inferq's own, or RQ's intermediate one)."""
    keys = [*conn.scan_iter("inferq:grabbed:*"), *conn.scan_iter("rq:queue:*:intermediate")]
    return any(job_id.encode() in conn.lrange(key, 0, -1) for key in keys)


def test_a_worker_death_charges_only_the_jobs_in_its_forward_pass(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    """SIGKILL a worker holding jobs in every stage: two in a forward pass, two decoded and waiting
    for the model, one grabbed but not started (a job that was in a crash before, waiting to run
    alone). Only the two in the forward pass are charged an attempt; all five finish, promptly."""
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, abandoned_after_seconds=2, max_attempts=3)
    env = service_env(server.url, ABANDONED_AFTER_SECONDS=2, HEARTBEAT_SECONDS=0.5, MAX_BATCH_SIZE=2)
    queue = make_queue(conn, settings)
    fresh = [submit(queue, png(20 * (i + 1)), 1, settings).id for i in range(4)]
    # Caught in one crash already: it runs alone, once nothing else of its worker is in flight.
    suspect = submit(queue, png(200), 1, settings, meta={"attempts": 1, META_CRASHES: 1}).id
    victim = start_stub_worker(env, tmp_path / "victim.log", STUB_INFER_SECONDS="60")
    try:
        wait_until(
            lambda: (
                grabbed_not_started(conn, suspect)
                and all(fetch(conn, i).get_status().value == "started" for i in fresh)
            ),
            60,
            0.05,
            "every stage holds a job",
        )
        time.sleep(0.5)  # the first two are in their (60 s) forward pass
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop(victim)
    killed_at = time.monotonic()
    rescuer = start_stub_worker(env, tmp_path / "rescuer.log")
    try:
        wait_until(
            lambda: all(fetch(conn, i).get_status().value == "finished" for i in [*fresh, suspect]),
            60,
            0.2,
            "every job finished",
        )
        # Back within the recovery window the settings promise, plus a loaded machine's margin
        # (RQ's intermediate-list cleanup took a minute, and failed the grabbed job).
        assert time.monotonic() - killed_at < settings.abandoned_after_seconds * 1.5 + 15
    finally:
        stop(rescuer)
    crashes = {i: int(fetch(conn, i).meta.get(META_CRASHES, 0)) for i in fresh}
    assert sorted(crashes.values()) == [0, 0, 1, 1], crashes
    retries = sorted(fetch(conn, i).retries_left for i in fresh)
    assert retries == [settings.max_attempts - 2] * 2 + [settings.max_attempts - 1] * 2
    assert int(fetch(conn, suspect).meta[META_CRASHES]) == 1, "waiting to start is free of charge"
    for job_id in [*fresh, suspect]:
        assert results(conn, job_id) == [Result.Type.SUCCESSFUL]
    assert json.loads(conn.hget(Job.key_for(suspect), "meta"))["attempts"] == 2


def test_a_redis_pause_longer_than_abandoned_after_leaves_one_result_per_job(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    """Redis stops answering (SIGSTOP) for longer than ABANDONED_AFTER_SECONDS while one worker is
    in the middle of a forward pass, and that worker stays cut off a while longer (frozen), so that
    the other worker takes its jobs over and finishes them. Then the first comes back with its late
    results: it must drop them (its jobs are no longer its own), so every job ends with exactly one
    result, the other worker's. (Left to race on its own, the first worker's heartbeat usually lands
    first once Redis answers and keeps its jobs: the late write would never be tested.)"""
    server = fresh_redis_server()
    assert server.pid is not None
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, abandoned_after_seconds=2)
    env = service_env(server.url, ABANDONED_AFTER_SECONDS=2, HEARTBEAT_SECONDS=0.5, MAX_BATCH_SIZE=2)
    queue = make_queue(conn, settings)
    ids = [submit(queue, png(10 * (i + 1)), 1, settings).id for i in range(6)]
    slow_log = tmp_path / "slow.log"
    slow = start_stub_worker(env, slow_log, STUB_INFER_SECONDS="3")
    fast = None
    try:
        wait_until(lambda: conn.scard("inferq:at-risk:rq:wip:inferq") > 0, 30, 0.05, "a job at risk")
        in_pass = [i for i in ids if fetch(conn, i).get_status().value == "started"]
        fast = start_stub_worker(env, tmp_path / "fast.log")
        wait_until(lambda: conn.scard("rq:workers") == 2, 30, 0.05, "the other worker up")
        slow.send_signal(signal.SIGSTOP)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            time.sleep(settings.abandoned_after_seconds + 2)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        try:
            wait_until(
                lambda: all(fetch(conn, i).get_status().value == "finished" for i in ids),
                60,
                0.2,
                "the other worker finished every job",
            )
        finally:
            before = len(slow_log.read_text())
            slow.send_signal(signal.SIGCONT)
        # The late worker's forward pass ends and its writer runs: the jobs it held are not its own.
        wait_until(
            lambda: any(
                line in late_lines(slow_log, before) for line in ("batch of", "handed to another worker")
            ),
            30,
            0.1,
            "the late worker's write",
        )
    finally:
        stop(slow)
        if fast is not None:
            stop(fast)
    assert in_pass, "the late worker held jobs"
    for i, job_id in enumerate(ids):
        assert results(conn, job_id) == [Result.Type.SUCCESSFUL], "exactly one result per job"
        job = fetch(conn, job_id)
        assert job.get_status().value == "finished"
        score = job.latest_result().return_value["predictions"][0]["score"]  # type: ignore[union-attr]
        assert score == pytest.approx((10 * (i + 1) / 255 - 0.5) / 0.5, abs=0.02), "its own image's result"
    assert "handed to another worker while running here" in late_lines(slow_log, before)


def late_lines(log: Path, offset: int) -> str:
    return log.read_text()[offset:]


class FailingOnceCollector(BatchCollector):
    """Grabs as usual, then fails once right after a grab (as a lost connection would)."""

    failed = False

    def take_available(self, limit: int) -> list[Grabbed]:
        grabbed = super().take_available(limit)
        if grabbed and not FailingOnceCollector.failed:
            FailingOnceCollector.failed = True
            raise redis.exceptions.ConnectionError("lost between the grab and the start")
        return grabbed


def test_ids_grabbed_before_an_error_go_back_to_their_queue(redis_url: str, redis_conn: redis.Redis) -> None:
    settings = Settings(redis_url=redis_url, queue_name="grab-error", max_batch_size=4)
    queue = make_queue(redis_conn, settings)
    ids = [submit(queue, png(30 + i), 1, settings).id for i in range(5)]
    worker = BatchWorker(settings=settings, handler=stub_handler(), collector_class=FailingOnceCollector)
    worker.work(burst=True)
    assert FailingOnceCollector.failed
    assert [fetch(redis_conn, i).get_status().value for i in ids] == ["finished"] * 5
    assert not any(redis_conn.llen(key) for key in worker.grabbed_keys)


def test_a_busy_worker_obeys_rq_suspend_and_resume(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    """`rq suspend` while a worker is busy: within about SUSPENSION_CHECK_SECONDS (how often it reads
    the suspension) it shows as suspended and starts nothing more; after `rq resume` it takes the
    jobs queued meanwhile."""
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url)
    env = service_env(server.url, MAX_BATCH_SIZE=1)
    queue = make_queue(conn, settings)
    first = [submit(queue, png(20 + i), 1, settings).id for i in range(3)]
    worker = start_stub_worker(env, tmp_path / "worker.log", STUB_INFER_SECONDS="0.3")
    try:
        wait_until(lambda: fetch(conn, first[0]).get_status().value == "finished", 60, 0.05, "busy")
        suspend(conn)
        wait_until(
            lambda: conn.smembers("rq:workers") and worker_states(conn) == {b"suspended"},
            30,
            0.1,
            "the worker suspended",
        )
        later = [submit(queue, png(60 + i), 1, settings).id for i in range(3)]
        time.sleep(SUSPENSION_CHECK_SECONDS + 0.5)
        queued = [i for i in later if fetch(conn, i).get_status().value == "queued"]
        assert queued == later, "nothing started after the worker showed as suspended"
        resume(conn)
        wait_until(
            lambda: all(fetch(conn, i).get_status().value == "finished" for i in [*first, *later]),
            60,
            0.1,
            "every job finished after the resume",
        )
    finally:
        stop(worker)


def worker_states(conn: redis.Redis) -> set[bytes]:
    return {conn.hget(key, "state") for key in conn.smembers("rq:workers")}


def test_a_job_rq_itself_failed_is_counted_once_under_the_code_the_api_shows(
    fresh_redis_server: Callable[..., EmbeddedRedis], tmp_path: Path
) -> None:
    """A worker dies in a forward pass while no other worker runs. Before any worker's recovery can
    get to the job, RQ's own registry cleanup, run by `rq info` (RQ's CLI), fails it: no RQ retry is
    left at MAX_ATTEMPTS=1. The next worker's maintenance counts it in /metrics once, under the code
    the api shows for it, and wakes its long-polls."""
    server = fresh_redis_server()
    conn = redis.Redis.from_url(server.url)
    settings = Settings(redis_url=server.url, abandoned_after_seconds=2, max_attempts=1)
    env = service_env(
        server.url, ABANDONED_AFTER_SECONDS=2, HEARTBEAT_SECONDS=0.5, MAX_ATTEMPTS=1, DECODERS=0
    )
    client = create_app(settings).test_client()
    queue = make_queue(conn, settings)
    job_id = submit(queue, png(70), 1, settings).id
    victim = start_stub_worker(env, tmp_path / "victim.log", STUB_INFER_SECONDS="60")
    try:
        wait_until(lambda: fetch(conn, job_id).get_status().value == "started", 60, 0.05, "job started")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop(victim)
    registry = queue.started_job_registry.key
    # No heartbeat any more: once its started-registry entry has expired, RQ's cleanup may take it.
    wait_until(lambda: not conn.zrangebyscore(registry, time.time(), "+inf"), 30, 0.2, "entry expired")
    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", server.url, "--serializer", "json", queue.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "failed", view  # RQ failed it; inferq wrote nothing
    assert view["error"]["code"] == FAILED_BY_RQ
    assert view["ended_at"] is None, view  # RQ's cleanup records no end time
    assert failed_by_code(client) == {}

    rescuer = start_stub_worker(env, tmp_path / "rescuer.log")
    try:
        wait_until(lambda: failed_by_code(client) == {FAILED_BY_RQ: 1}, 30, 0.2, "counted")
        counted_at = time.time()
        scanned = failed_elsewhere.scanned_key(queue)
        wait_until(lambda: float(conn.get(scanned) or 0) > counted_at, 30, 0.2, "another maintenance pass")
    finally:
        stop(rescuer)
    assert failed_by_code(client) == {FAILED_BY_RQ: 1}, "counted once"
    view = client.get(f"/v1/jobs/{job_id}").get_json()
    assert view["status"] == "failed"
    assert view["error"] == {"code": FAILED_BY_RQ, "message": FAILED_BY_RQ_MESSAGE}
    # When RQ's failure result was written: after the start, before the count.
    started, ended = (
        datetime.fromisoformat(view[k].replace("Z", "+00:00")) for k in ("started_at", "ended_at")
    )
    assert started <= ended <= datetime.fromtimestamp(counted_at, UTC), view
    assert results(conn, job_id) == [Result.Type.FAILED]


def failed_by_code(client: Any) -> dict[str, float]:
    return jobs_failed_by_code(client.get("/metrics").get_data(as_text=True))
