"""Jobs as the api creates them and as every reader (api, tests, CLI) sees them.

One inferq job is one ordinary RQ job: function `worker.tasks.classify`, args `(image_key, top_k)`,
serialized with RQ's JSONSerializer. The image bytes live in their own key (`shared.keys.image_key`)
so nothing the client sent is ever pickled or compressed into the job hash. The worker writes:
- on success, the RQ result (`job.return_value()`): `{"predictions": [...], "model": {"name", "sha256"}}`;
- in both cases, `job.meta["timings"]`: `{"queue_ms", "preprocess_ms", "inference_ms", "batch_size"}`;
- on failure, `job.meta["error"]`: `{"code", "message"}` (a crash found by RQ's registry cleanup has
  no such entry and is reported as `worker_crashed`); a job whose `deadline_at` passed before it
  started fails with code `deadline_expired`, which clients see as status `expired`.
The api also sets `inferq:known:<id>` (`shared.keys.known_key`) in the enqueue transaction: a
tombstone that outlives the job, so an expired job reads 410 rather than 404.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from shared.config import Settings
from shared.keys import cancel_stream_key, image_key, known_key

JOB_FUNC = "worker.tasks.classify"
SERIALIZER = JSONSerializer

# RQ statuses a client never needs to tell apart: a job waiting for a retry is still queued.
_STATUS_FOR_CLIENT = {
    JobStatus.QUEUED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued",
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "failed",
    JobStatus.CANCELED: "canceled",
}
# A failed job whose error is this code never started: its deadline passed first (client status `expired`).
DEADLINE_EXPIRED = "deadline_expired"
TERMINAL_STATUSES = frozenset({"finished", "failed", "canceled", "expired"})


# Priority lanes, highest first. Each lane is its own RQ queue: `high` is the base queue name (so RQ
# tools pointed at `QUEUE_NAME` see ordinary traffic), `low` is `<QUEUE_NAME>-low`. Workers listen
# on all lanes; `worker.batching` documents how they share a batch between lanes.
LANES = ("high", "low")
DEFAULT_LANE = "high"
# Keys of `job.meta` the api sets and the worker reads.
META_DEADLINE = "deadline_at"  # epoch seconds after which a job that has not started ends `expired`
META_OWNER = "owner"  # id of the API key that created the job (its hash), when keys are enabled
# Keys of `job.meta` the worker writes and the api reads.
META_ATTEMPTS = "attempts"  # how many times a worker started the job (crash accounting)
META_TIMINGS = "timings"  # {"queue_ms", "preprocess_ms", "inference_ms", "batch_size"}
META_BATCH_ID = "batch_id"  # the batch the job ran in (also in the worker's log lines)
META_ERROR = "error"  # {"code", "message"} of a failed job


def lane_queue_name(settings: Settings, lane: str) -> str:
    if lane not in LANES:
        raise ValueError(f"unknown lane {lane!r}; lanes are {', '.join(LANES)}")
    return settings.queue_name if lane == "high" else f"{settings.queue_name}-{lane}"


def make_queue(conn: Redis, settings: Settings, lane: str = DEFAULT_LANE) -> Queue:
    return Queue(lane_queue_name(settings, lane), connection=conn, serializer=SERIALIZER)


def make_lane_queues(conn: Redis, settings: Settings) -> list[Queue]:
    """All lanes' queues, highest priority first (the order workers listen in)."""
    return [make_queue(conn, settings, lane) for lane in LANES]


def new_job_id() -> str:
    return str(uuid.uuid4())


def submit(
    queue: Queue,
    image: bytes,
    top_k: int,
    settings: Settings,
    meta: dict[str, Any] | None = None,
    *,
    pipeline: Pipeline | None = None,
) -> Job:
    """Store the image and enqueue its job in one round trip (one MULTI/EXEC pipeline).

    With `pipeline` (already in MULTI mode, e.g. after a WATCH), the commands are only queued on it
    and the caller executes it: that is how the api makes an idempotency claim atomic with the enqueue.
    """
    if pipeline is not None:
        return _queue_job(queue, pipeline, image, top_k, settings, meta)
    with queue.connection.pipeline() as pipe:
        # MULTI before the first command: RQ's enqueue calls `pipe.multi()` itself unless the
        # transaction is explicit, and redis-py refuses MULTI once a command (our SET) is queued.
        pipe.multi()
        job = _queue_job(queue, pipe, image, top_k, settings, meta)
        pipe.execute()
    return job


def submit_many(
    queue: Queue, items: Sequence[tuple[bytes, int]], settings: Settings, meta: dict[str, Any] | None = None
) -> list[Job]:
    """`submit` for several `(image, top_k)` at once: all stored and enqueued in ONE transaction,
    so either every job exists or none does (a batch upload is all-or-nothing)."""
    with queue.connection.pipeline() as pipe:
        pipe.multi()
        jobs = [_queue_job(queue, pipe, image, top_k, settings, meta) for image, top_k in items]
        pipe.execute()
    return jobs


def _queue_job(
    queue: Queue, pipe: Pipeline, image: bytes, top_k: int, settings: Settings, meta: dict[str, Any] | None
) -> Job:
    """The one enqueue code path: queue `SET image` + RQ's enqueue commands on `pipe` (not executed)."""
    job_id = new_job_id()
    key = image_key(job_id)
    pipe.set(key, image, ex=settings.image_ttl)
    # The tombstone (410 after the job expired), owned like the job (another key must get 404).
    pipe.set(known_key(job_id), str((meta or {}).get(META_OWNER) or ""), ex=settings.known_job_ttl)
    return queue.enqueue_call(
        JOB_FUNC,
        args=(key, top_k),
        job_id=job_id,
        timeout=max(60, int(settings.abandoned_after_seconds * 4)),
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl,
        ttl=settings.image_ttl,
        description=f"classify top_k={top_k}",
        # A copy per job: RQ keeps a reference, and batch jobs must not share one mutable dict.
        meta=dict(meta or {}),
        # Retries are spent only when a worker dies with the job (RQ's registry cleanup
        # requeues abandoned jobs while retries are left); a bad image fails at once.
        retry=Retry(max=settings.max_attempts - 1) if settings.max_attempts > 1 else None,
        pipeline=pipe,
    )


def fetch(conn: Redis, job_id: str) -> Job | None:
    from rq.exceptions import NoSuchJobError

    try:
        return Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
    except NoSuchJobError:
        return None


def client_status(job: Job) -> str:
    status = job.get_status(refresh=False)
    if status is None:
        return "queued"
    if status == JobStatus.FAILED and _error_code(job) == DEADLINE_EXPIRED:
        return "expired"
    return _STATUS_FOR_CLIENT.get(status, "queued")


def _error_code(job: Job) -> str | None:
    error = job.meta.get(META_ERROR)
    return str(error["code"]) if isinstance(error, dict) and "code" in error else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def job_error(job: Job, status: str, result: Result | None) -> dict[str, str] | None:
    if status == "canceled":
        return {"code": "canceled", "message": "The job was canceled before it started."}
    if status not in ("failed", "expired"):
        return None
    error = job.meta.get(META_ERROR)
    if isinstance(error, dict) and "code" in error:
        return {"code": str(error["code"]), "message": str(error.get("message", ""))}
    exc = (result.exc_string if result is not None else None) or job.exc_info or ""
    if "AbandonedJobError" in exc or "stuck in intermediate queue" in exc:
        return {
            "code": "worker_crashed",
            "message": "The worker processing this job died and the job ran out of attempts.",
        }
    return {"code": "internal_error", "message": "The job failed inside the worker."}


def job_view(job: Job, result: Result | None = None) -> dict[str, Any]:
    """The body of `GET /v1/jobs/<id>` (the contract: api/openapi.py)."""
    status = client_status(job)
    if result is None and status in ("finished", "failed", "expired"):
        result = job.latest_result()
    payload = None
    if status == "finished" and result is not None and result.type == Result.Type.SUCCESSFUL:
        payload = result.return_value
    timings = job.meta.get(META_TIMINGS) or {}
    return {
        "id": job.id,
        "status": status,
        "result": payload,
        "error": job_error(job, status, result),
        "created_at": _iso(job.enqueued_at or job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "timings": {
            "queue_ms": timings.get("queue_ms"),
            "inference_ms": timings.get("inference_ms"),
            "batch_size": timings.get("batch_size"),
        },
    }


def wait_for_end(conn: Redis, job_id: str, timeout: float) -> None:
    """Block until the job has a result or is canceled, or `timeout` passes.

    RQ appends every final result to the stream `rq:results:<id>`; a cancel appends to inferq's
    cancel stream. XREAD from the stream start returns at once if either already has an entry, so
    there is no window between checking the status and starting to wait.

    Use a blocking connection (`shared.redis_conn.with_options`). On any other, the wait is cut into
    blocks shorter than its socket_timeout: a block longer than that would raise TimeoutError and
    redis-py would retry it, so the wait would never end in a reply.
    """
    if timeout <= 0:
        return
    streams = {Result.get_key(job_id): "0-0", cancel_stream_key(job_id): "0-0"}
    socket_timeout = conn.connection_pool.connection_kwargs.get("socket_timeout")
    step = timeout if not socket_timeout else max(0.05, min(socket_timeout - 1.0, socket_timeout * 0.75))
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if conn.xread(streams, count=1, block=max(1, int(min(remaining, step) * 1000))):
            return


def cancel(conn: Redis, job: Job, settings: Settings) -> bool:
    """Cancel a queued job; False when it already started or ended. Wakes long-polls on it.

    The status alone cannot decide it: a worker takes a job by moving its id out of the queue list
    (BLMOVE/LMOVE) BEFORE marking it started, so a job may read "queued" while a worker holds it.
    Removing the id from the queue list is the atomic claim: LREM returns 1 only if no worker has
    taken it (and then none can); 0 means a worker won the race, so the job is not cancelable.
    """
    status = job.get_status(refresh=True)
    if status == JobStatus.QUEUED:
        if not conn.lrem(Queue(job.origin, connection=conn, serializer=SERIALIZER).key, 1, job.id):
            return False
    elif status not in (JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED):
        # Started, or ended. (Deferred/scheduled jobs sit in a registry no worker reads from.)
        return False
    # If this process dies right here the job is in no list and its hash expires with its ttl:
    # it can no longer run, which is what the client asked for.
    with conn.pipeline() as pipe:
        job.cancel(pipeline=pipe)
        pipe.delete(image_key(job.id))
        pipe.xadd(cancel_stream_key(job.id), {"canceled": "1"}, maxlen=1)
        pipe.expire(cancel_stream_key(job.id), settings.result_ttl)
        pipe.execute()
    # RQ's cancel re-reads the status from Redis while its writes are still queued in the pipeline,
    # leaving `job` saying "queued": re-read it so callers (the api's response) see "canceled".
    job.get_status(refresh=True)
    return True
