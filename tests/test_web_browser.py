"""The admin page in a real browser: Debian's chromium, driven through chromedriver by Selenium.

The server and the portal emulator run in a thread of their own (Selenium blocks), over real
sockets. Each page's screenshot is kept in the folder this module prints (AGI_BITRIX_ARTIFACTS,
default .test-artifacts/admin-page in the project). scripts/test installs chromium and
chromium-driver as root; without them the tests are skipped locally and fail under CI=true.
"""

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agi_bitrix.app import Application
from agi_bitrix.testing.fake_asterisk import fake_call
from agi_bitrix.testing.portal import PortalEmulator
from tests.conftest import make_config
from tests.network import free_port
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
    """The application (metrics listener and admin page) and the emulator on a loop in a thread."""

    def __init__(self, *, listen: str = "127.0.0.1") -> None:
        self.port = free_port()
        self.listen = listen
        self.base = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-server", daemon=True)
        self.thread.start()
        self.portal, self.app, self.agi = self.run(self._start())

    async def _start(self) -> tuple[PortalEmulator, Application, tuple[str, int]]:
        portal = PortalEmulator(HOSTILE_CRM)
        await portal.start()
        app = Application(make_config(portal.webhook_url, metrics=f'"{self.listen}:{self.port}"'))
        return portal, app, await app.start("127.0.0.1", 0)

    def run(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, callerid: str, **header: str) -> dict[str, str]:
        return self.run(fake_call(*self.agi, callerid=callerid, **header)).variables

    def close(self) -> None:
        async def stop() -> None:
            await self.app.stop()
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
    assert [c.text for c in rows[0].find_elements("css selector", "td")][1:6] == [
        "79161234567", "FOUND", "queue", "sales", "sales-did"]
    screenshot(browser, "calls")
    rows[0].find_element("css selector", "a").click()
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
    assert len(live.portal.requests) == 1
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
