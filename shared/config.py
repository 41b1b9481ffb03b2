"""Every setting of inferq, read from environment variables (12-factor).

This class is the one place settings are defined; the README's configuration table mirrors it.
That is why the module stays one file over 400 lines: every setting, its default, its bounds and
why they are what they are, in the one documented place.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    # Validation errors never echo the offending value: it may be an API key or a password.
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", hide_input_in_errors=True
    )

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis/Valkey URL (redis://, rediss://, with user:password). Unset: `make up` "
        "starts an embedded Valkey server and exports its URL to the processes it runs.",
    )
    embedded_redis_port: int = Field(default=0, description="Port of the embedded server; 0 = a free port.")
    embedded_redis_maxmemory: str | None = Field(
        default="2gb",
        description="`maxmemory` of the embedded server `make up` starts (Valkey's units): room for "
        "MAX_QUEUED_BYTES of waiting images (at most 3/4 of it) plus results and job hashes; a full "
        "server answers 503 `redis_full` instead of growing until the machine runs out of memory.",
    )
    data_dir: Path = Field(
        default=PROJECT_ROOT / ".inferq",
        description="Where the embedded server keeps its data and logs (gitignored).",
    )
    queue_name: str = Field(
        default="inferq", description="Name of the RQ queue the api fills and workers drain."
    )

    # --- Model ---------------------------------------------------------------------------------
    artifact_dir: Path = Field(
        default=PROJECT_ROOT / "artifacts" / "efficientnet_lite0",
        description="Folder holding `manifest.json` and the model file it names.",
    )
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where the forward pass runs.")
    backend: Literal["auto", "torchscript", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="The runtime that serves the model: `torchscript` (model.pt), `onnxruntime` or "
        "`openvino` (both read model.onnx). `auto`: every installed one is warmed up and timed at start "
        "(the measurement that picks the batch cap) and the fastest per image serves; on CUDA, "
        "TorchScript unless onnxruntime has its CUDA provider (onnxruntime-gpu).",
    )
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="Intra-op threads of torch per worker; 0 = torch's default (one per core). Keep it at 1 "
        "when the api, the decoder and other workers share the cores: OpenMP's spinning threads lose "
        "whenever another process needs a core (BENCHMARKS.md has the figures).",
    )
    onnxruntime_threads: int = Field(
        default=1,
        ge=0,
        description="Intra-op threads of ONNX Runtime per worker (idle threads do not spin); 0 = one "
        "per core.",
    )
    openvino_threads: int = Field(
        default=1,
        ge=0,
        description="Inference threads of OpenVINO per worker (not pinned to cores); 0 = one per core.",
    )
    preload_tcmalloc: bool = Field(
        default=False,
        description="`make up` preloads tcmalloc (Debian's libtcmalloc-minimal4) when it is installed. Off "
        "by default, so every machine runs what a fresh one gets (glibc's malloc): ONNX Runtime and "
        "OpenVINO allocate in their own arenas, and OpenVINO does not run under tcmalloc (compile_model "
        "deadlocks or crashes; the openvino backend then refuses to start and `auto` skips it). Worth "
        "turning on only with BACKEND=torchscript, which it speeds up (BENCHMARKS.md).",
    )

    # --- Batching ----------------------------------------------------------------------------
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most jobs in one forward pass, and the largest size AUTO_BATCH_CAP measures at "
        "warm-up (each size measured costs start-up time). Raise it on a GPU.",
    )

    auto_batch_cap: bool = Field(
        default=True,
        description="At warm-up, time the forward pass at batch sizes up to MAX_BATCH_SIZE and cap "
        "batches at the largest size whose time per image is within 10 % of the best: where the curve "
        "is flat a larger batch shares each batch's fixed work (queue scripts, thread hand-offs) among "
        "more jobs, past that it only makes its jobs wait (on a GPU the curve keeps falling and the "
        "cap is MAX_BATCH_SIZE; BENCHMARKS.md shows the curves measured here). false: always "
        "MAX_BATCH_SIZE.",
    )

    warm_up_cache: bool = Field(
        default=True,
        description="Reuse the backend (BACKEND=auto) and the batch cap (AUTO_BATCH_CAP) an earlier start "
        "measured under the same conditions: the artifact, the installed runtimes' versions, the CPU model "
        "and count, the device, the allocator, the thread and batch settings (one small JSON file per set "
        "of conditions, under INFERQ_CACHE/warm-up). Any change measures again; the worker logs where its "
        "choice came from. false: measure at this start and store the result for the next ones.",
    )
    inferq_cache: Path | None = Field(
        default=None,
        description="Folder of what is kept between runs: the warm-up measurements (WARM_UP_CACHE) and the "
        "environments `make` builds. Unset: `~/.cache/inferq`.",
    )

    max_batch_delay_ms: float = Field(
        default=10.0,
        ge=0,
        description="Longest a job waits for companions, counted from the oldest job's arrival.",
    )

    low_lane_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of the jobs each worker grabs that is owed to the low-priority lane while it "
        "has jobs waiting.",
    )

    # --- Input ----------------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1, description="Largest accepted body (413 above)."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Largest accepted width*height, checked from the header before decoding (bomb guard).",
    )
    default_top_k: int = Field(
        default=5, ge=1, le=20, description="Predictions returned when `top_k` is absent."
    )
    max_top_k: int = Field(default=20, ge=1, description="Largest `top_k` a client may ask for (422 above).")

    # --- Decoding (worker) ------------------------------------------------------------------------
    decoders: int | None = Field(
        default=None,
        ge=0,
        description="Decoder processes per worker: each image is decoded and preprocessed in one of them, "
        "in parallel, sandboxed (DECODE_TIMEOUT_MS, DECODER_MEMORY_MB). Unset: one per core the worker "
        "may run on. 0: decode in the worker's feeder thread, without limits.",
    )
    decode_timeout_ms: float = Field(
        default=10_000.0,
        gt=0,
        description="Wall-clock time one image may take to decode + preprocess in a decoder process; past "
        "it the decoder is killed and replaced and the job fails `decode_timeout`.",
    )
    decoder_memory_mb: int = Field(
        default=1024,
        ge=64,
        description="Address space each decoder process may add to what it maps once started (RLIMIT_AS): "
        "an image that needs more fails `decode_out_of_memory` and the decoder is replaced. A 40 Mpx "
        "RGBA image needs about 500 MB.",
    )

    # --- Lifetimes ------------------------------------------------------------------------------
    image_ttl: int = Field(
        default=3600, ge=1, description="Seconds the uploaded bytes live if never processed."
    )
    result_ttl: int = Field(default=3600, ge=1, description="Seconds a finished job and its result are kept.")
    failure_ttl: int = Field(default=24 * 3600, ge=1, description="Seconds a failed job is kept.")
    max_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Longest long-poll `?wait=` accepted; a submit's `Prefer: wait` is shortened to it.",
    )

    # --- Worker liveness ------------------------------------------------------------------------
    heartbeat_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a worker proves it is alive, also while a batch runs.",
    )
    abandoned_after_seconds: float = Field(
        default=6.0,
        gt=0,
        description="A started job whose worker has not heartbeaten for this long is requeued; the "
        "workers' registry cleanup runs every half of it, so a dead worker's jobs are back in the "
        "queue within 1.5x this (9 s by default) while another worker lives.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Worker deaths a job may be caught in, while it was being decoded or in a forward "
        "pass, before it fails `worker_crashed` (a job that was only waiting in a dying worker goes "
        "back to its queue free of charge).",
    )
    job_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Longest a job may spend being decoded plus in forward passes on one worker; past "
        "it the job ends `failed` with code `job_timeout` (heartbeats never keep it alive longer).",
    )

    # --- Serving --------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the api binds.")
    port: int = Field(default=8000, description="Port the api binds.")
    workers: int = Field(default=1, ge=1, description="Worker processes `make up` starts.")
    web_concurrency: int = Field(default=2, ge=1, description="gunicorn processes of the api.")
    log_level: str = Field(default="INFO", description="Python log level of api and worker.")

    # --- API (gunicorn + Flask) -------------------------------------------------------------------
    api_worker_connections: int = Field(
        default=10_000,
        ge=1,
        description="Connections one api process holds at once (gunicorn gevent `worker_connections`): an "
        "idle, slow or long-polling connection costs a file descriptor and a greenlet, not a thread. Keep "
        "the open-files limit (`ulimit -n`) above this plus Redis connections.",
    )
    api_header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a new connection has to send its complete request headers; slower ones get "
        "408 and are closed.",
    )
    api_keepalive: int = Field(
        default=5,
        gt=0,
        description="Seconds an idle keep-alive connection stays open between two requests.",
    )
    api_body_min_rate: int = Field(
        default=2048,
        ge=1,
        description="Bytes per second an upload's body must average (after API_BODY_GRACE_SECONDS); a body "
        "trickling slower gets 408 and its connection is closed.",
    )
    api_body_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Seconds of body upload allowed on top of what API_BODY_MIN_RATE gives the body's size.",
    )
    api_access_log: bool = Field(
        default=True,
        description="One access-log line per request from gunicorn (client, request line, status, bytes, "
        "duration); false turns it off (the request metrics and the app's own `job submitted` lines stay).",
    )
    api_graceful_timeout: int = Field(
        default=35,
        ge=1,
        description="Seconds gunicorn lets in-flight requests (long-polls included) finish after SIGTERM.",
    )
    api_max_requests: int = Field(
        default=0,
        ge=0,
        description="Restart an api process after this many requests (bounds slow leaks); 0 = never.",
    )
    max_batch_submit: int = Field(
        default=64, ge=1, description="Most images in one `POST /v1/batches` (422 `too_many_images` above)."
    )
    max_batch_upload_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Largest `POST /v1/batches` body (413 above); each image also obeys MAX_UPLOAD_BYTES.",
    )
    max_queue_depth: int = Field(
        default=10_000,
        ge=0,
        description="Jobs waiting in all priority lanes together above which submissions get 429 "
        "`queue_full` (with a `Retry-After` computed from the backlog and the measured completion rate); "
        "0 = unbounded.",
    )
    submit_rate_limit: str = Field(
        default="200/second;6000/minute",
        description="Submissions per API key (or client address without keys), as `limits` strings joined "
        "by `;`: the first is the burst, the next the sustained rate (an image of a batch counts as one "
        "submission). Counted in Redis, so it holds across api processes. Refusal: 429 `rate_limited`.",
    )
    queue_share_per_key: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of MAX_QUEUE_DEPTH one API key (or client address) may hold waiting, so one "
        "key cannot fill the queue for the others. Refusal: 429 `key_queue_share`.",
    )
    long_polls_per_key: int = Field(
        default=2000,
        ge=1,
        description="Concurrent long-polls (`?wait=`, and submits waiting with `Prefer: wait`) one API key "
        "(or client address) may hold, over all api processes (counted in Redis). Refusal: 429 "
        "`long_poll_limit` (a submit's wait is declined instead: its 202 at once).",
    )
    long_poll_recheck_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often each api process re-reads the status of every job it has long-polls on "
        "(one pipelined round trip), to wake waiters of jobs that ended without a completion message.",
    )
    api_redis_connections: int = Field(
        default=64,
        ge=2,
        description="Most Redis connections one api process opens (a request waits for a free one); "
        "long-polls hold none while they wait.",
    )
    operator_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated operator keys (same format as API_KEYS, kept apart from them): they "
        "open `/rq` (rq-dashboard) and `/metrics`; tenant keys do not. With API_KEYS set and no operator "
        "key, those routes are closed.",
    )
    max_queued_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=0,
        description="Bytes of uploaded images waiting in Redis (queued or being processed) above which "
        "submissions get 429 `queued_bytes_full` with a `Retry-After`; counted atomically with each submit "
        "and released when its job ends or its image expires. Keep it well under Redis' `maxmemory` "
        "(results, job hashes and Redis itself need the rest); 0 = unbounded (still counted).",
    )
    redis_headroom_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=0,
        description="The api refuses an upload with 503 `redis_full` when Redis' used memory plus the upload "
        "would come within this many bytes of its `maxmemory` (checked in the same script that counts "
        "MAX_QUEUED_BYTES): the room workers need to start and finish the jobs already queued. No "
        "effect when Redis has no `maxmemory`.",
    )
    redis_eviction_check: Literal["refuse", "warn"] = Field(
        default="refuse",
        description="What api and workers do at start when Redis' `maxmemory-policy` can evict inferq's "
        "keys (anything but `noeviction`; `volatile-*` evicts exactly the TTL'd images and jobs): `refuse` "
        "to start, or `warn` loudly and run.",
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="prometheus-client's multi-process directory (PROMETHEUS_MULTIPROC_DIR). Unset under "
        "gunicorn: the api creates a temporary one, so /metrics adds up all api processes.",
    )

    # --- Security, deadlines, result lifetime (api) -----------------------------------------------
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="Comma-separated API keys (16-256 visible ASCII characters each, no commas). When "
        "set (or API_KEYS_FILE), every /v1 route and /metrics need `Authorization: Bearer <key>`, each "
        "job is visible to the key that created it only, and the api may bind a non-loopback HOST. "
        "Keys are hashed (sha256) as the settings load: only the hashes are kept in memory (the "
        "variable itself stays in the process environment: prefer API_KEYS_FILE).",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys, one per line (blank lines and `#` comments ignored), added to "
        "API_KEYS. Read and hashed once at start; a missing or keyless file is a configuration error.",
    )
    expired_grace_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        description="After a job and its result have expired, GET answers 410 `job_expired` (instead of "
        "404) for this many more seconds.",
    )
    max_deadline_ms: int = Field(
        default=24 * 3600 * 1000,
        ge=1,
        description="Largest `deadline_ms` a submission may carry (422 `invalid_deadline` above).",
    )
    throughput_window_seconds: int = Field(
        default=60,
        ge=1,
        description="The completion rate, one number behind both a 429's `Retry-After` and the metric "
        "`inferq_completion_rate`: the jobs that ended in this many past seconds, divided by it.",
    )

    # --- Operating: logs and the dashboard ----------------------------------------------------------
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log lines of api and workers: `json` (one JSON object per line, with `job_id`, "
        "`batch_id`, `worker`, `model_sha256` where they apply; for log shippers) or `text` (human-readable, "
        "the same fields appended as `key=value`).",
    )
    dashboard_admin: bool = Field(
        default=False,
        description="Allow rq-dashboard's destructive actions at `/rq` (requeue, delete, empty, compact; "
        "POST from the dashboard's own page only). Off: the dashboard is read-only and those routes answer "
        "403 `dashboard_read_only`.",
    )

    @field_validator("api_keys", "operator_keys", mode="before")
    @classmethod
    def _hash_api_keys(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            items = value.split(",")
            if value.strip() and not any(item.strip() for item in items):
                raise ValueError("API_KEYS holds no key (only commas)")
        elif isinstance(value, list | tuple):
            items = [str(item) for item in value]
        else:
            raise ValueError("API_KEYS must be a comma-separated string")
        return tuple(hash_api_key(item.strip()) for item in items if item.strip())

    @model_validator(mode="after")
    def _read_api_keys_file(self) -> Settings:
        if self.api_keys_file is None:
            return self
        try:
            text = self.api_keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read API_KEYS_FILE {str(self.api_keys_file)!r}: {exc}") from None
        hashes = []
        for number, line in enumerate(text.splitlines(), start=1):
            # A `#` starts a comment at the start of a line or after whitespace (keys have neither).
            key = _COMMENT_RE.split(line.strip(), 1)[0].strip()
            if key and not key.startswith("#"):
                try:
                    hashes.append(hash_api_key(key))
                except ValueError as exc:  # never echo the line: it may be a key
                    raise ValueError(f"API_KEYS_FILE line {number}: {exc}") from None
        if not hashes:
            raise ValueError(f"API_KEYS_FILE {str(self.api_keys_file)!r} holds no key")
        # Assigned, not validated again (the hashes must not be hashed twice).
        self.api_keys = tuple(dict.fromkeys((*self.api_keys, *hashes)))
        return self

    def backend_threads(self, backend: str) -> int:
        """The thread setting of one backend (TORCH_THREADS, ONNXRUNTIME_THREADS, OPENVINO_THREADS)."""
        return {
            "torchscript": self.torch_threads,
            "onnxruntime": self.onnxruntime_threads,
            "openvino": self.openvino_threads,
        }[backend]

    @property
    def cache_dir(self) -> Path:
        """INFERQ_CACHE, else `~/.cache/inferq` (the Makefile's default too)."""
        return self.inferq_cache or Path.home() / ".cache" / "inferq"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def known_job_ttl(self) -> int:
        """Seconds a job id is remembered (the 410 tombstone, idempotency claims): its longest life
        (queued up to IMAGE_TTL, then kept RESULT_TTL or FAILURE_TTL) plus EXPIRED_GRACE_SECONDS."""
        return self.image_ttl + max(self.result_ttl, self.failure_ttl) + self.expired_grace_seconds


# --- API keys ---------------------------------------------------------------------------------------
API_KEY_MIN_LENGTH = 16
API_KEY_MAX_LENGTH = 256
_API_KEY_RE = re.compile(r"^[\x21-\x7e]+$")
_COMMENT_RE = re.compile(r"\s+#")


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which a key is kept (and a presented bearer token compared)."""
    if not API_KEY_MIN_LENGTH <= len(key) <= API_KEY_MAX_LENGTH or not _API_KEY_RE.match(key) or "," in key:
        # The message never contains the key.
        raise ValueError(
            f"an API key must be {API_KEY_MIN_LENGTH}-{API_KEY_MAX_LENGTH} visible ASCII characters without "
            f"commas or spaces (e.g. `openssl rand -hex 32`); one is not ({len(key)} characters)"
        )
    return hashlib.sha256(key.encode("ascii")).hexdigest()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
