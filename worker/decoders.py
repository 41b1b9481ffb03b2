"""Decoder processes: decode + preprocess untrusted uploads in a sandbox, several at a time.

`DecoderPool.decode_many(images)` runs `shared.preprocess.preprocess` for each image in one of
`DECODERS` child processes and returns, in input order, each image's model input or its own error.
Why processes and not threads: PIL's parsers are partly pure Python (the GIL serialises them), and a
hostile file must not be able to take the worker down or stall it. So each decoder

* is a plain `python -m worker.decoders` child (no multiprocessing start method: those re-import the
  parent's `__main__`, which in a worker imports torch; a decoder imports PIL and numpy only);
* has an address-space limit (`RLIMIT_AS`, `DECODER_MEMORY_MB` above what it uses once started): an
  allocation past it fails inside the decoder as a MemoryError, the item fails `decode_out_of_memory`;
* runs at a lower scheduling priority than the worker (`DECODER_NICENESS`);
* gets `DECODE_TIMEOUT_MS` of wall-clock time per image, after which it is killed and the item fails
  `decode_timeout`; a decoder that dies any other way fails its item `decoder_crashed`. Either way a
  fresh decoder takes its place while the other items carry on;
* reads the image from, and writes the decoded array into, its own shared memory (two anonymous
  `memfd`s: the upload, and an output slot sized from the input spec since the output shape is
  fixed). Only a few bytes travel through the pipes, so a write to a stuck decoder never blocks the
  pool, and the parent copies the array once, out of the slot. A memfd has no name: it cannot leak,
  whatever dies, once the processes holding it have closed it.

Starting a decoder (an interpreter importing PIL and numpy) takes a while, so the pool can be spawned
without waiting (`DecoderPool(..., wait=False)`) and waited for later (`wait_ready`, or the first
`decode_many`): the worker spawns its decoders before it loads its model, and they start meanwhile.

`DECODERS=0` decodes in the calling thread with the same error mapping (no limits: for debugging and
for machines where processes are not wanted).

Why one module over 400 lines: the pool and the decoder child are the two ends of one private pipe
and shared-memory protocol (its framing, slot layout and error payloads); kept together, a change to
one end cannot miss the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

import numpy as np

from shared.config import PROJECT_ROOT, Settings, get_settings
from shared.errors import CorruptImage, ImageError, InferqError
from shared.manifest import InputSpec

# Response status bytes (child -> parent).
_OK, _ERROR, _OUT_OF_MEMORY, _READY = 0, 1, 2, 3
_REQUEST = struct.Struct(">Q")  # length of the image written at the start of the input memfd
_RESPONSE = struct.Struct(">BI")  # status, length of the JSON payload that follows
_STARTUP_TIMEOUT_S = 120.0  # imports on a loaded 2-core machine can take seconds
# How much lower than the worker a decoder runs (nice(2) increment; any user may lower its own).
DECODER_NICENESS = 5


class DecodeTimeout(InferqError):
    code = "decode_timeout"
    http_status = 422


class DecodeOutOfMemory(InferqError):
    code = "decode_out_of_memory"
    http_status = 422


class DecoderCrashed(InferqError):
    code = "decoder_crashed"


def default_decoders() -> int:
    """One decoder per core this process may run on."""
    return len(os.sched_getaffinity(0))


def missing_image_error() -> CorruptImage:
    """The error of a job whose image bytes were gone before it started (as the handler says it)."""
    return CorruptImage(
        "The image bytes are gone (expired or deleted) before the job started.", code="image_missing"
    )


def decode_one(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray | InferqError:
    """`preprocess` with every failure turned into the item's own error (used in and out of process)."""
    # Imported here: a worker whose decoders run in processes never needs PIL itself.
    from shared.preprocess import preprocess

    try:
        return preprocess(data, spec, max_pixels)
    except InferqError as exc:
        return exc
    except MemoryError:
        return _out_of_memory()
    except Exception as exc:
        # Whatever a decoder raises (a codec bug) fails this image only.
        return InferqError(
            f"The image could not be preprocessed: {type(exc).__name__}.", code="preprocess_failed"
        )


def _out_of_memory() -> DecodeOutOfMemory:
    return DecodeOutOfMemory(
        "Decoding the image needed more memory than a decoder may use (DECODER_MEMORY_MB)."
    )


@dataclass
class _Decoder:
    """One child process and its shared-memory slot."""

    process: subprocess.Popen[bytes]
    fd: int  # the output slot's memfd, kept open across replacements of the process
    input_fd: int  # the upload's memfd, likewise
    view: np.ndarray  # the slot as the model input's shape, over the parent's mapping
    mapping: mmap.mmap
    ready: bool = False
    item: int | None = None  # index of the image being decoded
    started: float = 0.0  # monotonic time the image was sent
    buffer: bytearray = field(default_factory=bytearray)  # partial response


class DecoderPool:
    """Decode + preprocess in `decoders` sandboxed processes; see the module docstring."""

    def __init__(
        self,
        input_spec: InputSpec,
        max_pixels: int,
        settings: Settings | None = None,
        *,
        decoders: int | None = None,
        timeout_ms: float | None = None,
        memory_mb: int | None = None,
        wait: bool = True,
    ) -> None:
        """Spawn the decoders and, unless `wait=False`, wait until each has started. With
        `wait=False` the processes start while the caller goes on (the worker loads its model
        meanwhile) and `wait_ready`, or the first `decode_many`, waits for them. Call it on the
        thread that will outlive the pool: a decoder dies with the thread that spawned it
        (PR_SET_PDEATHSIG follows the parent thread on Linux)."""
        settings = settings or get_settings()
        self.input_spec = input_spec
        self.max_pixels = max_pixels
        count = decoders if decoders is not None else settings.decoders
        self.size = default_decoders() if count is None else count
        self.timeout_s = (timeout_ms if timeout_ms is not None else settings.decode_timeout_ms) / 1000
        self.memory_mb = memory_mb if memory_mb is not None else settings.decoder_memory_mb
        self.shape = (3, input_spec.crop, input_spec.crop)
        self._slot_bytes = int(np.prod(self.shape)) * 4
        self._decoders: list[_Decoder] = []
        self._closed = False
        self._lock = threading.Lock()  # one decode_many at a time: the decoders are shared state
        self.replaced = 0  # decoders replaced after a timeout, out-of-memory or crash
        self._started = False  # every first decoder has said it is ready
        self._start_deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        try:
            for _ in range(self.size):
                fds = (os.memfd_create("inferq-decoder-out", os.MFD_CLOEXEC),)
                fds += (os.memfd_create("inferq-decoder-in", os.MFD_CLOEXEC),)
                self._decoders.append(self._spawn(*fds))
            if wait:
                self.wait_ready()
        except BaseException:
            self.close()
            raise

    # --- public -----------------------------------------------------------------------------------

    def wait_ready(self) -> None:
        """Block until every decoder spawned by the constructor has started (at once if they have).
        Raises RuntimeError, and closes the pool, when one dies first or is still starting when
        the start-up time is up: the pool is not usable then."""
        with self._lock:
            self._wait_ready()

    def _wait_ready(self) -> None:
        if self._closed:
            raise RuntimeError("the decoder pool is closed")
        if self._started:
            return
        try:
            for decoder in self._decoders:
                self._await_ready(decoder, self._start_deadline)
        except BaseException:
            self._close()
            raise
        self._started = True

    def decode_many(self, images: Sequence[bytes | None]) -> list[np.ndarray | InferqError]:
        """Each image's model input (float32 CHW) or its own error, in input order."""
        with self._lock:
            return self._decode_many(images)

    def _decode_many(self, images: Sequence[bytes | None]) -> list[np.ndarray | InferqError]:
        self._wait_ready()  # raises on a closed pool
        results: list[np.ndarray | InferqError | None] = [None] * len(images)
        pending: deque[int] = deque()
        for i, data in enumerate(images):
            if data is None:
                results[i] = missing_image_error()
            elif self.size == 0:
                results[i] = decode_one(data, self.input_spec, self.max_pixels)
            else:
                pending.append(i)
        if pending:
            self._run(images, pending, results)
        return [r if r is not None else DecoderCrashed("no result") for r in results]

    def pids(self) -> list[int]:
        """The decoder processes' ids (for tests and the soak battery's memory readings)."""
        return [d.process.pid for d in self._decoders]

    def busy_pids(self) -> list[int]:
        """Ids of the decoders with an image in flight (read from another thread: a snapshot)."""
        return [d.process.pid for d in list(self._decoders) if d.item is not None]

    def close(self) -> None:
        """Stop every decoder (EOF on its stdin, then SIGKILL if it lingers) and free the slots."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for decoder in self._decoders:
            _close_pipe(decoder.process.stdin)
        deadline = time.monotonic() + 2.0
        for decoder in self._decoders:
            try:
                decoder.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                decoder.process.kill()
                decoder.process.wait()
            _close_pipe(decoder.process.stdout)
            del decoder.view
            decoder.mapping.close()
            os.close(decoder.fd)
            os.close(decoder.input_fd)
        self._decoders.clear()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- scheduling -------------------------------------------------------------------------------

    def _run(
        self,
        images: Sequence[bytes | None],
        pending: deque[int],
        results: list[np.ndarray | InferqError | None],
    ) -> None:
        retried: set[int] = set()
        while pending or any(d.item is not None for d in self._decoders):
            for index, decoder in enumerate(self._decoders):
                if pending and decoder.ready and decoder.item is None:
                    item = pending.popleft()
                    data = images[item]
                    assert data is not None
                    if not self._send(decoder, item, data):
                        # The decoder died while idle: not this image's fault, so one retry elsewhere.
                        self._replace(index)
                        if item in retried:
                            results[item] = DecoderCrashed("The image's decoder process died.")
                        else:
                            retried.add(item)
                            pending.appendleft(item)
            now = time.monotonic()
            busy = [d for d in self._decoders if d.item is not None]
            starting = [d for d in self._decoders if not d.ready]
            deadlines = [d.started + self.timeout_s for d in busy]
            wait = max(0.0, min(deadlines) - now) if deadlines else 1.0
            watched = {d.process.stdout.fileno(): d for d in busy + starting if d.process.stdout}
            readable, _, _ = select.select(list(watched), [], [], wait)
            for fd in readable:
                decoder = watched[fd]
                index = self._decoders.index(decoder)
                if not decoder.ready:
                    self._read_ready(index)
                else:
                    self._read_result(index, results)
            now = time.monotonic()
            for index, decoder in enumerate(self._decoders):
                if decoder.item is not None and now - decoder.started >= self.timeout_s:
                    results[decoder.item] = DecodeTimeout(
                        f"Decoding the image took longer than {self.timeout_s * 1000:.0f} ms "
                        "(DECODE_TIMEOUT_MS)."
                    )
                    self._replace(index)

    def _send(self, decoder: _Decoder, item: int, data: bytes) -> bool:
        assert decoder.process.stdin is not None
        started = time.monotonic()
        try:
            os.pwrite(decoder.input_fd, data, 0)
            decoder.process.stdin.write(_REQUEST.pack(len(data)))
            decoder.process.stdin.flush()
        except OSError:  # BrokenPipeError: the decoder is gone
            return False
        # Busy (`busy_pids`) only once the request is written: a decoder that dies before is
        # retried elsewhere, one that dies after fails its image.
        decoder.item, decoder.started = item, started
        return True

    def _read_result(self, index: int, results: list[np.ndarray | InferqError | None]) -> None:
        decoder = self._decoders[index]
        item = decoder.item
        assert item is not None
        response = self._read_response(decoder)
        if response is None:
            return  # partial: the rest follows
        if response is False:
            _reap(decoder.process)  # EOF comes before the exit status: wait for it, for the message
            results[item] = DecoderCrashed(
                f"The image's decoder process died ({_exit_reason(decoder.process)}) while decoding it."
            )
            self._replace(index)
            return
        status, payload = response
        decoder.item = None
        if status == _OK:
            results[item] = decoder.view.copy()
        elif status == _OUT_OF_MEMORY:
            results[item] = _out_of_memory()
            self._replace(index)  # its heap may be fragmented and near the limit: start afresh
        else:
            results[item] = _error_from(payload)

    def _read_response(self, decoder: _Decoder) -> tuple[int, dict[str, Any]] | bool | None:
        """(status, payload) once complete; None while partial; False when the decoder died."""
        assert decoder.process.stdout is not None
        chunk = os.read(decoder.process.stdout.fileno(), 65536)
        if not chunk:
            return False
        decoder.buffer += chunk
        if len(decoder.buffer) < _RESPONSE.size:
            return None
        status, length = _RESPONSE.unpack_from(decoder.buffer)
        if len(decoder.buffer) < _RESPONSE.size + length:
            return None
        payload = bytes(decoder.buffer[_RESPONSE.size : _RESPONSE.size + length])
        del decoder.buffer[: _RESPONSE.size + length]
        return status, (json.loads(payload) if payload else {})

    # --- process management ----------------------------------------------------------------------

    def _spawn(self, fd: int, input_fd: int) -> _Decoder:
        os.ftruncate(fd, self._slot_bytes)
        mapping = mmap.mmap(fd, self._slot_bytes)
        config = {
            "spec": self.input_spec.model_dump(mode="json"),
            "max_pixels": self.max_pixels,
            "memory_mb": self.memory_mb,
            "fd": fd,
            "input_fd": input_fd,
            "parent": os.getpid(),
        }
        # No preloaded allocator (the worker may run with tcmalloc): RLIMIT_AS counts reserved
        # address space, and tcmalloc reserves and keeps far more than it uses, glibc does not.
        env = {
            **{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p),
            # One decode per process: no thread pools in numpy's BLAS (each would reserve memory).
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.decoders", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(fd, input_fd),
            env=env,
            # Its own session: a Ctrl-C to the worker's process group must not kill the decoders
            # under a batch the worker is finishing (they exit with the worker: EOF / PDEATHSIG).
            start_new_session=True,
        )
        view = np.ndarray(self.shape, dtype=np.float32, buffer=mapping)
        return _Decoder(process=process, fd=fd, input_fd=input_fd, view=view, mapping=mapping)

    def _await_ready(self, decoder: _Decoder, deadline: float) -> None:
        assert decoder.process.stdout is not None
        while not decoder.ready:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([decoder.process.stdout.fileno()], [], [], max(0.0, left))
            if not readable:
                raise RuntimeError("a decoder process did not start in time")
            response = self._read_response(decoder)
            if response is False:
                raise RuntimeError(f"a decoder process failed to start ({_exit_reason(decoder.process)})")
            decoder.ready = response is not None and response[0] == _READY

    def _read_ready(self, index: int) -> None:
        """A replacement decoder's ready message (or its death before it: start another)."""
        decoder = self._decoders[index]
        response = self._read_response(decoder)
        if response is False:
            time.sleep(0.1)  # e.g. no memory to start: do not spin
            self._replace(index)
        elif response is not None:
            decoder.ready = response[0] == _READY

    def _replace(self, index: int) -> None:
        old = self._decoders[index]
        old.process.kill()
        old.process.wait()
        _close_pipe(old.process.stdin)
        _close_pipe(old.process.stdout)
        del old.view
        old.mapping.close()
        self.replaced += 1
        self._decoders[index] = self._spawn(old.fd, old.input_fd)


def _close_pipe(pipe: IO[bytes] | None) -> None:
    if pipe is not None:
        with contextlib.suppress(OSError):
            pipe.close()


def _reap(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(1.0)
    except subprocess.TimeoutExpired:  # closed its stdout but lives on: not usable either
        process.kill()
        process.wait()


def _exit_reason(process: subprocess.Popen[bytes]) -> str:
    code = process.poll()
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _error_from(payload: dict[str, Any]) -> InferqError:
    kind = ImageError if payload.get("image") else InferqError
    return kind(str(payload["message"]), code=str(payload["code"]), http_status=int(payload["http_status"]))


# --- the decoder process ----------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the worker dies, even in the middle of a decode."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # EOF on stdin still ends an idle decoder
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    """Address space = what the started decoder maps (interpreter, libraries, slot) + the budget."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    limit = mapped + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if data is not None and len(data) == size else None


def _respond(out: IO[bytes], status: int, payload: dict[str, Any] | None = None) -> None:
    body = json.dumps(payload).encode() if payload else b""
    out.write(_RESPONSE.pack(status, len(body)) + body)
    out.flush()


def _child_main(config: dict[str, Any]) -> None:
    # PIL and its plugins: loaded now, inside what the memory limit leaves out (it is set on top of
    # what the started decoder maps), and not by the first decode.
    import shared.preprocess  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(int(config["parent"]))
    # Below the worker in the scheduler: on a machine with few cores, a decode that preempts the
    # forward pass, the writer or the api delays jobs that are further along for the sake of one
    # that would wait for the model anyway; the pool decodes only a few jobs ahead of the model, so
    # it catches up whenever the cores are free.
    with contextlib.suppress(OSError):
        os.nice(DECODER_NICENESS)
    spec = InputSpec.model_validate(config["spec"])
    max_pixels = int(config["max_pixels"])
    shape = (3, spec.crop, spec.crop)
    mapping = mmap.mmap(int(config["fd"]), int(np.prod(shape)) * 4)
    slot = np.ndarray(shape, dtype=np.float32, buffer=mapping)
    _limit_memory(int(config["memory_mb"]))
    # The protocol gets a private copy of stdout; fd 1 becomes stderr, so a stray print or a C
    # library writing to stdout cannot corrupt the responses.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    input_fd = int(config["input_fd"])
    _respond(stdout, _READY)
    while True:
        header = _read_exact(stdin, _REQUEST.size)
        if header is None:
            return  # the pool closed (or the worker died)
        data = os.pread(input_fd, _REQUEST.unpack(header)[0], 0)
        result = decode_one(data, spec, max_pixels)
        del data
        if isinstance(result, np.ndarray):
            slot[...] = result
            _respond(stdout, _OK)
        elif isinstance(result, DecodeOutOfMemory):
            _respond(stdout, _OUT_OF_MEMORY)
            return
        else:
            payload = {
                "code": result.code,
                "message": result.message,
                "http_status": result.http_status,
                "image": isinstance(result, ImageError),
            }
            _respond(stdout, _ERROR, payload)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
