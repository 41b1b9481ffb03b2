"""The v1 job routes (contract: api/openapi.py): submit an image or a batch, read (long-poll), cancel.

Every route needs an API key when keys are configured (`api.auth`, a `before_request` of this
blueprint: nothing of the request, not even its body, is read first), and a job is visible to the key
that created it only: any other key gets the 404 of an unknown id. Submissions pass the per-key limits
and the queue bound (`api.fairness`, `api.capacity`) before their body is read.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from rq.job import Job

from api.auth import current_owner, enforce_api_key
from api.cancel import cancel
from api.capacity import check_capacity
from api.errors import ApiError
from api.fairness import Admitted, LongPollSlot, TooManyWaiters, client_key
from api.idempotency import claim_key, expired_job, submit_once
from api.job_view import JOB_READ_REPLIES, client_status, job_view, parse_job_read, queue_job_read, read_job
from api.metrics import note_enqueued
from api.state import ApiState, current_state
from api.validation import (
    parse_deadline_ms,
    parse_idempotency_key,
    parse_priority,
    parse_top_k,
    parse_wait,
    read_batch_uploads,
    read_job_upload,
)
from shared.image_budget import end_if_image_expired
from shared.jobs import META_DEADLINE, META_OWNER, TERMINAL_STATUSES, fetch, new_job_id, submit, submit_many
from shared.keys import is_job_id, known_key
from shared.recorded_writes import RecordedWrites

bp = Blueprint("v1", __name__, url_prefix="/v1")
bp.before_request(enforce_api_key)


def job_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def _created(job_id: str, status: str = "queued") -> dict[str, str]:
    return {"id": job_id, "status": status, "url": job_url(job_id)}


def _admit(
    state: ApiState,
    incoming: int,
    *,
    queue_bounds: bool = True,
    cost: int | None = None,
    claim: str | None = None,
) -> tuple[str, Admitted]:
    """Every limit a submission of `incoming` images passes, from its headers alone (the body is
    not read yet), in one round trip: the key's rate (counting `cost`, by default `incoming`), the
    queue bound, the key's share of it. Returns the client key and what that round trip read (the
    counts behind the bounds; the idempotency claim key `claim`'s value).
    `queue_bounds=False` (idempotent submits): the bounds are checked only if a job is really
    enqueued, with the counts read here, since a replay adds nothing to the queue."""
    client = client_key()
    lanes = [queue.key for queue in state.queue_list]
    admitted = state.fairness.admit(client, incoming if cost is None else cost, lanes, claim)
    if queue_bounds:
        _check_queue_bounds(state, client, incoming, admitted)
    return client, admitted


def _check_queue_bounds(state: ApiState, client: str, incoming: int, admitted: Admitted) -> None:
    if not state.settings.max_queue_depth:
        return  # unbounded: no share of it either
    # The key's own share first: when it is over it, that is the more useful refusal.
    state.fairness.check_queue_share(client, incoming, state.queue_list, waiting=admitted.waiting)
    _ensure_capacity(state, incoming, waiting=admitted.backlog)


def _ensure_capacity(state: ApiState, incoming: int, waiting: int | None = None) -> None:
    """429 when the lanes' backlog would exceed MAX_QUEUE_DEPTH: shed load at the door rather than
    accept work that would expire (or time out its clients) before a worker reaches it. Only
    submissions are refused: reads, long-polls and cancels keep working. `Retry-After` is computed
    from the backlog and the measured completion rate (api.capacity)."""
    full = check_capacity(state.redis, state.queue_list, state.settings, incoming, waiting)
    if full is None:
        return
    pace = f"{full.rate:.2f} jobs/s" if full.rate > 0 else "no job ended recently"
    raise ApiError(
        f"the queue is full ({full.waiting} jobs waiting, limit {full.limit}; {pace}); "
        f"retry in {full.retry_after} s",
        code="queue_full",
        http_status=429,
        headers={"Retry-After": str(full.retry_after)},
    )


def _job_meta(deadline_ms: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    owner = current_owner()
    if owner is not None:
        meta[META_OWNER] = owner
    if deadline_ms is not None:
        # Counted from now (the enqueue), in epoch seconds: the worker compares it with its clock.
        meta[META_DEADLINE] = time.time() + deadline_ms / 1000
    return meta


def _visible(recorded_owner: Any) -> bool:
    owner = current_owner()
    return owner is None or recorded_owner == owner


def _not_found(job_id: str) -> ApiError:
    return ApiError(f"no job with id {job_id[:64]!r}", code="job_not_found", http_status=404)


def _load_job(state: ApiState, job_id: str, slot: LongPollSlot | None = None) -> tuple[Job, Any]:
    """The job and its latest result (one round trip), or the 404/410 its id deserves.

    `slot`: a long-poll's lease, taken in its first read's round trip (if the job has not ended),
    given back in its last read's."""
    # Only server-generated ids reach Redis: anything else cannot name a job, and client text
    # never becomes part of a key.
    if not is_job_id(job_id):
        raise _not_found(job_id)
    if slot is None:
        found = read_job(state.redis, job_id)
    elif not slot.first_read_done:
        found = parse_job_read(state.redis, job_id, slot.first_read(job_id))
    else:
        with state.redis.pipeline(transaction=False) as pipe:
            slot.queue_release(pipe)
            queue_job_read(pipe, job_id)
            found = parse_job_read(state.redis, job_id, pipe.execute()[-JOB_READ_REPLIES:])
    if found is None:
        # Expired (its tombstone outlives it by EXPIRED_GRACE_SECONDS): 410, to its owner only.
        tombstone = state.redis.get(known_key(job_id))
        if tombstone is not None and _visible(tombstone.decode()):
            raise expired_job(job_id)
        raise _not_found(job_id)
    job, result, image_present = found
    if not _visible(job.meta.get(META_OWNER)):
        raise _not_found(job_id)
    # A queued job whose image expired is ended here rather than read as queued (shared.image_budget);
    # a queued job has no result, so `job_view` reads the one its end just wrote.
    return end_if_image_expired(state.redis, job, state.settings, image_present=image_present), result


@bp.post("/jobs")
def create_job() -> tuple[Response, int, dict[str, str]]:
    state = current_state()
    top_k = parse_top_k(request, state.settings)
    lane = parse_priority(request)
    deadline_ms = parse_deadline_ms(request, state.settings)
    idempotency_key = parse_idempotency_key(request)
    claim = claim_key(idempotency_key, current_owner()) if idempotency_key is not None else None
    client, admitted = _admit(state, 1, queue_bounds=idempotency_key is None, claim=claim)
    upload = read_job_upload(request, state.settings)
    queue = state.queues[lane]
    if idempotency_key is None:
        # One round trip (shared.jobs.submit): the byte budget, the image, RQ's job and the key's
        # pending count in one script, nothing stored when it refuses.
        job_id = new_job_id()
        writes = RecordedWrites()
        state.fairness.note_pending(writes, client, [job_id])
        submit(
            queue, upload.data, top_k, state.settings, _job_meta(deadline_ms), job_id=job_id, writes=writes
        )
        note_enqueued([job_id])
        body = _created(job_id)
    else:
        job_id, replayed = submit_once(
            queue,
            idempotency_key,
            upload.data,
            top_k,
            state.settings,
            owner=current_owner(),
            params={"priority": lane, "deadline_ms": deadline_ms},
            make_meta=lambda: _job_meta(deadline_ms),
            before_enqueue=lambda: _check_queue_bounds(state, client, 1, admitted),
            claimed=admitted.claim,
            record=lambda writes, new_id: state.fairness.note_pending(writes, client, [new_id]),
        )
        body = _created(job_id)
        if replayed:
            job = fetch(state.redis, job_id)
            body["status"] = client_status(job) if job is not None else "queued"
        else:
            note_enqueued([job_id])
    return jsonify(body), 202, {"Location": job_url(job_id)}


@bp.post("/batches")
def create_batch() -> tuple[Response, int]:
    state = current_state()
    top_k = parse_top_k(request, state.settings)
    lane = parse_priority(request)
    deadline_ms = parse_deadline_ms(request, state.settings)
    # The image count is only known from the body: the rate and shares are checked for one image
    # before it is read, and for all of them after (still before anything is enqueued).
    client, _ = _admit(state, 1)
    uploads = read_batch_uploads(request, state.settings)  # all validated: all-or-nothing
    if len(uploads) > 1:
        _admit(state, len(uploads), cost=len(uploads) - 1)
    job_ids = [new_job_id() for _ in uploads]
    writes = RecordedWrites()
    state.fairness.note_pending(writes, client, job_ids)
    submit_many(
        state.queues[lane],
        [(u.data, top_k) for u in uploads],
        state.settings,
        _job_meta(deadline_ms),
        job_ids=job_ids,
        writes=writes,
    )
    note_enqueued(job_ids)
    return jsonify({"jobs": [_created(job_id) for job_id in job_ids]}), 202


# `<job_id>` matches one path segment: `/v1/jobs/<id>/cancel` is never read as a job whose id
# is `<id>/cancel`, so each path answers (and advertises in `Allow`) only its own methods.
@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    state = current_state()
    wait = parse_wait(request, state.settings)
    if wait <= 0:
        return job_view(*_load_job(state, job_id))
    slot = state.fairness.long_poll_slot(client_key(), wait)
    # The waiter is registered BEFORE the job is read: an end published from now on wakes it, and
    # an end before now is in what is read (api.long_poll). It holds no Redis connection.
    try:
        with state.listener.waiter(job_id) as ended:
            job, result = _load_job(state, job_id, slot)
            if client_status(job) in TERMINAL_STATUSES or not ended.wait(wait):
                return job_view(job, result)
        return job_view(*_load_job(state, job_id, slot))
    except TooManyWaiters:
        limit = state.settings.long_polls_per_key
        raise ApiError(
            f"this key already holds {limit} long-polls; retry without `wait` or later",
            code="long_poll_limit",
            http_status=429,
            headers={"Retry-After": "1"},
        ) from None
    finally:
        slot.release()  # when no read gave it back (a 404, an early answer, an error)


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str) -> dict[str, Any]:
    """No `DELETE /v1/jobs/<id>` (the alias older clients used is gone): a DELETE says the job is
    removed, and a canceled job stays readable (405, whose message names this route)."""
    state = current_state()
    job, _ = _load_job(state, job_id)
    if not cancel(state.redis, job):
        status = client_status(job)
        raise ApiError(
            f"job {job.id} is {status if status != 'queued' else 'already taken by a worker'}; "
            "only a queued job can be canceled",
            code="job_not_cancelable",
            http_status=409,
        )
    return job_view(job)
