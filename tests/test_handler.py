"""The handler isolates failures: a bad image or an item that makes the forward pass raise fails
alone; its batch neighbours still get their predictions."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from shared.manifest import InputSpec
from tests.factories import png
from worker.handler import ClassifyHandler

SPEC = InputSpec(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class PoisonAwareRunner:
    """Classifies by mean pixel value; raises for any batch that holds an all-white image."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def predict(self, inputs: Sequence[np.ndarray], top_k: list[int]) -> list[list[dict[str, Any]]]:
        self.batch_sizes.append(len(inputs))
        if any(float(x.min()) >= 1.0 for x in inputs):
            raise RuntimeError("kernel failure on this input")
        return [[{"label": "mean", "index": 0, "score": float(x.mean())}] for x in inputs]


def make_handler(runner: PoisonAwareRunner) -> ClassifyHandler:
    info = {"name": "stub", "sha256": "0" * 64, "backend": "stub", "backend_version": "0"}
    model = SimpleNamespace(manifest=SimpleNamespace(name="stub", input=SPEC), sha256="0" * 64, info=info)
    return ClassifyHandler(model, runner, max_pixels=10_000)  # type: ignore[arg-type]


def test_a_raising_item_is_bisected_out_and_fails_alone() -> None:
    runner = PoisonAwareRunner()
    handler = make_handler(runner)
    images = [png(10), png(60), png(255), png(120), png(200)]
    outcomes, _ = handler.handle(images, [1] * 5)
    assert [o.error.code if o.error else None for o in outcomes] == [
        None,
        None,
        "inference_failed",
        None,
        None,
    ]
    assert all(o.result is not None for i, o in enumerate(outcomes) if i != 2)
    # Each neighbour got its own prediction back, in its own slot.
    means = [o.result["predictions"][0]["score"] for o in outcomes if o.result]
    assert means == sorted(means)
    assert runner.batch_sizes[0] == 5, "the first try is one forward pass for the whole batch"


def test_bad_bytes_fail_alone_without_reaching_the_model() -> None:
    runner = PoisonAwareRunner()
    handler = make_handler(runner)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, format="PNG")
    too_big = buf.getvalue()
    outcomes, _ = handler.handle([png(30), b"not an image", None, too_big, png(90)], [1] * 5)
    codes = [o.error.code if o.error else None for o in outcomes]
    assert codes == [None, "unsupported_image_format", "image_missing", "image_too_large", None]
    assert runner.batch_sizes == [2]


def test_an_unexpected_decoder_exception_is_that_images_error(monkeypatch) -> None:
    import shared.preprocess as preprocess_module

    def explode(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
        if data == b"boom":
            raise MemoryError("decoder ran out of memory")
        return np.zeros((3, 32, 32), dtype=np.float32)

    monkeypatch.setattr(preprocess_module, "preprocess", explode)
    handler = make_handler(PoisonAwareRunner())
    outcomes, _ = handler.handle([b"ok", b"boom"], [1, 1])
    assert outcomes[0].result is not None
    assert outcomes[1].error is not None and outcomes[1].error.code == "preprocess_failed"
