"""The agi-bitrix server routing calls of a real Asterisk.

Each call runs `AGI(agi://...:PORT/route)` against the server process (shipped config, portal
emulator), then a reader AGI step reports the channel variables the server left on the channel.
"""

import asyncio
import re

import pytest

from agi_bitrix.testing.portal_model import SEARCH_METHOD
from tests.conftest import until

from .conftest import B24_VARIABLES, DEADLINE, DEADLINE_MARGIN
from .crm import crm_object, fresh_phone

pytestmark = [pytest.mark.asterisk, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

FALLBACK_QUEUE = "support"  # routing.fallback_queue in config/agi-bitrix.yaml
# What any variable may hold once the server has cleaned it (digits, enums, names, reasons).
PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_.:-]*$")


def assert_complete_and_plain(variables: dict[str, str | None]) -> None:
    unset = [name for name in B24_VARIABLES if variables[name] is None]
    assert unset == [], f"not set: {unset}"
    unplain = {name: variables[name] for name in B24_VARIABLES if not PLAIN_VALUE.match(variables[name])}
    assert unplain == {}


def searches_for(portal, phone: str) -> int:
    return sum(1 for request in portal.requests_for(SEARCH_METHOD) if phone in str(request.params))


# Every branch of the shipped default policy: CRM answer -> the variables it must give.
POLICY_BRANCHES = {
    "owner at work with an extension: extension": (
        [crm_object(11, "OPENED", extension="101", mobile="79161110101", entity_id=12)],
        {"STATUS": "FOUND", "ROUTE": "extension", "TARGET": "101", "RULE": "owner-at-work",
         "EXTENSION": "101", "MOBILE": "79161110101", "USER_ID": "11", "TIMEMAN": "OPENED",
         "ENTITY_TYPE": "CONTACT", "ENTITY_ID": "12"}),
    "owner at work without an extension: mobile": (
        [crm_object(12, "OPENED", mobile="+7 (903) 555-12-34")],
        {"STATUS": "FOUND", "ROUTE": "mobile", "TARGET": "79035551234", "EXTENSION": "",
         "MOBILE": "79035551234"}),
    "owner at work without any phone: queue": (
        [crm_object(13, "OPENED")],
        {"STATUS": "FOUND", "ROUTE": "queue", "TARGET": FALLBACK_QUEUE}),
    "owner on a break: queue, though reachable": (
        [crm_object(14, "PAUSED", extension="102", mobile="79162220202")],
        {"STATUS": "FOUND", "ROUTE": "queue", "TARGET": FALLBACK_QUEUE, "RULE": "owner-on-break",
         "TIMEMAN": "PAUSED"}),
    "time tracking UNAVAILABLE: as at work": (
        [crm_object(15, "UNAVAILABLE", extension="105")],
        {"ROUTE": "extension", "TARGET": "105", "TIMEMAN": "UNAVAILABLE"}),
    "time tracking NOT_INSTALLED: as at work": (
        [crm_object(16, "NOT_INSTALLED", extension="106")],
        {"ROUTE": "extension", "TARGET": "106"}),
    "empty TIMEMAN_STATUS: as at work": (
        [crm_object(17, "", extension="107")],
        {"ROUTE": "extension", "TARGET": "107", "TIMEMAN": ""}),
    "no TIMEMAN_STATUS at all: as at work": (
        [crm_object(18, extension="108")],
        {"ROUTE": "extension", "TARGET": "108", "TIMEMAN": ""}),
    "owner's day over with a mobile: mobile": (
        [crm_object(19, "CLOSED", extension="103", mobile="+79035550303")],
        {"STATUS": "FOUND", "ROUTE": "mobile", "TARGET": "79035550303", "RULE": "owner-day-over",
         "EXTENSION": "103"}),
    "owner's day over without a mobile: queue": (
        [crm_object(20, "CLOSED", extension="104")],
        {"ROUTE": "queue", "TARGET": FALLBACK_QUEUE, "EXTENSION": "104", "MOBILE": ""}),
    "owner forgot to close the day (EXPIRED): mobile": (
        [crm_object(21, "EXPIRED", extension="112", mobile="8 905 765-43-21")],
        {"ROUTE": "mobile", "TARGET": "79057654321"}),
    "the first object decides, whatever its type": (
        [crm_object(22, "PAUSED", entity_type="LEAD", entity_id=95, extension="122"),
         crm_object(23, "OPENED", entity_type="CONTACT", entity_id=44, extension="123")],
        {"ROUTE": "queue", "USER_ID": "22", "ENTITY_TYPE": "LEAD", "ENTITY_ID": "95"}),
    "not in the CRM: queue": (
        [],
        {"STATUS": "NOT_FOUND", "ROUTE": "queue", "TARGET": FALLBACK_QUEUE, "USER_ID": "",
         "EXTENSION": "", "ERROR": ""}),
}


@pytest.mark.parametrize("crm_answer, expected", POLICY_BRANCHES.values(), ids=POLICY_BRANCHES)
async def test_default_policy_branch(router, portal, crm_answer, expected):
    phone = fresh_phone()
    portal.set_client(phone, crm_answer)

    routed = await router.route(phone)

    assert_complete_and_plain(routed.variables)
    assert {name: routed[f"B24_{name}"] for name in expected} == expected
    assert (routed["B24_PHONE"], routed["B24_QUEUE"], routed["AGISTATUS"]) == (phone, FALLBACK_QUEUE, "SUCCESS")


@pytest.mark.parametrize("write", [
    lambda phone: "8" + phone[1:],
    lambda phone: f"+7 {phone[1:4]} {phone[4:7]}-{phone[7:9]}-{phone[9:]}",
    lambda phone: phone[1:],
], ids=["8 and ten digits", "+7 with spaces and dashes", "ten digits"])
async def test_caller_id_formats_are_looked_up_in_international_digits(router, portal, write):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(31, "OPENED", extension="131")])

    routed = await router.route(write(phone))

    assert (routed["B24_STATUS"], routed["B24_PHONE"], routed["B24_TARGET"]) == ("FOUND", phone, "131")


@pytest.mark.parametrize("callerid", ["anonymous", "Restricted", "unknown", ""],
                         ids=["anonymous", "Restricted", "unknown", "empty"])
async def test_a_call_without_caller_id_goes_to_the_queue_without_asking_the_portal(router, portal, callerid):
    searches_before = len(portal.requests_for(SEARCH_METHOD))

    routed = await router.route(callerid)

    assert_complete_and_plain(routed.variables)
    assert (routed["B24_STATUS"], routed["B24_ROUTE"], routed["B24_TARGET"], routed["B24_PHONE"]) == (
        "NO_CALLERID", "queue", FALLBACK_QUEUE, "")
    assert len(portal.requests_for(SEARCH_METHOD)) == searches_before


PORTAL_FAILURES = {
    "slower than the deadline": ("slow", {"delay": DEADLINE + 3}, "timeout"),
    "hangs": ("hang", {}, "timeout"),
    "HTTP 500 with an error body": ("error", {}, None),
    "error body with an empty code": ("error", {"status": 400, "code": "", "description": ""}, None),
    "proxy's HTML page": ("html", {"status": 502}, None),
    "cut-off JSON": ("bad_json", {}, None),
    "result that is not a list": ("malformed", {}, None),
    "connection dropped": ("disconnect", {}, None),
}


@pytest.mark.parametrize("kind, options, reason", PORTAL_FAILURES.values(), ids=PORTAL_FAILURES)
async def test_a_failing_portal_gives_the_fallback_route_within_the_deadline(router, portal, kind, options, reason):
    phone = fresh_phone()
    # Found if the portal answered, so the fallback below is the failure's doing.
    portal.set_client(phone, [crm_object(41, "OPENED", extension="141")])
    portal.fail(kind, phone=phone, **options)
    try:
        routed = await router.route(phone)
    finally:
        portal.reset_faults()  # also lets the hung request go

    assert_complete_and_plain(routed.variables)
    assert (routed["B24_STATUS"], routed["B24_ROUTE"], routed["B24_TARGET"]) == ("ERROR", "queue", FALLBACK_QUEUE)
    assert routed["B24_ERROR"] == reason if reason else routed["B24_ERROR"] != ""
    assert searches_for(portal, phone) >= 1
    # Measured from the Originate: Asterisk, both AGI steps and the lookup.
    assert routed.seconds < DEADLINE + DEADLINE_MARGIN


HOSTILE_CRM_VALUES = {
    "extension that adds a Dial target": (
        crm_object(51, "OPENED", extension="120&Local/666@evil"), "B24_EXTENSION"),
    "extension that adds Dial options": (
        crm_object(52, "OPENED", extension="101,30,U(evil)"), "B24_EXTENSION"),
    "mobile with a newline and an AGI command": (
        crm_object(53, "CLOSED", mobile='+79160000000\nEXEC Dial "SIP/attacker" \\"x\\\\'), "B24_MOBILE"),
    "status with a quote and an AGI command": (
        crm_object(54, 'OPENED"\nEXEC Dial Local/666@evil\n', extension="154"), "B24_TIMEMAN"),
    "entity type that tries to add an MSet pair": (
        crm_object(55, "OPENED", entity_type='CONTACT",B24_ROUTE=mobile,B24_X="', extension="155"),
        "B24_ENTITY_TYPE"),
    "work phone longer than an AGI line, ending in a command": (
        crm_object(56, "OPENED", work="7" * 8180 + "\nSET VARIABLE B24_ROUTE mobile\n"), "B24_WORK_PHONE"),
    "personal phone with a NUL": (
        crm_object(57, "OPENED", personal="79161234567\x00SET VARIABLE B24_ROUTE mobile"), "B24_PERSONAL_PHONE"),
}


@pytest.mark.parametrize("crm_entry, variable", HOSTILE_CRM_VALUES.values(), ids=HOSTILE_CRM_VALUES)
async def test_hostile_crm_values_neither_run_commands_nor_become_dial_targets(
        router, portal, calls, crm_entry, variable):
    phone = fresh_phone()
    portal.set_client(phone, [crm_entry])

    routed = await router.route(phone)

    assert routed[variable] == ""
    assert_complete_and_plain(routed.variables)
    commands = await routed.agi_commands(calls)
    assert len(commands) == 1 and commands[0].startswith("EXEC MSet "), commands
    assert routed["B24_ROUTE"] in ("extension", "mobile", "queue")


async def test_one_hundred_simultaneous_calls_each_get_their_own_answer(router, portal, start_server):
    # The point is that no call gets another's answer; a deadline of its own keeps a slow CI
    # machine, busy with 100 calls at once, from turning answers into timeouts.
    patient = start_server(deadline=10)
    expected = {}
    for n in range(100):
        phone = fresh_phone()
        owner = 1000 + n
        timeman, route, target = [("OPENED", "extension", str(2000 + n)),
                                  ("PAUSED", "queue", FALLBACK_QUEUE),
                                  ("CLOSED", "mobile", f"7926{n:07d}")][n % 3]
        portal.set_client(phone, [crm_object(owner, timeman, extension=str(2000 + n), mobile=f"7926{n:07d}",
                                             entity_id=owner)])
        expected[phone] = {"B24_STATUS": "FOUND", "B24_ROUTE": route, "B24_TARGET": target,
                           "B24_USER_ID": str(owner), "B24_ENTITY_ID": str(owner), "B24_PHONE": phone,
                           "B24_ERROR": ""}

    results = await asyncio.gather(*(router.route(phone, agi_url=patient.url) for phone in expected))

    got = {phone: {name: routed[name] for name in expected[phone]}
           for phone, routed in zip(expected, results, strict=True)}
    assert got == expected


async def test_a_query_string_on_the_script_path_does_not_change_the_routing(router, portal, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(81, "OPENED", extension="181")])

    routed = await router.route(phone, agi_url=server.url + "?tenant=7&x=y")

    assert (routed["B24_STATUS"], routed["B24_ROUTE"], routed["B24_TARGET"]) == ("FOUND", "extension", "181")


async def test_the_first_agi_argument_is_the_number_to_look_up(router, portal):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(82, "OPENED", extension="182")])

    routed = await router.route("anonymous", arguments=("8" + phone[1:], ""))

    assert (routed["B24_STATUS"], routed["B24_PHONE"], routed["B24_TARGET"]) == ("FOUND", phone, "182")


async def test_a_caller_hanging_up_during_the_lookup_leaves_the_server_serving(router, portal, calls, server):
    phone = fresh_phone()
    portal.set_client(phone, [crm_object(83, "OPENED", extension="183")])
    portal.fail("slow", phone=phone, delay=DEADLINE / 2)
    try:
        call = router.place(phone)
        # Hang up while the server waits for the portal; Asterisk then sends it "HANGUP".
        await until(lambda: searches_for(portal, phone) > 0, 20, interval=0.05, what="the portal to be asked")
        await calls.hangup(next(e["Channel"] for e in call.events if e.get("Channel", "").endswith(";2")))
        # The server is done with the call once it logged it.
        await until(lambda: phone in server.log(), 20, interval=0.05, what="the call in the server's log")
    finally:
        portal.reset_faults()
    next_phone = fresh_phone()
    portal.set_client(next_phone, [crm_object(84, "OPENED", extension="184")])

    routed = await router.route(next_phone)

    assert (routed["B24_STATUS"], routed["B24_TARGET"]) == ("FOUND", "184")
    assert "Traceback" not in server.log()
