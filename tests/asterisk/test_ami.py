"""agi_bitrix.ami against a real Asterisk 20 and 22, logged in as the minimal AMI user docs/ami.md
gives (read = call, write = originate; pbx_harness writes it): Originates that answer, ring out
and are busy, with the OriginateResponse Reason Asterisk sends for each; Asterisk killed and
started again, and the client back by itself; a wrong secret said plainly.

Each build gets an Asterisk of its own here (the tests kill it), with the contexts below.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.ami.client import AmiClient
from agi_bitrix.ami.errors import ActionFailed, AmiUnavailable, OriginateOutcomeUnknown
from agi_bitrix.ami.originate import OriginateReason, OriginateRequest, originate
from agi_bitrix.ami.settings import AmiSettings
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx

from .conftest import running_pbx

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(180)]

AMI_DIALPLAN = r"""
[general]
autofallthrough = yes

; The first leg of each Originate: a Local channel into one of these.
[agi-bitrix-ami-answers]
exten => s,1,Answer()
 same => n,Wait(1)
 same => n,Hangup()

[agi-bitrix-ami-rings]
exten => s,1,Ringing()
 same => n,Wait(60)

[agi-bitrix-ami-busy]
exten => s,1,Busy(5)

; Where an answered first leg goes.
[agi-bitrix-ami-then]
exten => s,1,Wait(1)
 same => n,Hangup()
"""


@pytest.fixture(scope="module")
def ami_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild) -> Iterator[AsteriskPbx]:
    yield from running_pbx(asterisk_root, asterisk_build, "ami", AMI_DIALPLAN, "")


def settings_for(pbx: AsteriskPbx) -> AmiSettings:
    return AmiSettings(port=pbx.ami_port, username=pbx.ami_originate_username, secret_file="", connect_timeout=5.0,
                       action_timeout=5.0, reconnect_first=0.1, reconnect_max=0.5)


@pytest_asyncio.fixture(loop_scope="session")
async def client(ami_pbx: AsteriskPbx) -> AsyncIterator[AmiClient]:
    client = AmiClient(settings_for(ami_pbx), lambda: ami_pbx.ami_originate_secret)
    client.start()
    assert await client.wait_up(10), client.health()
    yield client
    await client.stop()


def request(first_leg_context: str, timeout: float = 10.0) -> OriginateRequest:
    return OriginateRequest(channel=f"Local/s@{first_leg_context}", context="agi-bitrix-ami-then", exten="s",
                            timeout=timeout, variables={"__AGI_BITRIX_TEST": "ami"})


async def test_login_as_the_minimal_user_and_an_answered_originate_is_success(client):
    assert client.health()["up"] is True
    assert client.health()["ami_version"]

    result = await originate(client, request("agi-bitrix-ami-answers"))

    assert (result.success, result.reason) == (True, OriginateReason.ANSWERED)
    assert result.channel.startswith("Local/s@agi-bitrix-ami-answers")


async def test_an_originate_nobody_answers_fails_with_reason_ringing_after_its_timeout(client):
    started = time.monotonic()
    result = await originate(client, request("agi-bitrix-ami-rings", timeout=1.5))

    assert (result.success, result.reason, result.reason_name) == (False, OriginateReason.RINGING, "ringing")
    assert 1.4 < time.monotonic() - started < 5


async def test_a_busy_first_leg_fails_with_reason_busy(client):
    result = await originate(client, request("agi-bitrix-ami-busy"))

    assert (result.success, result.reason) == (False, OriginateReason.BUSY)


async def test_an_originate_into_a_missing_extension_is_refused_by_asterisk(client):
    missing = OriginateRequest(channel="Local/s@agi-bitrix-ami-answers", context="agi-bitrix-ami-then",
                               exten="404", timeout=5)
    with pytest.raises(ActionFailed, match="Extension does not exist"):
        await originate(client, missing)
    assert client.up


async def test_the_minimal_user_may_not_run_a_system_application(client):
    # write = originate without `system`: Originate to System() is refused (main/manager.c,
    # originate_app_permissions).
    shell = OriginateRequest(channel="Local/s@agi-bitrix-ami-answers", application="System", data="true")
    with pytest.raises(ActionFailed, match="Originate Access Forbidden"):
        await originate(client, shell)


async def test_the_minimal_user_may_not_run_cli_commands(client):
    # write = originate allows the Originate action alone (the only action main/manager.c
    # registers with EVENT_FLAG_ORIGINATE): a leaked secret cannot stop Asterisk.
    with pytest.raises(ActionFailed, match="Permission denied"):
        await client.send("Command", [("Command", "core show uptime")])
    assert client.up


async def test_asterisk_killed_and_started_again_the_client_reconnects_and_the_next_originate_works(
        client, ami_pbx):
    ringing = asyncio.create_task(originate(client, request("agi-bitrix-ami-rings", timeout=30)))
    await asyncio.sleep(0.5)  # queued: now waiting for its OriginateResponse
    killed_at = time.monotonic()
    ami_pbx.kill()

    # The waiting Originate fails at once, saying its outcome is unknown (never resent).
    with pytest.raises(OriginateOutcomeUnknown):
        await asyncio.wait_for(ringing, 5)
    assert time.monotonic() - killed_at < 2
    assert client.up is False and client.health()["reason"]
    with pytest.raises(AmiUnavailable):
        await originate(client, request("agi-bitrix-ami-answers"))

    await asyncio.to_thread(ami_pbx.start)
    assert await client.wait_up(10), client.health()
    assert client.health()["reconnects"] == 1
    result = await originate(client, request("agi-bitrix-ami-answers"))
    assert (result.success, result.reason) == (True, OriginateReason.ANSWERED)


async def test_a_wrong_secret_keeps_the_client_down_and_health_says_why(ami_pbx):
    wrong = AmiClient(settings_for(ami_pbx), lambda: "not-the-secret")
    wrong.start()
    try:
        assert await wrong.wait_up(3) is False
        health = wrong.health()
        assert health["up"] is False
        assert "refused the login" in str(health["reason"]) and "agi-bitrix-originate" in str(health["reason"])
        assert "not-the-secret" not in str(health)
        with pytest.raises(AmiUnavailable, match="refused the login"):
            await originate(wrong, request("agi-bitrix-ami-answers"))
    finally:
        await wrong.stop()
