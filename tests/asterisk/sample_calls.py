"""Calls through the sample dialplans, and what the stand-in phones, trunk and queues saw."""

from agi_bitrix.testing.ami_calls import CallDriver, PlacedCall, event_name_of

from .conftest import DID

SHORT_RING = "2"  # seconds; the samples' defaults (12-30 s) would make the tests slow
WAIT = 20  # seconds any awaited event may take


def sample_call(calls: CallDriver, entry_context: str, agi_url: str, callerid: str,
                answering: str = "", *, dialled: str = DID, **settings: str) -> PlacedCall:
    """A call to `dialled` from `callerid` entering `entry_context`; the stand-in whose number
    is `answering` answers. `settings` override the sample's globals for this call."""
    return calls.originate(dialled, callerid, entry_context, {
        "AGI_BITRIX_URL": agi_url, "AGI_BITRIX_EXTENSION_RING": SHORT_RING,
        "AGI_BITRIX_MOBILE_RING": SHORT_RING, "__TEST_ANSWERING": answering, **settings})


async def joined_queue(calls: CallDriver, call: PlacedCall) -> str:
    """Waits until the call waits in a queue; hangs it up; returns the queue's name."""
    joined = await calls.wait_for(call, "QueueCallerJoin", WAIT)
    await calls.hangup(joined["Channel"])
    return joined["Queue"]


def rings(call: PlacedCall) -> list[tuple[str, str]]:
    """(extension|outbound, number) for each ring of a stand-in, in order."""
    return [(event["Kind"], event["Number"]) for event in call.events
            if event_name_of(event) == "AgiBitrixTestRing"]


def is_sample_channel(event) -> bool:
    """The channel that runs the sample (the ;2 half of the originated Local channel)."""
    return event["Channel"].startswith(f"Local/{DID}@agi-bitrix-test-caller") and event["Channel"].endswith(";2")


def route_agi_status(call: PlacedCall) -> str:
    """AGISTATUS right after the sample's first AGI step, the route (later steps overwrite it)."""
    return next(event["Value"] for event in call.events
                if event.event == "VarSet" and event["Variable"] == "AGISTATUS")
