"""Model runtimes behind one interface: a backend loads a verified file of an artifact and runs a
forward pass on a float32 NCHW batch array, returning float32 logits (batch, classes).

Every runtime-specific line lives in one module of this package (`torchscript`, `onnxruntime`,
`openvino`), imported only when that backend is created, so a worker without torch never imports
it. Everything above (runner, handler, reference path, selection) sees only `Backend`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from shared.manifest import Manifest

# In the order `auto` tries them when timings tie; the value is the module the runtime imports as.
BACKEND_NAMES: dict[str, str] = {"openvino": "openvino", "onnxruntime": "onnxruntime", "torchscript": "torch"}
# The distributions that may provide each runtime (onnxruntime-gpu installs the same module).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "openvino": ("openvino",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "torchscript": ("torch",),
}


class Backend(Protocol):
    """One loaded model file on one runtime."""

    name: str  # one of BACKEND_NAMES
    version: str  # the runtime's version, e.g. onnxruntime's
    device: str  # "cpu", "cuda" (or "cuda:N")
    path: Path  # the file served
    sha256: str  # of that file, verified against the manifest before loading
    threads: int  # intra-op threads it was set up with (0: the runtime's default)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a float32 (N, 3, H, W) batch, as a float32 (N, classes) array on the host."""
        ...


def is_installed(name: str) -> bool:
    """The runtime's package can be imported here (checked without importing it)."""
    return importlib.util.find_spec(BACKEND_NAMES[name]) is not None


def installed_backends() -> list[str]:
    return [name for name in BACKEND_NAMES if is_installed(name)]


def installed_version(name: str) -> str:
    """`<distribution> <version>` of the runtime's installed package, read from its metadata without
    importing it ("" when no known distribution provides it)."""
    for dist in _DISTRIBUTIONS[name]:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def tcmalloc_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether tcmalloc is this process's allocator (LD_PRELOAD, e.g. PRELOAD_TCMALLOC=true)."""
    try:
        return "libtcmalloc" in maps.read_text(errors="replace")
    except OSError:
        return False


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"worker.backends.{name}_backend")


def candidates(setting: str, device: str) -> list[str]:
    """The backends to load for BACKEND=`setting`: that one, or for `auto` every installed backend
    that runs on `device` (each module's `runs_on`: on CUDA that is TorchScript, plus onnxruntime
    when its CUDA provider is installed)."""
    if setting != "auto":
        return [setting]
    return [name for name in installed_backends() if _module(name).runs_on(device)]


def create_backend(name: str, artifact_dir: Path, manifest: Manifest, device: str, threads: int) -> Backend:
    """Verify the file `name` serves and load it; `ArtifactError` when it cannot."""
    from shared.errors import ArtifactError

    if name not in BACKEND_NAMES:
        raise ArtifactError(f"Unknown backend {name!r}: use one of {', '.join(BACKEND_NAMES)}.")
    if not is_installed(name):
        raise ArtifactError(
            f"BACKEND={name} but its package ({BACKEND_NAMES[name]}) is not installed here.",
            code="backend_unavailable",
        )
    backend: Backend = _module(name).load(artifact_dir, manifest, device, threads)
    return backend
