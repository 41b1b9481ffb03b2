"""The Python client and the `inferq` CLI: retry logic against a stub HTTP server (fast), then
the real thing against a real stack (Valkey + gunicorn api + one batch worker)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import requests
from rq.job import Job

from api.openapi import openapi_document
from client import (
    AuthenticationError,
    Client,
    Conflict,
    InvalidInput,
    JobFailed,
    JobResult,
    ModelInfo,
    NotFound,
    RateLimited,
    Readiness,
    Unavailable,
)
from client.retry import parse_retry_after
from launch.redis_server import EmbeddedRedis
from shared.config import PROJECT_ROOT, Settings
from shared.job_meta import META_DEADLINE
from shared.jobs import fetch, lane_queue_name
from tests.conftest import PHOTO_LABELS
from tests.service import (
    free_port,
    http_ok,
    request_counts,
    service_env,
    start_api,
    start_worker,
    stop,
    wait_until,
)

JOB_ID = "3f8e0a9c-1b2d-4e5f-8a7b-6c5d4e3f2a1b"
TEXT_FILE = b"this is a text file, not an image\n"

# --- a stub api: scripted replies, recorded requests ---------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    at: float


@dataclass
class Stub:
    """Replies with `script` in order (the last one repeats) and records every request."""

    script: list[tuple[int, dict[str, str], dict[str, object]]]
    seen: list[Seen] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub(script=[])

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.seen.append(Seen(self.command, self.path, dict(self.headers), time.monotonic()))
            status, headers, body = state.script[min(len(state.seen), len(state.script)) - 1]
            payload = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _reply  # http.server dispatches on do_<METHOD>

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def queue_full(retry_after: str) -> tuple[int, dict[str, str], dict[str, object]]:
    return 429, {"Retry-After": retry_after}, {"error": {"code": "queue_full", "message": "full"}}


CREATED = (202, {}, {"id": JOB_ID, "status": "queued", "url": f"/v1/jobs/{JOB_ID}"})
FINISHED_JOB = {
    "id": JOB_ID,
    "status": "finished",
    "result": {
        "predictions": [{"label": "espresso", "index": 967, "score": 0.9}],
        "model": {"name": "m", "sha256": "0" * 64},
    },
    "error": None,
    "created_at": "2026-01-01T12:00:00Z",
    "started_at": "2026-01-01T12:00:00.010Z",
    "ended_at": "2026-01-01T12:00:00.020Z",
    "timings": {"queue_ms": 10.0, "inference_ms": 8.0, "batch_size": 1},
}
# A submit with `Prefer: wait` whose job ended within the wait: the job itself.
ENDED = (200, {"Preference-Applied": "wait=10", "Location": f"/v1/jobs/{JOB_ID}"}, FINISHED_JOB)
REDIS_DOWN = (503, {"Retry-After": "0"}, {"error": {"code": "redis_unavailable", "message": "down"}})


def test_a_429_is_retried_after_its_retry_after_with_the_same_idempotency_key(stub: Stub):
    stub.script = [queue_full("1"), CREATED]
    with Client(stub.url, api_key="s3cret") as client:
        ref = client.submit(b"\x89PNG fake", top_k=3)
    assert ref.id == JOB_ID and ref.url == f"{stub.url}/v1/jobs/{JOB_ID}"
    first, second = stub.seen
    assert second.at - first.at >= 1.0, "retried before the advertised Retry-After"
    assert first.path == second.path == "/v1/jobs?top_k=3"
    # The retry replays the same submission: the server can never queue it twice.
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.headers["Authorization"] == "Bearer s3cret"


def test_classify_takes_the_ended_job_from_the_submit_reply(stub: Stub):
    stub.script = [ENDED]
    with Client(stub.url) as client:
        result = client.classify(b"\x89PNG fake", top_k=1, timeout=10)
    assert result.ok and result.id == JOB_ID and result.top1 is not None and result.top1.label == "espresso"
    (only,) = stub.seen  # one request: no long-poll
    assert (only.method, only.path) == ("POST", "/v1/jobs?top_k=1")
    assert only.headers["Prefer"] == "wait=10"  # the classify's timeout, under the 30 s of a long-poll


def test_classify_long_polls_when_the_submit_is_answered_202(stub: Stub):
    stub.script = [CREATED, (200, {}, FINISHED_JOB)]
    with Client(stub.url) as client:
        result = client.classify(b"\x89PNG fake")
    assert result.ok
    submit, poll = stub.seen
    assert submit.method == "POST" and submit.headers["Prefer"] == "wait=30"
    assert poll.method == "GET" and poll.path.startswith(f"/v1/jobs/{JOB_ID}?wait=")


def test_without_prefer_wait_classify_submits_then_long_polls(stub: Stub):
    stub.script = [CREATED, (200, {}, FINISHED_JOB)]
    with Client(stub.url, prefer_wait=False) as client:
        assert client.classify(b"\x89PNG fake").ok
    submit, poll = stub.seen
    assert submit.method == "POST" and "Prefer" not in submit.headers
    assert poll.method == "GET"
    stub.seen.clear()
    stub.script = [CREATED]
    with Client(stub.url) as client:  # a plain submit never waits
        assert client.submit(b"\x89PNG fake").id == JOB_ID
    assert "Prefer" not in stub.seen[0].headers


def test_retries_are_bounded(stub: Stub):
    stub.script = [REDIS_DOWN]
    with Client(stub.url, max_retries=2) as client, pytest.raises(Unavailable) as caught:
        client.get(JOB_ID)
    assert len(stub.seen) == 3  # the request and two retries
    assert (caught.value.status, caught.value.code) == (503, "redis_unavailable")


def test_a_retry_after_beyond_the_limit_is_raised_not_slept(stub: Stub):
    stub.script = [queue_full("120")]
    with Client(stub.url, max_retry_wait=30) as client, pytest.raises(RateLimited) as caught:
        client.submit(b"x")
    assert len(stub.seen) == 1
    assert caught.value.retry_after == 120


def test_a_cancel_is_not_retried_after_a_503(stub: Stub):
    # The reply was an error, but the cancel may have happened: a retry would report a 409.
    stub.script = [REDIS_DOWN]
    with Client(stub.url) as client, pytest.raises(Unavailable):
        client.cancel(JOB_ID)
    assert len(stub.seen) == 1
    assert (stub.seen[0].method, stub.seen[0].path) == ("POST", f"/v1/jobs/{JOB_ID}/cancel")


@pytest.mark.parametrize("job_id", [f"{JOB_ID}/cancel", "../healthz", "..", "a/b"])
def test_an_id_with_a_slash_names_no_job_and_is_never_sent(stub: Stub, job_id: str):
    """A job id is one path segment; a server decodes `%2F` into `/`, so `<id>/cancel` quoted as one
    segment would still reach `GET /v1/jobs/<id>/cancel` (405) instead of naming a job."""
    stub.script = [CREATED]
    with Client(stub.url) as client:
        for call in (client.get, client.cancel, lambda i: client.wait(i, 1)):
            with pytest.raises(NotFound) as caught:
                call(job_id)
            assert (caught.value.code, caught.value.status, caught.value.job_id) == (
                "job_not_found",
                None,
                job_id,
            )
    assert stub.seen == []


def test_a_refused_api_key_is_an_authentication_error_and_not_retried(stub: Stub):
    refused = {"error": {"code": "unauthorized", "message": "no"}}
    stub.script = [(401, {"WWW-Authenticate": "Bearer"}, refused)]
    with Client(stub.url, api_key="wrong") as client, pytest.raises(AuthenticationError) as caught:
        client.get(JOB_ID)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert len(stub.seen) == 1


def test_retry_after_parses_seconds_and_http_dates():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("2", now) == 2
    assert parse_retry_after(format_datetime(now + timedelta(seconds=5), usegmt=True), now) == 5
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-1", now) is None
    assert parse_retry_after(None, now) is None


def test_readiness_is_what_readyz_sends(stub: Stub):
    """`Client.ready()` holds the answer's status (as `ready`) and the fields /readyz documents."""
    stub.script = [(503, {"Retry-After": "1"}, {"status": "unavailable", "reason": "no live worker"})]
    with Client(stub.url) as client:
        assert client.ready() == Readiness(ready=False, reason="no live worker", status="unavailable")
    stub.script = [(503, {"Retry-After": "1"}, {"status": "suspended", "reason": "workers suspended"})]
    with Client(stub.url) as client:
        assert client.ready().status == "suspended"
    sent = openapi_document(Settings())["components"]["schemas"]["Status"]["properties"]
    assert {f.name for f in fields(Readiness)} - {"ready"} <= set(sent)


def test_model_info_holds_every_field_the_document_gives_the_model():
    job = openapi_document(Settings())["components"]["schemas"]["Job"]["properties"]
    finished = job["result"]["oneOf"][0]["properties"]["model"]["properties"]
    assert {f.name for f in fields(ModelInfo)} == set(finished)


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_status_of_an_empty_id_is_a_usage_error():
    done = run_cli("--url", "http://127.0.0.1:1", "status", "")
    assert done.returncode == 2
    assert "a job id is required" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_exits_2_when_the_service_is_unreachable(tmp_path: Path):
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG")
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("classify", str(image)), ("status", JOB_ID)):
        done = run_cli("--url", dead, *args, timeout=30)
        assert done.returncode == 2, done
        assert "cannot connect" in done.stderr
    assert run_cli("--url", dead, "classify", str(tmp_path / "missing.png")).returncode == 2


# --- against a real stack ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    url: str  # the api
    redis_url: str  # its Redis, to see what a submission stored


@pytest.fixture(scope="module")
def stack(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Valkey, one api (gunicorn), one batch worker, for the module."""
    logs = tmp_path_factory.mktemp("client-stack")
    with EmbeddedRedis(logs / "redis") as server:
        env = service_env(server.url, TORCH_THREADS=1, WEB_CONCURRENCY=1)
        port = free_port()
        api = start_api(env, port, log=logs / "api.log")
        worker = start_worker(env, log=logs / "worker.log")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: http_ok(base + "/readyz"), 180, 0.5, "api ready with a worker")
            yield Stack(base, server.url)
        finally:
            stop(worker)
            stop(api)


@pytest.fixture(scope="module")
def api_url(stack: Stack) -> str:
    return stack.url


def stored_job(stack: Stack, job_id: str) -> Job:
    """The RQ job the api stored for `job_id`, as a worker reads it."""
    conn = redis.Redis.from_url(stack.redis_url)
    try:
        job = fetch(conn, job_id)
    finally:
        conn.close()
    assert job is not None, job_id
    return job


@pytest.fixture(scope="module")
def folders(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`good`: the five photos. `mixed`: the photos, a PNG cut short (its header passes the api's
    check, its pixels fail in the worker) and a text file named like an image."""
    root = tmp_path_factory.mktemp("client-images")
    good, mixed = root / "good", root / "mixed"
    for folder in (good, mixed):
        folder.mkdir()
        for name in PHOTO_LABELS:
            shutil.copyfile(sample_dir / name, folder / name)
    chelsea = (sample_dir / "chelsea.png").read_bytes()
    (mixed / "broken.png").write_bytes(chelsea[: len(chelsea) // 3])
    (mixed / "notes.jpg").write_bytes(TEXT_FILE)
    return {"good": good, "mixed": mixed}


@pytest.mark.slow
def test_classify_get_and_cancel(api_url: str, sample_dir: Path):
    with Client(api_url) as client:
        assert client.health() == {"status": "ok"}
        assert client.ready().ready
        result = client.classify(sample_dir / "coffee.png", top_k=3)
        assert result.ok and result.top1 is not None and result.top1.label == "espresso"
        assert len(result.predictions) == 3
        assert result.model is not None and result.model.name and len(result.model.sha256 or "") == 64
        assert result.timings.batch_size and result.timings.inference_ms
        assert result.created_at and result.ended_at and result.ended_at >= result.created_at

        ref = client.submit((sample_dir / "rocket.jpg").read_bytes(), top_k=1)
        waited = client.get(ref.id, wait=30)
        assert waited.status == "finished", waited
        assert waited.top1 is not None and waited.top1.label in PHOTO_LABELS["rocket.jpg"]
        assert client.get(ref.id) == waited

        with pytest.raises(Conflict) as conflict:
            client.cancel(ref.id)
        assert conflict.value.code == "job_not_cancelable"
        with pytest.raises(NotFound) as missing:
            client.get(JOB_ID)
        assert (missing.value.status, missing.value.code) == (404, "job_not_found")


@pytest.mark.slow
def test_classify_many_reports_each_file_on_its_own(api_url: str, folders: dict[str, Path]):
    mixed = folders["mixed"]
    paths = sorted(mixed.iterdir())
    with Client(api_url) as client:
        outcomes = list(client.classify_many(paths, top_k=3, concurrency=4))
    assert [path for path, _ in outcomes] == paths, "input order is kept"
    by_name = {Path(path).name: outcome for path, outcome in outcomes}
    for name, labels in PHOTO_LABELS.items():
        outcome = by_name[name]
        assert isinstance(outcome, JobResult) and outcome.top1 is not None, (name, outcome)
        assert outcome.top1.label in labels, (name, outcome.predictions)
    broken = by_name["broken.png"]
    assert isinstance(broken, JobFailed), broken
    assert broken.code == "corrupt_image" and broken.result.status == "failed"
    notes = by_name["notes.jpg"]
    assert isinstance(notes, InvalidInput), notes
    assert (notes.status, notes.code) == (415, "unsupported_image_format")


@pytest.mark.slow
def test_cli_reports_a_mixed_folder_as_jsonl_and_csv(api_url: str, folders: dict[str, Path]):
    mixed = folders["mixed"]
    done = run_cli("classify", str(mixed), "--url", api_url, "--format", "jsonl", "--top-k", "2")
    assert done.returncode == 1, done.stderr
    records = {Path(r["file"]).name: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(records) == {*PHOTO_LABELS, "broken.png", "notes.jpg"}
    for name, labels in PHOTO_LABELS.items():
        assert records[name]["status"] == "finished"
        assert len(records[name]["predictions"]) == 2
        assert records[name]["predictions"][0]["label"] in labels
    assert records["broken.png"]["status"] == "failed"
    assert records["broken.png"]["error"]["code"] == "corrupt_image"
    assert records["notes.jpg"]["status"] == "rejected"
    assert records["notes.jpg"]["error"]["code"] == "unsupported_image_format"

    done = run_cli("classify", str(mixed), "--url", api_url, "--format", "csv")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "file,status,label,index,score,error_code"
    rows = {Path(line.split(",")[0]).name: line.split(",") for line in lines[1:]}
    assert rows["coffee.png"][1:3] == ["finished", "espresso"]
    assert rows["broken.png"][1] == "failed" and rows["broken.png"][-1] == "corrupt_image"
    assert rows["notes.jpg"][1] == "rejected" and rows["notes.jpg"][-1] == "unsupported_image_format"


@pytest.mark.slow
def test_classify_and_the_cli_send_one_request_per_image(
    api_url: str, folders: dict[str, Path], sample_dir: Path
):
    """The service's own request counts: a classify is one submit answered with the ended job (200),
    no read of the job; without the preference, a submit (202) and a long-poll."""
    before = request_counts(api_url)
    with Client(api_url) as client:
        assert client.classify(sample_dir / "coffee.png").ok
    after = request_counts(api_url)
    assert after["one_request"] == before["one_request"] + 1
    assert (after["submitted"], after["reads"]) == (before["submitted"], before["reads"])

    done = run_cli("classify", str(folders["good"]), "--url", api_url)
    assert done.returncode == 0, done.stderr
    cli = request_counts(api_url)
    assert cli["one_request"] == after["one_request"] + len(PHOTO_LABELS)
    assert (cli["submitted"], cli["reads"]) == (after["submitted"], after["reads"])

    with Client(api_url, prefer_wait=False) as client:
        assert client.classify(sample_dir / "coffee.png").ok
    plain = request_counts(api_url)
    assert plain["submitted"] == cli["submitted"] + 1 and plain["reads"] > cli["reads"]


@pytest.mark.slow
def test_cli_exits_0_for_good_photos_and_shows_a_job(
    api_url: str, folders: dict[str, Path], sample_dir: Path
):
    done = run_cli("classify", str(folders["good"]), "--url", api_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == ["FILE", "STATUS", "LABEL", "SCORE", "ERROR"]
    assert "espresso" in done.stdout

    with Client(api_url) as client:
        job_id = client.submit(sample_dir / "coffee.png").id
    done = run_cli("status", job_id, "--wait", "30", "--url", api_url)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["id"] == job_id and job["status"] == "finished"
    assert job["predictions"][0]["label"] == "espresso"
    assert run_cli("status", JOB_ID, "--url", api_url).returncode == 1


@pytest.mark.slow
def test_priority_and_deadline_reach_the_job(stack: Stack, sample_dir: Path, photo_bytes: dict[str, bytes]):
    low_lane = lane_queue_name(Settings(), "low")
    with Client(stack.url) as client:
        submitted = time.time()
        ref = client.submit(sample_dir / "coffee.png", priority="low", deadline_ms=60_000)
        job = stored_job(stack, ref.id)
        assert job.origin == low_lane
        assert submitted + 59 < job.meta[META_DEADLINE] < time.time() + 61
        # A deadline the worker meets: the job runs.
        assert client.wait(ref.id, 60).status == "finished"
        assert stored_job(stack, client.submit(photo_bytes["coffee.png"]).id).origin != low_lane

        # Behind a backlog, a deadline of 1 ms passes before the worker reaches the job: it ends
        # `expired` without running (the worker is busy with the backlog when it is queued).
        files = [("image", (f"{i}.png", photo_bytes["coffee.png"])) for i in range(12)]
        backlog = requests.post(f"{stack.url}/v1/batches", files=files, timeout=30)
        assert backlog.status_code == 202, backlog.text
        with pytest.raises(JobFailed) as caught:
            client.classify(photo_bytes["rocket.jpg"], deadline_ms=1, timeout=120)
        assert caught.value.code == "deadline_expired"
        assert caught.value.result.status == "expired" and not caught.value.result.predictions

        with pytest.raises(InvalidInput) as refused:
            client.submit(photo_bytes["coffee.png"], priority="urgent")
        assert (refused.value.status, refused.value.code) == (422, "invalid_priority")


@pytest.mark.slow
def test_cli_sends_priority_and_deadline(stack: Stack, sample_dir: Path):
    done = run_cli(
        "classify",
        str(sample_dir / "coffee.png"),
        "--url",
        stack.url,
        "--format",
        "jsonl",
        "--priority",
        "low",
        "--deadline-ms",
        "60000",
    )
    assert done.returncode == 0, done.stderr
    (record,) = map(json.loads, done.stdout.splitlines())
    assert record["status"] == "finished"
    job = stored_job(stack, record["id"])
    assert job.origin == lane_queue_name(Settings(), "low")
    assert job.meta[META_DEADLINE] > time.time() + 30


@pytest.mark.slow
def test_cli_status_shows_the_whole_model_block(stack: Stack, photo_bytes: dict[str, bytes]):
    with Client(stack.url) as client:
        job_id = client.classify(photo_bytes["coffee.png"]).id
    done = run_cli("status", job_id, "--url", stack.url)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)["model"]
    # Everything the api says about the model: its backend and file too.
    served = requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()["result"]["model"]
    assert {"backend", "file"} <= set(served)
    assert model == served, (model, served)

    done = run_cli("status", f"{job_id}/cancel", "--url", stack.url)
    assert done.returncode == 1
    assert "job_not_found" in done.stderr
