"""The decoder pool: real child processes decoding real photos and crafted hostile files.

Each test starts its own small pool (one or two decoders, so the 2-core machine is not swamped) and
checks what the worker sees: results in input order equal to the in-thread `preprocess`, each bad
image failing with its own code, and nothing left behind (processes, shared memory) after close.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.config import PROJECT_ROOT
from shared.errors import ImageError
from shared.manifest import InputSpec
from shared.preprocess import preprocess
from worker.decoders import DECODER_NICENESS, DecoderPool

SPEC = InputSpec(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
MAX_PIXELS = 40_000_000
PHOTOS = ("coffee.png", "rocket.jpg", "chelsea.png")


@pytest.fixture
def photos(photo_bytes: dict[str, bytes]) -> list[bytes]:
    return [photo_bytes[name] for name in PHOTOS]


@pytest.fixture
def pool() -> Iterator[DecoderPool]:
    with DecoderPool(SPEC, MAX_PIXELS, decoders=2, timeout_ms=30_000, memory_mb=512) as pool:
        yield pool


def big_png(side: int = 6000) -> bytes:
    """A 36 Mpx PNG of 0.5 MB: decoding it needs 108 MB of RGB."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def memfds(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [link for link in links if "inferq-decoder" in link]


def assert_same_as_in_thread(results: list[object], images: list[bytes]) -> None:
    for result, data in zip(results, images, strict=True):
        assert isinstance(result, np.ndarray), result
        np.testing.assert_array_equal(result, preprocess(data, SPEC, MAX_PIXELS))


def test_results_come_back_in_order_and_equal_the_in_thread_decode(
    pool: DecoderPool, photos: list[bytes]
) -> None:
    images: list[bytes | None] = [
        photos[0],
        None,
        b"%PDF-1.4 not an image",
        photos[1],
        photos[2] * 1,
        photos[0],
    ]
    results = pool.decode_many(images)
    assert len(results) == len(images)
    assert_same_as_in_thread(
        [results[0], results[3], results[4], results[5]], [photos[0], photos[1], photos[2], photos[0]]
    )
    missing, pdf = results[1], results[2]
    assert isinstance(missing, ImageError) and missing.code == "image_missing"
    assert isinstance(pdf, ImageError) and pdf.code == "unsupported_image_format" and "PDF" in pdf.message
    assert results[0].dtype == np.float32 and results[0].shape == (3, 224, 224)


def test_in_thread_mode_gives_the_same_results(photos: list[bytes]) -> None:
    with DecoderPool(SPEC, MAX_PIXELS, decoders=0) as pool:
        assert pool.pids() == []
        results = pool.decode_many([*photos, None])
    assert_same_as_in_thread(results[:3], photos)
    assert getattr(results[3], "code", None) == "image_missing"


def test_work_is_spread_over_every_decoder(pool: DecoderPool, photos: list[bytes]) -> None:
    def cpu_ticks(pid: int) -> int:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = {pid: cpu_ticks(pid) for pid in pool.pids()}
    images = [photos[1]] * 40
    assert_same_as_in_thread(pool.decode_many(images), images)
    assert all(cpu_ticks(pid) > before[pid] for pid in pool.pids()), "a decoder did no work"


def test_decoders_run_below_the_worker_in_the_scheduler(pool: DecoderPool) -> None:
    # A decode must not preempt the worker's forward pass, writer or the api on a busy machine.
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids()] == [ours + DECODER_NICENESS] * 2
    assert DECODER_NICENESS > 0


def test_decoders_do_not_load_torch(pool: DecoderPool) -> None:
    for pid in pool.pids():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps


def test_an_image_over_the_memory_limit_fails_alone_and_its_decoder_is_replaced(photos: list[bytes]) -> None:
    with DecoderPool(SPEC, MAX_PIXELS, decoders=1, timeout_ms=30_000, memory_mb=64) as pool:
        first = pool.pids()
        results = pool.decode_many([photos[0], big_png(), photos[1]])
        assert getattr(results[1], "code", None) == "decode_out_of_memory", results[1]
        assert_same_as_in_thread([results[0], results[2]], [photos[0], photos[1]])
        assert pool.replaced == 1 and pool.pids() != first and not alive(first[0])


def test_a_decode_past_the_time_limit_fails_alone_and_the_rest_carry_on(photos: list[bytes]) -> None:
    with DecoderPool(SPEC, MAX_PIXELS, decoders=2, timeout_ms=1_000, memory_mb=512) as pool:
        stuck = pool.pids()[0]
        os.kill(stuck, signal.SIGSTOP)  # it takes the first image and never answers
        started = time.monotonic()
        results = pool.decode_many([photos[0], photos[1], photos[2], photos[1]])
        elapsed = time.monotonic() - started
        assert getattr(results[0], "code", None) == "decode_timeout", results[0]
        assert_same_as_in_thread(results[1:], [photos[1], photos[2], photos[1]])
        assert 1.0 <= elapsed < 20, elapsed
        assert not alive(stuck) and stuck not in pool.pids() and pool.replaced == 1
        assert_same_as_in_thread(pool.decode_many(photos), photos)  # the replacement works


def test_a_decoder_that_dies_fails_only_its_image(photos: list[bytes]) -> None:
    with DecoderPool(SPEC, MAX_PIXELS, decoders=1, timeout_ms=60_000, memory_mb=512) as pool:
        victim = pool.pids()[0]
        os.kill(victim, signal.SIGSTOP)
        results: list[object] = []
        thread = threading.Thread(target=lambda: results.extend(pool.decode_many([photos[0], photos[1]])))
        thread.start()
        deadline = time.monotonic() + 30
        while victim not in pool.busy_pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        thread.join(30)
        assert not thread.is_alive()
        assert getattr(results[0], "code", None) == "decoder_crashed", results[0]
        assert "SIGKILL" in results[0].message
        assert_same_as_in_thread(results[1:], [photos[1]])


def test_close_leaves_no_process_and_no_shared_memory(photos: list[bytes]) -> None:
    pool = DecoderPool(SPEC, MAX_PIXELS, decoders=2, timeout_ms=30_000, memory_mb=512)
    pids = pool.pids()
    pool.decode_many(photos)
    assert memfds(os.getpid()) and all(memfds(pid) for pid in pids)
    pool.close()
    assert not any(alive(pid) for pid in pids)
    assert memfds(os.getpid()) == []
    with pytest.raises(RuntimeError):
        pool.decode_many(photos)


def test_decoders_die_with_a_killed_worker() -> None:
    script = (
        "from tests.test_decoders import SPEC, MAX_PIXELS\n"
        "from worker.decoders import DecoderPool\n"
        "import sys, time\n"
        "pool = DecoderPool(SPEC, MAX_PIXELS, decoders=2)\n"
        "print(*pool.pids(), flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert worker.stdout is not None
        pids = [int(pid) for pid in worker.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "decoders outlived their worker"
        time.sleep(0.05)


def test_a_pool_spawned_without_waiting_decodes_once_its_decoders_have_started(photos: list[bytes]) -> None:
    # The worker spawns its decoders before loading its model and goes on at once.
    with DecoderPool(SPEC, MAX_PIXELS, decoders=2, timeout_ms=30_000, memory_mb=512, wait=False) as pool:
        assert len(pool.pids()) == 2 and all(alive(pid) for pid in pool.pids())
        assert_same_as_in_thread(pool.decode_many(photos), photos)
        pool.wait_ready()  # already started: returns at once
        assert pool.replaced == 0
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pool.pids()] == [
            os.getpriority(os.PRIO_PROCESS, 0) + DECODER_NICENESS
        ] * 2


def test_a_decoder_that_dies_while_starting_fails_the_wait_and_leaves_nothing_behind() -> None:
    pool = DecoderPool(SPEC, MAX_PIXELS, decoders=2, timeout_ms=30_000, memory_mb=512, wait=False)
    pids = pool.pids()
    os.kill(pids[0], signal.SIGKILL)  # long before it has imported numpy and PIL
    with pytest.raises(RuntimeError, match="failed to start"):
        pool.wait_ready()
    assert not any(alive(pid) for pid in pids)
    assert memfds(os.getpid()) == []
    with pytest.raises(RuntimeError):
        pool.decode_many([b"x"])
