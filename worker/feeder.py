"""The feeder stage of a batch worker: grab ids, fetch their jobs and images, start them, decode
them, and park each ready for the model thread (`worker.pipeline.ReadyItems`).

The decode step is one injectable callable, `DecodeMany`: images in, one model input or one error
per image out. The default decodes in this thread with the handler's `preprocess_one`; a pool of
decoder processes with the same signature can replace it without any other change. A pool decodes
a grab in chunks (one image per decoder): an idle model thread starts on the first jobs while the
rest decode.

A job that was caught in a worker death before (its `crashes` > 0) may be what kills workers. It is
started alone, only when nothing else of this worker is in flight, and nothing is started after it
until it is written: if it kills this worker too, no neighbour is charged for it. Further such jobs
go back to the head of their queue for later grabs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.suspension import is_suspended
from rq.worker import WorkerStatus

from shared import image_budget
from shared.errors import InferqError
from shared.keys import image_key
from worker import liveness, past_maxmemory, rq_writes
from worker.batching import BatchCollector, Grabbed
from worker.pipeline import ReadyItems
from worker.rq_writes import Running

if TYPE_CHECKING:
    from worker.batch_worker import BatchWorker
    from worker.handler import Handler

log = logging.getLogger("inferq.worker")

# Images in, per image its model input or the error that fails its job (never raises for one image).
DecodeMany = Callable[[Sequence[bytes | None]], list[np.ndarray | InferqError]]

# Blocking dequeue in short slices: a stop request, and a job on a lower lane, are noticed within
# this many seconds by an idle worker.
IDLE_BLOCK_SECONDS = 0.5

# `rq suspend` is read at most this often: each read is a round trip (with RQ's worker heartbeat)
# before the next grab. So a busy worker may start jobs for up to this long after a suspend (RQ's
# own worker reads it once per dequeue, which blocks up to its timeout). The heartbeat thread
# (`worker.liveness`) keeps the worker key alive meanwhile.
SUSPENSION_CHECK_SECONDS = 1.0


def in_thread_decoder(handler: Handler) -> DecodeMany:
    """The default decode step: the handler's `preprocess_one`, one image after the other, here."""

    def decode_many(images: Sequence[bytes | None]) -> list[np.ndarray | InferqError]:
        decoded: list[np.ndarray | InferqError] = []
        for data in images:
            array, error, _ = handler.preprocess_one(data)
            decoded.append(error if error is not None else array)  # type: ignore[arg-type]
        return decoded

    return decode_many


def decode_chunk_size(decode_many: DecodeMany) -> int | None:
    """How many started jobs the feeder decodes at a time, so that an idle model thread can start on
    the first ones while the rest decode: one per decoder of a `DecoderPool` (its only API decodes a
    whole list and returns when all are done; a chunk that fills every decoder keeps them all busy).
    None (the whole grab at once) for another decode step, e.g. the in-thread one."""
    size = getattr(getattr(decode_many, "__self__", None), "size", None)
    return size if isinstance(size, int) and size > 0 else None


@dataclass
class Decoded:
    """A started job whose image went through the decode step: a model input, or its error."""

    running: Running
    array: np.ndarray | None
    error: InferqError | None
    preprocess_ms: float


class InFlight:
    """The jobs this worker started and has not written yet: the heartbeat keeps them alive, the
    feeder waits for them to be written before it starts a suspect job."""

    def __init__(self) -> None:
        self._items: dict[str, Running] = {}
        self._changed = threading.Condition()

    def add(self, running: Sequence[Running]) -> None:
        with self._changed:
            self._items.update((r.job.id, r) for r in running)

    def remove(self, job_ids: Sequence[str]) -> None:
        with self._changed:
            for job_id in job_ids:
                self._items.pop(job_id, None)
            self._changed.notify_all()

    def snapshot(self) -> list[Running]:
        with self._changed:
            return list(self._items.values())

    def wait_until_empty(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: not self._items)


class Feeder:
    def __init__(
        self,
        worker: BatchWorker,
        collector: BatchCollector,
        ready: ReadyItems[Decoded],
        decode_many: DecodeMany,
        in_flight: InFlight,
        grabbed_keys: Sequence[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self.collector = collector
        self.ready = ready
        self.decode_many = decode_many
        self.in_flight = in_flight
        self.grabbed_keys = list(grabbed_keys)
        self.clock = clock
        self._state_before_suspension: str | None = None  # suspended past maxmemory (see there)
        self._suspension_checked_at: float | None = None
        self.decode_chunk = decode_chunk_size(decode_many)

    def run(self, burst: bool) -> None:
        """Until a stop is requested (or, in burst mode, the queues are empty), grab jobs as there is
        room for them, start and decode them. Always ends by closing `ready`."""
        worker = self.worker
        backoff = 0.5
        try:
            while not worker.stop_requested:
                try:
                    if self._suspended_past_maxmemory(burst):
                        continue
                    if worker.should_run_maintenance_tasks:
                        worker.run_maintenance_tasks()
                    room = self.ready.room(IDLE_BLOCK_SECONDS)
                    if worker.stop_requested:
                        # A stop that came meanwhile grabs nothing more: RQ's suspension check above
                        # returns on a stop even while the workers are suspended.
                        break
                    if room == 0:
                        continue
                    grabbed = self._grab(room)
                    if not grabbed:
                        if burst:
                            break
                        continue
                    self._prepare(grabbed, room)
                    backoff = 0.5
                except StopRequested:
                    break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.error("Redis unreachable (%s); retrying in %.1f s", exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    self._hand_back_grabbed()
                except Exception:
                    # Never let the feeder die silently: ids grabbed but not started go back to their
                    # queue now; keep serving the others.
                    log.exception("unexpected error while preparing jobs")
                    time.sleep(1.0)
                    self._hand_back_grabbed()
        finally:
            self.ready.close()

    def _hand_back_grabbed(self) -> None:
        """After an error between a grab and the start: this worker is alive, so no one else would
        give those ids back. Best effort; the next error tries again."""
        worker = self.worker
        try:
            moved = liveness.hand_back_own(
                worker.connection,
                worker.queues,
                worker.name,
                rejoin_ttl=worker.settings.abandoned_after_seconds,
            )
        except redis.exceptions.RedisError as exc:
            log.warning("could not hand grabbed jobs back yet: %s", exc)
            return
        if moved:
            log.warning("handed %d grabbed job(s) back to their queue after an error", moved)

    def _suspended_past_maxmemory(self, burst: bool) -> bool:
        """RQ's suspension check (it waits while the workers are suspended). It also heartbeats the
        worker key, an HSET that a Redis past maxmemory refuses: then the suspension is read on its
        own (the heartbeat thread proves liveness there), and True means: suspended, wait.
        Read at most every SUSPENSION_CHECK_SECONDS (every time while suspended past maxmemory)."""
        worker = self.worker
        clock = self.clock()
        if (
            self._state_before_suspension is None
            and self._suspension_checked_at is not None
            and clock - self._suspension_checked_at < SUSPENSION_CHECK_SECONDS
        ):
            return False
        self._suspension_checked_at = clock
        try:
            worker.check_for_suspension(burst)
        except redis.exceptions.OutOfMemoryError:
            if is_suspended(worker.connection):
                if burst:
                    raise StopRequested() from None
                if self._state_before_suspension is None:
                    log.info("suspended (Redis past maxmemory), run `rq resume` to resume")
                    self._state_before_suspension = worker.get_state()
                    worker.set_state(WorkerStatus.SUSPENDED)
                time.sleep(IDLE_BLOCK_SECONDS)
                return True
        if self._state_before_suspension is not None:  # resumed
            worker.set_state(self._state_before_suspension)
            self._state_before_suspension = None
        return False

    def _grab(self, room: int) -> list[Grabbed]:
        """Up to `room` ids (blocking a short while for the first). Past maxmemory, where the grab's
        LMOVE is refused, through `worker.past_maxmemory.grab` (polling: BLMOVE is refused too)."""
        collector = self.collector
        try:
            first = collector.take_first(IDLE_BLOCK_SECONDS)
        except redis.exceptions.OutOfMemoryError:
            grabbed = self._grab_past_maxmemory(room)
            if not grabbed:
                time.sleep(IDLE_BLOCK_SECONDS)
            return grabbed
        if first is None:
            return []
        try:
            return [first, *collector.take_available(room - 1)]
        except redis.exceptions.OutOfMemoryError:
            return [first, *self._grab_past_maxmemory(room - 1)]

    def _grab_past_maxmemory(self, limit: int) -> list[Grabbed]:
        lanes = [(lane.queue_key, lane.intermediate_key) for lane in self.collector.lanes]
        taken = past_maxmemory.grab(self.worker.connection, lanes, limit, low_share=self.collector.low_share)
        return [Grabbed(lane, job_id) for lane, job_id in taken]

    def _also_grabbed(self, grabbed: Sequence[Grabbed]) -> list[Grabbed]:
        """The ids in this worker's grabbed lists besides `grabbed`."""
        known = {g.job_id for g in grabbed}
        with self.worker.connection.pipeline(transaction=False) as pipe:
            for key in self.grabbed_keys:
                pipe.lrange(key, 0, -1)
            lists = pipe.execute()
        return [
            Grabbed(lane, job_id.decode())
            for lane, ids in enumerate(lists)
            for job_id in ids
            if job_id.decode() not in known
        ]

    def _prepare(self, grabbed: list[Grabbed], room: int) -> None:
        collector = self.collector
        jobs, images = self._fetch([g.job_id for g in grabbed])
        arrivals = [job.enqueued_at.timestamp() for job in jobs.values() if job and job.enqueued_at]
        collector.arrivals.observe(arrivals)
        if len(grabbed) < room and arrivals and collector.waits_for_companions(self.ready.idle()):
            try:
                extra = collector.wait_for_more(collector.max_size - room + len(grabbed), min(arrivals))
            except redis.exceptions.OutOfMemoryError:
                # Past maxmemory (its BLMOVE, or the grab after one, was refused): no more waiting;
                # what it had moved already is in this worker's grabbed lists, and starts now.
                extra = self._also_grabbed(grabbed)
            if extra:
                more_jobs, more_images = self._fetch([g.job_id for g in extra])
                jobs.update(more_jobs)
                images.update(more_images)
                grabbed += extra
        suspects = [g for g in grabbed if rq_writes.crashes(jobs.get(g.job_id)) > 0]
        fresh = [g for g in grabbed if g not in suspects]
        if len(suspects) > 1:
            rq_writes.return_to_queue(
                self.worker.connection, self.worker.queues, self.grabbed_keys, suspects[1:]
            )
        self._start_and_decode(fresh, jobs, images)
        if suspects:
            self.in_flight.wait_until_empty()
            if self._start_and_decode(suspects[:1], jobs, images):
                self.in_flight.wait_until_empty()

    def _start_and_decode(
        self, grabbed: Sequence[Grabbed], jobs: dict[str, Job | None], images: dict[str, bytes | None]
    ) -> int:
        """Start `grabbed` (at risk from here) and hand each to the model thread once decoded."""
        if not grabbed:
            return 0
        worker = self.worker
        started = rq_writes.start_grabbed(
            worker,
            grabbed,
            self.grabbed_keys,
            jobs,
            worker.execution_ttl,
            worker.top_k_of,
            namespace=worker.settings.queue_name,
        )
        if not started:
            return 0
        self.in_flight.add(started)
        step = self.decode_chunk or len(started)
        waiting: list[Decoded] = []
        for first in range(0, len(started), step):
            waiting += self._decode(started[first : first + step], images)
            # An idle model takes what is decoded now; a busy one finds it all with the last chunk
            # (one batch, one round trip to unmark it, as if the grab had been decoded at once).
            if first + step >= len(started) or self.ready.idle():
                self._hand_over(waiting)
                waiting = []
        return len(started)

    def _decode(self, chunk: Sequence[Running], images: dict[str, bytes | None]) -> list[Decoded]:
        """Decode `chunk` (at risk meanwhile): each job's model input or its error."""
        began = self.clock()
        for running in chunk:
            running.enter_risk(began)
        decoded = self.decode_many([images.get(r.job.id) for r in chunk])
        for i, running in enumerate(chunk):
            if images.get(running.job.id) is None:
                # Its image is gone: `image_expired` (or `image_missing`), not a decode error.
                decoded[i] = image_budget.missing_image_error(running.job)
        ended = self.clock()
        for running in chunk:
            running.leave_risk(ended)
        # The decode step reports no per-image time (a pool decodes in parallel): each job is
        # charged an equal share of its chunk's step.
        share_ms = (ended - began) * 1000 / len(chunk)
        return [
            Decoded(running, None, out, share_ms)
            if isinstance(out, InferqError)
            else Decoded(running, out, None, share_ms)
            for running, out in zip(chunk, decoded, strict=True)
        ]

    def _hand_over(self, items: Sequence[Decoded]) -> None:
        """Put decoded jobs ready for the model thread."""
        # Decoded and waiting for the model: a worker death from here on is not these jobs' doing.
        # Unless an idle model takes them all at once: they stay marked into their forward pass
        # (two round trips saved where latency matters most, at light load).
        straight_to_model = self.ready.idle() and len(items) <= self.collector.max_size
        failed = [d.running for d in items if d.error is not None]
        unmark = failed if straight_to_model else [d.running for d in items]
        rq_writes.set_at_risk(self.worker.connection, unmark, at_risk=False)
        for item in items:
            self.ready.put(item)

    def _fetch(self, ids: Sequence[str]) -> tuple[dict[str, Job | None], dict[str, bytes | None]]:
        """Job hashes and image bytes of `ids` in one round trip."""
        worker = self.worker
        with worker.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Job.key_for(job_id))
            pipe.mget([image_key(job_id) for job_id in ids])
            *hashes, blobs = pipe.execute()
        jobs: dict[str, Job | None] = {}
        for job_id, raw in zip(ids, hashes, strict=True):
            job = None
            if raw:
                job = worker.job_class(job_id, connection=worker.connection, serializer=worker.serializer)
                try:
                    job.restore(raw)
                except Exception:
                    log.exception("job %s has unreadable data; skipping it", job_id)
                    job = None
            jobs[job_id] = job
        return jobs, dict(zip(ids, blobs, strict=True))
