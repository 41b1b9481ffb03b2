"""The bench's LitServe phase, its cheap parts: the one-request load target on a real HTTP server, the
targets' ratios and the report from given figures, and the peer venv's pins. The phase itself
(a LitServe venv from PyPI, real servers under load) runs in `make bench` (`python -m bench --only
litserve,service`), not here."""

from __future__ import annotations

import http.server
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from bench.common import summarize
from bench.loadgen import OneRequestTarget, run_closed_loop
from bench.peer import REQUIREMENTS, pinned_version
from bench.report import evaluate, render
from bench.targets import (
    CPU_VS_LITSERVE_TARGET,
    P99_VS_LITSERVE_TARGET,
    SAT_VS_LITSERVE_TARGET,
    peer_headline,
)
from launch.slim_venv import REQUIREMENTS as WORKER_REQUIREMENTS
from tests.test_bench_smoke import _rate_row, fake_results

# --- the one-request target, on a real HTTP server ---------------------------------------------------


class _Echo(http.server.BaseHTTPRequestHandler):
    """200 with the body's length for a JPEG-looking body, 415 otherwise; records what it got."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the target's connection expects
    seen: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers["Content-Type"], body))
        status, answer = (200, b'{"predictions": []}') if body.startswith(b"\xff\xd8") else (415, b"nope")
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[int]:
    _Echo.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_one_request_target_posts_the_raw_image_and_ends_with_the_200(echo_server: int):
    images = [b"\xff\xd8 photo one", b"\xff\xd8 photo two"]
    target = OneRequestTarget("127.0.0.1", echo_server, "/predict", images)
    assert target(0) == {"ok": True} and target(3) == {"ok": True}
    assert _Echo.seen == [
        ("/predict", "application/octet-stream", images[0]),
        ("/predict", "application/octet-stream", images[1]),
    ]
    refused = OneRequestTarget("127.0.0.1", echo_server, "/predict", [b"GIF89a"])(0)
    assert refused["ok"] is False and refused["error"].startswith("POST 415")
    # Driven by the bench's load generator like the inferq target: every request counted.
    result = run_closed_loop(target, clients=4, duration=0.5)
    assert result.ok > 0 and result.errors == 0


# --- targets and report from given figures -----------------------------------------------------------


def with_litserve(results: dict) -> dict:
    """`fake_results` plus CPU figures for inferq's saturation and a LitServe phase."""
    s = summarize
    results["service"]["saturation"]["deployed"]["cpu_cores"] = {
        "worker": s([1.0]),
        "api": s([0.4]),
        "redis": s([0.1]),
        "client": s([0.2]),  # the load generator: not the service's
        "machine": s([1.9]),
        "others": s([0.2]),
    }

    def sat(rate: float, worker: float) -> dict:
        return {
            "clients": 32,
            "images_per_s": s([rate]),
            "batch_size_mean": s([math.nan]),
            "latency_p50_ms": s([200.0]),
            "latency_p99_ms": s([260.0]),
            "cpu_cores": {
                "worker": s([worker]),
                "front": s([0.15]),
                "client": s([0.05]),
                "machine": s([1.5]),
                "others": s([0.0]),
            },
            "errors": 0,
        }

    results["litserve"] = {
        "version": "0.2.19",
        "backend": {"backend": "onnxruntime", "version": "1.32.0", "source": "from the warm-up cache"},
        "max_batch_size": 8,
        "batch_timeout_ms": 5.0,
        "threads": {
            "1": {"cold_start_s": s([1.4]), "saturation": sat(60.0, 1.2)},
            "2": {"cold_start_s": s([1.2, 1.3]), "saturation": sat(75.0, 1.2)},
        },
        "best_threads": 2,
        "saturation": sat(75.0, 1.2),
        "rates": [
            _rate_row(18.8, 30, 18.8, 0.25),
            _rate_row(37.5, 45, 37.5, 0.5),
            _rate_row(60.0, 120, 60.0, 0.8),
            _rate_row(50.0, 60, 50.0, 50 / 75),
        ],
        "cold_start_s": s([1.4, 1.2, 1.3]),
    }
    return results


def test_the_targets_compare_inferq_with_the_litserve_phase_of_the_same_run():
    results = with_litserve(fake_results())
    peer = peer_headline(results)
    # LitServe's whole tree (inference worker + front) at 75 img/s; the client is not the server's.
    assert peer.cpu_ms_per_image == pytest.approx((1.2 + 0.15) / 75 * 1000)  # 18 ms
    assert (peer.p99_at_25, peer.p99_at_50, peer.p99_at_80, peer.p99_at_50_rps) == (30, 45, 120, 60)
    assert (peer.threads, peer.backend, peer.cold_start_s) == (2, "onnxruntime 1.32.0", 1.3)
    rows = {r.target: r for r in evaluate(results)}
    # inferq: worker + api + Redis (1.5 cores) at 50 img/s = 30 ms per image, 1.67 × LitServe's.
    assert rows[CPU_VS_LITSERVE_TARGET].value == pytest.approx(30 / 18)
    assert rows[CPU_VS_LITSERVE_TARGET].passed is False
    assert rows[SAT_VS_LITSERVE_TARGET].value == pytest.approx(50 / 75)
    assert rows[SAT_VS_LITSERVE_TARGET].passed is False
    assert rows[P99_VS_LITSERVE_TARGET].value == pytest.approx(900 / 60)
    assert rows[P99_VS_LITSERVE_TARGET].passed is False
    # The same thresholds met: a third of the CPU, twice the throughput, half the tail.
    better = with_litserve(fake_results())
    better["litserve"]["saturation"] = {**better["litserve"]["saturation"], "images_per_s": summarize([25.0])}
    better["litserve"]["rates"][-1] = _rate_row(50.0, 1800, 25.0, 2.0)
    rows = {r.target: r for r in evaluate(better)}
    cpu, sat = rows[CPU_VS_LITSERVE_TARGET], rows[SAT_VS_LITSERVE_TARGET]
    tail = rows[P99_VS_LITSERVE_TARGET]
    assert cpu.value == pytest.approx(30 / 54) and cpu.passed
    assert sat.value == 2.0 and sat.passed
    assert tail.value == 0.5 and tail.passed


def test_without_a_litserve_phase_its_targets_are_not_measured():
    rows = {r.target: r for r in evaluate(fake_results())}
    for target in (CPU_VS_LITSERVE_TARGET, SAT_VS_LITSERVE_TARGET, P99_VS_LITSERVE_TARGET):
        assert rows[target].passed is None
    assert "## 3b. LitServe" not in render(fake_results())


def test_the_report_shows_litserve_beside_inferq():
    text = render(with_litserve(fake_results()))
    assert "## 3b. LitServe beside inferq (same run)" in text
    label = "LitServe 0.2.19 + onnxruntime 1.32.0, batch 8, 2 thread(s)"
    # Each thread setting, the best marked: cold start, saturation, p50, p99, CPU ms/img (tree,
    # worker, front), errors.
    assert "| 1 | 1.40 | 60.0 | 200 | 260 | 22.5 | 20.0 | 2.5 | 0 |" in text
    assert "| 2 (best) | 1.25 (1.20–1.30) | 75.0 | 200 | 260 | 18.0 | 16.0 | 2.0 | 0 |" in text
    # Side by side: inferq as deployed (cold start from section 3e), then LitServe.
    inferq = "as deployed: 1 worker(s) × TORCH_THREADS=1, glibc"
    assert f"| {inferq} | 50.0 | 30.0 | 20 / 40 / 400 ms | 900 ms | 6.00 |" in text
    assert f"| {label} | 75.0 | 18.0 | 30 / 45 / 120 ms | 60 ms | 1.30 (1.20–1.40) |" in text
    assert "| LitServe 2t | 50.0 (67 % sat.) |" in text  # its open-loop run at the fixed rate
    assert "front 0.15 (2.0 ms/img)" in text  # the CPU split by process group
    assert f"- {label} (the LitServe phase, same run): saturation **75.0 img/s**" in text
    assert "intra-op threads [1, 2]" in render({**with_litserve(fake_results()), "plan": _plan()})


def _plan() -> dict:
    return {
        "runs": 3,
        "rss_noop_jobs": 1,
        "rss_real_jobs": 1,
        "litserve_threads": [1, 2],
        "litserve_fractions": [0.25, 0.5, 0.8],
        "litserve_rates": [50.0],
    }


# --- the peer's venv ---------------------------------------------------------------------------------


def test_the_litserve_venv_pins_the_workers_runtime_at_the_projects_versions():
    """The peer runs the project's decode and backends: every distribution requirements-worker.txt
    pins is in the LitServe venv's file at the same version, beside litserve itself."""

    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            name, sep, version = line.split("#", 1)[0].strip().partition("==")
            if sep:
                out[name.lower().replace("_", "-")] = version
        return out

    worker, peer = pins(WORKER_REQUIREMENTS), pins(REQUIREMENTS)
    assert {name: peer.get(name) for name in worker} == worker
    assert pinned_version(REQUIREMENTS, "litserve") == peer["litserve"] != ""
    assert pinned_version(REQUIREMENTS, "typing_extensions") == worker["typing-extensions"]
    assert pinned_version(REQUIREMENTS, "torch") == ""  # no torch: the ONNX backends only
