"""Concurrent submits carrying one `Idempotency-Key`, across gunicorn processes: exactly one job."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import requests

from launch.redis_server import EmbeddedRedis
from shared.config import Settings
from shared.jobs import make_queue
from tests.service import service_stack

pytestmark = pytest.mark.slow
CLIENTS = 16


def test_one_key_submitted_at_once_by_many_clients_makes_one_job(
    photo_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    with (
        EmbeddedRedis(tmp_path / "redis") as server,
        # Two api processes with several threads each: the racing requests really run in parallel.
        service_stack(server.url, tmp_path, workers=0, WEB_CONCURRENCY=2) as stack,
    ):
        start = threading.Barrier(CLIENTS)
        answers: list[requests.Response] = []

        def client() -> None:
            session = requests.Session()
            session.get(f"{stack.base}/healthz", timeout=10)  # connected before the race starts
            start.wait(30)
            answers.append(
                session.post(
                    f"{stack.base}/v1/jobs",
                    data=photo_bytes["coffee.png"],
                    headers={"Content-Type": "image/png", "Idempotency-Key": "order-42"},
                    timeout=30,
                )
            )

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

        assert [a.status_code for a in answers] == [202] * CLIENTS, [a.text for a in answers]
        assert len({a.json()["id"] for a in answers}) == 1, "one key, several jobs"
        queue = make_queue(stack.conn, Settings())
        assert queue.count == 1 and queue.job_ids == [answers[0].json()["id"]]
        assert len(list(stack.conn.scan_iter("rq:job:*"))) == 1
        assert len(list(stack.conn.scan_iter("inferq:img:*"))) == 1
