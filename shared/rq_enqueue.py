"""What RQ writes when it enqueues a job, recorded for the submit's one script (`shared.jobs.submit`).

The writes come from RQ itself: `Queue.enqueue_call` runs as it always does, on a `RecordedWrites`
in place of its pipeline, so the job hash (every field `Job.to_dict` gives), the `rq:queues`
membership and the push on the queue list are RQ's own, byte for byte, and `Job.fetch`, the
registries, rq-dashboard and `rq info` read the job as one that `Queue.enqueue` made.

This module is the one place that knows which keys RQ's enqueue writes: RQ 2.12 writes, for a job
with no dependencies, no job TTL, not scheduled, exactly: `SADD rq:queues <queue key>`, `HSET
rq:job:<id> status queued`, `HSET rq:job:<id> <the job's fields>` and `RPUSH <queue key> <id>`. It
is checked at import (the RQ version) and at every enqueue (the commands): an RQ that writes
anything else (a registry entry, a TTL, another key) stops the submit with an error naming it,
rather than leaving a job half-written where RQ's readers would look for the rest.
"""

from __future__ import annotations

from typing import Any

import rq
from rq import Queue, Retry
from rq.job import Job

from shared.recorded_writes import RecordedWrites

RQ_WRITTEN_FOR = "2.12."
if not rq.__version__.startswith(RQ_WRITTEN_FOR):
    raise ImportError(
        f"shared.rq_enqueue records the writes of RQ {RQ_WRITTEN_FOR}x's enqueue for the submit script; "
        f"RQ {rq.__version__} is installed: check what its Queue.enqueue_call writes before changing the pin"
    )


class UnexpectedRqWrite(RuntimeError):
    """RQ's enqueue wrote something the submit script was not written for (another RQ version)."""


def enqueue(
    queue: Queue,
    writes: RecordedWrites,
    func: str,
    *,
    args: tuple[Any, ...],
    job_id: str,
    timeout: int,
    result_ttl: int,
    failure_ttl: int,
    description: str,
    meta: dict[str, Any],
    retry: Retry | None,
) -> Job:
    """Record on `writes` what `queue.enqueue_call(...)` with these arguments writes (no job TTL:
    a queued job hash has none), after checking that it is only what RQ 2.12 writes."""
    recorded = RecordedWrites()
    job = queue.enqueue_call(
        func,
        args=args,
        job_id=job_id,
        timeout=timeout,
        result_ttl=result_ttl,
        failure_ttl=failure_ttl,
        ttl=None,
        description=description,
        meta=meta,
        retry=retry,
        pipeline=recorded,  # type: ignore[arg-type]
    )
    expected = {("SADD", queue.redis_queues_keys), ("HSET", job.key), ("RPUSH", queue.key)}
    found = {(name, key) for name, key, *_ in recorded.commands}
    if found != expected or len(recorded.commands) != 4:
        raise UnexpectedRqWrite(
            f"RQ {rq.__version__}'s enqueue wrote {[c[:2] for c in recorded.commands]}; the submit script "
            f"was written for RQ {RQ_WRITTEN_FOR}x's {sorted(expected)}"
        )
    writes.extend(recorded)
    return job
