"""One call as routed, for whoever keeps or shows it.

`RoutedCall` is what `Router.route` found (the call, the portal's answer, the decision and its
variables); `CallRecord` is the one frozen record of what the call was sent, built once per call
by `RouteScript` and handed to each sink: the metrics, the call log (`calllog`) and the admin
page's recent calls (`web.recent`). Below all three, so none of them imports another for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from agi_bitrix.bitrix.models import CrmAnswer
from agi_bitrix.routing.engine import CallInfo, Decision


@dataclass(frozen=True, slots=True)
class RoutedCall:
    call: CallInfo
    answer: CrmAnswer
    decision: Decision
    variables: dict[str, str]
    seconds: float


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A call as the channel got it: the decision's channel variables (each value already reduced
    to the characters its meaning allows), so the log, the page and the metrics show what
    Asterisk was sent, even when routing failed and the fallback was sent instead."""

    uniqueid: str  # from the AGI header (made loggable); each sink decides how much more to trust it
    phone: str  # as looked up, unmasked: each sink masks it when call_log.mask_numbers says so
    status: str
    route: str
    target: str
    rule: str
    error: str
    cache: str
    seconds: float  # from the script's start to the decision
    routed: RoutedCall | None  # None when routing failed before a decision (internal, unknown_script)

    @classmethod
    def sent(cls, uniqueid: str, variables: dict[str, str], prefix: str, seconds: float,
             routed: RoutedCall | None) -> CallRecord:
        """The record of the `variables` (named with `prefix`) a call was sent."""
        return cls(uniqueid, variables[prefix + "PHONE"], variables[prefix + "STATUS"], variables[prefix + "ROUTE"],
                   variables[prefix + "TARGET"], variables[prefix + "RULE"], variables[prefix + "ERROR"],
                   variables[prefix + "CACHE"], seconds, routed)
