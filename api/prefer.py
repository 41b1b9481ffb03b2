"""`Prefer: wait=<seconds>` on submits (RFC 7240): one request when the client wants it.

A submit that carries the preference is answered with the ended job (200, the body
`GET /v1/jobs/<id>` gives) when its job ends within the wait, else with the usual 202 once the wait
has passed; the client then long-polls as without it. So a client that wants its answer now pays
one HTTP exchange instead of two (submit, then long-poll).

- Parsing follows RFC 7240: the header may be repeated and lists preferences separated by commas,
  each `name[=value]` with `;`-parameters; names are case-insensitive; only the first instance of a
  preference counts; `wait` is delta-seconds (digits only). Preferences the server does not know
  (`respond-async`, `handling=…`, `return=…`) are ignored, and so is a malformed or zero `wait`: a
  preference is a hint, never a reason to refuse the submit.
- The server may honour a shorter wait: it is capped at MAX_WAIT_SECONDS (whole seconds), and the
  answer's `Preference-Applied: wait=<n>` says how long it waited (on a 200, and on a 202 sent once
  the wait ran out). A 202 without that header was not waited on.
- The wait is a long-poll: it holds an Event of the process's completion listener, no Redis
  connection (`api.long_poll`), and it counts against LONG_POLLS_PER_KEY. A job whose end's message
  carried its view is answered from it, without reading the job back (the request created the job:
  it is its owner). The submit's admission
  script (`api.fairness.Fairness.admit`) reads the key's long-poll count; its waiter is registered
  before the store script runs and its lease is one of that script's writes (`SubmitWait`), so an
  end can never be published unheard and the lease costs no extra round trip. A key at its
  long-poll cap has the preference declined (a 202 at once), not its submit refused: the job is as
  welcome as without the header. (Waiting submits of one key racing between their admission and
  their store may take a lease or two over the cap; long-polls (GET) check it atomically.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from flask import Request

from api.fairness import LongPollSlot
from api.long_poll import CompletionListener, Waiter
from shared.config import Settings
from shared.recorded_writes import RecordedWrites

PREFERENCE_APPLIED = "Preference-Applied"

# RFC 9110 token characters; a quoted-string with its backslash escapes.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# One list element: commas inside a quoted string do not split (an unclosed quote runs to the end).
_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*"?)+')
_PREFERENCE = re.compile(rf"\s*({_TOKEN})\s*(?:=\s*({_TOKEN}|{_QUOTED}))?\s*(?:;.*)?", re.DOTALL)
_DELTA_SECONDS = re.compile(r"[0-9]+")
# More digits than any wait needs: capped without converting (int() refuses over 4,300 digits).
_MAX_DIGITS = 9


def preferences(values: Sequence[str]) -> dict[str, str | None]:
    """The preferences of the `Prefer` header lines `values`: name (lower case) to value (unquoted,
    None without one), the first instance of each; elements that do not parse are skipped."""
    found: dict[str, str | None] = {}
    for value in values:
        for element in _ELEMENT.findall(value):
            match = _PREFERENCE.fullmatch(element)
            if match is None:
                continue
            name, raw = match.group(1).lower(), match.group(2)
            if raw is not None and raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            found.setdefault(name, raw)
    return found


def preferred_wait(request: Request, settings: Settings) -> int | None:
    """Seconds the submit may wait for its job's end (its `Prefer: wait`, at most MAX_WAIT_SECONDS),
    or None: no such preference, a malformed or zero one, or a cap under one second."""
    raw = preferences(request.headers.getlist("Prefer")).get("wait")
    if raw is None or not _DELTA_SECONDS.fullmatch(raw):
        return None
    cap = int(settings.max_wait_seconds)
    asked = cap if len(raw.lstrip("0")) > _MAX_DIGITS else int(raw)
    return min(asked, cap) or None


def applied(wait: int) -> dict[str, str]:
    return {PREFERENCE_APPLIED: f"wait={wait}"}


def drop_uploaded_files(request: Request) -> None:
    """Close a multipart request's files once their images are enqueued: a submit that then waits up
    to MAX_WAIT_SECONDS holds no copy of them (a long-poll holds nothing of the kind either)."""
    for _, file in request.files.items(multi=True):
        file.close()


class SubmitWait:
    """The waiting side of one submit that prefers to wait: once the new jobs' ids are known and
    before their store script runs (`record`), registers a waiter for each with the completion
    listener and records the request's long-poll lease among that script's writes; `stored` once it
    has run. `declined`: the key was at its long-poll cap when admitted (nothing to wait for).

    A context manager: on exit the waiters are dropped and the lease, if still held, given back."""

    def __init__(
        self, listener: CompletionListener, slot: LongPollSlot, seconds: int, declined: bool
    ) -> None:
        self.slot = slot
        self.seconds = seconds
        self._declined = declined
        self._listener = listener
        self._waiters = ExitStack()
        self._events: list[Waiter] = []

    def __enter__(self) -> SubmitWait:
        return self

    def __exit__(self, *exc: object) -> None:
        self._waiters.close()
        self.slot.release()

    def record(self, writes: RecordedWrites, job_ids: Sequence[str]) -> None:
        if self._declined:
            return
        # A script tried again (an idempotent submit whose claim changed meanwhile) has new ids.
        self._waiters.close()
        self._events = [
            self._waiters.enter_context(self._listener.waiter(i, job_exists=False)) for i in job_ids
        ]
        self.slot.record_take(writes)

    def stored(self) -> None:
        if self._declined:
            return
        self._listener.jobs_exist(self._events)
        self.slot.taken()

    @property
    def declined(self) -> bool:
        """The key already held LONG_POLLS_PER_KEY long-polls: answer at once."""
        return self._declined

    @property
    def views(self) -> list[dict[str, Any] | None]:
        """Each job's view as its end's message carried it (None: not ended, or no view: read it)."""
        return [event.view for event in self._events]

    def wait(self) -> bool:
        """Until every job has ended (True) or the wait has run out (False)."""
        until = time.monotonic() + self.seconds
        return all(event.wait(max(0.0, until - time.monotonic())) for event in self._events)
