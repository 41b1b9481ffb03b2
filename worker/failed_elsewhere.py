"""Jobs that RQ itself failed, outside inferq's own writes: found by the workers' maintenance,
given inferq's error code and counted once in `inferq_jobs_failed_total`.

Every end inferq writes (a worker's batch, its grab, a timeout, a dead worker's recovery, the api or
sweep ending a queued job whose image is gone) writes the job's error code (`META_ERROR`) and counts
it in the same transaction. Two things fail an inferq job without doing either:
- RQ's started-registry cleanup (`StartedJobRegistry.cleanup`), which RQ's readers run as they read:
  `rq info`, rq-dashboard and `/rq` listing started jobs, any `registry.count`. When it reaches a dead
  worker's expired entry before `worker.liveness` does (which runs every few seconds while a worker
  lives; while none lives, it always does), it requeues the job while RQ retries are left, else
  fails it (`AbandonedJobError`);
- a plain RQ worker running `worker.tasks.classify`, which fails a job by its exception.

Every failure lands in its lane's failed registry, a ZSET scored by when its entry expires: the time
of the failure plus the job's FAILURE_TTL. Each lane's maintenance (`adopt`, under RQ's per-queue
maintenance lock) reads the entries of the failures since its previous pass, and ends each failed job
that has no error code the inferq way, in one transaction under a WATCH of the job: the code the api
shows for it (`FAILED_BY_RQ`) written into its meta, its end time (RQ's cleanup writes none) taken
from its failure result, counted, its long-polls woken. A job that has a
code was counted by whoever wrote it; so each is counted once, whichever and however many workers
look. (Its image is left to expire, as for a dead worker's job: an operator may requeue it.)

"Since the previous pass" is read as: scores above the previous pass's start + FAILURE_TTL -
SKEW_SECONDS, which assumes, as `api.capacity` does, that jobs carry the FAILURE_TTL the workers run
with. SKEW_SECONDS covers other hosts' clocks that run behind and writes in flight during a pass;
what is read twice is skipped by its code. The first pass on a Redis reads the whole registry.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from shared.ended import publish_ended
from shared.errors import InferqError
from shared.jobs import FAILED_BY_RQ, FAILED_BY_RQ_MESSAGE, META_ERROR
from shared.keys import PREFIX
from shared.telemetry import count_ended

log = logging.getLogger("inferq.worker")

SKEW_SECONDS = 10
# Job hashes read per round trip.
_PAGE = 500
# WATCH conflicts tolerated on one job (a concurrent requeue or end) before a later pass is left to it.
_ATTEMPTS = 5


def scanned_key(queue: Queue) -> str:
    """When the previous pass over this lane's failed registry started (epoch seconds)."""
    return f"{PREFIX}failed-scan:{queue.key}"


def adopt(connection: redis.Redis, queue: Queue, *, failure_ttl: int, namespace: str) -> int:
    """End the inferq way every job of `queue` that RQ failed since the previous pass; returns how
    many. Run under the lane's maintenance lock (one pass at a time per lane)."""
    started = time.time()
    previous = connection.get(scanned_key(queue))
    low: float | str = float(previous) + failure_ttl - SKEW_SECONDS if previous is not None else "-inf"
    ids = [raw.decode() for raw in connection.zrangebyscore(queue.failed_job_registry.key, low, "+inf")]
    adopted = 0
    for first in range(0, len(ids), _PAGE):
        chunk = ids[first : first + _PAGE]
        with connection.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.hmget(Job.key_for(job_id), "status", "meta")
            rows = pipe.execute()
        for job_id, (status, meta) in zip(chunk, rows, strict=True):
            if status == JobStatus.FAILED.value.encode() and not _has_code(meta):
                adopted += _adopt_one(connection, job_id, namespace)
    connection.set(scanned_key(queue), repr(started))
    return adopted


def _has_code(meta: bytes | None) -> bool:
    """The job's meta carries inferq's error code (or cannot be read: then it is left alone)."""
    if meta is None:
        return False
    try:
        error = json.loads(meta).get(META_ERROR)
    except (ValueError, AttributeError):
        return True
    return isinstance(error, dict) and "code" in error


def _adopt_one(connection: redis.Redis, job_id: str, namespace: str) -> int:
    key = Job.key_for(job_id)
    error = InferqError(FAILED_BY_RQ_MESSAGE, code=FAILED_BY_RQ)
    with connection.pipeline() as pipe:
        for _ in range(_ATTEMPTS):
            try:
                pipe.watch(key)
                status, meta, ended_at = pipe.hmget(key, "status", "meta", "ended_at")
                if status != JobStatus.FAILED.value.encode() or _has_code(meta):
                    return 0  # requeued, or ended by inferq, meanwhile
                fields = json.loads(meta) if meta is not None else {}
                fields[META_ERROR] = error.to_dict()
                # RQ's cleanup records no end time; its failure result says when it failed.
                job = Job(job_id, connection=connection, serializer=JSONSerializer)
                latest = None if ended_at else Result.fetch_latest(job, serializer=JSONSerializer)
                pipe.multi()
                pipe.hset(key, "meta", JSONSerializer.dumps(fields))
                if latest is not None:
                    pipe.hset(key, "ended_at", utcformat(latest.created_at))
                publish_ended(pipe, job_id, None)  # no view: its waiters read the job
                count_ended(pipe, namespace=namespace, finished=0, failed_by_code={error.code: 1})
                pipe.execute()
                break
            except redis.WatchError:
                continue
        else:
            return 0
    log.warning("job failed by RQ itself, counted", extra={"job_id": job_id, "code": error.code})
    return 1
