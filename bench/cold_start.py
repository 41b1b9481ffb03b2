"""The cold start as `make up` runs it: `python -m launch.launcher` (its embedded Valkey, gunicorn,
the worker pool) from its start to a first prediction returned over HTTP.

`make up`'s own steps before the launcher (the environment and artifact checks) are not included:
they are timed by hand (see the report of issue 13); here every process starts as `make up` starts
it, the embedded server with an empty AOF of its own."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PY, base_env, free_port
from bench.service import first_prediction_s
from launch.processes import stop_process


def launcher_first_prediction_s(image: bytes, log: Path, **overrides: Any) -> float:
    """Seconds from starting the launcher (Redis not yet running) to the first result of `image`."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="inferq-cold-") as data_dir:
        env = base_env(None, "glibc", PORT=port, DATA_DIR=data_dir, **overrides)
        env.pop("REDIS_URL", None)  # the launcher's own embedded server, as `make up` runs it
        with log.open("ab") as out:
            started = time.monotonic()
            proc = subprocess.Popen(
                [PY, "-m", "launch.launcher"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            return first_prediction_s(f"http://127.0.0.1:{port}", image, started)
        finally:
            # The launcher stops the api, the pool and its server on SIGTERM, then exits 0.
            stop_process(proc, timeout=60, sig=signal.SIGTERM)
