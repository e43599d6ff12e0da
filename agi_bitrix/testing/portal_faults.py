"""Fault injection for the portal emulator: the ways a real portal, or what stands in front of it,
fails a request.

A slow or hung portal, an error answer (the code may be empty, as the portal sends for a finish
it cannot match), a proxy's HTML page, a body cut short, a result PHP broke, a dropped
connection. Tests and the benchmarks add faults through `PortalEmulator.fail`; the demo adds
none.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web

from agi_bitrix.testing.portal_model import normalise_phone
from agi_bitrix.testing.portal_wire import ErrorAnswer, canonical_method, error_response, json_response, time_block

_FAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "slow": {"delay": 1.0},
    "hang": {},
    "error": {"status": 500, "code": "INTERNAL_SERVER_ERROR", "description": "Internal server error"},
    "html": {"status": 502},
    "bad_json": {"body": b'{"result":[{"CRM_ENTITY_TYPE":"CONTA'},
    # PHP turns an array used as a string into "Array": a believable broken result.
    "malformed": {"result": "Array"},
    "disconnect": {"reset": False},
}
FAULT_KINDS = tuple(_FAULT_OPTIONS)

# The portal's documented error answers, by code: (HTTP status, error_description). An `error`
# fault with one of these codes takes its status and text from here unless given.
DOCUMENTED_ERRORS: dict[str, tuple[int, str]] = {
    # _includes/system-errors.md
    "INTERNAL_SERVER_ERROR": (500, "Internal server error"),
    "QUERY_LIMIT_EXCEEDED": (503, "Too many requests"),
    "OVERLOAD_LIMIT": (503, "REST API is blocked due to overload"),
    "NO_AUTH_FOUND": (401, "Wrong authorization data"),
    "INVALID_REQUEST": (400, "Https required"),
    "ACCESS_DENIED": (403, "REST API is available only on commercial plans"),
    "INVALID_CREDENTIALS": (403, "Invalid request credentials"),
    "insufficient_scope": (403, "The request requires higher privileges than provided by the webhook token"),
    "expired_token": (401, "The access token provided has expired"),
    "user_access_error": (403, "The user does not have access to the application"),
    "PORTAL_DELETED": (500, "Portal was deleted"),
    # settings/oauth/auto-renewal.md: a token the portal does not know.
    "invalid_token": (401, "The access token provided is invalid."),
    # The REST server's STATUS_PAYMENT_REQUIRED (settings/cloud-and-on-premise/on-premise/custom-methods.md)
    # with settings/oauth/error-codes.md's text: the application's paid period is over.
    "PAYMENT_REQUIRED": (402, "Payment required"),
    # api-reference/telephony/telephony-external-call-register.md and -finish.md; the portal's
    # Bitrix\Rest\AuthTypeException is an AccessException, answered 403.
    "WRONG_AUTH_TYPE": (403, "Current authorization type is denied for this method"),
}

_NGINX_PAGE = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass
class Fault:
    kind: str
    phone: str | None
    method: str | None
    remaining: int | None
    options: dict[str, Any]

    def matches(self, method: str, params: Mapping[str, Any]) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.phone is None or normalise_phone(params.get("PHONE_NUMBER")) == self.phone

    def error_answer(self) -> ErrorAnswer:
        """The answer of an `error` fault."""
        options = self.options
        return ErrorAnswer(options["status"], options["code"], options["description"])


class FaultInjector:
    """The faults in force, in the order they were added, and what each does to a request."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        # Set to let hung and slow requests go on; replaced by a fresh one on each reset.
        self._release = asyncio.Event()

    def add(
        self,
        kind: str,
        *,
        phone: str | None = None,
        method: str | None = None,
        times: int | None = None,
        **options: Any,
    ) -> None:
        """A fault for requests about `phone` (any request when None) and `method` (any when
        None), for the next `times` such requests (until reset when None).

        slow(delay=s): answer normally after a delay. hang: no answer until reset or stop.
        error(status=, code=, description=): an error body; code may be ""; a code of
        DOCUMENTED_ERRORS brings the portal's status and text for it. html(status=502):
        a proxy's HTML page. bad_json(body=bytes): a 200 whose body is not the portal's JSON
        (default: cut short). malformed(result=): a 200 whose result is not a list of objects.
        disconnect(reset=False): close without answering; reset=True sends a TCP reset.
        """
        if kind not in _FAULT_OPTIONS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        unknown = set(options) - set(_FAULT_OPTIONS[kind])
        if unknown:
            raise TypeError(f"fault {kind!r} takes no option(s) {', '.join(sorted(unknown))}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        defaults = dict(_FAULT_OPTIONS[kind])
        if kind == "error" and options.get("code") in DOCUMENTED_ERRORS:
            defaults["status"], defaults["description"] = DOCUMENTED_ERRORS[options["code"]]
        self._faults.append(
            Fault(
                kind=kind,
                phone=None if phone is None else normalise_phone(phone),
                method=None if method is None else canonical_method(method),
                remaining=times,
                options={**defaults, **options},
            )
        )

    def reset(self) -> None:
        """No more faults; hung and slow requests go on at once."""
        self._faults.clear()
        self.release()
        self._release = asyncio.Event()

    def release(self) -> None:
        """Let hung and slow requests go on, as on stop."""
        self._release.set()

    def take(self, method: str, params: Mapping[str, Any]) -> Fault | None:
        """The first fault that applies to this request, counted as used once."""
        for fault in self._faults:
            if fault.matches(method, params):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                return fault
        return None

    async def respond(self, fault: Fault, request: web.Request) -> web.StreamResponse | None:
        """The faulty answer, or None when the request should then be answered normally."""
        options = fault.options
        if fault.kind in ("slow", "hang"):
            release = self._release
            timeout = options["delay"] if fault.kind == "slow" else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), timeout)
            return None
        if fault.kind == "error":
            return error_response(fault.error_answer())
        if fault.kind == "html":
            return nginx_page(options["status"])
        if fault.kind == "bad_json":
            return web.Response(status=200, body=options["body"], content_type="application/json")
        if fault.kind == "malformed":
            now = time.time()
            return json_response(200, {"result": options["result"], "time": time_block(now, now)})
        # disconnect: drop the connection; aiohttp then quietly skips writing the response.
        transport = request.transport
        assert transport is not None
        if options["reset"]:
            # Zero linger turns close() into a TCP RST, like a crashed or firewalled peer.
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        transport.close()
        return web.Response(status=200)


def nginx_page(status: int) -> web.Response:
    """The error page the portal's nginx sends by itself (a proxy error, a body over its limit)."""
    page = _NGINX_PAGE.format(status=status, reason=_reason(status))
    return web.Response(status=status, text=page, content_type="text/html")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
