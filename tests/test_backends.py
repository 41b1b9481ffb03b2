"""Every backend serves the same model: the same top-5 on real photos within 1e-4 of each other;
`BACKEND=auto` serves the one its own warm-up measured fastest; results and the worker say which
backend, which version and which file (by sha256) served them."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from shared.config import Settings
from shared.manifest import Manifest
from worker import classify
from worker.backends import BACKEND_NAMES, installed_backends
from worker.handler import load_handler
from worker.model import LoadedModel, load_artifact
from worker.reference import reference_probabilities

BACKENDS = installed_backends()
CROSS_BACKEND_TOLERANCE = 1e-4
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def models(artifact_dir: Path) -> dict[str, LoadedModel]:
    return {name: load_artifact(artifact_dir, backend=name, threads=1) for name in BACKENDS}


def test_all_three_backends_are_installed_here() -> None:
    # The shared environment pins all three; a missing one would silently skip its parity checks.
    assert set(BACKENDS) == {"torchscript", "onnxruntime", "openvino"}


def test_every_backend_can_be_named_in_the_setting_and_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """BACKEND (shared/config.py cannot import the worker, so it spells the names out) and
    `python -m worker.classify --backend` take exactly `auto` and the names of `worker.backends`."""
    assert set(get_args(Settings.model_fields["backend"].annotation)) == {"auto", *BACKEND_NAMES}
    with pytest.raises(SystemExit):
        classify.main(["--help"])
    offered = re.search(r"--backend \{([^}]*)\}", capsys.readouterr().out)
    assert offered and set(offered.group(1).split(",")) == {"auto", *BACKEND_NAMES}


def test_backends_agree_on_real_photos(models: dict[str, LoadedModel], photo_bytes: dict[str, bytes]) -> None:
    for photo, data in photo_bytes.items():
        probs = {name: reference_probabilities(data, model, MAX_PIXELS) for name, model in models.items()}
        base_name, base = next(iter(probs.items()))
        base_top5 = [models[base_name].labels[i] for i in np.argsort(-base, kind="stable")[:5]]
        for name, p in probs.items():
            top5 = [models[name].labels[i] for i in np.argsort(-p, kind="stable")[:5]]
            assert top5 == base_top5, (photo, name, top5, base_name, base_top5)
            assert float(np.abs(p - base).max()) <= CROSS_BACKEND_TOLERANCE, (photo, name)


def test_each_backend_serves_and_names_its_own_file(
    models: dict[str, LoadedModel], artifact_dir: Path
) -> None:
    manifest = Manifest.read(artifact_dir)
    assert manifest.onnx is not None
    expected = {
        "torchscript": manifest.sha256,
        "onnxruntime": manifest.onnx.sha256,
        "openvino": manifest.onnx.sha256,
    }
    for name, model in models.items():
        info = model.info
        assert info["backend"] == name and info["sha256"] == expected[name]
        assert info["file"] == ("model.pt" if name == "torchscript" else "model.onnx")
        assert re.match(r"^\d+\.\d+", info["backend_version"]), info


def _settings(artifact_dir: Path, backend: str, **overrides: object) -> Settings:
    return Settings(
        artifact_dir=artifact_dir, backend=backend, max_batch_size=2, auto_batch_cap=True, **overrides
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_named_backend_serves_results_that_say_so(
    backend: str, artifact_dir: Path, photo_bytes: dict[str, bytes]
) -> None:
    handler = load_handler(_settings(artifact_dir, backend))
    outcomes, _ = handler.handle([photo_bytes["coffee.png"]], [3])
    result = outcomes[0].result
    assert result is not None and result["predictions"][0]["label"] == "espresso"
    assert result["model"]["backend"] == backend
    assert result["model"] == handler.model_info
    assert handler.batch_cap in (1, 2)


def test_auto_serves_the_backend_its_warm_up_measured_fastest(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker"):
        # Measured at this start, whatever an earlier test stored (WARM_UP_CACHE=false).
        handler = load_handler(_settings(artifact_dir, "auto", warm_up_cache=False))
    best: dict[str, float] = {}
    left_out: set[str] = set()
    for record in caplog.records:
        message = record.getMessage()
        match = re.match(r"backend (\w+) .*: forward ms per image (.*)", message)
        if match:
            best[match.group(1)] = min(float(ms) for ms in re.findall(r"b\d+=([\d.]+)", match.group(2)))
        elif match := re.match(r"backend (\w+) .* left out", message):
            left_out.add(match.group(1))
    # Every installed backend was timed: in full, or left out after the first pass.
    assert best and set(best) | left_out == set(BACKENDS) and not set(best) & left_out, caplog.text
    # The log rounds to 0.1 ms: the served backend is the fastest one, or within that rounding.
    served = handler.model_info["backend"]
    assert best[served] <= min(best.values()) + 0.05, (served, best)
    assert f"serving efficientnet_lite0 on {served}" in caplog.text


def test_openvino_refuses_to_start_under_tcmalloc_instead_of_hanging(
    artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.errors import ArtifactError
    from worker.backends import candidates, openvino_backend

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert openvino_backend.tcmalloc_loaded(maps)
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not openvino_backend.tcmalloc_loaded(maps)
    assert not openvino_backend.tcmalloc_loaded(tmp_path / "absent")

    monkeypatch.setattr(openvino_backend, "tcmalloc_loaded", lambda: True)
    assert "openvino" not in candidates("auto", "cpu")  # auto serves another backend
    with pytest.raises(ArtifactError, match="tcmalloc") as info:
        load_artifact(artifact_dir, backend="openvino")
    assert info.value.code == "backend_unavailable"
