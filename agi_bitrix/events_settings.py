"""Click-to-call's events from the portal (the `events:` section), declared once with
agi_bitrix.schema; read by agi_bitrix.config, which also checks what the mode needs of the other
sections (an application, the HTTP listener)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from agi_bitrix.checking import quoted
from agi_bitrix.schema import number, text

EVENT_MODES = ("off", "handler", "offline")
_EVENT_PATH = re.compile(r"/[A-Za-z0-9/_.-]{1,200}")


def _events_mode(value: str) -> str:
    if value not in EVENT_MODES:
        raise ValueError(f"{quoted(value)} must be one of {', '.join(EVENT_MODES)}")
    return value


def _events_path(value: str) -> str:
    if not _EVENT_PATH.fullmatch(value) or value in ("/metrics", "/healthz"):
        raise ValueError(f"{quoted(value)} must be a URL path like /bitrix/events, other than /metrics and /healthz")
    return value


def _public_url(value: str) -> str:
    """Where the portal POSTs events: public HTTPS (api-reference/events/index.md); plain HTTP only
    to this machine (a test, or a proxy on the same host that the portal does not see)."""
    if not value:
        return value
    parts = urlsplit(value)
    local = parts.hostname in ("127.0.0.1", "localhost", "::1")
    if parts.scheme not in ("https", "http") or not parts.hostname or (parts.scheme == "http" and not local) \
            or parts.query or parts.fragment or parts.username or any(c.isspace() for c in value):
        raise ValueError(f"{quoted(value)} must be an https:// URL with no query, like"
                         " https://pbx.example.com/bitrix/events")
    return value


@dataclass(frozen=True)
class EventsSettings:
    """Click-to-call's events from the portal (agi_bitrix.bitrix.events): off, POSTed to a handler
    on the HTTP listener, or taken from the portal's offline queue."""

    mode: str = text("mode", "off", check=_events_mode, restart=True)
    # The handler's path on http.listen, and the public HTTPS URL the portal is told to POST to
    # (a reverse proxy passes it to that path: docs/click-to-call.md).
    handler_path: str = text("handler.path", "/bitrix/events", check=_events_path, restart=True)
    public_url: str = text("handler.public_url", "", check=_public_url, restart=True)
    # Seconds between two questions to the offline queue (each costs a request of the budget).
    poll_interval: float = number("offline.poll_interval", 2.0, 0, 600, restart=True)
    # An event sent longer ago than this is refused: a replayed POST, or a click nobody waits for.
    replay_window: float = number("replay_window", 120.0, 0, 3600, restart=True)
