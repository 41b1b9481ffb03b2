"""LitServe beside inferq: the synchronous peer of the bench's `litserve` phase, as processes.

The peer (`bench.litserve_peer`) runs from a venv of its own, built from
`requirements-bench-litserve.txt` alone by the slim worker venv's builder (`launch.slim_venv`) and
cached beside it under INFERQ_CACHE. It serves the project's artifact on the backend that inferq's
`BACKEND=auto` chooses on this machine (`chosen_backend`: the worker's own choice, run in the
project's venv with the service's defaults and this run's warm-up cache, so after the service phase
it is the backend the service served), with the project's decode, at batch 8.

`PeerServer` starts one such server and offers what the bench's load runs need from a service (the
`Stack` interface: `target`, `check_alive`, `cpu_meter`), plus its cold start: process started →
first 200 answer. `python -m bench.peer choose` prints the backend choice as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import PY, CpuMeter, base_env, process_tree, run_json, spawn, stop
from bench.loadgen import OneRequestTarget
from launch.processes import free_port
from shared.config import PROJECT_ROOT

REQUIREMENTS = PROJECT_ROOT / "requirements-bench-litserve.txt"
VENV_PREFIX = "venv-bench-litserve"
PATH = "/predict"
# LitServe's batching: max_batch_size 8 (inferq's cap on this machine), a few ms to fill a batch.
MAX_BATCH_SIZE = 8
BATCH_TIMEOUT_MS = 5.0
# The backends the peer's venv has (no torch there).
PEER_BACKENDS = ("onnxruntime", "openvino")
START_TIMEOUT_S = 180.0
PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PeerEnvironment:
    python: Path
    litserve: str  # the version pinned (and installed)


def pinned_version(requirements: Path, dist: str) -> str:
    """The version `requirements` pins `dist` at ("" when it does not)."""

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name.strip()).lower()  # PEP 503

    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].partition("==")
        if sep and normal(name) == normal(dist):
            return version.strip()
    return ""


def litserve_environment(cache: Path) -> PeerEnvironment:
    """The LitServe venv, built into `cache` (pip, from the package index) if missing."""
    from launch.slim_venv import slim_venv

    venv = slim_venv(cache, REQUIREMENTS, VENV_PREFIX)
    return PeerEnvironment(venv / "bin" / "python", pinned_version(REQUIREMENTS, "litserve"))


def chosen_backend(allocator: str, log: Path) -> dict[str, Any]:
    """The backend inferq's worker serves with the defaults (BACKEND=auto, its thread settings), as
    `worker.backend_choice.choose` decides it: in a child of the project's venv (where the service
    runs), with the service's allocator and this run's warm-up cache (INFERQ_CACHE, inherited)."""
    env = base_env(None, allocator, LOG_LEVEL="WARNING")
    return dict(run_json([PY, "-m", "bench.peer", "choose"], env, 600, log))


class PeerServer:
    """One LitServe server (`bench.litserve_peer`) on a free port, stopped with its whole tree."""

    def __init__(
        self, env: PeerEnvironment, logs: Path, backend: str, threads: int, images: list[bytes]
    ) -> None:
        if backend not in PEER_BACKENDS:
            has = ", ".join(PEER_BACKENDS)
            raise RuntimeError(f"inferq's BACKEND=auto chose {backend}; the LitServe venv has {has} only")
        self.env = env
        self.name = f"litserve-{backend}-{threads}t"
        self.log = logs / f"{self.name}.log"
        self.backend = backend
        self.threads = threads
        self.probe = images[0]
        self.port = free_port()
        self.pid_file = logs / f"{self.name}.worker-pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start_s = float("nan")

    def target(self, images: list[bytes]) -> OneRequestTarget:
        return OneRequestTarget("127.0.0.1", self.port, PATH, images)

    def __enter__(self) -> PeerServer:
        self.pid_file.unlink(missing_ok=True)
        args = [str(self.env.python), "-m", "bench.litserve_peer", "--port", str(self.port)]
        args += ["--backend", self.backend, "--threads", str(self.threads)]
        args += ["--max-batch-size", str(MAX_BATCH_SIZE), "--batch-timeout-ms", str(BATCH_TIMEOUT_MS)]
        env = base_env(None, "glibc", LOG_LEVEL="WARNING", LITSERVE_PEER_WORKER_PID_FILE=self.pid_file)
        started = time.monotonic()
        self.proc = spawn(args, env, self.log)
        try:
            self.cold_start_s = self._first_answer(started)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _first_answer(self, started: float) -> float:
        """Seconds from `started` until a first image is answered 200 (the server listens only once
        its inference worker has set up)."""
        target = OneRequestTarget("127.0.0.1", self.port, PATH, [self.probe], timeout=PROBE_TIMEOUT_S)
        deadline = started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                out = target(0)
            except OSError:
                time.sleep(0.02)  # not listening yet
                continue
            if out["ok"]:
                return time.monotonic() - started
            raise RuntimeError(f"{self.name}: the first image failed: {out['error']}; see {self.log}")
        raise TimeoutError(f"{self.name}: no answer after {START_TIMEOUT_S:.0f} s; see {self.log}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name}: the server exited ({code}); see {self.log}")

    def worker_pid(self) -> int | None:
        """The inference worker process (it wrote its pid when its model was set up)."""
        try:
            return int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None

    def cpu_meter(self, redis_pid: int | None) -> CpuMeter:
        """CPU of LitServe's inference worker (decode + forward), of the rest of its tree (the
        front: main process, uvicorn server, queue manager) and of this (client) process. No Redis:
        `redis_pid` is the bench's, which the peer does not use."""
        assert self.proc is not None
        tree = process_tree(self.proc.pid)
        worker = self.worker_pid()
        return CpuMeter(
            {
                "worker": [worker] if worker in tree else [],
                "front": [pid for pid in tree if pid != worker],
                "client": [os.getpid()],
            }
        )

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        # LitServe's children (a spawned worker, forked front and manager) outlive a main process
        # that dies: the peer turns SIGTERM into LitServe's own shutdown, and whatever of the tree
        # is still there after it is killed.
        tree = process_tree(self.proc.pid)
        stop(self.proc)
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


def _choose() -> dict[str, Any]:
    from shared.config import Settings
    from worker.backend_choice import choose

    settings = Settings()
    chosen = choose(settings)
    backend = chosen.runner.model.backend
    return {
        "backend": backend.name,
        "version": backend.version,
        "threads": backend.threads,
        "batch_cap": chosen.batch_cap,
        "source": chosen.source,
    }


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["choose"]:
        raise SystemExit("usage: python -m bench.peer choose")
    print(json.dumps(_choose()))
