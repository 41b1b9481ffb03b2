"""A small Python client of the inferq api, and the `inferq` command line built on it.

from client import Client
with Client("http://127.0.0.1:8000") as inferq:
    print(inferq.classify("coffee.png").top1)
"""

from __future__ import annotations

# Defined before the imports below: client.sdk reads it for its User-Agent.
__version__ = "0.1.0"

# Every error class, listed once in client.errors.__all__ (client.sdk imports them too).
from client import errors as _errors
from client.errors import *  # noqa: F403
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
    "Client",
    "ImageInput",
    "JobError",
    "JobRef",
    "JobResult",
    "JobStatus",
    "ModelInfo",
    "Outcome",
    "Prediction",
    "Readiness",
    "Timings",
    "__version__",
    *_errors.__all__,
]
