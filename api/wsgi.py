"""WSGI entry point for gunicorn: `gunicorn --config api/gunicorn_conf.py api.wsgi:app`."""

from __future__ import annotations

import logging

from api import create_app
from api.log_redaction import install_redaction
from shared.config import get_settings

logging.basicConfig(
    level=get_settings().log_level.upper(),
    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
)
# Authorization values and Redis URL passwords never reach the logs, whoever logs them.
install_redaction()

app = create_app()
