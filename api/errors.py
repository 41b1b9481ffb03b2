"""Every error leaves the api as `{"error": {"code", "message"}}` JSON (the contract: api/openapi.py).

That includes Werkzeug's own 404/405/413, Redis outages (503, never a 500 or a hang) and
unexpected exceptions (500 with a generic message: tracebacks, URLs and secrets stay in the log).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, TypeAlias

from flask import Flask, Response, g, jsonify, request
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.errors import InferqError, QueuedBytesFull, RedisFull

log = logging.getLogger(__name__)

# Werkzeug names its exceptions for humans ("Method Not Allowed"); clients get stable snake_case,
# with a few renamed to the codes the contract uses.
_HTTP_CODES = {413: "payload_too_large", 415: "unsupported_media_type"}
# Error replies of a Redis that is up but cannot serve writes (MasterDownError is a ClusterDownError).
_UNAVAILABLE_ERRORS = (OutOfMemoryError, ReadOnlyError, ClusterDownError, TryAgainError)

# Extra response headers: a mapping, or `Headers` where a name repeats (one `WWW-Authenticate` line
# per challenge: a browser reads only the first challenge of a line, RFC 9110's comma list or not).
ResponseHeaders: TypeAlias = Mapping[str, str] | Headers


class ApiError(InferqError):
    """An InferqError raised by the api itself, optionally with extra response headers / fields."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        http_status: int,
        headers: ResponseHeaders | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, http_status=http_status)
        self.headers = Headers(headers)
        self.extra = extra or {}


def error_response(
    code: str,
    message: str,
    status: int,
    headers: ResponseHeaders | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    response = jsonify({"error": {"code": code, "message": message, **(extra or {})}})
    response.status_code = status
    given = Headers(headers)
    for name in dict.fromkeys(given.keys(lower=True)):
        response.headers.setlist(name, given.getlist(name))  # every line of a repeated header
    return response


def _retry_after(exc: QueuedBytesFull | RedisFull) -> str:
    if isinstance(exc, QueuedBytesFull) and exc.retry_after is None:
        from api.capacity import queued_bytes_retry_after
        from api.state import current_state

        state = current_state()
        exc.retry_after = queued_bytes_retry_after(state.redis, state.queue_list, state.settings, exc)
    return str(exc.retry_after)


def payload_too_large(limit: int | None, *, per_image: bool = False) -> ApiError:
    """413 `payload_too_large`, stating the limit the client controls: the body's, or (`per_image`)
    one image's, where the body may add a multipart envelope on top of it."""
    if not limit:
        limit_text = ""
    elif per_image:
        limit_text = f" (an image may be at most {limit:,} bytes)"
    else:
        limit_text = f" (at most {limit:,} bytes)"
    return ApiError(f"the request body is too large{limit_text}", code="payload_too_large", http_status=413)


def _http_code(exc: HTTPException) -> str:
    code = exc.code or 500
    if code in _HTTP_CODES:
        return _HTTP_CODES[code]
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(InferqError)
    def _inferq_error(exc: InferqError) -> Response:
        if isinstance(exc, ApiError):
            return error_response(exc.code, exc.message, exc.http_status, exc.headers, exc.extra)
        if isinstance(exc, QueuedBytesFull | RedisFull):
            return error_response(exc.code, exc.message, exc.http_status, {"Retry-After": _retry_after(exc)})
        return error_response(exc.code, exc.message, exc.http_status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if isinstance(exc, RequestEntityTooLarge):
            # Raised by Werkzeug when Content-Length or a chunked body exceeds the route's limit.
            too_large = g.get("inferq_body_too_large") or payload_too_large(request.max_content_length)
            return _inferq_error(too_large)
        # Keep protocol headers Werkzeug adds (Allow on 405, WWW-Authenticate, Retry-After, ...).
        headers = Headers([(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"])
        message = exc.description or exc.name
        if status == 404:
            message = f"no route for {request.method} {request.path[:200]}"
        if status == 405:
            allowed = headers.get("Allow")
            message = f"{request.method} is not allowed on {request.path[:200]} (allowed: {allowed})"
            if request.method == "DELETE" and request.path.startswith("/v1/jobs/"):
                # Clients written for the DELETE alias the api no longer has (api.routes.cancel_job).
                message += "; a queued job is canceled with POST /v1/jobs/<id>/cancel"
        if status == 408:
            # The body stalled (api.gevent_worker): the rest of it is not worth waiting for.
            headers["Connection"] = "close"
        return error_response(_http_code(exc), message, status, headers)

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def _redis_down(exc: Exception) -> Response:
        # redis-py has already retried with backoff (shared.redis_conn): Redis is really gone or
        # wedged. The exception text names host and port: log it, do not send it.
        log.warning("Redis unavailable on %s %s: %s", request.method, request.path[:200], exc)
        return error_response(
            "redis_unavailable",
            "the job store (Redis) is unreachable; try again shortly",
            503,
            {"Retry-After": "1"},
        )

    @app.errorhandler(ResponseError)
    def _redis_refused(exc: ResponseError) -> Response:
        # A server that is up but cannot take writes (maxmemory reached under noeviction, a
        # read-only replica after a failover, persistence errors) is an outage, not a bug of ours.
        if isinstance(exc, OutOfMemoryError):
            # maxmemory reached under noeviction: the workers free room as they end jobs.
            log.error("Redis is full on %s %s: %s", request.method, request.path[:200], exc)
            return _inferq_error(RedisFull("the job store (Redis) is full; try again later"))
        if isinstance(exc, _UNAVAILABLE_ERRORS) or str(exc).startswith("MISCONF"):
            log.error("Redis refused a command on %s %s: %s", request.method, request.path[:200], exc)
            return error_response(
                "redis_unavailable",
                "the job store (Redis) cannot accept work right now; try again later",
                503,
            )
        return _unexpected(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path[:200])
        return error_response("internal_error", "an unexpected error occurred; it has been logged", 500)
