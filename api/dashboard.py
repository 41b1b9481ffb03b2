"""rq-dashboard (0.9.0) mounted in the api at `/rq`: behind the api's own auth, read-only by default.

Every inferq job is an ordinary RQ job, so RQ's dashboard shows the lanes' queues (`inferq`,
`inferq-low`) and registries, the workers with their state and current job, and each job with its
result, metadata (timings, batch id, attempts) and error. What 0.9.0 needs around it (read in
`rq_dashboard/web.py`):

1. JSON everywhere. Its `--json` flag only sets `rq_dashboard.web.config.serializer`, which some code
   paths use (job lists, the job's JSON) and others ignore: `Worker.all` (the workers list reads each
   worker's current job), `Job.fetch` (the job page, delete), `requeue_job` (requeue, requeue-all) and
   `Queue.all` use RQ's default pickle serializer, which cannot read a JSON job (UnpicklingError:
   500). `_patch_rq_dashboard` sets the config and rebinds those module names to JSON-defaulting
   subclasses / a partial. inferq jobs are JSON-only, so the patch is process-wide and idempotent.
2. The connection. Its `push_rq_connection` hook builds a NEW Redis client from
   RQ_DASHBOARD_REDIS_URL on every request that names an instance (`/rq/0/...`: all data requests) -
   a connection pool per request, outside inferq's connection policy. For this app it is dropped and
   the dashboard uses the api's own client (`app.redis_conn`); RQ_DASHBOARD_REDIS_URL holds only the
   redacted URL the page displays. One instance (`0`); any other number is 404.
3. Auth: none upstream (its `add_basic_auth` is one fixed user/password). Here the blueprint's
   first hook is `enforce_operator_or_basic`: the dashboard shows EVERY tenant's jobs, so with keys
   configured it needs an operator key (OPERATOR_KEYS, never a tenant's API key), as
   `Authorization: Bearer <key>` or HTTP Basic with the key as password (what a browser can send).
   Without keys the api, and so `/rq`, only listens on loopback (`shared.bind_policy.check_bind_allowed`).
   Its pages cannot be framed by another site (`X-Frame-Options: DENY`, CSP `frame-ancestors 'none'`):
   no clickjacking of the admin buttons.
4. Destructive actions and CSRF: upstream, requeue-all accepts GET and nothing carries a CSRF token,
   so a page on another site could make an operator's browser (which resends Basic credentials by
   itself) requeue or delete jobs. Here every endpoint not known to be read-only answers 403
   `dashboard_read_only` unless DASHBOARD_ADMIN=1; with it they need POST and either the header
   `X-Requested-With: XMLHttpRequest` (jQuery sends it on the dashboard's own same-origin calls; a
   cross-site form cannot set it, and a cross-site script needs a CORS preflight the api never
   grants) or a Bearer token (never sent by a browser on its own). Read-only, the page shows none of
   the buttons it may not use: RQ_DASHBOARD_DISABLE_DELETE (which follows DASHBOARD_ADMIN) drops Delete
   and Empty; Requeue, Requeue All and Compact, which 0.9.0 always renders and whose failure its
   scripts show nowhere, are hidden by a style rule added to each page (`_hide_refused_buttons`).

Standalone (no auth of its own: keep it on loopback / an SSH tunnel): `rq-dashboard --json
--redis-url redis://... --bind 127.0.0.1 --port 9181` (or RQ_DASHBOARD_REDIS_URL in the environment);
the standalone server keeps the serializer gaps of (1).
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import rq
import rq_dashboard
import rq_dashboard.web as rq_web
from flask import Flask, Response, abort, request
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import Worker

from api.auth import enforce_operator_or_basic
from api.errors import ApiError
from api.state import EXTENSION_KEY, current_state
from shared.redis_conn import redact_url

URL_PREFIX = "/rq"
BLUEPRINT = rq_dashboard.blueprint.name  # "rq_dashboard" (its templates name it: it cannot be renamed)

# Endpoints that only read. Anything else the blueprint has or gains is treated as destructive.
READ_ONLY_ENDPOINTS = frozenset(
    f"{BLUEPRINT}.{name}"
    for name in (
        "static",
        "favicon",
        "queues_overview",
        "workers_overview",
        "jobs_overview",
        "job_view",
        "list_queues",
        "list_jobs",
        "job_info",
        "list_workers",
    )
)


# What follows rebinds names in `rq_dashboard.web` and replaces its hooks: internals of the version
# it was read in. A different one fails at import, by name, instead of serving a half-patched dashboard.
RQ_DASHBOARD_WRITTEN_FOR = "0.9.0"
_installed = importlib.metadata.version("rq-dashboard")
if _installed != RQ_DASHBOARD_WRITTEN_FOR:
    raise ImportError(
        f"api.dashboard patches rq-dashboard {RQ_DASHBOARD_WRITTEN_FOR}'s internals (rq_dashboard.web's "
        f"Job/Queue/Worker/requeue_job names and its push_rq_connection hook); rq-dashboard {_installed} "
        "is installed: check them before changing the pin"
    )


# --- 1. JSON everywhere -----------------------------------------------------------------------------


class _JSONJob(Job):
    def __init__(self, id: str | None = None, connection: Any = None, serializer: Any = None) -> None:
        super().__init__(id, connection=connection, serializer=serializer or JSONSerializer)


class _JSONQueue(Queue):
    def __init__(self, *args: Any, serializer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, serializer=serializer or JSONSerializer, **kwargs)


class _JSONWorker(Worker):
    def __init__(self, *args: Any, serializer: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, serializer=serializer or JSONSerializer, **kwargs)


def _patch_rq_dashboard() -> None:
    rq_web.config.serializer = JSONSerializer
    rq_web.Job = _JSONJob
    rq_web.Queue = _JSONQueue
    rq_web.Worker = _JSONWorker
    rq_web.requeue_job = functools.partial(rq.requeue_job, serializer=JSONSerializer)


_patch_rq_dashboard()


# --- hooks ------------------------------------------------------------------------------------------


def _one_instance() -> None:
    instance = (request.view_args or {}).get("instance_number")
    if instance not in (None, 0):
        abort(404)


def _guard_destructive() -> None:
    if request.endpoint in READ_ONLY_ENDPOINTS:
        return
    if not current_state().settings.dashboard_admin:
        raise ApiError(
            "the dashboard is read-only: set DASHBOARD_ADMIN=1 to allow requeue, delete and empty",
            code="dashboard_read_only",
            http_status=403,
        )
    if request.method != "POST":
        raise ApiError(
            "dashboard actions need POST",
            code="method_not_allowed",
            http_status=405,
            headers={"Allow": "POST"},
        )
    bearer = request.headers.get("Authorization", "").lower().startswith("bearer ")
    if not bearer and request.headers.get("X-Requested-With") != "XMLHttpRequest":
        raise ApiError(
            "dashboard actions come from the dashboard's own page (header X-Requested-With: XMLHttpRequest) "
            "or carry a Bearer token",
            code="dashboard_csrf",
            http_status=403,
        )


# What read-only mode refuses and 0.9.0's templates render anyway: the failed registry's Requeue All and
# each row's Requeue, the job page's Requeue (shown by its script for a failed job, hence !important)
# and the queued registry's Compact. Clicked, they fail silently.
_READ_ONLY_STYLE = (
    "<style>#requeue-all-btn, #compact-btn, #requeue-job-btn, [data-role=requeue-job-btn]"
    " { display: none !important; }</style>"
)


def _hide_refused_buttons(response: Response) -> Response:
    if current_state().settings.dashboard_admin or response.mimetype != "text/html":
        return response
    if response.direct_passthrough:  # a file sent as is: not one of the rendered pages
        return response
    page = response.get_data(as_text=True)
    response.set_data(page.replace("</head>", f"{_READ_ONLY_STYLE}</head>", 1))
    return response


def _no_framing(response: Response) -> Response:
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    return response


def install(app: Flask) -> None:
    """Mount rq-dashboard at `/rq` on `app`, on the api's Redis client, behind its auth."""
    state = app.extensions[EXTENSION_KEY]
    settings = state.settings
    app.config["RQ_DASHBOARD_REDIS_URL"] = (redact_url(settings.redis_url) if settings.redis_url else "",)
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = not settings.dashboard_admin
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 2500)
    app.redis_conn = state.redis  # type: ignore[attr-defined]  # what rq_dashboard.web reads
    app.register_blueprint(rq_dashboard.blueprint, url_prefix=URL_PREFIX)
    # The blueprint's hooks on this app: ours, in order, instead of its per-request connection.
    # (Set on the app, not on the shared blueprint object, which tests register on many apps.)
    hooks = app.before_request_funcs.setdefault(BLUEPRINT, [])
    hooks[:] = [enforce_operator_or_basic, _one_instance, _guard_destructive] + [
        hook for hook in hooks if hook is not rq_web.push_rq_connection
    ]
    app.after_request_funcs.setdefault(BLUEPRINT, []).extend([_hide_refused_buttons, _no_framing])
