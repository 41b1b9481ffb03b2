"""Shared fixtures: real sample photos, the default model artifact, throwaway Redis servers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import PROJECT_ROOT
from shared.manifest import MANIFEST_FILE

# Freely licensed photos that scikit-image ships inside its wheel (see skimage/data/README.txt),
# with the ImageNet labels an honest top-1 may take for each.
PHOTO_LABELS: dict[str, set[str]] = {
    "chelsea.png": {"tiger cat", "tabby", "Egyptian cat"},
    "coffee.png": {"espresso"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
    "camera.png": {"tripod"},
    "motorcycle_left.png": {"moped", "motor scooter"},
}

DEFAULT_ARTIFACT_DIR = PROJECT_ROOT / "artifacts" / "efficientnet_lite0"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.submodule_search_locations, "scikit-image is a test dependency"
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@pytest.fixture(scope="session")
def photo_bytes(sample_dir: Path) -> dict[str, bytes]:
    return {name: (sample_dir / name).read_bytes() for name in PHOTO_LABELS}


@pytest.fixture(scope="session")
def artifact_dir() -> Path:
    """The default artifact, built once if `make artifact` has not built it already."""
    if not (DEFAULT_ARTIFACT_DIR / MANIFEST_FILE).exists():
        subprocess.run(
            [sys.executable, "-m", "artifacts.build", "--out", str(DEFAULT_ARTIFACT_DIR)],
            check=True,
            cwd=PROJECT_ROOT,
        )
    return DEFAULT_ARTIFACT_DIR
