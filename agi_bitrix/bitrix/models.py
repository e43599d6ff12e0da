"""What telephony.externalCall.searchCrmEntities tells us, as plain frozen data.

The portal mixes types freely (numeric entity ids, string user ids, nulls, phones typed by
hand), so parsing is tolerant about types but strict about shape: anything that is not a list
of objects is a malformed answer. Values are kept as the portal sent them (as text); deciding
whether a phone is dialable is the routing layer's job, not this one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class MalformedAnswer(ValueError):
    """The portal answered 200 with a body whose `result` is not what the method returns."""


@dataclass(frozen=True, slots=True)
class Owner:
    """The employee responsible for a CRM object (the portal's ASSIGNED_BY)."""

    user_id: str
    timeman_status: str = ""
    inner_phone: str = ""
    work_phone: str = ""
    personal_phone: str = ""
    personal_mobile: str = ""


@dataclass(frozen=True, slots=True)
class CrmEntity:
    """One CRM object that carries the caller's number."""

    entity_type: str
    entity_id: str
    owner: Owner | None
    # NAME: the object's name or full name, as the portal sent it (the current docs list it;
    # older portals leave it out). What may reach a phone's display is the routing layer's call.
    name: str = ""


@dataclass(frozen=True, slots=True)
class CrmAnswer:
    """The outcome of a lookup, as routing sees it.

    status: FOUND | NOT_FOUND | NO_CALLERID | ERROR. error: why the portal could not answer
    (also set when a stale cached answer stands in). cache: "hit", "miss", "stale", or "" when
    nothing was looked up.
    """

    status: str
    entities: tuple[CrmEntity, ...] = ()
    error: str = ""
    cache: str = ""


def _text(value: Any) -> str:
    """Portal scalars as text: None -> "", 42 -> "42", " x " -> "x"; lists/dicts are not scalars."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (int, str)):
        return str(value).strip()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return ""


def parse_owner(assigned_by: Any, assigned_by_id: Any) -> Owner | None:
    user_id = ""
    fields: dict[str, Any] = {}
    if isinstance(assigned_by, dict):
        fields = assigned_by
        user_id = _text(assigned_by.get("ID"))
    if not user_id:
        user_id = _text(assigned_by_id)
    if not user_id:
        return None
    return Owner(
        user_id=user_id,
        timeman_status=_text(fields.get("TIMEMAN_STATUS")),
        inner_phone=_text(fields.get("USER_PHONE_INNER")),
        work_phone=_text(fields.get("WORK_PHONE")),
        personal_phone=_text(fields.get("PERSONAL_PHONE")),
        personal_mobile=_text(fields.get("PERSONAL_MOBILE")),
    )


def parse_search_result(result: Any) -> list[CrmEntity]:
    """Turn the `result` of searchCrmEntities into entities, keeping the portal's order."""
    if result is None or result == {} or result is False:
        # PHP serialises an empty array as [] but some proxies and older portals send {} or false.
        return []
    if not isinstance(result, list):
        raise MalformedAnswer(f"result is {type(result).__name__}, expected a list")
    entities = []
    for index, item in enumerate(result):
        if not isinstance(item, dict):
            raise MalformedAnswer(f"result[{index}] is {type(item).__name__}, expected an object")
        entity_type = _text(item.get("CRM_ENTITY_TYPE")).upper()
        entity_id = _text(item.get("CRM_ENTITY_ID"))
        if not entity_type or not entity_id:
            raise MalformedAnswer(f"result[{index}] lacks CRM_ENTITY_TYPE or CRM_ENTITY_ID")
        owner = parse_owner(item.get("ASSIGNED_BY"), item.get("ASSIGNED_BY_ID"))
        entities.append(CrmEntity(entity_type, entity_id, owner, _text(item.get("NAME"))))
    return entities
