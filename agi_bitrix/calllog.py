"""One structured line per call, for the admin who greps or ships logs.

Plain: `call uniqueid=1700.42 phone=79161234567 status=FOUND route=extension target=101 ...`
JSON:  `{"time": "...", "uniqueid": "1700.42", "phone": "79161234567", "status": "FOUND", ...}`
(one object per line, nothing around it, so a log shipper can parse every line as JSON).
The client's number can be masked; the webhook code and tokens are never part of a call line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from agi_bitrix.callrecord import CallRecord
from agi_bitrix.config import CallLogSettings

log = logging.getLogger("agi_bitrix.calls")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def mask_number(number: str) -> str:
    """79161234567 -> 7916*****67: the operator prefix and the last digits stay for support."""
    if len(number) <= 6:
        return "*" * len(number)
    return number[:4] + "*" * (len(number) - 6) + number[-2:]


class CallLog:
    def __init__(self, settings: CallLogSettings) -> None:
        self._json_handler: logging.Handler | None = None
        self.settings = settings
        self.configure(settings)

    def configure(self, settings: CallLogSettings) -> None:
        self.settings = settings
        if settings.format == "json" and self._json_handler is None:
            # JSON lines go out bare: no timestamp/level prefix in front of the object.
            self._json_handler = logging.StreamHandler(sys.stderr)
            self._json_handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(self._json_handler)
            log.propagate = False
        elif settings.format != "json" and self._json_handler is not None:
            log.removeHandler(self._json_handler)
            self._json_handler = None
            log.propagate = True

    def close(self) -> None:
        self.configure(CallLogSettings(format="plain"))

    def record(self, call: CallRecord) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        phone = call.phone
        fields = {
            # From the AGI header: a hostile client could put spaces or "status=..." in it.
            "uniqueid": _UNSAFE.sub("?", call.uniqueid)[:64] or "-",
            "phone": (mask_number(phone) if self.settings.mask_numbers else phone) or "-",
            "status": call.status,
            "route": call.route,
            "target": call.target,
            "rule": call.rule,
            "error": call.error or "-",
            "cache": call.cache or "-",
            "latency_ms": round(call.seconds * 1000, 1),
        }
        if self.settings.format == "json":
            fields = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields}
            log.info(json.dumps(fields, ensure_ascii=False))
        else:
            log.info("call %s", " ".join(f"{key}={value}" for key, value in fields.items()))
