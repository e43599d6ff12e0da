"""The admin page in a real browser: Debian's chromium, driven through chromedriver by Selenium.

The server and the portal emulator run in a thread of their own (Selenium blocks), over real
sockets. Each page's screenshot is kept in the folder this module prints (AGI_BITRIX_ARTIFACTS,
default .test-artifacts/admin-page in the project). scripts/test installs chromium and
chromium-driver as root; without them the tests are skipped locally and fail under CI=true.
"""

import asyncio
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agi_bitrix.app import Application
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from agi_bitrix.testing.portal_oauth import OAuthServer
from agi_bitrix.testing.sample_data import SAMPLE_CRM
from tests.conftest import call_requests, make_config
from tests.network import free_port
from tests.test_oauth import CLIENT_ID, CLIENT_SECRET, oauth_config
from tests.test_web import HOSTILE_CRM, HOSTILE_INNER, HOSTILE_MOBILE, HOSTILE_PHONE, TOKEN

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = Path(os.environ.get("AGI_BITRIX_ARTIFACTS", Path(__file__).resolve().parents[1] / ".test-artifacts"))
SCREENSHOTS = ARTIFACTS / "admin-page"
# Headless as root on a machine without a network: no sandbox (root), and nothing that phones home.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")


def _missing_browser() -> str:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    return f"{' and '.join(missing)} not installed (scripts/test installs chromium and chromium-driver as root)" \
        if missing else ""


class LiveServer:
    """The application (metrics listener and admin page) and the emulator on a loop in a thread;
    with `oauth_folder`, as an OAuth application whose token file there holds `refresh_token`
    (None: a refresh token the token server issued)."""

    def __init__(self, *, listen: str = "127.0.0.1", crm: dict | None = None, oauth_folder: Path | None = None,
                 refresh_token: str | None = None) -> None:
        self.port = free_port()
        self.listen = listen
        self.base = f"http://127.0.0.1:{self.port}"
        self.oauth_server: OAuthServer | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.thread.start()
        self.portal, self.app, self.agi = self.run(self._start(HOSTILE_CRM if crm is None else crm, oauth_folder,
                                                               refresh_token))
        self.pages = self.app.pages  # the AdminPages behind the routes

    async def _start(self, crm: dict, oauth_folder: Path | None,
                     refresh_token: str | None) -> tuple[PortalEmulator, Application, tuple[str, int]]:
        portal = PortalEmulator(crm)
        await portal.start()
        metrics = f'"{self.listen}:{self.port}"'
        if oauth_folder is None:
            config = make_config(portal.webhook_url, metrics=metrics)
        else:
            self.oauth_server = await OAuthServer(portal, client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
            token_file = oauth_folder / "oauth.json"
            token_file.write_text(json.dumps({"refresh_token": refresh_token or self.oauth_server.issue_tokens()[1]}))
            config = oauth_config(self.oauth_server, token_file, oauth_folder, metrics=metrics)
        app = Application(config)
        return portal, app, await app.start("127.0.0.1", 0)

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, callerid: str, **header: str) -> dict[str, str]:
        return self.run(fake_call(*self.agi, callerid=callerid, **header)).variables

    def close(self) -> None:
        async def stop() -> None:
            await self.app.stop()
            if self.oauth_server is not None:
                await self.oauth_server.stop()
            await self.portal.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    missing = _missing_browser()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI does not run without the browser tests")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nadmin page screenshots: {SCREENSHOTS}")
    with tempfile.TemporaryDirectory(prefix="agi-bitrix-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        # Both paths given: Selenium Manager is not asked to find or fetch anything.
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        driver.set_page_load_timeout(20)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


def screenshot(driver, name: str) -> None:
    # The whole page, however long: the window is stretched to the document's height first
    # (plus what the window itself takes, which headless Chromium counts too).
    height, frame = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]")
    driver.set_window_size(1280, min(height, 4000) + frame)
    assert driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def until_url(driver, url: str) -> None:
    """A click that submits a form returns before the next page is there: wait for it."""
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(driver, 10).until(lambda d: d.current_url == url, f"the browser never reached {url}")


def by_css(driver, selector: str):
    """The element, waited for: after a click it may come with the next page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    return WebDriverWait(driver, 10).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector)),
                                           f"no {selector} on {driver.current_url}")


def all_by_css(driver, selector: str) -> list:
    """The elements on the page as it is now (none is a fine answer)."""
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_a_routed_call_appears_in_the_list_and_a_click_shows_its_trace(browser, live):
    for callerid in ("89161234567", "89262345678", "84957654321", "anonymous", "89990001122"):
        live.call(callerid, extension="74950000000")
    live.call("89161234567", uniqueid="1700000000.99", extension="74951112233")
    browser.get(live.base + "/")
    assert by_css(browser, "#overall").text == "ok"
    assert "answering" in by_css(browser, "#portal").text
    assert len(all_by_css(browser, "#chart rect.bar")) >= 2  # extension, mobile and queue stacked
    screenshot(browser, "now")
    browser.get(live.base + "/calls")
    rows = all_by_css(browser, "#calls tr.call")
    assert len(rows) == 6
    cells = [c.text for c in rows[0].find_elements("css selector", "td")]
    assert cells[1:8] == ["79161234567", "74951112233", "Иван Петров (CONTACT 12)", "FOUND", "queue", "sales",
                          "sales-did"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0])  # the date too, not only the time
    assert browser.find_element("css selector", 'meta[http-equiv="refresh"]').get_attribute("content") == "10"
    screenshot(browser, "calls")
    # Anywhere on the row leads to the call, not only its time: a click at the CRM cell's middle
    # (Selenium's element click would refuse, seeing the row's link over the cell: that is the point).
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(rows[0].find_elements("css selector", "td")[3]).click().perform()
    until_url(browser, live.base + "/calls/6")
    trace = by_css(browser, "#trace").text
    assert "  => sales-did: matched CONTACT 12; dials queue sales" in trace
    assert "B24_RULE           = sales-did" in trace
    assert "1700000000.99" in browser.page_source
    screenshot(browser, "call")


def test_try_a_number_shows_the_decision(browser, live):
    browser.get(live.base + "/try")
    by_css(browser, "input[name=number]").send_keys("+7 495 765-43-21")
    by_css(browser, "button[type=submit]").click()
    trace = by_css(browser, "#trace").text  # only the answer to the POST has it
    assert "answer:   FOUND, 1 CRM object(s)" in trace
    assert "  => owner-day-over: matched COMPANY 4; dials owner's mobile" in trace
    assert "B24_TARGET         = 79035551234" in trace
    assert len(call_requests(live.portal)) == 1
    screenshot(browser, "try")
    browser.get(live.base + "/rules")
    names = [row.find_elements("css selector", "td")[1].text.split("\n")[0]
             for row in all_by_css(browser, "#rules tr")[1:]]
    assert names == ["sales-did", "owner-on-break", "owner-at-work", "owner-day-over", "fallback"]
    screenshot(browser, "rules")


def test_a_hostile_crm_value_is_shown_as_text(browser, live):
    live.call("8" + HOSTILE_PHONE[1:], uniqueid='<img id="from-header" src="x">')
    live.call("89997776655")  # the sample CRM's extension 120&Local/666@evil
    browser.get(live.base + "/calls")
    all_by_css(browser, "#calls tr.call a")[1].click()
    until_url(browser, live.base + "/calls/1")
    trace = by_css(browser, "#trace").text
    assert f"inner={HOSTILE_INNER!r}" in trace
    assert f"mobile={HOSTILE_MOBILE!r}" in trace
    assert all_by_css(browser, "#trace *") == []  # the values stayed text: no element was made of them
    assert all_by_css(browser, "script, img, #injected, #from-header") == []
    assert browser.execute_script("return window.injected") is None
    assert '<img id="from-header" src="x">' in by_css(browser, "main .card").text
    screenshot(browser, "hostile")
    browser.back()
    until_url(browser, live.base + "/calls")
    all_by_css(browser, "#calls tr.call a")[0].click()
    until_url(browser, live.base + "/calls/2")
    assert "inner='120&Local/666@evil'" in by_css(browser, "#trace").text


def test_without_the_token_the_page_is_refused(browser, monkeypatch):
    monkeypatch.setenv("AGI_BITRIX_ADMIN_TOKEN", TOKEN)
    server = LiveServer(listen="0.0.0.0")
    try:
        server.call("89161234567")
        browser.delete_all_cookies()
        browser.get(server.base + "/calls")
        assert browser.current_url.startswith(server.base + "/login")
        assert all_by_css(browser, "#calls") == [] and "79161234567" not in browser.page_source
        by_css(browser, "input[name=token]").send_keys("not-the-token-at-all")
        by_css(browser, "button[type=submit]").click()
        assert by_css(browser, "#problem").text == "wrong token"  # only the answer to the POST has it
        screenshot(browser, "login-refused")
        by_css(browser, "input[name=token]").send_keys(TOKEN)
        by_css(browser, "button[type=submit]").click()
        until_url(browser, server.base + "/calls")
        assert len(all_by_css(browser, "#calls tr.call")) == 1
        browser.delete_all_cookies()
        browser.get(server.base + "/rules")
        assert browser.current_url.startswith(server.base + "/login")
    finally:
        browser.delete_all_cookies()
        server.close()


def test_the_list_of_calls_reloads_itself_without_a_script(browser, live):
    live.pages.refresh_seconds = 1  # 10 s on a real server; the same meta refresh
    browser.get(live.base + "/calls")
    assert by_css(browser, "#no-calls")
    live.call("89161234567")
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(browser, 10).until(lambda d: len(all_by_css(d, "#calls tr.call")) == 1,
                                     "the list never showed the new call by itself")
    assert all_by_css(browser, "script") == []


# CRM values with no place to break: the owner's mobile and the contact's name, one word each.
LONG_MOBILE = "9" * 20 + "x" * 380
LONG_NAME = "Y" * 300
LONG_CRM = {**SAMPLE_CRM, "79990000777": [{
    "CRM_ENTITY_TYPE": "CONTACT", "CRM_ENTITY_ID": 77, "ASSIGNED_BY_ID": 15, "NAME": LONG_NAME,
    "ASSIGNED_BY": {"ID": "15", "TIMEMAN_STATUS": "OPENED", "USER_PHONE_INNER": "",
                    "PERSONAL_MOBILE": LONG_MOBILE, "WORK_PHONE": "", "PERSONAL_PHONE": None}}]}


def sideways(driver) -> bool:
    return driver.execute_script(
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth")


def test_a_long_crm_value_wraps_in_the_trace_instead_of_scrolling_sideways(browser):
    server = LiveServer(crm=LONG_CRM)
    try:
        server.call("89990000777")
        browser.get(server.base + "/calls")
        crm = all_by_css(browser, "#calls td.crm")[0]
        assert crm.text == LONG_NAME[:59] + "…" and crm.get_attribute("title") == f"{LONG_NAME} (CONTACT 77)"
        assert not sideways(browser), "the list of calls scrolls sideways"
        browser.get(server.base + "/calls/1")
        assert by_css(browser, "#crm").text.replace("\n", "") == f"{LONG_NAME} (CONTACT 77)"
        trace = by_css(browser, "#trace")
        assert LONG_MOBILE in trace.text.replace("\n", "")
        # Neither the page nor the trace's own box scrolls sideways: the value wraps.
        page_width, window_width, trace_content, trace_box = browser.execute_script(
            "const t = document.getElementById('trace');"
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " t.scrollWidth, t.clientWidth]")
        assert page_width <= window_width and trace_content <= trace_box
        screenshot(browser, "long-value")
    finally:
        server.close()


def test_the_now_page_shows_the_oauth_applications_state(browser, tmp_path):
    server = LiveServer(oauth_folder=tmp_path)
    try:
        server.call("89161234567")
        browser.get(server.base + "/")
        portal = by_css(browser, "#portal").text
        assert "REST base" in portal and "webhook" not in portal
        auth = by_css(browser, "#auth").text
        assert "oauth application" in auth and str(tmp_path / "oauth.json") in auth
        assert by_css(browser, "#auth-state").text == "ok"
        assert server.app.health()[1]["auth"]["member_id"] in auth
        assert all_by_css(browser, "#auth-advice") == []
        assert CLIENT_SECRET not in browser.page_source
    finally:
        server.close()


def test_a_rejected_refresh_token_says_what_to_do_on_the_now_page(browser, tmp_path):
    server = LiveServer(oauth_folder=tmp_path, refresh_token="refresh-stale-secret")
    try:
        assert server.call("89161234567")["B24_ERROR"] == "refresh_token_rejected"
        browser.get(server.base + "/")
        assert by_css(browser, "#auth-state").text == "refresh_token_rejected"
        advice = by_css(browser, "#auth-advice").text
        assert f"agi-bitrix oauth login -c {server.app.config.path}" in advice
        assert str(tmp_path / "oauth.json") in advice
        assert "refresh-stale-secret" not in browser.page_source and CLIENT_SECRET not in browser.page_source
        screenshot(browser, "now-oauth-rejected")
    finally:
        server.close()


def test_a_refusal_that_every_page_shares_offers_no_menu_back_to_it(browser, monkeypatch):
    monkeypatch.delenv("AGI_BITRIX_ADMIN_TOKEN", raising=False)
    server = LiveServer(listen="0.0.0.0")  # not loopback and no token: the admin page is off
    try:
        for path in ("/", "/calls", "/login"):
            browser.get(server.base + path)
            assert "not a loopback address" in by_css(browser, "#refusal").text
            assert all_by_css(browser, "header nav a, main a") == [], f"{path} links back to the refusal"
            assert by_css(browser, "#refusal-note")
        screenshot(browser, "refused")
    finally:
        server.close()


def test_a_hostile_crm_name_in_the_list_of_calls_is_text(browser):
    name = '<img id="name-injected" src="x">'  # the list shows 60 characters
    crm = {**SAMPLE_CRM, "79990000888": [{**LONG_CRM["79990000777"][0], "NAME": name, "CRM_ENTITY_ID": 88}]}
    server = LiveServer(crm=crm)
    try:
        server.call("89990000888")
        browser.get(server.base + "/calls")
        assert by_css(browser, "#calls td.crm").text == f"{name} (CONTACT 88)"
        assert all_by_css(browser, "#name-injected, img") == []
        assert browser.execute_script("return window.injected") is None
    finally:
        server.close()
