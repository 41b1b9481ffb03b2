"""The batch worker's writes to RQ's job state, registries and worker registration: what RQ's own
worker would write when it starts a job, ends it (finished, failed, expired, timed out, caught in a
crash) or gives it back to its queue, and when it registers itself (at birth, and again if its key
vanished). Not here: RQ's own `set_state` and `heartbeat` calls (`worker.batch_worker`) and the grab
and hand-back scripts that move ids between lists (`worker.batching`, `worker.liveness`).

This is the one module that calls RQ's private job methods (`_handle_success`, `_handle_failure`):
RQ has no public API to end a job that its own `perform_job` did not run. They were written against
RQ 2.12, checked at import, so an upgrade stops here instead of writing half a job.

Every end is one transaction that also PUBLISHes the job's id and view on
`shared.keys.ended_channel()` (`shared.ended`: the api's long-polls answer from it) and deletes the
job's image (`_drop_image`: the one place the image of an ended job leaves Redis).

Ownership: a job belongs to the worker whose execution of it is in the started registry with a
score (expiry) still in the future. The ends written here check that entry in the script that
writes them (`worker.owned_write`, one round trip) or, when that cannot take them, WATCH the job hash
and re-check the entry before their transaction, as the recovery of a dead worker's jobs
(`worker.liveness`) does; so exactly one of them wins: a late writer (a worker stalled past
ABANDONED_AFTER_SECONDS, e.g. by a Redis outage) never writes a second result for a job another
worker took over.

Why one module over 400 lines: the start (which ends expired jobs unstarted), the end of a batch
and the end of a dead worker's job all write RQ's job state through the same wrappers of RQ's private
calls (`_write_success` / `_write_failure`) under the one version check above. Split by stage, those
calls and the check would leave this module, and an RQ upgrade would be reviewed in several places.
The registration and queue writes at its end are here for the same reason: what RQ's readers
(`Job.fetch`, the registries, the dashboard) read of a job and of the worker is written in one file.
"""

from __future__ import annotations

import collections
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import rq
from rq import worker_registration
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.utils import now

from shared import ended, image_budget
from shared.errors import InferqError
from shared.job_view import view_of
from shared.jobs import (
    DEADLINE_EXPIRED,
    META_ATTEMPTS,
    META_BATCH_ID,
    META_CRASHES,
    META_DEADLINE,
    META_ERROR,
    META_TIMINGS,
    timings,
)
from shared.keys import at_risk_key
from shared.telemetry import count_ended, record_batch
from worker import owned_write, past_maxmemory

if TYPE_CHECKING:
    from rq.worker import SimpleWorker

    from worker.batching import Grabbed

RQ_WRITTEN_FOR = "2.12."
if not rq.__version__.startswith(RQ_WRITTEN_FOR):
    raise ImportError(
        f"worker.rq_writes writes jobs the way RQ {RQ_WRITTEN_FOR}x does (private _handle_success / "
        f"_handle_failure); RQ {rq.__version__} is installed: check them before changing the pin"
    )

log = logging.getLogger("inferq.worker")


@dataclass
class Running:
    """One job this worker started: its RQ job and execution, and the time it spent at risk (being
    decoded or in a forward pass), which JOB_TIMEOUT bounds."""

    job: Job
    execution: Execution
    top_k: int
    at_risk_since: float | None = None  # monotonic start of the current risky phase
    marked: bool = True  # in the at-risk set in Redis (the start marks it)
    risk_spent: float = 0.0  # seconds of finished risky phases

    def risk_seconds(self, clock: float) -> float:
        current = clock - self.at_risk_since if self.at_risk_since is not None else 0.0
        return self.risk_spent + current

    def enter_risk(self, clock: float) -> None:
        self.at_risk_since = clock

    def leave_risk(self, clock: float) -> None:
        if self.at_risk_since is not None:
            self.risk_spent += clock - self.at_risk_since
            self.at_risk_since = None


@dataclass
class Ending:
    """How one job ends: a result payload or an error, and its own timings."""

    running: Running
    result: dict[str, Any] | None = None
    error: InferqError | None = None
    preprocess_ms: float = 0.0
    # Jobs in the forward pass this job was part of; None: it had none (its decode failed or its
    # image was gone, or it timed out), so it reports no inference time or batch size of its own.
    forward_pass_size: int | None = None


def crashes(job: Job | None) -> int:
    """Worker deaths the job was caught in so far (decoding or in a forward pass)."""
    return int(job.meta.get(META_CRASHES, 0)) if job is not None else 0


def publish_ended(pipe: Any, job: Job, returned: Any = None) -> None:
    """The end's message, with the job's view as written (`shared.ended`): the long-polls it wakes
    answer from it. `returned`: a finished job's result."""
    ended.publish_ended(pipe, job.id, view_of(job, returned))


def _drop_image(pipe: Any, job_id: str) -> None:
    # Deletes the image and un-counts it from MAX_QUEUED_BYTES, in the caller's transaction.
    image_budget.release(pipe, [job_id])


def _at_risk(job: Job) -> str:
    return at_risk_key(job.started_job_registry.key)


# --- start ----------------------------------------------------------------------------------------


def start_grabbed(
    worker: SimpleWorker,
    grabbed: Sequence[Grabbed],
    grabbed_keys: Sequence[str],
    jobs: dict[str, Job | None],
    execution_ttl: int,
    top_k_of: Any,
    *,
    namespace: str,
) -> list[Running] | None:
    """Start the grabbed jobs that are still queued, in one transaction, as being decoded (at risk).

    Each id leaves its worker's grabbed list in the same transaction (so it is always in exactly one
    of: its queue, a grabbed list, the started registry). Ids whose job is gone or no longer queued
    (canceled) are dropped; jobs past their deadline end `deadline_expired` unstarted (counted in the
    telemetry of `namespace`, in the same transaction). None when the grabbed lists were handed back
    meanwhile (another worker judged this one dead): nothing started, nothing ended.
    """
    started: list[Running] = []
    wall = time.time()
    lists = sorted({grabbed_keys[g.lane] for g in grabbed})
    with worker.connection.pipeline() as pipe:
        try:
            pipe.watch(*lists)
            pipe.multi()
            for item in grabbed:
                pipe.lrem(grabbed_keys[item.lane], 1, item.job_id)
                job = jobs.get(item.job_id)
                if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                    continue
                deadline = job.meta.get(META_DEADLINE)
                if isinstance(deadline, int | float) and wall > deadline:
                    _end_expired(pipe, worker, job, wall, namespace)
                    continue
                job.meta[META_ATTEMPTS] = int(job.meta.get(META_ATTEMPTS, 0)) + 1
                # A job that failed before and was requeued (the dashboard) runs afresh: an error
                # left in its meta would read as already counted (`worker.failed_elsewhere`).
                job.meta.pop(META_ERROR, None)
                pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                execution = Execution.create(job, execution_ttl, pipeline=pipe, worker_name=worker.name)
                job.prepare_for_execution(worker.name, pipeline=pipe)
                pipe.sadd(_at_risk(job), execution.composite_key)
                started.append(Running(job, execution, top_k_of(job)))
            if started:
                worker.set_state(rq.worker.WorkerStatus.BUSY, pipeline=pipe)
                worker.set_current_job_id(started[0].job.id, pipeline=pipe)
            recorded = past_maxmemory.snapshot(pipe)
            try:
                pipe.execute()
            except redis.exceptions.OutOfMemoryError as exc:
                # Past maxmemory: the same commands (the attempts are counted once) through the
                # allow-oom script. The refused try watched nothing after its end: the ids must
                # still be where the grab put them (a hand-back moves them all out).
                past_maxmemory.refused("starting jobs", exc)
                pipe.watch(*lists)
                if not _still_grabbed(pipe, grabbed, grabbed_keys):
                    raise redis.WatchError from None
                pipe.multi()
                past_maxmemory.replay(pipe, recorded, allow_oom=True)
                pipe.execute()
        except redis.WatchError:
            log.warning(
                "%d grabbed job(s) were handed back to their queue meanwhile; not starting them", len(grabbed)
            )
            return None
    return started


def _still_grabbed(pipe: Any, grabbed: Sequence[Grabbed], grabbed_keys: Sequence[str]) -> bool:
    return all(pipe.lpos(grabbed_keys[g.lane], g.job_id) is not None for g in grabbed)


def _end_expired(pipe: Any, worker: SimpleWorker, job: Job, wall: float, namespace: str) -> None:
    late_ms = (wall - float(job.meta[META_DEADLINE])) * 1000
    error = InferqError(
        f"The job's deadline passed {late_ms:.0f} ms before a worker could start it.", code=DEADLINE_EXPIRED
    )
    job.ended_at = now()
    _write_failure(pipe, worker.name, job, None, error)
    pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
    _drop_image(pipe, job.id)
    publish_ended(pipe, job)
    count_ended(pipe, namespace=namespace, finished=0, failed_by_code={DEADLINE_EXPIRED: 1})


# --- risk markers ---------------------------------------------------------------------------------


def set_at_risk(connection: redis.Redis, running: Sequence[Running], at_risk: bool) -> None:
    """Mark (or unmark) jobs as being decoded / in a forward pass: a worker death now charges them.
    Best effort: with Redis unreachable the work goes on unmarked (the results wait for Redis anyway)."""
    if not running:
        return
    for item in running:
        item.marked = at_risk
    recorded = past_maxmemory.recorder(connection)
    for item in running:
        key = _at_risk(item.job)
        if at_risk:
            recorded.sadd(key, item.execution.composite_key)
        else:
            recorded.srem(key, item.execution.composite_key)
    try:
        past_maxmemory.execute(connection, recorded, what="marking jobs at risk", transaction=False)
    except redis.exceptions.RedisError as exc:
        log.warning(
            "could not %s %d job(s) as at risk: %s", "mark" if at_risk else "unmark", len(running), exc
        )


# --- end ------------------------------------------------------------------------------------------


def finish(
    worker: SimpleWorker,
    endings: Sequence[Ending],
    inference_ms: float,
    *,
    namespace: str,
    result_ttl: int,
    as_batch: bool = True,
) -> tuple[list[Ending], str]:
    """Write every job's own result or error, in one transaction; returns the endings written (the
    jobs this worker still owned) and the batch id. `as_batch`: the endings shared a forward pass
    (batch telemetry is recorded); otherwise they only count as ended (e.g. timed out)."""
    batch_id = uuid.uuid4().hex[:16]  # in the logs and job.meta: which jobs shared a forward pass
    if not endings:
        return [], batch_id
    if _finish_all_owned(worker, endings, inference_ms, batch_id, namespace, result_ttl, as_batch):
        return list(endings), batch_id
    # Not all owned any more, or past maxmemory: ownership read under WATCH, then the transaction.
    allow_oom = False
    with worker.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(*[e.running.job.key for e in endings])
                owned = _still_owned(worker.connection, endings)
                pipe.multi()
                # Past maxmemory the commands are recorded, then queued through the allow-oom script.
                target = past_maxmemory.recorder(worker.connection) if allow_oom else pipe
                _queue_ends(target, worker, owned, inference_ms, batch_id, namespace, result_ttl, as_batch)
                if allow_oom:
                    past_maxmemory.replay(pipe, past_maxmemory.snapshot(target), allow_oom=True)
                pipe.execute()
                break
            except redis.WatchError:
                pipe.reset()  # a job was handed back meanwhile: check ownership again
            except redis.exceptions.OutOfMemoryError as exc:
                # Past maxmemory: the same ends, ownership checked again under WATCH, through the
                # allow-oom script (each end frees an image, far more than it writes).
                if allow_oom:
                    raise
                allow_oom = True
                past_maxmemory.refused("ending jobs", exc)
                pipe.reset()
    if len(owned) < len(endings):
        log.warning(
            "%d job(s) were handed to another worker while running here; not writing their results",
            len(endings) - len(owned),
        )
    return owned, batch_id


def _finish_all_owned(
    worker: SimpleWorker,
    endings: Sequence[Ending],
    inference_ms: float,
    batch_id: str,
    namespace: str,
    result_ttl: int,
    as_batch: bool,
) -> bool:
    """The usual case in one round trip (`worker.owned_write`): every job is still owned, and all
    the ends are written by one script that checks that first. False: nothing was written."""
    recorded = past_maxmemory.recorder(worker.connection)
    _queue_ends(recorded, worker, endings, inference_ms, batch_id, namespace, result_ttl, as_batch)
    owned = [(e.running.job.started_job_registry.key, e.running.execution.composite_key) for e in endings]
    return bool(owned_write.run(worker.connection, owned, recorded))


def _queue_ends(
    pipe: Any,
    worker: SimpleWorker,
    owned: Sequence[Ending],
    inference_ms: float,
    batch_id: str,
    namespace: str,
    result_ttl: int,
    as_batch: bool,
) -> None:
    _write_endings(pipe, worker, owned, inference_ms, batch_id, result_ttl)
    if owned:
        if as_batch:  # (a job ended from outside the batch leaves the worker busy)
            worker.set_current_job_id(None, pipeline=pipe)
            worker.set_state(rq.worker.WorkerStatus.IDLE, pipeline=pipe)
        _record(pipe, owned, inference_ms, namespace, as_batch)


def _still_owned(connection: redis.Redis, endings: Sequence[Ending]) -> list[Ending]:
    """The endings whose execution is still in the started registry and not expired there: an
    expired entry may be taken over by any worker's recovery at any moment (ABANDONED_AFTER_SECONDS)."""
    with connection.pipeline(transaction=False) as pipe:
        for e in endings:
            pipe.zscore(e.running.job.started_job_registry.key, e.running.execution.composite_key)
        scores = pipe.execute()
    wall = time.time()
    return [e for e, score in zip(endings, scores, strict=True) if score is not None and score > wall]


def _write_endings(
    pipe: Any,
    worker: SimpleWorker,
    owned: Sequence[Ending],
    inference_ms: float,
    batch_id: str,
    result_ttl: int,
) -> None:
    ended = now()
    for e in owned:
        job, execution = e.running.job, e.running.execution
        job.ended_at = ended
        assert job.started_at is not None
        queued_at = job.enqueued_at or job.created_at
        job.meta[META_TIMINGS] = timings(
            (job.started_at - queued_at).total_seconds() * 1000,
            e.preprocess_ms,
            inference_ms if e.forward_pass_size else None,
            e.forward_pass_size,
        )
        job.meta[META_BATCH_ID] = batch_id
        worker.increment_total_working_time(ended - job.started_at, pipe)
        if e.error is None:
            _write_success(pipe, worker, job, execution, e.result, result_ttl)
        else:
            worker.increment_failed_job_count(pipe)
            _write_failure(pipe, worker.name, job, execution, e.error)
        pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        release(pipe, job, execution)
        _drop_image(pipe, job.id)
        publish_ended(pipe, job, e.result)


def _record(pipe: Any, owned: Sequence[Ending], inference_ms: float, namespace: str, as_batch: bool) -> None:
    """Histograms and outcome counters for /metrics, in the same transaction (shared.telemetry)."""
    failed = collections.Counter(e.error.code for e in owned if e.error is not None)
    finished = sum(1 for e in owned if e.error is None)
    if not as_batch:
        count_ended(pipe, namespace=namespace, finished=finished, failed_by_code=failed)
        return
    record_batch(
        pipe,
        namespace=namespace,
        queue_ms=[e.running.job.meta[META_TIMINGS]["queue_ms"] for e in owned],
        preprocess_ms=[e.preprocess_ms for e in owned],
        inference_ms=inference_ms,
        # The forward pass's own size (the jobs whose decode failed were not in it); 0: none ran.
        batch_size=max((e.forward_pass_size or 0 for e in owned), default=0),
        finished=finished,
        failed_by_code=failed,
    )


def _write_success(
    pipe: Any,
    worker: SimpleWorker,
    job: Job,
    execution: Execution,
    result: dict[str, Any] | None,
    result_ttl: int,
) -> None:
    job._status = JobStatus.FINISHED
    job._result = result
    worker.increment_successful_job_count(pipe)
    job._handle_success(
        result_ttl,
        pipeline=pipe,
        worker_name=worker.name,
        execution_id=execution.id,
        execution_started_at=execution.created_at,
        execution_ended_at=job.ended_at,
    )
    job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)


def _write_failure(
    pipe: Any, worker_name: str, job: Job, execution: Execution | None, error: InferqError
) -> None:
    """The job ends failed with `error` (its code in `job.meta[META_ERROR]`); `execution` is None for
    a job that is not running (expired before its start, or found in a dead worker)."""
    job._status = JobStatus.FAILED
    job.meta[META_ERROR] = error.to_dict()
    job.set_status(JobStatus.FAILED, pipeline=pipe)
    job._handle_failure(
        f"{error.code}: {error.message}",
        pipe,
        worker_name=worker_name,
        execution_id=execution.id if execution else None,
        execution_started_at=execution.created_at if execution else None,
        execution_ended_at=job.ended_at,
    )


def release(pipe: Any, job: Job, execution: Execution) -> None:
    """The execution is over: out of the started registry, the job's executions and the at-risk set."""
    execution.delete(job, pipe)
    pipe.srem(_at_risk(job), execution.composite_key)


# --- a dead worker's jobs -------------------------------------------------------------------------


def charge_crash(job: Job) -> int:
    """Charge the job for a worker death it was caught in (its meta and RQ's `retries_left`, both
    written by `requeue` or `end_crashed`); returns its crashes so far."""
    job.meta[META_CRASHES] = crashes(job) + 1
    if job.retries_left:
        job.retries_left -= 1
    return crashes(job)


def requeue(pipe: Any, queue: Queue, job: Job, execution: Execution) -> None:
    """Give a started job of a dead worker back to the head of its queue (the whole job hash is
    saved: meta and `retries_left` as they are now)."""
    release(pipe, job, execution)
    queue.enqueue_job(job, pipeline=pipe, at_front=True)


def end_crashed(pipe: Any, job: Job, execution: Execution, error: InferqError, namespace: str) -> None:
    """The job was caught in its last allowed worker death: it ends failed with `error`. Its image
    is kept (until IMAGE_TTL), so that an operator may requeue it from the dashboard."""
    job.ended_at = now()
    _write_failure(pipe, "", job, None, error)
    pipe.hset(
        job.key, mapping={"meta": job.serializer.dumps(job.meta), "retries_left": job.retries_left or 0}
    )
    release(pipe, job, execution)
    publish_ended(pipe, job)
    count_ended(pipe, namespace=namespace, finished=0, failed_by_code={error.code: 1})


def forget_vanished(pipe: Any, registry_key: str, member: str) -> None:
    """A started-registry entry whose job hash itself expired: only its bookkeeping is left, and
    goes (queued on the caller's transaction)."""
    pipe.zrem(registry_key, member)
    pipe.srem(at_risk_key(registry_key), member)


# --- grabbed ids back to their queue --------------------------------------------------------------


def return_to_queue(
    connection: redis.Redis, queues: Sequence[Queue], grabbed_keys: Sequence[str], items: Sequence[Grabbed]
) -> None:
    """Move grabbed ids that were not started from this worker's grabbed lists back to the head of
    their queue, in their order; past maxmemory too (`worker.past_maxmemory`)."""
    recorded = past_maxmemory.recorder(connection)
    for item in reversed(items):
        recorded.lrem(grabbed_keys[item.lane], 1, item.job_id)
        recorded.lpush(queues[item.lane].key, item.job_id)
    past_maxmemory.execute(connection, recorded, what="returning suspects to their queue")


# --- the worker's own registration (RQ's worker key and registries) -------------------------------


def register_birth(worker: SimpleWorker) -> None:
    """RQ's `register_birth` writes, past maxmemory (`worker.past_maxmemory`): a worker started or
    restarted while Redis is full must be able to drain it."""
    recorded = past_maxmemory.recorder(worker.connection)
    recorded.delete(worker.key)
    worker.birth_date = worker.last_heartbeat = now()
    _register(recorded, worker, worker.worker_ttl + 60)
    past_maxmemory.execute(worker.connection, recorded, what="registering")


def register_again(worker: SimpleWorker) -> None:
    """Write the worker key and its registry entries again, past maxmemory too: after the key
    vanished (Redis restarted without persistence, or it expired during an outage)."""
    recorded = past_maxmemory.recorder(worker.connection)
    _register(recorded, worker, worker.worker_ttl)
    past_maxmemory.execute(worker.connection, recorded, what="re-registering")


def _register(pipe: Any, worker: SimpleWorker, ttl: int) -> None:
    pipe.hset(worker.key, mapping=worker.serialize())
    worker_registration.register(worker, pipe)
    pipe.expire(worker.key, ttl)
