"""A worker's warm-up measurement (the backend BACKEND=auto chose, the batch cap AUTO_BATCH_CAP
chose) is kept between starts (WARM_UP_CACHE): the next start under the same conditions serves that
choice without timing anything, and any change of the conditions measures again."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job

from shared.config import PROJECT_ROOT, Settings
from shared.jobs import SERIALIZER, make_queue, submit
from shared.manifest import MANIFEST_FILE
from tests.service import service_env
from worker.handler import ClassifyHandler, load_handler
from worker.warm_up_cache import SUBDIR

MEASURED = "measured at this start"
FROM_CACHE = "from the warm-up cache"
TIMED = "threads: forward ms per image"  # the line of each backend timed at warm-up


def _cached_files(cache: Path) -> list[Path]:
    return sorted((cache / SUBDIR).glob("*.json"))


# --- real worker processes --------------------------------------------------------------------------


def _run_worker(
    env: dict[str, str], conn: redis.Redis, image: bytes, *python_flags: str
) -> tuple[dict[str, Any], str]:
    """One job queued, one `python [flags] -m worker --burst` to its end: the job's result and the
    worker's output."""
    settings = Settings(redis_url=env["REDIS_URL"], queue_name=env["QUEUE_NAME"])
    job = submit(make_queue(conn, settings), image, 3, settings)
    done = subprocess.run(
        [sys.executable, *python_flags, "-m", "worker", "--burst"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    result = Job.fetch(job.id, connection=conn, serializer=SERIALIZER).return_value()
    assert result is not None, output[-3000:]
    assert result["predictions"][0]["label"] == "espresso"
    return result, output


@pytest.fixture
def worker_env(redis_url: str, artifact_dir: Path, tmp_path: Path) -> dict[str, str]:
    return service_env(
        redis_url,
        QUEUE_NAME="warm-up-cache",
        ARTIFACT_DIR=str(artifact_dir),
        INFERQ_CACHE=str(tmp_path / "cache"),
        BACKEND="auto",
        MAX_BATCH_SIZE=2,
        LOG_FORMAT="text",
        DECODERS=0,
    )


@pytest.mark.slow
def test_a_second_worker_start_serves_the_first_ones_measured_choice(
    worker_env: dict[str, str], redis_conn: redis.Redis, photo_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    image = photo_bytes["coffee.png"]
    first, output = _run_worker(worker_env, redis_conn, image)
    assert MEASURED in output and TIMED in output, output[-3000:]
    (stored,) = _cached_files(tmp_path / "cache")
    choice = json.loads(stored.read_text())["result"]
    assert first["model"]["backend"] == choice["backend"]
    assert f"batch cap {choice['batch_cap']} of at most 2" in output

    second, output = _run_worker(worker_env, redis_conn, image)
    assert f"{FROM_CACHE} {stored}" in output, output[-3000:]
    assert TIMED not in output  # nothing was timed
    assert f"batch cap {choice['batch_cap']} of at most 2" in output
    assert second["model"] == first["model"]
    assert _cached_files(tmp_path / "cache") == [stored]


@pytest.mark.slow
def test_a_cached_choice_other_than_torchscript_never_imports_torch(
    worker_env: dict[str, str], redis_conn: redis.Redis, photo_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    image = photo_bytes["coffee.png"]
    _run_worker(worker_env, redis_conn, image)
    (stored,) = _cached_files(tmp_path / "cache")
    document = json.loads(stored.read_text())
    document["result"]["backend"] = "onnxruntime"  # whichever won here, serve a torch-free one
    stored.write_text(json.dumps(document))

    result, output = _run_worker(worker_env, redis_conn, image, "-X", "importtime")
    assert FROM_CACHE in output, output[-3000:]
    assert result["model"]["backend"] == "onnxruntime"
    imported = {line.rsplit("|", 1)[-1].strip() for line in output.splitlines() if "import time:" in line}
    assert "onnxruntime" in imported and "torch" not in imported


# --- which conditions measure again (in-process, one backend: quick to measure) -----------------


def _load(caplog: pytest.LogCaptureFixture, **overrides: Any) -> tuple[ClassifyHandler, str]:
    """load_handler on ONNX Runtime with AUTO_BATCH_CAP; the handler and how its choice was made."""
    caplog.clear()
    settings = Settings(
        **{"backend": "onnxruntime", "max_batch_size": 2, "auto_batch_cap": True, **overrides}
    )
    with caplog.at_level(logging.INFO, logger="worker"):
        handler = load_handler(settings)
    (serving,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    return handler, serving


def _measured_then_cached(caplog: pytest.LogCaptureFixture, **overrides: Any) -> str:
    """Two loads under the same settings: the first measures, the second serves that choice from
    the cache (how the second one's choice was made is returned)."""
    _, how = _load(caplog, **overrides)
    assert MEASURED in how
    _, how = _load(caplog, **overrides)
    assert FROM_CACHE in how
    return how


def test_a_changed_artifact_or_setting_measures_again_and_each_is_kept(
    artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    how = _measured_then_cached(caplog, artifact_dir=artifact_dir, inferq_cache=cache)
    assert "forward ms per image b1=" in how
    assert len(_cached_files(cache)) == 1

    # Another thread count is another curve.
    _, how = _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache, onnxruntime_threads=2)
    assert MEASURED in how
    assert len(_cached_files(cache)) == 2

    # Another artifact (here: the same files under a manifest that differs in bytes) is measured anew.
    other = tmp_path / "artifact"
    shutil.copytree(artifact_dir, other)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    (other / MANIFEST_FILE).write_text(json.dumps(manifest, indent=4))
    _measured_then_cached(caplog, artifact_dir=other, inferq_cache=cache)
    assert len(_cached_files(cache)) == 3


def _store_then_edit(
    caplog: pytest.LogCaptureFixture, artifact_dir: Path, cache: Path, **result: Any
) -> Path:
    """Measure once into `cache`, then overwrite fields of the stored result; the stored file."""
    _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache)
    (stored,) = _cached_files(cache)
    document = json.loads(stored.read_text())
    document["result"].update(result)
    stored.write_text(json.dumps(document))
    return stored


def test_warm_up_cache_false_measures_again_and_replaces_the_stored_choice(
    artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    stored = _store_then_edit(caplog, artifact_dir, cache, measured_at="an earlier start")

    _, how = _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache, warm_up_cache=False)
    assert MEASURED in how and "WARM_UP_CACHE=false" in how
    assert _cached_files(cache) == [stored]
    assert json.loads(stored.read_text())["result"]["measured_at"] != "an earlier start"
    _, how = _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache)
    assert FROM_CACHE in how


@pytest.mark.parametrize("content", ["{not json", '{"conditions": {}, "result": {}}', "[]"])
def test_an_unusable_cache_file_is_measured_over_not_trusted(
    content: str, artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache)
    (stored,) = _cached_files(cache)
    stored.write_text(content)
    _measured_then_cached(caplog, artifact_dir=artifact_dir, inferq_cache=cache)


def test_a_cache_that_cannot_be_written_does_not_stop_the_worker(
    artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    handler, how = _load(caplog, artifact_dir=artifact_dir, inferq_cache=blocked)
    assert MEASURED in how and handler.batch_cap in (1, 2)
    assert "not written" in caplog.text


def test_a_cached_curve_is_capped_by_the_current_rule_not_the_stored_cap(
    artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file stored by a start whose rule picked the smallest good size: the curve is flat, so
    # today's rule (the largest size within 10 % of the best) caps at 2, whatever the file says.
    cache = tmp_path / "cache"
    _store_then_edit(caplog, artifact_dir, cache, batch_cap=1, curve={"1": 6.2, "2": 6.3})

    handler, how = _load(caplog, artifact_dir=artifact_dir, inferq_cache=cache)
    assert FROM_CACHE in how and "batch cap 2 of at most 2" in how
    assert handler.batch_cap == 2
