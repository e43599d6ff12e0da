"""The /healthz body: whether calls can be routed by the CRM now, and why, from the parts' own state.

Only the portal and the auth decide the status (and so the load balancer's 200 or 503): a broken call card or
a Redis that is down is shown, never counted, since calls are routed without either. Each part is
read through what it already tells about itself (the lookup memory's last success and failure,
the breaker's state, the OAuth tokens' `state()`, the outbox's counts, the Redis link's
`health()`), so a fake with the same attributes stands in for it in tests/test_health.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agi_bitrix import __version__
from agi_bitrix.bitrix.memory import LookupMemory
from agi_bitrix.bitrix.oauth import OAuthTokens
from agi_bitrix.bitrix.users import UserDirectory, directory_health
from agi_bitrix.callcard.finish import RECORDING
from agi_bitrix.callcard.outbox import FINISH, OutboxStore
from agi_bitrix.config import Config
from agi_bitrix.monitoring import seconds_since


class PartHealth(Protocol):
    """A part that says its own state for /healthz: the Redis link, the external lines' sync, or
    click-to-call (whose health() is a mapping of its sections: ami, events, clicktocall)."""

    def health(self) -> dict[str, Any]: ...


@dataclass
class Health:
    """Called for each /healthz and by the admin page: (healthy, body). The callables read the
    running parts at that moment, so a reload or a growing server needs nothing from here."""

    memory: LookupMemory
    config: Callable[[], Config]  # the config in force
    auth: Callable[[], object]  # the portal client's auth: OAuthTokens, or the webhook's
    sessions: Callable[[], int]  # AGI sessions in flight
    config_loaded_at: Callable[[], float]  # time.monotonic() of the last successful load
    started_at: float  # time.monotonic() when the process was built
    outbox: OutboxStore | None = None
    redis: PartHealth | None = None
    # Shown, never in the status: incoming calls are routed without any of them.
    users: UserDirectory | None = None
    lines: PartHealth | None = None
    clicktocall: PartHealth | None = None

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        portal_ok, portal = portal_health(self.memory)
        auth_ok, auth = auth_health(self.auth())
        healthy = portal_ok and auth_ok
        config = self.config()
        return healthy, {
            "status": "ok" if healthy else "degraded",
            "portal": portal,
            "auth": auth,
            "users": directory_health(self.users),  # shown, not in the status: calls are routed either way
            "config": {"path": config.path, "sha256": config.digest, "rules": len(config.policy.rules),
                       "loaded_seconds_ago": seconds_since(self.config_loaded_at())},
            # Shown, but not in the status: a broken call card does not stop calls being routed.
            "callcard": callcard_health(self.outbox, recordings=bool(config.callcard.finish.recording_file)),
            # Shown, but not in the status either: without Redis each server routes on its own share.
            "redis": {"state": "off"} if self.redis is None else self.redis.health(),
            # Shown, not in the status: incoming calls are routed without lines, AMI or click-to-call.
            "lines": {"state": "off"} if self.lines is None else self.lines.health(),
            **({} if self.clicktocall is None else self.clicktocall.health()),
            "sessions_in_flight": self.sessions(),
            "cache_entries": len(self.memory.cache),
            "uptime_seconds": seconds_since(self.started_at),
            "version": __version__,
        }


def portal_health(memory: LookupMemory) -> tuple[bool, dict[str, Any]]:
    """Whether the portal answers, from what the lookups saw last and the breaker's state."""
    breaker = memory.breaker.state
    failing = memory.last_failure is not None and (
        memory.last_success is None or memory.last_failure > memory.last_success)
    misconfigured = memory.misconfigured if failing else None
    if misconfigured is not None:
        state = f"refuses REST: {misconfigured.reason} ({misconfigured.advice})"
    elif breaker == "open":
        state = "circuit open: not asked until the cool-down ends"
    elif failing:
        state = "failing: the last request failed"
    elif memory.last_success is None:
        state = "not asked yet"
    else:
        state = "answering"
    return breaker != "open" and not failing, {
        "state": state,
        "breaker": breaker,
        "last_success_seconds_ago": seconds_since(memory.last_success),
        "last_failure_seconds_ago": seconds_since(memory.last_failure),
        "last_failure_reason": memory.last_failure_reason or None,
    }


def auth_health(auth: object) -> tuple[bool, dict[str, Any]]:
    """An OAuth application's tokens say their own state; a webhook has none to lose."""
    if isinstance(auth, OAuthTokens):
        return auth.state()
    return True, {"mode": "webhook"}


def callcard_health(outbox: OutboxStore | None, *, recordings: bool) -> dict[str, Any]:
    """The outbox's counts; the recordings' only when recordings are uploaded."""
    if outbox is None:
        return {"state": "off"}
    health = {"state": "down" if outbox.problem else "up", "problem": outbox.problem or None,
              "outbox": str(outbox.path), "finishes_waiting": outbox.waiting_of(FINISH),
              "finishes_kept_in_memory": outbox.kept_of(FINISH), "finishes_failed": outbox.failed_of(FINISH),
              "finishes_lost": outbox.lost}
    if recordings:
        health.update(recordings_waiting=outbox.waiting_of(RECORDING), recordings_failed=outbox.failed_of(RECORDING))
    return health
