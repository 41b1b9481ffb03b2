"""`Idempotency-Key` on `POST /v1/jobs`: a retried submission returns the job the first one made.

- Scope: per API key. The claim key is `inferq:idem:<sha256(owner id, Idempotency-Key)>`: hashed
  (the header is client text and never shapes a Redis key), and two keys' clients using the same
  header value never see each other's jobs.
- Lifetime: the claim lives as long as the job id is remembered (`Settings.known_job_ttl`: the job's
  longest life plus EXPIRED_GRACE_SECONDS). While the job exists (queued, running, or ended and its
  result still kept) a replay returns it; once the job itself has expired, a replay answers 410
  `job_expired` like a GET does. Never a second job for one claim.
- Same key, different request (other image bytes, top_k, priority or deadline_ms): 409
  `idempotency_key_reused`.
- The claim and the enqueue are one script (the submit's, `shared.jobs.submit`, guarded by the claim's
  value as read: claim + image + tombstone + job, or nothing if the claim changed meanwhile), so two
  concurrent requests with one key can never both enqueue, and a client can never be handed an id
  whose job does not exist yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from rq import Queue
from rq.job import Job

from api.errors import ApiError
from shared.config import Settings
from shared.image_budget import GuardChanged
from shared.jobs import new_job_id, submit
from shared.keys import PREFIX, known_key
from shared.recorded_writes import RecordedWrites

# Conflicting writers retry at once; a handful of rounds is plenty for one key.
_MAX_ROUNDS = 8
_ANONYMOUS = "-"  # the scope when API keys are disabled


def claim_key(idempotency_key: str, owner: str | None = None) -> str:
    scope = f"{owner or _ANONYMOUS}\0{idempotency_key}"
    return f"{PREFIX}idem:{hashlib.sha256(scope.encode()).hexdigest()}"


def fingerprint(image: bytes, params: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(image)
    digest.update(b"\0" + json.dumps(dict(params), sort_keys=True).encode())
    return digest.hexdigest()


def expired_job(job_id: str) -> ApiError:
    return ApiError(
        f"job {job_id} has expired: its result is no longer kept",
        code="job_expired",
        http_status=410,
        extra={"id": job_id},
    )


# `submit_once(claimed=...)` when the caller has not read the claim.
NOT_READ: Any = object()


def submit_once(
    queue: Queue,
    idempotency_key: str,
    image: bytes,
    top_k: int,
    settings: Settings,
    *,
    owner: str | None,
    params: Mapping[str, Any],
    make_meta: Callable[[], dict[str, Any]],
    before_enqueue: Callable[[], None],
    claimed: bytes | None = NOT_READ,
    record: Callable[[RecordedWrites, str], None] | None = None,
) -> tuple[str, bool]:
    """`(job_id, replayed)`.

    `params` are the request's other parameters (they must match on a replay); `make_meta` builds
    the new job's meta (called only when a job is made: its deadline counts from then).
    `before_enqueue` runs only when a new job is about to be made (the queue-capacity check: a
    replay must succeed even when the queue is full). `claimed`: the claim key's value as the caller
    read it (the api, in its admission round trip), else it is read here. `record(writes, job_id)`
    adds the caller's writes to a new job's submit script (the api's fairness counters)."""
    key = claim_key(idempotency_key, owner)
    mark = fingerprint(image, {"top_k": top_k, **params})
    current = queue.connection.get(key) if claimed is NOT_READ else claimed
    for _ in range(_MAX_ROUNDS):
        if current is not None:
            job_id, _, claimed_mark = current.decode().partition(" ")
            if claimed_mark != mark:
                raise ApiError(
                    "this Idempotency-Key was already used for a different request (image, top_k, "
                    "priority or deadline_ms); use a new key for a new request",
                    code="idempotency_key_reused",
                    http_status=409,
                )
            with queue.connection.pipeline(transaction=False) as pipe:
                pipe.exists(Job.key_for(job_id))
                pipe.exists(known_key(job_id))
                job_here, known_here = pipe.execute()
            if job_here:
                return job_id, True
            if known_here:
                raise expired_job(job_id)
            # Both the job and its tombstone are gone (deleted by hand): a new job replaces the claim.
        before_enqueue()
        job_id = new_job_id()
        writes = RecordedWrites()
        writes.set(key, f"{job_id} {mark}", ex=settings.known_job_ttl)
        if record is not None:
            record(writes, job_id)
        try:
            # The claim and the job in one script, only if the claim is still what was read: of
            # concurrent requests with one key, exactly one makes the job; the others replay it.
            submit(
                queue,
                image,
                top_k,
                settings,
                make_meta(),
                job_id=job_id,
                writes=writes,
                guard=(key, current.decode() if current is not None else None),
            )
        except GuardChanged as changed:
            current = changed.current
            continue
        return job_id, False
    raise ApiError(
        "too many concurrent requests with this Idempotency-Key; retry",
        code="idempotency_conflict",
        http_status=409,
    )
