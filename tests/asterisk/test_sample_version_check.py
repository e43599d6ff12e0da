"""The plain sample's version check: Queue() takes its gosub in a place that depends on the
Asterisk version, which the sample reads with VERSION() from func_version.so. An Asterisk
without that module gives an empty version; the sample then says so with a WARNING in the
Asterisk log on every call that reaches a queue, instead of silently taking Asterisk 20's
argument order (asterisk-samples/README.md, "What Asterisk needs loaded").
"""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.testing.ami_calls import CallDriver
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx
from tests.conftest import until

from .conftest import TEST_DIALPLAN, TEST_QUEUES, running_pbx
from .crm import crm_object, fresh_phone
from .sample_calls import joined_queue, sample_call

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

WARNING = "agi-bitrix sample: VERSION(ASTERISK_VERSION_NUM) is empty - load func_version.so in modules.conf"


def warnings_logged(pbx: AsteriskPbx) -> list[str]:
    """The sample's WARNING lines in this Asterisk's messages.log so far (a line logged at level
    WARNING, not the VERBOSE line that shows Log() being executed)."""
    log = pbx.host_home / "log" / "messages.log"
    if not log.exists():
        return []
    return [line for line in log.read_text(errors="replace").splitlines() if " WARNING[" in line and WARNING in line]


@pytest.fixture(scope="module")
def pbx_without_version(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    """The session's dialplan on an Asterisk that has unloaded func_version.so."""
    running = running_pbx(asterisk_root, asterisk_build, "no-version", TEST_DIALPLAN, TEST_QUEUES)
    pbx = next(running)
    pbx.cli("module unload func_version.so")
    assert "func_version" not in pbx.cli("module show like func_version")
    yield pbx
    next(running, None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def calls_without_version(pbx_without_version: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(pbx_without_version.ami_port, pbx_without_version.ami_username,
                                      pbx_without_version.ami_secret)
    yield driver
    driver.close()


async def test_without_func_version_the_sample_warns_in_the_asterisk_log(
        pbx_without_version, calls_without_version, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(64, "PAUSED", extension="164")])

    call = sample_call(calls_without_version, "agi-bitrix-incoming", server.url, phone)

    # The call still reaches the queue; the log says why the queue's options may be wrong.
    assert await joined_queue(calls_without_version, call) == "support"
    await until(lambda: warnings_logged(pbx_without_version), timeout=10, what="the sample's WARNING")


async def test_with_func_version_the_sample_does_not_warn(pbx, calls, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(65, "PAUSED", extension="165")])

    call = sample_call(calls, "agi-bitrix-incoming", server.url, phone)

    assert await joined_queue(calls, call) == "support"
    assert warnings_logged(pbx) == []
