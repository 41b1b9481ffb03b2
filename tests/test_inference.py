"""The default model on real photos, on every installed backend: batched runner, single-image
reference, their parity, the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from shared.config import PROJECT_ROOT
from shared.preprocess import preprocess
from tests.conftest import PHOTO_LABELS
from worker.backends import installed_backends
from worker.model import LoadedModel, load_artifact
from worker.reference import classify_reference, reference_probabilities
from worker.runner import InferenceRunner, default_warm_up_sizes

MAX_PIXELS = 40_000_000
PARITY_TOLERANCE = 1e-5

# Other images scikit-image ships: drawings, gray, palette, RGBA, GIF, astronomy, microscopy.
EXTRA_SAMPLES = (
    "astronaut.png",
    "horse.png",
    "coins.png",
    "color.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "logo.png",
    "page.png",
    "brick.png",
    "ihc.png",
    "no_time_for_that_tiny.gif",
    "clock_motion.png",
)


@pytest.fixture(scope="session", params=installed_backends())
def model(request: pytest.FixtureRequest, artifact_dir: Path) -> LoadedModel:
    return load_artifact(artifact_dir, backend=request.param, threads=1)


@pytest.fixture(scope="session")
def runner(model: LoadedModel) -> InferenceRunner:
    return InferenceRunner(model)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def parity_images(sample_dir: Path, photo_bytes: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """≥ 16 varied encoded images: the photos, other samples, and synthetic variations of them."""
    images = list(photo_bytes.items())
    images += [
        (name, (sample_dir / name).read_bytes()) for name in EXTRA_SAMPLES if (sample_dir / name).exists()
    ]
    chelsea = Image.open(io.BytesIO(photo_bytes["chelsea.png"])).convert("RGB")
    coffee = Image.open(io.BytesIO(photo_bytes["coffee.png"])).convert("RGB")
    rocket = Image.open(io.BytesIO(photo_bytes["rocket.jpg"])).convert("RGB")
    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(coffee.size))
    images += [
        ("chelsea-crop", _encode(chelsea.crop((50, 20, 300, 250)), "PNG")),
        ("coffee-flip", _encode(ImageOps.mirror(coffee), "PNG")),
        ("rocket-small", _encode(rocket.resize((120, 80)), "JPEG", quality=85)),
        ("chelsea-gray", _encode(chelsea.convert("L"), "PNG")),
        ("coffee-jpeg-q60", _encode(coffee, "JPEG", quality=60)),
        ("coffee-rgba-gradient", _encode(rgba, "PNG")),
        ("rocket-tall", _encode(rocket.transpose(Image.Transpose.ROTATE_90), "WEBP", quality=90)),
    ]
    assert len(images) >= 16
    return images


@pytest.fixture(scope="session")
def parity_inputs(parity_images: list[tuple[str, bytes]], model: LoadedModel) -> list[np.ndarray]:
    return [preprocess(data, model.manifest.input, MAX_PIXELS) for _, data in parity_images]


@pytest.fixture(scope="session")
def reference(parity_images: list[tuple[str, bytes]], model: LoadedModel) -> np.ndarray:
    return np.stack([reference_probabilities(data, model, MAX_PIXELS) for _, data in parity_images])


def _assert_same_ranking(indices: Sequence[int], ref_probs: np.ndarray, k: int, name: str) -> None:
    """Indices equal the reference's top-k, except where two scores are a tie within the tolerance."""
    ref_order = np.argsort(-ref_probs, kind="stable")[:k]
    for rank, (got, want) in enumerate(zip(indices, ref_order, strict=True)):
        assert got == want or abs(ref_probs[got] - ref_probs[want]) <= PARITY_TOLERANCE, (
            name,
            rank,
            got,
            want,
        )


# --- real photos -------------------------------------------------------------------------------------


def test_photos_via_runner(
    runner: InferenceRunner, model: LoadedModel, photo_bytes: dict[str, bytes]
) -> None:
    names = list(photo_bytes)
    inputs = [preprocess(photo_bytes[n], model.manifest.input, MAX_PIXELS) for n in names]
    results = runner.predict(inputs, top_k=5)
    for name, predictions in zip(names, results, strict=True):
        assert len(predictions) == 5
        assert predictions[0]["label"] in PHOTO_LABELS[name], (name, predictions[:3])
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)


def test_photos_via_reference(model: LoadedModel, photo_bytes: dict[str, bytes]) -> None:
    for name, data in photo_bytes.items():
        predictions = classify_reference(data, model, top_k=5, max_pixels=MAX_PIXELS)
        assert predictions[0]["label"] in PHOTO_LABELS[name], (name, predictions[:3])
    espresso = classify_reference(photo_bytes["coffee.png"], model, top_k=1)[0]
    assert espresso["label"] == "espresso" and espresso["score"] > 0.9
    assert espresso["index"] == model.manifest.labels.index("espresso")


# --- batched == single --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8, 16])
def test_batched_equals_reference(
    batch_size: int,
    runner: InferenceRunner,
    parity_images: list[tuple[str, bytes]],
    parity_inputs: list[np.ndarray],
    reference: np.ndarray,
) -> None:
    k = 5
    for start in range(0, len(parity_inputs), batch_size):
        chunk = parity_inputs[start : start + batch_size]
        probs = runner.probabilities(chunk)
        want = reference[start : start + len(chunk)]
        assert probs.shape == want.shape
        assert float(np.abs(probs - want).max()) <= PARITY_TOLERANCE
        for offset, predictions in enumerate(runner.predict(chunk, top_k=k)):
            ref = want[offset]
            name = parity_images[start + offset][0]
            _assert_same_ranking([p["index"] for p in predictions], ref, k, name)
            for p in predictions:
                assert abs(p["score"] - float(ref[p["index"]])) <= PARITY_TOLERANCE, name


def test_reference_top_k_matches_its_probabilities(model: LoadedModel, photo_bytes: dict[str, bytes]) -> None:
    data = photo_bytes["chelsea.png"]
    probs = reference_probabilities(data, model)
    predictions = classify_reference(data, model, top_k=3)
    assert [p["index"] for p in predictions] == list(np.argsort(-probs, kind="stable")[:3])
    assert abs(float(probs.sum()) - 1.0) < 1e-4


# --- the runner's contract ------------------------------------------------------------------------------


def test_predict_returns_plain_json_types_and_per_item_top_k(
    runner: InferenceRunner, parity_inputs: list[np.ndarray]
) -> None:
    results = runner.predict(parity_inputs[:4], top_k=[1, 5, 2, 20])
    assert [len(r) for r in results] == [1, 5, 2, 20]
    for predictions in results:
        for p in predictions:
            assert set(p) == {"label", "index", "score"}
            assert type(p["label"]) is str and type(p["index"]) is int and type(p["score"]) is float
    json.dumps(results)  # must not raise
    # A larger k only extends the list: the first items are the same (scores to within batch noise).
    alone = runner.predict(parity_inputs[1:2], top_k=2)[0]
    assert [p["index"] for p in alone] == [p["index"] for p in results[1][:2]]
    assert alone[0]["score"] == pytest.approx(results[1][0]["score"], abs=PARITY_TOLERANCE)


def test_predict_edge_cases(runner: InferenceRunner, parity_inputs: list[np.ndarray]) -> None:
    assert runner.predict([], top_k=5) == []
    assert len(runner.predict(parity_inputs[:1], top_k=5000)[0]) == len(runner.labels)
    with pytest.raises(ValueError, match="top_k"):
        runner.predict(parity_inputs[:2], top_k=[1])
    with pytest.raises(ValueError, match="at least 1"):
        runner.predict(parity_inputs[:1], top_k=0)
    with pytest.raises(ValueError, match="float32"):
        runner.predict([np.zeros((3, 32, 32), np.float32)], top_k=1)
    with pytest.raises(ValueError, match="float32"):
        runner.predict([parity_inputs[0].astype(np.float64)], top_k=1)


def test_warm_up(runner: InferenceRunner) -> None:
    assert default_warm_up_sizes(16) == (1, 2, 4, 8, 16)
    assert default_warm_up_sizes(12) == (1, 2, 4, 8, 12)
    assert default_warm_up_sizes(1) == (1,)
    timings = runner.warm_up((1, 2))
    assert set(timings) == {1, 2} and all(ms > 0 for ms in timings.values())


# --- the CLI ---------------------------------------------------------------------------------------------


def test_classify_cli(artifact_dir: Path, sample_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((sample_dir / "coffee.png").read_bytes()[:2000])  # truncated PNG
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.classify",
            "--artifact",
            str(artifact_dir),
            "--top-k",
            "3",
            str(sample_dir / "coffee.png"),
            str(corrupt),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    coffee_rows = [line.split() for line in lines if "coffee.png" in line]
    assert len(coffee_rows) == 3
    assert coffee_rows[0][1:3] == ["1", "espresso"]
    assert any("corrupt.png" in line and "corrupt_image" in line for line in lines), proc.stdout
