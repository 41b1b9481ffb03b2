"""Jobs as the api creates them and as every reader (api, tests, CLI) sees them.

One inferq job is one ordinary RQ job: function `worker.tasks.classify`, args `(image_key, top_k)`,
serialized with RQ's JSONSerializer. The image bytes live in their own key (`shared.keys.image_key`)
so nothing the client sent is ever pickled or compressed into the job hash. The worker writes:
- on success, the RQ result (`job.return_value()`): `result_payload(...)`,
  `{"predictions": [...], "model": {"name", "sha256", ...}}`;
- in both cases, `job.meta[META_TIMINGS]`: `timings(...)`, `{"queue_ms", "preprocess_ms",
  "inference_ms", "batch_size"}`;
- on failure, `job.meta[META_ERROR]`: `{"code", "message"}`. Codes the worker itself decides:
  `WORKER_CRASHED` (the job was being decoded or in a forward pass in MAX_ATTEMPTS workers that
  died), `JOB_TIMEOUT`, and `DEADLINE_EXPIRED` (its `deadline_at` passed before it started; clients
  see status `expired`); the rest come from the image or the model (`shared.errors`).
The api also sets `inferq:known:<id>` (`shared.keys.known_key`) in the enqueue script: a tombstone
that outlives the job, so an expired job reads 410 rather than 404.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from shared import image_budget, rq_enqueue
from shared.config import Settings

# The job-meta keys and the worker's own error codes live in a leaf module (shared.image_budget,
# which this module imports, names them too); readers import them from here.
from shared.job_meta import (  # noqa: F401 (re-exported)
    DEADLINE_EXPIRED,
    FAILED_BY_RQ,
    FAILED_BY_RQ_MESSAGE,
    JOB_TIMEOUT,
    META_ATTEMPTS,
    META_BATCH_ID,
    META_CRASHES,
    META_DEADLINE,
    META_ERROR,
    META_IMAGE_EXPIRES,
    META_OWNER,
    META_TIMINGS,
    WORKER_CRASHED,
)
from shared.keys import image_key, known_key
from shared.recorded_writes import RecordedWrites

JOB_FUNC = "worker.tasks.classify"
SERIALIZER = JSONSerializer

TERMINAL_STATUSES = frozenset({"finished", "failed", "canceled", "expired"})


# Priority lanes, highest first. Each lane is its own RQ queue: `high` is the base queue name (so RQ
# tools pointed at `QUEUE_NAME` see ordinary traffic), `low` is `<QUEUE_NAME>-low`. Workers listen
# on all lanes; `worker.batching` documents how they share a batch between lanes.
LANES = ("high", "low")
DEFAULT_LANE = "high"


def lane_queue_name(settings: Settings, lane: str) -> str:
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; lanes are {', '.join(LANES)}")
    return settings.queue_name if lane == "high" else f"{settings.queue_name}-{lane}"


def lane_queue_names(settings: Settings) -> list[str]:
    """All lanes' queue names, highest priority first: the order workers listen in."""
    return [lane_queue_name(settings, lane) for lane in LANES]


def make_queue(conn: Redis, settings: Settings, lane: str = DEFAULT_LANE) -> Queue:
    return Queue(lane_queue_name(settings, lane), connection=conn, serializer=SERIALIZER)


def result_payload(predictions: list[dict[str, Any]], model_info: Mapping[str, Any]) -> dict[str, Any]:
    """A finished job's RQ result: its predictions and the model (every field of the worker's
    `model_info`: at least `name` and `sha256`) that made them."""
    return {"predictions": predictions, "model": dict(model_info)}


def timings(
    queue_ms: float, preprocess_ms: float, inference_ms: float | None, batch_size: int | None
) -> dict[str, Any]:
    """`job.meta[META_TIMINGS]` of a job that a worker started (ms rounded to the microsecond).
    `inference_ms` and `batch_size` are its forward pass's: None for a job that had none (its image
    failed to decode or was gone, or it timed out before its pass ended)."""
    return {
        "queue_ms": round(queue_ms, 3),
        "preprocess_ms": round(preprocess_ms, 3),
        "inference_ms": None if inference_ms is None else round(inference_ms, 3),
        "batch_size": batch_size,
    }


def new_job_id() -> str:
    return str(uuid.uuid4())


def submit(
    queue: Queue,
    image: bytes,
    top_k: int,
    settings: Settings,
    meta: dict[str, Any] | None = None,
    *,
    job_id: str | None = None,
    writes: RecordedWrites | None = None,
    guard: tuple[str, str | None] | None = None,
) -> Job:
    """Store the image and enqueue its job in one round trip: one script
    (`shared.image_budget.reserve`) counts the image's bytes against MAX_QUEUED_BYTES and Redis'
    memory and, only if they fit, stores the image and its tombstone, makes RQ's enqueue writes
    (`shared.rq_enqueue`) and the caller's `writes` (the api's fairness counters, an idempotency
    claim); else it raises `QueuedBytesFull` or `RedisFull` with nothing stored. `guard`: see
    `reserve` (`GuardChanged`, nothing stored)."""
    ids = [job_id] if job_id is not None else None
    return submit_many(queue, [(image, top_k)], settings, meta, job_ids=ids, writes=writes, guard=guard)[0]


def submit_many(
    queue: Queue,
    items: Sequence[tuple[bytes, int]],
    settings: Settings,
    meta: dict[str, Any] | None = None,
    *,
    job_ids: Sequence[str] | None = None,
    writes: RecordedWrites | None = None,
    guard: tuple[str, str | None] | None = None,
) -> list[Job]:
    """`submit` for several `(image, top_k)` at once, in the same one script: either every job
    exists or none does (a batch upload is all-or-nothing). `job_ids`: theirs, when the caller
    needs them for its `writes`."""
    ids = list(job_ids) if job_ids is not None else [new_job_id() for _ in items]
    recorded = RecordedWrites()
    jobs = [
        _queue_job(queue, recorded, job_id, image, top_k, settings, meta)
        for job_id, (image, top_k) in zip(ids, items, strict=True)
    ]
    if writes is not None:
        recorded.extend(writes)
    sizes = [(job_id, len(image)) for job_id, (image, _) in zip(ids, items, strict=True)]
    image_budget.reserve(queue.connection, sizes, settings, recorded, made=jobs[0].key, guard=guard)
    return jobs


def image_lifetime(settings: Settings, meta: dict[str, Any] | None) -> int:
    """Seconds the image of a new job lives: IMAGE_TTL, or longer for a deadline beyond it (a job
    allowed to wait until its deadline must still have its image then)."""
    deadline = (meta or {}).get(META_DEADLINE)
    if isinstance(deadline, int | float):
        return max(settings.image_ttl, math.ceil(deadline - time.time()) + 1)
    return settings.image_ttl


def _queue_job(
    queue: Queue,
    writes: RecordedWrites | Pipeline,
    job_id: str,
    image: bytes,
    top_k: int,
    settings: Settings,
    meta: dict[str, Any] | None,
) -> Job:
    """The one enqueue code path: the image, its tombstone and RQ's enqueue, recorded on `writes`
    (or, on a pipeline already in MULTI, queued there: the same writes, without the budget)."""
    recorded = writes if isinstance(writes, RecordedWrites) else RecordedWrites()
    key = image_key(job_id)
    lifetime = image_lifetime(settings, meta)
    recorded.set(key, image, ex=lifetime)
    # The tombstone (410 after the job expired), owned like the job (another key must get 404).
    recorded.set(
        known_key(job_id),
        str((meta or {}).get(META_OWNER) or ""),
        ex=settings.known_job_ttl + lifetime - settings.image_ttl,
    )
    job_meta = dict(meta or {})  # a copy per job: batch jobs must not share one mutable dict
    job_meta[META_IMAGE_EXPIRES] = time.time() + lifetime
    job = rq_enqueue.enqueue(
        queue,
        recorded,
        JOB_FUNC,
        args=(key, top_k),
        job_id=job_id,
        timeout=max(60, int(settings.abandoned_after_seconds * 4)),
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        # No TTL on the queued job hash (rq_enqueue writes none): it must outlive its image, so that a
        # job whose image expired can still end `image_expired` for its owner (shared.image_budget)
        # instead of vanishing. It expires RESULT_TTL / FAILURE_TTL after it ends, as RQ does for
        # every ended job.
        description=f"classify top_k={top_k}",
        meta=job_meta,
        # Retries are spent only when a worker dies with the job (RQ's registry cleanup
        # requeues abandoned jobs while retries are left); a bad image fails at once.
        retry=Retry(max=settings.max_attempts - 1) if settings.max_attempts > 1 else None,
    )
    if recorded is not writes:
        for command in recorded.commands:
            writes.execute_command(*command)
    return job


def fetch(conn: Redis, job_id: str) -> Job | None:
    from rq.exceptions import NoSuchJobError

    try:
        return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return None
