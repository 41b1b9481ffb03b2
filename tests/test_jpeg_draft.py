"""DCT-scaled JPEG decoding (`InputSpec.jpeg_draft`): when it applies, and what it does to predictions."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.manifest import InputSpec, Manifest
from shared.preprocess import decode_rgb, preprocess
from tests.conftest import PHOTO_LABELS
from worker.model import LoadedModel, load_artifact
from worker.reference import reference_probabilities

SPEC = InputSpec(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
DRAFT = SPEC.model_copy(update={"jpeg_draft": True})
MAX_PIXELS = 40_000_000


def jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def coffee(sample_dir: Path) -> Image.Image:
    return Image.open(sample_dir / "coffee.png")


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((600, 400), (600, 400)),  # shorter side < 2 x 256: full size
        ((767, 511), (767, 511)),
        ((768, 512), (384, 256)),  # exactly 2x: 1/2
        ((1200, 800), (600, 400)),
        ((2400, 1600), (600, 400)),  # 1/4: 1/8 would give a 200-pixel side
        ((4096, 2048), (512, 256)),  # 1/8
    ],
)
def test_scaled_only_while_the_resized_image_fits_inside(
    coffee: Image.Image, size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    data = jpeg(coffee, size)
    assert decode_rgb(data, MAX_PIXELS, 256).size == decoded
    assert decode_rgb(data, MAX_PIXELS).size == size


def test_off_by_default_and_bit_identical_below_the_threshold(
    photo_bytes: dict[str, bytes], coffee: Image.Image
) -> None:
    assert SPEC.jpeg_draft is False
    for data in (photo_bytes["rocket.jpg"], jpeg(coffee, (767, 511))):
        np.testing.assert_array_equal(preprocess(data, DRAFT, MAX_PIXELS), preprocess(data, SPEC, MAX_PIXELS))
    big = jpeg(coffee, (1200, 800))
    assert not np.array_equal(preprocess(big, DRAFT, MAX_PIXELS), preprocess(big, SPEC, MAX_PIXELS))


@pytest.fixture(scope="module")
def model(artifact_dir: Path) -> LoadedModel:
    torch.set_num_threads(1)
    return load_artifact(artifact_dir)


@pytest.mark.parametrize("factor", [2, 4])
def test_predictions_keep_their_labels(model: LoadedModel, sample_dir: Path, factor: int) -> None:
    """On the test photos enlarged to 2x and 4x (JPEG q90): the same top-1, scores within 0.1.

    The reference path follows the manifest's spec, so the drafted model is the same model with
    `jpeg_draft` set in its manifest."""
    spec = model.manifest.input.model_copy(update={"jpeg_draft": True})
    drafted_model = dataclasses.replace(model, manifest=model.manifest.model_copy(update={"input": spec}))
    for name in PHOTO_LABELS:
        photo = Image.open(sample_dir / name)
        data = jpeg(photo, (photo.width * factor, photo.height * factor))
        full = reference_probabilities(data, model, MAX_PIXELS)
        drafted = reference_probabilities(data, drafted_model, MAX_PIXELS)
        assert not np.array_equal(full, drafted), "the draft must apply for this test to bite"
        assert int(np.argmax(drafted)) == int(np.argmax(full)), name
        assert float(np.abs(drafted - full).max()) <= 0.1, name


def test_the_manifest_records_it_only_when_on(artifact_dir: Path) -> None:
    manifest = Manifest.read(artifact_dir)
    assert "jpeg_draft" not in manifest.to_json()  # off: manifests from before the field, unchanged
    on = manifest.model_copy(update={"input": manifest.input.model_copy(update={"jpeg_draft": True})})
    assert '"jpeg_draft": true' in on.to_json()
    assert Manifest.model_validate_json(on.to_json()).input.jpeg_draft is True
