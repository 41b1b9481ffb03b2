"""Operational routes: liveness, readiness, Prometheus metrics and the OpenAPI document.

/healthz and /readyz stay open (probes carry no credentials) and say no more than a status and a
short reason; /metrics needs an operator key (OPERATOR_KEYS) when keys are configured.

/readyz is not ready while the workers are suspended (`rq suspend` sets `rq:suspended`, which a
Redis with persistence keeps across restarts): they are up but take no job, so jobs would only
wait. Its status is then `suspended` (`make up`'s launcher tells that apart from a service still
starting).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, jsonify
from redis.exceptions import RedisError
from rq.suspension import WORKERS_SUSPENDED
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from api import metrics
from api.auth import require_operator
from api.openapi import openapi_document
from api.state import ApiState, current_state

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)

# /readyz's status while the workers are suspended (other 503s say "unavailable").
SUSPENDED = "suspended"


@bp.get("/healthz")
def healthz() -> dict[str, str]:
    # Liveness: the process answers HTTP. Deliberately no Redis call, so an orchestrator does not
    # restart healthy api processes because Redis is down (readiness says that).
    return {"status": "ok"}


def worker_status(state: ApiState) -> tuple[int, bool]:
    """Workers registered on any lane's queue whose registration key still exists (each counted
    once), and whether the workers are suspended (`rq suspend`), read with them (no extra round trip).

    Same source as `rq.Worker.count(connection, queue=queue)`, but a worker that died without
    deregistering (SIGKILL, OOM) stays in RQ's set until some worker's maintenance cleans it; its
    own key, refreshed by its heartbeat, expires on time, so only those still alive are counted.
    """
    names = state.redis_probe.sunion([WORKERS_BY_QUEUE_KEY % queue.name for queue in state.queue_list])
    if not names:
        return 0, False
    with state.redis_probe.pipeline(transaction=False) as pipe:
        pipe.exists(WORKERS_SUSPENDED)
        for name in names:
            pipe.exists(name)
        suspended, *alive = pipe.execute()
    return sum(alive), bool(suspended)


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    state = current_state()
    try:
        state.redis_probe.ping()
    except RedisError as exc:
        log.warning("readyz: Redis unreachable: %s", exc)
        return _unready("Redis is unreachable")
    try:
        workers, suspended = worker_status(state)
    except RedisError as exc:
        log.warning("readyz: cannot read workers from Redis: %s", exc)
        return _unready("Redis is unreachable")
    if workers < 1:
        # Workers register only once their model is loaded and warmed up. (Probes are
        # unauthenticated: no queue names, counts or addresses here; /metrics has the details.)
        return _unready("no live worker")
    if suspended:
        return _unready(
            "the workers are suspended (rq:suspended is set, by `rq suspend`): they take no job "
            "until `rq resume`",
            status=SUSPENDED,
        )
    return jsonify({"status": "ok"}), 200


def _unready(reason: str, status: str = "unavailable") -> tuple[Response, int]:
    response = jsonify({"status": status, "reason": reason})
    response.headers["Retry-After"] = "1"
    return response, 503


@bp.get("/metrics")
@require_operator
def prometheus_metrics() -> Response:
    state = current_state()
    body, content_type = metrics.render(state.redis_probe, state.queue_list, state.settings)
    return Response(body, mimetype=None, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    return openapi_document(current_state().settings)
