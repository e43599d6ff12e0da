"""The admin page over real HTTP, against the running server and the portal emulator: what it
shows, what it never shows (secrets, markup from the CRM, unmasked numbers), who may see it and
what its form may do. The same page in a real browser: tests/test_web_browser.py."""

import re
from dataclasses import replace
from html import unescape

import aiohttp
import pytest

from agi_bitrix.app import Application
from agi_bitrix.callrecord import CallRecord
from agi_bitrix.checking import ConfigError
from agi_bitrix.config import HttpSettings, parse_config
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.sample_data import SAMPLE_CRM
from agi_bitrix.web.access import ADMIN_TOKEN_ENV, LoginThrottle, access_policy, local_path
from agi_bitrix.web.chart import calls_per_minute
from agi_bitrix.web.recent import RecentCalls
from tests.conftest import call_requests, make_config
from tests.network import free_port

# A CRM is edited by people: besides the sample CRM's extension `120&Local/666@evil` and mobile
# with a newline and an EXEC, an owner whose fields are markup, as a user of the portal could type.
HOSTILE_PHONE = "79990000666"
HOSTILE_INNER = "<script>window.injected = 1</script>"
HOSTILE_MOBILE = '"><img id="injected" src="x" onerror="window.injected = 2">'
HOSTILE_CRM = {**SAMPLE_CRM, HOSTILE_PHONE: [{
    "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": 66, "ASSIGNED_BY_ID": 14,
    "ASSIGNED_BY": {"ID": "14", "TIMEMAN_STATUS": "OPENED", "USER_PHONE_INNER": HOSTILE_INNER,
                    "PERSONAL_MOBILE": HOSTILE_MOBILE, "WORK_PHONE": "", "PERSONAL_PHONE": None},
}]}
TOKEN = "correct-horse-battery-staple-42"


class Site:
    """The running application with its metrics listener, and an HTTP client for the page."""

    def __init__(self, app: Application, agi: tuple[str, int], base: str, http: aiohttp.ClientSession) -> None:
        self.app, self.agi, self.base, self.http = app, agi, base, http

    async def call(self, callerid: str, **header: str) -> dict[str, str]:
        return (await fake_call(*self.agi, callerid=callerid, **header)).variables

    async def get(self, path: str, **kwargs) -> tuple[int, str]:
        async with self.http.get(self.base + path, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text()

    async def post(self, path: str, data: dict[str, str], **kwargs) -> tuple[int, str]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text()

    async def csrf(self) -> str:
        _, html = await self.get("/try")
        return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


async def open_site(portal, *, listen: str = "127.0.0.1", extra: str = "", **config) -> Site:
    port = free_port()
    app = Application(make_config(portal.webhook_url, metrics=f'"{listen}:{port}"', extra=extra, **config))
    agi = await app.start("127.0.0.1", 0)
    return Site(app, agi, f"http://127.0.0.1:{port}", aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))


@pytest.fixture
async def hostile_portal():
    async with PortalEmulator(HOSTILE_CRM) as emulator:
        yield emulator


@pytest.fixture
async def site(hostile_portal):
    site = await open_site(hostile_portal)
    yield site
    await site.http.close()
    await site.app.stop()


def text_of(html: str) -> str:
    """What the page shows as text (tags removed, entities read)."""
    return unescape(re.sub(r"<[^>]+>", "", html))


def words(html: str) -> str:
    """The page's text as single-spaced words, each element apart from the next."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


async def test_a_routed_call_is_listed_and_its_trace_explains_it(site):
    await site.call("89161234567", uniqueid="1700000000.7")
    status, html = await site.get("/calls")
    assert status == 200
    row = re.search(r'<tr class="call">(.*?)</tr>', html, re.S).group(1)
    cells = [text_of(c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    assert cells[1:] == ["79161234567", "s", "Иван Петров (CONTACT 12)", "FOUND", "extension", "101",
                         "owner-at-work", "-", "miss", cells[-1]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0]) and cells[-1].endswith(" ms")
    link = re.search(r'href="(/calls/\d+)"', row).group(1)
    status, html = await site.get(link)
    trace = text_of(re.search(r'<pre class="trace" id="trace">(.*?)</pre>', html, re.S).group(1))
    assert "number:   79161234567    DID: s" in trace
    assert "     owner-on-break: CONTACT 12: TIMEMAN_STATUS OPENED not in ['PAUSED']" in trace
    assert "  => owner-at-work: matched CONTACT 12; dials owner's extension" in trace
    assert "B24_TARGET         = 101" in trace
    assert "1700000000.7" in text_of(html)


async def test_the_list_is_newest_first_and_bounded(site):
    recent = site.app.recent
    for n in range(recent.size + 5):
        recent.record(CallRecord(f"u{n}", "79161234567", "FOUND", "extension", "101", "owner-at-work", "", "hit",
                                 0.001, None))
    await site.call("89262345678")
    _, html = await site.get("/calls")
    numbers = [int(n) for n in re.findall(r'href="/calls/(\d+)"', html)]
    assert len(numbers) == recent.size
    assert numbers == sorted(numbers, reverse=True) and numbers[0] == recent.size + 6
    status, html = await site.get("/calls/1")  # pushed out of the ring
    assert status == 404 and "no longer in memory" in html


async def test_masked_numbers_are_masked_everywhere(hostile_portal):
    site = await open_site(hostile_portal, extra="call_log: {mask_numbers: true}")
    try:
        await site.call("89161234567")
        _, listing = await site.get("/calls")
        _, trace = await site.get(re.search(r'href="(/calls/\d+)"', listing).group(1))
        for html in (listing, trace):
            assert "79161234567" not in html
            assert "7916*****67" in html
        assert "B24_PHONE          = 7916*****67" in text_of(trace)
    finally:
        await site.http.close()
        await site.app.stop()


async def test_hostile_crm_values_and_agi_header_are_text_not_markup(site, hostile_portal):
    await site.call("8" + HOSTILE_PHONE[1:], uniqueid='<b id="injected">x</b>')
    await site.call("89997776655")  # the sample CRM's extension 120&Local/666@evil
    await site.call("89035550000")  # the sample CRM's mobile with a newline and an EXEC
    _, listing = await site.get("/calls")
    pages = [listing] + [(await site.get(link))[1] for link in re.findall(r'href="(/calls/\d+)"', listing)]
    csrf = await site.csrf()
    pages.append((await site.post("/try", {"csrf": csrf, "number": HOSTILE_PHONE, "did": "<i>did</i>"}))[1])
    shown = "\n".join(text_of(html) for html in pages)
    for value in (HOSTILE_INNER, HOSTILE_MOBILE, "120&Local/666@evil", '<b id="injected">x</b>', "<i>did</i>"):
        assert value in shown or repr(value) in shown, value
    markup = "\n".join(pages)
    assert "<script" not in markup and "<img" not in markup and 'id="injected"' not in markup
    assert "&lt;script&gt;window.injected = 1&lt;/script&gt;" in markup
    assert "120&amp;Local/666@evil" in markup
    assert "\\nEXEC Dial" in shown  # the newline shown as \n in the quoted value, as the CLI prints it


async def test_no_secret_on_any_page(site, hostile_portal):
    await site.call("89161234567")
    await site.post("/try", {"csrf": await site.csrf(), "number": "89262345678"})
    for path in ("/", "/calls", "/calls/1", "/try", "/rules", "/login"):
        status, html = await site.get(path)
        assert status == 200, path
        assert hostile_portal.code not in html, path
    _, now = await site.get("/")
    assert "/rest/1/***/" in now


async def test_pages_work_with_the_portal_down(site, hostile_portal):
    await site.call("89161234567")
    await hostile_portal.stop()
    variables = await site.call("89262345678")
    assert variables["B24_ERROR"] == "connect"
    for path in ("/", "/calls", "/calls/2", "/rules", "/try"):
        assert (await site.get(path))[0] == 200, path
    _, now = await site.get("/")
    shown = words(now)
    assert "Now: degraded" in shown
    assert "state failing: the last request failed" in shown
    assert "its reason connect" in shown
    status, html = await site.post("/try", {"csrf": await site.csrf(), "number": "89031234567"})
    assert status == 200 and "answer:   ERROR connect" in text_of(html)


async def test_now_shows_what_healthz_says(site):
    await site.call("89161234567")
    healthz = await (await site.http.get(site.base + "/healthz")).json()
    assert healthz["cache_entries"] == 1 and healthz["portal"]["last_failure_reason"] is None
    _, html = await site.get("/")
    shown = words(html)
    assert "state answering" in shown and "breaker closed" in shown and "last failure never" in shown
    assert f"sha256 {healthz['config']['sha256']}" in shown
    assert "rules 4 (loaded" in shown and "cache entries 1" in shown and "sessions in flight 0" in shown
    assert "Call card state off" in shown
    assert "Calls per minute by route, last hour (1 calls)" in shown and "extension: 1" in shown
    assert len(re.findall(r'<rect class="bar"', html)) == 1


async def test_rules_in_the_order_they_are_tried(site):
    _, html = await site.get("/rules")
    rows = [[words(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", html, re.S)[1:]]
    assert rows == [
        ["1", "sales-did line 9", "did: 74951112233", "-", "queue sales"],
        ["2", "owner-on-break line 12", "timeman: PAUSED", "first object", "fallback queue"],
        ["3", "owner-at-work line 15", "timeman: '', NOT_INSTALLED, OPENED, UNAVAILABLE", "first object",
         "owner's extension → owner's mobile → fallback queue"],
        ["4", "owner-day-over line 18", "timeman: CLOSED, EXPIRED", "first object",
         "owner's mobile → fallback queue"],
        ["5", "fallback", "no rule decided", "-", "queue support"],
    ]


async def test_try_a_number_runs_the_dry_run_through_the_running_router(site, hostile_portal):
    status, html = await site.post("/try", {"csrf": await site.csrf(), "number": "+7 916 123-45-67"})
    shown = text_of(html)
    assert status == 200
    assert "  => owner-at-work: matched CONTACT 12; dials owner's extension" in shown
    assert len(call_requests(hostile_portal)) == 1  # a real lookup
    assert site.app.recent.per_minute()[-1] == {}  # not a call: not in the list, not in the calls metric
    status, html = await site.post("/try", {"csrf": await site.csrf(), "number": "89161234567"})
    assert "B24_CACHE          = hit" in text_of(html) and len(call_requests(hostile_portal)) == 1


async def test_try_a_number_takes_its_request_from_the_calls_budget(hostile_portal):
    # A budget of one request, refilled once in 100 s: a call spends it, so the try gets none.
    port = free_port()
    # No user directory: with one slot in all, its own request would take it first.
    config = make_config(hostile_portal.webhook_url, metrics=f'"127.0.0.1:{port}"', extra="users: {refresh: 0}")
    config = replace(config, bitrix=replace(config.bitrix, rate_per_second=0.01, rate_burst=1))
    app = Application(config)
    site = Site(app, await app.start("127.0.0.1", 0), f"http://127.0.0.1:{port}", aiohttp.ClientSession())
    try:
        assert (await site.call("89161234567"))["B24_CACHE"] == "miss"
        _, html = await site.post("/try", {"csrf": await site.csrf(), "number": "89262345678"})
        assert "answer:   ERROR rate_limited" in text_of(html)
        assert len(call_requests(hostile_portal)) == 1
    finally:
        await site.http.close()
        await app.stop()


async def test_the_form_needs_its_csrf_token_and_a_same_site_origin(site, hostile_portal):
    status, html = await site.post("/try", {"number": "89161234567"})
    assert status == 403 and "the form is out of date" in html
    status, html = await site.post("/try", {"csrf": "guessed", "number": "89161234567"})
    assert status == 403
    status, html = await site.post("/try", {"csrf": await site.csrf(), "number": "89161234567"},
                                   headers={"Origin": "http://evil.example"})
    assert status == 403 and "sent from another site" in html
    assert (await site.post("/try", {"csrf": await site.csrf(), "number": "89161234567"},
                            headers={"Origin": "null"}))[0] == 403
    assert call_requests(hostile_portal) == []
    # Behind a TLS proxy the browser's Origin says https for the same host: that is this site.
    host = site.base.partition("://")[2]
    assert (await site.post("/try", {"csrf": await site.csrf(), "number": "89161234567"},
                            headers={"Origin": f"https://{host}"}))[0] == 200


async def test_try_a_number_is_rate_limited(site, hostile_portal):
    csrf = await site.csrf()
    statuses = [(await site.post("/try", {"csrf": csrf, "number": f"8916000000{n}"}))[0] for n in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    _, html = await site.post("/try", {"csrf": csrf, "number": "89161234567"})
    assert "at most 5 tries a minute" in html
    assert len(call_requests(hostile_portal)) <= 5


async def test_loopback_page_refuses_a_foreign_host_name(site):
    """A web page elsewhere that points its own domain at 127.0.0.1 (DNS rebinding) gets nothing."""
    status, html = await site.get("/calls", headers={"Host": "attacker.example:9573"})
    assert status == 403 and "only under a loopback name" in html
    for host in ("localhost:9573", "127.0.0.1:9573", "[::1]:9573"):
        assert (await site.get("/calls", headers={"Host": host}))[0] == 200, host


async def test_off_loopback_without_a_token_the_pages_are_refused_but_metrics_and_health_served(hostile_portal):
    site = await open_site(hostile_portal, listen="0.0.0.0")
    try:
        for path in ("/", "/calls", "/try", "/rules", "/login"):
            status, html = await site.get(path)
            assert status == 403, path
            assert "not a loopback address, and no access token is set" in html
        assert (await site.get("/metrics"))[0] == 200
        assert (await site.get("/healthz"))[0] == 200
    finally:
        await site.http.close()
        await site.app.stop()


async def test_a_token_is_required_when_set_and_compared_whole(hostile_portal, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    site = await open_site(hostile_portal, listen="0.0.0.0")
    try:
        status, _ = await site.get("/calls")
        assert status == 303
        for path in ("/", "/calls", "/calls/1", "/rules", "/try"):
            status, html = await site.get(path)
            assert status == 303 and "Recent calls" not in html, path
        assert (await site.post("/try", {"number": "89161234567"}))[0] == 401
        assert (await site.get("/calls", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}))[0] == 303
        assert (await site.get("/calls", headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
        status, html = await site.post("/login", {"token": TOKEN + "x", "next": "/calls"})
        assert status == 403 and "wrong token" in html
        async with site.http.post(site.base + "/login", data={"token": TOKEN, "next": "//evil.example/"},
                                  allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/"
            assert TOKEN not in response.headers["Set-Cookie"]
        assert (await site.get("/calls"))[0] == 200  # the cookie now
        assert (await site.get("/metrics"))[0] == 200
        assert (await site.get("/healthz"))[0] == 200
    finally:
        await site.http.close()
        await site.app.stop()


async def login_from(site: Site, address: str, token: str) -> int:
    """POST the login form from a client bound to `address` (a loopback address of its own)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(site.base + "/login", data={"token": token, "next": "/"},
                             allow_redirects=False) as response:
            return response.status


async def test_wrong_tokens_from_one_address_never_lock_the_right_token_out_for_others(hostile_portal, monkeypatch,
                                                                                       caplog):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    site = await open_site(hostile_portal, listen="0.0.0.0")
    try:
        assert [await login_from(site, "127.0.0.2", f"guess-{n:012d}") for n in range(10)] == [403] * 10
        assert await login_from(site, "127.0.0.2", "guess-number-eleven") == 429  # the guesser waits...
        assert await login_from(site, "127.0.0.2", TOKEN) == 429  # ...and learns nothing from its next try
        assert await login_from(site, "127.0.0.3", "another-guess-12345") == 403  # counted apart
        assert await login_from(site, "127.0.0.1", TOKEN) == 303  # the admin logs in
    finally:
        await site.http.close()
        await site.app.stop()
    logged = [r.getMessage() for r in caplog.records if "wrong access token" in r.getMessage()]
    assert logged == ["admin page: a wrong access token from 127.0.0.2",
                      "admin page: 10 wrong access tokens from 127.0.0.2 in a minute; its logins wait",
                      "admin page: a wrong access token from 127.0.0.3"]  # not one line per guess


def test_wrong_tokens_are_counted_per_address_and_ipv6_prefix_and_forgotten():
    now = [0.0]
    throttle = LoginThrottle(3, 60.0, clock=lambda: now[0], max_sources=2)
    for _ in range(3):
        throttle.failed("2001:db8:1:2::10")
    assert throttle.wait("2001:db8:1:2:ffff::1") == 60.0  # the same /64
    assert throttle.wait("2001:db8:1:3::10") == 0.0
    throttle.failed("::ffff:192.0.2.7")
    assert throttle.wait("192.0.2.7") == 0.0 and len(throttle._failures) == 2
    now[0] = 61.0
    assert throttle.wait("2001:db8:1:2::10") == 0.0  # a minute later
    throttle.failed("192.0.2.8")
    throttle.failed("192.0.2.9")
    assert set(throttle._failures) == {"192.0.2.8", "192.0.2.9"}  # at most max_sources remembered


# Each would send the browser to another site after the login: browsers drop tabs and newlines
# from a URL and read "\\" as "/"; proxies decode %2F; "https:" and "//" name a host outright.
HOSTILE_NEXT = [
    "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "//evil.example", "///evil.example",
    "/\\evil.example", "\\/evil.example", "/\\/evil.example", "/calls\\..\\..\\evil", "https://evil.example/",
    "https:evil.example", "http:/evil.example", "javascript:alert(1)", "evil.example", " /evil.example",
    "/%2F/evil.example", "/%2f%2fevil.example", "/%5Cevil.example", "/%5c/evil.example", "/%09/evil.example",
    "/%0d%0aSet-Cookie:x=1", "/%252F/evil.example", "/%25252F/evil.example", "/\u2215evil.example",
    "/\uff0fevil.example", "/%E2%88%95evil.example", "/\u200b/evil.example", "/\x00/evil.example",
    "/\x7f/evil.example", "/calls#//evil.example", "",
]


@pytest.mark.parametrize("target", HOSTILE_NEXT)
def test_only_a_path_on_this_site_is_a_target_after_the_login(target):
    assert local_path(target) == "/"


def test_a_path_on_this_site_is_kept_as_it_is():
    for target in ("/", "/calls", "/calls/12", "/try?number=1", "/calls%2F12", "/rules"):
        assert local_path(target) == target


async def test_the_login_never_sends_the_browser_to_another_site(hostile_portal, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    site = await open_site(hostile_portal, listen="0.0.0.0")
    try:
        for target in HOSTILE_NEXT:
            status, html = await site.get("/login", params={"next": target})
            assert status == 200 and re.search(r'name="next" value="([^"]*)"', html).group(1) == "/", target
        for target in ("/\t/evil.example", "/\\evil.example", "/%2F/evil.example", "/calls"):
            async with site.http.post(site.base + "/login", data={"token": TOKEN, "next": target},
                                      allow_redirects=False) as response:
                expected = "/calls" if target == "/calls" else "/"
                assert (response.status, response.headers["Location"]) == (303, expected), target
    finally:
        await site.http.close()
        await site.app.stop()


async def test_a_token_file_that_cannot_be_used_turns_the_pages_off(tmp_path):
    settings = HttpSettings(token_file=str(tmp_path / "missing"))
    assert access_policy(settings, {}).refusal == (
        f"the access token cannot be read from http.token_file {tmp_path / 'missing'}: No such file or directory")
    (tmp_path / "short").write_text("secret\n")
    settings = HttpSettings(host="0.0.0.0", token_file=str(tmp_path / "short"))
    assert "shorter than 16 characters" in access_policy(settings, {}).refusal
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = HttpSettings(host="0.0.0.0", token_file=str(tmp_path / "token"))
    policy = access_policy(settings, {})
    assert (policy.token, policy.refusal) == (TOKEN, "")
    assert access_policy(settings, {ADMIN_TOKEN_ENV: "from-the-environment-1234"}).token == "from-the-environment-1234"
    on_loopback = access_policy(HttpSettings(), {ADMIN_TOKEN_ENV: TOKEN})  # a token set is asked for there too
    assert on_loopback.token == TOKEN and not on_loopback.open_locally


def test_token_file_must_be_an_absolute_path():
    text = ("http: {listen: '127.0.0.1:9573', token_file: admin-token}\n"
            "bitrix: {webhook_url: 'https://x.bitrix24.ru/rest/1/abc/'}\nrouting: {fallback_queue: support}\n")
    with pytest.raises(ConfigError) as error:
        parse_config(text, "a.yaml")
    assert [str(p) for p in error.value.problems] == [
        "a.yaml:1: http.token_file: 'admin-token' must be an absolute path"]


def test_recent_calls_count_per_minute_by_route():
    now = [6000.0]
    recent = RecentCalls(size=3, minutes=60, clock=lambda: now[0])
    for route, at in (("extension", 6000), ("extension", 6030), ("queue", 6059), ("mobile", 6061), ("queue", 9540)):
        now[0] = at
        recent.record(CallRecord("u", "79161234567", "FOUND", route, "t", "r", "", "hit", 0.001, None))
    assert [c.route for c in recent.newest_first()] == ["queue", "mobile", "queue"]  # the ring keeps 3
    minutes = recent.per_minute()
    assert len(minutes) == 60 and minutes[-1] == {"queue": 1}  # minute 159, now
    assert minutes[0] == {"extension": 2, "queue": 1}  # minute 100 (6000-6059), the hour's first
    assert minutes[1] == {"mobile": 1} and minutes[2:59] == [{}] * 57
    now[0] = 9600  # a minute on: minute 100 is out of the hour
    assert recent.per_minute()[0] == {"mobile": 1}
    now[0] = 9540 + 3600
    assert recent.per_minute() == [{}] * 60


def test_chart_stacks_each_minute_by_route_on_one_scale():
    chart = calls_per_minute([{}] * 57 + [{"queue": 2, "extension": 2}, {}, {"mobile": 1}])
    assert chart.peak == 4 and chart.total == 5
    assert [(b.title, b.height) for b in chart.bars] == [
        ("2 min ago: 2 extension", 80.0), ("2 min ago: 2 queue", 80.0), ("this minute: 1 mobile", 40.0)]
    extension, queue, mobile = chart.bars
    assert queue.y + queue.height == extension.y  # stacked
    assert extension.y + extension.height == mobile.y + mobile.height == chart.top + chart.plot_height
    assert chart.legend == [("extension", "#2f6fb0", 2), ("mobile", "#d9822b", 1), ("queue", "#5b9a3c", 2)]
    assert calls_per_minute([{}] * 60).bars == []


async def test_a_call_routed_without_the_rules_is_listed_and_says_why_it_has_no_trace(site):
    variables = await site.call("89161234567", script="rout")  # a typo in the dialplan's AGI path
    assert variables["B24_ERROR"] == "unknown_script"
    _, listing = await site.get("/calls")
    assert "unknown_script" in listing
    status, html = await site.get(re.search(r'href="(/calls/\d+)"', listing).group(1))
    assert status == 200 and 'id="no-trace"' in html and "(unknown_script)" in html
