"""Late batch formation (worker.pipeline) and the batch cap chosen from the warm-up curve."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.config import Settings
from shared.jobs import LANES, make_queue, submit
from tests.worker_stub import MeanRunner, png, stub_handler
from worker.batch_worker import BatchWorker
from worker.pipeline import ReadyItems
from worker.runner import calibration_sizes, choose_batch_cap


def test_take_returns_the_oldest_items_up_to_the_limit() -> None:
    ready: ReadyItems[int] = ReadyItems(capacity=8)
    for i in range(5):
        ready.put(i)
    assert ready.take(3) == [0, 1, 2]
    ready.release()
    assert ready.take(3) == [3, 4]


def test_take_blocks_until_an_item_arrives() -> None:
    ready: ReadyItems[str] = ReadyItems(capacity=2)
    threading.Timer(0.2, ready.put, args=("late",)).start()
    started = time.monotonic()
    assert ready.take(4) == ["late"]
    assert time.monotonic() - started >= 0.15


def test_close_drains_what_is_left_then_ends() -> None:
    ready: ReadyItems[int] = ReadyItems(capacity=4)
    ready.put(1)
    ready.close()
    assert ready.take(4) == [1]
    assert ready.take(4) == []
    with pytest.raises(RuntimeError):
        ready.put(2)


def test_room_waits_while_full_and_idle_tracks_the_taker() -> None:
    ready: ReadyItems[int] = ReadyItems(capacity=2)
    assert ready.idle()
    ready.put(1)
    ready.put(2)
    started = time.monotonic()
    assert ready.room(0.1) == 0
    assert time.monotonic() - started >= 0.08
    assert not ready.idle()
    assert ready.take(1) == [1]
    assert ready.room(0.1) == 1
    assert ready.take(1) == [2]
    assert not ready.idle(), "busy until the taker releases"
    ready.release()
    assert ready.idle()


def test_calibration_sizes_are_powers_of_two_and_midpoints_up_to_the_max() -> None:
    assert calibration_sizes(16) == (1, 2, 3, 4, 6, 8, 12, 16)
    assert calibration_sizes(5) == (1, 2, 3, 4, 5)
    assert calibration_sizes(1) == (1,)


def test_batch_cap_is_the_largest_size_as_fast_per_image_as_the_best() -> None:
    # A CPU-like curve: per-image time falls to batch 3, then rises; 4 is within 10 % of the best.
    assert choose_batch_cap({1: 10.0, 2: 8.4, 3: 8.2, 4: 8.6, 8: 9.4, 16: 11.4}) == 4
    # TorchScript-like: the best is at 2 and larger batches are much slower per image.
    assert choose_batch_cap({1: 17.9, 2: 16.7, 4: 20.3, 8: 27.1}) == 2
    # A GPU-like curve keeps falling: the cap is the largest size measured.
    assert choose_batch_cap({1: 4.0, 2: 2.1, 4: 1.1, 8: 0.6, 16: 0.3}) == 16
    # Flat (ONNX Runtime / OpenVINO on a CPU): the per-batch work outside the forward pass is
    # shared by the most jobs.
    assert choose_batch_cap({1: 6.20, 2: 6.27, 4: 6.71, 8: 6.76}) == 8
    # Noise in a flat curve does not shrink the cap to the noisiest minimum.
    assert choose_batch_cap({1: 12.9, 2: 11.9, 3: 12.3, 4: 12.6, 6: 12.8, 8: 13.0}) == 8
    # A size past a slow one still counts if it is as fast as the best.
    assert choose_batch_cap({1: 10.0, 2: 11.5, 4: 10.5}) == 4


class SlowRunner(MeanRunner):
    """The stub model, with a first forward pass slow enough for more jobs to arrive during it."""

    def __init__(self) -> None:
        super().__init__()
        self.first_call = threading.Event()

    def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
        if not self.first_call.is_set():
            self.first_call.set()
            time.sleep(1.0)
        return super().predict(inputs, top_k)


def test_jobs_arriving_during_a_forward_pass_share_the_next_batch(
    redis_url: str, redis_conn: redis.Redis
) -> None:
    settings = Settings(redis_url=redis_url, queue_name="pipeline-late-batch", max_batch_size=4)
    queue = make_queue(redis_conn, settings, lane=LANES[0])
    runner = SlowRunner()
    handler = stub_handler(runner)
    handler.batch_cap = 4
    worker = BatchWorker(settings=settings, handler=handler)
    ids = [submit(queue, png(10), 1, settings).id]

    def later_arrivals() -> None:
        runner.first_call.wait(10)
        for value in (20, 30, 40):  # one by one, while the first job's forward pass runs
            ids.append(submit(queue, png(value), 1, settings).id)
            time.sleep(0.05)

    submitter = threading.Thread(target=later_arrivals)
    submitter.start()
    worker.work(max_jobs=4)
    submitter.join()

    assert runner.batch_sizes == [1, 3]
    jobs = [Job.fetch(job_id, connection=redis_conn, serializer=JSONSerializer) for job_id in ids]
    assert [job.get_status() for job in jobs] == ["finished"] * 4
    assert len({job.meta["batch_id"] for job in jobs[1:]}) == 1
