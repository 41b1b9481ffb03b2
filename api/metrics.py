"""Prometheus metrics of the api.

Request metrics are labelled by route TEMPLATE (`/v1/jobs/<job_id>`), never by the raw path, and
by method from a fixed set (anything else is `<other>`), so job ids, scanners' junk URLs and invented
methods cannot blow up the series count.

Under gunicorn several processes serve /metrics in turn, so each process's counters alone would
be a random slice. With PROMETHEUS_MULTIPROC_DIR set (api/gunicorn_conf.py sets it) prometheus-client
writes every sample to a per-process file and a scrape adds them all up. That variable must be set
before prometheus_client is imported, which is why metric objects live in this module and are only
created once `create_app` imports it.

Queue state (depth, jobs in progress, workers per lane; the total backlog and the recent completion
rate behind a 429's Retry-After) is global, not per process: it is read from Redis at scrape time by a
custom collector, so every process reports the same truth.

Worker telemetry (queue wait, batch size, preprocess and inference histograms, jobs finished/failed by
error code, the live workers and the model each serves) is recorded into the shared Redis by the
workers, and by the api and the image sweep for the jobs they end (`shared.telemetry`, which says
why), and read here at scrape time the same way: one scrape of any api process shows every worker,
on every machine, and a worker restart loses nothing.

Submissions (`inferq_jobs_submitted_total{lane}`, and the `job submitted` log line that starts a
job's trail) are noted after the response of a successful submit, from the jobs the route says it
enqueued (`note_enqueued`; an idempotent replay enqueues none); a submit that waits for its jobs'
end (`Prefer: wait`) notes them as soon as they are enqueued.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from api.capacity import completion_rate
from shared.config import Settings
from shared.jobs import DEFAULT_LANE
from shared.telemetry import HISTOGRAMS, read_snapshot

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "inferq_http_requests_total",
    "HTTP requests answered by the api, by method, route template and status code.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "inferq_http_request_duration_seconds",
    "Time to answer an HTTP request (long-polls included), by method, route template and status code.",
    ["method", "route", "status"],
    # Submits take milliseconds; long-polls up to MAX_WAIT_SECONDS.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60),
)

SUBMITTED = Counter(
    "inferq_jobs_submitted_total",
    "Jobs enqueued by the api, by priority lane (idempotent replays not counted).",
    ["lane"],
)

# The README's metrics table says the same of it (tests/test_telemetry.py holds them together).
JOBS_FAILED_HELP = (
    "Jobs that ended failed or expired (deadline_expired), by error code, each counted once whoever "
    "ended it: a worker (its batch, its grab past a deadline, a timeout, a dead worker's job: "
    "worker_crashed), the api or the image sweep (a queued job whose image is gone: image_expired, or "
    "deadline_expired past its deadline), or RQ itself (internal_error: its registry cleanup, run by "
    "rq info or a dashboard, failing a dead worker's job; counted by the workers' maintenance)."
)

UNMATCHED_ROUTE = "<unmatched>"
# Label values come from fixed sets: a client inventing methods must not grow the series count.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "<other>"
SUBMIT_ENDPOINTS = ("v1.create_job", "v1.create_batch")
submissions_log = logging.getLogger("inferq.api")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def install_request_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.inferq_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        # after_request also runs for responses made by error handlers (4xx, 503, 500).
        started = g.get("inferq_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
            method = request.method if request.method in KNOWN_METHODS else OTHER_METHOD
            count, latency = _request_series(method, route, response.status_code)
            count.inc()
            latency.observe(time.perf_counter() - started)
        if request.endpoint in SUBMIT_ENDPOINTS and response.status_code == 202:
            _note_submissions(g.get("inferq_enqueued"))
        return response


# The children of REQUESTS and LATENCY by label values (bounded: fixed methods, route templates,
# status codes), so a request skips prometheus_client's label lookup and its lock.
_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _request_series(method: str, route: str, status: int) -> tuple[Any, Any]:
    key = (method, route, status)
    series = _series.get(key)
    if series is None:
        labels = (method, route, str(status))
        series = _series[key] = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
    return series


def note_enqueued(job_ids: list[str], *, now: bool = False) -> None:
    """Called by a submit route with the jobs this request enqueued (none for an idempotent replay):
    counted and logged once its 202 is answered, or `now` (a submit that waits for its jobs' end,
    `api.prefer`: their trail must start before their worker's lines)."""
    if now:
        _note_submissions(job_ids)
    else:
        g.inferq_enqueued = job_ids


def _note_submissions(ids: list[str] | None) -> None:
    if not ids:
        return  # nothing new was enqueued (an idempotent replay)
    try:
        _count_and_log(ids)
    except Exception:  # bookkeeping must never fail a submit that succeeded
        log.warning("could not note a submission", exc_info=True)


def _count_and_log(ids: list[str]) -> None:
    """Count the jobs a submit created and log `job submitted` for each (the start of its trail)."""
    from api.state import current_state

    settings = current_state().settings
    lane = request.args.get("priority") or DEFAULT_LANE
    top_k = int(request.args.get("top_k") or settings.default_top_k)
    sizes = _upload_sizes()
    deadline = request.args.get("deadline_ms")
    SUBMITTED.labels(lane).inc(len(ids))
    for i, job_id in enumerate(ids):
        fields = {
            "job_id": job_id,
            "lane": lane,
            "bytes": sizes[i] if len(sizes) == len(ids) else None,
            "top_k": top_k,
        }
        if deadline is not None:
            fields["deadline_ms"] = int(deadline)
        submissions_log.info("job submitted", extra=fields)


def _upload_sizes() -> list[int | None]:
    """Bytes of each uploaded image: the multipart `image` parts, or the raw body."""
    files = request.files.getlist("image") if request.mimetype == "multipart/form-data" else []
    if not files:
        return [request.content_length]
    sizes: list[int | None] = []
    for part in files:
        try:
            position = part.stream.tell()
            part.stream.seek(0, os.SEEK_END)
            sizes.append(part.stream.tell())
            part.stream.seek(position)
        except (OSError, AttributeError, ValueError):
            sizes.append(None)
    return sizes


class QueueCollector(Collector):
    """Per lane: queue depth, jobs in progress, registered workers; plus the backlog of all lanes and
    the recent completion rate (api.capacity), read from Redis at scrape time."""

    def __init__(self, redis: Redis, queues: Sequence[Queue], settings: Settings) -> None:
        self.redis = redis
        self.queues = list(queues)
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("inferq_redis_up", "1 if Redis answered this scrape, else 0.")
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.llen(queue.key)
                    pipe.zcard(queue.started_job_registry.key)
                    pipe.scard(WORKERS_BY_QUEUE_KEY % queue.name)
                values = pipe.execute()
            completed_per_second = completion_rate(self.redis, self.queues, self.settings)
        except RedisError as exc:
            # A scrape must still succeed (it is how an outage is seen): report Redis down instead.
            log.warning("metrics: cannot read queue state from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = [
            GaugeMetricFamily(
                "inferq_queue_depth", "Jobs waiting in the queue for a worker.", labels=["queue"]
            ),
            GaugeMetricFamily(
                "inferq_jobs_in_progress", "Jobs started by a worker and not yet ended.", labels=["queue"]
            ),
            GaugeMetricFamily("inferq_workers", "Workers registered on the queue.", labels=["queue"]),
        ]
        for i, queue in enumerate(self.queues):
            for j, family in enumerate(families):
                family.add_metric([queue.name], int(values[3 * i + j]))
        yield from families
        backlog = GaugeMetricFamily(
            "inferq_backlog", "Jobs waiting in all priority lanes (compared with MAX_QUEUE_DEPTH)."
        )
        backlog.add_metric([], sum(int(values[3 * i]) for i in range(len(self.queues))))
        yield backlog
        rate = GaugeMetricFamily(
            "inferq_completion_rate",
            "Jobs per second that ended (finished or failed) over the last THROUGHPUT_WINDOW_SECONDS, "
            "all lanes: the rate a 429's Retry-After is computed from.",
        )
        rate.add_metric([], completed_per_second)
        yield rate


class WorkerTelemetryCollector(Collector):
    """What the workers recorded in Redis (`shared.telemetry`), read at scrape time in two round trips:
    the histograms and counters (one HGETALL each) with the live workers' names, then their hashes."""

    def __init__(self, redis: Redis, queues: Sequence[Queue], settings: Settings) -> None:
        self.redis = redis
        self.queues = list(queues)
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        try:
            snapshot = read_snapshot(
                self.redis, self.settings.queue_name, [WORKERS_BY_QUEUE_KEY % q.name for q in self.queues]
            )
        except RedisError as exc:  # QueueCollector reports inferq_redis_up 0
            log.debug("metrics: cannot read worker telemetry from Redis: %s", exc)
            return
        for histogram in HISTOGRAMS:
            data = snapshot.histograms[histogram.name]
            family = HistogramMetricFamily(histogram.name, histogram.documentation)
            family.add_metric(
                [], [(floatToGoString(bound), count) for bound, count in data.buckets], sum_value=data.sum
            )
            yield family
        finished = CounterMetricFamily(
            "inferq_jobs_finished", "Jobs that ended with a result, all workers (recorded in Redis)."
        )
        finished.add_metric([], snapshot.finished)
        yield finished
        failed = CounterMetricFamily("inferq_jobs_failed", JOBS_FAILED_HELP, labels=["code"])
        for code, count in snapshot.failed_by_code.items():
            failed.add_metric([code], count)
        yield failed
        live = GaugeMetricFamily(
            "inferq_workers_live", "Live workers on any lane (each counted once; its RQ key still exists)."
        )
        live.add_metric([], len(snapshot.workers))
        yield live
        info = GaugeMetricFamily(
            "inferq_worker_info",
            "1 per live worker: its RQ name, host, queues and the model (name, sha256) it serves.",
            labels=["worker", "hostname", "model", "model_sha256", "queues"],
        )
        for worker in snapshot.workers:
            info.add_metric(
                [worker.name, worker.hostname, worker.model, worker.model_sha256, worker.queues], 1
            )
        yield info


def render(redis: Redis, queues: Sequence[Queue], settings: Settings) -> tuple[bytes, str]:
    if multiprocess_dir():
        process_registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(process_registry)
    else:
        process_registry = REGISTRY
    # A registry per scrape for the Redis-backed collector: apps (and tests) come and go, the
    # global registry would keep each one's collector forever.
    live_registry = CollectorRegistry()
    live_registry.register(QueueCollector(redis, queues, settings))
    live_registry.register(WorkerTelemetryCollector(redis, queues, settings))
    return generate_latest(process_registry) + generate_latest(live_registry), CONTENT_TYPE_LATEST
