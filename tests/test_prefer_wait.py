"""`Prefer: wait=<seconds>` on `POST /v1/jobs` (RFC 7240): one request when the client wants it.

Against the real service (Valkey, gunicorn api, a batch worker with the real model), and against an
api without workers, where a job cannot end unless the test ends it the way a worker does
(`bench.front_door.end_jobs`: RQ's success write plus the publish on the ended channel)."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from api.long_poll import CompletionListener
from api.prefer import preferences, preferred_wait
from bench.front_door import end_jobs
from bench.loadgen import InferqTarget
from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import make_queue
from tests.conftest import PHOTO_LABELS
from tests.factories import settings_for, truncated_png
from tests.service import Stack, request_counts, service_stack

pytestmark = pytest.mark.slow

# The api without workers: a short MAX_WAIT_SECONDS (the cap of a preferred wait) and a small
# long-poll cap, so the limits are reached quickly.
IDLE_MAX_WAIT = 5
IDLE_LONG_POLLS = 2
LEASES = "inferq:long-polls:addr:127.0.0.1"  # the test client's long-poll leases (no API keys)


@pytest.fixture(scope="module")
def stack(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Valkey, one api, one batch worker."""
    logs = tmp_path_factory.mktemp("prefer-stack")
    with EmbeddedRedis(logs / "redis") as server, service_stack(server.url, logs, WEB_CONCURRENCY=1) as stack:
        yield stack


@contextmanager
def worker_less(logs: Path, **settings: str | int) -> Iterator[Stack]:
    """One Valkey and one api process, no worker: jobs stay queued unless a test ends them."""
    with (
        EmbeddedRedis(logs / "redis") as server,
        service_stack(server.url, logs, workers=0, WEB_CONCURRENCY=1, **settings) as stack,
    ):
        yield stack


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("prefer-idle")
    with worker_less(logs, MAX_WAIT_SECONDS=IDLE_MAX_WAIT, LONG_POLLS_PER_KEY=IDLE_LONG_POLLS) as stack:
        yield stack


def post(
    base: str, data: bytes, headers: dict[str, str] | None = None, **params: str | int
) -> requests.Response:
    return requests.post(
        f"{base}/v1/jobs",
        params=params,
        data=data,
        headers={"Content-Type": "application/octet-stream", **(headers or {})},
        timeout=60,
    )


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def queued(stack: Stack) -> set[str]:
    return set(make_queue(stack.conn, Settings()).job_ids)


def jobs_submitted(base: str) -> float:
    """`inferq_jobs_submitted_total`, all lanes: the jobs the api says it enqueued."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "inferq_jobs_submitted_total"
    )


def conforms(base: str, path: str, response: requests.Response) -> None:
    """The answer is what the service's own OpenAPI document says of `POST <path>` (schemathesis)."""
    schemathesis.openapi.from_url(f"{base}/openapi.json")[path]["POST"].validate_response(response)


def until(check: Callable[[], bool], patience: float = 20) -> None:
    deadline = time.monotonic() + patience
    while not check():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.05)


# --- the answer ------------------------------------------------------------------------------------


def test_a_job_that_ends_within_the_wait_is_the_answer(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    before, submitted = request_counts(stack.base), jobs_submitted(stack.base)
    response = post(stack.base, photo_bytes["coffee.png"], {"Prefer": "wait=5"}, top_k=3)

    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=5"
    view = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{view['id']}"
    assert view["status"] == "finished"
    assert len(view["result"]["predictions"]) == 3
    assert view["result"]["predictions"][0]["label"] in PHOTO_LABELS["coffee.png"]
    # Exactly what a read of the job gives.
    assert requests.get(stack.base + response.headers["Location"], timeout=10).json() == view
    conforms(stack.base, "/v1/jobs", response)
    after = request_counts(stack.base)
    assert after["one_request"] == before["one_request"] + 1
    assert after["submitted"] == before["submitted"]
    assert jobs_submitted(stack.base) == submitted + 1  # counted though not answered 202


def test_a_job_that_fails_within_the_wait_is_the_answer_too(stack: Stack) -> None:
    # Its header passes the api's check; its pixels fail in the worker.
    response = post(stack.base, truncated_png(), {"Prefer": "wait=10"})

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["status"] == "failed" and view["error"]["code"] == "corrupt_image"
    assert requests.get(f"{stack.base}/v1/jobs/{view['id']}", timeout=10).json() == view


@pytest.mark.parametrize(
    "prefer",
    [
        "respond-async, wait=10",  # RFC 7240: respond async if it takes longer than the wait
        "handling=lenient,WAIT = 10 ; note=x",  # names are case-insensitive; parameters are ignored
        'return=minimal, wait="10", wait=1',  # a quoted value; only the first instance counts
    ],
)
def test_the_wait_is_read_among_other_preferences(
    stack: Stack, photo_bytes: dict[str, bytes], prefer: str
) -> None:
    response = post(stack.base, photo_bytes["rocket.jpg"], {"Prefer": prefer})

    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    assert response.json()["status"] == "finished"


def test_a_multipart_submit_waits_too(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    response = requests.post(
        f"{stack.base}/v1/jobs",
        files={"image": ("photo.png", photo_bytes["coffee.png"], "image/png")},
        headers={"Prefer": "wait=10"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["result"]["predictions"][0]["label"] in PHOTO_LABELS["coffee.png"]


def test_preferences_on_several_header_lines(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    port = int(stack.base.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/jobs")
        for name, value in [
            ("Content-Type", "image/png"),
            ("Content-Length", str(len(photo_bytes["coffee.png"]))),
            ("Prefer", "respond-async"),
            ("Prefer", "wait=7"),
        ]:
            conn.putheader(name, value)
        conn.endheaders(photo_bytes["coffee.png"])
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert response.getheader("Preference-Applied") == "wait=7"
    finally:
        conn.close()


# --- not within the wait, declined, ignored ------------------------------------------------------------


def test_a_job_that_cannot_end_in_time_is_queued_after_the_wait(
    idle: Stack, photo_bytes: dict[str, bytes]
) -> None:
    started = time.monotonic()
    response = post(idle.base, photo_bytes["coffee.png"], {"Prefer": "wait=1"})
    elapsed = time.monotonic() - started

    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "status", "url"} and body["status"] == "queued"
    assert response.headers["Location"] == body["url"] == f"/v1/jobs/{body['id']}"
    assert response.headers["Preference-Applied"] == "wait=1"
    assert elapsed >= 1.0  # it did wait
    conforms(idle.base, "/v1/jobs", response)
    # The client long-polls as after any submit; the job is there, queued.
    assert requests.get(f"{idle.base}{body['url']}?wait=1", timeout=10).json()["status"] == "queued"
    assert idle.conn.zcard(LEASES) == 0  # the wait's lease was given back


def test_a_longer_wait_is_shortened_to_max_wait_seconds(idle: Stack, photo_bytes: dict[str, bytes]) -> None:
    started = time.monotonic()
    response = post(idle.base, photo_bytes["coffee.png"], {"Prefer": "wait=3600"})

    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == f"wait={IDLE_MAX_WAIT}"
    assert time.monotonic() - started >= IDLE_MAX_WAIT


@pytest.mark.parametrize(
    "prefer", ["wait=soon", "wait=1.5", "wait=-1", "wait=0", "wait", "respond-async", ""]
)
def test_a_malformed_or_absent_wait_is_ignored(
    idle: Stack, photo_bytes: dict[str, bytes], prefer: str
) -> None:
    """Today's answer: the 202 at once, not waited on (no `Preference-Applied`), never an error."""
    response = post(idle.base, photo_bytes["coffee.png"], {"Prefer": prefer} if prefer else {})

    assert response.status_code == 202, response.text
    body = response.json()
    assert body == {"id": body["id"], "status": "queued", "url": f"/v1/jobs/{body['id']}"}
    assert response.headers["Location"] == body["url"]
    assert "Preference-Applied" not in response.headers


def test_a_key_at_its_long_poll_cap_gets_its_job_queued_without_the_wait(
    idle: Stack, photo_bytes: dict[str, bytes]
) -> None:
    held = post(idle.base, photo_bytes["coffee.png"]).json()["id"]
    polls = [
        in_thread(lambda: requests.get(f"{idle.base}/v1/jobs/{held}?wait={IDLE_MAX_WAIT}", timeout=30))
        for _ in range(IDLE_LONG_POLLS)
    ]
    until(lambda: idle.conn.zcard(LEASES) == IDLE_LONG_POLLS)

    response = post(idle.base, photo_bytes["coffee.png"], {"Prefer": f"wait={IDLE_MAX_WAIT}"})

    # Declined, not refused: the job is queued and the answer did not wait for the held long-polls.
    assert response.status_code == 202, response.text
    assert "Preference-Applied" not in response.headers
    assert any(thread.is_alive() for thread, _ in polls)
    assert response.json()["id"] in queued(idle)
    for thread, out in polls:
        thread.join(30)
        assert out[0].status_code == 200
    assert idle.conn.zcard(LEASES) == 0


def test_a_waiting_submit_counts_against_the_long_poll_cap(
    idle: Stack, photo_bytes: dict[str, bytes]
) -> None:
    waiting = [
        in_thread(lambda: post(idle.base, photo_bytes["coffee.png"], {"Prefer": f"wait={IDLE_MAX_WAIT}"}))
        for _ in range(IDLE_LONG_POLLS)
    ]
    until(lambda: idle.conn.zcard(LEASES) == IDLE_LONG_POLLS)
    job_id = post(idle.base, photo_bytes["coffee.png"]).json()["id"]

    refused = requests.get(f"{idle.base}/v1/jobs/{job_id}?wait=1", timeout=10)

    assert refused.status_code == 429 and refused.json()["error"]["code"] == "long_poll_limit"
    for thread, out in waiting:
        thread.join(30)
        assert out[0].status_code == 202 and out[0].headers["Preference-Applied"] == f"wait={IDLE_MAX_WAIT}"
    assert idle.conn.zcard(LEASES) == 0  # every lease given back: the key may long-poll again
    assert requests.get(f"{idle.base}/v1/jobs/{job_id}?wait=1", timeout=10).status_code == 200


def test_a_waiting_submit_is_woken_by_its_job_end(idle: Stack, photo_bytes: dict[str, bytes]) -> None:
    before = queued(idle)
    thread, out = in_thread(
        lambda: post(idle.base, photo_bytes["coffee.png"], {"Prefer": f"wait={IDLE_MAX_WAIT}"})
    )
    until(lambda: len(queued(idle) - before) == 1 and idle.conn.zcard(LEASES) == 1)
    (job_id,) = queued(idle) - before
    end_jobs(idle.env["REDIS_URL"], [job_id])
    thread.join(30)

    (response,) = out
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == f"wait={IDLE_MAX_WAIT}"
    assert response.json()["id"] == job_id and response.json()["status"] == "finished"
    assert response.json() == requests.get(f"{idle.base}/v1/jobs/{job_id}", timeout=10).json()
    assert idle.conn.zcard(LEASES) == 0


def test_waiting_submits_hold_no_redis_connection(photo_bytes: dict[str, bytes], tmp_path: Path) -> None:
    """More submits wait at once than the api process has Redis connections (one of which is its
    completion listener's subscription), and the api still serves other requests meanwhile."""
    waiting_submits = 8
    with worker_less(tmp_path, API_REDIS_CONNECTIONS=3, LONG_POLLS_PER_KEY=100) as stack:
        before = queued(stack)
        waiting = [
            in_thread(lambda: post(stack.base, photo_bytes["coffee.png"], {"Prefer": "wait=20"}))
            for _ in range(waiting_submits)
        ]
        until(lambda: stack.conn.zcard(LEASES) == waiting_submits)
        assert post(stack.base, photo_bytes["coffee.png"]).status_code == 202  # served meanwhile
        ids = sorted(queued(stack) - before)
        assert len(ids) == waiting_submits + 1
        end_jobs(stack.env["REDIS_URL"], ids)
        for thread, out in waiting:
            thread.join(30)
            assert out[0].status_code == 200 and out[0].json()["status"] == "finished"


# --- Idempotency-Key -----------------------------------------------------------------------------------


def test_an_idempotent_replay_that_prefers_to_wait(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    key = {"Idempotency-Key": f"prefer-{time.time_ns()}"}
    first = post(stack.base, photo_bytes["chelsea.png"], {**key, "Prefer": "wait=10"})
    assert first.status_code == 200, first.text

    again = post(stack.base, photo_bytes["chelsea.png"], {**key, "Prefer": "wait=10"})
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Preference-Applied"] == "wait=10"
    assert again.headers["Location"] == first.headers["Location"]

    plain = post(stack.base, photo_bytes["chelsea.png"], key)  # as before: the 202 with its status
    assert plain.status_code == 202
    assert plain.json() == {"id": first.json()["id"], "status": "finished", "url": first.headers["Location"]}


def test_an_idempotent_replay_waits_for_a_job_that_has_not_ended(
    idle: Stack, photo_bytes: dict[str, bytes]
) -> None:
    key = {"Idempotency-Key": f"prefer-{time.time_ns()}", "Prefer": f"wait={IDLE_MAX_WAIT}"}
    first = post(idle.base, photo_bytes["coffee.png"], {**key, "Prefer": "wait=1"})
    assert first.status_code == 202 and first.headers["Preference-Applied"] == "wait=1"
    job_id = first.json()["id"]
    before = queued(idle)

    thread, out = in_thread(lambda: post(idle.base, photo_bytes["coffee.png"], key))
    until(lambda: idle.conn.zcard(LEASES) == 1)  # the replay long-polls the first request's job
    end_jobs(idle.env["REDIS_URL"], [job_id])
    thread.join(30)

    (again,) = out
    assert again.status_code == 200, again.text
    assert again.json()["id"] == job_id and again.json()["status"] == "finished"
    assert idle.conn.zcard(LEASES) == 0
    assert queued(idle) == before  # no second job


# --- batches ---------------------------------------------------------------------------------------


def post_batch(base: str, images: list[bytes], headers: dict[str, str]) -> requests.Response:
    files = [("image", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
    return requests.post(f"{base}/v1/batches", files=files, headers=headers, timeout=60)


def test_a_batch_that_ends_within_the_wait_is_the_answer(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    names = ["rocket.jpg", "coffee.png", "chelsea.png"]
    response = post_batch(stack.base, [photo_bytes[n] for n in names], {"Prefer": "wait=10"})

    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    jobs = response.json()["jobs"]
    assert [job["status"] for job in jobs] == ["finished"] * 3
    for name, job in zip(names, jobs, strict=True):  # in upload order, each as a read gives it
        assert job["result"]["predictions"][0]["label"] in PHOTO_LABELS[name]
        assert requests.get(f"{stack.base}/v1/jobs/{job['id']}", timeout=10).json() == job
    conforms(stack.base, "/v1/batches", response)


def test_a_batch_not_all_ended_is_queued_after_the_wait(idle: Stack, photo_bytes: dict[str, bytes]) -> None:
    before = queued(idle)
    thread, out = in_thread(
        lambda: post_batch(idle.base, [photo_bytes["coffee.png"]] * 2, {"Prefer": f"wait={IDLE_MAX_WAIT}"})
    )
    until(lambda: len(queued(idle) - before) == 2 and idle.conn.zcard(LEASES) == 1)  # one lease a request
    ended = sorted(queued(idle) - before)[0]
    end_jobs(idle.env["REDIS_URL"], [ended])
    thread.join(30)

    (response,) = out
    assert response.status_code == 202, response.text
    assert response.headers["Preference-Applied"] == f"wait={IDLE_MAX_WAIT}"
    statuses = {job["id"]: job["status"] for job in response.json()["jobs"]}
    assert set(statuses) == queued(idle) - before
    assert sorted(statuses.values()) == ["finished", "queued"] and statuses[ended] == "finished"
    conforms(idle.base, "/v1/batches", response)
    assert idle.conn.zcard(LEASES) == 0


# --- the load generator ------------------------------------------------------------------------------


def test_the_load_generator_sends_one_request_or_two(stack: Stack, photo_bytes: dict[str, bytes]) -> None:
    port = int(stack.base.rsplit(":", 1)[1])
    images = list(photo_bytes.values())
    before = request_counts(stack.base)
    one = [InferqTarget("127.0.0.1", port, images)(i) for i in range(3)]
    middle = request_counts(stack.base)
    two = [InferqTarget("127.0.0.1", port, images, prefer_wait=False)(i) for i in range(3)]
    after = request_counts(stack.base)

    assert all(r["ok"] and r["requests"] == 1 and r["batch_size"] for r in one), one
    assert middle["one_request"] - before["one_request"] == 3
    assert middle["reads"] == before["reads"]
    assert all(r["ok"] and r["requests"] >= 2 for r in two), two
    assert after["submitted"] - middle["submitted"] == 3
    assert after["reads"] - middle["reads"] == sum(r["requests"] - 1 for r in two)


# --- parsing and the contract (in-process) ---------------------------------------------------------------


def test_preferences_are_parsed_as_rfc_7240_says() -> None:
    assert preferences(["respond-async, wait=10"]) == {"respond-async": None, "wait": "10"}
    assert preferences(['Wait="5";x=1, wait=9', "return=minimal"]) == {"wait": "5", "return": "minimal"}
    assert preferences(['foo="a,b", wait=3']) == {"foo": "a,b", "wait": "3"}
    assert preferences(["wait=1 2, =3, ,, wait=4"]) == {"wait": "4"}  # unparsable elements skipped
    assert preferences(["", "   "]) == {}


def test_the_wait_is_capped_and_malformed_ones_are_none(redis_url: str) -> None:
    app = create_app(settings_for(redis_url, max_wait_seconds=30))

    def wait_of(*values: str) -> int | None:
        headers = [("Prefer", v) for v in values]
        with app.test_request_context("/v1/jobs", method="POST", headers=headers):
            from flask import request

            return preferred_wait(request, app.extensions["inferq"].settings)

    assert wait_of("wait=10") == 10
    assert wait_of("wait=31") == wait_of("wait=" + "9" * 5000) == 30
    for ignored in ("respond-async", "wait=0", "wait=1.5", "wait=-2", "wait=", "wait=ten"):
        assert wait_of(ignored) is None, ignored
    assert wait_of("wait=x, wait=5") is None  # the first instance counts, and it is malformed


def test_a_waiter_registered_before_its_job_exists_is_not_taken_for_a_vanished_one(redis_url: str) -> None:
    """The listener's safety net wakes waiters of jobs that ended or vanished; a submit's waiter is
    registered before its job is enqueued and must sleep through re-checks that find no job yet."""
    listener = CompletionListener(redis.Redis.from_url(redis_url), recheck_seconds=0.1)
    with listener.waiter("not-enqueued-yet", job_exists=False) as early, listener.waiter("gone") as gone:
        assert gone.wait(5)  # a job that does not exist, known to: vanished
        assert not early.wait(1.0)  # ten re-checks later, still waiting
        listener.jobs_exist([early])
        assert early.wait(5)  # known to exist, and not there: vanished


def test_the_openapi_document_describes_the_preference(redis_url: str) -> None:
    document = create_app(settings_for(redis_url)).test_client().get("/openapi.json").json
    submit = document["paths"]["/v1/jobs"]["post"]
    assert "Prefer" in {p["name"] for p in submit["parameters"] if p["in"] == "header"}
    ended = submit["responses"]["200"]
    assert ended["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Job"}
    assert {"Location", "Preference-Applied"} <= set(ended["headers"])
    assert "Preference-Applied" in submit["responses"]["202"]["headers"]
    batch = document["paths"]["/v1/batches"]["post"]
    assert "Prefer" in {p["name"] for p in batch["parameters"] if p["in"] == "header"}
    items = batch["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["jobs"]["items"]
    assert items == {"$ref": "#/components/schemas/Job"}
