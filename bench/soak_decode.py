"""The decode-bomb battery: `python -m bench.soak_decode [--workdir DIR]` prints one JSON line.

Every crafted hostile file of `bench.decode_bombs` (plus a few that stay under the structure caps but
are expensive anyway) goes through a fresh `DecoderPool` of one decoder, twice: with the settings'
limits (`DECODE_TIMEOUT_MS`, `DECODER_MEMORY_MB`), then with tight ones that the costly cases exceed.
Per case: the outcome (`ok` or the error code), the wall-clock time of `decode_many`, the decoder's
peak resident memory (VmHWM, sampled while it works, since a decoder that hit a limit is replaced),
and whether the decoder was replaced. After each case a real photo must still decode to the
in-thread result.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.decode import MAX_PIXELS, SPEC, test_photos
from bench.decode_bombs import battery, rle8_bmp
from shared.config import get_settings
from shared.preprocess import preprocess
from worker.decoders import DecoderPool


def _vm_hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _PeakSampler:
    """Polls the pool's decoders' VmHWM (monotonic per process) until stopped; keeps the largest."""

    def __init__(self, pool: DecoderPool, every_s: float = 0.005) -> None:
        self.pool, self.every_s, self.peak_mb = pool, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pool.pids():
                self.peak_mb = max(self.peak_mb, _vm_hwm_mb(pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rle_runs_within_caps() -> bytes:
    """An RLE8 BMP just under the caps: 1414x1414 of one-pixel runs (the most opcodes per byte)."""
    body = b"\x01\x07" * 1_000_000 + b"\x00\x01"
    head = rle8_bmp(1414, 1414)
    return head[:2] + struct.pack("<I", 1078 + len(body)) + head[6:1078] + body


def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (10, 200, 30)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def cases() -> dict[str, Callable[[], bytes]]:
    photo = test_photos()[1]
    return {
        **battery(photo),
        "bmp_rle8_1414x1414_within_caps": _rle_runs_within_caps,
        "png_36mpx_solid": _big_png,
    }


def run(timeout_ms: float, memory_mb: int) -> dict[str, Any]:
    """Each case in a fresh one-decoder pool (VmHWM never comes down), then a photo in the last one."""
    results: dict[str, Any] = {}
    healthy = True
    for name, make in cases().items():
        data = make()
        with DecoderPool(SPEC, MAX_PIXELS, decoders=1, timeout_ms=timeout_ms, memory_mb=memory_mb) as pool:
            with _PeakSampler(pool) as sampler:
                started = time.perf_counter()
                (outcome,) = pool.decode_many([data])
                elapsed_ms = (time.perf_counter() - started) * 1000
            results[name] = {
                "bytes": len(data),
                "outcome": "ok" if isinstance(outcome, np.ndarray) else outcome.code,
                "ms": round(elapsed_ms, 1),
                "decoder_peak_rss_mb": round(sampler.peak_mb, 1),
                "decoder_replaced": pool.replaced > 0,
            }
            buffer = io.BytesIO()
            test_photos()[1].save(buffer, "PNG")
            (after,) = pool.decode_many([buffer.getvalue()])
            healthy = (
                healthy
                and isinstance(after, np.ndarray)
                and np.array_equal(after, preprocess(buffer.getvalue(), SPEC, MAX_PIXELS))
            )
    return {
        "decode_timeout_ms": timeout_ms,
        "decoder_memory_mb": memory_mb,
        "cases": results,
        "pool_healthy_after": healthy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tight-timeout-ms", type=float, default=500.0)
    parser.add_argument("--tight-memory-mb", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None, help="the whole report is also written there")
    # The battery is small already: --quick is accepted so that `python -m bench.soak --quick` can pass
    # it to every drill.
    parser.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = get_settings()
    report: dict[str, Any] = {
        # The shipped limits, then tight ones so that the limits themselves are exercised.
        "settings_limits": run(settings.decode_timeout_ms, settings.decoder_memory_mb),
        "tight_limits": run(args.tight_timeout_ms, args.tight_memory_mb),
    }
    runs = (report["settings_limits"], report["tight_limits"])
    report["jobs_submitted"] = sum(len(r["cases"]) for r in runs)
    report["finished"] = sum(1 for r in runs for c in r["cases"].values() if c["outcome"] == "ok")
    failed: dict[str, int] = {}
    for r in runs:
        for case in r["cases"].values():
            if case["outcome"] != "ok":
                failed[case["outcome"]] = failed.get(case["outcome"], 0) + 1
    report["failed_by_code"] = failed
    # A hostile file may be refused (that is the point); the drill fails only when the pool did not
    # come back healthy, i.e. a real photo no longer decoded to the in-thread result afterwards.
    report["lost"] = 0
    report["peak_rss_mb"] = {
        "decoders": max(c["decoder_peak_rss_mb"] for r in runs for c in r["cases"].values())
    }
    passed = all(r["pool_healthy_after"] for r in runs)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        (args.workdir / "soak_decode.json").write_text(json.dumps(report, indent=2))
    # One line: `python -m bench.soak` reads the last stdout line as the drill's summary.
    print(json.dumps(report))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
