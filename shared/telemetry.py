"""Worker telemetry that reaches one `/metrics`: histograms and counters kept in the shared Redis.

The batch workers RECORD, the api's scrape-time collector (`api.metrics`) READS. Per batch a worker
adds to four histograms — queue wait (per job), batch size and inference (per batch that ran a
forward pass), preprocess (per job) — and to the jobs-ended counters (finished; failed by error
code), with commands queued on the pipeline that writes the batch's results anyway
(`worker.rq_writes`): a constant number of commands per batch (at most buckets + 2 per histogram,
whatever the batch size) and no extra round trip.

Every job that ends `failed` (or `expired`) is counted once, under its error code, in the
transaction that ends it, whoever ends it: a worker's batch, its grab (`deadline_expired`), its
timeouts and a dead worker's recovery (`count_ended`), the api or the image sweep ending a queued job
whose image is gone (`shared.image_budget`), and the workers' maintenance for jobs RQ itself failed
(`worker.failed_elsewhere`).

Why workers push to the shared Redis instead of each serving its own `/metrics` (or a Pushgateway):
- nothing to discover: workers are RQ processes without HTTP, started N per machine by a pool or an
  orchestrator, on any number of machines; a scraper would need every worker's address and port;
- works across machines: every worker and every api process already share this Redis, so one scrape
  of ANY api process shows every worker's data (and api processes need no coordination either);
- survives restarts: the counts live in Redis, not in a worker's memory, so a worker that restarts,
  crashes or is scaled away loses nothing it recorded, and the counters never reset with it (they do
  reset with a Redis that loses its data, which Prometheus' `rate()` handles like any counter reset);
- atomic with the results: the increments ride in the same MULTI/EXEC as the batch's results.
Live worker identity (`inferq_worker_info`) is not stored here: it is read from RQ's own worker
registry, whose hashes the workers refresh with their heartbeat and which expire when a worker dies.

Layout (namespaced by QUEUE_NAME, versioned by the `v1` in the key: changing a metric's buckets
needs a new version):
- histogram hash `inferq:telemetry:v1:<QUEUE_NAME>:<metric>`: one field per bucket, named after its
  upper bound (`repr(float)`; `+Inf` above the last bound), holding that bucket's own count (not
  cumulative); plus `sum` and `count`;
- counter hash `inferq:telemetry:v1:<QUEUE_NAME>:jobs_ended`: `finished`, and `failed:<code>` per
  error code.
- the model a worker serves: fields `inferq_model`, `inferq_model_sha256` of its RQ worker hash
  (`rq:worker:<name>`), written with its birth (`worker_info_fields`).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from shared.keys import telemetry_key

JOBS_ENDED = "jobs_ended"
FINISHED_FIELD = "finished"
FAILED_FIELD_PREFIX = "failed:"
INF = "+Inf"

# Fields inferq adds to RQ's worker hash (`rq:worker:<name>`), next to RQ's own (hostname, queues...):
# every field of the model's `model_info`, `name` as `inferq_model` and any other `<key>` as
# `inferq_model_<key>` (so `inferq_model_sha256`, and a backend's name or version once it reports
# them), plus the batch cap the worker chose at warm-up.
WORKER_MODEL_FIELD = "inferq_model"
WORKER_MODEL_SHA256_FIELD = "inferq_model_sha256"
WORKER_BATCH_CAP_FIELD = "inferq_batch_cap"


@dataclass(frozen=True)
class HistogramSnapshot:
    """What a scrape reads back: cumulative `(upper bound, count)` pairs ending with `(inf, count)`."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int


@dataclass(frozen=True)
class RedisHistogram:
    """A Prometheus-style histogram with fixed buckets whose counts live in one Redis hash."""

    name: str  # the Prometheus family name, e.g. `inferq_job_queue_wait_seconds`
    documentation: str
    buckets: tuple[float, ...]  # finite upper bounds, strictly increasing
    _fields: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"{self.name}: buckets must be strictly increasing")
        if not all(math.isfinite(b) for b in self.buckets):
            raise ValueError(f"{self.name}: buckets are finite (+Inf is implied)")
        object.__setattr__(self, "_fields", (*(repr(float(b)) for b in self.buckets), INF))

    @property
    def metric(self) -> str:
        """The last part of the Redis key."""
        return self.name.removeprefix("inferq_")

    def key(self, namespace: str) -> str:
        return telemetry_key(namespace, self.metric)

    def observe(self, pipe: Any, namespace: str, values: Iterable[float]) -> None:
        """Queue the observation of `values` on `pipe` (a redis-py pipeline; not executed here).

        At most one HINCRBY per touched bucket, one HINCRBYFLOAT (sum) and one HINCRBY (count):
        the number of commands does not grow with the number of values."""
        per_field: Counter[str] = Counter()
        total = 0.0
        for value in values:
            value = float(value)
            if math.isnan(value):
                continue
            # `le` semantics: a value equal to a bound falls in that bound's bucket.
            per_field[self._fields[bisect.bisect_left(self.buckets, value)]] += 1
            total += value
        count = sum(per_field.values())
        if not count:
            return
        key = self.key(namespace)
        for name, n in per_field.items():
            pipe.hincrby(key, name, n)
        pipe.hincrbyfloat(key, "sum", total)
        pipe.hincrby(key, "count", count)

    def parse(self, raw: Mapping[bytes | str, bytes | str]) -> HistogramSnapshot:
        """Cumulative buckets from an HGETALL reply (an empty reply: all zero). Fields of bounds
        this version does not know are counted in `+Inf` only (via `count`)."""
        values = {_text(k): _text(v) for k, v in raw.items()}
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, name in zip(self.buckets, self._fields, strict=False):
            running += int(values.get(name, 0))
            cumulative.append((float(bound), running))
        count = int(values.get("count", 0))
        cumulative.append((math.inf, max(count, running)))
        return HistogramSnapshot(cumulative, float(values.get("sum", 0.0)), max(count, running))


# --- the metrics ------------------------------------------------------------------------------------

QUEUE_WAIT = RedisHistogram(
    "inferq_job_queue_wait_seconds",
    "Time from enqueue to a worker starting the job, per job (all lanes).",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
BATCH_SIZE = RedisHistogram(
    "inferq_batch_size",
    "Jobs per forward pass, per batch that ran one (jobs whose image failed to decode are not in it).",
    (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
)
PREPROCESS = RedisHistogram(
    "inferq_job_preprocess_seconds",
    "Decode and preprocessing time of one image, per job (failed decodes included).",
    (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INFERENCE = RedisHistogram(
    "inferq_batch_inference_seconds",
    "Forward-pass time of one batch, per batch that ran one (a batch whose images all failed to decode "
    "runs none).",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HISTOGRAMS: tuple[RedisHistogram, ...] = (QUEUE_WAIT, BATCH_SIZE, PREPROCESS, INFERENCE)


def record_batch(
    pipe: Any,
    *,
    namespace: str,
    queue_ms: Sequence[float],
    preprocess_ms: Sequence[float],
    inference_ms: float,
    batch_size: int,
    finished: int,
    failed_by_code: Mapping[str, int],
) -> None:
    """Queue one batch's telemetry on `pipe` (the pipeline that writes the batch's results).

    `queue_ms` and `preprocess_ms` have one value per job; `inference_ms` and `batch_size` are the
    batch's forward pass, its time and its jobs (0 when none ran: not observed; jobs whose decode
    failed were not in it); `finished` + `failed_by_code` count the jobs' outcomes.
    """
    QUEUE_WAIT.observe(pipe, namespace, (ms / 1000 for ms in queue_ms))
    if batch_size > 0:
        BATCH_SIZE.observe(pipe, namespace, (batch_size,))
    PREPROCESS.observe(pipe, namespace, (ms / 1000 for ms in preprocess_ms))
    if inference_ms > 0:
        INFERENCE.observe(pipe, namespace, (inference_ms / 1000,))
    count_ended(pipe, namespace=namespace, finished=finished, failed_by_code=failed_by_code)


def count_ended(pipe: Any, *, namespace: str, finished: int, failed_by_code: Mapping[str, int]) -> None:
    """Queue the jobs-ended counters on `pipe`: also for jobs that end outside a batch (a worker
    found dead with them, a job timed out)."""
    key = telemetry_key(namespace, JOBS_ENDED)
    if finished:
        pipe.hincrby(key, FINISHED_FIELD, finished)
    for code, n in failed_by_code.items():
        if n:
            pipe.hincrby(key, FAILED_FIELD_PREFIX + code, n)


# --- reading (the api's collector, tests) -----------------------------------------------------------


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    hostname: str
    queues: str
    model: str
    model_sha256: str


@dataclass(frozen=True)
class TelemetrySnapshot:
    histograms: dict[str, HistogramSnapshot]  # by family name
    finished: int
    failed_by_code: dict[str, int]
    workers: list[WorkerInfo]


def worker_info_fields(model_info: Mapping[str, Any] | None, batch_cap: int | None = None) -> dict[str, str]:
    """The fields a worker adds to its RQ hash: the model it serves (empty before it loaded one),
    every field of its `model_info`, and its batch cap once chosen."""
    fields = {WORKER_MODEL_FIELD: "", WORKER_MODEL_SHA256_FIELD: ""}
    for key, value in (model_info or {}).items():
        name = WORKER_MODEL_FIELD if key == "name" else f"{WORKER_MODEL_FIELD}_{key}"
        fields[name] = "" if value is None else str(value)
    if batch_cap:
        fields[WORKER_BATCH_CAP_FIELD] = str(batch_cap)
    return fields


def read_snapshot(redis: Redis, namespace: str, worker_sets: Sequence[str]) -> TelemetrySnapshot:
    """Everything the collector exposes, in two round trips: the histograms, the counters and the
    union of the given RQ workers-by-queue sets; then each of those workers' hash fields. A worker
    whose hash is gone (it died; its key expired) is not live and is left out."""
    from rq.worker import Worker

    with redis.pipeline(transaction=False) as pipe:
        for histogram in HISTOGRAMS:
            pipe.hgetall(histogram.key(namespace))
        pipe.hgetall(telemetry_key(namespace, JOBS_ENDED))
        if worker_sets:
            pipe.sunion(list(worker_sets))
        replies = pipe.execute()
    histograms = {h.name: h.parse(raw) for h, raw in zip(HISTOGRAMS, replies, strict=False)}
    ended = {_text(k): int(v) for k, v in replies[len(HISTOGRAMS)].items()}
    worker_keys = sorted(_text(k) for k in replies[len(HISTOGRAMS) + 1]) if worker_sets else []
    fields = ("hostname", "queues", WORKER_MODEL_FIELD, WORKER_MODEL_SHA256_FIELD)
    workers: list[WorkerInfo] = []
    if worker_keys:
        with redis.pipeline(transaction=False) as pipe:
            for key in worker_keys:
                pipe.hmget(key, fields)
            rows = pipe.execute()
        prefix = Worker.redis_worker_namespace_prefix
        for key, row in zip(worker_keys, rows, strict=True):
            if all(value is None for value in row):
                continue
            hostname, queues, model, sha = (_text(v) if v is not None else "" for v in row)
            workers.append(WorkerInfo(key.removeprefix(prefix), hostname, queues, model, sha))
    return TelemetrySnapshot(
        histograms=histograms,
        finished=ended.get(FINISHED_FIELD, 0),
        failed_by_code={
            name.removeprefix(FAILED_FIELD_PREFIX): n
            for name, n in sorted(ended.items())
            if name.startswith(FAILED_FIELD_PREFIX)
        },
        workers=workers,
    )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
