"""Logs of api and workers: one JSON object per line (`LOG_FORMAT=json`, the default) or readable text.

Every line carries `ts` (UTC, ms), `level`, `logger`, `pid`, `service` (`api` or `worker`) and
`message`; then the process's context (a worker adds `worker` = its RQ name and `model_sha256` once
its model is loaded, `set_log_context`) and whatever the call passed as `extra=` (`job_id`,
`batch_id`, `lane`, timings...); a traceback goes in `exc_info`. `LOG_FORMAT=text` prints
`<time> <LEVEL> [<pid>] <logger>: <message> key=value ...` with the same fields, for a console.

Following one job: the api logs `job submitted` (job_id, lane, bytes, top_k), the worker that ran it
logs `job ended` (job_id, batch_id, worker, model_sha256, status, code, attempt, timings) and
`batch done` (batch_id); `grep <job id>` over both, or filter on `job_id` in a log store.

Secrets: `shared.log_redaction`'s filter sits on every handler installed here (the message, its
arguments and tracebacks are redacted before any formatter runs), and the JSON formatter also
redacts every string field it adds (a secret cannot ride in through `extra=` either).

A stdlib `logging.Formatter` (no python-json-logger): ~40 lines, and it controls the order
"redact, then serialize" (python-json-logger re-formats `exc_info` from the live exception,
bypassing a filter's redacted `exc_text`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
# LogRecord attributes that are not fields of their own in a JSON line.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
# Loggers RQ gives handlers of its own (`rq worker-pool` sets them up in the supervisor, whose
# children inherit them): cleared, so their records reach the root handler once, in our format.
_RQ_LOGGERS = ("rq", "rq.worker", "rq.job", "rq.queue", "rq.worker_pool", "rq.scheduler")

# Context fields that text lines leave out (every line of a process has the same ones; the worker's
# `model ... loaded` line names its model). `worker` stays: a pool's workers share one console.
_TEXT_SKIPPED = ("service", "model_sha256")

# Record attribute set by `shared.log_redaction`'s filter: the message text it redacted. A formatter
# that sees that same text does not redact it again (the leading underscore keeps it out of the fields).
REDACTED_MARK = "_inferq_redacted"

_context: dict[str, Any] = {}
_redact: Callable[[str], str] | None = None


def _redactor() -> Callable[[str], str]:
    global _redact
    if _redact is None:
        # Imported late: shared.log_redaction imports this module (REDACTED_MARK).
        from shared.log_redaction import redact

        _redact = redact
    return _redact


def set_log_context(**fields: Any) -> None:
    """Fields added to every line of this process from now on (None removes one)."""
    for key, value in fields.items():
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def log_context() -> dict[str, Any]:
    return dict(_context)


class ContextFilter(logging.Filter):
    """Adds the process context to each record (a field passed with `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _clean(value: Any, redact: Callable[[str], str]) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, redact) for v in value]
    return redact(str(value))


def _redacted_message(record: logging.LogRecord, redact: Callable[[str], str]) -> str:
    message = record.getMessage()
    # Already redacted by the handler's filter (unless something changed it since): once is enough.
    return message if getattr(record, REDACTED_MARK, None) == message else redact(message)


def _entry(created: float, level: str, logger: str, pid: int | None, message: str) -> dict[str, Any]:
    return {
        "ts": dt.datetime.fromtimestamp(created, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": level,
        "logger": logger,
        "pid": pid,
        "message": message,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        redact = _redactor()
        entry = _entry(
            record.created, record.levelname, record.name, record.process, _redacted_message(record, redact)
        )
        for key, value in _extras(record).items():
            entry.setdefault(key, _clean(value, redact))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack_info"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


def direct_json_handlers(logger: logging.Logger) -> list[logging.StreamHandler[Any]] | None:
    """`logger`'s handlers when `write_json_line` writes exactly what they would for a plain message:
    each a StreamHandler or FileHandler (nothing that rotates) with this module's JsonFormatter and
    only its context filter and `shared.log_redaction`'s filter, on a logger without filters of its
    own that does not propagate. Else None (log through `logging`)."""
    from shared.log_redaction import RedactingFilter

    if logger.filters or logger.propagate or not logger.handlers:
        return None
    handlers: list[logging.StreamHandler[Any]] = []
    for handler in logger.handlers:
        if (
            type(handler) not in (logging.StreamHandler, logging.FileHandler)
            or type(handler.formatter) is not JsonFormatter
            or not all(type(f) in (RedactingFilter, ContextFilter) for f in handler.filters)
        ):
            return None
        handlers.append(handler)  # type: ignore[arg-type]
    return handlers


def write_json_line(
    handlers: Iterable[logging.StreamHandler[Any]], logger: str, level: int, message: str
) -> None:
    """The JSON line `logging` would write for `message` on handlers of `direct_json_handlers` (same
    fields and redaction), written directly: for a line per request (the access log), the record,
    caller lookup and filter passes of `logging` cost more than the line itself."""
    redact = _redactor()
    entry = _entry(time.time(), logging.getLevelName(level), logger, os.getpid(), redact(message))
    for key, value in _context.items():
        entry.setdefault(key, _clean(value, redact))
    line = json.dumps(entry, ensure_ascii=False, default=str)
    for handler in handlers:
        if level < handler.level:
            continue
        handler.acquire()
        try:
            handler.stream.write(line + handler.terminator)
            handler.flush()
        finally:
            handler.release()


class TextFormatter(logging.Formatter):
    """The classic line, with the record's extra fields appended as `key=value`."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = _extras(record)
        for key in _TEXT_SKIPPED:  # on every line of the process: noise on a console
            extras.pop(key, None)
        if not extras:
            return line
        redact = _redactor()
        pairs = " ".join(f"{k}={_text_value(_clean(v, redact))}" for k, v in extras.items())
        return f"{line} {pairs}"


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return json.dumps(text, ensure_ascii=False) if (not text or " " in text) else text


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return TextFormatter()
    raise ValueError(f"LOG_FORMAT must be json or text, not {log_format!r}")


def _install_filters(handler: logging.Handler) -> None:
    from shared.log_redaction import install_redaction

    install_redaction(handler)
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def configure_logging(
    *,
    service: str,
    log_format: str | None = None,
    level: str | int | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every log record of this process to one handler on the root logger, in LOG_FORMAT.

    Idempotent: a second call replaces the handler the first one installed (and any `basicConfig`
    handler). RQ's own loggers lose the handlers RQ gave them and propagate to it instead.
    `log_format` and `level` default to the settings (LOG_FORMAT, LOG_LEVEL)."""
    if log_format is None or level is None:
        from shared.config import get_settings

        settings = get_settings()
        log_format = log_format or settings.log_format
        level = level or settings.log_level
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    _install_filters(handler)
    handler._inferq = True  # type: ignore[attr-defined]  # recognised on a later call
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in _RQ_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    set_log_context(service=service)
    return handler


def configure_logging_once(*, service: str, level: str | int | None = None) -> None:
    """`configure_logging`, unless this process's logging is already set up: by an earlier call
    (`python -m worker`; then only the level is applied) or by an embedding program (tests, a
    notebook: its root handlers are left alone). RQ's worker-pool children configure here."""
    root = logging.getLogger()
    if any(getattr(h, "_inferq", False) for h in root.handlers):
        if level is not None:
            root.setLevel(level.upper() if isinstance(level, str) else level)
        return
    if root.handlers:
        return
    configure_logging(service=service, level=level)


def apply_to_handlers(handlers: Iterable[logging.Handler], log_format: str | None = None) -> None:
    """Put LOG_FORMAT and the context on handlers someone else built (gunicorn's error and access
    logs, rebuilt by gunicorn at each setup). In `text` mode their own format is kept."""
    if log_format is None:
        from shared.config import get_settings

        log_format = get_settings().log_format
    for handler in handlers:
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        _install_filters(handler)
