"""Load a model artifact, verifying it before anything is served with it.

An artifact is a folder with `manifest.json` and the TorchScript file it names (see `artifacts.build`).
`load_artifact` refuses, with an `ArtifactError` naming what differs, anything that would make the
service answer with the wrong model or wrong labels: a manifest that does not validate, a file whose
sha256 is not the manifest's, another torch major version, a model whose output width is not the
number of labels. A worker that refuses at start is loud; one that serves garbage is silent.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from shared.errors import ArtifactError
from shared.manifest import MANIFEST_FILE, InputSpec, Manifest

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20  # hash in 1 MiB reads: constant memory whatever the model size


@dataclass(frozen=True)
class LoadedModel:
    """A verified artifact, ready for forward passes on `device`."""

    manifest: Manifest
    module: torch.jit.ScriptModule
    device: str
    sha256: str
    path: Path | None = None
    optimized: bool = False  # True when torch.jit.optimize_for_inference was applied

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch 2.x flags every torch.jit entry point as deprecated; the artifact format is deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def read_manifest(artifact_dir: Path) -> Manifest:
    """Parse and validate `manifest.json`, including that there is one label per output."""
    path = artifact_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"No {MANIFEST_FILE} in {artifact_dir}: build the artifact first (`make artifact`).",
            code="artifact_missing",
        )
    try:
        manifest = Manifest.read(artifact_dir)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ArtifactError(f"{path} is not a valid manifest: {problems}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read: {exc}") from exc
    if len(manifest.labels) != manifest.num_classes:
        raise ArtifactError(
            f"{path}: num_classes is {manifest.num_classes} but there are {len(manifest.labels)} labels."
        )
    return manifest


def model_file(artifact_dir: Path, manifest: Manifest) -> Path:
    # The manifest is data: never let it point outside its own folder.
    name = manifest.file
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"The manifest's file must be a plain name in the artifact folder, got {name!r}.")
    return artifact_dir / name


def verify_files(artifact_dir: Path) -> tuple[Manifest, Path]:
    """Check manifest + model file without loading torch state: cheap enough for `--if-missing`."""
    manifest = read_manifest(artifact_dir)
    path = model_file(artifact_dir, manifest)
    if not path.is_file():
        raise ArtifactError(
            f"The manifest names {manifest.file}, which is not in {artifact_dir}.", code="artifact_missing"
        )
    actual = sha256_file(path)
    if actual != manifest.sha256:
        raise ArtifactError(
            f"sha256 mismatch for {path}: the manifest expects {manifest.sha256}, the file has {actual}. "
            "The file was modified or truncated after the build; rebuild the artifact."
        )
    return manifest, path


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"^(\d+)\.(\d+)", version)
    if match is None:
        raise ArtifactError(f"Cannot read a torch version from {version!r}.")
    return int(match.group(1)), int(match.group(2))


def check_torch_version(manifest: Manifest, running: str | None = None) -> None:
    """TorchScript files are only promised to load within a major version; a minor change is a warning."""
    running = running or torch.__version__
    built, here = _major_minor(manifest.torch_version), _major_minor(running)
    if built[0] != here[0]:
        raise ArtifactError(
            f"The artifact was built with torch {manifest.torch_version} but this is torch {running}: "
            "major versions differ; rebuild the artifact with this torch."
        )
    if built[1] != here[1]:
        log.warning(
            "artifact %s was built with torch %s, running torch %s: minor versions differ; "
            "outputs may differ slightly (rebuild to be sure)",
            manifest.name,
            manifest.torch_version,
            running,
        )


def resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ArtifactError(f"Unknown device {device!r}.", code="device_unavailable") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(
            f"DEVICE={device} but torch sees no CUDA device (torch {torch.__version__}).",
            code="device_unavailable",
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ArtifactError(f"Unsupported device {device!r}: use cpu or cuda.", code="device_unavailable")
    return resolved


def _jit_load(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ArtifactError(f"torch.jit.load failed for {path}: {type(exc).__name__}: {exc}") from exc
    return module.eval()


def _load_module(path: Path, manifest: Manifest, device: torch.device) -> tuple[torch.jit.ScriptModule, bool]:
    """Load, then optimize_for_inference (a module saved after it does not load back in torch 2.14)."""
    module = _jit_load(path, device)
    if device.type != "cpu":
        # Its passes (mkldnn conversion, conv folding) target the CPU; the built artifact is already frozen.
        return module, False
    try:
        with quiet_torchscript():
            return torch.jit.optimize_for_inference(module), True
    except Exception:
        # A slower frozen module beats no worker. The pass rewrites the graph in place and may have
        # stopped half-way, so serve a fresh load of the file as saved.
        log.warning(
            "optimize_for_inference failed for %s; using the frozen module as saved",
            manifest.name,
            exc_info=True,
        )
        return _jit_load(path, device), False


def load_artifact(artifact_dir: Path, device: str = "cpu") -> LoadedModel:
    """Verify and load an artifact; raises `ArtifactError` saying what differs from what it should be."""
    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    manifest, path = verify_files(artifact_dir)
    check_torch_version(manifest)
    target = resolve_device(device)
    module, optimized = _load_module(path, manifest, target)

    # One forward on a dummy batch of 2 proves the file, the input spec and the labels agree.
    spec = manifest.input
    dummy = torch.zeros((2, 3, spec.crop, spec.crop), dtype=torch.float32, device=target)
    try:
        with torch.inference_mode():
            out = module(dummy)
    except Exception as exc:
        raise ArtifactError(
            f"The model does not run on a (2, 3, {spec.crop}, {spec.crop}) input: {type(exc).__name__}: {exc}"
        ) from exc
    expected = (2, len(manifest.labels))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArtifactError(
            f"The model's output for a batch of 2 is {shape}, expected {expected}: "
            f"the manifest lists {len(manifest.labels)} labels."
        )
    log.info(
        "loaded artifact %s (sha256 %s, torch %s) on %s in %.0f ms, optimize_for_inference=%s",
        manifest.name,
        manifest.sha256[:12],
        manifest.torch_version,
        target,
        (time.perf_counter() - started) * 1000,
        optimized,
    )
    return LoadedModel(
        manifest=manifest,
        module=module,
        device=str(target),
        sha256=manifest.sha256,
        path=path,
        optimized=optimized,
    )
