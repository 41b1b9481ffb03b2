"""WSGI entry point for gunicorn: `gunicorn --config api/gunicorn_conf.py api.wsgi:app`."""

from __future__ import annotations

import logging

from api import create_app
from shared.config import get_settings

logging.basicConfig(
    level=get_settings().log_level.upper(),
    format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
)

app = create_app()
