"""The follow-up of a missed call from a client the CRM knows: a to-do or a notification for the
person the call was finished to (callcard.follow_up.kind), sent once through the outbox.

The finish script queues it beside the finish, as a row of its own that waits for the finish
(`after`): the missed call is on the client's timeline before the to-do that asks to return it,
and a finish given up takes its follow-up with it. The outbox stores it durably and hands it to
one server once, like a finish. Which client: the CRM object routing found (B24_ENTITY_TYPE and
B24_ENTITY_ID, read from the caller's channel in the hangup handler); a call from a number the
CRM does not know leaves none.

- todo: crm.activity.todo.add (api-reference/crm/timeline/activities/todo/crm-activity-todo-add.md;
  dev.1c-bitrix.ru rest_help/crm/rest_activity/todo/crm_activity_todo_add.php): ownerTypeId and
  ownerId (the CRM object; 1 lead, 2 deal, 3 contact, 4 company), deadline, title, description,
  responsibleId. Answers {"id": N}.
- notify: im.notify.personal.add (api-reference/chats/notifications/im-notify-personal-add.md):
  USER_ID, MESSAGE. Answers the notification's id.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from agi_bitrix.bitrix.client import PortalClient
from agi_bitrix.bitrix.errors import BitrixError
from agi_bitrix.callcard.delivery import Entry, Outcome
from agi_bitrix.callcard_settings import FollowUpSettings

log = logging.getLogger("agi_bitrix.callcard")

FOLLOW_UP = "follow_up"  # the outbox's kind of row for a follow-up
TODO_ADD = "crm.activity.todo.add"
NOTIFY = "im.notify.personal.add"
# The CRM's entity type ids (crm.enum.ownertype): what ownerTypeId takes.
OWNER_TYPE_IDS = {"LEAD": 1, "DEAL": 2, "CONTACT": 3, "COMPANY": 4}
_ENTITY_ID = re.compile(r"^[0-9]{1,20}$")
_PHONE = re.compile(r"^\+?[0-9]{1,32}$")


def follow_up_key(call_id: str) -> str:
    """A follow-up's outbox key; "/" never occurs in a CALL_ID, so it cannot meet a finish's key."""
    return f"{call_id}/{FOLLOW_UP}"


def follow_up_row(settings: FollowUpSettings, *, call_id: str, user_id: str, entity_type: str, entity_id: str,
                  phone: str, hangup_at: float) -> dict[str, Any] | None:
    """The outbox row's params, or None when there is nothing to follow up (off, no CRM object)."""
    entity_type = entity_type.strip().upper()
    if settings.kind == "off" or entity_type not in OWNER_TYPE_IDS or not _ENTITY_ID.match(entity_id.strip()):
        return None
    return {"kind": settings.kind, "CALL_ID": call_id, "user": user_id, "entity_type": entity_type,
            "entity_id": entity_id.strip(), "phone": phone if _PHONE.match(phone) else "",
            "deadline": hangup_at + settings.deadline}


def request_of(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The method and parameters a stored follow-up is sent as."""
    phone = params["phone"] or "a hidden number"
    about = f"{params['entity_type']} {params['entity_id']}"
    if params["kind"] == "todo":
        deadline = datetime.fromtimestamp(float(params["deadline"]), UTC).isoformat(timespec="seconds")
        return TODO_ADD, {"ownerTypeId": OWNER_TYPE_IDS[params["entity_type"]], "ownerId": int(params["entity_id"]),
                          "deadline": deadline, "title": f"Missed call from {phone}",
                          "description": f"The client called from {phone} and nobody answered: call back.",
                          "responsibleId": int(params["user"])}
    return NOTIFY, {"USER_ID": int(params["user"]),
                    "MESSAGE": f"Missed call from {phone} ({about}): nobody answered, call back."}


async def send_follow_up(portal: PortalClient, entry: Entry) -> Outcome:
    """Deliver one queued follow-up; tell the outbox whether it is done, worth retrying, or lost."""
    method, params = request_of(entry.params)
    try:
        # Like a finish: it can wait, calls cannot; only a request slot that is free now.
        result = await portal.call(method, params, max_wait=0.0)
    except BitrixError as error:
        detail = f"{method}: {error.reason}: {error.detail}"
        return Outcome("retry" if error.retry_later else "failed", detail)
    log.info("follow-up %s of missed call %s for user %s delivered (%s, answered %.40r)", entry.params["kind"],
             entry.params["CALL_ID"], entry.params["user"], method, result)
    return Outcome("delivered")
