"""Attacks on the webhook URL's code (the credential in bitrix.webhook_url) that no other file
tries: a portal, or a proxy in front of it, that echoes the request URL back. See docs/security.md."""

import logging

from agi_bitrix.testing.fake_asterisk import fake_call
from tests.test_cli import SHIPPED, agi_bitrix_async

ECHOES = [
    ("error", {"status": 400, "code": "ERROR_CORE", "description": "bad call to {url}"}),
    ("bad_json", {"body": b"<p>Request {url} failed</p>"}),
]


def echoing(portal, kind, how):
    """The portal fails with the webhook URL, code and all, in its answer (and only so)."""
    portal.reset_faults()
    filled = {key: (value.replace(b"{url}", portal.webhook_url.encode()) if isinstance(value, bytes)
                    else value.replace("{url}", portal.webhook_url) if isinstance(value, str) else value)
              for key, value in how.items()}
    portal.fail(kind, **filled)


async def test_an_echoed_webhook_url_shows_its_code_in_no_log_health_or_metric(monitored, portal, caplog):
    caplog.set_level(logging.DEBUG)
    app, host, port, base, http = monitored
    for kind, how in ECHOES:
        echoing(portal, kind, how)
        app.lookup.cache.clear()
        variables = (await fake_call(host, port, callerid="89161234567")).variables
        assert variables["B24_STATUS"] == "ERROR"
        seen = [caplog.text, str(variables)]
        for path in ("/healthz", "/metrics"):
            async with http.get(base + path) as answer:
                seen.append(await answer.text())
        assert all(portal.code not in text for text in seen), kind
    assert "/rest/1/***/" in caplog.text  # the log says which portal failed, without its code
    assert "bad_json" in caplog.text and "ERROR_CORE" in caplog.text


async def test_route_never_prints_the_code_a_portal_echoes(portal):
    for kind, how in ECHOES:
        echoing(portal, kind, how)
        result = await agi_bitrix_async("route", "-c", str(SHIPPED), "89161234567",
                                        env={"AGI_BITRIX_WEBHOOK_URL": portal.webhook_url})
        assert "answer:   ERROR" in result.stdout, result.stdout + result.stderr
        assert portal.code not in result.stdout + result.stderr, kind
