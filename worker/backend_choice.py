"""Which backend serves, and at which batch cap: the candidates of BACKEND, each loaded, warmed up
and timed on the same batch sizes the batch cap is chosen from; the fastest per image wins. The
outcome is kept (`worker.warm_up_cache`): a later start under the same conditions loads only the
backend chosen, without timing anything."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from shared.config import Settings
from shared.errors import ArtifactError
from worker.backends import candidates
from worker.model import NO_ONNX_EXPORT, load_artifact
from worker.runner import InferenceRunner, calibration_sizes, choose_batch_cap, default_warm_up_sizes
from worker.warm_up_cache import Choice, WarmUpCache

log = logging.getLogger(__name__)


@dataclass
class _Measured:
    runner: InferenceRunner
    curve: dict[int, float]  # forward ms per image by batch size (empty: not measured)

    @property
    def best_ms(self) -> float:
        return min(self.curve.values()) if self.curve else float("inf")


@dataclass
class Chosen:
    runner: InferenceRunner  # loaded and warmed up on the backend that serves
    batch_cap: int
    source: str  # how the choice was made, for the log


def choose(settings: Settings) -> Chosen:
    """The backend that serves and its batch cap: measured at this start, or as measured at an earlier
    start under the same conditions (WARM_UP_CACHE)."""
    if not _auto_cap(settings) and settings.backend != "auto":
        # Nothing to choose: the named backend, warmed up at the sizes it will run.
        runner = measure_backends(settings, default_warm_up_sizes(settings.max_batch_size), False).runner
        return Chosen(runner, settings.max_batch_size, "settings")
    # Choosing a backend needs the same curve as choosing a cap: one measurement (or one cached
    # outcome of it) serves both.
    cache = WarmUpCache.for_settings(settings)
    if cache is not None and settings.warm_up_cache:
        cached = cache.lookup()
        if cached is not None:
            try:
                return _from_cache(settings, cache, cached)
            except ArtifactError as exc:
                log.warning("the cached choice (%s) does not load: %s; measuring again", cached.backend, exc)
    best = measure_backends(settings, calibration_sizes(settings.max_batch_size), True)
    batch_cap = _batch_cap(settings, best.curve)
    if cache is None:
        return Chosen(best.runner, batch_cap, "measured at this start")
    cache.store(Choice(best.runner.model.backend.name, batch_cap, best.curve))
    why = "a new measurement" if settings.warm_up_cache else "WARM_UP_CACHE=false"
    return Chosen(best.runner, batch_cap, f"measured at this start ({why}; stored in {cache.path})")


def _auto_cap(settings: Settings) -> bool:
    return settings.auto_batch_cap and settings.max_batch_size > 1


def _batch_cap(settings: Settings, curve: dict[int, float]) -> int:
    """The cap a measured forward-pass curve gives under the settings (AUTO_BATCH_CAP)."""
    return choose_batch_cap(curve) if _auto_cap(settings) and curve else settings.max_batch_size


def _from_cache(settings: Settings, cache: WarmUpCache, cached: Choice) -> Chosen:
    # The cap comes from the stored curve by today's rule, so a change of the rule applies to cached
    # measurements too (the stored cap is what the rule of the storing start chose).
    batch_cap = _batch_cap(settings, cached.curve)
    # Loaded and warmed up like a named backend, at the sizes it will run: none above the cap.
    chosen = settings.model_copy(update={"backend": cached.backend})
    runner = measure_backends(chosen, default_warm_up_sizes(batch_cap), False).runner
    curve = ", ".join(f"b{size}={ms:.1f}" for size, ms in cached.curve.items())
    return Chosen(
        runner,
        batch_cap,
        f"from the warm-up cache {cache.path} (measured {cached.measured_at}: forward ms per image {curve})",
    )


def measure_backends(settings: Settings, sizes: Sequence[int], measure: bool) -> _Measured:
    """Load the artifact on each candidate backend of BACKEND (one, or every installed one for
    `auto`), warm each up at `sizes` and, if `measure`, time them there: the fastest per image wins
    (with one candidate, it is simply loaded and warmed up).

    With several candidates, a first pass times each at the smallest and largest size only, and
    those slower than the fastest by more than PRESELECT_MARGIN get no full curve: a backend several
    times slower would otherwise cost most of the start-up time to measure."""
    names = candidates(settings.backend, settings.device)
    if not names:
        raise ArtifactError(
            f"BACKEND=auto but no backend is installed that runs on {settings.device}.",
            code="backend_unavailable",
        )
    runners: list[InferenceRunner] = []
    for name in names:
        try:
            model = load_artifact(
                settings.artifact_dir, settings.device, backend=name, threads=settings.backend_threads(name)
            )
        except ArtifactError as exc:
            if len(names) > 1 and exc.code == NO_ONNX_EXPORT:
                log.warning("backend %s skipped: %s", name, exc.message)
                continue
            raise
        runners.append(InferenceRunner(model, max_batch_size=settings.max_batch_size))
    if not runners:
        raise ArtifactError("No backend could load the artifact (see the warnings above).")
    if measure and len(runners) > 1:
        runners = _preselect(runners, sorted({sizes[0], sizes[-1]}))
    best: _Measured | None = None
    for runner in runners:
        runner.warm_up(sizes)
        measured = _Measured(runner, runner.calibrate(sizes) if measure else {})
        if measure:
            log.info(
                "backend %s: forward ms per image %s",
                _describe(runner),
                ", ".join(f"b{size}={ms:.1f}" for size, ms in measured.curve.items()),
            )
        if best is None or measured.best_ms < best.best_ms:
            best = measured
    assert best is not None
    return best


# A backend whose first-pass time per image is within this factor of the fastest one's is measured
# in full: first-pass timings on a shared CPU vary by tens of percent from one call to the next.
PRESELECT_MARGIN = 1.5


def _describe(runner: InferenceRunner) -> str:
    backend = runner.model.backend
    return f"{backend.name} {backend.version}, {backend.threads} threads"


def _preselect(runners: list[InferenceRunner], ends: Sequence[int]) -> list[InferenceRunner]:
    quick: list[float] = []
    for runner in runners:
        runner.warm_up(ends)
        quick.append(min(runner.calibrate(ends, images_per_size=4).values()))
    fastest = min(quick)
    kept = []
    for runner, ms in zip(runners, quick, strict=True):
        if ms <= fastest * PRESELECT_MARGIN:
            kept.append(runner)
        else:
            log.info(
                "backend %s left out: %.1f ms per image at best in the first pass, the fastest %.1f",
                _describe(runner),
                ms,
                fastest,
            )
    return kept
