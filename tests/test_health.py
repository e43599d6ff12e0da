"""The /healthz body (agi_bitrix.health), built from fakes of the parts it reads: only the portal
and the auth decide the status; the call card and Redis are shown, never counted."""

import time
from types import SimpleNamespace

from agi_bitrix.bitrix.errors import PortalMisconfigured
from agi_bitrix.bitrix.oauth import OAuthTokens
from agi_bitrix.callcard.finish import RECORDING
from agi_bitrix.callcard.outbox import FINISH
from agi_bitrix.config import parse_config
from agi_bitrix.health import Health, auth_health, callcard_health, portal_health

CONFIG = """\
bitrix: {webhook_url: "https://portal.example/rest/1/code/"}
routing:
  fallback_queue: support
  rules:
    - {name: vip, match: {status: FOUND}, route: {queue: vip}}
"""


def memory(*, breaker="closed", success=None, failure=None, reason="", misconfigured=None, entries=0):
    return SimpleNamespace(breaker=SimpleNamespace(state=breaker), last_success=success, last_failure=failure,
                           last_failure_reason=reason, misconfigured=misconfigured, cache=[None] * entries)


class FakeOutbox:
    def __init__(self, problem="", waiting=None, failed=None, kept=None, lost=0):
        self.problem, self.lost, self.path = problem, lost, "/var/lib/agi-bitrix/outbox.sqlite3"
        self._waiting, self._failed, self._kept = waiting or {}, failed or {}, kept or {}

    def waiting_of(self, kind):
        return self._waiting.get(kind, 0)

    def failed_of(self, kind):
        return self._failed.get(kind, 0)

    def kept_of(self, kind):
        return self._kept.get(kind, 0)


class FakeLink:
    def health(self):
        return {"state": "down", "problem": "connection refused"}


def test_portal_states_in_order_of_what_matters_most():
    now = time.monotonic()
    refused = PortalMisconfigured("ACCESS_DENIED", "REST API is available only on commercial plans")
    cases = [
        (memory(), (True, "not asked yet")),
        (memory(success=now), (True, "answering")),
        (memory(success=now - 5, failure=now, reason="timeout"), (False, "failing: the last request failed")),
        (memory(breaker="open", success=now), (False, "circuit open: not asked until the cool-down ends")),
        (memory(success=now - 5, failure=now, misconfigured=refused),
         (False, f"refuses REST: {refused.reason} ({refused.advice})")),
        # A failure older than the last success is over: the portal answers again.
        (memory(success=now, failure=now - 5, reason="timeout"), (True, "answering")),
    ]
    for fake, (healthy, state) in cases:
        ok, body = portal_health(fake)
        assert (ok, body["state"]) == (healthy, state), fake


def test_portal_body_names_the_last_failure_and_its_age():
    now = time.monotonic()
    ok, body = portal_health(memory(breaker="half_open", success=now - 10, failure=now - 1, reason="http_502"))
    assert not ok
    assert body["breaker"] == "half_open" and body["last_failure_reason"] == "http_502"
    assert 0.9 <= body["last_failure_seconds_ago"] < 5 and 9.9 <= body["last_success_seconds_ago"] < 15
    assert portal_health(memory())[1]["last_failure_reason"] is None


def test_a_webhook_has_no_auth_to_lose_and_tokens_say_their_own_state():
    assert auth_health(object()) == (True, {"mode": "webhook"})
    tokens = OAuthTokens.__new__(OAuthTokens)  # its state() is its own; here only the dispatch is tested
    tokens.state = lambda: (False, {"mode": "oauth application", "state": "refresh token revoked"})
    assert auth_health(tokens) == (False, {"mode": "oauth application", "state": "refresh token revoked"})


def test_callcard_off_up_and_down_with_its_counts():
    assert callcard_health(None, recordings=True) == {"state": "off"}
    outbox = FakeOutbox(waiting={FINISH: 3, RECORDING: 2}, failed={FINISH: 1, RECORDING: 4}, kept={FINISH: 2}, lost=1)
    assert callcard_health(outbox, recordings=False) == {
        "state": "up", "problem": None, "outbox": "/var/lib/agi-bitrix/outbox.sqlite3", "finishes_waiting": 3,
        "finishes_kept_in_memory": 2, "finishes_failed": 1, "finishes_lost": 1}
    with_recordings = callcard_health(outbox, recordings=True)
    assert (with_recordings["recordings_waiting"], with_recordings["recordings_failed"]) == (2, 4)
    down = callcard_health(FakeOutbox(problem="disk full"), recordings=False)
    assert (down["state"], down["problem"]) == ("down", "disk full")


def health(fake_memory, auth=None, outbox=None, redis=None):
    config = parse_config(CONFIG, "/etc/agi-bitrix.yaml", digest="ab" * 32)
    started = time.monotonic() - 100
    return Health(fake_memory, lambda: config, lambda: auth, lambda: 7, lambda: started + 40, started,
                  outbox, redis)


def test_a_healthy_server_says_ok_and_what_it_runs():
    healthy, body = health(memory(success=time.monotonic(), entries=3))()
    assert healthy and body["status"] == "ok"
    assert body["config"]["path"] == "/etc/agi-bitrix.yaml" and body["config"]["sha256"] == "ab" * 32
    assert body["config"]["rules"] == 1 and 59 < body["config"]["loaded_seconds_ago"] < 70
    assert 99 < body["uptime_seconds"] < 110
    assert (body["sessions_in_flight"], body["cache_entries"]) == (7, 3)
    assert (body["callcard"], body["redis"], body["auth"]) == ({"state": "off"}, {"state": "off"}, {"mode": "webhook"})
    assert body["version"]


def test_a_broken_call_card_or_redis_is_shown_but_does_not_degrade():
    healthy, body = health(memory(success=time.monotonic()), outbox=FakeOutbox(problem="disk full"),
                           redis=FakeLink())()
    assert healthy and body["status"] == "ok"
    assert body["callcard"]["state"] == "down" and body["redis"]["state"] == "down"


def test_a_failing_portal_degrades():
    now = time.monotonic()
    healthy, body = health(memory(success=now - 5, failure=now, reason="timeout"))()
    assert not healthy and body["status"] == "degraded"
