"""What Grafana sees: the Prometheus metrics, served by the HTTP listener (agi_bitrix.http_listener).

Counters and histograms are pushed by the parts that see the events (calls, portal requests,
reloads); gauges (sessions in flight, breaker state, cache size) are read when scraped. Each
Application has its own registry, so several can run in one process (the tests do).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agi_bitrix.bitrix.errors import metric_reason

log = logging.getLogger("agi_bitrix.monitoring")

BREAKER_STATES = ("closed", "half_open", "open")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("agi_bitrix_calls", "Calls routed, by outcome.",
                             ["status", "route", "rule"], registry=r)
        self.call_seconds = Histogram("agi_bitrix_call_seconds", "Time to decide a call's route.", registry=r)
        self.lookups = Counter("agi_bitrix_lookups", "Number lookups by where the answer came from.",
                               ["result"], registry=r)  # hit, miss, stale, error
        self.portal_seconds = Histogram("agi_bitrix_portal_request_seconds",
                                        "Latency of searchCrmEntities requests.", registry=r)
        self.portal_errors = Counter("agi_bitrix_portal_errors", "Failed portal requests by reason.",
                                     ["reason"], registry=r)
        self.reloads = Counter("agi_bitrix_config_reloads", "Config reloads by result.", ["result"], registry=r)
        self.refused = Counter("agi_bitrix_refused_connections", "Connections dropped before a session.",
                               ["reason"], registry=r)
        self.http_refused = Counter("agi_bitrix_http_refused_connections", "Connections to the HTTP listener"
                                    " closed unserved, by reason.", ["reason"], registry=r)
        self.sessions = Gauge("agi_bitrix_sessions_in_flight", "FastAGI sessions open now.", registry=r)
        self.breaker = Gauge("agi_bitrix_portal_breaker_state",
                             "1 for the circuit breaker's current state.", ["state"], registry=r)
        self.cards = Counter("agi_bitrix_call_cards", "Call cards shown to ringing phones' users and hidden from"
                             " the others on answer (telephony.externalCall.show/.hide), by outcome.",
                             ["action", "result"], registry=r)  # show|hide; done|call_not_found|failed
        self.cache_entries = Gauge("agi_bitrix_cache_entries", "Numbers in the answer cache.", registry=r)
        self.shared_unreadable = Counter("agi_bitrix_shared_answers_unreadable", "Answers in Redis this version"
                                         " could not decode (another version's shape), taken as misses.", registry=r)
        self.ami_connected = Gauge("agi_bitrix_ami_up", "1 while logged in to Asterisk's AMI (with an ami"
                                   " section), else 0.", registry=r)
        self.ami_reconnects = Counter("agi_bitrix_ami_reconnects", "Logins to AMI again after a lost connection.",
                                      registry=r)
        self.ami_dropped_events = Counter("agi_bitrix_ami_dropped_events", "AMI events dropped because their"
                                          " listeners were behind (the bounded queue was full).", registry=r)
        self.install_refused = Counter("agi_bitrix_install_refused", "POSTs to the OAuth install callback not"
                                       " taken, by reason (agi_bitrix.bitrix.install.InstallRefusal).",
                                       ["reason"], registry=r)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        # Children for the per-call labels, made once: labels() locks and builds a key each time.
        self.lookup_results = {result: self.lookups.labels(result) for result in ("hit", "miss", "stale", "error")}
        self._call_counters: dict[tuple[str, str, str], Counter] = {}

    # -- what the lookup reports (agi_bitrix.bitrix.lookup.LookupObserver) ------------------------

    def lookup_answered(self, source: str) -> None:
        self.lookup_results[source].inc()

    def portal_request_done(self, seconds: float) -> None:
        self.portal_seconds.observe(seconds)

    def portal_request_failed(self, reason: str) -> None:
        # Bounded labels: a portal inventing codes would otherwise add a series per code, forever.
        self.portal_errors.labels(metric_reason(reason)).inc()

    def shared_answer_unreadable(self) -> None:
        self.shared_unreadable.inc()

    def count_card(self, action: str, result: str) -> None:
        self.cards.labels(action, result).inc()

    def count_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def count_http_refused(self, reason: str) -> None:
        self.http_refused.labels(reason).inc()

    def count_install_refused(self, reason: str) -> None:
        # InstallCallback's count_refusal: its reasons are a closed set (bitrix.install.InstallRefusal).
        self.install_refused.labels(reason).inc()

    def count_call(self, status: str, route: str, rule: str) -> None:
        # labels() takes a lock and builds a key on every call; the few combinations repeat.
        child = self._call_counters.get((status, route, rule))
        if child is None:
            child = self._call_counters[(status, route, rule)] = self.calls.labels(status, route, rule)
        child.inc()

    # -- what the AMI client reports (agi_bitrix.ami.client.AmiObserver) -------------------------

    def ami_up(self, up: bool) -> None:
        self.ami_connected.set(1 if up else 0)

    def ami_reconnected(self) -> None:
        self.ami_reconnects.inc()

    def ami_events_dropped(self, count: int) -> None:
        self.ami_dropped_events.inc(count)

    def watch(self, sessions: Callable[[], int], breaker_state: Callable[[], str],
              cache_entries: Callable[[], int]) -> None:
        """Gauges read at scrape time from the running parts."""
        self.sessions.set_function(sessions)
        self.cache_entries.set_function(cache_entries)
        for state in BREAKER_STATES:
            self.breaker.labels(state).set_function(functools.partial(_is_state, breaker_state, state))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _is_state(current: Callable[[], str], state: str) -> float:
    return float(current() == state)


def seconds_since(moment: float | None) -> float | None:
    return None if moment is None else round(time.monotonic() - moment, 3)
