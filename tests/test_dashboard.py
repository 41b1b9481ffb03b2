"""rq-dashboard mounted at /rq: the api's auth, JSON-serialized jobs everywhere, read-only by default;
and as a user sees it, in a real browser (headless Chromium) on the real service."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from api import create_app
from launch.processes import wait_until
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import make_queue, submit
from tests.browser import Browser
from tests.service import service_stack
from tests.worker_stub import STUB_SHA256, png, stub_worker

KEY = "dashboard-key-0123456789abcdef"
OTHER_KEY = "another-key-0123456789abcdef"


def basic(password: str, user: str = "ops") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AUTH = basic(KEY)
XHR = {"X-Requested-With": "XMLHttpRequest"}


@pytest.fixture
def jobs(redis_url: str, redis_conn: redis.Redis) -> dict[str, Any]:
    """Jobs on both lanes run by a (stub-model) batch worker: finished ones, and one failed per lane."""
    settings = Settings(redis_url=redis_url, max_batch_size=4)
    high, low = make_queue(redis_conn, settings, "high"), make_queue(redis_conn, settings, "low")
    finished = [submit(high, png(40 * i), 3, settings).id for i in range(3)]
    finished.append(submit(low, png(200), 3, settings).id)
    failed = [submit(high, b"not an image", 3, settings).id, submit(low, b"junk junk", 3, settings).id]
    stub_worker(settings).work(burst=True)
    return {"settings": settings, "finished": finished, "failed": failed}


def client_for(redis_url: str, **overrides: Any) -> FlaskClient:
    return create_app(Settings(redis_url=redis_url, **overrides)).test_client()


def test_auth_is_required_when_keys_are_configured(redis_url: str) -> None:
    client = client_for(redis_url, api_keys=OTHER_KEY, operator_keys=KEY)
    for path in ("/rq/", "/rq/0/data/queues.json", "/rq/0/data/workers.json", "/rq/0/view/workers"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.get_json()["error"]["code"] == "unauthorized"
        # A browser can log in: each challenge on a line of its own (Chromium reads one per line).
        assert response.headers.getlist("WWW-Authenticate") == [
            'Bearer realm="inferq"',
            'Basic realm="inferq", charset="UTF-8"',
        ]
        assert client.get(path, headers=basic("wrong-key-0123456789abcdef")).status_code == 401
        # A tenant's key is valid for /v1, not here: the dashboard shows every tenant's jobs.
        tenant = client.get(path, headers=basic(OTHER_KEY))
        assert tenant.status_code == 403 and tenant.get_json()["error"]["code"] == "operator_only", path
        ok = client.get(path, headers=AUTH)
        assert ok.status_code == 200, path
        # No other site can frame it (clickjacking of the admin buttons).
        assert ok.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in ok.headers["Content-Security-Policy"]
        assert client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_without_keys_it_is_open_like_the_loopback_only_api(redis_url: str) -> None:
    assert client_for(redis_url).get("/rq/0/data/queues.json").status_code == 200


def test_queues_workers_and_jobs_are_read_with_the_json_serializer(
    redis_url: str, redis_conn: redis.Redis, jobs: dict[str, Any]
) -> None:
    settings = jobs["settings"]
    # A live worker, busy on a queued job: the workers list reads its current job (JSON).
    busy_on = submit(make_queue(redis_conn, settings), png(7), 2, settings).id
    live = stub_worker(settings, name="dash-live-worker")
    live.register_birth()
    live.set_state(WorkerStatus.BUSY)
    live.set_current_job_id(busy_on)
    client = client_for(redis_url, api_keys=OTHER_KEY, operator_keys=KEY)

    queues = {q["name"]: q for q in client.get("/rq/0/data/queues.json", headers=AUTH).get_json()["queues"]}
    assert set(queues) == {"inferq", "inferq-low"}
    assert queues["inferq"]["finished_job_registry_count"] == 3
    assert queues["inferq"]["failed_job_registry_count"] == 1
    assert queues["inferq-low"]["finished_job_registry_count"] == 1
    assert queues["inferq-low"]["failed_job_registry_count"] == 1
    assert queues["inferq"]["count"] == 1

    workers = client.get("/rq/0/data/workers.json", headers=AUTH).get_json()["workers"]
    assert [w["name"] for w in workers] == ["dash-live-worker"]
    assert workers[0]["state"] == "busy"
    assert workers[0]["queues"] == ["inferq", "inferq-low"]
    assert workers[0]["current_job"]["job_id"] == busy_on
    assert "worker.tasks.classify" in workers[0]["current_job"]["call_string"]

    listed = client.get("/rq/0/data/jobs/inferq/finished/8/asc/1.json", headers=AUTH).get_json()
    assert {job["id"] for job in listed["jobs"]} == set(jobs["finished"][:3])
    assert all(job["exc_info"] is None for job in listed["jobs"])
    failed = client.get("/rq/0/data/jobs/inferq-low/failed/8/asc/1.json", headers=AUTH).get_json()
    assert [job["id"] for job in failed["jobs"]] == [jobs["failed"][1]]
    assert failed["jobs"][0]["exc_info"].startswith("unsupported_image_format")

    done = client.get(f"/rq/0/data/job/{jobs['finished'][0]}.json", headers=AUTH).get_json()
    assert done["status"] == "finished"
    assert done["result"]["model"]["sha256"] == STUB_SHA256
    assert done["result"]["predictions"][0]["label"] == "mean"
    assert '"batch_id"' in done["metadata"] and '"timings"' in done["metadata"]
    bad = client.get(f"/rq/0/data/job/{jobs['failed'][0]}.json", headers=AUTH).get_json()
    assert bad["status"] == "failed" and bad["result"] is None
    assert "unsupported_image_format" in bad["exc_info"]

    for page in (
        "/rq/",
        "/rq/0/view/workers",
        "/rq/0/view/jobs",
        "/rq/0/view/jobs/inferq-low/failed/8/asc/1",
        f"/rq/0/view/job/{jobs['finished'][0]}",
        "/rq/static/js/jquery-3.5.1.min.js",
    ):
        assert client.get(page, headers=AUTH).status_code == 200, page
    # One Redis instance: the dashboard never builds clients from URLs of its own.
    assert client.get("/rq/1/data/queues.json", headers=AUTH).status_code == 404
    live.register_death()


def test_read_only_by_default(redis_url: str, redis_conn: redis.Redis, jobs: dict[str, Any]) -> None:
    client = client_for(redis_url, api_keys=OTHER_KEY, operator_keys=KEY)
    failed_id, done_id = jobs["failed"][0], jobs["finished"][0]
    attempts = [
        ("post", f"/rq/job/{failed_id}/requeue"),
        ("post", f"/rq/job/{done_id}/delete"),
        ("get", "/rq/requeue/inferq"),  # upstream accepts GET here: a link could requeue everything
        ("post", "/rq/requeue/inferq"),
        ("post", "/rq/queue/inferq/failed/empty"),
        ("post", "/rq/queue/inferq/queued/empty"),
        ("post", "/rq/queue/inferq/compact"),
    ]
    for method, path in attempts:
        response = getattr(client, method)(path, headers={**AUTH, **XHR})
        assert response.status_code == 403, (method, path)
        assert response.get_json()["error"]["code"] == "dashboard_read_only"
        assert getattr(client, method)(path).status_code == 401  # auth comes first
    assert Job.fetch(failed_id, connection=redis_conn, serializer=JSONSerializer).get_status() == "failed"
    assert Job.fetch(done_id, connection=redis_conn, serializer=JSONSerializer).get_status() == "finished"
    # The page hides the buttons it may not use (a browser's view of them: below).
    page = client.get("/rq/0/view/jobs/inferq/failed/8/asc/1", headers=AUTH).get_data(as_text=True)
    assert 'id="empty-btn"' not in page


def test_admin_requeues_a_failed_job_by_post_from_the_page_only(
    redis_url: str, redis_conn: redis.Redis, jobs: dict[str, Any]
) -> None:
    client = client_for(redis_url, api_keys=OTHER_KEY, operator_keys=KEY, dashboard_admin=True)
    failed_id = jobs["failed"][0]
    path = f"/rq/job/{failed_id}/requeue"
    # A cross-site form post carries the browser's Basic credentials but cannot add the header.
    forged = client.post(path, headers=AUTH)
    assert forged.status_code == 403 and forged.get_json()["error"]["code"] == "dashboard_csrf"
    assert client.get("/rq/requeue/inferq", headers={**AUTH, **XHR}).status_code == 405

    response = client.post(path, headers={**AUTH, **XHR})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"status": "OK"}
    job = Job.fetch(failed_id, connection=redis_conn, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.QUEUED
    assert failed_id in make_queue(redis_conn, jobs["settings"]).get_job_ids()
    assert failed_id not in FailedJobRegistry("inferq", connection=redis_conn).get_job_ids()
    # Still a JSON job: unpatched, requeue_job re-saves the job with pickle (its meta, read as
    # `{"unserialized": ...}`, is written back pickled), and the api and workers lose its meta.
    meta = json.loads(redis_conn.hget(job.key, "meta"))
    assert meta["attempts"] == 1 and meta["error"]["code"] == "unsupported_image_format"

    # A script with a Bearer token (never sent by a browser on its own) needs no page header.
    other = jobs["failed"][1]
    bearer = {"Authorization": f"Bearer {KEY}"}
    assert client.post(f"/rq/job/{other}/requeue", headers=bearer).status_code == 200
    assert Job.fetch(other, connection=redis_conn, serializer=JSONSerializer).get_status() == JobStatus.QUEUED


def test_another_rq_dashboard_version_refuses_to_load() -> None:
    """The patches are written against one rq-dashboard's internals: another installed version fails
    the import with a message naming both versions, never a dashboard that half works."""
    pretend = (
        "import importlib.metadata as metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '0.10.0' if name == 'rq-dashboard' else real(name)\n"
        "import api.dashboard\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", pretend], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "rq-dashboard 0.10.0 is installed" in result.stderr and "0.9.0" in result.stderr
    # The pinned version loads.
    pinned = subprocess.run(
        [sys.executable, "-c", "import api.dashboard"], cwd=PROJECT_ROOT, capture_output=True, timeout=120
    )
    assert pinned.returncode == 0, pinned.stderr


# --- in a real browser, on the real service ---------------------------------------------------------

QUEUE_NAMES = (
    "return Array.from(document.querySelectorAll('tr[data-role=queue] td:first-child'), td => td.innerText)"
)
JOB_ROWS = "return Array.from(document.querySelectorAll('tr[data-role=job]'), tr => tr.dataset.jobId)"
JOB_STATUS_SHOWN = "return document.querySelector('#job-data').innerText.includes('Status')"
# What read-only mode refuses, as rq-dashboard 0.9.0 renders it (api.dashboard._READ_ONLY_STYLE).
REFUSED_BUTTONS = "#requeue-all-btn, #compact-btn, #requeue-job-btn, [data-role=requeue-job-btn]"


def with_key(base: str, key: str) -> str:
    """`base` with credentials, as a user types them: any user name, the key as password."""
    return base.replace("http://", f"http://ops:{key}@", 1)


def test_a_browser_logs_in_with_http_basic(
    redis_url: str, tmp_path: Path, jobs: dict[str, Any], open_browser: Callable[[], Browser]
) -> None:
    with service_stack(redis_url, tmp_path, workers=0, API_KEYS=OTHER_KEY, OPERATOR_KEYS=KEY) as stack:
        # The operator key as password: the dashboard, its queues filled in by its own scripts (whose
        # requests carry the credentials the browser logged in with).
        operator = open_browser()
        operator.get(f"{with_key(stack.base, KEY)}/rq/")
        assert operator.title == "RQ dashboard", operator.text
        operator.wait_for(QUEUE_NAMES, what="the queues table")
        assert sorted(operator.script(QUEUE_NAMES)) == ["inferq", "inferq-low"]
        operator.get(f"{stack.base}/rq/0/view/jobs/inferq/failed/8/asc/1")  # logged in: no key needed
        operator.wait_for(JOB_ROWS, what="the job list")
        assert operator.script(JOB_ROWS) == [jobs["failed"][0]]

        # No credentials (another browser: nothing remembered): no dashboard. Chromium takes the 401 as
        # a Basic challenge to answer; headless, it has no one to ask and shows its own error page where
        # a desktop browser asks for a login. (Offered only a Bearer challenge, which it cannot answer,
        # it shows the 401's JSON instead.)
        stranger = open_browser()
        stranger.get(f"{stack.base}/rq/")
        assert stranger.title != "RQ dashboard"
        assert stranger.location.startswith("chrome-error://"), stranger.text
        # A tenant's key: the refusal, as the page.
        stranger.get(f"{with_key(stack.base, OTHER_KEY)}/rq/")
        assert stranger.title != "RQ dashboard"
        assert json.loads(stranger.text)["error"]["code"] == "operator_only"


def test_the_read_only_dashboard_shows_no_button_it_refuses(
    redis_url: str, tmp_path: Path, jobs: dict[str, Any], open_browser: Callable[[], Browser]
) -> None:
    failed_id = jobs["failed"][0]
    with service_stack(redis_url, tmp_path, workers=0, API_KEYS=OTHER_KEY, OPERATOR_KEYS=KEY) as stack:
        browser = open_browser()
        site = with_key(stack.base, KEY)
        browser.get(f"{site}/rq/0/view/jobs/inferq/failed/8/asc/1")
        browser.wait_for(JOB_ROWS, what="the job list")
        assert browser.script(JOB_ROWS) == [failed_id]  # the failed job is listed ...
        assert browser.visible("[data-role=requeue-job-btn]") == [False]  # ... without its Requeue
        assert browser.visible("#requeue-all-btn") == [False]
        assert browser.visible("[data-role=delete-job-btn], #empty-btn") == []  # not even rendered
        browser.get(f"{site}/rq/0/view/jobs/inferq/queued/8/asc/1")
        assert browser.visible("#compact-btn") == [False]
        # The job page's script shows its Requeue once it has read that the job failed: still hidden.
        browser.get(f"{site}/rq/0/view/job/{failed_id}")
        browser.wait_for(JOB_STATUS_SHOWN, what="the job's data")
        assert "failed" in browser.text
        assert browser.visible("#requeue-job-btn") == [False]
        assert browser.visible("#delete-job-btn") == []


def test_the_admin_dashboard_shows_its_buttons_and_they_work(
    redis_url: str,
    redis_conn: redis.Redis,
    tmp_path: Path,
    jobs: dict[str, Any],
    open_browser: Callable[[], Browser],
) -> None:
    failed_id = jobs["failed"][0]
    overrides = {"API_KEYS": OTHER_KEY, "OPERATOR_KEYS": KEY, "DASHBOARD_ADMIN": "1"}
    with service_stack(redis_url, tmp_path, workers=0, **overrides) as stack:
        browser = open_browser()
        site = with_key(stack.base, KEY)
        browser.get(f"{site}/rq/0/view/jobs/inferq/queued/8/asc/1")
        assert browser.visible("#compact-btn") == [True]
        browser.get(f"{site}/rq/0/view/job/{failed_id}")
        browser.wait_for(JOB_STATUS_SHOWN, what="the job's data")
        assert browser.visible("#requeue-job-btn, #delete-job-btn") == [True, True]
        browser.get(f"{site}/rq/0/view/jobs/inferq/failed/8/asc/1")
        browser.wait_for(JOB_ROWS, what="the job list")
        assert browser.visible(REFUSED_BUTTONS) == [True, True]  # Requeue All, the row's Requeue
        # The page's own request passes the CSRF guard (jQuery's X-Requested-With): the job is requeued.
        browser.click("[data-role=requeue-job-btn]")
        job = Job.fetch(failed_id, connection=redis_conn, serializer=JSONSerializer)
        wait_until(lambda: job.get_status(refresh=True) == JobStatus.QUEUED, 30, 0.2, "the requeue")
