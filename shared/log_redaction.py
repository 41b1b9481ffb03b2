"""A logging filter that keeps secrets out of the api's logs, whatever logged them.

Redacted in the final text of every record (message with its arguments, traceback, stack):
- credentials of an `Authorization` header (`Bearer <token>`, `Basic <b64>`, or a bare value after
  `Authorization:`/`authorization=`), e.g. if an access-log format includes `%({authorization}i)s`
  or an exception message quotes request headers;
- passwords (and secret-looking query values) of Redis URLs (`shared.redis_conn.redact_url`).

The filter sits on HANDLERS (a logger's own filters do not see records propagated from child
loggers): `install_redaction()` puts it on the root logger's handlers and gunicorn's error and
access log handlers; gunicorn_conf's logger class re-installs it whenever gunicorn (re)builds them.
"""

from __future__ import annotations

import logging
import re

from shared.logging_setup import REDACTED_MARK
from shared.redis_conn import redact_url

REDACTED = "***"
# `Bearer abc`, `Basic abc=`: the scheme stays, the credentials go.
_SCHEME_CREDENTIALS_RE = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\",;)\]}]+")
# `Authorization: xyz` / `"authorization": "xyz"` / `HTTP_AUTHORIZATION=xyz` without a known scheme.
_AUTHORIZATION_VALUE_RE = re.compile(
    r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?!(?:bearer|basic)\b|\*\*\*)([^\s'\",;)\]}]+)"
)
_URL_RE = re.compile(r"(?i)\b(?:rediss?|valkeys?|unix)://[^\s'\"<>]+")


def redact(text: str) -> str:
    text = _URL_RE.sub(lambda match: redact_url(match.group(0)), text)
    text = _SCHEME_CREDENTIALS_RE.sub(lambda match: f"{match.group(1)}{match.group(2)}{REDACTED}", text)
    return _AUTHORIZATION_VALUE_RE.sub(lambda match: f"{match.group(1)}{REDACTED}", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler's own error path
            return True
        cleaned = redact(message)
        if cleaned != message or record.args:
            # Freeze the formatted, redacted text (an argument could hold the secret).
            record.msg, record.args = cleaned, None
        # The message is clean now: a formatter need not redact it again (`shared.logging_setup`).
        setattr(record, REDACTED_MARK, cleaned)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(*targets: logging.Handler | logging.Logger) -> None:
    """Add the filter (once) to the given handlers, or to every handler of the given loggers.

    Without arguments: the root logger's handlers and gunicorn's error/access log handlers."""
    if not targets:
        targets = (
            logging.getLogger(),
            logging.getLogger("gunicorn.error"),
            logging.getLogger("gunicorn.access"),
        )
    for target in targets:
        handlers = target.handlers if isinstance(target, logging.Logger) else [target]
        for handler in handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
