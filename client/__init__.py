"""A small Python client of the inferq api, and the `inferq` command line built on it.

from client import Client
with Client("http://127.0.0.1:8000") as inferq:
    print(inferq.classify("coffee.png").top1)
"""

from __future__ import annotations

# Defined before the imports below: client.sdk reads it for its User-Agent.
__version__ = "0.1.0"

from client.errors import (
    AuthenticationError,
    ClientError,
    Conflict,
    FileError,
    Gone,
    InvalidInput,
    JobFailed,
    JobTimeout,
    NotFound,
    RateLimited,
    ServerError,
    Unavailable,
)
from client.models import (
    TERMINAL_STATUSES,
    JobError,
    JobRef,
    JobResult,
    JobStatus,
    ModelInfo,
    Prediction,
    Readiness,
    Timings,
)
from client.sdk import DEFAULT_URL, Client, ImageInput, Outcome

__all__ = [
    "DEFAULT_URL",
    "TERMINAL_STATUSES",
    "AuthenticationError",
    "Client",
    "ClientError",
    "Conflict",
    "FileError",
    "Gone",
    "ImageInput",
    "InvalidInput",
    "JobError",
    "JobFailed",
    "JobRef",
    "JobResult",
    "JobStatus",
    "JobTimeout",
    "ModelInfo",
    "NotFound",
    "Outcome",
    "Prediction",
    "RateLimited",
    "Readiness",
    "ServerError",
    "Timings",
    "Unavailable",
    "__version__",
]
