"""Decode throughput: `python -m bench.decode [--seconds S] [--batch B]` prints one JSON document.

What the worker's decode step can feed the model, in images/s of 640x480 JPEGs (made here from the
test photos): decode + preprocess in the calling thread (`DECODERS=0`), then through a
`DecoderPool` of 1, 2 and 4 decoder processes, each called with batches of `--batch` images the way
the feeder calls it. Modes are interleaved over `--rounds` rounds so drift hits all of them alike;
the figure per mode is its best round, with the CPU time per image it cost (this process plus its
decoders: the pool's overhead, which other load on the machine does not inflate much). Also the
effect of DCT-scaled JPEG decoding (`InputSpec.jpeg_draft`) on the per-image decode time of the same
photos at 2048x1536.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from shared.manifest import InputSpec
from shared.preprocess import preprocess
from worker.decoders import DecoderPool

SPEC = InputSpec(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
MAX_PIXELS = 40_000_000
POOL_SIZES = (1, 2, 4)


def test_photos() -> list[Image.Image]:
    import skimage  # a dev dependency: the photos ship inside its wheel

    folder = Path(next(iter(skimage.__path__))) / "data"
    names = ("chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png")
    return [Image.open(folder / name).convert("RGB") for name in names]


def jpegs(size: tuple[int, int], quality: int = 90) -> list[bytes]:
    out = []
    for photo in test_photos():
        buffer = io.BytesIO()
        photo.resize(size, Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process and the given children."""
    total = time.process_time()
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _in_thread(images: list[bytes], batch: int, seconds: float) -> tuple[float, float]:
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        for i in range(batch):
            preprocess(images[(done + i) % len(images)], SPEC, MAX_PIXELS)
        done += batch
    return done / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / done


def _pool(pool: DecoderPool, images: list[bytes], batch: int, seconds: float) -> tuple[float, float]:
    done, started, cpu = 0, time.perf_counter(), _cpu_s(pool.pids())
    while time.perf_counter() - started < seconds:
        results = pool.decode_many([images[(done + i) % len(images)] for i in range(batch)])
        if any(not hasattr(r, "shape") for r in results):
            raise RuntimeError(f"a decode failed: {results}")
        done += batch
    return done / (time.perf_counter() - started), (_cpu_s(pool.pids()) - cpu) * 1000 / done


def throughput(seconds: float, batch: int, rounds: int) -> dict[str, Any]:
    images = jpegs((640, 480))
    pools = {n: DecoderPool(SPEC, MAX_PIXELS, decoders=n, timeout_ms=60_000) for n in POOL_SIZES}
    rates: dict[str, list[tuple[float, float]]] = {"in_thread": [], **{f"pool_{n}": [] for n in POOL_SIZES}}
    try:
        for pool in pools.values():
            _pool(pool, images, batch, 0.2)  # warm up each decoder
        for _ in range(rounds):
            rates["in_thread"].append(_in_thread(images, batch, seconds))
            for n, pool in pools.items():
                rates[f"pool_{n}"].append(_pool(pool, images, batch, seconds))
    finally:
        for pool in pools.values():
            pool.close()
    # images/s: the best round. CPU ms per image (this process + its decoders): the cheapest round,
    # the cost of the mode itself, which contention from other processes does not inflate much.
    return {
        mode: {
            "images_per_s": round(max(r[0] for r in runs), 1),
            "cpu_ms_per_image": round(min(r[1] for r in runs), 2),
            "rounds_images_per_s": [round(r[0], 1) for r in runs],
        }
        for mode, runs in rates.items()
    }


def draft_effect(repeats: int = 20) -> dict[str, Any]:
    images = jpegs((2048, 1536))
    draft = SPEC.model_copy(update={"jpeg_draft": True})
    per_image: dict[str, float] = {}
    for label, spec in (("full_ms", SPEC), ("draft_ms", draft)):
        started = time.process_time()
        for _ in range(repeats):
            for data in images:
                preprocess(data, spec, MAX_PIXELS)
        per_image[label] = round((time.process_time() - started) * 1000 / (repeats * len(images)), 2)
    return {
        "size": "2048x1536",
        **per_image,
        "speedup": round(per_image["full_ms"] / per_image["draft_ms"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per decode_many call")
    args = parser.parse_args(argv)
    report = {
        "images": "640x480 JPEG q90, the 5 test photos",
        "batch": args.batch,
        "throughput": throughput(args.seconds, args.batch, args.rounds),
        "jpeg_draft": draft_effect(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
