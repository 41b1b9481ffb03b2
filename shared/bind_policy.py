"""Where the api may listen: without API keys, only on loopback addresses (anyone who can reach a
public address could otherwise use it). Applied by the launcher before it starts anything and by
gunicorn's `on_starting` hook against the addresses gunicorn will really bind. In `shared`, not
`api`: the launcher applies it without importing the api package (Flask and its extensions)."""

from __future__ import annotations

import ipaddress
import socket

from shared.config import Settings


class BindNotAllowed(RuntimeError):
    """The api was asked to listen on a non-loopback address without API keys."""


def is_loopback_host(host: str) -> bool:
    """True when every address `host` stands for is a loopback address (names are resolved;
    one that does not resolve, the wildcard `0.0.0.0` / `::` and the empty host are not loopback)."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        addresses = [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return False
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    return bool(addresses) and all(_loopback(address) for address in addresses)


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_bind_allowed(settings: Settings, host: str | None = None) -> None:
    """The bind rule of the api: without API keys it only listens on loopback addresses.

    `host` defaults to `settings.host` (pass the address gunicorn was really told to bind, which a
    `--bind` may change). Raises `BindNotAllowed` with the reason and the fix; returns None when allowed.
    Called by the launcher before it starts anything and by gunicorn's `on_starting` hook.
    """
    host = settings.host if host is None else host
    if settings.auth_enabled or is_loopback_host(host):
        return
    raise BindNotAllowed(
        f"refusing to serve the api on {host or '<all interfaces>'}: it is not a loopback address and no "
        "API keys are configured, so anyone who can reach it could use it. Set API_KEYS (comma-separated) "
        "or API_KEYS_FILE to require `Authorization: Bearer <key>`, or bind HOST=127.0.0.1 (the default)."
    )
