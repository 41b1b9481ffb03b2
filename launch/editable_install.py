"""`python -m launch.editable_install`: what `make venv` runs after the environment exists: the
editable install of this clone (`pip install --no-deps --no-build-isolation -e .`, which puts the
`inferq` CLI on the environment), skipped when it is already in place.

pip takes seconds even when there is nothing to do, and every `make up` runs this step. The install
is in place when the environment's `inferq` distribution is an editable install of this very clone
(clones with the same pins share one environment: the last one installed wins) and `pyproject.toml`,
which decides what the install contains, is the one it was made from (a stamp in the environment).
Run from the clone's root, with the environment's interpreter; standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

DISTRIBUTION = "inferq"
STAMP = ".inferq-editable.json"  # in the environment's root, beside the Makefile's `.complete`


def wanted(clone: Path) -> dict[str, str]:
    """What the stamp says when the environment holds the editable install of `clone` as it is now."""
    pyproject = (clone / "pyproject.toml").read_bytes()
    return {"clone": clone.as_uri(), "pyproject_sha256": hashlib.sha256(pyproject).hexdigest()}


def installed_from() -> str | None:
    """The URL this environment's editable `inferq` was installed from (None: not an editable install)."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        direct = json.loads(text or "{}")
    except ValueError:
        return None
    if not isinstance(direct, dict) or not direct.get("dir_info", {}).get("editable"):
        return None
    url = direct.get("url")
    return url if isinstance(url, str) else None


def in_place(clone: Path, stamp: Path) -> bool:
    want = wanted(clone)
    try:
        stamped = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamped == want and installed_from() == want["clone"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.editable_install", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--force", action="store_true", help="install even when it is in place")
    args = parser.parse_args(argv)
    clone = Path.cwd().resolve()
    stamp = Path(sys.prefix) / STAMP
    if not args.force and in_place(clone, stamp):
        return 0
    stamp.unlink(missing_ok=True)  # an interrupted install leaves no stamp behind
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(clone)], check=False)
    if done.returncode != 0:
        return done.returncode
    stamp.write_text(json.dumps(wanted(clone)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
