"""How long to wait before retrying: the server's `Retry-After` when it sends one, else a capped
exponential backoff. Both get jitter so that many threads (or many clients) turned away by one
full queue do not all come back at the same instant."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

# Backoff when the server does not say: 0.5, 1, 2, 4, 8, then 10 s per attempt (before jitter).
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 10.0
# Extra random delay on top of an advertised Retry-After: at most this fraction of it, or 1 s.
RETRY_AFTER_JITTER = 0.2


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header: delay-seconds or an HTTP-date (RFC 9110 10.2.3).
    None when absent or unparseable; a date in the past means "now" (0)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # float() also takes "nan"/"inf"/"-1": none of them is a delay.
        return seconds if 0 <= seconds < float("inf") else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; "-0000" parses as naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Seconds to sleep before retry number `attempt + 1` (attempt counts from 0).

    Never less than an advertised `retry_after`: retrying earlier would only be refused again.
    """
    if retry_after is not None:
        return retry_after + random.uniform(0, min(1.0, RETRY_AFTER_JITTER * retry_after))
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
    # "Equal jitter": at least half the ceiling, so a retry never comes back immediately.
    return ceiling / 2 + random.uniform(0, ceiling / 2)
