"""The bounded queue's arithmetic (api/capacity.py) on an in-process fake Redis: the completion rate,
the `Retry-After` computed from it, and the metric that shows the same rate."""

from __future__ import annotations

import math
import time

import fakeredis
import pytest
from prometheus_client.core import Metric
from rq import Queue

from api.capacity import (
    RETRY_AFTER_MAX_SECONDS,
    check_capacity,
    completion_rate,
    queued_bytes_retry_after,
    retry_after_seconds,
)
from api.metrics import QueueCollector
from shared.config import Settings
from shared.errors import QueuedBytesFull
from shared.jobs import LANES, make_queue
from shared.keys import sweep_lock_key
from tests.factories import settings_for

NOW = 1_800_000_000.0  # a whole second, as RQ's registry scores are


def lanes(conn: fakeredis.FakeRedis, settings: Settings) -> list[Queue]:
    return [make_queue(conn, settings, lane) for lane in LANES]


def record_ended(registry: str, conn: fakeredis.FakeRedis, ttl: int, ages: list[float], now: float) -> None:
    """Entries as RQ's registries hold them: score = end time (whole seconds) + ttl."""
    conn.zadd(registry, {f"{registry}-{age}": int(now - age) + ttl for age in ages})


def fill_registries(conn: fakeredis.FakeRedis, settings: Settings, queues: list[Queue], now: float) -> None:
    """30 jobs ended in the last minute (24 finished on the high lane, 6 failed on the low lane, the
    oldest 40 s ago), 3 long before it."""
    high, low = queues
    record_ended(
        high.finished_job_registry.key, conn, settings.result_ttl, [i * 1.6 + 1 for i in range(24)], now
    )
    record_ended(low.failed_job_registry.key, conn, settings.failure_ttl, [3, 10, 20, 30, 35, 40], now)
    record_ended(low.finished_job_registry.key, conn, settings.result_ttl, [90, 200, 3000], now)


@pytest.fixture
def settings() -> Settings:
    return settings_for("redis://127.0.0.1:6379/0", throughput_window_seconds=60, max_queue_depth=4)


def test_the_rate_is_the_jobs_ended_in_the_window_over_the_whole_window(
    fake_redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    queues = lanes(fake_redis, settings)
    assert completion_rate(fake_redis, queues, settings, now=NOW) == 0.0
    fill_registries(fake_redis, settings, queues, NOW)
    # Over the whole 60 s window, though the oldest of the 30 ended 40 s ago.
    assert completion_rate(fake_redis, queues, settings, now=NOW) == 30 / 60
    # The window's lower end is exclusive: a job that ended exactly 60 s ago is out, 59 s ago in.
    record_ended(queues[0].finished_job_registry.key, fake_redis, settings.result_ttl, [60, 59], NOW)
    assert completion_rate(fake_redis, queues, settings, now=NOW) == 31 / 60
    # Later, every job has left the window.
    assert completion_rate(fake_redis, queues, settings, now=NOW + 61) == 0.0


def queue_metric(conn: fakeredis.FakeRedis, queues: list[Queue], settings: Settings) -> dict[str, float]:
    families: list[Metric] = list(QueueCollector(conn, queues, settings).collect())
    return {
        sample.name: sample.value for family in families for sample in family.samples if not sample.labels
    }


def test_the_metric_and_the_retry_after_read_one_rate(
    fake_redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    queues = lanes(fake_redis, settings)
    # Both read the clock: the jobs ended relative to it (the nearest end is 1 s from the window's).
    fill_registries(fake_redis, settings, queues, time.time())
    for queue in queues:
        fake_redis.rpush(queue.key, "a", "b")  # 4 waiting: full
    # Another process swept the expired images a moment ago (no sweep here: it runs a Lua script).
    fake_redis.set(sweep_lock_key(), 1)

    full = check_capacity(fake_redis, queues, settings, incoming=3)
    assert full is not None and full.waiting == 4 and full.limit == 4
    metric = queue_metric(fake_redis, queues, settings)
    assert metric["inferq_backlog"] == 4
    assert metric["inferq_completion_rate"] == full.rate == 30 / 60
    # 3 jobs must end before 3 more fit, at 0.5 jobs/s: 6 s.
    assert full.retry_after == 6
    # The 429 `queued_bytes_full` uses the same rate: 4 images of 1000 B queued (mean 1000 B), a
    # 1500 B image over a 4000 B budget needs 2 jobs to end: 4 s.
    bytes_full = QueuedBytesFull("full", queued=4000, limit=4000, incoming=1500)
    assert queued_bytes_retry_after(fake_redis, queues, settings, bytes_full) == 4


def test_room_under_the_limit_or_no_limit_is_no_429(
    fake_redis: fakeredis.FakeRedis, settings: Settings
) -> None:
    queues = lanes(fake_redis, settings)
    fake_redis.rpush(queues[1].key, "a", "b", "c")
    assert check_capacity(fake_redis, queues, settings, incoming=1) is None
    unbounded = settings.model_copy(update={"max_queue_depth": 0})
    assert check_capacity(fake_redis, queues, unbounded, incoming=1000) is None


def test_retry_after_is_the_time_to_end_the_overshoot_clamped() -> None:
    assert retry_after_seconds(1, 0.5) == 2
    assert retry_after_seconds(3, 0.4) == math.ceil(3 / 0.4)
    assert retry_after_seconds(1, 1000.0) == 1  # never 0: a client would retry at once
    assert retry_after_seconds(1000, 0.5) == RETRY_AFTER_MAX_SECONDS
    assert retry_after_seconds(1, 0.0) == RETRY_AFTER_MAX_SECONDS  # nothing ended: no pace to go by
