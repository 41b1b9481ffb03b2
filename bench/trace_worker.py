"""`python -m bench.trace_worker --out FILE`: `python -m worker` with a per-job timeline of its stages.

The worker is the real one (same settings, model, decoder pool); this module only wraps, from the
outside, the calls between its stages and records when each job passed them (wall clock, so the
bench can line them up with the api's and the client's times). One JSON line per job is appended to
FILE once its end is written:

  grabbed     the feeder's dequeue returned its id
  fetched     its job hash and image were read
  started     its start transaction was written
  decode_in / decode_out   its decode step (one call per grab)
  ready       parked for the model thread
  taken       the model thread took it into a batch
  forward_in / forward_out the forward pass
  write_in / write_out     the writer's transaction for its batch
"""

from __future__ import annotations

import argparse
import functools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_marks: dict[str, dict[str, float]] = {}
_out: Path | None = None


def _mark(ids: list[str], name: str, when: float | None = None) -> None:
    when = time.time() if when is None else when
    with _lock:
        for job_id in ids:
            _marks.setdefault(job_id, {})[name] = when


def _wrap(
    owner: Any, attr: str, before: Callable[..., None] | None, after: Callable[..., None] | None
) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args, **kwargs)
        return result

    setattr(owner, attr, wrapped)


def install(out: Path) -> None:
    global _out
    _out = out
    from worker import batching, feeder, model_stage, pipeline, rq_writes

    _wrap(
        batching.BatchCollector,
        "take_first",
        None,
        lambda r, *a, **k: _mark([r.job_id], "grabbed") if r is not None else None,
    )
    _wrap(
        batching.BatchCollector,
        "take_available",
        None,
        lambda r, *a, **k: _mark([g.job_id for g in r], "grabbed"),
    )
    _wrap(
        batching.BatchCollector,
        "wait_for_more",
        None,
        lambda r, *a, **k: _mark([g.job_id for g in r], "grabbed"),
    )
    _wrap(feeder.Feeder, "_fetch", None, lambda r, self, ids: _mark(list(ids), "fetched"))
    _wrap(
        rq_writes,
        "start_grabbed",
        None,
        lambda r, *a, **k: _mark([x.job.id for x in r or []], "started"),
    )
    original_start = feeder.Feeder._start_and_decode

    def start_and_decode(self: Any, grabbed: Any, jobs: Any, images: Any) -> int:
        inner = self.decode_many
        if not getattr(inner, "_traced", False):

            def decode_many(batch: Any) -> Any:
                began = time.time()
                result = inner(batch)
                ended = time.time()
                ids = [g.job_id for g in grabbed]
                _mark(ids, "decode_in", began)
                _mark(ids, "decode_out", ended)
                return result

            decode_many._traced = True  # type: ignore[attr-defined]
            self.decode_many = decode_many
            try:
                return original_start(self, grabbed, jobs, images)
            finally:
                self.decode_many = inner
        return original_start(self, grabbed, jobs, images)

    feeder.Feeder._start_and_decode = start_and_decode  # type: ignore[method-assign]
    _wrap(pipeline.ReadyItems, "put", lambda self, item: _mark([item.running.job.id], "ready"), None)
    _wrap(
        pipeline.ReadyItems,
        "take",
        None,
        lambda r, *a, **k: _mark([item.running.job.id for item in r if hasattr(item, "running")], "taken"),
    )
    original_run_batch = model_stage.run_batch

    def run_batch(handler: Any, connection: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
        ids = [item.running.job.id for item in items]
        infer = handler.infer

        def timed(*a: Any, **k: Any) -> Any:
            _mark(ids, "forward_in")
            try:
                return infer(*a, **k)
            finally:
                _mark(ids, "forward_out")

        handler.infer = timed
        try:
            return original_run_batch(handler, connection, items, *args, **kwargs)
        finally:
            del handler.infer

    model_stage.run_batch = run_batch
    from worker import batch_worker

    batch_worker.run_batch = run_batch  # imported by name there
    original_finish = rq_writes.finish

    def finish(worker: Any, endings: Any, *args: Any, **kwargs: Any) -> Any:
        ids = [e.running.job.id for e in endings]
        _mark(ids, "write_in")
        result = original_finish(worker, endings, *args, **kwargs)
        _mark(ids, "write_out")
        _flush(ids)
        return result

    rq_writes.finish = finish
    # Work that may hold up a stage now and then: its start and length (`<out>.stalls.jsonl`).
    for attr in ("run_maintenance_tasks", "check_for_suspension", "beat"):
        _time_calls(batch_worker.BatchWorker, attr, out.with_suffix(".stalls.jsonl"))
    _time_calls(batching.BatchCollector, "wait_for_more", out.with_suffix(".stalls.jsonl"))
    # CPU time of the calling thread per stage call (`<out>.cpu.jsonl`): where the worker's CPU goes.
    from worker import decoders, writer

    cpu_out = out.with_suffix(".cpu.jsonl")
    for owner, attr in (
        (feeder.Feeder, "_grab"),
        (feeder.Feeder, "_prepare"),
        (feeder.Feeder, "_fetch"),
        (decoders.DecoderPool, "decode_many"),
        (batch_worker.BatchWorker, "check_for_suspension"),
        (batch_worker.BatchWorker, "beat"),
        (batch_worker.BatchWorker, "run_maintenance_tasks"),
        (writer, "write_batch"),
        (rq_writes, "finish"),
        (rq_writes, "start_grabbed"),
        (rq_writes, "set_at_risk"),
        (batch_worker, "run_batch"),
    ):
        _cpu_calls(owner, attr, cpu_out)
    from worker import writer

    writer.rq_writes = rq_writes  # (the same module object; finish is looked up on it per call)


def _record_calls(
    owner: Any,
    attr: str,
    out: Path,
    clock: Callable[[], float],
    row: Callable[[float, float], dict[str, float] | None],
) -> None:
    """Wrap `owner.attr` so each call appends `{"call": attr, **row(began, ms)}` to `out` (`ms` by
    `clock`), unless `row` returns None."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        began = clock()
        try:
            return original(*args, **kwargs)
        finally:
            fields = row(began, (clock() - began) * 1000)
            if fields is not None:
                with _lock, out.open("a") as fh:
                    fh.write(json.dumps({"call": attr, **fields}) + "\n")

    setattr(owner, attr, recorded)


def _time_calls(owner: Any, attr: str, out: Path) -> None:
    """Wall-clock start and length of the calls of 0.5 ms or more."""
    _record_calls(
        owner,
        attr,
        out,
        time.time,
        lambda began, ms: {"start": began, "ms": round(ms, 3)} if ms >= 0.5 else None,
    )


def _cpu_calls(owner: Any, attr: str, out: Path) -> None:
    """CPU time of the calling thread in every call."""
    _record_calls(owner, attr, out, time.thread_time, lambda began, ms: {"cpu_ms": round(ms, 3)})


def _flush(ids: list[str]) -> None:
    with _lock:
        lines = [json.dumps({"id": job_id, **_marks.pop(job_id, {})}) for job_id in ids]
    if _out is not None and lines:
        with _out.open("a") as fh:
            fh.write("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    install(args.out)
    from worker.__main__ import main as worker_main

    return worker_main([])


if __name__ == "__main__":
    raise SystemExit(main())
