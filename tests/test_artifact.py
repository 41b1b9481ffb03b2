"""The artifact: reproducible builds (TorchScript and ONNX), the general builder, and the loader's
refusals on every backend."""

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
from worker.backends import installed_backends
from worker.backends.torchscript_backend import check_torch_version, quiet_torchscript
from worker.model import NO_ONNX_EXPORT, load_artifact, sha256_file, verify_files

TORCH_LOG = "worker.backends.torchscript_backend"
ONNX_BACKENDS = [name for name in installed_backends() if name != "torchscript"]


def _copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_a_bit(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _edit_manifest(artifact: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = artifact / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _max_diff(out: Path, eager: torch.nn.Module, crop: int) -> tuple[float, float]:
    """Worst |served - eager| over every installed backend's load of the artifact, and the scale."""
    batch = torch.randn((3, 3, crop, crop), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = eager(batch).numpy()
    worst = 0.0
    for backend in installed_backends():
        got = load_artifact(out, backend=backend).backend.forward(batch.numpy())
        worst = max(worst, float(abs(got - want).max()))
    return worst, float(abs(want).max())


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
    assert manifest.onnx is not None and manifest.onnx_error is None
    assert manifest.onnx.sha256 == sha256_file(artifact_dir / manifest.onnx.file)
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
    for name in ("model.pt", "model.onnx", MANIFEST_FILE):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    blob = (out_a / "model.pt").read_bytes()
    # No path of this machine and no output-folder name inside the archive.
    onnx_blob = (out_a / "model.onnx").read_bytes()
    for needle in (str(PROJECT_ROOT), sys.prefix, str(tmp_path), "efficientnet_lite0/", "elsewhere"):
        assert needle.encode() not in blob, needle
        assert needle.encode() not in onnx_blob, needle
    assert not list(tmp_path.glob("*/.*tmp*")), "the temp folder of the atomic write was left behind"
    # This process has traced other models by now: TorchScript's mangled class names are renumbered,
    # so an in-process build gives the same bytes too.
    out_c = tmp_path / "c"
    assert build_main(["--out", str(out_c)]) == 0
    assert (out_c / "model.pt").read_bytes() == blob
    assert (out_c / "model.onnx").read_bytes() == onnx_blob


def test_if_missing_decides_without_torch(artifact_dir: Path, tmp_path: Path) -> None:
    """An up-to-date artifact is recognised without importing torch (seconds saved on every start);
    one from before ONNX exports is not up to date."""
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    probe = (
        "import sys; from artifacts.build import main; code = main(['--out', sys.argv[1], '--if-missing']);"
        "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe, str(copy)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout and "no torch" in done.stdout
    (copy / "model.onnx").unlink()
    _edit_manifest(copy, lambda m: (m.pop("onnx"), m.pop("onnx_error")))
    done = subprocess.run(
        [sys.executable, "-c", probe, str(copy)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "up to date" not in done.stdout and (copy / "model.onnx").is_file()


def test_if_missing_keeps_a_valid_artifact(artifact_dir: Path, tmp_path: Path, capsys: Any) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    before = (copy / "model.pt").stat().st_mtime_ns
    assert build_main(["--out", str(copy), "--if-missing"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (copy / "model.pt").stat().st_mtime_ns == before


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_onnx_backends_refuse_a_tampered_onnx_file(backend: str, artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    onnx = _flip_a_bit(copy / "model.onnx")
    with pytest.raises(ArtifactError, match="sha256 mismatch") as info:
        load_artifact(copy, backend=backend)
    assert sha256_file(onnx) in info.value.message
    # Only the file served is read: TorchScript still serves its own, intact file.
    assert load_artifact(copy, backend="torchscript").sha256 == Manifest.read(copy).sha256


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_onnx_backends_say_when_the_artifact_has_no_onnx(
    backend: str, artifact_dir: Path, tmp_path: Path
) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    _edit_manifest(copy, lambda m: m.update(onnx=None, onnx_error="torch.onnx.export failed: no"))
    with pytest.raises(ArtifactError, match=r"no ONNX export: torch\.onnx\.export failed") as info:
        load_artifact(copy, backend=backend)
    assert info.value.code == NO_ONNX_EXPORT


def test_refuses_a_tampered_model_file(artifact_dir: Path, tmp_path: Path) -> None:
    copy = _copy_artifact(artifact_dir, tmp_path / "copy")
    model = _flip_a_bit(copy / "model.pt")
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
    with caplog.at_level(logging.WARNING, logger=TORCH_LOG):
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
    printed = capsys.readouterr().out
    assert "model.pt sha256" in printed and "model.onnx sha256" in printed
    loaded = load_artifact(out)
    manifest = loaded.manifest
    assert (manifest.arch, manifest.name, manifest.num_classes) == ("resnet18", "resnet18", 1000)
    assert (manifest.input.resize, manifest.input.crop) == (72, 64)
    assert manifest.input.mean == (0.485, 0.456, 0.406)
    assert manifest.source_weights_sha256 == sha256_file(weights)
    diff, scale = _max_diff(out, eager, 64)
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
    diff, scale = _max_diff(out, eager, 64)
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
    diff, scale = _max_diff(out, eager, manifest.input.crop)
    assert diff <= 1e-4 * max(1.0, scale)


def test_falls_back_when_optimize_for_inference_fails(
    artifact_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(module: torch.jit.ScriptModule, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
        raise RuntimeError("simulated pass failure")

    monkeypatch.setattr(torch.jit, "optimize_for_inference", broken)
    with caplog.at_level(logging.WARNING, logger=TORCH_LOG):
        loaded = load_artifact(artifact_dir, backend="torchscript")
    assert "optimize_for_inference failed" in caplog.text
    assert loaded.labels[967] == "espresso"


class _Spectral(torch.nn.Module):
    """A model the ONNX exporter cannot handle (no ONNX op for rfft2 at opset 17)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.rfft2(x).abs().mean(dim=(2, 3)))


def test_build_says_when_onnx_export_does_not_work(tmp_path: Path, capsys: Any) -> None:
    torch.manual_seed(3)
    source = tmp_path / "spectral.pt"
    with quiet_torchscript(), torch.inference_mode():
        torch.jit.save(torch.jit.trace(_Spectral().eval(), torch.zeros((1, 3, 32, 32))), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n", encoding="utf-8")
    out = tmp_path / "spectral-artifact"
    argv = ["--torchscript", str(source), "--labels", str(labels), "--resize", "32", "--crop", "32"]
    assert build_main([*argv, "--out", str(out)]) == 0
    assert "no ONNX export: torch.onnx.export failed" in capsys.readouterr().out
    manifest = Manifest.read(out)
    assert manifest.onnx is None and "rfft2" in (manifest.onnx_error or "")
    assert not (out / "model.onnx").exists()
    assert load_artifact(out, backend="torchscript").labels == ["a", "b", "c", "d"]
    for backend in ONNX_BACKENDS:
        with pytest.raises(ArtifactError, match=r"has no ONNX export: torch\.onnx\.export failed"):
            load_artifact(out, backend=backend)
    # Up to date as it is: the reason is recorded, the export is not retried on every start.
    assert build_main([*argv, "--out", str(out), "--if-missing"]) == 0
    assert "up to date" in capsys.readouterr().out
