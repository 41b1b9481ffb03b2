"""`python -m bench.merge_phases RESULTS OTHER PHASE[,PHASE] --out BENCHMARKS.md`: take phases from
another run's results.json into RESULTS (e.g. a phase that failed in the full run, re-run alone with
`python -m bench --only PHASE`), record where each came from, and render the report again. The
report names the merged phases, since ratios against them cross two runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report import write_outputs


def merge(results: dict[str, Any], other: dict[str, Any], phases: list[str]) -> dict[str, Any]:
    meta = other.get("meta", {})
    for phase in phases:
        if phase not in other:
            raise SystemExit(f"{phase}: not in the other run's results")
        results[phase] = other[phase]
        results.setdefault("errors", {}).pop(phase, None)
        if phase in other.get("phases", {}):
            results.setdefault("phases", {})[phase] = other["phases"][phase]
        results["meta"].setdefault("merged", {})[phase] = {
            "commit": meta.get("commit", "?"),
            "date": meta.get("date", "?"),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_phases", description=__doc__)
    parser.add_argument("results", type=Path, help="the full run's results.json (rewritten)")
    parser.add_argument("other", type=Path, help="the results.json holding the phases to take")
    parser.add_argument("phases", help="comma-separated phase names")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = merge(
        json.loads(args.results.read_text()), json.loads(args.other.read_text()), args.phases.split(",")
    )
    args.results.write_text(json.dumps(results, indent=1))
    write_outputs(results, args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
