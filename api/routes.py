"""The v1 job routes (DESIGN 2): submit one image or a batch, read (long-poll) and cancel a job."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from redis import Redis
from rq.job import Job

from api.errors import ApiError
from api.idempotency import submit_once
from api.state import ApiState, current_state
from api.validation import parse_idempotency_key, parse_top_k, parse_wait, read_batch_uploads, read_job_upload
from shared.jobs import (
    TERMINAL_STATUSES,
    cancel,
    client_status,
    fetch,
    job_view,
    submit,
    submit_many,
    wait_for_end,
)
from shared.keys import is_job_id

bp = Blueprint("v1", __name__, url_prefix="/v1")


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def _created(job_id: str, status: str = "queued") -> dict[str, str]:
    return {"id": job_id, "status": status, "url": job_url(job_id)}


def _ensure_capacity(state: ApiState, conn: Redis, incoming: int) -> None:
    """429 when the queue already holds MAX_QUEUE_DEPTH jobs: shed load at the door rather than
    accept work that would expire (or time out its clients) before a worker reaches it.
    A soft bound: concurrent submitters may overshoot it by a few jobs."""
    limit = state.settings.max_queue_depth
    if not limit:
        return
    depth = int(conn.llen(state.queue.key))
    if depth + incoming > limit:
        retry_after = state.settings.queue_full_retry_after
        raise ApiError(
            f"the queue is full ({depth} jobs waiting, limit {limit}); retry in {retry_after} s",
            code="queue_full",
            http_status=429,
            headers={"Retry-After": str(retry_after)},
        )


def _load_job(state: ApiState, job_id: str) -> Job:
    # Only server-generated ids reach Redis: anything else cannot name a job, and client text
    # never becomes part of a key.
    job = fetch(state.redis, job_id) if is_job_id(job_id) else None
    if job is None:
        raise ApiError(f"no job with id {job_id[:64]!r}", code="job_not_found", http_status=404)
    return job


@bp.post("/jobs")
def create_job() -> tuple[Response, int, dict[str, str]]:
    state = current_state()
    top_k = parse_top_k(request, state.settings)
    idempotency_key = parse_idempotency_key(request)
    upload = read_job_upload(request, state.settings)
    if idempotency_key is None:
        _ensure_capacity(state, state.redis, 1)
        job_id = submit(state.queue, upload.data, top_k, state.settings).id
        body = _created(job_id)
    else:
        job_id, replayed = submit_once(
            state.queue,
            idempotency_key,
            upload.data,
            top_k,
            state.settings,
            before_enqueue=lambda pipe: _ensure_capacity(state, pipe, 1),
        )
        body = _created(job_id)
        if replayed:
            job = fetch(state.redis, job_id)
            body["status"] = client_status(job) if job is not None else "queued"
    return jsonify(body), 202, {"Location": job_url(job_id)}


@bp.post("/batches")
def create_batch() -> tuple[Response, int]:
    state = current_state()
    top_k = parse_top_k(request, state.settings)
    uploads = read_batch_uploads(request, state.settings)  # all validated: all-or-nothing
    _ensure_capacity(state, state.redis, len(uploads))
    jobs = submit_many(state.queue, [(u.data, top_k) for u in uploads], state.settings)
    return jsonify({"jobs": [_created(job.id) for job in jobs]}), 202


@bp.get("/jobs/<path:job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    state = current_state()
    wait = parse_wait(request, state.settings)
    job = _load_job(state, job_id)
    if wait > 0 and client_status(job) not in TERMINAL_STATUSES:
        # Blocks on the job's result and cancel streams (XREAD BLOCK): no polling loop, and it
        # returns as soon as the job ends, whichever worker or api process ended it.
        wait_for_end(state.redis_blocking, job.id, wait)
        job = _load_job(state, job_id)
    return job_view(job)


@bp.delete("/jobs/<path:job_id>")
def delete_job(job_id: str) -> dict[str, Any]:
    state = current_state()
    job = _load_job(state, job_id)
    if not cancel(state.redis, job, state.settings):
        status = client_status(job)
        raise ApiError(
            f"job {job.id} is {status if status != 'queued' else 'already taken by a worker'}; "
            "only a queued job can be canceled",
            code="job_not_cancelable",
            http_status=409,
        )
    return job_view(job)
