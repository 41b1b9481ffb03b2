"""What a batch worker publishes about itself in its RQ worker hash (`rq:worker:<name>`), read by
/metrics, /readyz and dashboards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import redis

from shared.config import Settings
from shared.jobs import make_queue, submit
from tests.worker_stub import MeanRunner, png, stub_handler
from worker.batch_worker import BatchWorker


def test_every_model_info_field_and_the_batch_cap_land_in_the_worker_hash(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    settings = Settings(redis_url=redis_url, queue_name="worker-hash", max_batch_size=8)
    seen: dict[bytes, bytes] = {}

    class PeekingRunner(MeanRunner):
        def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
            seen.update(redis_conn.hgetall("rq:worker:hashed"))  # while the worker is alive
            return super().predict(inputs, top_k)

    handler = stub_handler(PeekingRunner())
    handler.model_info = {**handler.model_info, "backend": "onnxruntime", "backend_version": "1.2.3"}
    handler.batch_cap = 3
    worker = BatchWorker(settings=settings, handler=handler, name="hashed")
    submit(make_queue(redis_conn, settings), png(50), 1, settings)
    worker.work(burst=True)
    fields = {k.decode(): v.decode() for k, v in seen.items()}
    assert fields["inferq_model"] == handler.model_info["name"]
    assert fields["inferq_model_sha256"] == handler.model_info["sha256"]
    assert fields["inferq_model_backend"] == "onnxruntime"
    assert fields["inferq_model_backend_version"] == "1.2.3"
    assert fields["inferq_batch_cap"] == "3"
    assert worker.queue_names() == ["worker-hash", "worker-hash-low"], "every lane, highest first"
