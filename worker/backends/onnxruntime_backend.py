"""The ONNX Runtime backend: the artifact's ONNX export on ORT's CPU (or CUDA) execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from shared.errors import ArtifactError
from shared.manifest import Manifest
from worker.model import verify_onnx

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def runs_on(device: str) -> bool:
    """CPU always; CUDA only with a build that has the CUDA provider (onnxruntime-gpu)."""
    provider = _PROVIDERS.get(device.split(":")[0])
    return provider is not None and provider in ort.get_available_providers()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, session: ort.InferenceSession, manifest: Manifest, device: str, path: Path, threads: int
    ):
        assert manifest.onnx is not None
        self.session = session
        self.input_name = manifest.onnx.input_name
        self.output_names = [manifest.onnx.output_name]
        self.device = device
        self.path = path
        self.sha256 = manifest.onnx.sha256
        self.threads = threads
        self.version = ort.__version__

    def forward(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (logits,) = self.session.run(self.output_names, feed)
        return np.asarray(logits, dtype=np.float32)


def load(artifact_dir: Path, manifest: Manifest, device: str, threads: int) -> OnnxRuntimeBackend:
    path = verify_onnx(artifact_dir, manifest)
    kind = device.split(":")[0]
    provider = _PROVIDERS.get(kind)
    if provider is None:
        raise ArtifactError(f"Unsupported device {device!r}: use cpu or cuda.", code="device_unavailable")
    if provider not in ort.get_available_providers():
        raise ArtifactError(
            f"DEVICE={device} but onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu).",
            code="device_unavailable",
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads > 0:
        options.intra_op_num_threads = threads
    # Idle pool threads would otherwise spin for a while after each forward pass, taking a core from
    # the worker's decoder and writer threads and from the api on the same machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=[provider])
    except Exception as exc:
        raise ArtifactError(f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from exc
    return OnnxRuntimeBackend(session, manifest, device, path, threads)
