"""Batched forward passes: many preprocessed images in, top-k predictions per image out.

One `predict` call is one forward pass: the inputs are stacked into one array, so a batch costs one
call into the backend whatever its size. Results are plain Python (str/int/float) because they go
through JSON into RQ results. Runtime-agnostic: it only calls `Backend.forward` (numpy in, numpy out).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.model import LoadedModel

log = logging.getLogger(__name__)


def calibration_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and the midpoints between them, up to the max."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.update(s for s in (size, size + size // 2) if s < max_batch_size)
        size *= 2
    return tuple(sorted(sizes))


def choose_batch_cap(ms_per_image: dict[int, float], tolerance: float = 0.10) -> int:
    """The largest size whose forward time per image is within `tolerance` of the best one.

    The curve times the forward pass alone, but every batch also pays work outside it that does not
    grow with its size (grabbing ids, starting and finishing its jobs in one script each, the
    hand-offs between the feeder, model and writer threads): where the curve is flat, a larger batch
    shares that work among more jobs, so the service serves more per second (BENCHMARKS.md, "Batching
    rule"). Past the flat part (a CPU curve that rises again, like TorchScript's) a larger batch is
    slower per image and only makes its jobs wait. Under light load the cap costs nothing: a batch
    is formed only from jobs that are ready. The tolerance is wider than the warm-up timings' noise
    on a shared CPU, so the cap does not jump between starts on a flat curve."""
    if not ms_per_image:
        raise ValueError("no timings")
    best = min(ms_per_image.values())
    return max(size for size, ms in ms_per_image.items() if ms <= best * (1 + tolerance))


def default_warm_up_sizes(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, 8, ... below the maximum, plus the maximum itself."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return tuple(sizes)


class InferenceRunner:
    """Runs a `LoadedModel` on batches; create it in the thread that will call `predict`.

    Runtimes keep per-thread state (torch's OpenMP pool: docs/architecture.md, "Threads"; OpenVINO's
    infer request), so the runner is meant to be used from the one thread that created it; it keeps no
    locks.
    """

    def __init__(self, model: LoadedModel, max_batch_size: int = 16) -> None:
        self.model = model
        self.labels: list[str] = list(model.manifest.labels)
        self.max_batch_size = max_batch_size
        spec = model.manifest.input
        self.input_shape: tuple[int, int, int] = (3, spec.crop, spec.crop)

    def _time_forward(self, size: int) -> float:
        batch = np.zeros((size, *self.input_shape), dtype=np.float32)
        started = time.perf_counter()
        self.model.backend.forward(batch)  # returns host memory: the GPU has finished too
        return (time.perf_counter() - started) * 1000

    def warm_up(self, batch_sizes: Sequence[int] | None = None) -> dict[int, float]:
        """Run each batch size twice so the first real request pays no one-off costs.

        Runtimes specialize for a shape during the first calls (TorchScript's profiling executor,
        OpenVINO's dynamic-shape kernels) and allocators grow their pools on first use. Returns the
        second call's time in ms per size.
        """
        sizes = tuple(batch_sizes) if batch_sizes is not None else default_warm_up_sizes(self.max_batch_size)
        timings: dict[int, float] = {}
        for size in sizes:
            for _ in range(2):
                timings[size] = self._time_forward(size)
        log.info(
            "warm-up of %s done: %s",
            self.model.backend.name,
            ", ".join(f"b{s}={ms:.0f}ms" for s, ms in timings.items()),
        )
        return timings

    def calibrate(self, batch_sizes: Sequence[int], images_per_size: int = 12) -> dict[int, float]:
        """Forward-pass time per image at each (warmed-up) batch size: the median of repeated calls
        (at least 2, about `images_per_size` images each), in ms."""
        curve: dict[int, float] = {}
        for size in batch_sizes:
            times = [self._time_forward(size) / size for _ in range(max(2, -(-images_per_size // size)))]
            curve[size] = statistics.median(times)
        return curve

    def _batch(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        for i, array in enumerate(inputs):
            if array.shape != self.input_shape or array.dtype != np.float32:
                got = f"{array.dtype}{tuple(array.shape)}"
                raise ValueError(f"input {i} is {got}, the model takes float32{self.input_shape}")
        return np.stack(inputs)  # one copy into a fresh contiguous batch

    def probabilities(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Softmax over the classes for each input: one forward pass, float32 (N, classes)."""
        return softmax(self.model.backend.forward(self._batch(inputs)))

    def predict(self, inputs: Sequence[np.ndarray], top_k: int | Sequence[int]) -> list[list[dict[str, Any]]]:
        """Top-k `{"label", "index", "score"}` per input, best first; `top_k` may differ per input."""
        if len(inputs) == 0:
            return []
        ks = [top_k] * len(inputs) if isinstance(top_k, int) else [int(k) for k in top_k]
        if len(ks) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(ks)} top_k values")
        if min(ks) < 1:
            raise ValueError(f"top_k must be at least 1, got {min(ks)}")
        ks = [min(k, len(self.labels)) for k in ks]
        probs = self.probabilities(inputs)
        k_max = max(ks)
        # argpartition finds the k best per row in linear time; only those k are then sorted (by
        # descending score, then ascending index: a fixed order for ties).
        top = np.argpartition(-probs, k_max - 1, axis=1)[:, :k_max]
        rows: list[list[dict[str, Any]]] = []
        for row, candidates, k in zip(probs, top, ks, strict=True):
            order = sorted(candidates.tolist(), key=lambda i: (-row[i], i))[:k]
            # float()/int(): JSON-safe Python scalars, no numpy types leak out.
            rows.append([{"label": self.labels[i], "index": i, "score": float(row[i])} for i in order])
        return rows


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum so exp never overflows."""
    shifted = logits.astype(np.float32, copy=False) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
