"""How the api shows a job: its client status, its error and the body of `GET /v1/jobs/<id>`, read
from Redis in one round trip (`read_job`: the job hash and its latest RQ result together)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result

from shared.jobs import DEADLINE_EXPIRED, META_ERROR, META_TIMINGS, SERIALIZER

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
    # Every failure an inferq worker writes carries its code (a crash too: `shared.jobs.WORKER_CRASHED`);
    # one without it was failed by something else (a plain RQ worker running `worker.tasks.classify`
    # that raised, an operator's tool).
    return {"code": "internal_error", "message": "The job failed inside the worker."}


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


def read_job(conn: Redis, job_id: str) -> tuple[Job, Result | None] | None:
    """The job and its latest result in one pipelined round trip (RQ's public `Job.restore` and
    `Result.restore` rebuild them from the replies); None when the job does not exist."""
    with conn.pipeline(transaction=False) as pipe:
        pipe.hgetall(Job.key_for(job_id))
        pipe.xrevrange(Result.get_key(job_id), "+", "-", count=1)
        raw, latest = pipe.execute()
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
    return job, result
