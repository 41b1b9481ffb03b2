"""Load a model artifact, verifying it before anything is served with it, on one of the backends.

An artifact is a folder with `manifest.json`, the TorchScript file and the ONNX export it names (see
`artifacts.build`). `load_artifact` refuses, with an `ArtifactError` naming what differs, anything
that would make the service answer with the wrong model or wrong labels: a manifest that does not
validate, a file whose sha256 is not the manifest's (only the file the backend will serve is read),
a model whose output width is not the number of labels. A worker that refuses at start is loud; one
that serves garbage is silent.

This module imports no runtime (no torch): a worker without torch verifies and loads the ONNX file.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from shared.errors import ArtifactError
from shared.manifest import MANIFEST_FILE, InputSpec, Manifest
from worker.backends import Backend, create_backend

log = logging.getLogger(__name__)

# The error code of an artifact without an ONNX export: `BACKEND=auto` then skips the ONNX backends.
NO_ONNX_EXPORT = "artifact_without_onnx"
_HASH_CHUNK = 1 << 20  # hash in 1 MiB reads: constant memory whatever the model size


@dataclass(frozen=True)
class LoadedModel:
    """A verified artifact, ready for forward passes on its backend."""

    manifest: Manifest
    backend: Backend

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def sha256(self) -> str:
        """Of the file actually served (the TorchScript file or the ONNX export)."""
        return self.backend.sha256

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def info(self) -> dict[str, str]:
        """What results and the worker's RQ hash say about the model: name, backend, file and hash."""
        return {
            "name": self.manifest.name,
            "sha256": self.backend.sha256,
            "file": self.backend.path.name,
            "backend": self.backend.name,
            "backend_version": self.backend.version,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _plain_name(artifact_dir: Path, name: str) -> Path:
    # The manifest is data: never let it point outside its own folder.
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"The manifest's file must be a plain name in the artifact folder, got {name!r}.")
    return artifact_dir / name


def model_file(artifact_dir: Path, manifest: Manifest) -> Path:
    return _plain_name(artifact_dir, manifest.file)


def verify_file(artifact_dir: Path, name: str, expected_sha256: str) -> Path:
    """The file exists in the artifact folder and its sha256 is the manifest's."""
    path = _plain_name(artifact_dir, name)
    if not path.is_file():
        raise ArtifactError(
            f"The manifest names {name}, which is not in {artifact_dir}.", code="artifact_missing"
        )
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(
            f"sha256 mismatch for {path}: the manifest expects {expected_sha256}, the file has {actual}. "
            "The file was modified or truncated after the build; rebuild the artifact."
        )
    return path


def verify_files(artifact_dir: Path) -> tuple[Manifest, Path]:
    """Manifest + TorchScript file, without loading any runtime."""
    manifest = read_manifest(artifact_dir)
    return manifest, verify_file(artifact_dir, manifest.file, manifest.sha256)


def verify_onnx(artifact_dir: Path, manifest: Manifest) -> Path:
    """The ONNX export, verified like the TorchScript file; says why when the artifact has none."""
    if manifest.onnx is None:
        why = manifest.onnx_error or "it was built before ONNX exports existed; rebuild it (`make artifact`)"
        raise ArtifactError(f"The artifact {manifest.name} has no ONNX export: {why}.", code=NO_ONNX_EXPORT)
    return verify_file(artifact_dir, manifest.onnx.file, manifest.onnx.sha256)


def check_output(model: LoadedModel) -> None:
    """One forward on a dummy batch of 2 proves the file, the input spec and the labels agree."""
    # Here, not at the top: `make artifact`'s up-to-date check uses this module's verification
    # only, and runs at every `make up`.
    import numpy as np

    spec = model.manifest.input
    dummy = np.zeros((2, 3, spec.crop, spec.crop), dtype=np.float32)
    try:
        out = model.backend.forward(dummy)
    except Exception as exc:
        raise ArtifactError(
            f"The model does not run on a (2, 3, {spec.crop}, {spec.crop}) input on {model.backend.name}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    expected = (2, len(model.manifest.labels))
    if not isinstance(out, np.ndarray) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, np.ndarray) else type(out).__name__
        raise ArtifactError(
            f"The model's output for a batch of 2 is {shape}, expected {expected}: "
            f"the manifest lists {len(model.manifest.labels)} labels."
        )


def load_artifact(
    artifact_dir: Path, device: str = "cpu", backend: str = "torchscript", threads: int = 0
) -> LoadedModel:
    """Verify and load an artifact on one named backend (`worker.backends.BACKEND_NAMES`); raises
    `ArtifactError` saying what differs from what it should be. `threads` 0: the runtime's default."""
    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    model = LoadedModel(
        manifest=manifest, backend=create_backend(backend, artifact_dir, manifest, device, threads)
    )
    check_output(model)
    log.info(
        "loaded artifact %s (%s sha256 %s) on %s %s (%s) in %.0f ms",
        manifest.name,
        model.backend.path.name,
        model.sha256[:12],
        model.backend.name,
        model.backend.version,
        model.device,
        (time.perf_counter() - started) * 1000,
    )
    return model
