"""`python -m bench.soak` (what `make soak` runs): every drill in a process of its own, SOAK.md from
their summaries, a failing or silent drill reported as such."""

from __future__ import annotations

import os
from pathlib import Path

from shared.config import PROJECT_ROOT
from tests.service import run_module

_PASSING = """
import argparse, json, sys
from pathlib import Path

def main(argv):
    args = argparse.ArgumentParser()
    args.add_argument("--workdir", type=Path)
    workdir = args.parse_args(argv).workdir
    workdir.mkdir(parents=True)
    print("progress on stdout is fine")
    failed = {"worker_crashed": 2, "job_timeout": 1}
    print(json.dumps({"jobs_submitted": 500, "finished": 497, "failed_by_code": failed, "lost": 0,
                      "recovery_s": {"max": 8.25, "median": 4.5},
                      "peak_rss_mb": {"api": 81.0, "worker": 412.5, "redis": 12.25}}))
    return 0
"""
_CRASHING = """
def main(argv):
    raise SystemExit("boom: no summary")
"""


def test_soak_runs_each_drill_and_writes_soak_md(tmp_path: Path) -> None:
    package = tmp_path / "drills"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "soak_good.py").write_text(_PASSING)
    (package / "soak_broken.py").write_text(_CRASHING)
    (package / "not_a_drill.py").write_text("raise RuntimeError('must not be imported')\n")
    out = tmp_path / "SOAK.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(tmp_path)])}
    done = run_module(
        "bench.soak",
        "--package",
        "drills",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "w"),
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # one drill failed
    text = out.read_text()
    good = next(line for line in text.splitlines() if line.startswith("| good |"))
    assert "| pass | 500 | 497 | job_timeout: 1, worker_crashed: 2 | 0 |" in good
    assert "max 8.2 s, median 4.5 s" in good
    assert "api 81.0, worker 412.5, redis 12.2 MiB" in good
    broken = next(line for line in text.splitlines() if line.startswith("| broken |"))
    assert "**FAIL** (printed no JSON summary" in broken
    assert (tmp_path / "w" / "good").is_dir()  # the drill got its --workdir
    assert "boom: no summary" in (tmp_path / "w" / "broken.log").read_text()
    assert "not_a_drill" not in text
