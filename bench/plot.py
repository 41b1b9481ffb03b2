"""BENCHMARKS.png: four panels from one `python -m bench` run's results (matplotlib, if installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.targets import P99_AT_25_MS, P99_AT_80_MS, QUEUE_JOBS_PER_S, Results, layout_rates, layouts, med


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def plot(results: Results, path: Path) -> bool:
    """Four panels: limit vs batch size, latency vs offered rate, batch size vs rate, queue layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    ax = axes[0][0]
    for allocator, data in results.get("limit", {}).items():
        sizes = [int(s) for s in data["sizes"]]
        vals = [med(data["sizes"][str(s)]["images_per_s"]) for s in sizes]
        lo = [data["sizes"][str(s)]["images_per_s"]["min"] for s in sizes]
        hi = [data["sizes"][str(s)]["images_per_s"]["max"] for s in sizes]
        (line,) = ax.plot(sizes, vals, marker="o", label=f"limit, {allocator}")
        ax.fill_between(sizes, lo, hi, alpha=0.15, color=line.get_color())
    for i, (layout, sat) in enumerate(results.get("service", {}).get("saturation", {}).items()):
        ax.axhline(
            med(sat["images_per_s"]),
            linestyle="--",
            label=f"inferq saturation, {layout}",
            color=f"C{5 + i}",
        )
    base = results.get("baselines", {})
    if base.get("preloaded"):
        ax.axhline(
            med(base["preloaded"]["images_per_s"]), linestyle=":", color="grey", label="SimpleWorker b1"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title("In-process limit vs end-to-end saturation")
    ax.set_ylim(bottom=0)
    _legend(ax, fontsize=8)

    ax = axes[0][1]
    for key in layouts(results):
        allocator = key
        rates = sorted(layout_rates(results, key), key=lambda r: r["offered_rate"])
        if not rates:
            continue
        x = [r["offered_rate"] for r in rates]
        for q, style in (("p50", "-o"), ("p99", "--s")):
            y = [min(r["pooled_latency_ms"][q], 1e5) for r in rates]
            ax.plot(x, y, style, label=f"{q}, {allocator}")
    ax.axhline(P99_AT_25_MS, color="grey", linewidth=0.8)
    ax.axhline(P99_AT_80_MS, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("offered req/s (Poisson)")
    ax.set_ylabel("end-to-end latency, ms")
    ax.set_title("Open-loop latency (from scheduled send)")
    _legend(ax, fontsize=8)

    ax = axes[1][0]
    rates = sorted(layout_rates(results, "deployed"), key=lambda r: r["offered_rate"])
    if rates:
        ax.plot([r["offered_rate"] for r in rates], [r["batch_size_mean"] for r in rates], "-o", label="mean")
        ax.plot([r["offered_rate"] for r in rates], [r["batch_size_max"] for r in rates], "--", label="max")
        ax2 = ax.twinx()
        ax2.plot(
            [r["offered_rate"] for r in rates],
            [med(r["achieved_rate"]) for r in rates],
            ":s",
            color="C3",
            label="achieved req/s",
        )
        ax2.set_ylabel("achieved req/s")
        _legend(ax2, fontsize=8, loc="center right")
    ax.set_xlabel("offered req/s")
    ax.set_ylabel("achieved batch size")
    ax.set_title("Batch sizes the worker formed (as deployed)")
    _legend(ax, fontsize=8, loc="upper left")

    ax = axes[1][1]
    queue = results.get("queue", {})
    if queue.get("drain"):
        ks = [d["workers"] for d in queue["drain"]]
        ax.bar(
            [str(k) for k in ks], [med(d["jobs_per_s"]) for d in queue["drain"]], label="drain, no-op workers"
        )
        for e in queue.get("enqueue", []):
            ax.axhline(
                med(e["jobs_per_s"]),
                linestyle="--",
                color="C1",
                label=f"enqueue, {e['producers']} producer(s)",
            )
        if queue.get("sustained"):
            ax.axhline(med(queue["sustained"]["jobs_per_s"]), linestyle=":", color="C2", label="sustained")
        ax.axhline(QUEUE_JOBS_PER_S, color="red", linewidth=0.8, label="target")
        _legend(ax, fontsize=8)
    ax.set_xlabel("no-op workers")
    ax.set_ylabel("jobs/s")
    ax.set_title("Queue layer alone")
    fig.suptitle(f"inferq benchmarks — {results.get('meta', {}).get('date', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
