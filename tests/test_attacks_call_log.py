"""Attacks on the call log (logger agi_bitrix.calls, on standard error) that no other file tries;
see docs/security.md."""

import json
import logging

from agi_bitrix.app import Application
from agi_bitrix.testing.fake_asterisk import fake_call
from tests.conftest import make_config

# What an allowed client (or an AMI originator choosing the uniqueid) could send to forge a second
# JSON record, or drive the terminal of whoever reads the journal (a LF would end the AGI header
# line; a CR does not).
FORGED = '1.1"}\r{"uniqueid": "9", "status": "FOUND", "phone": "79990000000\x1b[2J'


async def test_a_forged_uniqueid_is_one_field_of_one_json_record(portal, capfd, caplog):
    caplog.set_level(logging.INFO, logger="agi_bitrix.calls")
    app = Application(make_config(portal.webhook_url, extra="call_log: {format: json, mask_numbers: true}"))
    host, port = await app.start("127.0.0.1", 0)
    try:
        await fake_call(host, port, callerid="89161234567", uniqueid=FORGED)
    finally:
        await app.stop()
    lines = [line for line in capfd.readouterr().err.splitlines() if "uniqueid" in line]
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert set(record) == {"time", "uniqueid", "phone", "status", "route", "target", "rule", "error", "cache",
                           "latency_ms"}
    assert set(record["uniqueid"]) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-?")
    assert (record["phone"], record["status"]) == ("7916*****67", "FOUND")
    assert lines[0].isprintable() and "\x1b" not in lines[0]
