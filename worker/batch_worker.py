"""`BatchWorker`: an RQ worker that runs its jobs in micro-batches, in its own process: the RQ
lifecycle (registration, signals, maintenance, liveness) and the wiring of its stages.

It is RQ's `SimpleWorker` (no fork: the model stays loaded, and a CUDA context is never inherited
across a fork) with the dequeue/execute loop replaced by three stages on three threads:
- the feeder (`worker.feeder`) grabs ids (`worker.batching`), starts their jobs and decodes them
  (one injectable decode step), parking each in `worker.pipeline.ReadyItems`;
- the model thread (`worker.model_stage`; the only one that runs torch ops: a second thread would
  start a second OpenMP pool) takes everything ready, up to the batch cap, as one forward pass;
- the writer (`worker.writer`) ends every job of a batch through `worker.rq_writes` (the one module
  that writes what RQ's own worker would) while the next forward pass runs.
Every job stays an ordinary RQ job: `Job.fetch(id).return_value()`, the registries, rq-dashboard
and the worker's counters all see what RQ's own workers would write.

Liveness and recovery of dead workers' jobs: `worker.liveness`. docs: README "Priorities,
deadlines, attempts".
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import sys
import threading
import time
from queue import Queue
from typing import TYPE_CHECKING, Any

import redis
from rq import worker_registration
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker

from shared import image_budget
from shared.config import Settings, get_settings
from shared.errors import ArtifactError, InferqError
from shared.jobs import JOB_TIMEOUT, lane_queue_names
from shared.keys import grabbed_key
from shared.logging_setup import configure_logging_once, set_log_context
from shared.redis_conn import connect_checked
from shared.redis_policy import check_eviction_policy
from shared.telemetry import worker_info_fields
from worker import failed_elsewhere, liveness, past_maxmemory, rq_writes
from worker.batching import BatchCollector, Lane
from worker.decoders import DecoderPool
from worker.feeder import IDLE_BLOCK_SECONDS, Decoded, DecodeMany, Feeder, InFlight, in_thread_decoder
from worker.handler import load_handler
from worker.model import read_manifest
from worker.model_stage import run_batch
from worker.pipeline import ReadyItems
from worker.rq_writes import Ending
from worker.writer import FINISH_RETRY_SECONDS, Batch, write_batches

if TYPE_CHECKING:
    # torch is imported only by the process that runs the model: RQ's worker-pool imports this
    # class in its supervisor process and forks workers from it.
    from worker.handler import Handler

log = logging.getLogger("inferq.worker")

# CPython's GIL switch interval for the worker process (see `work`).
_GIL_SWITCH_SECONDS = 0.0005


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        queues: Any = None,
        *args: Any,
        settings: Settings | None = None,
        handler: Handler | None = None,
        decode_many: DecodeMany | None = None,
        collector_class: type[BatchCollector] = BatchCollector,
        **kwargs: Any,
    ) -> None:
        """`queues`: the lanes' queue names, highest priority first (default: `QUEUE_NAME`'s lanes;
        `rq worker-pool` passes the names on its command line). `handler`: a loaded handler (default:
        loaded by `work`). `decode_many`: the decode step (default: in this process's feeder thread).
        `collector_class`: the grab policy (the bench swaps in another batch-close rule)."""
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
        super().__init__(queues or lane_queue_names(self.settings), *args, **kwargs)
        self.handler = handler
        self.decode_many = decode_many
        self.collector_class = collector_class
        self.execution_ttl = math.ceil(self.settings.abandoned_after_seconds)
        self.in_flight = InFlight()
        # This worker's own reliable-dequeue list per lane (shared.keys.grabbed_key).
        self.grabbed_keys = [grabbed_key(q.key, self.name) for q in self.queues]

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def _shutdown(self) -> None:
        # RQ raises StopRequested from the signal handler when idle; that can land between a grab
        # and the jobs' start. Only set the flag: the loop checks it between batches.
        self._stop_requested = True

    def serialize(self) -> dict:
        """RQ's worker hash, plus every field of the model's `model_info` and the batch cap
        (`shared.telemetry.worker_info_fields`): written with its birth (the model loads first) and
        any re-registration; read by /metrics."""
        if self.handler is None:
            return {**super().serialize(), **worker_info_fields(None)}
        fields = worker_info_fields(self.handler.model_info, self.batch_cap)
        return {**super().serialize(), **fields}

    @property
    def batch_cap(self) -> int:
        """Most jobs per forward pass: the handler's measured cap, never above MAX_BATCH_SIZE."""
        cap = self.handler.batch_cap if self.handler is not None else None
        return min(cap or self.settings.max_batch_size, self.settings.max_batch_size)

    def top_k_of(self, job: Job) -> int:
        try:
            top_k = int(job.args[1])
        except (IndexError, TypeError, ValueError):
            top_k = self.settings.default_top_k
        return min(max(top_k, 1), self.settings.max_top_k)

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
        # Before the model loads: a Redis that may evict job keys is refused (or warned about) at once.
        check_eviction_policy(self.connection, self.settings, service="worker")
        # The decoder processes start while the model loads (each is an interpreter of its own to
        # start), from this thread: a decoder dies with the thread that spawned it.
        decoder_pool = self._spawn_decoder_pool() if self.decode_many is None else None
        try:
            handler = self._start_up(level, date_format, log_format, decoder_pool)
        except BaseException:
            if decoder_pool is not None:
                decoder_pool.close()
            raise
        batch_cap = self.batch_cap
        collector = self.collector_class(
            self.connection,
            [Lane(q.key, grabbed) for q, grabbed in zip(self.queues, self.grabbed_keys, strict=True)],
            max_size=batch_cap,
            max_delay=self.settings.max_batch_delay_ms / 1000,
            low_share=self.settings.low_lane_share,
        )
        self.beat()  # in the grabbers sets before the first grab
        heartbeat = liveness.Heartbeat(self.beat, self.settings.heartbeat_seconds)
        heartbeat.start()
        # Up to two batches ready while one is computed, so a hiccup of the feeder (a slow decode, a
        # Redis round trip) does not leave the model idle (saturation throughput: BENCHMARKS.md);
        # the feeder starts no more jobs than that, the rest stay queued for others.
        ready: ReadyItems[Decoded] = ReadyItems(2 * batch_cap)
        decode_many = self.decode_many or (decoder_pool.decode_many if decoder_pool else None)
        feeder = Feeder(
            self,
            collector,
            ready,
            decode_many or in_thread_decoder(handler),
            self.in_flight,
            self.grabbed_keys,
        )
        batches: Queue[Batch | None] = Queue(maxsize=2)
        feeder_thread = threading.Thread(target=feeder.run, args=(burst,), name="inferq-feeder", daemon=True)
        writer_thread = threading.Thread(
            target=write_batches,
            args=(self, batches, self.in_flight.remove),
            kwargs={"namespace": self.settings.queue_name, "result_ttl": self.settings.result_ttl},
            name="inferq-writer",
            daemon=True,
        )
        feeder_thread.start()
        writer_thread.start()
        done = 0
        try:
            while items := ready.take(batch_cap):
                try:
                    batches.put(run_batch(handler, self.connection, items))
                finally:
                    ready.release()
                done += len(items)
                if max_jobs is not None and done >= max_jobs:
                    self._stop_requested = True
        finally:
            self._stop_requested = True
            feeder_thread.join(timeout=IDLE_BLOCK_SECONDS * 4 + 10)
            batches.put(None)
            writer_thread.join(timeout=FINISH_RETRY_SECONDS + 10)
            heartbeat.stop()
            if decoder_pool is not None:
                decoder_pool.close()
            try:
                liveness.hand_back_own(self.connection, self.queues, self.name, rejoin_ttl=None)
                self.teardown()
            except redis.exceptions.RedisError as exc:
                log.warning("could not deregister from Redis: %s", exc)
        log.info("worker %s stopped after %d jobs", self.name, done)
        return done > 0

    def _start_up(
        self, level: str, date_format: str, log_format: str, decoder_pool: DecoderPool | None
    ) -> Handler:
        """From the model load to the decoders ready: everything before the stages start."""
        if self.handler is None:
            started = time.perf_counter()
            self.handler = load_handler(self.settings)
            log.info(
                "model %s (sha256 %s) loaded and warmed up in %.1f s",
                self.handler.model_info["name"],
                self.handler.model_info["sha256"][:12],
                time.perf_counter() - started,
            )
        handler = self.handler
        if decoder_pool is not None and decoder_pool.input_spec != handler.model.manifest.input:
            # The manifest the decoders were spawned with changed before the model was loaded.
            raise ArtifactError("The artifact's manifest changed while the worker was starting.")
        set_log_context(model_sha256=handler.model_info["sha256"])
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
        if decoder_pool is not None:
            decoder_pool.wait_ready()
            pids = ", ".join(map(str, decoder_pool.pids()))
            log.info("%d decoder processes started (pids %s)", decoder_pool.size, pids)
        return handler

    def _spawn_decoder_pool(self) -> DecoderPool | None:
        """The sandboxed decoder processes (`worker.decoders`), not waited for yet, or None when
        DECODERS=0 asks for decoding on the feeder thread. Their input spec is the manifest's (the
        loaded model checks it is still the same)."""
        if self.handler is not None:
            spec = self.handler.model.manifest.input
        else:
            spec = read_manifest(self.settings.artifact_dir).input
        pool = DecoderPool(spec, self.settings.max_image_pixels, self.settings, wait=False)
        if pool.size == 0:
            pool.close()
            return None
        return pool

    def register_birth(self) -> None:
        """RQ's; past maxmemory the same writes, through `worker.past_maxmemory`
        (`rq_writes.register_birth`)."""
        try:
            super().register_birth()
        except redis.exceptions.OutOfMemoryError as exc:
            past_maxmemory.refused("registering", exc)
            rq_writes.register_birth(self)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's; when written on its own, past maxmemory too (`worker.past_maxmemory`)."""
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        recorded = past_maxmemory.recorder(self.connection)
        super().set_state(state, recorded)
        past_maxmemory.execute(self.connection, recorded, what="setting the worker state", transaction=False)

    def clean_registries(self) -> None:
        """Registry maintenance, run every few seconds: dead workers' jobs given back
        (`worker.liveness.recover`, instead of RQ's abandoned-job cleanup), jobs RQ itself failed
        counted (`worker.failed_elsewhere`), stale workers, and RQ's other registries. Unlike RQ's,
        the per-queue lock lives only a few intervals: a worker killed while holding it must not
        stop everyone's cleanup for RQ's 15 minutes. Logged at debug level, since it runs so often."""
        try:
            self._clean_registries()
        except redis.exceptions.OutOfMemoryError as exc:
            # Past maxmemory the locks (SET) are refused: this round is skipped, the drain goes on
            # (the feeder's grabs, starts and ends do not need it), the next round tries again.
            log.warning("registry maintenance skipped: Redis is full (%s)", exc)
        self.last_cleaned_at = now()

    def _clean_registries(self) -> None:
        lock_ttl = max(10, 3 * int(self.maintenance_interval))
        for queue in self.queues:
            if self.connection.set(queue.registry_cleaning_key, 1, nx=True, ex=lock_ttl):
                log.debug("cleaning registries of queue %s", queue.name)
                try:
                    liveness.recover(
                        self,
                        queue,
                        max_attempts=self.settings.max_attempts,
                        namespace=self.settings.queue_name,
                    )
                    failed_elsewhere.adopt(
                        self.connection,
                        queue,
                        failure_ttl=self.settings.failure_ttl,
                        namespace=self.settings.queue_name,
                    )
                    liveness.clean_other_registries(queue)
                    worker_registration.clean_worker_registry(queue)
                finally:
                    queue.release_maintenance_lock()
        # Queued jobs whose image expired end `image_expired`; MAX_QUEUED_BYTES' count is healed.
        image_budget.sweep(self.connection, self.settings)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's, but without a timeout the key lives `worker_ttl`, not RQ's `worker_ttl + 60` s: RQ's
        suspension check (`is_suspended`, every idle poll) heartbeats that way, which kept a SIGKILLed
        worker in dashboards, /readyz and /metrics for a minute more than `worker_ttl`
        (2 x ABANDONED_AFTER_SECONDS, at least 10 s)."""
        super().heartbeat(timeout or self.worker_ttl, pipeline)

    def beat(self) -> None:
        """Prove liveness: the worker key, this worker's grabbers entries and the started-registry
        entries of the jobs in flight; a job past JOB_TIMEOUT is ended instead (`job_timeout`)."""
        clock = time.monotonic()
        timed_out: list[Ending] = []
        alive = []
        for running in self.in_flight.snapshot():
            if running.risk_seconds(clock) > self.settings.job_timeout:
                limit = self.settings.job_timeout
                error = InferqError(
                    f"The job spent more than {limit:g} s being decoded and in forward passes.",
                    code=JOB_TIMEOUT,
                )
                timed_out.append(Ending(running, error=error))
            else:
                alive.append(running)
        # Past maxmemory too (worker.past_maxmemory): a heartbeat refused there would let this
        # worker's jobs be taken over while it finishes them.
        recorded = past_maxmemory.recorder(self.connection)
        self.heartbeat(self.worker_ttl, pipeline=recorded)
        liveness.keep_grabbing_alive(recorded, self.queues, self.name, self.settings.abandoned_after_seconds)
        for running in alive:
            registry = running.job.started_job_registry
            running.execution.heartbeat(registry, self.execution_ttl, pipeline=recorded)
        created_worker_key = past_maxmemory.execute(self.connection, recorded, what="heartbeat")[0] == 1
        if timed_out:
            written, _ = rq_writes.finish(
                self,
                timed_out,
                0.0,
                namespace=self.settings.queue_name,
                result_ttl=self.settings.result_ttl,
                as_batch=False,
            )
            for e in written:
                log.error(
                    "job ended", extra={"job_id": e.running.job.id, "status": "failed", "code": JOB_TIMEOUT}
                )
            self.in_flight.remove([e.running.job.id for e in timed_out])
        if created_worker_key:
            # The worker key had vanished (Redis restarted without persistence, or it expired
            # during an outage): register again so readiness checks and dashboards see us.
            rq_writes.register_again(self)
            log.warning("worker %s re-registered after its key vanished", self.name)
