"""BENCHMARKS.md (+ the PNG plot) from the results of one `python -m bench` run.

Three parts: the targets and the figures they are judged on (`bench.targets`), the Markdown (the
prose and the order of the sections are the template `bench/report.md.j2`; this module formats
the figures and builds the tables it shows), and the plot (`bench.plot`). All are pure functions of
the results dict, so a `results.json` re-renders the same report (`python -m bench --from-json`).
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from bench.plot import plot
from bench.targets import (
    CONTAMINATED_CORES,
    PEER_ROLES,
    Results,
    TargetRow,
    cpu_ms_per_image,
    evaluate,
    headline,
    knee,
    layout_label,
    layout_rates,
    layouts,
    med,
    peer_headline,
    ratio,
    rss_growth,
    service_targets,
)

# Re-exported: the bench run and the tests take these from here.
__all__ = ["evaluate", "headline", "knee", "render", "rss_growth", "write_outputs"]

TEMPLATE = "report.md.j2"

# A section's view: the strings (and lists of them) the template shows; None: the section is left out.
View = dict[str, Any] | None


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown, not HTML
    )
    return env.get_template(TEMPLATE)


# --- formatting ------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    """`12.3` for a number, `12.3 (11.0–14.2)` for a summary of several runs, `–` when missing."""
    if isinstance(value, dict) and "median" in value:
        m = med(value)
        if math.isnan(m):
            return "–"
        if value.get("n", 1) > 1:
            return f"{_num(m, digits)} ({_num(value['min'], digits)}–{_num(value['max'], digits)})"
        return _num(m, digits)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–" if value is None else str(value)
    return "–" if math.isnan(number) else _num(number, digits)


def _num(value: float, digits: int) -> str:
    value = float(value)
    if math.isinf(value):
        return "∞"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**pass**" if ok else "**FAIL**")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table, followed by a blank line."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join([*out, ""])


def _measured(row: TargetRow) -> str:
    return f"{fmt(row.value, 2)} {row.unit}".strip()


# --- the sections' views ---------------------------------------------------------------------------


def _meta(results: Results) -> View:
    meta = results.get("meta", {})
    if not meta:
        return None
    changed = meta.get("code_changed_during_run")
    end = meta.get("commit_end")
    phases = results.get("phases")
    return {
        "date": meta.get("date", "?"),
        "duration": fmt(meta.get("duration_s"), 0),
        "commit": meta.get("commit", "?"),
        "dirty": bool(meta.get("dirty")),
        # Code under test that changed while the bench ran (others work in the same tree).
        "changed": ", ".join(changed[:8]) if changed else "",
        "moved_to": end if changed == [] and end and end != meta.get("commit") else "",
        "cpu": meta.get("cpu", "?"),
        "cores": meta.get("cores", "?"),
        "memory_gib": meta.get("memory_gib", "?"),
        "kernel": meta.get("kernel", "?"),
        "python": meta.get("python", "?"),
        "versions": ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "redis_version": meta.get("redis_version", "?"),
        "settings": ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items()),
        "deployed_allocator": meta.get("deployed_allocator", "?"),
        "tcmalloc": meta.get("tcmalloc") or "",
        "images": meta.get("images", "?"),
        "loadavg_start": meta.get("loadavg_start"),
        "loadavg_end": meta.get("loadavg_end"),
        "phases": ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in phases.items()) if phases else "",
        # Phases re-run on their own and merged in (`python -m bench.merge_phases`): not this run's.
        "merged": "; ".join(
            f"{k} at `{v['commit']}`, {v['date']}" for k, v in meta.get("merged", {}).items()
        ),
    }


def _targets(results: Results) -> dict[str, Any]:
    rows = evaluate(results)
    saturation = results.get("service", {}).get("saturation", {})
    others = [k for k in layouts(results) if k != "deployed" and k in saturation]
    alt = {layout: service_targets(results, layout) for layout in others}
    header = ["target", "threshold", "as deployed", "verdict"]
    for layout in others:
        header += [layout_label(results, layout), "verdict"]
    cells = []
    for i, r in enumerate(rows):
        row = [r.target, r.threshold, _measured(r), _verdict(r.passed)]
        for layout in others:
            if i < len(alt[layout]):
                row += [_measured(alt[layout][i]), _verdict(alt[layout][i].passed)]
            else:
                row += ["(same)", ""]
        cells.append(row)
    headlines = []
    for layout in ("deployed", *others):
        h = headline(results, layout)
        headlines.append(
            {
                "label": layout_label(results, layout),
                "saturation": fmt(h.saturation),
                "limit": fmt(h.limit),
                "limit_config": h.limit_config,
                "limit_best_size": h.limit_best_size,
                "limit_same_allocator": fmt(h.limit_same_allocator),
                "ratio_same_allocator": fmt(ratio(h.saturation, h.limit_same_allocator), 2),
                "limit_two_processes": fmt(h.limit_two_processes),
                "ratio_two_processes": fmt(ratio(h.saturation, h.limit_two_processes), 2),
                "torchscript_limit": fmt(h.torchscript_limit),
                "torchscript_limit_config": h.torchscript_limit_config or "–",
                "torchscript_saturation": fmt(h.torchscript_saturation),
                "p99_at_25": fmt(h.p99_at_25, 0),
                "forking": fmt(h.forking, 2),
                "preloaded": fmt(h.preloaded),
                "p99_at_50": fmt(h.p99_at_50, 0),
                "p99_at_80": fmt(h.p99_at_80, 0),
                "cpu_ms_per_image": fmt(h.cpu_ms_per_image),
                "p99_at_50_rps": fmt(h.p99_at_50_rps, 0),
            }
        )
    peer = peer_headline(results) if results.get("litserve") else None
    return {
        "deployed_label": layout_label(results, "deployed"),
        "table": table(header, cells),
        "headlines": headlines,
        "litserve": (
            {
                "label": _peer_label(peer),
                "saturation": fmt(peer.saturation),
                "cpu_ms_per_image": fmt(peer.cpu_ms_per_image),
                "p99": " / ".join(fmt(v, 0) for v in (peer.p99_at_25, peer.p99_at_50, peer.p99_at_80)),
                "p99_at_50_rps": fmt(peer.p99_at_50_rps, 0),
            }
            if peer
            else None
        ),
    }


def _peer_label(peer: Any) -> str:
    return f"LitServe {peer.version} + {peer.backend}, batch 8, {peer.threads} thread(s)"


def _limit(results: Results) -> View:
    limit = results.get("limit")
    if not limit:
        return None
    sizes = list(next(iter(limit.values()))["sizes"])
    per_size = table(
        ["batch", *limit],
        [
            [size, *(fmt(limit[c]["sizes"].get(size, {}).get("images_per_s")) for c in limit)]
            for size in sizes
        ],
    )
    header = ["batch"]
    for c in limit:
        header += [f"{c} batch p50 ms", f"{c} preprocess ms/img", f"{c} forward ms", f"{c} 1st batch ms"]
    rows = []
    for size in sizes:
        row = [size]
        for c in limit:
            s = limit[c]["sizes"].get(size, {})
            row += [
                fmt(s.get("batch_ms_p50"), 0),
                fmt(s.get("preprocess_ms_per_image")),
                fmt(s.get("forward_ms_per_batch"), 0),
                fmt(s.get("first_batch_ms"), 0),
            ]
        rows.append(row)
    ceilings = [{"config": c, "best": fmt(d["best"]), "size": d["best_size"]} for c, d in limit.items()]
    return {"per_size": per_size, "per_batch": table(header, rows), "ceilings": ceilings}


def _baselines(results: Results) -> View:
    base = results.get("baselines")
    if not base:
        return None
    rows = []
    for key, label in (
        ("forking", "forking `Worker` (model loaded inside each job's fork)"),
        ("preloaded", "`SimpleWorker`, model cached after the first job, batch 1"),
    ):
        b = base.get(key)
        if not b:
            continue
        jobs = (
            f"{b['jobs_per_run']} (first {b['skipped_per_run']} excluded)"
            if b["skipped_per_run"]
            else str(b["jobs_per_run"])
        )
        rows.append(
            [label, jobs, fmt(b["images_per_s"], 2), fmt(b["job_ms_p50"], 0), f"{b['finished']}/{b['jobs']}"]
        )
    header = ["baseline", "jobs per run", "img/s", "job ms p50 (started→ended)", "finished"]
    return {"table": table(header, rows)}


def _cpu(saturations: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for layout, sat in saturations.items():
        cores = sat.get("cpu_cores") or {}
        if not cores:
            continue
        rate = med(sat["images_per_s"])
        parts = []
        for role in ("worker", "api", "front", "redis", "client", "others"):
            if role in cores:
                per_image = med(cores[role]) / rate * 1000 if rate else math.nan
                parts.append(f"{role} {fmt(cores[role], 2)} ({fmt(per_image, 1)} ms/img)")
        others = med(cores.get("others"))
        out.append(
            {
                "layout": layout,
                "machine": fmt(cores.get("machine"), 2),
                "parts": ", ".join(parts),
                "others": fmt(others, 2) if others > CONTAMINATED_CORES else "",
            }
        )
    return out


_OPEN_LOOP_HEADER = [
    "offered req/s",
    "runs",
    "achieved /s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "mean batch",
    "max batch",
    "lost/err",
]


def _open_loop_row(name: str, r: dict[str, Any]) -> list[str]:
    """One open-loop run as a row of `_OPEN_LOOP_HEADER`, after `name`."""
    lat = r["pooled_latency_ms"]
    frac = r.get("fraction_of_saturation", r.get("fraction"))
    return [
        name,
        f"{fmt(r['offered_rate'])}" + (f" ({fmt(frac * 100, 0)} % sat.)" if frac is not None else ""),
        str(r["runs"]),
        fmt(r["achieved_rate"]),
        fmt(lat["p50"], 0),
        fmt(lat["p95"], 0),
        f"{fmt(lat['p99'], 0)} ({fmt(r['p99_ms']['min'], 0)}–{fmt(r['p99_ms']['max'], 0)})",
        fmt(r["batch_size_mean"]),
        fmt(r["batch_size_max"], 0),
        f"{r['lost']}/{r['errors']}",
    ]


def _service(results: Results) -> View:
    service = results.get("service")
    if not service:
        return None
    saturations = service.get("saturation", {})
    rows = []
    for layout, sat in saturations.items():
        limit = headline(results, layout).limit
        rows.append(
            [
                layout_label(results, layout),
                str(sat["clients"]),
                ", ".join(map(str, layouts(results).get(layout, {}).get("batch_caps") or [])) or "–",
                fmt(sat["images_per_s"]),
                fmt(sat["batch_size_mean"]),
                fmt(sat["latency_p50_ms"], 0),
                fmt(sat["latency_p99_ms"], 0),
                fmt(ratio(med(sat["images_per_s"]), limit), 2),
                str(sat["errors"]),
            ]
        )
    saturation = table(
        [
            "layout",
            "clients",
            "batch cap(s)",
            "img/s",
            "mean batch",
            "p50 ms",
            "p99 ms",
            "÷ limit (best one-process)",
            "errors",
        ],
        rows,
    )
    ratios = []
    for layout in saturations:
        h = headline(results, layout)
        ratios.append(
            {
                "label": layout_label(results, layout),
                "limit": fmt(ratio(h.saturation, h.limit), 2),
                "forking": fmt(ratio(h.saturation, h.forking), 1),
                "preloaded": fmt(ratio(h.saturation, h.preloaded), 2),
            }
        )
    rows = [_open_loop_row(layout, r) for layout in layouts(results) for r in layout_rates(results, layout)]
    open_loop = table(["layout", *_OPEN_LOOP_HEADER], rows)
    kept = service.get("knee")
    return {
        "saturation": saturation,
        "cpu": _cpu(saturations),
        "ratios": ratios,
        "open_loop": open_loop,
        "knee": fmt(kept) if kept else "none of the tested rates",
    }


def _litserve(results: Results) -> View:
    data = results.get("litserve")
    if not data:
        return None
    peer = peer_headline(results)
    rows = []
    for threads, measured in data.get("threads", {}).items():
        sat = measured["saturation"]
        cores = sat.get("cpu_cores") or {}
        rate = med(sat["images_per_s"])
        rows.append(
            [
                f"{threads}{' (best)' if int(threads) == peer.threads else ''}",
                fmt(measured["cold_start_s"], 2),
                fmt(sat["images_per_s"]),
                fmt(sat["latency_p50_ms"], 0),
                fmt(sat["latency_p99_ms"], 0),
                fmt(cpu_ms_per_image(sat, PEER_ROLES)),
                *(fmt(ratio(med(cores.get(role)) * 1000, rate)) for role in PEER_ROLES),
                str(sat["errors"]),
            ]
        )
    threads = table(
        [
            "intra-op threads",
            "cold start s",
            "saturation img/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/img, whole tree",
            "inference worker ms/img",
            "front ms/img",
            "errors",
        ],
        rows,
    )
    h = headline(results)
    cold = results.get("cold_start", {}).get("api_and_worker_s")
    side = table(
        [
            "system",
            "saturation img/s",
            "CPU ms per image (whole process tree)",
            "p99 at 25 / 50 / 80 % of own saturation",
            "p99 at 50 req/s",
            "cold start s",
        ],
        [
            [
                layout_label(results, "deployed"),
                fmt(h.saturation),
                fmt(h.cpu_ms_per_image),
                " / ".join(fmt(v, 0) for v in (h.p99_at_25, h.p99_at_50, h.p99_at_80)) + " ms",
                f"{fmt(h.p99_at_50_rps, 0)} ms",
                fmt(cold, 2),
            ],
            [
                _peer_label(peer),
                fmt(peer.saturation),
                fmt(peer.cpu_ms_per_image),
                " / ".join(fmt(v, 0) for v in (peer.p99_at_25, peer.p99_at_50, peer.p99_at_80)) + " ms",
                f"{fmt(peer.p99_at_50_rps, 0)} ms",
                fmt(data.get("cold_start_s"), 2),
            ],
        ],
    )
    best = data.get("saturation") or {}
    backend = data.get("backend") or {}
    return {
        "version": data.get("version", "?"),
        "backend": peer.backend,
        "backend_source": backend.get("source", "?"),
        "max_batch_size": data.get("max_batch_size", "?"),
        "batch_timeout_ms": fmt(data.get("batch_timeout_ms"), 0),
        "threads": threads,
        "best_threads": peer.threads,
        "side_by_side": side,
        "cpu": _cpu({_peer_label(peer): best}),
        "open_loop": table(
            ["system", *_OPEN_LOOP_HEADER],
            [_open_loop_row(f"LitServe {peer.threads}t", r) for r in data.get("rates", [])],
        ),
    }


def _queue(results: Results) -> View:
    queue = results.get("queue")
    if not queue:
        return None
    rows = [
        [
            "enqueue only",
            f"{e['producers']} producer process(es)",
            fmt(e["jobs_per_s"], 0),
            fmt(e.get("redis_commands_per_job"), 1),
        ]
        for e in queue.get("enqueue", [])
    ]
    rows += [
        [
            "drain only",
            f"{d['workers']} no-op worker(s)",
            fmt(d["jobs_per_s"], 0),
            fmt(d.get("redis_commands_per_job"), 1),
        ]
        for d in queue.get("drain", [])
    ]
    s = queue.get("sustained")
    if s:
        rows.append(
            [
                "sustained (both at once)",
                f"{s['producers']} producers + {s['workers']} workers",
                f"{fmt(s['jobs_per_s'], 0)} (producers alone reached {fmt(s['enqueue_jobs_per_s'], 0)})",
                "",
            ]
        )
    return {"table": table(["what", "processes", "jobs/s", "Redis commands per job"], rows)}


def _memory(results: Results) -> View:
    memory = results.get("memory")
    if not memory:
        return None
    rows = [
        [
            f"{m.get('handler')} model, {m.get('allocator')}",
            f"{m.get('jobs_done', 0):,}",
            fmt(m.get("rss_start_mb")),
            fmt(m.get("rss_warm_mb")),
            fmt(m.get("rss_late_mb")),
            fmt(m.get("rss_max_mb")),
            fmt(m.get("growth_after_warm_mb")),
            fmt(m.get("slope_mb_per_10k_jobs"), 2),
        ]
        for m in memory.values()
    ]
    header = ["worker", "jobs", "RSS start MiB", "early", "late", "max", "growth", "slope MiB / 10k jobs"]
    return {"table": table(header, rows)}


def _cold(results: Results) -> View:
    cold = results.get("cold_start")
    if not cold:
        return None
    view = {"api_and_worker": fmt(cold["api_and_worker_s"], 2), "worker_only": fmt(cold["worker_only_s"], 2)}
    for key in ("first_start", "launcher"):  # absent from results of older runs
        view[key] = fmt(cold[f"{key}_s"], 2) if f"{key}_s" in cold else None
    return view


def _api(results: Results) -> View:
    api = results.get("api")
    if not api:
        return None
    return {
        "clients": api["clients"],
        "body_kib": fmt(api["body_kib_mean"], 0),
        "submits_per_s": fmt(api["submits_per_s"], 0),
        "p50": fmt(api["latency_p50_ms"], 1),
        "p99": fmt(api["latency_p99_ms"], 1),
        "errors": api["errors"],
        "cpu_ms": fmt(api["api_cpu_ms_per_submit"], 2) if "api_cpu_ms_per_submit" in api else "n/a",
    }


def _batching(results: Results) -> View:
    variants = (results.get("batching") or {}).get("variants")
    if not variants:
        return None
    rows = []
    for v in variants:
        low = v.get("low_load")
        sat = v["saturation"]
        rows.append(
            [
                v["variant"],
                ", ".join(map(str, v.get("batch_caps") or [])) or "–",
                fmt(low["pooled_latency_ms"]["p50"], 0) if low else "–",
                fmt(low["pooled_latency_ms"]["p99"], 0) if low else "–",
                fmt(low["batch_size_mean"], 2) if low else "–",
                fmt(sat["images_per_s"]),
                fmt(sat["batch_size_mean"]),
                fmt(sat["latency_p99_ms"], 0),
                fmt((sat.get("cpu_cores") or {}).get("others"), 2),
            ]
        )
    rate = variants[0].get("low_load", {}).get("offered_rate", "?")
    header = [
        "variant",
        "batch cap",
        f"p50 ms at {fmt(rate, 0)} req/s",
        f"p99 ms at {fmt(rate, 0)} req/s",
        "mean batch (low)",
        "saturation img/s",
        "mean batch (sat.)",
        "p99 ms (sat.)",
        "others' cores (sat.)",
    ]
    return {"table": table(header, rows)}


def _decoders(results: Results) -> View:
    dec = (results.get("limit", {}).get("glibc") or {}).get("decoders")
    if not dec:
        return None
    rows = [
        ["PIL (the worker's path)", fmt(dec.get("pil_decode_only_ms"), 2), fmt(dec.get("pil_ms"), 2)],
        [
            "simplejpeg → PIL resize",
            fmt(dec.get("simplejpeg_decode_only_ms"), 2),
            fmt(dec.get("simplejpeg_ms"), 2),
        ],
    ]
    return {
        "table": table(["path", "decode only", "decode + resize + crop + normalise"], rows),
        "max_abs_diff": fmt(dec.get("simplejpeg_max_abs_diff"), 4),
    }


def _flat_table(data: dict[str, Any]) -> str:
    """A two-column table of a module's flat figures (name → value), in the order it printed them."""
    rows = [
        [k, str(v) if isinstance(v, int) else fmt(v, 2)]
        for k, v in data.items()
        if not isinstance(v, dict | list)
    ]
    return table(["figure", "value"], rows)


def _backends(results: Results) -> View:
    data = results.get("backends")
    if not data:
        return None
    runs = data.get("results", [])
    sizes = sorted({s for r in runs for s in r.get("forward_ms_per_image", {})}, key=int)
    label = [f"{r['backend']} {r.get('version', '')} {r['threads']}t".replace("  ", " ") for r in runs]
    forward = table(
        ["backend, threads", "load s", *(f"batch {s}" for s in sizes)],
        [
            [name, fmt(r.get("load_s"), 2), *(fmt(r["forward_ms_per_image"].get(s), 2) for s in sizes)]
            for name, r in zip(label, runs, strict=True)
        ],
    )
    pipeline = table(
        ["backend, threads", *(f"batch {s}" for s in sizes)],
        [
            [name, *(fmt(r["pipeline_images_per_s"].get(s)) for s in sizes)]
            for name, r in zip(label, runs, strict=True)
        ],
    )
    best = [
        f"{backend}: {fmt(b['images_per_s'])} img/s ({b['threads']} thread(s), batch {b['batch']})"
        for backend, b in (data.get("pipeline_best") or {}).items()
    ]
    limit = data.get("limit") or {}
    h = headline(results)
    return {
        "allocator": data.get("allocator", "glibc"),
        "forward": forward,
        "pipeline": pipeline,
        "best": best,
        "limit": (
            f"{fmt(limit['images_per_s'])} img/s ({limit['backend']}, {limit['threads']} thread(s), "
            f"batch {limit['batch']})"
            if limit
            else "–"
        ),
        "torchscript_limit": fmt(h.torchscript_limit),
        "skipped": ", ".join(f"{k} ({v[:120]})" for k, v in (data.get("skipped") or {}).items()),
    }


def _decode(results: Results) -> View:
    data = results.get("decode")
    if not data:
        return None
    modes = data.get("throughput", {})
    names = {"in_thread": "in the calling thread (DECODERS=0)"}
    rows = [
        [
            names.get(mode, mode.replace("pool_", "DecoderPool, ") + " process(es)"),
            fmt(m.get("images_per_s")),
            fmt(m.get("cpu_ms_per_image"), 2),
            ", ".join(fmt(r) for r in m.get("rounds_images_per_s", [])),
        ]
        for mode, m in modes.items()
    ]
    draft = data.get("jpeg_draft") or {}
    return {
        "images": data.get("images", "?"),
        "batch": data.get("batch", "?"),
        "table": table(["decode + preprocess", "best img/s", "CPU ms/img", "rounds img/s"], rows),
        "draft_size": draft.get("size", "?"),
        "draft_full": fmt(draft.get("full_ms"), 2),
        "draft_draft": fmt(draft.get("draft_ms"), 2),
        "draft_speedup": fmt(draft.get("speedup"), 2),
    }


def _front_door(results: Results) -> View:
    data = results.get("front_door")
    if not data:
        return None
    parts = {"attack": "attack", "long_polls": "long_polls", "cpu": "cpu"}
    return {key: _flat_table(data[name]) if data.get(name) else None for key, name in parts.items()}


def _slim(results: Results) -> View:
    data = results.get("slim")
    if not data:
        return None
    envs = data.get("environments", {})
    rows = []
    largest = []
    for name in ("torch venv", "slim worker venv"):
        env = envs.get(name)
        if env is None:
            rows.append([name, *(["not run"] * 9)])
            continue
        size = env["size"]
        first = env.get("first_start", {})
        rows.append(
            [
                name,
                fmt(size["site_packages_mb"], 0),
                f"{fmt(size['pinned_mb'], 0)} (`{env['requirements']}`)",
                "yes" if size["torch"] else "no",
                fmt(env["cold_start_s"], 2),
                fmt(env["first_start_s"], 2),
                fmt(env["rss_worker_mb"], 0),
                f"{fmt(env['rss_decoders_mb'], 0)}, {env['decoders']} process(es)",
                fmt(first.get("worker_mb"), 0),
                ", ".join(env["backends"]) or "–",
            ]
        )
        top = ", ".join(f"{dist} {fmt(mb, 0)}" for dist, mb in size.get("largest", []))
        largest.append(f"{name}: {top} MiB ({size['distributions']} distributions)")
    header = [
        "environment",
        "site-packages MiB",
        "runtime pins' files MiB",
        "torch",
        "cold start s",
        "first start s",
        "worker RSS MiB",
        "decoders RSS MiB, summed",
        "worker RSS after a first start MiB",
        "backend served",
    ]
    served = {tuple(env["backends"]) for env in envs.values()}
    return {
        "runs": data.get("runs", "?"),
        "jobs": data.get("jobs", "?"),
        "table": table(header, rows),
        "largest": largest,
        # BACKEND=auto chose per environment: RSS and start times then compare runtimes as well.
        "backends_differ": len(served) > 1,
    }


_PLAN_KEYS = (
    "runs",
    "limit_seconds",
    "limit_sizes",
    "naive_jobs",
    "preload_jobs",
    "preload_skip",
    "sat_clients",
    "sat_seconds",
    "sat_warmup",
    "rate_seconds",
    "enqueue_jobs",
    "drain_jobs",
    "sustained_jobs",
    "variant_runs",
    "variant_low_seconds",
    "variant_low_rate",
    "variant_sat_seconds",
    "backends_seconds",
    "decode_seconds",
    "decode_rounds",
    "front_stalled",
    "front_trickling",
    "front_waiters",
    "front_pairs",
    "slim_runs",
    "slim_jobs",
    "litserve_threads",
    "litserve_fractions",
    "litserve_rates",
)


def _plan(results: Results) -> View:
    plan = results.get("plan", {})
    if not plan:
        return None
    view = {key: plan.get(key) for key in _PLAN_KEYS}
    view["rss_noop_jobs"] = f"{plan.get('rss_noop_jobs'):,}"
    view["rss_real_jobs"] = f"{plan.get('rss_real_jobs'):,}"
    return view


# --- the report ------------------------------------------------------------------------------------


def render(results: Results, plot_name: str | None = None) -> str:
    errors = results.get("errors") or {}
    text = _template().render(
        quick=bool(results.get("quick")),
        meta=_meta(results),
        targets=_targets(results),
        limit=_limit(results),
        baselines=_baselines(results),
        service=_service(results),
        litserve=_litserve(results),
        plot_name=plot_name,
        queue=_queue(results),
        memory=_memory(results),
        cold=_cold(results),
        api=_api(results),
        batching=_batching(results),
        decoders=_decoders(results),
        backends=_backends(results),
        decode=_decode(results),
        front_door=_front_door(results),
        slim=_slim(results),
        plan=_plan(results),
        errors=[(name, text.splitlines()[0][:300]) for name, text in errors.items()],
    )
    return text.rstrip() + "\n"


def write_outputs(results: Results, out: Path, plot_path: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    drew = False
    try:
        drew = plot(results, plot_path)
    except Exception as exc:  # a broken plot must not lose the report
        results.setdefault("errors", {})["plot"] = f"{type(exc).__name__}: {exc}"
    name = None
    if drew:
        try:
            name = str(plot_path.relative_to(out.parent))
        except ValueError:
            name = str(plot_path)
    text = render(results, name)
    if not drew:
        text += "\n_No plot: matplotlib is not installed in this environment._\n"
    out.write_text(text)
