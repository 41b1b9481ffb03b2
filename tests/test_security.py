"""API keys, per-key job isolation, the bind rule, secrets in logs, and the reliability contract of
the api (bounded queue with a computed Retry-After, idempotency, 410 after expiry, lanes, deadlines).

In-process (Flask test client) against the session's throwaway Valkey, no worker; two tests start
the real gunicorn.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Blueprint, Flask
from flask.testing import FlaskClient
from pydantic import ValidationError
from rq import Worker
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

import api.auth
from api import create_app
from api.auth import enforce_api_key_or_basic, owner_id
from launch.redis_server import EmbeddedRedis
from shared.bind_policy import BindNotAllowed, check_bind_allowed
from shared.config import Settings, hash_api_key
from shared.keys import image_key, known_key
from shared.log_redaction import REDACTED, install_redaction, redact
from tests.factories import settings_for
from tests.service import free_port, http_ok, run_module, service_env, start_api, stop, wait_until

KEY_A = "alpha-key-0123456789abcdef"
KEY_B = "bravo-key-0123456789abcdef"
KEY_C = "charlie-key-0123456789abcdef"
KEY_OPS = "operator-key-0123456789abcdef"
HIGH = "rq:queue:inferq"
LOW = "rq:queue:inferq-low"
PNG = "coffee.png"
JPEG = "rocket.jpg"
UNKNOWN_ID = "0b7e3a4c-9d2f-4c1e-8a6b-5f4e3d2c1b0a"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


A, B, OPS = bearer(KEY_A), bearer(KEY_B), bearer(KEY_OPS)


@pytest.fixture
def app(redis_url: str) -> Flask:
    return create_app(settings_for(redis_url, api_keys=f"{KEY_A},{KEY_B}", operator_keys=KEY_OPS))


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_png(
    client: FlaskClient, photo_bytes: dict[str, bytes], headers: dict[str, str] | None = A, query: str = ""
) -> Any:
    return client.post(f"/v1/jobs{query}", data=photo_bytes[PNG], content_type="image/png", headers=headers)


def submit(
    client: FlaskClient, photo_bytes: dict[str, bytes], headers: dict[str, str] = A, query: str = ""
) -> str:
    response = post_png(client, photo_bytes, headers, query)
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.json["id"])


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.json["error"]
    assert error["code"] == code, error
    assert error["message"]
    return dict(error)


def fetch_job(conn: redis.Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=conn, serializer=JSONSerializer)


def finish(conn: redis.Redis, job_id: str, payload: dict[str, Any] | None = None) -> None:
    """What a worker writes on success (status, result; the result stream wakes long-polls)."""
    job = fetch_job(conn, job_id)
    with conn.pipeline() as pipe:
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        Result.create(
            job, Result.Type.SUCCESSFUL, ttl=60, return_value=payload or {"predictions": []}, pipeline=pipe
        )
        pipe.execute()


def expire_by_deadline(conn: redis.Redis, job_id: str) -> None:
    """What the worker writes for a job whose deadline passed before it started."""
    job = fetch_job(conn, job_id)
    job.meta["error"] = {"code": "deadline_expired", "message": "The job's deadline passed."}
    with conn.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        pipe.hset(job.key, "meta", JSONSerializer.dumps(job.meta))
        Result.create(job, Result.Type.FAILED, ttl=60, exc_string="deadline_expired: late", pipeline=pipe)
        pipe.execute()


def queued(conn: redis.Redis) -> tuple[int, int]:
    return conn.llen(HIGH), conn.llen(LOW)


# --- keys required ------------------------------------------------------------------------------------

MALFORMED = {
    "none": None,
    "wrong-key": f"Bearer {KEY_C}",
    "prefix-of-a-key": f"Bearer {KEY_A[:-1]}",
    "key-plus-a-char": f"Bearer {KEY_A}x",
    "empty-bearer": "Bearer",
    "bearer-space": "Bearer ",
    "no-scheme": KEY_A,
    "token-scheme": f"Token {KEY_A}",
    "basic-on-v1": "Basic " + base64.b64encode(f"user:{KEY_A}".encode()).decode(),
    "two-tokens": f"Bearer {KEY_A} {KEY_B}",
    "comma-list": f"Bearer {KEY_A},{KEY_B}",
    "non-ascii": "Bearer clé-0123456789abcdefgh",
}


@pytest.mark.parametrize("header", list(MALFORMED.values()), ids=list(MALFORMED))
@pytest.mark.parametrize(
    "route",
    [
        "POST /v1/jobs",
        "POST /v1/batches",
        "GET /v1/jobs/{id}",
        "GET /v1/jobs/{id}?wait=5",
        "POST /v1/jobs/{id}/cancel",
        "GET /metrics",
    ],
)
def test_every_protected_route_needs_a_valid_key(
    client: FlaskClient,
    redis_conn: redis.Redis,
    photo_bytes: dict[str, bytes],
    route: str,
    header: str | None,
) -> None:
    job_id = submit(client, photo_bytes)
    method, path = route.split(" ")
    headers = {"Authorization": header} if header is not None else {}
    started = time.monotonic()
    response = client.open(
        path.format(id=job_id),
        method=method,
        headers=headers,
        data=photo_bytes[PNG] if method == "POST" else None,
        content_type="image/png" if method == "POST" else None,
    )

    assert time.monotonic() - started < 2  # not a long-poll
    assert_error(response, 401, "unauthorized")
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="inferq"')
    assert ('error="invalid_token"' in challenge) == (header is not None)
    assert KEY_A not in response.get_data(as_text=True)
    assert queued(redis_conn) == (1, 0)  # only the setup job
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.QUEUED


def test_valid_keys_and_open_probes(client: FlaskClient, photo_bytes: dict[str, bytes]) -> None:
    for headers in (A, B, {"Authorization": f"bearer   {KEY_A}"}):  # the scheme is case-insensitive
        assert post_png(client, photo_bytes, headers).status_code == 202
    # Probes and the document carry no credentials.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503  # no worker; not 401
    assert client.get("/openapi.json").status_code == 200
    # /metrics is an operator route: a tenant key is refused, an operator key opens it.
    assert_error(client.get("/metrics", headers=A), 403, "operator_only")
    assert client.get("/metrics", headers=OPS).status_code == 200


def test_an_operator_key_on_v1_is_refused_by_name(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    """The mirror of a tenant key on /metrics (403 `operator_only`): a valid key in the wrong place is
    told so, not answered as if it were unknown (401, which would send its user hunting for a typo)."""
    job_id = submit(client, photo_bytes)
    for method, path in [
        ("POST", "/v1/jobs"),
        ("POST", "/v1/batches"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ]:
        posting = path in ("/v1/jobs", "/v1/batches")
        response = client.open(
            path,
            method=method,
            headers=OPS,
            data=photo_bytes[PNG] if posting else None,
            content_type="image/png" if posting else None,
        )
        error = assert_error(response, 403, "tenant_only")
        assert "API_KEYS" in error["message"] and "OPERATOR_KEYS" in error["message"], error
        assert "WWW-Authenticate" not in response.headers  # the key is valid: no other to try
    assert queued(redis_conn) == (1, 0)  # nothing submitted, nothing canceled
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.QUEUED
    # Documented wherever the 401 is.
    paths = client.get("/openapi.json").json["paths"]
    documented = [(path, op) for path, item in paths.items() for op in item if path.startswith("/v1/")]
    assert len(documented) == 4
    for path, operation in documented:
        assert "`tenant_only`" in paths[path][operation]["responses"]["403"]["description"], path


def test_keys_are_hashed_and_compared_in_constant_time(
    redis_url: str, photo_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(redis_url, api_keys=f"{KEY_A}, {KEY_B} ,{KEY_C}")
    # Only hashes are kept: the settings (and anything that prints them) never hold a key.
    assert settings.api_keys == tuple(hash_api_key(k) for k in (KEY_A, KEY_B, KEY_C))
    for key in (KEY_A, KEY_B, KEY_C):
        assert key not in repr(settings) and key not in settings.model_dump_json()
    client = create_app(settings).test_client()

    calls: list[tuple[str, str]] = []
    real = api.auth.hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.auth.hmac, "compare_digest", counting)
    for headers, status in [
        (bearer(KEY_A), 404),  # the first stored key: no early exit after the match
        (bearer(KEY_C), 404),
        (bearer("not-a-key-0123456789abcdef"), 401),
        ({"Authorization": "Bearer"}, 401),  # malformed: compared all the same
        ({}, 401),
    ]:
        calls.clear()
        assert client.get(f"/v1/jobs/{UNKNOWN_ID}", headers=headers).status_code == status
        assert len(calls) == 3, headers
        assert sorted(stored for _, stored in calls) == sorted(settings.api_keys)
        # What is compared is a hash of the token, never the token itself.
        assert all(len(candidate) == 64 and candidate not in (KEY_A, KEY_C) for candidate, _ in calls)


def test_keys_from_a_file(redis_url: str, tmp_path: Path, photo_bytes: dict[str, bytes]) -> None:
    key_with_hash = "delta#key-0123456789abcdef"
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        f"# inferq API keys\n\n  {KEY_A}  \n{KEY_C}   # the batch client\n{key_with_hash}\n   # {KEY_B}\n"
    )
    settings = settings_for(redis_url, api_keys_file=keys_file)
    assert set(settings.api_keys) == {hash_api_key(k) for k in (KEY_A, KEY_C, key_with_hash)}
    client = create_app(settings).test_client()
    for key in (KEY_A, KEY_C, key_with_hash):
        assert post_png(client, photo_bytes, bearer(key)).status_code == 202, key
    assert_error(post_png(client, photo_bytes, B), 401, "unauthorized")  # commented out

    # API_KEYS and API_KEYS_FILE add up.
    both = settings_for(redis_url, api_keys=KEY_B, api_keys_file=keys_file)
    assert hash_api_key(KEY_B) in both.api_keys and hash_api_key(KEY_A) in both.api_keys

    # A file that cannot be read or holds no key is an error, not "auth disabled"; no key is echoed.
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    (tmp_path / "short").write_text("tooshort-secret\n")
    for path, expected in [
        (tmp_path / "missing", "cannot read"),
        (tmp_path / "empty", "holds no key"),
        (tmp_path / "short", "line 1"),
    ]:
        with pytest.raises(ValidationError) as info:
            settings_for(redis_url, api_keys_file=path)
        assert expected in str(info.value)
        assert "tooshort-secret" not in str(info.value)
    with pytest.raises(ValidationError) as info:
        settings_for(redis_url, api_keys=" , ")
    assert "no key" in str(info.value)


def test_keys_from_the_environment(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", f"{KEY_A},{KEY_B}")
    assert Settings(redis_url=redis_url).api_keys == (hash_api_key(KEY_A), hash_api_key(KEY_B))
    monkeypatch.setenv("API_KEYS", "short")
    with pytest.raises(ValidationError) as info:
        Settings(redis_url=redis_url)
    assert "'short'" not in str(info.value)


def test_a_dashboard_style_blueprint_can_reuse_the_guard(redis_url: str) -> None:
    """What mounting rq-dashboard on /rq looks like: the whole blueprint behind the api's keys, with
    HTTP Basic (key as password) accepted so a browser can log in."""
    app = create_app(settings_for(redis_url, api_keys=KEY_A))
    dashboard = Blueprint("dashboard", __name__, url_prefix="/custom")
    dashboard.before_request(enforce_api_key_or_basic)
    dashboard.add_url_rule("/", "index", lambda: "dashboard")
    app.register_blueprint(dashboard)
    client = app.test_client()

    response = client.get("/custom/")
    assert_error(response, 401, "unauthorized")
    # One challenge a line: a browser answers the Basic one only if it is not behind Bearer's.
    assert response.headers.getlist("WWW-Authenticate") == [
        'Bearer realm="inferq"',
        'Basic realm="inferq", charset="UTF-8"',
    ]
    basic = base64.b64encode(f"admin:{KEY_A}".encode()).decode()
    assert client.get("/custom/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert client.get("/custom/", headers=A).status_code == 200
    wrong = base64.b64encode(f"admin:{KEY_B}".encode()).decode()
    assert client.get("/custom/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401


# --- isolation ----------------------------------------------------------------------------------------


def test_a_job_is_visible_to_its_key_only(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit(client, photo_bytes, A)
    job = fetch_job(redis_conn, job_id)
    assert job.meta["owner"] == owner_id(hash_api_key(KEY_A))
    assert KEY_A not in str(job.meta)

    unknown = client.get(f"/v1/jobs/{UNKNOWN_ID}", headers=B)
    assert_error(unknown, 404, "job_not_found")
    for method, path in [("GET", ""), ("GET", "?wait=5"), ("POST", "/cancel")]:
        started = time.monotonic()
        response = client.open(f"/v1/jobs/{job_id}{path}", method=method, headers=B)
        assert time.monotonic() - started < 2  # B does not even get to wait on it
        error = assert_error(response, 404, "job_not_found")
        # Exactly what an unknown id gets (the id aside): existence does not leak.
        assert error["message"].replace(job_id, UNKNOWN_ID) == unknown.json["error"]["message"]
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.QUEUED  # B's cancel did nothing

    # A's long-poll wakes when A cancels; the job lands in RQ's canceled registry of its lane.
    outcome: dict[str, Any] = {}

    def long_poll() -> None:
        response = app.test_client().get(f"/v1/jobs/{job_id}?wait=10", headers=A)
        outcome["status"], outcome["body"] = response.status_code, response.json

    thread = threading.Thread(target=long_poll, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert client.get(f"/v1/jobs/{job_id}", headers=A).json["status"] == "queued"
    canceled = client.post(f"/v1/jobs/{job_id}/cancel", headers=A)
    thread.join(5)
    assert canceled.status_code == 200 and canceled.json["status"] == "canceled"
    assert outcome == {"status": 200, "body": outcome["body"]} and outcome["body"]["status"] == "canceled"
    assert job_id in CanceledJobRegistry("inferq", connection=redis_conn, serializer=JSONSerializer)
    assert fetch_job(redis_conn, job_id).get_status() == JobStatus.CANCELED
    assert queued(redis_conn) == (0, 0)


def test_jobs_created_without_keys_are_hidden_once_keys_are_on(
    redis_url: str, client: FlaskClient, photo_bytes: dict[str, bytes]
) -> None:
    open_client = create_app(settings_for(redis_url)).test_client()
    job_id = submit(open_client, photo_bytes, headers=None)
    assert open_client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=A), 404, "job_not_found")


# --- secrets in logs ----------------------------------------------------------------------------------

REDIS_PASSWORD = "hunter2-redis-password"


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {KEY_A}",
        f"{{'Authorization': 'Bearer {KEY_A}', 'Host': 'x'}}",
        f'"authorization": "{KEY_A}"',
        f"HTTP_AUTHORIZATION={KEY_A}",
        f"Basic {base64.b64encode(f'u:{KEY_A}'.encode()).decode()}",
        f"connecting to redis://:{REDIS_PASSWORD}@10.0.0.1:6379/0 failed",
        f"rediss://inferq:{REDIS_PASSWORD}@cache.internal:6380/1?ssl_cert_reqs=none",
        f"url=redis://cache:6379/0?password={REDIS_PASSWORD}",
    ],
)
def test_redact(text: str) -> None:
    cleaned = redact(text)
    assert KEY_A not in cleaned and REDIS_PASSWORD not in cleaned
    assert "dS06" not in cleaned  # the base64 of the Basic credentials
    assert REDACTED in cleaned
    assert redact(cleaned) == cleaned


def test_secrets_never_reach_the_logs(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    url_with_password = f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    install_redaction(handler)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        # The app's own start-up line names the Redis URL; the real connection is the test server's.
        client = create_app(settings_for(url_with_password, api_keys=KEY_A), redis=redis_conn).test_client()

        def explode(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                f"request headers {{'Authorization': 'Bearer {KEY_A}'}} via {url_with_password}"
            )

        monkeypatch.setattr("api.routes.submit", explode)
        monkeypatch.setattr("api.auth._AUTH_FAILURES", api.auth._FailureLog())  # a fresh log throttle
        response = post_png(client, photo_bytes, A)
        assert_error(response, 500, "internal_error")
        assert KEY_A not in response.get_data(as_text=True)
        assert_error(post_png(client, photo_bytes, bearer(KEY_B)), 401, "unauthorized")
        logging.getLogger("api.anything").warning("auth was %r on %s", f"Bearer {KEY_B}", url_with_password)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    logged = stream.getvalue()
    assert "unhandled error on POST /v1/jobs" in logged and "Traceback" in logged  # the error is logged...
    assert "api ready: Redis redis://:***@127.0.0.1:6379/0" in logged
    assert "1 unauthorized request(s)" in logged and "latest: POST /v1/jobs, bad credentials" in logged
    for secret in (KEY_A, KEY_B, REDIS_PASSWORD):  # ...without its secrets
        assert secret not in logged, logged
    assert "Bearer ***" in logged and ":***@" in logged


@pytest.mark.slow
def test_gunicorn_logs_are_redacted(tmp_path: Path, photo_bytes: dict[str, bytes]) -> None:
    """The real server: a Redis with a password, API keys, and an access-log format an operator
    extended with the Authorization header."""
    with EmbeddedRedis(tmp_path / "redis", password=REDIS_PASSWORD) as server:
        assert REDIS_PASSWORD in server.url
        port = free_port()
        env = service_env(
            server.url,
            API_KEYS=KEY_A,
            WEB_CONCURRENCY=1,
            LOG_LEVEL="DEBUG",
            GUNICORN_CMD_ARGS="--access-logformat '%(h)s \"%(r)s\" %(s)s auth=%({authorization}i)s'",
        )
        log = tmp_path / "api.log"
        proc = start_api(env, port, log=log)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: proc.poll() is not None or http_ok(f"{base}/healthz"), 30, what="gunicorn up")
            response = requests.post(
                f"{base}/v1/jobs",
                data=photo_bytes[PNG],
                headers={"Content-Type": "image/png", **A},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            assert requests.get(f"{base}/metrics", headers=bearer(KEY_B), timeout=10).status_code == 401
        finally:
            assert stop(proc, timeout=20) == 0
    logged = log.read_text()
    assert "auth=Bearer ***" in logged, logged  # the header was logged, masked
    assert "POST /v1/jobs" in logged
    for secret in (KEY_A, KEY_B, REDIS_PASSWORD):
        assert secret not in logged, logged


# --- the bind rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"])
def test_loopback_binds_need_no_keys(host: str) -> None:
    check_bind_allowed(Settings(host=host))


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.10", "2001:db8::1", "nosuch.invalid"]
)
def test_public_binds_need_keys(host: str) -> None:
    with pytest.raises(BindNotAllowed) as info:
        check_bind_allowed(Settings(host=host))
    message = str(info.value)
    assert "API_KEYS" in message and "API_KEYS_FILE" in message and "127.0.0.1" in message
    check_bind_allowed(Settings(host=host, api_keys=KEY_A))  # with keys: allowed
    # The host gunicorn really binds (a --bind override) is what is judged.
    with pytest.raises(BindNotAllowed):
        check_bind_allowed(Settings(host="127.0.0.1"), host=host)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["HOST", "--bind"])
def test_gunicorn_refuses_a_public_bind_without_keys(redis_url: str, how: str) -> None:
    port = free_port()
    env = service_env(redis_url, HOST="127.0.0.1", PORT=str(port))
    if how == "HOST":
        env["HOST"] = "0.0.0.0"
    else:
        env["GUNICORN_CMD_ARGS"] = f"--bind 0.0.0.0:{port}"
    result = run_module("gunicorn", "--config", "api/gunicorn_conf.py", "api.wsgi:app", env=env, timeout=60)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "refusing to serve the api on 0.0.0.0" in output and "API_KEYS" in output, output
    assert "Listening at" not in output


# --- bounded queue: 429 with a computed Retry-After ---------------------------------------------------


def record_ended(conn: redis.Redis, registry: str, ttl: int, ages: list[float], now: float) -> None:
    """Entries as RQ's registries hold them: score = end time + ttl (whole seconds)."""
    conn.zadd(registry, {f"done-{uuid.uuid4()}": int(now - age) + ttl for age in ages})


def test_queue_full_retry_after_is_backlog_over_the_measured_rate(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    settings = settings_for(
        redis_url,
        api_keys=KEY_A,
        max_queue_depth=4,
        throughput_window_seconds=60,
        queue_share_per_key=1,
        operator_keys=KEY_OPS,
    )
    client = create_app(settings).test_client()
    ids = [submit(client, photo_bytes, A, q) for q in ("", "", "?priority=low", "?priority=low")]
    assert queued(redis_conn) == (2, 2)

    # Nothing ended recently (no worker): the longest wait.
    full = post_png(client, photo_bytes, A, "?priority=low")
    assert_error(full, 429, "queue_full")
    assert full.headers["Retry-After"] == "60"

    # 24 jobs finished over the last minute on the high lane, 6 failed on the low lane, and some
    # ended long ago (outside the window): 30 ended in the 60 s window (0.5 jobs/s); 4 waiting +
    # 1 incoming over a limit of 4 needs one job to leave -> 2 s.
    now = time.time()
    record_ended(redis_conn, "rq:finished:inferq", settings.result_ttl, [i * 2.0 + 1 for i in range(24)], now)
    record_ended(redis_conn, "rq:failed:inferq-low", settings.failure_ttl, [3, 10, 20, 30, 40, 50], now)
    record_ended(redis_conn, "rq:finished:inferq-low", settings.result_ttl, [90, 200, 3000], now)
    full = post_png(client, photo_bytes, A)
    assert_error(full, 429, "queue_full")
    assert full.headers["Retry-After"] == "2"
    assert "4 jobs waiting" in full.json["error"]["message"]

    # A fast pace: at least 1 s.
    record_ended(redis_conn, "rq:finished:inferq", settings.result_ttl, [i / 100 for i in range(3000)], now)
    full = post_png(client, photo_bytes, A)
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"

    # Nothing else degrades: reads, long-polls, cancels and metrics work, and nothing was queued.
    assert queued(redis_conn) == (2, 2)
    assert client.get(f"/v1/jobs/{ids[0]}", headers=A).json["status"] == "queued"
    assert client.get(f"/v1/jobs/{ids[0]}?wait=0.2", headers=A).status_code == 200
    metrics = client.get("/metrics", headers=OPS).get_data(as_text=True)
    assert "inferq_backlog 4.0" in metrics
    assert 'inferq_queue_depth{queue="inferq-low"} 2.0' in metrics
    assert "inferq_completion_rate 50.5" in metrics  # (3000 + 24 + 6) / 60
    assert client.post(f"/v1/jobs/{ids[2]}/cancel", headers=A).status_code == 200
    assert post_png(client, photo_bytes, A).status_code == 202  # room again


def test_batches_count_against_the_queue_bound(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    client = create_app(settings_for(redis_url, max_queue_depth=3, queue_share_per_key=1)).test_client()
    submit(client, photo_bytes, headers=None, query="?priority=low")
    three = {"image": [(io.BytesIO(photo_bytes[JPEG]), f"{i}.jpg") for i in range(3)]}
    response = client.post("/v1/batches", data=three, content_type="multipart/form-data")
    assert_error(response, 429, "queue_full")
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert queued(redis_conn) == (0, 1)


# --- idempotency --------------------------------------------------------------------------------------


def test_idempotency_returns_the_same_job_until_it_expires(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = post_png(client, photo_bytes, {**A, **key}, "?top_k=3&priority=low&deadline_ms=60000")
    assert first.status_code == 202
    job_id = first.json["id"]

    # A different request under the same key: 409, whatever differs.
    for query, body in [
        ("?top_k=3&priority=low&deadline_ms=60000", photo_bytes[JPEG]),
        ("?top_k=4&priority=low&deadline_ms=60000", photo_bytes[PNG]),
        ("?top_k=3&deadline_ms=60000", photo_bytes[PNG]),
        ("?top_k=3&priority=low", photo_bytes[PNG]),
    ]:
        response = client.post(f"/v1/jobs{query}", data=body, content_type="image/png", headers={**A, **key})
        assert_error(response, 409, "idempotency_key_reused")

    # Another API key's namespace: the same header value is another claim.
    other = post_png(client, photo_bytes, {**B, **key}, "?top_k=3&priority=low&deadline_ms=60000")
    assert other.status_code == 202 and other.json["id"] != job_id

    # After the job finished: still the same job, with its status; no second job.
    finish(redis_conn, job_id)
    again = post_png(client, photo_bytes, {**A, **key}, "?top_k=3&priority=low&deadline_ms=60000")
    assert again.status_code == 202
    assert again.json == {"id": job_id, "status": "finished", "url": f"/v1/jobs/{job_id}"}
    assert again.headers["Location"] == f"/v1/jobs/{job_id}"
    assert queued(redis_conn) == (0, 2)  # the first job and B's

    # After the job itself expired: 410, as for a GET; never a second job.
    redis_conn.delete(Job.key_for(job_id))
    gone = post_png(client, photo_bytes, {**A, **key}, "?top_k=3&priority=low&deadline_ms=60000")
    error = assert_error(gone, 410, "job_expired")
    assert error["id"] == job_id
    assert queued(redis_conn) == (0, 2)


def test_idempotency_claims_are_hashed_and_live_as_long_as_the_tombstone(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    raw_key = "../../rq:queue:inferq"
    assert post_png(client, photo_bytes, {**A, "Idempotency-Key": raw_key}).status_code == 202
    claims = list(redis_conn.scan_iter("inferq:idem:*"))
    assert len(claims) == 1 and raw_key.encode() not in claims[0]
    assert all(raw_key.encode() not in key for key in redis_conn.keys("*"))
    settings = app.extensions["inferq"].settings
    assert settings.known_job_ttl - 5 <= redis_conn.ttl(claims[0]) <= settings.known_job_ttl


def test_a_replay_succeeds_when_the_queue_is_full(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    client = create_app(settings_for(redis_url, max_queue_depth=1, queue_share_per_key=1)).test_client()
    key = {"Idempotency-Key": "once"}
    first = post_png(client, photo_bytes, key)
    assert first.status_code == 202
    assert_error(post_png(client, photo_bytes, None), 429, "queue_full")
    again = post_png(client, photo_bytes, key)
    assert again.status_code == 202 and again.json["id"] == first.json["id"]


# --- result lifetime: 410 -----------------------------------------------------------------------------


def test_expired_jobs_are_410_to_their_owner_then_404(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit(client, photo_bytes, A)
    settings = app.extensions["inferq"].settings
    tombstone = known_key(job_id)
    assert redis_conn.get(tombstone) == owner_id(hash_api_key(KEY_A)).encode()
    assert settings.known_job_ttl == settings.image_ttl + settings.failure_ttl + 24 * 3600
    assert settings.known_job_ttl - 5 <= redis_conn.ttl(tombstone) <= settings.known_job_ttl
    finish(redis_conn, job_id)

    # The job's key expires (RESULT_TTL): its tombstone stays.
    redis_conn.delete(Job.key_for(job_id))
    for method, path in [("GET", ""), ("GET", "?wait=5"), ("POST", "/cancel")]:
        response = client.open(f"/v1/jobs/{job_id}{path}", method=method, headers=A)
        assert_error(response, 410, "job_expired")
        assert_error(client.open(f"/v1/jobs/{job_id}{path}", method=method, headers=B), 404, "job_not_found")

    # After the grace period the tombstone is gone too: 404.
    redis_conn.delete(tombstone)
    assert_error(client.get(f"/v1/jobs/{job_id}", headers=A), 404, "job_not_found")


def test_a_job_really_expiring_turns_410(
    redis_url: str, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    settings = settings_for(redis_url, image_ttl=1, result_ttl=1, failure_ttl=1, expired_grace_seconds=60)
    client = create_app(settings).test_client()
    job_id = submit(client, photo_bytes, headers=None)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert 60 <= redis_conn.ttl(known_key(job_id)) <= 62
    # A queued job never expires unseen: once its image is gone it ends `image_expired` (never a 410
    # for a job that never ran); it is the ended job that expires after FAILURE_TTL.
    wait_until(lambda: not redis_conn.exists(image_key(job_id)), 5, what="the image expired")
    assert client.get(f"/v1/jobs/{job_id}").json["error"]["code"] == "image_expired"
    wait_until(lambda: not redis_conn.exists(Job.key_for(job_id)), 5, what="the job expired")
    assert_error(client.get(f"/v1/jobs/{job_id}"), 410, "job_expired")


# --- lanes, deadlines, readiness ----------------------------------------------------------------------


def test_priority_picks_the_lane(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    default = submit(client, photo_bytes)
    high = submit(client, photo_bytes, query="?priority=high")
    low = submit(client, photo_bytes, query="?priority=low")
    assert redis_conn.lrange(HIGH, 0, -1) == [default.encode(), high.encode()]
    assert redis_conn.lrange(LOW, 0, -1) == [low.encode()]
    assert fetch_job(redis_conn, low).origin == "inferq-low"

    batch = client.post(
        "/v1/batches?priority=low",
        data={"image": [(io.BytesIO(photo_bytes[JPEG]), "a.jpg"), (io.BytesIO(photo_bytes[PNG]), "b.png")]},
        content_type="multipart/form-data",
        headers=A,
    )
    assert batch.status_code == 202
    assert redis_conn.lrange(LOW, 1, -1) == [job["id"].encode() for job in batch.json["jobs"]]

    for bad in ["urgent", "", "HIGH", "low ", "1", "high,low"]:
        assert_error(post_png(client, photo_bytes, A, f"?priority={bad}"), 422, "invalid_priority")
    assert queued(redis_conn) == (2, 3)


def test_deadline_is_stored_in_meta(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    before = time.time()
    job_id = submit(client, photo_bytes, query="?deadline_ms=1500")
    after = time.time()
    deadline = fetch_job(redis_conn, job_id).meta["deadline_at"]
    assert before + 1.5 <= deadline <= after + 1.5
    assert "deadline_at" not in fetch_job(redis_conn, submit(client, photo_bytes)).meta

    batch = client.post(
        "/v1/batches?deadline_ms=2000",
        data={"image": [(io.BytesIO(photo_bytes[JPEG]), "a.jpg")]},
        content_type="multipart/form-data",
        headers=A,
    )
    assert fetch_job(redis_conn, batch.json["jobs"][0]["id"]).meta["deadline_at"] > after + 1.9

    for bad in ["0", "-1", "abc", "1.5", "", str(24 * 3600 * 1000 + 1), "1e3", "99999999999999"]:
        assert_error(post_png(client, photo_bytes, A, f"?deadline_ms={bad}"), 422, "invalid_deadline")
    assert queued(redis_conn) == (3, 0)


def test_a_job_past_its_deadline_reads_expired(
    app: Flask, client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit(client, photo_bytes, query="?deadline_ms=1")
    outcome: dict[str, Any] = {}

    def long_poll() -> None:
        started = time.monotonic()
        outcome["body"] = app.test_client().get(f"/v1/jobs/{job_id}?wait=10", headers=A).json
        outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=long_poll, daemon=True)
    thread.start()
    time.sleep(0.3)
    expire_by_deadline(redis_conn, job_id)  # as the worker does
    thread.join(5)

    assert outcome["elapsed"] < 3
    body = client.get(f"/v1/jobs/{job_id}", headers=A).json
    assert body == outcome["body"]
    assert body["status"] == "expired"
    assert body["error"]["code"] == "deadline_expired"
    assert body["result"] is None
    # Terminal: a long-poll returns at once, and it cannot be canceled.
    started = time.monotonic()
    assert client.get(f"/v1/jobs/{job_id}?wait=5", headers=A).json["status"] == "expired"
    assert time.monotonic() - started < 1
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel", headers=A), 409, "job_not_cancelable")


def test_readyz_counts_workers_on_any_lane_and_says_little(
    client: FlaskClient, redis_url: str, redis_conn: redis.Redis
) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json == {"status": "unavailable", "reason": "no live worker"}

    worker_conn = redis.Redis.from_url(redis_url)
    worker = Worker(["inferq-low"], connection=worker_conn, serializer=JSONSerializer)
    worker.register_birth()
    try:
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json == {"status": "ok"}
        metrics = client.get("/metrics", headers=OPS).get_data(as_text=True)
        assert 'inferq_workers{queue="inferq-low"} 1.0' in metrics
    finally:
        worker.register_death()
        worker_conn.close()


def test_openapi_documents_the_new_contract(client: FlaskClient) -> None:
    document = client.get("/openapi.json").json
    post = document["paths"]["/v1/jobs"]["post"]
    assert {p["name"] for p in post["parameters"]} == {
        "top_k",
        "priority",
        "deadline_ms",
        "Idempotency-Key",
        "Prefer",
    }
    assert {"401", "409", "410", "422", "429"} <= set(post["responses"])
    assert "410" in document["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "expired" in document["components"]["schemas"]["Job"]["properties"]["status"]["enum"]
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_canceling_frees_the_image(
    client: FlaskClient, redis_conn: redis.Redis, photo_bytes: dict[str, bytes]
) -> None:
    job_id = submit(client, photo_bytes, query="?priority=low")
    assert redis_conn.exists(image_key(job_id))
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=A).json["status"] == "canceled"
    assert not redis_conn.exists(image_key(job_id))
    assert job_id in CanceledJobRegistry("inferq-low", connection=redis_conn, serializer=JSONSerializer)
