"""An in-process BatchWorker with a stub model (no torch), for tests of what workers write to Redis:
jobs' results and errors, telemetry, logs, the worker registry."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from shared.config import Settings
from shared.jobs import LANES, lane_queue_name
from shared.manifest import InputSpec
from tests.factories import png, truncated_png  # noqa: F401 - re-exported for the stub tests
from worker.batch_worker import BatchWorker
from worker.handler import ClassifyHandler

SPEC = InputSpec(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
STUB_SHA256 = "5" * 64
STUB_MODEL = "stub-model"


class MeanRunner:
    """Classifies by mean pixel value, like a model would: one prediction per input."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
        self.batch_sizes.append(len(inputs))
        return [[{"label": "mean", "index": 0, "score": float(x.mean())}] for x in inputs]


def stub_handler(runner: MeanRunner | None = None) -> ClassifyHandler:
    model = SimpleNamespace(manifest=SimpleNamespace(name=STUB_MODEL, input=SPEC), sha256=STUB_SHA256)
    return ClassifyHandler(model, runner or MeanRunner(), max_pixels=1_000_000)  # type: ignore[arg-type]


def stub_worker(settings: Settings, name: str | None = None) -> BatchWorker:
    queues = [lane_queue_name(settings, lane) for lane in LANES]
    return BatchWorker(queues, name=name, settings=settings, handler=stub_handler())
