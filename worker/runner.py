"""Batched forward passes: many preprocessed images in, top-k predictions per image out.

One `predict` call is one forward pass: the inputs are stacked into one tensor, so a batch costs one
call into the model whatever its size. Results are plain Python (str/int/float) because they go
through JSON into RQ results.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

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


def choose_batch_cap(ms_per_image: dict[int, float], tolerance: float = 0.02) -> int:
    """Where throughput stops rising: the size with the best images/s, or a smaller one within
    `tolerance` of it (a bigger batch that is not faster per image only makes its first jobs wait).
    Not a wider tolerance: on a shared CPU the warm-up timings are noisy enough that a wide
    tolerance picks a too-small cap at some starts, which costs saturation throughput (BENCHMARKS.md)."""
    if not ms_per_image:
        raise ValueError("no timings")
    best = min(ms_per_image.values())
    return min(size for size, ms in ms_per_image.items() if ms <= best * (1 + tolerance))


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

    Torch ops from a second thread start a second OpenMP pool (docs/architecture.md, "Threads"), so
    the runner is meant to be used from the one thread that created it; it keeps no locks.
    """

    def __init__(self, model: LoadedModel, threads: int = 0, max_batch_size: int = 16) -> None:
        self.model = model
        self.labels: list[str] = list(model.manifest.labels)
        self.max_batch_size = max_batch_size
        self.device = torch.device(model.device)
        spec = model.manifest.input
        self.input_shape: tuple[int, int, int] = (3, spec.crop, spec.crop)
        if threads > 0:
            # Process-wide; 0 keeps torch's default (one per core).
            torch.set_num_threads(threads)
        self._pin = self.device.type == "cuda"  # pinned host memory makes the copy truly asynchronous

    def warm_up(self, batch_sizes: Sequence[int] | None = None) -> dict[int, float]:
        """Run each batch size twice so the first real request pays no one-off costs.

        TorchScript's profiling executor specializes a graph during the first calls for a shape, and
        the allocator grows its pools on first use. Returns the second call's time in ms per size.
        """
        sizes = tuple(batch_sizes) if batch_sizes is not None else default_warm_up_sizes(self.max_batch_size)
        timings: dict[int, float] = {}
        for size in sizes:
            batch = torch.zeros((size, *self.input_shape), dtype=torch.float32, device=self.device)
            for _ in range(2):
                started = time.perf_counter()
                with torch.inference_mode():
                    self.model.module(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timings[size] = (time.perf_counter() - started) * 1000
        log.info("warm-up done: %s", ", ".join(f"b{s}={ms:.0f}ms" for s, ms in timings.items()))
        return timings

    def calibrate(self, batch_sizes: Sequence[int], images_per_size: int = 12) -> dict[int, float]:
        """Forward-pass time per image at each (warmed-up) batch size: the median of repeated calls
        (at least 2, about `images_per_size` images each), in ms."""
        curve: dict[int, float] = {}
        for size in batch_sizes:
            batch = torch.zeros((size, *self.input_shape), dtype=torch.float32, device=self.device)
            times = []
            for _ in range(max(2, -(-images_per_size // size))):
                started = time.perf_counter()
                with torch.inference_mode():
                    self.model.module(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append((time.perf_counter() - started) * 1000 / size)
            curve[size] = statistics.median(times)
        return curve

    def _batch(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        for i, array in enumerate(inputs):
            if array.shape != self.input_shape or array.dtype != np.float32:
                got = f"{array.dtype}{tuple(array.shape)}"
                raise ValueError(f"input {i} is {got}, the model takes float32{self.input_shape}")
        # One copy into a fresh contiguous host tensor; from_numpy shares it without another copy.
        batch = torch.from_numpy(np.stack(inputs))
        if self.device.type == "cpu":
            return batch
        if self._pin:
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def probabilities(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        """Softmax over the classes for each input: one forward pass, result on the CPU, float32."""
        batch = self._batch(inputs)
        with torch.inference_mode():
            logits = self.model.module(batch)
            return torch.softmax(logits.float(), dim=1).cpu()

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
        # One topk with the largest k; each item keeps its own prefix (topk is sorted).
        scores, indices = torch.topk(probs, max(ks), dim=1)
        # tolist() yields Python floats/ints: JSON-safe, no numpy/torch scalars leak out.
        score_rows: list[list[float]] = scores.tolist()
        index_rows: list[list[int]] = indices.tolist()
        return [
            [
                {"label": self.labels[index], "index": index, "score": score}
                for score, index in zip(score_row[:k], index_row[:k], strict=True)
            ]
            for score_row, index_row, k in zip(score_rows, index_rows, ks, strict=True)
        ]
