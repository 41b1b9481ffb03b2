"""Every setting of inferq, read from environment variables (12-factor).

This class is the one place settings are defined; the README's configuration table mirrors it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str | None = Field(
        default=None,
        description="Redis/Valkey URL (redis://, rediss://, with user:password). Unset: `make up` "
        "starts an embedded Valkey server and exports its URL to the processes it runs.",
    )
    embedded_redis_port: int = Field(default=0, description="Port of the embedded server; 0 = a free port.")
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
    torch_threads: int = Field(default=0, ge=0, description="Intra-op threads of torch; 0 = torch's default.")

    # --- Batching ----------------------------------------------------------------------------
    max_batch_size: int = Field(default=16, ge=1, le=256, description="Most jobs in one forward pass.")
    max_batch_delay_ms: float = Field(
        default=10.0,
        ge=0,
        description="Longest a job waits for companions, counted from the oldest job's arrival.",
    )

    low_lane_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of each batch owed to the low-priority lane while it has jobs waiting.",
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

    # --- Lifetimes ------------------------------------------------------------------------------
    image_ttl: int = Field(
        default=3600, ge=1, description="Seconds the uploaded bytes live if never processed."
    )
    result_ttl: int = Field(default=3600, ge=1, description="Seconds a finished job and its result are kept.")
    failure_ttl: int = Field(default=24 * 3600, ge=1, description="Seconds a failed job is kept.")
    max_wait_seconds: float = Field(default=30.0, gt=0, description="Longest long-poll `?wait=` accepted.")

    # --- Worker liveness ------------------------------------------------------------------------
    heartbeat_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a worker proves it is alive, also while a batch runs.",
    )
    abandoned_after_seconds: float = Field(
        default=8.0,
        gt=0,
        description="A started job whose worker has not heartbeaten for this long is requeued.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Workers a job may be started on before it fails.")

    # --- Serving --------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address the api binds.")
    port: int = Field(default=8000, description="Port the api binds.")
    workers: int = Field(default=1, ge=1, description="Worker processes `make up` starts.")
    web_concurrency: int = Field(default=2, ge=1, description="gunicorn processes of the api.")
    log_level: str = Field(default="INFO", description="Python log level of api and worker.")

    # --- API (gunicorn + Flask) -------------------------------------------------------------------
    api_threads: int = Field(
        default=32,
        ge=1,
        description="gunicorn gthread threads per api process: each long-poll (`?wait=`) holds one for up to "
        "MAX_WAIT_SECONDS, so this bounds concurrent long-polls per process.",
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
        description="Jobs waiting in the queue above which submissions get 429 `queue_full`; 0 = unbounded.",
    )
    queue_full_retry_after: int = Field(
        default=2, ge=1, description="`Retry-After` seconds sent with 429 `queue_full`."
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        description="prometheus-client's multi-process directory (PROMETHEUS_MULTIPROC_DIR). Unset under "
        "gunicorn: the api creates a temporary one, so /metrics adds up all api processes.",
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
