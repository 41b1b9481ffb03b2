"""Prometheus metrics of the api.

Request metrics are labelled by route TEMPLATE (`/v1/jobs/<path:job_id>`), never by the raw path,
so job ids and scanners' junk URLs cannot blow up the series count.

Under gunicorn several processes serve /metrics in turn, so each process's counters alone would
be a random slice. With PROMETHEUS_MULTIPROC_DIR set (api/gunicorn_conf.py sets it) prometheus-client
writes every sample to a per-process file and a scrape adds them all up. That variable must be set
before prometheus_client is imported, which is why metric objects live in this module and are only
created once `create_app` imports it.

Queue state (depth, jobs in progress, workers per lane; the total backlog and the recent completion
rate behind a 429's Retry-After) is global, not per process: it is read from Redis at scrape time by a
custom collector, so every process reports the same truth.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence

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
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from api.capacity import ended_recently
from shared.config import Settings

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

UNMATCHED_ROUTE = "<unmatched>"


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
            labels = (request.method, route, str(response.status_code))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - started)
        return response


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
            ended = ended_recently(self.redis, self.queues, self.settings)
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
            "all lanes.",
        )
        rate.add_metric([], ended / self.settings.throughput_window_seconds)
        yield rate


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
    return generate_latest(process_registry) + generate_latest(live_registry), CONTENT_TYPE_LATEST
