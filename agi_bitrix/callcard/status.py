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
CANCELLED = "603-S"

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


def status_code(answered: bool, dialstatus: str) -> str:
    """STATUS_CODE for a call that was `answered` (someone took it) or ended with `dialstatus`.

    An answer stamp wins over DIALSTATUS, which only tells about the last Dial(): a call that
    rang the extension in vain and was then taken from a queue ends with DIALSTATUS=NOANSWER.
    An empty or unknown DIALSTATUS (no Dial ran: the caller hung up during routing or in a
    queue) is a missed call.
    """
    if answered:
        return ANSWERED
    return DIALSTATUS_CODES.get(dialstatus.strip().upper(), MISSED)


# A call our user placed (a desk phone's outgoing call, or click-to-call): the client leg's
# DIALSTATUS. Nobody waits for a call back here, so each code says what the client's side did;
# the portal's missed-call handling is for incoming calls.
OUTGOING_DIALSTATUS_CODES = {
    "NOANSWER": MISSED,  # the client's phone rang unanswered
    "CANCEL": CANCELLED,  # the agent hung up while the client's phone rang
    "BUSY": "486",
    "CONGESTION": "503",
    "CHANUNAVAIL": "480",
    "DONTCALL": "603",
    "TORTURE": "603",
    "INVALIDARGS": "503",
}


def outgoing_status_code(answered: bool, dialstatus: str) -> str:
    """STATUS_CODE for a call our user placed: 200 once the client answered; else the client
    leg's DIALSTATUS; none at all (the agent hung up before the client was dialled) is cancelled,
    and a DIALSTATUS this table does not know is OTHER."""
    if answered:
        return ANSWERED
    status = dialstatus.strip().upper()
    return OUTGOING_DIALSTATUS_CODES.get(status, "OTHER" if status else CANCELLED)
