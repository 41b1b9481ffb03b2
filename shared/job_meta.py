"""What inferq keeps in an RQ job's `meta`: its keys, and the error codes the worker itself decides
(the `code` of `meta[META_ERROR]`). A leaf (it imports nothing), so that `shared.image_budget`,
which `shared.jobs` imports, names them as `shared.jobs` does; `shared.jobs` re-exports them."""

from __future__ import annotations

# Keys of `job.meta` the api sets and the worker reads.
META_DEADLINE = "deadline_at"  # epoch seconds after which a job that has not started ends `expired`
META_OWNER = "owner"  # id of the API key that created the job (its hash), when keys are enabled
# Epoch seconds at which the job's image expires (IMAGE_TTL, or longer for a deadline beyond it).
# Lets a worker tell an expired image from one deleted by hand (`shared.image_budget`).
META_IMAGE_EXPIRES = "image_expires_at"
# Keys of `job.meta` the worker writes and the api reads.
META_ATTEMPTS = "attempts"  # how many times a worker started the job
# How many worker deaths caught the job while it was being decoded or in a forward pass (each also
# spends one of RQ's `retries_left`); at MAX_ATTEMPTS it fails `worker_crashed`.
META_CRASHES = "crashes"
META_TIMINGS = "timings"  # {"queue_ms", "preprocess_ms", "inference_ms", "batch_size"}
META_BATCH_ID = "batch_id"  # the batch the job ran in (also in the worker's log lines)
META_ERROR = "error"  # {"code", "message"} of a failed job

# A failed job whose error is this code never started: its deadline passed first (client status `expired`).
DEADLINE_EXPIRED = "deadline_expired"
# A failed job whose error is this code was caught decoding or in a forward pass by MAX_ATTEMPTS
# worker deaths (written by the worker that found the last one dead, never inferred from RQ's text).
WORKER_CRASHED = "worker_crashed"
# A failed job whose error is this code spent more than JOB_TIMEOUT being decoded and in forward passes.
JOB_TIMEOUT = "job_timeout"
# A failed job that carries none of inferq's codes was failed by RQ itself, not by inferq's code:
# RQ's registry cleanup of a dead worker's job (which `rq info` and dashboards run), a plain RQ
# worker. The api shows it with this code, and the workers' maintenance counts it under it
# (`worker.failed_elsewhere`), writing it into the job.
FAILED_BY_RQ = "internal_error"
FAILED_BY_RQ_MESSAGE = (
    "The job was failed by RQ itself, not by an inferq worker (e.g. RQ's registry cleanup of a job "
    "whose worker died, run by `rq info` or a dashboard)."
)
