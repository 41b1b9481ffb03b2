"""Redis keys inferq owns. RQ keeps its own keys (`rq:job:<id>`, `rq:queue:<name>`, …) so that
RQ's tools (rq-dashboard, `rq info`, `Job.fetch`) see inferq jobs as ordinary RQ jobs."""

from __future__ import annotations

import re

PREFIX = "inferq:"
# RQ's job ids are uuid4 strings; inferq only ever generates those, so anything else is refused
# before it reaches a key.
JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def is_job_id(value: str) -> bool:
    return bool(JOB_ID_RE.match(value))


def image_key(job_id: str) -> str:
    """The uploaded bytes of one job, raw (never pickled), with a TTL; deleted when the job ends."""
    return f"{PREFIX}img:{job_id}"


def known_key(job_id: str) -> str:
    """A tombstone set with the job (same transaction) that outlives it by EXPIRED_GRACE_SECONDS
    (`Settings.known_job_ttl`), so a job whose result expired reads 410 `job_expired`, not 404.
    Its value is the owner id of the API key that created the job ("" when keys are disabled)."""
    return f"{PREFIX}known:{job_id}"


def ended_channel() -> str:
    """The pub/sub channel on which workers publish every job they end (finished, failed, expired,
    timed out), in the same transaction as the end itself (its message: `shared.ended`): each api
    process holds one subscription to it and wakes its own long-polls, so waiters cost no Redis
    connection each."""
    return f"{PREFIX}ended"


def grabbed_key(queue_key: str, worker_name: str) -> str:
    """The ids one worker moved off one RQ queue list and has not started yet (its reliable-dequeue
    list). One per worker, not RQ's shared `:intermediate` list, so that a dead worker's grabbed ids
    can be told apart from a live one's and go back to their queue at once, free of charge."""
    return f"{PREFIX}grabbed:{queue_key}:{worker_name}"


def grabbers_key(queue_key: str) -> str:
    """Sorted set of the workers that may hold grabbed ids of `queue_key`, scored by when they stop
    counting as alive (refreshed by their heartbeat, like RQ's started registry)."""
    return f"{PREFIX}grabbers:{queue_key}"


def at_risk_key(queue_key: str) -> str:
    """Set of the started-registry entries (`<job id>:<execution id>`) of `queue_key` whose job is
    being decoded or is in a forward pass right now: a worker that dies charges an attempt to these
    jobs only."""
    return f"{PREFIX}at-risk:{queue_key}"


def queued_bytes_key() -> str:
    """An integer: bytes of images in Redis whose job has not ended (`shared.image_budget`).
    Always equal to the sum of `queued_images_key()`'s values (both change in one script)."""
    return f"{PREFIX}queued_bytes"


def queued_images_key() -> str:
    """A hash job id -> "<bytes> <epoch seconds reserved>" of every image counted in
    `queued_bytes_key()`: releasing is idempotent (HDEL says whether this caller releases it)."""
    return f"{PREFIX}queued_images"


def sweep_lock_key() -> str:
    """Held (SET NX EX) by the one process that sweeps expired images at a time."""
    return f"{PREFIX}lock:sweep"


def telemetry_key(namespace: str, metric: str) -> str:
    """The hash of one worker-telemetry histogram or counter (`shared.telemetry`) of QUEUE_NAME
    `namespace`. The `v1` is the layout's version: changing a metric's buckets needs a new one."""
    return f"{PREFIX}telemetry:v1:{namespace}:{metric}"
