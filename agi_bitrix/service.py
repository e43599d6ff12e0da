"""The routing service: wires the portal lookup and the clock around the pure routing function.

One Router per loaded config. Every way into routing goes through `Router.route` with a
CallInfo: the `route` AGI script (RouteScript reads the call from the AGI header), `agi-bitrix
route` (a number from the command line) and `agi-bitrix test` (a case with a recorded answer).
RouteScript keeps the guide's promise: whatever happens — no caller ID, a slow or broken
portal, a bug — the call gets the full set of variables and a route, within the lookup deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Protocol

from agi_bitrix.agi.channel import AgiChannel
from agi_bitrix.agi.protocol import AgiRequest, loggable
from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.calllog import CallLog
from agi_bitrix.callrecord import CallRecord, RoutedCall
from agi_bitrix.config import Config
from agi_bitrix.monitoring import Metrics
from agi_bitrix.phones import MAX_NUMBER_CHARS, normalize_number
from agi_bitrix.routing.engine import FALLBACK_RULE, CallInfo, Decision, decide
from agi_bitrix.routing.variables import channel_variables

log = logging.getLogger("agi_bitrix.routing")


class Lookup(Protocol):
    """Who owns a number: the portal lookup (agi_bitrix.bitrix.lookup.CrmLookup), or a recorded
    answer in `agi-bitrix test`."""

    async def lookup(self, phone: str) -> CrmAnswer: ...


class Directory(Protocol):
    """The portal's users (agi_bitrix.bitrix.users.UserDirectory)."""

    def inactive_among(self, user_ids: Iterable[str]) -> frozenset[str]: ...


class CallRecorder(Protocol):
    """Keeps each call for the admin page (agi_bitrix.web.recent.RecentCalls); on the hot path, so cheap."""

    def record(self, call: CallRecord) -> None: ...


def call_info(raw_number: str, raw_did: str, default_country: str) -> CallInfo:
    """The call as routing sees it: the number to look up and the dialled number, each as the
    dialplan (or an admin) wrote it. A DID too long to be a number is no DID: the rules'
    regexes never see it."""
    did = normalize_number(raw_did, default_country) or raw_did.strip()
    if len(did) > MAX_NUMBER_CHARS:
        did = ""
    return CallInfo(phone=normalize_number(raw_number, default_country), did=did)


def agi_call_info(request: AgiRequest, default_country: str) -> CallInfo:
    """The number to look up (first AGI argument, else the caller ID) and the dialled number
    (second argument, else the extension)."""
    raw_number = request.args[0] if request.args and request.args[0].strip() else request.get("agi_callerid")
    raw_did = request.args[1] if len(request.args) > 1 and request.args[1].strip() else request.get("agi_extension")
    return call_info(raw_number, raw_did, default_country)


class Router:
    """Routing under one config: the lookup, the user directory and the clock around decide()."""

    def __init__(self, config: Config, lookup: Lookup,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 users: Directory | None = None) -> None:
        self.config = config
        self.lookup = lookup
        self.clock = clock
        self.users = users

    async def route(self, call: CallInfo, uniqueid: str = "-") -> RoutedCall:
        started = time.monotonic()
        config = self.config
        answer = CrmAnswer("NO_CALLERID") if call.phone is None else await self.lookup.lookup(call.phone)
        inactive: frozenset[str] = frozenset()
        if self.users is not None:
            inactive = self.users.inactive_among(e.owner.user_id for e in answer.entities if e.owner)
            if inactive:
                log.info("call %s: deactivated owner(s) %s skipped", uniqueid, ", ".join(sorted(inactive)))
        decision = decide(call, answer, config.policy, self.clock(), inactive)
        variables = channel_variables(decision, config.variable_prefix)
        return RoutedCall(call, answer, decision, variables, time.monotonic() - started)


class RouteScript:
    """The `route` AGI script (and the answer to an unknown one): the router's variables on the
    channel, every call counted in the metrics and the call log."""

    def __init__(self, router: Router, metrics: Metrics, call_log: CallLog, recorder: CallRecorder) -> None:
        self.router = router
        self.config = router.config
        self.metrics = metrics
        self.call_log = call_log
        self.recorder = recorder

    async def handle_route(self, request: AgiRequest, channel: AgiChannel) -> None:
        """Decide and set the variables; a bug still yields the fallback route."""
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        started = time.monotonic()
        routed: RoutedCall | None = None
        try:
            call = agi_call_info(request, self.config.policy.default_country)
            routed = await self.router.route(call, uniqueid)
            variables = routed.variables
        except Exception:
            log.exception("call %s: routing failed; sending the fallback route", uniqueid)
            variables = self.fallback_variables("internal")
        self._account(uniqueid, variables, time.monotonic() - started, routed)
        if not await channel.set_variables(variables):
            log.info("call %s: the channel went away before its variables were set", uniqueid)

    async def handle_unknown_script(self, request: AgiRequest, channel: AgiChannel) -> None:
        """A typo in the dialplan's AGI path must not leave the call without a route."""
        uniqueid = loggable(request.get("agi_uniqueid")) or "-"
        log.warning("call %s asked for unknown script %r; sending the fallback route", uniqueid, request.script)
        variables = self.fallback_variables("unknown_script")
        self._account(uniqueid, variables, 0.0, None)
        await channel.set_variables(variables)

    def _account(self, uniqueid: str, variables: dict[str, str], seconds: float, routed: RoutedCall | None) -> None:
        """The call's line in the call log, its place in the metrics and on the admin page, from what was sent."""
        record = CallRecord.sent(uniqueid, variables, self.config.variable_prefix, seconds, routed)
        self.metrics.count_call(record.status, record.route, record.rule)
        self.metrics.call_seconds.observe(seconds)
        self.call_log.record(record)
        self.recorder.record(record)

    def fallback_variables(self, reason: str) -> dict[str, str]:
        """Variables for a call we could not route normally (an internal failure)."""
        # Built by hand, not by the rules: this path must work even if deciding is what failed.
        policy = self.config.policy
        decision = Decision(status="ERROR", route="queue", target=policy.fallback_queue,
                            rule=FALLBACK_RULE, phone="", fallback_queue=policy.fallback_queue,
                            error=reason)
        return channel_variables(decision, self.config.variable_prefix)

