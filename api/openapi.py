"""The OpenAPI 3.1 document of the HTTP contract, written by hand: the contract is small
and stable, and limits are filled in from the running settings so the document never lies.

The module is over 400 lines because it is the contract document itself, one endpoint after
another; split up, the contract could no longer be read (and reviewed) in one place.
"""

from __future__ import annotations

from typing import Any

from api.validation import RAW_IMAGE_TYPES
from shared.config import Settings
from shared.jobs import DEFAULT_LANE, LANES

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref("Error")}}}


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _multipart_image(image: dict[str, Any]) -> dict[str, Any]:
    """The multipart body both upload endpoints take: one required `image` part (or several)."""
    return {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["image"], "properties": {"image": image}},
        },
    }


def _schemas(settings: Settings) -> dict[str, Any]:
    nullable_number = {"type": ["number", "null"]}
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {
                            "type": "string",
                            "description": "Stable snake_case code.",
                            "example": "corrupt_image",
                        },
                        "message": {"type": "string", "description": "For humans."},
                        "index": {
                            "type": "integer",
                            "description": "POST /v1/batches only: which `image` file (0-based) was refused.",
                        },
                        "id": {
                            "type": "string",
                            "description": "410 `job_expired` only: the id of the expired job.",
                        },
                    },
                }
            },
        },
        "JobCreated": {
            "type": "object",
            "required": ["id", "status", "url"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "example": "queued"},
                "url": {"type": "string", "example": "/v1/jobs/3f8e0a9c-1b2d-4e5f-8a7b-6c5d4e3f2a1b"},
            },
        },
        "Prediction": {
            "type": "object",
            "required": ["label", "index", "score"],
            "properties": {
                "label": {"type": "string"},
                "index": {"type": "integer"},
                "score": {"type": "number"},
            },
        },
        "Job": {
            "type": "object",
            "required": [
                "id",
                "status",
                "result",
                "error",
                "created_at",
                "started_at",
                "ended_at",
                "timings",
            ],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "status": {
                    "type": "string",
                    "enum": ["queued", "started", "finished", "failed", "canceled", "expired"],
                    "description": "`expired`: the job's `deadline_ms` passed before a worker could start "
                    "it (error code `deadline_expired`).",
                },
                "result": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["predictions", "model"],
                            "properties": {
                                "predictions": {
                                    "type": "array",
                                    "items": _ref("Prediction"),
                                    "maxItems": settings.max_top_k,
                                },
                                "model": {
                                    "type": "object",
                                    "description": "The model that served the job; `sha256` is of the "
                                    "`file` actually served (`model.pt` on TorchScript, `model.onnx` on ONNX "
                                    "Runtime and OpenVINO).",
                                    "properties": {
                                        name: {"type": "string"}
                                        for name in ("name", "backend", "backend_version", "file", "sha256")
                                    },
                                },
                            },
                        },
                        {"type": "null"},
                    ]
                },
                "error": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        },
                        {"type": "null"},
                    ]
                },
                "created_at": nullable_time,
                "started_at": nullable_time,
                "ended_at": {
                    **nullable_time,
                    "description": "When the job finished, failed, expired or was canceled; null before.",
                },
                "timings": {
                    "type": "object",
                    "properties": {
                        "queue_ms": {
                            **nullable_number,
                            "description": "From submit to a worker starting the job; null for a job no "
                            "worker started.",
                        },
                        "inference_ms": {
                            **nullable_number,
                            "description": "The forward pass the job was part of; null for a job that had "
                            "none (not started, its image failed to decode or was gone, or it timed out).",
                        },
                        "batch_size": {
                            "type": ["integer", "null"],
                            "description": "Jobs in that forward pass; null when `inference_ms` is.",
                        },
                    },
                },
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
        },
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    top_k = {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": "How many predictions to return (422 `invalid_top_k` outside the range).",
        "schema": {
            "type": "integer",
            "minimum": 1,
            "maximum": settings.max_top_k,
            "default": settings.default_top_k,
        },
    }
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "The id returned at submission (a uuid4); any other value is 404.",
        "schema": {"type": "string", "format": "uuid"},
    }
    priority = {
        "name": "priority",
        "in": "query",
        "required": False,
        "description": "The lane: `high` jobs go first, `low` ones still get a share of every batch "
        "(422 `invalid_priority` for anything else).",
        "schema": {"type": "string", "enum": list(LANES), "default": DEFAULT_LANE},
    }
    deadline = {
        "name": "deadline_ms",
        "in": "query",
        "required": False,
        "description": "Milliseconds from submission within which a worker must START the job; if it "
        "cannot, the job ends with status `expired` (error `deadline_expired`) without running "
        "(422 `invalid_deadline` outside the range).",
        "schema": {"type": "integer", "minimum": 1, "maximum": settings.max_deadline_ms},
    }
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Scoped to the API key. A retry with the same key and the same request (image, "
        "top_k, priority, deadline_ms) returns the first request's job, also after it ended, for as "
        "long as it is kept (410 `job_expired` after that); a different request under the same key "
        "is 409 `idempotency_key_reused`.",
        # What api.validation enforces: 1-255 visible ASCII characters (400 `invalid_idempotency_key`).
        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
    }
    location = {"Location": {"description": "/v1/jobs/<id>", "schema": {"type": "string"}}}
    max_wait = int(settings.max_wait_seconds)
    prefer = {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "RFC 7240. `wait=<seconds>`: answer with the ended job (200; a batch: once every "
        "job has ended) if it ends within that many seconds (at most MAX_WAIT_SECONDS = "
        f"{max_wait}: a longer wait is shortened), else with the 202 once they have passed. A "
        "malformed or zero `wait` and other preferences (`respond-async`) are ignored, never "
        "refused. The wait counts as a long-poll of the key: when it already holds LONG_POLLS_PER_KEY "
        f"({settings.long_polls_per_key}) the preference is declined (a 202 at once, without "
        "`Preference-Applied`).",
        "schema": {"type": "string"},
    }
    preference_applied = {
        "Preference-Applied": {
            "description": "`wait=<seconds>`: the submit waited (up to) that long for its job's end.",
            "schema": {"type": "string"},
        }
    }
    retry_after = {
        "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}
    }
    binary = {"type": "string", "format": "binary"}
    # Every body and `image` part must be the bytes of one image in a supported format (sniffed from
    # the bytes; the declared type is not trusted): anything else is 400/415, whatever its type says.
    raw_bodies = {mime: {"schema": binary} for mime in sorted(RAW_IMAGE_TYPES)}
    www_authenticate = {
        "WWW-Authenticate": {"description": 'Bearer realm="inferq"', "schema": {"type": "string"}}
    }
    unauthorized = {
        "401": {
            **_error("`unauthorized`: API keys are configured and the request has no valid one."),
            "headers": www_authenticate,
        }
    }
    common_errors = {
        **unauthorized,
        "403": _error(
            "`tenant_only`: an operator key (OPERATOR_KEYS), which opens /rq and /metrics, not /v1."
        ),
        "503": {
            **_error("Redis is unreachable (`redis_unavailable`) or at its maxmemory (`redis_full`)."),
            "headers": retry_after,
        },
        "500": _error("Unexpected error (`internal_error`); details are only in the server log."),
    }
    upload_errors = {
        "400": _error(
            "`empty_image`, `corrupt_image`, `missing_image`, `too_many_images`, `invalid_idempotency_key`."
        ),
        "413": _error(
            f"`payload_too_large` (body over {settings.max_upload_bytes} bytes per image) or "
            f"`image_too_large` (over {settings.max_image_pixels} pixels)."
        ),
        "415": _error("`unsupported_media_type` (Content-Type) or `unsupported_image_format` (the bytes)."),
        "409": _error(
            "`idempotency_key_reused` (same Idempotency-Key, different request) or `idempotency_conflict`."
        ),
        "410": _error("`job_expired`: the Idempotency-Key's job has expired."),
        "422": _error("`invalid_top_k`, `invalid_priority`, `invalid_deadline`."),
        "429": {
            **_error(
                f"`rate_limited`: over SUBMIT_RATE_LIMIT ({settings.submit_rate_limit}) for this API key (or "
                "client address); `key_queue_share`: this key already has its share "
                f"({settings.queue_share_per_key:g}) of MAX_QUEUE_DEPTH waiting; `queue_full`: over "
                f"{settings.max_queue_depth} jobs wait in all lanes together; `queued_bytes_full`: over "
                f"{settings.max_queued_bytes} bytes of images wait. Decided from the headers, "
                "before the body is read. `Retry-After`: when the limit allows the request again (for the "
                "queue bounds, the time for the workers, at their recent pace, to make room; 1-60 s)."
            ),
            "headers": retry_after,
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "inferq",
            "version": "1",
            "description": "Asynchronous, micro-batching image classification. Every error body is "
            '`{"error": {"code", "message"}}`.',
        },
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit one image for classification",
                    "description": "The body (raw, or the multipart `image` part) must be the bytes of one "
                    "image: JPEG, PNG, GIF, WebP, BMP or TIFF. The bytes are sniffed (the Content-Type and "
                    "filename are not trusted); anything else is refused (400/415) and nothing is queued.",
                    "parameters": [
                        top_k,
                        priority,
                        deadline,
                        idempotency_key,
                        prefer,
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            **raw_bodies,
                            **_multipart_image(binary),
                        },
                    },
                    "responses": {
                        "200": _json(
                            "With `Prefer: wait`: the job ended within the wait; the body "
                            "`GET /v1/jobs/{job_id}` gives.",
                            _ref("Job"),
                            {**location, **preference_applied},
                        ),
                        "202": _json(
                            "Queued (with `Prefer: wait`: not ended within the wait, its status now).",
                            _ref("JobCreated"),
                            {**location, **preference_applied},
                        ),
                        **upload_errors,
                        **common_errors,
                    },
                }
            },
            "/v1/batches": {
                "post": {
                    "summary": f"Submit up to {settings.max_batch_submit} images at once (all or nothing)",
                    "description": "Every image is validated before any is queued; an error names the "
                    "failing file's `index`.",
                    "parameters": [top_k, priority, deadline, prefer],
                    "requestBody": {
                        "required": True,
                        "content": {
                            **_multipart_image(
                                {
                                    "type": "array",
                                    "items": binary,
                                    "minItems": 1,
                                    "maxItems": settings.max_batch_submit,
                                }
                            )
                        },
                    },
                    "responses": {
                        "200": _json(
                            "With `Prefer: wait`: every job ended within the wait; each as "
                            "`GET /v1/jobs/{job_id}` gives it, in upload order.",
                            {
                                "type": "object",
                                "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
                            },
                            preference_applied,
                        ),
                        "202": _json(
                            "Queued (with `Prefer: wait`: not all ended within the wait; each job's "
                            "status now).",
                            {
                                "type": "object",
                                "properties": {"jobs": {"type": "array", "items": _ref("JobCreated")}},
                            },
                            preference_applied,
                        ),
                        **upload_errors,
                        "413": _error(
                            f"`payload_too_large` (body over {settings.max_batch_upload_bytes} bytes)."
                        ),
                        "422": _error(
                            "`invalid_top_k`, `invalid_priority`, `invalid_deadline`, `too_many_images`."
                        ),
                        **common_errors,
                    },
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "Read a job, optionally long-polling until it ends",
                    "parameters": [
                        job_id,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "Seconds to wait for the job to end; returns as soon as it does "
                            "(422 `invalid_wait` outside the range).",
                            "schema": {"type": "number", "minimum": 0, "maximum": settings.max_wait_seconds},
                        },
                    ],
                    "responses": {
                        "200": _json("The job.", _ref("Job")),
                        "404": _error("`job_not_found` (unknown id, or another API key's job)."),
                        "410": _error(
                            "`job_expired`: the job and its result are no longer kept "
                            f"(answered for EXPIRED_GRACE_SECONDS = {settings.expired_grace_seconds} s "
                            "after that, then 404)."
                        ),
                        "422": _error("`invalid_wait`."),
                        "429": {
                            **_error(
                                "`long_poll_limit`: this key already holds LONG_POLLS_PER_KEY "
                                f"({settings.long_polls_per_key}) long-polls (over all api processes)."
                            ),
                            "headers": retry_after,
                        },
                        **common_errors,
                    },
                },
            },
            "/v1/jobs/{job_id}/cancel": {
                "post": {
                    "summary": "Cancel a queued job",
                    "description": "The job stays readable, with status `canceled` (error `canceled`), for "
                    "as long as a finished job would: a cancel does not delete the job (so there is no "
                    "`DELETE /v1/jobs/{job_id}`).",
                    "parameters": [job_id],
                    "responses": {
                        "200": _json("Canceled; the job, with status `canceled`.", _ref("Job")),
                        "404": _error("`job_not_found` (unknown id, or another API key's job)."),
                        "410": _error("`job_expired`."),
                        "409": _error("`job_not_cancelable`: already started or ended."),
                        **common_errors,
                    },
                },
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness (the process answers; Redis is not checked)",
                    "security": [],
                    "responses": {"200": _json("Alive.", _ref("Status"))},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Redis answers and at least one worker (model loaded) listens; "
                    "the workers are not suspended",
                    "security": [],
                    "responses": {
                        "200": _json("Ready.", _ref("Status")),
                        "503": _json(
                            "Not ready; `reason` says why (briefly). `status` is `suspended` while the "
                            "workers are suspended (`rq suspend`; `rq resume` resumes them), else "
                            "`unavailable`.",
                            _ref("Status"),
                        ),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (an operator route: needs an OPERATOR_KEYS key when keys "
                    "are configured)",
                    "responses": {
                        "200": {"description": "Prometheus text format.", "content": {"text/plain": {}}},
                        **unauthorized,
                        "403": _error("`operator_only`: a tenant's API key, not an operator key."),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1.", "content": {_JSON: {}}}},
                }
            },
        },
        # Applies to every operation that does not override it (the probes and this document do).
        "security": [{"bearer": []}] if settings.auth_enabled else [],
        "components": {
            "schemas": _schemas(settings),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from API_KEYS / API_KEYS_FILE (required on /v1 routes when "
                    "keys are configured), or for /metrics an operator key from OPERATOR_KEYS.",
                }
            },
        },
    }
