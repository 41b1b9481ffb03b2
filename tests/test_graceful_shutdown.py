"""SIGTERM to the api (gunicorn) while long-polls and submits are in flight: every request in flight
gets an answer or a clean close (long-polls: never a reset), no cut submit leaves a job behind that its
client does not know about, and gunicorn exits 0 within its graceful timeout."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import make_queue
from tests.service import post_image, service_stack

pytestmark = pytest.mark.slow
GRACEFUL_TIMEOUT_S = 10
WAITERS = 8
WAIT_S = 25  # each long-poll's own wait, well beyond the graceful timeout


def outcome(call: Callable[[], requests.Response]) -> str:
    """`<status code>`; `closed` (the server closed the connection cleanly, FIN), `refused` (nothing
    listens any more: the request was never in flight), `reset` (RST), or `error: …`."""
    try:
        return str(call().status_code)
    except requests.ConnectionError as exc:
        text = repr(exc)
        if "ConnectionResetError" in text or "Connection reset" in text:
            return "reset"
        if "RemoteDisconnected" in text:
            return "closed"
        if "Connection refused" in text:
            return "refused"
        return f"error: {text}"


def test_sigterm_under_load_answers_or_closes_every_request_in_flight(
    photo_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    with (
        EmbeddedRedis(tmp_path / "redis") as server,
        # No worker: the jobs stay queued, so every long-poll is still waiting at the SIGTERM.
        service_stack(
            server.url,
            tmp_path,
            workers=0,
            WEB_CONCURRENCY=2,
            API_GRACEFUL_TIMEOUT=GRACEFUL_TIMEOUT_S,
        ) as stack,
    ):
        ids = [post_image(stack.base, photo_bytes["coffee.png"]).json()["id"] for _ in range(WAITERS)]
        outcomes: list[tuple[str, str]] = []  # (what the request was, how it ended)
        submitting = threading.Event()
        submitting.set()

        def waiter(job_id: str) -> None:
            url = f"{stack.base}/v1/jobs/{job_id}"
            outcomes.append(
                ("long-poll", outcome(lambda: requests.get(url, params={"wait": WAIT_S}, timeout=60)))
            )

        def submitter() -> None:
            while submitting.is_set():
                result = outcome(lambda: post_image(stack.base, photo_bytes["rocket.jpg"]))
                if result == "refused":
                    return  # the listening socket is closed: the server has stopped accepting
                outcomes.append(("submit", result))

        threads = [threading.Thread(target=waiter, args=(job_id,)) for job_id in ids]
        threads += [threading.Thread(target=submitter) for _ in range(2)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # every long-poll is waiting, submits are flowing
        stack.api.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = stack.api.wait(GRACEFUL_TIMEOUT_S + 20)
        exited_after = time.monotonic() - signalled
        submitting.clear()
        for thread in threads:
            thread.join(WAIT_S + 40)
        queued = make_queue(stack.conn, Settings()).count

    assert code == 0, f"gunicorn exited {code}"
    assert exited_after < GRACEFUL_TIMEOUT_S + 10, exited_after
    polls = Counter(ended for kind, ended in outcomes if kind == "long-poll")
    submits = Counter(ended for kind, ended in outcomes if kind == "submit")
    print(f"\nlong-polls: {dict(polls)}; submits: {dict(submits)}")
    # Every long-poll in flight was answered or closed cleanly (FIN): never reset, never an error.
    assert sum(polls.values()) == WAITERS
    assert set(polls) <= {"200", "503", "closed"}, polls
    # Submits were answered (accepted, or refused by a limit: 429), or failed without creating a job
    # their client does not know about: a submit cut at the shutdown (reset or closed) must not have
    # enqueued anything.
    assert set(submits) <= {"202", "429", "503", "closed", "reset"}, submits
    assert queued == WAITERS + submits["202"], (queued, submits)
