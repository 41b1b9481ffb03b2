"""The writer stage of a batch worker: each batch's endings through `worker.rq_writes`, in order,
while the next forward pass runs; retried while Redis is unreachable, then given up (the jobs'
started-registry entries expire and `worker.liveness` gives them back). A Redis past maxmemory
takes the ends too (`worker.past_maxmemory`): each frees its job's image."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from queue import Queue
from typing import TYPE_CHECKING

import redis

from shared.jobs import META_ATTEMPTS, META_TIMINGS
from worker import rq_writes
from worker.rq_writes import Ending

if TYPE_CHECKING:
    from rq.worker import SimpleWorker

log = logging.getLogger("inferq.worker")

# How long a batch's results are retried against an unreachable Redis before they are given up.
FINISH_RETRY_SECONDS = 60.0

# One batch: how each job ends and the forward pass's time in ms; None ends the stage.
Batch = tuple[list[Ending], float]


def write_batches(
    worker: SimpleWorker,
    batches: Queue[Batch | None],
    done: Callable[[list[str]], None],
    *,
    namespace: str,
    result_ttl: int,
) -> None:
    """Until it gets None: write each batch, then report its job ids to `done` (written or not)."""
    while (batch := batches.get()) is not None:
        endings, inference_ms = batch
        try:
            write_batch(worker, endings, inference_ms, namespace=namespace, result_ttl=result_ttl)
        except Exception:
            log.exception("could not write the results of %d job(s); they will be requeued", len(endings))
        finally:
            done([e.running.job.id for e in endings])


def write_batch(
    worker: SimpleWorker, endings: list[Ending], inference_ms: float, *, namespace: str, result_ttl: int
) -> None:
    deadline = time.monotonic() + FINISH_RETRY_SECONDS
    while True:
        try:
            written, batch_id = rq_writes.finish(
                worker, endings, inference_ms, namespace=namespace, result_ttl=result_ttl
            )
            break
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if time.monotonic() > deadline:
                log.error("results of %d job(s) not written (%s); they will be requeued", len(endings), exc)
                return
            log.warning("could not write results (%s); retrying while Redis comes back", exc)
            time.sleep(1.0)
    if log.isEnabledFor(logging.DEBUG):
        _log_jobs(written, batch_id)
    failed = sum(1 for e in written if e.error is not None)
    log.info(
        "batch of %d done: %d finished, %d failed, inference %.1f ms",
        len(written),
        len(written) - failed,
        failed,
        inference_ms,
        extra={
            "batch_id": batch_id,
            "batch_size": len(written),
            "inference_ms": round(inference_ms, 3),
            "job_ids": [e.running.job.id for e in written],
            "failed": {e.running.job.id: e.error.code for e in written if e.error is not None},
        },
    )


def _log_jobs(written: list[Ending], batch_id: str) -> None:
    """One DEBUG line per job ended, with its own timings. At INFO the batch's line tells each job's
    end (`job_ids`, and `failed`: id -> error code): one line per batch costs the writer less."""
    for e in written:
        job = e.running.job
        log.debug(
            "job ended",
            extra={
                "job_id": job.id,
                "batch_id": batch_id,
                "queue": job.origin,
                "status": "finished" if e.error is None else "failed",
                "code": e.error.code if e.error is not None else None,
                "attempt": job.meta.get(META_ATTEMPTS),
                **job.meta[META_TIMINGS],
            },
        )
