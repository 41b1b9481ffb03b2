"""Typed client errors: every failure a caller can see is a `ClientError` with `.status`, `.code`
and `.message`, so one `except ClientError` handles them all and `.code` is the stable thing to
branch on (the api's snake_case codes in api/openapi.py, plus a few client-side ones listed below).

Client-side codes (no HTTP reply behind them, `.status` is None): `connection_error`,
`read_timeout`, `timeout` (JobTimeout), `file_not_found`, `is_a_directory`, `permission_denied`,
`file_unreadable` (FileError), `bad_response` (a reply that is not the api's JSON), and
`job_not_found` (NotFound) for an id that cannot name a job (it has a `/`): nothing is sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client.models import JobResult

# The one list of the error classes: the package re-exports exactly these (client/__init__.py).
__all__ = [
    "AuthenticationError",
    "ClientError",
    "Conflict",
    "FileError",
    "Gone",
    "InvalidInput",
    "JobFailed",
    "JobTimeout",
    "NotFound",
    "RateLimited",
    "ServerError",
    "Unavailable",
]


class ClientError(Exception):
    """Base of every client error."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None = None,
        retry_after: float | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        # Seconds the server asked us to wait (Retry-After), when it said so.
        self.retry_after = retry_after
        # The job the error is about, when one exists (JobFailed, JobTimeout, NotFound on a job).
        self.job_id = job_id

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        return f"{where}{self.code}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        """The error as JSON-ready data (the CLI's jsonl output)."""
        return {"code": self.code, "message": self.message, "http_status": self.status}


class InvalidInput(ClientError):
    """The request was refused as invalid (400/413/415/422 and other 4xx not listed below):
    e.g. `unsupported_image_format`, `corrupt_image` (header-level), `payload_too_large`,
    `invalid_top_k`. Retrying the same request cannot succeed."""


class AuthenticationError(ClientError):
    """401/403: the API key is missing, wrong or not allowed to do this."""


class NotFound(ClientError):
    """404: no such job (unknown or expired id), or no such route (wrong base URL)."""


class Gone(NotFound):
    """410 (`job_expired`): the job existed but its result is no longer kept (RESULT_TTL)."""


class Conflict(ClientError):
    """409: e.g. `job_not_cancelable` (the job already started or ended)."""


class RateLimited(ClientError):
    """429 (`queue_full`): the service sheds load; `.retry_after` says when to come back.
    Raised only once the client's own retries are used up."""


class Unavailable(ClientError):
    """The service cannot be reached or cannot serve right now: 502/503/504 (e.g.
    `redis_unavailable`) or a connection error / timeout. Raised once retries are used up."""


class ServerError(ClientError):
    """Another 5xx (`internal_error`): a bug or fault on the server; not retried."""


class FileError(ClientError):
    """A local file could not be read (it was never sent)."""


class JobTimeout(ClientError):
    """`classify` gave up waiting: the job did not end within its timeout. The job keeps running
    server-side; `.job_id` lets the caller fetch it later with `Client.get`."""


class JobFailed(ClientError):
    """A job that ended `failed`, `canceled` or `expired`. `.code`/`.message` are the job's error
    (e.g. `corrupt_image`: the header was fine but the pixels did not decode); `.result` is the
    full JobResult (timings, timestamps). `.status` is None: the HTTP exchange itself succeeded."""

    def __init__(self, result: JobResult) -> None:
        error = result.error
        super().__init__(
            error.message if error else f"the job ended {result.status}",
            code=error.code if error else result.status,
            job_id=result.id,
        )
        self.result = result
