"""The targets `make bench` judges, and the figures they are judged on, from one run's results.

Pure functions of the results dict that `python -m bench` writes (`results.json`): `headline`
(the figures of one service layout), `peer_headline` (the LitServe phase's), `evaluate` (one
`TargetRow` per target), plus the analysis helpers the run itself uses (`knee`, `rss_growth`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SAT_VS_LIMIT = 0.90
SAT_VS_TORCHSCRIPT = 2.5
SAT_VS_FORKING = 4.0
SAT_VS_PRELOADED = 1.5
P99_AT_25_MS = 25.0
P99_AT_80_MS = 50.0
# Against the LitServe phase of the same run: CPU per image at saturation (whole process tree) at most
# this fraction of LitServe's, saturation at least this multiple, p99 at 50 req/s below LitServe's.
CPU_VS_LITSERVE = 0.9
SAT_VS_LITSERVE = 1.2
P99_VS_LITSERVE = 1.0
# The process groups of a saturation run's `cpu_cores` that make up the whole service: inferq's
# (bench.service.Stack.cpu_meter) and LitServe's (bench.peer.PeerServer.cpu_meter).
SERVICE_ROLES = ("worker", "api", "redis")
PEER_ROLES = ("worker", "front")
# The fractions of saturation the latency targets are judged at (the service phase runs these).
LATENCY_FRACTIONS = (0.25, 0.8)
# Fixed offered rates reported with their errors and p99 (zero errors expected).
REPORTED_RATES = (50.0, 100.0)
QUEUE_JOBS_PER_S = 5000.0
API_SUBMITS_PER_S = 2000.0
COLD_START_S = 3.0
RSS_NOISE_MB = 5.0
RSS_NOISE_FRACTION = 0.02
# Saturation runs during which processes outside the bench used more than this many cores are flagged.
CONTAMINATED_CORES = 0.3

# One run's results, as `python -m bench` writes them to results.json (nested dicts and lists).
Results = dict[str, Any]


@dataclass(frozen=True)
class TargetRow:
    """One target: what was measured, the threshold, and the verdict (None: not measured)."""

    target: str
    value: float
    unit: str
    threshold: str
    passed: bool | None


@dataclass(frozen=True)
class Headline:
    """The figures the targets are judged on, for one service layout (medians over runs)."""

    limit: float
    limit_config: str
    limit_best_size: int
    limit_same_allocator: float
    limit_two_processes: float
    torchscript_limit: float
    torchscript_limit_config: str
    forking: float
    preloaded: float
    saturation: float
    torchscript_saturation: float
    p99_at_25: float
    p99_at_50: float
    p99_at_80: float
    cpu_ms_per_image: float  # at saturation, the whole service (SERVICE_ROLES)
    p99_at_50_rps: float  # offered 50 req/s


@dataclass(frozen=True)
class PeerHeadline:
    """The LitServe phase's figures (its best thread setting; medians over runs), nan when not run."""

    version: str
    backend: str
    threads: int
    saturation: float
    cpu_ms_per_image: float  # at saturation, the whole process tree (PEER_ROLES)
    p99_at_25: float
    p99_at_50: float
    p99_at_80: float
    p99_at_50_rps: float
    cold_start_s: float


def med(summary: Any) -> float:
    """The median of a `summarize` dict (or a plain number); nan when missing."""
    if isinstance(summary, dict):
        value = summary.get("median", math.nan)
    elif summary is None:
        value = math.nan
    else:
        value = summary
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def rate_at(rates: list[dict[str, Any]], fraction: float, tolerance: float = 0.03) -> dict[str, Any] | None:
    """The open-loop run whose offered rate was closest to `fraction` × saturation (within tolerance)."""
    best, gap = None, tolerance
    for r in rates:
        f = r.get("fraction_of_saturation", r.get("fraction", math.nan))
        if abs(f - fraction) <= gap:
            best, gap = r, abs(f - fraction)
    return best


def run_at_rate(rates: list[dict[str, Any]], rate: float) -> dict[str, Any] | None:
    """The open-loop run offered `rate` req/s (within 3 %)."""
    return next((r for r in rates if abs(r["offered_rate"] - rate) <= 0.03 * rate), None)


def p99(run: dict[str, Any] | None) -> float:
    """The pooled p99 of an open-loop run; nan when there is none."""
    return float(run["pooled_latency_ms"]["p99"]) if run else math.nan


def cpu_ms_per_image(saturation: dict[str, Any], roles: tuple[str, ...]) -> float:
    """CPU ms per image at saturation, summed over the process groups `roles` (cores busy ÷ img/s)."""
    cores = saturation.get("cpu_cores") or {}
    if not cores or not all(role in cores for role in roles):
        return math.nan
    return ratio(sum(med(cores[role]) for role in roles) * 1000, med(saturation.get("images_per_s")))


def peer_headline(results: Results) -> PeerHeadline:
    """The LitServe phase's figures, as `headline` gives inferq's."""
    peer = results.get("litserve") or {}
    rates = peer.get("rates") or []
    backend = peer.get("backend") or {}
    return PeerHeadline(
        version=peer.get("version", ""),
        backend=f"{backend.get('backend', '?')} {backend.get('version', '')}".strip(),
        threads=int(peer.get("best_threads", 0)),
        saturation=med((peer.get("saturation") or {}).get("images_per_s")),
        cpu_ms_per_image=cpu_ms_per_image(peer.get("saturation") or {}, PEER_ROLES),
        p99_at_25=p99(rate_at(rates, 0.25)),
        p99_at_50=p99(rate_at(rates, 0.5)),
        p99_at_80=p99(rate_at(rates, 0.8)),
        p99_at_50_rps=p99(run_at_rate(rates, REPORTED_RATES[0])),
        cold_start_s=med(peer.get("cold_start_s")),
    )


def layouts(results: Results) -> dict[str, dict[str, Any]]:
    """The service layouts of this run (key → label, allocator, workers, threads), "deployed" first."""
    return results.get("service", {}).get("layouts", {})


def layout_label(results: Results, layout: str) -> str:
    return layouts(results).get(layout, {}).get("label", layout)


def layout_rates(results: Results, layout: str) -> list[dict[str, Any]]:
    return results.get("service", {}).get("rates", {}).get(layout, [])


def best_limit(results: Results, configs: tuple[str, ...]) -> tuple[float, str, int]:
    """The ceiling: the best median images/s over the given in-process configurations."""
    best = (math.nan, "", 0)
    for name in configs:
        data = results.get("limit", {}).get(name)
        if data and (math.isnan(best[0]) or med(data["best"]) > best[0]):
            best = (med(data["best"]), name, int(data["best_size"]))
    return best


def backends_limit(results: Results) -> tuple[float, str, int]:
    """The best one-process in-process pipeline of the backends phase (any backend, threads, batch)."""
    best = (results.get("backends") or {}).get("limit") or {}
    if not best:
        return (math.nan, "", 0)
    config = f"{best.get('backend', '?')} {best.get('threads', '?')}t"
    return (med(best.get("images_per_s")), config, int(best.get("batch", 0)))


def headline(results: Results, layout: str = "deployed") -> Headline:
    """The figures the targets are judged on, for one service layout (medians over runs)."""
    allocator = layouts(results).get(layout, {}).get("allocator", "glibc")
    base = results.get("baselines", {})
    service = results.get("service", {})
    saturation = service.get("saturation", {}).get(layout, {})
    sat = med(saturation.get("images_per_s"))
    ts_sat = med(service.get("saturation", {}).get("torchscript", {}).get("images_per_s"))
    rates = layout_rates(results, layout)
    at25, at50, at80 = rate_at(rates, 0.25), rate_at(rates, 0.5), rate_at(rates, 0.8)
    # The target's ceiling is the model's own limit in ONE process (the service runs one worker
    # process): the best of every one-process configuration, whatever its backend, allocator or
    # threads. The limit phase measures TorchScript only; the backends phase every runtime.
    configs = list(results.get("limit", {}))
    ts = best_limit(results, tuple(c for c in configs if "2×" not in c))
    other = backends_limit(results)
    limit, limit_config, limit_size = other if math.isnan(ts[0]) or other[0] > ts[0] else ts
    same_alloc = best_limit(results, tuple(c for c in configs if "2×" not in c and c.split()[0] == allocator))
    two_procs = best_limit(results, tuple(c for c in configs if "2×" in c))
    return Headline(
        limit=limit,
        limit_config=limit_config,
        limit_best_size=limit_size,
        limit_same_allocator=same_alloc[0],
        limit_two_processes=two_procs[0],
        torchscript_limit=ts[0],
        torchscript_limit_config=ts[1],
        forking=med(base.get("forking", {}).get("images_per_s")),
        preloaded=med(base.get("preloaded", {}).get("images_per_s")),
        saturation=sat,
        torchscript_saturation=ts_sat,
        p99_at_25=p99(at25),
        p99_at_50=p99(at50),
        p99_at_80=p99(at80),
        cpu_ms_per_image=cpu_ms_per_image(saturation, SERVICE_ROLES),
        p99_at_50_rps=p99(run_at_rate(rates, REPORTED_RATES[0])),
    )


def _row(name: str, value: float, threshold: str, ok: bool, unit: str = "") -> TargetRow:
    return TargetRow(name, value, unit, threshold, None if math.isnan(value) else ok)


SAT_VS_LIMIT_TARGET = "saturation / limit (best one-process pipeline: any backend, allocator, threads, batch)"


CPU_VS_LITSERVE_TARGET = "CPU ms per image at saturation, whole service ÷ LitServe's (whole process tree)"
SAT_VS_LITSERVE_TARGET = "saturation ÷ LitServe's (same model, decode, backend; batch 8)"
P99_VS_LITSERVE_TARGET = "p99 at 50 req/s offered ÷ LitServe's"


def litserve_targets(h: Headline, peer: PeerHeadline) -> list[TargetRow]:
    """inferq (one layout's headline) against the LitServe phase of the same run."""
    cpu = ratio(h.cpu_ms_per_image, peer.cpu_ms_per_image)
    sat = ratio(h.saturation, peer.saturation)
    tail = ratio(h.p99_at_50_rps, peer.p99_at_50_rps)
    return [
        _row(CPU_VS_LITSERVE_TARGET, cpu, f"≤ {CPU_VS_LITSERVE}", cpu <= CPU_VS_LITSERVE, "×"),
        _row(SAT_VS_LITSERVE_TARGET, sat, f"≥ {SAT_VS_LITSERVE}", sat >= SAT_VS_LITSERVE, "×"),
        _row(P99_VS_LITSERVE_TARGET, tail, f"< {P99_VS_LITSERVE:.0f}", tail < P99_VS_LITSERVE, "×"),
    ]


def service_targets(results: Results, layout: str = "deployed") -> list[TargetRow]:
    h = headline(results, layout)
    r1 = ratio(h.saturation, h.limit)
    r_ts = ratio(h.saturation, h.torchscript_saturation)
    r_ts_limit = ratio(h.saturation, h.torchscript_limit)
    r2 = ratio(h.saturation, h.forking)
    r3 = ratio(h.saturation, h.preloaded)
    return [
        _row(SAT_VS_LIMIT_TARGET, r1, f"≥ {SAT_VS_LIMIT:.2f}", r1 >= SAT_VS_LIMIT, "×"),
        _row(
            "saturation / TorchScript service (BACKEND=torchscript, same run)",
            r_ts,
            f"≥ {SAT_VS_TORCHSCRIPT}",
            r_ts >= SAT_VS_TORCHSCRIPT,
            "×",
        ),
        _row(
            "saturation / TorchScript-only limit (the limit phase)",
            r_ts_limit,
            f"≥ {SAT_VS_LIMIT:.2f}",
            r_ts_limit >= SAT_VS_LIMIT,
            "×",
        ),
        _row("saturation / naive forking RQ", r2, f"≥ {SAT_VS_FORKING:.0f}", r2 >= SAT_VS_FORKING, "×"),
        _row(
            "saturation / preloaded SimpleWorker b1", r3, f"≥ {SAT_VS_PRELOADED}", r3 >= SAT_VS_PRELOADED, "×"
        ),
        _row(
            "p99 at 25 % of saturation",
            h.p99_at_25,
            f"≤ {P99_AT_25_MS:.0f} ms",
            h.p99_at_25 <= P99_AT_25_MS,
            "ms",
        ),
        _row(
            "p99 at 80 % of saturation",
            h.p99_at_80,
            f"≤ {P99_AT_80_MS:.0f} ms",
            h.p99_at_80 <= P99_AT_80_MS,
            "ms",
        ),
        *litserve_targets(h, peer_headline(results)),
    ]


def fixed_rate_targets(results: Results, layout: str = "deployed") -> list[TargetRow]:
    """The fixed offered rates the targets ask to be reported: zero errors, p99 shown as the value."""
    rows = []
    for rate in REPORTED_RATES:
        run = run_at_rate(layout_rates(results, layout), rate)
        failed = run["errors"] + run["lost"] if run else 0
        rows.append(
            _row(
                f"{rate:.0f} req/s offered: p99, with zero errors",
                p99(run),
                f"0 errors + lost (measured {failed})" if run else "0 errors + lost",
                failed == 0,
                "ms",
            )
        )
    return rows


def evaluate(results: Results, layout: str = "deployed") -> list[TargetRow]:
    """One row per target: what was measured, the threshold, pass/fail (None when not measured)."""
    rows = service_targets(results, layout) + fixed_rate_targets(results, layout)
    queue = results.get("queue", {})
    sustained = med((queue.get("sustained") or {}).get("jobs_per_s"))
    rows.append(
        _row(
            "queue layer sustained (enqueue + no-op workers)",
            sustained,
            f"≥ {QUEUE_JOBS_PER_S:,.0f} jobs/s",
            sustained >= QUEUE_JOBS_PER_S,
            "jobs/s",
        )
    )
    api = med(results.get("api", {}).get("submits_per_s"))
    rows.append(
        _row(
            "API accepted submits/s (no worker)",
            api,
            f"≥ {API_SUBMITS_PER_S:,.0f}/s",
            api >= API_SUBMITS_PER_S,
            "/s",
        )
    )
    for key, label in (
        ("noop", "no-op model, glibc"),
        ("real", "real model, glibc"),
        ("real_tcmalloc", "real model, tcmalloc"),
    ):
        mem = results.get("memory", {}).get(key)
        if not mem:
            if key != "real_tcmalloc":
                rows.append(_row(f"RSS growth ({label})", math.nan, "", False, "MiB"))
            continue
        growth = mem.get("growth_after_warm_mb", math.nan)
        noise = max(RSS_NOISE_MB, RSS_NOISE_FRACTION * mem.get("rss_warm_mb", 0))
        rows.append(
            _row(
                f"RSS growth after warm-up, {label} ({mem.get('jobs_done', 0):,} jobs)",
                growth,
                f"≤ {noise:.1f} MiB (noise)",
                growth <= noise,
                "MiB",
            )
        )
    cold = med(results.get("cold_start", {}).get("api_and_worker_s"))
    rows.append(
        _row("cold start → first prediction", cold, f"≤ {COLD_START_S:.0f} s", cold <= COLD_START_S, "s")
    )
    launcher = results.get("cold_start", {}).get("launcher_s")
    if launcher is not None:  # absent from results of older runs
        rows.append(
            _row(
                "cold start, `make up`'s launcher → first prediction",
                med(launcher),
                f"≤ {COLD_START_S:.0f} s",
                med(launcher) <= COLD_START_S,
                "s",
            )
        )
    worker = med(results.get("cold_start", {}).get("worker_only_s"))
    rows.append(
        _row(
            "cold start, a worker alone → its first job's result",
            worker,
            f"≤ {COLD_START_S:.0f} s",
            worker <= COLD_START_S,
            "s",
        )
    )
    return rows


def knee(rates: list[dict[str, Any]]) -> float | None:
    """The highest offered rate the service kept up with: ≥ 97 % achieved, nothing lost, p99 < 1 s."""
    kept = [
        r["offered_rate"]
        for r in rates
        if r["achieved_rate"]["median"] >= 0.97 * r["offered_rate"]
        and r["lost"] == 0
        and r["errors"] == 0
        and r["pooled_latency_ms"]["p99"] < 1000
    ]
    return max(kept) if kept else None


def rss_growth(samples: list[list[float]]) -> dict[str, float]:
    """RSS at start (model loaded and warmed up), early (mean of the samples in 10–35 % of the jobs)
    and late (mean of the last 25 %); growth = late − early (windows, not single samples: glibc's
    heap wanders with the batch-size mix), and the least-squares slope after 10 % (MiB / 10k jobs).
    A dict: it goes into results.json as it is."""
    if not samples:
        return {}
    start = samples[0][1]
    end_jobs, end = samples[-1]

    def window(lo: float, hi: float) -> float:
        vals = [r for j, r in samples if lo * end_jobs <= j <= hi * end_jobs]
        return sum(vals) / len(vals) if vals else math.nan

    early, late = window(0.1, 0.35), window(0.75, 1.0)
    later = [(j, r) for j, r in samples if j >= end_jobs * 0.1]
    slope = math.nan
    if len(later) >= 3:
        mj = sum(j for j, _ in later) / len(later)
        mr = sum(r for _, r in later) / len(later)
        den = sum((j - mj) ** 2 for j, _ in later)
        if den > 0:
            slope = sum((j - mj) * (r - mr) for j, r in later) / den * 10_000
    return {
        "rss_start_mb": start,
        "rss_warm_mb": early,
        "rss_end_mb": end,
        "rss_late_mb": late,
        "rss_max_mb": max(r for _, r in samples),
        "growth_after_warm_mb": late - early,
        "slope_mb_per_10k_jobs": slope,
        "jobs_done": end_jobs,
    }
