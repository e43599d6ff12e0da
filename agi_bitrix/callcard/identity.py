"""What the call-card scripts (register, ringing/answered, finish) check the same way: the shape
of a call id and of a user id, and who takes a call that has no owner.

Kept here, below the scripts, so that no script imports another for these.
"""

from __future__ import annotations

import re

from agi_bitrix.callcard_settings import RegisterSettings

USER_ID_PATTERN = re.compile(r"^[0-9]{1,20}$")
# Asterisk's linkedid/uniqueid ("1700000000.42", or a custom id) and the portal's CALL_ID
# ("externalCall.<hex>.<unix time>").
CALL_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def responsible_user(settings: RegisterSettings, did: str) -> str:
    """Who takes a call to `did` (international digits) that has no (active) owner:
    callcard.register.responsible's user for that DID (the first listed), else default_user."""
    if did:
        for entry in settings.responsible:
            if entry.number == did:
                return entry.user
    return settings.default_user
