"""The backends compared: forward pass and the whole in-process pipeline, per runtime and thread count.

`python -m bench.backends [--seconds 1.5] [--preload LIB]` prints one JSON document (`--preload`: an
allocator such as tcmalloc, LD_PRELOADed into every child; default glibc's malloc):
- `forward`: ms per image of one forward pass, per backend × threads (1, 2) × batch (1, 2, 4, 8):
  the median of repeated calls on a zero batch, after a warm-up;
- `pipeline`: images/s of decode + preprocess + forward + top-k on the bench's photos in one process
  (`bench.common.load_images`), per backend × threads × batch, and each backend's best: the "limit"
  a service on this machine could reach with that backend.
Each (backend, threads) runs in a child process: thread pools and allocators are per process, and
torch's thread count cannot be lowered back once set. Backends whose package is not installed, or
whose artifact file is missing, are listed under `skipped` with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PROJECT_ROOT, base_env, load_images, run_json

BATCH_SIZES = (1, 2, 4, 8)
THREADS = (1, 2)


def _child(backend: str, threads: int, artifact_dir: Path, seconds: float) -> dict[str, Any]:
    import numpy as np

    from shared.config import get_settings
    from shared.preprocess import preprocess
    from worker.model import load_artifact
    from worker.runner import InferenceRunner

    loaded_at = time.perf_counter()
    model = load_artifact(artifact_dir, backend=backend, threads=threads)
    load_s = time.perf_counter() - loaded_at
    runner = InferenceRunner(model)
    runner.warm_up(BATCH_SIZES)
    spec, max_pixels = model.manifest.input, get_settings().max_image_pixels
    forward: dict[str, float] = {}
    for size in BATCH_SIZES:
        batch = np.zeros((size, *runner.input_shape), dtype=np.float32)
        times = []
        started = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - started < seconds / 2:
            t0 = time.perf_counter()
            model.backend.forward(batch)
            times.append((time.perf_counter() - t0) * 1000 / size)
        forward[str(size)] = round(statistics.median(times), 3)
    images = [data for _, data in load_images()]
    pipeline: dict[str, float] = {}
    for size in BATCH_SIZES:
        done = 0
        started = time.perf_counter()
        while done < 2 * len(images) or time.perf_counter() - started < seconds:
            chunk = [images[(done + i) % len(images)] for i in range(size)]
            runner.predict([preprocess(data, spec, max_pixels) for data in chunk], 5)
            done += size
        pipeline[str(size)] = round(done / (time.perf_counter() - started), 1)
    return {
        "backend": backend,
        "version": model.backend.version,
        "threads": threads,
        "load_s": round(load_s, 2),
        "forward_ms_per_image": forward,
        "pipeline_images_per_s": pipeline,
    }


def run(
    seconds: float = 1.5, preload: Path | None = None, artifact_dir: Path | None = None
) -> dict[str, Any]:
    """Every installed backend × THREADS, each in its own child process; one JSON-able document."""
    from shared.config import get_settings
    from worker.backends import BACKEND_NAMES, is_installed

    artifact_dir = artifact_dir or get_settings().artifact_dir
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for backend in BACKEND_NAMES:
        if not is_installed(backend):
            skipped[backend] = "not installed"
            continue
        for threads in THREADS:
            args = [sys.executable, "-m", "bench.backends", "--child", backend, "--threads", str(threads)]
            args += ["--seconds", str(seconds), "--artifact", str(artifact_dir)]
            try:
                env = base_env(LOG_LEVEL="WARNING", **({"LD_PRELOAD": str(preload)} if preload else {}))
                results.append(run_json(args, env, timeout=600))
            except RuntimeError as exc:
                skipped[f"{backend}/{threads}"] = str(exc)
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        size, rate = max(r["pipeline_images_per_s"].items(), key=lambda kv: kv[1])
        if rate > best.get(r["backend"], {}).get("images_per_s", 0):
            best[r["backend"]] = {"images_per_s": rate, "threads": r["threads"], "batch": int(size)}
    limit = max(best.items(), key=lambda kv: kv[1]["images_per_s"]) if best else None
    return {
        "allocator": preload.name if preload else "glibc",
        "results": results,
        "pipeline_best": best,
        "limit": {"backend": limit[0], **limit[1]} if limit else None,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="Measuring time per batch size.")
    parser.add_argument("--preload", type=Path, help="A malloc library to LD_PRELOAD (e.g. tcmalloc).")
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        artifact = args.artifact or PROJECT_ROOT / "artifacts" / "efficientnet_lite0"
        print(json.dumps(_child(args.child, args.threads, artifact, args.seconds)))
    else:
        print(json.dumps(run(args.seconds, args.preload, args.artifact), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
