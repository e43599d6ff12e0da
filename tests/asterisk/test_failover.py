"""Two agi-bitrix servers behind one Asterisk: stop (or kill) the first, and calls keep being
routed by the second. Both ways the samples show:

- the plain chain in asterisk-samples/extensions.conf: AGI_BITRIX_URL, then AGI_BITRIX_URL_BACKUP
  when no server answered (B24_RULE still empty: AGISTATUS=FAILURE, or a server that died
  mid-call);
- hagi://NAME/route: Asterisk's own failover (res/res_agi.c, launch_ha_netscript(), the same on
  branches 20 and 22) asks DNS for the SRV records _agi._tcp.NAME, orders them by priority and,
  within one priority, by a weighted random draw (main/srv.c, process_weights()), and tries each
  target until one accepts the connection. Here a dnsmasq answers those records, and the
  Asterisk that uses it sees it in its own /etc/resolv.conf (pbx_harness: a bind mount in a
  mount namespace of its own; the shared root's file is never touched).
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from agi_bitrix.testing.ami_calls import CallDriver
from agi_bitrix.testing.pbx_harness import AsteriskBuild, AsteriskPbx
from tests.conftest import until

from .conftest import TEST_DIALPLAN, TEST_QUEUES, asterisk_unavailable, running_pbx
from .crm import crm_object, fresh_phone
from .product_server import ProductServer
from .sample_calls import WAIT, joined_queue, rings, route_agi_status, sample_call
from .srv_dns import DnsUnavailable, SrvDns, SrvTarget

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

# _agi._tcp.PRIORITY_NAME: server A first (priority 10), B only when A does not answer (20).
PRIORITY_NAME = "priority.agi-bitrix.test"
# _agi._tcp.WEIGHT_NAME: C and D at one priority, half the calls each.
WEIGHT_NAME = "weight.agi-bitrix.test"


def routed_by(server: ProductServer, phone: str) -> bool:
    """Whether this server's call log has a call from `phone`."""
    return f"phone={phone} " in server.log()


async def answered_by_extension(calls: CallDriver, agi_url: str, phone: str, extension: str, **settings: str):
    call = sample_call(calls, "agi-bitrix-incoming", agi_url, phone, answering=extension, **settings)
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number=extension)
    assert rings(call) == [("extension", extension)]
    return call


# -- the plain chain -----------------------------------------------------------------------------

async def test_with_both_servers_up_the_first_routes_and_the_backup_is_not_asked(calls, portal, start_server):
    first, backup = start_server(), start_server()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(81, "OPENED", extension="181")])

    await answered_by_extension(calls, first.url, phone, "181", AGI_BITRIX_URL_BACKUP=backup.url)

    assert (routed_by(first, phone), routed_by(backup, phone)) == (True, False)


async def test_with_the_first_server_stopped_the_backup_routes_the_call(calls, portal, start_server):
    first, backup = start_server(), start_server()
    first.stop()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(82, "OPENED", extension="182")])

    call = await answered_by_extension(calls, first.url, phone, "182", AGI_BITRIX_URL_BACKUP=backup.url)

    assert route_agi_status(call) == "FAILURE"
    assert routed_by(backup, phone)


async def test_with_the_first_server_dying_mid_call_the_backup_routes_the_call(calls, portal, start_server):
    """A server killed mid-call leaves AGISTATUS=SUCCESS and nothing set: the empty B24_RULE
    still sends the call to the backup, which routes it by the CRM instead of by the defaults."""
    doomed, backup = start_server(), start_server()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(83, "OPENED", extension="183")])
    portal.fail("hang", phone=phone)
    try:
        call = sample_call(calls, "agi-bitrix-incoming", doomed.url, phone, answering="183",
                           AGI_BITRIX_URL_BACKUP=backup.url)
        await until(lambda: any(phone in str(request.params) for request in portal.requests), WAIT, interval=0.05,
                    what="the portal to be asked")
        doomed.crash()
    finally:
        # No await since the kill: the backup's question, if already sent, is read only after this.
        portal.reset_faults()
    await calls.wait_for(call, "AgiBitrixTestAnswered", WAIT, Number="183")

    assert rings(call) == [("extension", "183")]
    assert routed_by(backup, phone)


async def test_with_no_server_answering_the_chain_ends_at_the_safe_defaults(calls, portal, start_server):
    first, backup = start_server(), start_server()
    first.stop()
    backup.stop()
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(84, "OPENED", extension="184")])

    call = sample_call(calls, "agi-bitrix-incoming", first.url, phone, AGI_BITRIX_URL_BACKUP=backup.url,
                       AGI_BITRIX_QUEUE="sales")

    assert await joined_queue(calls, call) == "sales"
    assert rings(call) == []


# -- hagi:// and DNS SRV -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv_servers(start_server, asterisk_build: AsteriskBuild) -> dict[str, ProductServer]:
    """A and B behind PRIORITY_NAME, C and D behind WEIGHT_NAME; new ones for each Asterisk."""
    return {name: start_server() for name in "ABCD"}


@pytest.fixture(scope="module")
def srv_dns(srv_servers: dict[str, ProductServer], tmp_path_factory, asterisk_root: Path) -> Iterator[SrvDns]:
    servers = srv_servers
    dns = SrvDns({
        PRIORITY_NAME: [SrvTarget(servers["A"].port, 10, 0), SrvTarget(servers["B"].port, 20, 0)],
        WEIGHT_NAME: [SrvTarget(servers["C"].port, 10, 50), SrvTarget(servers["D"].port, 10, 50)],
    }, tmp_path_factory.mktemp("dns") / "dnsmasq.log")
    try:
        dns.start()
    except DnsUnavailable as error:
        asterisk_unavailable(str(error))
    yield dns
    dns.stop()


@pytest.fixture(scope="module")
def srv_pbx(asterisk_root: Path, asterisk_build: AsteriskBuild, srv_dns: SrvDns) -> Iterator[AsteriskPbx]:
    """The plain-Asterisk sample's Asterisk, with the test's DNS server as its resolver."""
    yield from running_pbx(asterisk_root, asterisk_build, "srv", TEST_DIALPLAN, TEST_QUEUES, srv_dns.resolv_conf)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def srv_calls(srv_pbx: AsteriskPbx) -> AsyncIterator[CallDriver]:
    driver = await CallDriver.connect(srv_pbx.ami_port, srv_pbx.ami_username, srv_pbx.ami_secret)
    yield driver
    driver.close()


async def test_hagi_routes_by_the_first_srv_target_and_by_the_second_once_it_is_stopped(
        srv_calls, srv_dns, srv_servers, portal):
    first, second = srv_servers["A"], srv_servers["B"]
    agi_url = f"hagi://{PRIORITY_NAME}/route"
    before, after = fresh_phone(), fresh_phone()
    portal.set_client(before, [crm_object(85, "OPENED", extension="185")])
    portal.set_client(after, [crm_object(86, "OPENED", extension="186")])

    await answered_by_extension(srv_calls, agi_url, before, "185")
    first.stop()
    call = await answered_by_extension(srv_calls, agi_url, after, "186")

    assert (routed_by(first, before), routed_by(second, before)) == (True, False)
    assert (routed_by(first, after), routed_by(second, after)) == (False, True)
    # Asterisk found B through the SRV records, not by chance: it asked for them each call.
    assert srv_dns.queries(PRIORITY_NAME) >= 2
    assert route_agi_status(call) == "SUCCESS"


async def test_hagi_shares_calls_between_srv_targets_of_one_priority_by_weight(srv_calls, srv_servers, portal):
    third, fourth = srv_servers["C"], srv_servers["D"]
    phones = [fresh_phone() for _ in range(16)]
    for phone in phones:
        portal.set_client(phone, [crm_object(87, "OPENED", extension="187")])

    await asyncio.gather(*(answered_by_extension(srv_calls, f"hagi://{WEIGHT_NAME}/route", phone, "187")
                           for phone in phones))

    by_third = sum(routed_by(third, phone) for phone in phones)
    by_fourth = sum(routed_by(fourth, phone) for phone in phones)
    # 50/50 weights: all 16 on one server has a chance of 2 in 65,536.
    assert by_third + by_fourth == len(phones)
    assert by_third > 0 and by_fourth > 0
