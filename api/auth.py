"""API keys: `Authorization: Bearer <key>` on every /v1 route and /metrics when keys are configured.

- Keys come from API_KEYS (comma-separated) and/or API_KEYS_FILE (one per line, `#` comments) and are
  hashed (sha256) while the settings load (`shared.config`): the api only ever holds the hashes.
- A presented token is hashed and compared with `hmac.compare_digest` against EVERY stored hash,
  without stopping at a match, so the time taken says nothing about which key (or how much of one)
  matched.
- The key's id (`owner_id`, a prefix of its hash) is stored in each job's meta (`META_OWNER`); a
  job is visible to that key only. Another key gets the same 404 as for an unknown id.
- Without keys, nothing is required and every job is visible (local use: the api then only binds a
  loopback address, `shared.bind_policy.check_bind_allowed`).

Reusable for other mounts (rq-dashboard on /rq): `bp.before_request(enforce_api_key)` protects a
whole blueprint, `@require_api_key` one view; `allow_basic=True` also accepts HTTP Basic with the key as
the password (any user name), which is what a browser can send.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from flask import g, request
from werkzeug.datastructures import Headers

from api.errors import ApiError

log = logging.getLogger(__name__)

REALM = "inferq"
OWNER_ID_LENGTH = 16  # hex characters of the key's sha256 (64 bits) kept as the job's owner id
_BEARER_RE = re.compile(r"^Bearer +([\x21-\x7e]+) *$", re.IGNORECASE)
_BASIC_RE = re.compile(r"^Basic +([A-Za-z0-9+/=]+) *$", re.IGNORECASE)

F = TypeVar("F", bound=Callable[..., Any])


def owner_id(key_hash: str) -> str:
    return key_hash[:OWNER_ID_LENGTH]


class KeyRing:
    """The sha256 hashes of the configured keys (never the keys)."""

    def __init__(self, hashes: Iterable[str]) -> None:
        self._hashes = tuple(hashes)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def match(self, token: str) -> str | None:
        """The owner id of the key `token` is, or None. Constant time in which key matched."""
        candidate = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        found: str | None = None
        for stored in self._hashes:  # every one: no early exit
            if hmac.compare_digest(candidate, stored):
                found = stored
        return owner_id(found) if found is not None else None


def _keyring() -> KeyRing:
    from api.state import current_state

    return current_state().keyring


def _operator_ring() -> KeyRing:
    from api.state import current_state

    return current_state().operator_keyring


def _presented_token(header: str | None, allow_basic: bool) -> str | None:
    if not header:
        return None
    bearer = _BEARER_RE.match(header)
    if bearer:
        return bearer.group(1)
    if allow_basic:
        basic = _BASIC_RE.match(header)
        if basic:
            try:
                decoded = base64.b64decode(basic.group(1), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            _user, sep, password = decoded.partition(":")
            return password if sep and password else None
    return None


def authenticate(*, allow_basic: bool = False) -> str | None:
    """Check the request's credentials: the key's owner id, or None when keys are disabled.

    Raises 401 `unauthorized` (with `WWW-Authenticate`) when keys are enabled and the request has
    no valid one, 403 `tenant_only` when it has an operator key instead. Also stores the owner id as
    `g.inferq_owner` (`current_owner()`).
    """
    ring = _keyring()
    if not ring.enabled:
        g.inferq_owner = None
        return None
    header = request.headers.get("Authorization")
    token = _presented_token(header, allow_basic)
    candidate = token if token is not None else ""
    # Hash and compare even a malformed or missing token: every refusal costs the same.
    owner = ring.match(candidate)
    if token is None or owner is None:
        if _operator_ring().match(candidate) is not None:
            # The mirror of `operator_only`: a valid key, in the wrong place, says so.
            raise ApiError(
                "this route is for tenants: it needs an API_KEYS key; an operator key (OPERATOR_KEYS) "
                "opens only /rq and /metrics",
                code="tenant_only",
                http_status=403,
            )
        raise _unauthorized(presented=header is not None, allow_basic=allow_basic)
    g.inferq_owner = owner
    return owner


def authenticate_operator(*, allow_basic: bool = False) -> None:
    """Operator routes (/rq, /metrics): an OPERATOR_KEYS key is required whenever any keys are
    configured. A valid tenant key gets 403 `operator_only`; no or an unknown key, 401.
    Without any keys (the api then listens on loopback only) they are open."""
    operators = _operator_ring()
    if not operators.enabled and not _keyring().enabled:
        return
    header = request.headers.get("Authorization")
    token = _presented_token(header, allow_basic)
    candidate = token if token is not None else ""
    if operators.match(candidate) is not None:
        return
    if _keyring().match(candidate) is not None:
        raise ApiError(
            "this route is for operators: it needs an OPERATOR_KEYS key, not a tenant key",
            code="operator_only",
            http_status=403,
        )
    raise _unauthorized(presented=header is not None, allow_basic=allow_basic)


def require_operator(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        authenticate_operator()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def enforce_operator_or_basic() -> None:
    """A `before_request` hook for the dashboard: an operator key, as Bearer or Basic password."""
    authenticate_operator(allow_basic=True)


def current_owner() -> str | None:
    """The owner id authenticated for this request (None when keys are disabled)."""
    return g.get("inferq_owner")


def enforce_api_key() -> None:
    """A `before_request` hook: `blueprint.before_request(enforce_api_key)`."""
    authenticate()


def enforce_api_key_or_basic() -> None:
    """Like `enforce_api_key`, also accepting HTTP Basic with the key as password (browsers)."""
    authenticate(allow_basic=True)


@overload
def require_api_key(view: F) -> F: ...
@overload
def require_api_key(*, allow_basic: bool = False) -> Callable[[F], F]: ...
def require_api_key(view: Any = None, *, allow_basic: bool = False) -> Any:
    """Decorator: the view answers 401 unless the request carries a valid key (when keys are on)."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            authenticate(allow_basic=allow_basic)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate(view) if view is not None else decorate


class _FailureLog:
    """Authentication failures in the log without letting a client flood it: each one at DEBUG, and at
    most one WARNING per interval saying how many there were since the last."""

    def __init__(self, interval_seconds: float = 60.0) -> None:
        self._interval = interval_seconds
        self._last = -interval_seconds
        self._count = 0

    def note(self, method: str, path: str, credentials: str) -> None:
        self._count += 1
        log.debug("unauthorized %s %s (%s credentials)", method, path, credentials)
        now = time.monotonic()
        if now - self._last >= self._interval:
            log.warning(
                "%d unauthorized request(s) in the last %.0f s (latest: %s %s, %s credentials)",
                self._count,
                min(now - self._last, self._interval),
                method,
                path,
                credentials,
            )
            self._last = now
            self._count = 0


_AUTH_FAILURES = _FailureLog()


def _unauthorized(*, presented: bool, allow_basic: bool) -> ApiError:
    bearer = f'Bearer realm="{REALM}"'
    if presented:
        bearer += ', error="invalid_token"'  # RFC 6750 3.1
    # One header line per challenge: Chromium takes a line as one challenge, so with both on one line
    # it sees only Bearer, which it cannot answer: no Basic prompt, no use of a user:pass@ URL.
    challenges = Headers([("WWW-Authenticate", bearer)])
    if allow_basic:
        challenges.add("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
    # Never log or echo the header: it may be a valid key in the wrong place, or a typo of one.
    _AUTH_FAILURES.note(request.method, request.path[:200], "bad" if presented else "no")
    return ApiError(
        "a valid API key is required: send `Authorization: Bearer <key>`"
        if not presented
        else "the API key is missing, malformed or unknown: send `Authorization: Bearer <key>`",
        code="unauthorized",
        http_status=401,
        headers=challenges,
    )
