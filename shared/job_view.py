"""The body of `GET /v1/jobs/<id>` built from a job in memory: the api builds it from what it reads,
and whoever ends a job (a worker, the api's cancel) builds the same body where it writes the end, so
that the end's message (`shared.ended`) can carry the answer of the long-polls waiting for it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rq.job import Job, JobStatus

from shared.jobs import DEADLINE_EXPIRED, FAILED_BY_RQ, FAILED_BY_RQ_MESSAGE, META_ERROR, META_TIMINGS

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


def job_error(job: Job, status: str) -> dict[str, str] | None:
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


def view_of(job: Job, returned: Any = None) -> dict[str, Any]:
    """The body of `GET /v1/jobs/<id>` for `job` as it is in memory; `returned`: its successful
    result's return value (shown only when the job finished)."""
    status = client_status(job)
    timings = job.meta.get(META_TIMINGS) or {}
    return {
        "id": job.id,
        "status": status,
        "result": returned if status == "finished" else None,
        "error": job_error(job, status),
        "created_at": _iso(job.enqueued_at or job.created_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "timings": {
            "queue_ms": timings.get("queue_ms"),
            "inference_ms": timings.get("inference_ms"),
            "batch_size": timings.get("batch_size"),
        },
    }
