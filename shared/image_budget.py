"""The byte budget of queued images (MAX_QUEUED_BYTES), and the end of jobs whose image expired.

Bookkeeping: two keys that only Lua scripts change, each script both keys at once, so they never
disagree: `inferq:queued_bytes` (a total) and `inferq:queued_images` (a hash: job id ->
"<bytes> <epoch reserved>"). An image is counted from its submit until its job ends.

- Reserve (`reserve`, one script: the whole submit's one round trip): refuse with `RedisFull` when
  Redis' used memory plus the uploads would come within REDIS_HEADROOM_BYTES of `maxmemory`, refuse
  with `QueuedBytesFull` when the total would pass MAX_QUEUED_BYTES, else count them and, in the same
  script, make the submit's writes (`shared.recorded_writes`: the images, RQ's jobs, the api's
  counters), so a refused submit stores nothing and an admitted one is counted and stored at once.
  Concurrent submitters cannot overshoot, and a failed submit has nothing to give back. A script whose
  reply was lost, sent again by redis-py's retry, finds the job it made and does nothing twice.
- Release (`release`, one script): deletes the images and un-counts them. Idempotent (only the caller
  whose HDEL removes the entry subtracts), so a retried finish or a race between a worker and a
  sweep never subtracts twice. It deletes before anything that needs memory, so it runs even when
  Redis is at `maxmemory` (deletes are always allowed there; a script's later writes are allowed
  once it has written): that is how a worker finishing a batch frees room in a full Redis.
- Sweep (`sweep`, at most once per SWEEP_INTERVAL_SECONDS over all processes): every entry whose
  image is gone. A job still queued is ended `failed` with `image_expired` (or, past its deadline,
  `deadline_expired`), seen by its owner and counted in the metrics; every such entry is released.
  An entry whose job does not exist (deleted by hand, or counted without its writes) is released
  after ORPHAN_GRACE_SECONDS. Then the total is recounted from the hash.

Drift is therefore self-healing rather than impossible: an image that expires over-counts until the
next sweep, a hand edit until the next sweep after ORPHAN_GRACE_SECONDS. Nothing else can make the
total differ from the bytes in Redis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import now

from shared.config import Settings
from shared.errors import InferqError, QueuedBytesFull, RedisFull
from shared.job_meta import DEADLINE_EXPIRED, META_DEADLINE, META_ERROR, META_IMAGE_EXPIRES
from shared.keys import (
    ended_channel,
    image_key,
    queued_bytes_key,
    queued_images_key,
    sweep_lock_key,
    telemetry_key,
)
from shared.recorded_writes import APPLY_LUA, RecordedWrites, pack
from shared.telemetry import FAILED_FIELD_PREFIX, JOBS_ENDED

log = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 2
# Queued jobs one sweep ends at most: a sweep stays well within its lock's SWEEP_INTERVAL_SECONDS
# (each end is a few round trips), so two never work on the same job; the rest wait for the next.
MAX_ENDS_PER_SWEEP = 200
ORPHAN_GRACE_SECONDS = 60
IMAGE_EXPIRED = "image_expired"
IMAGE_MISSING = "image_missing"

# KEYS: total, hash, made key, guard key, then the writes' keys. ARGV: limit (0 = none), headroom (-1 =
# no memory check), reserved-at, number of (id, bytes) pairs, made (1: if KEYS[3] exists, this very
# call already ran: a retry whose first reply was lost; 0: none), guard (1: KEYS[4] must hold ARGV[7],
# "" for absent; 0: none), guard value, the (id, bytes) pairs, then the writes (`recorded_writes.pack`).
# Returns {0, total} (counted and written, now or by the earlier run) or, with nothing written:
# {-1, total, limit} (budget), {-2, used, maxmemory} (memory), {-3, the guard key's value or ""}.
_RESERVE = (
    APPLY_LUA
    + """
local limit = tonumber(ARGV[1])
local headroom = tonumber(ARGV[2])
local last = 7 + 2 * tonumber(ARGV[4])
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, tonumber(redis.call('GET', KEYS[1]) or '0')}
end
if ARGV[6] == '1' then
  local current = redis.call('GET', KEYS[4]) or ''
  if current ~= ARGV[7] then return {-3, current} end
end
local incoming = 0
for i = 8, last, 2 do incoming = incoming + tonumber(ARGV[i + 1]) end
if headroom >= 0 then
  local info = redis.call('INFO', 'memory')
  local maxmemory = tonumber(string.match(info, 'maxmemory:(%d+)'))
  local used = tonumber(string.match(info, 'used_memory:(%d+)'))
  if maxmemory and used and maxmemory > 0 and used + incoming + headroom > maxmemory then
    return {-2, used, maxmemory}
  end
end
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
if limit > 0 and total + incoming > limit then return {-1, total, limit} end
for i = 8, last, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1] .. ' ' .. ARGV[3]) end
total = redis.call('INCRBY', KEYS[1], incoming)
apply(last + 1)
return {0, total}
"""
)

# KEYS: total, hash, then one image key per id (none: un-count only). ARGV: the ids. Deletes first
# (allowed under OOM, and once a script has written, its later writes are allowed too), subtracts
# last. Returns bytes released.
_RELEASE = """
local released = 0
for i = 1, #ARGV do
  if KEYS[i + 2] then redis.call('DEL', KEYS[i + 2]) end
  local entry = redis.call('HGET', KEYS[2], ARGV[i])
  if entry then
    redis.call('HDEL', KEYS[2], ARGV[i])
    released = released + tonumber(string.match(entry, '^(%d+)'))
  end
end
if released > 0 then redis.call('DECRBY', KEYS[1], released) end
return released
"""

# KEYS: total, hash. The total, recounted from the hash (atomic with respect to every other script).
_RECOUNT = """
local entries = redis.call('HVALS', KEYS[2])
local total = 0
for _, entry in ipairs(entries) do total = total + tonumber(string.match(entry, '^(%d+)')) end
redis.call('SET', KEYS[1], total)
return total
"""


class GuardChanged(Exception):
    """`reserve`'s guard key did not hold the value it was given: nothing was counted or written."""

    def __init__(self, key: str, current: bytes | None) -> None:
        super().__init__(f"{key} changed")
        self.current = current


def reserve(
    conn: Redis,
    items: Sequence[tuple[str, int]],
    settings: Settings,
    writes: RecordedWrites | None = None,
    *,
    made: str | None = None,
    guard: tuple[str, str | None] | None = None,
) -> None:
    """Count `(job id, image bytes)` against MAX_QUEUED_BYTES and Redis' memory and make `writes`,
    all or nothing, in one script (one round trip): `QueuedBytesFull` or `RedisFull` when they do not
    fit. `made`: a key that `writes` create and nothing else does (a new job's hash): if it exists,
    the script did all this already (redis-py sends a command again when its reply is lost) and does
    nothing more. `guard`: `(key, value)`: only if `key` holds `value` (None: does not exist), else
    `GuardChanged` (the api's idempotency claim, checked in the same atomic step as the enqueue)."""
    if not items and not (writes and writes.commands):
        return
    # Unused slots hold the total's key: every key a script touches is one of its KEYS.
    keys: list[Any] = [queued_bytes_key(), queued_images_key(), made or queued_bytes_key()]
    args: list[Any] = [settings.max_queued_bytes, settings.redis_headroom_bytes, int(time.time()), len(items)]
    args.append(1 if made is not None else 0)
    keys.append(guard[0] if guard is not None else queued_bytes_key())
    args += [1, guard[1] or ""] if guard is not None else [0, ""]
    for job_id, size in items:
        args += [job_id, size]
    if writes is not None:
        pack(writes, keys, args)
    script = conn.register_script(_RESERVE)
    reply = script(keys=keys, args=args)
    if int(reply[0]) == -1 and sweep(conn, settings) is not None:
        # Over budget: expired images may still be counted; sweep them out and ask again once.
        reply = script(keys=keys, args=args)
    status = int(reply[0])
    incoming = sum(size for _, size in items)
    if status == -3:
        raise GuardChanged(keys[3], reply[1] or None)
    if status == -2:
        used, maxmemory = int(reply[1]), int(reply[2])
        raise RedisFull(
            f"the job store (Redis) is full ({used:,} of {maxmemory:,} bytes used, {incoming:,} more "
            f"asked, {settings.redis_headroom_bytes:,} kept free for the workers); try again later"
        )
    if status == -1:
        queued, limit = int(reply[1]), int(reply[2])
        raise QueuedBytesFull(
            f"too many image bytes are waiting ({queued:,} queued + {incoming:,} > MAX_QUEUED_BYTES "
            f"{limit:,}); retry later",
            queued=queued,
            limit=limit,
            incoming=incoming,
        )


def release(client: Redis | Pipeline, job_ids: Sequence[str]) -> Any:
    """Delete the images of `job_ids` and un-count them. On a pipeline the script is only queued."""
    if not job_ids:
        return 0
    keys = [queued_bytes_key(), queued_images_key(), *(image_key(job_id) for job_id in job_ids)]
    return client.register_script(_RELEASE)(keys=keys, args=list(job_ids), client=client)


def queued_bytes(conn: Redis) -> int:
    return int(conn.get(queued_bytes_key()) or 0)


def missing_image_error(job: Job, wall: float | None = None) -> InferqError:
    """The error of a job whose image a worker found gone: `image_expired` once the image's
    lifetime (recorded at submit) has run out, else `image_missing` (deleted, e.g. a job requeued
    by hand after it had ended)."""
    wall = time.time() if wall is None else wall
    expires_at = job.meta.get(META_IMAGE_EXPIRES)
    if isinstance(expires_at, int | float) and wall >= expires_at - 1:
        return InferqError(
            "The image expired (IMAGE_TTL) before a worker reached the job.", code=IMAGE_EXPIRED
        )
    return InferqError("The image bytes are gone (deleted).", code=IMAGE_MISSING)


def end_unstarted(
    conn: Redis, job: Job, error: InferqError, settings: Settings, *, adopt_unlisted: bool = False
) -> bool:
    """End a queued job that no worker holds as failed with `error`, releasing its image.

    Removing the id from its queue list is the claim (as in `shared.jobs.cancel`): LREM returns 1
    only if no worker has taken it, and then none can. False when a worker (or a cancel) won.
    `adopt_unlisted` (the sweep, long after the image expired): a job still `queued` but in no list
    was left by a process that died between its claim and its end (a cancel, this function); it is
    ended too, or its hash (which has no TTL) would stay. (A worker that took the id holds it in the
    intermediate list until it starts it, atomically.) Only long after the expiry, so that it never
    races a live claimant."""
    queue = Queue(job.origin, connection=conn, serializer=JSONSerializer)
    if not conn.lrem(queue.key, 1, job.id) and (
        not adopt_unlisted or conn.lpos(queue.intermediate_queue_key, job.id) is not None
    ):
        return False
    job.refresh()
    if job.get_status(refresh=False) != JobStatus.QUEUED:
        return False  # a worker took it and started it meanwhile, or it ended
    job.meta[META_ERROR] = error.to_dict()
    job.ended_at = now()
    exc_string = f"{error.code}: {error.message}"
    try:
        _write_unstarted_end(conn, job, queue, error, exc_string, settings)
    except OutOfMemoryError:
        # Redis is at maxmemory and refused the whole MULTI: free the image first, then write.
        release(conn, [job.id])
        _write_unstarted_end(conn, job, queue, error, exc_string, settings)
    log.warning("job ended unstarted", extra={"job_id": job.id, "status": "failed", "code": error.code})
    return True


def _write_unstarted_end(
    conn: Redis, job: Job, queue: Queue, error: InferqError, exc_string: str, settings: Settings
) -> None:
    with conn.pipeline() as pipe:
        release(pipe, [job.id])
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue=queue).add(
            job, ttl=settings.failure_ttl, exc_string=exc_string, pipeline=pipe
        )
        pipe.hset(job.key, "meta", JSONSerializer.dumps(job.meta))
        Result.create_failure(job, settings.failure_ttl, exc_string=exc_string, pipeline=pipe)
        pipe.hincrby(telemetry_key(settings.queue_name, JOBS_ENDED), FAILED_FIELD_PREFIX + error.code, 1)
        pipe.publish(ended_channel(), job.id)
        pipe.execute()


def end_if_image_expired(
    conn: Redis, job: Job, settings: Settings, *, image_present: bool | None = None
) -> Job:
    """`job`, ended first if it is queued and its image is gone (a read must not show such a job as
    queued until a sweep comes by). `image_present`: what the caller read with the job (else one
    EXISTS for a queued job, nothing otherwise)."""
    if job.get_status(refresh=False) != JobStatus.QUEUED:
        return job
    if image_present or (image_present is None and conn.exists(image_key(job.id))):
        return job
    if end_unstarted(conn, job, _unstarted_error(job), settings):
        job.refresh()
    return job


def _unstarted_error(job: Job) -> InferqError:
    deadline = job.meta.get(META_DEADLINE)
    wall = time.time()
    if isinstance(deadline, int | float) and wall > deadline:
        return InferqError("The job's deadline passed before a worker could start it.", code=DEADLINE_EXPIRED)
    return missing_image_error(job, wall)


@dataclass(frozen=True)
class SweepReport:
    ended: int  # queued jobs ended because their image was gone
    released: int  # entries released (ended jobs, jobs that lost their image elsewhere, orphans)
    total: int  # the recounted total, bytes


def sweep(conn: Redis, settings: Settings, *, force: bool = False) -> SweepReport | None:
    """End queued jobs whose image expired, release what no longer exists, recount the total.

    None when another process swept within SWEEP_INTERVAL_SECONDS (unless `force`)."""
    if not force and not conn.set(sweep_lock_key(), 1, nx=True, ex=SWEEP_INTERVAL_SECONDS):
        return None
    entries = {k.decode(): v.decode() for k, v in conn.hgetall(queued_images_key()).items()}
    ids = list(entries)
    ended = released = 0
    if ids:
        # One atomic snapshot of image and job hash per entry: a submit stores both in one
        # transaction, so "job there, image not" means the image really went. (Read one after the
        # other, a submit landing in between would look like a job that had lost its image.)
        with conn.pipeline(transaction=True) as pipe:
            for job_id in ids:
                pipe.exists(image_key(job_id))
                pipe.exists(Job.key_for(job_id))
            replies = pipe.execute()
        wall = time.time()
        gone: list[str] = []
        to_release: list[str] = []
        for job_id, image_here, job_here in zip(ids, replies[0::2], replies[1::2], strict=True):
            if image_here:
                continue
            if job_here:
                gone.append(job_id)
            elif wall - float(entries[job_id].partition(" ")[2] or 0) > ORPHAN_GRACE_SECONDS:
                to_release.append(job_id)  # its submit never completed (or the job was deleted)
        jobs = Job.fetch_many(gone, connection=conn, serializer=JSONSerializer) if gone else []
        for job_id, job in zip(gone, jobs, strict=True):
            if job is None:
                to_release.append(job_id)  # ended and expired, or deleted, since the snapshot
                continue
            if job.get_status(refresh=False) == JobStatus.QUEUED:
                if ended >= MAX_ENDS_PER_SWEEP:
                    continue
                expires_at = job.meta.get(META_IMAGE_EXPIRES)
                long_gone = isinstance(expires_at, int | float) and wall - expires_at > ORPHAN_GRACE_SECONDS
                if end_unstarted(conn, job, _unstarted_error(job), settings, adopt_unlisted=long_gone):
                    ended += 1
                # Else a worker holds it (its finish releases the entry), or a claimant died: the
                # entry stays, so a later sweep can adopt the job once its image is long gone.
            else:
                # A worker holds it (it has the bytes), or it ended: the image is no longer in Redis.
                to_release.append(job_id)
        if to_release:
            release(conn, to_release)
        released = ended + len(to_release)
    total = int(conn.register_script(_RECOUNT)(keys=[queued_bytes_key(), queued_images_key()]))
    if ended or released:
        log.info("image sweep: %d queued job(s) ended, %d entries released", ended, released)
    return SweepReport(ended=ended, released=released, total=total)
