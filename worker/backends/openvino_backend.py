"""The OpenVINO backend: the same ONNX export, compiled by OpenVINO for the CPU in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from shared.errors import ArtifactError
from shared.manifest import Manifest
from worker.backends import tcmalloc_loaded
from worker.model import verify_onnx

__all__ = ["OpenVinoBackend", "load", "runs_on", "tcmalloc_loaded"]


def runs_on(device: str) -> bool:
    # OpenVINO's CPU plugin only; and not under tcmalloc, where compile_model never returns.
    return device.split(":")[0] == "cpu" and not tcmalloc_loaded()


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, compiled: ov.CompiledModel, manifest: Manifest, device: str, path: Path, threads: int):
        assert manifest.onnx is not None
        self.compiled = compiled
        # One request, reused: the backend is called from one thread (the worker's model thread).
        self.request = compiled.create_infer_request()
        self.device = device
        self.path = path
        self.sha256 = manifest.onnx.sha256
        self.threads = threads
        # The release ("2026.4.1"), as pinned; get_version() appends the build hash and branch.
        self.version = ov.get_version().split("-")[0]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer([np.ascontiguousarray(batch, dtype=np.float32)], share_inputs=True)
        # The output buffer belongs to the request and is overwritten by the next call: copy it out.
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def load(artifact_dir: Path, manifest: Manifest, device: str, threads: int) -> OpenVinoBackend:
    if device.split(":")[0] != "cpu":
        raise ArtifactError(
            f"The openvino backend runs on the CPU only, not {device!r}.", code="device_unavailable"
        )
    if tcmalloc_loaded():
        # Seen with Debian's libtcmalloc-minimal4 2.10 and OpenVINO 2026.4: compile_model blocks forever
        # (no CPU used). A refusal at start beats a worker that never registers.
        raise ArtifactError(
            "The openvino backend does not run with tcmalloc preloaded (compile_model deadlocks): "
            "unset LD_PRELOAD (PRELOAD_TCMALLOC=false) or use BACKEND=onnxruntime.",
            code="backend_unavailable",
        )
    path = verify_onnx(artifact_dir, manifest)
    config: dict[str, object] = {
        # On CPUs with bf16 units OpenVINO would otherwise compute in bf16: other scores than the
        # other backends (the parity tests hold all backends to 1e-4).
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        # The cores are shared with the decoder threads and the api: do not pin threads to them.
        "ENABLE_CPU_PINNING": False,
    }
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:
        raise ArtifactError(f"openvino cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return OpenVinoBackend(compiled, manifest, device, path, threads)
