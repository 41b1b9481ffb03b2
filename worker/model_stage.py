"""The model stage of a batch worker: one forward pass over a batch of decoded jobs, through the
handler's public API (`PreparedBatch` in, one `ItemOutcome` per job out). The jobs that have a model
input are marked at risk for the pass (a worker death now is charged to them, `worker.liveness`);
jobs whose decode failed only carry their error through."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import redis

from worker import rq_writes
from worker.feeder import Decoded
from worker.rq_writes import Ending

if TYPE_CHECKING:
    from worker.handler import Handler


def run_batch(
    handler: Handler,
    connection: redis.Redis,
    items: Sequence[Decoded],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Ending], float]:
    """One forward pass over `items`; returns how each job ends and the pass's time in ms."""
    # Imported here: worker.handler imports torch, which RQ's worker-pool supervisor must not.
    from worker.handler import PreparedBatch

    prepared = PreparedBatch.of((item.array, item.error, item.preprocess_ms) for item in items)
    at_risk = [items[i].running for i in prepared.ready]
    rq_writes.set_at_risk(connection, [r for r in at_risk if not r.marked], at_risk=True)
    began = clock()
    for running in at_risk:
        running.enter_risk(began)
    try:
        outcomes, inference_ms = handler.infer(prepared, [item.running.top_k for item in items])
    finally:
        ended = clock()
        for running in at_risk:
            running.leave_risk(ended)
    # Only the jobs that had a model input were in the forward pass (one ran if any had one).
    in_pass = set(prepared.ready)
    return [
        Ending(
            item.running,
            outcome.result,
            outcome.error,
            outcome.preprocess_ms,
            forward_pass_size=len(prepared.ready) if i in in_pass else None,
        )
        for i, (item, outcome) in enumerate(zip(items, outcomes, strict=True))
    ], inference_ms
