"""`agi-bitrix route`: one call routed for real (the portal is asked) and explained step by step
(the text is `trace.render`'s, the same the admin page shows)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agi_bitrix.bitrix.breaker import CircuitBreaker
from agi_bitrix.bitrix.cache import AnswerCache
from agi_bitrix.bitrix.client import AnswerTime, PortalClient, RequestSlot, SearchAnswer, make_session
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.bitrix.lookup import CrmLookup, LookupMemory
from agi_bitrix.bitrix.oauth import portal_client
from agi_bitrix.bitrix.operating import OperatingBudget
from agi_bitrix.bitrix.users import UserDirectory
from agi_bitrix.config import Config
from agi_bitrix.service import Router, call_info
from agi_bitrix.trace import render


class RecordingPortal:
    """The portal client, keeping the raw `result` it received for `--record`."""

    def __init__(self, portal: PortalClient) -> None:
        self.portal = portal
        self.raw_result: Any = None

    @property
    def operating(self) -> OperatingBudget:
        return self.portal.operating

    async def take_slot(self, max_wait: float, can_wait: bool = False) -> RequestSlot:
        return await self.portal.take_slot(max_wait, can_wait)

    async def search_numbers(self, phones: list[str], slot: RequestSlot) -> SearchAnswer:
        if len(phones) > 1:
            return await self.portal.search_numbers(phones, slot)
        timing = AnswerTime()
        self.raw_result = await self.portal.search_crm_entities_raw(phones[0], slot, timing)
        seconds = timing.processing
        return SearchAnswer({phones[0]: self.portal.parse_search(self.raw_result)},
                            {} if seconds is None else {phones[0]: seconds})


async def _user_directory(config: Config, portal: PortalClient) -> tuple[UserDirectory | None, str]:
    """The user directory as the server would have it (with a users section), and a note if it failed."""
    if config.users.refresh <= 0:
        return None, ""
    users = UserDirectory(lambda: portal, refresh=config.users.refresh, default_country=config.policy.default_country)
    try:
        await users.load()
    except BitrixError as error:
        return None, f"\nusers:    not loaded ({error.reason}); deactivated owners were not skipped"
    return users, ""


async def explain_call(config: Config, phone: str, did: str = "", record: str | None = None) -> str:
    async with make_session() as session:
        portal = portal_client(config.bitrix, session)
        recorder = RecordingPortal(portal)
        memory = LookupMemory(AnswerCache(config.cache),
                              CircuitBreaker(config.bitrix.breaker_failures, config.bitrix.breaker_cool_down))
        lookup = CrmLookup(recorder, memory, deadline=config.bitrix.deadline)
        users, users_note = await _user_directory(config, portal)
        call = call_info(phone, did, config.policy.default_country)
        routed = await Router(config, lookup, users=users).route(call, uniqueid="dry-run")
        text = render(routed, portal.redacted_url) + users_note
    if record:
        if routed.answer.status not in ("FOUND", "NOT_FOUND"):
            return text + f"\nnothing recorded: the portal gave no answer ({routed.answer.status})"
        await asyncio.to_thread(Path(record).write_text, json.dumps({
            "phone": routed.call.phone,
            "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "portal": portal.redacted_url,
            "result": recorder.raw_result,
        }, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        text += f"\nrecorded the portal's answer to {record} (use it as crm_file in a test case)"
    return text
