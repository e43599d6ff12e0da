"""How a call ended, as Bitrix24's STATUS_CODE for telephony.externalcall.finish.

The portal's codes (CALL_FAILED_CODE): 200 answered, 304 missed, 603 declined, 603-S cancelled,
403 forbidden, 404 wrong number, 486 busy, 484 and 503 direction unavailable, 480 temporarily
unavailable, 402 no funds, 423 blocked, OTHER. Only 304 starts the portal's missed-call handling
(a task or notification to call the client back), so every way an incoming call can go
unanswered that is not a clear signal from the callee counts as missed.
"""

from __future__ import annotations

ANSWERED = "200"
MISSED = "304"

# Asterisk's DIALSTATUS (set by Dial) when nobody answered.
DIALSTATUS_CODES = {
    "NOANSWER": MISSED,
    # The caller gave up while it rang: for an incoming call that is a missed call (the portal's
    # 603-S would hide it from the missed-call handling).
    "CANCEL": MISSED,
    "BUSY": "486",
    "CONGESTION": "503",
    "CHANUNAVAIL": "480",
    # Privacy manager / torture list: the callee turned the call down.
    "DONTCALL": "603",
    "TORTURE": "603",
    # A broken Dial() left the client unserved: someone should call back.
    "INVALIDARGS": MISSED,
}


# An outgoing call (callcard/outgoing.py) the employee gave up on while it rang was cancelled, not
# missed: the portal's missed-call handling is for incoming calls.
OUTGOING_CODES = {**DIALSTATUS_CODES, "CANCEL": "603-S"}


def status_code(answered: bool, dialstatus: str, *, outgoing: bool = False) -> str:
    """STATUS_CODE for a call that was `answered` (someone took it) or ended with `dialstatus`.

    An answer stamp wins over DIALSTATUS, which only tells about the last Dial(): a call that
    rang the extension in vain and was then taken from a queue ends with DIALSTATUS=NOANSWER.
    An empty or unknown DIALSTATUS (no Dial ran: the caller hung up during routing or in a
    queue) is a missed call.
    """
    if answered:
        return ANSWERED
    return (OUTGOING_CODES if outgoing else DIALSTATUS_CODES).get(dialstatus.strip().upper(), MISSED)
