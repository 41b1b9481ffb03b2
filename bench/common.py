"""What every benchmark shares: the image mix, summary statistics, child processes."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from launch.processes import TCMALLOC, descendants, free_port, rss_mb, stop_process, wait_until
from shared.config import PROJECT_ROOT

# Re-exported: the bench's modules take their process helpers from here.
__all__ = ["TCMALLOC", "free_port", "rss_mb", "wait_until"]

PY = sys.executable
ALLOCATORS = ("glibc", "tcmalloc")

# Photos scikit-image ships (the five the tests classify first, then four more real photos).
PHOTOS = (
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "camera.png",
    "motorcycle_left.png",
    "astronaut.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
UPLOAD_SIZE = (640, 480)
UPLOAD_QUALITY = 90


# --- images --------------------------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C: the `with` blocks that started Redis servers, apis and
    workers stop them (by default SIGTERM ends the bench at once and leaves its services running)."""

    def unwind(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)


def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the benchmark images come from scikit-image (a dev dependency): install it")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def as_upload_jpeg(data: bytes, size: tuple[int, int] = UPLOAD_SIZE, quality: int = UPLOAD_QUALITY) -> bytes:
    """Re-encode a photo as a phone-like upload: RGB, cover-resized and centre-cropped, baseline JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    width, height = size
    scale = max(width / rgb.width, height / rgb.height)
    resized = rgb.resize(
        (math.ceil(rgb.width * scale), math.ceil(rgb.height * scale)), Image.Resampling.BILINEAR
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    out = io.BytesIO()
    resized.crop((left, top, left + width, top + height)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def load_images() -> list[tuple[str, bytes]]:
    """The bench's image mix, in a fixed order: each photo as shipped, then as a 640×480 JPEG."""
    folder = sample_dir()
    originals = [(name, (folder / name).read_bytes()) for name in PHOTOS]
    uploads = [(f"{Path(name).stem}@640x480.jpg", as_upload_jpeg(data)) for name, data in originals]
    return originals + uploads


def describe_images(images: Sequence[tuple[str, bytes]]) -> str:
    sizes = sorted(len(data) for _, data in images)
    jpeg = sum(1 for _, data in images if data[:3] == b"\xff\xd8\xff")
    return (
        f"{len(images)} images ({jpeg} JPEG, {len(images) - jpeg} PNG) from scikit-image's data folder: "
        f"{', '.join(PHOTOS)}, each as shipped and re-encoded as a {UPLOAD_SIZE[0]}×{UPLOAD_SIZE[1]} "
        f"JPEG (q{UPLOAD_QUALITY}); {sizes[0] // 1024}–{sizes[-1] // 1024} KiB, "
        f"median {sizes[len(sizes) // 2] // 1024} KiB"
    )


# --- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    pos = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Median and spread (min, max) of one figure measured in several runs."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0, "runs": []}
    return {
        "median": percentile(vals, 50),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "runs": vals,
    }


def span_rate(ends: Sequence[float], trim: float = 0.1) -> float:
    """Completions per second in the middle of a run (drops the first/last `trim` of completions,
    i.e. start-up and tail), from completion timestamps in seconds."""
    ordered = sorted(ends)
    n = len(ordered)
    if n < 2:
        return math.nan
    lo = int(n * trim)
    hi = max(lo + 1, n - 1 - int(n * trim))
    if ordered[hi] <= ordered[lo]:
        return math.nan
    return (hi - lo) / (ordered[hi] - ordered[lo])


# --- processes -----------------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    return [pid, *descendants(pid)]


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20) -> None:
    stop_process(proc, timeout)


def base_env(redis_url: str | None = None, allocator: str = "glibc", **overrides: Any) -> dict[str, str]:
    """Environment of a service/bench child: the project importable, the service's own defaults."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.setdefault("LOG_LEVEL", "INFO")
    if redis_url:
        env["REDIS_URL"] = redis_url
    if allocator == "tcmalloc":
        if not TCMALLOC.exists():
            raise RuntimeError(f"{TCMALLOC} is missing (apt-get install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = str(TCMALLOC)
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def spawn(
    args: Sequence[str], env: dict[str, str], log: Path | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    out: Any = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            list(args), env=env, cwd=cwd or PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    finally:
        if log:
            out.close()


def run_json(args: Sequence[str], env: dict[str, str], timeout: float, log: Path | None = None) -> Any:
    """Run a bench child that prints one JSON document as its last stdout line (or as the whole of
    its stdout, indented)."""
    err: Any = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        done = subprocess.run(
            list(args), env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=err, timeout=timeout
        )
    finally:
        if log:
            err.close()
    text = done.stdout.decode().strip()
    lines = text.splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}; see {log}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        # Some modules pretty-print their one document over several lines for a human reader: it
        # starts at the last "{" in column 0 (nested objects are indented), after any log lines.
        start = text.rfind("\n{") + 1
        return json.loads(text[start:])


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (from /proc/stat), every process included."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds used by groups of processes between `start()` and `stop()`, plus the machine total."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {role: sum(cpu_seconds(p) for p in pids) for role, pids in self.groups.items()}
        now["machine"] = machine_busy_seconds()
        now["wall"] = time.monotonic()
        return now

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        used = {k: end[k] - self._start[k] for k in end}
        ours = sum(v for k, v in used.items() if k not in ("machine", "wall"))
        used["others"] = max(0.0, used["machine"] - ours)
        return used


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


class Log:
    """Progress lines on stderr, with the elapsed time since the bench started."""

    started = time.monotonic()

    @classmethod
    def say(cls, message: str) -> None:
        print(f"[bench {time.monotonic() - cls.started:6.0f}s] {message}", file=sys.stderr, flush=True)
