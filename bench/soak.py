"""`python -m bench.soak` (`make soak`): run every soak drill, write SOAK.md.

A drill is a module `bench/soak_<name>.py` with `main(argv) -> int` that accepts `--workdir DIR`
(its logs and data go there) and `--quick` (small counts, for a smoke run), prints one JSON document
as the last line of its stdout and returns 0 when the drill passed. Each drill runs in a process
of its own (its servers and workers are its own, and a crash of one drill does not stop the
others). The fields SOAK.md reports, when the drill gives them:

    jobs_submitted, finished, failed_by_code {code: n}, lost,
    recovery_s {max, median}, peak_rss_mb {api, worker, decoders, redis}

Anything else the drill prints stays in `<workdir>/<drill>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pkgutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from shared.config import PROJECT_ROOT

DRILL_PREFIX = "soak_"
DEFAULT_TIMEOUT_SECONDS = 3 * 3600
MEMORY_ROLES = ("api", "worker", "decoders", "redis")


@dataclass
class DrillResult:
    """What one drill said (its JSON document), or why it said nothing."""

    name: str
    exit_code: int | None
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and self.error is None


def discover(package: str = "bench") -> list[str]:
    """Module names of the drills in `package`, sorted."""
    path = import_module(package).__path__
    return sorted(
        f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name.startswith(DRILL_PREFIX)
    )


def run_drill(module: str, args: Sequence[str], timeout: float, log: Path) -> DrillResult:
    """Run `module.main(args)` in a child interpreter; its last stdout line is its summary."""
    code = f"import sys, {module} as drill; sys.exit(drill.main({list(args)!r}))"
    started = time.monotonic()
    name = module.rpartition(".")[2].removeprefix(DRILL_PREFIX)
    with log.open("wb") as err:
        try:
            done = subprocess.run(
                [sys.executable, "-c", code],
                cwd=PROJECT_ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return DrillResult(
                name, None, time.monotonic() - started, error=f"timed out after {timeout:.0f} s"
            )
    seconds = time.monotonic() - started
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        return DrillResult(name, done.returncode, seconds, error=f"printed no JSON summary (log: {log})")
    return DrillResult(name, done.returncode, seconds, summary)


# --- SOAK.md ----------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _failed(summary: dict[str, Any]) -> str:
    failed = summary.get("failed_by_code")
    if failed is None:
        return "–"
    if not failed:
        return "0"
    return ", ".join(f"{code}: {n}" for code, n in sorted(failed.items()))


def _recovery(summary: dict[str, Any]) -> str:
    recovery = summary.get("recovery_s")
    if not isinstance(recovery, dict) or recovery.get("max") is None:
        return "–"
    return f"max {_cell(recovery.get('max'))} s, median {_cell(recovery.get('median'))} s"


def _memory(summary: dict[str, Any]) -> str:
    peak = summary.get("peak_rss_mb") or {}
    parts = [f"{role} {_cell(peak[role])}" for role in MEMORY_ROLES if role in peak]
    return ", ".join(parts) + " MiB" if parts else "–"


def render(results: Sequence[DrillResult], commit: str, when: datetime.datetime) -> str:
    lines = [
        "# SOAK",
        "",
        f"`make soak` (`python -m bench.soak`) at `{commit}`, {when:%Y-%m-%d %H:%M} UTC. Each drill ran in "
        "a process of its own; `lost` (jobs that never reached a final state) must be 0.",
        "",
        "| drill | verdict | jobs submitted | finished | failed by code | lost | recovery | peak memory "
        "| time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        verdict = "pass" if r.passed else f"**FAIL** ({r.error or f'exit {r.exit_code}'})"
        lines.append(
            f"| {r.name} | {verdict} | {_cell(s.get('jobs_submitted'))} | {_cell(s.get('finished'))} | "
            f"{_failed(s)} | {_cell(s.get('lost'))} | {_recovery(s)} | {_memory(s)} | {r.seconds:.0f} s |"
        )
    if not results:
        lines.append("| (no drill found) | | | | | | | | |")
    lines += ["", "Each drill's whole summary is in its `<workdir>/<drill>.json`; its log beside it.", ""]
    return "\n".join(lines)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "?"
    return out.stdout.strip() or "?"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "SOAK.md")
    parser.add_argument("--workdir", type=Path, help="logs and summaries (default: soak-results/<time>)")
    parser.add_argument("--only", help="comma-separated drill names (e.g. chaos); default: every drill")
    parser.add_argument("--package", default="bench", help="where the soak_*.py drills live")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds per drill")
    parser.add_argument("--quick", action="store_true", help="pass --quick to every drill: small counts")
    args = parser.parse_args(argv)

    when = datetime.datetime.now(datetime.UTC)
    workdir = args.workdir or PROJECT_ROOT / "soak-results" / when.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True, exist_ok=True)
    modules = discover(args.package)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        modules = [m for m in modules if m.rpartition(".")[2].removeprefix(DRILL_PREFIX) in wanted]
    results = []
    for module in modules:
        name = module.rpartition(".")[2].removeprefix(DRILL_PREFIX)
        print(f"[soak] {name} ...", file=sys.stderr, flush=True)
        drill_args = ["--workdir", str(workdir / name), *(["--quick"] if args.quick else [])]
        result = run_drill(module, drill_args, args.timeout, workdir / f"{name}.log")
        (workdir / f"{name}.json").write_text(json.dumps(result.summary, indent=1))
        print(
            f"[soak] {name}: {'pass' if result.passed else 'FAIL'} in {result.seconds:.0f} s", file=sys.stderr
        )
        results.append(result)
    args.out.write_text(render(results, _commit(), when), encoding="utf-8")
    print(f"[soak] wrote {args.out} (details in {workdir})", file=sys.stderr)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
