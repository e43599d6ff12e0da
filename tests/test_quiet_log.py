"""The log of refused unauthenticated POSTs (bitrix/refusals.py), shared by the portal's events
and the install callback: a flood is a line per kind a minute, each saying how many it held."""

import logging

from agi_bitrix.bitrix.refusals import QuietLog


def test_a_kind_is_said_at_once_then_once_per_interval_with_what_was_held(caplog):
    now = [0.0]
    quiet = QuietLog(logging.getLogger("test.quiet"), "like it", interval=60.0, clock=lambda: now[0])
    for _ in range(3):
        quiet.warning("install from %s refused", "10.0.0.1")
    quiet.warning("event refused (%s)", "stale", kind="stale")  # another kind is not held back
    now[0] = 60.0
    quiet.warning("install from %s refused", "10.0.0.2")
    quiet.warning("install from %s refused", "10.0.0.3")
    assert [r.getMessage() for r in caplog.records] == [
        "install from 10.0.0.1 refused",
        "event refused (stale)",
        "install from 10.0.0.2 refused (2 more like it since the last such line)",
    ]
