"""The inferq HTTP api: a Flask application factory.

The api validates uploads, stores them and enqueues RQ jobs (shared.jobs), and reads jobs back.
It keeps no job state in process: any number of api processes may serve one Redis.
"""

from __future__ import annotations

import logging
import queue

from flask import Flask
from redis import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.auth import KeyRing
from api.fairness import Fairness
from api.long_poll import CompletionListener
from api.state import EXTENSION_KEY, ApiState
from shared.config import Settings, get_settings
from shared.jobs import LANES, make_queue
from shared.redis_conn import connect_checked, redact_url, with_options
from shared.redis_policy import check_eviction_policy

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 1.0


def _pool_queue_class() -> type:
    """The queue of free connections of the api's pool: gevent's own under gevent workers. The
    standard library's queue notifies through a Condition that checks it holds its lock by trying to
    take it again; under gevent each such failed try yields to the hub, several times per command."""
    from gevent import monkey

    if monkey.is_module_patched("threading"):
        from gevent.queue import LifoQueue

        return LifoQueue
    return queue.LifoQueue


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the app. Connecting is lazy: the app starts even while Redis is down (readyz says so).

    `redis` (tests, embedding) replaces the client built from `settings.redis_url`; the api's clients
    are copies of its connection settings: a bounded pool for requests, and one for probes with
    other timeouts.
    """
    # Imported here, not at module top: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is
    # first imported, and gunicorn_conf sets that variable before the app module is loaded.
    from api import dashboard, health, metrics, routes
    from api.errors import register_error_handlers
    from api.validation import MULTIPART_OVERHEAD_BYTES

    settings = settings or get_settings()
    if redis is None:
        # The server's version is checked now if Redis answers; if not, /readyz says so.
        redis = connect_checked(settings, client_name="inferq-api", require_reachable=False)
    # At most API_REDIS_CONNECTIONS; a request waits (up to the socket timeout) for a free one.
    redis = with_options(
        redis,
        pool_class=BlockingConnectionPool,
        max_connections=settings.api_redis_connections,
        timeout=redis.connection_pool.connection_kwargs.get("socket_timeout") or 10,
        queue_class=_pool_queue_class(),
    )
    # /readyz and /metrics answer probes and scrapers that have short deadlines of their own:
    # one attempt with short timeouts, instead of the ~2.5 s of retries /v1 routes ride out
    # a Redis restart with.
    redis_probe = with_options(
        redis,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=PROBE_TIMEOUT_SECONDS,
        socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
    )
    # A Redis that may evict job keys is refused (or warned about) before the api serves anything.
    check_eviction_policy(redis_probe, settings, service="api")

    app = Flask(__name__)
    # The default body limit of every route; upload routes set their own (api.validation).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the contract's field order
    app.extensions[EXTENSION_KEY] = ApiState(
        settings=settings,
        redis=redis,
        redis_probe=redis_probe,
        queues={lane: make_queue(redis, settings, lane) for lane in LANES},
        keyring=KeyRing(settings.api_keys),
        operator_keyring=KeyRing(settings.operator_keys),
        listener=CompletionListener(redis, settings.long_poll_recheck_seconds),
        fairness=Fairness(redis, settings),
    )
    register_error_handlers(app)
    metrics.install_request_metrics(app)
    app.register_blueprint(routes.bp)
    app.register_blueprint(health.bp)
    # rq-dashboard at /rq, behind the same auth, read-only unless DASHBOARD_ADMIN (api.dashboard).
    dashboard.install(app)
    log.info(
        "api ready: Redis %s, queues %s, API keys %s",
        redact_url(settings.redis_url) if settings.redis_url else "<given>",
        ", ".join(q.name for q in app.extensions[EXTENSION_KEY].queue_list),
        f"required ({len(settings.api_keys)} configured)" if settings.auth_enabled else "disabled",
    )
    return app
