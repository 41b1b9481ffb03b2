"""WSGI entry point for gunicorn: `gunicorn --config api/gunicorn_conf.py api.wsgi:app`."""

from __future__ import annotations

from api import create_app
from shared.log_redaction import install_redaction
from shared.logging_setup import configure_logging

# One handler on the root logger, in LOG_FORMAT (JSON lines by default; shared.logging_setup).
configure_logging(service="api")
# Authorization values and Redis URL passwords never reach the logs, whoever logs them.
install_redaction()

app = create_app()
