"""The inferq HTTP api: a Flask application factory.

The api validates uploads, stores them and enqueues RQ jobs (shared.jobs), and reads jobs back.
It keeps no job state in process: any number of api processes may serve one Redis.
"""

from __future__ import annotations

import logging

from flask import Flask
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.auth import KeyRing
from api.state import EXTENSION_KEY, ApiState
from shared.config import Settings, get_settings
from shared.jobs import LANES, make_queue
from shared.redis_conn import blocking_socket_timeout, connect_checked, redact_url, with_options

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 1.0


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> Flask:
    """Build the app. Connecting is lazy: the app starts even while Redis is down (readyz says so).

    `redis` (tests, embedding) replaces the client built from `settings.redis_url`; the clients
    for long-polls and probes are copies of its connection settings with other timeouts.
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
    # Long-polls: a socket_timeout longer than the longest XREAD BLOCK (shared.redis_conn).
    redis_blocking = with_options(redis, socket_timeout=blocking_socket_timeout(settings))
    # /readyz and /metrics answer probes and scrapers that have short deadlines of their own:
    # one attempt with short timeouts, instead of the ~2.5 s of retries /v1 routes ride out
    # a Redis restart with.
    redis_probe = with_options(
        redis,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=PROBE_TIMEOUT_SECONDS,
        socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
    )

    app = Flask(__name__)
    # The default body limit of every route; upload routes set their own (api.validation).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the contract's field order
    app.extensions[EXTENSION_KEY] = ApiState(
        settings=settings,
        redis=redis,
        redis_blocking=redis_blocking,
        redis_probe=redis_probe,
        queues={lane: make_queue(redis, settings, lane) for lane in LANES},
        keyring=KeyRing(settings.api_keys),
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
