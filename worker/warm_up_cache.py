"""What a worker's warm-up measured, kept between starts: the backend `BACKEND=auto` chose and the
batch cap `AUTO_BATCH_CAP` chose, keyed by everything that measurement depends on.

The measurement loads every candidate backend and times it at several batch sizes: most of a worker's
start-up. Its outcome depends only on the artifact, the installed runtimes, the machine and the
settings, so a later start under the same conditions loads the backend it chose, without timing
anything, and takes its batch cap from the stored curve (by the rule of the serving code). The
conditions are stored in full beside the result and compared on reading: a file written under other
conditions (or named by a colliding hash) is never used. The cache never stops a worker: an
unreadable or unwritable file is logged, and the warm-up then measures as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.manifest import MANIFEST_FILE
from worker.backends import installed_backends, installed_version, tcmalloc_loaded

log = logging.getLogger(__name__)

# Bumped whenever the stored conditions or result change meaning: older files then simply miss.
FORMAT = 1
SUBDIR = "warm-up"


@dataclass(frozen=True)
class Choice:
    """The outcome of one warm-up measurement."""

    backend: str
    batch_cap: int
    curve: dict[int, float]  # the chosen backend's forward ms per image by batch size
    measured_at: str = ""  # UTC, ISO 8601


def _cpu() -> dict[str, Any]:
    """The CPU model, a digest of its feature flags (they decide which kernels the runtimes use) and
    the number of cores this process may run on."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags"):
                found.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        pass
    flags = found.get("flags", "")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 0
    return {
        "model": found.get("model name") or f"{platform.machine()} {platform.processor()}",
        "flags": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16] if flags else "",
        "cores": cores,
    }


def _gpus() -> list[str]:
    """The NVIDIA GPUs the driver lists (model names), without loading CUDA."""
    found = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            first = info.read_text(errors="replace").splitlines()[0]
        except (OSError, IndexError):
            continue
        found.append(first.partition(":")[2].strip())
    return found


def conditions(settings: Settings) -> dict[str, Any] | None:
    """Everything the warm-up's outcome depends on; None when the artifact has no readable manifest
    (the load then fails with its own message)."""
    try:
        manifest = (Path(settings.artifact_dir) / MANIFEST_FILE).read_bytes()
    except OSError:
        return None
    runtimes = installed_backends() if settings.backend == "auto" else [settings.backend]
    return {
        "format": FORMAT,
        # The manifest holds the sha256 of every model file, each verified against it at load.
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "backend": settings.backend,
        "runtimes": {
            name: {"package": installed_version(name), "threads": settings.backend_threads(name)}
            for name in runtimes
        },
        "device": settings.device,
        "gpus": _gpus() if settings.device != "cpu" else [],
        "cpu": _cpu(),
        "tcmalloc": tcmalloc_loaded(),
        "max_batch_size": settings.max_batch_size,
        "auto_batch_cap": settings.auto_batch_cap,
    }


class WarmUpCache:
    """One file per set of conditions under `<INFERQ_CACHE>/warm-up/`."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.path = folder / f"{digest}.json"

    @classmethod
    def for_settings(cls, settings: Settings) -> WarmUpCache | None:
        key = conditions(settings)
        if key is None:
            return None
        try:
            folder = settings.cache_dir / SUBDIR
        except RuntimeError as exc:  # Path.home() without HOME nor a passwd entry
            log.warning("no warm-up cache: %s", exc)
            return None
        return cls(folder, key)

    def lookup(self) -> Choice | None:
        """The stored choice for exactly these conditions, or None."""
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("warm-up cache %s unreadable (%s): measuring again", self.path, exc)
            return None
        if not isinstance(stored, dict) or stored.get("conditions") != self.key:
            return None
        try:
            result = stored["result"]
            choice = Choice(
                backend=str(result["backend"]),
                batch_cap=int(result["batch_cap"]),
                curve={int(size): float(ms) for size, ms in result["curve"].items()},
                measured_at=str(result.get("measured_at", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("warm-up cache %s malformed (%r): measuring again", self.path, exc)
            return None
        runtimes = self.key["runtimes"]
        largest = self.key["max_batch_size"]
        sizes_ok = bool(choice.curve) and all(1 <= size <= largest for size in choice.curve)
        if choice.backend not in runtimes or not sizes_ok or not 1 <= choice.batch_cap <= largest:
            log.warning("warm-up cache %s names an impossible choice: measuring again", self.path)
            return None
        return choice

    def store(self, choice: Choice) -> None:
        """Write atomically (several workers starting at once may all measure and store)."""
        measured_at = choice.measured_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        document = {
            "conditions": self.key,
            "result": {
                "backend": choice.backend,
                "batch_cap": choice.batch_cap,
                "curve": {str(size): round(ms, 3) for size, ms in choice.curve.items()},
                "measured_at": measured_at,
            },
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".warm-up-", suffix=".json", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(document, f, indent=1, sort_keys=True)
                os.replace(temp, self.path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("warm-up cache %s not written (%s): the next start measures again", self.path, exc)
            return
        log.info("warm-up measurement stored in %s", self.path)
