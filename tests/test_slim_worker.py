"""The torch-free worker: a venv built from `requirements-worker.txt` alone runs a real job from a
real Redis on the real artifact's ONNX export, and reports which backend and file served it.

The venv is cached under ~/.cache/inferq keyed by the file's hash and the Python version, like the
Makefile's environment (`launch.slim_venv`, which the bench's slim phase uses too)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from launch.slim_venv import cache_root, slim_venv
from shared.config import PROJECT_ROOT, Settings
from shared.jobs import make_queue, submit
from shared.manifest import Manifest

# Read at import, before the session points INFERQ_CACHE at its own warm-up folder (conftest).
CACHE = cache_root()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slim_python() -> Path:
    return slim_venv(CACHE) / "bin" / "python"


def test_the_slim_venv_has_no_torch(slim_python: Path) -> None:
    probe = "import importlib.util as u; print([m for m in ('torch', 'torchvision') if u.find_spec(m)])"
    done = subprocess.run([str(slim_python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_real_job_through_the_slim_worker(
    slim_python: Path,
    artifact_dir: Path,
    redis_url: str,
    redis_conn: redis.Redis,
    sample_dir: Path,
    tmp_path: Path,
) -> None:
    settings = Settings(redis_url=redis_url, queue_name="slim")
    job = submit(make_queue(redis_conn, settings), (sample_dir / "coffee.png").read_bytes(), 3, settings)
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        "REDIS_URL": redis_url,
        "QUEUE_NAME": "slim",
        "ARTIFACT_DIR": str(artifact_dir),
        "BACKEND": "auto",
        "MAX_BATCH_SIZE": "2",
        "DATA_DIR": str(tmp_path),
    }
    env.pop("LD_PRELOAD", None)
    started = time.perf_counter()
    done = subprocess.run(
        [str(slim_python), "-m", "worker", "--burst"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fetched = Job.fetch(job.id, connection=redis_conn, serializer=JSONSerializer)
    result = fetched.return_value()
    assert result is not None, done.stderr[-3000:]
    assert result["predictions"][0]["label"] == "espresso"
    onnx = Manifest.read(artifact_dir).onnx
    assert onnx is not None
    assert result["model"]["backend"] in ("onnxruntime", "openvino")
    assert result["model"]["sha256"] == onnx.sha256
    print(f"slim worker: one job in {time.perf_counter() - started:.1f} s from process start")
