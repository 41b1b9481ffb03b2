"""Crafted decode bombs against the api's upload check and the worker's decode, with stated budgets.

Budget of the api's inspection (`api.validation.check_image`, what runs before a 202): at most
50 ms of process CPU and 64 MB of memory per upload, whatever it holds. Memory is read two ways in a
fresh interpreter: tracemalloc's peak (Python objects, e.g. tuples of TIFF values) and the growth of
VmPeak (address space, which also sees C allocations such as libwebp's animation canvas). Each case
is either refused with its 4xx code or accepted within the budget.

The worker's decode of the same files is bounded too: refused with the same code before a pixel is
decoded, or decoded within a stated CPU budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bench import decode_bombs
from shared.config import PROJECT_ROOT
from shared.errors import ImageError
from shared.manifest import InputSpec
from shared.preprocess import preprocess

API_CPU_BUDGET_MS = 50.0
API_MEMORY_BUDGET_MB = 64.0
MAX_PIXELS = 40_000_000
SPEC = InputSpec(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# name -> (HTTP status, error code) at the api, or None: accepted (header within limits).
API_OUTCOME: dict[str, tuple[int, str] | None] = {
    "bmp_rle8_40000x1000": (422, "image_too_complex"),
    "png_500k_text_chunks": (422, "image_too_complex"),
    "gif_50000_frames": None,
    "tiff_5000_pages": None,
    "tiff_1m_strips": (422, "image_too_complex"),
    "tiff_40mpx_float32_deflate": None,
    "webp_animated_10000x10000_canvas": (413, "image_too_large"),
    "jpeg_progressive_5000_scans": (422, "image_too_complex"),
    "jpeg_100k_markers": (422, "image_too_complex"),
}

# Runs in a fresh interpreter per case: VmPeak only ever grows, so no case may inherit another's.
_MEASURE = """
import json, sys, time, tracemalloc
from pathlib import Path
from api.errors import ApiError
from api.validation import check_image
from shared.config import Settings

def vm_peak():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) / 1024

settings = Settings(max_image_pixels=40_000_000, max_upload_bytes=10 * 1024 * 1024)
check_image(Path(sys.argv[1]).read_bytes(), settings)  # warm up: imports, PIL plugins
out = {}
for path in sys.argv[2:]:
    data = Path(path).read_bytes()
    peak_before = vm_peak()
    cpu = time.process_time()
    try:
        check_image(data, settings)
        outcome = None
    except ApiError as exc:
        outcome = [exc.http_status, exc.code]
    cpu_ms = (time.process_time() - cpu) * 1000
    vm_growth = vm_peak() - peak_before
    tracemalloc.start()
    try:
        check_image(data, settings)
    except ApiError:
        pass
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    out[Path(path).stem] = {
        "outcome": outcome, "cpu_ms": cpu_ms, "vm_growth_mb": vm_growth, "traced_mb": traced
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    photo = Image.open(sample_dir / "coffee.png")
    paths = {}
    for name, make in decode_bombs.battery(photo).items():
        paths[name] = folder / f"{name}.bin"
        paths[name].write_bytes(make())
    return paths


@pytest.fixture(scope="module")
def api_measurements(bombs: dict[str, Path], sample_dir: Path) -> dict[str, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    warm_up = str(sample_dir / "rocket.jpg")
    measured = {}
    for path in bombs.values():  # one interpreter per case: VmPeak never comes down
        args = [sys.executable, "-c", _MEASURE, warm_up, str(path)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=True)
        measured.update(json.loads(done.stdout))
    return measured


def test_the_battery_is_complete(bombs: dict[str, Path]) -> None:
    assert set(bombs) == set(API_OUTCOME)


@pytest.mark.parametrize("name", sorted(API_OUTCOME))
def test_api_inspection_refuses_or_accepts_within_budget(
    api_measurements: dict[str, dict[str, object]], name: str
) -> None:
    measured = api_measurements[name]
    expected = API_OUTCOME[name]
    assert measured["outcome"] == (list(expected) if expected else None)
    assert measured["cpu_ms"] <= API_CPU_BUDGET_MS, measured
    assert measured["traced_mb"] <= API_MEMORY_BUDGET_MB, measured
    assert measured["vm_growth_mb"] <= API_MEMORY_BUDGET_MB, measured


@pytest.mark.parametrize("name", sorted(API_OUTCOME))
def test_worker_decode_refuses_the_same_or_decodes_within_budget(bombs: dict[str, Path], name: str) -> None:
    data = bombs[name].read_bytes()
    expected = API_OUTCOME[name]
    cpu = time.process_time()
    if expected is None:
        assert preprocess(data, SPEC, MAX_PIXELS).shape == (3, 224, 224)
        # The 40 Mpx float TIFF decodes 160 MB of samples: about 1 s here; the rest take milliseconds.
        budget_s = 10.0 if "40mpx" in name else 0.5
    else:
        with pytest.raises(ImageError) as refused:
            preprocess(data, SPEC, MAX_PIXELS)
        assert (refused.value.http_status, refused.value.code) == expected
        budget_s = 0.05
    assert time.process_time() - cpu <= budget_s


def test_caps_leave_real_photos_alone(photo_bytes: dict[str, bytes], sample_dir: Path) -> None:
    # A progressive JPEG (10 scans) and multi-frame files are not "too complex".
    for name in ("no_time_for_that_tiny.gif", "multipage.tif"):
        assert preprocess((sample_dir / name).read_bytes(), SPEC, MAX_PIXELS).shape == (3, 224, 224)
    photo = Image.open(sample_dir / "coffee.png")
    progressive = decode_bombs.progressive_jpeg_scans(photo, scans=0, side=512)
    assert preprocess(progressive, SPEC, MAX_PIXELS).shape == (3, 224, 224)
