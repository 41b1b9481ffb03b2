"""A BatchWorker with a stub model (no torch), for tests of what workers write to Redis: jobs'
results and errors, telemetry, logs, the worker registry. In-process (`stub_worker`), or as its own
process (`python -m tests.worker_stub`, settings from the environment; `STUB_INFER_SECONDS` makes
every forward pass take that long), for tests that kill workers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from shared.config import Settings, get_settings
from shared.jobs import lane_queue_names
from shared.manifest import InputSpec
from tests.factories import png, truncated_png  # noqa: F401 - re-exported for the stub tests
from worker.batch_worker import BatchWorker
from worker.handler import ClassifyHandler

SPEC = InputSpec(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
STUB_SHA256 = "5" * 64
STUB_MODEL = "stub-model"


class MeanRunner:
    """Classifies by mean pixel value, like a model would: one prediction per input."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batch_sizes: list[int] = []
        self.delay = delay

    def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
        if self.delay:
            time.sleep(self.delay)
        self.batch_sizes.append(len(inputs))
        return [[{"label": "mean", "index": 0, "score": float(x.mean())}] for x in inputs]


def stub_handler(runner: MeanRunner | None = None) -> ClassifyHandler:
    info = {
        "name": STUB_MODEL,
        "sha256": STUB_SHA256,
        "file": "stub",
        "backend": "stub",
        "backend_version": "0",
    }
    model = SimpleNamespace(
        manifest=SimpleNamespace(name=STUB_MODEL, input=SPEC), sha256=STUB_SHA256, info=info
    )
    return ClassifyHandler(model, runner or MeanRunner(), max_pixels=1_000_000)  # type: ignore[arg-type]


def stub_worker(settings: Settings, name: str | None = None) -> BatchWorker:
    return BatchWorker(name=name, settings=settings, handler=stub_handler())


def main() -> int:
    settings = get_settings()
    runner = MeanRunner(delay=float(os.environ.get("STUB_INFER_SECONDS", "0")))
    worker = BatchWorker(lane_queue_names(settings), settings=settings, handler=stub_handler(runner))
    worker.work()
    return 0


if __name__ == "__main__":
    sys.exit(main())
