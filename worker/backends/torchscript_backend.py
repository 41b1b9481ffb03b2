"""The TorchScript backend: the artifact's `model.pt`, with `optimize_for_inference` on the CPU."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from shared.errors import ArtifactError
from shared.manifest import Manifest
from worker.model import verify_file

log = logging.getLogger(__name__)


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """torch 2.x flags every torch.jit entry point as deprecated; the artifact format is deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


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


def runs_on(device: str) -> bool:
    return device.split(":")[0] == "cpu" or torch.cuda.is_available()


class TorchScriptBackend:
    name = "torchscript"

    def __init__(
        self, module: torch.jit.ScriptModule, device: torch.device, path: Path, sha256: str, threads: int
    ):
        self.module = module
        self._device = device
        self.device = str(device)
        self.path = path
        self.sha256 = sha256
        self.threads = threads
        self.version = torch.__version__
        # Pinned host memory makes the host-to-GPU copy truly asynchronous.
        self._pin = device.type == "cuda"

    def forward(self, batch: np.ndarray) -> np.ndarray:
        # from_numpy shares the caller's array: no copy on the CPU.
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self._device.type != "cpu":
            tensor = (tensor.pin_memory() if self._pin else tensor).to(self._device, non_blocking=True)
        with torch.inference_mode():
            logits = self.module(tensor)
            # .cpu() waits for the GPU, so the call's duration is the forward pass's.
            return logits.float().cpu().numpy()


def load(artifact_dir: Path, manifest: Manifest, device: str, threads: int) -> TorchScriptBackend:
    path = verify_file(artifact_dir, manifest.file, manifest.sha256)
    check_torch_version(manifest)
    target = resolve_device(device)
    if threads > 0:
        # Process-wide; 0 keeps torch's default (one per core).
        torch.set_num_threads(threads)
    module, optimized = _load_module(path, manifest, target)
    log.info("torchscript %s on %s, optimize_for_inference=%s", torch.__version__, target, optimized)
    return TorchScriptBackend(module, target, path, manifest.sha256, threads)
