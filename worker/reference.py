"""The reference single-image path: what a notebook would do, with no batching involved.

bytes → `preprocess` → a batch of one → the backend's forward → softmax → top-k. The batched service
must give the same scores as this (tests hold it to 1e-5), and the `worker.classify` CLI uses it
directly. Deliberately independent of `worker.runner`, so that a bug there cannot hide in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared.preprocess import preprocess
from worker.model import LoadedModel


def _default_max_pixels() -> int:
    from shared.config import get_settings

    return get_settings().max_image_pixels


def reference_probabilities(data: bytes, model: LoadedModel, max_pixels: int | None = None) -> np.ndarray:
    """Softmax over all classes for one image, as a float32 vector; image errors raise `ImageError`."""
    array = preprocess(data, model.manifest.input, max_pixels or _default_max_pixels())
    logits = model.backend.forward(np.ascontiguousarray(array, dtype=np.float32)[None])[0].astype(np.float64)
    # In float64, then back: the reference is computed more precisely than the runner's float32.
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


def classify_reference(
    data: bytes, model: LoadedModel, top_k: int = 5, max_pixels: int | None = None
) -> list[dict[str, Any]]:
    """Top-k `{"label", "index", "score"}` for one image, best first, plain Python types."""
    probs = reference_probabilities(data, model, max_pixels)
    k = max(1, min(int(top_k), probs.shape[0]))
    # A stable sort of the negated scores: equal scores keep the lower index first, a fixed order.
    order = np.argsort(-probs, kind="stable")[:k]
    labels = model.manifest.labels
    return [{"label": labels[int(i)], "index": int(i), "score": float(probs[i])} for i in order]
