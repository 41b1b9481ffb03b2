"""`make venv`'s editable install (`python -m launch.editable_install`) runs pip only when this
clone's install from this pyproject.toml is not in place: once per clone and change, not at every
`make up`. Checked in a throwaway environment, never the one the tests run in."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

PACKAGES = ("api", "worker", "shared", "artifacts", "client", "launch")


def _clone(where: Path) -> Path:
    """The parts of the project an editable install reads."""
    where.mkdir()
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", where / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(
            PROJECT_ROOT / package,
            where / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.onnx", "*.pt"),
        )
    return where


def _venv(where: Path) -> Path:
    """A bare environment with this one's setuptools (the pinned build backend; installing needs no
    network, as in `make venv`)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    site = next((where / "lib").glob("python*/site-packages"))
    for old in [*site.glob("setuptools*"), site / "pkg_resources", site / "_distutils_hack"]:
        shutil.rmtree(old, ignore_errors=True)
    spec = importlib.util.find_spec("setuptools")
    assert spec is not None and spec.origin is not None
    ours = Path(spec.origin).parent.parent
    for name in [
        "setuptools",
        "_distutils_hack",
        "pkg_resources",
        *(p.name for p in ours.glob("setuptools-*.dist-info")),
    ]:
        if (ours / name).is_dir():
            shutil.copytree(ours / name, site / name)
    return where / "bin" / "python"


def _install(python: Path, clone: Path) -> None:
    done = subprocess.run(
        [str(python), "-m", "launch.editable_install"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _record(python: Path) -> tuple[str, int]:
    """The installed clone (from pip's direct_url.json) and when pip last wrote the install."""
    (dist_info,) = python.parent.parent.glob("lib/python*/site-packages/inferq-*.dist-info")
    return (dist_info / "direct_url.json").read_text(), (dist_info / "RECORD").stat().st_mtime_ns


def test_pip_runs_once_per_clone_and_pyproject(tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    clone = _clone(tmp_path / "clone")

    _install(python, clone)
    first = _record(python)
    assert clone.as_uri() in first[0]
    assert (python.parent / "inferq").exists(), "the CLI is on the environment"

    _install(python, clone)
    assert _record(python) == first, "nothing changed: pip did not run"

    with (clone / "pyproject.toml").open("a") as f:
        f.write("\n# an edit\n")
    _install(python, clone)
    assert _record(python)[1] != first[1], "pyproject.toml changed: installed again"

    other = _clone(tmp_path / "other")
    _install(python, other)
    assert other.as_uri() in _record(python)[0], "another clone's install replaced this one's"
    _install(python, clone)
    assert clone.as_uri() in _record(python)[0], "and this clone's install is back"
