"""The v1 job routes (contract: api/openapi.py): submit an image or a batch, read (long-poll), cancel.

Every route needs an API key when keys are configured (`api.auth`, a `before_request` of this
blueprint: nothing of the request, not even its body, is read first), and a job is visible to the key
that created it only: any other key gets the 404 of an unknown id. Submissions pass the per-key limits
and the queue bound (`api.fairness`, `api.capacity`) before their body is read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.job import Job

from api.auth import current_owner, enforce_api_key
from api.cancel import cancel
from api.capacity import check_capacity
from api.errors import ApiError
from api.fairness import Admitted, LongPollSlot, TooManyWaiters, client_key
from api.idempotency import claim_key, expired_job, submit_once
from api.job_view import JOB_READ_REPLIES, client_status, job_view, parse_job_read, queue_job_read, read_job
from api.metrics import note_enqueued
from api.prefer import SubmitWait, applied, drop_uploaded_files, preferred_wait
from api.state import ApiState, current_state
from api.validation import (
    Upload,
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
log = logging.getLogger(__name__)


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
    long_polls: bool = False,
) -> tuple[str, Admitted]:
    """Every limit a submission of `incoming` images passes, from its headers alone (the body is
    not read yet), in one round trip: the key's rate (counting `cost`, by default `incoming`), the
    queue bound, the key's share of it. Returns the client key and what that round trip read (the
    counts behind the bounds; the idempotency claim key `claim`'s value; with `long_polls`, a submit
    that prefers to wait, the key's long-poll leases).
    `queue_bounds=False` (idempotent submits): the bounds are checked only if a job is really
    enqueued, with the counts read here, since a replay adds nothing to the queue."""
    client = client_key()
    lanes = [queue.key for queue in state.queue_list]
    admitted = state.fairness.admit(
        client, incoming if cost is None else cost, lanes, claim, long_polls=long_polls
    )
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
    wait = preferred_wait(request, state.settings)
    claim = claim_key(idempotency_key, current_owner()) if idempotency_key is not None else None
    client, admitted = _admit(
        state, 1, queue_bounds=idempotency_key is None, claim=claim, long_polls=wait is not None
    )
    upload = read_job_upload(request, state.settings)
    queue = state.queues[lane]
    if wait is None:
        job_id, replayed = _enqueue(
            state, client, admitted, queue, upload, top_k, lane, deadline_ms, idempotency_key
        )
        body = _created(job_id)
        if replayed:
            job = fetch(state.redis, job_id)
            body["status"] = client_status(job) if job is not None else "queued"
        return jsonify(body), 202, {"Location": job_url(job_id)}
    # `Prefer: wait` (api.prefer): its waiters are registered and its lease recorded before the
    # store script runs, the lease among that script's writes.
    with _submit_wait(state, client, wait, admitted) as waiting:
        job_id, replayed = _enqueue(
            state, client, admitted, queue, upload, top_k, lane, deadline_ms, idempotency_key, waiting
        )
        del upload  # in Redis now: the wait holds no copy of the image
        drop_uploaded_files(request)
        if replayed:
            return _preferred_answer(job_id, _replay_after_wait(state, client, job_id, wait))
        return _preferred_answer(job_id, _after_wait(state, [job_id], waiting))


def _enqueue(
    state: ApiState,
    client: str,
    admitted: Admitted,
    queue: Queue,
    upload: Upload,
    top_k: int,
    lane: str,
    deadline_ms: int | None,
    idempotency_key: str | None,
    waiting: SubmitWait | None = None,
) -> tuple[str, bool]:
    """`(job_id, replayed)`: the job enqueued, or with an Idempotency-Key, its claim's job."""
    if idempotency_key is None:
        # One round trip (shared.jobs.submit): the byte budget, the image, RQ's job, the key's
        # pending count and a waiting submit's lease in one script, nothing stored when it refuses.
        job_id = new_job_id()
        writes = RecordedWrites()
        _record(state, client, writes, [job_id], waiting)
        submit(
            queue, upload.data, top_k, state.settings, _job_meta(deadline_ms), job_id=job_id, writes=writes
        )
        if waiting is not None:
            waiting.stored()
        note_enqueued([job_id], now=waiting is not None)
        return job_id, False
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
        record=lambda writes, new_id: _record(state, client, writes, [new_id], waiting),
    )
    if not replayed:
        if waiting is not None:
            waiting.stored()
        note_enqueued([job_id], now=waiting is not None)
    return job_id, replayed


def _record(
    state: ApiState, client: str, writes: RecordedWrites, job_ids: list[str], waiting: SubmitWait | None
) -> None:
    """The api's own writes in a new job's store script: the key's pending count and, for a submit
    that waits, its long-poll lease (its waiters registered first: an end cannot go unheard)."""
    state.fairness.note_pending(writes, client, job_ids)
    if waiting is not None:
        waiting.record(writes, job_ids)


def _submit_wait(state: ApiState, client: str, wait: int, admitted: Admitted) -> SubmitWait:
    slot = state.fairness.long_poll_slot(client, wait)
    return SubmitWait(state.listener, slot, wait, declined=state.fairness.declines_wait(admitted))


# The views of a submit's jobs after its wait (None: nothing known), and the wait it applied (None:
# declined).
_Waited = tuple[list[dict[str, Any] | None] | None, int | None]


def _after_wait(state: ApiState, job_ids: list[str], waiting: SubmitWait) -> _Waited:
    """New jobs' views once they have ended or the preferred wait has run out, and the wait applied;
    `(None, None)` when the preference was declined (the key holds LONG_POLLS_PER_KEY). A job whose
    end's message carried its view is not read back (`api.long_poll`)."""
    if waiting.declined:
        return None, None
    try:
        waiting.wait()
        views = waiting.views
        unread = [i for i, view in zip(job_ids, views, strict=True) if view is None]
        read = dict(zip(unread, _read_jobs(state, unread, waiting.slot), strict=True)) if unread else {}
        return [view if view is not None else read[i] for i, view in zip(job_ids, views, strict=True)], (
            waiting.seconds
        )
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # The jobs exist: their ids (a 202) serve the client better than a 503 after which it may
        # submit the images again.
        log.warning("could not read %d job(s) after their submit's wait: %s", len(job_ids), exc)
        return None, waiting.seconds


def _read_jobs(state: ApiState, job_ids: list[str], slot: LongPollSlot) -> list[dict[str, Any] | None]:
    """The views of the request's own new jobs (None: gone), read in the round trip that gives back
    its long-poll lease."""
    with state.redis.pipeline(transaction=False) as pipe:
        slot.queue_release(pipe)
        for job_id in job_ids:
            queue_job_read(pipe, job_id)
        replies = pipe.execute()[-JOB_READ_REPLIES * len(job_ids) :]
    views: list[dict[str, Any] | None] = []
    for i, job_id in enumerate(job_ids):
        found = parse_job_read(
            state.redis, job_id, replies[i * JOB_READ_REPLIES : (i + 1) * JOB_READ_REPLIES]
        )
        if found is None:
            views.append(None)
            continue
        job, result, image_present = found
        # As `_load_job`: a queued job whose image expired is ended by its read.
        job = end_if_image_expired(state.redis, job, state.settings, image_present=image_present)
        views.append(job_view(job, result))
    return views


def _replay_after_wait(state: ApiState, client: str, job_id: str, wait: int) -> _Waited:
    """`_after_wait` for an idempotent replay: its job already exists, so this is a long-poll."""
    slot = state.fairness.long_poll_slot(client, wait)
    try:
        return [_view_when_ended(state, job_id, slot, wait)], wait
    except TooManyWaiters:
        return [job_view(*_load_job(state, job_id))], None  # declined: the job as it is now
    finally:
        slot.release()


def _ended(view: dict[str, Any] | None) -> bool:
    return view is not None and view["status"] in TERMINAL_STATUSES


def _preferred_answer(job_id: str, waited: _Waited) -> tuple[Response, int, dict[str, str]]:
    """A submit with `Prefer: wait`: the ended job (200, as GET answers), else the 202 with its
    status now. `Preference-Applied` when the submit waited (or did not need to)."""
    views, wait = waited
    view = views[0] if views else None
    headers = {"Location": job_url(job_id), **(applied(wait) if wait is not None else {})}
    if view is not None and _ended(view):
        return jsonify(view), 200, headers
    return jsonify(_created(job_id, view["status"] if view else "queued")), 202, headers


@bp.post("/batches")
def create_batch() -> tuple[Response, int, dict[str, str]]:
    state = current_state()
    top_k = parse_top_k(request, state.settings)
    lane = parse_priority(request)
    deadline_ms = parse_deadline_ms(request, state.settings)
    wait = preferred_wait(request, state.settings)
    # The image count is only known from the body: the rate and shares are checked for one image
    # before it is read, and for all of them after (still before anything is enqueued).
    client, admitted = _admit(state, 1, long_polls=wait is not None)
    uploads = read_batch_uploads(request, state.settings)  # all validated: all-or-nothing
    if len(uploads) > 1:
        _admit(state, len(uploads), cost=len(uploads) - 1)
    job_ids = [new_job_id() for _ in uploads]
    items = [(u.data, top_k) for u in uploads]
    meta = _job_meta(deadline_ms)
    if wait is None:
        writes = RecordedWrites()
        _record(state, client, writes, job_ids, None)
        submit_many(state.queues[lane], items, state.settings, meta, job_ids=job_ids, writes=writes)
        note_enqueued(job_ids)
        return jsonify({"jobs": [_created(job_id) for job_id in job_ids]}), 202, {}
    # `Prefer: wait` (api.prefer): one lease for the request, a waiter per job.
    with _submit_wait(state, client, wait, admitted) as waiting:
        writes = RecordedWrites()
        _record(state, client, writes, job_ids, waiting)
        submit_many(state.queues[lane], items, state.settings, meta, job_ids=job_ids, writes=writes)
        waiting.stored()
        note_enqueued(job_ids, now=True)
        del uploads, items  # in Redis now: the wait holds no copy of the images
        drop_uploaded_files(request)
        views, applied_wait = _after_wait(state, job_ids, waiting)
    headers = applied(applied_wait) if applied_wait is not None else {}
    if views is not None and all(_ended(view) for view in views):
        return jsonify({"jobs": [view for view in views if view is not None]}), 200, headers
    statuses = [view["status"] if view else "queued" for view in views or [None] * len(job_ids)]
    return jsonify({"jobs": [_created(i, s) for i, s in zip(job_ids, statuses, strict=True)]}), 202, headers


# `<job_id>` matches one path segment: `/v1/jobs/<id>/cancel` is never read as a job whose id
# is `<id>/cancel`, so each path answers (and advertises in `Allow`) only its own methods.
@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    state = current_state()
    wait = parse_wait(request, state.settings)
    if wait <= 0:
        return job_view(*_load_job(state, job_id))
    slot = state.fairness.long_poll_slot(client_key(), wait)
    try:
        return _view_when_ended(state, job_id, slot, wait)
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


def _view_when_ended(state: ApiState, job_id: str, slot: LongPollSlot, wait: float) -> dict[str, Any]:
    """A long-poll: the job's view once it has ended, or as it is when `wait` runs out.
    TooManyWaiters when the key holds its LONG_POLLS_PER_KEY; the caller releases `slot` if no read
    gave it back."""
    # The waiter is registered BEFORE the job is read: an end published from now on wakes it, and
    # an end before now is in what is read (api.long_poll). It holds no Redis connection.
    with state.listener.waiter(job_id) as ended:
        job, result = _load_job(state, job_id, slot)  # 404 unless the key owns the job
        if client_status(job) in TERMINAL_STATUSES or not ended.wait(wait):
            return job_view(job, result)
        if ended.view is not None:
            return ended.view  # the end's own view: no read back (api.long_poll)
    return job_view(*_load_job(state, job_id, slot))


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
