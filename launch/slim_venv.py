"""The torch-free worker's environment: a venv built from `requirements-worker.txt` alone.

Cached like the Makefile's environment: under INFERQ_CACHE (default ~/.cache/inferq), keyed by the
file's hash and the Python version, so it is built once per set of pins, from the same package
index. tests/test_slim_worker.py runs a real job through it; `python -m bench --only slim` compares
it with the torch venv. It imports neither torch nor the bench: the tests take it from here too."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from shared.config import PROJECT_ROOT, Settings

REQUIREMENTS = PROJECT_ROOT / "requirements-worker.txt"


def cache_root() -> Path:
    """Where `make` keeps its environments: INFERQ_CACHE, else ~/.cache/inferq.

    Read it before a process points INFERQ_CACHE elsewhere for its workers' warm-up measurements
    (the bench and the test session do): the venv belongs to the machine, not to one run."""
    # A fresh Settings, not the cached get_settings(): the environment as it is now.
    return Settings().cache_dir


def slim_venv_path(cache: Path, requirements: Path = REQUIREMENTS, prefix: str = "venv-worker") -> Path:
    """The venv's folder for the current requirements-worker.txt (or another pinned file: the bench's
    LitServe peer has its own) and this Python."""
    key = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()[:16]
    return cache / f"{prefix}-{key}"


def slim_venv(cache: Path, requirements: Path = REQUIREMENTS, prefix: str = "venv-worker") -> Path:
    """The cached venv for the current requirements-worker.txt (or `requirements`, its folder named
    `prefix`-<hash>); built (once) if missing."""
    venv = slim_venv_path(cache, requirements, prefix)
    if (venv / ".complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    # The venv module of the running interpreter: the same Python, without its packages.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True, timeout=1800)
    (venv / ".complete").touch()  # only after a complete install: an interrupted one is redone
    return venv


if __name__ == "__main__":
    # `python -m launch.slim_venv`: build (or find) it and print its folder.
    print(slim_venv(cache_root()))
