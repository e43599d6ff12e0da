"""CRM objects shaped as telephony.externalCall.searchCrmEntities returns them, and caller
numbers no other test uses (the server caches answers per number)."""

import itertools
import os
from collections.abc import Callable, Iterator

_numbers = itertools.count(1)
_ABSENT = object()


def fresh_phone() -> str:
    """A Russian mobile in international digits that no other call of this run has used."""
    return f"79{os.getpid() % 100:02d}{next(_numbers):07d}"


def fresh_mobiles(prefix: str, numbers: Iterator[int]) -> Callable[[], str]:
    """A test file's fresh_client: a Moscow mobile starting with `prefix` (a valid MOBILE number of
    RU) with the next of `numbers`, so no other client of this run has used it."""
    def fresh_client() -> str:
        return f"{prefix}{os.getpid() % 1000:03d}{next(numbers):04d}"
    return fresh_client


def crm_object(owner_id: int, timeman=_ABSENT, *, entity_type: str = "CONTACT", entity_id: int = 1,
               extension=None, mobile=None, work=None, personal=None) -> dict:
    """One CRM object and its owner; timeman left out means the portal sent no TIMEMAN_STATUS."""
    owner = {"ID": str(owner_id), "USER_PHONE_INNER": extension, "WORK_PHONE": work,
             "PERSONAL_PHONE": personal, "PERSONAL_MOBILE": mobile}
    if timeman is not _ABSENT:
        owner["TIMEMAN_STATUS"] = timeman
    return {"CRM_ENTITY_TYPE": entity_type, "CRM_ENTITY_ID": entity_id,
            "ASSIGNED_BY_ID": owner_id, "ASSIGNED_BY": owner}
