"""The artifact: reproducible builds, the general builder, and the loader's refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from artifacts.build import main as build_main
from shared.config import PROJECT_ROOT
from shared.errors import ArtifactError
from shared.manifest import MANIFEST_FILE, Manifest
from worker.model import check_torch_version, load_artifact, quiet_torchscript, sha256_file, verify_files


def _copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(artifact: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = artifact / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _max_diff(module: torch.nn.Module, eager: torch.nn.Module, crop: int) -> tuple[float, float]:
    batch = torch.randn((3, 3, crop, crop), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = eager(batch)
        return float((module(batch) - want).abs().max()), float(want.abs().max())


# --- the default artifact -------------------------------------------------------------------------------


def test_default_manifest(artifact_dir: Path) -> None:
    manifest, path = verify_files(artifact_dir)
    assert manifest.sha256 == sha256_file(path)
    assert manifest.format == "torchscript" and manifest.arch == "efficientnet_lite0"
    assert manifest.num_classes == len(manifest.labels) == 1000
    assert manifest.labels[967] == "espresso"
    spec = manifest.input
    assert (spec.resize, spec.crop, spec.mean, spec.std) == (256, 224, (0.5,) * 3, (0.5,) * 3)
    assert manifest.torch_version == torch.__version__
    assert manifest.source_weights_sha256 is not None
    # Canonical JSON, and nothing that changes from build to build.
    text = (artifact_dir / MANIFEST_FILE).read_text(encoding="utf-8")
    assert text == manifest.to_json()
    assert not any(word in text.lower() for word in ('"created', '"built_at', "timestamp", str(PROJECT_ROOT)))


def test_build_is_byte_reproducible(tmp_path: Path) -> None:
    """Two fresh processes, different output folders, working directories and thread settings."""
    out_a, out_b = tmp_path / "a" / "efficientnet_lite0", tmp_path / "b" / "elsewhere"
    env_b = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "artifacts.build", "--out", str(out_a)], cwd=PROJECT_ROOT),
        subprocess.Popen(
            [sys.executable, "-m", "artifacts.build", "--out", str(out_b)], cwd=tmp_path, env=env_b
        ),
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for name in ("model.pt", MANIFEST_FILE):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    blob = (out_a / "model.pt").read_bytes()
    # No path of this machine and no output-folder name inside the archive.
    for needle in (str(PROJECT_ROOT), sys.prefix, str(tmp_path), "efficientnet_lite0/", "elsewhere"):
        assert needle.encode() not in blob, needle
    assert not list(tmp_path.glob("*/.*tmp*")), "the temp folder of the atomic write was left behind"
    # This process has traced other models by now: TorchScript's mangled class names are renumbered,
    # so an in-process build gives the same bytes too.
    out_c = tmp_path / "c"
    assert build_main(["--out", str(out_c)]) == 0
    assert (out_c / "model.pt").read_bytes() == blob


def test_if_missing_keeps_a_valid_artifact(artifact_dir: Path, tmp_path: Path, capsys: Any) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    before = (copy / "model.pt").stat().st_mtime_ns
    assert build_main(["--out", str(copy), "--if-missing"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (copy / "model.pt").stat().st_mtime_ns == before


# --- refusals ---------------------------------------------------------------------------------------------


def test_refuses_a_tampered_model_file(artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    model = copy / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256") as info:
        load_artifact(copy)
    expected = Manifest.read(copy).sha256
    assert expected in info.value.message and sha256_file(model) in info.value.message


def test_refuses_a_manifest_missing_an_input_field(artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    _edit_manifest(copy, lambda m: m["input"].pop("mean"))
    with pytest.raises(ArtifactError, match=r"input\.mean"):
        load_artifact(copy)


def test_refuses_another_torch_major_version(artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    _edit_manifest(copy, lambda m: m.update(torch_version="1.13.1"))
    with pytest.raises(ArtifactError, match="major") as info:
        load_artifact(copy)
    assert "1.13.1" in info.value.message and torch.__version__ in info.value.message


def test_warns_on_another_torch_minor_version(caplog: pytest.LogCaptureFixture) -> None:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    manifest = Manifest.model_construct(name="m", torch_version=f"{major}.{minor + 1}.0")
    with caplog.at_level(logging.WARNING, logger="worker.model"):
        check_torch_version(manifest)
    assert "minor versions differ" in caplog.text


def test_refuses_wrong_label_counts(artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    # Inconsistent manifest: caught before loading.
    _edit_manifest(copy, lambda m: m["labels"].pop())
    with pytest.raises(ArtifactError, match="num_classes is 1000 but there are 999 labels"):
        load_artifact(copy)
    # Consistent manifest, but the model has 1000 outputs: caught by the dummy forward.
    _edit_manifest(copy, lambda m: m.update(num_classes=999))
    with pytest.raises(ArtifactError, match=r"\(2, 1000\), expected \(2, 999\)"):
        load_artifact(copy)


def test_refuses_missing_or_escaping_files(artifact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError) as info:
        load_artifact(tmp_path / "nothing-here")
    assert info.value.code == "artifact_missing"
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    _edit_manifest(copy, lambda m: m.update(file="../copy/model.pt"))
    with pytest.raises(ArtifactError, match="plain name"):
        load_artifact(copy)


# --- the general builder -------------------------------------------------------------------------------


def test_build_from_torchvision_arch_and_weights(tmp_path: Path, capsys: Any) -> None:
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(weights=None).eval()
    weights = tmp_path / "resnet18.pt"
    torch.save(eager.state_dict(), weights)
    out = tmp_path / "resnet18-artifact"
    argv = [
        "--arch",
        "resnet18",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--resize",
        "72",
        "--crop",
        "64",
    ]
    assert build_main(argv) == 0
    assert "sha256" in capsys.readouterr().out
    loaded = load_artifact(out)
    manifest = loaded.manifest
    assert (manifest.arch, manifest.name, manifest.num_classes) == ("resnet18", "resnet18", 1000)
    assert (manifest.input.resize, manifest.input.crop) == (72, 64)
    assert manifest.input.mean == (0.485, 0.456, 0.406)
    assert manifest.source_weights_sha256 == sha256_file(weights)
    diff, scale = _max_diff(loaded.module, eager, 64)
    assert diff <= 1e-4 * max(1.0, scale)


def test_build_from_torchscript_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    eager = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    source = tmp_path / "tiny.pt"
    with quiet_torchscript(), torch.inference_mode():
        torch.jit.save(torch.jit.trace(eager, torch.zeros((1, 3, 64, 64))), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(10)), encoding="utf-8")
    common = ["--torchscript", str(source), "--resize", "64", "--crop", "64"]

    # 10 outputs and no --labels: refused, nothing written.
    assert build_main([*common, "--out", str(tmp_path / "refused")]) == 1
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "tiny-artifact"
    assert build_main([*common, "--labels", str(labels), "--out", str(out)]) == 0
    loaded = load_artifact(out)
    assert loaded.manifest.name == "tiny" and loaded.manifest.arch == "torchscript:MobileNetV3"
    assert loaded.manifest.labels == [f"class {i}" for i in range(10)]
    assert loaded.manifest.source_weights_sha256 == sha256_file(source)
    diff, scale = _max_diff(loaded.module, eager, 64)
    assert diff <= 1e-4 * max(1.0, scale)


def test_build_pretrained_path_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--pretrained` without internet: the download is faked, everything after it is the real path."""
    torch.manual_seed(2)
    eager = torchvision.models.mobilenet_v3_small(weights=None).eval()
    enum = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    hub = tmp_path / "hub"

    def fake_download(url: str, **_: Any) -> dict[str, torch.Tensor]:
        target = hub / "checkpoints" / url.rsplit("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(eager.state_dict(), target)
        return eager.state_dict()

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    out = tmp_path / "pretrained"
    assert build_main(["--arch", "mobilenet_v3_small", "--pretrained", "--out", str(out)]) == 0
    loaded = load_artifact(out)
    manifest = loaded.manifest
    transforms = enum.transforms()
    assert (manifest.input.resize, manifest.input.crop) == (
        transforms.resize_size[0],
        transforms.crop_size[0],
    )
    assert manifest.input.mean == tuple(transforms.mean) and manifest.input.std == tuple(transforms.std)
    assert manifest.labels == enum.meta["categories"]
    assert manifest.source_weights_sha256 == sha256_file(next((hub / "checkpoints").iterdir()))
    diff, scale = _max_diff(loaded.module, eager, manifest.input.crop)
    assert diff <= 1e-4 * max(1.0, scale)


def test_falls_back_when_optimize_for_inference_fails(
    artifact_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(module: torch.jit.ScriptModule, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
        raise RuntimeError("simulated pass failure")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", broken)
    with caplog.at_level(logging.WARNING, logger="worker.model"):
        loaded = load_artifact(artifact_dir)
    assert not loaded.optimized and "optimize_for_inference failed" in caplog.text
    assert loaded.labels[967] == "espresso"
