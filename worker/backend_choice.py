"""Which backend serves: the candidates of BACKEND, each loaded, warmed up and timed on the same
batch sizes the batch cap is chosen from; the fastest per image wins."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from shared.config import Settings
from shared.errors import ArtifactError
from worker.backends import candidates
from worker.model import NO_ONNX_EXPORT, load_artifact
from worker.runner import InferenceRunner

log = logging.getLogger(__name__)


@dataclass
class _Measured:
    runner: InferenceRunner
    curve: dict[int, float]  # forward ms per image by batch size (empty: not measured)

    @property
    def best_ms(self) -> float:
        return min(self.curve.values()) if self.curve else float("inf")


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
