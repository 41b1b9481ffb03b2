"""`python -m bench.venv_size --requirements FILE`: what the running interpreter's environment holds
on disk, as one JSON document.

Run by each environment's own interpreter (the slim venv has none of the bench's dependencies, so
this module uses the standard library alone):
* `site_packages_mb`: its site-packages folder(s), counted as `du -s` counts them (allocated
  blocks, each hard-linked file once, symlinks not followed; a symlinked venv is resolved first);
* `pinned_mb`: the files the distributions named in FILE (and the files it includes with `-r`)
  installed, from their RECORD, anywhere in the venv: what the environment needs, without the
  tools that happen to sit beside it (pip, or the dev pins in the project's venv);
* `largest`: the five largest installed distributions.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def site_packages() -> list[Path]:
    """The environment's site-packages folder(s), symlinks resolved (purelib and platlib may be one)."""
    return sorted({Path(sysconfig.get_path(kind)).resolve() for kind in ("purelib", "platlib")})


class DiskUsage:
    """Bytes allocated on disk, each inode once (as `du` counts across its arguments)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()

    def add(self, path: Path) -> int:
        try:
            st = os.lstat(path)
        except OSError:
            return 0
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            return 0
        self.seen.add(key)
        return st.st_blocks * 512

    def tree(self, root: Path) -> int:
        total = self.add(root)
        for folder, dirs, files in os.walk(root):  # does not follow symlinked folders
            total += sum(self.add(Path(folder) / name) for name in (*dirs, *files))
        return total


def pinned_names(requirements: Path) -> list[str]:
    """Distribution names a requirements file pins, following its `-r` includes."""
    names: list[str] = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            names += pinned_names(requirements.parent / line.split(maxsplit=1)[1])
        elif not line.startswith("-"):
            names.append(re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0])
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_bytes(dist: md.Distribution, usage: DiskUsage) -> int:
    return sum(usage.add(Path(str(dist.locate_file(f)))) for f in dist.files or ())


def measure(requirements: Path) -> dict[str, Any]:
    folders = site_packages()
    usage = DiskUsage()
    site_bytes = sum(usage.tree(folder) for folder in folders)
    # Each distribution's files on their own count (a file two distributions list counts for both).
    sizes: dict[str, int] = {}
    for dist in md.distributions():
        name = normalize(dist.metadata["Name"] or "?")
        if name not in sizes:
            sizes[name] = distribution_bytes(dist, DiskUsage())
    pinned = {normalize(n) for n in pinned_names(requirements)}
    pinned_usage = DiskUsage()
    pinned_bytes = 0
    for dist in md.distributions():
        if normalize(dist.metadata["Name"] or "?") in pinned:
            pinned_bytes += distribution_bytes(dist, pinned_usage)
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
    return {
        "python": sys.version.split()[0],
        "prefix": str(Path(sys.prefix).resolve()),
        "site_packages": [str(f) for f in folders],
        "site_packages_mb": site_bytes / MIB,
        "requirements": requirements.name,
        "pinned": len(pinned),
        "pinned_missing": sorted(pinned - set(sizes)),
        "pinned_mb": pinned_bytes / MIB,
        "distributions": len(sizes),
        "largest": [[name, size / MIB] for name, size in largest],
        "torch": any(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision")),
    }


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.venv_size", description=__doc__.split("\n")[0])
    parser.add_argument("--requirements", type=Path, required=True, help="the file the venv was built from")
    args = parser.parse_args(list(argv) if argv is not None else None)
    print(json.dumps(measure(args.requirements)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
