"""How the api shows a job: its client status, its error and the body of `GET /v1/jobs/<id>`, read
from Redis in one round trip (`read_job`: the job hash, its latest RQ result and whether its image
is still there, together; `queue_job_read` puts the same reads on a caller's pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from redis import Redis
from redis.client import Pipeline
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from shared.jobs import (
    DEADLINE_EXPIRED,
    FAILED_BY_RQ,
    FAILED_BY_RQ_MESSAGE,
    META_ERROR,
    META_TIMINGS,
    SERIALIZER,
)
from shared.keys import image_key

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
    # Every failure inferq writes carries its code (a crash too: `shared.jobs.WORKER_CRASHED`); one
    # without it was failed by RQ itself, until the workers' maintenance writes it this same code
    # (`worker.failed_elsewhere`).
    return {"code": FAILED_BY_RQ, "message": FAILED_BY_RQ_MESSAGE}


def job_view(job: Job, result: Result | None = None) -> dict[str, Any]:
    """The body of `GET /v1/jobs/<id>`; `result` is the job's latest result when the caller has it."""
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


class JobRead(NamedTuple):
    job: Job
    result: Result | None  # its latest RQ result
    image_present: bool  # its image is in Redis (a queued job without it lost it: shared.image_budget)


# Replies `queue_job_read` adds to a pipeline.
JOB_READ_REPLIES = 3


def queue_job_read(pipe: Pipeline, job_id: str) -> None:
    """Queue the reads of one job on `pipe`: its hash, its latest result, whether its image exists."""
    pipe.hgetall(Job.key_for(job_id))
    pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
    pipe.exists(image_key(job_id))


def parse_job_read(conn: Redis, job_id: str, replies: Sequence[Any]) -> JobRead | None:
    """The job of `queue_job_read`'s replies (RQ's public `Job.restore` and `Result.restore` rebuild
    it); None when the job does not exist."""
    raw, latest, image_present = replies
    if not raw:
        return None
    job = Job(job_id, connection=conn, serializer=SERIALIZER)
    try:
        job.restore(raw)
    except NoSuchJobError:
        return None
    result = None
    if latest:
        result_id, payload = latest[0]
        result = Result.restore(job_id, result_id.decode(), payload, connection=conn, serializer=SERIALIZER)
    return JobRead(job, result, bool(image_present))


def read_job(conn: Redis, job_id: str) -> JobRead | None:
    """The job, its latest result and whether its image exists, in one pipelined round trip; None
    when the job does not exist."""
    with conn.pipeline(transaction=False) as pipe:
        queue_job_read(pipe, job_id)
        return parse_job_read(conn, job_id, pipe.execute())
