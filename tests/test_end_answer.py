"""An end that carries its answer: the message a job's end publishes holds the job's view, and a
long-poll (or a `Prefer: wait` submit) woken by it answers from it without reading the job back.

Against real processes (Valkey, the gunicorn api, a batch worker with the real model, or none). The
api's job read is the only XREVRANGE anyone sends (`api.job_view.queue_job_read`: a job's latest
result), so Redis's own `INFO commandstats` counts the api's job reads."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from bench.front_door import end_jobs
from launch.redis_server import EmbeddedRedis
from tests.factories import truncated_png
from tests.service import Stack, service_stack

pytestmark = pytest.mark.slow

KEY_A = "end-answer-key-aaaaaaaaaaaaaaaa"
KEY_B = "end-answer-key-bbbbbbbbbbbbbbbb"


def job_reads(conn: redis.Redis) -> int:
    stats = conn.info("commandstats").get("cmdstat_xrevrange")
    return int(stats["calls"]) if stats else 0


def post(stack: Stack, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        f"{stack.base}/v1/jobs",
        data=data,
        headers={"Content-Type": "application/octet-stream", **(headers or {})},
        timeout=60,
    )


def get(stack: Stack, job_id: str, headers: dict[str, str] | None = None, **params: Any) -> requests.Response:
    return requests.get(f"{stack.base}/v1/jobs/{job_id}", params=params, headers=headers, timeout=60)


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class LongPoll:
    """`GET /v1/jobs/<id>?wait=` in a thread, started once its first read is counted (its waiter is
    registered before that read, so an end from then on wakes it)."""

    def __init__(self, stack: Stack, job_id: str, headers: dict[str, str] | None = None) -> None:
        self.response: requests.Response | None = None
        before = job_reads(stack.conn)

        def run() -> None:
            self.response = get(stack, job_id, headers, wait=30)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        until(lambda: job_reads(stack.conn) > before, "the long-poll's first read")

    def answer(self) -> requests.Response:
        self._thread.join(60)
        assert self.response is not None, "the long-poll did not answer"
        return self.response


@contextmanager
def paused(proc: Any) -> Iterator[None]:
    """The worker stopped (SIGSTOP): submitted jobs wait until the block ends (a second or two,
    far below ABANDONED_AFTER_SECONDS)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def stack(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Valkey, one api process, one batch worker."""
    logs = tmp_path_factory.mktemp("end-answer")
    with EmbeddedRedis(logs / "redis") as server, service_stack(server.url, logs, WEB_CONCURRENCY=1) as stack:
        yield stack


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One Valkey and one api process with two API keys, no worker: jobs end only when a test ends
    them."""
    logs = tmp_path_factory.mktemp("end-answer-idle")
    with (
        EmbeddedRedis(logs / "redis") as server,
        service_stack(server.url, logs, workers=0, WEB_CONCURRENCY=1, API_KEYS=f"{KEY_A},{KEY_B}") as stack,
    ):
        yield stack


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_long_poll_woken_by_a_workers_end_answers_from_its_message(
    stack: Stack, photo_bytes: dict[str, bytes]
) -> None:
    with paused(stack.workers[0]):
        job_id = post(stack, photo_bytes["coffee.png"]).json()["id"]
        poll = LongPoll(stack, job_id)
        reads = job_reads(stack.conn)  # the long-poll's first read included
    answer = poll.answer()
    assert answer.status_code == 200
    assert answer.json()["status"] == "finished"
    assert job_reads(stack.conn) == reads, "the woken long-poll read the job back"
    assert answer.json() == get(stack, job_id).json()


def test_long_poll_woken_by_a_failed_end_answers_from_its_message(stack: Stack) -> None:
    """A job whose image the worker cannot decode: the failure's view (its error) is in the message."""
    with paused(stack.workers[0]):
        job_id = post(stack, truncated_png()).json()["id"]
        poll = LongPoll(stack, job_id)
        reads = job_reads(stack.conn)
    answer = poll.answer()
    assert answer.json()["status"] == "failed"
    assert answer.json()["error"]["code"] == "corrupt_image"
    assert job_reads(stack.conn) == reads, "the woken long-poll read the job back"
    assert answer.json() == get(stack, job_id).json()


def test_prefer_wait_woken_by_a_workers_end_answers_from_its_message(
    stack: Stack, photo_bytes: dict[str, bytes]
) -> None:
    reads = job_reads(stack.conn)
    jobs = len(stack.conn.keys("rq:job:*"))
    answers: list[requests.Response] = []
    with paused(stack.workers[0]):
        submit = threading.Thread(
            target=lambda: answers.append(post(stack, photo_bytes["chelsea.png"], {"Prefer": "wait=30"})),
            daemon=True,
        )
        submit.start()
        until(lambda: len(stack.conn.keys("rq:job:*")) > jobs, "the submit's job enqueued")
        time.sleep(0.5)  # (its waiter is registered before the enqueue: this is only to pause)
    submit.join(60)
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert job_reads(stack.conn) == reads, "the waiting submit read its job back"
    assert answer.json() == get(stack, answer.json()["id"]).json()


def test_an_end_without_a_view_wakes_and_is_read(idle: Stack, photo_bytes: dict[str, bytes]) -> None:
    """The message of an older worker (a bare id, e.g. during a rolling upgrade): the long-poll wakes
    at once and answers from a read of the job."""
    job_id = post(idle, photo_bytes["coffee.png"], bearer(KEY_A)).json()["id"]
    poll = LongPoll(idle, job_id, bearer(KEY_A))
    reads = job_reads(idle.conn)
    idle.conn.publish("inferq:ended", "{not json")  # ignored
    idle.conn.publish("inferq:ended", json.dumps({"id": job_id, "view": "not a view"}))  # read
    answer = poll.answer()
    assert answer.json()["status"] == "queued"  # woken by the message without a view: read
    assert job_reads(idle.conn) == reads + 1
    poll = LongPoll(idle, job_id, bearer(KEY_A))
    reads = job_reads(idle.conn)
    end_jobs(idle.env["REDIS_URL"], [job_id], with_view=False)  # the bare id, as workers published
    answer = poll.answer()
    assert answer.json()["status"] == "finished"
    assert job_reads(idle.conn) == reads + 1
    assert answer.json() == get(idle, job_id, bearer(KEY_A)).json()


def test_a_cancels_end_answers_the_long_poll_from_its_message(
    idle: Stack, photo_bytes: dict[str, bytes]
) -> None:
    job_id = post(idle, photo_bytes["rocket.jpg"], bearer(KEY_A)).json()["id"]
    poll = LongPoll(idle, job_id, bearer(KEY_A))
    canceled = requests.post(f"{idle.base}/v1/jobs/{job_id}/cancel", headers=bearer(KEY_A), timeout=30)
    assert canceled.status_code == 200
    reads = job_reads(idle.conn)  # the cancel's own read included
    answer = poll.answer()
    assert answer.json()["status"] == "canceled"
    assert job_reads(idle.conn) == reads, "the woken long-poll read the job back"
    assert answer.json() == get(idle, job_id, bearer(KEY_A)).json() == canceled.json()


def test_another_keys_long_poll_gets_404(idle: Stack, photo_bytes: dict[str, bytes]) -> None:
    job_id = post(idle, photo_bytes["camera.png"], bearer(KEY_A)).json()["id"]
    answers: list[requests.Response] = []
    other = threading.Thread(target=lambda: answers.append(get(idle, job_id, bearer(KEY_B), wait=5)))
    other.start()
    end_answer = LongPoll(idle, job_id, bearer(KEY_A))
    requests.post(f"{idle.base}/v1/jobs/{job_id}/cancel", headers=bearer(KEY_A), timeout=30)
    other.join(30)
    assert end_answer.answer().json()["status"] == "canceled"
    assert [a.status_code for a in answers] == [404]
    assert get(idle, job_id, bearer(KEY_B), wait=5).status_code == 404
