"""`Idempotency-Key` on `POST /v1/jobs`: a retried submission returns the job the first one made.

The claim and the enqueue are one transaction (WATCH the claim key, then MULTI: claim + image +
job, EXEC), so two concurrent requests with one key can never both enqueue, and a client can never
be handed an id whose job does not exist yet. The claim lives in Redis (the api is stateless).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job

from api.errors import ApiError
from shared.config import Settings
from shared.jobs import submit
from shared.keys import PREFIX

# Conflicting writers retry at once; a handful of rounds is plenty for one key.
_MAX_ROUNDS = 8


def claim_key(idempotency_key: str) -> str:
    # Hashed: the header is client text and must not shape a Redis key.
    return f"{PREFIX}idem:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


def fingerprint(image: bytes, top_k: int) -> str:
    return hashlib.sha256(image + b"\0top_k=" + str(top_k).encode()).hexdigest()


def submit_once(
    queue: Queue,
    idempotency_key: str,
    image: bytes,
    top_k: int,
    settings: Settings,
    before_enqueue: Callable[[Pipeline], None],
) -> tuple[str, bool]:
    """`(job_id, replayed)`. `before_enqueue` runs only when a new job is about to be made
    (the queue-capacity check: a replay must succeed even when the queue is full)."""
    key = claim_key(idempotency_key)
    mark = fingerprint(image, top_k)
    with queue.connection.pipeline() as pipe:
        for _ in range(_MAX_ROUNDS):
            try:
                pipe.watch(key)
                claimed = pipe.get(key)
                if claimed is not None:
                    job_id, _, claimed_mark = claimed.decode().partition(" ")
                    if claimed_mark != mark:
                        raise ApiError(
                            "this Idempotency-Key was already used for a different image or top_k",
                            code="idempotency_key_reused",
                            http_status=422,
                        )
                    if pipe.exists(Job.key_for(job_id)):
                        return job_id, True
                    # The job expired before the claim: make a new one under the same key.
                before_enqueue(pipe)
                pipe.multi()
                job = submit(queue, image, top_k, settings, pipeline=pipe)
                # As long as the job itself can live: queued up to image_ttl, then kept result_ttl.
                pipe.set(key, f"{job.id} {mark}", ex=settings.image_ttl + settings.result_ttl)
                pipe.execute()
                return job.id, False
            except WatchError:
                continue
            finally:
                pipe.reset()
    raise ApiError(
        "too many concurrent requests with this Idempotency-Key; retry",
        code="idempotency_conflict",
        http_status=409,
    )
