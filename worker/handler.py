"""The classification handler, split like a TorchServe handler: initialize, preprocess, inference,
postprocess. What the batch worker calls on a handler is the `Handler` protocol: another handler is
one class that has its members, passed as `BatchWorker(handler=...)`.

`load_handler(settings)` is its `initialize`: it loads the verified artifact on the configured backend
(or, with `BACKEND=auto`, on every installed one, keeping the fastest), warms it up and measures the
batch cap, unless an earlier start measured both under the same conditions (`worker.warm_up_cache`).
Everything runtime-specific is behind `worker.backends.Backend`.

Preprocessing errors stay per item: a bad image becomes that item's error and never touches the
other items of its batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shared.config import Settings
from shared.errors import CorruptImage, ImageError, InferqError
from shared.jobs import result_payload
from worker.backend_choice import choose
from worker.model import LoadedModel
from worker.runner import InferenceRunner

log = logging.getLogger(__name__)


@dataclass
class ItemOutcome:
    """What one job of a batch ends with: a result payload or an error, plus its own timings."""

    result: dict[str, Any] | None = None
    error: InferqError | None = None
    preprocess_ms: float = 0.0


@dataclass
class PreparedBatch:
    """A batch after preprocessing: per-item outcomes (errors filled in), and the model inputs of
    the items that are ready, with their positions."""

    outcomes: list[ItemOutcome]
    ready: list[int] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def of(cls, decoded: Iterable[tuple[np.ndarray | None, InferqError | None, float]]) -> PreparedBatch:
        """From each item's decode step, in batch order: its model input or its error (exactly one
        of them), and its preprocess time in ms."""
        prepared = cls(outcomes=[])
        for i, (array, error, preprocess_ms) in enumerate(decoded):
            prepared.outcomes.append(ItemOutcome(error=error, preprocess_ms=preprocess_ms))
            if error is None:
                assert array is not None
                prepared.ready.append(i)
                prepared.arrays.append(array)
        return prepared


class Handler(Protocol):
    """What the batch worker calls on its handler: the feeder's default decode step calls
    `preprocess_one` (a pool of decoder processes decodes with the model's input spec instead), the
    model stage calls `infer`, and the worker hash carries `model_info` and `batch_cap`.
    `load_handler(settings)` builds the default one, a `ClassifyHandler`."""

    @property
    def model(self) -> LoadedModel:
        """The loaded artifact; the decoder processes take its manifest's input spec (read only when
        the worker runs a decoder pool: a handler for DECODERS=0 may lack it)."""
        ...

    @property
    def model_info(self) -> Mapping[str, str]:
        """name, sha256 and whatever else identifies the model: into the worker's RQ hash."""
        ...

    @property
    def batch_cap(self) -> int | None:
        """Most items per forward pass; None: MAX_BATCH_SIZE."""
        ...

    def preprocess_one(self, data: bytes | None) -> tuple[np.ndarray | None, InferqError | None, float]:
        """One image's model input or its error (never raises), and its time in ms."""
        ...

    def infer(self, prepared: PreparedBatch, top_ks: Sequence[int]) -> tuple[list[ItemOutcome], float]:
        """One forward pass over `prepared` (on the model's thread): one outcome per item, and the
        pass's time in ms."""
        ...


class ClassifyHandler:
    def __init__(
        self, model: LoadedModel, runner: InferenceRunner, max_pixels: int, batch_cap: int | None = None
    ) -> None:
        self.model = model
        # Most items per forward pass (chosen from the warm-up curve by `load_handler`); None: no cap.
        self.batch_cap = batch_cap
        self.runner = runner
        self.max_pixels = max_pixels
        # name, sha256 (of the file served), file, backend, backend_version: into every result's
        # `model` block and, as `inferq_<field>`, into the worker's RQ hash.
        self.model_info: dict[str, str] = model.info

    @classmethod
    def initialize(cls, settings: Settings) -> ClassifyHandler:
        return load_handler(settings)

    def preprocess_one(self, data: bytes | None) -> tuple[np.ndarray | None, InferqError | None, float]:
        # Imported here: a worker whose decoders run in processes never needs PIL itself.
        from shared.preprocess import preprocess

        started = time.perf_counter()
        try:
            if data is None:
                raise CorruptImage(
                    "The image bytes are gone (expired or deleted) before the job started.",
                    code="image_missing",
                )
            array = preprocess(data, self.model.manifest.input, self.max_pixels)
            return array, None, (time.perf_counter() - started) * 1000
        except ImageError as exc:
            return None, exc, (time.perf_counter() - started) * 1000
        except Exception as exc:
            # Whatever a decoder raises (MemoryError on a huge-but-allowed image, a codec bug)
            # fails this image only: no input may take down the batch or the worker.
            error = InferqError(
                f"The image could not be preprocessed: {type(exc).__name__}.", code="preprocess_failed"
            )
            return None, error, (time.perf_counter() - started) * 1000

    def inference(self, inputs: Sequence[np.ndarray], top_ks: Sequence[int]) -> list[list[dict[str, Any]]]:
        return self.runner.predict(inputs, list(top_ks))

    def postprocess(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        return result_payload(predictions, self.model_info)

    def infer(self, prepared: PreparedBatch, top_ks: Sequence[int]) -> tuple[list[ItemOutcome], float]:
        """One forward pass over the prepared items (on the model's thread); returns one outcome per
        item and the forward pass time in ms."""
        if not prepared.arrays:
            return prepared.outcomes, 0.0
        started = time.perf_counter()
        self._infer_isolating_failures(prepared.ready, prepared.arrays, top_ks, prepared.outcomes)
        return prepared.outcomes, (time.perf_counter() - started) * 1000

    def _infer_isolating_failures(
        self,
        indices: list[int],
        arrays: list[np.ndarray],
        top_ks: Sequence[int],
        outcomes: list[ItemOutcome],
    ) -> None:
        """One forward pass; if it raises, bisect so only the item that raises fails."""
        try:
            predictions = self.inference(arrays, [top_ks[i] for i in indices])
        except Exception as exc:
            if len(indices) == 1:
                outcomes[indices[0]].error = InferqError(
                    f"The model could not process this image: {type(exc).__name__}.", code="inference_failed"
                )
                return
            half = len(indices) // 2
            self._infer_isolating_failures(indices[:half], arrays[:half], top_ks, outcomes)
            self._infer_isolating_failures(indices[half:], arrays[half:], top_ks, outcomes)
            return
        for i, prediction in zip(indices, predictions, strict=True):
            outcomes[i].result = self.postprocess(prediction)

    # `prepare` and `handle` are the handler's in-process API (image bytes in, one outcome per image
    # out, no Redis), used by the tests and `bench.limit` (forward time per batch size). The worker
    # never calls them: its feeder decodes, its model stage calls `infer`.

    def prepare(self, images: Sequence[bytes | None]) -> PreparedBatch:
        """Decode and preprocess every item (numpy/PIL only, no torch: safe off the model's thread)."""
        return PreparedBatch.of(self.preprocess_one(data) for data in images)

    def handle(
        self, images: Sequence[bytes | None], top_ks: Sequence[int]
    ) -> tuple[list[ItemOutcome], float]:
        """Run a whole batch: `prepare` then `infer`."""
        return self.infer(self.prepare(images), top_ks)


def load_handler(settings: Settings) -> ClassifyHandler:
    """Load and verify the artifact, warm it up and choose its batch cap (and, for `BACKEND=auto`,
    its backend), or take both from an earlier start's measurement under the same conditions: done
    once per worker process, before registering."""
    chosen = choose(settings)
    model = chosen.runner.model
    log.info(
        "serving %s on %s %s (%s, %s sha256 %s), batch cap %d of at most %d, %s",
        model.name,
        model.backend.name,
        model.backend.version,
        model.device,
        model.backend.path.name,
        model.sha256[:12],
        chosen.batch_cap,
        settings.max_batch_size,
        chosen.source,
    )
    return ClassifyHandler(model, chosen.runner, settings.max_image_pixels, batch_cap=chosen.batch_cap)
