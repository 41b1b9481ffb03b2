"""`BatchWorker`: an RQ worker that runs its jobs in micro-batches, in its own process.

It is RQ's `SimpleWorker` (no fork: the model stays loaded, and a CUDA context is never inherited
across a fork) with the dequeue/execute loop replaced (docs/architecture.md) by three stages on three threads:
- the feeder grabs ids reliably (`worker.batching`), fetches jobs and images in one round trip,
  starts them in one pipeline (RQ `Execution`, started registry, job status) and preprocesses each
  (PIL/numpy release the GIL), parking it in `worker.pipeline.ReadyItems`;
- the model thread (the only one that runs torch ops: a second thread would start a second OpenMP
  pool: docs/architecture.md) takes everything ready, up to the batch cap, as one batch: one forward pass;
- the writer finishes every job of a batch through RQ in one pipeline (results, registries,
  counters) while the next forward pass runs.
Every job stays an ordinary RQ job: `Job.fetch(id).return_value()`, the registries, rq-dashboard
and the worker's counters all see what RQ's own workers would write.

Liveness: a heartbeat thread refreshes the worker key and the started-registry entries of the
jobs in flight every `HEARTBEAT_SECONDS`, with a TTL of `ABANDONED_AFTER_SECONDS`. If the process
dies, those entries expire and RQ's own registry cleanup (which these workers run every few
seconds instead of every ten minutes) requeues the jobs while attempts are left.
"""

from __future__ import annotations

import collections
import gc
import logging
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from queue import Queue
from typing import TYPE_CHECKING, Any

import redis
from rq import worker_registration
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from shared.config import Settings, get_settings
from shared.errors import InferqError
from shared.jobs import (
    DEADLINE_EXPIRED,
    META_ATTEMPTS,
    META_BATCH_ID,
    META_DEADLINE,
    META_ERROR,
    META_TIMINGS,
)
from shared.keys import image_key
from shared.logging_setup import configure_logging_once, set_log_context
from shared.redis_conn import connect_checked
from shared.telemetry import record_batch, worker_info_fields
from worker.batching import BatchCollector, Grabbed, Lane
from worker.pipeline import ReadyItems

if TYPE_CHECKING:
    # torch is imported only by the process that runs the model: RQ's worker-pool imports this
    # class in its supervisor process and forks workers from it.
    from worker.handler import ClassifyHandler, ItemOutcome

log = logging.getLogger("inferq.worker")

# Blocking dequeue in short slices: a stop request, and a job on a lower lane, are noticed within
# this many seconds by an idle worker.
_IDLE_BLOCK_SECONDS = 0.5
# How long a batch's results are retried against an unreachable Redis before they are given up
# (the jobs' registry entries then expire and RQ requeues them).
_FINISH_RETRY_SECONDS = 60.0
# CPython's GIL switch interval for the worker process (see `work`).
_GIL_SWITCH_SECONDS = 0.0005


def load_handler(settings: Settings) -> ClassifyHandler:
    """Load and verify the artifact, warm it up and choose its batch cap: done once per worker
    process, before registering."""
    from worker.handler import ClassifyHandler
    from worker.model import load_artifact
    from worker.runner import InferenceRunner, calibration_sizes, choose_batch_cap, default_warm_up_sizes

    model = load_artifact(settings.artifact_dir, device=settings.device)
    runner = InferenceRunner(model, threads=settings.torch_threads)
    auto = settings.auto_batch_cap and settings.max_batch_size > 1
    sizes = (
        calibration_sizes(settings.max_batch_size) if auto else default_warm_up_sizes(settings.max_batch_size)
    )
    runner.warm_up(sizes)
    batch_cap = settings.max_batch_size
    if auto:
        curve = runner.calibrate(sizes)
        batch_cap = choose_batch_cap(curve)
        log.info(
            "batch cap %d of at most %d (forward ms per image: %s)",
            batch_cap,
            settings.max_batch_size,
            ", ".join(f"b{size}={ms:.1f}" for size, ms in curve.items()),
        )
    return ClassifyHandler(model, runner, settings.max_image_pixels, batch_cap=batch_cap)


@dataclass
class _Item:
    """One started job on its way through the stages."""

    job: Job
    execution: Execution
    top_k: int
    data: bytes | None  # the image bytes, for a handler without `preprocess_one`
    array: Any = None  # the model input, once preprocessed
    error: InferqError | None = None  # why it has no model input
    preprocess_ms: float = 0.0


class _Heartbeat(threading.Thread):
    def __init__(self, worker: BatchWorker, interval: float) -> None:
        super().__init__(name="inferq-heartbeat", daemon=True)
        self.worker = worker
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.worker.beat()
            except redis.exceptions.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=self.interval + 1)


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        queues: Any,
        *args: Any,
        settings: Settings | None = None,
        handler: ClassifyHandler | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings or get_settings()
        # RQ's worker-pool forks workers from its supervisor, whose SIGTERM/SIGINT handlers they
        # inherit; until `work()` installs ours (after the model loads) a stop must simply stop us.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # Client data is never unpickled: JSON whatever the caller (e.g. `rq worker`) asked for.
        kwargs["serializer"] = JSONSerializer
        kwargs.setdefault("default_result_ttl", self.settings.result_ttl)
        kwargs.setdefault(
            "maintenance_interval", max(1, math.ceil(self.settings.abandoned_after_seconds / 2))
        )
        kwargs.setdefault("worker_ttl", max(10, math.ceil(self.settings.abandoned_after_seconds * 2)))
        # inferq's connection policy (RESP2 for RQ, timeouts, retries with backoff) even when RQ's
        # CLI or worker-pool built a plain client; the server's version is checked here, at start.
        kwargs["connection"] = connect_checked(
            self.settings, client_name="inferq-worker", base=kwargs.get("connection")
        )
        super().__init__(queues, *args, **kwargs)
        self.handler = handler
        self.execution_ttl = math.ceil(self.settings.abandoned_after_seconds)
        self._in_flight: list[tuple[Job, Execution]] = []  # started, not yet written
        self._in_flight_changed = threading.Condition()

    # --- lifecycle -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        # RQ raises StopRequested from the signal handler when idle; that can land between a
        # BLMOVE and the jobs' start. Only set the flag: the loop checks it between batches.
        self._stop_requested = True

    def serialize(self) -> dict:
        """RQ's worker hash, plus the model this worker serves (`inferq_model`, `inferq_model_sha256`)
        and its batch cap (`inferq_batch_cap`):
        written with its birth (the model loads first) and any re-registration; read by /metrics."""
        model_info = self.handler.model_info if self.handler is not None else None
        fields = {**super().serialize(), **worker_info_fields(model_info)}
        if getattr(self.handler, "batch_cap", None):
            fields["inferq_batch_cap"] = str(self.handler.batch_cap)  # type: ignore[union-attr]
        return fields

    def work(  # type: ignore[override]
        self,
        burst: bool = False,
        logging_level: str | None = None,
        date_format: str = "%H:%M:%S",
        log_format: str = "%(asctime)s %(message)s",
        max_jobs: int | None = None,
        **_: Any,
    ) -> bool:
        level = logging_level or self.settings.log_level
        # LOG_FORMAT lines on the root logger (shared.logging_setup), each with this worker's name and,
        # once loaded, its model's sha256; a process whose logging is set up already keeps its handlers.
        configure_logging_once(service="worker", level=level)
        for name in ("inferq", "worker"):
            logging.getLogger(name).setLevel(level.upper() if isinstance(level, str) else level)
        set_log_context(worker=self.name)
        if self.handler is None:
            started = time.perf_counter()
            self.handler = load_handler(self.settings)
            log.info(
                "model %s (sha256 %s) loaded and warmed up in %.1f s",
                self.handler.model_info["name"],
                self.handler.model_info["sha256"][:12],
                time.perf_counter() - started,
            )
        set_log_context(model_sha256=self.handler.model_info["sha256"])
        self.bootstrap(level, date_format, log_format)
        self._install_signal_handlers()
        # Three busy threads share the GIL here; at CPython's default switch interval the model
        # thread, back from a forward pass (which runs without the GIL), waits a whole interval per
        # hand-over behind the writer's and feeder's Python code, which shows in the p99 under load
        # (BENCHMARKS.md). A shorter interval hands it back sooner. Process-wide, like the worker.
        sys.setswitchinterval(_GIL_SWITCH_SECONDS)
        # torch and the model leave hundreds of thousands of objects behind; a full collection
        # walks them all with the GIL held, stalling all three stages (it showed as the p99 at low
        # load). Frozen, they are never walked again (only objects made from here on are collected).
        gc.collect()
        gc.freeze()
        batch_cap = min(
            getattr(self.handler, "batch_cap", None) or self.settings.max_batch_size,
            self.settings.max_batch_size,
        )
        # Queues in the order given are lanes, highest priority first (`python -m worker` passes
        # all of `shared.jobs.LANES`; `rq worker-pool` passes the names on its command line).
        collector = BatchCollector(
            self.connection,
            [Lane(q.key, q.intermediate_queue_key) for q in self.queues],
            max_size=batch_cap,
            max_delay=self.settings.max_batch_delay_ms / 1000,
            low_share=self.settings.low_lane_share,
        )
        heartbeat = _Heartbeat(self, self.settings.heartbeat_seconds)
        heartbeat.start()
        # Up to two batches ready while one is computed, so a hiccup of the feeder (a slow decode, a
        # Redis round trip) does not leave the model idle (saturation throughput: BENCHMARKS.md);
        # the feeder starts no more jobs than that, the rest stay queued for others.
        ready: ReadyItems[_Item] = ReadyItems(2 * batch_cap)
        finished: Queue[tuple[list[_Item], list[ItemOutcome], float] | None] = Queue(maxsize=2)
        feeder = threading.Thread(
            target=self._feed, args=(collector, ready, burst), name="inferq-feeder", daemon=True
        )
        writer = threading.Thread(target=self._write, args=(finished,), name="inferq-writer", daemon=True)
        feeder.start()
        writer.start()
        done = 0
        try:
            while items := ready.take(batch_cap):
                try:
                    finished.put((items, *self._infer(items)))
                finally:
                    ready.release()
                done += len(items)
                if max_jobs is not None and done >= max_jobs:
                    self._stop_requested = True
        finally:
            self._stop_requested = True
            feeder.join(timeout=_IDLE_BLOCK_SECONDS * 4 + 10)
            finished.put(None)
            writer.join(timeout=_FINISH_RETRY_SECONDS + 10)
            heartbeat.stop()
            try:
                self.teardown()
            except redis.exceptions.RedisError as exc:
                log.warning("could not deregister from Redis: %s", exc)
        log.info("worker %s stopped after %d jobs", self.name, done)
        return done > 0

    def clean_registries(self) -> None:
        """RQ's registry maintenance (abandoned jobs → requeue or fail, stale workers, stuck
        intermediate ids), run every few seconds. Unlike RQ's, the per-queue lock lives only a few
        intervals: a worker killed while holding it must not stop everyone's cleanup for RQ's 15
        minutes. Logged at debug level, since it runs so often."""
        lock_ttl = max(10, 3 * int(self.maintenance_interval))
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_ttl):
                log.debug("cleaning registries of queue %s", queue.name)
                try:
                    clean_registries(queue, self._exc_handlers)
                    worker_registration.clean_worker_registry(queue)
                    queue.intermediate_queue.cleanup(self, queue)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's, but without a timeout the key lives `worker_ttl`, not RQ's `worker_ttl + 60` s: RQ's
        suspension check (`is_suspended`, every idle poll) heartbeats that way, which kept a SIGKILLed
        worker in dashboards, /readyz and /metrics for a minute more than `worker_ttl`
        (2 x ABANDONED_AFTER_SECONDS, at least 10 s)."""
        super().heartbeat(timeout or self.worker_ttl, pipeline)

    def beat(self) -> None:
        """Prove liveness: the worker key and the started-registry entries of the jobs in flight."""
        with self._in_flight_changed:
            in_flight = list(self._in_flight)
        with self.connection.pipeline() as pipe:
            self.heartbeat(self.worker_ttl, pipeline=pipe)
            for job, execution in in_flight:
                execution.heartbeat(job.started_job_registry, self.execution_ttl, pipeline=pipe)
            created_worker_key = pipe.execute()[0] == 1
        if created_worker_key:
            # The worker key had vanished (Redis restarted without persistence, or it expired
            # during an outage): register again so readiness checks and dashboards see us.
            with self.connection.pipeline() as pipe:
                pipe.hset(self.key, mapping=self.serialize())
                worker_registration.register(self, pipe)
                pipe.expire(self.key, self.worker_ttl)
                pipe.execute()
            log.warning("worker %s re-registered after its key vanished", self.name)

    # --- one batch -------------------------------------------------------------------------------

    def _feed(self, collector: BatchCollector, ready: ReadyItems[_Item], burst: bool) -> None:
        """The feeder stage: until a stop is requested (or, in burst mode, the queues are empty),
        grab jobs as there is room for them, start and prepare them. Always ends by closing `ready`."""
        backoff = 0.5
        try:
            while not self._stop_requested:
                try:
                    self.check_for_suspension(burst)
                    if self.should_run_maintenance_tasks:
                        self.run_maintenance_tasks()
                    room = ready.room(_IDLE_BLOCK_SECONDS)
                    if room == 0:
                        continue
                    first = collector.take_first(_IDLE_BLOCK_SECONDS)
                    if first is None:
                        if burst:
                            break
                        continue
                    self._prepare(collector, first, room, ready)
                    backoff = 0.5
                except StopRequested:
                    break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                    log.error("Redis unreachable (%s); retrying in %.1f s", exc, backoff)
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                except Exception:
                    # Never let the feeder die silently: the jobs it had started are requeued by
                    # RQ's cleanup once their heartbeat stops; keep serving the others.
                    log.exception("unexpected error while preparing jobs")
                    time.sleep(1.0)
        finally:
            ready.close()

    def _prepare(
        self, collector: BatchCollector, first: Grabbed, room: int, ready: ReadyItems[_Item]
    ) -> None:
        grabbed = [first, *collector.take_available(room - 1)]
        jobs, images = self._fetch([g.job_id for g in grabbed])
        arrivals = [job.enqueued_at.timestamp() for job in jobs.values() if job and job.enqueued_at]
        collector.arrivals.observe(arrivals)
        if len(grabbed) < room and arrivals and collector.waits_for_companions(ready.idle()):
            extra = collector.wait_for_more(collector.max_size - room + len(grabbed), min(arrivals))
            if extra:
                more_jobs, more_images = self._fetch([g.job_id for g in extra])
                jobs.update(more_jobs)
                images.update(more_images)
                grabbed += extra
        # A job that was started before (its worker died with it) may be what kills workers. It
        # runs alone, started only when nothing else of this worker is in flight and with nothing
        # started after it until it is written, so if it kills this worker too, no neighbour loses
        # an attempt; further suspects go back to their queue's head for the next batches.
        suspects = [g for g in grabbed if self._attempts(jobs.get(g.job_id)) > 0]
        fresh = [g for g in grabbed if g not in suspects]
        if len(suspects) > 1:
            self._return_to_queue(suspects[1:])
        self._start_and_prepare(fresh, jobs, images, ready)
        if suspects:
            self._wait_until_nothing_in_flight()
            if self._start_and_prepare(suspects[:1], jobs, images, ready):
                self._wait_until_nothing_in_flight()

    def _start_and_prepare(
        self,
        items: Sequence[Grabbed],
        jobs: dict[str, Job | None],
        images: dict[str, bytes | None],
        ready: ReadyItems[_Item],
    ) -> int:
        """Start `items` and hand each to the model thread as soon as it is preprocessed."""
        if not items:
            return 0
        started = self._start(items, jobs)
        preprocess_one = getattr(self.handler, "preprocess_one", None)
        for job, execution in started:
            item = _Item(job, execution, self._top_k(job), images.get(job.id))
            if preprocess_one is not None:
                item.array, item.error, item.preprocess_ms = preprocess_one(item.data)
                item.data = None
            ready.put(item)
        return len(started)

    def _wait_until_nothing_in_flight(self) -> None:
        with self._in_flight_changed:
            self._in_flight_changed.wait_for(lambda: not self._in_flight)

    @staticmethod
    def _attempts(job: Job | None) -> int:
        return int(job.meta.get(META_ATTEMPTS, 0)) if job is not None else 0

    def _return_to_queue(self, items: Sequence[Grabbed]) -> None:
        with self.connection.pipeline() as pipe:
            for item in reversed(items):
                queue = self.queues[item.lane]
                pipe.lrem(queue.intermediate_queue_key, 1, item.job_id)
                pipe.lpush(queue.key, item.job_id)
            pipe.execute()

    def _infer(self, items: list[_Item]) -> tuple[list[ItemOutcome], float]:
        """The model stage: one forward pass over the items that have a model input."""
        top_ks = [item.top_k for item in items]
        infer = getattr(self.handler, "infer", None)
        if infer is None:  # a handler with only `handle(images, top_ks)` (e.g. the benchmark's no-op model)
            return self.handler.handle([item.data for item in items], top_ks)  # type: ignore[union-attr]
        from worker.handler import ItemOutcome, PreparedBatch

        prepared = PreparedBatch(outcomes=[])
        for i, item in enumerate(items):
            prepared.outcomes.append(ItemOutcome(error=item.error, preprocess_ms=item.preprocess_ms))
            if item.error is None:
                prepared.ready.append(i)
                prepared.arrays.append(item.array)
        return infer(prepared, top_ks)

    def _write(self, finished: Queue[tuple[list[_Item], list[ItemOutcome], float] | None]) -> None:
        """The writer stage: each batch's outcomes through RQ, in order, retried while Redis is away."""
        while (batch := finished.get()) is not None:
            items, outcomes, inference_ms = batch
            started = [(item.job, item.execution) for item in items]
            deadline = time.monotonic() + _FINISH_RETRY_SECONDS
            try:
                while True:
                    try:
                        self._finish(started, outcomes, inference_ms)
                        break
                    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                        if time.monotonic() > deadline:
                            # Given up: once their heartbeat stops, RQ's cleanup requeues these jobs.
                            log.error(
                                "results of %d job(s) not written (%s); they will be requeued",
                                len(items),
                                exc,
                            )
                            break
                        log.warning("could not write results (%s); retrying while Redis comes back", exc)
                        time.sleep(1.0)
            except Exception:
                log.exception("could not write the results of %d job(s); they will be requeued", len(items))
            finally:
                done = {item.job.id for item in items}
                with self._in_flight_changed:
                    self._in_flight = [(job, ex) for job, ex in self._in_flight if job.id not in done]
                    self._in_flight_changed.notify_all()

    def _fetch(self, ids: Sequence[str]) -> tuple[dict[str, Job | None], dict[str, bytes | None]]:
        """Job hashes and image bytes of `ids` in one round trip."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(Job.key_for(job_id))
            pipe.mget([image_key(job_id) for job_id in ids])
            *hashes, blobs = pipe.execute()
        jobs: dict[str, Job | None] = {}
        for job_id, raw in zip(ids, hashes, strict=True):
            job = None
            if raw:
                job = self.job_class(job_id, connection=self.connection, serializer=self.serializer)
                try:
                    job.restore(raw)
                except Exception:
                    log.exception("job %s has unreadable data; skipping it", job_id)
                    job = None
            jobs[job_id] = job
        return jobs, dict(zip(ids, blobs, strict=True))

    def _top_k(self, job: Job) -> int:
        try:
            top_k = int(job.args[1])
        except (IndexError, TypeError, ValueError):
            top_k = self.settings.default_top_k
        return min(max(top_k, 1), self.settings.max_top_k)

    def _start(self, grabbed: Sequence[Grabbed], jobs: dict[str, Job | None]) -> list[tuple[Job, Execution]]:
        """Mark every runnable job started in one pipeline. Ids whose job is gone or no longer
        queued (canceled) are dropped; jobs past their deadline end `deadline_expired` unstarted."""
        started: list[tuple[Job, Execution]] = []
        expired: list[Job] = []
        wall = time.time()
        with self.connection.pipeline() as pipe:
            for item in grabbed:
                job = jobs.get(item.job_id)
                # Leaving the intermediate list is what tells RQ's cleanup the job did start.
                pipe.lrem(self.queues[item.lane].intermediate_queue_key, 1, item.job_id)
                if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
                    continue
                deadline = job.meta.get(META_DEADLINE)
                if isinstance(deadline, int | float) and wall > deadline:
                    expired.append(job)
                    continue
                job.meta[META_ATTEMPTS] = int(job.meta.get(META_ATTEMPTS, 0)) + 1
                pipe.hset(job.key, "meta", self.serializer.dumps(job.meta))
                execution = Execution.create(job, self.execution_ttl, pipeline=pipe, worker_name=self.name)
                job.prepare_for_execution(self.name, pipeline=pipe)
                started.append((job, execution))
            for job in expired:
                self._write_expired(job, wall, pipe)
            if started:
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                self.set_current_job_id(started[0][0].id, pipeline=pipe)
            with self._in_flight_changed:
                self._in_flight += started
            pipe.execute()
        return started

    def _write_expired(self, job: Job, wall: float, pipe: Any) -> None:
        late_ms = (wall - float(job.meta[META_DEADLINE])) * 1000
        error = InferqError(
            f"The job's deadline passed {late_ms:.0f} ms before a worker could start it.",
            code=DEADLINE_EXPIRED,
        )
        job.ended_at = now()
        self._write_failure(job, None, error, pipe)
        pipe.hset(job.key, "meta", self.serializer.dumps(job.meta))
        pipe.delete(image_key(job.id))

    def _finish(
        self, started: list[tuple[Job, Execution]], outcomes: list[ItemOutcome], inference_ms: float
    ) -> None:
        """Write every job's own result or error through RQ, in one pipeline."""
        started, outcomes = self._still_owned(started, outcomes)
        ended = now()
        result_ttl = self.settings.result_ttl
        batch_id = uuid.uuid4().hex[:16]  # in the logs and job.meta: which jobs shared a forward pass
        with self.connection.pipeline() as pipe:
            for (job, execution), outcome in zip(started, outcomes, strict=True):
                job.ended_at = ended
                assert job.started_at is not None
                queued_at = job.enqueued_at or job.created_at
                job.meta[META_TIMINGS] = {
                    "queue_ms": round((job.started_at - queued_at).total_seconds() * 1000, 3),
                    "preprocess_ms": round(outcome.preprocess_ms, 3),
                    "inference_ms": round(inference_ms, 3),
                    "batch_size": len(started),
                }
                job.meta[META_BATCH_ID] = batch_id
                self.increment_total_working_time(ended - job.started_at, pipe)
                if outcome.error is None:
                    self._write_success(job, execution, outcome.result, result_ttl, pipe)
                else:
                    self._write_failure(job, execution, outcome.error, pipe)
                pipe.hset(job.key, "meta", self.serializer.dumps(job.meta))
                execution.delete(job, pipe)
                pipe.delete(image_key(job.id))
            self.set_current_job_id(None, pipeline=pipe)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            # Histograms and outcome counters for /metrics, in this same transaction (shared.telemetry).
            record_batch(
                pipe,
                namespace=self.settings.queue_name,
                queue_ms=[job.meta[META_TIMINGS]["queue_ms"] for job, _ in started],
                preprocess_ms=[o.preprocess_ms for o in outcomes],
                inference_ms=inference_ms,
                batch_size=len(started),
                finished=sum(1 for o in outcomes if o.error is None),
                failed_by_code=collections.Counter(o.error.code for o in outcomes if o.error is not None),
            )
            pipe.execute()
        for (job, _), outcome in zip(started, outcomes, strict=True):  # one line per job ended
            log.info(
                "job ended",
                extra={
                    "job_id": job.id,
                    "batch_id": batch_id,
                    "queue": job.origin,
                    "status": "finished" if outcome.error is None else "failed",
                    "code": outcome.error.code if outcome.error is not None else None,
                    "attempt": job.meta.get(META_ATTEMPTS),
                    **job.meta[META_TIMINGS],
                },
            )
        failed = sum(1 for o in outcomes if o.error is not None)
        log.info(
            "batch of %d done: %d finished, %d failed, inference %.1f ms",
            len(started),
            len(started) - failed,
            failed,
            inference_ms,
            extra={"batch_id": batch_id, "batch_size": len(started), "inference_ms": round(inference_ms, 3)},
        )

    def _still_owned(
        self, started: list[tuple[Job, Execution]], outcomes: list[ItemOutcome]
    ) -> tuple[list[tuple[Job, Execution]], list[ItemOutcome]]:
        """Drop jobs whose execution left the started registry meanwhile: RQ's cleanup judged this
        worker dead (e.g. it stalled past ABANDONED_AFTER_SECONDS) and requeued them, so another
        worker owns them now and a second result must not be written."""
        with self.connection.pipeline(transaction=False) as pipe:
            for job, execution in started:
                pipe.zscore(job.started_job_registry.key, execution.composite_key)
            scores = pipe.execute()
        kept = [
            (pair, outcome) for pair, outcome, score in zip(started, outcomes, scores, strict=True) if score
        ]
        if len(kept) < len(started):
            log.warning(
                "%d job(s) were requeued while running here; not writing their results",
                len(started) - len(kept),
            )
        return [pair for pair, _ in kept], [outcome for _, outcome in kept]

    def _write_success(
        self, job: Job, execution: Execution, result: dict[str, Any] | None, result_ttl: int, pipe: Any
    ) -> None:
        job._status = JobStatus.FINISHED
        job._result = result
        self.increment_successful_job_count(pipe)
        job._handle_success(
            result_ttl,
            pipeline=pipe,
            worker_name=self.name,
            execution_id=execution.id,
            execution_started_at=execution.created_at,
            execution_ended_at=job.ended_at,
        )
        job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)

    def _write_failure(self, job: Job, execution: Execution | None, error: InferqError, pipe: Any) -> None:
        """The job ends failed with `error` (its code in `job.meta[META_ERROR]`); `execution` is None for
        a job that never started (expired), which this worker's failure counter does not count."""
        job._status = JobStatus.FAILED
        job.meta[META_ERROR] = error.to_dict()
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        if execution is not None:
            self.increment_failed_job_count(pipe)
        job._handle_failure(
            f"{error.code}: {error.message}",
            pipe,
            worker_name=self.name,
            execution_id=execution.id if execution else None,
            execution_started_at=execution.created_at if execution else None,
            execution_ended_at=job.ended_at,
        )
