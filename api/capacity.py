"""Backlog and throughput, read from Redis: the bounded queue's 429 and its computed `Retry-After`.

Backlog = live jobs waiting in every priority lane (`LLEN` of each lane's RQ queue; jobs a worker has
taken are not waiting). A queued job whose image expired is not live: it ends `image_expired`
(`shared.image_budget`). When the count says "full", the expired ones are swept out first (at most
once per SWEEP_INTERVAL_SECONDS over all processes) and the lanes counted again, so a 429 is never
caused by jobs that can no longer run.

The same `Retry-After` rule serves MAX_QUEUED_BYTES (429 `queued_bytes_full`): the bytes over the
budget, divided by the mean size of a queued image, is the number of jobs that must end first.

Completion rate (`completion_rate`, the one definition: the 429s' `Retry-After` and the metric
`inferq_completion_rate` both read it) = jobs that ENDED (finished or failed, `deadline_expired`
included: each takes one off the backlog) in the last THROUGHPUT_WINDOW_SECONDS, divided by that
window, over all lanes. Nothing extra is written for it: RQ adds every ended job to its registry ZSETs
with score = end time + TTL (`rq:finished:<queue>`: + RESULT_TTL; `rq:failed:<queue>`: + FAILURE_TTL,
whole seconds), so the jobs that ended after `now - W` are those with a score above `now - W + TTL`:
one ZCOUNT per registry. (This assumes the workers run with the api's RESULT_TTL and FAILURE_TTL,
which they do: one set of settings. Entries leave a registry only once their score is past, long
after the window.)

    rate        = ended in the window / THROUGHPUT_WINDOW_SECONDS
    Retry-After = clamp(ceil((waiting + incoming - MAX_QUEUE_DEPTH) / rate), 1, 60) seconds

i.e. how long the workers, at their recent pace, take to make room for this submission. With no job
ended in the window (no live worker, or a stalled one) it is the maximum, 60.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis import Redis
from redis.client import Pipeline
from rq import Queue

from shared.config import Settings
from shared.errors import QueuedBytesFull
from shared.image_budget import sweep

RETRY_AFTER_MIN_SECONDS = 1
RETRY_AFTER_MAX_SECONDS = 60


def backlog(conn: Redis, queues: Sequence[Queue]) -> int:
    """Jobs waiting in all lanes (one round trip)."""
    with conn.pipeline(transaction=False) as pipe:
        queue_backlog(pipe, queues)
        return sum(int(n) for n in pipe.execute())


def queue_backlog(pipe: Pipeline, queues: Sequence[Queue]) -> None:
    """Queue the reads of `backlog` on `pipe` (one reply per lane: sum them)."""
    for queue in queues:
        pipe.llen(queue.key)


def completion_rate(
    conn: Redis, queues: Sequence[Queue], settings: Settings, now: float | None = None
) -> float:
    """Jobs per second that ended (finished or failed), all lanes: those that ended in the last
    THROUGHPUT_WINDOW_SECONDS divided by that window (one round trip).

    Divided by the whole window, not by the span since the earliest end in it: both terms are then
    fixed by the settings, so the number means the same at every scrape and moves only as jobs end.
    A span measured from the earliest end rests on one entry's whole-second score and reads high
    (a single job that ended a moment ago would be a job per second, whatever the pace). The price:
    for one window after a start or an idle spell the rate reads low, so a `Retry-After` errs long,
    never short, and never past RETRY_AFTER_MAX_SECONDS."""
    now = time.time() if now is None else now
    window = settings.throughput_window_seconds
    with conn.pipeline(transaction=False) as pipe:
        for queue in queues:
            # Exclusive lower bound: the scores are whole seconds (RQ's `current_timestamp()`).
            pipe.zcount(queue.finished_job_registry.key, f"({now - window + settings.result_ttl}", "+inf")
            pipe.zcount(queue.failed_job_registry.key, f"({now - window + settings.failure_ttl}", "+inf")
        ended = sum(int(n) for n in pipe.execute())
    return ended / window


def retry_after_seconds(needed: int, rate: float) -> int:
    """Seconds until `needed` more jobs have left the queue at `rate` jobs/s (clamped)."""
    if rate <= 0:
        return RETRY_AFTER_MAX_SECONDS
    return max(RETRY_AFTER_MIN_SECONDS, min(RETRY_AFTER_MAX_SECONDS, math.ceil(needed / rate)))


@dataclass(frozen=True)
class QueueFull:
    waiting: int
    limit: int
    rate: float
    retry_after: int


def check_capacity(
    conn: Redis, queues: Sequence[Queue], settings: Settings, incoming: int, waiting: int | None = None
) -> QueueFull | None:
    """None when `incoming` more jobs fit under MAX_QUEUE_DEPTH, else what the 429 says. `waiting`:
    the backlog when the caller read it (`queue_backlog` on its pipeline), else it is read here.

    A soft bound: concurrent submitters may overshoot it by a few jobs."""
    limit = settings.max_queue_depth
    if not limit:
        return None
    if waiting is None:
        waiting = backlog(conn, queues)
    if waiting + incoming <= limit:
        return None
    if sweep(conn, settings) is not None:
        waiting = backlog(conn, queues)
        if waiting + incoming <= limit:
            return None
    rate = completion_rate(conn, queues, settings)
    return QueueFull(
        waiting=waiting,
        limit=limit,
        rate=rate,
        retry_after=retry_after_seconds(waiting + incoming - limit, rate),
    )


def queued_bytes_retry_after(
    conn: Redis, queues: Sequence[Queue], settings: Settings, full: QueuedBytesFull
) -> int:
    """`Retry-After` of a 429 `queued_bytes_full`: how long the workers, at their recent pace, take
    to end enough jobs (of the mean queued image size) to make room for `full.incoming` bytes."""
    waiting = max(1, backlog(conn, queues))
    mean_bytes = max(1.0, full.queued / waiting)
    needed_jobs = math.ceil((full.queued + full.incoming - full.limit) / mean_bytes)
    return retry_after_seconds(max(1, needed_jobs), completion_rate(conn, queues, settings))
