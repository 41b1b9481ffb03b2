"""The limit: the raw in-process pipeline of the worker, with no queue and no HTTP.

`python -m bench.limit --sizes 1,2,4 --runs 3 --seconds 2` (a child process, so each allocator /
thread setting gets a fresh interpreter) prints one JSON document: for each batch size and run,
images/s and batch latency of decode + preprocess + one forward pass (+ top-k), through the very
objects the worker uses (`load_handler`: the verified artifact, `optimize_for_inference`, warm-up,
`ClassifyHandler.handle`). Sizes are interleaved inside each run, so drift hits all sizes alike.
With `--decoders` it also times the decode + preprocess step alone per image, PIL (the worker's
path) against simplejpeg for the JPEGs of the mix.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from typing import Any

from bench.common import load_images, percentile


def _measure_size(
    handler: Any, images: list[bytes], size: int, seconds: float, offset: int
) -> dict[str, Any]:
    batches = []
    done = 0
    started = time.perf_counter()
    while done < 2 or time.perf_counter() - started < seconds:
        batch = [images[(offset + done * size + i) % len(images)] for i in range(size)]
        t0 = time.perf_counter()
        outcomes, forward_ms = handler.handle(batch, [5] * size)
        elapsed = (time.perf_counter() - t0) * 1000
        if any(o.error is not None for o in outcomes):
            raise RuntimeError(f"an image failed: {[o.error for o in outcomes if o.error]}")
        batches.append((elapsed, sum(o.preprocess_ms for o in outcomes), forward_ms))
        done += 1
    total_ms = sum(b[0] for b in batches)
    return {
        "images_per_s": done * size / (total_ms / 1000),
        "batch_ms_p50": percentile([b[0] for b in batches], 50),
        "batch_ms_p95": percentile([b[0] for b in batches], 95),
        "preprocess_ms_per_image": sum(b[1] for b in batches) / (done * size),
        "forward_ms_per_batch": sum(b[2] for b in batches) / done,
        "batches": done,
        "first_batch_ms": batches[0][0],
    }


def decoder_times(images: list[bytes], spec: Any, max_pixels: int, repeat: int) -> dict[str, Any]:
    """ms per image of bytes → model input, PIL path vs simplejpeg (JPEGs only), single thread."""
    import numpy as np
    from PIL import Image

    from shared.preprocess import preprocess, to_model_input

    jpegs = [data for data in images if data[:3] == b"\xff\xd8\xff"]
    out: dict[str, Any] = {"jpeg_images": len(jpegs)}
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None

    def timed(fn: Any) -> float:
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for data in jpegs:
                fn(data)
            samples.append((time.perf_counter() - t0) * 1000 / len(jpegs))
        return percentile(samples, 50)

    out["pil_ms"] = timed(lambda d: preprocess(d, spec, max_pixels))
    out["pil_decode_only_ms"] = timed(lambda d: Image.open(io.BytesIO(d)).convert("RGB"))
    if simplejpeg is not None:
        out["simplejpeg_ms"] = timed(
            lambda d: to_model_input(Image.fromarray(simplejpeg.decode_jpeg(d, "RGB")), spec)
        )
        out["simplejpeg_decode_only_ms"] = timed(lambda d: simplejpeg.decode_jpeg(d, "RGB"))
        # Parity with the worker's PIL path (libjpeg-turbo both, but IDCT/upsampling may differ).
        diffs = [
            float(
                np.abs(
                    preprocess(d, spec, max_pixels)
                    - to_model_input(Image.fromarray(simplejpeg.decode_jpeg(d, "RGB")), spec)
                ).max()
            )
            for d in jpegs
        ]
        out["simplejpeg_max_abs_diff"] = max(diffs) if diffs else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__)
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per batch size and run")
    parser.add_argument("--decoders", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from shared.config import get_settings
    from worker.batch_worker import load_handler

    settings = get_settings().model_copy(update={"max_batch_size": max(sizes)})
    t0 = time.perf_counter()
    handler = load_handler(settings)  # loads, verifies, optimizes and warms up every size
    load_s = time.perf_counter() - t0
    images = [data for _, data in load_images()]
    result: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "load_and_warmup_s": load_s,
        "backend": handler.model.backend.name,
        "sizes": sizes,
        "runs": [],
    }
    for run in range(args.runs):
        result["runs"].append(
            {str(size): _measure_size(handler, images, size, args.seconds, run * 7) for size in sizes}
        )
    if args.decoders:
        result["decoders"] = decoder_times(images, handler.model.manifest.input, settings.max_image_pixels, 5)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
