"""A `BatchWorker` process for the bench: the real model or a no-op one, optionally a fixed-delay batcher.

`python -m bench.probe_worker --handler noop|real [--fixed-delay] [--stats-out F] [--rss-every N]`

* `--handler real` loads the model exactly as `python -m worker` does (`load_handler`); `noop`
  answers every image with a fixed top-5 without decoding it, so only the queue layer (Redis +
  RQ bookkeeping + the batch worker's loop) is measured (torch is imported all the same, with the
  handler's `PreparedBatch` the model stage builds, but never runs).
* Both are wrapped in `CountingHandler`, which counts jobs and samples this process's RSS every
  `--rss-every` jobs (written to `--stats-out` as JSON when the worker stops). The worker runs them
  through the same path as the real one (`preprocess_one` in the feeder, `infer` in the model stage).
* `--fixed-delay` passes another grab policy to the worker (`BatchWorker(collector_class=...)`): the
  adaptive batch-close rule is swapped for the textbook one (TorchServe's
  `max_batch_delay`): after the first job, always wait until MAX_BATCH_DELAY_MS has passed since
  the grab or the batch is full. inferq's settings cannot express that rule (its collector only
  waits while the observed arrival rate predicts a companion), so it exists only in the bench.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from launch.processes import rss_mb
from shared.jobs import result_payload
from worker.batching import BatchCollector

_FAKE_TOP5 = [{"label": f"class {i}", "index": i, "score": 0.2} for i in range(5)]


class NoopHandler:
    """`worker.handler.Handler` without a model (so without decoder processes): nothing is decoded,
    every job gets the same top-k."""

    batch_cap: int | None = None

    def __init__(self) -> None:
        self.model_info = {"name": "noop", "sha256": "0" * 64}

    def preprocess_one(self, data: bytes | None) -> tuple[np.ndarray, None, float]:
        return _NO_INPUT, None, 0.0

    def infer(self, prepared: Any, top_ks: list[int]) -> tuple[list[Any], float]:
        for i in prepared.ready:
            prepared.outcomes[i].result = result_payload(_FAKE_TOP5[: top_ks[i]], self.model_info)
        return prepared.outcomes, 0.0


_NO_INPUT = np.zeros(1, dtype=np.uint8)


class CountingHandler:
    """Wraps a handler: counts the jobs of each forward pass and samples this process's RSS."""

    def __init__(self, inner: Any, rss_every: int) -> None:
        self.inner = inner
        # The worker starts its decoder pool from the handler's model (its input spec).
        self.model = getattr(inner, "model", None)
        self.model_info = inner.model_info
        self.batch_cap = inner.batch_cap
        self.rss_every = rss_every
        self.jobs = 0
        self.batches = 0
        self.samples: list[tuple[int, float]] = [(0, rss_mb())]
        self._next = rss_every

    def preprocess_one(self, data: bytes | None) -> Any:
        return self.inner.preprocess_one(data)

    def infer(self, prepared: Any, top_ks: list[int]) -> tuple[list[Any], float]:
        out = self.inner.infer(prepared, top_ks)
        self.jobs += len(top_ks)
        self.batches += 1
        if self.rss_every and self.jobs >= self._next:
            self.samples.append((self.jobs, rss_mb()))
            self._next += self.rss_every
        return out


class FixedDelayCollector(BatchCollector):
    """Always waits the full MAX_BATCH_DELAY_MS after the grab (unless the batch fills first).

    The grab is the worker's own `take_first` call (whatever loop or thread makes it); the ones this
    class makes while waiting do not move it."""

    _grabbed_at = 0.0
    _waiting = False

    def take_first(self, block_seconds: float) -> Any:
        got = super().take_first(block_seconds)
        if got is not None and not self._waiting:
            self._grabbed_at = self.clock()
        return got

    def waits_for_companions(self, model_idle: bool) -> bool:
        return True  # the textbook rule waits whether or not the model is busy

    def wait_for_more(self, have: int, oldest_arrival: float) -> list[Any]:
        extra: list[Any] = []
        deadline = self._grabbed_at + self.max_delay
        self._waiting = True
        try:
            while have + len(extra) < self.max_size:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                # take_first: whatever is queued now, else block (≥ 1 ms, Redis's floor) for the next.
                nxt = self.take_first(max(remaining, 0.001))
                if nxt is None:
                    break
                extra.append(nxt)
                extra += self.take_available(self.max_size - have - len(extra))
        finally:
            self._waiting = False
        return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_worker", description=__doc__)
    parser.add_argument("--handler", choices=["noop", "real"], default="noop")
    parser.add_argument("--fixed-delay", action="store_true")
    parser.add_argument("--stats-out", type=Path)
    parser.add_argument("--rss-every", type=int, default=0)
    parser.add_argument("--max-jobs", type=int)
    parser.add_argument("--burst", action="store_true")
    args = parser.parse_args(argv)

    from shared.config import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from worker.batch_worker import BatchWorker, load_handler
    from worker.feeder import in_thread_decoder

    started = time.perf_counter()
    inner: Any = NoopHandler() if args.handler == "noop" else load_handler(settings)
    load_s = time.perf_counter() - started
    handler = CountingHandler(inner, args.rss_every)
    worker = BatchWorker(
        settings=settings,
        handler=handler,  # type: ignore[arg-type]
        collector_class=FixedDelayCollector if args.fixed_delay else BatchCollector,
        # No model, nothing to decode: the no-op handler's own preprocess_one, on the feeder thread,
        # instead of a decoder pool that would decode every JPEG the queue layer is measured with.
        decode_many=in_thread_decoder(handler) if args.handler == "noop" else None,  # type: ignore[arg-type]
    )
    try:
        worker.work(burst=args.burst, max_jobs=args.max_jobs)
    finally:
        handler.samples.append((handler.jobs, rss_mb()))
        if args.stats_out:
            args.stats_out.write_text(
                json.dumps(
                    {
                        "jobs": handler.jobs,
                        "batches": handler.batches,
                        "load_s": load_s,
                        "rss_samples": handler.samples,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
