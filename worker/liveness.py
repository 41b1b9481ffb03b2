"""Liveness of batch workers, and what becomes of a dead worker's jobs.

A worker proves it is alive every HEARTBEAT_SECONDS (`Heartbeat`): its RQ worker key, the
started-registry entries of the jobs it runs, and its entry in each lane's grabbers set all get a
new expiry ABANDONED_AFTER_SECONDS ahead. Any worker's maintenance (every half of that) then finds
the entries that expired, and so the workers that died, and gives their jobs back (`recover`):

- ids a dead worker grabbed but had not started go back to the head of their queue, free of charge,
  at once (they sit in the worker's own grabbed list, never in RQ's shared intermediate list, whose
  cleanup fails such jobs a minute later with "Job was stuck in intermediate queue");
- a started job goes back to the head of its queue too, and is charged an attempt only if it was
  being decoded or in a forward pass when its worker died (the at-risk set, `worker.rq_writes`);
  a job charged MAX_ATTEMPTS times ends `failed` with code `worker_crashed`. A job that was only
  waiting (decoded, waiting for the model) was not what killed its worker.

This replaces RQ's own abandoned-job cleanup for inferq's queues (it would charge every started job
and fail them by exception text); RQ's other registry maintenance still runs. RQ's readers (`rq info`,
dashboards) still run that cleanup as they read, and may fail a dead worker's job first: such a job
is counted by `worker.failed_elsewhere`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import redis
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.worker import SimpleWorker

from shared.errors import InferqError
from shared.jobs import WORKER_CRASHED
from shared.keys import at_risk_key, grabbed_key, grabbers_key
from worker import past_maxmemory, rq_writes

log = logging.getLogger("inferq.worker")

# KEYS: grabbed list, queue list, grabbers set; ARGV: worker name, now. Hands a dead worker's grabbed
# ids back to the head of their queue in their original order, unless it heartbeat meanwhile.
# Past maxmemory it runs flagged `allow-oom` (`_hand_back`).
_HAND_BACK = """
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then return -1 end
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do n = n + 1 end
redis.call('ZREM', KEYS[3], ARGV[1])
return n
"""


class Heartbeat(threading.Thread):
    """Calls `beat` every `interval` seconds until stopped; a Redis error is logged, never fatal."""

    def __init__(self, beat: Callable[[], None], interval: float) -> None:
        super().__init__(name="inferq-heartbeat", daemon=True)
        self.beat = beat
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except redis.exceptions.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=self.interval + 1)


_FOREVER = 2**52  # seconds since the epoch; beyond any real expiry


def keep_grabbing_alive(
    pipe: redis.client.Pipeline, queues: Sequence[Queue], worker_name: str, ttl: float
) -> None:
    """Queue, on `pipe`, this worker's entry in each lane's grabbers set, alive `ttl` more seconds."""
    expires = time.time() + ttl
    for queue in queues:
        pipe.zadd(grabbers_key(queue.key), {worker_name: expires})


def hand_back_own(
    connection: redis.Redis, queues: Sequence[Queue], worker_name: str, *, rejoin_ttl: float | None
) -> int:
    """Give every id still in this worker's own grabbed lists back to the head of its queue (after an
    error between a grab and the start, or at a clean stop); then rejoin the grabbers sets for
    `rejoin_ttl` seconds, or leave them (None)."""
    moved = 0
    for queue in queues:
        keys = [grabbed_key(queue.key, worker_name), queue.key, grabbers_key(queue.key)]
        # An owner "dead" far in the future: its own score never stops the hand-back.
        moved += max(0, _hand_back(connection, keys, [worker_name, _FOREVER]))
    if rejoin_ttl is not None:
        recorded = past_maxmemory.recorder(connection)
        keep_grabbing_alive(recorded, queues, worker_name, rejoin_ttl)
        past_maxmemory.execute(connection, recorded, what="rejoining the grabbers")
    return moved


def _hand_back(connection: redis.Redis, keys: list[str], args: list[object]) -> int:
    """The `_HAND_BACK` script; past maxmemory (its LMOVE refused) flagged `allow-oom`: moving ids
    between lists must work there too (`worker.past_maxmemory`). Plain first: a Redis older than 7
    does not read the flag."""
    try:
        return int(connection.register_script(_HAND_BACK)(keys=keys, args=args))
    except redis.exceptions.OutOfMemoryError as exc:
        past_maxmemory.refused("handing grabbed jobs back", exc)
        return int(connection.register_script(past_maxmemory.ALLOW_OOM + _HAND_BACK)(keys=keys, args=args))


def recover(worker: SimpleWorker, queue: Queue, *, max_attempts: int, namespace: str) -> None:
    """Give back the jobs of the workers on `queue` that were found dead (see the module docstring).
    Run under RQ's per-queue maintenance lock; safe against a worker that was only stalled."""
    connection = worker.connection
    cutoff = time.time()
    for raw in connection.zrangebyscore(grabbers_key(queue.key), 0, cutoff):
        name = raw.decode()
        n = _hand_back(
            connection, [grabbed_key(queue.key, name), queue.key, grabbers_key(queue.key)], [name, cutoff]
        )
        if n and n > 0:
            log.warning("handed %d job(s) grabbed by dead worker %s back to queue %s", n, name, queue.name)
    registry_key = queue.started_job_registry.key
    for raw in connection.zrangebyscore(registry_key, 0, cutoff):
        _recover_started(worker, queue, raw.decode(), max_attempts, namespace)


def _recover_started(
    worker: SimpleWorker, queue: Queue, member: str, max_attempts: int, namespace: str
) -> None:
    job_id, _, execution_id = member.partition(":")
    registry_key = queue.started_job_registry.key
    execution = Execution(execution_id, job_id, connection=worker.connection)
    with worker.connection.pipeline() as pipe:
        try:
            # WATCH the job: a late writer ending it meanwhile (rq_writes.finish) wins, and this is
            # skipped; and re-check the entry, which its worker's heartbeat may have renewed.
            pipe.watch(Job.key_for(job_id))
            score = pipe.zscore(registry_key, member)
            if score is None or score > time.time():
                return
            charged = bool(pipe.sismember(at_risk_key(registry_key), member))
            raw = pipe.hgetall(Job.key_for(job_id))
            pipe.multi()
            if not raw:  # the job itself expired: only its bookkeeping is left
                rq_writes.forget_vanished(pipe, registry_key, member)
                pipe.execute()
                return
            job = worker.job_class(job_id, connection=worker.connection, serializer=worker.serializer)
            job.restore(raw)
            if charged and rq_writes.charge_crash(job) >= max_attempts:
                error = InferqError(
                    f"The job was being processed by {max_attempts} worker(s) that died.", code=WORKER_CRASHED
                )
                rq_writes.end_crashed(pipe, job, execution, error, namespace)
            else:
                rq_writes.requeue(pipe, queue, job, execution)
            pipe.execute()
        except redis.WatchError:
            return  # ended or renewed meanwhile; a later pass looks again
    log.warning(
        "job %s of a dead worker %s (%s; crashes %d of %d)",
        job_id,
        "failed" if rq_writes.crashes(job) >= max_attempts else "requeued",
        "charged" if charged else "free of charge",
        rq_writes.crashes(job),
        max_attempts,
    )


def clean_other_registries(queue: Queue) -> None:
    """RQ's registry maintenance for what `recover` does not replace (RQ's `clean_registries` minus
    its started-registry cleanup)."""
    for registry_class in (FinishedJobRegistry, FailedJobRegistry, DeferredJobRegistry):
        registry_class(
            name=queue.name,
            connection=queue.connection,
            job_class=queue.job_class,
            serializer=queue.serializer,
        ).cleanup()
